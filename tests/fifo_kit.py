"""Running a command that must refuse a named pipe without blocking on it: in a thread, and where it blocks, a
writer that hangs up at once, so the thread ends and the test fails with the reason instead of hanging."""

from __future__ import annotations

import os
import threading

import pytest


def run_unblocked(call, fifo, timeout: float, blocked: str):
    """``call()``'s result; fails the test with ``blocked`` when it is still running after ``timeout`` seconds (it
    opened ``fifo`` and waits for a writer)."""
    done: list = []
    worker = threading.Thread(target=lambda: done.append(call()), daemon=True)
    worker.start()
    worker.join(timeout=timeout)
    if worker.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=10)
        pytest.fail(blocked)
    return done[0]
