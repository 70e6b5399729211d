"""The GGUF header fields the runtime reads, held to the source they came from.

Parity feeds both sides the source's own token ids, so the fields llama.cpp reads only when a user chats never
reach it: the chat template the runtime renders, whether it adds BOS, the text of each special token (how a
rendered chat becomes ids), the end-of-generation ids it stops at, and the trained context and rope fields that
place every position. A file whose template was edited, whose ``<|im_end|>`` is an ordinary token or whose EOS id
is another passes parity and still chats wrongly. ``verify_runtime_fields`` compares each of them with
config.json and the Hugging Face tokenizer, as llama.cpp reads the file, and refuses a mismatch by name: the
field, the source's value and the file's.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from edgemed.errors import ParityError

FIX = ("convert the checkpoint again (`edgemed convert SOURCE`); a file that was edited after conversion, or made "
       "from other tokenizer files or another config.json, is not this source's conversion")


def _refuse(gguf_path: Path, field: str, source, found) -> ParityError:
    return ParityError(f"'{Path(gguf_path).name}' does not carry its source's {field}: source {source}, GGUF {found}. "
                       "The runtime reads this field from the file, so the file would not chat or compute as its source "
                       "does.", FIX)


def _template_of(tok) -> str | None:
    """The default chat template of the HF tokenizer (a tokenizer with named templates: its "default")."""
    template = getattr(tok, "chat_template", None)
    return template.get("default") if isinstance(template, dict) else template


def _digest(text: str | None) -> str:
    return "none" if text is None else f"sha256 {hashlib.sha256(text.encode('utf-8')).hexdigest()[:12]}, {len(text)} characters"


def _header_fields(ckpt, gguf_path: Path, meta: dict) -> dict:
    """Trained context and rope fields: config.json vs the header (as llama.cpp reads them, defaults included)."""
    from edgemed.converters.arch.base import original_context, rope_config

    arch = meta.get("general.architecture")
    theta, scaling = rope_config(ckpt)
    rope_type = scaling.get("rope_type", "default") if scaling else "default"
    want = {f"{arch}.context_length": int(ckpt.hparam("max_position_embeddings")),
            f"{arch}.rope.freq_base": theta,
            # "linear" and "yarn" are header fields; "llama3" is the rope_freqs tensor, which parity computes through
            f"{arch}.rope.scaling.type": rope_type if rope_type in ("linear", "yarn") else "none"}
    if rope_type in ("linear", "yarn"):
        want[f"{arch}.rope.scaling.factor"] = float(scaling["factor"])
    if rope_type == "yarn":
        want[f"{arch}.rope.scaling.original_context_length"] = original_context(ckpt, scaling)
    defaults = {f"{arch}.rope.freq_base": 10000.0, f"{arch}.rope.scaling.type": "none"}  # llama.cpp's when absent
    for key, source in want.items():
        found = meta.get(key, defaults.get(key))
        same = (isinstance(found, (int, float)) and not isinstance(found, bool)
                and math.isclose(float(found), float(source), rel_tol=1e-6)) if isinstance(source, float) else found == source
        if not same:
            raise _refuse(gguf_path, key, source, found)
    return want


def verify_runtime_fields(ckpt, gguf_path: Path) -> dict:
    """Refuse ``gguf_path`` where a field the runtime reads differs from its source ``ckpt`` (a ``Checkpoint``);
    return what was compared (for the conversion report)."""
    from edgemed.converters.quality.prompts import CHAT, chat_text
    from edgemed.converters.source.checkpoint import hf_tokenizer
    from edgemed.formats.gguf_header import read_header
    from edgemed.runtime.llamacpp import Model

    meta = read_header(gguf_path).metadata
    checked = _header_fields(ckpt, gguf_path, meta)
    tok = hf_tokenizer(ckpt.path)
    source_template, template = _template_of(tok), meta.get("tokenizer.chat_template")
    if source_template != template:
        where = next((i for i, (a, b) in enumerate(zip(source_template or "", template or "")) if a != b),
                     min(len(source_template or ""), len(template or "")))
        raise _refuse(gguf_path, f"chat template (tokenizer.chat_template; they differ from character {where})",
                      _digest(source_template), _digest(template))
    checked["tokenizer.chat_template"] = _digest(template)
    llm = Model(gguf_path, vocab_only=True)
    try:
        for name, source, found in (("bos", tok.bos_token_id, llm.bos()), ("eos", tok.eos_token_id, llm.eos())):
            if source is not None and source != found:
                raise _refuse(gguf_path, f"{name.upper()} id (tokenizer.ggml.{name}_token_id)", source, found)
            checked[f"tokenizer.ggml.{name}_token_id"] = found
        for token, added in sorted(tok.added_tokens_decoder.items()):  # the special tokens' texts at their ids
            if added.special and token < llm.n_vocab and llm.special_text(token) != added.content:
                raise _refuse(gguf_path, f"text of special token {token} (tokenizer.ggml.tokens)", repr(added.content),
                              repr(llm.special_text(token)))
        word = "medicine"  # whether BOS/EOS are added to a prompt, as the runtime tokenizes one
        source_ids, ids = tok(word, add_special_tokens=True)["input_ids"], llm.tokenize(word, add_special=True)
        plain = tok(word, add_special_tokens=False)["input_ids"]
        for name, source, found in (("add_bos_token", source_ids[:1] != plain[:1], ids[:1] != plain[:1]),
                                    ("add_eos_token", source_ids[-1:] != plain[-1:], ids[-1:] != plain[-1:])):
            if source != found:
                raise _refuse(gguf_path, f"rule for adding {name[4:7].upper()} to a prompt (tokenizer.ggml.{name})",
                              str(source).lower(), str(found).lower())
        text = chat_text(tok)
        if text is not None:
            _chat_tokens(gguf_path, tok, llm, text, CHAT[-1]["content"])
            checked["chat_tokens"] = len(tok(text, add_special_tokens=False)["input_ids"])
    finally:
        llm.close()
    return checked


def _chat_tokens(gguf_path: Path, tok, llm, text: str, answer: str) -> None:
    """The rendered chat must become the source's ids in llama.cpp with special tokens parsed (as the runtime
    tokenizes a chat), and the token the template ends the answer with must stop generation there."""
    source_ids = tok(text, add_special_tokens=False)["input_ids"]
    ids = llm.tokenize(text, add_special=False, parse_special=True)
    if ids != source_ids:
        at = next((i for i, (a, b) in enumerate(zip(source_ids, ids)) if a != b), min(len(ids), len(source_ids)))
        raise _refuse(gguf_path, f"token ids for a chat its template renders (from token {at}; tokenizer.ggml.tokens "
                                 "and token types)", source_ids[at:at + 4], ids[at:at + 4])
    end = text.rfind(answer) + len(answer)
    special = set(tok.all_special_ids)
    after = tok(text[end:], add_special_tokens=False)["input_ids"]
    stop = next((t for t in after if t in special), None)
    if stop is not None and not llm.is_eog(stop):
        raise _refuse(gguf_path, f"end of an answer (the template ends it with token {stop} "
                                 f"{tok.convert_ids_to_tokens(stop)!r}; tokenizer.ggml.eos_token_id / eot_token_id)",
                      "it ends generation", "generation goes on past it")
