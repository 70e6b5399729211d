"""Update and rollback: installing a new version of a name keeps the previous one (hard links to the same blobs,
no extra disk); `edgemed rollback NAME` returns to it atomically, under the store's journal, and a kill at every
step of an update or a rollback leaves a runnable model."""

from __future__ import annotations

import hashlib
import json

import bundle_kit
import crash_kit
import pytest
from click.testing import CliRunner
from crash_kit import KILLED

from edgemed.cli.store import rollback as rollback_cmd
from edgemed.errors import StoreError
from edgemed.files import atomic
from edgemed.packaging.ref import runnable
from edgemed.packaging.store import Store


@pytest.fixture
def bundles(tmp_path, edgemed_home):
    return bundle_kit.two_versions(tmp_path)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _current() -> str:
    return _sha((Store().models / "tiny" / "manifest.json").read_bytes())


def _runnable() -> None:
    ref = runnable("tiny", full=True)  # what `edgemed run tiny` loads, every byte re-hashed
    assert ref.model_path.is_file()


def _assert_clean(store: Store) -> None:
    assert not (store.root / "journal.json").exists()
    assert list(store.tmp.iterdir()) == []
    assert all(b.stat().st_nlink >= 2 for b in store.blobs.iterdir())  # every blob linked by a model or a kept version


def test_update_keeps_the_previous_version_and_rollback_returns_to_it(bundles):
    old, new = _sha(bundles["old"][1]), _sha(bundles["new"][1])
    s = Store()
    s.install(bundles["old"][0])
    usage_old = s.disk_usage()
    s.install(bundles["new"][0], force=True)
    assert _current() == new
    kept = s.versions / "tiny" / old
    assert (kept / "manifest.json").read_bytes() == bundles["old"][1]
    # the kept version's files are the blobs themselves: disk usage counts each once, and gc keeps them
    for f in json.loads(bundles["old"][1])["files"]:
        assert (kept / f["path"]).stat().st_ino == (s.blobs / f["sha256"]).stat().st_ino
    blobs = {b.name for b in s.blobs.iterdir()}
    assert {f["sha256"] for f in json.loads(bundles["old"][1])["files"]} <= blobs
    assert s.disk_usage() == sum((s.blobs / b).stat().st_size for b in blobs) > usage_old
    row = s.list()[0]
    assert row["digest"] == f"sha256:{new}" and row["previous"]["digest"] == f"sha256:{old}"

    r = CliRunner().invoke(rollback_cmd, ["tiny"])
    assert r.exit_code == 0 and f"sha256:{old[:12]}" in r.output and f"kept sha256:{new[:12]}" in r.output, r.output
    assert _current() == old and (s.versions / "tiny" / new).is_dir() and not kept.exists()
    _runnable()
    r = CliRunner().invoke(rollback_cmd, ["tiny"])  # and back again
    assert r.exit_code == 0 and _current() == new
    _runnable()
    _assert_clean(s)

    s.remove("tiny")  # a remove drops the kept versions and frees their blobs
    assert not (s.versions / "tiny").exists() and list(s.blobs.iterdir()) == []


def test_rollback_with_nothing_kept_is_refused_with_the_fix(bundles):
    Store().install(bundles["old"][0])
    # the command table turns an EdgemedError into "Error: ... Fix: ..."; invoked directly, the error itself comes back
    r = CliRunner().invoke(rollback_cmd, ["tiny"])
    assert isinstance(r.exception, StoreError) and "No earlier version of 'tiny' is kept" in str(r.exception), r.exception
    assert "edgemed install BUNDLE --name tiny --force" in r.exception.fix
    r = CliRunner().invoke(rollback_cmd, ["absent"])
    assert isinstance(r.exception, StoreError) and "No model named 'absent'" in str(r.exception), r.exception


def test_a_damaged_kept_version_is_refused_and_the_current_one_stays(bundles):
    s = Store()
    s.install(bundles["old"][0])
    s.install(bundles["new"][0], force=True)
    kept = s.versions / "tiny" / _sha(bundles["old"][1])
    lic = kept / "LICENSE"
    data = lic.read_bytes()
    lic.unlink()  # not the blob: the kept folder's own link goes, then a changed file takes its place
    lic.write_bytes(data + b"x")
    with pytest.raises(Exception, match="LICENSE"):
        s.rollback("tiny")
    assert _current() == _sha(bundles["new"][1])
    _runnable()


def test_reinstalling_the_same_version_keeps_the_earlier_one(bundles):
    s = Store()
    s.install(bundles["old"][0])
    s.install(bundles["new"][0], force=True)
    s.install(bundles["new"][0], force=True)  # the same version again: 'old' stays the one to return to
    assert s.list()[0]["previous"]["digest"] == f"sha256:{_sha(bundles['old'][1])}"
    s.rollback("tiny")
    assert _current() == _sha(bundles["old"][1])


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
@pytest.mark.parametrize("op", ["update", "rollback"])
def test_killed_at_every_step_leaves_a_runnable_model(bundles, tmp_path, monkeypatch, exchange, op):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    old, new = _sha(bundles["old"][1]), _sha(bundles["new"][1])

    def start():  # 'old' installed and 'new' over it: new current, old kept; settled
        s = Store()
        s.remove("tiny") if (s.models / "tiny").exists() else None
        s.install(bundles["old"][0])
        if op == "rollback":
            s.install(bundles["new"][0], force=True)

    def run():
        if op == "update":
            Store().install(bundles["new"][0], force=True)
        else:
            Store().rollback("tiny")

    start()
    names = crash_kit.steps(run, tmp_path)
    assert any("store.keep-version" in n for n in names), names
    seen = set()
    for n in range(1, len(names) + 1):
        start()
        where = names[n - 1]
        assert crash_kit.killed_at(run, n) == KILLED, where
        _runnable()  # a reader settles the dead operation; the model loads
        cur = _current()
        seen.add(cur)
        with Store().locked():
            pass
        _assert_clean(Store())
        rec = Store().index()["tiny"]
        assert rec["manifest_sha256"] == cur, where
        other = new if cur == old else old
        prev = rec.get("previous")
        if prev is not None:  # a kept version is the other one, whole, and rollback returns to it
            assert prev["manifest_sha256"] == other and Store().kept_version("tiny") is not None, where
        elif op == "rollback":
            raise AssertionError(f"killed at {where}: the version rolled back from was lost")
        else:
            assert cur == old, where  # the update did not happen: nothing to keep yet
    assert seen == {old, new}  # the kills straddle the commit point


def test_a_linked_versions_folder_is_never_written_through(bundles, tmp_path):
    """versions/<name> replaced by a link to a folder elsewhere: the update keeps nothing through it (the replaced
    copy is discarded as before), and rollback finds nothing there."""
    s = Store()
    s.install(bundles["old"][0])
    outside = tmp_path / "outside"
    outside.mkdir()
    s.versions.mkdir(parents=True, exist_ok=True)
    (s.versions / "tiny").symlink_to(outside)
    s.install(bundles["new"][0], force=True)
    assert list(outside.iterdir()) == [] and _current() == _sha(bundles["new"][1])
    with pytest.raises(StoreError, match="No earlier version"):
        s.rollback("tiny")
    _runnable()
    _assert_clean(s)
