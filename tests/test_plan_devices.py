"""``python -m edgemed.benchmarks.plan_devices``: the planner's answer for GGUF files on every device profile."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("gguf")

from edgemed.benchmarks import plan_devices  # noqa: E402
from edgemed.devices.profiles import load_profiles  # noqa: E402
from edgemed.runtime.plan import choose_context, estimate, profile_settings, read_shape  # noqa: E402
from test_planner import write_tiny_gguf  # noqa: E402


def test_every_profile_gets_the_largest_context_that_fits(smollm2_gguf, tmp_path):
    out = tmp_path / "plan_devices-smollm2"
    assert plan_devices.main([str(smollm2_gguf), "-o", str(out), "--memory-gb", "4", "16"]) == 0
    result = json.loads(out.with_name(out.name + ".json").read_text())
    table = out.with_name(out.name + ".md").read_text()
    shape = read_shape(smollm2_gguf)
    profiles = load_profiles()
    rows = result["rows"]
    # one row per fixed-size profile, one per --memory-gb size for the others
    expected = sum(1 if "total_gb" in p.memory else 2 for p in profiles.values())
    assert len(rows) == expected
    for row in rows:
        profile = profiles[row["profile"]]
        assert row["profile"] in table
        assert row["fits"], row  # a 135M model fits every shipped device
        assert row["n_ctx"] <= shape.n_ctx_train and row["n_ctx"] % 256 == 0
        settings = profile_settings(profile, shape)
        # the largest: the chosen context fits and one step more would not (or the trained context is reached)
        budget = row["budget_mib"] * 2**20
        assert estimate(shape, row["n_ctx"], **settings).total <= budget + 2**20
        if row["limited_by"] == "budget":
            assert estimate(shape, row["n_ctx"] + 256, **settings).total > budget - 2**20
        else:
            assert row["limited_by"] == "model" and row["n_ctx"] == shape.n_ctx_train
    # SmolLM2's 8192-token trained context fits even an 8 GB Jetson: the cap is the model, not the profile
    nano = next(r for r in rows if r["profile"] == "jetson-orin-nano-8gb")
    assert nano["n_ctx"] == shape.n_ctx_train == 8192


def test_a_model_that_does_not_fit_is_reported_with_its_need(tmp_path):
    model = tmp_path / "wide.gguf"
    write_tiny_gguf(model, n_embd=4096, n_ff=16384, n_vocab=32000, n_head=32, n_head_kv=8, ctx=4096)
    result = plan_devices.plan_devices([model], memory_gb=(2.5,))
    x86 = next(r for r in result["rows"] if r["profile"] == "x86-avx2")
    assert x86["budget_mib"] == pytest.approx(0.5 * 1024, abs=1)  # 2.5 GiB minus the profile's 2 GiB reserve
    # the same answer as the planner's own search, capped at the trained context
    profile = load_profiles()["x86-avx2"]
    shape = read_shape(model)
    n_ctx, _ = choose_context(shape, profile, int(x86["budget_mib"] * 2**20))
    assert x86["fits"] and x86["n_ctx"] == n_ctx
    tiny_machine = plan_devices.plan_devices([model], memory_gb=(2.05,))
    row = next(r for r in tiny_machine["rows"] if r["profile"] == "x86-avx2")
    assert not row["fits"] and row["n_ctx"] is None and row["peak_mib"] > row["budget_mib"]
    assert "no: needs" in plan_devices.to_markdown(tiny_machine)


def test_only_headers_are_read(smollm2_gguf):
    """No weights loaded: neither llama.cpp nor torch (nor onnxruntime) is imported to plan a file."""
    code = ("import sys; from edgemed.benchmarks import plan_devices as p; "
            f"assert p.main([{str(smollm2_gguf)!r}, '--json']) == 0; "
            "assert not {'llama_cpp', 'torch', 'onnxruntime'} & set(sys.modules), sorted(sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rows"]
