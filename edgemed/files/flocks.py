"""Taking a ``flock`` that another edgemed may hold, and saying so rather than hanging silently.

A command that waits on a lock (a second pull while one runs, an install while another changes the store) looks
hung unless it says what it waits for. ``take`` tries the lock without blocking first; when another process holds
it, it waits (in the kernel, woken when the lock is let go) and, once the wait has lasted ``QUIET_S``, logs one
line (a warning: shown at the default verbosity, on stderr). A lock held for a few milliseconds, a reader and a
rollback crossing, is not worth a line. The kernel drops a flock when its holder dies, however it dies, so the
wait ends with the holder: never on a dead one.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

#: How long a wait for a lock lasts before it is said
QUIET_S = 0.5


def take(fd, how: int, waiting: str) -> None:
    """``flock(fd, how)`` (``fcntl.LOCK_SH`` or ``LOCK_EX``); ``waiting`` is logged once when the wait lasts
    ``QUIET_S``."""
    import fcntl

    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    say = threading.Timer(QUIET_S, log.warning, ("%s", waiting))
    say.daemon = True
    say.start()
    try:
        fcntl.flock(fd, how)
    finally:
        say.cancel()
