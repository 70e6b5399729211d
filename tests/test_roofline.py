"""The decode roofline: a read-bandwidth ceiling (the copy one beside it), bandwidth.json of both layouts,
bytes per token at the run's KV cache type, and a decode faster than the ceiling flagged as inconsistent."""

from __future__ import annotations

import functools
import json

import pytest

pytest.importorskip("numpy")

from edgemed.benchmarks.harness import report, roofline, runner  # noqa: E402
from edgemed.benchmarks.harness.goals import check_goals  # noqa: E402

MIB = 1 << 20


@pytest.fixture
def small_buffers(monkeypatch):
    """Bandwidth measurements on 32 MiB buffers, 2 timed passes: quick, and enough to be positive."""
    monkeypatch.setattr(roofline, "stream_read_bandwidth",
                        functools.partial(roofline.stream_read_bandwidth, size_bytes=32 * MIB, repeats=2))
    monkeypatch.setattr(roofline, "stream_copy_bandwidth",
                        functools.partial(roofline.stream_copy_bandwidth, size_bytes=32 * MIB, repeats=2))


def test_read_kernel_measures_a_positive_bandwidth_per_thread_count():
    for threads in (1, 2):
        bw = roofline.stream_read_bandwidth(threads=threads, size_bytes=16 * MIB + 3, repeats=2)
        assert bw["threads"] == threads and bw["bytes_per_s"] > 0 and len(bw["runs_bytes_per_s"]) == 2
        assert bw["buffer_bytes"] % (64 * threads) == 0 and 16 * MIB - 64 * threads < bw["buffer_bytes"] <= 16 * MIB
        assert bw["bytes_per_s"] == max(bw["runs_bytes_per_s"]) and "maximum.reduce" in bw["method"]
    assert roofline.read_buffer_bytes() >= max(256 * MIB, 8 * roofline.llc_bytes())


def test_runner_records_read_and_copy_once_and_upgrades_an_old_file(tmp_path, small_buffers):
    bw = runner.bandwidth(tmp_path, 2)
    saved = json.loads((tmp_path / "raw" / "bandwidth.json").read_text())
    assert saved == bw and set(bw) == {"threads", "read", "copy"}
    assert bw["read"]["bytes_per_s"] > 0 and bw["copy"]["bytes_per_s"] > 0 and bw["read"]["threads"] == 2
    assert runner.bandwidth(tmp_path, 2) == bw  # measured once per folder and thread count
    assert runner.bandwidth(tmp_path, 1)["read"]["threads"] == 1  # another thread count: measured again

    # a folder from before the read ceiling: its copy figure is kept, the read one measured beside it
    old = {"method": "numpy.copyto, bytes read + written, best of N", "buffer_bytes": 256 * MIB, "llc_bytes": 32 * MIB,
           "threads": 2, "repeats": 7, "bytes_per_s": 22.8e9, "runs_bytes_per_s": [22.8e9]}
    (tmp_path / "raw" / "bandwidth.json").write_text(json.dumps(old))
    assert roofline.bandwidths(old) == {"read": None, "copy": old}
    upgraded = runner.bandwidth(tmp_path, 2)
    assert upgraded["copy"] == old and upgraded["read"]["bytes_per_s"] > 0


def test_bytes_per_token_uses_the_runs_kv_cache_type():
    # 2 layers x 2 KV heads x 16 (K) + 16 (V) elements per position; the raw figure assumed f16
    weights = {"read_bytes": 1_000_000, "kv_bytes_per_pos": 2 * 2 * 32 * 2, "kv_k_per_pos": 64, "kv_v_per_pos": 64}
    timing = {"weights": weights, "kv_positions": 100.0, "bytes_per_token": 1_000_000 + 256 * 100.0,
              "runtime_settings": {"type_k": "q8_0", "type_v": "q8_0"}}
    bpt, kv = roofline.timing_bytes_per_token(timing)
    assert kv == "q8_0/q8_0" and bpt == pytest.approx(1_000_000 + 128 * 34 / 32 * 100)
    timing["runtime_settings"] = {"type_k": "f16", "type_v": "f16"}
    assert roofline.timing_bytes_per_token(timing) == (pytest.approx(timing["bytes_per_token"]), "f16/f16")
    del weights["kv_k_per_pos"], weights["kv_v_per_pos"]  # a raw from before the element counts: f16 split evenly
    timing["runtime_settings"] = {"type_k": "f32", "type_v": "q4_0"}
    assert roofline.timing_bytes_per_token(timing)[0] == pytest.approx(1_000_000 + (64 * 4 + 64 * 18 / 32) * 100)
    assert roofline.timing_bytes_per_token({**timing, "runtime_settings": {"n_threads": 2}}) == (timing["bytes_per_token"], None)


def _summary(p50):
    return {"n": 5, "mean": p50, "stdev": p50 * 0.05, "cv": 0.05, "min": p50 * 0.9, "p50": p50, "p90": p50 * 1.1,
            "p99": p50 * 1.2, "max": p50 * 1.25}


def _entry(name, dec, bits, bytes_per_token):
    return {"name": name, "kind": "gguf", "runtime": "llama.cpp", "path": f"/x/{name}", "dtype": None, "keys": {},
            "raw": {}, "model_bytes": 900 << 20, "load_s": 0.5, "peak_rss_bytes": 1100 << 20, "n_params": 1_500_000_000,
            "weight_bytes": int(1.5e9 * bits / 8), "bytes_per_token": bytes_per_token, "kv_cache_type": "f16/f16",
            "prompt_tokens": [60], "new_tokens": 64, "n_runs": 5, "n_warmup": 1, "runtime_settings": {},
            "ttft_s": _summary(0.5), "tpot_s": _summary(0.05), "e2e_s": _summary(3.0), "prefill_tok_s": _summary(100.0),
            "decode_tok_s": _summary(dec), "accuracy": None, "divergence": None}


def _results(bw: dict, entries: list[dict]) -> dict:
    from edgemed.benchmarks.harness.configs import PAPER, Settings

    baselines = report._derive(entries, bw)
    machine = {"cpu": "test cpu", "platform": "x86", "physical_cores": 2, "logical_cores": 2, "memory_bytes": 8 << 30,
               "os": "Linux", "python": "3", "versions": {}, "llama_cpp_system_info": None}
    return {"schema": report.SCHEMA, "edgemed_version": "0", "created": "now", "scenario": "single-stream",
            "profile": "x86-avx2", "settings": Settings(threads=2, profile="x86-avx2").to_dict(), "machine": machine,
            "bandwidth": bw, "baselines": baselines, "paper": PAPER, "configs": entries, "failed": []}


READ = {"method": roofline.READ_METHOD, "buffer_bytes": 1 << 30, "threads": 2, "repeats": 7, "bytes_per_s": 20e9}
COPY = {"method": "numpy.copyto", "buffer_bytes": 256 * MIB, "threads": 2, "repeats": 7, "bytes_per_s": 30e9}


def test_report_fraction_is_against_read_bandwidth_with_copy_beside(tmp_path):
    pytest.importorskip("matplotlib")
    entries = [_entry("q4_k_m", 3.0, 4.9, 5e9), _entry("q4_0", 5.0, 4.5, 5e9)]  # ceiling 20e9 / 5e9 = 4 tok/s
    results = _results({"threads": 2, "read": READ, "copy": COPY}, entries)
    q4, q40 = results["configs"]
    assert q4["roofline"]["ceiling_tok_s"] == pytest.approx(4.0) and q4["roofline"]["fraction"] == pytest.approx(0.75)
    assert q4["roofline"]["copy"]["fraction"] == pytest.approx(3.0 / 6.0)
    assert q40["roofline"]["fraction"] == pytest.approx(1.25)  # faster than the memory it reads allows
    report.render(tmp_path, results)
    md = (tmp_path / "report.md").read_text()
    assert "Read bandwidth 20.0 GB/s (2 threads, 1024 MiB buffer, best of 7" in md and "Stream-copy bandwidth 30.0 GB/s" in md
    assert "| q4_k_m | 5000.0 | f16/f16 | 4.0 | 3.00 | 75.0 % | 50.0 % |" in md
    assert "| q4_0 | 5000.0 | f16/f16 | 4.0 | 5.00 | 125.0 % ⚠ | 83.3 % |" in md
    assert "Inconsistent measurement: q4_0" in md and "maximum.reduce" in md
    assert "125.0 % | **inconsistent** (above the ceiling)" in md  # the goal is not "met" by a contradiction
    rows = {r["config"]: r for r in report.csv_rows(results)}
    assert (rows["q4_k_m"]["roofline_fraction"], rows["q4_k_m"]["roofline_fraction_vs_copy"]) == (0.75, 0.5)


def test_report_from_an_old_copy_only_bandwidth_file(tmp_path):
    pytest.importorskip("matplotlib")
    old = {**COPY, "llc_bytes": 32 * MIB, "runs_bytes_per_s": [30e9]}  # the flat layout of older folders
    results = _results(old, [_entry("q4_k_m", 3.0, 4.9, 5e9)])
    (q4,) = results["configs"]
    assert q4["roofline"]["fraction"] is None and q4["roofline"]["copy"]["fraction"] == pytest.approx(0.5)
    report.render(tmp_path, results)
    md = (tmp_path / "report.md").read_text()
    assert "Read bandwidth not measured" in md and "Stream-copy bandwidth 30.0 GB/s" in md
    assert "| q4_k_m | 5000.0 | f16/f16 | — | 3.00 | — | 50.0 % |" in md
    assert not [g for g in check_goals(results) if "roofline" in g[0]]  # no read figure, no roofline goal
