"""An ONNX bundle: `edgemed pack` of a converted ONNX directory finds the directory's own report, so the
manifest carries the conversion's parity and provenance (it once looked for ``<dir>.report.json`` and
silently packed none)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_ir")
pytest.importorskip("torch")

import bundle_kit as kit  # noqa: E402
from onnx_tiny import build  # noqa: E402

from edgemed.cli import cli  # noqa: E402
from edgemed.formats.conversion_report import report_path  # noqa: E402


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    from edgemed.converters.onnx.export import OnnxOptions, convert_onnx

    src = build(tmp_path_factory.mktemp("tiny-p") / "tiny-qwen2")
    out = tmp_path_factory.mktemp("onnx-p") / "tiny-fp32"
    convert_onnx(src, out, OnnxOptions(weight_type="fp32"), echo=lambda s: None)  # with its parity gate
    return out


def test_the_report_rule_is_the_one_the_converter_wrote(tiny_onnx, tmp_path):
    assert report_path(tiny_onnx) == tiny_onnx / "report.json" and report_path(tiny_onnx).is_file()
    assert report_path(tmp_path / "m.gguf", "gguf") == tmp_path / "m.gguf.report.json"


def test_onnx_bundle_manifest_carries_parity_and_provenance(tiny_onnx, tmp_path):
    written = json.loads(report_path(tiny_onnx).read_text())
    license_ = kit.inputs(tmp_path / "src")["license"]
    bundle = tmp_path / "tiny.edgemed"
    r = CliRunner().invoke(cli, ["pack", str(tiny_onnx), "--license", str(license_), "--name", "tiny-onnx", "-o", str(bundle)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(bundle), "--json"], catch_exceptions=False).output)
    man = info["manifest"]
    prov = man["provenance"]
    assert man["model"]["format"] == "onnx"
    assert prov["parity"] == written["parity"] and prov["parity"]["fp32"]["passed"] is True
    assert prov["source_sha256"] == written["source"]["sha256"] and len(prov["source_sha256"]) == 64
    assert prov["converter_version"] == written["converter"]["version"] and prov["out_type"] == "fp32"
    assert {"path": "report.json", "role": "report"}.items() <= next(f for f in man["files"] if f["path"] == "report.json").items()
    assert str(tiny_onnx.parent) not in json.dumps(prov)  # build-machine paths stay out of the manifest
    text = CliRunner().invoke(cli, ["inspect", str(bundle)], catch_exceptions=False).output
    assert "parity recorded" in text
