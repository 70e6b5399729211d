"""Model facts for the manifest, read from the model file itself, and the memory it needs.

GGUF facts come from the ``gguf`` package's ``GGUFReader`` (imported here, lazily):
architecture, parameter count, quantization, context length, a hash of the chat
template and a hash of the tokenizer, and the provenance keys the converter writes
(``edgemed.*``). The tokenizer hash is sha256 over every ``tokenizer.ggml.*`` key,
in sorted order, as key name + the key's raw GGUF-encoded bytes: two files hash the
same exactly when their vocabularies, merges, scores, types and special ids match.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from edgemed.constants import KV_TYPES
from edgemed.errors import InputError, require
from edgemed.formats import genai_config

# GGUF metadata key (after "<arch>.") -> manifest fact name
_ARCH_KEYS = {
    "context_length": "context_length",
    "block_count": "n_layers",
    "embedding_length": "n_embd",
    "feed_forward_length": "n_ff",
    "attention.head_count": "n_head",
    "attention.head_count_kv": "n_head_kv",
    "attention.key_length": "head_dim",
    "vocab_size": "vocab_size",
}
_GENERAL_KEYS = {"general.name": "name", "general.license": "license", "general.size_label": "size_label",
                 "tokenizer.ggml.model": "tokenizer_model", "tokenizer.ggml.pre": "pre_tokenizer"}
# Provenance the converter writes into the GGUF (edgemed.cli.convert) -> manifest provenance key
PROVENANCE_KEYS = {"edgemed.source.sha256": "source_sha256", "edgemed.lora.sha256": "lora_sha256",
                   "edgemed.converter_version": "converter_version", "edgemed.source.architecture": "source_architecture"}


def _value(field):
    try:
        return field.contents()
    except Exception:  # a value type this gguf version cannot decode: leave the fact out
        return None


def gguf_facts(path: Path) -> tuple[dict, dict]:
    """(model facts, provenance found in metadata) for a GGUF file."""
    from edgemed.formats.gguf_header import read_header

    gguf = require("gguf", "gguf")
    read_header(path)  # bounded checks first: a short or damaged file is named as such, before GGUFReader maps it
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # the reader raises ValueError/struct errors on damaged files
        raise InputError(f"Cannot read '{path}' as GGUF: {exc}.", "pass a complete .gguf made by `edgemed convert`") from None
    fields = reader.fields
    arch = _value(fields["general.architecture"]) if "general.architecture" in fields else None
    facts: dict = {"format": "gguf", "arch": arch}
    for key, name in _GENERAL_KEYS.items():
        if key in fields:
            facts[name] = _value(fields[key])
    for key, name in _ARCH_KEYS.items():
        if f"{arch}.{key}" in fields:
            facts[name] = _value(fields[f"{arch}.{key}"])
    if "head_dim" not in facts and facts.get("n_embd") and facts.get("n_head"):
        facts["head_dim"] = facts["n_embd"] // facts["n_head"]
    facts["params"] = int(sum(int(t.n_elements) for t in reader.tensors))
    types = Counter(t.tensor_type.name for t in reader.tensors)
    facts["tensor_types"] = dict(sorted(types.items()))
    if "general.file_type" in fields:
        try:
            facts["quant"] = gguf.LlamaFileType(int(_value(fields["general.file_type"]))).name.removeprefix("MOSTLY_")
        except ValueError:
            facts["quant"] = f"file_type_{_value(fields['general.file_type'])}"
    else:  # no file type key: name it after the most common quantized tensor type
        quantized = [t for t in types.most_common() if t[0] not in ("F32", "F16", "BF16")] or types.most_common()
        facts["quant"] = quantized[0][0] if quantized else None
    template = _value(fields["tokenizer.chat_template"]) if "tokenizer.chat_template" in fields else None
    facts["chat_template_sha256"] = hashlib.sha256(template.encode("utf-8")).hexdigest() if template else None
    tok = hashlib.sha256()
    for key in sorted(k for k in fields if k.startswith("tokenizer.ggml.")):
        tok.update(key.encode() + b"\0")
        for part in fields[key].parts[2:]:  # parts[0:2] are the key's own length and name
            tok.update(part.tobytes())
    facts["tokenizer_sha256"] = tok.hexdigest()
    provenance = {name: _value(fields[key]) for key, name in PROVENANCE_KEYS.items() if key in fields}
    return facts, provenance


def chat_template(path: Path) -> str | None:
    """The chat template stored in a GGUF (for exports)."""
    gguf = require("gguf", "gguf")
    reader = gguf.GGUFReader(str(path), "r")
    field = reader.fields.get("tokenizer.chat_template")
    return _value(field) if field is not None else None


def onnx_facts(model_dir: Path) -> tuple[dict, dict]:
    """Facts for an ONNX model directory, from genai_config.json when there is one."""
    facts: dict = {"format": "onnx"}
    cfg_path = model_dir / "genai_config.json"
    if cfg_path.is_file():
        cfg = genai_config.read_model(cfg_path)
        decoder = cfg.get("decoder", {})
        facts.update(arch=cfg.get("type"), context_length=cfg.get("context_length"), vocab_size=cfg.get("vocab_size"),
                     n_layers=decoder.get("num_hidden_layers"), n_head=decoder.get("num_attention_heads"),
                     n_head_kv=decoder.get("num_key_value_heads"), head_dim=decoder.get("head_size"))
    tok = model_dir / "tokenizer.json"
    facts["tokenizer_sha256"] = hashlib.sha256(tok.read_bytes()).hexdigest() if tok.is_file() else None
    return facts, {}


# -- memory ------------------------------------------------------------------------------
CONTEXTS = (2048, 4096, 8192)
ESTIMATE_METHOD = "estimate/weights+kv_f16+compute/1"


def memory_needs(model: Path, facts: dict, model_bytes: int) -> dict:
    """Memory needed to run, per context size and per shipped device profile.

    GGUF: the planner (``edgemed.runtime.plan``) reads the tensor table and predicts a
    llama.cpp process's peak, per context with default settings (f16 KV cache,
    CPU), and per device profile with that profile's context, KV cache type,
    flash attention and offload, checked against the profile's budget where the
    profile fixes its memory size (Jetsons, Macs); PC profiles take their budget
    from the machine, so ``fits`` is null there. ONNX: the planner does not read
    ONNX graphs; a stated estimate from file size and KV-cache shape.
    """
    if facts.get("format") != "gguf":
        return _onnx_estimate(facts, model_bytes)
    from edgemed.devices.profiles import load_profiles
    from edgemed.errors import ProfileError
    from edgemed.runtime.plan import METHOD, estimate, for_engine, profile_settings, read_shape

    shape = read_shape(model)
    max_ctx = shape.n_ctx_train or max(CONTEXTS)
    by_ctx = {str(c): estimate(shape, c).total for c in sorted({c for c in CONTEXTS if c <= max_ctx} | {min(max_ctx, 32768)})}
    profiles = {}
    for name, profile in sorted(load_profiles().items()):
        n_ctx = min(profile.llama["n_ctx"], max_ctx)
        # the larger of what `run` and `serve` load it with (their micro-batches may differ: plan.for_engine)
        need = max(estimate(shape, n_ctx, **profile_settings(for_engine(profile, batched), shape)).total
                   for batched in (False, True))
        try:
            budget = profile.budget_bytes(None)
        except ProfileError:  # sized from the machine it runs on
            budget = None
        profiles[name] = {"n_ctx": n_ctx, "bytes": need, "budget_bytes": budget,
                          "fits": None if budget is None else need <= budget}
    return {"method": METHOD, "by_context": by_ctx, "profiles": profiles}


def _onnx_estimate(facts: dict, model_bytes: int) -> dict:
    """weights: the files' size; KV cache: 2 x layers x context x KV heads x head dim x 2 bytes (f16);
    compute: logits for one 512-token batch (vocab x 512 x 4 bytes) + 64 MiB of scratch."""
    layers, kv_heads, head_dim = facts.get("n_layers"), facts.get("n_head_kv"), facts.get("head_dim")
    vocab = facts.get("vocab_size") or 0
    max_ctx = facts.get("context_length") or max(CONTEXTS)
    by_ctx = {}
    for ctx in sorted({c for c in CONTEXTS if c <= max_ctx} | {min(max_ctx, 32768)}):
        kv = int(2 * layers * ctx * kv_heads * head_dim * KV_TYPES["f16"].bytes_per_element) if layers and kv_heads and head_dim else 0
        by_ctx[str(ctx)] = model_bytes + kv + vocab * 512 * 4 + (64 << 20)
    return {"method": ESTIMATE_METHOD, "by_context": by_ctx, "profiles": {},
            "note": "ONNX: estimate from file size and KV-cache shape (the planner reads GGUF only)"}


# -- LoRA adapters -----------------------------------------------------------------------
def adapter_entry(path: Path) -> dict:
    """What the manifest says of a GGUF LoRA adapter file, from its header (``edgemed.formats.gguf_header``):
    architecture, alpha, rank (when every pair has the same), the base checkpoint it was made for, its tensors'
    bytes and types, and the PEFT adapter's sha256. InputError when the file is not a GGUF LoRA adapter."""
    from edgemed.formats.gguf_header import LORA_SHA_KEY, adapter_facts, read_header

    facts = adapter_facts(path)
    header = read_header(path)
    ranks = {t.dims[1] for t in header.tensors if t.name.endswith(".lora_a") and len(t.dims) >= 2}
    lora_sha = header.metadata.get(LORA_SHA_KEY)
    return {"architecture": facts.architecture, "alpha": facts.alpha, "rank": ranks.pop() if len(ranks) == 1 else None,
            "base_source_sha256": facts.base_source_sha256, "tensor_bytes": facts.n_bytes, "tensor_types": list(facts.types),
            "n_tensors": facts.n_tensors, "lora_sha256": lora_sha if isinstance(lora_sha, str) else None}
