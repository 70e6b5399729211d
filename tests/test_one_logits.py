"""One "logits of a GGUF for token sequences" function: ``edgemed/runtime/logits.py``.

(a) No other module asks llama.cpp's layer for every row of a sequence (``Context.eval(..., all_rows=...)``):
parity, ``--quant auto``, the KLD anchor and the scorer go through ``runtime.logits``. (b) On the real SmolLM2
GGUF, its rows for two sequences in one context equal each sequence evaluated alone on the layer directly.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("edgemed", "converters", "benchmarks")
ALLOWED = {"edgemed/runtime/logits.py", "edgemed/runtime/llamacpp.py"}


def whole_sequence_evals(source: str) -> list[int]:
    """Lines of ``<x>.eval(..., all_rows=<anything but False>)`` calls in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "eval":
            for kw in node.keywords:
                if kw.arg == "all_rows" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(node.lineno)
    return found


def test_the_scan_sees_a_whole_sequence_eval():
    assert whole_sequence_evals("ctx.clear()\nout = ctx.eval(tokens, all_rows=True)\n") == [2]
    assert whole_sequence_evals("x = self.engine.ctx.eval(t, n, all_rows=flag)") == [1]
    assert whole_sequence_evals("ctx.eval(t)\nctx.eval([tok], pos)\nctx.eval(t, all_rows=False)\nmodel.eval()") == []


def test_only_runtime_logits_evaluates_whole_sequences():
    offenders = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in ALLOWED or "__pycache__" in rel:
                continue
            offenders += [f"{rel}:{line}" for line in whole_sequence_evals(path.read_text(encoding="utf-8"))]
    assert offenders == [], ("logits of whole sequences are edgemed.runtime.logits' job (rows, SequenceLogits, "
                             f"gguf_logits); these modules ask the layer directly: {offenders}")


# -- (b) on the real model ---------------------------------------------------------------------------------------
TEXTS = ("1, 2, 3, 4, 5, 6, 7, 8, ", "The capital of France is")  # the longer first: the second reuses its cells


def _alone(path: Path, tokens: list[int], n_ctx: int):
    """``tokens`` on the llama.cpp layer itself: a fresh model and context, the same settings as runtime.logits."""
    from edgemed.runtime import llamacpp
    from edgemed.runtime.engine import LoadSettings

    load = LoadSettings(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=2, n_threads_batch=2, extra_buffers="none")
    model = llamacpp.Model(path, load)
    try:
        ctx = llamacpp.Context(model, load, n_ctx=n_ctx, n_batch=n_ctx, threads=2)
        try:
            return ctx.eval(tokens, 0, all_rows=True)
        finally:
            ctx.close()
    finally:
        model.close()


def test_rows_of_sequences_equal_each_alone(smollm2_gguf):
    import numpy as np

    pytest.importorskip("llama_cpp")
    from edgemed.runtime import llamacpp
    from edgemed.runtime.logits import CTX_MARGIN, EXTRA_BUFFERS, gguf_logits

    vocab = llamacpp.Model(smollm2_gguf, vocab_only=True)
    try:
        seqs = [vocab.tokenize(t, add_special=True) for t in TEXTS]
        n_vocab = vocab.n_vocab
        nine, paris = vocab.tokenize("9"), vocab.tokenize(" Paris")
    finally:
        vocab.close()
    assert EXTRA_BUFFERS == "none"
    got = list(gguf_logits(smollm2_gguf, seqs, threads=2))
    n_ctx = max(len(s) for s in seqs) + CTX_MARGIN
    assert len(got) == len(seqs)
    for tokens, rows in zip(seqs, got):
        assert rows.shape == (len(tokens), n_vocab) and rows.dtype == np.float32
        assert np.isfinite(rows).all()
        np.testing.assert_array_equal(rows, _alone(smollm2_gguf, tokens, n_ctx))  # the second, after the first: a clean cache
    # argmax rows are sensible: the count goes on (every digit from 4 on is predicted), France's capital is Paris
    count = seqs[0]  # SmolLM2 spells it digit, ",", " ": the digits sit at 0, 3, 6, ...
    assert [int(got[0][i - 1].argmax()) for i in range(9, len(count), 3)] == count[9::3]
    assert [int(got[0][-1].argmax())] == nine and [int(got[1][-1].argmax())] == paris
