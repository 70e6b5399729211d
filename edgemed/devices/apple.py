"""Apple Silicon (macOS): chip name, cores, memory and the GPU wired-memory limit from ``sysctl``."""

from __future__ import annotations

from pathlib import Path

from edgemed.devices.cgroup import DIGITS
from edgemed.devices.facts import Facts, Host, memory_unknown


def _number(value: str | None) -> int | None:
    return int(value.strip()) if value and DIGITS.fullmatch(value.strip()) else None  # "²" or "abc": absent


def _int(host: Host, key: str) -> int | None:
    return _number(host.sysctl(key))


def _memsize(host: Host) -> int:
    """``hw.memsize`` in bytes; 0 (unknown) with a warning naming the key when it is missing, 0 or not a number."""
    value = host.sysctl("hw.memsize")
    size = _number(value)
    if size:
        return size
    where = "sysctl hw.memsize" + ("" if host.root == Path("/") else f" (of the machine at {host.root})")
    memory_unknown(f"{where} is missing" if value is None else f"{where} is {ascii(value.strip()[:40])}, not a size")
    return 0


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
                 memory_bytes=_memsize(host), details=details,
                 gpu_wired_limit_bytes=wired << 20 if wired else None)  # 0: macOS's default working set
