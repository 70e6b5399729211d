"""Converters: Hugging Face checkpoint (+ LoRA) -> GGUF or ONNX. Workstation side; needs ``edgemed[convert]``.

The registry maps a Hugging Face ``architectures`` name to the small module that
describes it (``edgemed.converters.arch.<name>``). Adding Qwen3 or Gemma3 is one
module and one row here.
"""

from __future__ import annotations

import importlib

from edgemed.errors import UnsupportedArchitecture, require

# Hugging Face architecture name -> module under edgemed.converters.arch
REGISTRY: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}


# What each route imports, as (module, extra), in the order a missing one is reported. Checked before any
# work, so that an install without them gets the one-paragraph "install the extra" message, not a traceback.
ROUTE_NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "gguf": (("gguf", "convert"), ("numpy", "convert"), ("torch", "convert"), ("transformers", "convert"), ("llama_cpp", "gguf")),
    "onnx": (("numpy", "convert"), ("torch", "convert"), ("transformers", "convert"), ("onnx", "convert"),
             ("onnxruntime", "convert")),
    "check": (("gguf", "convert"), ("numpy", "convert"), ("torch", "convert"), ("transformers", "convert"), ("llama_cpp", "gguf")),
}


def require_route(route: str) -> None:
    """Raise ``MissingDependency`` (naming the extra) for the first package ``route`` needs that is not installed."""
    for module, extra in ROUTE_NEEDS[route]:
        require(module, extra)


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
