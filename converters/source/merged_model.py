"""A Hugging Face causal LM in torch float32 with a LoRA adapter merged into its weights.

The merge is the spine's: ``LoraAdapter.apply`` per tensor (no second
implementation). Weights tied between two names (Qwen2's ``lm_head`` and
``embed_tokens``) follow PEFT: a LoRA delta is merged in place, so both names
see it; a full replacement (``modules_to_save: [lm_head]``) unties that name
first, so the other keeps the base weight.
"""

from __future__ import annotations



def load_merged(source, adapter=None, attn_implementation: str = "eager"):
    """``AutoModelForCausalLM`` in float32, eval mode, with ``adapter`` (a ``LoraAdapter``) merged.

    ``source``: the command's opened ``Checkpoint`` (with its pickle consent), or a directory, opened without it."""
    import torch
    from transformers.utils import logging as hf_logging

    from edgemed.converters.source.checkpoint import as_checkpoint

    ckpt = as_checkpoint(source)
    hf_logging.disable_progress_bar()
    model = ckpt.hf_model(dtype=torch.float32, attn_implementation=attn_implementation)
    model.eval()
    if adapter is not None:
        merge_into(model, adapter)
    return model


def merge_into(model, adapter) -> int:
    """Merge ``adapter`` into ``model``'s parameters; returns how many tensors changed."""
    import torch

    params = dict(model.named_parameters(remove_duplicate=False))
    aliases: dict[int, list[str]] = {}
    for name, p in params.items():
        aliases.setdefault(id(p), []).append(name)
    changed = 0
    with torch.no_grad():
        for name, p in params.items():
            if not adapter.touches(name):
                continue
            merged = adapter.apply(name, p.detach()).to(p.dtype)
            shared = [n for n in aliases[id(p)] if n != name]
            if shared and name in adapter.replacements:
                module_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(merged, requires_grad=False))
            else:
                p.copy_(merged)
            changed += 1
    return changed
