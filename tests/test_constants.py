"""The one table of types (edgemed/constants.py): light to import, and in step with gguf-py and llama.cpp."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgemed import constants as c


def test_importing_the_table_loads_no_heavy_package():
    code = ("import sys, edgemed.constants, edgemed.devices.schema, edgemed.cli.convert; "
            "print(sorted(m for m in ('gguf', 'numpy', 'llama_cpp', 'torch') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_the_names_every_user_reads_come_from_the_table():
    from edgemed.converters.pipeline import OUTPUT_TYPES
    from edgemed.devices.schema import EXTRA_BUFFER_MODES, KV_CACHE_TYPES
    from edgemed.runtime.buffers import MODES

    assert OUTPUT_TYPES == c.GGUF_OUTPUT_TYPES == ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m")
    assert c.FLOAT_OUTPUT_TYPES == ("f32", "f16", "bf16") and c.QUANT_OUTPUT_TYPES == ("q8_0", "q4_0", "q4_k_m", "q5_k_m")
    assert KV_CACHE_TYPES is c.KV_CACHE_TYPES and EXTRA_BUFFER_MODES is MODES is c.EXTRA_BUFFER_MODES
    assert c.FULL_PRECISION_KV == {"f32", "f16", "bf16"}
    assert [c.file_type_name(n) for n in (0, 1, 32, 7, 2, 15, 17, 3)] == [*c.GGUF_OUTPUT_TYPES[:3], "q8_0", "q4_0", "q4_k_m",
                                                                        "q5_k_m", "ftype3"]


def test_file_types_match_llama_cpp_and_gguf_py():
    gguf = pytest.importorskip("gguf")
    llama_cpp = pytest.importorskip("llama_cpp")
    for name, t in c.GGUF_TYPES.items():
        assert getattr(llama_cpp, t.llama_ftype) == t.ftype, name
        assert gguf.LlamaFileType(t.ftype).name == t.llama_ftype.removeprefix("LLAMA_FTYPE_"), name
        if t.is_float:
            gguf.GGMLQuantizationType[t.weights]


def test_kv_byte_sizes_match_ggml_blocks():
    gguf = pytest.importorskip("gguf")
    for name, t in c.KV_TYPES.items():
        block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.ggml.removeprefix("GGML_TYPE_")]]
        assert t.bytes_per_element == nbytes / block, name


def test_kv_type_numbers_are_ggml_s():
    gguf = pytest.importorskip("gguf")
    llama_cpp = pytest.importorskip("llama_cpp")
    for name, t in c.KV_TYPES.items():
        assert t.ggml_id == int(gguf.GGMLQuantizationType[t.ggml.removeprefix("GGML_TYPE_")]), name
        assert getattr(llama_cpp, t.ggml, t.ggml_id) == t.ggml_id, name  # where llama-cpp-python names it


def test_a_bf16_kv_cache_loads(smollm2_gguf):
    """llama-cpp-python 0.3.36 has no GGML_TYPE_BF16: the layer passes ggml's number, so the profile value works."""
    from edgemed.runtime.engine import GenerationSettings, LoadSettings
    from edgemed.runtime.llama_engine import LlamaEngine

    with LlamaEngine(smollm2_gguf, LoadSettings(n_ctx=256, n_threads=1, type_k="bf16", type_v="bf16")) as engine:
        assert "".join(engine.complete("The heart has four", GenerationSettings(max_tokens=4)))
