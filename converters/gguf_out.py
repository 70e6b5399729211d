"""Stream a Hugging Face checkpoint (+ LoRA) into a float GGUF (F32 / F16 / BF16).

gguf-py's ``GGUFWriter`` is driven as the state machine it is: every tensor's
info is declared first (shapes and dtypes come from the safetensors headers, no
data read), then header, key-values and tensor infos are written, then tensor
data one tensor at a time, each read from the memory-mapped shard, merged with
its LoRA delta, laid out for llama.cpp and cast. Peak memory is one tensor.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edgemed import __version__
from edgemed.converters.arch.base import ArchSpec, llama3_rope_factors
from edgemed.converters.checkpoint import Checkpoint
from edgemed.converters.tokenizer import VocabPlan, write_vocab
from edgemed.errors import CheckpointError

log = logging.getLogger(__name__)

# Output float type -> (GGML tensor type for 2-D weights, llama_ftype number written as general.file_type)
FLOAT_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, 0),
    "f16": (gguf.GGMLQuantizationType.F16, 1),
    "bf16": (gguf.GGMLQuantizationType.BF16, 32),
}


@dataclass
class PlannedTensor:
    hf_name: str | None  # None for tensors computed here (rope_freqs)
    gguf_name: str
    kind: "gguf.MODEL_TENSOR"
    shape: tuple[int, ...]
    ggml_type: "gguf.GGMLQuantizationType"


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def plan_tensors(ckpt: Checkpoint, spec: ArchSpec, out_type: str) -> list[PlannedTensor]:
    n_blocks = int(ckpt.hparam("num_hidden_layers"))
    name_map = spec.name_map(n_blocks)
    allowed = spec.allowed()
    weight_type = FLOAT_TYPES[out_type][0]
    planned: list[PlannedTensor] = []
    for hf_name in sorted(ckpt.tensors, key=_natural_key):
        if hf_name.endswith(spec.skip_suffixes):
            continue
        found = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in allowed:
            raise CheckpointError(
                f"Tensor '{hf_name}' has no place in a {spec.arch_name} GGUF.",
                "the checkpoint does not match its declared architecture; check config.json 'architectures'",
            )
        kind, gguf_name = found
        shape = ckpt.tensors[hf_name].shape
        ggml_type = weight_type if len(shape) >= 2 else gguf.GGMLQuantizationType.F32
        planned.append(PlannedTensor(hf_name, gguf_name, kind, shape, ggml_type))
    names = {p.gguf_name for p in planned}
    if "token_embd.weight" not in names:
        raise CheckpointError("The checkpoint has no token embedding tensor.", "copy every shard of the checkpoint")
    if llama3_rope_factors(ckpt) is not None:
        factors = llama3_rope_factors(ckpt)
        planned.append(
            PlannedTensor(None, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", gguf.MODEL_TENSOR.ROPE_FREQS,
                          factors.shape, gguf.GGMLQuantizationType.F32)
        )
    return planned


def _cast(tensor, ggml_type) -> np.ndarray:
    """A torch tensor or numpy array -> contiguous numpy data of ``ggml_type``.

    Casting in torch avoids a float32 detour for tensors that need no arithmetic
    (a 150k-token embedding would otherwise cost 4 bytes per weight more), and
    torch rounds to bfloat16 nearest-even without numpy's wide temporaries.
    """
    import torch

    t = torch.from_numpy(np.ascontiguousarray(tensor)) if isinstance(tensor, np.ndarray) else tensor
    if ggml_type == gguf.GGMLQuantizationType.F32:
        return t.to(torch.float32).contiguous().numpy()
    if ggml_type == gguf.GGMLQuantizationType.F16:
        return t.to(torch.float16).contiguous().numpy()
    if ggml_type == gguf.GGMLQuantizationType.BF16:
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    raise ValueError(ggml_type)


def _nbytes(shape: tuple[int, ...], ggml_type) -> int:
    n = int(np.prod(shape)) if shape else 1
    return n * (4 if ggml_type == gguf.GGMLQuantizationType.F32 else 2)


def write_float_gguf(
    ckpt: Checkpoint,
    spec: ArchSpec,
    vocab: VocabPlan,
    out_path: Path,
    out_type: str,
    *,
    adapter=None,
    metadata: dict[str, str] | None = None,
    progress: bool = False,
) -> list[PlannedTensor]:
    import torch

    planned = plan_tensors(ckpt, spec, out_type)
    writer = gguf.GGUFWriter(str(out_path), spec.arch_name)
    _write_metadata(writer, ckpt, spec, out_type, metadata or {})
    write_vocab(vocab, writer)
    for p in planned:
        numpy_dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(p.ggml_type, np.uint16)
        writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(numpy_dtype), _nbytes(p.shape, p.ggml_type), raw_dtype=p.ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()

    total = sum(_nbytes(p.shape, p.ggml_type) for p in planned)
    bar = _progress(total, progress, f"writing {out_type.upper()}")
    try:
        by_hf = {p.hf_name: p for p in planned if p.hf_name}
        for hf_name, tensor in ckpt.iter_tensors([p.hf_name for p in planned if p.hf_name]):
            p = by_hf[hf_name]
            if adapter is not None and adapter.touches(hf_name):
                tensor = adapter.apply(hf_name, tensor)  # float32
            transform = spec.transforms.get(p.kind)
            if transform is not None:
                tensor = transform(tensor.to(torch.float32).numpy(), ckpt)
            writer.write_tensor_data(_cast(tensor, p.ggml_type))
            bar.update(_nbytes(p.shape, p.ggml_type))
            del tensor
        for p in planned:
            if p.hf_name is None:  # computed tensors, declared last
                writer.write_tensor_data(_cast(llama3_rope_factors(ckpt), p.ggml_type))
    finally:
        bar.close()
        writer.close()
    return planned


def _write_metadata(writer, ckpt: Checkpoint, spec: ArchSpec, out_type: str, metadata: dict[str, str]) -> None:
    name = ckpt.config.get("_name_or_path") or ckpt.path.name
    writer.add_name(str(name))
    writer.add_quantized_by(f"edgemed {__version__}")
    writer.add_file_type(FLOAT_TYPES[out_type][1])
    spec.extra_hparams(spec, ckpt, writer)
    for key, value in metadata.items():
        writer.add_string(key, value)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled, leave=False)
