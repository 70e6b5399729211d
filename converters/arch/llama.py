"""LlamaForCausalLM: Llama 2/3, DeepSeek-R1-Distill-Llama-8B/70B, SmolLM2.

llama.cpp's LLAMA graph applies rotary embeddings to adjacent pairs, while the
Hugging Face checkpoint stores Q and K permuted for the half-split form: undo
that permutation here (after LoRA merge, so the adapter stays in HF layout).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgemed.converters.arch.base import ArchSpec, write_decoder_hparams

if TYPE_CHECKING:  # annotations only: numpy is imported when a conversion runs
    import numpy as np


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # w: [n_head * head_dim, hidden] in HF half-split order -> interleaved pairs
    rows = w.shape[0]
    return (
        w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])  # [head, half, pair, ...]
        .swapaxes(1, 2)  # [head, pair, half, ...]
        .reshape(w.shape)
    )


def _q(w, ckpt):
    return _unpermute(w, int(ckpt.hparam("num_attention_heads")))


def _k(w, ckpt):
    n_head = int(ckpt.hparam("num_attention_heads"))
    return _unpermute(w, int(ckpt.hparam("num_key_value_heads", default=n_head)))


SPEC = ArchSpec(
    gguf_arch="LLAMA",
    model_type="llama",
    transforms={"ATTN_Q": _q, "ATTN_K": _k},
    extra_hparams=write_decoder_hparams,
    # attention_bias / mlp_bias checkpoints
    optional=("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias", "ffn_gate.bias", "ffn_up.bias",
              "ffn_down.bias"),
    optional_if={**dict.fromkeys(("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias"), "attention_bias"),
                 **dict.fromkeys(("ffn_gate.bias", "ffn_up.bias", "ffn_down.bias"), "mlp_bias")},
)
