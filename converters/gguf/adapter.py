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
Full replacement weights (``modules_to_save``) cannot be expressed as a LoRA pair: refused, with the merge as fix.
Tensors are F16 (as llama.cpp's converter writes them) unless F32 is asked; an adapter is a few MB to a few
hundred, so the whole file is built in memory and written through gguf-py's writer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgemed import __version__
from edgemed.errors import AdapterError, require
from edgemed.formats.gguf_header import BASE_ARCH_KEY, BASE_SOURCE_KEY, LORA_SHA_KEY  # the runtime reads them too

gguf = require("gguf", "convert")
np = require("numpy", "convert")

#: Adapter tensor types: ggml type and numpy dtype.
TENSOR_TYPES = {"f16": (gguf.GGMLQuantizationType.F16, np.float16), "f32": (gguf.GGMLQuantizationType.F32, np.float32)}
DEFAULT_TENSOR_TYPE = "f16"


@dataclass(frozen=True)
class AdapterTensor:
    """One adapted base weight: its names, PEFT's pair and the factor folded into B."""

    hf_name: str      # the base weight, HF name ("model.layers.0.self_attn.q_proj.weight")
    gguf_name: str    # the base weight, GGUF name ("blk.0.attn_q.weight")
    kind: "gguf.MODEL_TENSOR"
    rank: int
    b_factor: float   # PEFT's scale / llama.cpp's scale (1.0 for plain LoRA)


def file_alpha(adapter) -> float:
    """``adapter.lora.alpha``: the adapter's ``lora_alpha`` (PEFT's default: r)."""
    config = adapter.config
    return float(config.get("lora_alpha", config.get("r", 8)))


def plan_adapter(ckpt, spec, adapter) -> list[AdapterTensor]:
    """The adapter's tensors in GGUF terms, refused before any work when the file cannot carry them."""
    if adapter.replacements:
        first = sorted(adapter.replacements)[0]
        raise AdapterError(f"The adapter carries full replacement weights ({len(adapter.replacements)}, e.g. for '{first}': "
                           "PEFT's modules_to_save), which a LoRA adapter file cannot hold.",
                           "merge it instead: convert with --lora and without --adapter-only")
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


def _refuse_nonfinite(name: str) -> AdapterError:
    return AdapterError(f"Adapter tensor '{name}' holds NaN or infinite values (or values beyond F16's range after "
                        "scaling); the adapter would compute garbage.",
                        "re-copy the adapter from where it was trained; if the copy is intact, the training run diverged")


def write_adapter_gguf(ckpt, spec, adapter, out_path: Path, *, base_source_sha256: str, tensor_type: str = DEFAULT_TENSOR_TYPE,
                       metadata: dict[str, str] | None = None) -> list[AdapterTensor]:
    """Write ``adapter`` (an opened ``LoraAdapter``) as a GGUF LoRA adapter for ``ckpt`` at ``out_path``."""
    from edgemed.converters.gguf.writer import first_nonfinite

    ggml_type, dtype = TENSOR_TYPES[tensor_type]
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
                cast = np.ascontiguousarray(data, dtype=dtype)
                if first_nonfinite(cast, ggml_type) is not None:
                    raise _refuse_nonfinite(f"{t.hf_name} ({suffix})")
                writer.add_tensor(f"{t.gguf_name}.{suffix}", cast, raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return planned
