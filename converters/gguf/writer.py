"""Stream a Hugging Face checkpoint (+ LoRA) into a float GGUF (F32 / F16 / BF16).

gguf-py's ``GGUFWriter`` is driven as the state machine it is: every tensor's
info is declared first (shapes and dtypes come from the safetensors headers, no
data read), then header, key-values and tensor infos are written, then tensor
data one tensor at a time, each read from the memory-mapped shard, merged with
its LoRA delta, laid out for llama.cpp and cast. Peak memory is one tensor.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from edgemed import __version__
from edgemed.constants import GGUF_TYPES
from edgemed.converters.arch.base import ArchSpec, llama3_rope_factors
from edgemed.converters.source.checkpoint import Checkpoint, check_stored_head
from edgemed.converters.gguf.tokenizer import VocabPlan, write_vocab
from edgemed.errors import CheckpointError, require

# The writer is gguf-py and numpy throughout; without them, importing it is the one-paragraph "install the extra".
gguf = require("gguf", "convert")
np = require("numpy", "convert")

log = logging.getLogger(__name__)



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
    from edgemed.converters.arch.base import tied_embeddings

    n_blocks = int(ckpt.hparam("num_hidden_layers"))
    name_map = spec.name_map(n_blocks)
    allowed = spec.allowed()
    tied = tied_embeddings(ckpt, spec)
    weight_type = gguf.GGMLQuantizationType[GGUF_TYPES[out_type].weights]  # a float type: 2-D weights
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
        if tied and gguf_name == "output.weight":
            # the GGUF computes with the embedding (no output.weight: llama.cpp then uses token_embd); that is the
            # model Hugging Face loads only where the stored head equals the embedding (check_stored_head, below)
            log.info("config.json ties the word embeddings: %s, equal to the embedding, is not written", hf_name)
            continue
        shape = ckpt.tensors[hf_name].shape
        ggml_type = weight_type if len(shape) >= 2 else gguf.GGMLQuantizationType.F32
        planned.append(PlannedTensor(hf_name, gguf_name, kind, shape, ggml_type))
    names = {p.gguf_name for p in planned}
    if "token_embd.weight" not in names:
        raise CheckpointError("The checkpoint has no token embedding tensor.", "copy every shard of the checkpoint")
    _check_shapes(ckpt, spec, planned, n_blocks, tied)
    check_stored_head(ckpt, tied)  # last: the one check here that reads tensor data, not headers
    if llama3_rope_factors(ckpt) is not None:
        factors = llama3_rope_factors(ckpt)
        planned.append(
            PlannedTensor(None, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", gguf.MODEL_TENSOR.ROPE_FREQS,
                          factors.shape, gguf.GGMLQuantizationType.F32)
        )
    return planned


def _check_shapes(ckpt: Checkpoint, spec: ArchSpec, planned: list[PlannedTensor], n_blocks: int, tied: bool) -> None:
    """Every tensor llama.cpp needs is there and every tensor has the shape config.json implies, or llama.cpp would
    refuse to load the file (or misread it): checked here, before any work, with or without the parity gate."""
    from edgemed.converters.arch.base import BLOCK_TENSORS, MODEL_TENSORS, decoder_shapes, head_dim

    hd = head_dim(ckpt)
    if hd % 2:
        raise CheckpointError(f"config.json implies an odd attention head size ({hd}); rotary embeddings need an even one.",
                              "re-copy config.json from the source checkpoint (hidden_size, num_attention_heads, head_dim)")
    shapes = decoder_shapes(ckpt)
    whole = set(MODEL_TENSORS) | ({"output.weight"} if not tied else set())
    per_block = set(BLOCK_TENSORS) | set(spec.optional)
    blocks, have = set(), set()
    for p in planned:
        if p.gguf_name.startswith("blk."):
            block, key = p.gguf_name.split(".", 2)[1:]
            blocks.add(int(block))
            known = key in per_block
        else:
            key, known = p.gguf_name, p.gguf_name in whole
        if not known:
            raise CheckpointError(
                f"Tensor '{p.hf_name}' ({p.gguf_name}) is not part of a {ckpt.architecture} that llama.cpp loads "
                f"(its {spec.arch_name} graph has no use for it, and refuses a file that carries it).",
                "the checkpoint does not match its declared architecture; check config.json 'architectures' and remove "
                "stray shards",
            )
        have.add(p.gguf_name)
        want = shapes[key]
        if tuple(p.shape) != want:
            raise CheckpointError(
                f"Tensor '{p.hf_name}' has shape {list(p.shape)}, but config.json implies {list(want)} "
                "(vocab_size, hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim).",
                "config.json does not belong to these weights: re-copy it from the source checkpoint",
            )
    _refuse_unflagged(ckpt, spec, planned)
    if blocks != set(range(n_blocks)):
        raise CheckpointError(
            f"config.json says num_hidden_layers is {n_blocks}, but the weights hold blocks {sorted(blocks)[:3]}..."
            f"{sorted(blocks)[-1:] if blocks else ''} ({len(blocks)} of them).",
            "re-copy config.json and every shard from the source checkpoint",
        )
    missing = [n for n in sorted(whole - {"output.weight"}) if n not in have]
    missing += [f"blk.{i}.{key}" for i in range(n_blocks) for key in BLOCK_TENSORS if f"blk.{i}.{key}" not in have]
    if not tied and "output.weight" not in have:
        raise CheckpointError(
            f"The checkpoint has no LM head (lm_head.weight), and config.json does not tie it to the embedding "
            f"(tie_word_embeddings is {json.dumps(ckpt.config.get('tie_word_embeddings'))}): Hugging Face would fill "
            "the head with random values, the GGUF would use the embedding.",
            "copy every shard of the checkpoint; if the model does tie its embeddings, set \"tie_word_embeddings\": true "
            "in config.json",
        )
    if missing:
        raise CheckpointError(
            f"The weights lack {len(missing)} tensor(s) every {ckpt.architecture} needs, e.g. {', '.join(missing[:4])} "
            "(GGUF names): llama.cpp would refuse the GGUF, and Hugging Face loading (the ONNX route) would fill them "
            "with random values.",
            "copy every shard of the checkpoint (and check model.safetensors.index.json lists them all)",
        )


def _refuse_unflagged(ckpt: Checkpoint, spec: ArchSpec, planned: list[PlannedTensor]) -> None:
    """Refuse tensors the architecture has only where a config.json flag says so (``ArchSpec.optional_if``), stored
    without it: Hugging Face loading (the parity reference, the ONNX route) ignores them, the GGUF would compute
    with them, and with --no-parity nothing would notice."""
    stray: dict[str, list[str]] = {}
    for p in planned:
        key = p.gguf_name.split(".", 2)[2] if p.gguf_name.startswith("blk.") else p.gguf_name
        flag = spec.optional_if.get(key)
        if flag is not None and not ckpt.config.get(flag):
            stray.setdefault(flag, []).append(p.hf_name)
    if not stray:
        return
    said = "; ".join(f"{', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''} while "
                     f"'{flag}' is {json.dumps(ckpt.config[flag]) if flag in ckpt.config else 'not set'}"
                     for flag, names in stray.items())
    flags = " / ".join(f'"{flag}": true' for flag in stray)
    raise CheckpointError(
        f"The weights hold tensors config.json says this {ckpt.architecture} does not have ({said}): Hugging Face "
        "loading ignores them, the GGUF would compute with them, so the two would be different models.",
        f"if the model was trained with them, set {flags} in config.json; otherwise re-copy config.json and the "
        "shards from the source checkpoint, or remove those tensors from the weights",
    )


# Elements checked at a time for NaN / infinity: bounds the temporary mask to a few MB.
FINITE_CHUNK = 1 << 21


def first_nonfinite(data: np.ndarray, ggml_type) -> int | None:
    """Flat index of the first NaN / infinity in cast tensor data, or None. One pass, chunked."""
    flat = data.reshape(-1)
    for start in range(0, flat.size, FINITE_CHUNK):
        chunk = flat[start:start + FINITE_CHUNK]
        if ggml_type == gguf.GGMLQuantizationType.BF16:  # uint16 bit patterns: exponent bits all set
            bad = (chunk & 0x7F80) == 0x7F80
        else:
            bad = ~np.isfinite(chunk)
        if bad.any():
            return start + int(np.argmax(bad))
    return None


class BeyondRange(CheckpointError):
    """A finite weight (or LoRA merge) that the file's float type cannot hold: ``tensor``, the HF name. A quantized
    conversion writes its intermediate again in F32 (``pipeline``); a float output is refused."""

    def __init__(self, problem: str, fix: str, tensor: str):
        super().__init__(problem, fix)
        self.tensor = tensor


#: the float types a cast may overflow, and the wider types whose range holds more (F32: the widest GGUF holds)
_WIDER = {"F16": "bf16 or f32 (--quant bf16 / --quant f32)", "BF16": "f32 (--quant f32)"}


def _refuse_nonfinite(hf_name: str, out_type_name: str, ckpt: Checkpoint, written, merged: bool) -> CheckpointError:
    """Why ``written`` (tensor ``hf_name`` merged, laid out and about to be cast to ``out_type_name``) has a NaN or an
    infinity there: a stored value beyond F32's range (an F64 checkpoint's), which no GGUF type holds; a finite value
    the cast's type cannot hold (``BeyondRange``: a wider type can); or a NaN / infinity stored or merged."""
    import torch

    stored = next(ckpt.iter_tensors([hf_name]))[1]  # read again on this failure path, not held through every write
    f32_max = float(torch.finfo(torch.float32).max)
    if stored.dtype == torch.float64 and bool(torch.isfinite(stored).all()) and bool((stored.abs() > f32_max).any()):
        return CheckpointError(
            f"Tensor '{hf_name}' holds values beyond F32's range (|x| > {f32_max:g}), which no GGUF type holds "
            "(F32 is the widest, and BF16 has no more range), so every output type would hold infinity there.",
            "fix the checkpoint: re-copy it from its source; if the copy is intact, that weight is broken (a diverged "
            "training run, or a bad edit of the file), so re-save the model with its weights within F32's range",
        )
    del stored
    src = written if isinstance(written, torch.Tensor) else torch.from_numpy(np.asarray(written))
    if bool(torch.isfinite(src).all()) and out_type_name in _WIDER:  # finite before the cast: it overflowed there
        limit = {"F16": torch.float16, "BF16": torch.bfloat16}[out_type_name]
        return BeyondRange(
            f"Tensor '{hf_name}' has values beyond {out_type_name}'s range (|x| > {float(torch.finfo(limit).max):g}), "
            "which would become infinity.",
            f"convert to {_WIDER[out_type_name]}, whose range holds these weights",
            hf_name,
        )
    where = "after merging the LoRA adapter" if merged else "in the checkpoint"
    return CheckpointError(
        f"Tensor '{hf_name}' holds NaN or infinite values {where}; the model would compute garbage.",
        "re-copy the checkpoint (and adapter) from their source; if the copy is intact, the training run diverged"
        " and the weights cannot be used",
    )


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
            transform = spec.transform(p.kind)
            if transform is not None:
                tensor = transform(tensor.to(torch.float32).numpy(), ckpt)
            data = _cast(tensor, p.ggml_type)
            if first_nonfinite(data, p.ggml_type) is not None:
                raise _refuse_nonfinite(hf_name, p.ggml_type.name, ckpt, tensor, adapter is not None and adapter.touches(hf_name))
            _write(writer, data, out_path)
            del data
            bar.update(_nbytes(p.shape, p.ggml_type))
            del tensor
        for p in planned:
            if p.hf_name is None:  # computed tensors, declared last
                _write(writer, _cast(llama3_rope_factors(ckpt), p.ggml_type), out_path)
    finally:
        bar.close()
        writer.close()
    return planned


def _write(writer, data: np.ndarray, out_path: Path) -> None:
    """Write one tensor; numpy reports a short write on a full disk without an errno: give it the real one."""
    import errno
    import shutil

    try:
        writer.write_tensor_data(data)
    except OSError as exc:
        if exc.errno is None and shutil.disk_usage(out_path.parent).free < data.nbytes:
            raise OSError(errno.ENOSPC, f"No space left on device ({exc})", str(out_path)) from exc
        raise


def _write_metadata(writer, ckpt: Checkpoint, spec: ArchSpec, out_type: str, metadata: dict[str, str]) -> None:
    name = ckpt.config.get("_name_or_path") or ckpt.path.name
    writer.add_name(str(name))
    writer.add_quantized_by(f"edgemed {__version__}")
    writer.add_file_type(GGUF_TYPES[out_type].ftype)
    spec.extra_hparams(spec, ckpt, writer)
    for key, value in metadata.items():
        writer.add_string(key, value)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled, leave=False)
