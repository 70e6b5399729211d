"""The one reader of this process's memory cgroup: the limits set on it, and the room left under each.

``/proc/self/cgroup`` names the process's group in each hierarchy: the unified v2 one (``0::/PATH``) and the
v1 ones by controller (``4:memory:/PATH``). ``/proc/self/mountinfo`` says where each hierarchy is mounted and
which of its groups is the mount's root (a container sees its own group as ``/``). Every group from the
process's own up to that root may set a limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``; ``max`` or a
figure of 2^60 or more is none), and the tightest applies. The room under a limit is the limit less what the
group uses, its reclaimable page cache (``memory.stat``: v2 ``inactive_file``, v1 ``total_inactive_file``)
counted as room. Every read goes through a ``facts.Host`` (below a root folder), so fixture trees stand in
for machines.

The CPUs the group may use are read the same way: a cpuset (v2 ``cpuset.cpus.effective``, v1 ``cpuset.cpus``)
and a bandwidth quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``), as Docker's
``--cpuset-cpus`` and ``--cpus`` set them. A group path that climbs (``..``) is never followed.
"""

from __future__ import annotations

import math
import re
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


def _groups(host: Host, controller: str):
    """(hierarchy "v1"/"v2", folder) for each folder from this process's group up to its mount's root, in every
    hierarchy that holds ``controller`` (v2: the unified one, where the controller's files live in every group)."""
    groups, mounts = host.read("/proc/self/cgroup"), host.read("/proc/self/mountinfo")
    if groups is None or mounts is None:
        return
    for line in groups.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        kind = "v2" if hier == "0" and controllers == "" else "v1" if controller in controllers.split(",") else None
        if kind is None or ".." in PurePosixPath(path).parts:  # a path that climbs out of the hierarchy: not followed
            continue
        for group_root, point in _mounts(mounts, "cgroup2" if kind == "v2" else "cgroup", controller if kind == "v1" else None):
            group = PurePosixPath(path)
            rel = group.relative_to(group_root) if group.is_relative_to(group_root) else group.relative_to("/")
            folder = point / rel
            while True:
                yield kind, folder
                if folder == point or folder == folder.parent:
                    break
                folder = folder.parent


def limits(host: Host) -> list[Limit]:
    """Every memory limit that applies to this process (none where no cgroup is readable)."""
    out: list[Limit] = []
    for kind, folder in _groups(host, "memory"):
        _, limit_file, usage_file, cache_key = _FILES[kind]
        limit = _read_limit(host, folder / limit_file)
        if limit is not None:
            out.append(Limit(limit, _room(host, folder, limit, usage_file, cache_key), str(folder / limit_file)))
    return out


def cpu_limit(host: Host) -> tuple[int, str] | None:
    """(the CPUs this process's cgroups let it use, the file that says so): the smallest of every cpuset's CPU
    count and every quota rounded up to whole CPUs; None where no group limits them."""
    found: list[tuple[int, str]] = []
    for kind, folder in _groups(host, "cpuset"):
        name = "cpuset.cpus.effective" if kind == "v2" else "cpuset.cpus"
        n = cpuset_size(host.read(str(folder / name)) or "")
        if n:
            found.append((n, str(folder / name)))
    for kind, folder in _groups(host, "cpu"):
        if kind == "v2":  # "QUOTA PERIOD", QUOTA "max" for none
            where = str(folder / "cpu.max")
            quota, _, period = (host.read(where) or "").strip().partition(" ")
        else:  # two files; a quota of -1 is none
            where = str(folder / "cpu.cfs_quota_us")
            quota, period = ((host.read(str(folder / f)) or "").strip() for f in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        if DIGITS.fullmatch(quota) and DIGITS.fullmatch(period) and int(period) > 0 and int(quota) > 0:
            found.append((max(1, math.ceil(int(quota) / int(period))), where))
    return min(found, default=None)


#: The most CPUs a cpuset may list: far above any machine edgemed runs on (a list beyond it is not a real one).
MAX_CPUS = 1 << 16


def cpuset_size(text: str) -> int:
    """How many CPUs a cpuset list names (``0-3,8`` -> 5); 0 for an empty or malformed list."""
    text = text.strip()
    if not text or len(text) > 65536:
        return 0
    cpus: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part.strip())
        if m is None:
            return 0
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo or hi >= MAX_CPUS:
            return 0
        cpus.update(range(lo, hi + 1))
    return len(cpus)


def tightest_limit(host: Host) -> Limit | None:
    """The smallest limit that applies (what a device may plan for), or None."""
    return min(limits(host), key=lambda lim: lim.bytes, default=None)


def least_room(host: Host) -> Limit | None:
    """The limit with the least room left under it (what a conversion may still take), or None."""
    return min((lim for lim in limits(host) if lim.room is not None), key=lambda lim: lim.room, default=None)


def _mounts(mountinfo: str, fstype: str, controller: str | None) -> list[tuple[PurePosixPath, PurePosixPath]]:
    """(the group at the mount's root, mount point) of each mount of ``fstype`` (v1: holding ``controller``)."""
    found = []
    for line in mountinfo.splitlines():  # "ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS ... - FSTYPE SOURCE SUPER_OPTIONS"
        fields, _, tail = line.partition(" - ")
        parts, tail_parts = fields.split(), tail.split()
        if len(parts) < 5 or not tail_parts or tail_parts[0] != fstype:
            continue
        if controller is not None and controller not in tail_parts[-1].split(","):
            continue
        found.append((PurePosixPath(parts[3]), PurePosixPath(parts[4])))
    return found


#: A whole number as a system file writes one: ASCII digits only (str.isdigit takes "²", which int() refuses), at
#: most 20 (2^64 has 20; int() refuses a string of thousands)
DIGITS = re.compile(r"[0-9]{1,20}")


def _read_limit(host: Host, path: PurePosixPath) -> int | None:
    raw = (host.read(str(path)) or "").strip()
    if not DIGITS.fullmatch(raw) or int(raw) >= _NONE:  # "max", missing, unreadable or v1's "no limit"
        return None
    return int(raw)


def _room(host: Host, folder: PurePosixPath, limit: int, usage_file: str, cache_key: str) -> int | None:
    usage, stat = host.read(str(folder / usage_file)), host.read(str(folder / "memory.stat")) or ""
    try:
        cache = dict(line.split(maxsplit=1) for line in stat.splitlines() if " " in line)
        return max(0, limit - (int(usage or "") - int(cache.get(cache_key, 0))))
    except ValueError:
        return None
