"""Studies that measure arms in child processes (plan_memory, run_overhead, extra_buffers): an arm that cannot run is
listed in the JSON and the exit status is 1, no NaN is written, and the committed result at the default --out is not
replaced by a run with fewer rows unless --replace (or another --out) says so."""

from __future__ import annotations

import json

import pytest

from edgemed.benchmarks import extra_buffers, plan_memory, run_overhead

COMMITTED = {"rows": [{"model": f"m{i}"} for i in range(6)]}


@pytest.fixture(params=[plan_memory, run_overhead, extra_buffers], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def study(request, tmp_path, monkeypatch):
    """A study whose default --out is a committed file of 6 rows in tmp_path."""
    default = tmp_path / "results" / f"{request.param.__name__.rsplit('.', 1)[-1]}.json"
    default.parent.mkdir()
    default.write_text(json.dumps(COMMITTED))
    monkeypatch.setattr(request.param, "DEFAULT_OUT", default)
    return request.param, default


def _strict(path):
    """The file as strict JSON (a NaN or Infinity fails here)."""
    def no_constants(name):
        raise ValueError(f"{name} in {path}")
    return json.loads(path.read_text(), parse_constant=no_constants)


def test_an_arm_not_installed_is_listed_and_fails_the_run(study, tmp_path):
    module, default = study
    elsewhere = tmp_path / "mine.json"
    assert module.main(["--models", "no-such-model", "--out", str(elsewhere)]) == 1
    written = _strict(elsewhere)
    assert written["rows"] == [] and written["failed"] and all("no-such-model" in f["arm"] for f in written["failed"])
    assert "not installed" in written["failed"][0]["error"]
    if module is plan_memory:
        assert written["worst_abs_error_pct"] is None  # over no rows: null, never NaN


def test_the_committed_result_is_kept_from_a_run_with_fewer_rows(study, capsys):
    module, default = study
    assert module.main(["--models", "no-such-model"]) == 1
    assert json.loads(default.read_text()) == COMMITTED  # untouched
    partial = default.with_name(default.stem + ".partial.json")
    assert _strict(partial)["failed"] and "--replace" in capsys.readouterr().err
    assert module.main(["--models", "no-such-model", "--replace"]) == 1  # asked for: replaced
    assert _strict(default)["rows"] == []
