"""Importance matrix from medical text, for calibrated 4-bit quantization.

For every linear layer the quantizer will touch, forward hooks on the Hugging
Face model's layers (run one layer at a time by ``layered.py``, with the LoRA
adapter merged into each layer's weights, so the statistics are those of the
model being shipped) accumulate the mean squared input activation per input
column over calibration tokens. llama.cpp's quantizer then spends its error
budget where activations are large. Values are keyed by GGUF tensor name,
exactly as llama.cpp's own ``llama-imatrix`` tool would produce them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgemed.converters.gguf import calibration
from edgemed.converters.gguf.calibration import CHUNK_TOKENS, MAX_CHUNKS, TEXT_BYTES  # what one pass reads


@dataclass
class Imatrix:
    """An importance matrix and where it came from (the conversion report's ``imatrix`` section)."""

    # gguf tensor name -> float32 mean x² per input column; every name is a tensor of the float GGUF (quantize refuses
    # another), so the report's ``tensors`` counts entries the quantizer looks up
    values: dict = field(repr=False)
    text: str  # the calibration file's name (a shipped text: its name under data/calibration/)
    sha256: str  # of the calibration bytes used (the whole file unless it is over TEXT_BYTES): other text, another matrix
    tokens: int
    chunks: int
    bytes_used: int = 0  # of the file's ...
    file_bytes: int = 0  # ... bytes (more: only a prefix was read, calibration.read)

    def provenance(self) -> dict:
        return {"text": self.text, "sha256": self.sha256, "tokens": self.tokens, "chunks": self.chunks,
                "chunk_tokens": CHUNK_TOKENS, "tensors": len(self.values), "bytes_used": self.bytes_used,
                "file_bytes": self.file_bytes}


def read_calibration_text(path: Path) -> list[str]:
    """Texts from JSONL (fields question/text/abstract/context + options) or a plain text file, at most
    ``TEXT_BYTES`` of it (``calibration.read``: the checks every reader of calibration text makes)."""
    return calibration.read(path, TEXT_BYTES).texts


def compute_imatrix(source, spec, text_path: Path, *, echo=print) -> Imatrix:
    """Mean x² per input column of every quantized linear layer over the calibration text, by GGUF name.

    The model runs one decoder layer at a time (``layered.LayeredModel``), with the adapter merged into each
    layer's weights; the output head's input is the final-normed hidden state, so its statistics need no logits.
    ``source``: the command's opened ``Source`` (checkpoint, adapter, consent), or ``source.as_source``'s stand-ins."""
    import numpy as np
    import torch

    from edgemed.converters.quality.layered import LayeredModel
    from edgemed.converters.source.checkpoint import hf_tokenizer
    from edgemed.converters.source.source import as_source

    src = as_source(source)  # the command's opened source, or a path opened without consent
    ckpt = src.checkpoint
    text = calibration.read(text_path, TEXT_BYTES)
    tok = hf_tokenizer(ckpt.path)
    model = LayeredModel.open(src)
    name_map = spec.name_map(int(ckpt.hparam("num_hidden_layers")))
    sums: dict[str, "torch.Tensor"] = {}
    counts: dict[str, int] = {}

    def add(key: str, x) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # [tokens, in_features]
        sums[key] = sums.get(key, 0) + (x * x).sum(dim=0)
        counts[key] = counts.get(key, 0) + x.shape[0]

    def gguf_name(hf_weight: str) -> str | None:
        found = name_map.get_type_and_name(hf_weight, try_suffixes=(".weight",))
        return None if found is None else found[1]

    def watch(layer_name: str, layer) -> list:
        handles = []
        for sub, module in layer.named_modules():
            key = gguf_name(f"{layer_name}.{sub}.weight") if isinstance(module, torch.nn.Linear) else None
            if key is not None:
                handles.append(module.register_forward_hook(lambda _m, inputs, _out, key=key: add(key, inputs[0])))
        return handles

    ids = tok("\n\n".join(text.texts), add_special_tokens=False)["input_ids"]
    chunks = [ids[i:i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)][:MAX_CHUNKS]
    n_read = len(ids)
    del ids
    with torch.inference_mode():
        normed = model.hidden(chunks, watch)
        # tied or not, the head is a linear layer over the normed state; a tied head is the embedding, which the GGUF
        # names token_embd.weight (it has no output.weight: writer.plan_tensors), and llama.cpp looks it up by that name
        head = gguf_name(model.head_name)
        if head is not None:
            for h in normed:
                add(head, h)
    n_tokens = sum(len(c) for c in chunks)
    echo(f"imatrix: {len(sums)} tensors from {n_tokens} tokens of {text_path.name}" + _unused(text, n_tokens, n_read))
    values = {name: (sums[name] / counts[name]).numpy().astype(np.float32) for name in sums}
    return Imatrix(values, Path(text_path).name, text.sha256, n_tokens, len(chunks), text.bytes_used, text.file_bytes)


def _unused(text: "calibration.CalibrationText", used: int, tokenized: int) -> str:
    """'', or what of a longer text the matrix did not use."""
    said = [f"the first {used} of {tokenized}{'+' if text.truncated else ''} tokens"] if tokenized > used else []
    said += [text.describe()] if text.truncated else []
    return f" ({'; '.join(said)}; the rest is not used)" if said else ""
