"""The verify-cost benchmark writes its figures to a JSON file itself (the page beside it quotes that file)."""

from __future__ import annotations

import json
import sys

import pytest

from bundle_kit import tiny_gguf


def test_verify_cost_writes_its_json_to_the_results_dir(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf")
    from edgemed.benchmarks import verify_cost

    model = tiny_gguf(tmp_path / "tiny.gguf")
    results = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["verify_cost", "--gguf", str(model), "--repeat", "1", "--results-dir", str(results)])
    verify_cost.main()

    written = json.loads((results / "verify_cost-tiny.json").read_text(encoding="utf-8"))
    assert [p.name for p in results.iterdir()] == ["verify_cost-tiny.json"]
    assert written["file"] == str(model) and written["size_bytes"] == model.stat().st_size
    for key in ("sha256sum_s", "full_verify_s", "fast_path_ms_median", "fast_path_new_process_ms", "pack_dir_s"):
        assert isinstance(written[key], (int, float)) and written[key] >= 0, key  # a few KB can round to 0
    assert written["fast_path_new_process_ms"] > 0  # a Python start-up and edgemed's imports
    assert f"wrote {results / 'verify_cost-tiny'}.json" in capsys.readouterr().err
