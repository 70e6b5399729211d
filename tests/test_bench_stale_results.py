"""Results of one thing reported as another's: a quant's divergence measured against the logits of an earlier F16
(its re-measure failed), an accuracy goal met "on the same items" with no item in common, and another artifact's
accuracy records shown as this one's partial accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
np = pytest.importorskip("numpy")

from edgemed.benchmarks.harness import divergence, runner  # noqa: E402
from edgemed.benchmarks.harness.child import RAW_SCHEMA  # noqa: E402
from edgemed.benchmarks.harness.configs import Config, Settings  # noqa: E402

# raw/bandwidth.json as a run leaves it: no bandwidth is measured here
BANDWIDTH = {"threads": 1, "read": {"bytes_per_s": 2e10, "threads": 1, "buffer_bytes": 1 << 30, "method": "numpy.maximum.reduce",
                                    "repeats": 7},
             "copy": {"bytes_per_s": 3e10, "threads": 1, "buffer_bytes": 256 << 20, "method": "numpy.copyto", "repeats": 7}}
SETTINGS = Settings(profile="x86-avx2", threads=1)


def _file(path: Path, body: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return path


class FakeChild:
    """Stands in for the measuring child (``runner._run_child``): writes a divergence raw result and, for the
    reference, its logits file under the task's key; ``fail`` names tasks whose child fails before writing anything."""

    def __init__(self, fail=()):
        self.ran, self.fail = [], set(fail)

    def __call__(self, task, settings, out, progress, *rest, **kw):
        label = f"{task.config.name}-{task.phase}"
        self.ran.append(label)
        if label in self.fail:
            return False, "exit 1: killed by the test"
        if task.config.name == "f16":
            meta = {"format": divergence.FORMAT, "key": task.key}
            with open(out / "raw" / "f16-reference.npz", "wb") as fh:
                np.savez(fh, meta=np.array(json.dumps(meta)))
        raw = {"schema": RAW_SCHEMA, "config": task.config.to_dict(), "phase": task.phase, "key": task.key,
               "settings": settings.to_dict(), "started": 1.0, "finished": 2.0, "pid": 1,
               "result": {"reference": "f16", "kld_mean": 0.05}}
        task.raw.write_text(json.dumps(raw))
        return True, ""


@pytest.fixture()
def bench(tmp_path, monkeypatch):
    out = tmp_path / "bench"
    _file(out / "raw" / "bandwidth.json", json.dumps(BANDWIDTH).encode())
    f16 = _file(tmp_path / "artifacts" / "f16.gguf", b"GGUF" + b"\1" * 60)
    q4 = _file(tmp_path / "artifacts" / "q4_k_m.gguf", b"GGUF" + b"\2" * 60)
    configs = [Config("f16", "gguf", str(f16)), Config("q4_k_m", "gguf", str(q4))]

    def run(child: FakeChild) -> dict:
        monkeypatch.setattr(runner, "_run_child", child)
        return runner.run(out, configs, SETTINGS, ["divergence"], progress=False, echo=lambda s: None)
    return out, f16, run


def test_a_quant_is_not_compared_with_the_logits_of_an_earlier_reference(bench):
    """F16 reconverted, and its divergence fails this run: the old F16's logits are still there, and the quant was
    compared with them under the new F16's digest, then kept by every later run as measured."""
    out, f16, run = bench
    first = run(FakeChild())
    assert first["failed"] == [] and first["run"]["measured"] == ["f16-divergence", "q4_k_m-divergence"]

    f16.write_bytes(b"GGUF" + b"\3" * 60)  # another F16: the quant's key (reference_sha256) changes with it
    child = FakeChild(fail={"f16-divergence"})
    second = run(child)
    assert child.ran == ["f16-divergence"]  # the quant's child is not started against the earlier logits
    failed = {f["task"]: f["error"] for f in second["failed"]}
    assert set(failed) == {"f16-divergence", "q4_k_m-divergence"}
    assert "reference logits of the current f16 were not written" in failed["q4_k_m-divergence"]
    assert all(e["divergence"] is None for e in second["configs"])  # nothing reported against the wrong F16

    child = FakeChild()  # the next run measures both, the quant against the new reference
    assert run(child)["failed"] == [] and child.ran == ["f16-divergence", "q4_k_m-divergence"]


def test_a_reference_whose_logits_file_is_not_of_its_key_is_measured_again(bench):
    """A raw result alone does not make the reference current: a logits file of no key (an earlier edgemed) or of
    another one is written again before a quant is compared with it, not refused by every quant forever."""
    out, f16, run = bench
    run(FakeChild())
    with open(out / "raw" / "f16-reference.npz", "wb") as fh:  # as an earlier edgemed wrote it: no key
        np.savez(fh, meta=np.array(json.dumps({"format": divergence.FORMAT})))
    child = FakeChild()
    again = run(child)
    assert child.ran == ["f16-divergence"] and again["failed"] == []  # the quant's result is of the same F16: kept
    assert divergence.reference_key(out / "raw" / "f16-reference.npz")["model_sha256"] == again["configs"][0]["keys"]["divergence"]["model_sha256"]
    child = FakeChild()
    assert run(child)["run"]["resumed"] == ["f16-divergence", "q4_k_m-divergence"] and child.ran == []


@pytest.mark.parametrize("paired, why", [
    ({"reference": "f16", "n": 0, "excluded": 0}, "they were scored on different items"),   # another --seed
    ({"reference": "f16", "n": 0, "excluded": 6}, "the 6 ids they share were asked differently"),  # abstract or not
    (None, "they were scored on different items"),                                    # no records to pair
])
def test_the_accuracy_goal_is_not_met_on_the_same_items_when_no_item_was_paired(paired, why):
    """F16 and Q4_K_M scored on different draws: the goal read "16.7 points above | yes" under a label saying "same
    items", from two accuracies over different questions."""
    from edgemed.benchmarks.harness.goals import check_goals

    q4 = {"n": 6, "acc_logit": 2 / 6, **({"paired_vs_reference": paired} if paired else {})}
    results = {"configs": [{"name": "f16", "accuracy": {"n": 6, "acc_logit": 1 / 6}}, {"name": "q4_k_m", "accuracy": q4}]}
    row, = [r for r in check_goals(results) if r[0].startswith("Q4_K_M accuracy")]
    assert row[1] == "—" and row[2].startswith("not shown: no items in common") and why in row[2]
    assert "--seed" in row[2] and "yes" not in row[2]
    results["configs"][0]["accuracy"] = None  # F16 not scored: no accuracy goal at all
    assert not [r for r in check_goals(results) if r[0].startswith("Q4_K_M accuracy")]


QA = [{"realidx": i, "question": q, "options": dict(zip("ABCD", opts)), "answer_idx": a} for i, (q, opts, a) in enumerate([
    ("Which drug is first-line for anaphylaxis?", ["Adrenaline", "Aspirin", "Insulin", "Warfarin"], "A"),
    ("Which organ makes insulin?", ["Liver", "Pancreas", "Kidney", "Lung"], "B"),
    ("Normal adult resting heart rate?", ["20 bpm", "200 bpm", "60-100 bpm", "5 bpm"], "C")])]


def test_a_partial_accuracy_comes_only_from_this_artifacts_records_of_this_draw(tmp_path, monkeypatch):
    """Another file benchmarked under the same configuration name left its records: a timing-only run reported them
    as this file's partial accuracy; records asked another way (PubMedQA with its abstract) were reported likewise."""
    from edgemed.benchmarks.harness import report
    from edgemed.benchmarks.harness.accuracy import RECORDS_VERSION, item_digest
    from edgemed.benchmarks.harness.datasets import load_eval_set

    out = tmp_path / "bench"
    (out / "raw").mkdir(parents=True)
    config = Config("m", "gguf", str(_file(tmp_path / "m.gguf", b"GGUF" + b"\1" * 60)))
    qa = _file(tmp_path / "mcq.jsonl", "".join(json.dumps(row) + "\n" for row in QA).encode())
    drawing = Settings(profile="x86-avx2", threads=1, evals=(str(qa),), eval_n=3)
    items = load_eval_set(drawing.evals, drawing.eval_counts, drawing.seed, context=drawing.eval_context)
    monkeypatch.setattr(report, "render", lambda *a, **k: None)

    def write(sha: str, key: dict, asked=lambda item: item_digest(item)) -> None:
        meta = {"version": RECORDS_VERSION, "artifact": {"name": "m.gguf", "bytes": 64, "sha256": sha}, "key": key}
        rows = [{"id": it.id, "dataset": it.dataset, "gold": it.answer, "logit_pred": it.answer, "item_sha": asked(it)}
                for it in items]
        (out / "raw" / "m-accuracy.records.jsonl").write_text("\n".join(json.dumps(r) for r in [{"meta": meta}, *rows]))

    def partial(settings: Settings) -> dict | None:
        return report.build(out, [config], settings, [], {}, {}, [], measured=set())["configs"][0]["accuracy"]

    timing_only = Settings(profile="x86-avx2", threads=1)
    write("0" * 64, {"model_sha256": "0" * 64})  # another m.gguf's records
    assert partial(timing_only) is None and partial(drawing) is None
    key = report._accuracy_keys([config], drawing, [])["m"]
    assert key["model_sha256"] != "0" * 64 and "settings_sha256" not in key
    write(key["model_sha256"], {**key, "profile": "jetson-orin-nano-8gb"})  # this file, under another profile
    assert partial(timing_only) is None
    write(key["model_sha256"], key)  # its own: shown, marked partial
    assert partial(timing_only)["n"] == 3 and partial(drawing)["partial"] is True
    write(key["model_sha256"], key, asked=lambda it: item_digest(it) if it.id == items[0].id else "asked-otherwise")
    assert partial(drawing)["n"] == 1  # only the item asked as this draw asks it
    assert partial(timing_only)["n"] == 3  # no draw this run: the records' own items
