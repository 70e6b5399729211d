"""Owner-tagged debris: every temporary file or folder edgemed makes next to an output.

Names (the only names ``sweep`` ever removes)::

    .LABEL.edgemed-OWNER.RAND[SUFFIX].partial   a temporary file or folder (LABEL: the output's name)
    .edgemed-OWNER.lock                        its owner, held with flock(LOCK_EX) while the owner lives

OWNER is 16 random hex digits drawn once per process (again after a fork). The owner
creates (``O_EXCL``: never opening what is already there) and locks ``.edgemed-OWNER.lock``
in a folder before it makes any debris there, and unlinks it after its last debris there
is gone (while any is left, the lock file stays, unlocked once the owner is done, so that
the next sweep removes or restores it). Where that name is already taken (a directory, a FIFO, a link, any file it did
not just create), the owner draws another id for that folder and leaves the object alone.
The kernel drops the lock when the process dies however it dies (SIGKILL, segfault, power
cut), so "the owner is gone" is "the lock can be taken": no pid to be reused, no clock,
and it holds across pid namespaces and (with working locks) network file systems. Where
locks cannot be taken at all, debris counts as live and is left alone.

An owner is gone only when its lock is there, an empty regular file, and can be taken: debris
whose lock is missing, or whose lock name holds a file with content, is not edgemed's to remove
(a user's file that happens to have such a name, a folder copied without its hidden locks).

``sweep(folder)`` removes the debris of gone owners, except an ``ASIDE`` (a directory
output moved aside during a two-rename replacement) whose output is missing: that one is
renamed back, so a kill between the two renames leaves the old output in place. A ``SWAP``
note (written by ``atomic.py`` before it swaps a folder out of an output's place: the output's name, the
temporaries, what was written and what was approved) is settled first, by the settler ``atomic.py`` hands
``settle_swaps_with``: what the swap took out of the output's place is discarded only if it was approved and is
unchanged, else put back; a user's changed folder is never swept as debris. Where no settler is loaded, or settling
fails, that owner's debris is left as it is, its lock with it, for a later sweep. A lock
name held by anything but a regular file (a directory, a FIFO, a link) is not edgemed's
lock: it is opened without following links and without blocking, never removed, and its
owner's debris counts as live.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import threading
from pathlib import Path
from typing import Iterator

from edgemed import env
from edgemed.errors import OutputError

log = logging.getLogger(__name__)

ASIDE = "~aside"
#: The suffix of a swap's note: what a sweep must settle before it removes that owner's other debris.
SWAP = "~swap"
_DEBRIS = re.compile(r"\.(?P<label>.+)\.edgemed-(?P<owner>[0-9a-f]{16})\.(?P<rand>[0-9a-z]{8})(?P<suffix>.*)\.partial", re.S)
_LOCK = re.compile(r"\.edgemed-(?P<owner>[0-9a-f]{16})\.lock")
#: Characters of an output's name a temporary name keeps (its LABEL); a sweep restores an aside to its LABEL.
MAX_LABEL = 120

_steps = 0
_settle_swap = None  # settles one SWAP note of a gone owner (``atomic.py`` hands it over: it writes the notes)


def step(what: str) -> None:
    """Test hook, inert unless ``$EDGEMED_TEST_KILL_AT`` is set: count this filesystem step, and
    SIGKILL this process at step N (what ``strace -e inject=...:signal=KILL:when=N`` does)."""
    global _steps
    at = env.kill_at_step()
    if at is None:
        return
    _steps += 1
    where = env.step_log()
    if where is not None:
        with open(where, "a", encoding="utf-8") as fh:
            fh.write(f"{_steps} {what}\n")
    if _steps == at:
        os.kill(os.getpid(), signal.SIGKILL)


class _Owner:
    """This process's owner id and the lock files it holds (folder -> [fd, users, owner id used there])."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(8)
        self.held: dict[str, list[int]] = {}
        self.mu = threading.Lock()


_me = _Owner()


def _after_fork() -> None:
    """A forked child is a new owner (the locks it inherited stay its parent's) and a new process whose
    filesystem steps count from one, as strace counts them, whatever its parent counted before the fork."""
    global _me, _steps
    _me = _Owner()
    _steps = 0


os.register_at_fork(after_in_child=_after_fork)


def _lock_path(folder: Path, owner: str) -> Path:
    return folder / f".edgemed-{owner}.lock"


#: Tries at making a lock file of our own in one folder (each with a new id after the first).
_LOCK_TRIES = 8
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_said: set[str] = set()  # foreign lock names already reported in this process


def _same_file(path: Path, fd: int) -> bool:
    """True when ``path`` (not followed) is still the regular file open at ``fd``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _create_lock(path: Path) -> int | None:
    """A new lock file at ``path``, open for writing; None when the name is already taken by anything."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _NONBLOCK | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return None  # not ours: a live owner's lock, or a directory, FIFO or link put there; left alone


def _foreign(path: Path, what: str) -> None:
    if str(path) not in _said:
        _said.add(str(path))
        log.warning("'%s' is %s, not an edgemed lock file: edgemed leaves it, and the debris of that owner, "
                    "alone; remove it yourself if nothing of yours needs it", path, what)


@contextlib.contextmanager
def owned(folder: Path) -> Iterator[str]:
    """Hold this process's owner lock in ``folder`` while the block makes debris there; yield the owner id."""
    import fcntl

    key = os.path.abspath(folder)
    me = _me
    with me.mu:
        entry = me.held.get(key)
        if entry is not None:
            entry[1] += 1
        else:
            token = me.token
            for _ in range(_LOCK_TRIES):
                path = _lock_path(Path(key), token)
                step("debris.lock")
                fd = _create_lock(path)
                if fd is None:  # the name is taken (by something we did not make): another id for this folder
                    token = secrets.token_hex(8)
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)  # waits out a sweeper that is looking at it
                except OSError:
                    pass  # no locks on this file system: a sweeper cannot take it either, so it stays live
                if _same_file(path, fd):
                    me.held[key] = entry = [fd, 1, token]
                    break
                os.close(fd)  # a sweeper took it before we locked it, and unlinked it: start again
            else:
                raise OutputError(
                    f"edgemed could not make its lock file in '{key}': {_LOCK_TRIES} names of the form "
                    f"'.edgemed-<16 hex digits>.lock' were taken or went away while it tried.",
                    f"check what is making files named .edgemed-*.lock in '{key}', or write the output elsewhere")
    try:
        yield entry[2]
    finally:
        with me.mu:
            entry[1] -= 1
            if entry[1] == 0:
                del me.held[key]
                step("debris.unlock")
                path = _lock_path(Path(key), entry[2])
                with contextlib.suppress(FileNotFoundError):
                    # never unlink what was put in its place; nor while debris of ours is left (an aside that
                    # could not be put back): a sweep removes or restores only what a lock file vouches for
                    if _same_file(path, entry[0]) and not _left(Path(key), entry[2]):
                        os.unlink(path)
                os.close(entry[0])


def _pieces(folder: Path, owner: str) -> list[re.Match]:
    """The debris of ``owner`` in ``folder``, as it is now."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [m for n in names if (m := _DEBRIS.fullmatch(n)) is not None and m["owner"] == owner]


def _left(folder: Path, owner: str) -> bool:
    """Whether ``folder`` still holds debris of ``owner``."""
    return bool(_pieces(folder, owner))


def _token(folder: Path) -> str:
    """The owner id this process uses in ``folder`` (its own, unless that lock name was taken there)."""
    entry = _me.held.get(os.path.abspath(folder))
    return entry[2] if entry is not None else _me.token


def debris_path(folder: Path, label: str, suffix: str = "") -> Path:
    """A fresh, unused owner-tagged name in ``folder`` (call inside ``owned(folder)``); nothing is created."""
    label = label[:MAX_LABEL] or "out"
    token = _token(folder)
    while True:
        rand = "".join(secrets.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(8))
        p = Path(folder) / f".{label}.edgemed-{token}.{rand}{suffix}.partial"
        if not os.path.lexists(p):
            return p


def is_debris(path: Path) -> bool:
    return _DEBRIS.fullmatch(Path(path).name) is not None


def owner_of(path: Path) -> str | None:
    """The owner id in a piece of debris's name; None for any other name."""
    m = _DEBRIS.fullmatch(Path(path).name)
    return m["owner"] if m else None


def label_of(path: Path) -> str:
    """The output name a piece of debris stands for (its LABEL); any other name is returned as it is."""
    name = Path(path).name
    m = _DEBRIS.fullmatch(name)
    return m["label"] if m else name


def discard(path: Path) -> None:
    """Remove one piece of debris (file or folder). Refuses any other name: edgemed deletes only what it made."""
    path = Path(path)
    if not is_debris(path):
        raise ValueError(f"refusing to remove '{path}': not a name edgemed's debris helper made")
    if path.is_dir() and not path.is_symlink():
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=lambda f, p, exc: _log_rm_error(f, p, (type(exc), exc, None)))
        else:
            shutil.rmtree(path, onerror=_log_rm_error)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _log_rm_error(func, p, exc_info) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        log.warning("could not remove debris %s: %s", p, exc_info[1])


@contextlib.contextmanager
def scratch_dir(folder: Path, label: str = "work") -> Iterator[Path]:
    """A private working folder next to an output, owner-tagged, removed when the block ends."""
    folder = Path(os.path.abspath(folder))
    with owned(folder):
        path = debris_path(folder, label, "~work")
        step("debris.scratch")
        path.mkdir(mode=0o700)
        try:
            yield path
        finally:
            discard(path)


def settle_swaps_with(settle) -> None:
    """Have ``sweep`` call ``settle(note)`` for each ``SWAP`` note of a gone owner, before it removes that owner's
    other debris (``atomic.py``, which writes the notes and owns the rules for what a swap took out, hands it here:
    this module sits below it)."""
    global _settle_swap
    _settle_swap = settle


def _settled(folder: Path, notes: list[re.Match]) -> bool:
    """Settle a gone owner's swap notes (``settle_swaps_with``); False where they could not be (left for later)."""
    for m in sorted(notes, key=lambda m: m.string):
        note = folder / m.string
        if _settle_swap is None:
            log.info("left %s as it is: a swap it notes is settled by a command that writes an output there", note)
            return False
        try:
            _settle_swap(note)
        except OSError as exc:
            log.warning("could not settle '%s', an interrupted replacement of '%s' (%s); it is left as it is, for the "
                        "next command that writes there", note, folder / m["label"], exc)
            return False
    return True


def sweep(folder: Path) -> list[Path]:
    """Remove from ``folder`` the debris whose owner is gone (settling its swaps first, restoring a stranded aside);
    return what went."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    folder = Path(folder)
    mine = _token(folder)
    pieces: dict[str, list[re.Match]] = {}
    owners = set()
    for n in names:
        if (m := _DEBRIS.fullmatch(n)) is not None:
            pieces.setdefault(m["owner"], []).append(m)
        elif (m := _LOCK.fullmatch(n)) is not None:
            owners.add(m["owner"])
    gone: list[Path] = []
    for owner in sorted((set(pieces) | owners) - {mine}):
        with _if_gone(folder, owner) as dead:
            if not dead:
                continue
            notes = [m for m in pieces.get(owner, []) if m["suffix"] == SWAP]
            if notes:
                if not _settled(folder, notes):
                    continue  # never swept: what a swap took out may be a user's folder, at a temporary's name
                pieces[owner] = _pieces(folder, owner)  # settling moved some (a put-back), removed others
            for m in sorted(pieces.get(owner, []), key=lambda m: m["suffix"] != ASIDE):
                p = folder / m.string
                target = folder / m["label"]
                if m["suffix"] == ASIDE and not os.path.lexists(target):
                    step("debris.restore")
                    os.rename(p, target)
                    log.warning("restored %s (a replacement was interrupted)", target)
                    continue
                step("debris.sweep")
                discard(p)
                gone.append(p)
    if gone:
        log.info("removed %d piece(s) of debris left in %s by edgemed runs that died", len(gone), folder)
    return gone


@contextlib.contextmanager
def _if_gone(folder: Path, owner: str) -> Iterator[bool]:
    """Yield True, holding its lock, if ``owner`` no longer lives; the lock file goes afterwards.

    Only a regular file is a lock: anything else at the name (a directory, a FIFO, a link, a
    device) yields False and is never opened in a way that blocks, nor removed."""
    import fcntl

    path = _lock_path(folder, owner)
    try:
        st = os.lstat(path)
    except OSError:  # no lock: the owner locks before its first piece and unlinks after its last, so a piece
        yield False  # without one is not edgemed's (a user's file of that shape, a copied folder): left alone
        return
    if not stat.S_ISREG(st.st_mode) or st.st_size:
        _foreign(path, "a directory" if stat.S_ISDIR(st.st_mode) else "a link" if stat.S_ISLNK(st.st_mode)
                 else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a file with content (edgemed's locks are empty)"
                 if stat.S_ISREG(st.st_mode) else "not a regular file")
        yield False
        return
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | os.O_CLOEXEC)
    except OSError:
        yield False
        return
    try:
        if not _same_file(path, fd) or os.fstat(fd).st_size:  # swapped, or written to, since we looked: leave it
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False  # held (alive), or no locks here: never touch what may be live
            return
        yield True
        with contextlib.suppress(FileNotFoundError):
            if _same_file(path, fd) and not _left(folder, owner):  # while debris is left, its lock vouches for it
                step("debris.sweep-lock")
                os.unlink(path)
    finally:
        os.close(fd)
