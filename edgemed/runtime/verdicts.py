"""The self-test's verdict cache, ``$EDGEMED_CACHE_DIR/selftest/verdicts.json``: digest -> verdict record.

It is only a cache, and read as untrusted: a file over ``MAX_CACHE_BYTES``, damaged, nested
too deeply or not of the expected shape counts as empty (a warning), and the next verdict
replaces it atomically. Something other than a regular file in its place (a directory, a
FIFO, a link) is left alone, and the self-test runs without caching. Writers take an flock
on ``verdicts.lock`` beside it and read, merge and replace the file under it, so concurrent
runs keep every verdict. Nothing here raises or blocks for what it finds on disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
import time
from pathlib import Path

from edgemed import env
from edgemed.errors import EdgemedError

log = logging.getLogger(__name__)

#: Most verdicts the cache keeps (the oldest go first); a host sees a handful of models and settings.
MAX_VERDICTS = 1000
#: Largest cache file read (bytes): far above what MAX_VERDICTS records take.
MAX_CACHE_BYTES = 4 << 20
#: Seconds a writer waits for another writer's lock before it leaves this verdict uncached.
LOCK_WAIT_S = 10.0
_DIGEST = re.compile(r"[0-9a-f]{64}")
_warned: set[str] = set()  # cache warnings already given in this process


def cache_file() -> Path:
    """Where the verdicts live (its folder is made if missing)."""
    return env.cache_dir("selftest") / "verdicts.json"


def _warn(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _kind(mode: int) -> str:
    return ("a directory" if stat.S_ISDIR(mode) else "a symbolic link" if stat.S_ISLNK(mode)
            else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file")


def _is_record(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"ok", "mode", "signal", "detail"}
            and isinstance(value["ok"], bool) and isinstance(value["mode"], str) and len(value["mode"]) <= 64
            and (value["signal"] is None or (isinstance(value["signal"], str) and len(value["signal"]) <= 64))
            and isinstance(value["detail"], str) and len(value["detail"]) <= 4096)


def _load(path: Path) -> tuple[dict, bool]:
    """(the verdicts in ``path``, whether edgemed may write it): never raises, never blocks.

    Anything but a regular file at ``path`` is not edgemed's to replace: no verdicts, not writable.
    A regular file that is too large, damaged or of another shape: no verdicts (a warning), writable."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return {}, True
    except OSError as exc:
        _warn(f"cannot read the self-test cache '{path}' ({exc}); the self-test runs without caching its verdicts")
        return {}, False
    if not stat.S_ISREG(st.st_mode):
        _warn(f"the self-test cache '{path}' is {_kind(st.st_mode)}, not a file edgemed wrote: it is left alone and "
              f"the self-test runs without caching its verdicts; move it away to cache them again")
        return {}, False
    damaged = (f"the self-test cache '{path}' {{}}: it is only a cache, so it counts as empty; the self-test runs "
               f"again and its next verdict replaces the file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}, True
    except OSError as exc:
        _warn(damaged.format(f"cannot be read ({exc})"))
        return {}, True
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since we looked
            return {}, False
        chunks, size = [], 0
        while size <= MAX_CACHE_BYTES:
            chunk = os.read(fd, min(1 << 20, MAX_CACHE_BYTES + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        _warn(damaged.format(f"cannot be read ({exc})"))
        return {}, True
    finally:
        os.close(fd)
    if size > MAX_CACHE_BYTES:
        _warn(damaged.format(f"is larger than {MAX_CACHE_BYTES} bytes"))
        return {}, True
    try:
        data = json.loads(b"".join(chunks).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deep
        why = "is nested too deeply" if isinstance(exc, RecursionError) else "is not valid JSON"
        _warn(damaged.format(why))
        return {}, True
    if not (isinstance(data, dict) and all(isinstance(k, str) and _DIGEST.fullmatch(k) and _is_record(v)
                                           for k, v in data.items())):
        _warn(damaged.format("does not hold self-test verdicts"))
        return {}, True
    return data, True


def read() -> dict:
    """The cached verdicts (digest -> record); empty, with a warning, where the file is not usable."""
    try:
        where = cache_file()
    except OSError as exc:
        _warn(f"cannot use the self-test cache folder ({exc}); the self-test runs without caching its verdicts")
        return {}
    return _load(where)[0]


def _open_lock(path: Path) -> int | None:
    """The writers' lock file beside the cache, opened without following links or blocking; None if unusable."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        _warn(f"the self-test cache lock '{path}' is {_kind(st.st_mode)}, not a file edgemed wrote: it is left "
              f"alone and self-test verdicts are not cached; move it away to cache them again")
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                     | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        _warn(f"cannot open the self-test cache lock '{path}' ({exc}); self-test verdicts are not cached")
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def _locked(path: Path):
    """Yield True while holding the writers' lock at ``path`` (False: could not, leave the cache be)."""
    import fcntl

    fd = _open_lock(path)
    held = fd is not None
    if held:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("another edgemed held the self-test cache lock '%s' for %.0f s; this verdict is "
                                "not cached", path, LOCK_WAIT_S)
                    held = False
                    break
                time.sleep(0.005)
            except OSError:
                break  # no locks on this file system: write as before, a lost verdict only costs a re-check
    try:
        yield held
    finally:
        if fd is not None:
            os.close(fd)


def remember(digest: str, record: dict) -> None:
    """Add one verdict record: read, merge and atomically replace the cache under the writers' lock."""
    from edgemed.atomic import write_text

    try:
        where = cache_file()
        with _locked(where.with_name("verdicts.lock")) as held:
            if not held:
                return
            data, writable = _load(where)
            if not writable:
                return
            data.pop(digest, None)
            data[digest] = dict(record)
            while len(data) > MAX_VERDICTS:
                del data[next(iter(data))]
            write_text(where, json.dumps(data, indent=1) + "\n", force=True)
    except (OSError, EdgemedError) as exc:  # a read-only cache, or something put in its place: a re-check next time
        log.warning("could not record the self-test verdict: %s", exc)
