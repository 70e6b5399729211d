"""Readers of the store while another process changes it: a model started (or listed) while an update or a rollback
swaps ``models/NAME`` is read as one version, never as one version's manifest against the other's files; a command
that has to wait for the store lock says so; a reader inside a writer of the same thread never waits on itself."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import bundle_kit
import pytest

from edgemed.errors import IntegrityError
from edgemed.packaging.manifest import Manifest
from edgemed.packaging.ref import runnable
from edgemed.packaging.store import Store

#: A child process that rolls 'tiny' back and forth until the file named by argv[1] exists (at most 2000 times),
#: then prints how many rollbacks it made
_ROLLER = """
import os, sys
from edgemed.packaging.store import Store
n = 0
while not os.path.exists(sys.argv[1]) and n < 2000:
    Store().rollback("tiny")
    n += 1
print(n)
"""


@pytest.fixture
def two(tmp_path, edgemed_home):
    """'tiny' installed as 'new' over 'old' (so a rollback has a version to go to); manifest sha256 -> total bytes."""
    import hashlib

    b = bundle_kit.two_versions(tmp_path)
    s = Store()
    s.install(b["old"][0])
    s.install(b["new"][0], force=True)
    return {hashlib.sha256(data).hexdigest(): Manifest.from_bytes(data).total_bytes for _, data in b.values()}


def test_a_model_started_or_listed_during_rollbacks_is_read_as_one_version(two, tmp_path):
    """Was: about one read in ten failed as 'damaged or altered' (a full read more often), the reader checking one
    version's manifest against the other's files; ``list`` showed one version's record with the other's files."""
    stop = tmp_path / "stop"
    first = Store().index()["tiny"]["manifest_sha256"]
    child = subprocess.Popen([sys.executable, "-c", _ROLLER, str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while Store().index()["tiny"]["manifest_sha256"] == first:  # the child is rolling
            assert child.poll() is None and time.monotonic() < deadline, "the rollback child did not start"
            time.sleep(0.01)
        seen = set()
        for i in range(150):
            ref = runnable("tiny", full=i % 3 == 0)  # a full read too: every byte hashed, the widest window
            assert ref.model_path is not None
            seen.add(ref.digest)
            for row in Store().list():
                assert "error" not in row, row
                assert row["size_bytes"] == two[row["digest"].removeprefix("sha256:")], row  # one version's record and files
    finally:
        stop.touch()
        out, _ = child.communicate(timeout=120)
    assert child.returncode == 0
    assert int(out) >= 10, out  # the reads overlapped many swaps
    assert len(seen) == 2, seen  # both versions were started


def test_a_damaged_model_is_still_refused(two):
    s = Store()
    lic = s.models / "tiny" / "LICENSE"
    data = lic.read_bytes()
    lic.unlink()  # the model's own link, not the blob: then a changed file in its place
    lic.write_bytes(data + b"x")
    with pytest.raises(IntegrityError, match="LICENSE"):
        s.verify("tiny")
    rows = s.list()
    assert rows[0]["name"] == "tiny" and "error" not in rows[0]  # list shows what the manifest says


def _in_thread(fn, timeout_s: float = 30.0):
    """``fn()`` in a daemon thread; its outcome, or a failure when it has not returned in ``timeout_s``."""
    got = {}

    def run():
        try:
            got["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            got["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"{fn} did not return in {timeout_s} s (it waits on a lock its own thread holds)"
    return got


def test_a_reader_inside_a_writer_of_the_same_thread_does_not_wait_on_itself(two):
    s = Store()

    def verify_inside_the_writer():
        with s.locked():
            lic = s.models / "tiny" / "LICENSE"
            lic.unlink()
            lic.write_bytes(b"not the licence")
            s.verify("tiny")  # fails: read again, and that read must not take the lock this thread holds

    got = _in_thread(verify_inside_the_writer)
    assert isinstance(got.get("error"), IntegrityError), got


def _hold(lock, how: str) -> subprocess.Popen:
    """Another process holding ``lock`` (``how``: "LOCK_EX" or "LOCK_SH") until its stdin closes."""
    code = (f"import fcntl, sys\nfh = open({str(lock)!r}, 'a')\nfcntl.flock(fh, fcntl.{how})\n"
            "print('held', flush=True)\nsys.stdin.read()\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.parametrize("who", ["writer", "reader"])
def test_waiting_for_the_store_lock_says_so(two, caplog, who):
    s = Store()
    holder = _hold(s.root / "lock", "LOCK_SH" if who == "writer" else "LOCK_EX")
    caplog.set_level(logging.WARNING)
    try:
        if who == "writer":
            t = threading.Thread(target=lambda: s.remove("tiny"), daemon=True)
        else:
            def read():
                with s.reading():
                    pass
            t = threading.Thread(target=read, daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        while "waiting for" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert t.is_alive()  # it waits for the other process ...
        assert f"waiting for another edgemed command to finish with the store in {s.root}" in caplog.text, caplog.text
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    t.join(30)
    assert not t.is_alive()  # ... and goes on once that one is done
    assert caplog.text.count("waiting for") == 1
    assert (who == "writer") != (s.models / "tiny").exists()


def test_no_waiting_is_said_when_the_lock_is_free(two, caplog):
    caplog.set_level(logging.WARNING)
    s = Store()
    with s.reading():
        pass
    s.rollback("tiny")
    assert "waiting for" not in caplog.text
    assert not os.path.exists(s.journal_path)
