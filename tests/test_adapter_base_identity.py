"""Which base a LoRA adapter is for, where its name or its recorded checkpoint alone would mislead.

- A GGUF converted with ``--lora X`` records the checkpoint's sha256 (the one an adapter of that checkpoint records
  as its base) and X's. X's adapter file on it computes base + X + X: ``run`` / ``serve --adapter`` and ``convert
  --adapter-only --base`` refuse such a base.

Tiny random Llamas (``tiny.py``) with a PEFT LoRA: the converter side (torch, transformers, peft), seconds each.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("llama_cpp")

import tiny  # noqa: E402
from edgemed.errors import AdapterError  # noqa: E402


def cli(*args):
    from click.testing import CliRunner

    from edgemed.cli import cli as main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two training runs of one recipe (same shapes, same folder name, other weights) and a LoRA trained on v1."""
    w = tmp_path_factory.mktemp("w")
    v1, v2 = tiny.build_model(w / "v1" / "model", seed=0), tiny.build_model(w / "v2" / "model", seed=7)
    lora = tiny.build_lora(v1, w / "cardio-lora")
    assert json.loads((lora / "adapter_config.json").read_text())["base_model_name_or_path"] == str(v1)
    return {"v1": v1, "v2": v2, "lora": lora}


def _convert(*args):
    return cli("convert", *args, "--no-parity")


# -- a base with the adapter already merged in -----------------------------------------------------------------
@pytest.fixture(scope="module")
def made(runs, tmp_path_factory) -> dict:
    """From v1 and its LoRA: the plain F16 base, the merged F16 model, the adapter file, and another LoRA's file."""
    out = tmp_path_factory.mktemp("gguf")
    other = tiny.build_lora(runs["v1"], out / "other-lora", seed=5)
    files = {"base": out / "base-f16.gguf", "merged": out / "merged-f16.gguf", "adapter": out / "cardio.lora.gguf",
             "other": out / "other.lora.gguf"}
    for args in ([runs["v1"], "--quant", "f16", "-o", files["base"]],
                 [runs["v1"], "--lora", runs["lora"], "--quant", "f16", "-o", files["merged"]],
                 [runs["v1"], "--lora", runs["lora"], "--adapter-only", "-o", files["adapter"]],
                 [runs["v1"], "--lora", other, "--adapter-only", "-o", files["other"]]):
        result = _convert(*args)
        assert result.exit_code == 0, result.output
    return files | {"other_lora": other}


def test_an_adapter_is_refused_on_a_base_that_has_it_merged_in(made):
    """The merged file records the same checkpoint as the adapter; it also records the LoRA merged into it."""
    from edgemed.formats.gguf_header import LORA_SHA_KEY, SOURCE_SHA_KEY, read_header
    from edgemed.runtime.loader import check_adapter

    merged = read_header(made["merged"]).metadata
    adapter = read_header(made["adapter"]).metadata
    assert merged[SOURCE_SHA_KEY] == read_header(made["base"]).metadata[SOURCE_SHA_KEY]
    assert merged[LORA_SHA_KEY] == adapter[LORA_SHA_KEY]  # the very adapter

    assert check_adapter(read_header(made["base"]).metadata, made["base"], made["adapter"])  # the plain base takes it
    with pytest.raises(AdapterError, match="already has this very adapter merged into its weights") as exc:
        check_adapter(merged, made["merged"], made["adapter"])
    assert "without --lora" in exc.value.fix and "without --adapter" in exc.value.fix
    with pytest.raises(AdapterError, match=r"already has a LoRA adapter \(") as exc:  # another adapter of the checkpoint
        check_adapter(merged, made["merged"], made["other"])


def test_run_refuses_an_adapter_on_its_merged_base(made):
    result = cli("run", made["merged"], "--adapter", made["adapter"], "--prompt", "The patient", "--raw",
                 "--max-tokens", "2", "--threads", "1", "--ctx", "128")
    assert result.exit_code == 1, result.output
    assert "already has this very adapter merged" in result.output and "without --lora" in result.output


def test_adapter_only_refuses_a_merged_base_before_writing_anything(runs, made, tmp_path):
    """It used to accept the file, write the adapter and fail its gate with a message blaming the converter."""
    out = tmp_path / "out"
    out.mkdir()
    result = cli("convert", runs["v1"], "--lora", runs["lora"], "--adapter-only", "--base", made["merged"],
                 "-o", out / "cardio.lora.gguf")
    assert result.exit_code == 1, result.output
    assert "already has this very adapter merged" in result.output and "without --lora as --base" in result.output
    assert list(out.iterdir()) == []
