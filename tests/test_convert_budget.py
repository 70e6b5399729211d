"""Every conversion route estimates its peak memory from config.json and refuses, before it
starts, a conversion that cannot fit its budget (numbers + a fix; nothing written, nothing left behind)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")
pytest.importorskip("psutil")

from click.testing import CliRunner  # noqa: E402

from edgemed.cli import cli  # noqa: E402
from edgemed.converters.budget import peaks as budget  # noqa: E402
from edgemed.converters.budget import memory_room
from edgemed.converters.budget.peaks import GIB, Dims, estimate_gguf, estimate_onnx  # noqa: E402
from edgemed.converters.budget.memory_room import parse_size  # noqa: E402
from edgemed.errors import InputError  # noqa: E402

import tiny  # noqa: E402

# DeepSeek-R1-Distill-Qwen-7B's shape, as config.json says it; no weights anywhere
QWEN2_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 3584,
            "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
            "tie_word_embeddings": False, "rope_theta": 10000.0, "max_position_embeddings": 131072,
            "torch_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny.build_model(tmp_path_factory.mktemp("budget") / "llama", "qwen2")


def _convert(*args, env=None):
    return CliRunner().invoke(cli, ["convert", *map(str, args)], env=env)


def _nothing_left(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == [], "a refused conversion wrote or left something"


@pytest.mark.parametrize("route", ["gguf", "onnx"])
def test_a_conversion_that_cannot_fit_is_refused_before_it_starts(model, tmp_path, monkeypatch, route):
    started = []
    monkeypatch.setattr("edgemed.converters.provenance.source_info", lambda *a: started.append(a))  # hashing: the first work
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = [model, "--to", route, "-o", out_dir / ("m.gguf" if route == "gguf" else "m-onnx")]
    result = _convert(*args, env={"EDGEMED_MEMORY_BUDGET": "1MiB"})
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and "Fix:" in result.output
    # the command's defaults: Q4_K_M calibrated on the shipped text (an imatrix pass), or ONNX int4
    kw = dict(out_type="q4_k_m", imatrix=True) if route == "gguf" else dict(out_type="int4")
    est = budget.estimate_for_dir(model, route, **kw)
    text = " ".join(result.output.split())
    assert f"would need about {est.resident / GIB:.1f} GiB" in text
    assert "than the 0.0 GiB budget ($EDGEMED_MEMORY_BUDGET=1MiB)" in text
    assert f"its biggest term: {est.biggest}" in text and "Nothing was written" in text
    assert "so they are not counted" in text  # file-backed pages: said how they count
    assert "close other programs" in text
    assert started == []
    _nothing_left(out_dir)


def test_the_command_line_budget_wins_and_names_itself(model, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = _convert(model, "--to", "onnx", "--quant", "fp32", "--memory-budget", "2MB", "-o", out_dir / "x",
                      env={"EDGEMED_MEMORY_BUDGET": "64GiB"})
    assert result.exit_code == 1, result.output
    assert "(--memory-budget 2MB)" in " ".join(result.output.split())
    _nothing_left(out_dir)
    bad = _convert(model, "--memory-budget", "lots", "-o", out_dir / "y.gguf")
    assert bad.exit_code == 1 and "6GiB" in bad.output
    _nothing_left(out_dir)


def test_a_normal_budget_lets_the_tiny_conversions_through(model, tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEMED_MEMORY_BUDGET", raising=False)
    detected = memory_room.detect_budget()  # what this machine has free now
    assert detected.bytes > 0 and ("psutil" in detected.source or "cgroup" in detected.source)
    for args, out in ((["--quant", "q4_0"], tmp_path / "m.gguf"), (["--to", "onnx", "--quant", "fp32"], tmp_path / "m-onnx")):
        result = _convert(model, *args, "-o", out)
        assert result.exit_code == 0, result.output
        assert out.exists()


def test_the_7b_estimate_follows_from_config_json_alone(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_7B))
    dims = Dims.from_config(json.loads((tmp_path / "config.json").read_text()))
    embed = 152064 * 3584
    layer = 2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944 + 2 * 3584
    assert dims.params == 2 * embed + 28 * layer + 3584 == 7_615_487_488  # + 129,024 q/k/v biases: 7,615,616,512
    assert dims.largest == embed
    q4 = estimate_gguf(dims, out_type="q4_k_m")
    terms = {s.name: {t.name: t.bytes for t in s.terms} for s in q4.steps}
    assert terms["quantize"]["llama.cpp quantize slab buffers"] == (256 << 20) + budget.QUANT_EXTRA  # quantize.MAX_BUF_BYTES
    assert terms["write"]["largest tensor's cast copy"] == 0  # BF16 -> the BF16 intermediate: mapped, never copied
    assert terms["write"]["largest tensor, mapped"] == embed * 2
    from edgemed.converters.quality.layered import estimate_peak_bytes

    ref = terms["parity:reference"]["HF reference, one layer at a time (layered.estimate_peak_bytes)"]
    assert ref == estimate_peak_bytes(QWEN2_7B, budget.PARITY_POSITIONS, longest=budget.PARITY_LONGEST, source_bytes=2)
    assert ref < 2 * GIB  # one layer (233 M parameters) in float32, not the model
    compare = terms["parity:compare"]["both logits in float32 (compare)"]
    assert compare == budget.PARITY_POSITIONS * 152064 * 4 * budget.COMPARE_COPIES
    assert terms["parity:compare"]["one prompt's logits in float64 (compare)"] < 512 * 2**20  # prompt by prompt
    # parity loads the GGUF without the CPU repack (extra_buffers "none"): no anonymous copy of the Q4_K blocks,
    # the weights stay mapped; the --quant auto search loads as the runtime does, repacked copy included
    held = terms["parity:artifact"]["llama.cpp: the converted model (KV cache, compute, logits)"]
    assert held < 512 * 2**20 and terms["parity:artifact"]["llama.cpp: the mapped GGUF"] == int(dims.params * 5.0 / 8)
    assert q4.resident == q4.base + max(s.resident for s in q4.steps)
    assert q4.resident < 6 * GIB  # a 7B fits a 24 GiB workstation with its parity check (mapped pages aside) ...
    fp32 = estimate_onnx(dims, out_type="fp32", parity=False)
    assert fp32.resident > 24 * GIB and dims.params * 4 > 28 * GIB  # ... its float32 ONNX export does not: 28 GiB of weights
    with pytest.raises(InputError) as exc:
        budget.require_fits(fp32, memory_room.Budget(24 * GIB, "a 24 GiB workstation"))
    said = str(exc.value)
    assert f"{fp32.resident / GIB:.1f} GiB" in said and "24.0 GiB budget (a 24 GiB workstation)" in said
    assert "export" in said and f"at least {-(-fp32.resident // GIB)} GiB" in said


def test_sizes_parse_in_both_units():
    assert parse_size("6GiB") == 6 * GIB and parse_size("6 gb") == 6 * 10**9 and parse_size("1024") == 1024
    assert parse_size("1.5G") == 1_500_000_000 and parse_size("512MiB") == 512 << 20
    for bad in ("", "-1GiB", "0", "6 parsecs", "GiB"):
        with pytest.raises(InputError):
            parse_size(bad)


def test_a_cgroup_limit_lowers_the_budget(monkeypatch):
    """The room left under the tightest cgroup limit (``devices.cgroup``, the one reader) caps what psutil offers."""
    from edgemed.devices.cgroup import Limit

    where = "/sys/fs/cgroup/job/memory.max"
    monkeypatch.setattr(memory_room, "least_room", lambda host: Limit(8 * GIB, 1 << 20, where))
    detected = memory_room.detect_budget()
    assert detected.source.startswith(f"room left under the cgroup limit {where}")
    import psutil

    assert 1 << 20 < detected.bytes <= (1 << 20) + psutil.Process().memory_info().rss + (256 << 20)


def test_the_plain_recipe_is_offered_when_the_default_imatrix_pass_does_not_fit(model, tmp_path):
    """A 4-bit conversion is calibrated by default; where that pass alone breaks the budget, --no-imatrix is named."""
    calibrated = budget.estimate_for_dir(model, "gguf", out_type="q4_k_m", imatrix=True).resident
    plain = budget.estimate_for_dir(model, "gguf", out_type="q4_k_m", imatrix=False).resident
    assert plain < calibrated
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = _convert(model, "-o", out_dir / "m.gguf", env={"EDGEMED_MEMORY_BUDGET": str((plain + calibrated) // 2)})
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert f"--no-imatrix (llama.cpp's plain recipe) (peak {plain / GIB:.1f} GiB)" in text
    _nothing_left(out_dir)


def test_the_adapter_gate_on_a_given_base_is_held_to_the_budget(model, tmp_path):
    """`--adapter-only --base B.gguf` is estimated too (the reference with the adapter merged, llama.cpp holding the
    base with the adapter applied), and refused before anything is written, as it is without --base."""
    lora = tiny.build_lora(model, tmp_path / "lora")
    base = tmp_path / "base-f16.gguf"
    assert _convert(model, "--quant", "f16", "--no-parity", "-o", base).exit_code == 0
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for with_base in ([], ["--base", base]):
        result = _convert(model, "--lora", lora, "--adapter-only", *with_base, "--memory-budget", "1MiB", "-o", out_dir / "a.gguf")
        text = " ".join(result.output.split())
        assert result.exit_code == 1 and "--memory-budget 1MiB" in text, result.output
        assert ("convert --adapter-only --base (F16)" if with_base else "convert --adapter-only` would need") in text
        assert "--quant q4_k_m" not in text  # no merged-model types offered for an adapter
        _nothing_left(out_dir)


def test_each_suggested_quant_type_is_priced_as_it_would_run(monkeypatch):
    """The refusal of a calibrated 4-bit conversion offers `--quant q8_0` at q8_0's own peak: the command computes no
    importance matrix for q8_0 (nor for a float type), so none is priced in."""
    from types import SimpleNamespace

    from edgemed.converters.gguf.calibration import default_imatrix
    from edgemed.converters.pipeline import ConvertOptions

    dims = Dims.from_config(QWEN2_7B)
    calibrated = estimate_gguf(dims, out_type="q4_k_m", imatrix=True).resident
    q8 = estimate_gguf(dims, out_type="q8_0").resident
    assert q8 < estimate_gguf(dims, out_type="q8_0", imatrix=True).resident and q8 < calibrated
    budget_bytes = (q8 + min(calibrated, estimate_gguf(dims, out_type="q8_0", imatrix=True).resident)) // 2
    checkpoint = SimpleNamespace(config=QWEN2_7B, tensors=None, source_dtype=lambda: "BF16", weight_files=lambda: ())
    opts = ConvertOptions(out_type="q4_k_m", imatrix_from=default_imatrix("q4_k_m"), memory_budget=str(budget_bytes))
    with pytest.raises(InputError) as refused:
        budget.check_gguf(SimpleNamespace(checkpoint=checkpoint, adapter=None), opts)
    assert f"--quant q8_0 (peak {q8 / GIB:.1f} GiB)" in refused.value.fix
    # the user's own text goes with every quantized type; a float type never calibrates
    own = ConvertOptions(out_type="q4_k_m", imatrix_from=Path("notes.txt"))
    assert budget._calibrates(own, "q8_0") and not budget._calibrates(own, "f16") and not budget._calibrates(opts, "q8_0")


def test_the_write_step_prices_the_f32_intermediate_an_f64_source_may_need():
    """A quantized conversion whose F16 intermediate a weight overflows writes it again as F32
    (pipeline._write_intermediate): from an F64 source that cast copy is 4 bytes a weight, from F32 none."""
    dims = Dims.from_config(QWEN2_7B)

    def cast(dtype):
        est = estimate_gguf(dims, out_type="q4_k_m", source_dtype=dtype)
        return {t.name: t.bytes for s in est.steps if s.name == "write" for t in s.terms}["largest tensor's cast copy"]

    assert cast("F64") == dims.largest * 4 and cast("F32") == dims.largest * 2 and cast("BF16") == 0
