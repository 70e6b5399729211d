"""How much memory a conversion may use: what this process holds plus what it can still get, or what the user says.

``detect_budget`` takes, in order: ``--memory-budget`` (``RouteOptions.memory_budget``), ``$EDGEMED_MEMORY_BUDGET``,
else psutil's available memory (free pages plus the page cache the kernel can drop), lowered to the room left
under this process's memory cgroup limit when one applies (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``,
the tightest on the way from the process's group to the root; a group's reclaimable file cache counts as room),
plus the resident memory this process already holds. ``converters/budget/peaks.py`` sets the estimates against it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from edgemed import env
from edgemed.errors import InputError, require

GIB = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
          "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tb": 10**12, "tib": 1 << 40}
#: the largest size accepted (1 PiB): a larger figure is a typo (or a hostile value), not a machine
MAX_SIZE = 1 << 50


def parse_size(text: str | None, what: str = "--memory-budget") -> int:
    """``"6GiB"``, ``"6000MB"``, ``"6.5G"`` or plain bytes -> bytes (GB = 10^9, GiB = 2^30).

    ``what`` names the flag or variable in the refusal: empty, not a size, zero, or over ``MAX_SIZE``."""
    example = f"pass {what} 6GiB (binary units: KiB MiB GiB TiB; decimal: KB MB GB TB)"
    if what.startswith("$"):  # an environment variable
        example = f"set {what[1:]}=6GiB (binary units: KiB MiB GiB TiB; decimal: KB MB GB TB), or unset it"
    shown = str(text)[:40] + ("..." if len(str(text)) > 40 else "")
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", str(text or ""))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        negative = str(text or "").strip().startswith("-")
        raise InputError(f"{what} must be a size such as 6GiB, 6000MB or 24G, not {shown!r}"
                         + (" (a negative size)." if negative else "."), example)
    value = Decimal(m.group(1)) * _UNITS[unit]  # exact digits: no float overflow (a 400-digit figure), no inf
    if value > MAX_SIZE:
        raise InputError(f"{what} {shown!r} is over 1 PiB, more memory than any machine has: a typo?", example)
    size = int(value)
    if size <= 0:
        raise InputError(f"{what} {shown!r} is {'zero' if value == 0 else 'less than one byte'}: nothing fits in it.",
                         example)
    return size


@dataclass(frozen=True)
class Budget:
    bytes: int
    source: str  # where the figure came from, for the refusal


def _cgroup_room(root: Path = Path("/")) -> tuple[int, str] | None:
    """Bytes this process's memory cgroup (v2 memory.max or v1 memory.limit_in_bytes) can still take, or None.

    ``root``: where the filesystem is (tests pass a fixture tree)."""
    try:
        groups = (root / "proc/self/cgroup").read_text().splitlines()
        mounts = (root / "proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in groups:
        hier, controllers, path = line.split(":", 2)
        v2 = hier == "0" and controllers == ""
        if not v2 and "memory" not in controllers.split(","):
            continue
        fstype = "cgroup2" if v2 else "cgroup"
        for mount in mounts:  # "... root mount_point ... - fstype source options"
            fields, _, tail = mount.partition(" - ")
            tail_parts, parts = tail.split(), fields.split()
            if not tail_parts or tail_parts[0] != fstype or (not v2 and "memory" not in tail_parts[-1].split(",")):
                continue
            group_root, point = parts[3], root / parts[4].lstrip("/")
            rel = Path(path).relative_to(group_root) if Path(path).is_relative_to(group_root) else Path(path.lstrip("/"))
            names = ("memory.max", "memory.current", "inactive_file") if v2 else \
                ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            folder = point / rel
            while True:  # the tightest limit from the process's group up to the hierarchy's root
                room = _room(folder, *names)
                if room is not None and (best is None or room < best[0]):
                    best = (room, f"{folder / names[0]}")
                if folder == point or folder == folder.parent:
                    break
                folder = folder.parent
    return best


def _room(folder: Path, limit_file: str, usage_file: str, inactive: str) -> int | None:
    try:
        raw = (folder / limit_file).read_text().strip()
        if raw == "max" or int(raw) >= 1 << 60:
            return None
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines() if " " in line)
        usage = int((folder / usage_file).read_text()) - int(stat.get(inactive, 0))
        return max(0, int(raw) - usage)
    except (OSError, ValueError):
        return None


def requested_budget(override: str | None = None) -> Budget | None:
    """The budget the user set: ``override`` (``--memory-budget``; given, even empty, it must be a size), else
    ``$EDGEMED_MEMORY_BUDGET`` when set and not empty; None when neither is. The command checks it before any work."""
    if override is not None:
        return Budget(parse_size(override), f"--memory-budget {override}")
    value = env.memory_budget()
    if value is not None:
        return Budget(parse_size(value, f"${env.MEMORY_BUDGET_VAR}"), f"${env.MEMORY_BUDGET_VAR}={value}")
    return None


def detect_budget(override: str | None = None) -> Budget:
    """``override`` (``--memory-budget``), else ``$EDGEMED_MEMORY_BUDGET``, else what this process can get."""
    requested = requested_budget(override)
    if requested is not None:
        return requested
    psutil = require("psutil", "convert")
    held = psutil.Process().memory_info().rss
    room, where = psutil.virtual_memory().available, "available memory (psutil)"
    limited = _cgroup_room()
    if limited is not None and limited[0] < room:
        room, where = limited[0], f"room left under the cgroup limit {limited[1]}"
    return Budget(room + held, f"{where} {room / GIB:.1f} GiB + {held / GIB:.1f} GiB this process holds")
