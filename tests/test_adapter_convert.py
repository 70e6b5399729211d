"""A PEFT LoRA written as a GGUF LoRA adapter (``convert --lora A --adapter-only``): llama.cpp loads it, it
computes what PEFT computes, and a file that cannot be right is refused before any work.

The adapter is real: made by ``peft`` on the real SmolLM2-135M checkpoint (non-zero B, r=8, targets q/k/v/o and
the MLP). The base GGUFs are converted from the same checkpoint once per module.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter_kit import make_lora

PROMPT = "The patient presents with chest pain and"


_KIT: dict = {}  # built once per session, shared with test_adapter_q8 (which imports this module)


def adapter_kit(smollm2_hf, tmp_path_factory) -> dict:
    """The PEFT LoRA on SmolLM2 and the F16 base converted from the same checkpoint, made once per session."""
    if not _KIT:
        from edgemed.converters.pipeline import ConvertOptions, convert

        work = tmp_path_factory.mktemp("adapter-kit")
        lora = make_lora(smollm2_hf, work / "cardio-lora")
        convert(smollm2_hf, work / "base-f16.gguf", ConvertOptions(out_type="f16", parity=False), echo=lambda s: None)
        _KIT.update(work=work, lora=lora, base_f16=work / "base-f16.gguf")
    return _KIT


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("adapter")


@pytest.fixture(scope="module")
def lora(smollm2_hf, tmp_path_factory) -> Path:
    return adapter_kit(smollm2_hf, tmp_path_factory)["lora"]


@pytest.fixture(scope="module")
def base_f16(smollm2_hf, tmp_path_factory) -> Path:
    return adapter_kit(smollm2_hf, tmp_path_factory)["base_f16"]


def cli(*args, input: str | None = None):
    from click.testing import CliRunner

    from edgemed.cli import cli as main

    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def _written(smollm2_hf, lora, out: Path, **kw):
    from edgemed.converters import arch_spec
    from edgemed.converters.gguf.adapter import write_adapter_gguf
    from edgemed.converters.source.source import Source

    src = Source.open(smollm2_hf, lora=lora)
    spec = arch_spec(src.checkpoint.architecture)
    planned = write_adapter_gguf(src.checkpoint, spec, src.adapter, out, base_source_sha256=src.checkpoint.digest(), **kw)
    return src, planned


@pytest.mark.slow
def test_llamacpp_loads_the_adapter_and_it_changes_the_logits(smollm2_hf, lora, base_f16, work):
    """llama.cpp reads the file (its keys and every pair's shape checked against the base's tensors), reads back
    edgemed's keys, and the adapter applied to a context changes the logits towards PEFT's."""
    import numpy as np

    from edgemed.formats.gguf_header import BASE_SOURCE_KEY
    from edgemed.formats.gguf_header import read_header
    from edgemed.runtime import llamacpp
    from edgemed.runtime.engine import LoadSettings
    from edgemed.runtime.loader import load_model

    out = work / "direct.lora.gguf"
    src, planned = _written(smollm2_hf, lora, out)
    assert len(planned) == 30 * 7  # q/k/v/o + gate/up/down in each of SmolLM2's 30 layers
    meta = read_header(out).metadata
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora" and meta["adapter.lora.alpha"] == 16.0
    assert meta["general.architecture"] == "llama"
    model = load_model(base_f16, LoadSettings(n_ctx=64, extra_buffers="none"))
    ctx = adapter = None
    try:
        ctx = llamacpp.Context(model, n_ctx=64, n_batch=64, threads=1)
        tokens = model.tokenize(PROMPT, add_special=True)
        bare = ctx.eval(tokens, all_rows=True)
        adapter = llamacpp.Adapter(model, out)
        assert adapter.meta("adapter.type") == "lora"
        assert adapter.meta(BASE_SOURCE_KEY) == src.checkpoint.digest() == read_header(base_f16).metadata["edgemed.source.sha256"]
        ctx.set_adapters([(adapter, 1.0)])
        ctx.clear()
        adapted = ctx.eval(tokens, all_rows=True)
        ctx.set_adapters([])
        ctx.clear()
        again = ctx.eval(tokens, all_rows=True)
    finally:
        for obj in (ctx, adapter, model):
            if obj is not None:
                obj.close()
    assert np.abs(adapted - bare).max() > 0.5  # the adapter is applied on the native side
    # ... by far more than the F16 gate lets a conversion miss by (NMSE 1e-4): a dropped adapter fails that gate
    assert ((adapted - bare) ** 2).sum() / (bare ** 2).sum() > 10 * 1e-4  # measured: 4e-3, 40x the gate
    np.testing.assert_array_equal(again, bare)  # and taken off again


@pytest.mark.slow
def test_convert_adapter_only_passes_the_f16_gate(smollm2_hf, lora, base_f16, work):
    """``convert --lora A --adapter-only``: an F16 base with the adapter applied by llama.cpp at run time matches
    the HF model with the adapter merged within the F16 gate; the base's checkpoint sha256 is in the file and the
    report."""
    import json

    from edgemed.formats.gguf_header import BASE_SOURCE_KEY, read_header

    out = work / "cardio.lora.gguf"
    result = cli("convert", smollm2_hf, "--lora", lora, "--adapter-only", "-o", out, "--json", "--threads", "1")
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_name(out.name + ".report.json").read_text())
    parity = report["parity"]
    print(f"adapter on F16 base: NMSE {parity['nmse']:.3e}, KLD {parity['kld']:.3e}, top-1 {parity['top1']:.3f}")
    assert parity["backend"] == "gguf+lora" and parity["out_type"] == "f16" and parity["passed"] is True
    assert parity["nmse"] < parity["gate_nmse"] == 1e-4
    assert parity["base"]["out_type"] == "f16"
    sha = report["source"]["sha256"]
    assert report["lora"]["base_source_sha256"] == sha == read_header(out).metadata[BASE_SOURCE_KEY]
    assert report["lora"]["form"] == "gguf-adapter" and report["lora"]["pairs"] == 210
    assert report["sha256"] and report["size_bytes"] == out.stat().st_size


@pytest.mark.slow
def test_adapter_gated_on_a_q4_k_m_base_reports_top1_and_kld(smollm2_hf, lora, base_f16, work):
    """``--base`` a Q4_K_M GGUF converted from the same checkpoint: the quantized gate (top-1), KLD reported.
    SmolLM2's rows (576) are not a multiple of 256, so llama.cpp's Q4_K_M recipe falls back to other 4/5/8-bit
    types for most tensors: the file is what llama.cpp makes of Q4_K_M for this model."""
    import json

    from edgemed.converters.gguf.quantize import quantize

    base = work / "base-q4_k_m.gguf"
    quantize(base_f16, base, "q4_k_m")  # what `convert --quant q4_k_m --no-imatrix` makes of the F16 base
    out = work / "cardio-q4.lora.gguf"
    result = cli("convert", smollm2_hf, "--lora", lora, "--adapter-only", "--base", base, "-o", out, "--json", "--threads", "1")
    assert result.exit_code == 0, result.output
    parity = json.loads(out.with_name(out.name + ".report.json").read_text())["parity"]
    print(f"adapter on Q4_K_M base: top-1 {parity['top1']:.3f}, KLD {parity['kld']:.4f} nats, NMSE {parity['nmse']:.3e}")
    assert parity["out_type"] == "q4_k_m" and parity["gate_top1"] == 0.4 and parity["passed"] is True
    assert parity["base"]["path"] == str(base) and len(parity["base"]["sha256"]) == 64
    assert 0.4 <= parity["top1"] <= 1.0 and 0.0 < parity["kld"] < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("flags, says", [
    (["--to", "onnx", "--adapter-only"], "ONNX Runtime has no such adapter"),
    (["--adapter-only", "--quant", "q4_k_m"], "F16, Q8_0 or F32"),
    (["--base", "x.gguf"], "goes with --adapter-only"),
])
def test_unsupported_adapter_requests_are_refused_before_any_work(smollm2_hf, lora, tmp_path, flags, says):
    out = tmp_path / "x.lora.gguf"
    result = cli("convert", smollm2_hf, "--lora", lora, *flags, "-o", out)
    assert result.exit_code == 1 and says in result.output, result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_base_from_another_checkpoint_is_refused_before_any_work(smollm2_hf, smollm2_gguf, lora, tmp_path):
    """``--base`` the pip package's own GGUF: same model and architecture, but nothing records that it was converted
    from this checkpoint, so the adapter cannot be checked on it."""
    out = tmp_path / "x.lora.gguf"
    result = cli("convert", smollm2_hf, "--lora", lora, "--adapter-only", "--base", smollm2_gguf, "-o", out)
    assert result.exit_code == 1 and "does not record which checkpoint" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_adapter_the_file_cannot_hold_is_refused(smollm2_hf, lora):
    """PEFT's modules_to_save (full replacement weights) have no LoRA-pair form: refused, the merge named."""
    from edgemed.converters import arch_spec
    from edgemed.converters.gguf.adapter import plan_adapter
    from edgemed.converters.source.source import Source
    from edgemed.errors import AdapterError

    src = Source.open(smollm2_hf, lora=lora)
    src.adapter.replacements["model.norm.weight"] = "base_model.model.model.norm.weight"  # as modules_to_save plans it
    with pytest.raises(AdapterError, match="modules_to_save") as exc:
        plan_adapter(src.checkpoint, arch_spec(src.checkpoint.architecture), src.adapter)
    assert "without --adapter-only" in exc.value.fix


@pytest.mark.parametrize("arch, extra", [
    ("llama", {"use_rslora": True, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"down_proj": 32}}),
    ("qwen2", {}),
])
def test_per_module_scales_and_architectures_pass_the_gate(tmp_path, arch, extra):
    """rsLoRA and per-module rank / alpha overrides give each pair a scale llama.cpp's one ``alpha / r`` cannot
    say: the ratio is folded into B, and the adapter still computes PEFT's model (tiny Llama: Q/K rows permuted;
    tiny Qwen2: biases, tied embeddings)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny

    from edgemed.converters.pipeline import ConvertOptions, convert
    from edgemed.formats.gguf_header import read_header

    base = tiny.build_model(tmp_path / arch, arch=arch)
    lora = make_lora(base, tmp_path / "lora", r=8, alpha=4, std=0.05, **extra)
    out = tmp_path / "tiny.lora.gguf"
    report = convert(base, out, ConvertOptions(out_type="f32", adapter_only=True, lora=lora, threads=1), echo=lambda s: None)
    assert report.parity["passed"] is True and report.parity["nmse"] < 1e-4, report.parity["nmse"]
    assert report.lora["tensor_type"] == "f32" and {t.type_name for t in read_header(out).tensors} == {"F32"}
    # and the scales are not all 1: without the fold, this adapter computes another model
    assert report.lora["use_rslora"] == bool(extra)
    # the ranks and alphas the pairs use, once (no second "alpha"): the patterns' beside the config's r and lora_alpha
    assert {k: report.lora.get(k) for k in ("r", "lora_alpha", "alpha")} == \
        ({"r": [4, 8], "lora_alpha": [4, 32], "alpha": None} if extra else {"r": 8, "lora_alpha": 4, "alpha": None})
