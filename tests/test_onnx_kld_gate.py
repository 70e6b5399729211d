"""The ONNX route's int4 graph carries a KL-divergence bar (``parity.KLD_GATES["int4"]``, decision 0022), as every
GGUF type does.

It was gated on finite logits and top-1 agreement >= 40 % alone, in `convert --to onnx` and in `check`: SmolLM2-135M's
int4 graph with a decoder layer's output products zeroed, 1 % of its blocks zeroed or its chat tokens' embedding rows
wiped kept 51-57 % of the argmaxes and passed (benchmarks/results/parity_gates-onnx.md). Here a tiny model's head is
damaged so that every argmax is kept and every distribution flattened: only the KLD can see it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_ir")
pytest.importorskip("torch")

from onnx_tiny import build  # noqa: E402

from edgemed.converters.onnx.export import MODEL_FILE, OnnxOptions, convert_onnx  # noqa: E402
from edgemed.converters.quality import parity  # noqa: E402
from edgemed.errors import ParityError  # noqa: E402

#: the LM head's block scales multiplied by this: logits scaled by it, the argmax of every position unchanged
HEAD_SCALE = 0.3


def _flatten_head(graph: Path) -> None:
    """Scale the int4 graph's LM head (the 8-bit ``MatMulNBits`` producing the logits) by ``HEAD_SCALE``, in place."""
    import onnx
    from onnx import numpy_helper

    from edgemed.converters.onnx.quant import save_single_file
    from edgemed.converters.onnx.trace import LOGITS

    model = onnx.load(str(graph))
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.output[0] == LOGITS)
    scales = next(t for t in model.graph.initializer if t.name == head.input[2])
    scales.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scales) * HEAD_SCALE, scales.name))
    save_single_file(model, graph)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("tiny") / "tiny-qwen2")


@pytest.fixture(scope="module")
def int4(tiny, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("onnx")
    out = root / "tiny-int4"
    with pytest.MonkeyPatch.context() as env:  # before the per-test home: the output is recorded in this one
        env.setenv("EDGEMED_HOME", str(root / "edgemed-home"))
        report = convert_onnx(tiny, out, OnnxOptions(weight_type="int4"), echo=lambda s: None)
    assert report.parity["int4"]["passed"] is True, report.parity
    return out


def test_check_fails_an_int4_graph_that_keeps_its_argmaxes_on_its_kld(tiny, int4, tmp_path):
    import json

    from click.testing import CliRunner

    from edgemed.cli import cli

    runner = CliRunner()
    ok = runner.invoke(cli, ["check", str(tiny), str(int4), "--json"])
    assert ok.exit_code == 0, ok.output
    intact = json.loads(ok.stdout)
    bad = tmp_path / "flat-head"
    shutil.copytree(int4, bad)
    _flatten_head(bad / MODEL_FILE)
    result = runner.invoke(cli, ["check", str(tiny), str(bad), "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert intact["passed"] is True and intact["gate_kld"] == parity.KLD_GATES["int4"], intact
    assert intact["kld"] < parity.KLD_GATES["int4"] / 10, intact
    assert report["top1"] == intact["top1"] and report["top1"] >= parity.TOP1_GATE, report  # the old gate: PASS
    assert report["kld"] > 2 * parity.KLD_GATES["int4"] and report["passed"] is False, report
    text = " ".join(result.output.split())
    assert "KL divergence" in text and f"must be <= {parity.KLD_GATES['int4']:g} for INT4" in text, text
    assert "--to onnx --quant fp32" in text and "--quant q8_0" not in text, text  # a wider type of this route


def test_convert_refuses_an_int4_graph_over_its_kld_bar_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    from edgemed.converters.onnx import quant as onnx_quant

    quantize = onnx_quant.quantize_int4

    def flattened(src, dst, **recipe):  # the quantizer's graph, its head then damaged
        quantize(src, dst, **recipe)
        _flatten_head(dst)

    monkeypatch.setattr(onnx_quant, "quantize_int4", flattened)
    outs = tmp_path / "outs"
    outs.mkdir()
    with pytest.raises(ParityError) as caught:
        convert_onnx(tiny, outs / "tiny-int4", OnnxOptions(weight_type="int4"), echo=lambda s: None)
    said = " ".join(str(caught.value).split())
    assert said.startswith("The int4 ONNX model does not match its source: KL divergence"), said
    assert f"must be <= {parity.KLD_GATES['int4']:g} for INT4" in said, said
    assert list(outs.iterdir()) == []
