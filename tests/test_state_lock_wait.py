"""A command waiting on one of edgemed's state-file locks (the registry of made directories, the self-test cache)
says so once the wait lasts ``flocks.QUIET_S``, as a wait for the store's lock does: a silent 30 s wait looks hung."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time

import pytest

from edgemed.files import flocks, ownership, state
from edgemed.runtime import verdicts


def _held_for(path, seconds: float) -> None:
    """Take ``path``'s flock through a descriptor of our own (another open file: it excludes writer_lock's as
    another process's would) and let it go after ``seconds``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    timer = threading.Timer(seconds, os.close, (fd,))
    timer.daemon = True
    timer.start()


@pytest.mark.parametrize("lock", [
    lambda p: state.writer_lock(p, 5.0, lambda why: None),
    ownership._locked,
    verdicts._locked,
], ids=["writer_lock", "made-directories", "self-test-cache"])
def test_a_wait_on_a_held_state_lock_is_said_within_a_second(tmp_path, caplog, lock):
    path = tmp_path / "held.lock"
    _held_for(path, flocks.QUIET_S + 0.7)
    caplog.set_level(logging.WARNING)
    started = time.monotonic()
    with lock(path) as held:
        waited = time.monotonic() - started
    assert held, "the lock was let go within the wait: it is had"
    lines = [r.getMessage() for r in caplog.records if "held by another edgemed process" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert str(path) in lines[0] and lines[0].startswith("waiting for")
    assert flocks.QUIET_S <= waited < 3.0  # let go at QUIET_S + 0.7 s: the line came before that


def test_a_lock_had_at_once_says_nothing(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    with state.writer_lock(tmp_path / "free.lock", 5.0, lambda why: None) as held:
        pass
    assert held and "waiting" not in caplog.text
