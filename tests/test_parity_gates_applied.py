"""``benchmarks/parity_gates``' results name every gate each type's rows were held to (``gates_applied``, beside the
tables in force, ``gates_when_measured``), an ONNX type under the key ``check_onnx`` gates it with: the tables alone
did not say that an ``onnx-int4`` row is gated as ``int4``, nor an ``onnx-fp32`` row as ``f32``. The committed
results' "gate then" column follows from the gates they record (the ONNX run's int4 rows were measured before the
int4 KLD bar existed, and passed without one). No model needed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from edgemed.benchmarks import parity_gates
from edgemed.converters.onnx.parity import GATE_TYPE
from edgemed.converters.quality import parity

ROW_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_k_m", "q4_k_m", "q4_0", "onnx-fp32", "onnx-int4")
#: the results files the script wrote whole (parity_gates-with-passage.md has a page of its own, kept as it is)
SCRIPT_PAGES = ("parity_gates", "parity_gates-onnx")
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _report(row_type: str) -> parity.ParityReport:
    """The check's report for a file of ``row_type`` (its gates), on a few rows of made-up logits."""
    src = [np.random.default_rng(0).normal(size=(6, 16)).astype(np.float32)]
    if row_type.startswith(parity_gates.ONNX_PREFIX):  # as check_onnx passes its weight type to compare
        weight_type = row_type[len(parity_gates.ONNX_PREFIX):]
        return parity.compare("onnx", GATE_TYPE.get(weight_type, weight_type), [[1] * 6], src, [src[0] + 0.01])
    return parity.compare("gguf", row_type, [[1] * 6], src, [src[0] + 0.01])


def _applied(report: parity.ParityReport) -> dict:
    return {"nmse": report.gate_nmse, "top1": report.gate_top1, "kld": report.gate_kld}


def test_the_results_name_every_gate_the_check_applied(tmp_path, monkeypatch):
    """A run over every type writes, per type, the very gates its check's report applied: the int4 graph's KLD bar
    among them."""
    def measure(model, types, work, threads, echo=print):
        return [{"model": model, "type": t, "file": "intact", "kld": r.kld, "kld_p99": 0.0, "top1": r.top1,
                 "nmse": r.nmse, "n_positions": r.n_positions, "passed": r.passed, "seconds": 0.0}
                for t, r in ((t, _report(t)) for t in types)]

    monkeypatch.setattr(parity_gates, "measure", measure)
    monkeypatch.setattr(sys, "argv", ["parity_gates", "--model", "m", "--types", ",".join(ROW_TYPES),
                                      "--results-dir", str(tmp_path), "--name", "gates"])
    parity_gates.main()
    written = json.loads((tmp_path / "gates.json").read_text())
    assert written["gates_applied"] == {t: _applied(_report(t)) for t in ROW_TYPES}
    assert written["gates_applied"]["onnx-int4"]["kld"] == parity.KLD_GATES["int4"]
    assert written["gates_applied"]["onnx-fp32"] == {"nmse": parity.NMSE_GATES["f32"], "top1": None,
                                                     "kld": parity.KLD_GATES["f32"]}
    page = (tmp_path / "gates.md").read_text()
    assert f"ONNX-INT4: top-1 >= {parity.TOP1_GATE:g}, KLD <= {parity.KLD_GATES['int4']:g}" in page


def test_a_row_whose_check_applied_other_gates_stops_the_run():
    """The block is written from the tables: a check that applied a gate they do not give the type is refused."""
    report = _report("q4_k_m")
    parity_gates._figures(report, "q4_k_m")
    with pytest.raises(RuntimeError, match="not the gates the results would record"):
        parity_gates._figures(report, "onnx-int4")


@pytest.mark.parametrize("path", sorted(RESULTS.glob("parity_gates*.json")), ids=lambda p: p.stem)
def test_the_committed_gate_then_column_follows_from_the_gates_recorded(path):
    """Each row's PASS/FAIL is what the gates recorded for its type say of its figures: a table claiming a bar that
    was not applied (the int4 graph's 0.7, set after its broken copies passed at 0.78-0.99) fails here."""
    doc = json.loads(path.read_text())
    applied = parity_gates.with_gates_applied(doc)["gates_applied"]
    for row in doc["rows"]:
        gates = applied[row["type"]]
        held = row["nmse"] < gates["nmse"] if gates["nmse"] is not None else row["top1"] >= gates["top1"]
        assert row["passed"] == (held and (gates["kld"] is None or row["kld"] <= gates["kld"])), row


@pytest.mark.parametrize("name", SCRIPT_PAGES)
def test_the_committed_results_are_what_the_script_writes_from_them(name, tmp_path, monkeypatch):
    """``--render`` of a committed results file changes nothing: its gates_applied and its page are the script's."""
    committed = RESULTS / f"{name}.json"
    (tmp_path / f"{name}.json").write_text(committed.read_text())
    monkeypatch.setattr(sys, "argv", ["parity_gates", "--render", "--results-dir", str(tmp_path), "--name", name])
    parity_gates.main()
    assert (tmp_path / f"{name}.json").read_text() == committed.read_text()
    assert (tmp_path / f"{name}.md").read_text() == (RESULTS / f"{name}.md").read_text()
