"""``convert --to onnx``: Hugging Face checkpoint (+ LoRA) -> ONNX directory with a KV cache, checked, atomic.

Steps, each refusing bad input before anything is written:
1. open the source once (``Source``: the checkpoint with the user's pickle consent, an unsupported architecture
   refused by name, the adapter opened and planned against it); every later step reads that ``Source``;
2. write a float32 graph with past/present key-values by the chosen graph kind's fp32 step (``onnx_graphs``:
   ``torch`` merges the adapter with the spine's ``LoraAdapter.apply`` and traces it, ``onnx_trace``;
   ``genai`` has onnxruntime-genai's model builder write it from the merged weights, ``onnx_builder``);
3. parity gate: float32 ONNX vs the HF source (+ PEFT, unmerged) must reach NMSE < 1e-4;
4. for ``int4``: the kind's int4 step, ``MatMulNBits`` weights, block 32, asymmetric, LM head 8-bit, accuracy
   level 4; gated on finite logits, top-1 agreement >= parity.TOP1_GATE and KLD <= parity.KLD_GATES["int4"];
5. copy tokenizer, chat template, generation config, and prove the copied ``tokenizer.json``, as the ONNX engine
   reads it, splits medical text as the source's Hugging Face tokenizer does (``parity.verify_tokenizer``); write
   ``genai_config.json`` and ``report.json``;
6. rename the finished directory into place. A failure or Ctrl-C at any step leaves no output and no temporaries.

The output loads in edgemed's ONNX engine (``edgemed run DIR``) and in onnxruntime-genai.
"""

from __future__ import annotations

import gc
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgemed import env
from edgemed.files.atomic import atomic_path, check_destination, scratch_dir
from edgemed.constants import ONNX_OUTPUT_TYPES
from edgemed.files.hashing import file_sha256
from edgemed.formats.conversion_report import IN_DIRECTORY, ConversionReport, report_path
from edgemed.converters import arch_spec, provenance, require_route
from edgemed.converters.budget import peaks as budget
from edgemed.converters.source.checkpoint import Checkpoint
from edgemed.converters.source.source import Source
from edgemed.converters.route import RouteOptions, Timings, torch_threads
from edgemed.converters.onnx.graphs import DEFAULT_GRAPH, GRAPHS, GraphJob, graph_kind
from edgemed.errors import EdgemedError, InputError, require

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
# report key -> distribution, in the report's ``converter`` section (a graph kind adds its own)
TOOLS = {"torch": "torch", "onnx": "onnx", "onnxruntime": "onnxruntime"}

__all__ = ["GRAPHS", "MODEL_FILE", "OnnxOptions", "ConversionReport", "convert_onnx", "trace_fp32"]


@dataclass(kw_only=True)
class OnnxOptions(RouteOptions):
    """``--to onnx``: the shared options (lora, force, parity, threads), the int4 recipe and the graph kind."""

    weight_type: str = "int4"
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    head_bits: int = 8
    graph: str = DEFAULT_GRAPH  # a row of onnx_graphs.GRAPHS

    def recipe(self) -> dict:
        return dict(block_size=self.block_size, symmetric=self.symmetric, accuracy_level=self.accuracy_level,
                    head_bits=self.head_bits)


def convert_onnx(source: Path, out: Path, opts: OnnxOptions, echo=print) -> ConversionReport:
    """Write the ONNX directory ``out`` from the HF checkpoint ``source``; returns the report (also in ``out/report.json``)."""
    with torch_threads(opts.threads):
        return _convert_onnx(source, out, opts, echo)


def _convert_onnx(source: Path, out: Path, opts: OnnxOptions, echo=print) -> ConversionReport:
    if opts.weight_type not in ONNX_OUTPUT_TYPES:
        raise InputError(f"Unknown ONNX weight type '{opts.weight_type}'.", f"choose one of: {', '.join(ONNX_OUTPUT_TYPES)}")
    kind = graph_kind(opts.graph)
    require_route("onnx")
    for module, extra in kind.needs:
        require(module, extra)
    env.enforce_offline()
    check_destination(out, opts.force, kind="onnx")
    timings = Timings()

    ckpt = Checkpoint.open(source, allow_pickle=opts.allow_pickle)  # the one source every step below reads
    spec = arch_spec(ckpt.architecture)  # refuses an unsupported architecture, naming it and the supported ones
    _check_tensors(ckpt, spec)
    from edgemed.converters.onnx.assets import check_assets

    check_assets(ckpt.path, ckpt.config)  # tokenizer.json and generation config, before minutes of export
    src = Source.with_adapter(ckpt, opts.lora, allow_pickle=opts.allow_pickle)  # the one opening of the adapter
    adapter = src.adapter
    src.warn_base(echo)
    budget.check_onnx(src, opts)  # a conversion that cannot fit in memory is refused here, before any work
    source_info, lora_info = provenance.source_info(ckpt), provenance.lora_info(adapter)
    quant_info = None if opts.weight_type == "fp32" else {
        "method": "onnxruntime MatMulNBitsQuantizer", "bits": 4, "block_size": opts.block_size,
        "symmetric": opts.symmetric, "accuracy_level": opts.accuracy_level, "lm_head_bits": opts.head_bits, "embeddings": "float32",
    }
    timings.since_start("inspect")
    from edgemed.converters.onnx import assets as onnx_assets

    parity: dict[str, dict] = {}
    with atomic_path(out, force=opts.force, kind="onnx") as tmp, scratch_dir(out.parent, out.name) as work:
        tmp.mkdir()
        job = GraphJob(ckpt_dir=ckpt.path, adapter=adapter, work=Path(work), ckpt=ckpt, threads=opts.threads)
        with timings.step("export"):
            fp32_path = kind.step("fp32")(job)

        source_cache = None
        if opts.parity:
            from edgemed.converters.onnx.parity import GraphNotOpened, check_onnx
            from edgemed.converters.quality.parity import gated, source_logits

            with timings.step("parity_fp32"):
                source_cache = source_logits(src)
                report = check_onnx(src, fp32_path, "fp32", threads=opts.threads, reference=source_cache)
            parity["fp32"] = gated(report, "The float32 ONNX export", echo)

        if opts.weight_type == "int4":
            with timings.step("quantize"):
                if not kind.int4_from_fp32:
                    shutil.rmtree(fp32_path.parent)  # not the int4 step's input: its disk is freed first
                kind.step("int4")(job, fp32_path, tmp, opts.recipe())
            if opts.parity:
                with timings.step("parity_int4"):
                    try:
                        report = check_onnx(src, tmp / MODEL_FILE, "int4", threads=opts.threads, reference=source_cache)
                    except GraphNotOpened as exc:
                        if kind.int4_from_fp32:
                            raise
                        raise _unloadable_build(source, kind, exc) from None
                # quantized: finite logits, top-1 agreement (parity.TOP1_GATE) and its KLD bar (KLD_GATES)
                parity["int4"] = gated(report, "The int4 ONNX model", echo)
        else:
            for f in fp32_path.parent.iterdir():
                shutil.move(str(f), tmp / f.name)

        onnx_assets.copy_assets(ckpt.path, tmp)
        from edgemed.converters.onnx.parity import verify_tokenizer

        with timings.step("tokenizer_check"):
            verify_tokenizer(ckpt.path, tmp)  # parity fed both the source's ids: the engine must make the same ones
        if not kind.writes_genai_config:  # a builder that writes its own has capped max_length already
            onnx_assets.write_genai_config(ckpt.path, ckpt.config, tmp, MODEL_FILE)
        onnx_assets.check_written(tmp, out)  # read as the engine reads it, whichever kind wrote it
        shippable(tmp)  # onnx writes external data as 0600; the directory is meant to be shipped
        files = output_files(tmp)  # the report names the bytes its parity was measured on: `edgemed pack` checks them
        size = sum(f["size_bytes"] for f in files.values())
        timings.since_start("total")
        result = ConversionReport(
            fmt="onnx", output=str(out), out_type=opts.weight_type, size_bytes=size, files=files, architecture=ckpt.architecture,
            source=source_info, lora=lora_info, quantization=quant_info, parity=parity if opts.parity else None, timings_s=timings.report(),
            converter=provenance.converter_info(TOOLS | kind.tools, graph=kind.name),
        )
        report_path(tmp, "onnx").write_text(result.to_json() + "\n", encoding="utf-8")
    return result


def _unloadable_build(source: Path, kind, exc: Exception) -> EdgemedError:
    """A graph kind that rebuilds int4 from the HF weights wrote a graph ONNX Runtime cannot open: its builder's
    failure, named with the way round it, not a damaged copy ("convert again" fails the same way)."""
    return EdgemedError(f"ONNX Runtime cannot load the int4 graph that the {kind.builds} wrote for '{source}': "
                        f"{exc.said}",
                        "convert with the traced graph instead (--onnx-graph torch), which supports every architecture "
                        "edgemed does")


def shippable(directory: Path) -> None:
    """Every file under ``directory`` 0644 and every folder 0755 (``additional_chat_templates/`` included): a folder
    made 0644 has no search bit, so its owner, unless root, could neither list nor delete what it holds, and a
    recipient could not read it."""
    for path in directory.rglob("*"):
        if not path.is_symlink():  # the export writes none; a link's target is not the directory's to change
            path.chmod(0o755 if path.is_dir() else 0o644)


def output_files(directory: Path) -> dict[str, dict]:
    """Every file of an ONNX output directory but its report: relative POSIX path -> its size and sha256, the
    fields a GGUF's report names its one file by."""
    out = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = f.relative_to(directory).as_posix()
        if rel != IN_DIRECTORY:
            out[rel] = {"size_bytes": f.stat().st_size, "sha256": file_sha256(f)}
    return out


def _check_tensors(ckpt: Checkpoint, spec) -> None:
    """The GGUF route's tensor plan, before any work: every tensor there, of the shape config.json implies, none
    without a place, a tied head that is the embedding. Without it from_pretrained fills a missing tensor with random
    values and the export succeeds, and a shape config.json does not imply is a transformers traceback.

    The plan reads gguf-py's name tables, and this route does not need gguf installed: without it, the tied-head
    check still runs here, and ``Checkpoint.hf_model`` refuses what from_pretrained did not load during the export,
    before anything is placed."""
    from edgemed.errors import MissingDependency

    try:
        from edgemed.converters.gguf.writer import plan_tensors
    except (MissingDependency, ImportError):
        from edgemed.converters.arch.base import tied_embeddings
        from edgemed.converters.source.checkpoint import check_stored_head

        check_stored_head(ckpt, tied_embeddings(ckpt, spec))
        return
    plan_tensors(ckpt, spec, "f32")


def trace_fp32(job: GraphJob) -> Path:
    """The ``torch`` graph row's fp32 step: merge the adapter in torch, trace into ``work/trace`` (the exporter
    may spill one file per tensor), re-save as one graph + one data file in ``work/fp32``."""
    import onnx

    from edgemed.converters.onnx import trace as onnx_trace
    from edgemed.converters.source.merged_model import load_merged
    from edgemed.converters.onnx.quant import save_single_file

    model = load_merged(job.ckpt if job.ckpt is not None else job.ckpt_dir, job.adapter)
    trace_dir, fp32_dir = job.work / "trace", job.work / "fp32"
    trace_dir.mkdir()
    fp32_dir.mkdir()
    onnx_trace.export(model, trace_dir / MODEL_FILE)
    del model
    gc.collect()
    graph = onnx.load(str(trace_dir / MODEL_FILE))
    shutil.rmtree(trace_dir)
    save_single_file(graph, fp32_dir / MODEL_FILE)
    return fp32_dir / MODEL_FILE
