"""Proof that edgemed made a directory output, so that ``--force`` may replace it.

A directory output (an ONNX export, a bundle directory) is recorded just before it is
renamed into place, in ``$EDGEMED_HOME/made-dirs.json``: its device and inode (a rename
keeps both), its kind, and a digest of its listing (every entry's path and type; every
file's size and mtime). ``made_by_edgemed(path, kind)`` holds only while all of that
still matches: a directory someone else made, or one where a file was added, removed
or rewritten since, is not edgemed's to delete. Nothing is written into the output itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from edgemed import env

_FILE = "made-dirs.json"
_MAX_ENTRIES = 2000


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


@contextlib.contextmanager
def _registry() -> Iterator[dict]:
    """The registry, read and (when the block changes it) written back under its lock."""
    import fcntl

    from edgemed.atomic import write_text

    home = env.home()
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "made-dirs.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            data = json.loads((home / _FILE).read_text(encoding="utf-8"))
            entries = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            entries = {}
        before = json.dumps(entries, sort_keys=True)
        yield entries
        if json.dumps(entries, sort_keys=True) != before:
            write_text(home / _FILE, json.dumps(entries, indent=1, sort_keys=True) + "\n")


def _key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}"


def record(directory: Path, kind: str) -> None:
    """Remember ``directory`` (about to be renamed into place) as an edgemed ``kind`` output."""
    st = os.stat(directory)
    with _registry() as entries:
        for key in list(entries):  # forget outputs that are gone (or were replaced)
            e = entries[key]
            try:
                alive = isinstance(e, dict) and _key(os.stat(e.get("path", ""))) == key
            except OSError:
                alive = False
            if not alive:
                del entries[key]
        while len(entries) >= _MAX_ENTRIES:
            entries.pop(next(iter(entries)))
        # the path recorded is the final one: the caller renames ``directory`` to its output name
        entries[_key(st)] = {"kind": kind, "digest": _digest(directory), "path": str(_final(directory))}


def _final(tmp: Path) -> Path:
    from edgemed.debris import _DEBRIS

    m = _DEBRIS.fullmatch(tmp.name)
    return Path(os.path.abspath(tmp)).parent / (m["label"] if m else tmp.name)


def made_by_edgemed(directory: Path, kind: str) -> bool:
    """True when ``directory`` is an edgemed ``kind`` output exactly as edgemed left it."""
    try:
        st = os.stat(directory)
        home = env.home()
        entries = json.loads((home / _FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    e = entries.get(_key(st)) if isinstance(entries, dict) else None
    if not isinstance(e, dict) or e.get("kind") != kind:
        return False
    try:
        return e.get("digest") == _digest(directory)
    except OSError:
        return False
