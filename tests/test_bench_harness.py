"""``edgemed bench``: the harness end to end on a tiny model — schema, warm-up exclusion, resume after a kill, plots;
the report's accuracy (per set, pooled, paired vs F16) and divergence (headline, llama.cpp, first position) columns."""

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

from edgemed.benchmarks.harness import artifacts, report, roofline, scores, stats  # noqa: E402
from edgemed.cli import cli  # noqa: E402
from edgemed.converters.pipeline import ConvertOptions, convert  # noqa: E402
from edgemed.errors import InputError  # noqa: E402

import tiny  # noqa: E402

FAST = ["--runs", "3", "--warmup", "2", "--max-tokens", "8", "--threads", "1", "--ctx", "256"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random Qwen2 checkpoint and its F16 / Q8_0 GGUFs in the reproduce layout (<out>/artifacts/)."""
    root = tmp_path_factory.mktemp("bench")
    src = tiny.build_model(root / "src", "qwen2", max_position_embeddings=1024)  # room for the accuracy items
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
    assert (facts.kv_k_per_pos, facts.kv_v_per_pos) == (2 * 2 * 16, 2 * 2 * 16)
    # a q8_0 K cache (34 bytes per 32 elements) beside an f16 V cache
    assert roofline.gguf_facts(out, "q8_0", "f16").kv_bytes_per_pos == 2 * 2 * 16 * 34 // 32 + 2 * 2 * 16 * 2


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
    assert len(e["keys"]["timing"]["profile_sha256"]) == 64  # the profile's settings, not only its name
    assert e["runtime_settings"]["n_ubatch"] >= 1  # the micro-batch llama.cpp's context runs, read back
    for metric in ("ttft_s", "tpot_s", "e2e_s", "prefill_tok_s", "decode_tok_s"):
        assert {"p50", "p90", "p99", "stdev", "min", "max"} <= set(e[metric]), metric
    assert e["peak_rss_bytes"] > 0 and e["model_bytes"] == (model["artifacts"] / "q8_0.gguf").stat().st_size
    assert 0 < e["roofline"]["fraction"] and e["bits_per_weight"] == pytest.approx(8.5, abs=0.6)
    # the ceiling is the read bandwidth at the decode's thread count; the copy one is kept beside it
    bw = json.loads((out / "raw" / "bandwidth.json").read_text())
    assert results["bandwidth"] == bw and bw["read"]["threads"] == bw["copy"]["threads"] == 1
    assert e["roofline"]["ceiling_tok_s"] == pytest.approx(bw["read"]["bytes_per_s"] / e["bytes_per_token"])
    assert e["roofline"]["copy"]["ceiling_tok_s"] == pytest.approx(bw["copy"]["bytes_per_s"] / e["bytes_per_token"])
    assert e["kv_cache_type"] == "f16/f16"

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
    assert {"config", "peak_rss_mib", "e2e_s_p50", "decode_tok_s_p50", "roofline_fraction"} <= set(header)
    mach = json.loads((out / "machine.json").read_text())
    assert mach["llama_cpp_system_info"] and mach["memory_read_bandwidth"]["bytes_per_s"] == bw["read"]["bytes_per_s"]

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


def test_imatrix_artifacts_are_parsed_and_reused_only_with_their_text(model, tmp_path):
    """``<quant>-imatrix`` is a quantized type calibrated on --imatrix-from's text: its report must name that text's
    sha256 to be reused, a plain artifact must name none, and a bad mix of options is refused before any work."""
    assert artifacts.parse_quants("f16, Q4_K_M-imatrix,q4_0") == ["f16", "q4_k_m-imatrix", "q4_0"]
    for bad in ("f16-imatrix", "auto-imatrix", "q4_k_m-imat"):
        with pytest.raises(InputError, match="Unknown GGUF type"):
            artifacts.parse_quants(bad)
    out = _with_artifacts(model, tmp_path / "imat")
    text = tmp_path / "calib.txt"
    text.write_text("Aspirin inhibits platelet aggregation.\n\nMetformin lowers hepatic glucose output.\n")
    with pytest.raises(InputError, match="need the calibration text"):
        artifacts.prepare(model["src"], out, ["q8_0-imatrix"], [], {})
    with pytest.raises(InputError, match="none is listed"):
        artifacts.prepare(model["src"], out, ["q8_0"], [], {}, imatrix_from=text)
    calibrated = out / "artifacts" / "q8_0-imatrix.gguf"
    shutil.copy(out / "artifacts" / "q8_0.gguf", calibrated)   # a report that names no matrix: refused, kept
    shutil.copy(out / "artifacts" / "q8_0.gguf.report.json", f"{calibrated}.report.json")
    with pytest.raises(InputError, match="quantized with no importance matrix"):
        artifacts.prepare(model["src"], out, ["q8_0-imatrix"], [], {}, imatrix_from=text)
    assert calibrated.exists()
    rep = Path(f"{calibrated}.report.json")
    data = json.loads(rep.read_text())
    data["imatrix"] = {"text": "calib.txt", "sha256": "f" * 64}
    rep.write_text(json.dumps(data))
    with pytest.raises(InputError, match="sha256 ffffffffffff"):                     # another text: refused
        artifacts.prepare(model["src"], out, ["q8_0-imatrix"], [], {}, imatrix_from=text)
    from edgemed.files.hashing import file_sha256

    data["imatrix"]["sha256"] = file_sha256(text)
    rep.write_text(json.dumps(data))
    configs = artifacts.prepare(model["src"], out, ["q8_0", "q8_0-imatrix"], [], {}, imatrix_from=text)
    assert [(c.name, Path(c.path).name) for c in configs] == [("q8_0", "q8_0.gguf"), ("q8_0-imatrix", "q8_0-imatrix.gguf")]
    plain = out / "artifacts" / "q8_0.gguf.report.json"   # a plain type whose report names a matrix: refused
    plain.write_text(rep.read_text())
    with pytest.raises(InputError, match="needs none"):
        artifacts.prepare(model["src"], out, ["q8_0"], [], {})


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
    if kld is not None:  # the divergence raw result of fidelity.summarize (headline + first / llamacpp / all)
        e["divergence"] = {"reference": "f16", "kld_mean": kld, "kld_p99": kld * 8, "kld_max": kld * 20,
                           "top1": 1 - kld * 3, "n_tokens": 884,
                           "first": {"kld_mean": kld * 90, "top1": 0.5, "n_tokens": 16},
                           "llamacpp": {"kld_mean": kld * 1.1, "kld_p99": kld * 9, "kld_max": kld * 20, "top1": 1 - kld * 3,
                                        "n_tokens": 440},
                           "all": {"kld_mean": kld * 2.6, "top1": 1 - kld * 3.1, "n_tokens": 900},
                           "rule": "headline: every position except the first 1 of each passage", "version": 2}
    return e


def test_report_and_plots_render(tmp_path):
    from edgemed.benchmarks.harness import machine
    from edgemed.benchmarks.harness.configs import PAPER, Settings
    from edgemed.benchmarks.harness.report import _derive

    entries = [_entry("f16", "gguf", "llama.cpp", 2950, 3300, 9.0, 7.5, 16.0, 0.42, 0.0),
               _entry("q8_0", "gguf", "llama.cpp", 1570, 1900, 5.5, 13.0, 8.5, 0.42, 0.002),
               _entry("q4_k_m", "gguf", "llama.cpp", 940, 1150, 3.4, 21.0, 4.9, 0.41, 0.02),
               _entry("onnx-int4", "onnx", "onnxruntime", 1400, 1700, 3.9, 18.0, 4.5, 0.40, 0.05),
               _entry("q4_0", "gguf", "llama.cpp", 900, 1100, 3.3, 22.0, 4.5, 0.40, None),
               _entry("hf-fp32", "hf", "torch", 6000, 7400, 25.0, 2.6, 32.0)]
    bw = {"threads": 2, "read": {"bytes_per_s": 20e9, "threads": 2, "buffer_bytes": 1 << 30, "repeats": 7},
          "copy": {"bytes_per_s": 25e9, "threads": 2, "buffer_bytes": 256 << 20, "repeats": 7}}
    # a divergence raw file from before the headline rule: only the every-position figures, reported as such
    by = {e["name"]: e for e in entries}
    by["q4_0"]["divergence"] = {"reference": "f16", "kld_mean": 0.079, "kld_p99": 4.7, "top1": 0.87, "n_tokens": 1369}
    by["q4_k_m"]["accuracy"]["paired_vs_reference"] = stats.paired(230, 7, 19, 344) | {"reference": "f16", "same_answer": 0.94}
    by["q4_k_m"]["accuracy"]["per_dataset"]["medmcqa"]["paired_vs_reference"] = stats.paired(100, 2, 6, 192) | {"same_answer": 0.95}
    baselines = _derive(entries, bw)
    results = {"schema": report.SCHEMA, "edgemed_version": "0", "created": "now", "scenario": "single-stream",
               "profile": "x86-avx2", "settings": Settings(threads=2, profile="x86-avx2").to_dict(),
               "machine": machine.describe("x86-avx2"), "bandwidth": bw, "baselines": baselines, "paper": PAPER,
               "configs": entries, "failed": [{"task": "hf-bf16-timing", "error": "exit -9"}]}
    report.render(tmp_path, results)
    for name in ("memory", "latency", "accuracy_vs_bits", "tokens_per_s"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 15_000, name
    md = (tmp_path / "report.md").read_text()
    assert "64.7 % / 12.4 %" in md and "memory vs hf-fp32" in md and "hf-bf16-timing" in md
    for column in ("KLD | KLD p99 | top-1 | KLD llama.cpp | KLD first pos. | KLD all pos.", "MDD", "McNemar p",
                   "difference, points [95 % CI]", "**pooled**"):
        assert column in md, column
    q4_row = next(line for line in md.splitlines() if line.startswith("| q4_k_m | 600 "))
    assert "+7 / −19, -2.0 [-3.7, -0.3] points, p = 0.029" in q4_row and "| 0.0200 | 0.1600 | 94.0 % | 0.0220 | 1.8000 | 0.0520 |" in q4_row
    legacy = next(line for line in md.splitlines() if line.startswith("| q4_0 | 600 "))
    assert "| — | — | — | — | — | 0.0790 ¹ |" in legacy and "before the headline rule" in md
    assert "2.4 points (does not resolve 1 point)" in md  # the pooled mdd of 600 pairs at 4.3 % discordance
    assert "official test split" in md and "imatrix calibration" in md
    rows = {r["config"]: r for r in report.csv_rows(results)}
    q4 = rows["q4_k_m"]
    assert (q4["kld_mean"], q4["kld_llamacpp"], q4["kld_first"], q4["kld_all"], q4["kld_n_tokens"]) == (0.02, 0.022, 1.8, 0.052, 884)
    assert (q4["paired_n"], q4["paired_gained"], q4["paired_lost"], q4["mcnemar_p"]) == (600, 7, 19, 0.029)
    assert q4["paired_diff_ci_low"] == -0.0369 and q4["paired_mdd"] == 0.0238 and q4["acc_n_medmcqa"] == 300
    assert q4["paired_diff_medmcqa"] == -0.0133 and q4["paired_mdd_pubmedqa"] is None
    assert rows["q4_0"]["kld_mean"] is None and rows["q4_0"]["kld_all"] == 0.079  # never an old figure under a new name
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert {"acc_logit", "acc_gen", "kld_mean", "top1", "kld_llamacpp", "kld_first", "paired_diff", "mcnemar_p"} <= set(header)
    assert baselines == {"same_runtime": "f16", "torch": ["hf-fp32"]}
    q4 = {e["name"]: e for e in entries}["q4_k_m"]
    assert q4["reductions"]["f16"]["memory"] == pytest.approx(1 - 1150 / 3300)
    assert q4["reductions"]["hf-fp32"]["latency"] == pytest.approx(1 - 3.4 / 25.0)
    assert "Q4_K_M peak RSS <= 35 % of F16's | 34.8 % | yes" in md


def _key(name: str) -> dict:
    """A stand-in accuracy key (``report._accuracy_keys``) of the artifact behind configuration ``name``."""
    return {"model_sha256": f"sha-of-{name}", "profile": "x86-avx2"}


def _write_records(raw: Path, name: str, rows: list[tuple[str, str, str]]) -> None:
    from edgemed.benchmarks.harness.accuracy import RECORDS_VERSION

    meta = {"version": RECORDS_VERSION, "artifact": {"name": f"{name}.gguf", "sha256": _key(name)["model_sha256"]},
            "key": _key(name)}
    lines = [json.dumps({"meta": meta})] + [
        json.dumps({"id": f"{ds}:{k}", "dataset": ds, "gold": g, "logit_pred": p, "gen_pred": None, "parsed_ok": None})
        for k, (ds, g, p) in enumerate(rows)]
    (raw / f"{name}-accuracy.records.jsonl").write_text("\n".join(lines) + "\n{\"id\": \"cut")  # + a killed line


def test_paired_accuracy_per_set_and_pooled(tmp_path):
    """Same items, two artifacts, two sets: gained / lost, Newcombe interval, exact McNemar p and the detectable
    difference land in the report per set and pooled; a partial run is reported from its records."""
    raw = tmp_path / "raw"
    raw.mkdir()
    gold = ["A", "B", "C", "D"] * 10                                  # 40 items: 20 medmcqa, 20 mmlu
    sets = ["medmcqa"] * 20 + ["mmlu"] * 20
    ref = gold[:30] + ["A"] * 10                                      # f16 right on 30 + the 2 A's of the last 10
    new = gold[:10] + ["D" if g != "D" else "A" for g in gold[10:20]] + gold[20:]  # loses 10 (medmcqa), gains 8 (mmlu)
    _write_records(raw, "f16", list(zip(sets, gold, ref)))
    _write_records(raw, "q4_k_m", list(zip(sets, gold, new)))
    entries = [{"name": "f16", "accuracy": {"n": 40}}, {"name": "q4_k_m"}, {"name": "q4_0"}]
    scores.in_progress(tmp_path, entries, {e["name"]: _key(e["name"]) for e in entries})
    scores.add_paired(tmp_path, entries)
    acc = entries[1]["accuracy"]
    assert acc["partial"] and acc["n"] == 40 and acc["acc_logit"] == sum(n == g for g, n in zip(gold, new)) / 40
    assert acc["per_dataset"]["mmlu"]["n"] == 20 and "accuracy" not in entries[2]   # no records: nothing reported
    for name, idx in (("medmcqa", range(20)), ("mmlu", range(20, 40)), (scores.POOLED, range(40))):
        p = acc["paired_vs_reference"] if name == scores.POOLED else acc["per_dataset"][name]["paired_vs_reference"]
        m = [new[i] == gold[i] for i in idx]
        b = [ref[i] == gold[i] for i in idx]
        table = (sum(x and y for x, y in zip(m, b)), sum(x and not y for x, y in zip(m, b)),
                 sum(y and not x for x, y in zip(m, b)), sum(not (x or y) for x, y in zip(m, b)))
        assert (p["both_right"], p["gained"], p["lost"], p["both_wrong"]) == table, name
        assert p["diff_ci"] == pytest.approx(list(stats.paired_difference_ci(*table)))
        assert p["mcnemar_p"] == pytest.approx(stats.mcnemar(table[1], table[2]))
        assert p["same_answer"] == sum(new[i] == ref[i] for i in idx) / len(idx)
    pooled = acc["paired_vs_reference"]
    assert (pooled["gained"], pooled["lost"]) == (8, 10) and pooled["mdd"] == pytest.approx(stats.mcnemar_mdd(40, 18 / 40))
    assert acc["per_dataset"]["medmcqa"]["paired_vs_reference"]["lost"] == 10
    assert "paired_vs_reference" not in entries[0]["accuracy"]
    # the items of the current draw only: records of a larger earlier draw do not enter the figures
    again = [{"name": "f16", "accuracy": {"n": 20}}, {"name": "q4_k_m"}]
    keep = {f"medmcqa:{k}" for k in range(20)}
    scores.in_progress(tmp_path, again, {"q4_k_m": _key("q4_k_m")}, keep)
    scores.add_paired(tmp_path, again, keep)
    assert again[1]["accuracy"]["n"] == 20 and set(again[1]["accuracy"]["per_dataset"]) == {"medmcqa"}
    assert again[1]["accuracy"]["paired_vs_reference"]["lost"] == 10


def test_imatrix_on_off_is_paired_against_the_plain_type(tmp_path):
    """A ``<quant>-imatrix`` configuration gets ``paired_vs_plain`` against ``<quant>`` (pooled and per set) and its
    own report.md section with both sides' size and KL divergence; other configurations get none."""
    raw = tmp_path / "raw"
    raw.mkdir()
    gold = ["A", "B", "C", "D"] * 10
    sets = ["medmcqa"] * 20 + ["pubmedqa"] * 20
    plain = gold[:25] + ["A"] * 15                       # right on 25 + the A's of the last 15
    calibrated = gold[:20] + ["D" if g != "D" else "A" for g in gold[20:25]] + gold[25:]
    for name, preds in (("f16", gold), ("q4_k_m", plain), ("q4_k_m-imatrix", calibrated)):
        _write_records(raw, name, list(zip(sets, gold, preds)))
    entries = [{"name": "f16"}, {"name": "q4_k_m"}, {"name": "q4_k_m-imatrix"}]
    scores.in_progress(tmp_path, entries, {e["name"]: _key(e["name"]) for e in entries})
    scores.add_paired(tmp_path, entries)
    on = entries[2]["accuracy"]["paired_vs_plain"]
    m = [calibrated[i] == gold[i] for i in range(40)]
    b = [plain[i] == gold[i] for i in range(40)]
    assert on["reference"] == "q4_k_m" and on["n"] == 40
    assert (on["gained"], on["lost"]) == (sum(x and not y for x, y in zip(m, b)), sum(y and not x for x, y in zip(m, b)))
    assert (on["gained"], on["lost"]) == (12, 5) and on["mcnemar_p"] == pytest.approx(stats.mcnemar(12, 5))
    assert entries[2]["accuracy"]["per_dataset"]["pubmedqa"]["paired_vs_plain"]["gained"] == 12
    assert entries[2]["accuracy"]["paired_vs_reference"]["reference"] == "f16"
    assert "paired_vs_plain" not in entries[1]["accuracy"] and "paired_vs_plain" not in entries[0]["accuracy"]
    e_plain = _entry("q4_k_m", "gguf", "llama.cpp", 1066, 1243, 4.96, 16.9, 4.9, kld=0.0053)
    e_on = _entry("q4_k_m-imatrix", "gguf", "llama.cpp", 1066, 1243, 4.96, 16.9, 4.9, kld=0.0046)
    e_plain["accuracy"], e_on["accuracy"] = entries[1]["accuracy"], entries[2]["accuracy"]
    md = "\n".join(scores.imatrix_markdown({"configs": [e_plain, e_on]}, report._table))
    assert "## Importance matrix on / off" in md
    row = next(line for line in md.splitlines() if line.startswith("| q4_k_m (accuracy partial) |"))  # from records
    assert "1,066.0 → 1,066.0" in row and "0.0053 → 0.0046" in row and "+12 / −5, +17.5" in row
    assert "| q4_k_m-imatrix | **pooled** | 40 |" in md and "| q4_k_m-imatrix | medmcqa | 20 |" in md
    assert scores.imatrix_markdown({"configs": [e_plain]}, report._table) == []
    assert scores.csv_columns(e_on)["vs_plain_gained"] == 12 and "vs_plain_gained" not in scores.csv_columns(e_plain)


def test_eval_options_resolve_the_default_suite(tmp_path):
    from edgemed.benchmarks.harness.datasets import SUITE
    from edgemed.cli.bench import _settings

    data = tmp_path / "data"
    for row in SUITE:  # a tiny folder laid out like the shared data
        f = data / row.path
        f.parent.mkdir(parents=True, exist_ok=True)
        if row.name == "pubmedqa":
            f.write_text(json.dumps({str(k): {"QUESTION": f"q{k}?", "CONTEXTS": ["c"], "final_decision": "yes"}
                                     for k in range(5)}), encoding="utf-8")
            (f.parent / "test_ground_truth.json").write_text(json.dumps({str(k): "yes" for k in range(3)}), encoding="utf-8")
        else:
            f.write_text("".join(json.dumps(r) + "\n" for r in MCQ), encoding="utf-8")

    def settings(**kw):
        args = dict(prompts=None, runs=1, warmup=0, max_tokens=8, threads=1, profile=None, n_ctx=256, evals=None,
                    eval_data=None, eval_n=None, eval_context=False, eval_score="logits", eval_threads=None, seed=0,
                    scenario="single-stream")
        return _settings(**(args | kw))

    with pytest.raises(InputError, match="--eval-n 600 for") as err:   # the suite's counts: more than this folder has
        settings(eval_data=data)
    assert "between 1 and 4" in err.value.fix
    s = settings(eval_data=data, eval_n="4,4,3")
    assert [Path(p).relative_to(data).as_posix() for p in s.evals] == [row.path for row in SUITE]
    assert s.eval_counts == (4, 4, 3) and s.eval_score == "logits" and not s.eval_context
    assert settings(eval_data=data, eval_n="2").eval_counts == (2, 2, 2)
    with pytest.raises(InputError, match="--eval-n 300 for"):          # --eval files: 300 each unless told
        settings(evals=str(data / SUITE[0].path))
    assert settings(evals=str(data / SUITE[0].path), eval_n="3").eval_counts == (3,)
    for bad, match in (("1,2", "gives 2 counts for 3"), ("x", "not a count")):
        with pytest.raises(InputError, match=match):
            settings(eval_data=data, eval_n=bad)
    with pytest.raises(InputError, match="Both --eval and --eval-data"):
        settings(eval_data=data, evals=str(data / SUITE[0].path))
    a, b = settings(eval_data=data, eval_n="2"), settings(eval_data=data, eval_n="3")
    assert a.digest("accuracy") != b.digest("accuracy") and a.digest("timing") == b.digest("timing")


MCQ = [{"realidx": i, "question": q, "options": dict(zip("ABCD", opts)), "answer_idx": a}
       for i, (q, opts, a) in enumerate([
           ("Which drug is first-line for anaphylaxis?", ["Adrenaline", "Aspirin", "Insulin", "Warfarin"], "A"),
           ("Which organ makes insulin?", ["Liver", "Pancreas", "Kidney", "Lung"], "B"),
           ("Normal adult resting heart rate?", ["20 bpm", "200 bpm", "60-100 bpm", "5 bpm"], "C"),
           ("Which vitamin deficiency causes scurvy?", ["A", "B12", "D", "C"], "D")])]


def test_accuracy_and_divergence_phases_on_the_benchmarked_artifacts(model, tmp_path):
    out = _with_artifacts(model, tmp_path / "acc")
    qa = tmp_path / "mcq.jsonl"
    qa.write_text("".join(json.dumps(row) + "\n" for row in MCQ))
    # --ctx is every phase's context: these items need ~620 positions of this tokenizer
    args = ["bench", "reproduce", str(model["src"]), "--quants", "f16,q8_0", "--baselines", "", *FAST, "--ctx", "1024",
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
    # the default scores letter logits only: no generated answer, none unparsed
    assert by["q8_0"]["accuracy"]["acc_gen"] is None and by["q8_0"]["accuracy"]["score"] == "logits"
    assert by["q8_0"]["accuracy"]["paired_vs_reference"]["n"] == 4
    assert by["f16"]["divergence"]["kld_mean"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < by["q8_0"]["divergence"]["kld_mean"] < 0.05 and by["q8_0"]["divergence"]["top1"] > 0.8
    row = next(r for r in report.csv_rows(results) if r["config"] == "q8_0")
    assert row["kld_llamacpp"] is not None and row["kld_first"] is not None and row["paired_n"] == 4
    assert (out / "plots" / "accuracy_vs_bits.png").stat().st_size > 10_000
    # all done: a re-run measures nothing
    assert _run(args)["run"]["measured"] == []


def test_bench_without_its_extra_stops_before_measuring(model, tmp_path, monkeypatch):
    """A device install (``edgemed[gguf]``) has no matplotlib: the report's plots need it only after every
    measurement, so the bench asks for its extra first, names it, and writes nothing; `--help` still works."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["bench", "run", str(model["artifacts"] / "q8_0.gguf"), *FAST, "-o", str(out)])
    assert result.exit_code != 0 and "pip install 'edgemed[bench]'" in result.output, result.output
    assert "matplotlib" in result.output and "Traceback" not in result.output and not out.exists()
    assert CliRunner().invoke(cli, ["bench", "run", "--help"]).exit_code == 0
