"""The Hugging Face reference run one decoder layer at a time.

The parity gate and the importance matrix need the source model's own float32
math, but a whole 7B model in float32 is 30 GB. Here transformers builds the
model's skeleton on the meta device (no memory); then, per decoder layer, that
layer's weights are read from the safetensors (bf16/f16/f32 -> float32, LoRA
merged by the spine's ``LoraAdapter.apply``), assigned into transformers' own
layer module, run over every prompt, and dropped. Rotary embeddings and causal
masks come from transformers' own ``rotary_emb`` and ``create_causal_mask``,
exactly as ``Qwen2Model.forward`` / ``LlamaModel.forward`` build them.

The embedding table and the LM head are read in row blocks: embeddings gather
only the rows the prompts use; logits are filled one vocabulary block at a time.
Peak memory is one layer in float32 plus the hidden states of all prompts plus
the logits (``estimate_peak_bytes``), not the model.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Callable, Iterator

from edgemed.converters.source.checkpoint import Checkpoint, TensorRef, check_stored_head, hf_tokenizer
from edgemed.converters.source.source import Source, as_source
from edgemed.errors import CheckpointError

CTX_MARGIN = 8  # a prompt stays this far inside the trained context (the converted side's ``runtime.logits`` margin)
BLOCK_BYTES = 64 * 2**20  # one float32 row block of the embedding table or the LM head
EMBED = "model.embed_tokens.weight"
NORM = "model.norm"
HEAD = "lm_head.weight"


def _block_rows(cols: int, block_bytes: int) -> int:
    return max(1, block_bytes // (4 * cols))


class LayeredModel:
    """A causal LM from ``ckpt`` whose layers are in memory one at a time. Use under ``torch.inference_mode()``."""

    def __init__(self, ckpt: Checkpoint, adapter=None, *, block_bytes: int = BLOCK_BYTES):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.ckpt, self.adapter, self.block_bytes = ckpt, adapter, block_bytes
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt.path), dtype=torch.float32)
        self.skeleton.eval()
        self.config = self.skeleton.config  # carries the attention implementation the masks are made for
        self.decoder = self.skeleton.get_decoder()
        self.prefix = self.skeleton.base_model_prefix  # "model": module names as in the whole HF model
        # Built on the CPU from the config, as the HF model computes its inv_freq buffer.
        self.rotary = type(self.decoder.rotary_emb)(config=self.config)
        n_layers = self.config.num_hidden_layers
        self.layer_types = list(getattr(self.config, "layer_types", None) or ["full_attention"] * n_layers)
        self.head_name = EMBED if self.config.tie_word_embeddings else HEAD
        for name in (EMBED, self.head_name):
            self._ref(name)
        # the head read below is the embedding only where from_pretrained ties them too (`edgemed check` and library
        # callers reach here without the converters' up-front check)
        check_stored_head(ckpt, bool(self.config.tie_word_embeddings))

    @classmethod
    def open(cls, source: "Source | Checkpoint | Path", **kw) -> "LayeredModel":
        """``source``: the command's opened ``Source`` (its checkpoint, adapter and pickle consent), or
        ``source.as_source``'s stand-ins (a directory is opened without consent, so pickle-only weights are refused)."""
        src = as_source(source)
        return cls(src.checkpoint, src.adapter, **kw)

    # -- reading --------------------------------------------------------------------------
    def _ref(self, name: str) -> TensorRef:
        ref = self.ckpt.tensors.get(name)
        if ref is None:
            raise CheckpointError(f"'{self.ckpt.path}' has no tensor '{name}', which {self.ckpt.architecture} needs.",
                                  "re-copy the checkpoint's weight files; every shard must be present")
        return ref

    def _weight(self, name: str, tensor):
        import torch

        if self.adapter is not None and self.adapter.touches(name):
            tensor = self.adapter.apply(name, tensor)
        return tensor.to(torch.float32)

    def _load(self, module, name: str) -> None:
        """Assign ``module``'s parameters (meta) from the checkpoint tensors under ``name``."""
        want = {k: v.shape for k, v in module.state_dict(keep_vars=True).items()}
        names = [f"{name}.{k}" for k in want]
        for n in names:
            self._ref(n)
        state = {}
        for full, tensor in self.ckpt.iter_tensors(names):
            key = full[len(name) + 1:]
            if tuple(tensor.shape) != tuple(want[key]):
                raise CheckpointError(f"Tensor '{full}' has shape {list(tensor.shape)}; config.json implies {list(want[key])}.",
                                      "re-copy config.json and the weights from the same checkpoint")
            state[key] = self._weight(full, tensor)
        module.load_state_dict(state, strict=True, assign=True)

    def _rows(self, ref: TensorRef, lo: int, hi: int):
        """Rows ``[lo, hi)`` of a 2-D tensor, read without the rest of the table (a fresh mapping per block)."""
        return self.ckpt.read_rows(ref.name, lo, hi)

    def blocks(self, name: str, adapted: str | None, wanted: list[int] | None = None) -> Iterator[tuple[int, object]]:
        """``(first row, float32 block)`` over the table ``name``; ``adapted`` names whose LoRA applies; only
        blocks holding a row of the sorted ``wanted`` when given."""
        import torch

        ref = self._ref(name)
        rows, cols = ref.shape
        step = _block_rows(cols, self.block_bytes)
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            if wanted is not None and bisect.bisect_left(wanted, lo) == bisect.bisect_left(wanted, hi):
                continue
            block = self._rows(ref, lo, hi).to(torch.float32)
            if adapted is not None and self.adapter is not None and self.adapter.touches(adapted):
                block = self.adapter.apply_rows(adapted, block, lo)
            yield lo, block
            del block  # consumers drop theirs too: one block alive while the next is read

    # -- running ----------------------------------------------------------------------------
    def embed(self, token_lists: list[list[int]]) -> list:
        """``[1, n, hidden]`` float32 per token list: only the rows used, gathered block by block."""
        import torch

        rows, cols = self._ref(EMBED).shape
        wanted = sorted({t for tokens in token_lists for t in tokens})
        if wanted and not 0 <= wanted[0] <= wanted[-1] < rows:
            raise CheckpointError(f"Token id {wanted[-1] if wanted[-1] >= rows else wanted[0]} is outside the embedding "
                                  f"table ({rows} rows).", "the tokenizer does not belong to this checkpoint: re-copy both")
        gathered = torch.empty(len(wanted), cols, dtype=torch.float32)
        for lo, block in self.blocks(EMBED, EMBED, wanted):
            a, b = bisect.bisect_left(wanted, lo), bisect.bisect_left(wanted, lo + block.shape[0])
            gathered[a:b] = block[torch.tensor(wanted[a:b]) - lo]
            del block
        index = {t: i for i, t in enumerate(wanted)}
        return [gathered[torch.tensor([index[t] for t in tokens], dtype=torch.long)][None] for tokens in token_lists]

    def _inputs(self, h) -> dict:
        """Positions, masks and rotary (cos, sin) for one ``[1, n, hidden]`` input, as the HF model's forward makes them."""
        import torch
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        position_ids = torch.arange(h.shape[1]).unsqueeze(0)
        kw = dict(config=self.config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=position_ids)
        masks = {"full_attention": create_causal_mask(**kw)}
        if "sliding_attention" in self.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
        return {"position_ids": position_ids, "masks": masks, "rope": self.rotary(h, position_ids)}

    def layers(self, hidden: list, watch: Callable | None = None) -> list:
        """Run every decoder layer over every hidden state (replaced in place, one prompt at a time).

        ``watch(module_name, layer)`` may register hooks on a loaded layer; it returns their handles."""
        inputs = [self._inputs(h) for h in hidden]
        for i, layer in enumerate(self.decoder.layers[: self.config.num_hidden_layers]):
            name = f"{self.prefix}.layers.{i}"
            self._load(layer, name)
            handles = watch(name, layer) if watch is not None else []
            try:
                for p, x in enumerate(inputs):
                    out = layer(hidden[p], attention_mask=x["masks"][self.layer_types[i]], position_embeddings=x["rope"],
                                position_ids=x["position_ids"], cache=None, use_cache=False)
                    hidden[p] = out[0] if isinstance(out, tuple) else out
            finally:
                for handle in handles:
                    handle.remove()
                layer.to("meta")  # this layer's weights go before the next layer's arrive
        return hidden

    def norm(self, hidden: list) -> list:
        norm = self.decoder.norm
        self._load(norm, NORM)
        try:
            return [norm(h) for h in hidden]
        finally:
            norm.to("meta")

    def hidden(self, token_lists: list[list[int]], watch: Callable | None = None) -> list:
        """The final-normed hidden state ``[1, n, hidden]`` per token list (the LM head's input)."""
        return self.norm(self.layers(self.embed(token_lists), watch))

    def logits(self, normed: list) -> list:
        """float32 numpy logits ``[n, vocab]`` per hidden state, one vocabulary block of the head at a time."""
        import torch
        import torch.nn.functional as F

        vocab = self._ref(self.head_name).shape[0]
        out = [torch.empty(h.shape[1], vocab, dtype=torch.float32) for h in normed]
        adapted = HEAD if self.head_name == HEAD else None  # tied: the head is the base embedding (as PEFT unmerged)
        for lo, block in self.blocks(self.head_name, adapted):
            for o, h in zip(out, normed):
                o[:, lo:lo + block.shape[0]] = F.linear(h, block)[0]
            del block
        return [o.numpy() for o in out]


def reference_logits(source: "Source | Checkpoint | Path", prompts=None) -> tuple[list[list[int]], list]:
    """Token ids and float32 logits ``[n, vocab]`` per prompt of the HF source (+ its LoRA adapter), one layer at a
    time. ``source``: the command's opened ``Source`` (or ``as_source``'s stand-ins: no adapter, no consent).
    The contract of ``parity.source_logits``: same tokenization, same float32 math to rounding."""
    import torch

    from edgemed.converters.quality.prompts import token_lists

    src = as_source(source)  # before the tokenizer: a refused checkpoint is refused first
    context = src.checkpoint.hparam("max_position_embeddings", required=False)
    ids = token_lists(hf_tokenizer(src.path), prompts, int(context) - CTX_MARGIN if context else None)
    model = LayeredModel.open(src)
    with torch.inference_mode():
        return ids, model.logits(model.hidden(ids))


def estimate_peak_bytes(config: dict, n_positions: int, *, longest: int | None = None, source_bytes: int = 2,
                        lora: bool = False, logits: bool = True, block_bytes: int = BLOCK_BYTES) -> int:
    """Bytes this module holds at its peak for ``n_positions`` tokens in all (``longest`` in one prompt or chunk).

    One layer in float32 + the largest tensor in its source dtype while it converts (and its LoRA delta) + the
    hidden states of every position + one prompt's activations inside a layer (q/k/v, attention scores, MLP)
    + one row block in both dtypes + the logits when ``logits``. The phases do not overlap, but the sum is kept:
    a layer's freed weights can stay in the C allocator's heap while the head's blocks and logits are made (75
    MiB on Qwen2.5-0.5B). Not included: Python, torch, transformers (with the model's modeling code) and the
    tokenizer themselves, the process's baseline: 431 MiB peak RSS with the Qwen2.5 tokenizer and a meta
    skeleton. Qwen2.5-0.5B, 5 parity prompts (144 positions): 268 MiB estimated, 262 MiB measured above that
    baseline; imatrix, 541 tokens: 207 estimated, 164 measured."""
    d = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    hd = int(config.get("head_dim") or d // heads)
    ffn = int(config["intermediate_size"])
    vocab = int(config["vocab_size"])
    n = int(longest if longest is not None else n_positions)
    attn = d * heads * hd * 2 + d * kv * hd * 2 + (heads + 2 * kv) * hd  # q, o, k, v weights + biases
    layer = attn + 3 * d * ffn + 2 * d
    largest = max(d * ffn, d * heads * hd, d * kv * hd)
    convert = largest * (source_bytes + (8 if lora else 0))  # the source tensor; with LoRA, B @ A and the sum
    hidden = n_positions * (d + 2 * hd) * 4  # hidden states + the rotary cos/sin of every position
    activations = 4 * n * (2 * d + 2 * (heads + 2 * kv) * hd + 2 * heads * n + 3 * ffn)
    block = block_bytes + block_bytes * source_bytes // 4 + 4 * n * _block_rows(d, block_bytes)
    return 4 * layer + convert + hidden + activations + block + (4 * n_positions * vocab if logits else 0)
