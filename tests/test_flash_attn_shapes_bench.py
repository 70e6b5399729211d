"""The flash-attention-by-shape benchmark: llama-bench's rows read right, the calls it makes, and a real smoke run.

The smoke run needs llama.cpp's llama-bench built into the test cache (``python -m edgemed.benchmarks.anchors build``
with ``EDGEMED_CACHE_DIR`` pointing there, as CI does before the tests) and SmolLM2-135M;
no speed is asserted (the figures come from full runs: benchmarks/results/flash_attn_shapes/).
"""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest

from edgemed.benchmarks import flash_attn_shapes as fas
from edgemed.errors import EdgemedError

ARGS = Namespace(threads=2, prompt=724, decode=16, depth=1500, question=32)


def _row(n_prompt, n_gen, n_depth, ts):
    return {"n_prompt": n_prompt, "n_gen": n_gen, "n_depth": n_depth, "avg_ts": ts}


def test_rows_are_read_by_what_they_measured():
    rows = [_row(724, 0, 0, 170.0), _row(32, 0, 0, 150.0), _row(0, 16, 0, 33.0), _row(724, 0, 1500, 124.0),
            _row(32, 0, 1500, 70.0), _row(0, 16, 1500, 29.0)]
    assert fas.parse(rows, ARGS) == {"prefill": 170.0, "decode": 33.0, "decode_at_depth": 29.0, "question_at_depth": 70.0}
    with pytest.raises(EdgemedError, match="no decode_at_depth row"):
        fas.parse(rows[:5], ARGS)


def test_each_call_sets_flash_attention_and_one_repetition():
    on = fas.bench_command(Path("/bin/llama-bench"), Path("m.gguf"), True, ARGS)
    off = fas.bench_command(Path("/bin/llama-bench"), Path("m.gguf"), False, ARGS)
    assert on[on.index("-fa") + 1] == "1" and off[off.index("-fa") + 1] == "0"
    assert on[on.index("-d") + 1] == "0,1500" and on[on.index("-r") + 1] == "1" and on[on.index("-t") + 1] == "2"
    assert on[on.index("-p") + 1] == "724,32"
    # nothing else of edgemed's profile: batch sizes and KV types stay llama-bench's defaults on both sides
    assert not {"-b", "-ub", "-ctk", "-ctv"} & set(on)


def test_a_smoke_run_writes_every_model_its_shape_and_ratios(tmp_path, smollm2_gguf):
    from conftest import TEST_CACHE
    from edgemed.benchmarks import anchors

    try:
        built = anchors.binaries()["llama-bench"].is_file()  # the test cache: the fixtures point EDGEMED_CACHE_DIR there
    except (EdgemedError, KeyError):
        built = False
    if not built:
        pytest.skip("llama-bench is not built in the test cache: run "
                    f"`EDGEMED_CACHE_DIR={TEST_CACHE} python -m edgemed.benchmarks.anchors build` (on an AMX host with "
                    "CC=clang-16 CXX=clang++-16: GCC 12's AMX kernels crash under llama-bench's defaults, "
                    "docs/decisions/0019)")
    out = tmp_path / "r.json"
    fas.main(["--model", str(smollm2_gguf), "--prompt", "32", "--decode", "2", "--depth", "64", "--question", "8", "--rounds", "2",
              "--out", str(out)])
    result = json.loads(out.read_text())
    (m,) = result["models"].values()
    assert m["shape"]["head_dim"] == 64 and m["shape"]["n_head"] == 9 and m["shape"]["n_head_kv"] == 3
    assert len(m["runs"]["on"]) == len(m["runs"]["off"]) == 2
    assert set(m["ratio_on_off_per_round"]) == set(fas.TESTS)
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in m["ratio_on_off_per_round"].values())
    assert result["llama_bench"]["cpu_info"] and "| 64 |" in out.with_suffix(".md").read_text()
