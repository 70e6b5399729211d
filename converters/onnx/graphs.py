"""The ONNX graph kinds (``convert --to onnx --onnx-graph KIND``), one row each: what builds it, what it needs,
how its parity runs. ``onnx_export`` runs the same steps for every row; nothing branches on a kind's name.

Each step is named ``"module:function"`` and imported when it runs (the CLI reads this table for its choices,
so it stays light):

- ``fp32(job) -> Path``: writes the float32 graph under ``job.work`` and returns its model file; the fp32
  parity gate (NMSE against the HF source + PEFT, unmerged) runs on that file;
- ``int4(job, fp32_model, out_dir, recipe)``: writes the int4 graph into ``out_dir``; the int4 gate (finite
  logits, top-1 >= ``parity.TOP1_GATE``, KLD <= ``parity.KLD_GATES["int4"]``) runs on the result.
  ``int4_from_fp32`` says whether it quantizes the gated fp32 graph (so the fp32 gate vouches for the int4 graph's
  structure) or rebuilds from the HF weights (then the fp32 graph is deleted first, and the gate proves the
  builder's graph, the int4 report the weights).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgemed.errors import InputError


@dataclass
class GraphJob:
    """What a graph kind's steps work on; ``builder_src`` is what an fp32 step leaves for its int4 step."""

    ckpt_dir: Path  # the HF checkpoint
    adapter: object | None  # the planned LoRA adapter (converters.lora.LoraAdapter), or None
    work: Path  # scratch directory, removed with everything in it after the conversion
    builder_src: Path | None = None  # genai: the HF checkpoint (adapter merged) the builder reads
    ckpt: object | None = None  # the opened source (converters.checkpoint.Checkpoint, with the user's pickle consent)
    threads: int | None = None  # --threads: a builder run in a child process gets them too (torch reads OMP_NUM_THREADS)


@dataclass(frozen=True)
class GraphKind:
    name: str
    builds: str  # what makes the graph (for the reader and the report)
    fp32: str  # "module:function" (job) -> fp32 model file
    int4: str  # "module:function" (job, fp32 model file, output dir, recipe)
    int4_from_fp32: bool  # True: int4 quantizes the gated fp32 graph; False: rebuilt from the HF weights
    writes_genai_config: bool  # the builder writes its own genai_config.json (its graph's inputs differ)
    needs: tuple[tuple[str, str], ...] = ()  # (module, extra) beyond the onnx route's ROUTE_NEEDS
    tools: dict[str, str] = field(default_factory=dict)  # report ``converter`` key -> distribution, beyond the route's

    def step(self, which: str) -> Callable:
        """The ``fp32`` or ``int4`` step, imported now."""
        module, attr = getattr(self, which).split(":")
        return getattr(importlib.import_module(module), attr)


GRAPHS: dict[str, GraphKind] = {kind.name: kind for kind in (
    # default: traced here with torch (the spine's LoRA merge in process, our small I/O contract), quantized
    # with onnxruntime's MatMulNBitsQuantizer; needs nothing beyond the route; every registry architecture.
    GraphKind("torch", "torch.onnx.export (TorchScript) + onnxruntime MatMulNBitsQuantizer",
              fp32="edgemed.converters.onnx.export:trace_fp32", int4="edgemed.converters.onnx.quant:int4_step",
              int4_from_fp32=True, writes_genai_config=False),
    # onnxruntime-genai's model builder in a child process on the LoRA-merged weights: a fused graph
    # (GroupQueryAttention), 7-16 % faster to decode; no position_ids input (positions come from the mask).
    GraphKind("genai", "onnxruntime-genai model builder (fused attention)",
              fp32="edgemed.converters.onnx.builder:fp32_step", int4="edgemed.converters.onnx.builder:int4_step",
              int4_from_fp32=False, writes_genai_config=True, needs=(("onnxruntime_genai", "convert"),),
              tools={"onnxruntime_genai": "onnxruntime-genai"}),
)}
DEFAULT_GRAPH = "torch"


def graph_kind(name: str) -> GraphKind:
    """The row for ``name``, or the refusal that lists the kinds."""
    kind = GRAPHS.get(name)
    if kind is None:
        raise InputError(f"Unknown ONNX graph builder '{name}'.", f"choose one of: {', '.join(GRAPHS)}")
    return kind
