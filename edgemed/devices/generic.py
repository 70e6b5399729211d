"""Any other machine: cores and memory from what Linux files or the OS report."""

from __future__ import annotations

import os
from pathlib import Path

from edgemed.devices.facts import Facts, Host, cpuinfo, linux_memory, memory_unknown


def probe(host: Host) -> Facts | None:
    flags, physical, logical, model = cpuinfo(host)
    here = host.root == Path("/")
    total, limit = linux_memory(host, warn_missing=not here)  # on this machine the OS may still tell (below)
    if here:
        logical = logical if logical > 1 else (os.cpu_count() or 1)
        physical = physical if physical > 1 else logical
        if not total and hasattr(os, "sysconf"):
            try:
                total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            except (ValueError, OSError):
                total = 0
        if not total:
            memory_unknown("neither /proc/meminfo's MemTotal nor the OS (sysconf SC_PHYS_PAGES) gives a size")
    return Facts(platform="generic", model=model or "unknown CPU", cpu_flags=flags, physical_cores=physical,
                 logical_cores=logical, memory_bytes=total, memory_limit_bytes=limit)
