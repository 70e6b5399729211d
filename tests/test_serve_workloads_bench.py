"""The prompt-reuse workloads benchmark: its template requests, its bookkeeping, and a real smoke run.

The smoke run starts the real servers on SmolLM2-135M with ``--quick`` sizes (edgemed alone when llama-server is not
built: ``python -m edgemed.benchmarks.anchors build``) and checks the JSON's structure and that every figure is
positive; no speed is asserted (the figures come from full runs: benchmarks/results/serve_workloads/).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from edgemed.benchmarks import serve_workloads as sw
from edgemed.benchmarks.serve_bench_client import SETTLE_WINDOW_S, _Server, settle
from edgemed.errors import EdgemedError
from edgemed.templates.library import get_template


def test_template_requests_share_the_preamble_and_differ_in_the_question():
    template = get_template(sw.TEMPLATE)
    a = sw.template_messages(template, sw.PRESENTATIONS[0], "1.4.together")
    b = sw.template_messages(template, sw.PRESENTATIONS[1], "1.4.together")
    assert a[0] == b[0] and a[1] != b[1]  # one system message (the shared prefix), different presentations
    assert a[0]["content"].startswith("Deployment 1.4.together.")
    assert template.preamble.strip() in a[0]["content"]  # the real safety preamble, not a stand-in
    assert sw.PRESENTATIONS[0] in a[1]["content"]


def test_every_cell_starts_with_a_fresh_preamble():
    template = get_template(sw.TEMPLATE)
    first = sw.template_messages(template, sw.PRESENTATIONS[0], "1.4.together")[0]["content"]
    other = sw.template_messages(template, sw.PRESENTATIONS[0], "1.4.staggered")[0]["content"]
    # the variant sits in the first words: no earlier cell's cached prefix reaches past them
    differs_at = next(i for i, (x, y) in enumerate(zip(first, other)) if x != y)
    assert differs_at < 20


def test_presentations_cover_the_largest_level():
    assert len(set(sw.PRESENTATIONS)) >= max(sw.FULL.template_levels)


def test_goal_marks():
    assert sw.goal_mark(0.4, sw.GOALS["template"]) == "met"
    assert sw.goal_mark(0.6, sw.GOALS["template"]) == "not met"
    assert sw.goal_mark(0.9, sw.GOALS["throughput"], at_most=False) == "not met"


def test_throughput_summary_counts_tokens_over_the_wall_time():
    rows = [{"latency_s": 2.0, "tokens": 96, "prompt_tokens": 60, "cached_tokens": 0, "finish": "length"},
            {"latency_s": 4.0, "tokens": 50, "prompt_tokens": 60, "cached_tokens": 59, "finish": "stop"}]
    s = sw.throughput_summary(rows, 5.0)
    assert s["aggregate_tok_s"] == (96 + 50) / 5.0 and s["completion_tokens"] == 146
    assert s["latency_p50_s"] == 3.0 and s["cached_tokens"] == 59 and s["finish"] == {"length": 1, "stop": 1}


def test_time_account_splits_edgemed_wall_time_and_reads_llama_server_timings():
    rows = [{"latency_s": 1.0, "tokens": 50}, {"latency_s": 1.5, "tokens": 50}]
    before = {"decode_steps_total": 10, "decode_seconds_total": 1.0, "step_seconds_total": 1.2,
              "idle_seconds_total": 5.0, "wall_seconds": 100.0}
    after = {"decode_steps_total": 110, "decode_seconds_total": 2.6, "step_seconds_total": 3.0,
             "idle_seconds_total": 5.1, "wall_seconds": 102.0}
    a = sw.time_account(rows, 2.0, before, after)
    # 100 tokens over 2 s: 20 ms each = 16 in llama_decode + 2 rest of step + 1 idle + 1 between steps
    assert a["ms_per_token"] == pytest.approx(20) and a["steps"] == 100
    assert (a["llama_decode_ms"], a["step_rest_ms"], a["idle_ms"], a["between_ms"]) == pytest.approx((16, 2, 1, 1))
    assert "in_slot_ms_per_token" not in a
    timed = [{"latency_s": 1.0, "tokens": 50, "server_prompt_ms": 100.0, "server_predicted_ms": 850.0,
              "server_predicted_n": 50},
             {"latency_s": 1.0, "tokens": 50, "server_prompt_ms": 80.0, "server_predicted_ms": 900.0,
              "server_predicted_n": 50}]
    b = sw.time_account(timed, 2.0)
    assert b["in_slot_ms_per_token"] == pytest.approx(17.5) and b["turnaround_ms"] == pytest.approx(35)
    assert "llama_decode_ms" not in b and sw.time_account([], 1.0) == {}


def test_thread_split_finds_the_compute_threads_of_each_server():
    before = {100: 1.0, 101: 5.0, 102: 4.0, 103: 0.5, 104: 0.0}
    after = {100: 1.4, 101: 9.0, 102: 7.9, 103: 0.6, 104: 0.2, 105: 0.1}  # 105: a thread started during the run
    # edgemed: the main thread (100) serves HTTP; the scheduler (101) and one OpenMP worker (102) compute
    e = sw.thread_split(before, after, main=100, compute=2, main_computes=False)
    assert e == pytest.approx({"compute_cpu_s": 4.0 + 3.9, "serving_cpu_s": 0.4 + 0.1 + 0.2 + 0.1})
    # llama-server: its main thread runs the slots and computes, with the busiest other thread as its worker
    ls = sw.thread_split(before, after, main=100, compute=2, main_computes=True)
    assert ls == pytest.approx({"compute_cpu_s": 0.4 + 4.0, "serving_cpu_s": 3.9 + 0.1 + 0.2 + 0.1})
    a = sw.time_account([{"latency_s": 1.0, "tokens": 100}], 2.0, split=e)
    assert a["compute_cpu_ms"] == pytest.approx(79) and a["serving_cpu_ms"] == pytest.approx(8)


def test_idle_seconds_count_a_wait_in_progress():
    # the account reads the counters around a run: a wait that began before the first reading must not fall into
    # the run when it ends (it was counted at its end: 170 ms of "idle" per token at 1 stream, the rest negative)
    import time

    from edgemed.runtime.batch.sequence import Counters

    n = Counters(idle_seconds_total=2.0)
    assert n.totals()["idle_seconds_total"] == 2.0
    n.idle_since = time.perf_counter() - 3.0
    first = n.totals()["idle_seconds_total"]
    assert first >= 5.0
    time.sleep(0.05)
    assert n.totals()["idle_seconds_total"] >= first + 0.05


def test_server_timings_reads_llama_servers_and_ignores_what_is_not_there():
    from edgemed.benchmarks.serve_bench_client import server_timings

    assert server_timings({"timings": {"prompt_ms": 12.5, "predicted_ms": 300, "predicted_n": 20}}) == {
        "server_prompt_ms": 12.5, "server_predicted_ms": 300.0, "server_predicted_n": 20}
    assert server_timings(None) == {} and server_timings({"timings": "x"}) == {} and server_timings({}) == {}


def test_unknown_part_is_refused_with_the_choices():
    with pytest.raises(EdgemedError, match="Unknown part") as exc:
        sw.main(["--parts", "conversation,speed"])
    assert "throughput" in exc.value.fix


@pytest.mark.slow
def test_quick_run_reports_every_part(smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMED_HOME", str(tmp_path / "home"))
    out = tmp_path / "r.json"
    sw.main(["--quick", "--model", str(smollm2_gguf), "--out", str(out)])
    m = json.loads(out.read_text())
    text = out.with_suffix(".md").read_text()
    assert m["errors"] == {} and set(m["parts"]) == set(sw.PARTS)
    assert "python -m edgemed.benchmarks.serve_workloads --quick --model" in text and "load average" in text
    servers = ["edgemed"] + (["llama-server"] if m["llama_server_skipped"] is None else [])
    assert sorted(m["servers"]) == sorted(servers)
    conv = m["parts"]["conversation"]["best"]
    for name in servers:
        assert len(conv[name]) == sw.QUICK.turns and all(t["ttft_p50_s"] > 0 for t in conv[name])
        assert conv[name][1]["prompt_tokens_mean"] > conv[name][0]["prompt_tokens_mean"]  # the history grows
    cells = m["parts"]["template"]["cells"]
    assert sorted(cells) == sorted(f"{n}-{a}" for n in sw.QUICK.template_levels for a in ("together", "staggered"))
    for cell in cells.values():
        for name in servers:
            assert cell["best"][name]["ttft_p50_s"] > 0 and len(cell["best"][name]["ttft_s"]) == cell["requests"]
    for lv in m["parts"]["throughput"]["levels"].values():
        for name in servers:
            assert lv["best"][name]["aggregate_tok_s"] > 0 and lv["best"][name]["completion_tokens"] > 0
            # every run waited for both servers to be quiet first (at least one whole window)
            assert all(run["settle_s"] >= SETTLE_WINDOW_S for run in lv["runs"][name])
        # each run's time account: edgemed's from its /metrics counters, llama-server's from its responses' timings
        account = lv["best"]["edgemed"]["account"]
        assert account["llama_decode_ms"] > 0 and account["steps"] > 0
        if "llama-server" in servers:
            assert lv["best"]["llama-server"]["account"]["in_slot_ms_per_token"] > 0
    assert "Where the time goes" in text
    for name in servers:
        long = m["parts"]["long"]["best"][name]
        assert long["long_ttft_s"] > 0 and long["gap_before_s"] > 0
    if "llama-server" in servers:
        assert m["parts"]["throughput"]["levels"]["1"]["ratio"] > 0
        assert m["parts"]["long"]["ratio_long_ttft"] > 0 and "met |" in text  # every ratio row carries its goal mark
        assert "cache_prompt" not in " ".join(m["servers"]["llama-server"]["command"])


def test_code_state_names_the_commit_the_servers_ran():
    state = sw.code_state()
    assert state["commit"] is None or (len(state["commit"]) == 40 and int(state["commit"], 16) >= 0)
    assert all(path.startswith("edgemed/") for path in state["changed"])


def test_a_client_thread_failing_before_the_barrier_neither_hangs_the_others_nor_hides_its_error():
    from edgemed.benchmarks.serve_bench_client import run_gated

    released = []

    def body(i, gate):
        if i == 0:
            raise ValueError("the server refused the connection")
        gate.wait(timeout=30)  # broken by the failing thread, not timed out
        released.append(i)

    t0 = time.monotonic()
    with pytest.raises(ValueError, match="refused"):
        run_gated(3, body)
    assert time.monotonic() - t0 < 10 and released == []
    done = []
    run_gated(3, lambda i, gate: (gate.wait(timeout=30), done.append(i)))
    assert sorted(done) == [0, 1, 2]


class _Process(_Server):
    """A stand-in server: any child process (``settle`` reads only its CPU time)."""

    def __init__(self, name: str, code: str):
        import subprocess
        import sys

        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-c", code])


def _busy_then_idle(done: Path) -> str:
    """1.5 s of CPU, then a mark on disk, then idle (the mark, not the kernel's tick-rounded CPU time, says the loop ended)."""
    return f"import time, pathlib\nwhile time.process_time() < 1.5: pass\npathlib.Path({str(done)!r}).touch()\ntime.sleep(60)"


def test_settle_waits_until_a_server_stops_using_the_cpu(tmp_path):
    done = tmp_path / "loop-ended"
    idle = _Process("idle", "import time; time.sleep(60)")
    busy = _Process("busy", _busy_then_idle(done))
    try:
        waited = settle([idle, busy])
        before = busy.cpu_seconds()
        assert done.exists()  # not before the busy one's loop ended ...
        assert waited >= 1.0  # ... which took at least that long (less the interpreter's start)
        time.sleep(0.5)
        assert busy.cpu_seconds() - before < 0.05  # and is quiet now
    finally:
        for p in (idle, busy):
            p.proc.kill()
            p.proc.wait()


def test_settle_names_a_server_that_never_goes_quiet():
    spinning = _Process("spinning", "while True: pass")
    try:
        t0 = time.monotonic()
        with pytest.raises(EdgemedError, match="spinning kept using the CPU"):
            settle([spinning], timeout_s=1.0)
        assert time.monotonic() - t0 < 5
    finally:
        spinning.proc.kill()
        spinning.proc.wait()


def test_report_names_what_llama_server_was_given_beyond_its_defaults():
    m = {"model": "m.gguf", "threads": 2, "slots": 4, "ctx": 2048, "rounds": 1, "machine": {"cpu_count": 2},
         "loadavg_start": [0.5, 0.5, 0.5], "loadavg_end": [1.0, 1.0, 1.0], "command": "python -m x", "parts": {},
         "servers": {}, "errors": {}}
    assert "which this host needs" not in sw.report_md(m)
    assert "(`-m -t -c -np` only, and `--no-repack`, which this host needs to run it;" in sw.report_md(
        m | {"server_args": ["--no-repack"]})


def test_the_anchors_cpu_features_come_from_a_probe_of_the_same_build_when_its_log_has_none(tmp_path):
    """llama-server logs its system info only at trace verbosity, so `same_cpu_features` was never computed: the
    report now takes the features from the build's llama-perplexity, and says so."""
    from edgemed.benchmarks import serve_bench_client as client

    line = "CPU : SSE3 = 1 | AVX2 = 1 | OPENMP = 1 |"
    probe = tmp_path / "llama-perplexity"
    probe.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args'}\necho 'system_info: n_threads = 2 | {line}'\n")
    probe.chmod(0o755)
    server = client.LlamaServer(tmp_path / "llama-server", path=tmp_path / "m.gguf", threads=2, slots=1,
                                ctx_per_slot=256, extra=("--no-repack",))
    try:
        server.log.write_text("main: loading model\n")  # what llama-server logs at its default verbosity
        described = server.describe()
        assert described["system_info"] == line and described["system_info_from"].startswith("llama-perplexity")
        args = (tmp_path / "args").read_text().split()
        assert args[args.index("-m") + 1] == str(tmp_path / "m.gguf") and "--no-repack" in args and "-t" in args
        server.log.write_text(f"system_info: {line.replace('AVX2', 'AVX512')}\n")  # a log that has it: taken as is
        assert "AVX512" in server.describe()["system_info"] and "system_info_from" not in server.describe()
        probe.unlink()
        fresh = client.LlamaServer(tmp_path / "llama-server", path=tmp_path / "m.gguf", threads=2, slots=1,
                                   ctx_per_slot=256)
        fresh.log.write_text("")
        assert fresh.describe()["system_info"] is None  # no probe to run: unknown, not assumed
        shutil.rmtree(fresh.folder)
    finally:
        shutil.rmtree(server.folder)


@pytest.mark.parametrize("profile, slots, ctx, expected", [("x86-avx512-ub128", 1, 256, (256, 128)),
                                                         ("x86-avx512", 2, 512, (512, 512))])
def test_the_micro_batch_edgemed_serve_runs_is_read_back_into_the_report(smollm2_gguf, monkeypatch, profile, slots, ctx,
                                                                          expected):
    """``--profile`` reaches `edgemed serve`, and the micro-batch in the report is the one llama.cpp's context runs
    (serve's start line, read back from the context), not the profile's word: the benchmark's 128-row profile gives
    128 (its batch the serve context's 512 capped at 256 cells), and the shipped x86-avx512 its n_ubatch, 512, for the
    batcher (its n_ubatch_single is the one-sequence engine's)."""
    pytest.importorskip("llama_cpp")
    from edgemed.benchmarks.serve_bench_client import EdgemedServer

    # the repo's benchmarks/profiles (a device install's wheel has the benchmarks, not these test arms)
    monkeypatch.setenv("EDGEMED_PROFILES_DIR", str(Path(__file__).resolve().parents[1] / "benchmarks" / "profiles"))
    server = EdgemedServer(path=smollm2_gguf, threads=1, slots=slots, ctx_per_slot=ctx, extra=("--profile", profile))
    try:
        server.start()
        described = server.describe()
    finally:
        server.stop()
    assert "--profile" in described["command"] and profile in described["command"]
    assert (described["n_batch"], described["n_ubatch"]) == expected
    m = {"model": "m.gguf", "threads": 1, "slots": slots, "ctx": ctx, "rounds": 1, "machine": {"cpu_count": 2},
         "loadavg_start": [0.5, 0.5, 0.5], "loadavg_end": [1.0, 1.0, 1.0], "command": "python -m x", "parts": {},
         "servers": {"edgemed": described}, "errors": {}}
    assert f"` (llama.cpp runs batches of {expected[0]} in micro-batches of {expected[1]})" in sw.report_md(m)


def _turns(*p50s: float) -> list[dict]:
    return [{"turn": t + 1, "ttft_p50_s": v, "ttft_p99_s": 2 * v, "prompt_tokens_mean": 100.0 * (t + 1)}
            for t, v in enumerate(p50s)]


def test_conversation_ratio_is_the_median_of_per_round_ratios():
    # edgemed is fastest in round 0, llama-server in round 1: best over best would pair two different rounds
    runs = {"edgemed": [{"round": 0, "turns": _turns(1.0, 2.0)}, {"round": 1, "turns": _turns(1.6, 2.4)},
                        {"round": 2, "turns": _turns(1.3, 2.2)}],
            "llama-server": [{"round": 0, "turns": _turns(1.2, 2.0)}, {"round": 1, "turns": _turns(1.1, 2.0)},
                             {"round": 2, "turns": _turns(1.25, 2.1)}]}
    out = sw.summarize_conversation(runs, 2)
    import statistics
    turn1 = [1.0 / 1.2, 1.6 / 1.1, 1.3 / 1.25]
    assert out["ratio_p50"][0] == pytest.approx(statistics.median(turn1), abs=1e-4)  # not 1.0 / 1.1
    assert out["ratio_p50_paired"][0]["rounds_missing_goal"] == 2 and out["ratio_p50_paired"][0]["goal_met"] is False
    assert out["ratio_p99"][1] == pytest.approx(statistics.median([1.0, 1.2, 2.2 / 2.1]), abs=1e-4)
    assert out["best"]["edgemed"][0]["ttft_p50_s"] == 1.0 and out["best"]["llama-server"][0]["ttft_p50_s"] == 1.1
    assert out["goal_met"] is False


def test_template_throughput_and_long_ratios_are_paired_by_round():
    cells = {"2-together": {"requests": 2, "arrival": "together", "stagger_s": 0.0,
                            "runs": {"edgemed": [{"round": 0, "ttft_p50_s": 0.2}, {"round": 1, "ttft_p50_s": 0.5}],
                                     "llama-server": [{"round": 0, "ttft_p50_s": 0.8}, {"round": 1, "ttft_p50_s": 0.4}]}}}
    cell = sw.summarize_template(cells)["2-together"]
    assert cell["ratio_p50"] == pytest.approx((0.25 + 1.25) / 2) and cell["ratio_p50_paired"]["rounds_missing_goal"] == 1
    levels = {"4": {"runs": {"edgemed": [{"round": 0, "aggregate_tok_s": 30.0}, {"round": 1, "aggregate_tok_s": 20.0}],
                             "llama-server": [{"round": 0, "aggregate_tok_s": 20.0}, {"round": 1, "aggregate_tok_s": 25.0}]}}}
    assert sw.summarize_throughput(levels)["4"]["ratio"] == pytest.approx((1.5 + 0.8) / 2)
    long = sw.summarize_long({"prompt_tokens": [1500], "runs": {
        "edgemed": [{"round": 0, "long_ttft_s": 2.0}, {"round": 1, "long_ttft_s": 4.0}],
        "llama-server": [{"round": 0, "long_ttft_s": 4.0}, {"round": 1, "long_ttft_s": 1.0}]}})
    assert long["ratio_long_ttft"] == pytest.approx((0.5 + 4.0) / 2)
    assert "1 of 2 rounds miss" in sw._goal(long["ratio_long_ttft"], long["ratio_long_ttft_paired"], 2.5)


def test_code_state_reads_the_checkout_of_the_imported_package_not_the_script_s(tmp_path, monkeypatch):
    """A before/after run puts a clean worktree first on PYTHONPATH: the servers import edgemed from there, and the
    commit and changed files recorded must be that worktree's, not those of the checkout the script came from."""
    import subprocess
    import types

    from edgemed.benchmarks import provenance

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "edgemed").mkdir()
    (tmp_path / "edgemed" / "__init__.py").write_text("")
    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "base")
    git("add", "edgemed/__init__.py")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "package")
    (tmp_path / "edgemed" / "__init__.py").write_text("# changed\n")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True,
                          check=True).stdout.strip()
    monkeypatch.setitem(sys.modules, "edgemed", types.SimpleNamespace(__file__=str(tmp_path / "edgemed" / "__init__.py")))
    state = provenance.code_state()
    assert state == {"commit": head, "changed": ["edgemed/__init__.py"]}
