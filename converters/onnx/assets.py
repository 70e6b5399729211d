"""The files an ONNX model directory carries besides the graph.

Copied from the checkpoint: the tokenizer (``tokenizer.json`` is required: the
device runtime reads it with the ``tokenizers`` library, no transformers), its
config and special-token map, the chat template, ``generation_config.json`` and
``config.json``. Written: ``genai_config.json`` in onnxruntime-genai's format,
which is also what edgemed's ONNX engine reads (graph names, layer shapes,
context length, stop tokens); before the rename it is read back with the engine's
reader (``edgemed.formats.genai_config``), whichever graph kind wrote it.

``search.max_length`` is capped (``DEFAULT_MAX_LENGTH``) rather than set to the
model's context length: onnxruntime-genai allocates the KV cache at that size
(131,072 tokens for R1-Distill-Qwen would be gigabytes before the first token).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgemed.converters.onnx import trace as onnx_trace
from edgemed.errors import CheckpointError, InputError, TokenizerError
from edgemed.formats import genai_config as genai_format

COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
          "generation_config.json", "config.json")
#: transformers 5 saves named chat templates (``tool_use``, ...) one file each in this folder
NAMED_TEMPLATES = "additional_chat_templates"
GENAI_CONFIG = "genai_config.json"
DEFAULT_MAX_LENGTH = 4096


def check_assets(ckpt_dir: Path, config: dict) -> None:
    """Refuse, before any export work, the files the ONNX directory would carry but cannot use."""
    from edgemed.converters.gguf.tokenizer import load_tokenizer_json

    if not (ckpt_dir / "tokenizer.json").exists():
        copy_assets(ckpt_dir, None)  # raises the missing-tokenizer error
    load_tokenizer_json(ckpt_dir / "tokenizer.json")
    eos_ids(ckpt_dir, config)
    top = genai_format.INTS[("model", "context_length")]  # what the ONNX engine reads as a context length
    if "max_position_embeddings" in config and config["max_position_embeddings"] is None:
        # not taken as absent: transformers refuses a config with it null (its field is an int), so the export could not load it
        raise CheckpointError(
            f"{ckpt_dir / 'config.json'}: 'max_position_embeddings' must be a positive integer (the context the model "
            "was trained for), not null: Hugging Face loading refuses such a config, and the ONNX engine needs the "
            "context length.",
            "give config.json the context the model was trained for (e.g. \"max_position_embeddings\": 32768), "
            "as its model card or the original checkpoint's config.json states it")
    context = config.get("max_position_embeddings", DEFAULT_MAX_LENGTH)
    if context > top:  # the GGUF route writes it as it is (a 32-bit field): only this route's reader caps it
        raise CheckpointError(
            f"'{ckpt_dir}': max_position_embeddings {context:,} is more than the {top:,} tokens edgemed's ONNX engine "
            "takes as a context length; the directory it would become could be neither packed nor run.",
            f"convert with --to gguf, or give config.json the context the model was trained for (at most {top:,})")


def check_written(tmp: Path, out: Path) -> None:
    """The ``genai_config.json`` an export wrote into ``tmp`` (edgemed's writer or the model builder), read as the ONNX
    engine reads it, before ``tmp`` becomes ``out``: a writer and a reader that disagree fail the conversion, not the
    first run on a device."""
    try:
        genai_format.read_model(tmp / GENAI_CONFIG, engine=True)
    except InputError as exc:
        raise CheckpointError(
            f"The {GENAI_CONFIG} this conversion wrote for '{out}' would be refused by edgemed's ONNX engine: "
            f"{exc.problem.replace(str(tmp), str(out))} Nothing was written.",
            "report it to edgemed with the checkpoint's config.json (a value the export copies and the engine bounds); "
            "meanwhile convert with --to gguf"
        ) from None


def copy_assets(ckpt_dir: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer and config files present in ``ckpt_dir``; returns their names."""
    if not (ckpt_dir / "tokenizer.json").exists():
        raise TokenizerError(
            f"'{ckpt_dir}' has no tokenizer.json; the ONNX runtime needs a fast (tokenizers) tokenizer.",
            "save one with AutoTokenizer.from_pretrained(src).save_pretrained(dir) and convert again",
        )
    copied = []
    for name in COPIED:
        if (ckpt_dir / name).exists():
            shutil.copy2(ckpt_dir / name, out_dir / name)
            copied.append(name)
    return copied + copy_named_templates(ckpt_dir, out_dir)


def copy_named_templates(ckpt_dir: Path, out_dir: Path) -> list[str]:
    """The named chat templates (``additional_chat_templates/*.jinja``), so a tokenizer loaded from the output has
    every template the source had, not only the default; their relative names."""
    folder = ckpt_dir / NAMED_TEMPLATES
    if not folder.is_dir() or folder.is_symlink():
        return []
    names = sorted(p.name for p in folder.iterdir() if p.suffix == ".jinja" and p.is_file() and not p.is_symlink())
    if names:
        (out_dir / NAMED_TEMPLATES).mkdir(exist_ok=True)
    for name in names:
        shutil.copy2(folder / name, out_dir / NAMED_TEMPLATES / name)
    return [f"{NAMED_TEMPLATES}/{n}" for n in names]


def _json(path: Path) -> dict:
    from edgemed.converters.source.checkpoint import load_json

    if not path.exists():
        return {}
    data = load_json(path, CheckpointError, "Checkpoint file", f"re-copy {path.name} from the source checkpoint")
    if not isinstance(data, dict):
        raise CheckpointError(f"'{path}' must hold a JSON object, not a {type(data).__name__}.", f"re-copy {path.name}")
    return data


def eos_ids(ckpt_dir: Path, config: dict) -> list[int]:
    """Stop token ids: generation_config.json's eos (int or list), else config.json's."""
    value = _json(ckpt_dir / "generation_config.json").get("eos_token_id", config.get("eos_token_id"))
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ids):
        raise CheckpointError(f"'{ckpt_dir}': eos_token_id must be a token id or a list of them, not {json.dumps(value)[:60]}.",
                              "fix generation_config.json / config.json (e.g. \"eos_token_id\": 2)")
    return ids


def genai_config(ckpt_dir: Path, config: dict, model_file: str) -> dict:
    """onnxruntime-genai's config for a graph written by ``onnx_trace.export``."""
    kv_heads, head_dim = onnx_trace.kv_shape(_Cfg(config))
    gen = _json(ckpt_dir / "generation_config.json")
    eos = eos_ids(ckpt_dir, config)
    context = int(config.get("max_position_embeddings", DEFAULT_MAX_LENGTH))
    pad = gen.get("pad_token_id", config.get("pad_token_id"))
    bos = gen.get("bos_token_id", config.get("bos_token_id"))
    model = {
        "context_length": context,
        "decoder": {
            "session_options": {"log_id": "edgemed", "provider_options": []},
            "filename": model_file,
            "head_size": head_dim,
            "hidden_size": int(config["hidden_size"]),
            "inputs": {
                "input_ids": onnx_trace.INPUT_IDS,
                "attention_mask": onnx_trace.ATTENTION_MASK,
                "position_ids": onnx_trace.POSITION_IDS,
                "past_key_names": onnx_trace.PAST_KEY,
                "past_value_names": onnx_trace.PAST_VALUE,
            },
            "outputs": {
                "logits": onnx_trace.LOGITS,
                "present_key_names": onnx_trace.PRESENT_KEY,
                "present_value_names": onnx_trace.PRESENT_VALUE,
            },
            "num_attention_heads": int(config["num_attention_heads"]),
            "num_hidden_layers": int(config["num_hidden_layers"]),
            "num_key_value_heads": kv_heads,
        },
        "eos_token_id": eos[0] if len(eos) == 1 else eos,  # onnxruntime-genai takes an int or a list
        "pad_token_id": pad if pad is not None else (eos[0] if eos else 0),
        "type": config.get("model_type", "decoder"),
        "vocab_size": int(config["vocab_size"]),
    }
    if bos is not None:  # onnxruntime-genai rejects null ids
        model["bos_token_id"] = bos
    return {
        "model": model,
        "search": {
            "do_sample": False,
            "max_length": min(context, DEFAULT_MAX_LENGTH),
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 0,
            "top_p": 1.0,
        },
    }


class _Cfg:
    """Attribute view of a config.json dict (what ``kv_shape`` reads)."""

    def __init__(self, config: dict):
        self.num_attention_heads = int(config["num_attention_heads"])
        self.hidden_size = int(config["hidden_size"])
        self.head_dim = config.get("head_dim")
        self.num_key_value_heads = config.get("num_key_value_heads")


def write_genai_config(ckpt_dir: Path, config: dict, out_dir: Path, model_file: str) -> None:
    (out_dir / GENAI_CONFIG).write_text(json.dumps(genai_config(ckpt_dir, config, model_file), indent=2) + "\n", encoding="utf-8")
