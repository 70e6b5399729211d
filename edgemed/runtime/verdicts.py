"""The self-test's verdict cache, ``$EDGEMED_CACHE_DIR/selftest/verdicts.json``: digest -> verdict record.

It is only a cache, and read as untrusted: a file over ``MAX_CACHE_BYTES``, damaged, nested
too deeply or not of the expected shape counts as empty (a warning), and the next verdict
replaces it atomically. Something other than a regular file in its place (a directory, a
FIFO, a link) is left alone, and the self-test runs without caching. Writers take an flock
on ``verdicts.lock`` beside it and read, merge and replace the file under it, so concurrent
runs keep every verdict. Nothing here raises or blocks for what it finds on disk.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from edgemed import env
from edgemed.files.state import load, writer_lock
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


def _is_record(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"ok", "mode", "signal", "detail"}
            and isinstance(value["ok"], bool) and isinstance(value["mode"], str) and len(value["mode"]) <= 64
            and (value["signal"] is None or (isinstance(value["signal"], str) and len(value["signal"]) <= 64))
            and isinstance(value["detail"], str) and len(value["detail"]) <= 4096)


def _load(path: Path) -> tuple[dict, bool]:
    """(the verdicts in ``path``, whether edgemed may write it): never raises, never blocks (``state_files.load``)."""
    return load(path, MAX_CACHE_BYTES,
                lambda d: isinstance(d, dict) and all(isinstance(k, str) and _DIGEST.fullmatch(k) and _is_record(v)
                                                      for k, v in d.items()),
                "self-test verdicts",
                lambda why: _warn(f"the self-test cache '{path}' {why}, and the self-test runs without caching its "
                                  "verdicts; move it away to cache them again"),
                lambda why: _warn(f"the self-test cache '{path}' {why}: it is only a cache, so it counts as empty; the "
                                  "self-test runs again and its next verdict replaces the file"))


def read() -> dict:
    """The cached verdicts (digest -> record); empty, with a warning, where the file is not usable."""
    try:
        where = cache_file()
    except OSError as exc:
        _warn(f"cannot use the self-test cache folder ({exc}); the self-test runs without caching its verdicts")
        return {}
    return _load(where)[0]


def _locked(path: Path):
    """True while holding the writers' lock at ``path`` (False: could not, leave the cache be)."""
    return writer_lock(path, LOCK_WAIT_S, lambda why: _warn(f"the self-test cache lock '{path}' {why}; this "
                                                             "verdict is not cached"),
                       f"waiting for the self-test cache lock '{path}', held by another edgemed process (for at most "
                       f"{LOCK_WAIT_S:.0f} s; then this verdict is not cached)")


def remember(digest: str, record: dict) -> None:
    """Add one verdict record: read, merge and atomically replace the cache under the writers' lock."""
    from edgemed.files.atomic import write_text

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
