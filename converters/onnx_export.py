"""``convert --to onnx``: Hugging Face checkpoint (+ LoRA) -> ONNX directory with a KV cache, checked, atomic.

Steps, each refusing bad input before anything is written:
1. open the checkpoint, refuse an unsupported architecture by name, open and plan the adapter;
2. load the model in torch float32 and merge the adapter with the spine's ``LoraAdapter.apply``;
3. trace it to a float32 ONNX graph with past/present key-values (``onnx_trace``), or, with
   ``graph="genai"``, have onnxruntime-genai's model builder write it from the merged weights (``onnx_builder``);
4. parity gate: float32 ONNX vs the HF source (+ PEFT, unmerged) must reach NMSE < 1e-4;
5. for ``int4``: ``MatMulNBits`` weights, block 32, asymmetric, LM head 8-bit, accuracy level 4 (``onnx_quant``);
   gated on finite logits and top-1 agreement >= parity.TOP1_GATE;
6. copy tokenizer, chat template, generation config; write ``genai_config.json`` and ``report.json``;
7. rename the finished directory into place. A failure or Ctrl-C at any step leaves no output and no temporaries.

The output loads in edgemed's ONNX engine (``edgemed run DIR``) and in onnxruntime-genai.
"""

from __future__ import annotations

import gc
import json
import logging
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgemed import __version__, env
from edgemed.atomic import atomic_path, check_destination, scratch_dir
from edgemed.converters import arch_spec, provenance, require_route
from edgemed.constants import ONNX_OUTPUT_TYPES
from edgemed.conversion_report import report_path
from edgemed.converters.checkpoint import Checkpoint
from edgemed.errors import InputError

log = logging.getLogger(__name__)

GRAPHS = ("torch", "genai")
MODEL_FILE = "model.onnx"


@dataclass
class OnnxOptions:
    weight_type: str = "int4"
    lora: Path | None = None
    force: bool = False
    parity: bool = True
    threads: int | None = None
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    head_bits: int = 8
    graph: str = "torch"  # "torch": traced here; "genai": onnxruntime-genai's model builder (fused attention)


@dataclass
class OnnxReport:
    output: str
    weight_type: str
    size_bytes: int
    architecture: str
    source: dict
    lora: dict | None
    quantization: dict | None
    parity: dict = field(default_factory=dict)  # "fp32" and, for int4, "int4" -> ParityReport dict
    timings_s: dict = field(default_factory=dict)
    converter: dict = field(default_factory=lambda: {"name": "edgemed", "version": __version__})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def convert_onnx(source: Path, out: Path, opts: OnnxOptions, echo=print) -> OnnxReport:
    """Write the ONNX directory ``out`` from the HF checkpoint ``source``; returns the report (also in ``out/report.json``)."""
    if opts.weight_type not in ONNX_OUTPUT_TYPES:
        raise InputError(f"Unknown ONNX weight type '{opts.weight_type}'.", f"choose one of: {', '.join(ONNX_OUTPUT_TYPES)}")
    if opts.graph not in GRAPHS:
        raise InputError(f"Unknown ONNX graph builder '{opts.graph}'.", f"choose one of: {', '.join(GRAPHS)}")
    require_route("onnx")
    env.enforce_offline()
    check_destination(out, opts.force, kind="onnx")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    ckpt = Checkpoint.open(source)
    arch_spec(ckpt.architecture)  # refuses an unsupported architecture, naming it and the supported ones
    from edgemed.converters.onnx_assets import check_assets

    check_assets(ckpt.path, ckpt.config)  # tokenizer.json and generation config, before minutes of export
    adapter = None
    if opts.lora is not None:
        from edgemed.converters.lora import LoraAdapter

        adapter = LoraAdapter.open(opts.lora, ckpt.tensors)
    source_info, lora_info = provenance.source_info(ckpt), provenance.lora_info(adapter)
    quant_info = None if opts.weight_type == "fp32" else {
        "method": "onnxruntime MatMulNBitsQuantizer", "bits": 4, "block_size": opts.block_size,
        "symmetric": opts.symmetric, "accuracy_level": opts.accuracy_level, "lm_head_bits": opts.head_bits, "embeddings": "float32",
    }
    timings["inspect"] = time.perf_counter() - t0
    from edgemed.converters import onnx_assets, onnx_trace
    from edgemed.converters.merged_model import load_merged

    parity: dict[str, dict] = {}
    with atomic_path(out, force=opts.force, kind="onnx") as tmp, scratch_dir(out.parent, out.name) as work:
        tmp.mkdir()
        work = Path(work)
        t = time.perf_counter()
        if opts.graph == "genai":
            from edgemed.converters import onnx_builder

            builder_src = onnx_builder.merged_checkpoint(ckpt.path, adapter, work)
            onnx_builder.build(builder_src, work / "fp32", "fp32", cache=work / "cache")
            fp32_path = work / "fp32" / MODEL_FILE
        else:
            model = load_merged(ckpt.path, adapter)
            fp32_path = _export_fp32(model, work, onnx_trace)
            del model
            gc.collect()
        timings["export"] = time.perf_counter() - t

        source_cache = None
        if opts.parity:
            from edgemed.converters.onnx_parity import check_onnx
            from edgemed.converters.parity import gated, source_logits

            t = time.perf_counter()
            source_cache = source_logits(ckpt.path, opts.lora)
            report = check_onnx(ckpt.path, fp32_path, "fp32", threads=opts.threads, source=source_cache)
            timings["parity_fp32"] = time.perf_counter() - t
            parity["fp32"] = gated(report, "The float32 ONNX export", echo)

        final = tmp / MODEL_FILE
        if opts.weight_type == "int4":
            from edgemed.converters.onnx_quant import quantize_int4

            t = time.perf_counter()
            recipe = dict(block_size=opts.block_size, symmetric=opts.symmetric, accuracy_level=opts.accuracy_level,
                          head_bits=opts.head_bits)
            if opts.graph == "genai":
                shutil.rmtree(fp32_path.parent)  # the builder quantizes from the HF weights, not from this graph
                onnx_builder.build(builder_src, tmp, "int4", cache=work / "cache", **recipe)
            else:
                quantize_int4(fp32_path, final, **recipe)
            timings["quantize"] = time.perf_counter() - t
            if opts.parity:
                t = time.perf_counter()
                report = check_onnx(ckpt.path, final, "int4", threads=opts.threads, source=source_cache)
                timings["parity_int4"] = time.perf_counter() - t
                # quantized: finite logits and top-1 agreement (parity.TOP1_GATE)
                parity["int4"] = gated(report, "The int4 ONNX model", echo)
        else:
            for f in fp32_path.parent.iterdir():
                shutil.move(str(f), tmp / f.name)

        onnx_assets.copy_assets(ckpt.path, tmp)
        if opts.graph == "torch":  # the builder wrote its own (its graph has other inputs), max_length already capped
            onnx_assets.write_genai_config(ckpt.path, ckpt.config, tmp, MODEL_FILE)
        for f in tmp.iterdir():  # onnx writes external data as 0600; the directory is meant to be shipped
            f.chmod(0o644)
        size = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
        timings["total"] = time.perf_counter() - t0
        result = OnnxReport(
            output=str(out), weight_type=opts.weight_type, size_bytes=size, architecture=ckpt.architecture,
            source=source_info, lora=lora_info, quantization=quant_info, parity=parity,
            timings_s={k: round(v, 3) for k, v in timings.items()},
        )
        version = provenance.installed_version
        result.converter |= {"python": platform.python_version(), "torch": version("torch"), "onnx": version("onnx"),
                             "onnxruntime": version("onnxruntime"), "graph": opts.graph}
        if opts.graph == "genai":
            result.converter["onnxruntime_genai"] = version("onnxruntime-genai")
        report_path(tmp, "onnx").write_text(result.to_json() + "\n", encoding="utf-8")
    return result


def _export_fp32(model, work: Path, onnx_trace) -> Path:
    """Trace into ``work/trace`` (the exporter may spill one file per tensor), re-save as one graph + one data file."""
    import onnx

    from edgemed.converters.onnx_quant import save_single_file

    trace_dir, fp32_dir = work / "trace", work / "fp32"
    trace_dir.mkdir()
    fp32_dir.mkdir()
    onnx_trace.export(model, trace_dir / MODEL_FILE)
    graph = onnx.load(str(trace_dir / MODEL_FILE))
    shutil.rmtree(trace_dir)
    save_single_file(graph, fp32_dir / MODEL_FILE)
    return fp32_dir / MODEL_FILE
