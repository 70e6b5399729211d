"""Bundles through a real OCI registry (the CNCF distribution registry, started here on 127.0.0.1).

push -> pull by tag and by digest into fresh stores -> run; a tampered blob in the registry's storage is refused
with its file path and both digests; a pull SIGKILLed mid-transfer leaves nothing under models/ and the next pull
transfers only the rest (counted by the pull and by the registry's access log); two tags sharing a GGUF keep one
blob in the registry and one on the device; credentials through `edgemed login`; untrusted manifests refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import bundle_kit
import crash_kit
import pytest
import registry_kit
from click.testing import CliRunner
from crash_kit import KILLED

from edgemed.cli import cli


def _cli(*args, ok: bool = True, input: str | None = None):
    r = CliRunner().invoke(cli, [str(a) for a in args], input=input)
    if ok:
        assert r.exit_code == 0, r.output
    else:
        assert r.exit_code != 0, r.output
    return r.output


@pytest.fixture(scope="module")
def maker_key(tmp_path_factory) -> tuple[Path, Path]:
    """The bundle maker's EC key pair (private, public PEM)."""
    return bundle_kit.keypair(tmp_path_factory.mktemp("maker"))


@pytest.fixture(autouse=True)
def trust(edgemed_home, maker_key, registry):
    """``trust(home, host=registry)``: that device home trusts the maker's key for that registry (this test's home at once)."""
    def write(home: Path, host: str = registry.host) -> Path:
        home.mkdir(parents=True, exist_ok=True)
        (home / "trust.toml").write_text(f'[registries."{host}"]\nkeys = ["{maker_key[1]}"]\n')
        return home

    write(edgemed_home)
    return write


def _pack_dir(src: dict, out: Path, name: str, key: Path | None = None) -> Path:
    from edgemed.packaging import signing
    from edgemed.packaging.bundle import PackInputs, pack

    pack(PackInputs(model=src["model"], license=src["license"], card=src["card"], name=name), out, as_dir=True,
         private_key=signing.load_private_key(key) if key else None)
    return out


@pytest.fixture(scope="module")
def smol(tmp_path_factory, smollm2_gguf, maker_key):
    """The real SmolLM2 GGUF in two bundle directories that differ in their card only (versions 1.0 and 1.1).

    Both signed by the maker. 'a' is packed; 'b' is 'a' with another card.toml, its manifest rewritten through the
    Manifest class and signed again (packing again would re-read the 98 MB GGUF's metadata, ~10 s here)."""
    from edgemed.packaging import signing
    from edgemed.packaging.manifest import FileEntry, Manifest

    tmp = tmp_path_factory.mktemp("smol")
    lic = tmp / "LICENSE"
    lic.write_text("Apache License, Version 2.0\n")
    card = tmp / "card.toml"
    card.write_text(bundle_kit.CARD + 'version = "1.0"\n')
    a = _pack_dir({"model": smollm2_gguf, "license": lic, "card": card}, tmp / "smol-a", "smol", maker_key[0])
    b = tmp / "smol-b"
    b.mkdir()
    man = Manifest.from_bytes((a / "manifest.json").read_bytes())
    text = (a / "card.toml").read_text().replace('version = "1.0"', 'version = "1.1"').encode()
    for f in man.files:
        (b / f.path).parent.mkdir(parents=True, exist_ok=True)
        if f.role == "card":
            (b / f.path).write_bytes(text)
        else:
            os.link(a / f.path, b / f.path)
    man.files = [FileEntry(f.path, len(text), hashlib.sha256(text).hexdigest(), f.role) if f.role == "card" else f for f in man.files]
    man.card = {**man.card, "version": "1.1"}
    data = man.to_bytes()
    (b / "manifest.json").write_bytes(data)
    sig = signing.sign(man, data, signing.load_private_key(maker_key[0]))
    (b / sig.file).write_bytes(sig.data)
    return {"a": a, "b": b}


@pytest.fixture(scope="module")
def smol_pushed(registry, smol):
    """SmolLM2 bundle 'a' pushed as clinic/smol:a (once per module)."""
    return json.loads(_cli("push", smol["a"], registry.ref("clinic/smol:a"), "--json"))


def _gguf_sha(bundle: Path) -> str:
    man = json.loads((bundle / "manifest.json").read_text())
    return next(f["sha256"] for f in man["files"] if f["role"] == "model")


def _models(home: Path) -> list[str]:
    d = home / "store" / "models"
    return sorted(os.listdir(d)) if d.is_dir() else []


def test_push_then_pull_by_tag_and_by_digest_into_fresh_stores_and_run(registry, smol, smol_pushed, edgemed_home, monkeypatch, tmp_path,
                                                                       trust):
    import requests

    digest = smol_pushed["digest"]
    # what the registry holds is a ModelPack artifact
    man = requests.get(f"http://{registry.host}/v2/clinic/smol/manifests/a",
                       headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}, timeout=10)
    assert "sha256:" + hashlib.sha256(man.content).hexdigest() == digest == man.headers["Docker-Content-Digest"]
    doc = man.json()
    assert doc["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert doc["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"
    layers = {x["annotations"]["org.cncf.model.filepath"]: x for x in doc["layers"]}
    gguf = next(p for p in layers if p.endswith(".gguf"))
    assert layers[gguf]["mediaType"] == "application/vnd.cncf.model.weight.v1.raw"
    assert layers[gguf]["digest"] == "sha256:" + _gguf_sha(smol["a"])
    assert {"manifest.json", "LICENSE", "card.toml"} <= set(layers)
    config = requests.get(f"http://{registry.host}/v2/clinic/smol/blobs/{doc['config']['digest']}", timeout=10).json()
    assert config["descriptor"]["name"] == "smol" and config["descriptor"]["version"] == "1.0"
    assert config["config"]["format"] == "gguf" and config["config"]["paramSize"].endswith("M")
    assert config["modelfs"]["diff_ids"] == [x["digest"] for x in doc["layers"]]

    # by tag, into this test's fresh store; then it runs
    out = json.loads(_cli("pull", registry.ref("clinic/smol:a"), "--json"))
    assert out["name"] == "smol" and out["origin"] == registry.ref(f"clinic/smol@{digest}")
    assert out["bytes_downloaded"] == sum(x["size"] for x in doc["layers"]) and out["blobs_in_store"] == 0
    listed = json.loads(_cli("list", "--json"))
    assert [(r["name"], r["origin"], r["version"]) for r in listed] == [("smol", out["origin"], "1.0")]
    answer = _cli("run", "smol", "--prompt", "Say hello.", "--max-tokens", "4", "--ctx", "256", "--threads", "1")
    assert answer.strip()

    # by digest, into another fresh store, under another name
    monkeypatch.setenv("EDGEMED_HOME", str(trust(tmp_path / "device-2")))
    out2 = json.loads(_cli("pull", registry.ref(f"clinic/smol@{digest}"), "--name", "cardio", "--json"))
    assert out2["name"] == "cardio" and out2["origin"] == out["origin"]
    assert _models(tmp_path / "device-2") == ["cardio"]
    _cli("verify", "cardio", "--full")

    # an installed model pushed by name is the same artifact, byte for byte (every blob already there)
    again = json.loads(_cli("push", "cardio", registry.ref("clinic/smol:again"), "--json"))
    assert again["digest"] == digest and again["bytes_uploaded"] == 0


def test_an_untrusted_bundle_is_refused_before_its_weights_are_downloaded(registry, smol, smol_pushed, tmp_path, monkeypatch):
    home = tmp_path / "no-policy"  # no trust.toml: a pull needs a signature by a trusted key, and none is trusted
    monkeypatch.setenv("EDGEMED_HOME", str(home))
    sha = _gguf_sha(smol["a"])
    seen = len(registry.access())
    out = _cli("pull", registry.ref("clinic/smol:a"), ok=False)
    assert "No signer is trusted" in out and "trust.toml" in out and "Fix:" in out
    assert not [r for r in registry.access()[seen:] if r["path"].endswith(sha)], "the GGUF was requested"
    assert _models(home) == [] and _parts(home) == {}


def test_a_signature_that_does_not_cover_the_files_is_refused_before_the_weights(registry, tmp_path, edgemed_home, maker_key):
    """A bundle whose card changed after signing (manifest rewritten, model.sig not): the artifact is well formed,
    every blob matches its digest, and the pull refuses it on the signature, naming the file, with no GGUF request."""
    from edgemed.packaging.manifest import FileEntry, Manifest

    src = bundle_kit.inputs(tmp_path / "src", extra_kv={"edgemed.test.unique": "resigned"})
    bundle = _pack_dir(src, tmp_path / "b", "tiny", maker_key[0])
    signed_card = hashlib.sha256((bundle / "card.toml").read_bytes()).hexdigest()
    card = (bundle / "card.toml").read_bytes() + b'version = "9.9"\n'
    (bundle / "card.toml").write_bytes(card)
    man = Manifest.from_bytes((bundle / "manifest.json").read_bytes())
    man.files = [FileEntry(f.path, len(card), hashlib.sha256(card).hexdigest(), f.role) if f.path == "card.toml" else f
                 for f in man.files]
    (bundle / "manifest.json").write_bytes(man.to_bytes())
    _cli("push", bundle, registry.ref("clinic/resigned:v1"))
    seen = len(registry.access())
    out = _cli("pull", registry.ref("clinic/resigned:v1"), ok=False)
    assert f"'card.toml' was signed with sha256 {signed_card}" in out and hashlib.sha256(card).hexdigest() in out, out
    assert "Fix:" in out
    assert not [r for r in registry.access()[seen:] if r["path"].endswith(_gguf_sha(bundle))]
    assert _models(edgemed_home) == []


def test_key_on_the_command_line_decides_for_that_pull(registry, smol, smol_pushed, tmp_path, monkeypatch, maker_key):
    home = tmp_path / "no-policy"
    monkeypatch.setenv("EDGEMED_HOME", str(home))
    _, other = bundle_kit.keypair(tmp_path, "other.pem")
    seen = len(registry.access())
    out = _cli("pull", registry.ref("clinic/smol:a"), "--key", other, ok=False)
    assert "Fix:" in out and not [r for r in registry.access()[seen:] if r["path"].endswith(_gguf_sha(smol["a"]))]
    out = json.loads(_cli("pull", registry.ref("clinic/smol:a"), "--key", maker_key[1], "--json"))
    assert out["signed_by"] and _models(home) == ["smol"]


def test_a_tar_bundle_is_pushed_as_the_same_files(registry, tmp_path, edgemed_home, maker_key):
    from edgemed.packaging import signing
    from edgemed.packaging.bundle import PackInputs, pack

    src = bundle_kit.inputs(tmp_path / "src")
    tar = tmp_path / "tiny.edgemed"
    man = pack(PackInputs(model=src["model"], license=src["license"], card=src["card"], name="tiny"), tar,
               private_key=signing.load_private_key(maker_key[0]))
    pushed = json.loads(_cli("push", tar, registry.ref("clinic/tar:v1"), "--json"))
    assert pushed["layers"] == len(man.files) + 2  # + manifest.json and model.sig
    assert list((edgemed_home / "downloads").iterdir()) == []  # the unpacked copy is gone
    out = _cli("pull", registry.ref("clinic/tar:v1"))
    assert out.startswith(f"installed tiny from {registry.ref('clinic/tar@' + pushed['digest'])}: 5 files, ") and "KB downloaded" in out
    assert "every sha256 matches; signature valid" in out and _models(edgemed_home) == ["tiny"]
    assert json.loads((edgemed_home / "store" / "models" / "tiny" / "manifest.json").read_bytes()) == man.to_dict()


def _with_card_version(tmp: Path, written: str, value, key: Path) -> Path:
    """The tiny bundle with ``written`` as its card.toml's version line and ``value`` as its manifest's card version,
    signed by ``key``: as ``pack`` made it before it refused a version that is not text (1.10 unquoted: 1.1)."""
    from edgemed.packaging import signing
    from edgemed.packaging.manifest import FileEntry, Manifest

    src = bundle_kit.inputs(tmp / "src")
    src["card"].write_text(bundle_kit.CARD + 'version = "1.0"\n')
    bundle = _pack_dir(src, tmp / "b", "tiny")
    man = Manifest.from_bytes((bundle / "manifest.json").read_bytes())
    text = (bundle / "card.toml").read_text().replace('version = "1.0"', written).encode()
    card = next(f for f in man.files if f.role == "card")
    (bundle / card.path).write_bytes(text)
    man.files = [FileEntry(f.path, len(text), hashlib.sha256(text).hexdigest(), f.role) if f is card else f
                 for f in man.files]
    man.card = {**man.card, "version": value}
    data = man.to_bytes()
    (bundle / "manifest.json").write_bytes(data)
    sig = signing.sign(man, data, signing.load_private_key(key))
    (bundle / sig.file).write_bytes(sig.data)
    return bundle


LONG_VERSION = "1.0+" + "build." * 60  # 364 characters: the store's index, and `edgemed list`, keep 256


@pytest.mark.parametrize("written, value, listed, in_registry", [
    ("version = 1.10", 1.1, "1.1", None),  # a number is not the release its maker wrote: the registry leaves it out
    (f'version = "{LONG_VERSION}"', LONG_VERSION, LONG_VERSION[:256], LONG_VERSION[:256]),
])
def test_the_registry_config_gives_the_version_list_shows_where_the_card_gives_text(
        registry, tmp_path, edgemed_home, maker_key, written, value, listed, in_registry):
    """The ModelPack config's descriptor.version is read by ``release_order.card_version``, the one reading of a
    card's version (the store's index, `edgemed list`, release order), where the card gives it as text; a card
    version that is a number (a bundle packed before pack refused them) is left out of it."""
    import requests

    bundle = _with_card_version(tmp_path, written, value, maker_key[0])
    repo = f"clinic/version-{type(value).__name__}"
    _cli("push", bundle, registry.ref(f"{repo}:v1"))
    doc = requests.get(f"http://{registry.host}/v2/{repo}/manifests/v1",
                       headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}, timeout=10).json()
    config = requests.get(f"http://{registry.host}/v2/{repo}/blobs/{doc['config']['digest']}", timeout=10).json()
    assert config["descriptor"]["name"] == "tiny" and config["descriptor"].get("version") == in_registry
    _cli("pull", registry.ref(f"{repo}:v1"))
    assert [r["version"] for r in json.loads(_cli("list", "--json"))] == [listed]


def test_a_damaged_bundle_is_not_pushed(registry, tmp_path, maker_key):
    import requests

    bundle = _pack_dir(bundle_kit.inputs(tmp_path / "src"), tmp_path / "b", "tiny", maker_key[0])
    (bundle / "LICENSE").write_text("Apache License, Version 2.0 (test copy)\nplus a line\n")
    out = _cli("push", bundle, registry.ref("clinic/damaged:v1"), ok=False)
    assert "'LICENSE'" in out and "Fix:" in out
    r = requests.get(f"http://{registry.host}/v2/clinic/damaged/tags/list", timeout=10)
    assert r.status_code == 404  # the repository was never created: nothing went up


def test_an_empty_file_travels_too(registry, tmp_path, edgemed_home, maker_key):
    from edgemed.packaging import signing
    from edgemed.packaging.bundle import PackInputs, pack

    src = bundle_kit.inputs(tmp_path / "src")
    empty = tmp_path / "src" / "notes.txt"
    empty.write_text("")
    pack(PackInputs(model=src["model"], license=src["license"], name="tiny", templates=[empty]), tmp_path / "b", as_dir=True,
         private_key=signing.load_private_key(maker_key[0]))
    _cli("push", tmp_path / "b", registry.ref("clinic/empty:v1"))
    assert "templates/notes.txt" in json.loads(_cli("pull", registry.ref("clinic/empty:v1"), "--json"))["downloaded"]
    assert (edgemed_home / "store" / "models" / "tiny" / "templates" / "notes.txt").stat().st_size == 0


def test_a_pull_over_the_size_cap_is_refused_as_a_tar_or_a_folder_is(registry, tmp_path, edgemed_home, maker_key, monkeypatch):
    """The layers' total is held to $EDGEMED_MAX_BUNDLE_BYTES by the one check a tar and a folder go through
    (archive.check_room), with its words and its fix, before any layer is fetched; pull's own disk check stays."""
    bundle = _pack_dir(bundle_kit.inputs(tmp_path / "src"), tmp_path / "capped", "capped", maker_key[0])
    pushed = json.loads(_cli("push", bundle, registry.ref("clinic/capped:v1"), "--json"))
    total = sum(x["size"] for x in json.loads(_raw_manifest(registry, "clinic/capped", pushed["digest"]))["layers"])
    monkeypatch.setenv("EDGEMED_MAX_BUNDLE_BYTES", str(total - 1))
    out = _cli("pull", registry.ref("clinic/capped:v1"), ok=False)
    assert f"declares {total} bytes, more than the {total - 1} allowed ($EDGEMED_MAX_BUNDLE_BYTES)" in out, out
    assert "raise $EDGEMED_MAX_BUNDLE_BYTES if this bundle is expected to be that large" in out, out
    assert _models(edgemed_home) == [] and not (edgemed_home / "downloads").exists()
    monkeypatch.setenv("EDGEMED_MAX_BUNDLE_BYTES", str(total))
    _cli("pull", registry.ref("clinic/capped:v1"))  # at the cap: pulled as before
    assert _models(edgemed_home) == ["capped"]


def test_pull_by_a_digest_the_registry_does_not_hold_is_refused(registry, smol_pushed):
    out = _cli("pull", registry.ref("clinic/smol@sha256:" + "0" * 64), ok=False)
    assert "has no manifest" in out and "Fix:" in out


def test_a_tampered_blob_in_the_registry_is_refused_by_name_with_both_digests(registry, tmp_path, edgemed_home, monkeypatch, trust,
                                                                              maker_key):
    src = bundle_kit.inputs(tmp_path / "src", extra_kv={"edgemed.test.unique": "tamper"})
    bundle = _pack_dir(src, tmp_path / "tamper", "tamper", maker_key[0])
    _cli("push", bundle, registry.ref("clinic/tamper:v1"))
    other = _pack_dir(bundle_kit.inputs(tmp_path / "other"), tmp_path / "other-bundle", "before")
    _cli("install", other)  # a model that must survive the refused pull
    sha = _gguf_sha(bundle)
    blob = registry.blob_file(sha)
    good = blob.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01  # one flipped bit, same size
    blob.write_bytes(bytes(bad))
    try:
        models = _models(edgemed_home)
        home2 = trust(tmp_path / "fresh")
        for home in (edgemed_home, home2):  # a store that has other blobs, and an empty one
            monkeypatch.setenv("EDGEMED_HOME", str(home))
            out = _cli("pull", registry.ref("clinic/tamper:v1"), "--name", "after", ok=False)
            assert "Layer 'model/tiny.gguf' of oci://" in out and f"sha256:{sha}" in out  # refused as it arrived
            assert f"sha256:{hashlib.sha256(bytes(bad)).hexdigest()}" in out
        assert _models(edgemed_home) == models == ["before"] and _models(home2) == []
        assert not any((home2 / "downloads").glob("*.part")), "a refused blob is not kept for a resume"
    finally:
        monkeypatch.setenv("EDGEMED_HOME", str(edgemed_home))
        blob.write_bytes(good)
    out = json.loads(_cli("pull", registry.ref("clinic/tamper:v1"), "--name", "after", "--json"))
    assert out["name"] == "after"


def _parts(home: Path) -> dict[str, int]:
    d = home / "downloads"
    return {p.name: p.stat().st_size for p in d.glob("*.part")} if d.is_dir() else {}


def test_a_pull_killed_mid_transfer_leaves_nothing_visible_and_the_next_pull_transfers_only_the_rest(
        registry, smol, smol_pushed, tmp_path, monkeypatch, trust):
    from edgemed.packaging.oci_pull import pull
    from edgemed.packaging.store import Store

    ref = registry.ref("clinic/smol:a")
    sha = _gguf_sha(smol["a"])
    size = (smol["a"] / json.loads((smol["a"] / "manifest.json").read_text())["model"]["path"]).stat().st_size
    results = tmp_path / "result.json"

    def run():
        results.write_text(json.dumps(pull(ref).to_dict()))

    monkeypatch.setenv("EDGEMED_HOME", str(trust(tmp_path / "count")))
    names = crash_kit.steps(run, tmp_path)
    chunks = [i for i, line in enumerate(names, 1) if line.endswith(" oci.pull-chunk")]
    assert len(chunks) > 50, names[:5]

    home = trust(tmp_path / "device")
    monkeypatch.setenv("EDGEMED_HOME", str(home))
    # 1. killed a few MB into the GGUF (the 1st chunk is manifest.json)
    assert crash_kit.killed_at(run, chunks[5]) == KILLED
    assert _models(home) == [] and Store().list() == []
    first = _parts(home)[f"{sha}.part"]
    assert 0 < first < size
    # 2. the next pull resumes, and is killed again 30 chunks on
    log = tmp_path / "second.log"
    assert crash_kit.killed_at(run, 1 + 30, log) == KILLED
    assert log.read_text().splitlines()[-1].endswith("oci.pull-chunk")
    assert _models(home) == [] and Store().list() == []
    second = _parts(home)[f"{sha}.part"]
    assert first < second < size
    # 3. the next one completes, fetching only what is missing: the pull's count and the registry's agree
    assert crash_kit.killed_at(run, 0) == 0
    out = json.loads(results.read_text())
    layers = {x["annotations"]["org.cncf.model.filepath"]: x["size"] for x in _layers(registry, "clinic/smol", "a")}
    first_fetched = ("manifest.json", "model.sig")  # whole before the GGUF started: only re-hashed now
    assert _models(home) == ["smol"] and out["bytes_resumed"] == second + sum(layers[p] for p in first_fetched)
    small = sum(n for p, n in layers.items() if not p.endswith(".gguf") and p not in first_fetched)
    assert out["bytes_downloaded"] == size - second + small
    last = [r for r in registry.access() if r["path"].endswith(f"/blobs/sha256:{sha}")][-1]
    assert (last["status"], last["bytes"]) == (206, size - second)
    assert _parts(home) == {} and not list((home / "downloads").glob("[0-9a-f]*"))
    assert crash_kit.debris(home / "downloads") == []  # the killed pulls' staging folders were swept
    _cli("verify", "smol", "--full")


def test_two_pulls_at_once_take_turns_and_download_the_gguf_once(registry, smol, smol_pushed, tmp_path, monkeypatch, trust):
    import multiprocessing

    from edgemed.packaging.oci_pull import pull

    home = trust(tmp_path / "device")
    monkeypatch.setenv("EDGEMED_HOME", str(home))
    sha = _gguf_sha(smol["a"])
    seen = len(registry.access())

    def run(i: int) -> None:
        (tmp_path / f"out-{i}.json").write_text(json.dumps(pull(registry.ref("clinic/smol:a")).to_dict()))

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=run, args=(i,)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    outs = [json.loads((tmp_path / f"out-{i}.json").read_text()) for i in range(2)]
    assert sorted(o["already_installed"] for o in outs) == [False, True] and _models(home) == ["smol"]
    assert len([r for r in registry.access()[seen:] if r["path"].endswith(sha)]) == 1


def test_a_damaged_partial_download_is_fetched_again_from_the_start(registry, smol, smol_pushed, tmp_path, monkeypatch, trust):
    """A part whose bytes went bad while the pull was down (a disk error, a power cut) fails the digest once resumed;
    the pull then downloads that file again from byte 0 and installs it, instead of giving up or keeping bad bytes."""
    from edgemed.packaging.oci_pull import pull

    ref = registry.ref("clinic/smol:a")
    sha = _gguf_sha(smol["a"])
    size = registry.blob_file(sha).stat().st_size
    results = tmp_path / "result.json"

    def run():
        results.write_text(json.dumps(pull(ref).to_dict()))

    monkeypatch.setenv("EDGEMED_HOME", str(trust(tmp_path / "count")))
    names = crash_kit.steps(run, tmp_path)
    chunk = [i for i, line in enumerate(names, 1) if line.endswith(" oci.pull-chunk")][10]
    home = trust(tmp_path / "device")
    monkeypatch.setenv("EDGEMED_HOME", str(home))
    assert crash_kit.killed_at(run, chunk) == KILLED
    part = home / "downloads" / f"{sha}.part"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    assert crash_kit.killed_at(run, 0) == 0
    out = json.loads(results.read_text())
    assert _models(home) == ["smol"] and out["bytes_downloaded"] >= size + (size - len(data))
    _cli("verify", "smol", "--full")


@pytest.mark.parametrize("where", ["oci.download-done", "oci.stage-link", "store.stage-file"])
def test_a_pull_killed_after_the_transfer_downloads_nothing_again(registry, smol, smol_pushed, tmp_path, monkeypatch, trust, where):
    """Killed once the GGUF is whole (before its install, or during it): nothing visible; the next pull fetches no byte of it."""
    from edgemed.packaging.oci_pull import pull
    from edgemed.packaging.store import Store

    ref = registry.ref("clinic/smol:a")
    sha = _gguf_sha(smol["a"])
    results = tmp_path / "result.json"

    def run():
        results.write_text(json.dumps(pull(ref).to_dict()))

    monkeypatch.setenv("EDGEMED_HOME", str(trust(tmp_path / "count")))
    names = crash_kit.steps(run, tmp_path)
    run_length, gguf_done = 0, None  # the GGUF's download-done follows the one long run of chunks
    for i, line in enumerate(names, 1):
        if line.endswith(" oci.download-done") and run_length > 50:
            gguf_done = i
            break
        run_length = run_length + 1 if line.endswith(" oci.pull-chunk") else 0
    at = next(i for i, line in enumerate(names, 1) if line.endswith(" " + where) and i >= gguf_done)
    home = trust(tmp_path / "device")
    monkeypatch.setenv("EDGEMED_HOME", str(home))
    assert crash_kit.killed_at(run, at) == KILLED
    assert _models(home) == [] and Store().list() == []
    assert crash_kit.killed_at(run, 0) == 0
    out = json.loads(results.read_text())
    assert _models(home) == ["smol"] and out["bytes_resumed"] >= (home / "store" / "blobs" / "sha256" / sha).stat().st_size
    assert not any(p.endswith(".gguf") for p in out["downloaded"]) and out["bytes_downloaded"] < 1 << 20, out
    assert crash_kit.debris(home / "downloads") == [] and crash_kit.debris(home / "store") == []


def _layers(registry, repo: str, tag: str) -> list[dict]:
    import requests

    return requests.get(f"http://{registry.host}/v2/{repo}/manifests/{tag}",
                        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}, timeout=10).json()["layers"]


def test_two_tags_sharing_a_gguf_keep_one_blob_in_the_registry_and_one_on_the_device(registry, smol, smol_pushed, edgemed_home):
    sha = _gguf_sha(smol["a"])
    assert _gguf_sha(smol["b"]) == sha
    second = json.loads(_cli("push", smol["b"], registry.ref("clinic/smol:b"), "--json"))
    gguf_size = registry.blob_file(sha).stat().st_size
    assert second["bytes_uploaded"] < 1 << 20 and second["blobs_present"] >= 1  # the GGUF was not uploaded again
    assert registry.blobs().count(sha) == 1
    stored = sum(registry.blob_file(h).stat().st_size for h in registry.blobs())
    assert stored < 1.5 * gguf_size

    a = json.loads(_cli("pull", registry.ref("clinic/smol:a"), "--name", "smol-a", "--json"))
    seen = len(registry.access())
    b = json.loads(_cli("pull", registry.ref("clinic/smol:b"), "--name", "smol-b", "--json"))
    assert not [r for r in registry.access()[seen:] if r["path"].endswith(sha)], "the GGUF was downloaded again"
    assert a["bytes_downloaded"] > gguf_size and b["bytes_downloaded"] < 1 << 20 and b["blobs_in_store"] >= 1
    blob = edgemed_home / "store" / "blobs" / "sha256" / sha
    assert blob.stat().st_nlink == 3  # the blob, models/smol-a/..., models/smol-b/...
    gguf = json.loads((smol["a"] / "manifest.json").read_text())["model"]["path"]
    for name in ("smol-a", "smol-b"):
        assert (edgemed_home / "store" / "models" / name / gguf).stat().st_ino == blob.stat().st_ino


def test_a_damaged_store_blob_is_downloaded_again_not_linked_into_the_next_pull(registry, tmp_path, edgemed_home, maker_key):
    """A store blob of the right size was taken on its name: one flipped byte made every later pull of a bundle
    sharing it fail, blaming the bundle, and the pull never fetched a good copy."""
    src = bundle_kit.inputs(tmp_path / "src", extra_kv={"edgemed.test.unique": "damaged-blob"})
    bundle = _pack_dir(src, tmp_path / "dmg", "dmg", maker_key[0])
    _cli("push", bundle, registry.ref("clinic/dmg:v1"))
    _cli("pull", registry.ref("clinic/dmg:v1"))
    sha = _gguf_sha(bundle)
    blob = edgemed_home / "store" / "blobs" / "sha256" / sha
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))  # same size, same name, other bytes (and, hard-linked, the installed copy too)
    seen = len(registry.access())
    pulled = json.loads(_cli("pull", registry.ref("clinic/dmg:v1"), "--name", "dmg2", "--json"))
    assert pulled["name"] == "dmg2" and [r for r in registry.access()[seen:] if r["path"].endswith(sha)]
    assert _cli("verify", "dmg2", "--full")  # the new install holds the registry's good bytes


def test_pulling_what_is_installed_changes_nothing_and_another_bundle_needs_force(registry, smol, smol_pushed, edgemed_home):
    first = json.loads(_cli("pull", registry.ref("clinic/smol:a"), "--json"))
    seen = len(registry.access())
    again = json.loads(_cli("pull", registry.ref("clinic/smol:a"), "--json"))
    assert not first["already_installed"] and again["already_installed"] and again["downloaded"] == ["manifest.json", "model.sig"]
    assert not [r for r in registry.access()[seen:] if r["path"].endswith(_gguf_sha(smol["a"]))]
    assert "already installed from this bundle" in _cli("pull", registry.ref("clinic/smol:a"))
    assert json.loads(_cli("pull", registry.ref("clinic/smol:a"), "--force", "--json"))["already_installed"]
    _cli("push", smol["b"], registry.ref("clinic/smol:b"))
    seen = len(registry.access())
    out = _cli("pull", registry.ref("clinic/smol:b"), ok=False)
    assert "already installed" in out and "--force" in out
    assert [r["path"].rsplit("/", 1)[-1] for r in registry.access()[seen:] if "/blobs/" in r["path"]] == \
        [f"sha256:{h}" for h in _meta_layer_hexes(registry, "clinic/smol", "b")]  # manifest.json and model.sig only
    out = json.loads(_cli("pull", registry.ref("clinic/smol:b"), "--force", "--json"))
    assert out["name"] == "smol" and not out["already_installed"]
    assert [r["version"] for r in json.loads(_cli("list", "--json"))] == ["1.1"]


def _meta_layer_hexes(registry, repo: str, tag: str) -> list[str]:
    return [x["digest"].split(":")[1] for x in _layers(registry, repo, tag)
            if x["annotations"]["org.cncf.model.filepath"] in ("manifest.json", "model.sig")]


def test_login_stores_docker_credentials_and_push_pull_use_them(tmp_path, monkeypatch, edgemed_home, trust, maker_key,
                                                                 start_registry):
    line = registry_kit.htpasswd_line("clinic-it", "s3cret-pass")
    if line is None:
        pytest.skip("this Python cannot make a bcrypt htpasswd line (no crypt module)")
    (tmp_path / "htpasswd").write_text(line + "\n")
    reg = start_registry("auth-registry", htpasswd=tmp_path / "htpasswd")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    trust(edgemed_home, reg.host)
    bundle = _pack_dir(bundle_kit.inputs(tmp_path / "src"), tmp_path / "tiny", "tiny", maker_key[0])
    out = _cli("push", bundle, reg.ref("clinic/tiny:v1"), ok=False)
    assert f"edgemed login {reg.host}" in out
    out = _cli("login", reg.host, "-u", "clinic-it", "--password-stdin", input="wrong\n", ok=False)
    assert "refused the user name and password" in out
    assert not (tmp_path / "user" / ".docker" / "config.json").exists()
    _cli("login", reg.host, "-u", "clinic-it", "--password-stdin", input="s3cret-pass\n")
    cfg = tmp_path / "user" / ".docker" / "config.json"
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert reg.host in json.loads(cfg.read_text())["auths"]
    _cli("push", bundle, reg.ref("clinic/tiny:v1"))
    assert json.loads(_cli("pull", reg.ref("clinic/tiny:v1"), "--json"))["name"] == "tiny"
    # a config.json that links into a dotfiles folder stays a link: login writes the file it names
    (tmp_path / "dotfiles").mkdir()
    cfg.rename(tmp_path / "dotfiles" / "docker.json")
    cfg.symlink_to(tmp_path / "dotfiles" / "docker.json")
    _cli("login", reg.host, "-u", "clinic-it", "--password-stdin", input="s3cret-pass\n")
    assert cfg.is_symlink() and reg.host in json.loads((tmp_path / "dotfiles" / "docker.json").read_text())["auths"]
    assert stat.S_IMODE((tmp_path / "dotfiles" / "docker.json").stat().st_mode) == 0o600
    # DOCKER_CONFIG names the folder docker reads instead of ~/.docker: the credentials there, and only there
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "ci-docker"))
    out = _cli("push", bundle, reg.ref("clinic/tiny:v2"), ok=False)
    assert str(tmp_path / "ci-docker" / "config.json") in out and f"edgemed login {reg.host}" in out
    _cli("login", reg.host, "-u", "clinic-it", "--password-stdin", input="s3cret-pass\n")
    assert reg.host in json.loads((tmp_path / "ci-docker" / "config.json").read_text())["auths"]
    _cli("push", bundle, reg.ref("clinic/tiny:v2"))
    (tmp_path / "ci-docker" / "config.json").write_text("{not json")
    out = _cli("push", bundle, reg.ref("clinic/tiny:v3"), ok=False)
    assert "is not valid JSON" in out and "Fix:" in out


def _put_manifest(registry, repo: str, tag: str, manifest: dict) -> None:
    import requests

    r = requests.put(f"http://{registry.host}/v2/{repo}/manifests/{tag}", data=json.dumps(manifest),
                     headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, timeout=10)
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("change, expect", [
    (lambda m: m.pop("artifactType"), "artifactType"),
    (lambda m: m["config"].update(mediaType="application/vnd.oci.image.config.v1+json"), "no ModelPack config"),
    (lambda m: m["layers"][1]["annotations"].update({"org.cncf.model.filepath": "../../etc/cron.d/x"}), "unsafe path"),
    (lambda m: m["layers"][1]["annotations"].update({"org.cncf.model.filepath": "/etc/passwd"}), "absolute path"),
    (lambda m: m["layers"][1].update(size=1 << 60), "claims size"),
    (lambda m: m["layers"][1].update(mediaType="application/vnd.cncf.model.weight.v1.tar+gzip"), "uncompressed"),
    (lambda m: m["layers"].pop(0), "has no 'manifest.json' layer"),
    (lambda m: m["layers"].pop(2), "has no layer for the bundle file 'model/tiny.gguf'"),
    (lambda m: m["layers"][2].update(digest=m["layers"][3]["digest"]), "the bundle manifest expects"),
    (lambda m: next(x for x in m["layers"] if x["annotations"]["org.cncf.model.filepath"] == "model.sig").update(size=5 << 20),
     "a signature is at most"),  # refused before it is fetched: a signature comes before any trust
])
def test_an_untrusted_manifest_is_refused_before_anything_is_written(registry, tmp_path, edgemed_home, maker_key, change, expect):
    bundle = _pack_dir(bundle_kit.inputs(tmp_path / "src"), tmp_path / "tiny", "tiny", maker_key[0])
    pushed = json.loads(_cli("push", bundle, registry.ref("clinic/hostile:base"), "--json"))
    manifest = json.loads(_raw_manifest(registry, "clinic/hostile", pushed["digest"]))
    change(manifest)
    _put_manifest(registry, "clinic/hostile", "bad", manifest)
    out = _cli("pull", registry.ref("clinic/hostile:bad"), ok=False)
    assert expect in out and "Fix:" in out
    assert _models(edgemed_home) == [] and not (edgemed_home / "etc").exists()
    downloads = edgemed_home / "downloads"
    assert not downloads.exists() or [p.name for p in downloads.iterdir() if p.name != "lock"] == []  # nothing kept


def test_a_layer_missing_from_the_registry_is_refused_by_name(registry, tmp_path, edgemed_home, maker_key):
    src = bundle_kit.inputs(tmp_path / "src", extra_kv={"edgemed.test.unique": "missing"})
    bundle = _pack_dir(src, tmp_path / "missing", "missing", maker_key[0])
    _cli("push", bundle, registry.ref("clinic/missing:v1"))
    blob = registry.blob_file(_gguf_sha(bundle))
    blob.unlink()
    out = _cli("pull", registry.ref("clinic/missing:v1"), ok=False)
    assert "layer 'model/tiny.gguf'" in out and _gguf_sha(bundle) in out and "Fix:" in out
    assert _models(edgemed_home) == []


def _raw_manifest(registry, repo: str, ref: str) -> bytes:
    import requests

    return requests.get(f"http://{registry.host}/v2/{repo}/manifests/{ref}",
                        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}, timeout=10).content


@pytest.mark.parametrize("text, expect", [
    ("oci://registry.clinic/Models/x:1", "not a registry reference"),
    ("oci://registry.clinic/models/x", "add :TAG"),
    ("https://registry.clinic/models/x:1", "not a registry reference"),
    ("oci://registry.clinic:99999/models/x:1", "port 99999"),
])
def test_bad_references_are_refused_with_the_form_to_write(text, expect):
    out = _cli("pull", text, ok=False)
    assert expect in out and "oci://HOST[:PORT]/REPO:TAG" in out


def test_tls_is_the_default_for_a_registry_that_is_not_loopback(tmp_path, trust, edgemed_home, maker_key, start_registry):
    """A plain-HTTP registry on this machine's LAN address: refused without --insecure (TLS fails), used with it."""
    ip = registry_kit.lan_address()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to serve a registry on")
    reg = start_registry("lan-registry", ip=ip)
    trust(edgemed_home, reg.host)
    bundle = _pack_dir(bundle_kit.inputs(tmp_path / "src"), tmp_path / "tiny", "tiny", maker_key[0])
    seen = len(reg.access())  # the kit's own readiness check
    for cmd in (("push", bundle, reg.ref("clinic/tiny:v1")), ("pull", reg.ref("clinic/tiny:v1"))):
        out = _cli(*cmd, ok=False)
        assert f"TLS with {reg.host} failed" in out and "--insecure" in out
    assert reg.access()[seen:] == []  # not one plain-HTTP request went out
    _cli("push", bundle, reg.ref("clinic/tiny:v1"), "--insecure")
    assert json.loads(_cli("pull", reg.ref("clinic/tiny:v1"), "--insecure", "--json"))["name"] == "tiny"


def test_the_space_check_counts_the_stores_copy_as_well_as_the_download(tmp_path, monkeypatch):
    """A pull checked room for its downloads only; the install then copied each new file into the store, so a model
    that fitted once failed with a full disk after the whole download."""
    from collections import namedtuple

    from edgemed.errors import StoreError
    from edgemed.packaging import oci, oci_pull

    root, store = tmp_path / "downloads", tmp_path / "home" / "store"  # one file system; the store not made yet
    root.mkdir()
    mb = 10**6
    layers = [oci.Layer("model/m.gguf", "x", "ab" * 32, 600 * mb), oci.Layer("LICENSE", "x", "cd" * 32, 400 * mb)]
    with open(root / f"{'ab' * 32}.part", "wb") as fh:  # resumed bytes are not needed again (a hole: no disk used)
        fh.truncate(100 * mb)
    usage = namedtuple("usage", "total used free")
    for free, ok in [(1899 * mb, False), (1900 * mb, True)]:  # 900 MB to download + 1,000 MB for the store's copy
        monkeypatch.setattr(oci_pull.shutil, "disk_usage", lambda p, free=free: usage(10**12, 0, free))
        if ok:
            oci_pull._check_space(root, store, layers)
        else:
            with pytest.raises(StoreError, match="needs 1,900.0 MB to download and install .* 1,899.0 MB are free"):
                oci_pull._check_space(root, store, layers)
    # a nightly update where only the card changed: the install links the GGUF the store holds (no copy, no room)
    card, held = oci.Layer("card.toml", "x", "ef" * 32, 1 * mb), oci.Layer("model/m.gguf", "x", "12" * 32, 3000 * mb)
    monkeypatch.setattr(oci_pull.shutil, "disk_usage", lambda p: usage(10**12, 0, 2 * mb - 1))
    with pytest.raises(StoreError, match="needs 2.0 MB to download and install"):
        oci_pull._check_space(root, store, [card], [held])
    monkeypatch.setattr(oci_pull.shutil, "disk_usage", lambda p: usage(10**12, 0, 2 * mb))
    oci_pull._check_space(root, store, [card], [held])


def test_downloads_no_pull_touched_for_a_week_are_dropped(tmp_path, monkeypatch):
    """A pull abandoned once its tag moved left its parts in downloads/ for good (a multi-GB .part never reclaimed);
    under the downloads lock, parts untouched for STALE_DOWNLOAD_S go: both by their file time and since an age-out
    first saw them as they are (test_oci_pull_mend: a clock that was wrong). Fresh ones and other names stay."""
    import time

    from edgemed.packaging import oci_pull

    root = tmp_path / "downloads"
    root.mkdir()
    old, fresh = "ab" * 32, "cd" * 32
    paths = {n: root / n for n in (old, f"{old}.part", fresh, f"{fresh}.part", "notes.txt", f"{old}.bak")}
    for p in paths.values():
        p.write_bytes(b"x")
    week_ago = time.time() - oci_pull.STALE_DOWNLOAD_S - 60
    for n in (old, f"{old}.part", "notes.txt", f"{old}.bak"):
        os.utime(paths[n], (week_ago, week_ago))
    with oci_pull._exclusive(root):  # first seen now: kept, whatever their file times
        pass
    assert len([p for p in root.iterdir() if p.name != "lock"]) == 7 and (root / oci_pull.SEEN).is_file()
    later = time.time() + oci_pull.STALE_DOWNLOAD_S + 60
    for n in (fresh, f"{fresh}.part"):  # a pull wrote these meanwhile
        paths[n].write_bytes(b"xy")
        os.utime(paths[n], (later, later))
    monkeypatch.setattr(oci_pull.time, "time", lambda: later)
    with oci_pull._exclusive(root):
        pass
    assert sorted(p.name for p in root.iterdir()) == sorted([fresh, f"{fresh}.part", "notes.txt", f"{old}.bak", "lock",
                                                             oci_pull.SEEN])


def test_a_stop_at_every_step_from_the_swap_on_reports_the_pull_it_installed(registry, tmp_path, monkeypatch, trust,
                                                                               maker_key):
    """SIGTERM once the store had swapped the pulled bundle in gave `pull --json` an {"ok": false} document and "nothing
    half-written was left behind", while the model was installed: fleet tooling took the pull for a failure. Stopped
    at the swap and at every step after it (the store's settling, the pull's clean-up of its downloads), the report
    matches the store: not installed and a failure document, or installed and the pull's result marked ``stopped``
    (each kind of step once: a pull's steps take two seconds each here)."""
    import signal

    src = bundle_kit.inputs(tmp_path / "src")
    _pack_dir(src, tmp_path / "b", "tiny", maker_key[0])
    ref = registry.ref("clinic/stopped:v1")
    _cli("push", tmp_path / "b", ref)
    log = tmp_path / "steps.log"
    monkeypatch.setenv("EDGEMED_HOME", str(trust(tmp_path / "count")))
    assert crash_kit.terminated_at(["pull", ref, "--json"], 0, log).returncode == 0
    names = log.read_text().splitlines()
    swap = next(i for i, s in enumerate(names) if s.split()[1] == "atomic.rename" and "store.stage-manifest" in
                " ".join(names[:i]))  # the fresh install's one rename into models/
    assert "oci.forget-download" in " ".join(names[swap:]), names[swap:]
    kinds = {}  # the first step of each kind from the swap on, and the last step: the pull's clean-up repeats its own
    for n in range(swap + 1, len(names) + 1):
        kinds.setdefault(names[n - 1].split()[1], n)
    outcomes = set()
    for n in sorted({*kinds.values(), len(names)}):
        home = trust(tmp_path / f"home-{n}")
        monkeypatch.setenv("EDGEMED_HOME", str(home))
        proc = crash_kit.terminated_at(["pull", ref, "--json"], n)
        where, err = names[n - 1], proc.stderr
        assert proc.returncode == -signal.SIGTERM and "Traceback" not in err, (where, err[-2000:])
        doc = json.loads(proc.stdout)
        if _models(home) == ["tiny"]:
            outcomes.add("installed")
            assert doc["name"] == "tiny" and doc["stopped"] == "SIGTERM" and doc["unfinished"] and "ok" not in doc, (where, doc)
            assert doc["origin"].startswith(ref.split(":v1")[0] + "@sha256:"), doc
            assert "Stopped (SIGTERM) after 'tiny' was installed" in err and "nothing half-written" not in err, err
            _cli("verify", "tiny", "--full")
        else:
            outcomes.add("absent")
            assert doc["ok"] is False and doc["error"] == "Terminated", (where, doc)
            assert "nothing half-written was left behind" in err, (where, err)
    assert outcomes == {"absent", "installed"}, names[swap:]  # the stops straddle the commit point


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_stop_while_the_pull_prints_its_result_reports_the_install(registry, tmp_path, monkeypatch, trust, maker_key,
                                                                     as_json):
    """A stop (here Ctrl-C) in the moment between the pull returning and its result being printed said "nothing
    half-written was left behind" (and, with --json, printed a failure document), while the model was installed."""
    import edgemed.cli.oci

    src = bundle_kit.inputs(tmp_path / "src")
    _pack_dir(src, tmp_path / "b", "tiny", maker_key[0])
    ref = registry.ref("clinic/printing:v1")
    _cli("push", tmp_path / "b", ref)
    home = trust(tmp_path / "home")
    monkeypatch.setenv("EDGEMED_HOME", str(home))

    def stopped(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(edgemed.cli.oci, "echo_json_result" if as_json else "shown", stopped)
    r = CliRunner().invoke(cli, ["pull", ref, *(["--json"] if as_json else [])])
    assert r.exit_code == 130 and _models(home) == ["tiny"], r.output
    assert "Interrupted after 'tiny' was installed from oci://" in r.stderr and "nothing half-written" not in r.stderr
    if as_json:
        doc = json.loads(r.stdout)
        assert doc["name"] == "tiny" and doc["stopped"] == "Ctrl-C" and "ok" not in doc, doc
    else:
        assert r.stdout == ""


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_stop_as_the_pull_returns_before_the_result_is_in_hand_reports_the_install(registry, tmp_path, monkeypatch,
                                                                                     trust, maker_key, as_json):
    """A stop (here Ctrl-C) that landed the instant the pull returned, before the command had its result and opened
    its report, said "nothing half-written was left behind" (and, with --json, printed {"ok": false}), while the
    model was installed. Now it reports the install, read from the store, and exits with the stop's status."""
    from edgemed.packaging import oci_pull

    src = bundle_kit.inputs(tmp_path / "src")
    _pack_dir(src, tmp_path / "b", "tiny", maker_key[0])
    ref = registry.ref("clinic/returned:v1")
    _cli("push", tmp_path / "b", ref)
    home = trust(tmp_path / "home")
    monkeypatch.setenv("EDGEMED_HOME", str(home))
    pull = oci_pull.pull

    def then_stopped(*args, **kwargs):
        pull(*args, **kwargs)  # done, and the pull's own guard is left behind
        raise KeyboardInterrupt

    monkeypatch.setattr(oci_pull, "pull", then_stopped)
    r = CliRunner().invoke(cli, ["pull", ref, *(["--json"] if as_json else [])])
    assert r.exit_code == 130 and _models(home) == ["tiny"], r.output
    assert "Interrupted after 'tiny' was installed" in r.stderr and "nothing half-written" not in r.stderr, r.stderr
    if as_json:
        doc = json.loads(r.stdout)
        assert doc["name"] == "tiny" and doc["digest"].startswith("sha256:") and doc["stopped"] == "Ctrl-C", doc
        assert "ok" not in doc and doc["unfinished"].startswith("printing its report"), doc
    else:
        assert r.stdout == ""
    monkeypatch.undo()
    monkeypatch.setenv("EDGEMED_HOME", str(home))
    _cli("verify", "tiny", "--full")
