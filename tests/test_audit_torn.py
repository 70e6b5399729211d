"""An audit log whose last record was cut short: by a full disk (the writer takes its own bytes back) or by a kill
(the next start keeps that file as it is and goes on in a new one that records the cut). Anything else still refuses.

A torn last record used to keep the server from starting again: a full disk made it answer 503 and /health say
``audit_failed`` so that a supervisor restarts it, and every restart then refused the log, "broken ... (truncated)".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

import pytest
from click.testing import CliRunner

from edgemed.cli import cli
from edgemed.errors import IntegrityError
from edgemed.serve.audit import AuditLog, canonical, verify


def _log(path, n: int, **kw) -> AuditLog:
    log = AuditLog(path, **kw)
    for i in range(n):
        log.append("request", request_id=f"r{i}", status=200, outcome="ok", prompt_tokens=10 + i, completion_tokens=i)
    return log


def _records(path) -> list[dict]:
    return [json.loads(x) for x in path.read_bytes().splitlines(keepends=True) if x.endswith(b"\n")]


def _tear(path, cut: int = 30) -> tuple[bytes, bytes]:
    """Cut the last ``cut`` bytes off ``path`` (its last record loses its end and its newline): (what is left, the
    torn line's bytes)."""
    whole = path.read_bytes()
    left = whole[:-cut]
    path.write_bytes(left)
    return left, left[left.rfind(b"\n") + 1:]


@contextlib.contextmanager
def _file_size_limit(limit: int):
    """Writes past ``limit`` bytes of any file fail for this process (EFBIG, SIGXFSZ ignored), as on a full disk: a
    write that crosses the limit writes its first part, and the next fails."""
    resource = pytest.importorskip("resource")
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def test_a_write_the_disk_cut_short_takes_its_bytes_back_and_the_log_opens_again(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = _log(path, 3)
    before = path.read_bytes()
    with _file_size_limit(len(before) + 40):  # room for 40 bytes of the next record, not all of it
        with pytest.raises(OSError):
            log.append("request", request_id="lost", status=200, outcome="ok")
    assert log.failed and str(path) in log.failed  # the server answers 503 until it is restarted
    with pytest.raises(OSError, match="failed"):
        log.append("request", request_id="later")
    log.close()
    assert path.read_bytes() == before  # the 40 bytes of the record cut short are gone, and nothing else
    log = AuditLog(path)  # the supervisor's restart: the log opens and the chain goes on in the same file
    log.append("request", request_id="after", status=200)
    log.close()
    report = verify(path)
    assert report.ok and report.records == 1 + 3 + 1 and report.files is None and report.torn is None, report
    assert path.read_bytes().startswith(before) and not list(tmp_path.glob("audit.*.jsonl"))
    assert [r.get("request_id") for r in _records(path)][-2:] == ["r2", "after"]


def test_a_record_a_kill_cut_short_is_kept_as_it_is_and_the_chain_goes_on_in_a_new_file(tmp_path, caplog):
    path = tmp_path / "audit.jsonl"
    _log(path, 4).close()
    left, torn = _tear(path)
    good = _records(path)
    assert good[-1]["seq"] == 3 and torn.startswith(b'{"')  # seq 4 (the last request) is the one cut
    with caplog.at_level("WARNING"):
        log = AuditLog(path)
    log.append("request", request_id="after", status=200)
    log.close()
    assert "cut short" in caplog.text
    kept = tmp_path / "audit.0000000003.jsonl"  # named as rotation names a kept file: by its last record's seq
    assert kept.read_bytes() == left  # never deleted or rewritten: the torn bytes are still there, as they were
    genesis = _records(path)[0]
    assert (genesis["kind"], genesis["continues"], genesis["seq"], genesis["prev"]) == \
        ("genesis", kept.name, 4, good[-1]["hash"])
    assert (genesis["torn_bytes"], genesis["torn_sha256"]) == (len(torn), hashlib.sha256(torn).hexdigest())
    report = verify(path)
    assert report.ok and report.records == len(good) + 2 and report.files == [str(kept), str(path)], report
    assert report.torn == [{"path": str(kept), "line": len(good) + 1, "bytes": len(torn),
                            "sha256": hashlib.sha256(torn).hexdigest()}], report
    out = CliRunner().invoke(cli, ["audit", "verify", str(path)])
    assert out.exit_code == 0 and "chain intact" in out.output, out.output
    assert f"line {len(good) + 1} of {kept}" in out.output and f"{len(torn)} bytes" in out.output, out.output
    as_json = json.loads(CliRunner().invoke(cli, ["audit", "verify", str(path), "--json"]).output)
    assert as_json["ok"] is True and as_json["torn"] == report.torn
    AuditLog(path).close()  # a later start has nothing to keep aside
    assert len(list(tmp_path.glob("audit.*.jsonl"))) == 1 and verify(path).ok


def test_a_torn_last_line_is_reported_until_the_next_start_keeps_it(tmp_path, monkeypatch):
    from edgemed.serve import audit

    path = tmp_path / "audit.jsonl"
    _log(path, 4).close()
    _tear(path)
    monkeypatch.setattr(audit, "TORN_TAIL_WAIT_S", 0.0)  # no writer to wait for: what a stopped server left
    report = verify(path)
    assert not report.ok and (report.line, report.problem) == (5, "truncated") and "next start" in report.detail


def test_a_rotated_log_cut_short_goes_on_through_all_its_files(tmp_path):
    path = tmp_path / "audit.jsonl"
    _log(path, 20, rotate_bytes=1500).close()
    rotated = sorted(tmp_path.glob("audit.*.jsonl"))
    assert rotated and _records(path)[0]["continues"] == rotated[-1].name
    _tear(path)
    last = _records(path)[-1]["seq"]
    _log(path, 20, rotate_bytes=1500).close()
    kept = tmp_path / f"audit.{last:010d}.jsonl"
    files = sorted(tmp_path.glob("audit.*.jsonl"))
    assert kept in files and set(rotated) < set(files)
    report = verify(path)
    assert report.ok and report.files == [str(p) for p in [*files, path]] and [t["path"] for t in report.torn] == [str(kept)]


@pytest.mark.parametrize("damage", ["edited", "torn-in-the-middle", "nothing-whole"])
def test_a_torn_log_with_any_other_fault_is_still_refused(tmp_path, damage):
    path = tmp_path / "audit.jsonl"
    _log(path, 4).close()
    lines = path.read_bytes().splitlines(keepends=True)
    if damage == "edited":  # a changed record, and a torn last line
        lines[2] = canonical({**json.loads(lines[2]), "status": 500}) + b"\n"
        lines[-1] = lines[-1][:-30]
    elif damage == "torn-in-the-middle":  # a record without its end, and more records after it
        lines[2] = lines[2][:-30]
    else:  # the genesis itself cut short: no chain to go on from
        lines = [lines[0][:-30]]
    path.write_bytes(b"".join(lines))
    saved = path.read_bytes()
    with pytest.raises(IntegrityError, match="start the server with a new --audit-log path"):
        AuditLog(path)
    assert path.read_bytes() == saved and not list(tmp_path.glob("audit.*.jsonl")) and not list(tmp_path.glob(".audit-*"))


@pytest.mark.parametrize("change", ["tail-changed", "tail-removed", "tail-undeclared", "middle-edited"])
def test_a_kept_file_whose_torn_tail_was_changed_breaks_the_chain(tmp_path, change):
    """The genesis that continues a torn file holds the torn bytes' length and sha256: they are what that file must
    end in, so cutting the tail off (to pass the file off as whole) or changing it is caught, as is any other fault."""
    path = tmp_path / "audit.jsonl"
    _log(path, 4).close()
    left, torn = _tear(path)
    AuditLog(path).close()
    kept = tmp_path / "audit.0000000003.jsonl"
    lines = left.splitlines(keepends=True)
    if change == "tail-changed":
        kept.write_bytes(left[:-1] + (b"X" if left[-1:] != b"X" else b"Y"))
    elif change == "tail-removed":
        kept.write_bytes(left[:-len(torn)])
    elif change == "tail-undeclared":  # a genesis that continues the torn file with no word of its tail
        from edgemed.serve.audit import record_hash

        genesis = {k: v for k, v in _records(path)[0].items() if k not in ("torn_bytes", "torn_sha256")}
        path.write_bytes(canonical({**genesis, "hash": record_hash(genesis)}) + b"\n")
    else:
        lines[2] = canonical({**json.loads(lines[2]), "status": 500}) + b"\n"
        kept.write_bytes(b"".join(lines))
    report = verify(path)
    expected = {"tail-changed": (5, "edited"), "tail-removed": (5, "deleted"), "tail-undeclared": (5, "truncated"),
                "middle-edited": (3, "edited")}[change]
    assert not report.ok and report.path == str(kept) and (report.line, report.problem) == expected, report


def test_a_kill_while_the_torn_file_is_kept_aside_is_finished_at_the_next_start(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    _log(path, 4).close()
    left, _ = _tear(path)
    real_link = os.link

    class Killed(BaseException):
        pass

    def link(*a, **k):  # killed right after the torn file got its kept name, before the new file replaced it
        real_link(*a, **k)
        raise Killed

    monkeypatch.setattr(os, "link", link)
    with pytest.raises(Killed):
        AuditLog(path)
    monkeypatch.undo()
    kept = tmp_path / "audit.0000000003.jsonl"
    assert os.path.samefile(kept, path) and path.read_bytes() == left  # linked, not yet replaced
    AuditLog(path).close()
    assert kept.read_bytes() == left and not os.path.samefile(kept, path) and not list(tmp_path.glob(".audit-*"))
    assert verify(path).ok and verify(path).torn
