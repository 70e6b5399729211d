"""The real Qwen2.5-0.5B-Instruct (dequantized HF checkpoint) -> int4 ONNX -> a medical answer. Slow (~3 min).

Skipped with a reason when the checkpoint has not been built on this machine
(``edgemed.converters.source.pip_models.hf_checkpoint('qwen2.5-0.5b-instruct')`` builds it).
"""

from __future__ import annotations

import pytest

from edgemed import env

pytestmark = pytest.mark.slow
NAME = "qwen2.5-0.5b-instruct"
# Looked up at collection time, before the autouse fixture points EDGEMED_HOME at a temporary folder.
CANDIDATES = [env.home() / "checkpoints" / NAME, env.home() / "cache" / "checkpoints" / NAME]


def test_qwen_int4_onnx_answers_a_medical_question(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    from conftest import TEST_CACHE

    ckpt = next((p for p in [*CANDIDATES, TEST_CACHE / "checkpoints" / NAME] if (p / "config.json").exists()), None)
    if ckpt is None:
        pytest.skip(f"{NAME} HF checkpoint not built here (run pip_models.hf_checkpoint('{NAME}') once)")
    from edgemed.converters.onnx.export import OnnxOptions, convert_onnx
    from edgemed.runtime import GenerationSettings, open_engine

    out = tmp_path / "qwen-int4"
    report = convert_onnx(ckpt, out, OnnxOptions(weight_type="int4"), echo=print)
    assert report.parity["fp32"]["passed"] and report.parity["fp32"]["nmse"] < 1e-4
    assert report.parity["int4"]["top1"] > 0.6
    engine = open_engine(out)
    answer = "".join(engine.chat([{"role": "user", "content": "Name one first-line drug for type 2 diabetes."}],
                                 GenerationSettings(max_tokens=48)))
    engine.close()
    print(answer)
    assert len(answer.split()) >= 3
