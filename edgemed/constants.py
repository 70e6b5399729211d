"""Every type name edgemed speaks, in one table: output types, GGUF file types, KV cache types, extra buffers.

The CLI's choices, the profile schema, the planner, the converters, the llama.cpp layer and the
benchmarks all read these names from here. Light on purpose: no gguf, numpy or llama_cpp import
(``edgemed --help`` and a device profile load read it); where a library's own constant is meant,
it is named as a string and looked up by the one module that imports that library.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GgufType:
    """A GGUF output type (``edgemed convert --quant``)."""

    ftype: int          # llama.cpp's llama_ftype number, written as general.file_type
    llama_ftype: str    # that constant's name in llama_cpp
    weights: str | None = None  # float types: gguf-py GGMLQuantizationType of 2-D weights, written by edgemed itself;
    #                             None: quantized by llama.cpp from a float intermediate

    @property
    def is_float(self) -> bool:
        return self.weights is not None


#: GGUF output types, in the order the CLI lists them.
GGUF_TYPES: dict[str, GgufType] = {
    "f32": GgufType(0, "LLAMA_FTYPE_ALL_F32", "F32"),
    "f16": GgufType(1, "LLAMA_FTYPE_MOSTLY_F16", "F16"),
    "bf16": GgufType(32, "LLAMA_FTYPE_MOSTLY_BF16", "BF16"),
    "q8_0": GgufType(7, "LLAMA_FTYPE_MOSTLY_Q8_0"),
    "q4_0": GgufType(2, "LLAMA_FTYPE_MOSTLY_Q4_0"),
    "q4_k_m": GgufType(15, "LLAMA_FTYPE_MOSTLY_Q4_K_M"),
    "q5_k_m": GgufType(17, "LLAMA_FTYPE_MOSTLY_Q5_K_M"),
}
GGUF_OUTPUT_TYPES = tuple(GGUF_TYPES)
FLOAT_OUTPUT_TYPES = tuple(n for n, t in GGUF_TYPES.items() if t.is_float)
QUANT_OUTPUT_TYPES = tuple(n for n, t in GGUF_TYPES.items() if not t.is_float)

#: ONNX output weight types (``edgemed convert --to onnx --quant``).
ONNX_OUTPUT_TYPES = ("int4", "fp32")
#: ``--quant`` when none is given, per ``--to`` format.
DEFAULT_OUTPUT_TYPE = {"gguf": "q4_k_m", "onnx": "int4"}


def file_type_name(number: int) -> str:
    """The output type a GGUF's ``general.file_type`` names ("ftype<N>" for a type edgemed does not write)."""
    for name, t in GGUF_TYPES.items():
        if t.ftype == number:
            return name
    return f"ftype{number}"


@dataclass(frozen=True)
class KvType:
    """A llama.cpp KV cache type (profile ``llama.type_k`` / ``type_v``)."""

    ggml: str                 # the ggml type's name (GGML_TYPE_...)
    ggml_id: int              # its number in ggml.h's enum (llama-cpp-python 0.3.36 lacks some names, e.g. BF16)
    bytes_per_element: float  # block-quantized types: block bytes / block size
    full_precision: bool      # attention reads it without flash attention (a quantized V cache needs it)


KV_TYPES: dict[str, KvType] = {
    "f32": KvType("GGML_TYPE_F32", 0, 4.0, True),
    "f16": KvType("GGML_TYPE_F16", 1, 2.0, True),
    "bf16": KvType("GGML_TYPE_BF16", 30, 2.0, True),
    "q8_0": KvType("GGML_TYPE_Q8_0", 8, 34 / 32, False),
    "q4_0": KvType("GGML_TYPE_Q4_0", 2, 18 / 32, False),
}
KV_CACHE_TYPES = tuple(KV_TYPES)
DEFAULT_KV_TYPE = "f16"
FULL_PRECISION_KV = frozenset(n for n, t in KV_TYPES.items() if t.full_precision)

#: llama.cpp extra CPU buffer types for weights (edgemed/runtime/buffers.py says what each means).
EXTRA_BUFFER_MODES = ("auto", "all", "repack", "none")
