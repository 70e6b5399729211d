"""What both convert routes (GGUF in ``pipeline``, ONNX in ``onnx_export``) share besides provenance and the gate.

- ``RouteOptions``: the options every route takes (each route's options add its own fields);
- ``Timings``: the report's ``timings_s`` (seconds per step, and ``inspect``/``total`` from the start);
- ``torch_threads``: ``--threads`` for the torch work of a conversion or check (merge, imatrix, reference, export).

The report type and where it lives: ``edgemed.formats.conversion_report``; provenance: ``provenance``; the parity
gate step: ``parity.gated``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(kw_only=True)
class RouteOptions:
    """Options of every convert route."""

    lora: Path | None = None  # a PEFT adapter merged into the weights
    force: bool = False  # replace an existing output
    parity: bool = True  # gate the output against the source (False: --no-parity)
    threads: int | None = None  # CPU threads for every step: torch (torch_threads), llama.cpp, ONNX Runtime
    memory_budget: str | None = None  # --memory-budget: the peak the conversion may reach ("6GiB"; converters/budget/peaks.py)
    allow_pickle: bool = False  # --allow-pickle: the user's consent to read pickle (pytorch_model.bin) weights


class Timings:
    """Seconds each step took, in the order they ran; ``since_start`` marks a step measured from the start."""

    def __init__(self) -> None:
        self._t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str):
        t = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t

    def since_start(self, name: str) -> None:
        self.seconds[name] = time.perf_counter() - self._t0

    def report(self) -> dict[str, float]:
        """The report's ``timings_s``: milliseconds kept."""
        return {k: round(v, 3) for k, v in self.seconds.items()}


@contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op threads set to ``threads`` (``--threads``) while the block runs, then put back as they were,
    for a caller that goes on (a test, a notebook); None leaves torch's own default (every core)."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
