"""What detection learns about a machine, and the small readers every platform module shares.

A ``Host`` reads files below a root folder (``/`` on a real machine, a fixture tree
in tests) and runs ``sysctl`` through an injectable runner, so each platform
module is tested without the hardware it describes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgemed.devices.cgroup import DIGITS, cpu_limit, tightest_limit
from edgemed.devices.schema import MAX_GB

GIB = 1 << 30
#: The most a detection file is read: /proc/cpuinfo of a 256-core machine is well under 1 MiB
MAX_READ_BYTES = 4 << 20

#: Runs ``sysctl -n KEY`` (or reads a fixture); returns the value or None.
SysctlRunner = Callable[[str], "str | None"]


@dataclass
class Facts:
    """Facts about one machine. ``platform`` is the probe that recognised it."""

    platform: str
    model: str = ""                       # device-tree model, CPU brand string or chip name
    cpu_flags: frozenset[str] = frozenset()
    physical_cores: int = 1
    logical_cores: int = 1
    performance_cores: int | None = None  # Apple P-cores; None where all cores are alike
    memory_bytes: int = 0                 # physical RAM
    memory_limit_bytes: int | None = None  # cgroup limit, when one is set below RAM
    cpu_limit: int | None = None          # CPUs this process may use (affinity, cgroup cpuset and quota); None: all
    gpu_wired_limit_bytes: int | None = None  # the GPU wired-memory cap an operator set (macOS iogpu.wired_limit_mb)
    details: dict[str, str] = field(default_factory=dict)  # e.g. jetpack, power_mode, gpu

    @property
    def usable_memory_bytes(self) -> int:
        """RAM, or the container's limit when that is lower."""
        if self.memory_limit_bytes and self.memory_limit_bytes < self.memory_bytes:
            return self.memory_limit_bytes
        return self.memory_bytes

    @property
    def usable_cores(self) -> int:
        """Physical cores, or the CPUs this process may use when that is fewer (a container's ``--cpus`` or
        ``--cpuset-cpus``, ``taskset``): more compute threads than that only wait on each other."""
        if self.cpu_limit and self.cpu_limit < self.physical_cores:
            return self.cpu_limit
        return self.physical_cores

    def summary(self) -> str:
        """One line such as ``8 cores, 31.2 GB, JetPack 6.1, 15W mode``."""
        cores = f"{self.physical_cores} cores" + (f" ({self.usable_cores} usable here)"
                                                   if self.usable_cores < self.physical_cores else "")
        parts = [cores, f"{self.usable_memory_bytes / 1e9:.1f} GB"]
        if self.memory_limit_bytes and self.memory_limit_bytes < self.memory_bytes:
            parts[-1] += " (container limit)"
        parts += [f"{key} {value}" if key != "power_mode" else f"{value} mode"
                  for key, value in self.details.items() if key in ("JetPack", "power_mode")]
        return ", ".join(parts)


def _default_sysctl(key: str) -> str | None:
    """``sysctl -n KEY`` on macOS, the only system whose probe asks it. Elsewhere None without a process: Linux has a
    ``sysctl`` of its own that knows none of these keys, and each context made without a thread count ran it twice
    (about 5 ms) to learn so."""
    if sys.platform != "darwin":
        return None
    try:
        out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


class Host:
    """Read-only view of a machine rooted at ``root``."""

    def __init__(self, root: Path | str = "/", sysctl: SysctlRunner | None = None):
        self.root = Path(root)
        if sysctl is None:
            sysctl = _default_sysctl if self.root == Path("/") else self._fixture_sysctl
        self.sysctl = sysctl

    def read(self, path: str) -> str | None:
        """Text of ``path`` (absolute, as on the device) below the root, or None: also for what is not a regular file
        (a FIFO would block, a link to /dev/zero never end) or holds more than ``MAX_READ_BYTES``."""
        from edgemed.formats.input_file import read_at_most

        try:
            return read_at_most(self.root / path.lstrip("/"), MAX_READ_BYTES).decode("utf-8", errors="replace")
        except ValueError:  # far larger than such a file is: detection goes on without it, but says so
            logging.getLogger(__name__).warning("%s is larger than %d MiB; detection leaves it out", path,
                                                MAX_READ_BYTES >> 20)
            return None
        except OSError:
            return None

    def _fixture_sysctl(self, key: str) -> str | None:
        """Fixture trees keep ``sysctl -a`` output (``key: value`` lines) in ``sysctl.txt``."""
        text = self.read("sysctl.txt")
        if text is None:
            return None
        for line in text.splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == key:
                return value.strip()
        return None


# -- memory that could not be read ---------------------------------------------------------

#: the unknown-memory warnings this process has logged: each once, however often a machine is detected
_SAID: set[str] = set()


def memory_unknown(where: str) -> None:
    """Warn, once per ``where`` in this process, that this machine's memory could not be read (``where`` names the
    file or key and what was wrong with it), what a plan does without it (``Profile.total_memory_bytes``) and the
    fix."""
    message = (f"{where}; this machine's memory counts as unknown: a plan takes the device profile's memory.total_gb "
               "unchecked against this machine, and a profile without one is refused. Fix: pass `edgemed plan MODEL "
               "--budget-mb N` with the MiB a model may use here; for `run`, `chat` and `serve`, name a profile with "
               "memory.total_gb (--profile)")
    if message not in _SAID:
        _SAID.add(message)
        logging.getLogger(__name__).warning("%s", message)


# -- Linux readers shared by the Jetson and x86 probes ------------------------------------

def meminfo_total(host: Host, warn_missing: bool = True) -> int:
    """MemTotal from /proc/meminfo, in bytes (0 if unknown). A value that is not a whole number of kB above 0, or is
    past ``schema.MAX_GB``, counts as unknown with a warning: a plan on it would be a crash or a budget no machine
    has (0 kB is no machine's memory either: it is a reader that could not tell). So does a /proc/meminfo that cannot
    be read or has no MemTotal line (``memory_unknown``), unless ``warn_missing`` is False: a caller with another
    source of the size (the generic probe's sysconf) says so itself when that fails too."""
    text = host.read("/proc/meminfo")
    for line in (text or "").splitlines():
        if line.startswith("MemTotal:"):
            value = line[len("MemTotal:"):].strip()
            number, _, unit = value.partition(" ")
            if DIGITS.fullmatch(number) and unit.strip() in ("kB", "") and 0 < int(number) * 1024 <= MAX_GB * GIB:
                return int(number) * 1024
            logging.getLogger(__name__).warning(
                "/proc/meminfo: MemTotal %s is not a size in kB above 0 and at most %d GiB; this machine's memory "
                "counts as unknown", ascii(value[:40]), MAX_GB)
            return 0
    if warn_missing:
        path = host.root / "proc" / "meminfo"
        memory_unknown(f"{path} cannot be read (missing, or not a readable file)" if text is None
                       else f"{path} has no MemTotal line")
    return 0


def cgroup_limit(host: Host) -> int | None:
    """The tightest memory limit on this process's cgroup, in bytes (``cgroup.py`` reads it), or None."""
    limit = tightest_limit(host)
    return limit.bytes if limit is not None else None


def cpuinfo(host: Host) -> tuple[frozenset[str], int, int, str]:
    """(flags, physical cores, logical cores, model name) from /proc/cpuinfo."""
    flags: set[str] = set()
    cores: set[tuple[str, str]] = set()
    logical = 0
    model = ""
    phys = "0"
    for line in (host.read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "processor":
            logical += 1
        elif key == "physical id":
            phys = value
        elif key == "core id":
            cores.add((phys, value))
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key in ("model name", "Model") and not model:
            model = value
    physical = len(cores) or logical or 1
    return frozenset(flags), physical, max(logical, 1), model


def linux_memory(host: Host, warn_missing: bool = True) -> tuple[int, int | None]:
    return meminfo_total(host, warn_missing), cgroup_limit(host)


def cpus_allowed(host: Host) -> int | None:
    """The CPUs this process may run on: its cgroups' cpuset and quota (``cgroup.cpu_limit``) and, on the machine
    itself, its scheduler affinity; None where nothing narrows them."""
    found = cpu_limit(host)
    n = found[0] if found else None
    if host.root == Path("/") and hasattr(os, "sched_getaffinity"):
        mask = len(os.sched_getaffinity(0))
        n = mask if n is None else min(n, mask)
    return n
