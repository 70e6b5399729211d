"""The swap at the end of every output: durable across a power cut, never deleting what was not approved, never
leaving the old output hidden or renamed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from edgemed.files import atomic, debris

import crash_kit  # noqa: E402

_RENAMES = ("atomic.rename-new", "atomic.rename", "atomic.replace", "atomic.exchange")


def _record_syncs(monkeypatch) -> list[tuple]:
    """Every fsync, as ("sync", (dev, ino)), and every rename step, as ("step", name), in order."""
    events: list[tuple] = []
    real_fsync, real_step = os.fsync, atomic.step

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("sync", (st.st_dev, st.st_ino)))
        return real_fsync(fd)

    def step(what):
        if what in _RENAMES:
            events.append(("step", what))
        return real_step(what)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(atomic, "step", step)
    return events


def _ident(path: Path) -> tuple:
    st = os.lstat(path)
    return (st.st_dev, st.st_ino)


@pytest.mark.parametrize("force", [False, True], ids=["new", "replace"])
def test_a_file_output_is_synced_before_its_rename_and_its_folder_after(tmp_path, monkeypatch, force):
    """Nothing written through atomic_path was fsynced: a power cut after the rename could leave an empty file where
    the old one was."""
    dest = tmp_path / "report.json"
    if force:
        dest.write_text("old")
    events = _record_syncs(monkeypatch)
    with atomic.atomic_path(dest, force=force) as tmp:
        tmp.write_text("new")
        written = _ident(tmp)
    rename = next(i for i, e in enumerate(events) if e[0] == "step")
    assert ("sync", written) in events[:rename], events
    assert ("sync", _ident(tmp_path)) in events[rename:], events
    assert dest.read_text() == "new" and _ident(dest) == written


@pytest.mark.parametrize("force", [False, True], ids=["new", "replace"])
def test_a_directory_output_is_synced_file_by_file_then_its_folder(tmp_path, monkeypatch, force):
    dest = tmp_path / "model-onnx"

    def write(text):
        with atomic.atomic_path(dest, force=True, kind="onnx") as tmp:
            (tmp / "sub").mkdir(parents=True)
            (tmp / "model.onnx").write_text(text)
            (tmp / "sub" / "weights.bin").write_text(text)
            return tmp, [_ident(p) for p in (tmp / "model.onnx", tmp / "sub" / "weights.bin", tmp / "sub", tmp)]

    if force:
        write("old")
    events = _record_syncs(monkeypatch)
    _, inside = write("new")
    rename = next(i for i, e in enumerate(events) if e[0] == "step")
    before = events[:rename]
    assert all(("sync", ident) in before for ident in inside), events
    assert before.index(("sync", inside[-1])) > before.index(("sync", inside[0]))  # the folder after its files
    assert ("sync", _ident(tmp_path)) in events[rename:], events
    assert (dest / "sub" / "weights.bin").read_text() == "new" and crash_kit.debris(tmp_path) == []


def test_a_pair_of_outputs_is_all_synced_before_the_first_rename(tmp_path, monkeypatch):
    events = _record_syncs(monkeypatch)
    with atomic.atomic_paths([tmp_path / "k.pem", tmp_path / "k.pub.pem"]) as (a, b):
        a.write_text("private")
        b.write_text("public")
        idents = [_ident(a), _ident(b)]
    first = next(i for i, e in enumerate(events) if e[0] == "step")
    assert all(("sync", ident) in events[:first] for ident in idents), events
    assert events[-1] == ("sync", _ident(tmp_path)), events  # after the last rename
    assert debris.sweep(tmp_path) == [] and crash_kit.debris(tmp_path) == []


# -- two renames (no RENAME_EXCHANGE: macOS, NFS, CIFS, FUSE) ---------------------------------------------------
def _onnx_dir(dest: Path, text: str, force: bool = False) -> None:
    with atomic.atomic_path(dest, force=force, kind="onnx") as tmp:
        tmp.mkdir()
        (tmp / "model.onnx").write_text(text)


def _old_output(parent: Path) -> Path:
    """An ONNX output edgemed made in a new folder ``parent``, holding "old"."""
    parent.mkdir()
    _onnx_dir(parent / "model-onnx", "old")
    return parent / "model-onnx"


def _replaced_while_notes_are_added(dest: Path, exchange: bool = True):
    """What a killed child runs: ``dest`` replaced by a new ONNX output while the user adds notes to the old one at
    the swap's exchange step (the race that makes the swap put the old folder back); ``exchange`` False: a file system
    without renameat2's exchange (two renames)."""
    def go():
        real_step = atomic.step

        def step(what):
            if what == "atomic.exchange":
                (dest / "clinic-notes.txt").write_text("the user's")
            real_step(what)

        atomic.step = step
        if not exchange:
            atomic._exchange = lambda a, b: False
        _onnx_dir(dest, "new", force=True)
    return go


def test_an_interrupt_between_the_two_renames_puts_the_old_output_back(tmp_path, monkeypatch):
    """The error handler discarded the new temporary but left the old output at its aside name for good (and took
    the lock file that would have let a sweep restore it)."""
    dest = tmp_path / "model-onnx"
    _onnx_dir(dest, "old")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_step = atomic.step

    def step(what):
        if what == "atomic.rename-in":
            raise KeyboardInterrupt
        real_step(what)

    monkeypatch.setattr(atomic, "step", step)
    with pytest.raises(KeyboardInterrupt):
        _onnx_dir(dest, "new", force=True)
    assert (dest / "model.onnx").read_text() == "old"
    assert crash_kit.debris(tmp_path) == []
    monkeypatch.setattr(atomic, "step", real_step)
    _onnx_dir(dest, "new", force=True)  # still edgemed's, unchanged: replaced
    assert (dest / "model.onnx").read_text() == "new" and crash_kit.debris(tmp_path) == []


@pytest.mark.parametrize("after", [1, 2], ids=["after-the-first-rename", "after-the-second-rename"])
def test_a_stop_at_each_instant_of_the_two_renames_leaves_old_or_new_and_is_still_a_stop(tmp_path, monkeypatch, after):
    """A stop (SIGTERM, Ctrl-C) raised just after the second rename, still inside its ``try``, renamed the old copy
    back onto the new, non-empty folder: an OSError took the stop's place and the old copy stayed aside. Stopped just
    after either rename, the stop is raised as it came and the destination holds the old folder (the new one still
    at its temporary name) or the new one (the old one at the aside, as a swap that finished returns it)."""
    new, dest, aside = tmp_path / "new", tmp_path / "dest", tmp_path / "aside"
    for folder, text in ((new, "new"), (dest, "old")):
        folder.mkdir()
        (folder / "model.onnx").write_text(text)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename, renames = os.rename, []

    def rename(src, dst):
        real_rename(src, dst)
        renames.append(dst)
        if len(renames) == after:  # the signal handler runs once the rename's call has returned
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        atomic.swap_in(new, dest, aside)
    monkeypatch.setattr(os, "rename", real_rename)
    held = {p.name: (p / "model.onnx").read_text() for p in tmp_path.iterdir()}
    assert held == ({"dest": "old", "new": "new"} if after == 1 else {"dest": "new", "aside": "old"}), held


def test_the_lock_file_stays_while_its_owners_debris_does(tmp_path):
    """owned() unlinked its lock file whatever debris it left, and a sweep leaves debris without a lock alone: an
    aside that could not be put back was hidden for good."""
    out = tmp_path / "b"
    out.mkdir()
    (out / "manifest.json").write_text("old")

    def leave_an_aside():
        with debris.owned(tmp_path):
            os.rename(out, debris.debris_path(tmp_path, "b", debris.ASIDE))

    assert crash_kit.killed_at(leave_an_aside, 0) == 0  # it ends normally, its aside left
    assert len(crash_kit.owners(tmp_path)) == 1 and len(crash_kit.debris(tmp_path)) == 2  # the aside and its lock
    debris.sweep(tmp_path)
    assert (out / "manifest.json").read_text() == "old" and crash_kit.debris(tmp_path) == []


def test_a_long_named_output_is_never_restored_under_a_shortened_name(tmp_path, monkeypatch):
    """An aside's name keeps 120 characters of the output's: a kill between the two renames of a 130-character
    bundle folder brought the old bundle back under its first 120 characters."""
    import bundle_kit
    from edgemed.errors import OutputError
    from edgemed.packaging.bundle import PackInputs, pack, read_manifest

    src = bundle_kit.inputs(tmp_path / "src")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / ("b" * 130)
    pack(PackInputs(model=src["model"], license=src["license"], name="old"), out, as_dir=True)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)

    def run():
        pack(PackInputs(model=src["model"], license=src["license"], name="new"), out, as_dir=True, force=True)

    log = tmp_path / "steps.log"
    crash_kit.killed_at(run, 0, log)
    names = log.read_text().splitlines()
    for n in range(1, len(names) + 1):  # a kill at each step (at the rename-in step, where the old code had one)
        crash_kit.killed_at(run, n)
        debris.sweep(out_dir)
        assert os.listdir(out_dir) == [out.name], names[n - 1]
    with pytest.raises(OutputError, match="at most 120 characters"):
        run()
    assert os.listdir(out_dir) == [out.name] and crash_kit.debris(tmp_path) == []
    assert read_manifest(out)[0].name == "old"


# -- what is swapped out is what was approved -------------------------------------------------------------------
def _race(monkeypatch, at: str, act) -> None:
    """Run ``act()`` at the step ``at`` of the next replacement (once)."""
    real_step = atomic.step
    done = []

    def step(what):
        if what == at and not done:
            done.append(what)
            act()
        real_step(what)

    monkeypatch.setattr(atomic, "step", step)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
@pytest.mark.parametrize("at", ["atomic.exchange", "atomic.discard-old"], ids=["before-swap", "before-discard"])
def test_notes_added_to_the_old_output_during_the_swap_are_kept(tmp_path, monkeypatch, exchange, at):
    """A file the user added after the last ownership check went with the old folder into rmtree."""
    from edgemed.errors import OutputExists

    dest = tmp_path / "model-onnx"
    _onnx_dir(dest, "old")
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)

    def add_notes():  # into the old folder, wherever it is now (at its name, or swapped out to a debris name)
        old = dest if at == "atomic.exchange" else next(p for p in tmp_path.iterdir() if debris.is_debris(p)
                                                        and p.is_dir() and (p / "model.onnx").read_text() == "old")
        (old / "clinic-notes.txt").write_text("the user's")

    _race(monkeypatch, at, add_notes)
    with pytest.raises(OutputExists, match="changed while edgemed was replacing it"):
        _onnx_dir(dest, "new", force=True)
    assert (dest / "clinic-notes.txt").read_text() == "the user's" and (dest / "model.onnx").read_text() == "old"
    assert crash_kit.debris(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_users_folder_put_at_the_output_during_the_swap_is_kept(tmp_path, monkeypatch, exchange):
    from edgemed.errors import OutputExists

    dest = tmp_path / "model-onnx"
    _onnx_dir(dest, "old")
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)

    def swap_a_users_folder_in():
        os.rename(dest, tmp_path / "moved")
        dest.mkdir()
        (dest / "clinic-notes.txt").write_text("the user's")

    _race(monkeypatch, "atomic.exchange", swap_a_users_folder_in)
    with pytest.raises(OutputExists, match="changed while edgemed was replacing it"):
        _onnx_dir(dest, "new", force=True)
    assert os.listdir(dest) == ["clinic-notes.txt"] and (dest / "clinic-notes.txt").read_text() == "the user's"
    assert crash_kit.debris(tmp_path) == []


def test_a_users_folder_put_where_a_file_output_was_is_kept(tmp_path, monkeypatch):
    """A file output replaced with --force: a folder put at its name before the swap was exchanged out and deleted."""
    from edgemed.errors import OutputExists

    dest = tmp_path / "report"
    dest.write_text("old")

    def swap_a_users_folder_in():
        dest.unlink()
        dest.mkdir()
        (dest / "clinic-notes.txt").write_text("the user's")

    _race(monkeypatch, "atomic.exchange", swap_a_users_folder_in)
    with pytest.raises(OutputExists, match="changed while edgemed was replacing it"):
        with atomic.atomic_path(dest, force=True) as tmp:
            tmp.mkdir()  # a folder output given no kind is swapped in, not os.replace'd
            (tmp / "x").write_text("new")
    assert (dest / "clinic-notes.txt").read_text() == "the user's" and crash_kit.debris(tmp_path) == []


def test_a_folder_sync_the_disk_fails_is_not_hidden(tmp_path, monkeypatch):
    """A folder's fsync that fails with EIO means the rename may not be on disk: it was swallowed with every other
    error of the folder's sync, and the command said it had written its output."""
    import errno
    import os

    from edgemed.files import durable

    def eio(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OSError) as e:
        durable.sync_folder(tmp_path)
    assert e.value.errno == errno.EIO
    durable.sync_folder(tmp_path / "gone")  # a folder that is not there any more: nothing to sync, no error
    (tmp_path / "link").symlink_to(tmp_path)
    durable.sync_folder(tmp_path / "link")  # a link where the folder was: never followed, no error


# -- a stop the instant a swap is done, before it is recorded ---------------------------------------------------
def _stop_after(monkeypatch, exchanges: int = 0, renames: int = 0) -> None:
    """Raise KeyboardInterrupt (a stop: Ctrl-C, SIGTERM) just after the ``exchanges``-th exchange, or the
    ``renames``-th rename of a replacement, has succeeded: the call done, before the code that made it goes on."""
    real_exchange, real_rename, done = atomic._exchange, os.rename, {"exchange": 0, "rename": 0}

    def exchange(a, b):
        if exchanges == 0:
            return False  # two renames, as on a file system without RENAME_EXCHANGE
        swapped = real_exchange(a, b)
        done["exchange"] += 1
        if swapped and done["exchange"] == exchanges:
            raise KeyboardInterrupt
        return swapped

    def rename(a, b):
        real_rename(a, b)
        if debris.is_debris(a) or debris.is_debris(b):  # the replacement's renames, not a test's own
            done["rename"] += 1
            if done["rename"] == renames:
                raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "_exchange", exchange)
    monkeypatch.setattr(os, "rename", rename)


_STOPS = {"exchange": {"exchanges": 1}, "put-back-exchange": {"exchanges": 2},
          "second-rename": {"renames": 2}, "put-back-first-rename": {"renames": 3},
          "put-back-second-rename": {"renames": 4}}


@pytest.mark.parametrize("stop", list(_STOPS))
def test_a_stop_just_after_a_swap_never_deletes_a_changed_old_folder(tmp_path, monkeypatch, stop):
    """A stop right after the exchange, before ``swap_in`` returned, left the old folder at the temporary's name, and
    the error path deleted every temporary it found: the user's notes in the old folder went with it, unchecked (and a
    stop just after the exchange that puts it back took them the same way). Stopped at each such instant, the changed
    old folder is back at its name, whole, and nothing of edgemed's is left."""
    dest = tmp_path / "model-onnx"
    _onnx_dir(dest, "old")

    def add_notes():  # into the old folder, wherever it is now (at its name, or swapped out to a debris name)
        old = next(p for p in [dest, *tmp_path.iterdir()] if (p / "model.onnx").is_file()
                   and (p / "model.onnx").read_text() == "old")
        (old / "clinic-notes.txt").write_text("the user's")

    # before the swap (put back at once), or after it and before the old folder is discarded (put back in settling)
    _race(monkeypatch, "atomic.discard-old" if stop.startswith("put-back") else "atomic.exchange", add_notes)
    _stop_after(monkeypatch, **_STOPS[stop])
    with pytest.raises(KeyboardInterrupt):
        _onnx_dir(dest, "new", force=True)
    assert (dest / "clinic-notes.txt").read_text() == "the user's" and (dest / "model.onnx").read_text() == "old"
    assert crash_kit.debris(tmp_path) == []


@pytest.mark.parametrize("stop", ["exchange", "second-rename"])
def test_a_stop_just_after_a_swap_never_deletes_a_users_folder_put_there(tmp_path, monkeypatch, stop):
    dest = tmp_path / "model-onnx"
    _onnx_dir(dest, "old")

    def swap_a_users_folder_in():
        os.rename(dest, tmp_path / "moved")
        dest.mkdir()
        (dest / "clinic-notes.txt").write_text("the user's")

    _race(monkeypatch, "atomic.exchange", swap_a_users_folder_in)
    _stop_after(monkeypatch, **_STOPS[stop])
    with pytest.raises(KeyboardInterrupt):
        _onnx_dir(dest, "new", force=True)
    assert os.listdir(dest) == ["clinic-notes.txt"] and (dest / "clinic-notes.txt").read_text() == "the user's"
    assert crash_kit.debris(tmp_path) == []


@pytest.mark.parametrize("stop", ["exchange", "second-rename"])
def test_a_stop_just_after_a_swap_replaces_an_unchanged_edgemed_folder_as_a_finished_one_does(tmp_path, monkeypatch,
                                                                                               stop):
    """The approved old output (edgemed's, unchanged) is discarded as on success: the new output stays in place, the
    stop is still raised, and no temporary is left."""
    dest = tmp_path / "model-onnx"
    _onnx_dir(dest, "old")
    _stop_after(monkeypatch, **_STOPS[stop])
    with pytest.raises(KeyboardInterrupt):
        _onnx_dir(dest, "new", force=True)
    assert os.listdir(dest) == ["model.onnx"] and (dest / "model.onnx").read_text() == "new"
    assert crash_kit.debris(tmp_path) == []


def test_a_stop_while_an_approved_old_folder_is_deleted_leaves_the_new_output(tmp_path, monkeypatch):
    """A stop in the middle of deleting the approved old folder: the error path found it changed (half deleted), so
    not approved, and put it back over the finished new output, which it then deleted: neither old nor new was left.
    Now the new output stays, and what is left of the old one is debris for the next sweep."""
    dest = tmp_path / "model-onnx"
    with atomic.atomic_path(dest, kind="onnx") as tmp:
        (tmp / "sub").mkdir(parents=True)
        (tmp / "model.onnx").write_text("old")
        (tmp / "sub" / "weights.bin").write_text("old")
    real_discard = atomic.discard

    def discard(path):
        if (path / "sub").is_dir():  # the old folder: one file goes, then the stop
            (path / "sub" / "weights.bin").unlink()
            raise KeyboardInterrupt
        real_discard(path)

    monkeypatch.setattr(atomic, "discard", discard)
    with pytest.raises(KeyboardInterrupt):
        _onnx_dir(dest, "new", force=True)
    assert os.listdir(dest) == ["model.onnx"] and (dest / "model.onnx").read_text() == "new"
    left = [d for d in crash_kit.debris(tmp_path) if not d.endswith(".lock")]
    assert len(left) == 1 and (tmp_path / left[0] / "model.onnx").read_text() == "old", left



# -- a stop while the error path puts the old output back ------------------------------------------------------
def _stops(monkeypatch, exchange: bool, at: set[str], race: str | None = None, act=None) -> list[str]:
    """Raise KeyboardInterrupt (a stop) once at each event named in ``at``: a step ("atomic.put-back", as it is
    reached), or "exchange N" / "rename N" (just after the N-th exchange, or rename of a replacement, has succeeded);
    without ``exchange``, folders are swapped in two renames. ``act()`` runs once at the step ``race``, before any stop
    there. Returns the events that stopped, in order."""
    real_step, real_exchange, real_rename = atomic.step, atomic._exchange, os.rename
    counts, fired, raced = {"exchange": 0, "rename": 0}, [], []

    def stop(event):
        if event in at and event not in fired:
            fired.append(event)
            raise KeyboardInterrupt

    def step(what):
        if what == race and not raced:
            raced.append(what)
            act()
        stop(what)
        real_step(what)

    def exchanged(a, b):
        if not exchange or not real_exchange(a, b):
            return False
        counts["exchange"] += 1
        stop(f"exchange {counts['exchange']}")
        return True

    def rename(a, b):
        real_rename(a, b)
        if debris.is_debris(a) or debris.is_debris(b):  # the replacement's renames, not a test's own
            counts["rename"] += 1
            stop(f"rename {counts['rename']}")

    monkeypatch.setattr(atomic, "step", step)
    monkeypatch.setattr(atomic, "_exchange", exchanged)
    monkeypatch.setattr(os, "rename", rename)
    return fired


#: each instant of a put-back: the steps before it, after its exchange, after each of its two renames (the swap's own
#: renames are the first two)
_PUT_BACK = {True: ["atomic.discard-old", "atomic.put-back", "exchange 2"],
             False: ["atomic.discard-old", "atomic.put-back", "rename 3", "atomic.put-back-aside", "rename 4"]}


@pytest.mark.parametrize("exchange,first,second", [(x, f, s) for x in (True, False) for f in ("changed", "stop")
                                                   for s in _PUT_BACK[x]],
                         ids=lambda v: {True: "renameat2", False: "two-renames"}[v] if isinstance(v, bool) else v)
def test_a_stop_while_the_error_path_puts_the_old_output_back_still_leaves_it_in_place(tmp_path, monkeypatch, exchange,
                                                                                       first, second):
    """The error path (after a change found once the swap was done, or after a stop just after it) put the changed
    old folder back, and a stop inside that put-back went out with it half done: the old folder, with the user's
    notes, stayed at the temporary's name for the next sweep to delete, or the destination stayed empty. Now the
    put-back is finished and the stop is raised after it: the old folder at its name, whole, nothing of edgemed's
    left."""
    dest = tmp_path / "model-onnx"
    _onnx_dir(dest, "old")

    def add_notes():  # into the old folder, wherever it is now (at its name, or swapped out to a debris name)
        old = next(p for p in [dest, *tmp_path.iterdir()] if (p / "model.onnx").is_file()
                   and (p / "model.onnx").read_text() == "old")
        (old / "clinic-notes.txt").write_text("the user's")

    # "changed": notes added before the swap, found after it (OutputExists, put back by the error path); "stop": a
    # stop just after the swap, notes added before the error path looks at what it took out
    swapped = "exchange 1" if exchange else "rename 2"
    fired = _stops(monkeypatch, exchange, {second} | ({swapped} if first == "stop" else set()),
                   "atomic.exchange" if first == "changed" else "atomic.discard-old", add_notes)
    with pytest.raises(KeyboardInterrupt):
        _onnx_dir(dest, "new", force=True)
    assert fired == ([swapped] if first == "stop" else []) + [second]
    assert (dest / "clinic-notes.txt").read_text() == "the user's" and (dest / "model.onnx").read_text() == "old"
    assert crash_kit.debris(tmp_path) == []


def test_a_second_stop_between_the_two_renames_never_leaves_the_destination_empty(tmp_path, monkeypatch):
    """A stop just after the first of the two renames, then another before ``swap_in`` renamed the old folder back:
    the error path found the old folder at the aside, unchanged, so approved, and discarded it, then the new one at
    its temporary's name: neither was left. Now an old folder whose destination is empty is put back."""
    dest = tmp_path / "model-onnx"
    _onnx_dir(dest, "old")
    real_rename, renames = os.rename, []
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)

    def rename(a, b):
        replacing = debris.is_debris(a) or debris.is_debris(b)
        if replacing:
            renames.append(b)
            if len(renames) == 2:  # swap_in's own rename back: stopped before it is made
                raise KeyboardInterrupt
        real_rename(a, b)
        if replacing and len(renames) == 1:  # dest -> aside done
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        _onnx_dir(dest, "new", force=True)
    assert debris.is_debris(renames[0]) and renames[1] == dest
    assert os.listdir(dest) == ["model.onnx"] and (dest / "model.onnx").read_text() == "old"
    assert crash_kit.debris(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_kill_at_each_step_of_a_put_back_is_settled_by_the_next_command(tmp_path, exchange):
    """Killed (SIGKILL: nothing runs after it) at each step of a replacement whose old folder was changed during the
    swap, so put back: the next command writing that output sweeps what the kill left first. The destination then
    holds the old folder or the new one, whole, never nothing, and nothing of edgemed's is left; killed once the
    put-back has begun to move anything, it is the old folder with the user's notes (the new output, at its
    temporary's name, removed; an aside, with its destination empty, restored)."""
    from edgemed.errors import OutputExists

    def run(dest: Path):
        return _replaced_while_notes_are_added(dest, exchange)

    log = tmp_path / "steps.log"
    assert crash_kit.killed_at(run(_old_output(tmp_path / "0")), 0, log) == 2  # OutputExists: it was put back
    names = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    put_back = names.index("atomic.put-back") + 1
    for n in range(1, len(names) + 1):
        dest = _old_output(tmp_path / str(n))
        assert crash_kit.killed_at(run(dest), n) == crash_kit.KILLED, names[n - 1]
        try:
            _onnx_dir(dest, "next", force=True)  # replaces only an unchanged edgemed folder (the new one)
        except OutputExists:
            pass  # the old folder, with the user's notes: left as it is
        held = {p.name: p.read_text() for p in dest.iterdir()}
        assert held in ({"model.onnx": "old", "clinic-notes.txt": "the user's"}, {"model.onnx": "next"}), (n, held)
        if n > put_back:
            assert held["model.onnx"] == "old", (names[n - 1], held)
        assert crash_kit.debris(dest.parent) == [], (names[n - 1], crash_kit.debris(dest.parent))


# -- a kill after a swap, before the old folder is settled: the next command settles it --------------------------
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
@pytest.mark.parametrize("at", ["atomic.discard-old", "atomic.put-back"])
@pytest.mark.parametrize("then", ["next-command", "new-output-removed", "users-folder-put-there"])
def test_a_kill_between_a_swap_and_its_put_back_never_loses_the_changed_old_folder(tmp_path, caplog, exchange, at,
                                                                                    then):
    """Killed (SIGKILL) once the swap was done and before its put-back moved anything, the changed old folder (the
    user's notes in it) stayed at a temporary's name, and the next command's sweep deleted it as a dead run's debris.
    Now the swap is noted first, and the sweep settles it by the error path's rules: the old folder is back at its
    name; where something the user put there since holds the name, it is kept beside it, under a name that says so,
    and a warning says where. Never deleted."""
    from edgemed.errors import OutputExists

    def run(dest: Path):
        return _replaced_while_notes_are_added(dest, exchange)

    log = tmp_path / "steps.log"
    clean = _old_output(tmp_path / "clean")
    assert crash_kit.killed_at(run(clean), 0, log) == 2  # OutputExists: the steps of a put-back
    names = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    dest = _old_output(tmp_path / "killed")
    assert crash_kit.killed_at(run(dest), names.index(at) + 1) == crash_kit.KILLED
    assert (dest / "model.onnx").read_text() == "new"  # the kill's state: the new output in, the old one out
    kept = dest.parent / "model-onnx.old-kept-by-edgemed"
    if then == "new-output-removed":
        shutil.rmtree(dest)
    elif then == "users-folder-put-there":
        dest.rename(dest.parent / "users-moved")
        dest.mkdir()
        (dest / "draft.txt").write_text("the user's too")
    with pytest.raises(OutputExists):  # a folder edgemed did not make, or one the user changed: never replaced
        _onnx_dir(dest, "next", force=True)
    if then == "users-folder-put-there":
        assert {p.name: p.read_text() for p in dest.iterdir()} == {"draft.txt": "the user's too"}
        assert {p.name: p.read_text() for p in kept.iterdir()} == {"model.onnx": "old",
                                                                   "clinic-notes.txt": "the user's"}
        assert str(kept) in caplog.text
    else:
        assert {p.name: p.read_text() for p in dest.iterdir()} == {"model.onnx": "old",
                                                                   "clinic-notes.txt": "the user's"}
        assert not kept.exists()
    assert crash_kit.debris(dest.parent) == []


def test_a_swap_note_that_cannot_be_read_leaves_that_runs_debris_alone(tmp_path, caplog):
    """A note is the only thing that says what a killed swap took out: one that is damaged (or of another shape)
    proves nothing, so the sweep neither settles nor removes anything of that run, and a warning names it."""
    log = tmp_path / "steps.log"
    clean = _old_output(tmp_path / "clean")
    assert crash_kit.killed_at(_replaced_while_notes_are_added(clean), 0, log) == 2  # OutputExists: put back
    at = [line.split(" ", 1)[1] for line in log.read_text().splitlines()].index("atomic.discard-old") + 1
    dest = _old_output(tmp_path / "killed")
    assert crash_kit.killed_at(_replaced_while_notes_are_added(dest), at) == crash_kit.KILLED
    note = next(p for p in dest.parent.iterdir() if p.name.endswith(debris.SWAP + ".partial"))
    note.write_text('{"dest": "model-onnx"}')
    _onnx_dir(dest, "next", force=True)  # the new output was edgemed's, unchanged: replaced
    assert (dest / "model.onnx").read_text() == "next" and f"could not settle '{note}'" in caplog.text
    kept = [p for p in dest.parent.iterdir() if p.is_dir() and (p / "clinic-notes.txt").is_file()]
    assert len(kept) == 1 and debris.is_debris(kept[0]) and (kept[0] / "model.onnx").read_text() == "old"


@pytest.mark.parametrize("dest_name", ["model-onnx", "clinic-notes"], ids=["its-own-name", "another-name"])
def test_a_crafted_swap_note_never_moves_a_users_folder_into_debris(tmp_path, dest_name):
    """A swap's note is on-disk state anyone who can write the folder can alter. One that named a user's folder as
    the swap's output (its own name, or another one in the folder) and its device and inode as what was "written"
    made the sweep move that folder to a dead run's temporary name, then delete it with that run's debris. Now a
    sweep moves out of an output's place only a folder edgemed made as that kind, unchanged, and a note must name
    the output its own name stands for: the user's folder stays, whole."""
    owner = "0123456789abcdef"
    (tmp_path / f".edgemed-{owner}.lock").touch()  # a dead run's lock: nobody holds it
    users = tmp_path / dest_name
    users.mkdir()
    (users / "notes.txt").write_text("the user's")
    tmp = tmp_path / f".model-onnx.edgemed-{owner}.aaaaaaaa.partial"
    tmp.mkdir()
    (tmp / "model.onnx").write_text("debris")
    note = tmp_path / f".model-onnx.edgemed-{owner}.bbbbbbbb{debris.SWAP}.partial"
    note.write_text(atomic.json.dumps({"dest": dest_name, "tmp": tmp.name,
                                       "aside": f".model-onnx.edgemed-{owner}.cccccccc{debris.ASIDE}.partial",
                                       "written": list(_ident(users)), "approved": None, "kind": "onnx"}))
    debris.sweep(tmp_path)
    assert {p.name: p.read_text() for p in users.iterdir()} == {"notes.txt": "the user's"}


def test_a_swap_note_is_gone_on_disk_before_the_old_folder_it_approved_is_deleted(tmp_path, monkeypatch):
    """The note went (an unlink) and the approved old folder was deleted right after, with no fsync of the folder
    between: after a power cut the note could come back beside a half-deleted old folder, which no longer proves
    unchanged, so the sweep would put it back over the new output. Now the folder is synced once the note is gone."""
    dest = tmp_path / "model-onnx"
    _onnx_dir(dest, "old")
    events: list[tuple] = []
    real_fsync, real_discard = os.fsync, atomic.discard

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("sync", (st.st_dev, st.st_ino)))
        return real_fsync(fd)

    def discard(path):
        events.append(("note" if Path(path).name.endswith(debris.SWAP + ".partial") else "discard", Path(path).name))
        return real_discard(path)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(atomic, "discard", discard)
    _onnx_dir(dest, "new", force=True)
    kinds = [e[0] for e in events]
    note, old = kinds.index("note"), kinds.index("discard")
    assert note < old and ("sync", _ident(tmp_path)) in events[note:old], events
    assert (dest / "model.onnx").read_text() == "new" and crash_kit.debris(tmp_path) == []


def test_a_deeply_nested_swap_note_is_left_alone_never_a_crash(tmp_path, caplog):
    """A note of nested brackets (under the size a note may have) made the JSON reader raise RecursionError, which
    no sweep caught: every command writing into that folder failed with a traceback. Now it is a note that cannot be
    read: that run's debris is left alone, a warning names it, and the output is written."""
    owner = "0123456789abcdef"
    (tmp_path / f".edgemed-{owner}.lock").touch()  # a dead run's lock: nobody holds it
    note = tmp_path / f".model-onnx.edgemed-{owner}.bbbbbbbb{debris.SWAP}.partial"
    note.write_text("[" * 4000)
    _onnx_dir(tmp_path / "model-onnx", "new")
    assert (tmp_path / "model-onnx" / "model.onnx").read_text() == "new"
    assert note.exists() and f"could not settle '{note}'" in caplog.text
