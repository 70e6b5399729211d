"""How much memory a conversion may use: what this process holds plus what it can still get, or what the user says.

``detect_budget`` takes, in order: ``--memory-budget`` (``RouteOptions.memory_budget``), ``$EDGEMED_MEMORY_BUDGET``,
else psutil's available memory (free pages plus the page cache the kernel can drop), lowered to the least room
left under this process's memory cgroup limits where any apply (``edgemed.devices.cgroup``, the one reader: v1 or
v2, every group from the process's up to the root; a group's reclaimable file cache counts as room),
plus the resident memory this process already holds. ``converters/budget/peaks.py`` sets the estimates against it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

from edgemed import env
from edgemed.devices.cgroup import least_room
from edgemed.devices.facts import Host
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
    limited = least_room(Host())
    if limited is not None and limited.room < room:
        room, where = limited.room, f"room left under the cgroup limit {limited.where}"
    return Budget(room + held, f"{where} {room / GIB:.1f} GiB + {held / GIB:.1f} GiB this process holds")
