"""Content hashes used for provenance and integrity (sha256, streamed)."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 24  # 16 MiB reads: large enough to run at disk speed, small enough to stay light


def file_sha256(path: Path | str, chunk: int = CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def files_digest(files: list[Path], root: Path | None = None) -> str:
    """One sha256 over several files: each file's name (relative to ``root``) and content hash."""
    h = hashlib.sha256()
    for file in files:
        name = str(file.relative_to(root)) if root else file.name
        h.update(name.encode() + b"\0" + file_sha256(file).encode() + b"\n")
    return h.hexdigest()
