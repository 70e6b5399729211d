"""Qwen2ForCausalLM: Qwen2/2.5 and DeepSeek-R1-Distill-Qwen-1.5B/7B/14B/32B.

Same decoder as Llama with biases on Q/K/V; llama.cpp's QWEN2 graph uses the
half-split (NeoX) rotary form, so tensors are written as Hugging Face stores them.
"""

from __future__ import annotations

from edgemed.converters.arch.base import ArchSpec, write_decoder_hparams

SPEC = ArchSpec(
    gguf_arch="QWEN2",
    model_type="qwen2",
    rope_types=("default", "linear", "yarn"),
    extra_hparams=write_decoder_hparams,
    optional=("attn_q.bias", "attn_k.bias", "attn_v.bias"),
)
