"""NVIDIA Jetson (L4T): /etc/nv_tegra_release, the device-tree model, nvpmodel power mode."""

from __future__ import annotations

import re

from edgemed.devices.facts import Facts, Host, cpuinfo, linux_memory

# L4T release (major, minor) -> JetPack version, from NVIDIA's release notes.
L4T_TO_JETPACK = {
    (36, 4): "6.1", (36, 3): "6.0", (36, 2): "6.0 DP",
    (35, 6): "5.1.4", (35, 5): "5.1.3", (35, 4): "5.1.2", (35, 3): "5.1.1", (35, 2): "5.1", (35, 1): "5.0.2",
}
# L4T (major, minor, patch) releases that carry a different JetPack than their (major, minor) row.
L4T_PATCH_TO_JETPACK = {(36, 4, 3): "6.2", (36, 4, 4): "6.2.1"}


def _l4t(text: str) -> tuple[int, int, int] | None:
    """``# R36 (release), REVISION: 4.0, ...`` -> (36, 4, 0)."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)\.(\d+)", text)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def _power_mode(host: Host) -> str | None:
    """The nvpmodel mode name (``15W``, ``MAXN``...) from its status and config files."""
    status = host.read("/var/lib/nvpmodel/status") or ""
    m = re.search(r"pmode:(\d+)", status)
    conf = host.read("/etc/nvpmodel.conf") or ""
    if not m:
        default = re.search(r"PM_CONFIG\s+DEFAULT=(\d+)", conf)
        if not default:
            return None
        mode_id = int(default[1])
    else:
        mode_id = int(m[1])
    for mid, name in re.findall(r"<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=([^\s>]+)", conf):
        if int(mid) == mode_id:
            return name
    return None


def probe(host: Host) -> Facts | None:
    release = host.read("/etc/nv_tegra_release")
    model = (host.read("/proc/device-tree/model") or "").replace("\x00", "").strip()
    if release is None and "jetson" not in model.lower():
        return None
    flags, physical, logical, cpu_model = cpuinfo(host)
    total, limit = linux_memory(host)
    details: dict[str, str] = {}
    l4t = _l4t(release or "")
    if l4t:
        details["L4T"] = "R{}.{}.{}".format(*l4t)
        jetpack = L4T_PATCH_TO_JETPACK.get(l4t) or L4T_TO_JETPACK.get(l4t[:2])
        if jetpack:
            details["JetPack"] = jetpack
    mode = _power_mode(host)
    if mode:
        details["power_mode"] = mode
    details["gpu"] = "CUDA (integrated, unified memory)"
    return Facts(platform="jetson", model=model or cpu_model or "NVIDIA Jetson", cpu_flags=flags,
                 physical_cores=physical, logical_cores=logical, memory_bytes=total,
                 memory_limit_bytes=limit, details=details)
