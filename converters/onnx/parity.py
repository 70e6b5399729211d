"""Parity of an exported ONNX directory against its Hugging Face source.

Same prompts, same token ids, same metrics as the GGUF gate
(``edgemed.converters.quality.parity``): float32 ONNX must reach NMSE < 1e-4; int4 must
give finite logits and top-1 agreement >= ``parity.TOP1_GATE``. Each prompt is run as one prefill with
an empty KV cache, which is the path every generation starts with.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgemed.converters.quality.parity import ParityReport, compare, source_logits
from edgemed.converters.onnx.trace import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS

# ONNX weight type -> the parity gate's output-type key (f32: the NMSE gate; int4: the quantized top-1 gate)
GATE_TYPE = {"fp32": "f32", "int4": "int4"}


def onnx_logits(model_path: Path, token_lists: list[list[int]], threads: int | None = None) -> list:
    """float32 logits [positions, vocab] per token list, from an ONNX graph with a KV cache."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    decoder = json.loads((Path(model_path).parent / "genai_config.json").read_text())["model"]["decoder"] \
        if (Path(model_path).parent / "genai_config.json").exists() else None
    past = [n for n in sorted(names) if n.startswith("past_key_values.")]
    if decoder:  # the KV shape from the config: a graph may leave head_dim symbolic
        kv_heads, head_dim = decoder["num_key_value_heads"], decoder["head_size"]
    else:
        shape = next(i.shape for i in session.get_inputs() if i.name == past[0])
        kv_heads, head_dim = shape[1], shape[3]
    out = []
    for tokens in token_lists:
        n = len(tokens)
        feeds = {
            INPUT_IDS: np.array([tokens], dtype=np.int64),
            ATTENTION_MASK: np.ones((1, n), dtype=np.int64),
            POSITION_IDS: np.arange(n, dtype=np.int64)[None, :],
        }
        feeds = {k: v for k, v in feeds.items() if k in names}  # graphs that derive positions from the mask lack position_ids
        for name in past:  # [batch, kv_heads, past, head_dim] with past = 0
            feeds[name] = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
        logits = session.run([LOGITS], feeds)[0]
        out.append(np.asarray(logits[0], dtype=np.float32))
    del session
    return out


def check_onnx(source, onnx_path: Path, weight_type: str, *, threads: int | None = None,
               reference: tuple | None = None) -> ParityReport:
    """Parity of ``onnx_path`` against its HF ``source`` (the command's opened ``Source``: checkpoint + PEFT adapter,
    unmerged; as ``parity.source_logits`` takes it). ``reference`` reuses (ids, logits)."""
    ids, src = reference or source_logits(source)
    return compare("onnx", GATE_TYPE.get(weight_type, weight_type), ids, src, onnx_logits(onnx_path, ids, threads))
