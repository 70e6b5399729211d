"""Q8_0 LoRA adapter tensors (``convert --adapter-only --quant q8_0``): 8-bit where a tensor's rows are a multiple
of Q8_0's 32-value block, F16 elsewhere (as llama.cpp's ``convert_lora_to_gguf.py --outtype q8_0`` decides); the
file is smaller than the F16 one by exactly what Q8_0 saves on those tensors, llama.cpp runs it, and it passes the
same parity gate as the F16 adapter.

The adapter is the real PEFT LoRA of ``test_adapter_convert`` (SmolLM2-135M, r=8, q/k/v/o + MLP): ``lora_a``
rows are the layer inputs (576 or 1536 values: Q8_0), ``lora_b`` rows are r=8 values (F16).
"""

from __future__ import annotations

import pytest

from test_adapter_convert import PROMPT, adapter_kit, cli

PAIRS = 30 * 7  # q/k/v/o + gate/up/down in each of SmolLM2's 30 layers


def test_q8_0_blocks_rows_of_32_and_leaves_the_rest_f16():
    """The rule, on shapes in numpy order (rows last): PEFT's A ``[r, in]`` rows are ``in`` long, B ``[out, r]``
    rows ``r`` long; F16 and F32 are what they say whatever the shape."""
    from gguf import GGMLQuantizationType as T

    from edgemed.converters.gguf.adapter import stored_type

    assert stored_type((8, 576), "q8_0") == T.Q8_0 and stored_type((16, 4864), "q8_0") == T.Q8_0
    assert stored_type((576, 8), "q8_0") == T.F16 and stored_type((896, 16), "q8_0") == T.F16
    assert stored_type((896, 32), "q8_0") == T.Q8_0 and stored_type((896, 64), "q8_0") == T.Q8_0
    assert stored_type((576, 8), "f16") == T.F16 and stored_type((8, 576), "f32") == T.F32


@pytest.fixture(scope="module")
def kit(smollm2_hf, tmp_path_factory) -> dict:
    """The shared LoRA and F16 base, and the adapter written as F16 and as Q8_0."""
    from edgemed.converters import arch_spec
    from edgemed.converters.gguf.adapter import write_adapter_gguf
    from edgemed.converters.source.source import Source

    shared = adapter_kit(smollm2_hf, tmp_path_factory)
    work = tmp_path_factory.mktemp("adapter-q8")
    src = Source.open(smollm2_hf, lora=shared["lora"])
    spec = arch_spec(src.checkpoint.architecture)
    files = {}
    for tensor_type in ("f16", "q8_0"):
        files[tensor_type] = work / f"cardio-{tensor_type}.lora.gguf"
        write_adapter_gguf(src.checkpoint, spec, src.adapter, files[tensor_type], base_source_sha256=src.checkpoint.digest(),
                           tensor_type=tensor_type)
    return {"src": src, "base": shared["base_f16"], **files}


@pytest.mark.slow
def test_q8_0_file_has_q8_0_where_rows_allow_and_is_smaller_by_exactly_that(kit):
    """Every ``lora_a`` is Q8_0 and every ``lora_b`` F16; the file is smaller than the F16 one by 30 bytes per 32
    values of ``lora_a`` (Q8_0: 34 bytes a block, F16: 64), nothing else changed: measured 4.69 -> 3.61 MiB."""
    from edgemed.converters.gguf.adapter import tensor_type_counts
    from edgemed.formats.gguf_header import read_header

    tensors = read_header(kit["q8_0"]).tensors
    assert {t.type_name for t in tensors if t.name.endswith(".lora_a")} == {"Q8_0"}
    assert {t.type_name for t in tensors if t.name.endswith(".lora_b")} == {"F16"}
    assert tensor_type_counts(kit["q8_0"]) == {"F16": PAIRS, "Q8_0": PAIRS}
    assert tensor_type_counts(kit["f16"]) == {"F16": 2 * PAIRS}
    f16_names = {t.name for t in read_header(kit["f16"]).tensors}
    assert {t.name for t in tensors} == f16_names
    a_values = sum(t.n_elements for t in tensors if t.name.endswith(".lora_a"))
    f16_size, q8_size = kit["f16"].stat().st_size, kit["q8_0"].stat().st_size
    print(f"SmolLM2 r=8 adapter: F16 {f16_size} bytes, Q8_0 {q8_size} bytes ({q8_size / f16_size:.3f}x)")
    assert f16_size - q8_size == a_values * 30 // 32


@pytest.mark.slow
def test_q8_0_adapter_passes_the_f16_gate_on_the_f16_base(kit):
    """The F16 base with the Q8_0 adapter applied by llama.cpp at run time against the HF model with the adapter
    merged: the F16 NMSE gate, as the F16 adapter (measured NMSE 1.4e-6 vs F16's 1.0e-6, KLD 4.9e-6 vs 4.1e-6 nats)."""
    from edgemed.converters.gguf.adapter import tensor_type_counts
    from edgemed.converters.quality.parity import check_adapter_gguf

    assert "Q8_0" in tensor_type_counts(kit["q8_0"])  # the file the gate runs on is the quantized one
    report = check_adapter_gguf(kit["src"], kit["base"], kit["q8_0"], "f16", threads=1)
    print(f"Q8_0 adapter on F16 base: NMSE {report.nmse:.3e}, KLD {report.kld:.3e}, top-1 {report.top1:.3f}")
    assert report.passed is True and report.gate_nmse == 1e-4 and report.nmse < 1e-4
    assert report.kld < 1e-4 and report.top1 >= 0.98


@pytest.mark.slow
def test_run_cli_with_the_q8_0_adapter_says_what_the_f16_adapter_says(kit):
    """``edgemed run BASE --adapter FILE.q8_0``: llama.cpp loads the Q8_0 tensors and greedy text equals the F16
    adapter's (itself the merged model's: test_adapter_run), not the bare base's."""
    from edgemed.converters.gguf.adapter import tensor_type_counts

    assert "Q8_0" in tensor_type_counts(kit["q8_0"])
    args = ["--prompt", PROMPT, "--raw", "--max-tokens", "16", "--threads", "1", "--ctx", "512"]
    q8 = cli("run", kit["base"], "--adapter", kit["q8_0"], *args)
    f16 = cli("run", kit["base"], "--adapter", kit["f16"], *args)
    bare = cli("run", kit["base"], *args)
    for result in (q8, f16, bare):
        assert result.exit_code == 0, result.output
    assert q8.output == f16.output != bare.output


@pytest.mark.slow
def test_convert_adapter_only_quant_q8_0_reports_its_types_and_gate(smollm2_hf, kit, tmp_path):
    """``convert --lora A --adapter-only --quant q8_0``: the file, its report's tensor types and the F16 gate."""
    import json

    out = tmp_path / "cardio-q8.lora.gguf"
    lora = kit["src"].adapter.path
    result = cli("convert", smollm2_hf, "--lora", lora, "--adapter-only", "--quant", "q8_0", "-o", out, "--json",
                 "--threads", "1")
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_name(out.name + ".report.json").read_text())
    assert report["lora"]["tensor_type"] == "q8_0" and report["lora"]["tensor_types"] == {"F16": PAIRS, "Q8_0": PAIRS}
    assert report["parity"]["passed"] is True and report["parity"]["nmse"] < report["parity"]["gate_nmse"] == 1e-4
    assert out.stat().st_size == kit["q8_0"].stat().st_size
