"""A bench folder's report rebuilt on another machine (``python -m edgemed.benchmarks.harness.report OUT`` on a
laptop): the device's own profile and llama.cpp build are not there, and the report still renders, with the
accuracy phase still going shown from its records, checked against what the folder's results store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from edgemed import __version__  # noqa: E402
from edgemed.benchmarks.harness import report, runner  # noqa: E402
from edgemed.benchmarks.harness.accuracy import RECORDS_VERSION, item_digest  # noqa: E402
from edgemed.benchmarks.harness.child import RAW_SCHEMA  # noqa: E402
from edgemed.benchmarks.harness.configs import Config, Settings  # noqa: E402
from edgemed.benchmarks.harness.datasets import load_eval_set  # noqa: E402
from edgemed.files.hashing import file_sha256  # noqa: E402

MACHINE = {"cpu": "device cpu", "platform": "aarch64", "physical_cores": 6, "logical_cores": 6, "memory_bytes": 8 << 30,
           "os": "Linux", "python": "3", "versions": {}, "llama_cpp_system_info": None}
BANDWIDTH = {"threads": 2, "read": {"bytes_per_s": 2e10, "threads": 2, "buffer_bytes": 1 << 30, "method": "test", "repeats": 7},
             "copy": {"bytes_per_s": 3e10, "threads": 2, "buffer_bytes": 1 << 30, "method": "test", "repeats": 7}}
QA = [{"realidx": i, "question": q, "options": dict(zip("ABCD", opts)), "answer_idx": a} for i, (q, opts, a) in enumerate([
    ("Which drug is first-line for anaphylaxis?", ["Adrenaline", "Aspirin", "Insulin", "Warfarin"], "A"),
    ("Which organ makes insulin?", ["Liver", "Pancreas", "Kidney", "Lung"], "B"),
    ("Normal adult resting heart rate?", ["20 bpm", "200 bpm", "60-100 bpm", "5 bpm"], "C")])]


def _json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_a_folder_measured_under_a_profile_this_machine_lacks_renders_here(tmp_path):
    """Measured on a clinic box under its own profile 'clinic-box' (unknown here) with its own llama.cpp build: the
    rebuild raised "No device profile named 'clinic-box'" resolving the profile again; it renders, and shows the
    running accuracy phase from the records of this artifact under the key the folder's timing result stores."""
    out = tmp_path / "bench"
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\1" * 60)
    qa = tmp_path / "mcq.jsonl"
    qa.write_text("".join(json.dumps(row) + "\n" for row in QA))
    config = Config("m", "gguf", str(model))
    settings = Settings(profile="clinic-box", threads=2, runs=2, warmup=0, max_tokens=4, evals=(str(qa),), eval_n=3)
    key = {"model_sha256": file_sha256(model), "profile": "clinic-box", "profile_sha256": "c" * 64,
           "edgemed_version": __version__, "methods_version": runner.METHODS_VERSION,
           "runtime": {"llama-cpp-python": "0.3.36", "native_sha256": "d" * 64}}  # the device's build, not this one
    stat = {"n": 2, "mean": 1.0, "stdev": 0.0, "cv": 0.0, "min": 1.0, "p50": 1.0, "p90": 1.0, "p99": 1.0, "max": 1.0}
    timing = {"runtime": "llama.cpp", "model_bytes": 64, "load_s": 0.1, "peak_rss_bytes": 100 << 20,
              "weights": {"n_params": 1000, "weight_bytes": 2000}, "bytes_per_token": 1e6,
              "runtime_settings": {"n_threads": 2}, "prompt_tokens": [60], "warmup_runs": [],
              "runs": [{"new_tokens": 4}] * 2,
              "summary": {m: stat for m in ("ttft_s", "tpot_s", "e2e_s", "prefill_tok_s", "decode_tok_s")}}
    _json(out / "raw" / "m-timing.json", {"schema": RAW_SCHEMA, "config": config.to_dict(), "phase": "timing",
                                          "key": {**key, "settings_sha256": settings.digest("timing")},
                                          "settings": settings.to_dict(), "started": 1.7e9, "finished": 1.7e9 + 60,
                                          "pid": 1, "result": timing})
    _json(out / "raw" / "bandwidth.json", BANDWIDTH)
    _json(out / "machine.json", MACHINE)
    _json(out / "results.json", {"settings": settings.to_dict(), "configs": [{"name": "m", "kind": "gguf",
                                                                            "path": str(model)}], "failed": []})
    items = load_eval_set(settings.evals, settings.eval_counts, settings.seed, context=settings.eval_context)

    def records(sha: str) -> None:  # the accuracy phase still going on the device: its records so far
        meta = {"version": RECORDS_VERSION, "artifact": {"name": "m.gguf", "bytes": 64, "sha256": sha},
                "key": {**key, "model_sha256": sha, "records_version": RECORDS_VERSION}}
        rows = [{"id": it.id, "dataset": it.dataset, "gold": it.answer, "logit_pred": it.answer, "item_sha": item_digest(it)}
                for it in items]
        (out / "raw" / "m-accuracy.records.jsonl").write_text("\n".join(json.dumps(r) for r in [{"meta": meta}, *rows]))

    records(file_sha256(model))
    results = report.rebuild(out)
    accuracy = results["configs"][0]["accuracy"]
    assert accuracy["n"] == 3 and accuracy["partial"] is True
    assert "| m | 3 (partial) |" in (out / "report.md").read_text()
    assert results["profile"] == "clinic-box" and json.loads((out / "results.json").read_text())["configs"][0]["accuracy"]

    records("0" * 64)  # another file's records left under the name: still not its accuracy
    assert report.rebuild(out)["configs"][0]["accuracy"] is None
