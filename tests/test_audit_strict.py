"""What the audit log does not take for something it is not: a kept file started on as if it were the live one, a line
re-encoded to the same record, an anchor that is not a hash, a file with no whole record."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgemed.cli import cli
from edgemed.errors import InputError, IntegrityError
from edgemed.serve.audit import AuditLog, verify


def _log(path, n: int, **kw) -> AuditLog:
    log = AuditLog(path, **kw)
    for i in range(n):
        log.append("request", request_id=f"r{i}", client="127.0.0.1", status=200, outcome="ok", prompt_tokens=10 + i,
                   completion_tokens=i)
    return log


def _snapshot(folder) -> dict:
    return {p.name: (p.is_symlink(), p.read_bytes()) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("rotate", [None, 1500])
def test_a_start_on_a_kept_file_is_refused_and_changes_nothing(tmp_path, rotate):
    """Every kept file ends in `rotated`, as a live file does when a kill cut its rotation short: a start on a kept
    file "finished" that rotation, renamed a new file over it, and the real log's chain broke."""
    path = tmp_path / "audit.jsonl"
    _log(path, 8, rotate_bytes=1500).close()
    kept = sorted(tmp_path.glob("audit.*.jsonl"))
    assert kept and verify(path).ok
    before = _snapshot(tmp_path)
    live = AuditLog(path)  # the real server is running: kept files hold no lock of theirs
    try:
        for p in kept:
            with pytest.raises(InputError, match="is a kept file of a rotated log: its chain goes on in 'audit.jsonl'") \
                    as err:
                AuditLog(p, rotate_bytes=rotate)
            assert err.value.fix == f"start the server with --audit-log {path} (the live file)"
    finally:
        live.close()
    assert _snapshot(tmp_path) == before  # nothing written, linked or renamed
    report = verify(path)
    assert report.ok and report.files == [str(p) for p in [*kept, path]], report


def test_a_rotation_cut_short_is_finished_through_a_link_beside_the_real_file(tmp_path):
    """The `rotated` record names the real file; a start through a link of another name is the live file all the
    same, and the rotation is finished beside the real file, the link left a link."""
    real = tmp_path / "volume" / "audit.jsonl"
    real.parent.mkdir()
    log = _log(real, 3, rotate_bytes=10**9)
    log._write({"kind": "rotated", "continued_in": real.name})  # a kill came right after: nothing linked or renamed
    log.close()
    link = tmp_path / "current.jsonl"
    link.symlink_to(real)
    _log(link, 2).close()
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["current.jsonl", "volume"]
    kept = real.parent / "audit.0000000004.jsonl"
    report = verify(link)
    assert report.ok and report.files == [str(kept), str(link)] and report.records == 1 + 3 + 1 + 1 + 2, report


def _reencode(line: bytes, how: str) -> bytes:
    text = line.decode().rstrip("\n")
    rec = json.loads(text)
    if how == "duplicate-key":  # a forged first copy: a reader, grep or a first-wins parser sees it; json keeps the last
        return text.replace('{"client":', '{"client":"10.9.9.9","client":', 1).encode() + b"\n"
    if how == "reordered":
        return json.dumps(dict(reversed(list(rec.items()))), separators=(",", ":")).encode() + b"\n"
    if how == "spaced":
        return json.dumps(rec, sort_keys=True).encode() + b"\n"
    if how == "crlf":
        return text.encode() + b"\r\n"
    return text.replace('"r2"', '"\\u0072\\u0032"', 1).encode() + b"\n"  # escaped: the same string


@pytest.mark.parametrize("how", ["duplicate-key", "reordered", "spaced", "crlf", "escaped"])
def test_a_line_re_encoded_to_the_same_record_is_edited(tmp_path, how):
    path = tmp_path / "audit.jsonl"
    _log(path, 6).close()
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = _reencode(lines[3], how)
    assert lines[3] != path.read_bytes().splitlines(keepends=True)[3]
    path.write_bytes(b"".join(lines))
    report = verify(path)
    assert not report.ok and (report.line, report.problem, report.records) == (4, "edited", 3), report
    assert "canonical encoding" in report.detail
    out = CliRunner().invoke(cli, ["audit", "verify", str(path)])
    assert out.exit_code == 1 and "BROKEN at line 4" in out.output and "chain intact" not in out.output, out.output
    with pytest.raises(IntegrityError, match=r"line 4 \(edited\)"):
        AuditLog(path)


def test_an_anchor_is_64_hex_digits_and_upper_case_is_folded(tmp_path):
    path = tmp_path / "audit.jsonl"
    _log(path, 3).close()
    head = verify(path).head
    assert verify(path, anchor=head.upper()).ok
    runner = CliRunner()
    ok = runner.invoke(cli, ["audit", "verify", str(path), "--anchor", head.upper()])
    assert ok.exit_code == 0 and "chain intact" in ok.output, ok.output
    for bad in ["ZZZ", f"head {head}", head[:-1], head + "0", "", "g" * 64]:
        with pytest.raises(InputError, match="is not a head hash: an anchor is 64 hex digits") as err:
            verify(path, anchor=bad)
        assert repr(bad) in err.value.problem
        out = runner.invoke(cli, ["audit", "verify", str(path), "--anchor", bad])
        assert out.exit_code == 2 and "64 hex digits" in out.output and "BROKEN" not in out.output, out.output
        assert "rewritten" not in out.output and "Traceback" not in out.output
    assert "'aaaaaaaa" in str(pytest.raises(InputError, verify, path, anchor="a" * 500).value)


def test_a_file_with_no_whole_record_is_named_for_what_it_is(tmp_path, monkeypatch):
    """`printf xx > g.jsonl`: the start refused it while saying the next start would go on in a new file."""
    from edgemed.serve import audit

    monkeypatch.setattr(audit, "TORN_TAIL_WAIT_S", 0.0)
    path = tmp_path / "g.jsonl"
    path.write_bytes(b"xx")
    report = verify(path)
    assert not report.ok and (report.line, report.problem, report.records) == (1, "truncated", 0)
    assert "not an edgemed audit log, or it was cut before its first record" in report.detail
    assert "next start" not in report.detail
    with pytest.raises(IntegrityError, match="not an edgemed audit log") as err:
        AuditLog(path)
    assert "next start" not in str(err.value) and "--audit-log" in err.value.fix
    assert [p.name for p in tmp_path.iterdir()] == ["g.jsonl"] and path.read_bytes() == b"xx"
    out = CliRunner().invoke(cli, ["audit", "verify", str(path)])
    assert out.exit_code == 1 and "not an edgemed audit log" in out.output and "next start" not in out.output
