"""Open a file of user input (a checkpoint, an adapter, a template folder) for reading: a regular file, or nothing.

A checkpoint folder is untrusted input, and a name in it may be a named pipe (opening it blocks until something
writes to it: the command hangs) or a link to a device (``/dev/zero`` never ends: a reader sized by "the whole file"
fills memory). Links are followed, since a Hugging Face cache links every file of a snapshot into its blob store;
what they lead to must be a regular file. The file is opened non-blocking, so a FIFO swapped in after the check
cannot block the open either, and checked again on the descriptor.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


class NotRegular(OSError):
    """The path is a FIFO, a device or a socket (``strerror`` says which): never read. A directory is
    ``IsADirectoryError``, as ``open`` reports it."""


def _kind(mode: int) -> str:
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def _regular(path: Path, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(21, "Is a directory", str(path))
    raise NotRegular(None, f"it is {_kind(mode)}, not a regular file", str(path))


def odd_kind(path: Path) -> str | None:
    """What ``path`` is when something is there that is neither a folder nor a regular file, in words for "'PATH' is
    ...": "a named pipe (FIFO)", "a character device", "a link to 'X', which does not exist". None for a folder, a
    regular file (or a link to either) and a path where nothing is. Told from its status alone: never opened, so a
    FIFO cannot block the caller."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"a link to '{os.readlink(path)}', which does not exist" if os.path.islink(path) else None
    except OSError as exc:  # a loop of links, a folder on the way that may not be searched
        return f"there but cannot be looked at ({exc.strerror})" if os.path.lexists(path) else None
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else _kind(mode)


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for binary reading when it is (or links to) a regular file; ``NotRegular`` (an ``OSError``)
    or ``IsADirectoryError`` when it is not; other ``OSError`` as ``open`` raises them."""
    _regular(path, os.stat(path).st_mode)  # before open: a device may act on being opened
    fd = os.open(path, _FLAGS)
    try:
        _regular(path, os.fstat(fd).st_mode)  # what was opened, not what was checked
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_at_most(path: Path, limit: int) -> bytes:
    """The bytes of the regular file ``path``, refused (``ValueError``) when it holds more than ``limit``."""
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise ValueError(f"{size:,} bytes is far more than such a file holds (at most {limit:,})")
        data = fh.read(limit + 1)  # it may grow while read
    if len(data) > limit:
        raise ValueError(f"it is more than {limit:,} bytes, far more than such a file holds")
    return data
