"""Hugging Face tokenizer -> GGUF vocabulary, chat template and special tokens.

Two families:
- byte-level BPE (``tokenizer.json`` with a ByteLevel decoder): GPT-2, Llama 3,
  Qwen2, SmolLM2, the DeepSeek-R1 distills. llama.cpp model "gpt2" plus a named
  pre-tokenizer, picked from ``data/pretokenizers.toml`` by the regex/split
  signature of ``tokenizer.json`` (never by model name).
- SentencePiece (``tokenizer.model``, or a byte-fallback ``tokenizer.json``):
  Llama 2 style, llama.cpp model "llama"; read through gguf-py's vocab classes.

An unknown pre-tokenizer is refused with the list of known ones and the
``--pre-tokenizer`` override; after writing, ``verify_tokenization`` proves
llama.cpp splits medical text into the very ids the Hugging Face tokenizer does.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from edgemed.converters.source.checkpoint import hf_tokenizer  # noqa: F401 (its home is beside the checkpoint's other readers)
from edgemed.errors import TokenizerError, require

if TYPE_CHECKING:  # annotations only: gguf is imported when a conversion runs
    import gguf


def _gguf():
    """gguf-py, imported when a vocabulary is planned or written (the ONNX route reads tokenizer.json without it)."""
    return require("gguf", "convert")

# Sentences that exercise digits, units, punctuation, accents and line breaks.
MEDICAL_SAMPLES = (
    "A 67-year-old man presents with crushing chest pain radiating to the left arm; troponin I is 2.4 ng/mL.",
    "Start metformin 500 mg PO BID with meals, titrate to 1000 mg BID; hold if eGFR < 30 mL/min/1.73m².",
    "Differential: Guillain–Barré syndrome vs. myasthenia gravis — check anti-AChR antibodies.\n\nPlan:\n  1) EMG\n  2) LP",
    "SpO2 88% on room air, RR 28/min, T 39.2°C: suspect community-acquired pneumonia (CURB-65 = 3).",
    "¿Tiene alergia a la penicilina? Patient's INR was 3.1 on warfarin 5mg; hold 2 doses and recheck in 48h.",
    "HbA1c 9.8%   fasting glucose 212 mg/dL\tBMI 34.2 kg/m2 — consider GLP-1 RA (semaglutide 0.25 mg weekly).",
)


@dataclass
class VocabPlan:
    model: str  # llama.cpp tokenizer.ggml.model
    pre: str | None  # tokenizer.ggml.pre
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    special: "gguf.SpecialVocab"


def _load_table() -> list[dict]:
    text = resources.files("edgemed.converters").joinpath("data/pretokenizers.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)["pretokenizer"]


def known_pretokenizers() -> list[str]:
    return sorted({row["llama_cpp"] for row in _load_table()})


def signature(tokenizer_json: dict) -> list[str]:
    """What decides how text is split before BPE: the normalizer and the pre-tokenizer chain."""
    parts: list[str] = []
    norm = tokenizer_json.get("normalizer")
    if norm:
        parts.append(f"normalizer:{norm.get('type')}")

    def walk(node: dict | None) -> None:
        if not node:
            return
        kind = node.get("type")
        if kind == "Sequence":
            for child in node.get("pretokenizers", []):
                walk(child)
        elif kind == "Split":
            pattern = node.get("pattern", {})
            parts.append("split:" + str(pattern.get("Regex", pattern.get("String"))))
        elif kind == "ByteLevel":
            parts.append(f"bytelevel:use_regex={str(node.get('use_regex', True)).lower()}")
        elif kind == "Digits":
            parts.append(f"digits:individual={str(node.get('individual_digits', False)).lower()}")
        else:
            parts.append(f"{kind}")

    walk(tokenizer_json.get("pre_tokenizer"))
    return parts


def detect_pretokenizer(tokenizer_json: dict) -> str:
    sig = signature(tokenizer_json)
    for row in _load_table():
        if row["signature"] == sig:
            return row["llama_cpp"]
    raise TokenizerError(
        "This tokenizer's pre-tokenizer is not in edgemed's table, so llama.cpp might split text differently "
        f"from the Hugging Face tokenizer. Its signature: {sig}.",
        f"pass --pre-tokenizer NAME with one of: {', '.join(known_pretokenizers())} "
        "(edgemed then checks llama.cpp's token ids against the Hugging Face tokenizer and refuses a mismatch)",
    )


def plan_vocab(model_dir: Path, n_vocab: int, pre_override: str | None = None) -> VocabPlan:
    tj_path = model_dir / "tokenizer.json"
    if tj_path.exists():
        tj = load_tokenizer_json(tj_path)
        decoder = (tj.get("decoder") or {}).get("type")
        model = tj.get("model") or {}  # "model": null is as good as none
        if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel":
            return _bpe_plan(model_dir, tj, n_vocab, pre_override)
        if model.get("type") == "BPE" and model.get("byte_fallback"):
            return _spm_plan(model_dir, _gguf_vocab(_gguf().LlamaHfVocab, model_dir), n_vocab)
    if (model_dir / "tokenizer.model").exists():
        return _spm_plan(model_dir, _gguf_vocab(_gguf().SentencePieceVocab, model_dir), n_vocab)
    raise TokenizerError(
        f"No supported tokenizer in '{model_dir}' (need a byte-level BPE tokenizer.json or a SentencePiece tokenizer.model).",
        "copy the tokenizer files that came with the checkpoint",
    )


def load_tokenizer_json(path: Path) -> dict:
    """tokenizer.json, with the parts edgemed reads checked for type (a corrupt file is refused, not crashed on)."""
    from edgemed.converters.source.checkpoint import load_json

    fix = "re-copy tokenizer.json from the source checkpoint, or re-save it with tokenizer.save_pretrained()"
    tj = load_json(path, TokenizerError, "Tokenizer file", fix)

    def bad(what: str) -> TokenizerError:
        return TokenizerError(f"Tokenizer file '{path}' is malformed: {what}.", fix)

    if not isinstance(tj, dict):
        raise bad(f"it holds a JSON {type(tj).__name__}, not an object")
    for key in ("model", "normalizer", "pre_tokenizer", "decoder"):
        if tj.get(key) is not None and not isinstance(tj[key], dict):
            raise bad(f"'{key}' is not an object")
    model = tj.get("model") or {}
    if model.get("type") == "BPE":
        vocab = model.get("vocab")
        if not isinstance(vocab, dict) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in vocab.values()):
            raise bad("model.vocab is not an object of token -> non-negative id")
        if len(set(vocab.values())) != len(vocab):  # two tokens for one id: one of them could never be written
            seen: dict[int, str] = {}
            token, other = next((t, seen[i]) for t, i in vocab.items() if seen.setdefault(i, t) != t)
            raise bad(f"model.vocab gives tokens {token!r} and {other!r} the same id {vocab[token]}")
        merges = model.get("merges", [])
        if not isinstance(merges, list) or not all(
                isinstance(m, str) or (isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m)) for m in merges):
            raise bad("model.merges is not a list of merge pairs")
    added = tj.get("added_tokens", [])
    if not isinstance(added, list) or not all(
            isinstance(a, dict) and isinstance(a.get("id"), int) and not isinstance(a.get("id"), bool) and a["id"] >= 0
            and isinstance(a.get("content"), str) for a in added):
        raise bad("added_tokens is not a list of {id, content} objects")

    def walk(node, depth=0):
        if depth > 32:
            raise bad("the pre-tokenizer chain is nested too deeply")
        if node is None:
            return
        if not isinstance(node, dict):
            raise bad("a pre-tokenizer step is not an object")
        children = node.get("pretokenizers", [])
        if not isinstance(children, list):
            raise bad("pre_tokenizer.pretokenizers is not a list")
        pattern = node.get("pattern", {})
        if not isinstance(pattern, dict):
            raise bad("a Split pre-tokenizer's pattern is not an object")
        for child in children:
            walk(child, depth + 1)

    walk(tj.get("pre_tokenizer"))
    return tj


def _bpe_plan(model_dir: Path, tj: dict, n_vocab: int, pre_override: str | None) -> VocabPlan:
    pre = pre_override or detect_pretokenizer(tj)
    if pre_override and pre_override not in known_pretokenizers():
        raise TokenizerError(f"Unknown pre-tokenizer '{pre_override}'.", f"choose one of: {', '.join(known_pretokenizers())}")
    gguf = _gguf()
    by_id: dict[int, tuple[bytes, int]] = {i: (t.encode("utf-8"), gguf.TokenType.NORMAL) for t, i in tj["model"]["vocab"].items()}
    for added in tj.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"].encode("utf-8"), kind)
    if by_id and max(by_id) >= n_vocab:
        raise TokenizerError(
            f"Tokenizer has token id {max(by_id)} but the model's vocab_size is {n_vocab}.",
            "the tokenizer does not belong to this checkpoint; copy the matching tokenizer files",
        )
    tokens, types = [], []
    for i in range(n_vocab):
        text, kind = by_id.get(i, (f"[PAD{i}]".encode(), gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    special = _special_vocab(model_dir, load_merges=True, n_vocab=n_vocab)
    _set_add_special(model_dir, special)
    return VocabPlan("gpt2", pre, tokens, [0.0] * n_vocab, types, special)


def _spm_plan(model_dir: Path, vocab, n_vocab: int) -> VocabPlan:
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(float(score))
        types.append(int(kind))
    if len(tokens) > n_vocab:  # llama.cpp sizes the vocabulary by this list and would refuse the embedding's rows
        raise TokenizerError(
            f"Tokenizer has {len(tokens)} tokens but the model's vocab_size is {n_vocab}.",
            "the tokenizer does not belong to this checkpoint; copy the matching tokenizer files",
        )
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(_gguf().TokenType.UNUSED))
    special = _special_vocab(model_dir, load_merges=False, n_vocab=n_vocab)
    _set_add_special(model_dir, special)
    return VocabPlan("llama", "default", tokens, scores, types, special)


def _gguf_vocab(kind, model_dir: Path):
    try:
        return kind(model_dir)
    except Exception as exc:  # sentencepiece / gguf-py raise many types for a corrupt model file
        raise TokenizerError(f"Cannot read the SentencePiece tokenizer in '{model_dir}': {type(exc).__name__}: {exc}.",
                             "re-copy tokenizer.model / tokenizer.json from the source checkpoint") from None


def _special_vocab(model_dir: Path, **kwargs) -> "gguf.SpecialVocab":
    try:
        return _gguf().SpecialVocab(model_dir, **kwargs)
    except Exception as exc:  # gguf-py reads tokenizer_config.json & co. without guarding their types
        raise TokenizerError(f"Cannot read the special tokens in '{model_dir}': {type(exc).__name__}: {exc}.",
                             "re-copy tokenizer.json, tokenizer_config.json and special_tokens_map.json from the checkpoint") from None


def _set_add_special(model_dir: Path, special: "gguf.SpecialVocab") -> None:
    """Record whether the HF tokenizer adds BOS/EOS, by asking it rather than guessing."""
    tok = hf_tokenizer(model_dir)
    plain = tok("medicine", add_special_tokens=False)["input_ids"]
    full = tok("medicine", add_special_tokens=True)["input_ids"]
    special.add_special_token["bos"] = bool(tok.bos_token_id is not None and full[:1] == [tok.bos_token_id] and plain[:1] != full[:1])
    special.add_special_token["eos"] = bool(tok.eos_token_id is not None and full[-1:] == [tok.eos_token_id] and plain[-1:] != full[-1:])


def write_vocab(plan: VocabPlan, writer: "gguf.GGUFWriter") -> None:
    writer.add_tokenizer_model(plan.model)
    if plan.pre:
        writer.add_tokenizer_pre(plan.pre)
    writer.add_token_list(plan.tokens)
    writer.add_token_scores(plan.scores)
    writer.add_token_types(plan.types)
    plan.special.add_to_gguf(writer, quiet=True)


def verify_tokenization(model_dir: Path, gguf_path: Path, samples=MEDICAL_SAMPLES) -> int:
    """Tokenize ``samples`` with HF and with llama.cpp; raise on the first difference. Returns tokens compared."""
    from edgemed.runtime.llamacpp import Model

    tok = hf_tokenizer(model_dir)  # `check` reaches here first: a folder without a tokenizer is refused by name
    llm = Model(gguf_path, vocab_only=True)
    compared = 0
    try:
        for text in samples:
            hf_ids = tok(text, add_special_tokens=False)["input_ids"]
            cpp_ids = llm.tokenize(text, add_special=False, parse_special=False)
            if hf_ids != cpp_ids:
                where = next((i for i, (a, b) in enumerate(zip(hf_ids, cpp_ids)) if a != b), min(len(hf_ids), len(cpp_ids)))
                raise TokenizerError(
                    f"llama.cpp tokenizes differently from the Hugging Face tokenizer at token {where} of {text[:60]!r}: "
                    f"HF {hf_ids[where:where + 5]} vs llama.cpp {cpp_ids[where:where + 5]}.",
                    f"pass --pre-tokenizer with another of: {', '.join(known_pretokenizers())}",
                )
            compared += len(hf_ids)
    finally:
        llm.close()
    return compared
