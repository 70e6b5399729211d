"""Helpers for the LoRA adapter tests: a real PEFT LoRA on a real checkpoint, and its GGUF adapter file.

``make_lora`` is the PEFT adapter ``test_adapter_convert`` makes (random non-zero A and B, r=8, targets q/k/v/o and
the MLP); ``adapter_gguf`` writes one as the GGUF LoRA adapter ``convert --adapter-only`` writes, without the parity
run (the packaging tests need the file, not its gate).
"""

from __future__ import annotations

from pathlib import Path

from conftest import need_converter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lora(base: Path, out: Path, *, r: int = 8, alpha: int = 16, std: float = 0.02, seed: int = 1, **extra) -> Path:
    """A PEFT LoRA adapter on ``base`` with random non-zero A and B (a trained adapter's shape, not its values)."""
    need_converter("torch", "transformers", "peft")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    extra.setdefault("target_modules", TARGETS)
    config = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, **extra)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, std)
    peft_model.save_pretrained(out)
    return out


def adapter_gguf(checkpoint: Path, lora: Path, out: Path, *, base_source_sha256: str | None = None, **kw) -> tuple[Path, str]:
    """``lora`` written as a GGUF LoRA adapter for ``checkpoint`` (``base_source_sha256``: the base it records, default
    the checkpoint's own sha256, as convert writes it); returns (file, the checkpoint's sha256)."""
    from edgemed.converters import arch_spec
    from edgemed.converters.gguf.adapter import write_adapter_gguf
    from edgemed.converters.source.source import Source

    src = Source.open(checkpoint, lora=lora)
    digest = src.checkpoint.digest()
    write_adapter_gguf(src.checkpoint, arch_spec(src.checkpoint.architecture), src.adapter, out,
                       base_source_sha256=base_source_sha256 or digest, **kw)
    return out, digest
