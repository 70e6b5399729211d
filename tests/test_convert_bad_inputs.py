"""Converter side: every bad input or write fault is a one-paragraph error, exit 1.

Each case goes through ``edgemed convert`` with click's CliRunner and checks: exit code 1 from a
ClickException (no traceback), a "Fix:" line, the words that name the problem, and nothing left in
the output folder. Readers of untrusted bytes are also called directly on hostile inputs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

from click.testing import CliRunner  # noqa: E402

from edgemed.cli import cli  # noqa: E402
from edgemed.converters.source.safetensors_header import parse_safetensors_header  # noqa: E402
from edgemed.errors import CheckpointError, EdgemedError  # noqa: E402

import tiny  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return {"llama": tiny.build_model(root / "llama", "llama"), "lora": tiny.build_lora(root / "llama", root / "lora"),
            "qwen2": tiny.build_model(root / "qwen2", "qwen2")}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _convert(*args):
    return CliRunner().invoke(cli, ["convert", *map(str, args)])


def _convert_by(route: str, ckpt, out):
    """``convert`` of ``ckpt`` into the new, empty folder ``out`` by one route: GGUF F16 or ONNX fp32."""
    out.mkdir()
    if route == "onnx":
        pytest.importorskip("onnx")
        return _convert(ckpt, "--to", "onnx", "--quant", "fp32", "-o", out / "onnx")
    return _convert(ckpt, "--quant", "f16", "-o", out / "x.gguf")


def _refused(result, *words):
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # a ClickException, not a crash
    assert "Traceback" not in result.output and "Fix:" in result.output, result.output
    for w in words:
        assert w in result.output, result.output


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


# -- config.json ---------------------------------------------------------------------------------------
CONFIG_CASES = {
    "layers as string": (lambda c: c | {"num_hidden_layers": "28"}, "num_hidden_layers"),
    "zero hidden size": (lambda c: c | {"hidden_size": 0}, "hidden_size"),
    "negative vocab": (lambda c: c | {"vocab_size": -1}, "vocab_size"),
    "float heads": (lambda c: c | {"num_attention_heads": 4.0}, "num_attention_heads"),
    "bool eps": (lambda c: c | {"rms_norm_eps": True}, "rms_norm_eps"),
    "huge vocab": (lambda c: c | {"vocab_size": 10**12}, "vocab_size"),
    "architectures of objects": (lambda c: c | {"architectures": [{}]}, "architectures"),
    "rope scaling a string": (lambda c: c | {"rope_scaling": "yarn"}, "rope_scaling"),
    "rope factor a string": (lambda c: c | {"rope_scaling": {"rope_type": "linear", "factor": "x"}}, "rope_scaling.factor"),
    "yarn without a factor": (lambda c: c | {"rope_scaling": {"rope_type": "yarn"}}, "rope_scaling.factor"),
    "heads not a multiple of kv": (lambda c: c | {"num_attention_heads": 3}, "num_key_value_heads"),
    "vocab not the embedding's": (lambda c: c | {"vocab_size": 400}, "config.json implies"),
    "more layers than weights": (lambda c: c | {"num_hidden_layers": 3}, "num_hidden_layers is 3"),
    "a JSON list": (lambda c: [c], "JSON object"),
    "eos beyond the vocabulary": (lambda c: c | {"eos_token_id": c["vocab_size"]}, "'eos_token_id' must be a token id below"),
    "one of the eos ids negative": (lambda c: c | {"eos_token_id": [2, -1]}, "'eos_token_id' must be a token id"),
    "bos a string": (lambda c: c | {"bos_token_id": "<s>"}, "'bos_token_id' must be a token id below"),
    "bos a list": (lambda c: c | {"bos_token_id": [1]}, "'bos_token_id' must be a token id below"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_values(models, tmp_path, case):
    change, words = CONFIG_CASES[case]
    ckpt = _copy(models["llama"], tmp_path / "ckpt")
    _edit_json(ckpt / "config.json", change)
    out = tmp_path / "out"
    out.mkdir()
    _refused(_convert(ckpt, "--quant", "f16", "--no-parity", "-o", out / "x.gguf"), words)
    assert list(out.iterdir()) == []


# -- tensors against config.json: every one llama.cpp needs, each of the shape it checks -----------------------
def _edit_tensors(ckpt: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    save_file(change(load_file(ckpt / "model.safetensors")), ckpt / "model.safetensors", metadata={"format": "pt"})


def _without(name):
    return lambda t: {k: v for k, v in t.items() if k != name}


def _with(name, *shape):
    import torch

    return lambda t: t | {name: torch.zeros(*shape)}


TENSOR_CASES = {  # (arch, config change, tensor change, words): llama.cpp refused every one of these files at load
    "a block lacks a projection": ("llama", None, _without("model.layers.1.mlp.down_proj.weight"), "blk.1.ffn_down.weight"),
    "no final norm": ("llama", None, _without("model.norm.weight"), "output_norm.weight"),
    "intermediate_size not the MLP's": ("llama", {"intermediate_size": 96}, None, "config.json implies [64, 96]"),
    "o_proj narrower than the heads": ("llama", None, _with("model.layers.0.self_attn.o_proj.weight", 64, 32),
                                       "config.json implies [64, 64]"),
    "a norm with two dimensions": ("llama", None, _with("model.layers.0.input_layernorm.weight", 64, 2),
                                   "config.json implies [64]"),
    "a q bias of the wrong length": ("qwen2", None, _with("model.layers.0.self_attn.q_proj.bias", 32),
                                     "config.json implies [64]"),
    "an o_proj bias Qwen2 has no place for": ("qwen2", None, _with("model.layers.0.self_attn.o_proj.bias", 64),
                                              "not part of a Qwen2ForCausalLM"),
    "untied without an LM head": ("qwen2", {"tie_word_embeddings": False}, None, "no LM head"),
}


@pytest.mark.parametrize("route", ["gguf", "onnx"])
@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_tensors_llama_cpp_would_not_load_are_refused_before_work(models, tmp_path, case, route):
    """Refused at open even with --no-parity: these used to be written, and llama.cpp then refused the GGUF. The ONNX
    route had no tensor plan: transformers filled a missing projection with random values and the export exited 0
    (with --no-parity nothing noticed), and a shape config.json does not imply was a traceback."""
    if route == "onnx":
        pytest.importorskip("onnx")
    arch, config, change, words = TENSOR_CASES[case]
    ckpt = _copy(models[arch], tmp_path / "ckpt")
    if config:
        _edit_json(ckpt / "config.json", lambda c: c | config)
    if change:
        _edit_tensors(ckpt, change)
    out = tmp_path / "out"
    out.mkdir()
    output = ["--quant", "f16", "-o", out / "x.gguf"] if route == "gguf" else \
        ["--to", "onnx", "--quant", "fp32", "-o", out / "onnx"]
    _refused(_convert(ckpt, *output, "--no-parity"), words)
    assert list(out.iterdir()) == []


def test_the_onnx_route_without_gguf_still_refuses_a_missing_tensor(models, tmp_path, monkeypatch):
    """The plan reads gguf-py's tables and the ONNX route does not need gguf: without it, from_pretrained's own
    loading report refuses the missing tensor, and nothing is left."""
    import sys

    pytest.importorskip("onnx")
    monkeypatch.setitem(sys.modules, "edgemed.converters.gguf.writer", None)  # importing it fails, as without gguf
    ckpt = _copy(models["llama"], tmp_path / "ckpt")
    _edit_tensors(ckpt, _without("model.layers.1.mlp.down_proj.weight"))
    out = tmp_path / "out"
    out.mkdir()
    _refused(_convert(ckpt, "--to", "onnx", "--quant", "fp32", "--no-parity", "-o", out / "onnx"),
             "model.layers.1.mlp.down_proj.weight missing from the weights")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("case,words", [
    ("missing", "model.layers.1.mlp.down_proj.weight missing from the weights"),
    ("another shape", "model.layers.0.mlp.down_proj.weight, model.layers.0.mlp.gate_proj.weight"),
    ("unexpected", "model.layers.0.self_attn.o_proj.bias stored but not part of the model"),
])
def test_hugging_face_loading_that_does_not_take_every_weight_is_refused(models, tmp_path, case, words):
    """Checkpoint.hf_model (the ONNX export, the genai builder's merge, the torch baseline) used to return a model
    with random weights where a tensor was missing, drop an unexpected one, and raise a bare RuntimeError on a shape
    mismatch. Reached here past the up-front plan, as a library caller would."""
    from edgemed.converters.source.checkpoint import Checkpoint

    ckpt = _copy(models["qwen2" if case == "unexpected" else "llama"], tmp_path / "ckpt")
    if case == "missing":
        _edit_tensors(ckpt, _without("model.layers.1.mlp.down_proj.weight"))
    elif case == "another shape":
        _edit_json(ckpt / "config.json", lambda c: c | {"intermediate_size": 96})
    else:
        _edit_tensors(ckpt, _with("model.layers.0.self_attn.o_proj.bias", 64))
    with pytest.raises(CheckpointError, match="Hugging Face loading of") as info:
        Checkpoint.open(ckpt).hf_model()
    assert words in str(info.value) and info.value.fix


def test_optional_biases_are_kept(models, tmp_path):
    """Llama's attention_bias / mlp_bias tensors are part of its graph: converted, and the file loads."""
    from edgemed.formats.gguf_header import read_header

    ckpt = _copy(models["llama"], tmp_path / "ckpt")
    _edit_json(ckpt / "config.json", lambda c: c | {"attention_bias": True, "mlp_bias": True})
    _edit_tensors(ckpt, lambda t: t | {"model.layers.0.self_attn.q_proj.bias": t["model.layers.0.self_attn.q_proj.weight"][:, 0] * 0,
                                      "model.layers.0.mlp.up_proj.bias": t["model.layers.0.mlp.up_proj.weight"][:, 0] * 0})
    result = _convert(ckpt, "--quant", "f16", "--no-parity", "-o", tmp_path / "x.gguf")
    assert result.exit_code == 0, result.output
    names = {t.name for t in read_header(tmp_path / "x.gguf").tensors}
    assert {"blk.0.attn_q.bias", "blk.0.ffn_up.bias"} <= names


@pytest.mark.parametrize("route", ["gguf", "onnx"])
@pytest.mark.parametrize("flag,stored", [("attention_bias", "model.layers.0.self_attn.q_proj.bias"),
                                         ("mlp_bias", "model.layers.1.mlp.down_proj.bias")])
def test_biases_the_config_does_not_give_the_model_are_refused_before_work(models, tmp_path, route, flag, stored):
    """A Llama config without attention_bias (or mlp_bias) beside a stored bias: transformers ignores the tensor, the
    GGUF computed with it, and with --no-parity the file was written. Refused by name on both routes."""
    ckpt = _copy(models["llama"], tmp_path / "ckpt")
    _edit_json(ckpt / "config.json", lambda c: c | {flag: False})
    _edit_tensors(ckpt, lambda t: t | {stored: t[stored.replace(".bias", ".weight")][:, 0] + 0.5})
    out = tmp_path / "out"
    out.mkdir()
    if route == "onnx":
        pytest.importorskip("onnx")
        result = _convert(ckpt, "--to", "onnx", "--quant", "fp32", "--no-parity", "-o", out / "onnx")
    else:
        result = _convert(ckpt, "--quant", "f16", "--no-parity", "-o", out / "x.gguf")
    _refused(result, stored, f"'{flag}' is false", f'"{flag}": true')
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("route", ["gguf", "onnx", "check"])
def test_tied_embeddings_beside_a_different_stored_head_are_refused(models, tmp_path, route):
    """tie_word_embeddings true with an lm_head.weight that is not the embedding: transformers keeps that head
    untied and computes with it, while the GGUF and the parity reference used the embedding, so a conversion of
    another model passed its gate. Refused before any output, on both routes and by `check`."""
    from transformers import AutoModelForCausalLM

    ckpt = _copy(models["llama"], tmp_path / "ckpt")  # untied: its lm_head.weight is its own random matrix
    _edit_json(ckpt / "config.json", lambda c: c | {"tie_word_embeddings": True})
    hf = AutoModelForCausalLM.from_pretrained(ckpt)  # the premise: Hugging Face computes with the stored head
    assert not hf.lm_head.weight.equal(hf.model.embed_tokens.weight)
    out = tmp_path / "out"
    out.mkdir()
    if route == "check":
        gguf = tmp_path / "x.gguf"
        assert _convert(models["llama"], "--quant", "f16", "--no-parity", "-o", gguf).exit_code == 0
        result = CliRunner().invoke(cli, ["check", str(ckpt), str(gguf)])
    elif route == "onnx":
        pytest.importorskip("onnx")
        result = _convert(ckpt, "--to", "onnx", "--quant", "fp32", "-o", out / "onnx")
    else:
        result = _convert(ckpt, "--quant", "f16", "-o", out / "x.gguf")
    _refused(result, "lm_head.weight", "model.embed_tokens.weight", '"tie_word_embeddings": false', "remove lm_head.weight")
    assert list(out.iterdir()) == []


def test_tied_embeddings_beside_a_stored_head_equal_to_the_embedding_convert(models, tmp_path):
    """A stored head equal to the embedding (as torch's .bin files store a tied one) is the same model however it
    is read: converted, without output.weight, and it passes the gate."""
    from edgemed.formats.gguf_header import read_header

    ckpt = _copy(models["llama"], tmp_path / "ckpt")
    _edit_json(ckpt / "config.json", lambda c: c | {"tie_word_embeddings": True})
    _edit_tensors(ckpt, lambda t: t | {"lm_head.weight": t["model.embed_tokens.weight"].clone()})
    result = _convert(ckpt, "--quant", "f16", "-o", tmp_path / "x.gguf")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    assert "output.weight" not in {t.name for t in read_header(tmp_path / "x.gguf").tensors}


@pytest.mark.parametrize("route", ["gguf", "onnx"])
def test_a_model_type_that_is_not_the_architectures_is_refused_before_work(models, tmp_path, route):
    """A Qwen2ForCausalLM config saying "model_type": "llama": the GGUF was written as Qwen2 (with its Q/K/V biases)
    while transformers built a Llama, so GGUF parity failed as "a converter bug", and the ONNX export dropped the
    biases and passed. Refused when config.json is read, naming both fields and the fix."""
    from transformers import AutoConfig

    ckpt = _copy(models["qwen2"], tmp_path / "ckpt")
    _edit_json(ckpt / "config.json", lambda c: c | {"model_type": "llama"})
    _edit_tensors(ckpt, lambda t: t | {k: t[k] + 0.5 for k in t if k.endswith("_proj.bias")})
    assert type(AutoConfig.from_pretrained(ckpt)).__name__ == "LlamaConfig"  # the premise: loading builds a Llama
    out = tmp_path / "out"
    result = _convert_by(route, ckpt, out)
    _refused(result, "'model_type' is \"llama\"", "'architectures' names Qwen2ForCausalLM", '"model_type": "qwen2"')
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("route", ["gguf", "onnx"])
def test_a_config_without_model_type_is_refused_before_work(models, tmp_path, route):
    """A Qwen2ForCausalLM config.json without "model_type": transformers cannot pick a model class, so the GGUF
    route converted the weights before the parity reference died in a ValueError traceback, and the ONNX route died
    in the same traceback. Refused when config.json is read, naming the file, the field and the fix."""
    ckpt = _copy(models["qwen2"], tmp_path / "ckpt")
    _edit_json(ckpt / "config.json", lambda c: {k: v for k, v in c.items() if k != "model_type"})
    out = tmp_path / "out"
    result = _convert_by(route, ckpt, out)
    _refused(result, str(ckpt / "config.json"), "'model_type' is missing", "'architectures' names Qwen2ForCausalLM",
             '"model_type": "qwen2"', "save_pretrained()")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("route", ["gguf", "onnx"])
def test_a_config_with_a_quantization_config_is_refused_before_work(models, tmp_path, route):
    """A bitsandbytes quantization_config left in config.json: the ONNX route died in transformers' ImportError, the
    GGUF route converted the float weights that Hugging Face loading would have quantized."""
    ckpt = _copy(models["llama"], tmp_path / "ckpt")
    quant = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    _edit_json(ckpt / "config.json", lambda c: c | {"quantization_config": quant})
    out = tmp_path / "out"
    result = _convert_by(route, ckpt, out)
    _refused(result, str(ckpt / "config.json"), "'quantization_config' (\"bitsandbytes\")",
             "the two routes would compute different models", "remove 'quantization_config' from config.json")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("value", [None, 2, ["qwen2"]])
def test_a_model_type_that_is_not_a_string_is_refused(tmp_path, value):
    from edgemed.converters.source.checkpoint import validate_config

    with pytest.raises(CheckpointError, match="not a string") as err:
        validate_config({"architectures": ["Qwen2ForCausalLM"], "model_type": value}, tmp_path)
    assert '"model_type": "qwen2"' in err.value.fix, err.value.fix


@pytest.mark.parametrize("arch,rope", [("qwen2", {"rope_type": "yarn", "factor": 4.0}),
                                       ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0})])
def test_rope_scaling_without_its_original_context_converts_as_transformers_reads_it(models, tmp_path, arch, rope):
    """original_max_position_embeddings left out of a yarn or llama3 rope_scaling: transformers takes
    max_position_embeddings. yarn was a KeyError traceback; llama3 assumed 8192 and computed other frequencies."""
    from transformers import AutoConfig

    from edgemed.formats.gguf_header import read_header

    ckpt = _copy(models[arch], tmp_path / "ckpt")
    theta = AutoConfig.from_pretrained(ckpt).rope_parameters["rope_theta"]
    _edit_json(ckpt / "config.json", lambda c: {k: v for k, v in c.items() if k != "rope_parameters"}
               | {"rope_theta": theta, "rope_scaling": rope})
    assert AutoConfig.from_pretrained(ckpt).rope_parameters["original_max_position_embeddings"] == 256  # the premise
    result = _convert(ckpt, "--quant", "f16", "-o", tmp_path / "x.gguf")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    if rope["rope_type"] == "yarn":
        assert read_header(tmp_path / "x.gguf").metadata[f"{arch}.rope.scaling.original_context_length"] == 256


def test_config_json_is_a_directory(models, tmp_path):
    ckpt = _copy(models["llama"], tmp_path / "ckpt")
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").mkdir()
    _refused(_convert(ckpt, "--quant", "f16", "-o", tmp_path / "x.gguf"), "is a directory")


def test_config_json_not_utf8_or_nan(models, tmp_path):
    ckpt = _copy(models["llama"], tmp_path / "ckpt")
    (ckpt / "config.json").write_bytes(b'{"architectures": ["Llama\xff"]}')
    _refused(_convert(ckpt, "-o", tmp_path / "x.gguf"), "not UTF-8")
    (ckpt / "config.json").write_text('{"rms_norm_eps": NaN}')
    _refused(_convert(ckpt, "-o", tmp_path / "x.gguf"), "not valid JSON")


@pytest.mark.parametrize("change", [
    {"use_sliding_window": True, "max_window_layers": 0, "sliding_window": 100},
    {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 100},
])
def test_sliding_window_layers_are_refused_before_any_work(models, tmp_path, change):
    """llama.cpp's qwen2 and llama graphs attend over the whole context: a window longer than the ~80-token parity
    prompts passed the gate, and the GGUF computed another model past it."""
    ckpt = _copy(models["llama"], tmp_path / "ckpt")
    _edit_json(ckpt / "config.json", lambda c: {**c, **change})
    _refused(_convert(ckpt, "--quant", "f16", "-o", tmp_path / "x.gguf"), "sliding window of 100 tokens")
    assert not (tmp_path / "x.gguf").exists()


def test_a_sliding_window_that_is_off_or_covers_the_context_converts(models, tmp_path):
    from edgemed.converters.source.checkpoint import sliding_window_of

    assert sliding_window_of({"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 21,
                              "num_hidden_layers": 28}) is None  # R1-Distill-Qwen's own config
    assert sliding_window_of({"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 28,
                              "num_hidden_layers": 28}) is None  # no layer from max_window_layers on
    assert sliding_window_of({"layer_types": ["sliding_attention"], "sliding_window": 4096,
                              "max_position_embeddings": 4096}) is None  # the window is the whole context
    assert sliding_window_of({"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 21,
                              "num_hidden_layers": 28, "max_position_embeddings": 32768}) == 4096


def test_an_output_that_is_one_of_the_inputs_is_refused_even_with_force(models, tmp_path):
    ckpt = _copy(models["llama"], tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    before = weights.read_bytes()
    _refused(_convert(ckpt, "--quant", "f16", "--no-parity", "-o", weights, "--force"),
             "is the checkpoint's model.safetensors", "never writes over its own input")
    calib = tmp_path / "calib.txt"
    calib.write_text("Aspirin inhibits platelet aggregation. " * 40)
    _refused(_convert(ckpt, "--quant", "q4_0", "--imatrix-from", calib, "--no-parity", "-o", calib, "--force"),
             "is the --imatrix-from text")
    _refused(_convert(ckpt, "--to", "onnx", "--quant", "fp32", "--no-parity", "-o", ckpt, "--force"),
             "left alone, even with --force")  # the user's folder: never replaced, whatever it holds
    assert weights.read_bytes() == before and calib.read_text().startswith("Aspirin")


@pytest.mark.parametrize("route", ["gguf", "onnx"])
def test_a_file_as_source_is_named_a_file_and_a_gguf_points_to_run_and_pack(models, tmp_path, route):
    """`edgemed convert model.gguf` said "Checkpoint directory 'model.gguf' does not exist." of a file that is there."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    out = tmp_path / "out"
    out.mkdir()
    to = ["--to", "onnx", "--quant", "fp32", "-o", out / "onnx"] if route == "onnx" else ["--quant", "f16", "-o", out / "x.gguf"]
    if route == "onnx":
        pytest.importorskip("onnx")
    result = _convert(gguf, *to, "--no-parity")
    _refused(result, f"'{gguf}' is a GGUF file", f"`edgemed run {gguf}`", f"`edgemed pack {gguf}")
    assert "does not exist" not in result.output, result.output
    config = models["llama"] / "config.json"
    result = _convert(config, *to, "--no-parity")
    _refused(result, f"'{config}' is a file, not a Hugging Face checkpoint directory", "the folder that holds config.json")
    assert "does not exist" not in result.output and "edgemed run" not in result.output, result.output
    _refused(_convert(tmp_path / "nowhere", *to, "--no-parity"), "does not exist")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("kind", ["fifo", "device", "dangling link"])
def test_a_source_that_is_no_folder_nor_file_is_named_for_what_it_is(tmp_path, kind):
    """A named pipe given as SOURCE was "Checkpoint directory '...' does not exist."; it is said to be a pipe (or a
    device, or a link to nothing) beside what convert reads, and never opened (a reader would wait for a writer)."""
    import threading

    source = tmp_path / "src"
    if kind == "fifo":
        os.mkfifo(source)
    elif kind == "device":
        source.symlink_to("/dev/zero")
    else:
        source.symlink_to(tmp_path / "gone")

    def unblock():  # should the FIFO be opened to read after all, a writer that closes at once ends that wait
        with contextlib.suppress(OSError):
            os.close(os.open(source, os.O_WRONLY | os.O_NONBLOCK))

    watchdog = threading.Timer(30, unblock)
    watchdog.start()
    try:
        result = _convert(source, "--quant", "f16", "--no-parity", "-o", tmp_path / "x.gguf")
    finally:
        watchdog.cancel()
    said = {"fifo": "is a named pipe (FIFO)", "device": "is a character device",
            "dangling link": f"is a link to '{tmp_path / 'gone'}', which does not exist"}[kind]
    _refused(result, f"'{source}' {said}, not a Hugging Face checkpoint directory", "the folder that holds config.json")
    assert "Checkpoint directory" not in result.output and not (tmp_path / "x.gguf").exists(), result.output


def test_index_naming_a_path_outside_the_checkpoint(models, tmp_path):
    ckpt = _copy(models["llama"], tmp_path / "ckpt")
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00001.safetensors")  # sharded: the index is read
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    _refused(_convert(ckpt, "-o", tmp_path / "x.gguf"), "not a file name")


# -- tokenizer.json --------------------------------------------------------------------------------------
TOKENIZER_CASES = {
    "corrupt": (b"{ not json", "not valid JSON"),
    "not utf-8": (b'{"model": "\xff"}', "not UTF-8"),
    "a list": (b"[1, 2]", "JSON list"),
    "string ids": (json.dumps({"model": {"type": "BPE", "vocab": {"a": "0"}, "merges": []}}).encode(), "model.vocab"),
    "bad added tokens": (json.dumps({"model": {"type": "BPE", "vocab": {}}, "added_tokens": [{"id": "x"}]}).encode(),
                         "added_tokens"),
    "pre_tokenizer a list": (json.dumps({"model": {"type": "BPE", "vocab": {}}, "pre_tokenizer": [1]}).encode(),
                             "pre_tokenizer"),
    "model null": (json.dumps({"model": None, "decoder": {"type": "ByteLevel"}}).encode(), "No supported tokenizer"),
    "two tokens for one id": (json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 1}, "merges": []}}).encode(),
                              "the same id 1"),
}


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_bad_tokenizer_json(models, tmp_path, case):
    content, words = TOKENIZER_CASES[case]
    ckpt = _copy(models["llama"], tmp_path / "ckpt")
    (ckpt / "tokenizer.json").write_bytes(content)
    _refused(_convert(ckpt, "--quant", "f16", "--no-parity", "-o", tmp_path / "x.gguf"), "tokenizer.json", words)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("kind", ["fifo", "device", "dangling link", "huge"])
def test_a_tokenizer_side_file_that_is_no_regular_file_is_refused(models, tmp_path, kind):
    """gguf-py and transformers skip a tokenizer_config.json that is not a regular file without a word: the GGUF
    came out without its chat template and special tokens. A FIFO, a device, a link to nothing or a file far larger
    than any tokenizer's is refused before any work."""
    import os

    ckpt = _copy(models["llama"], tmp_path / "ckpt")
    side = ckpt / "tokenizer_config.json"
    side.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(side)
    elif kind == "device":
        side.symlink_to("/dev/zero")
    elif kind == "dangling link":
        side.symlink_to(ckpt / "gone.json")
    else:
        with open(side, "wb") as fh:
            fh.truncate(65 * 2**20)  # sparse: no disk used
    _refused(_convert(ckpt, "--quant", "f16", "--no-parity", "-o", tmp_path / "x.gguf"), "tokenizer_config.json")
    assert not (tmp_path / "x.gguf").exists()


def test_a_sentencepiece_vocabulary_longer_than_the_embedding_is_refused(models):
    """The BPE route refused token ids past vocab_size; the SentencePiece route wrote them all, and llama.cpp then
    refused the file (its vocabulary is the token list, the embedding has vocab_size rows)."""
    from edgemed.converters.gguf.tokenizer import _spm_plan
    from edgemed.errors import TokenizerError

    class Vocab:
        def all_tokens(self):
            return ((f"t{i}".encode(), 0.0, 1) for i in range(400))

    with pytest.raises(TokenizerError, match="400 tokens but the model's vocab_size is 384") as info:
        _spm_plan(models["llama"], Vocab(), 384)
    assert info.value.fix


def test_onnx_export_refuses_a_corrupt_tokenizer_before_exporting(models, tmp_path):
    pytest.importorskip("onnx")
    ckpt = _copy(models["llama"], tmp_path / "ckpt")
    (ckpt / "tokenizer.json").write_bytes(b"{ not json")
    _refused(_convert(ckpt, "--to", "onnx", "--quant", "fp32", "-o", tmp_path / "onnx"), "tokenizer.json", "not valid JSON")
    (ckpt / "tokenizer.json").write_bytes((models["llama"] / "tokenizer.json").read_bytes())
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": "2"}))
    _refused(_convert(ckpt, "--to", "onnx", "--quant", "fp32", "-o", tmp_path / "onnx"), "eos_token_id")
    assert not (tmp_path / "onnx").exists()


# -- safetensors headers -----------------------------------------------------------------------------------
def _blob(header, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
HEADER_CASES = {
    "a JSON list": (_blob([ENTRY]), "JSON list"),
    "huge header length": (_blob(b"{}", length=2**62), "header length"),
    "header longer than file": (_blob(b"{}", length=4096), "exceeds the file size"),
    "not utf-8": (_blob(b'{"\xff": 1}'), "not UTF-8"),
    "deeply nested": (_blob(b"[" * 200_000), "nested too deeply"),
    "NaN offset": (_blob(b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, NaN]}}'), "NaN"),
    "offsets past the end": (_blob({"w": ENTRY}, b"\0" * 8), "truncated"),
    "offsets reversed": (_blob({"w": ENTRY | {"data_offsets": [16, 0]}}, b"\0" * 16), "data_offsets"),
    "offsets overlap": (_blob({"w": ENTRY, "v": ENTRY}, b"\0" * 32), "overlap"),
    "size not shape x dtype": (_blob({"w": ENTRY | {"shape": [3, 2]}}, b"\0" * 16), "needs 24 bytes"),
    "shape a string": (_blob({"w": ENTRY | {"shape": "22"}}, b"\0" * 16), "shape"),
    "negative dim": (_blob({"w": ENTRY | {"shape": [-2, -2]}}, b"\0" * 16), "shape"),
    "unknown dtype": (_blob({"w": ENTRY | {"dtype": "F33"}}, b"\0" * 16), "unknown dtype"),
    "entry a number": (_blob({"w": 5}), "not an object"),
    "metadata a list": (_blob({"__metadata__": [1]}), "__metadata__"),
    "too short": (b"\x01\x02", "shorter than"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_hostile_safetensors_headers(tmp_path, case):
    blob, words = HEADER_CASES[case]
    with pytest.raises(CheckpointError, match="corrupt|truncated") as info:
        parse_safetensors_header(blob)
    assert words in str(info.value) and info.value.fix
    from edgemed.converters.source.safetensors_header import read_safetensors_header

    (tmp_path / "w.safetensors").write_bytes(blob)  # the file reader says the same
    with pytest.raises(CheckpointError):
        read_safetensors_header(tmp_path / "w.safetensors")


def test_hostile_header_through_convert(models, tmp_path):
    ckpt = _copy(models["llama"], tmp_path / "ckpt")
    (ckpt / "model.safetensors").write_bytes(_blob([ENTRY]))
    _refused(_convert(ckpt, "-o", tmp_path / "x.gguf"), "model.safetensors", "JSON list")


def test_random_bytes_never_escape_as_other_errors():
    import random

    rng = random.Random(12)
    seeds = [_blob({"w": ENTRY}, b"\0" * 16), _blob({"__metadata__": {"a": "b"}, "w": ENTRY}, b"\0" * 16)]
    for _ in range(3000):
        blob = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        try:
            parse_safetensors_header(bytes(blob[: rng.randint(0, len(blob))]) if rng.random() < 0.2 else bytes(blob))
        except EdgemedError:
            pass


# -- adapters ----------------------------------------------------------------------------------------------
ADAPTER_CASES = {
    "a list": (lambda c: [c], "JSON object"),
    "r zero": (lambda c: c | {"r": 0}, "'r'"),
    "r a word": (lambda c: c | {"r": "four"}, "'r'"),
    "r not the tensors' rank": (lambda c: c | {"r": 8}, "rank 8"),
    "alpha a string": (lambda c: c | {"lora_alpha": "8"}, "lora_alpha"),
    "bad rank_pattern regex": (lambda c: c | {"rank_pattern": {"q_proj(": 4}}, "regular expression"),
    "bad alpha_pattern regex": (lambda c: c | {"alpha_pattern": {"*": 4}}, "regular expression"),
    "rank_pattern value": (lambda c: c | {"rank_pattern": {"q_proj": "4"}}, "rank_pattern.q_proj"),
    "bad target_modules regex": (lambda c: c | {"target_modules": "(q|k"}, "target_modules"),
    "target_modules numbers": (lambda c: c | {"target_modules": [1, 2]}, "target_modules"),
    # PEFT variants a plain W + scale * B @ A merge would get wrong: these used to be merged as plain LoRA
    "layer replication": (lambda c: c | {"layer_replication": [[0, 1], [0, 1]]}, "layer_replication"),
    "activated LoRA": (lambda c: c | {"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),
    "QA-LoRA": (lambda c: c | {"use_qalora": True}, "use_qalora"),
    "KaSA with its defaults": (lambda c: c | {"kasa_config": {}}, "kasa_config"),
    "BD-LoRA": (lambda c: c | {"use_bdlora": {"lora_a_is_blockdiagonal": True}}, "use_bdlora"),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_bad_adapter_config(models, tmp_path, case):
    change, words = ADAPTER_CASES[case]
    lora = _copy(models["lora"], tmp_path / "lora")
    _edit_json(lora / "adapter_config.json", change)
    _refused(_convert(models["llama"], "--quant", "f16", "--lora", lora, "-o", tmp_path / "x.gguf"), words)
    assert not (tmp_path / "x.gguf").exists()


def test_adapter_config_not_utf8_or_a_directory(models, tmp_path):
    lora = _copy(models["lora"], tmp_path / "lora")
    (lora / "adapter_config.json").write_bytes(b'{"r": 4, "x": "\xfe"}')
    _refused(_convert(models["llama"], "--lora", lora, "-o", tmp_path / "x.gguf"), "not UTF-8")
    (lora / "adapter_config.json").unlink()
    (lora / "adapter_config.json").mkdir()
    _refused(_convert(models["llama"], "--lora", lora, "-o", tmp_path / "x.gguf"), "is a directory")


def test_adapter_path_that_is_not_a_folder(models, tmp_path):
    """A mistyped --lora said "is not a PEFT adapter: adapter_config.json is missing"."""
    _refused(_convert(models["llama"], "--lora", tmp_path / "no_such_lora", "-o", tmp_path / "x.gguf"),
             f"Adapter folder '{tmp_path / 'no_such_lora'}' does not exist.", "check the --lora path")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")
    _refused(_convert(models["llama"], "--lora", tmp_path / "adapter_model.safetensors", "-o", tmp_path / "x.gguf"),
             "is a file, not a PEFT adapter folder", "PeftModel.save_pretrained()")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.safetensors"]


def test_one_dimensional_lora_tensors(models, tmp_path):
    from safetensors.torch import load_file, save_file

    lora = _copy(models["lora"], tmp_path / "lora")
    tensors = load_file(lora / "adapter_model.safetensors")
    save_file({k: v.reshape(-1) if ".lora_A." in k else v for k, v in tensors.items()}, lora / "adapter_model.safetensors")
    _refused(_convert(models["llama"], "--lora", lora, "-o", tmp_path / "x.gguf"), "not all matrices")


def test_integer_lora_tensors(models, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    lora = _copy(models["lora"], tmp_path / "lora")
    tensors = load_file(lora / "adapter_model.safetensors")
    save_file({k: v.to(torch.int32) for k, v in tensors.items()}, lora / "adapter_model.safetensors")
    _refused(_convert(models["llama"], "--lora", lora, "-o", tmp_path / "x.gguf"), "I32")


# -- calibration text ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,content,words", [
    ("calib.txt", b"Fever \xe9 cough\n\nmore text", "not UTF-8"),
    ("calib.jsonl", b'{"question": "ok"}\n[1, 2]\n', "not an object"),
    ("calib.jsonl", b"[" * 100_000 + b"\n", "not valid JSON"),
])
def test_bad_calibration_text(models, tmp_path, name, content, words):
    calib = tmp_path / name
    calib.write_bytes(content)
    _refused(_convert(models["llama"], "--quant", "q4_0", "--imatrix-from", calib, "-o", tmp_path / "x.gguf"), words)
    assert not (tmp_path / "x.gguf").exists()


def test_calibration_path_is_a_directory(models, tmp_path):
    (tmp_path / "calib").mkdir()
    _refused(_convert(models["llama"], "--quant", "q4_0", "--imatrix-from", tmp_path / "calib", "-o", tmp_path / "x.gguf"),
             "is a directory")


# -- where the output goes ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    """Mount a small tmpfs at ``path`` (root only); skip where mounting is not allowed."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount(2) to make a small or read-only file system")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_output_folder(models, tmp_path):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        _refused(_convert(models["llama"], "--quant", "f16", "--no-parity", "-o", ro / "x.gguf"), "Cannot write", "-o")
        assert list(ro.iterdir()) == []


def test_unwritable_output_folder_without_root(models, tmp_path, monkeypatch):
    import gguf

    def denied(self, path=None):
        raise PermissionError(errno.EACCES, "Permission denied", str(path or self.path))

    monkeypatch.setattr(gguf.GGUFWriter, "open_output_file", denied)
    out = tmp_path / "out"
    out.mkdir()
    _refused(_convert(models["llama"], "--quant", "f16", "--no-parity", "-o", out / "x.gguf"), "Permission denied")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("quant,room_kb", [("f16", 64), ("q8_0", 64), ("q8_0", None)])
def test_disk_full(models, tmp_path, quant, room_kb):
    """ENOSPC from our writer (F16, or the quantizer's intermediate) or from llama.cpp's quantizer itself."""
    if room_kb is None:  # room for the intermediate F16 but not for it plus the Q8_0 output
        probe = tmp_path / "probe.gguf"
        assert _convert(models["llama"], "--quant", "f16", "--no-parity", "-o", probe).exit_code == 0
        room_kb = probe.stat().st_size // 1024 + 48
    with _tmpfs(tmp_path / "small", f"size={room_kb}k") as small:
        _refused(_convert(models["llama"], "--quant", quant, "--no-parity", "-o", small / "x.gguf"), "disk", "full" if
                 quant == "q8_0" and room_kb > 64 else "No space left")
        assert list(small.iterdir()) == []


def test_disk_full_without_root(models, tmp_path, monkeypatch):
    import gguf

    real = gguf.GGUFWriter.write_tensor_data
    calls = {"n": 0}

    def full(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    out = tmp_path / "out"
    out.mkdir()
    _refused(_convert(models["llama"], "--quant", "f16", "--no-parity", "-o", out / "x.gguf"), "No space left")
    assert list(out.iterdir()) == []


def _snapshot(folder: Path) -> dict:
    """Every entry under ``folder`` by relative path: a file's bytes, a folder's None."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", ["gguf in the checkpoint", "onnx in the checkpoint", "gguf in the adapter"])
def test_an_output_inside_the_checkpoint_or_adapter_folder_is_refused(models, tmp_path, case):
    """-o inside the folder being converted used to be written there: a GGUF named model-extra.safetensors then
    broke the next conversion of that checkpoint as a corrupt shard. Refused before any work, --force or not."""
    ckpt = _copy(models["llama"], tmp_path / "ckpt")
    lora = _copy(models["lora"], tmp_path / "lora")
    if case == "gguf in the checkpoint":
        watched, args = ckpt, [ckpt, "--quant", "f16", "--no-parity", "-o", ckpt / "model-extra.safetensors"]
    elif case == "onnx in the checkpoint":
        pytest.importorskip("onnx")
        watched, args = ckpt, [ckpt, "--to", "onnx", "--quant", "fp32", "--no-parity", "--force", "-o", ckpt / "o"]
    else:
        watched, args = lora, [ckpt, "--lora", lora, "--quant", "f16", "--no-parity", "-o", lora / "o.gguf"]
    before = _snapshot(watched)
    _refused(_convert(*args), "is inside the", f"folder '{watched}'", "never writes into its own input")
    assert _snapshot(watched) == before


def test_threads_must_be_positive(models, tmp_path):
    result = _convert(models["llama"], "--threads", "0", "-o", tmp_path / "x.gguf")
    assert result.exit_code == 2 and "--threads" in result.output


def test_check_and_the_reference_without_tokenizer_files(models, tmp_path):
    """`check` (and the parity reference a library caller runs) on a checkpoint whose tokenizer files are gone: a
    transformers ValueError traceback, now the tokenizer refusal convert gives."""
    from edgemed.converters.quality.layered import reference_logits
    from edgemed.errors import TokenizerError

    gguf = tmp_path / "x.gguf"
    assert _convert(models["llama"], "--quant", "f16", "--no-parity", "-o", gguf).exit_code == 0
    ckpt = _copy(models["llama"], tmp_path / "ckpt")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / name).unlink()
    _refused(CliRunner().invoke(cli, ["check", str(ckpt), str(gguf)]), "tokenizer", "cannot be loaded")
    with pytest.raises(TokenizerError, match="cannot be loaded") as info:
        reference_logits(ckpt)
    assert info.value.fix


def test_check_on_a_corrupt_gguf(models, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    result = CliRunner().invoke(cli, ["check", str(models["llama"]), str(bad)])
    _refused(result, "bad.gguf")
