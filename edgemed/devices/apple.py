"""Apple Silicon (macOS): chip name, cores, memory and the GPU wired-memory limit from ``sysctl``."""

from __future__ import annotations

from edgemed.devices.cgroup import DIGITS
from edgemed.devices.facts import Facts, Host


def _int(host: Host, key: str) -> int | None:
    value = host.sysctl(key)
    return int(value.strip()) if value and DIGITS.fullmatch(value.strip()) else None  # "²" or "abc": absent


def probe(host: Host) -> Facts | None:
    brand = host.sysctl("machdep.cpu.brand_string") or ""
    if host.sysctl("hw.optional.arm64") != "1" and not brand.startswith("Apple"):
        return None
    physical = _int(host, "hw.physicalcpu") or 1
    details = {"gpu": "Metal (unified memory)"}
    wired = _int(host, "iogpu.wired_limit_mb")
    if wired:
        details["gpu_wired_limit_mb"] = str(wired)
    return Facts(platform="apple", model=brand or "Apple Silicon", physical_cores=physical,
                 logical_cores=_int(host, "hw.logicalcpu") or physical,
                 performance_cores=_int(host, "hw.perflevel0.physicalcpu"),
                 memory_bytes=_int(host, "hw.memsize") or 0, details=details,
                 gpu_wired_limit_bytes=wired << 20 if wired else None)  # 0: macOS's default working set
