"""What `convert` and `check` say when the command itself points the wrong way: `edgemed convert .` run inside the
checkpoint (no -o: the default output would land in the folder being read), and `check` handed the adapter file
`convert --adapter-only` wrote instead of a model."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from edgemed.cli import cli

pytest.importorskip("torch")

import tiny  # noqa: E402


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("words")
    model = tiny.build_model(root / "clinic-llama", "llama")
    return {"model": model, "lora": tiny.build_lora(model, root / "notes-lora")}


@pytest.mark.parametrize("args,name", [([], "clinic-llama-q4_k_m.gguf"), (["--to", "onnx"], "clinic-llama-onnx-int4"),
                                       (["--quant", "f16"], "clinic-llama-f16.gguf")])
def test_convert_dot_inside_the_checkpoint_names_its_default_output_and_where_to_put_it(kit, monkeypatch, args, name):
    monkeypatch.chdir(kit["model"])
    before = sorted(p.name for p in kit["model"].iterdir())
    result = CliRunner().invoke(cli, ["convert", ".", *args])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"No -o was given, and the default output '{name}' would land in the current folder" in text
    assert f"pass -o ../{name}" in text
    assert sorted(p.name for p in kit["model"].iterdir()) == before


def test_the_adapter_default_is_named_after_the_adapter_folder_reached(kit, monkeypatch):
    monkeypatch.chdir(kit["lora"])
    result = CliRunner().invoke(cli, ["convert", str(kit["model"]), "--lora", ".", "--adapter-only"])
    assert "'notes-lora.lora.gguf'" in result.output and "pass -o ../notes-lora.lora.gguf" in " ".join(result.output.split())


def test_check_of_an_adapter_gguf_says_it_is_an_adapter_and_what_to_check(kit, tmp_path):
    adapter = tmp_path / "notes.lora.gguf"
    made = CliRunner().invoke(cli, ["convert", str(kit["model"]), "--lora", str(kit["lora"]), "--adapter-only", "--no-parity",
                                    "-o", str(adapter)])
    assert made.exit_code == 0, made.output
    result = CliRunner().invoke(cli, ["check", str(kit["model"]), str(adapter), "--lora", str(kit["lora"])])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "is a LoRA adapter GGUF" in text and "file type" not in text
    assert "--adapter-only --base BASE.gguf" in text and "check the merged model" in text
