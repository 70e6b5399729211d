"""edgemed.converters.quality.fidelity: the one definition of KLD / top-1 for parity and the bench divergence phase."""

import numpy as np
import pytest

from edgemed.converters.quality import fidelity


def _logits(rng, n, vocab=32, scale=3.0):
    return rng.normal(size=(n, vocab)) * scale


def test_llamacpp_rows_are_the_second_half_of_a_window_without_its_last_row():
    # llama-perplexity: first = n_ctx / 2, scores n_ctx - 1 - first rows starting there
    assert fidelity.llamacpp_rows(512) == slice(256, 511)
    assert len(range(512)[fidelity.llamacpp_rows(512)]) == 512 - 1 - 256
    assert len(range(10)[fidelity.llamacpp_rows(10)]) == 4
    assert len(range(7)[fidelity.llamacpp_rows(7)]) == 3  # rows 3, 4, 5
    assert range(3)[fidelity.llamacpp_rows(3)] == range(1, 2)  # perplexity.cpp scores row 1 of a 3-token window
    assert len(range(2)[fidelity.llamacpp_rows(2)]) == 0  # too short to say
    assert fidelity.headline_rows(5) == slice(1, 5) and fidelity.first_rows(5) == slice(0, 1)


def test_kl_rows_is_the_full_vocabulary_kl_and_zero_against_itself():
    rng = np.random.default_rng(0)
    a, b = _logits(rng, 6), _logits(rng, 6)
    kl, agree = fidelity.kl_rows(a, b)
    p, q = np.exp(fidelity.log_softmax(a)), np.exp(fidelity.log_softmax(b))
    assert kl == pytest.approx((p * np.log(p / q)).sum(axis=1), rel=1e-9)
    assert (agree == (a.argmax(1) == b.argmax(1))).all()
    same, agree_same = fidelity.kl_rows(a, a)
    assert np.abs(same).max() < 1e-12 and agree_same.all()
    with pytest.raises(ValueError, match="shapes differ"):
        fidelity.kl_rows(a, b[:, :5])


def test_the_headline_leaves_out_each_passages_first_position_and_reports_it():
    """Two passages whose first rows carry a large KL (as Qwen's first token does): the headline is not moved by
    them, ``first`` shows them, ``all`` is the old every-row mean."""
    kl1 = np.array([6.0, 0.01, 0.02, 0.01, 0.03, 0.01, 0.02, 0.01])
    kl2 = np.array([5.0, 0.02, 0.02, 0.02, 0.02, 0.02])
    ag1, ag2 = np.array([0, 1, 1, 1, 1, 1, 0, 1], bool), np.ones(6, bool)
    out = fidelity.summarize([(kl1, ag1), (kl2, ag2)])
    head = np.concatenate([kl1[1:], kl2[1:]])
    assert out["kld_mean"] == pytest.approx(head.mean()) and out["n_tokens"] == 12
    assert out["kld_max"] == pytest.approx(0.03) and out["kld_p99"] <= 0.03
    assert out["top1"] == pytest.approx(11 / 12)
    assert out["first"] == {"kld_mean": pytest.approx(5.5), "top1": 0.5, "n_tokens": 2}
    assert out["all"]["kld_mean"] == pytest.approx(np.concatenate([kl1, kl2]).mean()) and out["all"]["n_tokens"] == 14
    llama = np.concatenate([kl1[4:7], kl2[3:5]])  # rows n//2 .. n-2 of each passage
    assert out["llamacpp"]["kld_mean"] == pytest.approx(llama.mean()) and out["llamacpp"]["n_tokens"] == 5
    assert out["version"] == fidelity.VERSION and "first" in out["rule"]


def test_short_passages_are_said_plainly():
    out = fidelity.summarize([(np.array([0.5]), np.array([True]))])
    assert out["fallback"] and out["n_tokens"] == 1 and out["kld_mean"] == 0.5  # nothing has context: every row, said
    assert out["llamacpp"] is None
    two = fidelity.summarize([(np.array([0.5, 0.1]), np.array([True, False]))])  # 2 tokens: no second half
    assert "fallback" not in two and two["kld_mean"] == pytest.approx(0.1) and two["llamacpp"] is None


def test_parity_reports_the_headline_the_first_positions_and_the_llamacpp_figure():
    from edgemed.converters.quality.parity import compare

    rng = np.random.default_rng(1)
    src = [_logits(rng, 12), _logits(rng, 9)]
    conv = [s + rng.normal(size=s.shape) * 0.05 for s in src]
    for c in conv:  # a wildly different first position, as on Qwen
        c[0] = rng.normal(size=c.shape[1]) * 3
    r = compare("gguf", "q4_k_m", [[1] * 12, [1] * 9], src, conv)
    rows = [fidelity.kl_rows(s, c) for s, c in zip(src, conv)]
    assert r.kld == pytest.approx(np.concatenate([k[1:] for k, _ in rows]).mean())
    assert r.fidelity["first"]["kld_mean"] > 10 * r.kld            # the first rows are the big ones...
    assert r.fidelity["all"]["kld_mean"] > 3 * r.kld               # ...and would have dominated the old mean
    assert r.n_positions == 19 and r.metric_version == fidelity.VERSION
    assert r.max_abs_diff < r.max_abs_diff_all                     # the first rows' diffs are reported apart
    assert r.fidelity["llamacpp"]["n_tokens"] == (12 - 1 - 6) + (9 - 1 - 4)
    assert r.top1 >= 0.9 and r.passed
    assert "first position of each left out" in r.summary() and "llama.cpp-compatible" in r.summary()
    assert [p["tokens"] for p in r.per_prompt] == [12, 9] and r.per_prompt[0]["kld_first"] > r.per_prompt[0]["kld"]


def test_parity_still_fails_non_finite_logits_and_gates_floats_on_every_row():
    from edgemed.converters.quality.parity import compare

    rng = np.random.default_rng(2)
    src = [_logits(rng, 8)]
    bad = [src[0].copy()]
    bad[0][3, 5] = np.nan
    r = compare("gguf", "q4_0", [[1] * 8], src, bad)
    assert r.passed is False and not r.finite
    off_first = [src[0].copy()]
    off_first[0][0] += rng.normal(size=src[0].shape[1])  # an F16 file wrong only at the first position
    r = compare("gguf", "f16", [[1] * 8], src, off_first)
    assert r.kld == 0.0 and r.passed is False  # the NMSE gate sees every row: a float conversion must be exact


def test_headline_se_takes_each_passage_as_one_sample():
    """The SE of the headline mean is the between-passage (cluster) one: equal passages give 0 whatever their rows'
    spread, and it matches the ratio-estimator formula computed by hand; one passage falls back to sd / sqrt(n)."""
    rng = np.random.default_rng(0)
    row = rng.exponential(0.01, 50)
    same = [(np.r_[5.0, row], np.ones(51, bool))] * 3                  # row 0 (5 nats) is left out of the headline
    assert fidelity.headline_se(same) == pytest.approx(0.0, abs=1e-15)
    passages = [(np.r_[9.0, rng.exponential(s, n)], np.ones(n + 1, bool)) for s, n in ((0.004, 80), (0.01, 40), (0.02, 60))]
    k = np.array([p[0][1:].sum() for p in passages])
    n = np.array([p[0][1:].size for p in passages], dtype=float)
    m = k.sum() / n.sum()
    assert m == pytest.approx(fidelity.summarize(passages)["kld_mean"])
    assert fidelity.headline_se(passages) == pytest.approx(np.sqrt(3 / 2 * ((k - m * n) ** 2).sum()) / n.sum())
    one = passages[:1]
    assert fidelity.headline_se(one) == pytest.approx(passages[0][0][1:].std(ddof=1) / np.sqrt(80))
    assert fidelity.headline_se([(np.array([3.0]), np.ones(1, bool))]) is None   # no row with context
