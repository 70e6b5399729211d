"""The bench runner's resume rules: what a result's key holds (the runtime's build and the harness's methods), a
load-mode twin timed only, phases left out of a run kept in its report, report.md saying which result this run
measured, and accuracy records resumed only on the artifact (sha256) and key that wrote them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgemed.benchmarks.harness import accuracy, keys, report, runner, scores
from edgemed.benchmarks.harness.configs import PHASES, Config, Settings, beyond_settings
from edgemed.benchmarks.harness.datasets import Item
from edgemed.errors import InputError


def _file(path: Path, body: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return path


def _raw(task: runner.Task, settings: Settings, started: float = 1_764_000_000.0) -> dict:
    """A raw result as a child writes it (``child.run_task``), with an empty result."""
    from edgemed.benchmarks.harness.child import RAW_SCHEMA

    return {"schema": RAW_SCHEMA, "config": task.config.to_dict(), "phase": task.phase, "key": task.key,
            "settings": settings.to_dict(), "started": started, "finished": started + 60, "pid": 1, "result": {}}


@pytest.fixture()
def gguf(tmp_path):
    return _file(tmp_path / "artifacts" / "q4_k_m.gguf", b"GGUF" + b"\0" * 60)


def test_key_names_the_native_build_the_runtime_version_and_the_methods(gguf, tmp_path, monkeypatch):
    """A llama.cpp rebuilt with another compiler keeps its version: its library digest makes the old result stale."""
    from edgemed.runtime import native_build

    out, settings = tmp_path / "out", Settings(profile="x86-avx2")
    config = Config("q4_k_m", "gguf", str(gguf))
    monkeypatch.setattr(native_build, "digest", lambda folder=None: "a" * 64)
    task, = runner.plan_tasks(out, [config], ["timing"], settings)
    assert task.key["runtime"]["native_sha256"] == "a" * 64 and "llama-cpp-python" in task.key["runtime"]
    assert task.key["methods_version"] == runner.METHODS_VERSION and task.key["profile_sha256"]
    _file(task.raw, json.dumps(_raw(task, settings)).encode())
    assert runner.load_raw(task.raw, task.key) is not None  # the same build: resumed

    monkeypatch.setattr(native_build, "digest", lambda folder=None: "b" * 64)  # rebuilt, same version
    again, = runner.plan_tasks(out, [config], ["timing"], settings)
    assert runner.load_raw(again.raw, again.key) is None  # measured again, not kept
    monkeypatch.setattr(keys, "METHODS_VERSION", keys.METHODS_VERSION + 1)
    assert runner.plan_tasks(out, [config], ["timing"], settings)[0].key != again.key


def test_a_load_mode_twin_is_timed_only(gguf, tmp_path):
    f16 = _file(tmp_path / "artifacts" / "f16.gguf", b"GGUF" + b"\1" * 60)
    plain, mapped = Config("q4_k_m", "gguf", str(gguf)), Config("q4_k_m-mmap", "gguf", str(gguf), use_mmap=True)
    configs = [Config("f16", "gguf", str(f16)), plain, mapped]
    settings = Settings(profile="x86-avx2", evals=("medqa.jsonl",))
    planned = {(t.config.name, t.phase) for t in runner.plan_tasks(tmp_path / "out", configs, list(PHASES), settings)}
    assert ("q4_k_m-mmap", "timing") in planned
    assert ("q4_k_m-mmap", "divergence") not in planned and ("q4_k_m-mmap", "accuracy") not in planned
    assert {("q4_k_m", "divergence"), ("q4_k_m", "accuracy")} <= planned
    # alone, a mapped configuration is the only one of its bytes: it is scored
    alone = [configs[0], mapped]
    planned = {(t.config.name, t.phase) for t in runner.plan_tasks(tmp_path / "out", alone, list(PHASES), settings)}
    assert ("q4_k_m-mmap", "accuracy") in planned


def test_phases_left_out_keep_their_results_and_the_report_says_where_each_comes_from(gguf, tmp_path, monkeypatch):
    out, config = tmp_path / "out", Config("q4_k_m", "gguf", str(gguf))
    measured_with = Settings(profile="x86-avx2", evals=("/data/medagentsbench/medmcqa/test.jsonl",), eval_n=300)
    acc, = runner.plan_tasks(out, [config], ["accuracy"], measured_with)
    _file(acc.raw, json.dumps(_raw(acc, measured_with)).encode())
    records = out / "raw" / "q4_k_m-accuracy.records.jsonl"
    meta = {"version": accuracy.RECORDS_VERSION, "artifact": {"sha256": acc.key["model_sha256"]}, "key": beyond_settings(acc.key)}
    records.write_text("\n".join(json.dumps(r) for r in [{"meta": meta}] + [
        {"id": f"medmcqa:{k}", "dataset": "medmcqa", "gold": "A", "logit_pred": "A" if k % 2 else "B", "gen_pred": None,
         "parsed_ok": None} for k in range(4)]) + "\n")

    timing_only = Settings(profile="x86-avx2")  # a later run: --phases timing, no --eval
    planned = runner.plan_tasks(out, [config], ["timing"], timing_only)
    kept = runner.earlier_results(out, [config], timing_only, planned)
    assert [r["phase"] for r in kept] == ["accuracy"]
    other = Config("q4_k_m", "gguf", str(_file(tmp_path / "other.gguf", b"GGUF" + b"\2" * 60)))
    assert runner.earlier_results(out, [other], timing_only, planned) == []  # another artifact's result: not kept

    monkeypatch.setattr(report, "render", lambda *a, **k: None)
    results = report.build(out, [config], timing_only, kept, {}, {}, [], measured=set())
    entry, = results["configs"]
    assert entry["accuracy"] is not None and entry["provenance"]["accuracy"]["this_run"] is False
    md = "\n".join(scores.markdown(results, report._table))
    assert "Items: 300 from medmcqa/test.jsonl" in md and "Items: none" not in md
    section = "\n".join(report._provenance_section(results["configs"]))
    assert "| q4_k_m | — | — | resumed from an earlier run (2025-11-24) |" in section
    fresh = report._entry(config, {"timing": {**kept[0], "phase": "timing"}}, {"q4_k_m-timing"})
    assert report._provenance_cell(fresh["provenance"]["timing"]) == "measured (2025-11-24)"


# -- accuracy records -------------------------------------------------------------------------------
class _Scorer:
    """Just what ``accuracy.evaluate`` reads when every item is already in the records."""

    def __init__(self, path: Path):
        self.path = path


def _records(path: Path, artifact: Path, items: list[Item], **meta) -> None:
    head = {"version": accuracy.RECORDS_VERSION, "artifact": accuracy.artifact_identity(artifact), "template": "auto",
            "max_gen_tokens": 16, "score": "logits", **meta}
    lines = [{"meta": head}] + [
        {"id": it.id, "dataset": it.dataset, "item_sha": accuracy.item_digest(it), "gold": it.answer, "logit_pred": "A",
         "gen_pred": None, "parsed_ok": None, "prompt_tokens": 9, "evaluated_tokens": 9, "gen_tokens": 0,
         "seconds": 0.1, "logit_s": 0.1, "gen_s": 0.0} for it in items]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_records_of_a_file_with_the_same_name_and_size_are_not_resumed(tmp_path):
    """Q4_K_M with and without an importance matrix have one size: the sha256 tells them apart."""
    plain = _file(tmp_path / "a" / "q4_k_m.gguf", b"GGUF" + b"\3" * 60)
    calibrated = _file(tmp_path / "b" / "q4_k_m.gguf", b"GGUF" + b"\4" * 60)
    items = [Item(f"medqa:{k}", "medqa", f"q{k}", {"A": "x", "B": "y"}, "A") for k in range(3)]
    records = tmp_path / "records.jsonl"
    _records(records, plain, items)
    assert accuracy.evaluate(_Scorer(plain), items, records_path=records, score="logits", progress=False)["n"] == 3
    with pytest.raises(InputError, match="another run"):
        accuracy.evaluate(_Scorer(calibrated), items, records_path=records, score="logits", progress=False)


def test_the_runner_resumes_records_only_under_their_artifact_and_key(tmp_path):
    plain = _file(tmp_path / "a" / "q4_k_m.gguf", b"GGUF" + b"\3" * 60)
    calibrated = _file(tmp_path / "b" / "q4_k_m.gguf", b"GGUF" + b"\4" * 60)
    settings = Settings(profile="x86-avx2", evals=("medqa.jsonl",), eval_score="logits")
    task, = runner.plan_tasks(tmp_path / "out", [Config("q4_k_m", "gguf", str(plain))], ["accuracy"], settings)
    items = [Item("medqa:0", "medqa", "q", {"A": "x", "B": "y"}, "A")]
    records = tmp_path / "records.jsonl"
    _records(records, plain, items, key=beyond_settings(task.key))
    assert accuracy.records_resume(records, task.key, settings)
    assert accuracy.records_resume(records, {**task.key, "settings_sha256": "a larger draw"}, settings)
    assert not accuracy.records_resume(records, task.key, Settings(evals=("medqa.jsonl",), eval_score="both"))
    other, = runner.plan_tasks(tmp_path / "out", [Config("q4_k_m", "gguf", str(calibrated))], ["accuracy"], settings)
    assert not accuracy.records_resume(records, other.key, settings)  # same name and size, other bytes
    rebuilt = {**task.key, "runtime": {**task.key["runtime"], "native_sha256": "another build"}}
    assert not accuracy.records_resume(records, rebuilt, settings)
    _records(records, plain, items)  # written outside the runner (no key): started afresh by it
    assert not accuracy.records_resume(records, task.key, settings)


def test_a_report_is_rendered_again_from_raw_alone(gguf, tmp_path):
    """``python -m edgemed.benchmarks.harness.report OUT``: every raw result there, whatever its key, with its date."""
    pytest.importorskip("matplotlib")
    out, config = tmp_path / "out", Config("q4_k_m", "gguf", str(gguf))
    measured_with = Settings(profile="x86-avx2", evals=("/data/medagentsbench/medmcqa/test.jsonl",), eval_n=300)
    acc, = runner.plan_tasks(out, [config], ["accuracy"], measured_with)
    raw = _raw(acc, measured_with) | {"key": {"model_sha256": "an older key"}}
    raw["result"] = {"n": 2, "acc_logit": 0.5, "ci_logit": [0.1, 0.9], "per_dataset": {}}
    _file(acc.raw, json.dumps(raw).encode())
    later = Settings(profile="x86-avx2")  # the run that wrote results.json measured no accuracy
    (out / "results.json").write_text(json.dumps({"settings": later.to_dict(), "configs": [
        {"name": "q4_k_m", "kind": "gguf", "path": str(gguf), "dtype": None}], "failed": [
        {"task": "q4_k_m-accuracy", "error": "gone now"}, {"task": "q4_k_m-timing", "error": "exit 1"}]}))
    (out / "machine.json").write_text(json.dumps({"cpu": "x", "physical_cores": 2, "logical_cores": 2,
                                                  "memory_bytes": 2 << 30, "os": "Linux"}))
    (out / "raw" / "bandwidth.json").write_text(json.dumps({"threads": 2}))
    results = report.rebuild(out)
    assert results["configs"][0]["accuracy"]["n"] == 2 and results["failed"] == [{"task": "q4_k_m-timing", "error": "exit 1"}]
    md = (out / "report.md").read_text()
    assert "Items: 300 from medmcqa/test.jsonl" in md and "resumed from an earlier run (2025-11-24)" in md


def test_accuracy_results_kept_from_runs_with_other_settings_are_flagged_each_with_its_own(gguf, tmp_path, monkeypatch):
    """Every accuracy result was described by the first one's settings: an F16 result kept from a run that gave
    PubMedQA its abstract sat beside a Q4_K_M one asked without it under one description."""
    out = tmp_path / "out"
    f16 = Config("f16", "gguf", str(_file(tmp_path / "artifacts" / "f16.gguf", b"GGUF" + b"\1" * 60)))
    q4 = Config("q4_k_m", "gguf", str(gguf))
    evals = ("/data/pubmedqa/ori_pqal.json",)
    with_abstract = Settings(profile="x86-avx2", evals=evals, eval_context=True)
    without = Settings(profile="x86-avx2", evals=evals)
    kept = []
    for config, settings in ((f16, with_abstract), (q4, without)):
        task, = runner.plan_tasks(out, [config], ["accuracy"], settings)
        kept.append(_raw(task, settings))
    monkeypatch.setattr(report, "render", lambda *a, **k: None)
    results = report.build(out, [f16, q4], Settings(profile="x86-avx2"), kept, {}, {}, [], measured=set())
    differ = results["eval_settings_differ"]
    assert set(differ) == {"f16", "q4_k_m"} and differ["f16"]["eval_context"] != differ["q4_k_m"]["eval_context"]
    results["configs"][0]["accuracy"] = {"n": 1}  # the section is rendered where a result has figures
    md = "\n".join(scores.markdown(results, report._table))
    assert "measured with different settings" in md and "- `f16`: " in md and "- `q4_k_m`: " in md
    same, = [r for r in kept if r["config"]["name"] == "f16"]
    alike = report.build(out, [f16], Settings(profile="x86-avx2"), [same], {}, {}, [], measured=set())
    assert alike["eval_settings_differ"] is None


@pytest.mark.parametrize("other, differs", [
    ({"eval_n": 100}, False),                              # a smaller draw of the same items
    ({"eval_sizes": (50, 300)}, False),                    # ... sized per file
    ({"eval_n": 100, "eval_threads": 8}, False),           # threads do not change a score
    ({"seed": 1}, True),
    ({"eval_context": True}, True),
    ({"eval_score": "both"}, True),
    ({"eval_ctx": 2048}, True),
    ({"evals": ("/data/medagentsbench/medqa/test.jsonl",), "eval_n": 100}, True),
])
def test_only_the_draw_size_is_no_difference_in_accuracy_settings(gguf, tmp_path, monkeypatch, other, differs):
    """An F16 result kept from a 100-item draw beside a Q4_K_M one of 300 was flagged 'measured with different
    settings', though a larger draw extends the same items and pairs are over the items both have."""
    out = tmp_path / "out"
    f16 = Config("f16", "gguf", str(_file(tmp_path / "artifacts" / "f16.gguf", b"GGUF" + b"\1" * 60)))
    q4 = Config("q4_k_m", "gguf", str(gguf))
    evals = ("/data/medagentsbench/medqa/test.jsonl", "/data/pubmedqa/ori_pqal.json")
    base = dict(profile="x86-avx2", evals=evals, eval_n=300)
    mine, theirs = Settings(**base), Settings(**{**base, **other})
    kept = []
    for config, settings in ((f16, theirs), (q4, mine)):
        task, = runner.plan_tasks(out, [config], ["accuracy"], settings)
        kept.append(_raw(task, settings))
    assert kept[0]["key"]["settings_sha256"] != kept[1]["key"]["settings_sha256"]  # each keyed by its own draw
    monkeypatch.setattr(report, "render", lambda *a, **k: None)
    results = report.build(out, [f16, q4], Settings(profile="x86-avx2"), kept, {}, {}, [], measured=set())
    assert (results["eval_settings_differ"] is not None) == differs


# -- the scoring rules' version ----------------------------------------------------------------------------
def test_records_of_an_earlier_scoring_version_are_not_resumed(tmp_path):
    """Version 9 changed what a reply scores (a hedge a few words on is no answer) and what a model without a system
    role is asked (the system text folded in): records of version 8 resumed, and the phase appended new-rule records
    beside old-rule ones."""
    plain = _file(tmp_path / "a" / "q4_k_m.gguf", b"GGUF" + b"\3" * 60)
    settings = Settings(profile="x86-avx2", evals=("medqa.jsonl",), eval_score="both")
    task, = runner.plan_tasks(tmp_path / "out", [Config("q4_k_m", "gguf", str(plain))], ["accuracy"], settings)
    items = [Item("medqa:0", "medqa", "q", {"A": "x", "B": "y"}, "A")]
    records = tmp_path / "records.jsonl"
    _records(records, plain, items, key=beyond_settings(task.key), score="both")
    assert accuracy.records_resume(records, task.key, settings)  # the same rules: resumed
    _records(records, plain, items, key=beyond_settings(task.key), score="both", version=8)
    assert accuracy.RECORDS_VERSION >= 9 and not accuracy.records_resume(records, task.key, settings)


def test_an_accuracy_result_of_earlier_scoring_rules_is_measured_again_and_its_timing_kept(gguf, tmp_path, monkeypatch):
    """A stored accuracy result kept its key across a change of the scoring rules, and was reported beside new ones:
    the accuracy key holds the records version; a timing result, which those rules do not touch, is kept."""
    out, config = tmp_path / "out", Config("q4_k_m", "gguf", str(gguf))
    settings = Settings(profile="x86-avx2", evals=("medqa.jsonl",))
    planned = runner.plan_tasks(out, [config], ["timing", "accuracy"], settings)
    timing, acc = sorted(planned, key=lambda t: t.phase != "timing")
    assert acc.key["records_version"] == accuracy.RECORDS_VERSION and "records_version" not in timing.key
    for task in planned:
        _file(task.raw, json.dumps(_raw(task, settings)).encode())

    monkeypatch.setattr(keys, "RECORDS_VERSION", accuracy.RECORDS_VERSION + 1)  # the rules change again
    again = {t.phase: t for t in runner.plan_tasks(out, [config], ["timing", "accuracy"], settings)}
    assert runner.load_raw(again["accuracy"].raw, again["accuracy"].key) is None  # measured again
    assert runner.load_raw(again["timing"].raw, again["timing"].key) is not None  # kept
    timing_only = runner.plan_tasks(out, [config], ["timing"], settings)
    assert runner.earlier_results(out, [config], settings, timing_only) == []  # not reported beside new ones


PINNED = {"mcq": Item("medqa:pin", "medqa", "Which vitamin deficiency causes scurvy?",
                      {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"}, "C"),
          "pubmedqa": Item("pubmedqa:pin", "pubmedqa", "Does the drug lower mortality?",
                           {"A": "yes", "B": "no", "C": "maybe"}, "A", context="A trial of 900 patients.")}


def test_the_scoring_rules_pinned_beside_the_records_version_still_hold():
    """What the contract reads from a few replies, as the harness parses a generated answer (``score_item``): a
    change to it without a new RECORDS_VERSION resumes records scored by the old rules beside new ones."""
    from edgemed.templates import get_template

    version, table = accuracy.RECORDS_PARSES
    assert version == accuracy.RECORDS_VERSION, (
        f"RECORDS_VERSION is {accuracy.RECORDS_VERSION} but RECORDS_PARSES pins the verdicts of version {version}: "
        "check each verdict under the new rules and write the new version into RECORDS_PARSES")
    changed = []
    for name, reply, verdict in table:
        tpl = get_template(name)
        parsed = tpl.parse(reply, accuracy.template_inputs(tpl, PINNED[name]))
        if (parsed.value if parsed.ok else None) != verdict:
            changed.append(f"{name} {reply!r}: {verdict!r} -> {parsed.value if parsed.ok else None!r}")
    assert not changed, (
        "the contract now reads these replies otherwise, so records written before score by other rules: raise "
        f"RECORDS_VERSION to {version + 1} (benchmarks/harness/accuracy.py, with a line saying what changed) and update "
        "RECORDS_PARSES (its version and these verdicts):\n" + "\n".join(changed))
