"""edgemed's own small state files, read and written as if a hostile process had been there first.

The store's index and journal, the self-test's verdict cache and the registry of directories edgemed made are
files edgemed writes, in folders any local process can write to. ``read_json`` reads one without following a
link or blocking on a FIFO, within a size limit and the parser's nesting limit; ``writer_lock`` serializes their
read-merge-replace writers with an ``flock`` on a lock file beside them, opened the same careful way, and gives
up after a wait instead of hanging; ``replace`` writes one whole, through owner-tagged debris and one rename,
synced (``durable.py``) so that a power cut leaves the old file or the new one, never a renamed empty one.
None deletes or replaces anything that is not a regular file: that is not edgemed's (``Damaged.foreign``), and
the caller says so and carries on without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Callable, Iterator

from edgemed.files import flocks
from edgemed.files.debris import debris_path, discard, owned, step, sweep
from edgemed.files.durable import sync_folder, sync_tree

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def kind_of(mode: int) -> str:
    """What an ``lstat`` mode is, in words, for messages about an object that is not a regular file."""
    return ("a directory" if stat.S_ISDIR(mode) else "a symbolic link" if stat.S_ISLNK(mode)
            else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file")


def require_folder(path: Path, what: str, var: str) -> None:
    """Refuse (``InputError``) a folder edgemed keeps its state in (``what``, e.g. "edgemed's model store") when a part
    of ``path`` is a file, a link to nothing or anything else that is not a folder: making it would fail with ENOTDIR
    or EEXIST, and reading a file under it would call that file damaged. The message names the part in the way and
    ``var``, the environment variable that places the folder. A part that does not exist yet is fine (edgemed makes
    it)."""
    from edgemed.errors import InputError

    path = Path(os.path.abspath(path))
    for part in (*reversed(path.parents), path):
        try:
            mode = os.stat(part).st_mode
        except FileNotFoundError:
            if not os.path.lexists(part):
                return  # nothing there yet, nor below it
            kind = "a symbolic link to nothing"
        except OSError:  # cannot be searched (permissions): the command's own access says so
            return
        else:
            if stat.S_ISDIR(mode):
                continue
            kind = "a file" if stat.S_ISREG(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "neither a file nor a folder"
        raise InputError(f"{what} '{path}' cannot be made: '{part}' is {kind}, not a folder.",
                         f"point ${var} at a folder, or at a path that does not exist yet (now: "
                         f"{os.environ.get(var) or 'not set'}), or move '{part}' out of the way")


class Damaged(Exception):
    """A state file that is not what edgemed writes; the message says why. ``foreign``: not a regular file at all
    (a link, FIFO, device, directory), so not edgemed's to replace."""

    def __init__(self, why: str, foreign: bool = False):
        super().__init__(why)
        self.foreign = foreign


def read_json(path: Path, limit: int):
    """Parse a JSON state file edgemed wrote (the store's index and journal, the self-test cache, the registry of
    made directories): a regular file (not a link, FIFO or device) of at most ``limit`` bytes,
    nesting bounded by the parser's recursion limit. FileNotFoundError when absent; Damaged for anything else."""
    flags = os.O_RDONLY | os.O_CLOEXEC | _NOFOLLOW | _NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise Damaged(f"it cannot be opened as a plain file ({exc.strerror or exc})", foreign=True) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Damaged("it is not a regular file", foreign=True)
        if st.st_size > limit:
            raise Damaged(f"it is {st.st_size:,} bytes, more than the {limit:,} edgemed allows")
        chunks, size = [], 0
        while size <= limit and (chunk := os.read(fd, limit + 1 - size)):  # it may grow while we read
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise Damaged(f"it is more than the {limit:,} bytes edgemed allows")
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise Damaged("its JSON is nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise Damaged(f"it is not valid JSON ({exc})") from None



def load(path: Path, limit: int, valid: Callable[[object], bool], holds: str, foreign: Callable[[str], None],
         damaged: Callable[[str], None]) -> tuple[dict, bool]:
    """(the state in ``path``, whether edgemed may write it), never raising, never blocking. Missing: empty,
    writable. Not a regular file (or unreadable): ``foreign(why)``, empty, not writable, never replaced. Too
    large, not JSON, nested too deeply, or not ``valid`` (``why``: "does not hold ``holds``"): ``damaged(why)``,
    empty, writable (the next write replaces it)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return {}, True
    except OSError as exc:
        foreign(f"cannot be read ({exc})")
        return {}, False
    if not stat.S_ISREG(st.st_mode):
        foreign(f"is {kind_of(st.st_mode)}, not a file edgemed wrote: it is left alone")
        return {}, False
    try:
        data = read_json(path, limit)
    except FileNotFoundError:
        return {}, True
    except Damaged as exc:  # a foreign object swapped in since the lstat is not ours to replace either
        if not exc.foreign:
            damaged(str(exc))
        return {}, not exc.foreign
    if not valid(data):
        damaged(f"does not hold {holds}")
        return {}, True
    return data, True


@contextlib.contextmanager
def writer_lock(path: Path, wait_s: float, warn: Callable[[str], None], waiting: str | None = None) -> Iterator[bool]:
    """Yield True while holding an exclusive ``flock`` on the lock file ``path`` (created if missing), False when
    it cannot be had: something that is not a regular file is there, it cannot be opened, or another process held
    it for ``wait_s``. ``warn(why)`` is told why (``why`` reads after the path: "is a FIFO, ..."). A file system
    without locks yields True: the writer goes on unserialized, as before. A wait that lasts ``flocks.QUIET_S`` is
    logged once, as ``flocks.take`` logs one (``waiting``, or a line naming ``path``): a command must not look hung
    for ``wait_s``."""
    import fcntl

    fd = None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        st = exc
    if isinstance(st, OSError):
        warn(f"cannot be read ({st})")
    elif st is not None and not stat.S_ISREG(st.st_mode):
        warn(f"is {kind_of(st.st_mode)}, not a file edgemed wrote: it is left alone")
    else:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            warn(f"cannot be opened ({exc})")
        else:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since we looked
                os.close(fd)
                fd = None
    held = fd is not None
    if held:
        start = time.monotonic()
        deadline, said = start + wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said and time.monotonic() - start >= flocks.QUIET_S:
                    said = True
                    flocks.log.warning("%s", waiting or f"waiting for the lock '{path}', held by another edgemed "
                                                         f"process (for at most {wait_s:.0f} s)")
                if time.monotonic() > deadline:
                    warn(f"was held by another edgemed for {wait_s:.0f} s")
                    held = False
                    break
                time.sleep(0.005)
            except OSError:
                break  # no locks on this file system
    try:
        yield held
    finally:
        if fd is not None:
            os.close(fd)


def replace(path: Path, text: str) -> None:
    """Write the state file ``path`` whole: into owner-tagged debris beside it, then one rename over it, synced (the
    file before the rename, the folder after it), so a kill or a power cut leaves the old file or the new one. The
    caller holds ``writer_lock`` and ``load`` found ``path`` writable (a regular file, or nothing), so nothing but
    edgemed's own file is replaced. Dead owners' debris in the folder is swept first, as every atomic write does
    (``atomic.py``)."""
    folder = Path(os.path.abspath(path)).parent
    sweep(folder)
    with owned(folder):
        tmp = debris_path(folder, Path(path).name)
        try:
            tmp.write_text(text, encoding="utf-8")
            sync_tree(tmp)  # its data on disk before the rename names it (``durable.py``)
            step("state.replace")
            os.replace(tmp, path)
            sync_folder(folder)  # and the rename itself
        except BaseException:
            if os.path.lexists(tmp):
                discard(tmp)
            raise
