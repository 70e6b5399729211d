"""`edgemed remove` frees space on a full disk, whatever change the store's journal waits to finish.

A clinic device whose disk filled during an install needs `edgemed remove OLD` to get room back. Settling a journal
writes the index, so on a full disk every store command used to fail there first. The disk is simulated: it is full
at the store's size when the test fills it, and takes a write of the store's files (index, journal) only where as
many bytes have been freed since (the store's files counted once per inode, as hard links share the blocks)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import bundle_kit
import crash_kit
from crash_kit import KILLED
from edgemed import env
from edgemed.cli import cli
from edgemed.packaging import store as store_mod
from edgemed.packaging.bundle import PackInputs, pack
from edgemed.packaging.store import Store

SHAS: dict[Path, str] = {}  # bundle -> sha256 of its manifest
PAD = 64 * 1024  # bytes of metadata in each bundle's GGUF: a model is far larger than the index that records it


class FullDisk:
    """The disk under the store, full from ``__init__`` on: a write of ``n`` bytes needs ``n`` bytes freed since."""

    def __init__(self, root: Path, monkeypatch):
        self.root = root
        self.mark = self.used()
        real = store_mod.write_text

        def write_text(dest, text, **kw):
            if len(text.encode("utf-8")) > self.free():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest))
            return real(dest, text, **kw)

        monkeypatch.setattr(store_mod, "write_text", write_text)
        monkeypatch.setattr(store_mod, "_free_bytes", lambda path: self.free())

    def used(self) -> int:
        seen, total = set(), 0
        for folder, _dirs, files in os.walk(self.root):
            for n in files:
                st = os.lstat(os.path.join(folder, n))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
        return total

    def free(self) -> int:
        return max(0, self.mark - self.used())


def _bundle(tmp: Path, name: str, label: str, layers: int) -> Path:
    src = bundle_kit.inputs(tmp / f"src-{name}-{label}", n_layers=layers, extra_kv={"test.pad": (name + label) * (PAD // 5)})
    out = tmp / f"{name}-{label}.edgemed"
    SHAS[out] = hashlib.sha256(pack(PackInputs(model=src["model"], license=src["license"], name=name), out).to_bytes()).hexdigest()
    return out


@pytest.fixture
def bundles(tmp_path, monkeypatch):
    """tiny v1/v2 and other v1/v2, packed at one instant (neither version older than the other)."""
    monkeypatch.setenv(env.SOURCE_DATE_EPOCH_VAR, "1735689600")
    return {(n, v): _bundle(tmp_path, n, v, layers) for n in ("tiny", "other") for v, layers in (("a", 2), ("b", 3))}


def _sha(bundle: Path) -> str:
    return SHAS[bundle]


def _stopped(kind: str, b: dict, tmp_path: Path) -> str | None:
    """Leave a journal of ``kind`` behind, killed just after its commit point (the step that needs the index write
    next); return the manifest sha256 of the 'tiny' it leaves installed (None: removed)."""
    if kind == "install":
        Store().install(b["tiny", "a"])
        fn, reset, left = (lambda: Store().install(b["tiny", "b"], force=True)), (lambda: bundle_kit.installed_alone(b["tiny", "a"])), "b"
    elif kind == "rollback":
        Store().install(b["tiny", "a"])
        Store().install(b["tiny", "b"], force=True)
        fn, reset, left = (lambda: Store().rollback("tiny")), (lambda: Store().rollback("tiny")), "a"
    else:
        Store().install(b["tiny", "a"])
        fn, reset, left = (lambda: Store().remove("tiny")), (lambda: Store().install(b["tiny", "a"])), None
    names = [s.split()[1] for s in crash_kit.steps(fn, tmp_path)]
    commit = next(c for c in ("store.remove-rename", "atomic.rename-in", "atomic.exchange") if c in names)
    reset()
    assert crash_kit.killed_at(fn, names.index(commit) + 2) == KILLED  # at the step after the commit
    assert Store().journal_path.exists()
    return _sha(b["tiny", left]) if left else None


def _consistent(store: Store) -> None:
    """Settled: no journal, nothing staged, the index names exactly the folders in models/, every blob linked."""
    assert not store.journal_path.exists()
    assert list(store.tmp.iterdir()) == []
    assert sorted(store.index()) == sorted(p.name for p in store.models.iterdir())
    assert all(b.stat().st_nlink >= 2 for b in store.blobs.iterdir())


def _tiny(expect: str | None) -> None:
    r = CliRunner().invoke(cli, ["verify", "tiny", "--full", "--json"])
    if expect is None:
        assert r.exit_code != 0 and "No model named 'tiny'" in r.output, r.output
    else:
        assert r.exit_code == 0 and json.loads(r.stdout)["manifest_sha256"] == expect, r.output


@pytest.mark.parametrize("kind,kept", [("install", True), ("rollback", True), ("remove", True), ("remove", False)])
def test_remove_frees_space_on_a_full_disk_whatever_journal_waits(bundles, tmp_path, monkeypatch, kind, kept):
    """Was: every command failed settling the journal ("cannot be finished"), so edgemed could free nothing. Now
    settling frees what its change frees before it writes the index (a remove's: the model it removed), and a remove
    that finds no room otherwise drops its own model's kept versions first (an update, or a rollback, keeps the version
    it replaced: it frees nothing)."""
    Store().install(bundles["other", "a"])
    if kept:
        Store().install(bundles["other", "b"], force=True)  # 'other' b installed, a kept for rollback
    tiny = _stopped(kind, bundles, tmp_path)
    with monkeypatch.context() as m:
        FullDisk(Store().root, m)
        r = CliRunner().invoke(cli, ["remove", "other"])
        assert r.exit_code == 0 and "removed other" in r.output, r.output
        _consistent(Store())
        assert [row["name"] for row in Store().list()] == (["tiny"] if tiny else [])
        _tiny(tiny)  # the journal's change finished as it had decided
    r = CliRunner().invoke(cli, ["list", "--json"])  # space back: nothing left to settle
    assert r.exit_code == 0, r.output
    _consistent(Store())
    _tiny(tiny)


def test_the_journal_of_the_model_removed_is_settled_on_a_full_disk(bundles, tmp_path, monkeypatch):
    """The model whose update filled the disk is the one removed: its replaced copy, kept for rollback, makes room."""
    _stopped("install", bundles, tmp_path)
    with monkeypatch.context() as m:
        FullDisk(Store().root, m)
        r = CliRunner().invoke(cli, ["remove", "tiny"])
        assert r.exit_code == 0 and "removed tiny" in r.output, r.output
        _consistent(Store())
    _tiny(None)
    assert Store().index() == {} and list(Store().blobs.iterdir()) == []


@pytest.mark.parametrize("journal", [True, False])
def test_a_disk_with_no_room_to_free_is_refused_naming_it_and_the_fix(bundles, tmp_path, monkeypatch, journal):
    """'other' has no kept version and the waiting change (an update, which keeps the version it replaced) frees
    nothing: the refusal names the full disk, its free bytes, the bytes wanted and the fix. Was: "No space left on
    the disk while writing ..." with no word of what frees it. Nothing is lost; with space back, everything settles."""
    Store().install(bundles["other", "a"])
    tiny = _stopped("install", bundles, tmp_path) if journal else None
    if not journal:
        Store().install(bundles["tiny", "a"])
        tiny = _sha(bundles["tiny", "a"])
    root = Store().root
    with monkeypatch.context() as m:
        FullDisk(root, m)
        r = CliRunner().invoke(cli, ["remove", "other"])
        assert r.exit_code == 1, r.output
        said = " ".join(r.output.split())
        assert f"The disk holding the model store {root} is full (0 bytes free" in said, said
        assert "Fix: free space on that disk outside the store (at least" in said and f"df -h {root}" in said, said
        if journal:
            assert "the install or rollback of 'tiny'" in said and "run `edgemed list` once" in said, said
        else:
            assert "nothing was removed" in said and "run `edgemed remove other` again" in said, said
        assert Store().journal_path.exists() == journal
        assert sorted(row["name"] for row in Store().list()) == ["other", "tiny"]  # read through the journal
        _tiny(tiny)
    r = CliRunner().invoke(cli, ["list", "--json"])  # space back: the reader settles the journal
    assert r.exit_code == 0 and sorted(row["name"] for row in json.loads(r.stdout)) == ["other", "tiny"], r.output
    _consistent(Store())
    _tiny(tiny)
    r = CliRunner().invoke(cli, ["remove", "other"])
    assert r.exit_code == 0, r.output
    _consistent(Store())


def test_a_remove_that_dropped_the_kept_version_and_still_found_no_room_says_rollback_is_gone(bundles, monkeypatch):
    """The kept version of the model being removed goes first on a full disk; when even that is not room enough the
    model stays installed, and the refusal says it can no longer be rolled back (its kept copy is gone)."""
    Store().install(bundles["other", "a"])
    Store().install(bundles["other", "b"], force=True)  # keeps "a" for rollback
    assert Store().kept_version("other") is not None
    with monkeypatch.context() as m:
        disk = FullDisk(Store().root, m)
        disk.mark -= 10**9  # a gigabyte short: dropping the kept version is not enough
        r = CliRunner().invoke(cli, ["remove", "other"])
        assert r.exit_code == 1, r.output
        said = " ".join(r.output.split())
        assert "'other' is still installed, and can no longer be rolled back" in said, said
        assert Store().kept_version("other") is None
        assert [row["name"] for row in Store().list()] == ["other"]
    r = CliRunner().invoke(cli, ["remove", "other"])  # space back
    assert r.exit_code == 0, r.output
    _consistent(Store())
