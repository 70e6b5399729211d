"""Atomic outputs: write into a temporary sibling, rename into place when complete.

A killed process, a full disk or an exception leaves the destination untouched
and removes the temporary file, so no half-written artifact is ever visible.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from edgemed.errors import OutputExists


def check_destination(path: Path, force: bool) -> None:
    """Refuse to overwrite ``path`` unless ``force``."""
    if path.exists() and not force:
        raise OutputExists(
            f"Output '{path}' already exists.",
            "choose another -o path, or pass --force to replace it",
        )
    if not path.parent.exists():
        raise OutputExists(
            f"Output directory '{path.parent}' does not exist.",
            f"create it first (mkdir -p {path.parent})",
        )


@contextlib.contextmanager
def atomic_path(dest: Path | str, *, force: bool = False, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success rename it onto ``dest``.

    Works for files and directories. The temporary name starts with ``.`` and ends
    with ``.partial`` so it is easy to recognise if the machine loses power.
    """
    dest = Path(dest)
    check_destination(dest, force)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f"{suffix}.partial", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the caller creates a file or a directory here
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp}")
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        remove(tmp)
        raise


def remove(path: Path) -> None:
    """Remove a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_text(dest: Path, text: str, *, force: bool = True) -> None:
    with atomic_path(dest, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")
