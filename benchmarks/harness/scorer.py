"""Token-level access to one artifact for accuracy and divergence: next-token logits, greedy text, all-position logits.

``open_scorer(artifact, threads=.., n_ctx=.., profile=..)`` opens a GGUF file (llama-cpp-python) or an edgemed ONNX
directory (onnxruntime) through the runtime's own engines, loaded as ``edgemed run`` loads it on that device profile
(``session.prepare``: KV cache types, flash attention, GPU offload, micro-batch, the memory plan), so the chat
template, tokenizer, weights and load settings are exactly what the device runs and the timing phase timed: accuracy
and divergence are measured on the very artifact being benchmarked, keyed by that profile. ``settings()`` reads the
load back (``timing.gguf_settings``), for the raw result.

**KV prefix reuse.** Every evaluation prompt starts with the same system message, and the logit-scoring prompt
extends the generation prompt, so each backend keeps the KV cache of the last token sequence it saw. A new request
is served by keeping the longest common prefix, dropping the rest of the cache and evaluating only the new
suffix. GGUF trims with llama.cpp's ``llama_memory_seq_rm`` and decodes its own batches (llama-cpp-python's
``Llama.scores`` is not filled when ``logits_all`` is off, and ``logits_all`` would reserve n_ctx x vocab floats);
ONNX slices the cached key/value tensors to the prefix. At least the last token is always re-evaluated, since only
the logits after the newest token are kept.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgemed.formats.sniff import model_format
from edgemed.runtime.engine import GenerationSettings, LoadSettings, check_fits

log = logging.getLogger(__name__)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Scorer:
    """Prefix-cache bookkeeping shared by the backends; a backend provides ``_trim``, ``_eval``, ``_all``, ``is_eog``
    and text."""

    kind = ""
    n_ctx = 0
    n_vocab = 0
    n_ctx_train: int | None = None  # the context the model was trained on, where its file says
    ctx_source = ""  # how ``n_ctx`` was chosen (``open_scorer``'s), in a refusal's words

    def __init__(self, path: Path):
        self.path = path
        self._cached: list[int] = []      # tokens whose keys/values are in the cache
        self._last = None                 # logits after the last cached token
        #: prompt tokens evaluated (after prefix reuse), tokens taken from the cache, tokens generated
        self.counters = {"evaluated": 0, "reused": 0, "generated": 0}

    # -- backend ------------------------------------------------------------------------
    def render(self, messages: list[dict]) -> str:
        raise NotImplementedError

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``; ``special`` adds BOS where the model wants it and parses special-token markup
        (a rendered prompt); without it, plain text to append after a prompt."""
        raise NotImplementedError

    def detokenize(self, ids: list[int]) -> str:
        raise NotImplementedError

    def is_eog(self, token: int) -> bool:
        raise NotImplementedError

    def _trim(self, keep: int) -> int:
        """Drop cached positions from ``keep`` on; returns how many stay (0 when the backend cannot trim)."""
        raise NotImplementedError

    def _eval(self, tokens: list[int], n_past: int):
        """Logits [1, vocab] after the last of ``tokens``, fed after ``n_past`` cached ones (one row)."""
        raise NotImplementedError

    def _all(self, tokens: list[int]):
        """Logits [len(tokens), vocab] at every position of ``tokens``, from an empty cache (which then holds them)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def settings(self) -> dict:
        """The load as the runtime made it (threads, context, KV types, offload...), as timing records it."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------
    def context_words(self, phase: str) -> str:
        """This context as a refusal of ``phase`` names it: its size, the phase, and how it was chosen."""
        return f"the {self.n_ctx}-token context of the {phase} phase" + (f" ({self.ctx_source})" if self.ctx_source else "")

    def wider_context(self, need: int) -> str | None:
        """A fix for ``need`` positions: a --ctx that holds them, bounded by the trained context where known (a larger
        one is refused before any work); None where the model was trained on fewer, so that no --ctx can
        (``session.prepare`` refuses a context beyond the trained one)."""
        if self.n_ctx_train and need > self.n_ctx_train:
            return None
        upto = f" (up to {self.n_ctx_train}, the context the model was trained on)" if self.n_ctx_train else " or more"
        return f"pass --ctx {need}{upto}"

    def _fits(self, n_tokens: int, max_tokens: int = 1) -> None:
        check_fits(n_tokens, GenerationSettings(max_tokens=max_tokens), self.n_ctx)

    def next_logits(self, tokens: list[int]):
        """Float32 logits [vocab] after the last of ``tokens``, reusing the cached common prefix."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("next_logits needs at least one token")
        keep = common_prefix(self._cached, tokens)
        if keep == len(tokens) == len(self._cached) and self._last is not None:
            return self._last.copy()
        self._fits(len(tokens))
        keep = min(keep, len(tokens) - 1)
        if keep < len(self._cached):
            keep = self._trim(keep)
        rows = self._run(self._eval, tokens[keep:], keep)
        self.counters["evaluated"] += len(tokens) - keep
        self.counters["reused"] += keep
        self._cached, self._last = tokens, rows[-1]
        return self._last.copy()

    def _run(self, step, *args):
        try:
            return step(*args)
        except BaseException:  # the cache may hold part of the batch: forget it all (Ctrl-C included)
            self._cached, self._last = [], None
            self._trim(0)
            raise

    def logits_all(self, tokens: list[int]):
        """Float32 logits [len(tokens), vocab] at every position, evaluated from an empty cache."""
        tokens = [int(t) for t in tokens]
        self._fits(len(tokens))
        rows = self._run(self._all, tokens)
        self.counters["evaluated"] += len(tokens)
        self._cached, self._last = tokens, rows[-1].copy()
        return rows

    def greedy(self, tokens: list[int], max_tokens: int, stop: tuple[str, ...] = (), until=None) -> tuple[str, bool]:
        """Greedy (argmax) continuation of ``tokens`` and whether it was cut at ``max_tokens`` (what a finish reason
        ``length`` says: its end is missing): at most ``max_tokens``, ending at an end-of-generation token, before
        the first ``stop`` string, or as soon as ``until(text so far)`` is true (then not cut, whatever its length)."""
        import numpy as np

        tokens = [int(t) for t in tokens]
        self._fits(len(tokens), max_tokens)
        out: list[int] = []
        logits = self.next_logits(tokens)
        while True:
            token = int(np.argmax(logits))
            if self.is_eog(token):
                break
            out.append(token)
            self.counters["generated"] += 1
            if stop:
                text = self.detokenize(out)
                cuts = [text.find(s) for s in stop if s in text]
                if cuts:
                    return text[:min(cuts)], False
            if until is not None and until(self.detokenize(out)):
                break
            if len(out) >= max_tokens:
                return self.detokenize(out), True
            logits = self.next_logits(tokens + out)
        return self.detokenize(out), False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class GgufScorer(Scorer):
    """A GGUF through the runtime's ``LlamaEngine``; batches decoded on its public llama.cpp-layer context."""

    kind = "gguf"

    def __init__(self, path: Path, load: LoadSettings):
        super().__init__(path)
        from edgemed.runtime.llama_engine import LlamaEngine

        self.engine = LlamaEngine(path, load)
        self.n_ctx, self.n_vocab, self.n_batch = self.engine.ctx.n_ctx, self.engine.model.n_vocab, self.engine.ctx.n_batch
        self.n_ctx_train = self.engine.model.n_ctx_train or None

    def settings(self) -> dict:
        from edgemed.benchmarks.harness.timing import gguf_settings

        return gguf_settings(self.engine)

    def render(self, messages: list[dict]) -> str:
        return self.engine.render_chat(messages)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self.engine.tokenize(text, add_special=special, parse_special=special)

    def detokenize(self, ids: list[int]) -> str:
        return self.engine.detokenize(ids)

    def is_eog(self, token: int) -> bool:
        return self.engine.model.is_eog(token)

    def _trim(self, keep: int) -> int:
        return self.engine.ctx.keep(keep)

    def _eval(self, tokens: list[int], n_past: int):
        return self.engine.ctx.eval(tokens, n_past)

    def _all(self, tokens: list[int]):
        from edgemed.runtime.logits import rows

        return rows(self.engine.ctx, tokens)  # the one whole-sequence logits path (runtime/logits.py)

    def close(self) -> None:
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.close()


class OnnxScorer(Scorer):
    """An edgemed ONNX directory through the runtime's ``OnnxEngine.forward``; the cache is its ORT values."""

    kind = "onnx"

    def __init__(self, path: Path, load: LoadSettings):
        super().__init__(path)
        from edgemed.runtime.onnx_engine import OnnxEngine

        self.load = load
        self.engine = OnnxEngine(path, load)
        self.n_ctx, self.n_ctx_train = self.engine.n_ctx, self.engine.n_ctx_train
        self.n_vocab = self.engine.tokenizer.get_vocab_size()
        self._past = self.engine.empty_past()

    def settings(self) -> dict:
        from edgemed.benchmarks.harness.timing import onnx_settings

        return onnx_settings(self.engine, self.load)

    def render(self, messages: list[dict]) -> str:
        return self.engine.render_chat(messages)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self.engine.tokenize(text, add_special=special)

    def detokenize(self, ids: list[int]) -> str:
        return self.engine.detokenize(ids)

    def is_eog(self, token: int) -> bool:
        return token in self.engine.eos_ids

    def _trim(self, keep: int) -> int:
        import numpy as np

        if keep == 0:
            self._past = self.engine.empty_past()
            return 0
        ort = self.engine.ort
        # [1, kv_heads, past, head_dim] -> the first `keep` positions
        self._past = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value.numpy()[:, :, :keep]))
                      for name, value in self._past.items()}
        return keep

    def _forward(self, tokens: list[int], n_past: int):
        import numpy as np

        logits, self._past = self.engine.forward(tokens, self._past, n_past)
        return np.asarray(logits, dtype=np.float32)

    def _eval(self, tokens: list[int], n_past: int):
        return self._forward(tokens, n_past)[-1:]

    def _all(self, tokens: list[int]):
        self._trim(0)
        return self._forward(tokens, 0)

    def close(self) -> None:
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.close()


# On-disk form (edgemed.formats.sniff.model_format) -> scorer class
SCORERS = {"gguf": GgufScorer, "onnx": OnnxScorer}


def open_scorer(artifact: Path, *, threads: int, n_ctx: int = 2048, profile: str | None = None,
                ctx_source: str = "") -> Scorer:
    """A scorer over ``artifact`` (a .gguf file or an edgemed ONNX directory) with ``threads`` threads and an
    ``n_ctx``-token context, loaded with the settings of device ``profile`` (None: the one this host detects), as
    ``edgemed run`` and the timing phase load it (``session.prepare``). ``ctx_source``: how ``n_ctx`` was chosen
    (``configs.Settings.context_of``), for the words of a refusal of an item or passage it cannot hold."""
    from edgemed.runtime.session import prepare

    artifact = Path(artifact)
    scorer = SCORERS[model_format(artifact)](artifact, prepare(artifact, profile, n_ctx, threads).load)
    scorer.ctx_source = ctx_source
    return scorer
