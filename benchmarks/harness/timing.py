"""Timing one configuration: load, warm-up, then N timed single-stream requests of a fixed token count.

Every runtime is opened as a small object with ``prompt_ids(text)``,
``generate(ids, n) -> (t_start, token_times, tokens)``, ``weights()`` and
``close()``, its ``n_ctx`` and ``n_ctx_train`` (the context the model was trained on, None where
unknown); ``measure`` runs the same loop over any of them. Greedy decoding,
with end-of-generation tokens masked out of the argmax, so every configuration
generates exactly ``max_tokens`` tokens (a count-based stop: the work is the
same whatever the model would have said). The timed loop is the runtime's own
step API (llama.cpp ``eval``, the ONNX engine's ``decode_steps``, torch forward
with its KV cache), with a timestamp taken as each token's id is known. Each object's ``n_ctx`` is the context the report states:
``measure`` refuses, before the first run, a prompt whose tokens and ``max_tokens`` do not fit it, as ``edgemed run``
refuses such a request (llama.cpp pads its cells past the asked size and would time positions beyond it), with a
fix that stays within the trained context (a --ctx past it is refused before any work).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from edgemed.benchmarks.harness import stats
from edgemed.benchmarks.harness.roofline import WeightFacts

log = logging.getLogger(__name__)


def masked_argmax(np, logits, banned):
    """Index of the largest logit, never one of ``banned`` (end-of-generation ids)."""
    if banned is not None and len(banned):
        logits = logits.copy()
        logits[banned] = -np.inf
    return int(np.argmax(logits))


class GgufTimed:
    """llama.cpp through edgemed's llama.cpp layer, with the device profile's load settings."""

    def __init__(self, path: Path, threads: int | None, n_ctx: int, profile: str | None, seed: int,
                 use_mmap: bool | None = None):
        from dataclasses import replace

        import numpy as np

        from edgemed.runtime.llama_engine import LlamaEngine
        from edgemed.runtime.session import prepare

        self.np, self.path = np, path
        self.load = prepare(path, profile, n_ctx, threads, seed=seed).load
        if use_mmap is not None:  # a -mmap configuration overrides the profile's load mode
            self.load = replace(self.load, use_mmap=use_mmap)
        t = time.perf_counter()
        self.engine = LlamaEngine(path, self.load)
        self.load_s = time.perf_counter() - t
        self.load = self.engine.load
        self.ctx = self.engine.ctx
        self.n_ctx = self.ctx.n_ctx  # the asked size, not llama.cpp's padded one
        self.n_ctx_train = self.engine.model.n_ctx_train or None  # the GGUF's context_length
        self.banned = np.array(self.engine.model.eog_ids(), dtype=np.int64)

    def prompt_ids(self, text: str) -> list[int]:
        rendered = self.engine.render_chat([{"role": "user", "content": text}])
        return self.engine.tokenize(rendered, add_special=True, parse_special=True)

    def generate(self, ids: list[int], n: int):
        ctx, stamps, out = self.ctx, [], []
        ctx.clear()  # a fresh request: no prefix reuse between runs
        t0 = time.perf_counter()
        logits = ctx.eval(ids)[-1]
        for i in range(n):
            token = masked_argmax(self.np, logits, self.banned)
            stamps.append(time.perf_counter())
            out.append(token)
            if i < n - 1:
                logits = ctx.eval([token], len(ids) + i)[-1]
        return t0, stamps, out

    def weights(self) -> WeightFacts:
        from edgemed.benchmarks.harness.roofline import gguf_facts

        return gguf_facts(self.path)

    def settings(self) -> dict:
        return gguf_settings(self.engine)

    def close(self) -> None:
        self.engine.close()


class OnnxTimed:
    """An edgemed ONNX directory under the edgemed ONNX engine (onnxruntime)."""

    def __init__(self, path: Path, threads: int | None, n_ctx: int, profile: str | None, seed: int):
        import numpy as np

        from edgemed.runtime.onnx_engine import OnnxEngine
        from edgemed.runtime.session import prepare

        self.np, self.path = np, path
        self.load = prepare(path, profile, n_ctx, threads, seed=seed).load
        t = time.perf_counter()
        self.engine = OnnxEngine(path, self.load)
        self.load_s = time.perf_counter() - t
        self.n_ctx, self.n_ctx_train = self.engine.n_ctx, self.engine.n_ctx_train
        self.banned = np.array(sorted(self.engine.eos_ids), dtype=np.int64)

    def prompt_ids(self, text: str) -> list[int]:
        return self.engine.tokenize(self.engine.render_chat([{"role": "user", "content": text}]))

    def generate(self, ids: list[int], n: int):
        stamps, out = [], []
        t0 = time.perf_counter()
        steps = self.engine.decode_steps(ids)
        logits = next(steps)
        for i in range(n):
            token = masked_argmax(self.np, logits, self.banned)
            stamps.append(time.perf_counter())
            out.append(token)
            if i < n - 1:
                logits = steps.send(token)
        steps.close()
        return t0, stamps, out

    def weights(self) -> WeightFacts:
        from edgemed.benchmarks.harness.roofline import onnx_facts

        return onnx_facts(self.path)

    def settings(self) -> dict:
        return onnx_settings(self.engine, self.load)

    def close(self) -> None:
        self.engine.close()


def gguf_settings(engine) -> dict:
    """A ``LlamaEngine``'s load as it was made (the self-test may have chosen safer buffers; llama.cpp read back):
    what a timing or a scoring raw result records as ``runtime_settings``."""
    s = engine.load
    return {"n_threads": s.n_threads, "n_threads_batch": s.n_threads_batch, "n_batch": s.n_batch, "n_ctx": s.n_ctx,
            "n_ubatch": engine.ctx.n_ubatch,  # read back from llama.cpp's context
            "extra_buffers": engine.model.placement.mode, "flash_attn": s.flash_attn, "type_k": s.type_k,
            "type_v": s.type_v, "n_gpu_layers": s.n_gpu_layers, "use_mmap": s.use_mmap,
            "load_mode": engine.model.params.written.get("load_mode")}


def onnx_settings(engine, load) -> dict:
    """An ``OnnxEngine``'s threads, the providers onnxruntime took and its context."""
    return {"n_threads": load.n_threads, "providers": engine.providers, "n_ctx": engine.n_ctx}


def open_gguf(path: Path, threads, n_ctx, profile, seed, dtype="", use_mmap=None):
    return GgufTimed(path, threads, n_ctx, profile, seed, use_mmap)


def open_onnx(path: Path, threads, n_ctx, profile, seed, dtype=""):
    return OnnxTimed(path, threads, n_ctx, profile, seed)


# -- the measurement ------------------------------------------------------------------------
def one_run(timed, ids: list[int], n: int) -> dict:
    """One request: TTFT, TPOT, end-to-end, prefill and decode rates."""
    t0, stamps, tokens = timed.generate(ids, n)
    ttft = stamps[0] - t0
    decode_s = stamps[-1] - stamps[0]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"prompt_tokens": len(ids), "new_tokens": len(tokens), "ttft_s": ttft, "e2e_s": stamps[-1] - t0,
            "tpot_s": decode_s / (len(tokens) - 1), "tpot_max_s": max(gaps), "prefill_tok_s": len(ids) / ttft,
            "decode_tok_s": (len(tokens) - 1) / decode_s, "tokens": tokens[:16]}


def check_prompts_fit(ids: list[list[int]], max_tokens: int, n_ctx: int, n_ctx_train: int | None = None) -> None:
    """Refuse (``engine.check_fits``'s ContextOverflow) when a prompt and its ``max_tokens`` new tokens overrun the
    ``n_ctx``-token context; the prompt is named by its place in the list, never by its text. The fix names a --ctx
    only up to ``n_ctx_train`` (the model's trained context, where known): a larger one is refused before any work."""
    from edgemed.errors import ContextOverflow
    from edgemed.runtime.engine import GenerationSettings, check_fits

    longest = max(len(prompt) for prompt in ids)
    need = longest + max_tokens  # what the longest needs: a --ctx that fits them all
    if n_ctx_train and need > n_ctx_train:  # no --ctx holds them
        fix = (f"the model was trained on {n_ctx_train} tokens, fewer than the {need} the longest prompt ({longest} "
               "tokens) and --max-tokens need: lower --max-tokens, or give shorter --prompts")
    else:
        upto = f" (up to {n_ctx_train}, the context the model was trained on)" if n_ctx_train else " or more"
        fix = f"pass --ctx {need}{upto}, lower --max-tokens, or give shorter --prompts"
    for i, prompt in enumerate(ids, 1):
        try:
            check_fits(len(prompt), GenerationSettings(max_tokens=max_tokens), n_ctx)
        except ContextOverflow as exc:
            raise ContextOverflow(f"Timing prompt {i} of {len(ids)}: {exc.problem}", fix) from None


METRICS = ("ttft_s", "tpot_s", "e2e_s", "prefill_tok_s", "decode_tok_s")


def measure(timed, prompts: tuple[str, ...], runs: int, warmup: int, max_tokens: int, progress: bool = True,
            token_ids: bool = True) -> dict:
    """Warm-up runs (recorded, excluded from statistics), then ``runs`` timed runs cycling through ``prompts``.

    Each run records the ids of its first 16 generated tokens (``tokens``) only with ``token_ids``: the answer to a
    user's prompt is decodable from them, so for those it records their sha256 (``tokens_sha256``), which still
    tells whether two configurations said the same."""
    from tqdm import tqdm

    ids = [timed.prompt_ids(p) for p in prompts]
    check_prompts_fit(ids, max_tokens, timed.n_ctx, timed.n_ctx_train)
    warm = [one_run(timed, ids[i % len(ids)], max_tokens) for i in range(warmup)]
    timed_runs = []
    for i in tqdm(range(runs), desc="timed runs", unit="run", disable=not progress, leave=False):
        timed_runs.append(one_run(timed, ids[i % len(ids)], max_tokens))
    if not token_ids:
        import hashlib

        for r in warm + timed_runs:
            r["tokens_sha256"] = hashlib.sha256(json.dumps(r.pop("tokens")).encode()).hexdigest()
    summary = {m: stats.summary([r[m] for r in timed_runs]) for m in METRICS}
    return {"prompt_tokens": [len(x) for x in ids], "warmup_runs": warm, "runs": timed_runs, "summary": summary}
