"""Thin owners of llama.cpp resources for the batcher: model, context, batch, sampler chain.

Each class holds one native object, frees it in ``close()`` (idempotent) and
does nothing clever: the scheduling lives in ``batcher.py``. Everything here is
called from the batcher's one scheduler thread, except ``Model.tokenize``,
``Model.piece`` and ``SamplerChain`` construction, which read only the
(immutable) vocabulary and are safe from request threads.

Layering: ``llama_cpp`` raw bindings -> these wrappers -> ``Batcher``.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

from edgemed import env
from edgemed.errors import InputError, ModelLoadError, require
from edgemed.runtime.engine import GenerationSettings, LoadSettings

log = logging.getLogger(__name__)

#: KV cache types llama.cpp's attention reads without flash attention (a quantized V cache needs it).
FULL_PRECISION_KV = frozenset({"f32", "f16", "bf16"})
#: Tokens the repetition penalty looks back over (as runtime/sampling.py and llama.cpp's default).
PENALTY_LAST_N = 64


def _llama():
    llama_cpp = require("llama_cpp", "gguf")
    from llama_cpp import _logger

    # llama.cpp logs through llama-cpp-python's callback; keep it quiet unless edgemed runs at DEBUG.
    _logger.set_verbose(logging.getLogger("edgemed").isEnabledFor(logging.DEBUG))
    return llama_cpp


class Model:
    """A loaded GGUF model and its vocabulary."""

    def __init__(self, path: Path, load: LoadSettings):
        env.enforce_offline()
        lib = self.lib = _llama()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = load.n_gpu_layers
        params.use_mmap = load.use_mmap
        params.use_mlock = load.use_mlock
        self.path = path
        self.ptr = lib.llama_model_load_from_file(str(path).encode("utf-8"), params)
        if not self.ptr:
            raise ModelLoadError(
                f"llama.cpp could not load '{path}'.",
                "check that the file is a complete GGUF (compare its sha256 with the source), and that the build supports its quant type",
            )
        self.vocab = lib.llama_model_get_vocab(self.ptr)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lib.llama_model_n_ctx_train(self.ptr)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        raw = text.encode("utf-8")
        n = len(raw) + 8
        while True:
            buf = (self.lib.llama_token * n)()
            got = self.lib.llama_tokenize(self.vocab, raw, len(raw), buf, n, add_special, parse_special)
            if got >= 0:
                return list(buf[:got])
            n = -got

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (maybe part of a UTF-8 character)."""
        buf = ctypes.create_string_buffer(64)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def special_text(self, token: int) -> str:
        return self.piece(token, special=True).decode("utf-8", "replace") if token >= 0 else ""

    def bos(self) -> int:
        return self.lib.llama_vocab_bos(self.vocab)

    def eos(self) -> int:
        return self.lib.llama_vocab_eos(self.vocab)

    def meta(self, key: str) -> str | None:
        size = 1 << 12
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self.lib.llama_model_meta_val_str(self.ptr, key.encode("utf-8"), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", "replace")
            size = n + 1

    def close(self) -> None:
        ptr, self.ptr = getattr(self, "ptr", None), None
        if ptr:
            self.lib.llama_model_free(ptr)


class Context:
    """One llama_context holding ``slots`` sequences, each with its own KV stream of ``n_ctx_per_slot`` cells."""

    def __init__(self, model: Model, load: LoadSettings, slots: int, n_ctx_per_slot: int, threads: int):
        from edgemed.runtime.llama_engine import KV_TYPES

        lib = self.lib = model.lib
        if load.type_v not in FULL_PRECISION_KV and not load.flash_attn:
            raise ModelLoadError(f"A {load.type_v} V cache needs flash attention, which these settings turn off.",
                                 "set flash_attn = true in the device profile, or keep type_v at f16")
        p = lib.llama_context_default_params()
        p.n_seq_max = slots
        p.kv_unified = False  # one KV stream per sequence: a slot can never use another slot's cells
        p.n_ctx = slots * n_ctx_per_slot
        p.n_batch = load.n_batch
        p.n_ubatch = min(load.n_ubatch, load.n_batch)
        p.n_threads = threads
        p.n_threads_batch = load.n_threads_batch or threads
        p.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if load.flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.type_k = getattr(lib, KV_TYPES[load.type_k])
        p.type_v = getattr(lib, KV_TYPES[load.type_v])
        p.no_perf = True
        self.ptr = lib.llama_init_from_model(model.ptr, p)
        if not self.ptr:
            raise ModelLoadError(
                f"llama.cpp could not create a context of {slots} x {n_ctx_per_slot} tokens for '{model.path}'.",
                "use fewer --slots or a smaller --ctx, or a KV cache type the build supports",
            )
        self.memory = lib.llama_get_memory(self.ptr)
        self.n_batch = lib.llama_n_batch(self.ptr)
        self.n_ctx_seq = lib.llama_n_ctx_seq(self.ptr)

    def decode(self, batch: "Batch") -> int:
        return self.lib.llama_decode(self.ptr, batch.raw)

    def drop(self, seq: int) -> None:
        """Forget every cell of sequence ``seq`` (its slot is free again)."""
        self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def close(self) -> None:
        ptr, self.ptr = getattr(self, "ptr", None), None
        if ptr:
            self.lib.llama_free(ptr)


class Batch:
    """A llama_batch of up to ``capacity`` tokens, each in exactly one sequence."""

    def __init__(self, lib, capacity: int):
        self.lib = lib
        self.capacity = capacity
        self.raw = lib.llama_batch_init(capacity, 0, 1)
        self.n = 0
        self.raw.n_tokens = 0

    def clear(self) -> None:
        self.n = self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append one token; returns its index in the batch (the index its logits are read from)."""
        i = self.n
        b = self.raw
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits
        self.n = b.n_tokens = i + 1
        return i

    def close(self) -> None:
        raw, self.raw = getattr(self, "raw", None), None
        if raw is not None:
            self.lib.llama_batch_free(raw)


def grammar_text(settings: GenerationSettings) -> str | None:
    """The GBNF a request is constrained by: its grammar, or its JSON schema converted by llama-cpp-python."""
    if settings.grammar:
        return settings.grammar
    if settings.json_schema:
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        try:
            return json_schema_to_gbnf(settings.json_schema)
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"The JSON schema cannot be turned into a grammar: {exc}.",
                             "send a valid JSON schema (object types, properties, enums)") from None
    return None


class SamplerChain:
    """One request's sampler: grammar, repetition penalty, then greedy or top-k/top-p/min-p/temperature/seeded draw.

    The order is llama.cpp's (and runtime/sampling.py's), so a request sampled here
    behaves as it does in ``edgemed run``.
    """

    def __init__(self, model: Model, settings: GenerationSettings):
        lib = self.lib = model.lib
        self.ptr = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        try:
            gbnf = grammar_text(settings)
            if gbnf is not None:
                grammar = lib.llama_sampler_init_grammar(model.vocab, gbnf.encode("utf-8"), b"root")
                if not grammar:
                    raise InputError("The grammar does not parse (llama.cpp rejected it).",
                                     "check the GBNF syntax; the start rule must be called 'root'")
                self._add(grammar)
            if settings.repeat_penalty != 1.0:
                self._add(lib.llama_sampler_init_penalties(model.n_vocab, PENALTY_LAST_N, settings.repeat_penalty, 0.0, 0.0))
            if settings.temperature == 0:
                self._add(lib.llama_sampler_init_greedy())
                return
            if settings.top_k > 0:
                self._add(lib.llama_sampler_init_top_k(settings.top_k))
            if settings.top_p < 1.0:
                self._add(lib.llama_sampler_init_top_p(settings.top_p, 1))
            if settings.min_p > 0:
                self._add(lib.llama_sampler_init_min_p(settings.min_p, 1))
            self._add(lib.llama_sampler_init_temp(settings.temperature))
            self._add(lib.llama_sampler_init_dist(settings.seed & 0xFFFFFFFF))
        except BaseException:
            self.close()
            raise

    def _add(self, sampler) -> None:
        self.lib.llama_sampler_chain_add(self.ptr, sampler)  # the chain owns it from here

    def sample(self, ctx: Context, index: int) -> int:
        """Pick the next token from the logits at batch ``index`` (and let the chain accept it)."""
        return self.lib.llama_sampler_sample(self.ptr, ctx.ptr, index)

    def close(self) -> None:
        ptr, self.ptr = getattr(self, "ptr", None), None
        if ptr:
            self.lib.llama_sampler_free(ptr)
