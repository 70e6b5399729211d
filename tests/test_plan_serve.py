"""`edgemed plan --serve` plans the server `edgemed serve` starts with the same options.

`plan --serve` planned one slot (serve starts 4 by default, each with a KV stream of its own), took --ctx as the
total (serve: per slot) and had no --slots or --adapter: on a 1.45 GiB profile it said 6,912 tokens and no prefix
cache for Qwen2.5-0.5B, where serve planned 8,192 tokens and 194 MiB of prefix cache. Both now build the plan in
``session.plan_load``; each case here compares the command's JSON with ``session.prepare`` called as `edgemed serve`
calls it. Real SmolLM2 GGUF header (and the device-side LoRA kit's adapter); nothing is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgemed.cli import cli
from edgemed.cli.serve import serve as serve_command
from edgemed.devices.profiles import get_profile
from edgemed.runtime.session import prepare

pytest.importorskip("gguf")

#: `edgemed serve --slots`'s default, as serve declares it
SERVE_SLOTS = next(p for p in serve_command.params if p.name == "slots").default


@pytest.fixture
def small(tmp_path, monkeypatch) -> str:
    """A user profile for a small x86 box: 1.45 GiB, 0.5 GiB reserve, no flash attention, f16 KV, no mmap.
    ``extra_buffers = "none"``: nothing is repacked, so the plan made for the device the profile describes (`plan
    --profile`) and the one made for a load here (`prepare`) are the same whatever llama.cpp build is installed."""
    toml = Path(get_profile("x86-avx2").source).read_text(encoding="utf-8")
    toml = toml.replace('name = "x86-avx2"', 'name = "small"').replace(
        "reserve_gb = 2.0", "total_gb = 1.45\nreserve_gb = 0.5").replace(
        "use_mlock = false", 'use_mlock = false\nextra_buffers = "none"')
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "small.toml").write_text(toml, encoding="utf-8")
    monkeypatch.setenv("EDGEMED_PROFILES_DIR", str(folder))
    profile = get_profile("small")
    assert profile.memory["total_gb"] == 1.45 and profile.memory["reserve_gb"] == 0.5
    assert not profile.llama["flash_attn"] and not profile.llama["use_mmap"] and profile.llama["type_k"] == "f16"
    return "small"


def _plan(model, *args) -> dict:
    result = CliRunner().invoke(cli, ["plan", str(model), *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _same(cli_plan: dict, prepared) -> None:
    want = prepared.to_dict()
    assert cli_plan["estimate"] == want["estimate"] and cli_plan["budget_bytes"] == want["budget_bytes"]
    assert cli_plan["llama"]["n_ctx"] == prepared.llama["n_ctx"] == cli_plan["estimate"]["n_ctx"]


def test_plan_serve_is_the_plan_serve_makes_with_its_default_slots(smollm2_gguf, small):
    served = prepare(smollm2_gguf, small, prefix_cache=True, slots=SERVE_SLOTS, batched=True).plan
    planned = _plan(smollm2_gguf, "--profile", small, "--serve")
    _same(planned, served)
    assert planned["serve"] == {"slots": SERVE_SLOTS, "n_ctx_per_slot": served.llama["n_ctx"] // SERVE_SLOTS,
                                "prefix_cache": True, "adapters": []}
    assert planned["estimate"]["prefix_cache"] > 0  # the budget left room for saved prefixes, as serve counts it
    one = prepare(smollm2_gguf, small, prefix_cache=True, slots=1, batched=True).plan
    assert one.estimate != served.estimate  # one slot (what plan --serve planned) is another server


@pytest.mark.parametrize("args, slots, ctx_total, cache", [
    (["--slots", "2"], 2, None, True),
    (["--serve", "--slots", "2", "--ctx", "1024"], 2, 2048, True),  # --ctx per slot, as serve takes it
    (["--no-prefix-cache"], SERVE_SLOTS, None, False),
])
def test_plan_takes_serves_options_as_serve_does(smollm2_gguf, small, args, slots, ctx_total, cache):
    per_slot = ctx_total // slots if ctx_total else None  # prepare takes --ctx per slot, as serve passes it
    served = prepare(smollm2_gguf, small, n_ctx=per_slot, prefix_cache=cache, slots=slots, batched=True).plan
    planned = _plan(smollm2_gguf, "--profile", small, *args)
    _same(planned, served)
    assert planned["serve"]["slots"] == slots and planned["serve"]["prefix_cache"] is cache
    if ctx_total:
        assert planned["estimate"]["n_ctx"] == ctx_total and planned["serve"]["n_ctx_per_slot"] == ctx_total // slots
    if not cache:
        assert planned["estimate"]["prefix_cache"] == 0


def test_plan_refuses_what_serve_refuses(smollm2_gguf, small):
    both = CliRunner().invoke(cli, ["plan", str(smollm2_gguf), "--profile", small, "--no-prefix-cache",
                                    "--prefix-cache-mib", "64"])
    assert both.exit_code == 1 and "contradict each other" in both.output
    tiny = CliRunner().invoke(cli, ["plan", str(smollm2_gguf), "--profile", small, "--serve", "--ctx", "32"])
    assert tiny.exit_code == 2 and "'--ctx'" in tiny.output  # serve takes 64 tokens a slot at least


def test_a_context_refused_for_the_slots_says_ctx_is_per_slot(smollm2_gguf, small):
    """`plan --serve --ctx 2048 --slots 4` over the budget was refused as "A 8192-token context needs ..." with "leave
    --ctx out": the user asked for 2,048 tokens, and --ctx is per slot there. The refusal names what was asked (the
    per-slot --ctx and the slots) and the two settings that shrink it; `run`'s one slot is refused as before."""
    def refused(*args: str) -> str:
        result = CliRunner().invoke(cli, ["plan", str(smollm2_gguf), "--profile", small, *args])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        return " ".join(result.output.split())

    text = refused("--serve", "--ctx", "2048", "--slots", "4", "--budget-mb", "300")
    assert "A 8192-token context (--ctx 2048 per slot x 4 slots) needs" in text, text
    assert "Fix: pass a smaller --ctx (tokens per slot: 2048 now) or fewer --slots (4 now)" in text, text
    text = refused("--ctx", "8192", "--slots", "4")  # the profile's own budget, its reserve note added
    assert "A 32768-token context (--ctx 8192 per slot x 4 slots) needs" in text and "memory.reserve_gb" in text
    assert "pass a smaller --ctx (tokens per slot: 8192 now) or fewer --slots (4 now)" in text, text
    text = refused("--ctx", "8192", "--budget-mb", "300")  # run: one slot, --ctx is the whole context
    assert "A 8192-token context needs" in text and "per slot" not in text and "--slots" not in text, text


def test_plan_serve_counts_the_adapters_serve_would_apply(smollm2_gguf, small):
    import lora_gguf_kit
    from edgemed.runtime.loader import AdapterSpec

    base = lora_gguf_kit.base(smollm2_gguf)
    lora = lora_gguf_kit.adapter(base, "cardio")
    served = prepare(base, small, prefix_cache=True, slots=SERVE_SLOTS, batched=True,
                     adapters=[AdapterSpec(lora)]).plan
    planned = _plan(base, "--profile", small, "--serve", "--adapter", str(lora))
    _same(planned, served)
    assert planned["estimate"]["adapters"] > 0 and planned["serve"]["adapters"] == ["cardio"]
    run = _plan(base, "--profile", small, "--adapter", str(lora))  # without --serve: `run --adapter`'s plan
    _same(run, prepare(base, small, adapters=[AdapterSpec(lora)]).plan)
    assert "serve" not in run


def test_prepare_takes_the_context_per_slot_and_counts_the_slots(smollm2_gguf, small):
    """``serve --ctx`` is per slot; serve multiplied it by the slots itself and handed ``prepare`` the total, while
    ``plan --serve`` did the same sum on its own. ``plan_load`` is now the one place that multiplies: ``prepare`` and
    ``plan_load`` take the context of each slot."""
    two = prepare(smollm2_gguf, small, n_ctx=1024, prefix_cache=True, slots=2, batched=True)
    assert two.plan.estimate.n_ctx == two.load.n_ctx == 2048
    one = prepare(smollm2_gguf, small, n_ctx=1024)  # run's one slot: the context asked for
    assert one.plan.estimate.n_ctx == one.load.n_ctx == 1024


def test_serve_loads_the_context_plan_serve_plans(smollm2_gguf, small, monkeypatch, tmp_path):
    """`edgemed serve --slots 2 --ctx 256` hands its batcher the load that `plan --serve` with the same options
    plans: 2 x 256 tokens, one plan for both (stopped before anything loads)."""
    from edgemed.errors import EdgemedError
    from edgemed.runtime.batch import batcher as batcher_module

    monkeypatch.setenv("EDGEMED_HOME", str(tmp_path / "home"))
    seen: dict = {}

    class Stop(EdgemedError):
        pass

    def stop(path, load, **kwargs):
        seen.update(load=load, **kwargs)
        raise Stop("stopped before loading", "this is a test")

    monkeypatch.setattr(batcher_module, "Batcher", stop)
    args = ["--profile", small, "--slots", "2", "--ctx", "256"]
    result = CliRunner().invoke(cli, ["serve", str(smollm2_gguf), "--port", "0", "--no-adapters", *args])
    assert "stopped before loading" in result.output, result.output
    planned = _plan(smollm2_gguf, *args)
    assert seen["load"].n_ctx == planned["llama"]["n_ctx"] == planned["estimate"]["n_ctx"] == 2 * 256
    assert seen["slots"] == planned["serve"]["slots"] == 2 and planned["serve"]["n_ctx_per_slot"] == 256
    assert seen["prefix_cache_bytes"] == planned["estimate"]["prefix_cache"]


def test_serve_refuses_contradicting_cache_options_before_it_opens_the_model(tmp_path, monkeypatch):
    """The check is ``plan_load``'s; serve makes it first, so a model that is not there is not what it reports."""
    monkeypatch.setenv("EDGEMED_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(cli, ["serve", str(tmp_path / "absent.gguf"), "--port", "0", "--no-prefix-cache",
                                      "--prefix-cache-mib", "64"])
    assert result.exit_code == 1
    assert "--no-prefix-cache and --prefix-cache-mib 64 contradict each other" in result.output


def test_plan_takes_serves_options_without_loading_serve():
    """`plan --serve`'s --slots, --ctx and adapters are declared in ``cli.serving`` with serve's: plan no longer
    reads them (nor serve's private adapter parser) from the serve command."""
    import subprocess
    import sys

    from edgemed.cli import serving
    from edgemed.cli.plan import plan as plan_command

    code = "import sys, edgemed.cli.plan; print('edgemed.cli.serve' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
    for command in (plan_command, serve_command):
        slots = next(p for p in command.params if p.name == "slots")
        assert slots.type is serving.SLOTS and slots.default == serving.DEFAULT_SLOTS == SERVE_SLOTS
    assert next(p for p in serve_command.params if p.name == "n_ctx").type is serving.CTX_PER_SLOT
