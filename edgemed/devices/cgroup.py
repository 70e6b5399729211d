"""The one reader of this process's memory cgroup: the limits set on it, and the room left under each.

``/proc/self/cgroup`` names the process's group in each hierarchy: the unified v2 one (``0::/PATH``) and the
v1 ones by controller (``4:memory:/PATH``). ``/proc/self/mountinfo`` says where each hierarchy is mounted and
which of its groups is the mount's root (a container sees its own group as ``/``). Every group from the
process's own up to that root may set a limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``; ``max`` or a
figure of 2^60 or more is none), and the tightest applies. The room under a limit is the limit less what the
group uses, its reclaimable page cache (``memory.stat``: v2 ``inactive_file``, v1 ``total_inactive_file``)
counted as room. Every read goes through a ``facts.Host`` (below a root folder), so fixture trees stand in
for machines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Protocol

_NONE = 1 << 60  # v1 says "no limit" with a figure near 2^63
#: hierarchy -> (its filesystem type, limit file, usage file, reclaimable cache key in memory.stat)
_FILES = {"v2": ("cgroup2", "memory.max", "memory.current", "inactive_file"),
          "v1": ("cgroup", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


class Host(Protocol):
    """What is read through: ``facts.Host`` (a machine, or a fixture tree)."""

    def read(self, path: str) -> str | None: ...


@dataclass(frozen=True)
class Limit:
    """One memory limit on the way from this process's group to its hierarchy's root."""

    bytes: int
    room: int | None  # what the group can still take (None: its usage cannot be read)
    where: str        # the limit file, as on the machine


def limits(host: Host) -> list[Limit]:
    """Every memory limit that applies to this process (none where no cgroup is readable)."""
    groups, mounts = host.read("/proc/self/cgroup"), host.read("/proc/self/mountinfo")
    if groups is None or mounts is None:
        return []
    out: list[Limit] = []
    for line in groups.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        kind = "v2" if hier == "0" and controllers == "" else "v1" if "memory" in controllers.split(",") else None
        if kind is None:
            continue
        fstype, limit_file, usage_file, cache_key = _FILES[kind]
        for group_root, point in _mounts(mounts, fstype, v1=kind == "v1"):
            group = PurePosixPath(path)
            rel = group.relative_to(group_root) if group.is_relative_to(group_root) else group.relative_to("/")
            folder = point / rel
            while True:
                limit = _read_limit(host, folder / limit_file)
                if limit is not None:
                    out.append(Limit(limit, _room(host, folder, limit, usage_file, cache_key), str(folder / limit_file)))
                if folder == point or folder == folder.parent:
                    break
                folder = folder.parent
    return out


def tightest_limit(host: Host) -> Limit | None:
    """The smallest limit that applies (what a device may plan for), or None."""
    return min(limits(host), key=lambda lim: lim.bytes, default=None)


def least_room(host: Host) -> Limit | None:
    """The limit with the least room left under it (what a conversion may still take), or None."""
    return min((lim for lim in limits(host) if lim.room is not None), key=lambda lim: lim.room, default=None)


def _mounts(mountinfo: str, fstype: str, v1: bool) -> list[tuple[PurePosixPath, PurePosixPath]]:
    """(the group at the mount's root, mount point) of each mount of ``fstype`` (v1: with the memory controller)."""
    found = []
    for line in mountinfo.splitlines():  # "ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS ... - FSTYPE SOURCE SUPER_OPTIONS"
        fields, _, tail = line.partition(" - ")
        parts, tail_parts = fields.split(), tail.split()
        if len(parts) < 5 or not tail_parts or tail_parts[0] != fstype:
            continue
        if v1 and "memory" not in tail_parts[-1].split(","):
            continue
        found.append((PurePosixPath(parts[3]), PurePosixPath(parts[4])))
    return found


def _read_limit(host: Host, path: PurePosixPath) -> int | None:
    raw = (host.read(str(path)) or "").strip()
    if not raw.isdigit() or int(raw) >= _NONE:  # "max", missing, unreadable or v1's "no limit"
        return None
    return int(raw)


def _room(host: Host, folder: PurePosixPath, limit: int, usage_file: str, cache_key: str) -> int | None:
    usage, stat = host.read(str(folder / usage_file)), host.read(str(folder / "memory.stat")) or ""
    try:
        cache = dict(line.split(maxsplit=1) for line in stat.splitlines() if " " in line)
        return max(0, limit - (int(usage or "") - int(cache.get(cache_key, 0))))
    except ValueError:
        return None
