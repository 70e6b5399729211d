"""Durability around a rename: what a rename publishes is on disk first, and the rename itself after.

A rename is recorded in the folder's metadata, which a file system may write before the new file's data: after a
power cut, the name points at an empty or partial file while the old one is gone (ext4's ``auto_da_alloc`` covers
a rename onto an existing name only, never onto a new one). So, before the rename, ``sync_tree`` the temporary
(a file, or every file and folder in a directory and the directory itself); after it, ``sync_folder`` the folder
that holds the name.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

# fsync is not offered for this object on this file system (some FUSE and network file systems, for folders)
_NOT_OFFERED = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF)


def _fsync(path: str | Path, flags: int) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0) | flags)
    except PermissionError:  # a file its owner made unreadable (mode 0): nothing to open it by, nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NOT_OFFERED:
            raise  # EIO: the data did not reach the disk, which the rename must not hide
    finally:
        os.close(fd)


def sync_folder(folder: str | Path) -> None:
    """Make the renames and new names in ``folder`` durable (a folder that cannot be opened is left as it is)."""
    try:
        _fsync(folder, getattr(os, "O_DIRECTORY", 0))
    except (FileNotFoundError, NotADirectoryError):
        pass  # gone, or not a folder any more: the rename is as durable as the system makes it
    except OSError as exc:
        if exc.errno != errno.ELOOP:  # a link where the folder was (O_NOFOLLOW): not edgemed's to sync
            raise  # EIO: the rename may not reach the disk, which a caller must not be told it did


def sync_tree(path: str | Path) -> None:
    """fsync the file at ``path``; for a directory, every file and folder under it and the directory itself.
    Links are neither followed nor synced (their target is not part of the output)."""
    mode = os.lstat(path).st_mode
    if stat.S_ISREG(mode):
        _fsync(path, 0)
    elif stat.S_ISDIR(mode):
        for dirpath, dirnames, filenames in os.walk(path, topdown=False, followlinks=False):
            for n in filenames:
                p = os.path.join(dirpath, n)
                if stat.S_ISREG(os.lstat(p).st_mode):
                    _fsync(p, 0)
            sync_folder(dirpath)
