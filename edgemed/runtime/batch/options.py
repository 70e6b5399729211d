"""What a served request asks of the batcher beyond ``GenerationSettings``: OpenAI's penalties and logit bias,
log probabilities, and ``n`` choices of one prompt; the sampler chain that honours them; log-probability entries.

``Extras()`` (the default) asks for nothing more: the request samples through ``llamacpp.SamplerChain``
exactly as before. Otherwise ``ServeSampler`` builds the chain in llama.cpp's order (grammar, logit bias,
repetition penalty, presence/frequency penalties, then greedy or top-k/top-p/min-p/temperature/draw), so
llama.cpp itself applies every setting, as llama-server does.

Log probabilities are read from the same logits row the sampler reads (the model's raw logits at that
batch row, before any penalty, bias or temperature): a token's entry is its log-softmax over the vocabulary
and the ``top`` most likely tokens with theirs, as OpenAI reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgemed.runtime.engine import GenerationSettings


@dataclass(frozen=True)
class Extras:
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from the logit of any token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per earlier occurrence in the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias); -100 bans the token outright
    top_logprobs: int | None = None  # None: no log probabilities; else alternatives listed per token (0..20)
    prompt_logprobs: bool = False  # also every prompt token's (echo); such a request computes its whole prompt
    n: int = 1  # choices of the prompt: one prefill, the others copy its KV

    @property
    def plain(self) -> bool:
        """Nothing llama.cpp's ordinary chain does not do already."""
        return not (self.presence_penalty or self.frequency_penalty or self.logit_bias)


#: a bias at or below this bans the token (OpenAI: "-100 should result in a ban")
BAN = -100.0


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log probability and its most likely alternatives (bytes, as the tokenizer has them)."""

    token: bytes
    logprob: float | None  # None: the first prompt token, which nothing predicts
    top: tuple[tuple[bytes, float], ...] = ()


def sampler_for(model, settings: GenerationSettings, extras: Extras, n_ctx: int):
    """The sampler chain of one sequence (the caller holds the batcher's native lock)."""
    from edgemed.runtime.llamacpp import SamplerChain

    if extras.plain:
        return SamplerChain(model, settings)
    return ServeSampler(model, settings, extras, n_ctx)


def _serve_sampler_class():
    from edgemed.runtime.llamacpp import SamplerChain

    class _ServeSampler(SamplerChain):
        """``SamplerChain`` plus OpenAI's logit bias and presence/frequency penalties (llama.cpp's samplers)."""

        def __init__(self, model, settings: GenerationSettings, extras: Extras, n_ctx: int):
            self._extras, self._n_ctx = extras, n_ctx
            super().__init__(model, settings)

        def _shape(self, model, settings: GenerationSettings) -> bool:
            """Logit bias, then the repetition penalty, then OpenAI's presence/frequency penalties."""
            import ctypes

            lc, extras = self.lib, self._extras
            if extras.logit_bias:
                biases = (lc.llama_logit_bias * len(extras.logit_bias))()  # llama.cpp copies them
                for i, (token, bias) in enumerate(extras.logit_bias):
                    biases[i].token, biases[i].bias = token, (-float("inf") if bias <= BAN else bias)
                self._add(lc.llama_sampler_init_logit_bias(model.n_vocab, len(extras.logit_bias),
                                                           ctypes.cast(biases, ctypes.POINTER(lc.llama_logit_bias))))
            shaped = super()._shape(model, settings)
            if extras.frequency_penalty or extras.presence_penalty:
                # the whole output counts, as in OpenAI's definition: the window is the slot's context
                self._add(lc.llama_sampler_init_penalties(model.n_vocab, self._n_ctx, 1.0, extras.frequency_penalty,
                                                          extras.presence_penalty))
            return shaped or not extras.plain

    return _ServeSampler


def ServeSampler(model, settings: GenerationSettings, extras: Extras, n_ctx: int):  # noqa: N802 - a class, made lazily
    global _SERVE_SAMPLER
    if _SERVE_SAMPLER is None:
        _SERVE_SAMPLER = _serve_sampler_class()  # llamacpp imports lazily: it needs llama_cpp at import
    return _SERVE_SAMPLER(model, settings, extras, n_ctx)


_SERVE_SAMPLER = None


def log_softmax(row):
    """float64 log-softmax of one logits row (numpy)."""
    import numpy as np

    x = np.asarray(row, dtype=np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def entry(model, row, token: int, top: int) -> TokenLogprob:
    """``token``'s log probability under the logits ``row`` and the ``top`` most likely tokens'."""
    import numpy as np

    lp = log_softmax(row)
    best: tuple = ()
    if top:
        ids = np.argpartition(-lp, top)[:top] if top < lp.size else np.arange(lp.size)
        ids = ids[np.argsort(-lp[ids], kind="stable")]
        best = tuple((model.piece(int(i), True), float(lp[i])) for i in ids)
    return TokenLogprob(model.piece(token, True), float(lp[token]), best)
