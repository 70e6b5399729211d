"""Flash attention chosen per model: on where a profile's ``flash_attn`` says so, and also for models whose attention
heads are one of the widths in its ``llama.flash_attn_head_dims`` (docs/decisions/0017). The planner's choice, the
memory it counts, what reaches the load settings, the schema's checks and what `edgemed plan` says; GGUF headers
only, nothing is loaded."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgemed.cli import cli
from edgemed.devices.profiles import get_profile, read_profile
from edgemed.errors import ProfileError
from edgemed.runtime.plan import flash_attn_for, make_plan, profile_settings, read_shape
from edgemed.runtime.session import load_settings

pytest.importorskip("gguf")
from test_planner import write_tiny_gguf


def _with(profile, **llama):
    return dataclasses.replace(profile, llama={**profile.llama, **llama})


@pytest.fixture
def narrow(tmp_path):
    return write_tiny_gguf(tmp_path / "narrow.gguf", n_embd=128, n_head=2, n_head_kv=1)  # 64-wide heads


@pytest.fixture
def wide(tmp_path):
    return write_tiny_gguf(tmp_path / "wide.gguf", n_embd=256, n_head=2, n_head_kv=1)  # 128-wide heads


def test_listed_head_widths_get_flash_attention_and_the_others_the_profiles_flag(narrow, wide):
    profile = _with(get_profile("x86-avx512"), flash_attn=False, flash_attn_head_dims=[128])
    assert read_shape(narrow).head_dim_k == 64 and read_shape(wide).head_dim_k == 128
    assert flash_attn_for(profile, read_shape(narrow)) is False
    assert flash_attn_for(profile, read_shape(wide)) is True
    assert flash_attn_for(_with(profile, flash_attn_head_dims=[64, 256]), read_shape(wide)) is False
    # the list only turns flash attention on: a profile that has it on keeps it for every width
    assert flash_attn_for(_with(profile, flash_attn=True), read_shape(narrow)) is True
    # no list (absent or empty): the profile's flag for every model
    for flag in (True, False):
        for rule in ({}, {"flash_attn_head_dims": []}):
            bare = dataclasses.replace(profile, llama={**{k: v for k, v in profile.llama.items()
                                                          if k != "flash_attn_head_dims"}, "flash_attn": flag, **rule})
            assert flash_attn_for(bare, read_shape(narrow)) is flag and flash_attn_for(bare, read_shape(wide)) is flag


def test_the_plan_loads_and_counts_memory_with_the_choice_for_this_model(narrow, wide):
    profile = _with(get_profile("x86-avx512"), flash_attn=False, flash_attn_head_dims=[128])
    n, w = make_plan(narrow, profile, None, budget=1 << 34), make_plan(wide, profile, None, budget=1 << 34)
    assert n.llama["flash_attn"] is False and w.llama["flash_attn"] is True
    assert load_settings(n).flash_attn is False and load_settings(w).flash_attn is True  # what reaches llama.cpp
    assert profile_settings(profile, read_shape(wide))["flash_attn"] is True
    # without flash attention the compute buffer holds the attention scores: the wide model's plan leaves them out
    never = _with(profile, flash_attn_head_dims=[])
    assert make_plan(wide, never, None, budget=1 << 34).estimate.compute > w.estimate.compute
    assert make_plan(narrow, never, None, budget=1 << 34).estimate.compute == n.estimate.compute


def test_no_shipped_profile_lists_a_width_yet():
    # measured on AVX-512: 128-wide heads read a conversation's next question slower with it (decision 0017)
    from edgemed.devices.profiles import load_profiles

    assert {name: p.llama["flash_attn_head_dims"] for name, p in load_profiles().items()
            if "flash_attn_head_dims" in p.llama} == {}
    assert get_profile("x86-avx512").llama["flash_attn"] is False
    assert get_profile("jetson-orin-nano-8gb").llama["flash_attn"] is True  # its q8_0 cache needs it, every width


def _profile_text(**changes) -> str:
    text = (Path(__file__).parents[1] / "device_profiles" / "x86-avx512.toml").read_text(encoding="utf-8")
    for key, value in changes.items():
        lines = [line for line in text.splitlines() if not line.startswith(f"{key} ")]
        at = next(i for i, line in enumerate(lines) if line.startswith("flash_attn ")) + 1
        text = "\n".join(lines[:at] + [f"{key} = {value}"] + lines[at:]) + "\n"
    return text


@pytest.mark.parametrize("value, expected", [
    ("128", "a list of at most 64 integers from 1 to 65536"), ("[0]", "a list of at most 64 integers"),
    ('["128"]', "a list of at most 64 integers"), ("[true]", "a list of at most 64 integers"),
    ("[131072]", "from 1 to 65536"),
])
def test_the_schema_refuses_a_bad_list_naming_the_field(tmp_path, value, expected):
    path = tmp_path / "x86-avx512.toml"
    path.write_text(_profile_text(flash_attn_head_dims=value), encoding="utf-8")
    with pytest.raises(ProfileError) as err:
        read_profile(path)
    assert "llama.flash_attn_head_dims" in err.value.problem and expected in err.value.problem
    assert "x86-avx512.toml" in err.value.fix


def test_a_profile_without_the_rule_still_loads(tmp_path):
    text = "\n".join(line for line in _profile_text().splitlines() if not line.startswith("flash_attn_head_dims"))
    path = tmp_path / "x86-avx512.toml"
    path.write_text(text, encoding="utf-8")
    assert "flash_attn_head_dims" not in read_profile(path).llama


def test_edgemed_plan_says_why_flash_attention_is_on(narrow, wide, tmp_path, monkeypatch):
    # a site's own profile (a copy of x86-avx512 under another name) that lists 128
    folder = tmp_path / "profiles"
    folder.mkdir()
    text = _profile_text(flash_attn_head_dims="[128]").replace('name = "x86-avx512"', 'name = "site-cpu"')
    (folder / "site-cpu.toml").write_text(text, encoding="utf-8")
    monkeypatch.setenv("EDGEMED_PROFILES_DIR", str(folder))
    runner = CliRunner()
    out = runner.invoke(cli, ["plan", str(wide), "--profile", "site-cpu", "--budget-mb", "4096"])
    assert out.exit_code == 0, out.output
    assert "flash_attn True: heads 128 wide, one of the profile's flash_attn_head_dims" in out.output
    assert "flash_attn=True" in out.output
    out = runner.invoke(cli, ["plan", str(narrow), "--profile", "site-cpu", "--budget-mb", "4096"])
    assert out.exit_code == 0, out.output
    assert "flash_attn False)" in out.output and "flash_attn=False" in out.output
    as_json = runner.invoke(cli, ["plan", str(wide), "--profile", "site-cpu", "--budget-mb", "4096", "--json"])
    assert json.loads(as_json.output)["llama"]["flash_attn"] is True
    shipped = runner.invoke(cli, ["plan", str(wide), "--profile", "x86-avx512", "--budget-mb", "4096", "--json"])
    assert json.loads(shipped.output)["llama"]["flash_attn"] is False
