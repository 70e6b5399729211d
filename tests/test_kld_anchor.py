"""benchmarks/kld_anchor.py: llama-perplexity's windows and rows, its files and log, and agreement with it.

The hand-made cases need nothing; the end-to-end case converts SmolLM2 to F16 and Q4_0 (``--no-parity``, cached)
and needs llama-perplexity built from the installed llama-cpp-python sdist into the test cache (CI builds it there
before the tests; skipped otherwise, naming the build). The user's own cache is never read.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from edgemed.converters.quality import fidelity
from edgemed.benchmarks import kld_anchor
from edgemed.benchmarks import llama_perplexity as lp
from edgemed.errors import InputError


def test_windows_follow_llama_perplexity_chunks_and_bos_rule():
    tokens = list(range(10))
    chunks, fed = kld_anchor.windows(tokens, 4, bos=99)
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7]]  # len // n_ctx chunks, the rest (8, 9) dropped
    assert fed == [[99, 1, 2, 3], [99, 5, 6, 7]]  # the first token of each chunk replaced by BOS
    assert kld_anchor.windows(tokens, 4, bos=None) == (chunks, chunks)  # add_bos off: decoded as stored
    assert tokens == list(range(10))


@pytest.mark.parametrize("n", [4, 5, 7, 128, 255, 256, 512, 4096])
def test_scored_rows_are_perplexity_cpp_rows(n):
    # perplexity.cpp kl_divergence(): first = n_ctx/2; process_logits(logits of row first.., n_ctx - 1 - first rows)
    first = n // 2
    assert list(range(n)[fidelity.llamacpp_rows(n)]) == list(range(first, first + n - 1 - first))


def test_scored_rows_of_a_hand_made_window():
    # an 8-token window: rows 4, 5, 6 predict tokens 5, 6, 7; row 7's next token is outside the window
    kl = np.arange(8, dtype=float)
    figures = fidelity.summarize([(kl, np.ones(8, bool)), (kl + 10, np.zeros(8, bool))])
    assert figures["llamacpp"]["n_tokens"] == 6
    assert figures["llamacpp"]["kld_mean"] == pytest.approx(np.mean([4, 5, 6, 14, 15, 16]))
    assert figures["llamacpp"]["top1"] == pytest.approx(0.5)


def test_text_is_read_like_llama_perplexity_dash_f():
    assert kld_anchor.as_prompt(b"a\n\nb\n") == "a\n\nb"  # one trailing newline dropped
    assert kld_anchor.as_prompt(b"a\n\n") == "a\n"
    with pytest.raises(InputError, match="UTF-8"):
        kld_anchor.as_prompt(b"\xff\xfe")
    assert kld_anchor.default_text().count("\n\n") >= 10


class _Vocab:
    def __init__(self, add_bos):
        self.add_bos = add_bos

    def bos(self):
        return 1

    def tokenize(self, text, add_special=False):
        return ([1] if add_special and self.add_bos else []) + [7]


def test_add_bos_is_read_off_the_tokenizer():
    assert kld_anchor.adds_bos(_Vocab(True)) is True
    assert kld_anchor.adds_bos(_Vocab(False)) is False


def test_mean_and_error_as_llama_perplexity():
    x = np.linspace(0.0, 1.0, 101)
    mean, err = lp.mean_and_error(x)
    assert mean == pytest.approx(0.5)
    assert err == pytest.approx(np.sqrt(((x * x).mean() - 0.25) / 100))
    assert lp.mean_and_error(np.ones(5) * 3) == (3.0, 0.0)


def test_base_file_is_read_and_dequantized(tmp_path):
    n_ctx, n_vocab, n_chunk = 6, 5, 2
    rows, nv = n_ctx - 1 - n_ctx // 2, 2 * ((n_vocab + 1) // 2) + 4
    tokens = list(range(n_ctx * n_chunk))
    blob = bytearray(b"_logits_" + struct.pack("<Iii", n_ctx, n_vocab, n_chunk))
    blob += struct.pack(f"<{len(tokens)}i", *tokens)
    for k in range(n_chunk):
        for r in range(rows):
            scale, floor = 16 / 65535, -16.0 - k - r
            q = [0, 65535, 32768, 1, 7] + [0] * (nv - 4 - n_vocab)
            blob += struct.pack("<ff", scale, floor) + struct.pack(f"<{nv - 4}H", *q)
    path = tmp_path / "base.kld"
    path.write_bytes(bytes(blob))
    header, stored, chunk = lp.read_base(path)
    assert header == {"n_ctx": n_ctx, "n_vocab": n_vocab, "n_chunk": n_chunk} and stored == tokens
    logp, floors = chunk(1)
    assert logp.shape == (rows, n_vocab) and floors.tolist() == [-17.0, -18.0]
    step = 16 / 65535
    assert logp[0].tolist() == pytest.approx([-17.0, -1.0, -17.0 + 32768 * step, -17.0 + step, -17.0 + 7 * step])
    with pytest.raises(InputError, match="kl-divergence-base"):
        (tmp_path / "bad").write_bytes(b"x" * 64)
        lp.read_base(tmp_path / "bad")


LOG = """kl_divergence: computing over 5 chunks, n_ctx=256, batch_size=256, n_seq=1
chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS     Same top p
   1      32.1 ±  5.0    0.2 ± 0.1    0.3 ± 0.1    15.0 ± 2.0 %    66.000 ±  4.0 %
====== Perplexity statistics ======
Mean PPL(Q)                   :  33.923027 ±   3.839363
Mean PPL(base)                :  26.334407 ±   3.073267
====== KL divergence statistics ======
Mean    KLD:   0.371159 ±   0.018930
Maximum KLD:   4.986300
99.9%   KLD:   4.611461
99.0%   KLD:   2.544683
95.0%   KLD:   1.002470
Median  KLD:   0.257202
 5.0%   KLD:   0.044269
Minimum KLD:   0.001529
====== Token probability statistics ======
RMS Δp    : 15.329 ± 0.983 %
Same top p: 66.299 ± 1.877 %
"""


def test_log_is_parsed():
    got = lp.parse_log(LOG)
    assert (got["kld_mean"], got["kld_err"]) == (0.371159, 0.01893)
    assert got["same_top"] == pytest.approx(0.66299) and got["same_top_err"] == pytest.approx(0.01877)
    assert got["kld_percentiles"] == {"max": 4.9863, "p99.9": 4.611461, "p99": 2.544683, "p95": 1.00247,
                                      "median": 0.257202, "p5": 0.044269, "min": 0.001529}
    assert (got["ppl"], got["ppl_base"], got["n_chunk"], got["n_ctx"]) == (33.923027, 26.334407, 5, 256)
    assert got["rms_dp"] == pytest.approx(0.15329)
    assert lp.statistics_block(LOG)[-1].startswith("Same top p")
    assert "kld_mean" not in lp.parse_log("perplexity: tokenizing the input ..")


def _perplexity_cpp_kl(base_logits, logits):
    """perplexity.cpp's two steps, a row at a time: log_softmax() writing the 16-bit base, then its KL sum."""
    import math

    out = []
    for a, b in zip(base_logits.astype(np.float32), logits.astype(np.float32)):
        top, low = float(a.max()), max(float(a.min()), float(a.max()) - 16)
        lse = math.log(sum(math.exp(x - top) for x in a))
        floor, step = low - top - lse, (top - low) / 65535
        q = [round((x - low) / step) if x > low else 0 for x in a]
        qtop = float(b.max()) + math.log(sum(math.exp(x - float(b.max())) for x in b))
        out.append(sum(math.exp(step * u + floor) * (step * u + floor - x + qtop)
                       for u, x in zip(q, b) if step * u + floor > -16))
    return np.array(out)


def test_llamacpp_estimator_is_perplexity_cpp_s():
    rng = np.random.default_rng(3)
    wide = rng.normal(size=(4, 60)) * 6  # a tail below e^-16 that perplexity.cpp leaves out
    other = wide + rng.normal(size=wide.shape)
    assert lp.llamacpp_kl(wide, other) == pytest.approx(_perplexity_cpp_kl(wide, other), rel=1e-4, abs=1e-6)
    narrow = rng.normal(size=(4, 60))  # nothing below -16: the estimator is the full KL, to its 16-bit steps
    near = narrow + 0.3 * rng.normal(size=narrow.shape)
    assert lp.llamacpp_kl(narrow, near) == pytest.approx(fidelity.kl_rows(narrow, near)[0], abs=1e-3)


def test_placement_flags():
    assert lp.placement_flags("all") == [] and lp.placement_flags("none") == ["--no-repack"]
    with pytest.raises(InputError, match="extra buffers"):
        lp.placement_flags("repack")


# -- end to end on SmolLM2 ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2_f16_q4_0(smollm2_hf):
    """SmolLM2 converted to F16 and Q4_0 by `edgemed convert --no-parity` (cached)."""
    from edgemed.converters.pipeline import ConvertOptions, convert
    from conftest import TEST_CACHE

    out = TEST_CACHE / "kld-anchor"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for quant in ("f16", "q4_0"):
        path = out / f"smollm2-{quant}.gguf"
        if not path.exists():
            convert(smollm2_hf, path, ConvertOptions(out_type=quant, parity=False), echo=print)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def llama_perplexity() -> Path:
    """llama-perplexity built for the installed llama-cpp-python in the test cache (before any conversion is paid for)."""
    pytest.importorskip("llama_cpp")
    from edgemed.benchmarks import anchors
    from conftest import TEST_CACHE

    stamp = TEST_CACHE / "anchors" / f"{anchors.PACKAGE}-{anchors.installed_version()}" / "build.json"
    exe = Path(json.loads(stamp.read_text())["binaries"]["llama-perplexity"]) if stamp.is_file() else None
    if exe is None or not exe.is_file():
        pytest.skip("llama-perplexity is not built in the test cache: run "
                    f"`EDGEMED_CACHE_DIR={TEST_CACHE} python -m edgemed.benchmarks.anchors build`")
    return exe


@pytest.mark.slow
def test_agrees_with_llama_perplexity_on_smollm2(llama_perplexity, smollm2_f16_q4_0, tmp_path, monkeypatch):
    monkeypatch.setattr(lp, "binary", lambda: llama_perplexity)
    from edgemed.benchmarks.harness.divergence import load_texts

    f16, q4_0 = smollm2_f16_q4_0
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(load_texts()[:4]) + "\n", encoding="utf-8")  # > 256 tokens: 2 windows of 128
    out = tmp_path / "kld_anchor-smollm2"
    kld_anchor.main(["--reference", str(f16), str(q4_0), "--text", str(text), "--ctx", "128", "--threads", "1",
                     "--work", str(tmp_path), "-o", str(out)])
    result = json.loads(out.with_name(out.name + ".json").read_text())
    assert result["windows_match"] is True and result["n_windows"] == 2
    r = result["quants"][q4_0.name]
    theirs, ours = r["llama_perplexity"], r["edgemed"]
    assert theirs["n_chunk"] == 2 and ours["n_rows"] == 2 * 63
    assert abs(r["relative_difference"]) <= kld_anchor.AGREE and r["agree"] is True
    assert ours["figures"]["llamacpp"]["kld_mean"] == pytest.approx(ours["kld_mean"])
    assert abs(ours["same_top"] - theirs["same_top"]) <= 2 / ours["n_rows"]
    assert result["reference_logprob_max_abs_diff"] < 0.01  # same reference logits on both sides
    assert "| smollm2-q4_0.gguf |" in out.with_name(out.name + ".md").read_text()
    assert not [p for p in tmp_path.iterdir() if "kld-anchor" in p.name]  # the scratch folder is gone


def test_bad_folders_are_refused_before_the_run(tmp_path):
    """A missing --work or -o folder is one line naming it, before any model is loaded (not a traceback at the end)."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")  # never read: the folders are checked first
    common = ["--reference", str(gguf), str(gguf)]
    with pytest.raises(SystemExit, match="--work '.*missing' is not a folder"):
        kld_anchor.main([*common, "--work", str(tmp_path / "missing"), "-o", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="the folder '.*nowhere' does not exist"):
        kld_anchor.main([*common, "-o", str(tmp_path / "nowhere" / "r")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
