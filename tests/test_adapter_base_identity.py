"""Which base a LoRA adapter is for, where its name or its recorded checkpoint alone would mislead.

- A GGUF converted with ``--lora X`` records the checkpoint's sha256 (the one an adapter of that checkpoint records
  as its base) and X's. X's adapter file on it computes base + X + X: ``run`` / ``serve --adapter`` and ``convert
  --adapter-only --base`` refuse such a base.
- An adapter whose ``adapter_config.json`` names a checkpoint folder here is compared with the checkpoint it is
  merged into by their weights, not by their folders' names: two training runs of one recipe (``runs/v1/model``,
  ``runs/v2/model``) have the same shapes and the same folder name. The parity gate cannot see the swap: its
  reference merges the same adapter into the same wrong base.

Tiny random Llamas (``tiny.py``) with a PEFT LoRA: the converter side (torch, transformers, peft), seconds each.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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


# -- an adapter naming another checkpoint folder here ------------------------------------------------------------
def test_an_adapter_naming_another_run_of_the_same_recipe_is_refused(runs, tmp_path):
    """v2 has v1's shapes and folder name: only the weights tell them apart. Refused before any work, both routes."""
    from edgemed.converters.source.checkpoint import Checkpoint
    from edgemed.converters.source.lora import LoraAdapter

    with pytest.raises(AdapterError, match="other weights") as exc:
        LoraAdapter.open(runs["lora"], Checkpoint.open(runs["v2"]))
    assert str(runs["v1"]) in str(exc.value) and "the parity gate cannot see it" in str(exc.value)
    assert f"edgemed convert {runs['v1']} --lora" in exc.value.fix
    for extra in ([], ["--adapter-only"]):
        out = tmp_path / f"out{len(extra)}"
        out.mkdir()
        result = _convert(runs["v2"], "--lora", runs["lora"], *extra, "--quant", "f16", "-o", out / "x.gguf")
        assert result.exit_code == 1 and "other weights" in result.output, result.output
        assert list(out.iterdir()) == []


def _resaved(src: Path, out: Path, dtype: str = "float32", **kw) -> Path:
    """``src`` loaded as ``dtype`` and saved again by transformers (``kw``: save_pretrained's), with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype)).save_pretrained(out, **kw)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, out / f.name)
    return out


@pytest.mark.parametrize("copy", ["copied", "config edited", "sharded"])
def test_a_copy_of_the_named_checkpoint_matches(runs, tmp_path, copy):
    """The same weights under another name, beside a config saved otherwise, or in other shards: merged, no
    warning, the report says it matches."""
    if copy == "sharded":
        ckpt = _resaved(runs["v1"], tmp_path / "elsewhere", max_shard_size="100KB")
        assert len(list(ckpt.glob("*.safetensors"))) > 1
    else:
        ckpt = shutil.copytree(runs["v1"], tmp_path / "elsewhere")
        if copy == "config edited":
            config = json.loads((ckpt / "config.json").read_text())
            (ckpt / "config.json").write_text(json.dumps(config | {"transformers_version": "0.0.1"}))
    out = tmp_path / "x.gguf"
    result = _convert(ckpt, "--lora", runs["lora"], "--quant", "f32", "-o", out)
    assert result.exit_code == 0 and "WARNING" not in result.output, result.output
    report = json.loads(out.with_name(out.name + ".report.json").read_text())
    assert report["lora"]["base_model_name_or_path"] == str(runs["v1"]) and report["lora"]["base_check"].startswith("matches (weights compared)")
    # and it says so by the weights: a copy is not taken on its name
    how = "the same tensors as" if copy == "sharded" else "the same weight files as"
    assert f"adapter base: matches (weights compared): '{runs['v1']}' holds {how} {ckpt}" in result.output, result.output


def test_the_base_check_says_what_it_compared(runs, tmp_path):
    """'matches' did not say whether the weights were compared or only the names (and why only they)."""
    from edgemed.converters.source.checkpoint import Checkpoint
    from edgemed.converters.source.lora import LoraAdapter

    own = LoraAdapter.open(runs["lora"], Checkpoint.open(runs["v1"])).base_check
    assert (own.matched, own.by) == (True, "folder") and str(own).startswith("matches (the same folder): ")
    elsewhere = shutil.copytree(runs["lora"], tmp_path / "lora")  # names a folder called "model" that is not here
    config = json.loads((elsewhere / "adapter_config.json").read_text())
    (elsewhere / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(tmp_path / "gone" / "model")}))
    check = LoraAdapter.open(elsewhere, Checkpoint.open(runs["v2"])).base_check
    assert (check.matched, check.by) == (True, "names"), check
    assert str(check) == (f"matches (names only): '{tmp_path / 'gone' / 'model'}' has this checkpoint's folder name "
                          f"('model'); its weights were not compared: there is no folder '{tmp_path / 'gone' / 'model'}' "
                          "here (a hub id, or a path on another machine)")
    result = _convert(runs["v2"], "--lora", elsewhere, "--quant", "f32", "-o", tmp_path / "x.gguf")
    assert result.exit_code == 0 and "WARNING" not in result.output, result.output
    assert f"adapter base: {check}" in result.output, result.output


@pytest.mark.parametrize("case", ["gone", "bf16 copy"])
def test_a_named_checkpoint_that_cannot_be_compared_falls_back_to_its_name(runs, tmp_path, case):
    """A named folder whose weights cannot be read (gone), or are stored in another dtype (a BF16 copy of the F32
    checkpoint is the same model, rounded), is compared by name: another name merges with the warning."""
    lora, ckpt = runs["lora"], runs["v2"]
    if case == "gone":
        lora = shutil.copytree(runs["lora"], tmp_path / "lora")
        config = json.loads((lora / "adapter_config.json").read_text())
        (lora / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(tmp_path / "gone" / "base")}))
    else:
        ckpt = _resaved(runs["v1"], tmp_path / "v1-bf16", dtype="bfloat16")
    out = tmp_path / "x.gguf"
    result = _convert(ckpt, "--lora", lora, "--quant", "f32", "-o", out)
    assert result.exit_code == 0 and "WARNING: " in result.output, result.output
    assert json.loads(out.with_name(out.name + ".report.json").read_text())["lora"]["base_check"].startswith("name differs")
    why = (f"there is no folder '{tmp_path / 'gone' / 'base'}' here" if case == "gone" else
           f"'{runs['v1']}' stores lm_head.weight as F32 and {ckpt} as BF16, so bits cannot be compared")
    assert f"the weights could not be compared ({why}" in " ".join(result.output.split()), result.output


def _naming(lora: Path, out: Path, base: str) -> Path:
    """A copy of the adapter ``lora`` whose adapter_config.json names ``base`` as its base model."""
    out = shutil.copytree(lora, out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": base}))
    return out


def test_a_parent_named_in_the_config_is_no_match(runs, tmp_path):
    """transformers 4 saves a fine-tune's config.json with its parent's name as _name_or_path. An adapter trained on
    that parent, merged into the fine-tune (same shapes, other weights), passed as 'matches (names only)' with no
    warning: the name says where the checkpoint came from, not which one it is."""
    from edgemed.converters.source.checkpoint import Checkpoint
    from edgemed.converters.source.lora import LoraAdapter

    student = shutil.copytree(runs["v2"], tmp_path / "student")
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps(config | {"_name_or_path": "clinic-org/SmolDoc-base"}))
    lora = _naming(runs["lora"], tmp_path / "lora", "clinic-org/SmolDoc-base")
    check = LoraAdapter.open(lora, Checkpoint.open(student)).base_check
    assert (check.matched, check.by) == (False, "names"), check
    assert "whose folder name is 'student'" in check.detail  # what was compared
    assert "_name_or_path, 'clinic-org/SmolDoc-base', has the adapter's base name" in check.detail
    out = tmp_path / "x.gguf"
    result = _convert(student, "--lora", lora, "--quant", "f32", "-o", out)
    assert result.exit_code == 0 and f"WARNING: {check.detail}" in result.output, result.output
    assert json.loads(out.with_name(out.name + ".report.json").read_text())["lora"]["base_check"] == f"name differs: {check.detail}"


def test_check_says_what_convert_says_of_the_adapters_base(runs, tmp_path):
    """`check --lora` ran the base check silently: an adapter naming another base got a bare PASS."""
    lora = _naming(runs["lora"], tmp_path / "lora", "clinic-org/SmolDoc-base")
    out = tmp_path / "x.gguf"
    converted = _convert(runs["v2"], "--lora", lora, "--quant", "f32", "-o", out)
    assert converted.exit_code == 0, converted.output
    warned = [line for line in converted.output.splitlines() if line.startswith("WARNING: ")]
    assert len(warned) == 1, converted.output
    checked = cli("check", runs["v2"], out, "--lora", lora, "--threads", "1")
    assert checked.exit_code == 0, checked.output
    assert [line for line in checked.output.splitlines() if line.startswith("WARNING: ")] == warned
    as_json = cli("check", runs["v2"], out, "--lora", lora, "--threads", "1", "--json")
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(out.with_name(out.name + ".report.json").read_text())
    assert json.loads(as_json.stdout)["lora"]["base_check"] == report["lora"]["base_check"]
    assert warned[0] in as_json.stderr  # beside the JSON document, not in it
