"""What a decoder-only architecture needs to say to become a GGUF.

Tensor names come from gguf-py's own tables (``gguf.TensorNameMap``); an arch
module only states what differs: the GGUF architecture, tensors llama.cpp
lays out differently (Llama's rotary permutation of Q/K), and which
hyper-parameters it reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from edgemed.errors import CheckpointError, require

if TYPE_CHECKING:  # annotations only: gguf and numpy are imported when a conversion runs
    import gguf
    import numpy as np


def _gguf():
    return require("gguf", "convert")


@dataclass(frozen=True)
class ArchSpec:
    # gguf-py's MODEL_ARCH member, by name ("LLAMA"): the tables stay importable without the gguf package
    gguf_arch: str
    # Hugging Face tensor-name suffixes that are not weights (buffers) and are dropped.
    skip_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)
    # Per-tensor transform applied after LoRA merge, before dtype conversion, keyed by gguf-py's
    # MODEL_TENSOR member name ("ATTN_Q"): (array, ckpt) -> array
    transforms: dict = field(default_factory=dict)
    # rope scaling types this arch accepts
    rope_types: tuple[str, ...] = ("default", "linear", "yarn", "llama3")
    # Extra hyper-parameter writer
    extra_hparams: Callable | None = None
    # Block tensors (GGUF names without "blk.N.") llama.cpp's graph for this arch reads when present; a block tensor
    # neither required (BLOCK_TENSORS) nor here would make llama.cpp refuse the file ("wrong number of tensors")
    optional: tuple[str, ...] = ()
    # Those of ``optional`` the model has only where a config.json flag says so (Llama's attention_bias, mlp_bias):
    # Hugging Face loading ignores them otherwise, so stored without the flag they are refused
    optional_if: dict = field(default_factory=dict)
    # tie_word_embeddings when config.json leaves it out: the default of transformers' config class for the arch
    tie_default: bool = False
    # config.json's model_type for this class: Hugging Face loading builds the model of the model_type, the GGUF writer
    # the one 'architectures' names, so a config where the two disagree is refused (source.checkpoint.validate_config)
    model_type: str | None = None

    @property
    def arch(self) -> "gguf.MODEL_ARCH":
        return _gguf().MODEL_ARCH[self.gguf_arch]

    @property
    def arch_name(self) -> str:
        return _gguf().MODEL_ARCH_NAMES[self.arch]

    def name_map(self, n_blocks: int) -> "gguf.TensorNameMap":
        return _gguf().TensorNameMap(self.arch, n_blocks)

    def allowed(self) -> set:
        return set(_gguf().MODEL_TENSORS[self.arch])

    def transform(self, kind: "gguf.MODEL_TENSOR") -> Callable | None:
        return self.transforms.get(kind.name)


# What every Llama-style decoder has, by GGUF name: the whole model's tensors and each block's (without "blk.N.").
# "output.weight" (the LM head) is there unless the embeddings are tied.
MODEL_TENSORS = ("token_embd.weight", "output_norm.weight")
BLOCK_TENSORS = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                 "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


def decoder_shapes(ckpt) -> dict[str, tuple[int, ...]]:
    """The shape (Hugging Face order: rows first) config.json implies for each tensor a Llama-style decoder may have,
    by GGUF name (block tensors without "blk.N."), as llama.cpp checks them when it loads the file."""
    n_head = int(ckpt.hparam("num_attention_heads"))
    n_kv = int(ckpt.hparam("num_key_value_heads", default=n_head))
    hidden, ff, vocab, hd = (int(ckpt.hparam("hidden_size")), int(ckpt.hparam("intermediate_size")),
                             int(ckpt.hparam("vocab_size")), head_dim(ckpt))
    q, kv = n_head * hd, n_kv * hd
    return {
        "token_embd.weight": (vocab, hidden), "output.weight": (vocab, hidden), "output_norm.weight": (hidden,),
        "attn_norm.weight": (hidden,), "ffn_norm.weight": (hidden,),
        "attn_q.weight": (q, hidden), "attn_k.weight": (kv, hidden), "attn_v.weight": (kv, hidden),
        "attn_output.weight": (hidden, q),
        "attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,), "attn_output.bias": (hidden,),
        "ffn_gate.weight": (ff, hidden), "ffn_up.weight": (ff, hidden), "ffn_down.weight": (hidden, ff),
        "ffn_gate.bias": (ff,), "ffn_up.bias": (ff,), "ffn_down.bias": (hidden,),
    }


def tied_embeddings(ckpt, spec: ArchSpec) -> bool:
    """Whether the LM head is the token embedding, as Hugging Face loading decides it (config.json, else the
    config class's default): then a stored lm_head.weight is not what the model computes with."""
    tie = ckpt.config.get("tie_word_embeddings")
    return spec.tie_default if tie is None else bool(tie)


def rope_config(ckpt) -> tuple[float, dict]:
    """(rope_theta, rope_scaling dict) across transformers 4.x and 5.x config layouts."""
    params = ckpt.config.get("rope_parameters") or {}
    scaling = ckpt.config.get("rope_scaling") or {}
    if params and not scaling and params.get("rope_type", "default") != "default":
        scaling = params
    theta = ckpt.config.get("rope_theta") or params.get("rope_theta") or 10000.0
    if scaling:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.get("type", "default"))
    return float(theta), scaling


def original_context(ckpt, scaling: dict) -> int:
    """The pre-training context a yarn or llama3 rope scaling stretches: its original_max_position_embeddings, else
    max_position_embeddings, which is what transformers fills in (config.rope_parameters) when the key is left out."""
    value = scaling.get("original_max_position_embeddings")
    return int(value if value is not None else ckpt.hparam("max_position_embeddings"))


def head_dim(ckpt) -> int:
    n_head = ckpt.hparam("num_attention_heads")
    return int(ckpt.config.get("head_dim") or ckpt.hparam("hidden_size") // n_head)


def write_decoder_hparams(spec: ArchSpec, ckpt, writer: "gguf.GGUFWriter") -> None:
    """Hyper-parameters shared by Llama-style decoders (Llama, Qwen2, Mistral, ...)."""
    n_head = int(ckpt.hparam("num_attention_heads"))
    n_kv = int(ckpt.hparam("num_key_value_heads", default=n_head))
    hidden = int(ckpt.hparam("hidden_size"))
    hd = head_dim(ckpt)
    writer.add_context_length(int(ckpt.hparam("max_position_embeddings")))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(ckpt.hparam("num_hidden_layers")))
    writer.add_feed_forward_length(int(ckpt.hparam("intermediate_size")))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(float(ckpt.hparam("rms_norm_eps")))
    writer.add_rope_dimension_count(hd)
    if hd * n_head != hidden:
        writer.add_key_length(hd)
        writer.add_value_length(hd)
    writer.add_vocab_size(int(ckpt.hparam("vocab_size")))
    theta, scaling = rope_config(ckpt)
    writer.add_rope_freq_base(theta)
    rope_type = scaling.get("rope_type", "default") if scaling else "default"
    if rope_type not in spec.rope_types:
        raise CheckpointError(
            f"rope scaling type '{rope_type}' is not supported for {spec.arch_name}.",
            f"supported rope scaling types: {', '.join(spec.rope_types)}",
        )
    if rope_type == "linear":
        writer.add_rope_scaling_type(_gguf().RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(_gguf().RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        writer.add_rope_scaling_orig_ctx_len(original_context(ckpt, scaling))


def llama3_rope_factors(ckpt) -> "np.ndarray | None":
    """Per-frequency divisors for Llama 3.x "llama3" rope scaling (R1-Distill-Llama), else None.

    Frequencies with short wavelengths keep their value, long ones are divided by
    ``factor``, and the band between is blended linearly in 1/wavelength.
    """
    theta, scaling = rope_config(ckpt)
    if not scaling or scaling.get("rope_type") != "llama3":
        return None
    factor = float(scaling.get("factor", 8.0))
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(original_context(ckpt, scaling))
    np = require("numpy", "convert")
    hd = head_dim(ckpt)
    freqs = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)
