"""A model with a LoRA merged into its weights is no base for an adapter bundle, in the store as at load.

``convert --lora`` writes the plain checkpoint's sha256 as the model's source (and the LoRA's as
``edgemed.lora.sha256``, which pack keeps as ``provenance.lora_sha256``); an adapter of that checkpoint was made for
the plain weights, and the runtime refuses the pair at load (``runtime.loader.refuse_merged_base``). So install does
not take the merged model as the adapter bundle's installed base, ``list`` does not put the bundle's adapters under it,
and ``--adapter NAME`` does not find them for it. Runs in the device install (gguf-py and numpy make the files).
"""

from __future__ import annotations

import json
import shutil

import bundle_kit
import lora_gguf_kit
import pytest
from click.testing import CliRunner

from edgemed.cli import cli as main
from edgemed.formats.gguf_header import LORA_SHA_KEY, SOURCE_SHA_KEY, read_header
from edgemed.packaging.bundle import PackInputs, pack
from edgemed.packaging.store import Store


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def made(smollm2_gguf, tmp_path) -> dict:
    """The adapter-only bundle 'notes' (cardio, for SmolLM2's checkpoint), and two tiny models that record that
    checkpoint as their source: 'merged' also records a merged LoRA, 'plain' does not."""
    smol = lora_gguf_kit.base(smollm2_gguf)
    digest = read_header(smol).metadata[SOURCE_SHA_KEY]
    cardio = shutil.copyfile(lora_gguf_kit.adapter(smol, "cardio"), tmp_path / "cardio.lora.gguf")
    notes = tmp_path / "notes.edgemed"
    r = cli("pack", "--adapter", f"cardio={cardio}", "--base-sha256", digest, "--name", "notes", "-o", notes)
    assert r.exit_code == 0, r.output
    out = {"digest": digest, "notes": notes}
    for name, kv in (("merged", {SOURCE_SHA_KEY: digest, LORA_SHA_KEY: "ef" * 32}), ("plain", {SOURCE_SHA_KEY: digest})):
        src = bundle_kit.inputs(tmp_path / name, extra_kv=kv)
        out[name] = tmp_path / f"{name}.edgemed"
        man = pack(PackInputs(model=src["model"], license=src["license"], card=src["card"], name=name), out[name])
        assert man.provenance["source_sha256"] == digest
    return out


def test_a_merged_model_is_not_an_adapter_bundles_installed_base(made):
    assert cli("install", made["merged"]).exit_code == 0
    store = Store()
    assert store.models_for_base(made["digest"]) == []
    r = cli("install", made["notes"])
    assert r.exit_code != 0 and "install the base model" in r.output and made["digest"] in r.output, r.output
    assert [row["name"] for row in store.list()] == ["merged"]  # refused before anything was stored
    man = store.verify("merged").manifest
    assert man.merged_lora_sha256 == "ef" * 32 and man.base_source_sha256 is None

    assert cli("install", made["plain"]).exit_code == 0
    assert store.models_for_base(made["digest"]) == ["plain"]
    r = cli("install", made["notes"])
    assert r.exit_code == 0 and "adapters cardio for plain" in r.output, r.output


def test_list_and_adapter_names_pair_the_bundle_with_the_plain_model_only(made):
    from edgemed.packaging.ref import adapters, runnable

    for bundle in ("plain", "notes", "merged"):  # the plain base first, so the adapter bundle installs
        assert cli("install", made[bundle]).exit_code == 0, bundle
    rows = {r["name"]: r for r in json.loads(cli("list", "--json").output)}
    assert rows["notes"]["for_models"] == ["plain"]
    assert [a["name"] for a in rows["plain"]["adapters"]] == ["cardio"] and rows["merged"]["adapters"] == []
    assert set(adapters(runnable("plain"))) == {"cardio"}
    assert adapters(runnable("merged")) == {}


def test_pack_refuses_adapters_for_a_merged_model(smollm2_gguf, tmp_path, made):
    """`pack MERGED.gguf --adapter` and `pack --adapter ... --for-model MERGED` made bundles the runtime refuses."""
    smol = lora_gguf_kit.base(smollm2_gguf)
    cardio = shutil.copyfile(lora_gguf_kit.adapter(smol, "cardio"), tmp_path / "cardio2.lora.gguf")
    merged = bundle_kit.inputs(tmp_path / "m2", extra_kv={SOURCE_SHA_KEY: made["digest"], LORA_SHA_KEY: "ef" * 32})
    r = cli("pack", merged["model"], "--license", merged["license"], "--adapter", f"cardio={cardio}", "--name", "m2",
            "-o", tmp_path / "m2.edgemed")
    assert r.exit_code == 1 and "merged into its weights" in r.output and not (tmp_path / "m2.edgemed").exists(), r.output
    assert cli("install", made["merged"]).exit_code == 0
    r = cli("pack", "--adapter", f"cardio={cardio}", "--for-model", "merged", "--name", "notes2", "-o", tmp_path / "n2.edgemed")
    assert r.exit_code == 1 and "merged into its weights" in r.output and not (tmp_path / "n2.edgemed").exists(), r.output
    assert cli("install", made["plain"]).exit_code == 0
    r = cli("pack", "--adapter", f"cardio={cardio}", "--for-model", "plain", "--name", "notes2", "-o", tmp_path / "n2.edgemed")
    assert r.exit_code == 0, r.output
