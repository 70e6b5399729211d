"""The adapter serving benchmark end to end, tiny: SmolLM2, 2 real PEFT LoRAs, 2 streams, a few tokens.

It runs ``python -m edgemed.benchmarks.serve_adapters`` as a user would (real servers, real adapters, real clients)
and checks that every figure of its JSON is there and positive: throughput per level, memory of the three server
processes, the switch-cost timings, and that the two adapters change the answer (else the load measured nothing).
llama-server joins when its anchor build is found under the cache; otherwise edgemed runs alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import TEST_CACHE, need_converter

pytest.importorskip("httpx2")
pytestmark = pytest.mark.slow


def _llama_server_built() -> bool:
    from edgemed.benchmarks import anchors
    from edgemed.errors import EdgemedError

    try:
        return anchors.binaries()["llama-server"].is_file()
    except (EdgemedError, KeyError):
        return False


@pytest.fixture(scope="module")
def result(smollm2_hf, tmp_path_factory) -> dict:
    need_converter("torch", "transformers", "peft")
    out = tmp_path_factory.mktemp("serve-adapters-bench") / "smoke.json"
    both = _llama_server_built()
    cmd = [sys.executable, "-m", "edgemed.benchmarks.serve_adapters", "--model", "smollm2-135m-instruct",
           "--adapters", "2", "--levels", "0,2", "--streams", "2", "--tokens", "8", "--requests", "1", "--rounds", "1",
           "--ctx", "256", "--threads", "1", "--switch-steps", "2", "--compare-turn", "1", "--turns", "1,2",
           "--out", str(out)] + ([] if both else ["--only", "edgemed"])
    env = os.environ | {"EDGEMED_CACHE_DIR": str(TEST_CACHE)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()) | {"both": both}


def test_every_level_has_positive_throughput_and_ttft_on_each_server(result):
    servers = ["edgemed", "edgemed turn 1"] + (["llama-server"] if result["both"] else [])
    assert set(result["levels"]) == {"0", "2"}
    for level in result["levels"].values():
        for name in servers:
            best = level[name]["best"]
            assert best["decode_tok_s"] > 0 and best["e2e_tok_s"] > 0 and best["ttft_p50_s"] > 0
            assert best["requests"] == 2 and best["completion_tokens"] > 0
            assert level[name]["vs_no_adapter"] > 0
        if result["both"]:
            assert level["ratio_decode"] > 0 and level["edgemed turn 1"]["ratio_e2e"] > 0


def test_adapter_turns_are_timed_in_process_with_fewer_switches_for_longer_turns(result):
    from edgemed.benchmarks.serve_adapters import report_md

    turns = result["turn_cost"]
    assert set(turns) == {"1", "2"}
    for v in turns.values():
        assert v["best"]["tok_s"] > 0 and v["best"]["steps"] > 0 and v["best"]["ms_per_step"] > 0
    # four requests on two adapters: a switch every step at turn 1, every other step at turn 2
    assert turns["2"]["best"]["switches"] < turns["1"]["best"]["switches"] <= turns["1"]["best"]["steps"]
    assert "| adapter_turn |" in report_md(result)


def test_a_compared_turn_is_a_server_of_its_own_named_in_the_report(result):
    from edgemed.benchmarks.serve_adapters import report_md

    cmd = result["servers"]["edgemed turn 1"]["command"]
    assert cmd[cmd.index("--adapter-turn") + 1] == "1"
    assert "--adapter-turn" not in result["servers"]["edgemed"]["command"]
    assert "| 2 | edgemed turn 1 |" in report_md(result)


def test_memory_of_each_server_and_the_merged_estimate_are_measured(result):
    mem = result["memory"]
    names = {"edgemed, base alone", "edgemed, adapters"} | ({"llama-server, adapters"} if result["both"] else set())
    assert set(mem["servers"]) == names
    for v in mem["servers"].values():
        assert v["VmRSS_MiB"] > 0 and v["VmHWM_MiB"] >= v["VmRSS_MiB"]
    assert mem["adapters_vs_base"] > 0 and mem["merged_estimate_MiB"] == pytest.approx(
        2 * mem["servers"]["edgemed, base alone"]["VmRSS_MiB"], abs=0.2)


def test_switch_cost_is_timed_for_every_case(result):
    cost = result["switch_cost"]
    assert "1 row, adapter switched before each decode" in cost and "1 row, one adapter kept" in cost
    assert any("2 adapter groups in turn" in k for k in cost) and any("contexts with one adapter each" in k for k in cost)
    assert all(v["median_ms"] > 0 and v["min_ms"] > 0 for v in cost.values())


def test_the_adapters_change_the_answer_so_the_load_measured_adapters(result):
    answers = result["answers"]
    assert answers["asked"] == 3
    for distinct in answers["distinct"].values():
        assert distinct == 3, "base and both adapters must answer differently"


def test_the_report_names_the_command_and_the_load(result, tmp_path):
    from edgemed.benchmarks.serve_adapters import report_md

    text = report_md(result)
    assert "python -m edgemed.benchmarks.serve_adapters" in text and "Load average during the runs" in text
    assert "edgemed with 2 adapters / base alone" in text


def test_the_adapters_are_q8_0_where_rows_allow_by_default(result):
    """--adapter-type's default: Q8_0 lora_a, F16 lora_b at rank 16 (rows of 16 values), named in the report."""
    from edgemed.benchmarks.serve_adapters import report_md

    assert result["adapter_type"] == "q8_0" and set(result["adapter_tensor_types"]) == {"F16", "Q8_0"}
    assert all("/adapters-q8_0/" in f for f in result["adapter_files"])
    assert "MiB each (Q8_0: F16 " in report_md(result)
