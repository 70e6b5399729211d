"""ONNX Runtime GenAI's ``genai_config.json``: read as a regular file of bounded size, and its fields checked before
anything is sized from them. It is untrusted input: it comes with a model directory, from a bundle or a copy.

Two readers share it: ``edgemed pack`` (the facts and the memory estimate read the model's sizes) and the ONNX
engine, which also reads the decoder's graph file name and its input and output names (``engine=True``).

Light on purpose (stdlib only), as the rest of ``edgemed.formats``.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from edgemed.errors import InputError
from edgemed.formats.input_file import read_at_most
from edgemed.formats.nesting import loads_json

MAX_BYTES = 1 << 20  # the config is a few kilobytes
#: (object, key) -> upper bound of each size field
INTS = {("model", "context_length"): 2**24, ("model", "vocab_size"): 2**24,
        ("decoder", "num_hidden_layers"): 4096, ("decoder", "num_attention_heads"): 2**16,
        ("decoder", "num_key_value_heads"): 2**16, ("decoder", "head_size"): 2**16}
#: what the engine needs besides: sizes, and the names of its graph's inputs and outputs it feeds and fetches, by
#: table (a per-layer name has one %d, the layer; the others no '%'); ``OPTIONAL_NAMES`` are fed when given
ENGINE_INTS = ("num_hidden_layers", "num_key_value_heads", "head_size")
PER_LAYER = ("past_key_names", "past_value_names", "present_key_names", "present_value_names")
NAMES = {"inputs": ("input_ids", "attention_mask", "past_key_names", "past_value_names"),
         "outputs": ("logits", "present_key_names", "present_value_names")}
OPTIONAL_NAMES = {"inputs": ("position_ids",), "outputs": ()}


def read_model(path: Path, *, engine: bool = False) -> dict:
    """The ``model`` object of ``path``; ``InputError`` naming the field when a check fails."""
    path = Path(path)
    fix = f"correct {path}, or export the model again with `edgemed convert --to onnx`"
    try:
        doc = loads_json(read_at_most(path, MAX_BYTES).decode("utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError, JSONDecodeError, TooDeep and the size are ValueErrors
        raise InputError(f"Cannot read {path}: {getattr(exc, 'strerror', None) or exc}.", fix) from None
    model = doc.get("model", {}) if isinstance(doc, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("decoder", {}), dict):
        raise InputError(f"{path}: the file and its 'model' and 'model.decoder' must be JSON objects.", fix)
    if not isinstance(model.get("type", ""), str):
        raise InputError(f"{path}: 'model.type' must be a string, not {json.dumps(model['type'])[:40]}.", fix)
    objects = {"model": model, "decoder": model.get("decoder", {})}
    for (where, key), top in INTS.items():
        value = objects[where].get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 0 < value <= top):
            name = "model." + key if where == "model" else "model.decoder." + key
            raise InputError(f"{path}: '{name}' must be a positive integer (at most {top:,}), not "
                             f"{json.dumps(value)[:40]}.", fix)
    if engine:
        _check_engine_fields(path, objects["decoder"], fix)
    return model


def _check_engine_fields(path: Path, dec: dict, fix: str) -> None:
    def fail(name: str, why: str):
        raise InputError(f"{path}: 'model.decoder.{name}' {why}.", fix)

    for key in ENGINE_INTS:
        if key not in dec:
            fail(key, "is missing")
    name = dec.get("filename")
    if not isinstance(name, str) or not name or PurePosixPath(name).name != name or name in (".", "..") or "\\" in name:
        fail("filename", f"must be the name of a file in the model's folder, not {json.dumps(name)[:60]}")
    for part, required in NAMES.items():
        table = dec.get(part)
        if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
            fail(part, "must be a JSON object of names")
        for key in (*required, *(k for k in OPTIONAL_NAMES[part] if k in table)):
            value = table.get(key)
            if not value:
                fail(f"{part}.{key}", "is missing" if value is None else "must not be empty")
            if key in PER_LAYER and not (value.count("%d") == 1 and value.count("%") == 1):
                fail(f"{part}.{key}", "must hold one '%d' (the layer) and no other '%'")
            if key not in PER_LAYER and "%" in value:
                fail(f"{part}.{key}", "must not hold '%'")
