"""A PEFT LoRA adapter as a GGUF LoRA adapter file, for one base, applied by llama.cpp at run time.

The file is what llama.cpp's ``llama_adapter_lora_init`` reads (the layout ``convert_lora_to_gguf.py`` writes):

- keys: ``general.architecture`` (the base's; llama.cpp refuses another), ``general.type = "adapter"``,
  ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32);
- per adapted base tensor ``T`` (GGUF names, e.g. ``blk.0.attn_q.weight``): ``T.lora_a``, PEFT's ``lora_A``
  ``[r, in]`` as is (ggml ``ne = [in, r]``), and ``T.lora_b``, PEFT's ``lora_B`` ``[out, r]`` (``ne = [r, out]``)
  with the architecture's row layout applied (Llama's rotary permutation of Q/K rows, ``arch/llama.py``: a
  permutation of output rows, so it moves B's rows and leaves A alone);
- edgemed's own keys: the base checkpoint's sha256 (``edgemed.base.source_sha256``: the ``edgemed.source.sha256``
  every GGUF edgemed converts from that checkpoint carries, whatever its quant type), its HF architecture, and the
  PEFT adapter's sha256. The runtime refuses the adapter on a base whose recorded source differs.

llama.cpp scales each pair by ``user_scale * alpha / r`` (``r`` from ``lora_a``'s shape). PEFT's own scale per
module (``lora_alpha / r``, ``/ sqrt(r)`` with rsLoRA, ``rank_pattern`` / ``alpha_pattern`` overrides) may differ
from that, so the ratio is folded into ``lora_b``: with plain LoRA the factor is exactly 1 and B is written as it was.
Full replacement weights (``modules_to_save``) cannot be expressed as a LoRA pair: refused, with the merge as fix;
a copy of a base layer (PEFT's ``base_layer.weight`` beside a pair on the LM head) must equal the base's.
Tensors are F16 unless F32 or Q8_0 is asked (llama.cpp's converter defaults to F32). Q8_0 (8-bit values in blocks
of 32 along a row, one F16 scale per block: 34 bytes per 32 values against F16's 64) is gguf-py's numpy quantizer
(``gguf.quants.quantize``, the one llama.cpp's ``convert_lora_to_gguf.py --outtype q8_0`` uses); ggml quantizes
along a tensor's rows, so a tensor whose row length is not a multiple of the block stays F16, as there: ``lora_b``
(rows of ``r`` values) whenever ``r`` is not a multiple of 32, i.e. every usual rank below 32. So at rank 8 or 16
Q8_0 shrinks ``lora_a`` alone (about a fifth off the file), at rank 32, 64, ... both (about half off).
llama.cpp's loader copies the tensors as they are and its matrix products take Q8_0 like any base weight.
An adapter is a few MB to a few hundred, so the whole file is built in memory and written through gguf-py's writer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgemed import __version__
from edgemed.errors import AdapterError, require
from edgemed.formats.gguf_header import BASE_ARCH_KEY, BASE_SOURCE_KEY, LORA_SHA_KEY, read_header  # the runtime reads the keys too
from edgemed.converters.source.lora import lora_alpha

gguf = require("gguf", "convert")
np = require("numpy", "convert")

#: Adapter tensor types (``convert --adapter-only --quant``): the ggml type each tensor is written as where its rows
#: allow; a quantized type's tensors whose row length is not a multiple of its block are written as F16.
TENSOR_TYPES = {"f16": gguf.GGMLQuantizationType.F16, "f32": gguf.GGMLQuantizationType.F32,
                "q8_0": gguf.GGMLQuantizationType.Q8_0}
DEFAULT_TENSOR_TYPE = "f16"
FALLBACK_TYPE = gguf.GGMLQuantizationType.F16  # what a tensor a quantized type cannot block is written as


@dataclass(frozen=True)
class AdapterTensor:
    """One adapted base weight: its names, PEFT's pair and the factor folded into B."""

    hf_name: str      # the base weight, HF name ("model.layers.0.self_attn.q_proj.weight")
    gguf_name: str    # the base weight, GGUF name ("blk.0.attn_q.weight")
    kind: "gguf.MODEL_TENSOR"
    rank: int
    b_factor: float   # PEFT's scale / llama.cpp's scale (1.0 for plain LoRA)


def file_alpha(adapter) -> float:
    """``adapter.lora.alpha``: the adapter's ``lora_alpha`` (PEFT's default, 8, where the config has none)."""
    return lora_alpha(adapter.config)


def plan_adapter(ckpt, spec, adapter) -> list[AdapterTensor]:
    """The adapter's tensors in GGUF terms, refused before any work when the file cannot carry them."""
    if adapter.replacements:
        first = sorted(adapter.replacements)[0]
        raise AdapterError(f"The adapter carries full replacement weights ({len(adapter.replacements)}, e.g. for '{first}': "
                           "PEFT's modules_to_save), which a LoRA adapter file cannot hold.",
                           "merge it instead: convert with --lora and without --adapter-only")
    _check_base_copies(ckpt, adapter)
    name_map = spec.name_map(int(ckpt.hparam("num_hidden_layers")))
    allowed = spec.allowed()
    alpha = file_alpha(adapter)
    planned = []
    for hf_name, pair in sorted(adapter.pairs.items()):
        found = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in allowed:
            raise AdapterError(f"The adapter adapts '{hf_name}', which has no place in a {spec.arch_name} GGUF.",
                               "merge it instead: convert with --lora and without --adapter-only")
        kind, gguf_name = found
        if kind == gguf.MODEL_TENSOR.TOKEN_EMBD:
            raise AdapterError(f"The adapter adapts the token embedding '{hf_name}' as a linear layer; llama.cpp "
                               "applies an embedding's LoRA differently.",
                               "merge it instead: convert with --lora and without --adapter-only")
        rank = adapter.rank(hf_name)
        llama_scale = alpha / rank if alpha else 1.0  # llama.cpp: alpha 0 means "no alpha / r"
        planned.append(AdapterTensor(hf_name, gguf_name, kind, rank, pair.scale / llama_scale))
    return planned


def _check_base_copies(ckpt, adapter) -> None:
    """An adapter file is applied to the base GGUF's own weights: a copy of a base layer the PEFT adapter carries
    (which PEFT loads in place of the base's) must hold the base's values, or the file would compute another model."""
    import torch

    for hf_name, tensor in ckpt.iter_tensors(sorted(adapter.base_copies)):
        if not torch.equal(adapter.base_copy(hf_name), tensor.to(torch.float32)):
            raise AdapterError(f"The adapter carries its own copy of the base layer '{hf_name}' (PEFT's base_layer "
                               "weight), and it differs from this base model's, which a LoRA adapter file cannot hold.",
                               "merge it instead: convert with --lora and without --adapter-only; or check that the "
                               "adapter was trained on this base model")


def _refuse_nonfinite(name: str) -> AdapterError:
    return AdapterError(f"Adapter tensor '{name}' holds NaN or infinite values (or values beyond F16's range after "
                        "scaling); the adapter would compute garbage.",
                        "re-copy the adapter from where it was trained; if the copy is intact, the training run diverged")


def stored_type(shape: tuple[int, ...], tensor_type: str) -> gguf.GGMLQuantizationType:
    """The ggml type a tensor of ``shape`` (numpy order: rows last) is written as for ``tensor_type``: that type, or
    F16 where a quantized type's block does not divide the row length (``lora_b`` at ranks below 32 for Q8_0)."""
    ggml_type = TENSOR_TYPES[tensor_type]
    block = gguf.GGML_QUANT_SIZES[ggml_type][0]
    return ggml_type if shape[-1] % block == 0 else FALLBACK_TYPE


def tensor_data(data, tensor_type: str):
    """``data`` (float32, numpy order) as ``tensor_type`` stores it: (array for the writer, its ggml type); refused
    when a value is not finite or beyond F16's range (F16 holds every Q8_0 block's scale)."""
    from edgemed.converters.gguf.writer import first_nonfinite

    ggml_type = stored_type(data.shape, tensor_type)
    float_type = gguf.GGMLQuantizationType.F32 if ggml_type == gguf.GGMLQuantizationType.F32 else gguf.GGMLQuantizationType.F16
    cast = np.ascontiguousarray(data, dtype=np.float32 if float_type == gguf.GGMLQuantizationType.F32 else np.float16)
    if first_nonfinite(cast, float_type) is not None:
        return None, ggml_type
    if ggml_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return cast, ggml_type
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), ggml_type), ggml_type


def write_adapter_gguf(ckpt, spec, adapter, out_path: Path, *, base_source_sha256: str, tensor_type: str = DEFAULT_TENSOR_TYPE,
                       metadata: dict[str, str] | None = None) -> list[AdapterTensor]:
    """Write ``adapter`` (an opened ``LoraAdapter``) as a GGUF LoRA adapter for ``ckpt`` at ``out_path``, its tensors
    as ``tensor_type`` (``TENSOR_TYPES``; ``stored_type`` says which stay F16; ``tensor_type_counts`` reads back the
    file's types)."""
    if tensor_type not in TENSOR_TYPES:
        raise AdapterError(f"Unknown adapter tensor type '{tensor_type}'.", f"choose one of: {', '.join(TENSOR_TYPES)}")
    planned = plan_adapter(ckpt, spec, adapter)
    writer = gguf.GGUFWriter(str(out_path), spec.arch_name)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, file_alpha(adapter))
        writer.add_name(f"{ckpt.config.get('_name_or_path') or ckpt.path.name} LoRA {adapter.path.name}")
        writer.add_quantized_by(f"edgemed {__version__}")
        keys = {BASE_SOURCE_KEY: base_source_sha256, BASE_ARCH_KEY: ckpt.architecture, LORA_SHA_KEY: adapter.digest(),
                "edgemed.converter_version": __version__} | (metadata or {})
        for key, value in keys.items():
            writer.add_string(key, value)
        for t in planned:
            a, b = adapter.factors(t.hf_name)  # float32 [r, in], [out, r]
            if t.b_factor != 1.0:
                b = b * t.b_factor
            transform = spec.transform(t.kind)
            b = b.numpy() if transform is None else transform(b.numpy(), ckpt)  # output rows, as the base weight's
            for suffix, data in (("lora_a", a.numpy()), ("lora_b", b)):
                stored, ggml_type = tensor_data(data, tensor_type)
                if stored is None:
                    raise _refuse_nonfinite(f"{t.hf_name} ({suffix})")
                writer.add_tensor(f"{t.gguf_name}.{suffix}", stored, raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return planned


def tensor_type_counts(path: Path) -> dict[str, int]:
    """How many of the adapter file's tensors each ggml type holds ({"F16": 210, "Q8_0": 210}), read from its header."""
    from collections import Counter

    return dict(sorted(Counter(t.type_name for t in read_header(path).tensors).items()))
