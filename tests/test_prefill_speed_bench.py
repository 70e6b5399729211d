"""The prefill benchmark's bookkeeping: llama-server's timings read right, arms interleaved, ratios paired by round.

No timing is asserted (the figures come from a real run: benchmarks/results/prefill_speed/); these check the
arithmetic and the settings that decide what the figures mean.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgemed.benchmarks import prefill_speed as ps
from edgemed.constants import KV_TYPES


def test_prompt_timing_reads_llama_servers_own_prefill_figures():
    answer = {"content": "x", "timings": {"prompt_n": 1500, "prompt_ms": 12000.0, "predicted_n": 1,
                                          "prompt_per_second": 125.0}}
    assert ps.prompt_timing(answer) == (1500, 12.0)
    with pytest.raises(ValueError, match="no prompt timings"):
        ps.prompt_timing({"content": "x"})  # a reused prompt (0 computed) or another server: not a figure


def test_rotation_puts_every_arm_first_once_per_cycle():
    arms = ["a", "b", "c", "d"]
    orders = [ps.rotation(arms, r) for r in range(4)]
    assert [o[0] for o in orders] == arms
    assert all(sorted(o) == arms for o in orders)
    assert ps.rotation(arms, 5) == orders[1]


def test_ratios_pair_each_round_with_the_same_round():
    runs = {"x": [{"round": 0, "v": 100.0}, {"round": 1, "v": 50.0}, {"round": 2, "v": 90.0}],
            "y": [{"round": 1, "v": 100.0}, {"round": 0, "v": 200.0}]}  # round 2 missing on y: no ratio for it
    assert ps.ratios_per_round(runs, "x", "y", "v") == [0.5, 0.5]
    assert ps.median_by(runs["x"], "v") == 90.0
    assert ps.median_by([{"round": 0}], "v") is None


def test_llama_server_runs_with_its_own_defaults():
    cmd = ps.llama_server_command(Path("/bin/llama-server"), Path("m.gguf"), 8080, 2, 8192)
    assert cmd[cmd.index("-t") + 1] == "2" and cmd[cmd.index("-c") + 1] == "8192"
    # nothing of edgemed's profile is passed: flash attention, batch sizes, KV types and mmap stay llama.cpp's
    for flag in ("-fa", "--flash-attn", "-b", "-ub", "-ctk", "-ctv", "--load-mode", "--no-mmap", "-np", "--cache-ram"):
        assert flag not in cmd


def test_every_arm_is_a_context_the_runtime_accepts():
    for fa, type_k, type_v in ps.KV_ARMS.values():
        assert type_k in KV_TYPES and type_v in KV_TYPES
        assert fa or type_v == "f16"  # a quantized V cache needs flash attention (llamacpp.Context refuses it)
    assert ("fa-off-f16", (False, "f16", "f16")) in ps.KV_ARMS.items()  # today's x86 profile setting is an arm


def test_report_names_the_load_and_the_profile_arm():
    row = {"round": 0, "short_prefill_tok_s": 80.0, "long_prefill_tok_s": 60.0, "short_loadavg": (3.0, 4.5),
           "long_loadavg": (4.5, 5.0)}
    m = {"model": "m.gguf", "threads": 2, "rounds": 1, "short_tokens": 700, "long_tokens": 1500, "double_tokens": 3000,
         "edgemed": {"profile": "x86-avx2", "n_ctx": 8192, "n_batch": 512, "n_ubatch": 512, "profile_flash_attn": False,
                     "profile_type_k": "f16", "profile_type_v": "f16"},
         "llama_server": None, "arms": ["fa-off-f16", "fa-on-f16"], "profile_arm": "fa-off-f16",
         "runs": {"fa-off-f16": [row], "fa-on-f16": [row | {"long_prefill_tok_s": 66.0}]},
         "medians": {"fa-off-f16": {"short_prefill_tok_s": 80.0, "long_prefill_tok_s": 60.0},
                     "fa-on-f16": {"short_prefill_tok_s": 80.0, "long_prefill_tok_s": 66.0}},
         "ratio_vs_llama_server": {}, "goal": 0.95, "wall_s": 10.0, "command": "python -m x",
         "ratio_vs_fa_off": {"fa-on-f16": {"long_prefill_tok_s": {"per_round": [1.1], "median": 1.1}}},
         "machine": {"cpu_count": 2}}
    text = ps.report_md(m)
    assert "load average 3.0-5.0" in text and "Taken under load" in text
    assert "| edgemed fa-off-f16 (profile) | 80.0 | 60.0 |" in text
    assert "| fa-on-f16 | 1.100x |" in text


def test_every_benchmark_that_starts_llama_server_takes_server_arg(tmp_path, capsys):
    """--server-arg reaches llama-server's command line in each benchmark's own server class, so a host where its
    settings crash (AMX) can still run the comparison, and the report's command names what was added."""
    import argparse

    from edgemed.benchmarks import openai_conformance, serve_adapters, serve_conversation, serve_vs_llama_server
    from edgemed.benchmarks import serve_workloads
    from edgemed.benchmarks.serve_bench_client import LlamaServer, add_server_arg

    ap = argparse.ArgumentParser()
    add_server_arg(ap)
    assert ap.parse_args([]).server_arg == []
    assert ap.parse_args(["--server-arg=--no-repack", "--server-arg=-v"]).server_arg == ["--no-repack", "-v"]
    common = dict(path=tmp_path / "m.gguf", threads=2, slots=4, ctx_per_slot=2048, extra=("--no-repack",))
    for cls in (LlamaServer, serve_conversation.LlamaServerDefaults, openai_conformance.JinjaLlamaServer):
        assert "--no-repack" in cls(tmp_path / "llama-server", **common).command(), cls
    for module in (openai_conformance, serve_adapters, serve_conversation, serve_vs_llama_server, serve_workloads, ps):
        with pytest.raises(SystemExit):
            module.main(["--help"])
        assert "--server-arg ARG" in capsys.readouterr().out, module.__name__


def test_a_llama_server_that_crashes_at_start_names_the_amx_way_out(tmp_path):
    import shutil
    import signal

    from edgemed.benchmarks.serve_bench_client import LlamaServer
    from edgemed.errors import EdgemedError

    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\necho 'load_tensors: AMX model buffer size = 100 MiB'\nkill -SEGV $$\n")
    binary.chmod(0o755)
    server = LlamaServer(binary, path=tmp_path / "m.gguf", threads=2, slots=1, ctx_per_slot=512)
    with pytest.raises(EdgemedError) as exc:
        server.start()
    assert f"killed by signal {int(signal.SIGSEGV)}" in exc.value.problem and "AMX model buffer" in exc.value.problem
    assert "--server-arg=--no-repack" in exc.value.fix
    shutil.rmtree(server.folder)


def test_a_buffers_arm_is_reported_beside_the_profile():
    row = {"round": 0, "short_prefill_tok_s": 90.0, "long_prefill_tok_s": 87.0, "decode_tok_s_at_long": 14.0,
           "short_loadavg": (1.0, 1.5), "long_loadavg": (1.5, 2.0)}
    m = {"model": "m.gguf", "threads": 2, "rounds": 1, "short_tokens": 724, "long_tokens": 1500, "double_tokens": 3000,
         "edgemed": {"profile": "x86-avx512", "n_ctx": 8192, "n_batch": 512, "n_ubatch": 512, "profile_flash_attn": False,
                     "profile_type_k": "f16", "profile_type_v": "f16", "extra_buffers_mode": "repack",
                     "other_buffers": {"none": "none"}},
         "llama_server": None, "arms": ["fa-off-f16", "buffers-none"], "profile_arm": "fa-off-f16",
         "runs": {"fa-off-f16": [row], "buffers-none": [row | {"long_prefill_tok_s": 120.0}]},
         "medians": {"fa-off-f16": {"short_prefill_tok_s": 90.0, "long_prefill_tok_s": 87.0},
                     "buffers-none": {"short_prefill_tok_s": 127.0, "long_prefill_tok_s": 120.0}},
         "ratio_vs_llama_server": {}, "goal": 0.95, "wall_s": 10.0, "command": "python -m x",
         "ratio_vs_fa_off": {"buffers-none": {"long_prefill_tok_s": {"per_round": [1.38], "median": 1.38}}},
         "machine": {"cpu_count": 2}}
    text = ps.report_md(m)
    assert "extra buffers `repack`" in text and "`buffers-MODE`" in text
    assert "| edgemed buffers-none | 127.0 | 120.0 |" in text and "| buffers-none | 1.380x |" in text
    with pytest.raises(SystemExit) as exc:  # a mode the runtime does not have is refused before any work
        ps.main(["--buffers", "amx"])
    assert exc.value.code == 2


def test_a_ubatch_arm_runs_the_micro_batch_it_names(smollm2_gguf):
    """A ``ubatch-N`` arm is a context whose micro-batch llama.cpp reads back as N, with the profile's other settings;
    one llama.cpp would not run as asked (past n_batch, which caps it) is refused, not measured under its name."""
    pytest.importorskip("llama_cpp")
    em = ps.EdgemedPrefill(smollm2_gguf, 1, None)
    try:
        ctx = em.context(ps.UBATCH + "64")
        assert ctx.n_ubatch == 64 and ctx.n_batch == em.model.load.n_batch
        assert em.contexts[ps.UBATCH + "64"] is ctx
        secs, logits = em.prefill(ps.UBATCH + "64", em.model.tokenize("A patient with chest pain.", True, True))
        assert secs > 0 and len(logits) >= 1
        with pytest.raises(SystemExit, match="not 4096"):
            em.context(ps.UBATCH + "4096")
    finally:
        em.close()
    for bad in (["--ubatch", "0"], ["--ubatch", "128", "--ubatch", "128"]):  # refused before anything loads
        with pytest.raises(SystemExit) as exc:
            ps.main(bad)
        assert exc.value.code == 2
