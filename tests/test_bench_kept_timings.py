"""Results a bench run keeps from earlier runs (their phase left out of ``--phases``) are described by the settings
they were measured with, and timings measured with other settings are not compared: no reduction between them, and
each roofline against the read bandwidth at its own decode threads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgemed.benchmarks.harness import report, runner, scores
from edgemed.benchmarks.harness.child import RAW_SCHEMA
from edgemed.benchmarks.harness.configs import Config, Settings
from edgemed.benchmarks.harness.stats import summary

MACHINE = {"cpu": "test cpu", "platform": "x86", "physical_cores": 2, "logical_cores": 2, "memory_bytes": 8 << 30,
           "os": "Linux", "python": "3", "versions": {}, "llama_cpp_system_info": None}


def _bw(threads: int, read_gb_s: float) -> dict:
    figure = {"method": "test", "buffer_bytes": 1 << 30, "threads": threads, "repeats": 7}
    return {"threads": threads, "read": {**figure, "bytes_per_s": read_gb_s * 1e9},
            "copy": {**figure, "bytes_per_s": 2 * read_gb_s * 1e9}}


@pytest.fixture()
def configs(tmp_path):
    made = []
    for name, byte in (("f16", b"\1"), ("q4_k_m", b"\2")):
        path = tmp_path / "artifacts" / f"{name}.gguf"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"GGUF" + byte * 60)
        made.append(Config(name, "gguf", str(path)))
    return made


def _timed(out: Path, config: Config, configs: list[Config], settings: Settings, peak_mib: int, e2e: float) -> dict:
    """A timing raw result as a child writes it, keyed as the runner keys it, measured with ``settings``."""
    task, = runner.plan_tasks(out, [config], ["timing"], settings)
    def stat(v):
        return summary([v] * settings.runs)
    result = {"runtime": "llama.cpp", "model_bytes": (peak_mib // 2) << 20, "load_s": 0.1,
              "peak_rss_bytes": peak_mib << 20, "weights": {"n_params": 1000, "weight_bytes": 2000},
              "bytes_per_token": 1e9, "runtime_settings": {"n_threads": settings.threads}, "prompt_tokens": [60],
              "warmup_runs": [], "runs": [{"new_tokens": settings.max_tokens}] * settings.runs,
              "summary": {"ttft_s": stat(e2e / 4), "tpot_s": stat(e2e / 80), "e2e_s": stat(e2e),
                          "prefill_tok_s": stat(200.0), "decode_tok_s": stat(10.0 / e2e)}}
    return {"schema": RAW_SCHEMA, "config": config.to_dict(), "phase": "timing", "key": task.key,
            "settings": settings.to_dict(), "started": 1_764_000_000.0, "finished": 1_764_000_060.0, "pid": 1,
            "result": result}


def _build(out, configs, settings, raws, bw, monkeypatch, **kw) -> tuple[dict, str]:
    monkeypatch.setattr(report, "render", lambda *a, **k: None)
    results = report.build(out, configs, settings, raws, MACHINE, bw, [], **kw)
    return results, report.to_markdown(results, [])


def test_no_reduction_between_timings_measured_with_other_threads(configs, tmp_path, monkeypatch):
    """f16 timed with 1 thread and q4_k_m re-timed with 2, both kept by a run that measures accuracy only: the
    memory and latency reductions are not computed, and the report says why and how to time them alike."""
    out, f16, q4 = tmp_path / "out", *configs
    one, two = Settings(profile="x86-avx2", threads=1), Settings(profile="x86-avx2", threads=2)
    raws = [_timed(out, f16, configs, one, 300, 2.0), _timed(out, q4, configs, two, 120, 3.0)]
    results, md = _build(out, configs, one, raws, _bw(1, 10.0), monkeypatch)
    red = {e["name"]: e for e in results["configs"]}["q4_k_m"]["reductions"]["f16"]
    assert red["memory"] is None and red["latency"] is None and red["decode_speedup"] is None
    assert red["not_compared"] == "threads 2 vs 1" and red["model_bytes"] == pytest.approx(1 - 60 / 150)
    row = next(line for line in md.splitlines() if line.startswith("| q4_k_m | not shown"))
    assert "+60.0 %" not in row and "64.7 % / 12.4 %" in row
    assert "`q4_k_m` vs `f16`: not shown, timed with other settings (threads 2 vs 1)" in md and "--phases timing" in md
    assert "memory_reduction_vs_f16" not in {k for r in report.csv_rows(results) for k, v in r.items() if v is not None}
    # the header states no one thread count for both: each configuration's settings are listed
    header = next(line for line in md.splitlines() if line.startswith("edgemed "))
    assert "threads" not in header and "Timing settings differ between configurations" in header
    assert results["timing_settings"] is None and results["timing_settings_differ"]["q4_k_m"]["threads"] == 2
    assert "| q4_k_m | 5 | 1 | 64 | 2 | 2048 | 0 |" in md and "| f16 | 5 | 1 | 64 | 1 | 2048 | 0 |" in md

    # timed alike: compared as before
    raws[1] = _timed(out, q4, configs, one, 120, 3.0)
    results, md = _build(out, configs, one, raws, _bw(1, 10.0), monkeypatch)
    red = {e["name"]: e for e in results["configs"]}["q4_k_m"]["reductions"]["f16"]
    assert red["memory"] == pytest.approx(0.6) and red["latency"] == pytest.approx(-0.5) and "not_compared" not in red
    assert "| q4_k_m | +60.0 % | -50.0 % |" in md and results["timing_settings_differ"] is None


def test_kept_results_are_described_by_the_settings_they_were_measured_with(configs, tmp_path, monkeypatch):
    """A timing kept from a run of 2 runs, 4 tokens and 1 thread is headed so (not with this run's 5 runs, 64 tokens
    and 2 threads), its roofline is against the 1-thread ceiling, and accuracy asked with the PubMedQA abstract is
    described as asked with it although this run's settings leave the abstract out."""
    pytest.importorskip("matplotlib")
    from edgemed.benchmarks.harness import plots

    out, q4 = tmp_path / "out", configs[1]
    earlier = Settings(profile="x86-avx2", threads=1, runs=2, warmup=0, max_tokens=4)
    evals = ("/data/pubmedqa/ori_pqal.json",)
    asked = Settings(profile="x86-avx2", threads=1, evals=evals, eval_n=3, eval_context=True)
    acc, = runner.plan_tasks(out, [q4], ["accuracy"], asked)
    acc_raw = {"schema": RAW_SCHEMA, "config": q4.to_dict(), "phase": "accuracy", "key": acc.key,
               "settings": asked.to_dict(), "started": 1_764_000_000.0, "finished": 1_764_000_060.0, "pid": 1,
               "result": {"n": 3, "acc_logit": 1 / 3}}
    raws = [_timed(out, q4, configs, earlier, 120, 2.0), acc_raw]
    now = Settings(profile="x86-avx2", threads=2, evals=evals, eval_n=3, eval_context=False)

    # no figure at its threads in the folder (a report rebuilt without measuring): no ceiling, not this run's
    results, md = _build(out, [q4], now, raws, _bw(2, 20.0), monkeypatch)
    assert "2 timed runs after 0 warm-up per configuration, 4 new tokens, 1 threads" in md
    assert "5 timed runs" not in md and "64 new tokens" not in md
    assert plots.latency_bars(results).axes[0].get_title() == "Single-stream latency: 4 new tokens, p50 of 2 runs"
    assert results["eval_settings"]["eval_context"] is True
    accuracy = "\n".join(scores.markdown(results, report._table))
    assert "PubMedQA asked with its abstract" in accuracy and "question only" not in accuracy
    assert results["configs"][0]["roofline"]["ceiling_tok_s"] is None
    assert "No read bandwidth was measured in this folder at the thread count q4_k_m (1 threads)" in md

    # the folder has the figure at 1 thread: the ceiling is that one
    results, md = _build(out, [q4], now, raws, _bw(2, 20.0), monkeypatch, other_bandwidths=[_bw(1, 8.0)])
    entry, = results["configs"]
    assert entry["roofline"]["threads"] == 1 and entry["roofline"]["ceiling_tok_s"] == pytest.approx(8.0)
    assert "At 1 threads, for the timings decoded with them:" in md and "Read bandwidth 8.0 GB/s (1 threads" in md


def test_the_runner_measures_the_bandwidth_at_a_kept_timings_threads(configs, tmp_path, monkeypatch):
    from edgemed.benchmarks.harness import roofline

    calls = []
    monkeypatch.setattr(roofline, "stream_read_bandwidth", lambda threads: calls.append(threads) or _bw(threads, 5.0)["read"])
    monkeypatch.setattr(roofline, "stream_copy_bandwidth", lambda threads: _bw(threads, 5.0)["copy"])
    out = tmp_path / "out"
    (out / "raw").mkdir(parents=True)
    (out / "raw" / "bandwidth.json").write_text(json.dumps(_bw(2, 20.0)))  # the run's, measured first
    raws = [_timed(out, configs[0], configs, Settings(profile="x86-avx2", threads=2), 300, 2.0),
            _timed(out, configs[1], configs, Settings(profile="x86-avx2", threads=3), 120, 2.0)]
    others = runner.other_bandwidths(out, raws, _bw(2, 20.0))
    assert [b["threads"] for b in others] == [3] and calls == [3]
    assert json.loads((out / "raw" / "bandwidth-3-threads.json").read_text())["read"]["threads"] == 3
    assert runner.other_bandwidths(out, raws, _bw(2, 20.0)) == others and calls == [3]  # measured once per folder
    assert json.loads((out / "raw" / "bandwidth.json").read_text()) == _bw(2, 20.0)  # the other count's: kept


def test_each_thread_counts_bandwidth_is_measured_once_and_report_only_measures_none(configs, tmp_path, monkeypatch):
    """A kept timing's roofline moved from run to run (46 % -> 43 % -> 39 %): a run with other threads measured
    bandwidth.json again over the kept count's figure, the kept count was measured again beside it, and
    --report-only (for use while a long run goes on) measured too. Each count is now measured once, only where none
    is on file, never with --report-only."""
    from edgemed.benchmarks.harness import machine, roofline

    calls = []  # a bandwidth that differs at each measurement, as a real one does

    def read(threads):
        calls.append(threads)
        return _bw(threads, 10.0 + len(calls))["read"]

    monkeypatch.setattr(roofline, "stream_read_bandwidth", read)
    monkeypatch.setattr(roofline, "stream_copy_bandwidth", lambda threads: _bw(threads, 5.0)["copy"])
    monkeypatch.setattr(machine, "describe", lambda profile=None: dict(MACHINE))
    monkeypatch.setattr(report, "render", lambda *a, **k: None)

    def child(task, settings, out, progress, reference_key=None):  # a timing as a child writes it, at the run's threads
        raw = _timed(out, task.config, configs, settings, 120, 2.0)
        task.raw.write_text(json.dumps({**raw, "key": task.key}))
        return True, ""

    monkeypatch.setattr(runner, "_run_child", child)
    out, q4 = tmp_path / "out", configs[1]

    def run(threads: int, phases: list[str], measure: bool = True) -> dict:
        results = runner.run(out, [q4], Settings(profile="x86-avx2", threads=threads), phases, progress=False,
                             echo=lambda s: None, measure=measure)
        return results["configs"][0]["roofline"]

    def files() -> dict:
        return {p.name: p.read_text() for p in sorted((out / "raw").glob("bandwidth*.json"))}

    first = run(1, ["timing"])
    assert calls == [1] and first["threads"] == 1 and first["fraction"]
    on_file = files()
    assert run(2, []) == first and calls == [1] and files() == on_file  # the kept 1-thread timing: its figure
    assert run(2, [], measure=False) == first and run(1, [], measure=False) == first
    assert calls == [1] and files() == on_file
    again = run(2, ["timing"])  # a timing at 2 threads: that count measured, beside the 1-thread one
    assert calls == [1, 2] and again["threads"] == 2 and files()["bandwidth.json"] == on_file["bandwidth.json"]
    assert run(2, ["timing"]) == again and calls == [1, 2]  # on file: not measured again

    out = tmp_path / "new"  # --report-only on a new folder: no figure, no roofline, still a bench's folder
    assert run(1, ["timing"], measure=False)["fraction"] is None and calls == [1, 2] and runner.made_by_bench(out)
    assert run(1, ["timing"])["fraction"] and calls == [1, 2, 1]


def test_a_goal_over_timings_measured_with_other_settings_is_not_shown(configs, tmp_path, monkeypatch):
    """The peak-RSS, decode and e2e goals are ratios of two timings: over an F16 (and an HF baseline) timed with 1
    thread and a Q4_K_M re-timed with 2 they read "yes" / "no" as if measured alike; they say why they are not shown
    and how to time both alike, and are checked again once both are timed alike."""
    from edgemed.benchmarks.harness.goals import check_goals

    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    hf = Config("hf-fp32", "hf", str(checkpoint), "float32")
    out, (f16, q4), every = tmp_path / "out", configs, [*configs, hf]
    one, two = Settings(profile="x86-avx2", threads=1), Settings(profile="x86-avx2", threads=2)
    base = [_timed(out, f16, every, one, 300, 2.0), _timed(out, hf, every, one, 900, 40.0)]

    def goals(q4_settings: Settings) -> dict[str, list[str]]:
        results, md = _build(out, every, one, [*base, _timed(out, q4, every, q4_settings, 120, 4.0)], _bw(1, 10.0),
                             monkeypatch)
        return {row[0]: row for row in check_goals(results)}

    apart = goals(two)
    for label in ("Q4_K_M peak RSS <= 35 % of F16's", "Q4_K_M decode >= 2.5x F16",
                  "Q4_K_M e2e latency <= 15 % of HF-torch fp32"):
        _, measured, met = apart[label]
        assert measured == "—" and met.startswith("not shown: timed with other settings (threads 2 vs 1)")
        assert "--phases timing" in met and "yes" not in met and "no" not in met.split()
    alike = goals(one)  # the same settings: each goal checked on its figures (120 of 300 MiB is 40 %: not met)
    assert alike["Q4_K_M peak RSS <= 35 % of F16's"][1:] == ["40.0 %", "**no**"]
    assert alike["Q4_K_M decode >= 2.5x F16"][1:] == ["0.50x", "**no**"]
    assert alike["Q4_K_M e2e latency <= 15 % of HF-torch fp32"][1:] == ["10.0 %", "yes"]
