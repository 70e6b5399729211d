"""x86-64 Linux: /proc/cpuinfo flags (AVX2, AVX-512), physical cores, RAM and cgroup limit."""

from __future__ import annotations

from edgemed.devices.facts import Facts, Host, cpuinfo, linux_memory

X86_MARKERS = {"sse2", "lm"}  # every x86-64 CPU reports these


def probe(host: Host) -> Facts | None:
    flags, physical, logical, model = cpuinfo(host)
    if not X86_MARKERS <= flags:
        return None
    total, limit = linux_memory(host)
    return Facts(platform="x86", model=model, cpu_flags=flags, physical_cores=physical,
                 logical_cores=logical, memory_bytes=total, memory_limit_bytes=limit)
