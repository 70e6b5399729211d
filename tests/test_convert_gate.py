"""A broken model is never written, whatever the output type or flags.

- integer / bool dtypes where weights are expected are refused when the checkpoint is read;
- NaN / infinite weights are refused while tensors stream (with --no-parity too), naming the tensor;
- a finite weight no GGUF type holds (F64 past F32's range) is the checkpoint's to fix, not a wider type's;
- quantized outputs are gated: finite logits and top-1 agreement >= parity.TOP1_GATE;
- a quantizer failure says what went wrong (llama.cpp's own error line), not "check disk space".
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

from click.testing import CliRunner  # noqa: E402

from edgemed.cli import cli  # noqa: E402
from edgemed.converters.quality import parity  # noqa: E402
from edgemed.converters.pipeline import ConvertOptions, convert  # noqa: E402
from edgemed.errors import CheckpointError, EdgemedError  # noqa: E402

import tiny  # noqa: E402

TENSOR = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    """A tiny llama stored as BF16, as real checkpoints are (I16 then has the same byte size)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = tiny.build_model(tmp_path_factory.mktemp("gate") / "llama", "llama")
    weights = path / "model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    return path


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def rewrite_header(file: Path, mutate) -> None:
    """Apply ``mutate(header_dict)`` to a safetensors header, keeping the data bytes as they are."""
    blob = file.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    mutate(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n:])


def _poison(ckpt: Path, value: float) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    weights = ckpt / "model.safetensors"
    tensors = load_file(weights)
    t = tensors[TENSOR].clone()
    t.view(-1)[17] = value
    tensors[TENSOR] = t
    save_file(tensors, weights, metadata={"format": "pt"})
    assert not bool(torch.isfinite(load_file(weights)[TENSOR]).all())


def _cli(*args):
    return CliRunner().invoke(cli, ["convert", *map(str, args)])


def _refused(result, *words):
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # a clean ClickException, no traceback
    assert "Traceback" not in result.output and "Fix:" in result.output
    for w in words:
        assert w in result.output, result.output


# -- (a) integer dtypes ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["I16", "U16", "BOOL"])
def test_integer_dtype_is_refused_when_the_checkpoint_is_read(bf16_model, tmp_path, dtype):
    ckpt = _copy(bf16_model, tmp_path / "ckpt")

    def to_int(header):
        header[TENSOR]["dtype"] = dtype
        if dtype == "BOOL":  # 1 byte per element: keep the header consistent by halving the rows
            shape = header[TENSOR]["shape"]
            header[TENSOR]["shape"] = [shape[0] * 2, shape[1]]
    rewrite_header(ckpt / "model.safetensors", to_int)
    out = tmp_path / "x.gguf"
    result = _cli(ckpt, "--quant", "q4_k_m", "-o", out)
    _refused(result, TENSOR, dtype)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_gate_refuses_when_the_source_itself_is_broken():
    """With an integer tensor let through, both sides compute the same garbage; NaN source logits are refused."""
    src = [np.full((4, 16), np.nan, dtype=np.float32)]
    report = parity.compare("gguf", "q4_k_m", [[1] * 4], src, [np.zeros((4, 16), np.float32)])
    assert report.passed is False and report.source_finite is False
    assert "source checkpoint itself" in str(parity.gate_error(report, "The Q4_K_M GGUF"))


# -- (b) non-finite weights ------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights_refused_with_no_parity(bf16_model, tmp_path, value):
    ckpt = _copy(bf16_model, tmp_path / "ckpt")
    _poison(ckpt, value)
    out = tmp_path / "out" / "x.gguf"
    out.parent.mkdir()
    _refused(_cli(ckpt, "--quant", "f16", "--no-parity", "-o", out), TENSOR, "NaN or infinite")
    assert list(out.parent.iterdir()) == []


def test_nonfinite_weights_refused_before_quantizing(bf16_model, tmp_path):
    ckpt = _copy(bf16_model, tmp_path / "ckpt")
    _poison(ckpt, float("nan"))
    out = tmp_path / "out" / "x.gguf"
    out.parent.mkdir()
    with pytest.raises(CheckpointError, match=TENSOR.replace(".", r"\.")) as info:
        convert(ckpt, out, ConvertOptions(out_type="q4_k_m"), echo=lambda s: None)
    assert "disk" not in str(info.value)
    assert list(out.parent.iterdir()) == []


def test_f16_overflow_is_named_as_range_not_nan(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    ckpt = tiny.build_model(tmp_path / "ckpt", "llama")  # float32 weights
    tensors = load_file(ckpt / "model.safetensors")
    tensors[TENSOR] = tensors[TENSOR].clone()
    tensors[TENSOR].view(-1)[3] = 1e6  # finite in F32, infinity in F16
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="beyond F16's range") as info:
        convert(ckpt, tmp_path / "x.gguf", ConvertOptions(out_type="f16", parity=False), echo=lambda s: None)
    assert "bf16" in info.value.fix
    assert torch.isfinite(tensors[TENSOR]).all()


def _beyond_f16(ckpt):
    """``ckpt`` (float32) with one weight F32 holds and F16 cannot (a fine-tune saved by Trainer may have one)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    tensors[TENSOR] = tensors[TENSOR].clone()
    tensors[TENSOR].view(-1)[3] = 1e5
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    return ckpt


def test_a_weight_beyond_f16_is_quantized_from_an_f32_intermediate(tmp_path):
    """A quantized type is still made: the intermediate llama.cpp quantizes is written again as F32, which holds
    the weight as it is, and is gated as F32; the output is the type asked for."""
    import gguf

    ckpt = _beyond_f16(tiny.build_model(tmp_path / "ckpt", "llama"))
    said = []
    report = convert(ckpt, tmp_path / "q8.gguf", ConvertOptions(out_type="q8_0"), echo=said.append)
    assert f"'{TENSOR}' holds values beyond F16's range (|x| > 65504): writing the intermediate as F32 instead" in said
    assert report.out_type == "q8_0" and report.parity["passed"] is True
    assert report.parity["intermediate"]["out_type"] == "f32" and report.parity["intermediate"]["passed"] is True
    reader = gguf.GGUFReader(str(tmp_path / "q8.gguf"))
    held = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    assert held.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "q8.gguf", "q8.gguf.report.json"]  # no scratch left


def test_the_base_an_adapter_is_gated_on_is_made_f32_past_f16s_range(tmp_path):
    ckpt = _beyond_f16(tiny.build_model(tmp_path / "ckpt", "llama"))
    lora = tiny.build_lora(ckpt, tmp_path / "lora")
    out = tmp_path / "a.lora.gguf"
    # F32 adapter tensors: llama.cpp multiplies an F16 tensor with activations cast to F16, and the activations
    # this weight makes do not fit there either
    report = convert(ckpt, out, ConvertOptions(out_type="f32", lora=lora, adapter_only=True), echo=lambda s: None)
    assert report.parity["passed"] is True and report.parity["base"]["out_type"] == "f32"
    assert report.parity["base"]["made"].startswith("F32, converted from the source")


def test_nonfinite_lora_merge_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    base = tiny.build_model(tmp_path / "base", "llama")
    lora = tiny.build_lora(base, tmp_path / "lora")
    tensors = load_file(lora / "adapter_model.safetensors")
    key = next(k for k in tensors if "layers.0.self_attn.v_proj.lora_B" in k)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, lora / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="after merging the LoRA adapter"):
        convert(base, tmp_path / "x.gguf", ConvertOptions(out_type="f16", parity=False, lora=lora), echo=lambda s: None)
    assert not (tmp_path / "x.gguf").exists()


# -- (c) the quantized gate ------------------------------------------------------------------------
def test_quantized_output_passes_the_gate(bf16_model, tmp_path):
    report = convert(bf16_model, tmp_path / "q.gguf", ConvertOptions(out_type="q4_k_m"), echo=lambda s: None)
    p = report.parity
    assert p["gate_top1"] == parity.TOP1_GATE and p["gate_nmse"] is None
    assert p["finite"] is True and p["passed"] is True and p["top1"] >= parity.TOP1_GATE


@pytest.mark.parametrize("broken", ["shuffled", "nan"])
def test_quantized_output_failing_the_gate_is_not_written(bf16_model, tmp_path, monkeypatch, broken):
    real = parity.gguf_logits

    def bad_logits(path, ids, threads=None):
        out = real(path, ids, threads)
        if Path(path).name.startswith("intermediate-"):  # the float GGUF the quantizer read is sound: its gate passes
            return out
        if broken == "nan":
            out[0][1, 5] = np.nan
            return out
        rng = np.random.default_rng(0)
        return [rng.permutation(x, axis=1) for x in out]  # plausible numbers, wrong tokens

    monkeypatch.setattr(parity, "gguf_logits", bad_logits)
    out = tmp_path / "out" / "q.gguf"
    out.parent.mkdir()
    result = _cli(bf16_model, "--quant", "q4_k_m", "-o", out)
    _refused(result, "nothing was written", "NaN or infinite" if broken == "nan" else "same next token")
    assert list(out.parent.iterdir()) == []


def test_compare_gates_every_type_on_finite_logits():
    rng = np.random.default_rng(1)
    src = [rng.normal(size=(6, 32)).astype(np.float32)]
    conv = [src[0].copy()]
    conv[0][2, 3] = np.inf
    for out_type in ("f16", "q8_0", "int4"):
        report = parity.compare("gguf", out_type, [[1] * 6], src, conv)
        assert report.finite is False and report.passed is False
    ok = parity.compare("gguf", "q4_0", [[1] * 6], src, [src[0] + 0.01])
    assert ok.passed is True and ok.top1 == 1.0 and f"top-1 >= {parity.TOP1_GATE:.0%}" in ok.summary()


# -- (d) what the quantizer says -------------------------------------------------------------------
def test_quantize_failure_reports_llama_cpp_reason_not_disk_space(bf16_model, tmp_path, monkeypatch):
    """NaN weights that slip past the writer: llama.cpp's validation error is what the user reads."""
    from edgemed.converters import arch_spec
    from edgemed.converters.gguf import writer as gguf_out
    from edgemed.converters.source.checkpoint import Checkpoint
    from edgemed.converters.gguf.quantize import quantize
    from edgemed.converters.gguf.tokenizer import plan_vocab

    ckpt_dir = _copy(bf16_model, tmp_path / "ckpt")
    _poison(ckpt_dir, float("nan"))
    monkeypatch.setattr(gguf_out, "first_nonfinite", lambda data, t: None)
    ckpt = Checkpoint.open(ckpt_dir)
    f16 = tmp_path / "f16.gguf"
    gguf_out.write_float_gguf(ckpt, arch_spec(ckpt.architecture), plan_vocab(ckpt_dir, 384), f16, "f16")
    with pytest.raises(EdgemedError) as info:
        quantize(f16, tmp_path / "q.gguf", "q4_0")
    text = str(info.value)
    assert "disk" not in text.lower() and "NaN" in text and "llama.cpp said:" in text


@pytest.mark.parametrize("tensor, out_type", [(TENSOR, "f16"), (TENSOR, "bf16"), (TENSOR, "q8_0"),
                                              ("model.layers.0.self_attn.q_proj.weight", "f32")])  # q: laid out first
def test_an_f64_weight_beyond_f32_names_the_checkpoint_not_a_wider_type(tmp_path, tensor, out_type):
    """No GGUF type holds a value past F32's range (BF16 has F32's): the advice to convert to bf16 or f32 could not
    be followed, and a quantized conversion does not try an F32 intermediate first."""
    import torch
    from safetensors.torch import load_file, save_file

    ckpt = tiny.build_model(tmp_path / "ckpt", "llama")
    tensors = {k: v.to(torch.float64) for k, v in load_file(ckpt / "model.safetensors").items()}
    tensors[tensor].view(-1)[3] = 1e39  # finite in F64
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    said = []
    with pytest.raises(CheckpointError) as info:
        convert(ckpt, tmp_path / "x.gguf", ConvertOptions(out_type=out_type, parity=False), echo=said.append)
    assert f"'{tensor}' holds values beyond F32's range" in info.value.problem
    assert "no GGUF type holds" in info.value.problem and "NaN" not in info.value.problem
    assert info.value.fix.startswith("fix the checkpoint") and "--quant" not in info.value.fix
    assert not any("writing the intermediate as F32" in s for s in said)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_bf16_overflow_is_sent_to_f32_only(tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = tiny.build_model(tmp_path / "ckpt", "llama")
    tensors = load_file(ckpt / "model.safetensors")
    tensors[TENSOR] = tensors[TENSOR].clone()
    tensors[TENSOR].view(-1)[3] = 3.4e38  # F32 holds it, BF16's largest is 3.3895e38
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="beyond BF16's range") as info:
        convert(ckpt, tmp_path / "x.gguf", ConvertOptions(out_type="bf16", parity=False), echo=lambda s: None)
    assert info.value.fix.startswith("convert to f32 (--quant f32)")


# -- (c) activations past F16's range ----------------------------------------------------------------
def _loud(ckpt):
    """``ckpt`` (float32) whose layer-1 MLP makes activations past 65504 at its down_proj input, from weights F16
    holds (|w| < 100): llama.cpp rounds that input to F16 for an F16 down_proj and computes infinity."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    for name in (TENSOR, TENSOR.replace("up_proj", "gate_proj")):
        tensors[name] = tensors[name] * 300
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    return ckpt


@pytest.mark.parametrize("out_type, fix", [("f16", "convert to f32 or bf16 (--quant f32 / --quant bf16): "),
                                           ("q8_0", "convert to f32 or bf16 (--quant f32 / --quant bf16), as a quantized")])
def test_f16_logits_past_f16s_range_name_the_wider_type(tmp_path, out_type, fix):
    """Non-finite logits from finite F16 weights are the F16 activations' overflow, not a converter bug: the fix
    names the type that keeps them (BF16 passes), for the output and for a quantized type's F16 intermediate."""
    ckpt = _loud(tiny.build_model(tmp_path / "ckpt", "llama"))
    with pytest.raises(EdgemedError) as info:
        convert(ckpt, tmp_path / "x.gguf", ConvertOptions(out_type=out_type), echo=lambda s: None)
    assert "NaN or infinite logits" in info.value.problem
    assert info.value.fix.startswith(fix) and "65504" in info.value.fix and "converter bug" not in info.value.fix
    assert convert(ckpt, tmp_path / "x.gguf", ConvertOptions(out_type="bf16"), echo=lambda s: None).parity["passed"]
    if out_type == "f16":  # `edgemed check` of an F16 file written without the gate says the same
        convert(ckpt, tmp_path / "f16.gguf", ConvertOptions(out_type="f16", parity=False), echo=lambda s: None)
        result = CliRunner().invoke(cli, ["check", str(ckpt), str(tmp_path / "f16.gguf")])
        _refused(result, "NaN or infinite logits", "--quant f32", "65504")


def test_f16_adapter_tensors_past_f16s_range_name_quant_f32(tmp_path):
    """An adapter's lora_b takes lora_a's product as its input: F16 there (f16, and q8_0's lora_b below rank 32)
    rounds activations past 65504 to infinity. The fix is --quant f32, which passes
    (test_the_base_an_adapter_is_gated_on_is_made_f32_past_f16s_range)."""
    ckpt = _beyond_f16(tiny.build_model(tmp_path / "ckpt", "llama"))
    lora = tiny.build_lora(ckpt, tmp_path / "lora")
    out = tmp_path / "a.lora.gguf"
    with pytest.raises(EdgemedError) as info:
        convert(ckpt, out, ConvertOptions(out_type="f16", lora=lora, adapter_only=True), echo=lambda s: None)
    assert "NaN or infinite logits" in info.value.problem and "F32 base" in info.value.problem  # made F32: the adapter's
    assert info.value.fix.startswith("write the adapter's tensors as F32 (--quant f32): llama.cpp rounds")
    assert "--base" not in info.value.fix and not out.exists()


@pytest.mark.parametrize("types, base, fix", [
    ({"F32": 28}, "f32", None),
    ({"Q8_0": 14, "F16": 14}, "f32", "write the adapter's tensors as F32 (--quant f32)"),
    ({"F32": 28}, "f16", "gate it on an F32 base (--base, a GGUF of this checkpoint converted with --quant f32)"),
])
def test_an_adapters_f16_fix_names_each_f16_part(types, base, fix):
    from edgemed.converters.pipeline import _adapter_f16_fix

    assert _adapter_f16_fix(types, {"out_type": base}) == fix
