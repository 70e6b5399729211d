"""A Hugging Face checkpoint with a real model's architecture and random weights.

    python -m edgemed.benchmarks.shaped_checkpoint --shape r1-distill-qwen-7b --tokenizer-from DIR -o OUT [--seed 0]
        [--bpe-from DIR] [--override key=value ...] [--shard-gb 3]

What it is for: measuring conversion, memory and latency at a size no package here carries (the
paper's student is DeepSeek-R1-Distill-Qwen-7B, and no 7B safetensors can be had offline). The weights are
random, so no accuracy figure applies to anything made from it; ``EDGEMED_SOURCE.txt`` in the output says so.

Shapes (``SHAPES``), written as ``config.json`` with the field names and layout of the real files:
- ``r1-distill-qwen-7b``: DeepSeek-R1-Distill-Qwen-7B. Field set and the values the family shares are the real
  1.5B config's (``shared/fixtures/deepseek-r1-distill-qwen-1.5b/config.json``: Qwen2ForCausalLM, bos/eos 151643,
  silu, initializer_range 0.02, max_position_embeddings 131072, rms_norm_eps 1e-6, rope_theta 10000,
  sliding_window 4096 with use_sliding_window false, untied head, bfloat16, transformers_version 4.44.0). The
  7B's own values are the paper's student's (28 layers, hidden 3584, 28 heads / 4 KV heads, intermediate 18944, vocab
  152064), which agree with deepseek-ai's public 7B config.json as remembered; ``max_window_layers`` 28 is from
  that memory too (it cannot be checked offline here, and it has no effect while use_sliding_window is false).
  7,615,616,512 parameters (``parameter_count``), 15.23 GB in bfloat16.
- ``tiny``: the same config with small dimensions (2 layers, hidden 64) and the real vocabulary size, for tests.

Weights: tensor names and shapes come from transformers' own model class built on the meta device (no memory),
so they are what ``from_pretrained`` expects, q/k/v biases included. Each tensor is drawn from its own
generator (seeded by ``--seed`` and the tensor's name: the same seed gives the same tensor whatever the shard
layout) the way transformers initialises one: normal(0, initializer_range) for weights and, so a dropped bias
would show in a parity check, for biases; ones for norms. Tensors are written as they are drawn, a few
million values at a time, straight into ``.safetensors`` shards (safetensors' own writer needs every tensor of a
shard in memory at once; the format is an 8-byte header length, a JSON header, then the raw bytes), with
``model.safetensors.index.json``. Peak memory is the Python process with torch, not the model.

Tokenizer: ``--tokenizer-from`` a checkpoint directory; its tokenizer files (and generation_config.json) are
copied. The shared DeepSeek-R1-Distill fixture carries every tokenizer.json field but the BPE vocabulary and
merges (``tokenizer.header.json``); with it, ``--bpe-from`` names a Qwen2.5 checkpoint whose vocabulary
(ids 0-151642) and merges are joined with the header into the real R1-Distill tokenizer.json. The config's
vocab_size (152064) exceeds the tokenizer's 151665 tokens, as in the real model; ``edgemed convert`` pads the
GGUF vocabulary to it.

The output is written into an owner-tagged temporary folder next to OUT and renamed into place at the end;
an existing OUT is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import sys
import time
from pathlib import Path

from edgemed.errors import InputError

_R1_COMMON = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 131072, "model_type": "qwen2",
    "rms_norm_eps": 1e-06, "rope_theta": 10000, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.44.0", "use_cache": True, "use_mrope": False,
    "use_sliding_window": False, "vocab_size": 152064,
}
SHAPES: dict[str, dict] = {
    "r1-distill-qwen-7b": {**_R1_COMMON, "hidden_size": 3584, "intermediate_size": 18944, "max_window_layers": 28,
                           "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4},
    # tiny: wider init (as tests/tiny.py) so a 64-wide model's logits spread enough for top-1 to mean something
    "tiny": {**_R1_COMMON, "initializer_range": 0.08, "hidden_size": 64, "intermediate_size": 128, "max_window_layers": 2,
             "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json")
_DTYPES = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4)}
_CHUNK = 1 << 22  # values drawn and written at a time (16 MB of float32)
_MARKER = """Random weights made by `python -m edgemed.benchmarks.shaped_checkpoint --shape {shape} --seed {seed}`.
Architecture and tensor shapes: {shape} ({params:,} parameters); tokenizer from {tokenizer}.
The weights are random: no accuracy, fidelity to a trained model or output text quality applies to this
checkpoint or anything converted from it. It exists to measure size, memory and speed.
"""


def shape_config(shape: str, overrides: dict | None = None) -> dict:
    """The config.json dict for ``shape``, with ``overrides`` applied."""
    if shape not in SHAPES:
        raise InputError(f"Unknown shape '{shape}'.", f"choose one of: {', '.join(SHAPES)}")
    config = {**SHAPES[shape], **(overrides or {})}
    if config.get("torch_dtype") not in _DTYPES:
        raise InputError(f"torch_dtype '{config.get('torch_dtype')}' cannot be written.",
                         f"use one of: {', '.join(_DTYPES)}")
    return dict(sorted(config.items()))


def parse_override(text: str) -> tuple[str, object]:
    """``key=value``; the value is read as JSON when it parses (numbers, true/false, null), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InputError(f"Override '{text}' is not key=value.", "write it as e.g. --override num_hidden_layers=4")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape, from transformers' model class built on the meta device (nothing allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def parameter_count(config: dict) -> int:
    import math

    return sum(math.prod(s) for s in tensor_shapes(config).values())


def _init(name: str) -> str:
    return "ones" if name.endswith("norm.weight") else "normal"


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int) -> list[list[str]]:
    """Tensors in model order, cut into shards of at most ``shard_bytes`` (a larger tensor gets its own)."""
    import math

    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = math.prod(shape) * itemsize
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _write_shard(path: Path, names: list[str], shapes: dict, dtype_name: str, std: float, seed: int) -> int:
    """Write one .safetensors file tensor by tensor; returns its data bytes."""
    import math

    import torch

    tag, itemsize = _DTYPES[dtype_name]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        n = math.prod(shapes[name]) * itemsize
        header[name] = {"dtype": tag, "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    torch_dtype = getattr(torch, dtype_name)
    buf = torch.empty(_CHUNK, dtype=torch.float32)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            total = math.prod(shapes[name])
            gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
            for start in range(0, total, _CHUNK):
                part = buf[: min(_CHUNK, total - start)]
                if _init(name) == "ones":
                    part.fill_(1.0)
                else:
                    part.normal_(0.0, std, generator=gen)
                out = part.to(torch_dtype)
                f.write(out.view(torch.int16 if itemsize == 2 else torch.int32).numpy())
        f.flush()
        __import__("os").fsync(f.fileno())
    return offset


def r1_tokenizer_json(header_path: Path, bpe_dir: Path) -> dict:
    """The R1-Distill tokenizer.json: the fixture's header fields + a Qwen2.5 checkpoint's BPE vocab and merges."""
    header = json.loads(header_path.read_text(encoding="utf-8"))
    bpe = bpe_dir / "tokenizer.json"
    if not bpe.is_file():
        raise InputError(f"'{bpe_dir}' has no tokenizer.json to take the BPE vocabulary and merges from.",
                         "pass --bpe-from a Qwen2.5 checkpoint directory (e.g. the qwen2.5-0.5b-instruct stand-in)")
    model = json.loads(bpe.read_text(encoding="utf-8"))["model"]
    first_added = min(a["id"] for a in header["added_tokens"])
    vocab = {tok: i for tok, i in model["vocab"].items() if i < first_added}
    if sorted(vocab.values()) != list(range(first_added)):
        raise InputError(f"'{bpe}' does not hold BPE ids 0-{first_added - 1} contiguously, so it is not Qwen2.5's vocabulary.",
                         "pass --bpe-from a Qwen2.5 checkpoint directory")
    meta = header.get("model_meta", {})
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    bpe_model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                 "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": merges}
    for key in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk", "byte_fallback"):
        if key in meta:
            bpe_model[key] = meta[key]
    # The header lists each added token's id, content and special flag; the other flags take the values the
    # tokenizers library gives a token added without them (normalized only when not special).
    added = [{"id": a["id"], "content": a["content"], "single_word": a.get("single_word", False),
              "lstrip": a.get("lstrip", False), "rstrip": a.get("rstrip", False),
              "normalized": a.get("normalized", not a["special"]), "special": a["special"]} for a in header["added_tokens"]]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": header["normalizer"], "pre_tokenizer": header["pre_tokenizer"],
            "post_processor": header["post_processor"], "decoder": header["decoder"], "model": bpe_model}


def copy_tokenizer(src: Path, bpe_from: Path | None, dest: Path) -> list[str]:
    """Copy ``src``'s tokenizer files into ``dest`` (composing tokenizer.json from a header when needed)."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
            copied.append(name)
    header = src / "tokenizer.header.json"
    if "tokenizer.json" not in copied and header.is_file():
        if bpe_from is None:
            raise InputError(f"'{src}' holds tokenizer.header.json but no BPE vocabulary.",
                             "pass --bpe-from a Qwen2.5 checkpoint directory to take the vocabulary and merges from")
        text = json.dumps(r1_tokenizer_json(header, bpe_from), ensure_ascii=False, indent=2)
        (dest / "tokenizer.json").write_text(text, encoding="utf-8")
        copied.append("tokenizer.json (composed)")
    if not any(c.startswith("tokenizer.json") for c in copied) and "tokenizer.model" not in copied:
        raise InputError(f"'{src}' has no tokenizer (tokenizer.json, tokenizer.model or tokenizer.header.json).",
                         "pass --tokenizer-from a checkpoint directory that has its tokenizer files")
    return copied


def write_checkpoint(out: Path, shape: str, tokenizer_from: Path, *, seed: int = 0, overrides: dict | None = None,
                     bpe_from: Path | None = None, shard_bytes: int = 3 * 10**9) -> dict:
    """Write the checkpoint atomically at ``out``; returns what was written (shards, bytes, parameters, seconds)."""
    from edgemed.files.atomic import atomic_path

    config = shape_config(shape, overrides)
    if not Path(tokenizer_from).is_dir():
        raise InputError(f"--tokenizer-from '{tokenizer_from}' is not a directory.", "name a checkpoint directory")
    if Path(out).exists():
        raise InputError(f"Output '{out}' already exists; it is left alone.", "choose a path that does not exist yet")
    t0 = time.perf_counter()
    shapes = tensor_shapes(config)
    _, itemsize = _DTYPES[config["torch_dtype"]]
    shards = plan_shards(shapes, itemsize, shard_bytes)
    params = parameter_count(config)
    with atomic_path(Path(out), force=False) as tmp:
        tmp.mkdir()
        tokenizer = copy_tokenizer(Path(tokenizer_from), bpe_from, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        weight_map, total = {}, 0
        for k, names in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            total += _write_shard(tmp / fname, names, shapes, config["torch_dtype"], config["initializer_range"], seed)
            weight_map.update({n: fname for n in names})
        index = {"metadata": {"total_size": total, "total_parameters": params}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        origin = f"{tokenizer_from}" + (f" (BPE vocabulary and merges from {bpe_from})" if bpe_from else "")
        (tmp / "EDGEMED_SOURCE.txt").write_text(_MARKER.format(shape=shape, seed=seed, params=params, tokenizer=origin),
                                                encoding="utf-8")
    return {"out": str(out), "shape": shape, "parameters": params, "bytes": total, "shards": len(shards),
            "tokenizer": tokenizer, "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", required=True, choices=list(SHAPES))
    ap.add_argument("--tokenizer-from", required=True, type=Path, help="checkpoint directory to copy the tokenizer from")
    ap.add_argument("--bpe-from", type=Path, help="Qwen2.5 checkpoint whose BPE vocabulary joins a tokenizer.header.json")
    ap.add_argument("-o", "--output", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="change one config.json field")
    ap.add_argument("--shard-gb", type=float, default=3.0, help="largest shard in GB (10^9 bytes)")
    args = ap.parse_args(argv)
    try:
        result = write_checkpoint(args.output, args.shape, args.tokenizer_from, seed=args.seed,
                                  overrides=dict(parse_override(o) for o in args.override), bpe_from=args.bpe_from,
                                  shard_bytes=int(args.shard_gb * 10**9))
    except InputError as exc:
        print(f"error: {exc.problem}\nfix: {exc.fix}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
