"""Memory of a process tree, measured from outside: sampled RSS (anonymous vs file-backed), each process's
high-water mark, the kernel's ``wait4`` figure, and an optional hard cap in a memory cgroup.

Used by ``convert_cost`` to show what ``edgemed convert`` (and any child it starts: llama.cpp's self-test)
needs. Why three figures and not one:

- ``tree_rss``: the sum of VmRSS over the live tree, sampled every ~50 ms (psutil finds the descendants;
  /proc/PID/status gives VmRSS, RssAnon, RssFile, RssShmem). Its peak is what the tree held at once. It splits
  into *anonymous* memory (heap, arrays: must fit in RAM) and *file-backed* pages (memory-mapped files, e.g.
  llama.cpp's quantizer reading its float input): those count in RSS but are page cache the kernel can drop and
  re-read, so a run whose anonymous peak fits a budget fits it, at some re-read cost.
- ``VmHWM`` per process: the kernel's own peak of that process (sampled; the last sample is at most one
  interval before the process ends). A short spike between samples shows here and not in ``tree_rss``.
- ``ru_maxrss`` from ``wait4``: the largest single process of the tree, exact, but blind to the sum.

``MemoryCap``: the command runs in a fresh memory cgroup below this process's own (cgroup v1
``memory.limit_in_bytes``, or v2 ``memory.max`` where the parent delegates the memory controller), joined
before ``exec`` so every descendant is inside. Over the cap the kernel first reclaims page cache, then kills:
a run that ends normally under the cap fits it. The group is removed afterwards; nothing else is changed.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from pathlib import Path

from edgemed.errors import InputError

_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")
def parse_size(text: str) -> int:
    """'6GiB', '6.5G', '500MB', '1073741824' -> bytes (G/GB are 10^9, GiB 2^30): the converter's own rule."""
    from edgemed.converters.budget.memory_room import parse_size as _parse

    return _parse(text, "--memory-cap")


def tree_pids(pid: int) -> list[int]:
    """``pid`` and every descendant of it now ([] once it is gone)."""
    import psutil

    try:
        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def read_status(pid: int) -> dict[str, int] | None:
    """The memory fields of /proc/PID/status in bytes, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            out = {}
            for line in fh:
                key, _, rest = line.partition(":")
                if key in _FIELDS:
                    out[key] = int(rest.split()[0]) * 1024
            return out
    except (OSError, ValueError, IndexError):
        return None


class TreeSampler:
    """Sample a process tree's memory in a thread until ``stop()``."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval = pid, interval
        self.samples = 0
        self.peak = {"rss": 0, "anon": 0, "file": 0, "shmem": 0}
        self.at_rss_peak: dict[str, int] = {}
        self.processes: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-sampler", daemon=True)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _pids(self) -> list[int]:
        return tree_pids(self.pid)

    def sample(self) -> None:
        total = {"rss": 0, "anon": 0, "file": 0, "shmem": 0}
        for pid in self._pids():
            st = read_status(pid)
            if not st or "VmRSS" not in st:  # gone, or a zombie (no memory left)
                continue
            rec = self.processes.setdefault(pid, {"pid": pid, "name": _name(pid), "vmhwm_bytes": 0,
                                                  "peak_rss_bytes": 0, "peak_anon_bytes": 0, "peak_file_bytes": 0})
            rec["vmhwm_bytes"] = max(rec["vmhwm_bytes"], st.get("VmHWM", 0))
            rec["peak_rss_bytes"] = max(rec["peak_rss_bytes"], st["VmRSS"])
            rec["peak_anon_bytes"] = max(rec["peak_anon_bytes"], st.get("RssAnon", 0))
            rec["peak_file_bytes"] = max(rec["peak_file_bytes"], st.get("RssFile", 0))
            for key, field in (("rss", "VmRSS"), ("anon", "RssAnon"), ("file", "RssFile"), ("shmem", "RssShmem")):
                total[key] += st.get(field, 0)
        self.samples += 1
        if total["rss"] > self.peak["rss"]:
            self.at_rss_peak = dict(total)
        for key, value in total.items():
            self.peak[key] = max(self.peak[key], value)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def to_dict(self) -> dict:
        return {
            "interval_s": self.interval, "samples": self.samples,
            "tree_peak_rss_bytes": self.peak["rss"], "tree_peak_anon_bytes": self.peak["anon"],
            "tree_peak_file_bytes": self.peak["file"], "tree_peak_shmem_bytes": self.peak["shmem"],
            "at_tree_rss_peak": {f"{k}_bytes": v for k, v in self.at_rss_peak.items()},
            "max_vmhwm_bytes": max((p["vmhwm_bytes"] for p in self.processes.values()), default=0),
            "processes": sorted(self.processes.values(), key=lambda p: p["pid"]),
        }


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:160]
    except OSError:
        return "?"


class MemoryCap:
    """A memory cgroup below this process's own, with a hard limit; ``join`` is a ``preexec_fn``."""

    def __init__(self, limit_bytes: int):
        self.limit = int(limit_bytes)
        self.version, base = _find_memory_cgroup()
        self.path = base / f"edgemed-convert-cost-{os.getpid()}-{secrets.token_hex(4)}"

    def __enter__(self) -> "MemoryCap":
        try:
            self.path.mkdir()
            if self.version == 2 and "memory" not in (self.path / "cgroup.controllers").read_text().split():
                raise InputError(f"cgroup v2 at '{self.path.parent}' does not delegate the memory controller to "
                                 "its children, so no cap can be set there.",
                                 "run without --memory-cap, or where the memory controller is delegated")
            limit_file = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
            (self.path / limit_file).write_text(str(self.limit))
            memsw = self.path / "memory.memsw.limit_in_bytes"
            if self.version == 1 and memsw.exists():  # RAM + swap under the same cap: swapping out is no escape
                memsw.write_text(str(self.limit))
            if self.version == 2 and (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")
        except PermissionError:
            self._remove()
            raise InputError(f"Cannot create or limit a memory cgroup at '{self.path}' (permission denied).",
                             "run as root, or without --memory-cap") from None
        except BaseException:
            self._remove()
            raise
        return self

    def join(self) -> None:  # runs in the child between fork and exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def report(self) -> dict:
        def read(name: str) -> str | None:
            try:
                return (self.path / name).read_text()
            except OSError:
                return None

        out = {"cgroup": str(self.path), "version": self.version, "limit_bytes": self.limit}
        if self.version == 1:
            peak, fails, oom = read("memory.max_usage_in_bytes"), read("memory.failcnt"), read("memory.oom_control")
            out["peak_usage_bytes"] = int(peak) if peak else None  # RAM charged to the group: anon + page cache
            out["limit_hits"] = int(fails) if fails else None  # times the kernel had to reclaim at the limit
        else:
            peak, oom = read("memory.peak"), read("memory.events")
            out["peak_usage_bytes"] = int(peak) if peak and peak.strip().isdigit() else None
        kills = re.search(r"oom_kill (\d+)", oom or "")
        out["oom_kills"] = int(kills.group(1)) if kills else None
        return out

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        for _ in range(50):  # the group can be removed once its last process has been reaped
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def _find_memory_cgroup() -> tuple[int, Path]:
    """(version, this process's own memory cgroup directory), or a clear refusal."""
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    own = Path("/proc/self/cgroup").read_text().splitlines()
    for line in mounts:
        dev, point, fstype, opts = (line.split() + ["", "", "", ""])[:4]
        if fstype == "cgroup" and "memory" in opts.split(","):
            rel = next((ln.split(":", 2)[2] for ln in own if "memory" in ln.split(":", 2)[1].split(",")), "/")
            return 1, Path(point) / rel.lstrip("/")
    for line in mounts:
        dev, point, fstype, opts = (line.split() + ["", "", "", ""])[:4]
        if fstype == "cgroup2":
            rel = next((ln.split(":", 2)[2] for ln in own if ln.startswith("0::")), "/")
            base = Path(point) / rel.lstrip("/")
            controllers = base / "cgroup.controllers"
            if controllers.exists() and "memory" in controllers.read_text().split():
                return 2, base
    raise InputError("This machine has no memory cgroup to cap the run with (neither a cgroup v1 memory mount nor "
                     "a cgroup v2 group with the memory controller).",
                     "run without --memory-cap and read the measured peak instead")
