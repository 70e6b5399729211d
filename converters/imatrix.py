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

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgemed.errors import InputError

MAX_CHUNKS = 32
CHUNK_TOKENS = 256


@dataclass
class Imatrix:
    """An importance matrix and where it came from (the conversion report's ``imatrix`` section)."""

    values: dict = field(repr=False)  # gguf tensor name -> float32 mean x² per input column
    text: str  # the calibration file's name (a shipped text: its name under data/calibration/)
    sha256: str  # of the calibration file's bytes: the same name with other text is another matrix
    tokens: int
    chunks: int

    def provenance(self) -> dict:
        return {"text": self.text, "sha256": self.sha256, "tokens": self.tokens, "chunks": self.chunks,
                "chunk_tokens": CHUNK_TOKENS, "tensors": len(self.values)}


def read_calibration_text(path: Path) -> list[str]:
    """Texts from JSONL (fields question/text/abstract/context + options) or a plain text file."""
    texts: list[str] = []
    fix = "pass a UTF-8 JSONL file with one object per line, or a UTF-8 .txt file"
    try:
        raw = path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise InputError(f"Calibration text '{path}' is a directory, not a file.", fix) from None
    except UnicodeDecodeError as exc:
        raise InputError(f"Calibration text '{path}' is not UTF-8 (bad byte at offset {exc.start}).",
                         f"{fix} (e.g. iconv -f latin1 -t utf-8)") from None
    except OSError as exc:
        raise InputError(f"Calibration text '{path}' cannot be read ({exc.strerror or exc}).", fix) from None
    if path.suffix in (".jsonl", ".json"):
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except (ValueError, RecursionError):
                raise InputError(f"{path}:{n} is not valid JSON.", "pass a JSONL file with one object per line, or a .txt file") from None
            if not isinstance(item, dict):
                raise InputError(f"{path}:{n} is a JSON {type(item).__name__}, not an object.",
                                 'each line needs an object such as {"question": "..."}')
            parts = [str(item[k]) for k in ("question", "text", "context", "abstract") if item.get(k)]
            if isinstance(item.get("options"), dict):
                parts += [f"{k}. {v}" for k, v in item["options"].items()]
            if parts:
                texts.append("\n".join(parts))
    else:
        texts = [p for p in raw.split("\n\n") if p.strip()]
    if not texts:
        raise InputError(f"No calibration text found in '{path}'.", "JSONL lines need a 'question' or 'text' field")
    return texts


def compute_imatrix(ckpt, spec, text_path: Path, *, lora: Path | None = None, echo=print) -> Imatrix:
    """Mean x² per input column of every quantized linear layer over the calibration text, by GGUF name.

    The model runs one decoder layer at a time (``layered.LayeredModel``), with the adapter merged into each
    layer's weights; the output head's input is the final-normed hidden state, so its statistics need no logits."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from edgemed.converters.checkpoint import as_checkpoint
    from edgemed.converters.layered import HEAD, LayeredModel
    from edgemed.hashing import file_sha256

    ckpt = as_checkpoint(ckpt)  # the command's opened source (its pickle consent), or a path opened without consent
    texts = read_calibration_text(text_path)
    tok = AutoTokenizer.from_pretrained(ckpt.path)
    adapter = None
    if lora is not None:
        from edgemed.converters.lora import LoraAdapter

        adapter = LoraAdapter.open(lora, ckpt)
    model = LayeredModel(ckpt, adapter)
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

    ids = tok("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    chunks = [ids[i:i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)][:MAX_CHUNKS]
    with torch.inference_mode():
        normed = model.hidden(chunks, watch)
        head = gguf_name(HEAD)  # tied or not, the head is a linear layer over the normed state
        if head is not None:
            for h in normed:
                add(head, h)
    n_tokens = sum(len(c) for c in chunks)
    echo(f"imatrix: {len(sums)} tensors from {n_tokens} tokens of {text_path.name}")
    values = {name: (sums[name] / counts[name]).numpy().astype(np.float32) for name in sums}
    return Imatrix(values, Path(text_path).name, file_sha256(text_path), n_tokens, len(chunks))
