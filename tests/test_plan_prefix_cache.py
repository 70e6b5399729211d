"""The host-RAM prefix cache in the device profiles and the memory plan (``edgemed serve`` counts it).

The profile's ``memory.prefix_cache_mib`` is checked by the schema; the planner reduces the profile's size to what
the budget leaves after the model and its context, and refuses a size asked on the command line that cannot fit.
Real SmolLM2 GGUF header; nothing is loaded.
"""

from __future__ import annotations

import dataclasses

import pytest

from edgemed.devices.profiles import get_profile, load_profiles, read_profile
from edgemed.errors import InputError, PlanError, ProfileError
from edgemed.runtime.plan import MIB, make_plan, prefix_cache_request

pytest.importorskip("gguf")


def _with(profile, **memory):
    return dataclasses.replace(profile, memory={**profile.memory, **memory})


def test_every_shipped_profile_sizes_the_cache_and_small_devices_get_less():
    sizes = {name: p.memory["prefix_cache_mib"] for name, p in load_profiles().items() if p.source.endswith(".toml")}
    assert all(isinstance(v, int) and v > 0 for v in sizes.values()), sizes
    assert sizes["jetson-orin-nano-8gb"] < sizes["x86-avx2"] == sizes["x86-avx512"]
    assert sizes["jetson-orin-nano-8gb"] <= sizes["jetson-orin-nx-16gb"] <= sizes["jetson-agx-orin-64gb"]


@pytest.mark.parametrize("value, expected", [(-1, "an integer from 0"), (1.5, "an integer from 0"), ("256", "an integer"),
                                             (True, "an integer"), (1 << 40, "an integer from 0 to 1048576")])
def test_the_schema_refuses_a_bad_cache_size_naming_the_field(tmp_path, value, expected):
    text = get_profile_text("generic").replace("prefix_cache_mib = 256", f"prefix_cache_mib = {_toml(value)}")
    path = tmp_path / "generic.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ProfileError) as err:
        read_profile(path)
    assert "memory.prefix_cache_mib" in err.value.problem and expected in err.value.problem
    assert "generic.toml" in err.value.fix


def test_a_profile_without_the_key_still_loads_and_gets_the_default(tmp_path):
    text = "\n".join(line for line in get_profile_text("generic").splitlines() if not line.startswith("prefix_cache_mib"))
    path = tmp_path / "generic.toml"
    path.write_text(text, encoding="utf-8")
    profile = read_profile(path)
    assert "prefix_cache_mib" not in profile.memory
    assert prefix_cache_request(profile) == (256 * MIB, False)


def test_serve_plans_the_profile_cache_and_run_does_not(smollm2_gguf):
    profile = _with(get_profile("generic"), total_gb=16.0)
    run = make_plan(smollm2_gguf, profile, None)
    served = make_plan(smollm2_gguf, profile, None, prefix_cache=prefix_cache_request(profile))
    assert run.estimate.prefix_cache == 0
    assert served.estimate.prefix_cache == 256 * MIB == served.prefix_cache_asked
    assert served.estimate.total == run.estimate.total + 256 * MIB
    assert served.to_dict()["estimate"]["prefix_cache"] == 256 * MIB
    assert served.estimate.n_ctx == run.estimate.n_ctx  # the profile's cache never takes context


def test_the_profile_cache_is_reduced_to_what_the_budget_leaves(smollm2_gguf):
    profile = get_profile("generic")
    model_only = make_plan(smollm2_gguf, profile, None, budget=1 << 40)
    budget = model_only.estimate.total + 100 * MIB + 12345
    plan = make_plan(smollm2_gguf, profile, None, budget=budget, prefix_cache=prefix_cache_request(profile))
    assert plan.estimate.n_ctx == model_only.estimate.n_ctx
    assert plan.estimate.prefix_cache == 100 * MIB  # whole MiB of what is left, not the profile's 256
    assert plan.prefix_cache_asked == 256 * MIB and plan.fits


def test_an_asked_cache_takes_context_and_is_refused_when_nothing_fits(smollm2_gguf):
    profile = get_profile("generic")
    model_only = make_plan(smollm2_gguf, profile, None, budget=1 << 40)
    budget = model_only.estimate.total + 100 * MIB
    asked = make_plan(smollm2_gguf, profile, None, budget=budget, prefix_cache=prefix_cache_request(profile, 90))
    assert asked.estimate.prefix_cache == 90 * MIB and asked.fits
    with pytest.raises(PlanError) as err:
        make_plan(smollm2_gguf, profile, None, budget=budget, prefix_cache=prefix_cache_request(profile, 4096))
    assert "--prefix-cache-mib 4096 MiB" in err.value.problem
    assert "smaller --prefix-cache-mib" in err.value.fix
    with pytest.raises(PlanError, match="prefix-cache-mib"):  # with --ctx too: the request does not fit
        make_plan(smollm2_gguf, profile, None, requested_ctx=model_only.estimate.n_ctx, budget=budget,
                  prefix_cache=prefix_cache_request(profile, 4096))


@pytest.mark.parametrize("mib", [-1, 1.5, True, 1 << 21])
def test_a_bad_asked_size_is_refused(mib):
    with pytest.raises(InputError, match="--prefix-cache-mib"):
        prefix_cache_request(get_profile("generic"), mib)


def get_profile_text(name: str) -> str:
    from pathlib import Path

    return Path(get_profile(name).source).read_text(encoding="utf-8")


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def test_edgemed_plan_shows_the_cache_only_when_planning_for_serve(smollm2_gguf):
    from click.testing import CliRunner

    from edgemed.cli import cli as main

    runner = CliRunner()
    plain = runner.invoke(main, ["plan", str(smollm2_gguf), "--profile", "generic"])
    assert plain.exit_code == 0, plain.output
    assert "prefix cache" not in plain.output
    served = runner.invoke(main, ["plan", str(smollm2_gguf), "--profile", "generic", "--serve"])
    assert served.exit_code == 0, served.output
    assert "prefix cache" in served.output and "256.0 MiB" in served.output
    asked = runner.invoke(main, ["plan", str(smollm2_gguf), "--profile", "generic", "--prefix-cache-mib", "48", "--json"])
    assert asked.exit_code == 0, asked.output
    import json

    assert json.loads(asked.output)["estimate"]["prefix_cache"] == 48 * MIB
