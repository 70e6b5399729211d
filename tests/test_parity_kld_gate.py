"""Every GGUF type carries a KL-divergence bar (``parity.KLD_GATES``, decision 0022).

A 4-bit file was gated on top-1 agreement >= 40 % alone, and an F16 file on NMSE alone: a file missing a decoder
layer's contribution, or with damaged blocks or vocabulary rows, kept most argmaxes (top-1 73-89 %) or a small NMSE
and passed `check`, though its KLD was several times an intact file's.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgemed.converters.quality import parity

import tiny


def _peaked(rng, rows=40, vocab=200):
    """Logits as confident as a real LM's (one clear favourite per row)."""
    logits = rng.normal(size=(rows, vocab)).astype(np.float32)
    logits[np.arange(rows), rng.integers(0, vocab, rows)] += 8
    return logits


def test_a_quantized_file_with_most_argmaxes_kept_fails_on_its_kld():
    rng = np.random.default_rng(3)
    src = _peaked(rng)
    noisy = src + rng.normal(scale=1.5, size=src.shape).astype(np.float32)  # argmaxes mostly kept, distributions not
    report = parity.compare("gguf", "q4_k_m", [[1] * 40], [src], [noisy])
    assert report.top1 >= parity.TOP1_GATE and report.kld > parity.KLD_GATES["q4_k_m"], (report.top1, report.kld)
    assert report.passed is False and report.gate_kld == parity.KLD_GATES["q4_k_m"]
    error = parity.gate_error(report, "The Q4_K_M GGUF")
    assert "KL divergence" in str(error) and f"must be <= {parity.KLD_GATES['q4_k_m']:g} for Q4_K_M" in str(error)
    close = parity.compare("gguf", "q4_k_m", [[1] * 40], [src], [src + 0.05])
    assert close.passed is True and f"KLD <= {parity.KLD_GATES['q4_k_m']:g} nats" in close.summary()


def test_an_f16_file_under_the_nmse_gate_fails_on_its_kld():
    """Two vocabulary columns wrong: NMSE over every logit stays tiny, the KLD does not."""
    rng = np.random.default_rng(4)
    src = _peaked(rng, vocab=20_000) + 10  # real logits sit far from 0: NMSE's denominator is large
    wrong = src.copy()
    wrong[:, :2] += 8  # two tokens raised towards the favourite
    report = parity.compare("gguf", "f16", [[1] * 40], [src], [wrong])
    assert report.nmse < parity.NMSE_GATES["f16"] and report.kld > parity.KLD_GATES["f16"], (report.nmse, report.kld)
    assert report.passed is False and "KL divergence" in str(parity.gate_error(report, "The F16 GGUF"))


def test_every_gguf_type_has_a_kld_bar():
    from edgemed.constants import GGUF_OUTPUT_TYPES

    assert set(GGUF_OUTPUT_TYPES) - {"auto"} <= set(parity.KLD_GATES), parity.KLD_GATES


@pytest.fixture(scope="module")
def confident(tmp_path_factory):
    """A tiny llama whose head is scaled up, so it predicts as confidently as a real model (a random tiny model's
    near-flat distributions give every file a small KLD), and its Q8_0 conversion."""
    pytest.importorskip("torch")
    pytest.importorskip("llama_cpp")
    from safetensors.torch import load_file, save_file

    from edgemed.converters.pipeline import ConvertOptions, convert

    root = tmp_path_factory.mktemp("kld-gate")
    ckpt = tiny.build_model(root / "llama", "llama")
    weights = load_file(ckpt / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 3
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    out = root / "q8.gguf"
    convert(ckpt, out, ConvertOptions(out_type="q8_0", parity=False), echo=lambda s: None)
    return ckpt, out


def test_check_fails_a_q8_file_with_damaged_blocks_that_keeps_its_argmaxes(confident, tmp_path):
    import gguf
    from click.testing import CliRunner

    from edgemed.cli import cli

    ckpt, good = confident
    ok = CliRunner().invoke(cli, ["check", str(ckpt), str(good)])
    assert ok.exit_code == 0 and "PASS" in ok.output, ok.output
    bad = tmp_path / "blocks.gguf"
    shutil.copyfile(good, bad)
    reader = gguf.GGUFReader(bad, "r+")
    rng = np.random.default_rng(0)
    for t in reader.tensors:  # 1 % of every decoder matrix's Q8_0 blocks zeroed
        if t.name.startswith("blk.") and len(t.shape) == 2:
            _, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            blocks = reader.data[t.data_offset:t.data_offset + t.n_bytes].reshape(-1, size)
            blocks[rng.random(blocks.shape[0]) < 0.01] = 0
    reader.data.flush()
    del reader
    result = CliRunner().invoke(cli, ["check", str(ckpt), str(bad)])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "PASS" not in text, text
    assert "KL divergence" in text and "for Q8_0" in text, text
