"""How close a converted or quantized model's next-token distributions are to its reference: one definition.

Used by the conversion parity gate (GGUF and ONNX, ``edgemed.converters.quality.parity``), the bench divergence phase
(``edgemed.benchmarks.harness.divergence``) and the llama-perplexity anchor (``benchmarks/kld_anchor.py``).

A passage of n tokens gives n logit rows; row i is the prediction of token i + 1 from tokens 0..i. Per row we have
KL(reference || artifact) in nats and whether the two argmaxes agree. From those rows:

- **headline** (``kld_mean``, ``kld_p99``, ``kld_max``, ``top1``, ``n_tokens``): every row except the first
  ``CONTEXT_FREE`` of each passage. Row 0 predicts from one token alone, almost without context, and Qwen-family
  models put very large activations on the first token: measured on Qwen2.5-1.5B Q4_K_M vs F16 over six medical
  passages, row 0 carried 4.5-6.6 nats in every passage, the mean KL was 0.068 with it and 0.0047 without it.
  One near-context-free row per passage then decides the mean; the headline says how the model does with context.
- **first**: the left-out rows, reported on their own so nothing is hidden.
- **llamacpp**: the figure llama.cpp's ``llama-perplexity --kl-divergence`` reports. It scores, for each window of
  n tokens, rows ``n // 2 .. n - 2`` (the second half of the window; the last row's next token lies outside it) and
  averages over all scored rows of all windows. Given for passages of at least ``LLAMACPP_MIN_TOKENS`` tokens;
  ``None`` when no passage is that long.
- **all**: every row (the figure before this definition).

``VERSION`` goes into the keys of stored results computed with these rules, so a change re-measures them.
"""

from __future__ import annotations

VERSION = 2  # 1: the mean over every row (before the headline rule)
CONTEXT_FREE = 1  # leading rows of each passage left out of the headline
LLAMACPP_MIN_TOKENS = 3  # a passage gives llama.cpp-compatible rows only from this length (n // 2 <= n - 2)
RULE = (f"headline: every position except the first {CONTEXT_FREE} of each passage (a prediction from one token "
        "has almost no context); first: those positions alone; llamacpp: positions n//2 .. n-2 of each n-token "
        "passage, as llama-perplexity --kl-divergence scores a window; all: every position")


def headline_rows(n: int) -> slice:
    return slice(min(CONTEXT_FREE, n), n)


def first_rows(n: int) -> slice:
    return slice(0, min(CONTEXT_FREE, n))


def llamacpp_rows(n: int) -> slice:
    """The rows llama-perplexity scores in an n-token window: first = n // 2 up to n - 2 (n - 1 - first rows)."""
    return slice(n // 2, n - 1) if n >= LLAMACPP_MIN_TOKENS else slice(0, 0)


def log_softmax(logits):
    """float64 log-probabilities of a [rows, vocab] logit array."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite logits give NaN rows: the callers' finite check says so
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_rows(reference_logits, artifact_logits):
    """Full-vocabulary KL(reference || artifact) per row (nats, float64) and whether the argmaxes agree."""
    import numpy as np

    a, b = np.asarray(reference_logits), np.asarray(artifact_logits)
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: reference {a.shape}, artifact {b.shape}")
    la, lb = log_softmax(a), log_softmax(b)
    with np.errstate(invalid="ignore", over="ignore"):
        kl = (np.exp(la) * (la - lb)).sum(axis=1)
    return np.maximum(kl, 0.0), a.argmax(axis=1) == b.argmax(axis=1)


def _figures(kl, agree, *, tails: bool) -> dict:
    import numpy as np

    if kl.size == 0:
        return {"kld_mean": None, "top1": None, "n_tokens": 0} | ({"kld_p99": None, "kld_max": None} if tails else {})
    out = {"kld_mean": float(max(kl.mean(), 0.0)), "top1": float(agree.mean()), "n_tokens": int(kl.size)}
    if tails:
        out |= {"kld_p99": float(max(np.percentile(kl, 99), 0.0)), "kld_max": float(kl.max())}
    return out


def summarize(passages) -> dict:
    """The figures of this module from ``[(kl_per_row, agree_per_row), ...]``, one pair per passage."""
    import numpy as np

    passages = [(np.asarray(kl, dtype=np.float64), np.asarray(agree, dtype=bool)) for kl, agree in passages]

    def pick(rows):
        picked = [(kl[rows(len(kl))], agree[rows(len(kl))]) for kl, agree in passages]
        return (np.concatenate([k for k, _ in picked]) if picked else np.zeros(0),
                np.concatenate([a for _, a in picked]) if picked else np.zeros(0, dtype=bool))

    head = _figures(*pick(headline_rows), tails=True)
    if head["n_tokens"] == 0:  # passages of one token each: nothing has context; fall back to every row, said so
        head = _figures(*pick(lambda n: slice(0, n)), tails=True) | {"fallback": "every position (no passage has a second)"}
    llama = _figures(*pick(llamacpp_rows), tails=True)
    return head | {
        "first": _figures(*pick(first_rows), tails=False),
        "llamacpp": llama if llama["n_tokens"] else None,
        "all": _figures(*pick(lambda n: slice(0, n)), tails=False),
        "rule": RULE, "version": VERSION,
    }


def headline_se(passages) -> float | None:
    """Standard error of the headline ``kld_mean`` with each passage as one sample (cluster-robust, ratio estimator).

    Rows of one passage are not independent draws (a hard sentence raises its neighbours' KL too), so the spread
    is taken between passages: se² = P / (P - 1) · Σ (k_i - m · n_i)² / (Σ n_i)², with k_i the KL summed over the
    headline rows of passage i, n_i their count and m the headline mean. One passage: the rows' own SE (sd / √n).
    None when there are no headline rows."""
    import numpy as np

    sums, counts, rows = [], [], []
    for kl, _agree in passages:
        kl = np.asarray(kl, dtype=np.float64)[headline_rows(len(kl))]
        if kl.size:
            sums.append(float(kl.sum()))
            counts.append(kl.size)
            rows.append(kl)
    if not counts:
        return None
    if len(counts) == 1:
        return float(rows[0].std(ddof=1) / np.sqrt(rows[0].size)) if rows[0].size > 1 else 0.0
    k, n = np.asarray(sums), np.asarray(counts, dtype=np.float64)
    m = k.sum() / n.sum()
    p = len(counts)
    return float(np.sqrt(p / (p - 1) * np.sum((k - m * n) ** 2)) / n.sum())
