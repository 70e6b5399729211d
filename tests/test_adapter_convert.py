"""A PEFT LoRA written as a GGUF LoRA adapter (``convert --lora A --adapter-only``): llama.cpp loads it, it
computes what PEFT computes, and a file that cannot be right is refused before any work.

The adapter is real: made by ``peft`` on the real SmolLM2-135M checkpoint (non-zero B, r=8, targets q/k/v/o and
the MLP). The base GGUFs are converted from the same checkpoint once per module.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import need_converter

pytestmark = pytest.mark.slow

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = "The patient presents with chest pain and"


def make_lora(base: Path, out: Path, *, r: int = 8, alpha: int = 16, std: float = 0.02, seed: int = 1, **extra) -> Path:
    """A PEFT LoRA adapter on ``base`` with random non-zero A and B (a trained adapter's shape, not its values)."""
    need_converter("torch", "transformers", "peft")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=TARGETS, **extra)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, std)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("adapter")


@pytest.fixture(scope="module")
def lora(smollm2_hf, work) -> Path:
    return make_lora(smollm2_hf, work / "cardio-lora")


@pytest.fixture(scope="module")
def base_f16(smollm2_hf, work) -> Path:
    from edgemed.converters.pipeline import ConvertOptions, convert

    out = work / "base-f16.gguf"
    convert(smollm2_hf, out, ConvertOptions(out_type="f16", parity=False), echo=lambda s: None)
    return out


def _written(smollm2_hf, lora, out: Path, **kw):
    from edgemed.converters import arch_spec
    from edgemed.converters.gguf.adapter import write_adapter_gguf
    from edgemed.converters.source.source import Source

    src = Source.open(smollm2_hf, lora=lora)
    spec = arch_spec(src.checkpoint.architecture)
    planned = write_adapter_gguf(src.checkpoint, spec, src.adapter, out, base_source_sha256=src.checkpoint.digest(), **kw)
    return src, planned


def test_llamacpp_loads_the_adapter_and_it_changes_the_logits(smollm2_hf, lora, base_f16, work):
    """llama.cpp reads the file (its keys and every pair's shape checked against the base's tensors), reads back
    edgemed's keys, and the adapter applied to a context changes the logits towards PEFT's."""
    import numpy as np

    from edgemed.converters.gguf.adapter import BASE_SOURCE_KEY
    from edgemed.formats.gguf_header import read_header
    from edgemed.runtime import llamacpp
    from edgemed.runtime.engine import LoadSettings
    from edgemed.runtime.loader import load_model

    out = work / "direct.lora.gguf"
    src, planned = _written(smollm2_hf, lora, out)
    assert len(planned) == 30 * 7  # q/k/v/o + gate/up/down in each of SmolLM2's 30 layers
    meta = read_header(out).metadata
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora" and meta["adapter.lora.alpha"] == 16.0
    assert meta["general.architecture"] == "llama"
    model = load_model(base_f16, LoadSettings(n_ctx=64, extra_buffers="none"))
    ctx = adapter = None
    try:
        ctx = llamacpp.Context(model, n_ctx=64, n_batch=64)
        tokens = model.tokenize(PROMPT, add_special=True)
        bare = ctx.eval(tokens, all_rows=True)
        adapter = llamacpp.Adapter(model, out)
        assert adapter.meta("adapter.type") == "lora"
        assert adapter.meta(BASE_SOURCE_KEY) == src.checkpoint.digest() == read_header(base_f16).metadata["edgemed.source.sha256"]
        ctx.set_adapters([(adapter, 1.0)])
        ctx.clear()
        adapted = ctx.eval(tokens, all_rows=True)
        ctx.set_adapters([])
        ctx.clear()
        again = ctx.eval(tokens, all_rows=True)
    finally:
        for obj in (ctx, adapter, model):
            if obj is not None:
                obj.close()
    assert np.abs(adapted - bare).max() > 0.5  # the adapter is applied on the native side
    np.testing.assert_array_equal(again, bare)  # and taken off again
