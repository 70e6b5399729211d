"""What the store and edgemed's state files write survives a power cut: every file is synced before the rename that
names it and its folder after, and a staged model is on disk before the journal names it and the swap puts it in
``models/``. A rename onto a new name whose data was never synced (ext4's ``auto_da_alloc`` does not cover it) reads
back empty after a power cut: an empty journal is set aside, and the old copy it described swept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgemed.files import state
from edgemed.packaging import store as store_module
from edgemed.packaging.manifest import MANIFEST
from edgemed.packaging.store import Store

import bundle_kit  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names a synced descriptor through /proc")


def _record_syncs(monkeypatch) -> list:
    """Every ``os.fsync`` from now on, as ("fsync", the path its descriptor names), in the order made."""
    events: list = []
    real = os.fsync

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return events


def _before(events: list, mark: str) -> list[str]:
    """The paths synced before the first ``mark`` event."""
    cut = next(i for i, e in enumerate(events) if e[0] == mark)
    return [path for kind, path in events[:cut] if kind == "fsync"]


def test_state_replace_syncs_the_file_then_its_folder(tmp_path, monkeypatch):
    events = _record_syncs(monkeypatch)
    real_replace = os.replace

    def replace(a, b):
        events.append(("rename", str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "made.json"
    state.replace(target, "{}\n")

    assert target.read_text() == "{}\n"
    assert [e[0] for e in events] == ["fsync", "rename", "fsync"]
    synced_file, synced_folder = events[0][1], events[2][1]
    assert Path(synced_file).parent == tmp_path and Path(synced_file).name.startswith(".made.json.")
    assert synced_folder == str(tmp_path)


def test_install_force_syncs_the_staged_files_and_the_journal_before_the_swap(tmp_path, monkeypatch):
    bundles = bundle_kit.two_versions(tmp_path)
    store = Store()
    store.install(bundles["old"][0])
    events = _record_syncs(monkeypatch)
    real_swap = store_module.swap_in

    def swap_in(new, dest, aside):
        events.append(("swap", str(dest)))
        return real_swap(new, dest, aside)

    monkeypatch.setattr(store_module, "swap_in", swap_in)
    held = {p.name for p in store.blobs.iterdir()}  # linked, not written: each was synced when its blob was made
    _, man, _ = store.install(bundles["new"][0], force=True)

    synced = _before(events, "swap")
    root, tmp = str(store.root), str(store.tmp)
    journal_tmp = [i for i, p in enumerate(synced) if Path(p).parent == store.root and Path(p).name.startswith(".journal.json.")]
    assert journal_tmp, f"the journal's temporary file was not synced before the swap: {synced}"
    assert root in synced[journal_tmp[-1] + 1:], "the store's folder was not synced after the journal's rename"
    staged = [p for p in synced if p.startswith(tmp + os.sep)]
    assert {f.path for f in man.files if f.sha256 in held} == {"LICENSE"}  # the one file 'old' and 'new' share
    for rel in [f.path for f in man.files if f.sha256 not in held] + [MANIFEST]:
        assert any(p.endswith(os.sep + rel) for p in staged), f"staged '{rel}' was not synced before the swap: {staged}"
    stage_folders = {str(Path(p).parent) for p in staged if p.endswith(os.sep + MANIFEST)}
    assert stage_folders and all(f in synced for f in stage_folders), "the stage folder's entries were not synced"
    assert str(store.blobs) in synced and tmp in synced
