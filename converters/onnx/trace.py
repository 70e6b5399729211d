"""Trace a Hugging Face causal LM into an ONNX graph with a KV cache.

The graph follows onnxruntime-genai's naming, so the same directory loads in
edgemed's ONNX engine and in onnxruntime-genai:

    inputs   input_ids        int64 [batch, seq]
             attention_mask   int64 [batch, past + seq]   (1 = attend)
             position_ids     int64 [batch, seq]
             past_key_values.{i}.key / .value   float32 [batch, kv_heads, past, head_dim]
    outputs  logits           float32 [batch, seq, vocab]
             present.{i}.key / .value           float32 [batch, kv_heads, past + seq, head_dim]

Decoding one token feeds the previous ``present`` tensors back as ``past``, so
the prompt is never recomputed. Prefill passes a past of length 0.

The export uses the TorchScript exporter (``dynamo=False``) on eager attention:
it traces transformers 5's cache objects reliably and matched torch to ~1e-6 on
the models tried (docs/convert.md, "The ONNX route").
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

OPSET = 17
INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) of the exported graph, in order."""
    past = [name % i for i in range(n_layers) for name in (PAST_KEY, PAST_VALUE)]
    present = [name % i for i in range(n_layers) for name in (PRESENT_KEY, PRESENT_VALUE)]
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past], [LOGITS, *present]


def _decoder_module(model):
    """Wrap ``model`` so that its KV cache travels as flat tensors (traceable)."""
    import torch
    from transformers.cache_utils import DynamicCache

    n_layers = model.config.num_hidden_layers

    class KVDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(n_layers)]
            cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True, return_dict=True)
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return KVDecoder()


def kv_shape(config) -> tuple[int, int]:
    """(kv heads, head dim) of a decoder config."""
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    return getattr(config, "num_key_value_heads", None) or n_head, head_dim


def export(model, path: Path, opset: int = OPSET) -> None:
    """Write ``model`` (float32, eval, eager attention) to ``path`` as a single-file-plus-data ONNX graph.

    The trace uses past length 3 and sequence length 4 so that neither is a
    constant 0 or 1 the exporter could fold into the graph; both are dynamic axes.
    """
    import torch

    cfg = model.config
    n_layers = cfg.num_hidden_layers
    kv_heads, head_dim = kv_shape(cfg)
    batch, past_len, seq = 1, 3, 4
    input_ids = torch.randint(0, cfg.vocab_size, (batch, seq), dtype=torch.int64)
    attention_mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    position_ids = torch.arange(past_len, past_len + seq, dtype=torch.int64).unsqueeze(0)
    past = [torch.zeros(batch, kv_heads, past_len, head_dim) for _ in range(2 * n_layers)]
    inputs, outputs = io_names(n_layers)
    axes = {INPUT_IDS: {0: "batch", 1: "seq"}, ATTENTION_MASK: {0: "batch", 1: "total"},
            POSITION_IDS: {0: "batch", 1: "seq"}, LOGITS: {0: "batch", 1: "seq"}}
    axes |= {name: {0: "batch", 2: "past"} for name in inputs[3:]}
    axes |= {name: {0: "batch", 2: "total"} for name in outputs[1:]}
    wrapper = _decoder_module(model).eval()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python branches on shapes in transformers' cache and mask code; the
        # branches it freezes (cache non-empty, mask covers past + seq) hold for every call the runtime
        # makes, which the KV-cache-vs-recompute test checks.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (input_ids, attention_mask, position_ids, *past), str(path),
            input_names=inputs, output_names=outputs, dynamic_axes=axes, opset_version=opset,
            do_constant_folding=True, dynamo=False,
        )
