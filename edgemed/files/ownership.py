"""Proof that edgemed made a directory output, so that ``--force`` may replace it.

A directory output (an ONNX export, a bundle directory) is recorded just before it is
renamed into place, in ``$EDGEMED_HOME/made-dirs.json``: its device and inode (a rename
keeps both), its kind, and a digest of its listing (every entry's path and type; every
file's size and mtime). ``made_by_edgemed(path, kind)`` holds only while all of that
still matches: a directory someone else made, or one where a file was added, removed
or rewritten since, is not edgemed's to delete. Nothing is written into the output itself.

The registry is read as untrusted, since it is what lets edgemed delete a directory: a file
over ``MAX_REGISTRY_BYTES``, damaged, nested too deeply or not of the expected shape proves
nothing (a warning): edgemed made no directory, as far as it knows, and the next directory
output replaces the file atomically. Writers hold an flock on ``made-dirs.lock`` beside it.
Something other than a regular file at either name (a directory, a FIFO, a link) is left
alone, and is never opened in a way that blocks: the output is still written, but is not
recorded, so ``--force`` will not replace it later (a warning names the object to move away).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from edgemed import env
from edgemed.files.debris import label_of
from edgemed.files.state import load, replace, writer_lock
from edgemed.errors import EdgemedError

log = logging.getLogger(__name__)

_FILE = "made-dirs.json"
_LOCK = "made-dirs.lock"
_MAX_ENTRIES = 2000
#: Largest registry read (bytes); a writer drops its oldest entries rather than write more.
MAX_REGISTRY_BYTES = 16 << 20
#: Seconds a writer waits for another writer's lock before it leaves its output unrecorded.
LOCK_WAIT_S = 30.0
_MAX_PATH = 4096  # characters in a recorded path (Linux's PATH_MAX is 4096 bytes)
_KEY = re.compile(r"[0-9]{1,20}:[0-9]{1,20}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_warned: set[str] = set()  # warnings already given in this process
_UNRECORDED = "directory outputs are written but not recorded as edgemed's, so --force will not replace them later"


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            kind = "d" if os.path.isdir(p) and not os.path.islink(p) else ("l" if os.path.islink(p) else "f")
            extra = "" if kind == "d" else f"{st.st_size}:{st.st_mtime_ns}"
            h.update(f"{kind}\0{rel}\0{extra}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _warn(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _is_entry(key, e) -> bool:
    return (isinstance(key, str) and _KEY.fullmatch(key) is not None
            and isinstance(e, dict) and set(e) == {"kind", "digest", "path"}
            and isinstance(e["kind"], str) and 0 < len(e["kind"]) <= 64
            and isinstance(e["digest"], str) and _DIGEST.fullmatch(e["digest"]) is not None
            and isinstance(e["path"], str) and 0 < len(e["path"]) <= _MAX_PATH)


def _load(path: Path) -> tuple[dict, bool]:
    """(the entries in ``path``, whether edgemed may write it): never raises, never blocks (``state_files.load``)."""
    where = f"edgemed's record of the directories it made, '{path}',"
    return load(path, MAX_REGISTRY_BYTES,
                lambda d: isinstance(d, dict) and len(d) <= _MAX_ENTRIES and all(_is_entry(k, v) for k, v in d.items()),
                "edgemed's records",
                lambda why: _warn(f"{where} {why}: no directory output counts as edgemed's, and {_UNRECORDED}; move it "
                                  "away to record them again"),
                lambda why: _warn(f"{where} {why}: it proves nothing, so no directory output counts as edgemed's "
                                  "(--force replaces none); the next directory output replaces the file"))


def _locked(path: Path):
    """True while holding the writers' lock at ``path`` (False: could not, record nothing)."""
    return writer_lock(path, LOCK_WAIT_S, lambda why: _warn(f"edgemed's lock '{path}' {why}: {_UNRECORDED}"))


def _fit(entries: dict) -> None:
    """Drop the oldest entries until the registry fits in ``_MAX_ENTRIES`` and ``MAX_REGISTRY_BYTES``."""
    while len(entries) > _MAX_ENTRIES:
        entries.pop(next(iter(entries)))
    sizes = {k: len(json.dumps({k: v}, indent=1)) for k, v in entries.items()}
    total = sum(sizes.values())  # at least the size of the whole
    while total > MAX_REGISTRY_BYTES and len(entries) > 1:
        oldest = next(iter(entries))
        total -= sizes[oldest]
        del entries[oldest]


def _key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}"


def record(directory: Path, kind: str, final: Path | None = None) -> None:
    """Remember ``directory`` (about to be renamed into place at ``final``) as an edgemed ``kind`` output.

    Never raises for what it finds in ``$EDGEMED_HOME``: where the record cannot be kept, the
    output is only not replaceable with ``--force`` later (a warning says why)."""
    st = os.stat(directory)
    # the path recorded is the final one: the caller renames ``directory`` to its output name (a temporary's
    # name holds at most 120 characters of it, so a longer one is only right when the caller passes ``final``)
    final = Path(os.path.abspath(final)) if final is not None else _final(directory)
    new = {"kind": kind, "digest": _digest(directory), "path": str(final)}
    if not _is_entry(_key(st), new):
        log.warning("'%s' is not recorded as edgemed's (its path or kind is too long to record), so --force "
                    "will not replace it later", new["path"])
        return
    try:
        home = env.home()
        home.mkdir(parents=True, exist_ok=True)
        with _locked(home / _LOCK) as held:
            if not held:
                return
            entries, writable = _load(home / _FILE)
            if not writable:
                return
            for key in list(entries):  # forget outputs that are gone (or were replaced)
                try:
                    alive = _key(os.stat(entries[key]["path"])) == key
                except (OSError, ValueError):
                    alive = False
                if not alive:
                    del entries[key]
            entries.pop(_key(st), None)
            entries[_key(st)] = new
            _fit(entries)
            replace(home / _FILE, json.dumps(entries, indent=1) + "\n")  # oldest first
    except (OSError, EdgemedError) as exc:  # a read-only home, something put in the registry's place
        log.warning("could not record '%s' as edgemed's (%s), so --force will not replace it later", new["path"], exc)


def _final(tmp: Path) -> Path:
    return Path(os.path.abspath(tmp)).parent / label_of(tmp)


def made_by_edgemed(directory: Path, kind: str) -> bool:
    """True when ``directory`` is an edgemed ``kind`` output exactly as edgemed left it.

    A registry that is missing, damaged or not a file proves nothing: False. Never blocks."""
    try:
        st = os.stat(directory)
        home = env.home()
    except OSError:
        return False
    e = _load(home / _FILE)[0].get(_key(st))
    if e is None or e["kind"] != kind:
        return False
    try:
        return e["digest"] == _digest(directory)
    except OSError:
        return False
