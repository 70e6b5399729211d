"""Atomic outputs: write into an owner-tagged temporary sibling, rename into place when complete.

Rules, for every output edgemed writes (convert, pack, keygen, export, reports, the store's files):

- A killed process, a full disk or an exception leaves the destination as it was: the old
  output or the new one, never a half-written one.
- Nothing edgemed did not make is deleted. ``force`` may replace an existing *file*; an
  existing *directory* is refused whatever the flag, unless edgemed made it as an output of
  the same kind and nobody changed it since (``ownership.py`` keeps that proof). The current
  directory, or one above it, is always refused. What a swap takes out of the destination is deleted only if
  it is the object approved there (same device and inode; a directory still unchanged, checked again just
  before it goes); anything else, a folder put there or a file added to it meanwhile, is put back.
- A folder swap is noted first (a ``SWAP`` note beside it: the output's name, the temporaries, what was written and
  what was approved), so a kill (SIGKILL) before the swap is settled leaves no user's folder to a sweep: the next
  sweep of the folder settles the note by the same rules (``_settle_noted``), and only then removes the debris.
- Temporary files and folders are *debris* until they are renamed into place, and carry
  their owner in their name (``debris.py``). Writing into a folder first sweeps the debris of
  owners that are gone, so a crash costs disk space only until the next run.
- ``step()`` marks every filesystem step, so the crash tests can kill a command at each one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
from pathlib import Path
from typing import Iterator

from edgemed.files import ownership
from edgemed.files.debris import (ASIDE, MAX_LABEL, SWAP, debris_path, discard, is_debris, label_of, owned,
                                  owner_of, scratch_dir, settle_swaps_with, step, sweep)
from edgemed.files.durable import sync_folder, sync_tree
from edgemed.errors import DISK_REFUSED, OutputError, OutputExists

__all__ = ["atomic_path", "atomic_paths", "check_destination", "file_destination", "inside", "refuse_input_as_output", "refuse_store", "write_text", "place_new", "swap_in", "scratch_dir", "sweep",
           "step", "discard"]

log = logging.getLogger(__name__)


def _folder(path: Path) -> Path:
    return Path(os.path.abspath(path)).parent


def _another(option: str) -> str:
    """The fix's words for another path given as ``option``: an option ("-o", "--gguf") or an argument ("PRIVATE_KEY")."""
    return f"choose another {option} path"


def _example(option: str, path) -> str:
    return f"{option} {path}" if option.startswith("-") else f"{path} as {option}"


def file_destination(text: str | os.PathLike, option: str = "-o", example: str = "NAME") -> Path:
    """The path of a *file* output as the user typed it (``option``: "-o", "--gguf", "PRIVATE_KEY"), refused when it
    ends with a path separator (or ``/.``): that names a folder, and ``Path`` drops the separator, so edgemed wrote a
    file named after the folder meant (``-o newdir/`` made a file 'newdir'). ``example``: a file name for the fix."""
    text = os.fspath(text)
    seps = tuple(s for s in (os.sep, os.altsep) if s)
    dotted = tuple(s + "." for s in seps)
    if text.endswith(seps + dotted):
        folder = str(Path(text))  # what would have been written
        raise OutputExists(
            f"Output '{text}' ends with '{text[-2:] if text.endswith(dotted) else text[-1]}', so it names a folder, "
            f"but {option} names the file edgemed writes (it would be a file named '{folder}').",
            f"give the file's name, e.g. {_example(option, os.path.join(folder, example))}")
    return Path(text)


def check_destination(path: Path, force: bool, kind: str | None = None, option: str = "-o") -> None:
    """Refuse an output that would lose something, and sweep dead owners' debris from its folder.

    ``kind`` names the directory output being written ("bundle", "onnx"); only a directory
    edgemed made as that kind, unchanged since, may be replaced (with ``force``). ``option`` is how the
    command was given the path ("-o", "--gguf", or an argument's name, "PRIVATE_KEY"): the fixes name it.
    """
    if kind is None and isinstance(path, str):  # a file output, as typed: a trailing separator names a folder
        file_destination(path, option)
    path = Path(path)
    if _holds_cwd(path):
        raise OutputExists(
            f"Output '{path}' is the current directory or a folder above it; edgemed never replaces it.",
            f"name a new path inside it instead, e.g. {_example(option, Path(path) / 'NAME')}",
        )
    folder = _folder(path)
    if not folder.is_dir():
        if os.path.lexists(folder):  # a file where the folder should be: "does not exist" would mislead
            raise OutputExists(f"Output directory '{folder}' is not a folder.", "choose an output inside a folder")
        raise OutputExists(
            f"Output directory '{folder}' does not exist.",
            f"create it first (mkdir -p {folder})",
        )
    sweep(folder)
    if not os.path.lexists(path):
        return
    _refuse_directory(path, kind)
    _refuse_special(path, option)
    if not force:
        raise OutputExists(
            f"Output '{path}' already exists.",
            f"{_another(option)}, or pass --force to replace it",
        )


def refuse_input_as_output(output: Path, inputs, kind: str | None = None, option: str = "-o") -> None:
    """Refuse an output that is one of the command's own inputs (``inputs``: (what, path) pairs; a path may be
    None), or a folder that holds one: ``--force`` replaces an output, never what the command reads, so a typo in
    ``-o`` cannot turn a private key, a license or a model into the output. A directory is first put to
    ``check_destination`` (``kind``: the directory output being written): a folder edgemed would never replace is
    refused with that reason."""
    output = Path(output)
    refuse_store(output)
    for what, path in inputs:  # an output inside a folder the command reads (a bundle's LICENSE)
        if path is not None and os.path.isdir(path) and inside(output, path):
            raise OutputExists(f"Output '{output}' is inside {what} '{path}', which this command reads; edgemed never "
                               "writes into its own input, --force or not.", _another(option))
    if not os.path.lexists(output):
        return
    folder = None
    if output.is_dir() and not output.is_symlink():
        check_destination(output, True, kind, option)
        folder = os.path.realpath(output)
    for what, path in inputs:
        if path is None:
            continue
        try:
            same = os.path.samefile(output, path)
        except OSError:
            same = False
        held = folder is not None and inside(path, folder)
        if same or held:
            raise OutputExists(
                f"Output '{output}' {'is' if same else 'holds'} {what} '{path}', which this command reads; "
                "edgemed never writes over its own input, --force or not.",
                _another(option),
            )


def refuse_store(output: Path) -> None:
    """Refuse a user's output inside edgemed's store: install, remove, rollback and pull change it, with its index
    and journal; a file written there by -o (a GGUF over an installed bundle's LICENSE) damages an installed model."""
    from edgemed import env

    if inside(output, env.store_dir()):
        raise OutputExists(f"Output '{output}' is inside edgemed's store ({env.store_dir()}), which only install, "
                           "remove, rollback and pull change.", "choose a path outside it")


def inside(path, folder) -> bool:
    """Whether ``path`` is ``folder`` or lies in it, links resolved (``path`` need not exist)."""
    folder = os.path.realpath(folder)
    target = os.path.realpath(path)
    return target == folder or target.startswith(folder.rstrip(os.sep) + os.sep)


def _refuse_special(path: Path, option: str) -> None:
    """Raise when ``path`` is (or links to) a device, a named pipe or a socket: a file only in name, which --force
    would replace with a regular one (``/dev/null`` made a file)."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:  # a dangling link: replacing the link loses nothing
        return
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    raise OutputExists(f"Output '{path}' is {kind}; edgemed replaces files, never that, --force or not.",
                       _another(option))


def _holds_cwd(path: Path) -> bool:
    """True when ``path`` is the current directory or a folder above it (``.``, ``..``, ``/``, a link to one)."""
    try:
        cwd = Path(os.path.realpath(os.getcwd()))
    except OSError:  # the current directory was deleted: nothing above it to protect by this rule
        return False
    target = Path(os.path.realpath(path))
    return target == cwd or target in cwd.parents


def _refuse_directory(path: Path, kind: str | None) -> None:
    """Raise unless ``path`` is a file, or a directory edgemed made as ``kind`` and nobody changed."""
    if not path.is_dir():
        return
    if kind is not None and not path.is_symlink() and ownership.made_by_edgemed(path, kind):
        return
    how = " (through a symbolic link)" if path.is_symlink() else ""
    why = (f"edgemed did not make it as a {kind} output, or its files changed since" if kind
           else "edgemed writes a file there, and never replaces a directory with one")
    raise OutputExists(
        f"Output '{path}' is an existing directory{how}: {why}, so it is left alone, even with --force.",
        f"choose a path that does not exist yet (e.g. {path / 'NAME'}), or move that directory away yourself",
    )


@contextlib.contextmanager
def atomic_path(dest: Path | str, *, force: bool = False, suffix: str = "", kind: str | None = None,
                option: str = "-o") -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success move it onto ``dest``.

    The caller creates a file or a directory at the yielded path. ``kind`` marks a directory
    output, ``option`` the way the command was given ``dest`` (see ``check_destination``). The temporary name is owner-tagged debris
    (``.NAME.edgemed-OWNER.RAND<suffix>.partial``) until it is renamed into place. Without
    ``force``, an output that appeared at ``dest`` while the caller wrote is never replaced:
    the kernel refuses the placement (``place_new``) and ``OutputExists`` is raised.
    """
    with atomic_paths([dest], force=force, suffix=suffix, kind=kind, option=option) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(dests: list[Path | str], *, force: bool = False, suffix: str = "",
                 kind: str | None = None, option: str = "-o") -> Iterator[list[Path]]:
    """``atomic_path`` for outputs that belong together (a key pair, a GGUF and its Modelfile).

    Every destination is checked before the caller writes anything, so a refusal leaves nothing
    behind; every temporary is complete, and fsynced (``durable.py``), before the first rename, and the folders
    are fsynced after the last, so a power cut leaves the old output or the whole new one; an error while writing (a
    full disk, an exception) leaves every destination as it was. The renames follow in order, one
    per output: a kill between two of them leaves the first outputs new and the rest old, so put
    first the ones that are cheapest to lose. A full or forbidden disk's error that names no file (``write``
    gives none) is raised again naming the destination, so the user learns which disk to free.
    """
    dests = [Path(d) for d in dests]
    for dest in dests:
        check_destination(dest, force, kind, option)
    with contextlib.ExitStack() as held:
        tmps = []
        for dest in dests:
            folder = _folder(dest)
            held.enter_context(owned(folder))
            tmps.append(debris_path(folder, dest.name, suffix))
        approved = {}  # dest -> (st_dev, st_ino) of what may be replaced there
        ours = {}  # temporary -> (st_dev, st_ino) of what was written there, taken just before its swap
        swaps = []  # (temporary, destination, aside, note or None) of each swap begun and not yet settled
        try:
            yield tmps
            step("atomic.written")
            for tmp, dest in zip(tmps, dests):
                if not os.path.lexists(tmp):
                    raise FileNotFoundError(f"nothing was written to {tmp}")
                if kind is not None and tmp.is_dir() and not tmp.is_symlink():
                    step("atomic.record")
                    ownership.record(tmp, kind, dest)
            for dest in dests:  # again, before the first rename: they may have changed while we wrote
                if os.path.lexists(dest):
                    _refuse_directory(dest, kind)
                    if not force:
                        raise _appeared(dest, option)
                    approved[dest] = _ident(dest)
            for tmp in tmps:  # on disk before a rename publishes it: a power cut must not leave an empty output
                sync_tree(tmp)
            for tmp, dest in zip(tmps, dests):
                if force:
                    # recorded before the swap: a stop the instant it is done (before swap_in returns) still finds
                    # what it took out, at the temporary's name (exchanged) or at the aside (two renames)
                    ours[tmp] = _ident(tmp)
                    aside = debris_path(_folder(dest), dest.name, ASIDE)
                    # a folder swap is noted first: a kill before it is settled leaves its note for the next sweep
                    note = debris_path(_folder(dest), dest.name, SWAP) if tmp.is_dir() or dest.is_dir() else None
                    swaps.append((tmp, dest, aside, note))
                    if note is not None:
                        _note_swap(note, tmp, dest, aside, ours[tmp], approved.get(dest), kind)
                    old = swap_in(tmp, dest, aside)
                    if old is not None and not _approved(old, approved.get(dest), kind):  # changed or replaced
                        raise _changed(dest, option)  # since the check
                else:
                    try:
                        place_new(tmp, dest)
                    except OutputExists:  # it appeared since the check above: said naming the command's option
                        raise _appeared(dest, option) from None
            for folder in dict.fromkeys(_folder(dest) for dest in dests):  # the renames themselves
                sync_folder(folder)
            back = _settle(swaps, ours, approved, kind)
            if back:
                raise _changed(back[0], option)
        except BaseException as exc:
            stop = _past_stops(lambda: _clean_up(tmps, swaps, ours, approved, kind))
            if stop is not None and not isinstance(exc, KeyboardInterrupt):
                raise stop  # a stop while an error was cleaned up: the command was stopped
            if isinstance(exc, OSError) and exc.filename is None and exc.errno in DISK_REFUSED:
                # a write() on a full disk names no file: name the output it was for
                raise type(exc)(exc.errno, exc.strerror, str(dests[0]) if len(dests) == 1 else
                                " or ".join(str(d) for d in dests)) from exc
            raise


def _ident(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def _approved(old: Path, ident: tuple[int, int] | None, kind: str | None) -> bool:
    """Whether ``old`` (what a swap took out of a destination) is the object approved there (``ident``) and, for
    a directory, still an unchanged edgemed ``kind`` output: the only things edgemed deletes."""
    import stat

    st = os.lstat(old)
    if ident is None or (st.st_dev, st.st_ino) != ident:
        return False
    return not stat.S_ISDIR(st.st_mode) or (kind is not None and ownership.made_by_edgemed(old, kind))


def _clean_up(tmps: list[Path], swaps: list, ours: dict, approved: dict, kind: str | None) -> None:
    """After an error or a stop: settle the swaps begun (``_settle``), then discard what we wrote, never what a swap
    took out (one a stop cut short while discarding it stays as debris, for the next sweep). Run again after a stop,
    it finishes what the stop cut short."""
    _settle(swaps, ours, approved, kind)
    for tmp in tmps:
        if os.path.lexists(tmp) and (tmp not in ours or _ident(tmp) == ours[tmp]):
            discard(tmp)


def _past_stops(work) -> KeyboardInterrupt | None:
    """Run ``work`` (a clean-up that, run again, finishes what a stop cut short) to its end, again after each stop
    (Ctrl-C, SIGTERM) that lands in it; return the first such stop, or None, for the caller to raise once it is done.
    Cut short, a put-back left the old output at a temporary's name, which the next sweep deletes, or its destination
    empty. Each try needs a new stop; an error is raised as it comes."""
    first = None
    while True:
        try:
            work()
            return first
        except KeyboardInterrupt as stop:
            first = first or stop


def _settle(swaps: list, ours: dict, approved: dict, kind: str | None, swept: bool = False) -> list[Path]:
    """For each swap begun (``swaps``: temporary, destination, aside, note), find what it took out of the destination,
    by what is on disk and not by what ``swap_in`` returned (a stop may land after the swap and before the return):
    discard it if it is still the approved object (checked once more, just before) and the destination holds
    something; put any other back at its destination (the new output goes to the temporary name, which is debris),
    and so one that a stop left with its destination empty (between the two renames of a swap or of a put-back),
    which would otherwise go with the new output too; where the destination holds something else than what was
    written (put there since; from a note, ``swept``, anything but a folder edgemed made as ``kind``, unchanged),
    keep it beside it instead (``_keep_aside``). The swap's note goes once it is settled
    (before a discard: a note must never bring back a half-deleted folder). Return the destinations not replaced.
    ``swaps`` is emptied as it goes; run again after a stop, it finishes what the stop cut short. ``swept``: a sweep
    settles a dead run's note, and a warning tells what it put back."""
    back = []
    while swaps:
        tmp, dest, aside, note = swaps[0]
        old = _taken_out(tmp, aside, ours.get(tmp))
        if old is not None:
            step("atomic.discard-old")
            if os.path.lexists(dest) and _approved(old, approved.get(dest), kind):
                swaps.pop(0)  # first: a stop during the discard leaves the rest as debris, never puts it back
                _forget(note, durably=True)  # gone on disk first: after a power cut, never back beside a half-deleted
                discard(old)  # old folder (no longer unchanged: the sweep would put it back over the new output)
                continue
            if os.path.lexists(dest) and (_ident(dest) != ours.get(tmp) or (swept and not _made(dest, kind))):
                _keep_aside(old, dest)  # not what was written (or, from a note, not provably ours): never moved
            else:
                _put_back(old, tmp, dest)
                if swept:
                    log.warning("'%s' is back as it was: an edgemed run that was replacing it was killed, and it had "
                                "changed (or was not edgemed's), so it was not replaced; what that run wrote was "
                                "discarded", dest)
            back.append(dest)
        _forget(note)
        swaps.pop(0)
    return back


def _made(dest: Path, kind: str | None) -> bool:
    """Whether ``dest`` is a folder edgemed made as a ``kind`` output, unchanged: what a sweep may move out of an
    output's place on a note's word (a note's device and inode alone are forgeable, and reused once freed)."""
    return kind is not None and dest.is_dir() and not dest.is_symlink() and ownership.made_by_edgemed(dest, kind)


def _forget(note: Path | None, durably: bool = False) -> None:
    """Remove a swap's note (``durably``: and sync its folder, so that the removal is on disk before what follows)."""
    if note is not None and os.path.lexists(note):
        discard(note)
        if durably:
            sync_folder(note.parent)


_NOTE_KEYS = {"dest", "tmp", "aside", "written", "approved", "kind"}
_MAX_NOTE = 4096  # bytes: a note holds three names of at most 255 characters, and numbers


def _note_swap(note: Path, tmp: Path, dest: Path, aside: Path, written: tuple, approved: tuple | None,
               kind: str | None) -> None:
    """Write the swap's note at ``note`` (whole or not at all: written beside it, synced, then renamed to it), on disk
    before the swap: what a sweep needs to settle it if this process dies first (``_settle_noted``)."""
    text = json.dumps({"dest": dest.name, "tmp": tmp.name, "aside": aside.name, "written": list(written),
                       "approved": list(approved) if approved else None, "kind": kind})
    draft = debris_path(_folder(dest), dest.name, SWAP + "-draft")  # swept as any debris, if a kill leaves it
    step("atomic.note-swap")
    try:
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            os.write(fd, text.encode("utf-8", "surrogateescape"))
        finally:
            os.close(fd)
        sync_tree(draft)
        os.replace(draft, note)  # a fresh name: nothing is replaced
        sync_folder(_folder(dest))
    except BaseException:
        _forget(draft if os.path.lexists(draft) else None)
        raise


def _read_note(note: Path) -> tuple:
    """(temporary, destination, aside, written, approved, kind) from a swap's note, read as untrusted: names of this
    folder only, the output the note's own name stands for, the temporaries debris of the note's owner for it. OSError where it is not a note edgemed wrote."""
    fd = os.open(note, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(note))
        raw = os.read(fd, _MAX_NOTE + 1)
    finally:
        os.close(fd)

    def name(v) -> bool:
        return isinstance(v, str) and 0 < len(v) <= 255 and v not in (".", "..") and not any(c in v for c in "/\0")

    def ident(v) -> bool:
        return isinstance(v, list) and len(v) == 2 and all(type(i) is int and i >= 0 for i in v)

    try:
        d = json.loads(raw.decode("utf-8", "surrogateescape")) if len(raw) <= _MAX_NOTE else None
    except (ValueError, RecursionError):  # RecursionError: brackets nested deeper than the reader goes
        d = None
    if not (isinstance(d, dict) and set(d) == _NOTE_KEYS and all(name(d[k]) for k in ("dest", "tmp", "aside"))
            and all(is_debris(note.parent / d[k]) and owner_of(note.parent / d[k]) == owner_of(note)
                    and label_of(note.parent / d[k]) == label_of(note) for k in ("tmp", "aside"))
            and d["dest"][:MAX_LABEL] == label_of(note)  # the output the note's own name stands for, no other
            and ident(d["written"]) and (d["approved"] is None or ident(d["approved"]))
            and (d["kind"] is None or (isinstance(d["kind"], str) and 0 < len(d["kind"]) <= 64))):
        raise OSError(errno.EINVAL, "not a swap's note that edgemed wrote (damaged, or of another shape)", str(note))
    folder = note.parent
    return (folder / d["tmp"], folder / d["dest"], folder / d["aside"], tuple(d["written"]),
            tuple(d["approved"]) if d["approved"] else None, d["kind"])


def _settle_noted(note: Path) -> None:
    """Settle the swap that ``note`` describes, for a run that died before it did (``debris.sweep`` calls this,
    holding the dead owner's lock, before it removes that owner's other debris): by ``_settle``'s rules, what the swap
    took out is discarded only if it is the approved folder, unchanged; any other goes back to its name (or, where
    something put there since holds it, beside it). OSError where the note cannot be read: the sweep leaves it all."""
    tmp, dest, aside, written, approved, kind = _read_note(note)
    _settle([(tmp, dest, aside, note)], {tmp: written}, {dest: approved} if approved else {}, kind, swept=True)


settle_swaps_with(_settle_noted)  # a sweep (below this module) settles the notes this module writes


def _taken_out(tmp: Path, aside: Path, written: tuple[int, int] | None) -> Path | None:
    """Where what a swap took out of its destination is now: the temporary's name when that no longer holds what
    was written there (``written``: its device and inode; exchanged), else the aside (two renames), else None
    (nothing was taken out, it was put back, or it was replaced outright)."""
    if written is not None and os.path.lexists(tmp) and _ident(tmp) != written:
        return tmp
    if os.path.lexists(aside):
        return aside
    return None


def _put_back(old: Path, tmp: Path, dest: Path) -> None:
    """Undo ``swap_in``: ``old`` to ``dest`` again, the new output (if it is still there) to ``tmp``. Run again after
    a stop between its two renames, it does the second."""
    step("atomic.put-back")
    if old == tmp and os.path.lexists(dest):  # exchanged: exchange again
        if not _exchange(tmp, dest):
            raise OSError(errno.ENOTSUP, "cannot exchange back", str(dest))
        return
    if old != tmp and not os.path.lexists(tmp) and os.path.lexists(dest):  # else the new output is at tmp already
        os.rename(dest, tmp)  # two renames: a kill between them leaves the aside, which the next sweep puts back
    step("atomic.put-back-aside")
    os.rename(old, dest)


def _keep_aside(old: Path, dest: Path) -> Path:
    """Move ``old``, what a swap took out of ``dest``, beside it under a name that says what it is, where it cannot
    go back: something other than what edgemed wrote holds ``dest`` now (put there since), which is never moved.
    A warning says where it went."""
    for n in range(1, 100):
        kept = dest.with_name(f"{dest.name}.old-kept-by-edgemed" + (f"-{n}" if n > 1 else ""))
        if os.path.lexists(kept):
            continue
        step("atomic.keep-old")
        try:
            if not _rename_noreplace(old, kept):
                os.rename(old, kept)
        except OutputExists:  # taken a moment ago: the next name
            continue
        log.warning("'%s' was kept as '%s': an edgemed run that was replacing it was stopped before it could put it "
                    "back, and something else is at its name now; move it back yourself if you need it", dest, kept)
        return kept
    raise OSError(errno.EEXIST, "no free name beside it to keep the old output under", str(dest))


def _changed(dest: Path, option: str = "-o") -> OutputExists:
    return OutputExists(
        f"Output '{dest}' changed while edgemed was replacing it (something was added to it or changed in it, or "
        "another folder was put there); it is left as it is, and what edgemed wrote was discarded.",
        f"check what changed in it and move it away yourself, or {_another(option)}")


def _appeared(dest: Path, option: str = "-o") -> OutputExists:
    return OutputExists(
        f"Output '{dest}' appeared while edgemed was writing it (another run, or another program); it is left as "
        "it is, and what edgemed wrote was discarded.",
        f"{_another(option)}, or run again with --force to replace it",
    )


def place_new(new: Path, dest: Path) -> None:
    """Put ``new`` at ``dest`` only while nothing is there, in one step the kernel checks; raise ``OutputExists``
    when something is, even if it appeared a moment ago (no check-then-rename).

    In order: ``rename`` that refuses to replace (Linux ``renameat2(RENAME_NOREPLACE)``, macOS
    ``renamex_np(RENAME_EXCL)``); else, for a file, a hard link at ``dest`` then the temporary name
    unlinked (a kill between the two leaves the finished output, and its second name as debris the
    next sweep removes); else a plain ``rename``, which never replaces a file with a directory nor
    a non-empty directory, but is the only way left on a file system without hard links.
    """
    step("atomic.rename-new")
    if _rename_noreplace(new, dest):
        return
    if not new.is_dir() or new.is_symlink():
        step("atomic.link")
        try:
            os.link(new, dest, follow_symlinks=False)
        except FileExistsError:
            raise _appeared(dest) from None
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED + (errno.EPERM, errno.EMLINK):
                raise
        else:
            step("atomic.unlink-temp")
            os.unlink(new)
            return
    if os.path.lexists(dest):
        raise _appeared(dest)
    step("atomic.rename")
    try:
        os.rename(new, dest)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise _appeared(dest) from None
        raise


# errno values that mean "this call or flag is not available here", not "this rename is wrong"
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)


def _rename_noreplace(a: Path, b: Path) -> bool:
    """Rename ``a`` to ``b`` unless ``b`` exists (``OutputExists``); False where the system cannot refuse for us."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "renameat2"):  # Linux (glibc 2.28+, musl 1.2.4+)
        at_fdcwd, rename_noreplace = -100, 1
        done = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_noreplace) == 0
    elif hasattr(libc, "renamex_np"):  # macOS 10.12+
        rename_excl = 4
        done = libc.renamex_np(os.fsencode(a), os.fsencode(b), rename_excl) == 0
    else:
        return False
    if done:
        return True
    code = ctypes.get_errno()
    if code == errno.EEXIST:
        raise _appeared(b)
    if code in _UNSUPPORTED + (errno.EPERM,):  # EPERM: a sandbox that filters the call
        return False
    raise OSError(code, os.strerror(code), str(b))


def swap_in(new: Path, dest: Path, aside: Path) -> Path | None:
    """Put ``new`` at ``dest``; return the debris path now holding what ``dest`` held (or None).

    A file onto a file is one ``rename``. Anything involving a directory is exchanged in one
    ``renameat2(RENAME_EXCHANGE)`` where the kernel and file system allow it; elsewhere it
    takes two renames (``dest`` -> ``aside``, ``new`` -> ``dest``): an error or a stop (Ctrl-C, SIGTERM) between them
    renames ``aside`` back before it is raised, one that lands just after the second (the new output in place, the old
    at ``aside``) is raised as it came, and a kill between them leaves ``aside``, which the next sweep of the folder
    renames back onto ``dest``. The aside keeps ``MAX_LABEL`` characters of the name, so a longer name is refused there
    (``OutputError``): a sweep would restore it under a name the user never gave.
    """
    if not os.path.lexists(dest):
        step("atomic.rename")
        os.rename(new, dest)
        return None
    if not (new.is_dir() or dest.is_dir()) or dest.is_symlink():
        step("atomic.replace")
        os.replace(new, dest)
        return None
    step("atomic.exchange")
    if _exchange(new, dest):
        return new
    if len(dest.name) > MAX_LABEL:  # the aside's name keeps only MAX_LABEL characters: a sweep would restore the
        raise _too_long_to_set_aside(dest)  # old output under a name the user never gave
    step("atomic.aside")
    try:
        os.rename(dest, aside)
        step("atomic.rename-in")
        os.rename(new, dest)
    except BaseException:  # an error or a stop: where it came, not where it was raised, says what is in place
        if os.path.lexists(aside) and not os.path.lexists(dest):  # between the two: the old output goes back,
            os.rename(aside, dest)  # never stays hidden
        raise  # else before the first (nothing moved) or after the second (the new output is in, as on success)
    return aside


def _too_long_to_set_aside(dest: Path) -> OutputError:
    return OutputError(
        f"Output '{dest}' has a name of {len(dest.name)} characters, on a file system that cannot swap a folder with "
        "it in one step: the old output would be moved aside first, under a temporary name that keeps only "
        f"{MAX_LABEL} characters of it, and a crash then would bring it back under that shortened name. Nothing was "
        "replaced.",
        f"give the output a name of at most {MAX_LABEL} characters, or move the old '{dest.name}' away yourself "
        "and run again")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where that call is not available."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(b))


def write_text(dest: Path, text: str, *, force: bool = True) -> None:
    with atomic_path(dest, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")
