"""``edgemed bench``: the harness end to end on a tiny model — schema, warm-up exclusion, resume after a kill, plots."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")
pytest.importorskip("matplotlib")

from click.testing import CliRunner  # noqa: E402

from edgemed.benchmarks.harness import artifacts, report, roofline, stats  # noqa: E402
from edgemed.cli import cli  # noqa: E402
from edgemed.converters.pipeline import ConvertOptions, convert  # noqa: E402
from edgemed.errors import InputError  # noqa: E402

import tiny  # noqa: E402

FAST = ["--runs", "3", "--warmup", "2", "--max-tokens", "8", "--threads", "1", "--ctx", "256"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random Qwen2 checkpoint and its F16 / Q8_0 GGUFs in the reproduce layout (<out>/artifacts/)."""
    root = tmp_path_factory.mktemp("bench")
    src = tiny.build_model(root / "src", "qwen2")
    arts = root / "artifacts"
    arts.mkdir()
    for quant in ("f16", "q8_0"):
        convert(src, arts / f"{quant}.gguf", ConvertOptions(out_type=quant, parity=False), echo=lambda s: None)
    return {"src": src, "artifacts": arts}


def _with_artifacts(model, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(model["artifacts"], out / "artifacts")
    return out


def _run(args: list[str]) -> dict:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# -- pure pieces ----------------------------------------------------------------------------
def test_percentiles_match_numpy_and_wilson_is_known():
    np = pytest.importorskip("numpy")
    xs = [0.91, 0.87, 1.3, 0.95, 0.99, 0.9, 2.1]
    for q in (50, 90, 99):
        assert stats.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    s = stats.summary(xs)
    assert s["n"] == 7 and s["min"] == 0.87 and s["max"] == 2.1
    lo, hi = stats.wilson(8, 10)  # textbook value: 0.490 - 0.943
    assert (round(lo, 3), round(hi, 3)) == (0.49, 0.943)
    assert stats.reduction(35.3, 100.0) == pytest.approx(0.647)


def test_bytes_per_token_counts_one_embedding_row_unless_tied(model, tmp_path):
    tied = roofline.gguf_facts(model["artifacts"] / "f16.gguf")  # tiny qwen2 ties the head to the embedding
    assert tied.read_bytes == tied.weight_bytes
    untied_src = tiny.build_model(tmp_path / "llama", "llama")  # llama: separate output.weight
    out = tmp_path / "llama.gguf"
    convert(untied_src, out, ConvertOptions(out_type="f16", parity=False), echo=lambda s: None)
    facts = roofline.gguf_facts(out)
    embd = 384 * 64 * 2  # vocab x hidden, f16
    assert facts.read_bytes == facts.weight_bytes - embd + 64 * 2
    # K + V, 2 layers, 2 KV heads of 16, f16
    assert facts.kv_bytes_per_pos == 2 * 2 * (16 + 16) * 2


# -- end to end -----------------------------------------------------------------------------
def test_bench_run_schema_and_warmup_excluded(model, tmp_path):
    out = tmp_path / "run"
    results = _run(["bench", "run", str(model["artifacts"] / "q8_0.gguf"), *FAST, "-o", str(out), "--json"])
    assert results["schema"] == "edgemed.bench/1"
    assert {"machine", "bandwidth", "settings", "baselines", "paper", "configs", "failed"} <= set(results)
    assert results["failed"] == []
    (e,) = results["configs"]
    assert e["name"] == "q8_0" and e["runtime"] == "llama.cpp"
    assert e["keys"]["timing"]["model_sha256"] and e["keys"]["timing"]["profile"] and e["keys"]["timing"]["edgemed_version"]
    for metric in ("ttft_s", "tpot_s", "e2e_s", "prefill_tok_s", "decode_tok_s"):
        assert {"p50", "p90", "p99", "stdev", "min", "max"} <= set(e[metric]), metric
    assert e["peak_rss_bytes"] > 0 and e["model_bytes"] == (model["artifacts"] / "q8_0.gguf").stat().st_size
    assert 0 < e["roofline"]["fraction"] and e["bits_per_weight"] == pytest.approx(8.5, abs=0.6)

    # warm-up recorded apart and excluded: statistics come from exactly --runs timed requests
    raw = json.loads((out / "raw" / "q8_0-timing.json").read_text())["result"]
    assert len(raw["runs"]) == 3 and len(raw["warmup_runs"]) == 2
    assert e["n_runs"] == 3 and e["n_warmup"] == 2 and e["e2e_s"]["n"] == 3
    assert e["e2e_s"] == stats.summary([r["e2e_s"] for r in raw["runs"]])
    # a fixed token count: end-of-generation is masked, so every request makes exactly --max-tokens tokens
    assert {r["new_tokens"] for r in raw["runs"] + raw["warmup_runs"]} == {8}

    for name in ("results.json", "results.csv", "report.md", "machine.json"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "TTFT" in md and "Roofline" in md and "q8_0" in md
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"config", "peak_rss_mb", "e2e_s_p50", "decode_tok_s_p50", "roofline_fraction"} <= set(header)
    assert json.loads((out / "machine.json").read_text())["llama_cpp_system_info"]

    # --report-only measures nothing: a new folder's report lists the missing phase instead of measuring it
    other = tmp_path / "report-only"
    empty = _run(["bench", "run", str(model["artifacts"] / "q8_0.gguf"), *FAST, "-o", str(other), "--json", "--report-only"])
    assert not (other / "raw" / "q8_0-timing.json").exists()
    assert [f["task"] for f in empty["failed"]] == ["q8_0-timing"] and "not measured" in empty["failed"][0]["error"]
    assert (other / "report.md").is_file()


def test_reproduce_resumes_after_kill(model, tmp_path):
    """Kill a reproduction after its first result; the re-run measures only what is missing."""
    out = _with_artifacts(model, tmp_path / "repro")
    args = [sys.executable, "-m", "edgemed", "bench", "reproduce", str(model["src"]), "--quants", "f16,q8_0",
            "--baselines", "hf-fp32", "--phases", "timing", *FAST, "-o", str(out), "--json"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = out / "raw" / "f16-timing.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and the child it was waiting on
    proc.wait()
    assert first.exists(), "the first configuration never finished"
    assert not (out / "results.json").exists()
    stamp = first.stat().st_mtime_ns

    results = _run(["bench", "reproduce", str(model["src"]), "--quants", "f16,q8_0", "--baselines", "hf-fp32",
                    "--phases", "timing", *FAST, "-o", str(out), "--json"])
    assert "f16-timing" in results["run"]["resumed"] and "f16-timing" not in results["run"]["measured"]
    assert "hf-fp32-timing" in results["run"]["measured"]
    assert first.stat().st_mtime_ns == stamp
    by = {e["name"]: e for e in results["configs"]}
    assert set(by) == {"f16", "q8_0", "hf-fp32"} and results["failed"] == []
    assert by["hf-fp32"]["runtime"] == "torch" and by["hf-fp32"]["prompt_tokens"] == by["f16"]["prompt_tokens"]
    red = by["q8_0"]["reductions"]
    assert set(red) == {"f16", "hf-fp32"} and red["f16"]["memory"] is not None

    # a damaged result is measured again; the others are kept
    damaged = out / "raw" / "q8_0-timing.json"
    damaged.write_text(damaged.read_text()[:100])
    results = _run(["bench", "reproduce", str(model["src"]), "--quants", "f16,q8_0", "--baselines", "hf-fp32",
                    "--phases", "timing", *FAST, "-o", str(out), "--json"])
    assert results["run"]["measured"] == ["q8_0-timing"]
    # a changed setting is part of the key: everything is measured again
    changed = [a if a != "8" else "6" for a in FAST]
    results = _run(["bench", "reproduce", str(model["src"]), "--quants", "f16", "--baselines", "", "--phases", "timing",
                    *changed, "-o", str(out), "--json"])
    assert results["run"]["measured"] == ["f16-timing"]


def test_artifact_from_another_source_is_refused(model, tmp_path):
    out = _with_artifacts(model, tmp_path / "other")
    rep = out / "artifacts" / "f16.gguf.report.json"
    data = json.loads(rep.read_text())
    data["source"]["sha256"] = "0" * 64
    rep.write_text(json.dumps(data))
    with pytest.raises(InputError, match="another checkpoint"):
        artifacts.prepare(model["src"], out, ["f16"], [], {})
    assert [c.name for c in artifacts.prepare(model["src"], out, ["q8_0"], [], {})] == ["q8_0"]  # reused as is


# -- report and plots from a full results document -----------------------------------------
def _summary(p50):
    return {"n": 5, "mean": p50, "stdev": p50 * 0.05, "cv": 0.05, "min": p50 * 0.9, "p50": p50, "p90": p50 * 1.1,
            "p99": p50 * 1.2, "max": p50 * 1.25}


def _entry(name, kind, runtime, mb, peak_mb, e2e, dec, bits, acc=None, kld=None):
    e = {"name": name, "kind": kind, "runtime": runtime, "path": f"/x/{name}", "dtype": None, "keys": {}, "raw": {},
         "model_bytes": mb << 20, "load_s": 0.5, "peak_rss_bytes": peak_mb << 20, "n_params": 1_500_000_000,
         "weight_bytes": int(1.5e9 * bits / 8), "bytes_per_token": 1.5e9 * bits / 8, "prompt_tokens": [60],
         "new_tokens": 64, "n_runs": 5, "n_warmup": 1, "runtime_settings": {}, "ttft_s": _summary(e2e * 0.2),
         "tpot_s": _summary(e2e * 0.8 / 63), "e2e_s": _summary(e2e), "prefill_tok_s": _summary(300.0 / bits),
         "decode_tok_s": _summary(dec), "accuracy": None, "divergence": None}
    if acc is not None:
        e["accuracy"] = {"n": 600, "acc_logit": acc, "ci_logit": stats.wilson(int(acc * 600), 600), "acc_gen": acc - 0.02,
                         "ci_gen": stats.wilson(int((acc - 0.02) * 600), 600), "unparsed": 3,
                         "per_dataset": {"medmcqa": {"n": 300, "acc_logit": acc - 0.05, "ci_logit": stats.wilson(int((acc - 0.05) * 300), 300), "acc_gen": acc - 0.06},
                                         "pubmedqa": {"n": 300, "acc_logit": acc + 0.05, "ci_logit": stats.wilson(int((acc + 0.05) * 300), 300), "acc_gen": acc + 0.03}}}
    if kld is not None:
        e["divergence"] = {"reference": "f16", "kld_mean": kld, "kld_p99": kld * 8, "top1": 1 - kld * 3, "n_tokens": 900}
    return e


def test_report_and_plots_render(tmp_path):
    from edgemed.benchmarks.harness import machine
    from edgemed.benchmarks.harness.configs import PAPER, Settings
    from edgemed.benchmarks.harness.report import _derive

    entries = [_entry("f16", "gguf", "llama.cpp", 2950, 3300, 9.0, 7.5, 16.0, 0.42, 0.0),
               _entry("q8_0", "gguf", "llama.cpp", 1570, 1900, 5.5, 13.0, 8.5, 0.42, 0.002),
               _entry("q4_k_m", "gguf", "llama.cpp", 940, 1150, 3.4, 21.0, 4.9, 0.41, 0.02),
               _entry("onnx-int4", "onnx", "onnxruntime", 1400, 1700, 3.9, 18.0, 4.5, 0.40, 0.05),
               _entry("hf-fp32", "hf", "torch", 6000, 7400, 25.0, 2.6, 32.0)]
    bw = {"bytes_per_s": 20e9, "threads": 2, "buffer_bytes": 256 << 20, "repeats": 7}
    baselines = _derive(entries, bw["bytes_per_s"])
    results = {"schema": report.SCHEMA, "edgemed_version": "0", "created": "now", "scenario": "single-stream",
               "profile": "x86-avx2", "settings": Settings(threads=2, profile="x86-avx2").to_dict(),
               "machine": machine.describe("x86-avx2"), "bandwidth": bw, "baselines": baselines, "paper": PAPER,
               "configs": entries, "failed": [{"task": "hf-bf16-timing", "error": "exit -9"}]}
    report.render(tmp_path, results)
    for name in ("memory", "latency", "accuracy_vs_bits", "tokens_per_s"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 15_000, name
    md = (tmp_path / "report.md").read_text()
    assert "64.7 % / 12.4 %" in md and "memory vs hf-fp32" in md and "KLD mean" in md and "hf-bf16-timing" in md
    assert baselines == {"same_runtime": "f16", "torch": ["hf-fp32"]}
    q4 = {e["name"]: e for e in entries}["q4_k_m"]
    assert q4["reductions"]["f16"]["memory"] == pytest.approx(1 - 1150 / 3300)
    assert q4["reductions"]["hf-fp32"]["latency"] == pytest.approx(1 - 3.4 / 25.0)
    assert "Q4_K_M peak RSS <= 35 % of F16's | 34.8 % | yes" in md


def test_paired_accuracy_against_the_reference(tmp_path):
    """Same items, two artifacts: items gained / lost and the exact McNemar p-value land in the report."""
    from edgemed.benchmarks.harness.report import _in_progress, _paired

    raw = tmp_path / "raw"
    raw.mkdir()
    gold = ["A", "B", "C", "D"] * 5                                   # 20 items
    ref = list(gold[:15]) + ["A"] * 5                                 # f16: 17 right (15..19 right only where gold is A)
    new = list(gold[:10]) + ["D" if g != "D" else "A" for g in gold[10:15]] + list(gold[15:])  # loses 5, gains 3
    for name, preds in (("f16", ref), ("q4_k_m", new)):
        lines = [json.dumps({"meta": {"version": 2}})] + [
            json.dumps({"id": f"i{k}", "dataset": "medmcqa", "gold": g, "logit_pred": p, "gen_pred": p, "parsed_ok": True})
            for k, (g, p) in enumerate(zip(gold, preds))]
        (raw / f"{name}-accuracy.records.jsonl").write_text("\n".join(lines) + "\n{\"id\": \"cut")  # + a killed line
    # q4_k_m's phase has not finished: it is reported from its records, marked partial
    entries = [{"name": "f16", "accuracy": {"n": 20}}, {"name": "q4_k_m"}, {"name": "q4_0"}]
    _in_progress(tmp_path, entries)
    _paired(tmp_path, entries)
    assert entries[1]["accuracy"]["partial"] and entries[1]["accuracy"]["n"] == 20
    assert entries[1]["accuracy"]["acc_logit"] == sum(n == g for g, n in zip(gold, new)) / 20
    assert "accuracy" not in entries[2]                                # no records: nothing to report
    p = entries[1]["accuracy"]["paired_vs_reference"]
    gained = sum(n == g != r for g, r, n in zip(gold, ref, new))
    lost = sum(r == g != n for g, r, n in zip(gold, ref, new))
    assert (p["n"], p["gained"], p["lost"]) == (20, gained, lost) and lost == 5
    assert p["mcnemar_p"] == pytest.approx(stats.mcnemar(gained, lost))
    assert stats.mcnemar(0, 5) == pytest.approx(2 / 32) and stats.mcnemar(3, 3) == 1.0 and stats.mcnemar(0, 0) == 1.0
    assert "paired_vs_reference" not in entries[0]["accuracy"]


MCQ = [{"realidx": i, "question": q, "options": dict(zip("ABCD", opts)), "answer_idx": a}
       for i, (q, opts, a) in enumerate([
           ("Which drug is first-line for anaphylaxis?", ["Adrenaline", "Aspirin", "Insulin", "Warfarin"], "A"),
           ("Which organ makes insulin?", ["Liver", "Pancreas", "Kidney", "Lung"], "B"),
           ("Normal adult resting heart rate?", ["20 bpm", "200 bpm", "60-100 bpm", "5 bpm"], "C"),
           ("Which vitamin deficiency causes scurvy?", ["A", "B12", "D", "C"], "D")])]


def test_accuracy_and_divergence_phases_on_the_benchmarked_artifacts(model, tmp_path):
    pytest.importorskip("edgemed.benchmarks.harness.accuracy", reason="helper B2's accuracy module has not landed")
    out = _with_artifacts(model, tmp_path / "acc")
    qa = tmp_path / "mcq.jsonl"
    qa.write_text("".join(json.dumps(row) + "\n" for row in MCQ))
    args = ["bench", "reproduce", str(model["src"]), "--quants", "f16,q8_0", "--baselines", "", *FAST,
            "--eval", str(qa), "--eval-n", "4", "-o", str(out), "--json"]
    results = _run(args)
    assert results["failed"] == []
    by = {e["name"]: e for e in results["configs"]}
    for name in ("f16", "q8_0"):
        acc = by[name]["accuracy"]
        assert acc["n"] == 4 and 0 <= acc["acc_logit"] <= 1 and len(acc["ci_logit"]) == 2
        # measured on the very file that was timed
        assert acc["records"] == str(out / "raw" / f"{name}-accuracy.records.jsonl")
        assert by[name]["keys"]["accuracy"]["model_sha256"] == by[name]["keys"]["timing"]["model_sha256"]
    assert by["f16"]["divergence"]["kld_mean"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < by["q8_0"]["divergence"]["kld_mean"] < 0.05 and by["q8_0"]["divergence"]["top1"] > 0.8
    assert (out / "plots" / "accuracy_vs_bits.png").stat().st_size > 10_000
    # all done: a re-run measures nothing
    assert _run(args)["run"]["measured"] == []
