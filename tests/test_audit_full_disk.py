"""The audit log on a disk that fills: a generation already accepted (its answer may have gone out) still gets its end
record, from the writer's reserve, and so does the server's stop; new requests are refused; `audit verify` says where
the disk filled. Also: record times that jump (a clock set back or ahead) are reported, never refused."""

from __future__ import annotations

import errno
import json
import logging
import os
import time

import pytest
from click.testing import CliRunner

from edgemed.cli import cli
from edgemed.errors import InputError
from edgemed.serve import audit as audit_mod
from edgemed.serve.audit import AuditLog, verify


class FullDisk:
    """A disk that takes no more bytes for the log once ``fill()`` is called, but the ones a file cut shorter frees
    (the writer's reserve): writes past that write what fits and then fail with ENOSPC, as a real full disk does."""

    def __init__(self, monkeypatch, log: AuditLog):
        self.log, self.free = log, None
        real_write, real_truncate = os.write, os.ftruncate

        def write(fd, data):
            if self.free is None or fd != self.log._fd:
                return real_write(fd, data)
            if self.free == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = real_write(fd, bytes(data[:self.free]))
            self.free -= n
            return n

        def ftruncate(fd, length):
            size = os.fstat(fd).st_size
            real_truncate(fd, length)
            if self.free is not None:
                self.free += max(0, size - length)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "ftruncate", ftruncate)

    def fill(self) -> None:
        self.free = 0


def _reserves(folder) -> list:
    return [p for p in folder.iterdir() if ".reserve." in p.name]


def test_generations_accepted_before_the_disk_filled_still_get_their_end_records(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, content=True)
    [reserve] = _reserves(tmp_path)
    assert reserve.stat().st_size == audit_mod.RESERVE_BYTES
    disk = FullDisk(monkeypatch, log)
    log.append("start", model="m")
    log.append("accepted", request_id="answered", seed=1)
    log.append("accepted", request_id="streaming", seed=2)
    disk.fill()
    # the first write that finds no room frees the reserve, marks the place, and goes in (without its text)
    log.append("request", request_id="answered", status=200, completion_tokens=4, prompt="Fever since", output="x")
    assert log.failed and "No space left" in log.failed and not _reserves(tmp_path)
    with pytest.raises(OSError):  # a new generation: refused from now on
        log.append("accepted", request_id="new", seed=3)
    with pytest.raises(OSError):  # as is a record of anything it did not accept
        log.append("request", request_id="refused", status=404)
    log.append("request", request_id="streaming", status=200, completion_tokens=9)
    log.append("stop", model="m")
    log.close()
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    kinds = [(r["kind"], r.get("request_id")) for r in recs]
    assert kinds[-5:] == [("accepted", "streaming"), ("disk_full", None), ("request", "answered"),
                          ("request", "streaming"), ("stop", None)], kinds
    full, answered = recs[-4], recs[-3]
    assert (full["error_code"], full["open_requests"]) == ("ENOSPC", 2)
    assert answered["status"] == 200 and answered["content_dropped"] is True and "prompt" not in answered
    report = verify(path)
    assert report.ok and report.unfinished == 0 and [m["seq"] for m in report.disk_full] == [full["seq"]], report
    out = CliRunner().invoke(cli, ["audit", "verify", str(path)]).output
    assert "the log's disk was full" in out and "2 generation(s) it was answering" in out, out


def test_an_end_record_the_reserve_could_not_hold_is_named_as_lost_to_the_full_disk(tmp_path, monkeypatch):
    """The reserve gone too (a record larger than it): `verify` says the disk filled, not "a crash or a kill"."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, reserve_bytes=600)
    disk = FullDisk(monkeypatch, log)
    log.append("accepted", request_id="lost", seed=1)
    disk.fill()
    with pytest.raises(OSError):
        log.append("request", request_id="lost", status=200, error_code="x" * 1000)
    log.close()
    report = verify(path)
    assert report.ok and report.unfinished == 1 and report.disk_full, report
    out = CliRunner().invoke(cli, ["audit", "verify", str(path)]).output
    assert "the log's disk filled while they ran" in out and "crash" not in out, out


def test_only_the_writers_own_reserve_is_removed(tmp_path, monkeypatch):
    """A file put at the reserve's name is not the writer's: it stays; the writer frees its own file, which it holds
    open, and the end record goes in."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    [reserve] = _reserves(tmp_path)
    os.unlink(reserve)
    reserve.write_bytes(b"someone else's")
    disk = FullDisk(monkeypatch, log)
    log.append("accepted", request_id="r", seed=1)
    disk.fill()
    log.append("request", request_id="r", status=200)
    assert reserve.read_bytes() == b"someone else's" and log.failed
    log.close()
    assert reserve.read_bytes() == b"someone else's" and verify(path).unfinished == 0


def test_a_disk_without_room_for_the_reserve_refuses_the_start(tmp_path, monkeypatch):
    real_write = os.write

    def write(fd, data):
        if ".reserve." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(InputError, match="no room") as e:
        AuditLog(tmp_path / "audit.jsonl")
    assert "free disk space" in e.value.fix
    assert not _reserves(tmp_path) and not (tmp_path / "audit.jsonl").read_bytes()  # nothing written, nothing left


def test_a_closed_log_leaves_no_reserve_and_a_killed_servers_is_swept(tmp_path):
    import subprocess
    import sys

    AuditLog(tmp_path / "a.jsonl").close()
    assert not _reserves(tmp_path) and [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]
    killed = "import os, sys; from edgemed.serve.audit import AuditLog; AuditLog(sys.argv[1]); os._exit(9)"
    subprocess.run([sys.executable, "-c", killed, str(tmp_path / "b.jsonl")], check=False)
    assert len(_reserves(tmp_path)) == 1
    AuditLog(tmp_path / "b.jsonl").close()
    assert not _reserves(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl"]


# -- the server ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(smollm2_gguf):
    from edgemed.runtime.batch.batcher import Batcher
    from edgemed.runtime.engine import LoadSettings

    pytest.importorskip("fastapi")
    batcher = Batcher(smollm2_gguf, LoadSettings(n_ctx=1024, n_threads=1), slots=1, queue_size=2)
    batcher.start()
    yield batcher
    batcher.close()


def _serve_until_full(model, tmp_path, monkeypatch, **kw):
    """Serve one chat request with the disk filling just after its ``accepted`` record, then one more; return
    (the first's request id, its status, the second's status, the log's records)."""
    from serve_kit import ServerThread, wait_until

    from edgemed.serve.app import create_app
    from edgemed.serve.config import ServeConfig

    httpx = pytest.importorskip("httpx2")
    log = AuditLog(tmp_path / "audit.jsonl", **kw)
    disk = FullDisk(monkeypatch, log)
    append = log.append

    def append_then_fill(kind, **fields):
        head = append(kind, **fields)
        if kind == "accepted":
            disk.fill()
        return head

    monkeypatch.setattr(log, "append", append_then_fill)
    app = create_app(model, ServeConfig(model_id="m", bundle_digest="d", audit=log))
    body = {"model": "m", "messages": [{"role": "user", "content": "Fever since"}], "max_tokens": 2}
    with ServerThread(app) as srv:
        first = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
        assert wait_until(lambda: log.failed is not None)
        time.sleep(0.2)  # its end record is written once the answer has gone out
        second = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
    log.close()
    recs = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    return first.headers["x-request-id"], first.status_code, second.status_code, recs


def test_an_answer_sent_as_the_disk_fills_keeps_its_end_record(model, tmp_path, monkeypatch):
    rid, answered, refused, recs = _serve_until_full(model, tmp_path, monkeypatch)
    assert (answered, refused) == (200, 503)
    end = [r for r in recs if r["kind"] == "request" and r.get("request_id") == rid]
    assert len(end) == 1 and end[0]["status"] == 200 and end[0]["completion_tokens"] >= 1, recs
    assert [r["kind"] for r in recs][-3:] == ["disk_full", "request", "stop"], recs
    report = verify(tmp_path / "audit.jsonl")
    assert report.ok and report.unfinished == 0 and report.disk_full, report


def test_an_end_record_that_could_not_be_written_is_logged_with_its_request_id(model, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.ERROR, logger="edgemed.serve.middleware")
    rid, answered, refused, _ = _serve_until_full(model, tmp_path, monkeypatch, reserve_bytes=0)
    assert (answered, refused) == (200, 503)
    assert f"audit record of request {rid} (status 200) not written" in caplog.text, caplog.text


# -- clocks set back or ahead ---------------------------------------------------------------------------------
def test_record_times_that_jump_are_reported_and_the_chain_still_verifies(tmp_path, monkeypatch):
    path = tmp_path / "clock.jsonl"
    now = time.time()
    day = 86400
    log = AuditLog(path, rotate_bytes=600)
    for shift in (0, -400 * day, -400 * day, 0, 3650 * day, 3650 * day + 5):
        monkeypatch.setattr(time, "time", lambda shift=shift: now + shift)
        for i in range(2):
            log.append("request", request_id=f"r{i}", status=200)
    log.close()
    monkeypatch.undo()
    report = verify(path)
    assert report.ok and report.files, report
    steps = [round(j["seconds"] / day) for j in report.time_jumps]
    assert steps == [-400, 400, 3650], report.time_jumps
    assert all(j["time"] > j["previous_time"] or j["seconds"] < 0 for j in report.time_jumps)
    r = CliRunner().invoke(cli, ["audit", "verify", str(path)])
    assert r.exit_code == 0 and "chain intact" in r.output, r.output
    assert "400 days before" in r.output and "10.0 years after" in r.output, r.output
    as_json = json.loads(CliRunner().invoke(cli, ["audit", "verify", "--json", str(path)]).output)
    assert [j["seq"] for j in as_json["time_jumps"]] == [j["seq"] for j in report.time_jumps]
    AuditLog(tmp_path / "steady.jsonl").close()
    assert verify(tmp_path / "steady.jsonl").time_jumps is None
