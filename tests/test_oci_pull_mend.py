"""The nightly pull mends what it can: a damaged installed copy, leftover downloads, a part dated by a wrong clock.

- A model whose installed GGUF had one bit flipped failed `run` and `rollback`, yet `pull REF --force` said "already
  installed ... nothing was changed" every night (only the manifest's sha256 was compared), and `run`'s fix told a
  device that only pulls to "get a fresh copy from its maker". Now the pull verifies the installed copy first and
  installs it again from the registry, the earlier version still kept; `verify` names that pull as the fix.
- That repair wrote a good blob for the GGUF, but the version kept for rollback still linked the damaged file (one
  inode with the damaged current copy), so `rollback` failed with the digest error and told the device to ask the
  maker. Now settling an install re-links every copy in the store whose manifest expects a blob it wrote and that
  no longer hashes right (within the journal: a kill at any step leaves both copies damaged or both whole), and a
  damaged kept copy names the pull of that version as the way out.
- A repair of a damaged or missing manifest.json dropped the version kept for rollback: the new record's `previous`
  was taken from the installed copy only when its manifest still matched the index. Now reinstalling the same
  version keeps the version it kept, whatever state the installed copy is in.
- Damage only `verify --full` sees (a write below the file system, which leaves the file's stamp as it was): its
  printed fix, `pull --force`, checked the copy by the verified cache, found it whole and exited 0, so the operator
  looped. Now a hash that finds a file wrong is remembered (under every name of that file) before the error.
- A pull killed after the store made its blob (before its journal), or after the install (before the downloads were
  dropped), left the whole GGUF in downloads/ for a week: the next pull found it in the store, never fetched it, and
  dropped only what it fetched. Now every successful pull drops the downloads of the layers the store holds.
- Downloads aged out by their file times alone: a part written while the clock was days behind was dropped (fetched
  again from byte 0), and one dated in the future never aged out.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import bundle_kit
import crash_kit
import pytest
from click.testing import CliRunner
from crash_kit import KILLED

from edgemed.cli import cli

pytest.importorskip("requests")


def _cli(*args, ok: bool = True):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert (r.exit_code == 0) == ok, r.output
    return r.output


@pytest.fixture(scope="module")
def maker(tmp_path_factory):
    """The maker's key pair and the tiny bundle at versions 1.0 and 1.1 (the same GGUF, another card), both signed."""
    from edgemed.packaging import signing
    from edgemed.packaging.bundle import PackInputs, pack
    from edgemed.packaging.manifest import FileEntry, Manifest

    tmp = tmp_path_factory.mktemp("maker")
    key, pub = bundle_kit.keypair(tmp)
    src = bundle_kit.inputs(tmp / "src", extra_kv={"edgemed.test.unique": "mend"})
    src["card"].write_text(bundle_kit.CARD + 'version = "1.0"\n')
    a = tmp / "mend-1.0"
    pack(PackInputs(model=src["model"], license=src["license"], card=src["card"], name="mend"), a, as_dir=True,
         private_key=signing.load_private_key(key))
    b = tmp / "mend-1.1"
    man = Manifest.from_bytes((a / "manifest.json").read_bytes())
    text = (a / "card.toml").read_text().replace('version = "1.0"', 'version = "1.1"').encode()
    for f in man.files:
        (b / f.path).parent.mkdir(parents=True, exist_ok=True)
        (b / f.path).write_bytes(text if f.role == "card" else (a / f.path).read_bytes())
    man.files = [FileEntry(f.path, len(text), hashlib.sha256(text).hexdigest(), f.role) if f.role == "card" else f
                 for f in man.files]
    man.card = {**man.card, "version": "1.1"}
    data = man.to_bytes()
    (b / "manifest.json").write_bytes(data)
    sig = signing.sign(man, data, signing.load_private_key(key))
    (b / sig.file).write_bytes(sig.data)
    return {"pub": pub, "1.0": a, "1.1": b, "gguf": next(f for f in man.files if f.role == "model")}


@pytest.fixture
def device(registry, maker, edgemed_home):
    """This test's device home, trusting the maker for the registry; the two versions pushed as clinic/mend:1.0|1.1."""
    edgemed_home.mkdir(parents=True, exist_ok=True)
    (edgemed_home / "trust.toml").write_text(f'[registries."{registry.host}"]\nkeys = ["{maker["pub"]}"]\n')
    for tag in ("1.0", "1.1"):
        _cli("push", maker[tag], registry.ref(f"clinic/mend:{tag}"))
    return edgemed_home


def _downloads(home: Path) -> list[str]:
    """The downloads (``<sha256>`` and ``<sha256>.part``) left in ``home``'s downloads/."""
    d = home / "downloads"
    return sorted(p.name for p in d.iterdir() if len(p.name.split(".")[0]) == 64) if d.is_dir() else []


def _flip_a_bit(path: Path) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:  # in place, as a failing disk or a stray write would
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x01]))


def test_a_damaged_installed_model_is_installed_again_by_the_nightly_pull_keeping_the_earlier_version(
        registry, maker, device):
    _cli("pull", registry.ref("clinic/mend:1.0"))
    _cli("pull", registry.ref("clinic/mend:1.1"), "--force")
    _flip_a_bit(device / "store" / "models" / "mend" / maker["gguf"].path)

    from edgemed.errors import IntegrityError
    from edgemed.packaging.ref import runnable
    from edgemed.packaging.store import Store

    origin = Store().record("mend")["origin"]
    with pytest.raises(IntegrityError) as refused:  # what run loads, and its fix names the pull that mends it
        runnable("mend")
    assert f"edgemed pull {origin} --name mend --force" in refused.value.fix, refused.value.fix
    out = _cli("verify", "mend", ok=False)
    assert f"'{maker['gguf'].path}' does not match the manifest" in out, out
    assert f"edgemed pull {origin} --name mend --force" in out and "from its maker" not in out, out

    seen = len(registry.access())
    out = _cli("pull", registry.ref("clinic/mend:1.1"), "--force")
    assert "its installed copy did not verify" in out and "installed it again from the registry" in out, out
    assert "nothing was changed" not in out, out
    assert [r for r in registry.access()[seen:] if r["path"].endswith(f"sha256:{maker['gguf'].sha256}")], \
        "the GGUF was not fetched again"
    _cli("verify", "mend", "--full")
    record = Store().record("mend")
    assert record["version"] == "1.1" and record["previous"]["version"] == "1.0", record  # the rollback target stays
    assert Store().kept_version("mend") is not None

    again = json.loads(_cli("pull", registry.ref("clinic/mend:1.1"), "--force", "--json"))  # whole now: left as it is
    assert again["already_installed"] and again["repaired"] is None


def _kept_is_whole(home: Path) -> bool:
    """Whether the version kept for rollback verifies in full (every byte hashed)."""
    from edgemed.errors import IntegrityError
    from edgemed.packaging.bundle import verify_dir
    from edgemed.packaging.store import Store

    store = Store()
    kept = store.kept_version("mend")
    assert kept is not None and kept.parent.parent == home / "store" / "versions"
    try:
        verify_dir(kept, full=True, expect_manifest_sha256=store.record("mend")["previous"]["manifest_sha256"])
    except IntegrityError:
        return False
    return True


def _damaged_device(registry, maker, home: Path, damaged: str = "model") -> None:
    """1.1 installed over 1.0 (kept for rollback), then one bit flipped: in the GGUF they share (one inode), or in
    1.1's manifest.json (its own file)."""
    _cli("pull", registry.ref("clinic/mend:1.0"))
    _cli("pull", registry.ref("clinic/mend:1.1"), "--force")
    _flip_a_bit(home / "store" / "models" / "mend" / (maker["gguf"].path if damaged == "model" else "manifest.json"))
    assert _kept_is_whole(home) == (damaged != "model")  # the kept version shares the damaged GGUF


def _rolls_back_and_forth(maker, home: Path, links: int = 3) -> None:
    """Both versions run: rollback to 1.0 and back to 1.1, each verified in full, and one GGUF inode for both (and
    ``links`` names of it in all: its blob, the model and its kept version, and any other model holding it)."""
    for version in ("1.0", "1.1"):
        out = _cli("rollback", "mend")
        assert f"mend is back to {version}" in out, out
        _cli("verify", "mend", "--full")
        assert _kept_is_whole(home)
    blob = home / "store" / "blobs" / "sha256" / maker["gguf"].sha256
    assert blob.stat().st_nlink == links, "the GGUF is not one blob linked by the model and its kept version"


def test_after_the_pull_repairs_a_damaged_model_rollback_returns_to_the_kept_version_whole(registry, maker, device):
    _damaged_device(registry, maker, device)
    out = _cli("rollback", "mend", ok=False)  # refused, naming how to get the kept version again
    assert f"'{maker['gguf'].path}' does not match the manifest" in out and "from its maker" not in out, out
    assert "edgemed pull oci://" in out and "--name mend --force --allow-downgrade" in out, out

    out = _cli("pull", registry.ref("clinic/mend:1.1"), "--force")
    assert "installed it again from the registry" in out, out
    _cli("verify", "mend", "--full")
    assert _kept_is_whole(device)  # the repair mended the kept version's link too
    _rolls_back_and_forth(maker, device)


def test_a_damaged_kept_copy_alone_names_the_pull_of_that_version_which_mends_it(registry, maker, device):
    """The kept version's own file (its card, which the current one does not share) damaged: the current one verifies,
    so its pull changes nothing; rollback's refusal names the pull of the kept version, and that pull works."""
    from edgemed.packaging.store import Store

    _cli("pull", registry.ref("clinic/mend:1.0"))
    _cli("pull", registry.ref("clinic/mend:1.1"), "--force")
    card = next(f for f in Store().kept_version("mend").iterdir() if f.name == "card.toml")
    _flip_a_bit(card)
    origin = Store().record("mend")["previous"]["origin"]
    out = _cli("rollback", "mend", ok=False)
    assert "kept for rollback" in out and "from its maker" not in out, out
    fix = f"edgemed pull {origin} --name mend --force --allow-downgrade"
    assert fix in out, out
    _cli(*fix.split()[1:])
    _cli("verify", "mend", "--full")
    assert Store().record("mend")["version"] == "1.0" and _kept_is_whole(device)


@pytest.mark.parametrize("damaged", ["model", "manifest"])
def test_the_repair_killed_at_every_step_leaves_both_versions_damaged_or_both_whole(registry, maker, device, tmp_path,
                                                                                   monkeypatch, damaged):
    """After a kill at any step of the repairing pull, and a reader settling what it left: the current copy and the
    kept one are both damaged (the pull had not swapped the model in) or both whole (a damaged manifest.json is the
    current copy's alone: the kept one stays whole and kept at every step); the next pull then leaves both whole, and
    rollback goes back and forth."""
    from edgemed.packaging.oci_pull import pull

    ref = registry.ref("clinic/mend:1.1")

    def home(label: str) -> Path:
        h = tmp_path / label
        h.mkdir()
        (h / "trust.toml").write_bytes((device / "trust.toml").read_bytes())
        monkeypatch.setenv("EDGEMED_HOME", str(h))
        _damaged_device(registry, maker, h, damaged)
        index = h / "store" / "index.json"  # installed long ago: the repair's record is another, each run the same steps
        records = json.loads(index.read_text())
        records["mend"]["installed"] = "2020-01-01T00:00:00Z"
        index.write_text(json.dumps(records))
        return h

    killed, seen = set(), set()
    for n in range(1, 200):
        h = home(f"home-{n}")
        steps = tmp_path / f"steps-{n}.log"
        status = crash_kit.killed_at(lambda: pull(ref, force=True), n, steps)
        if status == 0:  # it took fewer than n steps: each one of them has been killed at
            break
        where = steps.read_text().splitlines()[-1]
        assert status == KILLED, where
        killed.add(where.split()[1])
        whole = CliRunner().invoke(cli, ["verify", "mend", "--full"]).exit_code == 0  # a reader: settles the journal
        assert _kept_is_whole(h) == (whole or damaged == "manifest"), (where, whole)
        seen.add(whole)
        out = _cli("pull", ref, "--force")
        assert ("installed it again" in out) != whole, (where, out)
        _cli("verify", "mend", "--full")
        _rolls_back_and_forth(maker, h)
        assert not (h / "store" / "journal.json").exists() and crash_kit.debris(h / "store") == [], where
    assert status == 0, "the pull never finished"
    mended = {"store.mend-link", "store.mend-replace"} if damaged == "model" else set()  # a manifest shares no blob
    assert {"atomic.exchange", "store.journal-done"} | mended <= killed, killed
    assert seen == {False, True}  # the kills straddle the swap


@pytest.mark.parametrize("how", ["flipped", "deleted"])
def test_the_repair_of_a_damaged_manifest_keeps_the_earlier_version(registry, maker, device, how):
    from edgemed.packaging.store import Store

    _cli("pull", registry.ref("clinic/mend:1.0"))
    _cli("pull", registry.ref("clinic/mend:1.1"), "--force")
    kept = Store().kept_version("mend")
    manifest = device / "store" / "models" / "mend" / "manifest.json"
    _flip_a_bit(manifest) if how == "flipped" else manifest.unlink()
    out = _cli("verify", "mend", ok=False)
    assert "edgemed pull oci://" in out and "--name mend --force" in out, out

    out = _cli("pull", registry.ref("clinic/mend:1.1"), "--force")
    assert "installed it again from the registry" in out, out
    _cli("verify", "mend", "--full")
    record = Store().record("mend")
    assert record["version"] == "1.1" and record["previous"] and record["previous"]["version"] == "1.0", record
    assert Store().kept_version("mend") == kept and _kept_is_whole(device)
    _rolls_back_and_forth(maker, device)


def test_damage_only_a_full_verify_sees_is_mended_by_the_pull_it_names(registry, maker, device):
    """A write below the file system (a failing disk) changes a file's bytes and leaves its stamp as it was, so the
    verified cache still answers for it: simulated by giving the cache's entries the file's stamp after the flip.
    `verify --full` finds it, and the fast path then sees it too, under every name of that file (another model that
    links the same GGUF): the pull `verify` names installs the model again, and that other copy is mended with it."""
    from edgemed.packaging.digest import CACHE_NAME, RACY_S, stamp
    from edgemed.packaging.store import Store

    _cli("pull", registry.ref("clinic/mend:1.0"))
    _cli("pull", registry.ref("clinic/mend:1.1"), "--force")
    _cli("pull", registry.ref("clinic/mend:1.1"), "--name", "twin")  # the same GGUF inode
    time.sleep(RACY_S + 0.2)  # old enough for the cache to hold the files' stamps
    for name in ("mend", "twin"):
        _cli("verify", name, "--full")
    gguf = device / "store" / "models" / "mend" / maker["gguf"].path
    _flip_a_bit(gguf)
    cache = device / CACHE_NAME
    entries = json.loads(cache.read_text())
    stale = {k: e for k, e in entries["entries"].items() if e["sha256"] == maker["gguf"].sha256}
    assert {Path(k).parts[-3] for k in stale} >= {"mend", "twin"}, stale
    for e in stale.values():
        e["stamp"] = list(stamp(gguf.stat()))
    cache.write_text(json.dumps(entries))
    for name in ("mend", "twin"):
        _cli("verify", name)  # the fast path cannot see it: the documented limit

    origin = Store().record("mend")["origin"]
    out = _cli("verify", "mend", "--full", ok=False)
    assert f"'{maker['gguf'].path}' does not match the manifest" in out, out
    fix = f"edgemed pull {origin} --name mend --force"
    assert fix in out, out
    for name in ("mend", "twin"):  # remembered: the fast path refuses it now, under either name
        out = _cli("verify", name, ok=False)
        assert f"'{maker['gguf'].path}' does not match the manifest" in out, out

    out = _cli(*fix.split()[1:])
    assert "installed it again from the registry" in out and "nothing was changed" not in out, out
    for name in ("mend", "twin"):
        _cli("verify", name, "--full")
    assert Store().record("mend")["previous"]["version"] == "1.0"
    _rolls_back_and_forth(maker, device, links=4)


def test_a_damaged_model_installed_from_a_bundle_names_that_bundle_in_its_fix(maker, edgemed_home):
    _cli("install", maker["1.0"], "--name", "local")
    _flip_a_bit(edgemed_home / "store" / "models" / "local" / maker["gguf"].path)
    out = _cli("verify", "local", ok=False)
    assert f"edgemed install {maker['1.0'].absolute()} --name local --force" in out, out


@pytest.mark.parametrize("where", ["the store's blobs made, before the journal", "oci.forget-download"])
def test_a_pull_killed_late_leaves_no_second_copy_once_the_next_pull_succeeds(registry, maker, device, tmp_path,
                                                                              monkeypatch, where):
    from edgemed.packaging.oci_pull import pull

    ref = registry.ref("clinic/mend:1.0")
    monkeypatch.setenv("EDGEMED_HOME", str(tmp_path / "count"))
    (tmp_path / "count").mkdir()
    (tmp_path / "count" / "trust.toml").write_bytes((device / "trust.toml").read_bytes())
    names = crash_kit.steps(lambda: pull(ref), tmp_path)
    if where == "oci.forget-download":
        at = next(i for i, line in enumerate(names, 1) if line.endswith(" oci.forget-download"))
    else:  # the step after the last blob the install makes: every blob is in the store, no journal yet
        at = 1 + max(i for i, line in enumerate(names, 1) if line.endswith(" store.blob-replace"))
    monkeypatch.setenv("EDGEMED_HOME", str(device))
    assert crash_kit.killed_at(lambda: pull(ref), at) == KILLED
    assert f"{maker['gguf'].sha256}" in _downloads(device)  # the verified GGUF, a second copy beside the store's
    assert crash_kit.killed_at(lambda: pull(ref), 0) == 0
    assert _downloads(device) == []
    _cli("verify", "mend", "--full")


def test_downloads_age_by_what_the_age_out_saw_not_by_a_clock_that_was_wrong(tmp_path, monkeypatch):
    """A part written while the clock was 8 days behind is kept (the pull resumes it), and goes only once it is left
    untouched for the whole stale time; a part dated 30 days ahead is counted from now instead of living on."""
    from edgemed.packaging import oci_pull

    root = tmp_path / "downloads"
    root.mkdir()
    behind, ahead, used = (root / f"{c * 64}.part" for c in "abc")
    now = time.time()
    for p, when in ((behind, now - 8 * 86400), (ahead, now + 30 * 86400), (used, now)):
        p.write_bytes(b"x")
        os.utime(p, (when, when))
    with oci_pull._exclusive(root):
        pass
    assert sorted(p.name for p in root.glob("*.part")) == sorted(p.name for p in (behind, ahead, used))
    assert ahead.stat().st_mtime <= time.time()  # stamped now: it ages from today

    later = now + oci_pull.STALE_DOWNLOAD_S - 3600  # not yet a week since the age-out first saw them
    monkeypatch.setattr(oci_pull.time, "time", lambda: later)
    with oci_pull._exclusive(root):
        pass
    assert behind.exists() and ahead.exists() and used.exists()

    later = now + oci_pull.STALE_DOWNLOAD_S + 3600  # a week on: the one a pull appended to meanwhile stays
    monkeypatch.setattr(oci_pull.time, "time", lambda: later)
    with open(used, "ab") as fh:
        fh.write(b"y")
    os.utime(used, (later, later))
    with oci_pull._exclusive(root):
        pass
    assert [p.name for p in root.glob("*.part")] == [used.name]
