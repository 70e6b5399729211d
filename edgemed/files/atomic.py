"""Atomic outputs: write into an owner-tagged temporary sibling, rename into place when complete.

Rules, for every output edgemed writes (convert, pack, keygen, export, reports, the store's files):

- A killed process, a full disk or an exception leaves the destination as it was: the old
  output or the new one, never a half-written one.
- Nothing edgemed did not make is deleted. ``force`` may replace an existing *file*; an
  existing *directory* is refused whatever the flag, unless edgemed made it as an output of
  the same kind and nobody changed it since (``ownership.py`` keeps that proof). The current
  directory, or one above it, is always refused.
- Temporary files and folders are *debris* until they are renamed into place, and carry
  their owner in their name (``debris.py``). Writing into a folder first sweeps the debris of
  owners that are gone, so a crash costs disk space only until the next run.
- ``step()`` marks every filesystem step, so the crash tests can kill a command at each one.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

from edgemed.files import ownership
from edgemed.files.debris import ASIDE, debris_path, discard, owned, scratch_dir, step, sweep
from edgemed.errors import OutputExists

__all__ = ["atomic_path", "check_destination", "write_text", "swap_in", "scratch_dir", "sweep", "step", "discard"]


def _folder(path: Path) -> Path:
    return Path(os.path.abspath(path)).parent


def check_destination(path: Path, force: bool, kind: str | None = None) -> None:
    """Refuse an output that would lose something, and sweep dead owners' debris from its folder.

    ``kind`` names the directory output being written ("bundle", "onnx"); only a directory
    edgemed made as that kind, unchanged since, may be replaced (with ``force``).
    """
    path = Path(path)
    if _holds_cwd(path):
        raise OutputExists(
            f"Output '{path}' is the current directory or a folder above it; edgemed never replaces it.",
            f"name a new path inside it instead, e.g. -o {Path(path) / 'NAME'}",
        )
    folder = _folder(path)
    if not folder.is_dir():
        raise OutputExists(
            f"Output directory '{folder}' does not exist.",
            f"create it first (mkdir -p {folder})",
        )
    sweep(folder)
    if not os.path.lexists(path):
        return
    _refuse_directory(path, kind)
    if not force:
        raise OutputExists(
            f"Output '{path}' already exists.",
            "choose another -o path, or pass --force to replace it",
        )


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
def atomic_path(dest: Path | str, *, force: bool = False, suffix: str = "", kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success move it onto ``dest``.

    The caller creates a file or a directory at the yielded path. ``kind`` marks a directory
    output (see ``check_destination``). The temporary name is owner-tagged debris
    (``.NAME.edgemed-OWNER.RAND<suffix>.partial``) until it is renamed into place.
    """
    dest = Path(dest)
    check_destination(dest, force, kind)
    folder = _folder(dest)
    with owned(folder):
        tmp = debris_path(folder, dest.name, suffix)
        try:
            yield tmp
            step("atomic.written")
            if not os.path.lexists(tmp):
                raise FileNotFoundError(f"nothing was written to {tmp}")
            if kind is not None and tmp.is_dir() and not tmp.is_symlink():
                step("atomic.record")
                ownership.record(tmp, kind)
            if os.path.lexists(dest):
                _refuse_directory(dest, kind)  # again: it may have changed while we wrote
            old = swap_in(tmp, dest, debris_path(folder, dest.name, ASIDE))
            if old is not None:
                step("atomic.discard-old")
                discard(old)
        except BaseException:
            if os.path.lexists(tmp):
                discard(tmp)
            raise


def swap_in(new: Path, dest: Path, aside: Path) -> Path | None:
    """Put ``new`` at ``dest``; return the debris path now holding what ``dest`` held (or None).

    A file onto a file is one ``rename``. Anything involving a directory is exchanged in one
    ``renameat2(RENAME_EXCHANGE)`` where the kernel and file system allow it; elsewhere it
    takes two renames (``dest`` -> ``aside``, ``new`` -> ``dest``), and a kill between them
    leaves ``aside``, which the next sweep of the folder renames back onto ``dest``.
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
    step("atomic.aside")
    os.rename(dest, aside)
    step("atomic.rename-in")
    os.rename(new, dest)
    return aside


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
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def write_text(dest: Path, text: str, *, force: bool = True) -> None:
    with atomic_path(dest, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")
