"""HF -> GGUF conversion on tiny random models: parity, metadata, LoRA, tokenizer, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

from click.testing import CliRunner  # noqa: E402

from edgemed.cli import cli  # noqa: E402
from edgemed.converters.pipeline import ConvertOptions, convert  # noqa: E402
from edgemed.errors import (  # noqa: E402
    AdapterError, CheckpointError, OutputExists, TokenizerError, UnsupportedArchitecture,
)

import tiny  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": tiny.build_model(root / "llama", "llama"),
        "qwen2": tiny.build_model(root / "qwen2", "qwen2"),
        "lora": tiny.build_lora(root / "llama", root / "lora"),
        "rslora": tiny.build_lora(root / "llama", root / "rslora", seed=2, rslora=True, r=8, alpha=4),
    }


def _read(path: Path):
    import gguf

    return gguf.GGUFReader(str(path))


def _tensor(reader, name: str) -> np.ndarray:
    t = next(t for t in reader.tensors if t.name == name)
    return np.array(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])


# -- parity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,out_type", [("llama", "f32"), ("qwen2", "f32"), ("llama", "f16"), ("qwen2", "bf16")])
def test_float_conversion_matches_source(models, tmp_path, arch, out_type):
    out = tmp_path / f"{arch}-{out_type}.gguf"
    report = convert(models[arch], out, ConvertOptions(out_type=out_type), echo=lambda s: None)
    assert out.exists()
    parity = report.parity
    assert parity["passed"] is True
    assert parity["nmse"] < {"f32": 1e-6, "f16": 1e-4, "bf16": 1e-3}[out_type]
    assert parity["top1"] >= 0.99
    saved = json.loads((tmp_path / f"{arch}-{out_type}.gguf.report.json").read_text())
    assert saved["parity"]["nmse"] == parity["nmse"]
    assert saved["source"]["sha256"] and saved["tokenizer"]["verified_tokens"] > 50


def test_quantized_parity_is_gated_on_finite_logits_and_top1(models, tmp_path):
    out = tmp_path / "llama-q8.gguf"
    report = convert(models["llama"], out, ConvertOptions(out_type="q8_0"), echo=lambda s: None)
    assert report.parity["gate_nmse"] is None and report.parity["passed"] is True and report.parity["gate_top1"] == 0.4
    assert 0 < report.parity["nmse"] < 0.05  # Q8_0 is close, but not exact
    assert _read(out).get_field("general.file_type").contents() == 7


# -- metadata golden ------------------------------------------------------------------------
def _describe(path: Path) -> dict:
    reader = _read(path)
    skip = {"general.quantized_by", "edgemed.source.sha256", "edgemed.converter_version"}
    kv = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in skip or name in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                                                "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            continue
        value = field.contents()
        kv[name] = round(value, 6) if isinstance(value, float) else value
    tensors = {t.name: {"shape": [int(d) for d in t.shape], "type": t.tensor_type.name,
                        "sha256": hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest()} for t in reader.tensors}
    return {"kv": kv, "tensors": tensors}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_metadata_golden(models, tmp_path, arch):
    out = tmp_path / f"{arch}.gguf"
    convert(models[arch], out, ConvertOptions(out_type="f16", parity=False), echo=lambda s: None)
    got = _describe(out)
    golden = GOLDEN / f"tiny_{arch}_f16.json"
    if os.environ.get("EDGEMED_UPDATE_GOLDEN") == "1":  # regenerate deliberately, then review the diff
        golden.write_text(json.dumps(got, indent=1, sort_keys=True))
    assert got == json.loads(golden.read_text())


def test_llama_qk_are_permuted_and_qwen2_are_not(models, tmp_path):
    from safetensors.torch import load_file

    for arch in ("llama", "qwen2"):
        out = tmp_path / f"{arch}.gguf"
        convert(models[arch], out, ConvertOptions(out_type="f32", parity=False), echo=lambda s: None)
        hf = load_file(models[arch] / "model.safetensors")
        q_hf = hf["model.layers.0.self_attn.q_proj.weight"].numpy()
        q_gguf = _tensor(_read(out), "blk.0.attn_q.weight")
        assert q_gguf.shape == q_hf.shape
        assert np.array_equal(q_gguf, q_hf) == (arch == "qwen2")
        if arch == "qwen2":
            assert "blk.0.attn_q.bias" in {t.name for t in _read(out).tensors}
            assert "output.weight" not in {t.name for t in _read(out).tensors}  # tied embeddings


# -- LoRA -------------------------------------------------------------------------------------
def _peft_merged(base: Path, lora: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(lora)).merge_and_unload()
    return {k: v.detach().numpy() for k, v in merged.state_dict().items()}


def _without_alpha(lora: Path, out: Path) -> Path:
    """The adapter with ``lora_alpha`` left out of its config: PEFT then uses its default, 8 (not ``r``)."""
    shutil.copytree(lora, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config.pop("lora_alpha")
    assert config["r"] != 8  # so a default of r would show
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def _by_patterns(lora: Path, out: Path) -> Path:
    """The adapter with neither ``r`` nor ``lora_alpha`` (PEFT's defaults, 8 and 8) and per-module patterns instead:
    every projection's rank (4, its tensors'), and q_proj's alpha."""
    shutil.copytree(lora, out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config.pop("r") == 4 and config.pop("lora_alpha") != 16
    (out / "adapter_config.json").write_text(json.dumps(config | {"rank_pattern": {".*_proj": 4}, "alpha_pattern": {"q_proj": 16}}))
    return out


# what the report's lora section says the merge used: r, lora_alpha and the patterns (never null for a merge); a
# pattern covering every module gives its value (not PEFT's default r, 8, which no pair used), a partial one the list
USED = {"lora": {"r": 4, "lora_alpha": 8}, "rslora": {"r": 8, "lora_alpha": 4}, "no-alpha": {"r": 4, "lora_alpha": 8},
        "patterns": {"r": 4, "lora_alpha": [8, 16], "rank_pattern": {".*_proj": 4}, "alpha_pattern": {"q_proj": 16}}}


@pytest.mark.parametrize("adapter", ["lora", "rslora", "no-alpha", "patterns"])
def test_lora_merge_equals_peft_merge_and_unload(models, tmp_path, adapter):
    from edgemed.converters.arch.llama import _k, _q
    from edgemed.converters.source.checkpoint import Checkpoint

    made = {"no-alpha": _without_alpha, "patterns": _by_patterns}
    lora = made[adapter](models["lora"], tmp_path / adapter) if adapter in made else models[adapter]
    out = tmp_path / "merged.gguf"
    report = convert(models["llama"], out, ConvertOptions(out_type="f32", lora=lora), echo=lambda s: None)
    assert report.lora["merged_tensors"] == 2 * 7
    assert {k: report.lora.get(k) for k in USED[adapter]} == USED[adapter]
    assert ("rank_pattern" in report.lora) == (adapter == "patterns")
    assert report.parity["passed"] is True  # GGUF vs PEFT's own (unmerged) forward pass
    reader = _read(out)
    expected = _peft_merged(models["llama"], lora)
    ckpt = Checkpoint.open(models["llama"])
    pairs = {"self_attn.q_proj": ("attn_q", lambda w: _q(w, ckpt)), "self_attn.k_proj": ("attn_k", lambda w: _k(w, ckpt)),
             "self_attn.v_proj": ("attn_v", None), "self_attn.o_proj": ("attn_output", None),
             "mlp.gate_proj": ("ffn_gate", None), "mlp.up_proj": ("ffn_up", None), "mlp.down_proj": ("ffn_down", None)}
    for layer in range(2):
        for hf, (gg, layout) in pairs.items():
            want = expected[f"model.layers.{layer}.{hf}.weight"]
            want = layout(want) if layout else want
            np.testing.assert_allclose(_tensor(reader, f"blk.{layer}.{gg}.weight"), want, rtol=1e-5, atol=1e-6)


def test_a_quantized_conversion_gates_its_float_intermediate(models, tmp_path, monkeypatch):
    """A wrong rope base costs a 4-bit file little top-1 agreement (0.74 on the tiny Qwen2 with 1e4 for 1e6), so the
    quantized gate alone passed it; the F16 the quantizer reads is now held to the float NMSE gate first."""
    from edgemed.converters.arch import base
    from edgemed.errors import ParityError

    out = tmp_path / "q8.gguf"
    report = convert(models["llama"], out, ConvertOptions(out_type="q8_0"), echo=lambda s: None)
    inter = report.parity["intermediate"]
    assert inter["passed"] is True and inter["nmse"] < inter["gate_nmse"] and inter["out_type"] in ("f16", "bf16")
    real = base.rope_config
    monkeypatch.setattr(base, "rope_config", lambda ckpt: (real(ckpt)[0] / 100, real(ckpt)[1]))  # a writer's slip
    with pytest.raises(ParityError, match="intermediate the quantizer read"):
        convert(models["llama"], tmp_path / "bad.gguf", ConvertOptions(out_type="q8_0"), echo=lambda s: None)
    assert not (tmp_path / "bad.gguf").exists()
    monkeypatch.setenv("EDGEMED_MEMORY_BUDGET", "1k")  # no room for the intermediate: left out, and said so
    monkeypatch.setattr(base, "rope_config", real)
    said = []
    from edgemed.converters.budget import peaks

    monkeypatch.setattr(peaks, "check_gguf", lambda source, opts: None)  # the conversion itself is let through
    report = convert(models["llama"], tmp_path / "small.gguf", ConvertOptions(out_type="q8_0"), echo=said.append)
    assert "larger than the memory budget" in report.parity["intermediate"]["skipped"]
    assert any("intermediate left out" in line for line in said)


def test_the_report_names_the_tokenizer_files_the_gguf_embeds(models, tmp_path):
    """The source sha256 covers the config and the weights; the chat template and vocabulary the GGUF embeds come
    from the tokenizer files, which had no digest: two GGUFs with different chat templates named one source."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(models["llama"], ckpt)
    a = convert(ckpt, tmp_path / "a.gguf", ConvertOptions(out_type="f16", parity=False), echo=lambda s: None)
    (ckpt / "chat_template.jinja").write_text("{% for m in messages %}EVIL {{ m.content }}{% endfor %}")
    b = convert(ckpt, tmp_path / "b.gguf", ConvertOptions(out_type="f16", parity=False), echo=lambda s: None)
    assert a.source["sha256"] == b.source["sha256"]  # the same weights: an adapter for one is for the other
    assert a.source["tokenizer_sha256"] and a.source["tokenizer_sha256"] != b.source["tokenizer_sha256"]


def test_merged_model_logits_differ_from_base(models, tmp_path):
    from edgemed.converters.quality.parity import PROMPTS, gguf_logits, metrics, source_logits

    base, merged = tmp_path / "base.gguf", tmp_path / "merged.gguf"
    convert(models["llama"], base, ConvertOptions(out_type="f32", parity=False), echo=lambda s: None)
    convert(models["llama"], merged, ConvertOptions(out_type="f32", parity=False, lora=models["lora"]), echo=lambda s: None)
    ids, _ = source_logits(models["llama"], PROMPTS[:2])
    a, b = gguf_logits(base, ids), gguf_logits(merged, ids)
    assert metrics(np.concatenate(a), np.concatenate(b))["nmse"] > 1e-3


def test_a_lora_conversion_opens_the_adapter_once(models, tmp_path, monkeypatch):
    """A 4-bit LoRA conversion reads the adapter for the writer, the importance matrix, the layered reference and
    parity: all from the one ``Source`` the conversion opened, none by opening the adapter again."""
    from edgemed.converters.gguf.calibration import default_imatrix
    from edgemed.converters.source.lora import LoraAdapter

    opened = []
    real = LoraAdapter.open.__func__

    def counted(cls, path, base):
        opened.append(Path(path))
        return real(cls, path, base)

    monkeypatch.setattr(LoraAdapter, "open", classmethod(counted))
    report = convert(models["llama"], tmp_path / "x.gguf", ConvertOptions(out_type="q4_k_m", lora=models["lora"],
                     imatrix_from=default_imatrix("q4_k_m")), echo=lambda s: None)
    assert report.parity["passed"] is True and report.imatrix is not None and report.lora["merged_tensors"] == 2 * 7
    assert opened == [models["lora"]]


def test_adapter_for_another_base_is_refused(models, tmp_path):
    other = tiny.build_model(tmp_path / "narrow", "llama", hidden_size=32)
    with pytest.raises(AdapterError, match="do not fit"):
        convert(other, tmp_path / "x.gguf", ConvertOptions(out_type="f32", lora=models["lora"]), echo=lambda s: None)
    assert not (tmp_path / "x.gguf").exists()


def test_dora_adapter_is_refused(models, tmp_path):
    bad = tmp_path / "dora"
    shutil.copytree(models["lora"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(cfg | {"use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        convert(models["llama"], tmp_path / "x.gguf", ConvertOptions(out_type="f32", lora=bad), echo=lambda s: None)


@pytest.mark.parametrize("adapter_only", [False, True], ids=["merge", "adapter-only"])
@pytest.mark.parametrize("dropped", ["lora_A", "lora_B"])
def test_a_lora_half_without_its_partner_is_refused(models, tmp_path, dropped, adapter_only):
    """A lone lora_B was skipped, so the adapter merged into another model and the parity reference agreed."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "half"
    shutil.copytree(models["lora"], bad)
    path = bad / "adapter_model.safetensors"
    gone = f"base_model.model.model.layers.1.mlp.down_proj.{dropped}.weight"
    kept = gone.replace(dropped, "lora_B" if dropped == "lora_A" else "lora_A")
    save_file({k: v for k, v in load_file(path).items() if k != gone}, path, metadata={"format": "pt"})
    opts = ConvertOptions(out_type="f32", lora=bad, adapter_only=adapter_only)
    with pytest.raises(AdapterError, match=f"has '{kept}' but not its partner '{gone}'") as exc:
        convert(models["llama"], tmp_path / "x.gguf", opts, echo=lambda s: None)
    assert "PEFT" in exc.value.fix and not (tmp_path / "x.gguf").exists()


# -- tokenizer ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,pre", [("llama", "gpt-2"), ("qwen2", "qwen2")])
def test_tokenizer_detection_and_llama_cpp_ids_equal_hf(models, tmp_path, arch, pre):
    from edgemed.converters.gguf.tokenizer import MEDICAL_SAMPLES, verify_tokenization

    out = tmp_path / "t.gguf"
    report = convert(models[arch], out, ConvertOptions(out_type="f16", parity=False), echo=lambda s: None)
    assert report.tokenizer["pre"] == pre and report.tokenizer["model"] == "gpt2"
    assert verify_tokenization(models[arch], out, MEDICAL_SAMPLES) == report.tokenizer["verified_tokens"]


def test_wrong_pre_tokenizer_override_is_caught(models, tmp_path):
    # GPT-2's regex keeps " 150" whole; qwen2's splits every digit: llama.cpp would tokenize differently
    with pytest.raises(TokenizerError, match="tokenizes differently"):
        convert(models["llama"], tmp_path / "x.gguf", ConvertOptions(out_type="f16", parity=False, pre_tokenizer="qwen2"),
                echo=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_unknown_pre_tokenizer_is_refused(models, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(models["qwen2"], odd)
    tj = json.loads((odd / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+"
    (odd / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(TokenizerError, match="--pre-tokenizer"):
        convert(odd, tmp_path / "x.gguf", ConvertOptions(out_type="f16"), echo=lambda s: None)


# -- bad input ----------------------------------------------------------------------------------
def _copy(models, tmp_path, arch="llama") -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(models[arch], dst)
    return dst


def test_missing_config(models, tmp_path):
    ckpt = _copy(models, tmp_path)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        convert(ckpt, tmp_path / "x.gguf", ConvertOptions(), echo=print)


def test_corrupt_config(models, tmp_path):
    ckpt = _copy(models, tmp_path)
    (ckpt / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        convert(ckpt, tmp_path / "x.gguf", ConvertOptions(), echo=print)


def test_truncated_shard(models, tmp_path):
    ckpt = _copy(models, tmp_path)
    shard = ckpt / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        convert(ckpt, tmp_path / "x.gguf", ConvertOptions(), echo=print)


def test_missing_shard_named_in_index(models, tmp_path):
    ckpt = _copy(models, tmp_path)
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")  # sharded: the index is read
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002"):
        convert(ckpt, tmp_path / "x.gguf", ConvertOptions(), echo=print)


def test_unsupported_architecture_lists_supported(models, tmp_path):
    ckpt = _copy(models, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(cfg | {"architectures": ["MambaForCausalLM"]}))
    with pytest.raises(UnsupportedArchitecture, match="LlamaForCausalLM, Qwen2ForCausalLM"):
        convert(ckpt, tmp_path / "x.gguf", ConvertOptions(), echo=print)


def test_pickle_only_checkpoint_needs_opt_in(models, tmp_path):
    import torch
    from safetensors.torch import load_file

    ckpt = _copy(models, tmp_path)
    torch.save(load_file(ckpt / "model.safetensors"), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        convert(ckpt, tmp_path / "x.gguf", ConvertOptions(out_type="f32"), echo=print)
    report = convert(ckpt, tmp_path / "x.gguf", ConvertOptions(out_type="f32", allow_pickle=True), echo=lambda s: None)
    assert report.parity["passed"] is True


def test_existing_output_needs_force(models, tmp_path):
    out = tmp_path / "x.gguf"
    out.write_text("precious")
    with pytest.raises(OutputExists, match="--force"):
        convert(models["llama"], out, ConvertOptions(out_type="f16", parity=False), echo=print)
    assert out.read_text() == "precious"
    convert(models["llama"], out, ConvertOptions(out_type="f16", parity=False, force=True), echo=print)
    assert out.read_bytes()[:4] == b"GGUF"


def test_failure_midway_leaves_nothing(models, tmp_path, monkeypatch):
    import edgemed.converters.gguf.writer as gguf_out

    calls = {"n": 0}
    real = gguf_out._cast

    def exploding_cast(array, ggml_type):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-write
        return real(array, ggml_type)

    monkeypatch.setattr(gguf_out, "_cast", exploding_cast)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(KeyboardInterrupt):
        convert(models["llama"], out_dir / "x.gguf", ConvertOptions(out_type="q8_0"), echo=print)
    assert list(out_dir.iterdir()) == []


# -- CLI --------------------------------------------------------------------------------------------
def test_cli_convert_and_run(models, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.gguf"
    result = runner.invoke(cli, ["convert", str(models["qwen2"]), "--quant", "f16", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["parity"]["passed"] is True
    again = runner.invoke(cli, ["convert", str(models["qwen2"]), "--quant", "f16", "-o", str(out)])
    assert again.exit_code == 1 and "--force" in again.output and "Traceback" not in again.output
    ran = runner.invoke(cli, ["run", str(out), "--prompt", "fever and cough", "--max-tokens", "8"])
    assert ran.exit_code == 0, ran.output
    overflow = runner.invoke(cli, ["run", str(out), "--prompt", "fever", "--ctx", "256", "--max-tokens", "300"])
    assert overflow.exit_code == 1 and "context window of 256" in overflow.output and "Traceback" not in overflow.output
    check = runner.invoke(cli, ["check", str(models["qwen2"]), str(out)])
    assert check.exit_code == 0 and "PASS" in check.output


# -- importance matrix --------------------------------------------------------------------------
def test_imatrix_calibration_lowers_weighted_error(models, tmp_path):
    """Q4_0 with an importance matrix from medical text has less activation-weighted error than without."""
    import gguf

    from edgemed.converters import arch_spec
    from edgemed.converters.source.checkpoint import Checkpoint
    from edgemed.converters.gguf.imatrix import compute_imatrix

    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"question": q, "options": {"A": "yes", "B": "no"}}) for q in tiny.CORPUS[:6]))
    plain, calibrated, ref = tmp_path / "plain.gguf", tmp_path / "imat.gguf", tmp_path / "f32.gguf"
    convert(models["llama"], ref, ConvertOptions(out_type="f32", parity=False), echo=lambda s: None)
    convert(models["llama"], plain, ConvertOptions(out_type="q4_0", parity=False), echo=lambda s: None)
    made = convert(models["llama"], calibrated, ConvertOptions(out_type="q4_0", parity=False, imatrix_from=calib),
                   echo=lambda s: None)
    # the report names the calibration text by its bytes; a conversion without one has no imatrix section
    from edgemed.files.hashing import file_sha256

    written = json.loads(Path(f"{calibrated}.report.json").read_text())
    assert written["imatrix"] == made.imatrix and made.imatrix["sha256"] == file_sha256(calib)
    assert made.imatrix["text"] == "calib.jsonl" and made.imatrix["tokens"] > 0 and made.imatrix["chunks"] >= 1
    assert "imatrix" not in json.loads(Path(f"{plain}.report.json").read_text())
    ckpt = Checkpoint.open(models["llama"])
    imatrix = compute_imatrix(ckpt, arch_spec(ckpt.architecture), calib, echo=lambda s: None).values
    assert set(imatrix) >= {"blk.0.ffn_down.weight", "blk.1.attn_q.weight", "output.weight"}

    def dequant(path, name):
        t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
        return gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1, int(t.shape[0]))

    wins = 0
    names = [n for n in imatrix if n.startswith("blk.")]
    for name in names:
        w = dequant(ref, name)
        err = {p: float((((dequant(p, name) - w) ** 2) * imatrix[name]).sum()) for p in (plain, calibrated)}
        wins += err[calibrated] < err[plain]
    assert wins >= 0.8 * len(names)


def test_bad_calibration_file_is_refused(models, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("{not json\n")
    with pytest.raises(Exception, match="not valid JSON"):
        convert(models["llama"], tmp_path / "x.gguf", ConvertOptions(out_type="q4_0", imatrix_from=calib), echo=lambda s: None)
    assert not (tmp_path / "x.gguf").exists()


def test_check_refuses_a_gguf_whose_tokenizer_is_not_the_sources(models, tmp_path):
    """`check` fed the source's token ids to the GGUF and compared logits: a GGUF whose own tokenizer splits text
    otherwise passed (NMSE 1e-6), though it answers garbage to text a user types."""
    gguf = tmp_path / "llama-f16.gguf"
    convert(models["llama"], gguf, ConvertOptions(out_type="f16", parity=False), echo=lambda s: None)
    other = tmp_path / "llama-other-tokenizer"
    shutil.copytree(models["llama"], other)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the same weights, another BPE
        shutil.copy(models["qwen2"] / name, other / name)
    runner = CliRunner()
    ok = runner.invoke(cli, ["check", str(models["llama"]), str(gguf)])
    assert ok.exit_code == 0 and "PASS" in ok.output and "WARNING" not in ok.output, ok.output
    bad = runner.invoke(cli, ["check", str(other), str(gguf)])
    assert bad.exit_code == 1 and "Traceback" not in bad.output and "PASS" not in bad.output, bad.output
    assert "token" in bad.output.lower()


def test_check_refuses_a_model_with_another_vocabulary_than_its_source(models, tmp_path):
    """`check SOURCE MODEL` where MODEL's embedding was resized (the same tokenizer, 16 more rows): its logits cannot
    be compared with the source's, and the shape mismatch ended in a ValueError traceback."""
    import torch
    from safetensors.torch import load_file, save_file

    wider = tmp_path / "llama-400"
    shutil.copytree(models["llama"], wider)
    weights = load_file(wider / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name] = torch.cat([weights[name], torch.randn(16, weights[name].shape[1]) * 0.08])
    save_file(weights, wider / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps(config | {"vocab_size": 400}))
    gguf = tmp_path / "v400.gguf"
    convert(wider, gguf, ConvertOptions(out_type="f32", parity=False), echo=lambda s: None)
    result = CliRunner().invoke(cli, ["check", str(models["llama"]), str(gguf)])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "has a vocabulary of 400 tokens" in said and "one of 384: it is not a conversion" in said, said
    assert "Fix: pass the checkpoint it was converted from" in said and "Traceback" not in said


def test_check_json_of_a_failing_model_is_one_document(models, tmp_path):
    """`check --json` printed its report, then the failure added a second JSON document: stdout no longer parsed."""
    gguf = tmp_path / "llama-f16.gguf"
    convert(models["llama"], gguf, ConvertOptions(out_type="f16", parity=False), echo=lambda s: None)
    from edgemed.formats.gguf_header import read_header

    header = read_header(gguf)
    t = max(header.tensors, key=lambda t: t.n_bytes)  # damage its largest tensor's values, not the header
    data = bytearray(gguf.read_bytes())
    start = header.data_start + t.offset
    data[start:start + t.n_bytes] = bytes(reversed(data[start:start + t.n_bytes]))
    gguf.write_bytes(bytes(data))
    r = CliRunner().invoke(cli, ["check", str(models["llama"]), str(gguf), "--json"])
    assert r.exit_code == 1, r.output
    doc = json.loads(r.stdout)  # one document: the report, with the verdict in it
    assert doc["passed"] is False, doc
