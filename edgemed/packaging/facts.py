"""Model facts for the manifest, read from the model file itself, and the memory it needs.

GGUF facts come from edgemed's own bounded header reader (``edgemed.formats.gguf_header``):
architecture, parameter count, quantization, context length, a hash of the chat
template and a hash of the tokenizer, and the provenance keys the converter writes
(``edgemed.*``). The tokenizer hash is sha256 over every ``tokenizer.ggml.*`` key,
in sorted order, as key name + NUL + the key's raw GGUF-encoded type and value bytes, read
from the file: two files hash the same exactly when their vocabularies, merges, scores,
types and special ids match. (``gguf.GGUFReader``, which computed them before, builds
numpy objects for every string of the vocabulary: a few megabytes of crafted strings took
gigabytes of memory; the values, the tokenizer hash included, are the same.)
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

from edgemed.errors import InputError, IntegrityError
from edgemed.formats import genai_config, onnx_external

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


_TOKENIZER_KEYS = "tokenizer.ggml."
_BLOCK = 1 << 20


def _value(meta: dict, key: str):
    """A metadata value as the manifest states it: a long or string array (kept by its length only) is left out."""
    from edgemed.formats.gguf_header import ArrayLength

    value = meta.get(key)
    return None if isinstance(value, ArrayLength) else value


def _tokenizer_sha256(path: Path, spans: dict) -> str:
    """sha256 over the ``tokenizer.ggml.*`` keys in sorted order: name, NUL, the raw type and value bytes (read from
    the file in blocks where ``read_header`` found them)."""
    tok = hashlib.sha256()
    with open(path, "rb") as fh:
        for key in sorted(spans):
            tok.update(key.encode() + b"\0")
            start, end = spans[key]
            fh.seek(start)
            left = end - start
            while left:
                block = fh.read(min(left, _BLOCK))
                if not block:
                    raise IntegrityError(f"'{path}' became shorter while it was read.", "leave the file alone while it is packed, then pack again")
                tok.update(block)
                left -= len(block)
    return tok.hexdigest()


def gguf_facts(path: Path) -> tuple[dict, dict]:
    """(model facts, provenance found in metadata) for a GGUF file: everything from its bounded header, so a damaged or
    crafted file is an InputError before anything in proportion to its strings is allocated."""
    from edgemed.formats.gguf_header import read_header

    header = read_header(path, spans=_TOKENIZER_KEYS)
    meta = header.metadata
    arch = _value(meta, "general.architecture")
    facts: dict = {"format": "gguf", "arch": arch}
    for key, name in _GENERAL_KEYS.items():
        if key in meta:
            facts[name] = _value(meta, key)
    for key, name in _ARCH_KEYS.items():
        if f"{arch}.{key}" in meta:
            facts[name] = _value(meta, f"{arch}.{key}")
    n_embd, n_head = facts.get("n_embd"), facts.get("n_head")
    if "head_dim" not in facts and isinstance(n_embd, int) and isinstance(n_head, int) and n_embd and n_head:
        facts["head_dim"] = n_embd // n_head
    facts["params"] = int(sum(t.n_elements for t in header.tensors))
    types = Counter(t.type_name for t in header.tensors)
    facts["tensor_types"] = dict(sorted(types.items()))
    if "general.file_type" in meta:
        import gguf  # read_header required it

        file_type = _value(meta, "general.file_type")
        try:
            facts["quant"] = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
        except (ValueError, TypeError):
            facts["quant"] = f"file_type_{file_type}"
    else:  # no file type key: name it after the most common quantized tensor type
        quantized = [t for t in types.most_common() if t[0] not in ("F32", "F16", "BF16")] or types.most_common()
        facts["quant"] = quantized[0][0] if quantized else None
    template = _value(meta, "tokenizer.chat_template")
    facts["chat_template_sha256"] = hashlib.sha256(template.encode("utf-8")).hexdigest() if isinstance(template, str) and template else None
    facts["tokenizer_sha256"] = _tokenizer_sha256(path, header.spans)
    provenance = {name: _value(meta, key) for key, name in PROVENANCE_KEYS.items() if key in meta}
    return facts, provenance


def chat_template(path: Path) -> str | None:
    """The chat template stored in a GGUF (for exports), from its bounded header."""
    from edgemed.formats.gguf_header import read_header

    template = read_header(path).metadata.get("tokenizer.chat_template")
    return template if isinstance(template, str) else None


#: tokenizer_config.json is read whole for its chat template only up to this size (a tokenizer's is kilobytes)
MAX_TOKENIZER_CONFIG_BYTES = 16 << 20


def onnx_facts(model_dir: Path) -> tuple[dict, dict]:
    """Facts for an ONNX model directory, from genai_config.json when there is one, and the sha256 of the chat
    template the ONNX engine renders (chat_template.jinja, else tokenizer_config.json's). Its parameter count and
    weight type are not in these files: the weight type comes from the conversion report (``bundle``), the count
    is left out (readers say "unknown")."""
    from edgemed.files.hashing import file_sha256

    facts: dict = {"format": "onnx"}
    cfg_path = model_dir / "genai_config.json"
    if not os.path.lexists(cfg_path):  # the ONNX engine refuses a directory without it: a bundle of it would never run
        raise InputError(f"'{model_dir}' has no genai_config.json, which the ONNX engine reads to run the model.",
                         "pack the directory `edgemed convert --to onnx` wrote, which has it, or convert the model again")
    cfg = genai_config.read_model(cfg_path, engine=True)  # the checks the engine makes at load, made before packing
    decoder = cfg.get("decoder", {})
    _check_onnx_files(model_dir, decoder["filename"])
    facts.update(arch=cfg.get("type"), context_length=cfg.get("context_length"), vocab_size=cfg.get("vocab_size"),
                 n_layers=decoder.get("num_hidden_layers"), n_head=decoder.get("num_attention_heads"),
                 n_head_kv=decoder.get("num_key_value_heads"), head_dim=decoder.get("head_size"))
    tok = model_dir / "tokenizer.json"
    facts["tokenizer_sha256"] = file_sha256(tok) if tok.is_file() else None
    facts["chat_template_sha256"] = _onnx_template_sha256(model_dir)
    return facts, {}


def _check_onnx_files(model_dir: Path, graph_name: str) -> None:
    """The files the ONNX engine reads at load, as it reads them: the graph genai_config.json names, its external
    data (``onnx_external.refusal``: inside the folder, each tensor's bytes within the file) and tokenizer.json. A
    folder without a report (or packed with --no-report) has no file list to be held to, and a bundle of a folder
    that fails these would pass verify and install and fail at its first run on every device."""
    graph = model_dir / graph_name
    remake = "pack the directory `edgemed convert --to onnx` wrote, copied whole, or convert the model again"
    try:
        why = onnx_external.refusal(model_dir, onnx_external.external_tensors(graph))
    except FileNotFoundError:
        raise InputError(f"'{model_dir}' has no '{graph_name}', the graph its genai_config.json names.", remake) from None
    except OSError as exc:  # NotRegular says which kind of file it is; a folder is IsADirectoryError
        raise InputError(f"'{graph}' cannot be read ({exc.strerror or exc}).", remake) from None
    except ValueError as exc:
        raise InputError(f"'{graph}' is not an ONNX graph onnxruntime could load ({exc}).", remake) from None
    if why:
        raise InputError(f"'{graph}' {why} The ONNX engine refuses it at load.", onnx_external.FIX)
    if not (model_dir / "tokenizer.json").is_file():
        raise InputError(f"'{model_dir}' has no tokenizer.json, which the ONNX engine tokenizes with.",
                         "copy tokenizer.json from the converted directory (or the checkpoint) into it, and pack again")


def _onnx_template_sha256(model_dir: Path) -> str | None:
    """sha256 of the chat template's UTF-8 text, found where the ONNX engine looks (``runtime.onnx_engine``):
    chat_template.jinja, else tokenizer_config.json's ``chat_template`` (text, or the one named "default"). None
    when there is none, or tokenizer_config.json is too large or not JSON (the engine then says why at load)."""
    from edgemed.files.hashing import file_sha256
    from edgemed.formats.input_file import read_at_most
    from edgemed.formats.nesting import loads_json

    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return file_sha256(jinja) if jinja.stat().st_size else None  # an empty one: the engine renders none
    try:
        cfg = loads_json(read_at_most(model_dir / "tokenizer_config.json", MAX_TOKENIZER_CONFIG_BYTES).decode("utf-8"))
    except (OSError, ValueError):  # none there, too large, not UTF-8 or not JSON
        return None
    template = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return hashlib.sha256(template.encode("utf-8")).hexdigest() if isinstance(template, str) and template else None


# -- memory ------------------------------------------------------------------------------
CONTEXTS = (2048, 4096, 8192)
#: the ONNX estimate's formula (1 priced the KV cache at f16, once; 2 at the graph's type, past and present)
ESTIMATE_METHOD = "estimate/weights+kv_past_present+compute/2"


def memory_needs(model: Path, facts: dict, model_bytes: int) -> dict:
    """Memory needed to run, per context size and per shipped device profile.

    GGUF: the planner (``edgemed.runtime.plan``) reads the tensor table and predicts a
    llama.cpp process's peak, per context with default settings (f16 KV cache,
    CPU), and per device profile with that profile's context, KV cache type,
    flash attention and offload, checked against the profile's budget where the
    profile fixes its memory size (Jetsons, Macs); PC profiles take their budget
    from the machine, so ``fits`` is null there. ONNX: the planner does not read
    ONNX graphs; a stated estimate from file size and KV-cache shape and type.
    """
    if facts.get("format") != "gguf":
        return _onnx_estimate(model, facts, model_bytes)
    from edgemed.devices.profiles import usable_profiles
    from edgemed.errors import ProfileError
    from edgemed.runtime.plan import METHOD, estimate, for_engine, profile_settings, read_shape

    shape = read_shape(model)
    max_ctx = shape.n_ctx_train or max(CONTEXTS)
    by_ctx = {str(c): estimate(shape, c).total for c in sorted({c for c in CONTEXTS if c <= max_ctx} | {min(max_ctx, 32768)})}
    profiles = {}
    for name, profile in sorted(usable_profiles().items()):  # a user file that does not read: left out, warned
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


def _onnx_estimate(model_dir: Path, facts: dict, model_bytes: int) -> dict:
    """weights: the files' size; KV cache: past and present (the ONNX engine feeds the past to every forward and holds
    the present it returns at the same time) x K and V x layers x context x KV heads x head dim x the bytes of the
    graph's past input type (float32 in the graph edgemed traces); compute: logits for one 512-token batch
    (vocab x 512 x 4 bytes) + 64 MiB of scratch."""
    layers, kv_heads, head_dim = facts.get("n_layers"), facts.get("n_head_kv"), facts.get("head_dim")
    vocab = facts.get("vocab_size") or 0
    max_ctx = facts.get("context_length") or max(CONTEXTS)
    element = _onnx_kv_bytes(model_dir)
    by_ctx = {}
    for ctx in sorted({c for c in CONTEXTS if c <= max_ctx} | {min(max_ctx, 32768)}):
        kv = 2 * 2 * layers * ctx * kv_heads * head_dim * element if layers and kv_heads and head_dim else 0
        by_ctx[str(ctx)] = model_bytes + kv + vocab * 512 * 4 + (64 << 20)
    return {"method": ESTIMATE_METHOD, "by_context": by_ctx, "profiles": {},
            "note": "ONNX: estimate from file size and KV-cache shape and type (the planner reads GGUF only)"}


def _onnx_kv_bytes(model_dir: Path) -> int:
    """Bytes per element of the KV cache of the ONNX directory ``model_dir``: the type of its first past-key input,
    in the graph genai_config.json names (``onnx_facts`` has checked that file as the engine does)."""
    from edgemed.formats.input_file import NotRegular
    from edgemed.formats.onnx_inputs import FLOAT_TYPES, input_types

    decoder = genai_config.read_model(model_dir / "genai_config.json", engine=True)["decoder"]
    graph, past = model_dir / decoder["filename"], decoder["inputs"]["past_key_names"] % 0
    remake = "re-copy the whole directory, or convert the model again with `edgemed convert --to onnx`"
    try:
        types = input_types(graph)
    except (NotRegular, IsADirectoryError, FileNotFoundError) as exc:
        raise InputError(f"'{graph}', the graph genai_config.json names, is not a regular file ({exc.strerror or exc}).",
                         remake) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"'{graph}' is not an ONNX graph edgemed can read ({exc}).", remake) from None
    if past not in types:
        raise InputError(f"The graph '{graph}' has no input '{past}', which genai_config.json names as the first "
                         "layer's past key: the ONNX engine would refuse the directory.", remake)
    if types[past] not in FLOAT_TYPES:
        raise InputError(f"The graph '{graph}' holds its KV cache ('{past}') as ONNX element type {types[past]}, not a "
                         f"floating type ({', '.join(name for name, _ in FLOAT_TYPES.values())}).", remake)
    return FLOAT_TYPES[types[past]][1]


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
