"""ONNX route, converter side: export with KV cache, int4, LoRA merge, parity, refusals, atomic output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_ir")
torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from onnx_tiny import add_lora, build  # noqa: E402

from edgemed.converters.onnx.export import OnnxOptions, convert_onnx  # noqa: E402
from edgemed.errors import ParityError, UnsupportedArchitecture  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("tiny") / "tiny-qwen2")


@pytest.fixture(scope="session")
def tiny_lora(tiny, tmp_path_factory) -> Path:
    return add_lora(tiny, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="session")
def exported(tiny, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for wt in ("fp32", "int4"):
        out[wt] = root / f"tiny-{wt}"
        convert_onnx(tiny, out[wt], OnnxOptions(weight_type=wt), echo=lambda s: None)
    return out


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _onnx_logits(path: Path, ids):
    from edgemed.converters.onnx.parity import onnx_logits

    return onnx_logits(path / "model.onnx", [ids])[0]


def _nmse(a, b) -> float:
    return float(((a - b) ** 2).sum() / (a ** 2).sum())


def test_export_writes_a_complete_directory(exported):
    d = exported["fp32"]
    names = {p.name for p in d.iterdir()}
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json", "genai_config.json", "report.json"} <= names
    cfg = json.loads((d / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert dec["num_hidden_layers"] == 2 and dec["num_key_value_heads"] == 2 and dec["head_size"] == 16
    assert cfg["search"]["max_length"] <= 4096 and cfg["search"]["past_present_share_buffer"] is False
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in d.iterdir())
    report = json.loads((d / "report.json").read_text())
    assert report["parity"]["fp32"]["passed"] is True
    assert report["parity"]["fp32"]["nmse"] < 1e-4


def test_graph_has_past_and_present_key_values(exported):
    import onnx

    graph = onnx.load(str(exported["fp32"] / "model.onnx"), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.1.value" in inputs and "present.1.value" in outputs and outputs[0] == "logits"


def test_kv_cache_decoding_equals_full_recompute(exported, tiny):
    from transformers import AutoModelForCausalLM

    from edgemed.runtime.engine import LoadSettings
    from edgemed.runtime.onnx_engine import OnnxEngine

    ids = [5, 77, 120, 9, 250, 31, 64, 200, 18, 42, 101]
    full = _onnx_logits(exported["fp32"], ids)
    hf = _hf_logits(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), ids)
    np.testing.assert_allclose(full, hf, atol=1e-4)
    engine = OnnxEngine(exported["fp32"], LoadSettings(n_ctx=64))
    steps = engine.decode_steps(ids[:4])  # prefill 4 tokens, then one token per step
    incremental = [next(steps)] + [steps.send(t) for t in ids[4:]]
    np.testing.assert_allclose(np.stack(incremental), full[3:], atol=1e-4)
    engine.close()


def test_int4_uses_matmulnbits_and_reports_parity(exported):
    import onnx

    graph = onnx.load(str(exported["int4"] / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head
    attrs = {n.name: {a.name: a.i for a in n.attribute} for n in nbits}
    head = attrs.pop("/model/lm_head/MatMul_Q8")
    assert head["bits"] == 8  # the LM head keeps 8 bits, as Q4_K_M keeps Q6_K
    assert all(a["bits"] == 4 and a["block_size"] == 32 and a["accuracy_level"] == 4 for a in attrs.values())
    report = json.loads((exported["int4"] / "report.json").read_text())
    int4 = report["parity"]["int4"]
    assert int4["gate_nmse"] is None and 0 < int4["nmse"] < 0.5 and int4["top1"] > 0.5
    assert report["quantization"]["block_size"] == 32
    data = (exported["int4"] / "model.onnx.data").stat().st_size
    assert data < 0.6 * (exported["fp32"] / "model.onnx.data").stat().st_size


def test_lora_is_merged_before_export(tiny, tiny_lora, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    report = convert_onnx(tiny, out, OnnxOptions(weight_type="fp32", lora=tiny_lora), echo=lambda s: None)
    assert report.lora["merged_tensors"] == 6 and report.parity["fp32"]["passed"]
    assert report.lora["use_rslora"] is False and len(report.lora["sha256"]) == 64  # the same lora section as the GGUF route
    ids = [3, 140, 22, 99, 7, 180, 64]
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    base_logits = _hf_logits(base, ids)
    merged = PeftModel.from_pretrained(base, str(tiny_lora)).merge_and_unload()
    got = _onnx_logits(out, ids)
    assert _nmse(_hf_logits(merged, ids), got) < 1e-8
    assert _nmse(base_logits, got) > 1e-4


def test_named_chat_templates_travel_with_the_export(tiny, tmp_path):
    """transformers 5 keeps named chat templates (tool_use, ...) in additional_chat_templates/: the export dropped
    them, so a tokenizer loaded from it had the default template only. The folder ships 0755 and its files 0644:
    it was made 0644 with the files (no search bit), so its owner, unless root, could not read or delete it."""
    import shutil

    from transformers import AutoTokenizer

    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    (src / "additional_chat_templates").mkdir()
    named = src / "additional_chat_templates" / "tool_use.jinja"
    named.write_text("{% for m in messages %}TOOL {{ m.content }}{% endfor %}")
    named.chmod(0o600)  # a private source file: the copy keeps its mode until the export sets it
    out = tmp_path / "out"
    convert_onnx(src, out, OnnxOptions(weight_type="fp32", parity=False), echo=lambda s: None)
    assert (out / "additional_chat_templates").stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.rglob("*") if p.is_file())
    assert (out / "additional_chat_templates" / "tool_use.jinja").read_text().startswith("{% for m in messages %}TOOL")
    want, got = AutoTokenizer.from_pretrained(src).chat_template, AutoTokenizer.from_pretrained(out).chat_template
    assert isinstance(got, dict) and got == want


def test_unsupported_architecture_is_named(tiny, tmp_path):
    src = tmp_path / "mamba"
    shutil.copytree(tiny, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture) as exc:
        convert_onnx(src, tmp_path / "out", OnnxOptions(), echo=lambda s: None)
    assert "MambaForCausalLM" in str(exc.value) and "Qwen2ForCausalLM" in str(exc.value)
    assert not (tmp_path / "out").exists()


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_failure_in_quantization_leaves_nothing(tiny, tmp_path, monkeypatch):
    from edgemed.converters.onnx import quant as onnx_quant

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnx_quant, "quantize_int4", boom)
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    with pytest.raises(RuntimeError, match="disk full"):
        convert_onnx(tiny, out_parent / "tiny-int4", OnnxOptions(weight_type="int4", parity=False), echo=lambda s: None)
    assert list(out_parent.iterdir()) == []


def test_parity_failure_refuses_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    from edgemed.converters.onnx import parity as onnx_parity
    from edgemed.converters.quality.parity import ParityReport

    def bad(*a, **k):
        return ParityReport("onnx", "f32", 1, 1, 0.5, 1.0, 0.0, 9.0, 1e-4, False)

    monkeypatch.setattr(onnx_parity, "check_onnx", bad)
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    with pytest.raises(ParityError, match="does not match its source"):
        convert_onnx(tiny, out_parent / "x", OnnxOptions(weight_type="fp32"), echo=lambda s: None)
    assert list(out_parent.iterdir()) == []


def test_cli_convert_to_onnx(tiny, tmp_path):
    from click.testing import CliRunner

    from edgemed.cli import cli as main

    runner = CliRunner()
    out = tmp_path / "cli-onnx"
    result = runner.invoke(main, ["convert", str(tiny), "--to", "onnx", "--quant", "fp32", "--no-parity", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "model.onnx").exists() and "ONNX FP32" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["parity"] is None  # not checked (--no-parity), as a GGUF's report says it; it said {} here
    again = runner.invoke(main, ["convert", str(tiny), "--to", "onnx", "-o", str(out)])
    assert again.exit_code != 0 and "already exists" in again.output
    wrong = runner.invoke(main, ["convert", str(tiny), "--to", "onnx", "--quant", "q4_k_m", "-o", str(tmp_path / "w")])
    assert wrong.exit_code != 0 and "--quant int4" in wrong.output


def test_genai_builder_graph_with_lora_passes_the_same_gate(tiny, tiny_lora, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "builder-int4"
    report = convert_onnx(tiny, out, OnnxOptions(weight_type="int4", lora=tiny_lora, graph="genai"), echo=lambda s: None)
    assert report.parity["fp32"]["passed"] and report.converter["graph"] == "genai"
    assert json.loads((out / "genai_config.json").read_text())["search"]["max_length"] <= 4096
    ids = [3, 140, 22, 99, 7, 180, 64]
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    base_logits = _hf_logits(base, ids)
    ref = _hf_logits(PeftModel.from_pretrained(base, str(tiny_lora)).merge_and_unload(), ids)
    got = _onnx_logits(out, ids)
    assert _nmse(ref, got) < _nmse(base_logits, got)  # int4 of the merged weights, not of the base
    from edgemed.runtime.engine import GenerationSettings, open_engine

    engine = open_engine(out)
    assert len(list(engine.generate_tokens(ids, GenerationSettings(max_tokens=5)))) == 5
    steps = engine.decode_steps(ids[:3])  # the builder's graph, too, decodes with its KV cache as it recomputes
    incremental = np.stack([next(steps)] + [steps.send(t) for t in ids[3:]])
    assert _nmse(got[2:], incremental) < 1e-4
    engine.close()


def test_check_runs_the_gate_again_on_an_onnx_directory(tiny, exported, tmp_path):
    """`edgemed check SOURCE DIR` for a directory `convert --to onnx` wrote: the conversion's gate again (both weight
    types pass), the type read from the graph when report.json is gone, damaged weights fail it (exit 1), a directory
    whose tokenizer splits text otherwise is refused by name, and a folder that is no ONNX export is refused."""
    from click.testing import CliRunner

    from edgemed.cli import cli as main

    runner = CliRunner()
    for wt in ("fp32", "int4"):
        result = runner.invoke(main, ["check", str(tiny), str(exported[wt]), "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["passed"] is True and report["out_type"] == {"fp32": "f32", "int4": "int4"}[wt]
    bare = tmp_path / "bare"
    shutil.copytree(exported["int4"], bare)
    (bare / "report.json").unlink()  # another tool's export: the weight type comes from the graph (MatMulNBits)
    result = runner.invoke(main, ["check", str(tiny), str(bare), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["out_type"] == "int4", result.output

    damaged = tmp_path / "damaged"
    shutil.copytree(exported["fp32"], damaged)
    data = bytearray((damaged / "model.onnx.data").read_bytes())
    data[: len(data) // 3] = bytes(len(data) // 3)  # a third of the weights zeroed
    (damaged / "model.onnx.data").write_bytes(bytes(data))
    result = runner.invoke(main, ["check", str(tiny), str(damaged)])
    assert result.exit_code == 1 and "do not ship it" in result.output, result.output

    retok = tmp_path / "retokenized"
    shutil.copytree(exported["fp32"], retok)
    doc = json.loads((retok / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    import tokenizers

    from edgemed.converters.gguf.tokenizer import MEDICAL_SAMPLES

    used = tokenizers.Tokenizer.from_str(json.dumps(doc)).encode(MEDICAL_SAMPLES[0], add_special_tokens=False).tokens
    a, b = list(dict.fromkeys(used))[:2]  # two tokens of the first sentence it checks change their ids
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (retok / "tokenizer.json").write_text(json.dumps(doc))
    result = runner.invoke(main, ["check", str(tiny), str(retok)])
    assert result.exit_code != 0 and "tokenizes differently from the source's tokenizer" in result.output, result.output
    result = runner.invoke(main, ["check", str(tiny), str(tmp_path)])
    assert result.exit_code != 0 and "without genai_config.json" in result.output
    stale = tmp_path / "stale"
    shutil.copytree(exported["fp32"], stale)
    report = json.loads((stale / "report.json").read_text())
    (stale / "report.json").write_text(json.dumps(report | {"weight_type": "int4"}))  # would pick the looser gate
    result = runner.invoke(main, ["check", str(tiny), str(stale)])
    assert result.exit_code != 0 and "but the graph is fp32" in result.output, result.output
    (stale / "report.json").unlink()
    (stale / "model.onnx").write_bytes(b"\x00not a graph" * 8)
    result = runner.invoke(main, ["check", str(tiny), str(stale)])
    assert result.exit_code != 0 and "is not a readable ONNX graph" in result.output and "Traceback" not in result.output


def test_an_export_whose_tokenizer_splits_text_otherwise_is_refused_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    """The tokenizer.json an export ships, read as the ONNX engine reads it, must give the source tokenizer's ids:
    one that does not (here two tokens of the first checked sentence trade ids after the copy) is refused by name,
    and nothing is written."""
    from edgemed.converters.gguf.tokenizer import MEDICAL_SAMPLES
    from edgemed.converters.onnx import assets
    from edgemed.errors import TokenizerError

    real = assets.copy_assets

    def copy_then_change(src, dst):
        import tokenizers

        real(src, dst)
        doc = json.loads((dst / "tokenizer.json").read_text())
        used = tokenizers.Tokenizer.from_str(json.dumps(doc)).encode(MEDICAL_SAMPLES[0], add_special_tokens=False).tokens
        a, b = list(dict.fromkeys(used))[:2]
        vocab = doc["model"]["vocab"]
        vocab[a], vocab[b] = vocab[b], vocab[a]
        (dst / "tokenizer.json").write_text(json.dumps(doc))

    monkeypatch.setattr(assets, "copy_assets", copy_then_change)
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    with pytest.raises(TokenizerError, match="tokenizes differently from the source's tokenizer"):
        convert_onnx(tiny, out_parent / "x", OnnxOptions(weight_type="fp32", parity=False), echo=lambda s: None)
    assert list(out_parent.iterdir()) == []


@pytest.mark.parametrize("case", ["fifo", "negative-kv-heads", "no-past-inputs"])
def test_check_refuses_a_bad_genai_config_or_a_graph_without_a_kv_cache(tiny, exported, tmp_path, case):
    """`edgemed check SOURCE DIR` reads genai_config.json as the ONNX engine does: a named pipe there used to block it
    for ever, a negative KV head count and a graph without past_key_values inputs ended in a traceback."""
    import os
    import onnx
    from click.testing import CliRunner
    from fifo_kit import run_unblocked
    from onnx import TensorProto, helper

    from edgemed.cli import cli as main

    d = tmp_path / "onnx"
    shutil.copytree(exported["fp32"], d)
    config = d / "genai_config.json"
    if case == "fifo":
        config.unlink()
        os.mkfifo(config)
        says = "is a named pipe (FIFO), not a regular file"
    elif case == "negative-kv-heads":
        doc = json.loads(config.read_text())
        doc["model"]["decoder"]["num_key_value_heads"] = -1
        config.write_text(json.dumps(doc))
        says = "'model.decoder.num_key_value_heads' must be a positive integer"
    else:  # a graph from input_ids to logits alone
        ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "n"])
        logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)
        graph = helper.make_graph([helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)], "g",
                                  [ids], [logits])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(d / "model.onnx"))
        (d / "model.onnx.data").unlink()
        says = "has no past_key_values inputs"
    result = run_unblocked(lambda: CliRunner().invoke(main, ["check", str(tiny), str(d)]), config, 120,
                           "check blocked on genai_config.json instead of refusing it")
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert says in said and "Fix:" in said and "Traceback" not in said, result.output


@pytest.mark.parametrize("graph", ["torch", "genai"])
def test_a_context_the_onnx_engine_cannot_take_is_refused_before_the_export(tiny, tmp_path, monkeypatch, graph):
    """max_position_embeddings above what edgemed's ONNX engine reads as a context length (2**24): the export ran,
    the directory was renamed into place with exit 0, and `edgemed pack` and `edgemed run` then refused it. It is
    refused before any export work, naming the field and the bound, and nothing is written."""
    if graph == "genai":
        pytest.importorskip("onnxruntime_genai")
    import importlib

    from click.testing import CliRunner

    from edgemed.cli import cli as main
    from edgemed.converters.onnx.graphs import GRAPHS

    src = tmp_path / "long"
    shutil.copytree(tiny, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | {"max_position_embeddings": 2**25}))

    def no_export(*a, **k):
        raise AssertionError("the export started")

    module, function = GRAPHS[graph].fp32.split(":")  # the kind's first step, looked up when it runs
    monkeypatch.setattr(importlib.import_module(module), function, no_export)
    outs = tmp_path / "outs"
    outs.mkdir()
    result = CliRunner().invoke(main, ["convert", str(src), "--to", "onnx", "--onnx-graph", graph, "--quant", "fp32",
                                       "--no-parity", "-o", str(outs / "onnx")])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "max_position_embeddings 33,554,432" in said and "16,777,216" in said and "Fix:" in said, result.output
    assert list(outs.iterdir()) == []


@pytest.mark.parametrize("graph", ["torch", "genai"])
def test_a_genai_config_the_engine_would_refuse_fails_the_conversion_and_leaves_nothing(tiny, tmp_path, monkeypatch,
                                                                                         graph):
    """Whichever kind wrote genai_config.json (edgemed's writer, or onnxruntime-genai's builder), it is read as the
    ONNX engine reads it before the rename: a writer that puts there what the reader refuses (here a context length
    over its bound) fails the conversion, not the first run on a device."""
    from edgemed.converters.onnx import assets
    from edgemed.errors import CheckpointError

    def too_long(config_file: Path) -> None:
        doc = json.loads(config_file.read_text())
        doc["model"]["context_length"] = 2**25
        config_file.write_text(json.dumps(doc))

    if graph == "genai":
        pytest.importorskip("onnxruntime_genai")
        from edgemed.converters.onnx import builder

        real_cap = builder.cap_max_length
        monkeypatch.setattr(builder, "cap_max_length", lambda f, n: (real_cap(f, n), too_long(f)))
    else:
        real_write = assets.write_genai_config
        monkeypatch.setattr(assets, "write_genai_config",
                            lambda ckpt, config, out, name: (real_write(ckpt, config, out, name), too_long(out / "genai_config.json")))
    outs = tmp_path / "outs"
    outs.mkdir()
    with pytest.raises(CheckpointError) as e:
        convert_onnx(tiny, outs / "x", OnnxOptions(weight_type="fp32", parity=False, graph=graph), echo=lambda s: None)
    assert "would be refused by edgemed's ONNX engine" in e.value.problem
    assert f"{outs / 'x' / 'genai_config.json'}: 'model.context_length' must be a positive integer" in e.value.problem
    assert list(outs.iterdir()) == []


def test_a_null_context_length_is_refused_by_name_before_the_export(tiny, tmp_path):
    """config.json's max_position_embeddings null: transformers refuses such a config (the field must be an int), and
    the export ended in a TypeError traceback. It is refused by name before any work, and nothing is written."""
    from transformers import AutoConfig

    from edgemed.errors import CheckpointError

    src = tmp_path / "null-context"
    shutil.copytree(tiny, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | {"max_position_embeddings": None}))
    with pytest.raises(Exception, match="max_position_embeddings"):  # what Hugging Face loading does with it
        AutoConfig.from_pretrained(src)
    outs = tmp_path / "outs"
    outs.mkdir()
    with pytest.raises(CheckpointError) as e:
        convert_onnx(src, outs / "x", OnnxOptions(weight_type="fp32", parity=False), echo=lambda s: None)
    assert "'max_position_embeddings' must be a positive integer" in e.value.problem and "not null" in e.value.problem
    assert "max_position_embeddings" in e.value.fix
    assert list(outs.iterdir()) == []


def test_check_gates_the_graph_genai_config_names_which_the_engine_runs(tiny, exported, tmp_path):
    """`edgemed check` gated model.onnx whatever genai_config.json named, and the ONNX engine runs the graph it names:
    an int4 folder whose config points at served.onnx (here damaged float32 weights) passed on its model.onnx. The
    check gates served.onnx and fails it; a folder without genai_config.json is refused as the engine refuses it."""
    import onnx
    from click.testing import CliRunner

    from edgemed.cli import cli as main

    d = tmp_path / "served"
    shutil.copytree(exported["int4"], d)
    (d / "report.json").unlink()  # another tool's folder: nothing but the graph says what it is
    graph = onnx.load(str(exported["fp32"] / "model.onnx"))
    onnx.save_model(graph, str(d / "served.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="served.onnx.data")
    data = bytearray((d / "served.onnx.data").read_bytes())
    data[: len(data) // 3] = bytes(len(data) // 3)  # a third of the weights zeroed
    (d / "served.onnx.data").write_bytes(bytes(data))
    doc = json.loads((d / "genai_config.json").read_text())
    doc["model"]["decoder"]["filename"] = "served.onnx"
    (d / "genai_config.json").write_text(json.dumps(doc))
    runner = CliRunner()
    result = runner.invoke(main, ["check", str(tiny), str(d), "--json"])
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["out_type"] == "f32"  # served.onnx's gate (float), not model.onnx's (int4)
    assert "do not ship it" in result.output, result.output

    doc["model"]["decoder"]["filename"] = "gone.onnx"
    (d / "genai_config.json").write_text(json.dumps(doc))
    result = runner.invoke(main, ["check", str(tiny), str(d)])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "names the graph 'gone.onnx', which is not a file" in said, result.output
    (d / "genai_config.json").unlink()
    result = runner.invoke(main, ["check", str(tiny), str(d)])  # model.onnx is there, but the engine cannot run the folder
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "without genai_config.json" in said and "Traceback" not in said, result.output


def test_a_tied_head_converts_to_int4_with_the_genai_builder(tmp_path):
    """SmolLM2 ties its LM head to its embedding: onnxruntime-genai's builder then shared the quantized head with the
    embedding under a name it did not write ("Node input 'lm_head.MatMul.weight_Q8G32' is not a graph input"), and
    onnxruntime refused the int4 graph. The embedding stays its own float32 table, as the report says, and the graph
    passes the gate and runs."""
    pytest.importorskip("onnxruntime_genai")
    import onnx

    from edgemed.runtime.engine import GenerationSettings, open_engine

    src = build(tmp_path / "tied", tie=True)
    assert json.loads((src / "config.json").read_text())["tie_word_embeddings"] is True
    out = tmp_path / "tied-int4"
    report = convert_onnx(src, out, OnnxOptions(weight_type="int4", graph="genai"), echo=lambda s: None)
    assert report.parity["int4"]["passed"] and report.quantization["embeddings"] == "float32"
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "GatherBlockQuantized" not in ops, ops
    engine = open_engine(out)
    assert len(list(engine.generate_tokens([3, 140, 22], GenerationSettings(max_tokens=3)))) == 3
    engine.close()


def test_an_int4_builder_graph_onnxruntime_cannot_open_is_the_builders_failure(tiny, tmp_path, monkeypatch):
    """onnxruntime's refusal of the builder's int4 graph was cut at 200 characters (mid-name), named the temporary
    folder, and said "convert again, or re-copy the whole directory", which fails the same way. It is the builder's
    failure, onnxruntime's message kept whole without the temporary path, with the way round it."""
    pytest.importorskip("onnxruntime_genai")
    import onnx
    from onnx import helper

    from edgemed.converters.onnx import builder
    from edgemed.converters.onnx.export import trace_fp32
    from edgemed.errors import EdgemedError

    def unloadable(job, fp32_model, out_dir, recipe):  # what the builder wrote for a tied head
        node = helper.make_node("Identity", ["lm_head.MatMul.weight_Q8G32"], ["logits"])
        graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1])])
        onnx.save(helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)]),
                  str(out_dir / "model.onnx"))

    monkeypatch.setattr(builder, "fp32_step", trace_fp32)  # the fp32 gate is not what this is about
    monkeypatch.setattr(builder, "int4_step", unloadable)
    outs = tmp_path / "outs"
    outs.mkdir()
    with pytest.raises(EdgemedError) as e:
        convert_onnx(tiny, outs / "x", OnnxOptions(weight_type="int4", graph="genai"), echo=lambda s: None)
    said = e.value.problem
    assert "int4 graph that the onnxruntime-genai model builder" in said and str(tiny) in said, said
    assert "Node input 'lm_head.MatMul.weight_Q8G32' is not a graph input, initializer, or output" in said, said
    assert ".partial" not in said and str(outs) not in said, said
    assert "--onnx-graph torch" in e.value.fix and "re-copy" not in e.value.fix
    assert list(outs.iterdir()) == []
