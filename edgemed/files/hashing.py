"""Content hashes used for provenance and integrity (sha256, streamed)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

BLOCK = 1 << 20  # 1 MiB reads into one reused buffer: disk speed, no allocation per block


def file_sha256(path: Path | str) -> str:
    """The sha256 of a file's bytes, hex: the one file hash of edgemed (bundles, reports, provenance)."""
    h = hashlib.sha256()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def stamp(st: os.stat_result) -> tuple[int, ...]:
    """(device, inode, size, mtime_ns, ctime_ns): two equal stamps of a path mean the file was neither written nor
    replaced between the two stats (``packaging.digest``'s docstring says why, and what it cannot see)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def files_digest(files: list[Path], root: Path | None = None) -> str:
    """One sha256 over several files: each file's name (relative to ``root``) and content hash."""
    h = hashlib.sha256()
    for file in files:
        name = str(file.relative_to(root)) if root else file.name
        h.update(name.encode() + b"\0" + file_sha256(file).encode() + b"\n")
    return h.hexdigest()
