"""A pull's download meets the disk: a write the kernel cuts short (a full disk or quota lets part of a chunk in)
is carried on until the whole chunk is written, and a disk that takes nothing more stops the pull with the disk's
error naming the download, the part kept to resume. Never a download that is shorter than its layer yet taken as
verified (its hash counted the bytes the disk did not take; the install then called the maker's bundle damaged).
Also: a second pull waiting on the downloads lock says what it waits for. A stand-in for the registry's answers
(``requests.Response`` over bytes) is enough here: no registry is needed."""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import threading
import time

import pytest

pytest.importorskip("requests")

from edgemed.errors import OutputError  # noqa: E402
from edgemed.packaging import oci, oci_pull  # noqa: E402

DATA = bytes(range(256)) * (oci_pull.CHUNK * 5 // 2 // 256)  # two and a half chunks
LAYER = oci.Layer("model/tiny.gguf", "application/octet-stream", hashlib.sha256(DATA).hexdigest(), len(DATA))


class _Registry:
    """What ``_download`` asks of an ``oci.Client``: a GET of the blob answers 200 with DATA, streamed."""

    def url(self, kind: str, reference: str) -> str:
        return f"http://registry.invalid/v2/models/tiny/{kind}/{reference}"

    def request(self, method: str, url: str, *, headers: dict | None = None, stream: bool = False):
        import requests
        import urllib3

        r = requests.Response()
        r.status_code, r.url = 200, url
        r.raw = urllib3.HTTPResponse(io.BytesIO(DATA), preload_content=False)
        return r


def _fetch(root):
    root.mkdir(parents=True, exist_ok=True)
    stats = oci_pull.Pulled(name="", ref="", origin="", files=1, bytes_downloaded=0, bytes_resumed=0, blobs_in_store=0,
                            signed_by=None)
    return oci_pull._fetch_blob(_Registry(), LAYER, root, oci.parse_ref("oci://registry.invalid/models/tiny:1"), stats)


def _cut(monkeypatch, after) -> list[int]:
    """os.write that writes half of the second chunk; then ``after(fd, data)`` for every later write (None: as os.write)."""
    real = os.write
    calls = []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) == 2:
            return real(fd, bytes(data[:len(data) // 2]))
        if len(calls) > 2 and after is not None:
            return after(fd, data)
        return real(fd, data)

    monkeypatch.setattr(oci_pull.os, "write", write)
    return calls


def test_a_write_cut_short_is_carried_on_to_the_whole_chunk(tmp_path, monkeypatch):
    calls = _cut(monkeypatch, None)
    got = _fetch(tmp_path / "downloads")
    monkeypatch.undo()
    assert got == tmp_path / "downloads" / LAYER.sha256
    assert got.stat().st_size == LAYER.size and hashlib.sha256(got.read_bytes()).hexdigest() == LAYER.sha256
    assert len(calls) > 3  # the cut chunk's rest was written by a write of its own


@pytest.mark.parametrize("disk", ["enospc", "zero"])
def test_a_disk_that_takes_no_more_stops_the_pull_with_the_disks_error(tmp_path, monkeypatch, disk):
    def full(fd, data):
        if disk == "zero":
            return 0
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    _cut(monkeypatch, full)
    root = tmp_path / "downloads"
    with pytest.raises(OutputError) as caught:
        _fetch(root)
    monkeypatch.undo()
    err = caught.value
    assert "No space left" in err.problem and f"{root / LAYER.sha256}.part" in err.problem, err
    assert "pull again" in err.fix and "resumes" in err.fix, err.fix
    assert not (root / LAYER.sha256).exists()  # nothing taken as verified
    part = root / f"{LAYER.sha256}.part"  # what the disk took stays, to resume from
    assert part.stat().st_size == oci_pull.CHUNK + oci_pull.CHUNK // 2
    assert part.read_bytes() == DATA[:part.stat().st_size]


def test_a_second_pull_says_it_waits_for_the_first(tmp_path, caplog):
    import fcntl

    root = tmp_path / "downloads"
    root.mkdir()
    caplog.set_level(logging.WARNING)
    with open(root / "lock", "a") as held:  # another descriptor: as another pull's, it excludes this one
        fcntl.flock(held, fcntl.LOCK_EX)
        entered = threading.Event()

        def second():
            with oci_pull._exclusive(root):
                entered.set()

        t = threading.Thread(target=second, daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        while "waiting for" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not entered.is_set()
        assert f"waiting for another pull in {root} to finish (one pull at a time)" in caplog.text, caplog.text
    t.join(30)
    assert entered.is_set() and caplog.text.count("waiting for") == 1
