"""The machine a benchmark ran on: CPU, cores, memory, OS, library versions, llama.cpp's build features.

``describe`` is written to ``machine.json`` beside the results. On a Jetson,
``TegraStats`` samples ``tegrastats`` while a configuration runs and keeps the
highest unified-memory figure (the RAM line counts CPU and GPU together); where
the tool is absent it records nothing.
"""

from __future__ import annotations

import logging
import platform
import re
import shutil
import subprocess
import threading

from edgemed.versions import installed_versions

log = logging.getLogger(__name__)

# distributions whose versions change the figures
VERSIONS = ("edgemed", "llama-cpp-python", "onnxruntime", "torch", "transformers", "numpy", "gguf")


def llama_system_info() -> str | None:
    """llama.cpp's own feature line (AVX2, NEON, BLAS...), or None without llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        return None
    info = llama_cpp.llama_print_system_info()
    return info.decode("utf-8", "replace").strip() if isinstance(info, bytes) else str(info).strip()


def describe(profile: str | None = None) -> dict:
    """What the report says about this machine."""
    from edgemed.devices.detect import detect

    facts = detect()
    return {
        "cpu": facts.model or platform.processor() or platform.machine(),
        "platform": facts.platform,
        "machine": platform.machine(),
        "physical_cores": facts.physical_cores,
        "logical_cores": facts.logical_cores,
        "memory_bytes": facts.memory_bytes,
        "memory_limit_bytes": facts.memory_limit_bytes,
        "cpu_flags": sorted(f for f in facts.cpu_flags if f in ("avx", "avx2", "avx512f", "fma", "f16c", "neon", "asimd", "sve")),
        "details": facts.details,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": installed_versions(VERSIONS),
        "llama_cpp_system_info": llama_system_info(),
        "tegrastats": shutil.which("tegrastats") is not None,
        "profile": profile,
    }


# tegrastats line: "RAM 2825/7620MB (lfb ...) SWAP ... CPU [...] ..."
_RAM = re.compile(r"RAM (\d+)/(\d+)MB")


class TegraStats:
    """Highest unified-memory use (MiB) reported by ``tegrastats`` while the block runs; None without it."""

    def __init__(self, interval_ms: int = 100):
        self.interval_ms = interval_ms
        self.peak_mb: int | None = None
        self.total_mb: int | None = None
        self._proc = None
        self._reader = None

    def __enter__(self):
        exe = shutil.which("tegrastats")
        if exe is None:
            return self
        try:
            self._proc = subprocess.Popen([exe, "--interval", str(self.interval_ms)], stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True)
        except OSError as exc:
            log.info("tegrastats did not start: %s", exc)
            return self
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            m = _RAM.search(line)
            if m:
                used, total = int(m.group(1)), int(m.group(2))
                self.peak_mb = max(self.peak_mb or 0, used)
                self.total_mb = total

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            if self._reader is not None:
                self._reader.join(timeout=5)

    def to_dict(self) -> dict | None:
        return None if self.peak_mb is None else {"unified_peak_mb": self.peak_mb, "unified_total_mb": self.total_mb}
