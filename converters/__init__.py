"""Converters: Hugging Face checkpoint (+ LoRA) -> GGUF. Workstation side; needs ``edgemed[convert]``.

The registry maps a Hugging Face ``architectures`` name to the small module that
describes it (``edgemed.converters.arch.<name>``). Adding Qwen3 or Gemma3 is one
module and one row here.
"""

from __future__ import annotations

import importlib

from edgemed.errors import UnsupportedArchitecture

# Hugging Face architecture name -> module under edgemed.converters.arch
REGISTRY: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}


def supported_architectures() -> list[str]:
    return sorted(REGISTRY)


def arch_spec(hf_architecture: str):
    """The ``ArchSpec`` for a Hugging Face architecture name, or a clear refusal."""
    module = REGISTRY.get(hf_architecture)
    if module is None:
        raise UnsupportedArchitecture(
            f"Architecture '{hf_architecture}' is not supported by edgemed convert.",
            f"supported architectures: {', '.join(supported_architectures())}",
        )
    return importlib.import_module(f"edgemed.converters.arch.{module}").SPEC
