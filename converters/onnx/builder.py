"""The other way to make the graph: onnxruntime-genai's model builder (``--onnx-graph genai``).

The builder writes a fused graph (GroupQueryAttention with rotary inside,
SkipSimplifiedLayerNormalization), measured 7-16 % faster to decode than the
traced graph (benchmarks/results/onnx_vs_gguf.md). Its traps are handled here:

- it does not merge LoRA: the caller passes a checkpoint with the adapter
  already merged (``merged_checkpoint``, the spine's merge, written to a temp dir);
- it sets ``search.max_length`` to the model's context length (131,072 tokens
  for R1-Distill: a KV cache of gigabytes): capped to ``onnx_assets.DEFAULT_MAX_LENGTH``;
- it is driven through its command line in a child process (a 1,000-line
  options parser is its only stable interface); its output is checked by the
  same parity gate as the traced graph.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from edgemed.converters.source.checkpoint import require_hf_layout

from edgemed import env
from edgemed.errors import EdgemedError, require

MODULE = "onnxruntime_genai.models.builder"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime_genai") is not None


def merged_checkpoint(ckpt_dir, adapter, work: Path) -> Path:
    """``ckpt_dir`` itself, or (with an adapter) a temp HF checkpoint with the adapter merged in. ``ckpt_dir``: the
    command's opened ``Checkpoint`` (with its pickle consent) or a directory (opened without it)."""
    if adapter is None:
        return Path(getattr(ckpt_dir, "path", ckpt_dir))
    import shutil

    from edgemed.converters.onnx.assets import COPIED, copy_named_templates
    from edgemed.converters.source.merged_model import load_merged

    out = work / "merged-hf"
    model = load_merged(ckpt_dir, adapter)  # a Checkpoint (the command's source, with its consent) or a path
    model.save_pretrained(out)  # float32 weights and a config that says so
    del model
    src = Path(getattr(ckpt_dir, "path", ckpt_dir))
    for name in COPIED:  # tokenizer and templates; not config.json (the saved one states the merged dtype)
        if name != "config.json" and (src / name).exists():
            shutil.copy2(src / name, out / name)
    copy_named_templates(src, out)
    return out


def fp32_step(job) -> Path:
    """The ``genai`` row's fp32 step: merge the adapter (if any) into a temp checkpoint, build fp32 from it."""
    job.builder_src = merged_checkpoint(job.ckpt if job.ckpt is not None else job.ckpt_dir, job.adapter, job.work)
    build(job.builder_src, job.work / "fp32", "fp32", cache=job.work / "cache", pickle_files=_pickle_files(job),
          threads=job.threads)
    return job.work / "fp32" / "model.onnx"


def int4_step(job, fp32_model: Path, out_dir: Path, recipe: dict) -> None:
    """The ``genai`` row's int4 step: the builder quantizes from the (merged) HF weights, not from ``fp32_model``."""
    build(job.builder_src, out_dir, "int4", cache=job.work / "cache", pickle_files=_pickle_files(job), threads=job.threads,
          **recipe)


def _pickle_files(job) -> list:
    """The pickle weights the builder loads: the opened checkpoint's (consented to), unless the adapter was merged
    into a temp checkpoint (saved as safetensors)."""
    ckpt = job.ckpt
    return list(ckpt.pickle_files) if ckpt is not None and Path(job.builder_src) == Path(ckpt.path) else []


def build(src: Path, out: Path, precision: str, *, cache: Path, block_size: int = 32, symmetric: bool = False,
          accuracy_level: int = 4, head_bits: int = 8, max_length: int = 4096, pickle_files=(), threads: int | None = None) -> None:
    """Run the builder: ``src`` (HF dir) -> ``out`` (model.onnx + data + genai_config.json), CPU, fp32 or int4.
    ``pickle_files``: the pickle weights ``src`` was opened with (the user's consent), which the builder loads;
    ``threads`` (``--threads``): the child's torch threads, through ``OMP_NUM_THREADS``."""
    require("onnxruntime_genai", "convert")
    require_hf_layout(src, pickle_files)  # the builder loads src with from_pretrained: only under the standard names
    env.enforce_offline()
    cmd = [sys.executable, "-m", MODULE, "-i", str(src), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(cache)]
    if precision == "int4":
        extra = [f"block_size={block_size}", f"accuracy_level={accuracy_level}", f"is_symmetric={str(symmetric).lower()}",
                 # its default for a tied head (SmolLM2, Qwen2.5-0.5B) feeds the embedding the quantized head under a
                 # name it does not write (int8 head) or as uint8 (int4): a graph onnxruntime cannot load
                 "shared_embeddings=false"]
        if head_bits == 8:
            extra.append("matmul_mixed_precision=last_matmul:int8")
        cmd += ["--extra_options", *extra]
    child = os.environ.copy() | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child)
    if proc.returncode != 0 or not (out / "model.onnx").exists():
        tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
        raise EdgemedError(
            f"onnxruntime-genai's model builder failed for '{src}' ({precision}):\n{tail}",
            "convert with the traced graph instead (--onnx-graph torch), which supports every architecture edgemed does",
        )
    cap_max_length(out / "genai_config.json", max_length)


def cap_max_length(config_file: Path, max_length: int) -> None:
    """The builder writes max_length = context length; onnxruntime-genai sizes its KV cache by it."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    search = config.setdefault("search", {})
    search["max_length"] = min(int(search.get("max_length") or max_length), max_length)
    config_file.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
