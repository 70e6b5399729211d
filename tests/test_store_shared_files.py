"""An update whose files the store holds already (a release that changes the card alone: the same GGUF) links them
from their blobs: it writes no copy of the weights and needs room only for its new files, installed from a tar, a
folder or a registry. Was: the install checked room for the whole bundle and copied (and hashed) every file before
it threw the copies away for links, so such an update was refused on a device with room for the card. A rollback, a
later update and a remove of one version or name never break another that shares the blob."""

from __future__ import annotations

import json
import shutil

import bundle_kit
import pytest
from click.testing import CliRunner

from edgemed.cli import cli
from edgemed.packaging import store as store_mod
from edgemed.packaging.bundle import PackInputs, pack, verify_dir
from edgemed.packaging.manifest import Manifest
from edgemed.packaging.store import Store

GGUF = "model/tiny.gguf"
PAD = 200_000  # bytes of padding in the GGUF's metadata: a model much larger than its card
FREE = 100_000  # the free space the small disk reports: room for a card, not for the model


@pytest.fixture
def releases(tmp_path, edgemed_home):
    """'tiny' 1.0, 1.1 and 1.2 as tars, and 1.1 as a folder too: one GGUF, three cards (signed with one key)."""
    from edgemed.packaging import signing

    key, pub = bundle_kit.keypair(tmp_path)
    src = bundle_kit.inputs(tmp_path / "src", extra_kv={"edgemed.test.pad": "x" * PAD})
    out = {"pub": pub, "key": key}
    for version in ("1.0", "1.1", "1.2"):
        src["card"].write_text(bundle_kit.CARD + f'version = "{version}"\n')
        inputs = PackInputs(model=src["model"], license=src["license"], card=src["card"], name="tiny")
        for label, as_dir in ((version, False), (f"{version}-dir", True)):
            out[label] = tmp_path / (f"tiny-{version}" + ("" if as_dir else ".edgemed"))
            pack(inputs, out[label], as_dir=as_dir, private_key=signing.load_private_key(key))
    return out


def _small_disk(monkeypatch, free: int = FREE) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free))


def _written(monkeypatch) -> list[str]:
    """The bundle files the store writes a copy of (a tar's bytes read only to be hashed are not written)."""
    written = []
    real = store_mod.copy_hashed

    def spy(src, dst, size, name):
        if dst is not None:
            written.append(name)
        return real(src, dst, size, name)

    monkeypatch.setattr(store_mod, "copy_hashed", spy)
    return written


def _inode(path) -> int:
    return path.stat().st_ino


def _cli(*args) -> str:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.stdout


def _verified(name: str = "tiny") -> str:
    """The version of ``name`` once `verify --full` passes on it."""
    _cli("verify", name, "--full")
    return Store().record(name)["version"]


@pytest.mark.parametrize("form", ["tar", "dir"])
def test_a_card_only_update_links_the_model_and_needs_room_for_the_card_alone(releases, monkeypatch, form):
    s = Store()
    s.install(releases["1.0"], public_key=releases["pub"])
    blob = s.blobs / Manifest.from_bytes((s.models / "tiny" / "manifest.json").read_bytes()).entry(GGUF).sha256
    _small_disk(monkeypatch)
    written = _written(monkeypatch)
    s.install(releases["1.1" if form == "tar" else "1.1-dir"], force=True, public_key=releases["pub"])
    assert written == ["card.toml"]  # the GGUF and the LICENSE are linked from their blobs
    rec = s.record("tiny")
    assert rec["version"] == "1.1" and rec["previous"]["version"] == "1.0"
    kept = s.kept_version("tiny")
    assert _inode(s.models / "tiny" / GGUF) == _inode(blob) == _inode(kept / GGUF)  # one copy of the weights
    assert _verified() == "1.1"
    verify_dir(kept, full=True)


def test_an_update_with_a_new_model_still_needs_room_for_it(releases, tmp_path, monkeypatch):
    """The files the store does not hold are counted: a new GGUF on a disk without room for it is refused."""
    from edgemed.errors import UnsafeArchive
    from edgemed.packaging import signing

    s = Store()
    s.install(releases["1.0"], public_key=releases["pub"])
    bundle_kit.tiny_gguf(tmp_path / "other.gguf", extra_kv={"edgemed.test.pad": "y" * PAD})
    src = bundle_kit.inputs(tmp_path / "src2")
    src["card"].write_text(bundle_kit.CARD + 'version = "2.0"\n')
    pack(PackInputs(model=tmp_path / "other.gguf", license=src["license"], card=src["card"], name="tiny"),
         tmp_path / "tiny-2.0.edgemed", private_key=signing.load_private_key(releases["key"]))
    _small_disk(monkeypatch)
    with pytest.raises(UnsafeArchive, match=r"new to the store\); only 100000 are free"):
        s.install(tmp_path / "tiny-2.0.edgemed", force=True, public_key=releases["pub"])
    assert s.record("tiny")["version"] == "1.0"


def test_versions_that_share_the_model_survive_rollback_update_and_remove_of_another(releases):
    s = Store()
    pub = releases["pub"]
    s.install(releases["1.0"], public_key=pub)
    s.install(releases["1.0"], name="twin", public_key=pub)  # another name holding the same blobs
    s.install(releases["1.1"], force=True, public_key=pub)
    blob = s.blobs / Manifest.from_bytes((s.models / "tiny" / "manifest.json").read_bytes()).entry(GGUF).sha256
    assert blob.stat().st_nlink == 4  # the blob, tiny, tiny's kept 1.0, twin
    for expect in ("1.0", "1.1"):
        s.rollback("tiny")
        assert _verified() == expect
        verify_dir(s.kept_version("tiny"), full=True)
    s.install(releases["1.2-dir"], force=True, public_key=pub)  # 1.0 kept before is dropped now; 1.1 is kept
    assert s.record("tiny")["previous"]["version"] == "1.1" and blob.stat().st_nlink == 4
    verify_dir(s.kept_version("tiny"), full=True)
    assert _verified() == "1.2"
    s.remove("tiny")  # the model and its kept version go; twin's blobs stay
    assert blob.stat().st_nlink == 2 and _verified("twin") == "1.0"
    s.remove("twin")
    assert list(s.blobs.iterdir()) == []


def test_one_check_answers_for_a_blob_held_absent_or_damaged(releases, caplog):
    """The install (``Store._holds``) and the pull (``oci_pull._in_store``) each checked a blob's size and digest in a
    copy of their own; both ask ``Store.blob`` now: held, absent (no such blob, another size) or damaged (its bytes
    hash to another digest), and only the pull says so of a damaged one, which it downloads again."""
    from edgemed.packaging import oci, oci_pull

    _cli("install", releases["1.0"])
    store = Store()
    man = Manifest.from_bytes((store.models / "tiny" / "manifest.json").read_bytes(), "test")
    gguf = next(e for e in man.files if e.path == GGUF)
    layer = oci.Layer(GGUF, "application/octet-stream", gguf.sha256, gguf.size)
    assert store.blob(gguf.sha256, gguf.size) == store_mod.BLOB_HELD and oci_pull._in_store(store, layer)
    assert store.blob(gguf.sha256, gguf.size + 1) == store.blob("0" * 64, gguf.size) == store_mod.BLOB_ABSENT
    blob = store.blobs / gguf.sha256
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    assert store.blob(gguf.sha256, gguf.size) == store_mod.BLOB_DAMAGED and GGUF not in store._holds(man, None)
    assert not caplog.records and not oci_pull._in_store(store, layer)
    assert "does not hold what its name says" in caplog.text


def test_a_card_only_pull_needs_room_for_the_card_alone(registry, releases, edgemed_home, monkeypatch):
    """Was: "The pull needs 0.2 MB to download and install ...", the kept GGUF counted as a copy to make."""
    edgemed_home.mkdir(parents=True, exist_ok=True)
    (edgemed_home / "trust.toml").write_text(f'[registries."{registry.host}"]\nkeys = ["{releases["pub"]}"]\n')

    for version in ("1.0", "1.1"):
        _cli("push", releases[version], registry.ref(f"clinic/shared:{version}"))
    _cli("pull", registry.ref("clinic/shared:1.0"))
    _small_disk(monkeypatch)
    written = _written(monkeypatch)
    got = json.loads(_cli("pull", registry.ref("clinic/shared:1.1"), "--force", "--json"))
    assert "card.toml" in got["downloaded"] and GGUF not in got["downloaded"] and got["blobs_in_store"] >= 2, got
    assert written == ["card.toml"]
    assert _verified() == "1.1" and Store().record("tiny")["previous"]["version"] == "1.0"
