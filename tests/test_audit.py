"""The hash-chained audit log: every way of tampering with one record is reported by `edgemed audit verify`."""

from __future__ import annotations

import contextlib
import json
import os
import threading

import pytest
from click.testing import CliRunner

from edgemed.cli import cli
from edgemed.errors import InputError, IntegrityError
from edgemed.serve.audit import AuditLog, canonical, record_hash, verify


def _log(path, n: int = 6, **kw) -> AuditLog:
    log = AuditLog(path, **kw)
    for i in range(n):
        log.append("request", request_id=f"r{i}", status=200, outcome="ok", prompt_tokens=10 + i, completion_tokens=i)
    return log


@pytest.fixture
def logfile(tmp_path):
    path = tmp_path / "audit.jsonl"
    _log(path).close()
    return path


def lines(path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def rewrite(path, new_lines) -> None:
    path.write_bytes(b"".join(new_lines))


def edit(line: bytes, rehash: bool = False, **changes) -> bytes:
    rec = {**json.loads(line), **changes}
    if rehash:
        rec["hash"] = record_hash(rec)
    return canonical(rec) + b"\n"


def test_intact_log_verifies_and_names_its_head(logfile):
    report = verify(logfile)
    recs = [json.loads(x) for x in lines(logfile)]
    assert report.ok and report.records == 7 and report.head == recs[-1]["hash"]
    assert recs[0]["kind"] == "genesis" and recs[0]["prev"] == "0" * 64
    assert [r["seq"] for r in recs] == list(range(7))
    assert all(r["prev"] == p["hash"] for p, r in zip(recs, recs[1:]))
    assert oct(logfile.stat().st_mode & 0o777) == "0o600"


def test_edited_record_is_reported(logfile):
    ls = lines(logfile)
    ls[3] = edit(ls[3], completion_tokens=999)
    rewrite(logfile, ls)
    r = verify(logfile)
    assert not r.ok and (r.line, r.problem) == (4, "edited")


def test_edited_record_with_recomputed_hash_is_reported(logfile):
    ls = lines(logfile)
    ls[3] = edit(ls[3], rehash=True, outcome="unauthorized")
    rewrite(logfile, ls)
    r = verify(logfile)
    assert not r.ok and (r.line, r.problem) == (4, "edited")


def test_deleted_record_is_reported(logfile):
    ls = lines(logfile)
    del ls[3]
    rewrite(logfile, ls)
    r = verify(logfile)
    assert not r.ok and (r.line, r.problem) == (4, "deleted") and "seq 3" in r.detail


def test_deleted_first_records_are_reported(logfile):
    rewrite(logfile, lines(logfile)[2:])
    r = verify(logfile)
    assert not r.ok and (r.line, r.problem) == (1, "deleted")


def test_reordered_records_are_reported(logfile):
    ls = lines(logfile)
    ls[3], ls[4] = ls[4], ls[3]
    rewrite(logfile, ls)
    r = verify(logfile)
    assert not r.ok and (r.line, r.problem) == (4, "reordered")


def test_truncated_last_record_is_reported(logfile):
    logfile.write_bytes(logfile.read_bytes()[:-20])
    r = verify(logfile)
    assert not r.ok and (r.line, r.problem) == (7, "truncated")


def test_records_cut_from_the_end_need_the_anchor(logfile):
    head = verify(logfile).head
    rewrite(logfile, lines(logfile)[:-2])
    assert verify(logfile).ok  # the chain alone cannot see this ...
    r = verify(logfile, anchor=head)
    assert not r.ok and r.problem == "anchor-missing"  # ... the anchored head can
    assert verify(logfile, anchor=json.loads(lines(logfile)[2])["hash"]).ok


def test_reopening_continues_the_chain_and_refuses_a_broken_one(logfile):
    log = AuditLog(logfile)
    log.append("request", request_id="again", status=200)
    log.close()
    assert verify(logfile).ok and verify(logfile).records == 8
    ls = lines(logfile)
    del ls[5]
    rewrite(logfile, ls)
    with pytest.raises(IntegrityError, match="line 6 .deleted"):
        AuditLog(logfile)


def test_one_writer_per_file(logfile):
    log = AuditLog(logfile)
    try:
        with pytest.raises(InputError, match="in use"):
            AuditLog(logfile)
    finally:
        log.close()


def test_text_only_when_turned_on(tmp_path):
    off = AuditLog(tmp_path / "off.jsonl")
    off.append("request", request_id="a", prompt="chest pain since 2 h", output="call 911")
    off.close()
    assert "chest pain" not in (tmp_path / "off.jsonl").read_text()
    on = AuditLog(tmp_path / "on.jsonl", content=True)
    on.append("request", request_id="a", prompt="chest pain since 2 h", output="call 911")
    on.close()
    assert json.loads(lines(tmp_path / "on.jsonl")[-1])["prompt"] == "chest pain since 2 h"
    with pytest.raises(ValueError, match="not in the schema"):
        AuditLog(tmp_path / "x.jsonl").append("request", patient_name="x")


def _break_writes(log: AuditLog) -> None:
    """Make the writer's descriptor refuse writes (as a full or failed disk would)."""
    ro = os.open(log.path, os.O_RDONLY)
    os.dup2(ro, log._fd)
    os.close(ro)


def test_failed_write_stops_the_writer(logfile):
    log = AuditLog(logfile)
    _break_writes(log)
    with pytest.raises(OSError):
        log.append("request", request_id="lost")
    assert log.failed and "failed" in log.failed
    with pytest.raises(OSError, match="failed"):
        log.append("request", request_id="later")
    log.close()
    assert verify(logfile).ok


def test_concurrent_appends_keep_one_chain(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl")

    def worker(k):
        for i in range(40):
            log.append("request", request_id=f"{k}-{i}", status=200)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    r = verify(tmp_path / "a.jsonl")
    assert r.ok and r.records == 1 + 6 * 40


def test_cli_verify(logfile):
    runner = CliRunner()
    ok = runner.invoke(cli, ["audit", "verify", str(logfile)])
    assert ok.exit_code == 0 and "7 records" in ok.output and verify(logfile).head in ok.output
    ls = lines(logfile)
    ls[2] = edit(ls[2], status=500)
    rewrite(logfile, ls)
    bad = runner.invoke(cli, ["audit", "verify", str(logfile)])
    assert bad.exit_code == 1 and "line 3" in bad.output and "edited" in bad.output
    as_json = runner.invoke(cli, ["audit", "verify", str(logfile), "--json"])
    assert as_json.exit_code == 1
    report = json.loads(as_json.output)
    assert report["ok"] is False and report["line"] == 3 and report["problem"] == "edited"
    missing = runner.invoke(cli, ["audit", "verify", str(logfile.parent / "nope.jsonl")])
    assert missing.exit_code == 2 and "Cannot read" in missing.output and "Traceback" not in missing.output


def test_cli_verify_tells_a_log_it_could_not_read_from_a_broken_one(tmp_path):
    """Exit code 2 (nothing checked: a wrong path, not a file, a bad anchor) is not 1 (the log is broken), and --json
    prints one document for each."""
    runner = CliRunner()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder.jsonl").mkdir()
    _log(tmp_path / "good.jsonl").close()
    for args in ([str(tmp_path / "nope.jsonl")], [str(tmp_path / "fifo")], [str(tmp_path / "folder.jsonl")],
                 [str(tmp_path / "good.jsonl"), "--anchor", "abc"]):
        for as_json in (False, True):
            r = runner.invoke(cli, ["audit", "verify", *args, *(["--json"] if as_json else [])])
            assert r.exit_code == 2 and "Traceback" not in r.output, (args, r.output)
            if as_json:
                doc = json.loads(r.stdout)  # one document, and nothing else on stdout
                assert doc["ok"] is False and doc["error"] in ("InputError", "BadParameter") and doc["fix"], doc
    assert "Exit codes" in runner.invoke(cli, ["audit", "verify", "--help"]).output


def test_a_record_being_written_when_verify_reads_is_not_called_truncated(logfile):
    """A running server's record that crosses a page shows its first part first: verify reads again before it
    calls the log cut."""
    whole, expected = logfile.read_bytes(), verify(logfile)
    logfile.write_bytes(whole[:-20])  # the last record half written

    def rest() -> None:  # the write's second part, appended as the server's O_APPEND write lands it
        with open(logfile, "ab") as fh:
            fh.write(whole[-20:])

    finish = threading.Timer(0.3, rest)
    finish.start()
    try:
        r = verify(logfile)
    finally:
        finish.join()
    assert r == expected and r.ok, r


def test_a_log_other_users_can_read_is_named_and_refused_for_content(tmp_path, caplog):
    """A new log is 0600; one made before with wider rights kept them without a word, prompts and answers included."""
    path = tmp_path / "audit.jsonl"
    AuditLog(path).close()
    assert os.stat(path).st_mode & 0o777 == 0o600
    os.chmod(path, 0o644)
    with pytest.raises(InputError, match="other users") as e:
        AuditLog(path, content=True)
    assert e.value.fix == f"run: chmod 600 {path}"
    with caplog.at_level("WARNING"):
        AuditLog(path).close()  # without text: it opens, and says so
    assert any("chmod 600" in r.getMessage() for r in caplog.records)
    os.chmod(path, 0o600)
    AuditLog(path, content=True).close()
    assert verify(path).ok


# -- rotation ---------------------------------------------------------------------------------------
def _rotating(tmp_path, n: int, rotate_bytes: int = 1500):
    path = tmp_path / "audit.jsonl"
    log = _log(path, n, rotate_bytes=rotate_bytes)
    return path, log


def test_rotation_keeps_one_chain_across_files_that_verify_follows(tmp_path):
    """A long-running server's log grew for ever, and rotating it with an outside tool (copytruncate) broke the chain.
    With rotate_bytes each full file ends in a `rotated` record, is kept as STEM.SEQ.jsonl, and the live file's genesis
    continues it; verify follows the files back to seq 0, and an anchor from any file is found."""
    mine = tmp_path / ".audit.jsonl.next"  # a user's file under a name a first version used and removed
    mine.write_text("not edgemed's")
    path, log = _rotating(tmp_path, 20)
    first_head = None
    log.close()
    assert mine.read_text() == "not edgemed's" and not list(tmp_path.glob(".audit-*"))
    kept = sorted(tmp_path.glob("audit.*.jsonl"))
    assert len(kept) >= 3 and all(len(p.name) == len("audit.0000000000.jsonl") for p in kept)
    for p in kept:  # each kept file ends with `rotated`, which names where the chain goes on
        last = json.loads(lines(p)[-1])
        assert last["kind"] == "rotated" and last["continued_in"] == "audit.jsonl" and p.name == f"audit.{last['seq']:010d}.jsonl"
        first_head = first_head or json.loads(lines(p)[1])["hash"]
    first = json.loads(lines(path)[0])
    assert first["kind"] == "genesis" and first["continues"] == kept[-1].name and first["seq"] > 0
    report = verify(path)
    total = sum(len(lines(p)) for p in [*kept, path])
    assert report.ok and report.records == total and report.files == [str(p) for p in [*kept, path]]
    assert verify(path, anchor=first_head).ok  # an anchor written down before the first rotation
    assert not verify(path, anchor="ab" * 32).ok
    alone = verify(path, follow=False)
    assert alone.ok and alone.records == len(lines(path)) and alone.files is None
    r = CliRunner().invoke(cli, ["audit", "verify", str(path)])
    assert r.exit_code == 0 and f"OK: {total} records in {len(kept) + 1} files" in r.output, r.output
    # reopening goes on in the live file, and rotates again when it is full
    log = _log(path, 20, rotate_bytes=1500)
    log.close()
    assert len(sorted(tmp_path.glob("audit.*.jsonl"))) > len(kept) and verify(path).ok


def test_a_broken_or_missing_kept_file_breaks_the_rotated_chain(tmp_path):
    path, log = _rotating(tmp_path, 20)
    log.close()
    kept = sorted(tmp_path.glob("audit.*.jsonl"))
    middle = kept[1]
    saved = middle.read_bytes()
    rewrite(middle, [lines(middle)[0]] + [edit(lines(middle)[1], status=500)] + lines(middle)[2:])
    report = verify(path)
    assert not report.ok and report.problem == "edited" and report.path == str(middle)
    middle.write_bytes(saved)
    middle.rename(tmp_path / "elsewhere.jsonl")
    report = verify(path)
    assert not report.ok and report.problem == "deleted" and f"continues '{middle.name}'" in report.detail, report
    assert not verify(kept[2]).ok if kept[2:] else True
    (tmp_path / "elsewhere.jsonl").rename(middle)
    rewrite(middle, lines(middle)[:-2] + [lines(middle)[-1]])  # a record cut just before `rotated`
    assert not verify(path).ok
    middle.write_bytes(saved)
    rewrite(middle, lines(middle)[:-1])  # the `rotated` record cut: the next file no longer follows on
    report = verify(path)
    assert not report.ok and report.problem == "deleted" and "does not follow on" in report.detail, report


@pytest.mark.parametrize("step", ["after-rotated", "after-link", "after-next"])
def test_a_rotation_cut_short_is_finished_at_the_next_start(tmp_path, monkeypatch, step):
    """A kill inside a rotation leaves the live file ending in `rotated` (maybe already linked, maybe with a half-made
    next file): the chain still verifies, and the next start finishes the rotation."""
    path = tmp_path / "audit.jsonl"
    log = _log(path, 3, rotate_bytes=10**9, reserve_bytes=0)  # no reserve: its descriptors are closed under it below
    real_link, real_rename = os.link, os.rename

    class Killed(BaseException):
        pass

    def link(*a, **k):
        if step == "after-rotated":
            raise Killed
        real_link(*a, **k)
        if step == "after-link":
            raise Killed

    def rename(src, dst, *a, **k):
        if step == "after-next" and ".audit-next." in str(src):
            raise Killed
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Killed):
        log._rotate()
    monkeypatch.undo()
    for fd in os.listdir("/proc/self/fd"):  # the process is gone: its descriptors (and locks) on the log with it
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
                os.close(int(fd))
    assert json.loads(lines(path)[-1])["kind"] == "rotated" and verify(path).ok
    log = _log(path, 2)
    log.close()
    kept = list(tmp_path.glob("audit.*.jsonl"))
    assert len(kept) == 1 and not list(tmp_path.glob(".audit-*"))  # no new file or probe left behind
    report = verify(path)
    assert report.ok and report.files == [str(kept[0]), str(path)], report


def test_a_folder_that_cannot_rotate_is_named_at_start_and_a_failed_rotation_keeps_serving(tmp_path, monkeypatch, caplog):
    """Rotation needs a writable folder with hard links: a log on FAT, or in a folder the service cannot write, started
    fine, then at the first rotation every request got a 503, and the next start refused even without rotation."""
    import errno

    path = tmp_path / "audit.jsonl"
    real_link = os.link

    def no_link(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    with pytest.raises(InputError, match="cannot take a rotation: Operation not permitted"):
        AuditLog(path, rotate_bytes=1500)
    assert not list(tmp_path.glob(".audit-*")) and not list(tmp_path.glob(".edgemed-*"))
    monkeypatch.setattr(os, "link", real_link)
    log = AuditLog(path, rotate_bytes=1500)  # the folder could rotate at start; later it cannot
    monkeypatch.setattr(os, "link", no_link)
    with caplog.at_level("WARNING"):
        for i in range(20):
            log.append("request", request_id=f"r{i}", status=200)
    assert log.failed is None and log.rotate_bytes is None and "could not rotate" in caplog.text
    log.close()
    monkeypatch.setattr(os, "link", real_link)
    assert not list(tmp_path.glob("audit.*.jsonl")) and not list(tmp_path.glob(".audit-*"))
    assert verify(path).ok and verify(path).records == len(lines(path))
    _log(path, 20, rotate_bytes=1500).close()  # restarted where it can rotate: it does, and the chain holds
    assert list(tmp_path.glob("audit.*.jsonl")) and verify(path).ok


def test_a_linked_log_path_rotates_beside_the_real_file_and_keeps_the_link(tmp_path):
    real = tmp_path / "volume" / "audit.jsonl"
    real.parent.mkdir()
    link = tmp_path / "audit.jsonl"
    link.symlink_to(real)
    _log(link, 20, rotate_bytes=1500).close()
    assert link.is_symlink() and os.path.samefile(link, real) and list(real.parent.glob("audit.*.jsonl"))
    assert verify(link).ok


def test_a_missing_kept_file_is_reported_with_the_live_files_own_counts(tmp_path):
    path, log = _rotating(tmp_path, 20)
    log.close()
    for kept in tmp_path.glob("audit.*.jsonl"):
        kept.unlink()
    report = verify(path)
    assert not report.ok and report.problem == "deleted" and report.records == len(lines(path)) and report.head


# -- refusals no key identified: a budget per client, the rest counted ------------------------------------
class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_refusals_past_the_budget_are_counted_and_the_counts_written_once_the_window_is_over(tmp_path):
    from edgemed.serve.audit import RefusalBudget

    clock = _Clock()
    log = AuditLog(tmp_path / "audit.jsonl", refusals=RefusalBudget(per_client=3, total=5, window_s=60, clock=clock))
    written = [log.append_refused(request_id=f"a{i}", client="10.0.0.9", status=401, outcome="unauthorized")
               for i in range(10)]
    assert [w is not None for w in written] == [True] * 3 + [False] * 7
    written = [log.append_refused(request_id=f"b{i}", client="10.0.0.7", status=401) for i in range(4)]
    assert [w is not None for w in written] == [True, True, False, False]  # 5 in all: the total budget is spent
    log.append("request", request_id="keyed", key_id="dr-a", status=200)  # identified requests are always written
    clock.now += 60  # the window is over: its counts go out with the next record, each once
    assert log.append_refused(request_id="c0", client="10.0.0.9", status=401) is not None
    log.append("request", request_id="keyed2", key_id="dr-a", status=200)
    log.append("stop")
    log.close()
    recs = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    counted = {r["client"]: r["suppressed"] for r in recs if r["kind"] == "refusals"}
    assert counted == {"10.0.0.9": 7, "10.0.0.7": 2}
    assert [r["request_id"] for r in recs if r["kind"] == "request"] == \
        ["a0", "a1", "a2", "b0", "b1", "keyed", "c0", "keyed2"]
    assert all(r["window_s"] == 60 and r["window_start"] for r in recs if r["kind"] == "refusals")
    assert verify(tmp_path / "audit.jsonl").ok


def test_the_stop_record_writes_the_counts_of_the_window_still_open(tmp_path):
    from edgemed.serve.audit import MAX_COUNTED_CLIENTS, RefusalBudget

    budget = RefusalBudget(per_client=1, total=1, window_s=60, clock=_Clock())
    log = AuditLog(tmp_path / "audit.jsonl", refusals=budget)
    clients = [f"10.1.{i // 256}.{i % 256}" for i in range(MAX_COUNTED_CLIENTS + 50)]
    assert [log.append_refused(request_id=c, client=c, status=403) is not None for c in clients].count(True) == 1
    assert len(budget._counted) == MAX_COUNTED_CLIENTS + 1  # the memory is bounded: past the limit, "other"
    log.append("stop")
    log.close()
    recs = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    counted = [r for r in recs if r["kind"] == "refusals"]
    assert recs[-1]["kind"] == "stop" and sum(r["suppressed"] for r in counted) == len(clients) - 1
    assert {"client": "other", "suppressed": len(clients) - 1 - MAX_COUNTED_CLIENTS} == {k: counted[-1][k] for k in ("client", "suppressed")}
    assert verify(tmp_path / "audit.jsonl").ok


def test_a_refusal_budget_that_cannot_hold_is_refused():
    from edgemed.serve.audit import RefusalBudget

    for bad in [dict(per_client=0), dict(per_client=5, total=4), dict(window_s=0)]:
        with pytest.raises(ValueError):
            RefusalBudget(**bad)


# -- generations accepted and never recorded as over ----------------------------------------------------
def test_verify_counts_generations_accepted_with_no_record_of_their_end(tmp_path):
    """The server writes ``accepted`` before a generation is queued and ``request`` once it is over: a kill in
    between leaves the first alone, which verify names; one finished in the next file of a rotation is not."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, rotate_bytes=1500)
    log.append("accepted", request_id="done", key_id="dr-a", seed=1)
    log.append("request", request_id="done", key_id="dr-a", status=200)
    log.append("accepted", request_id="across", key_id="dr-a", seed=2)
    while len(list(tmp_path.glob("audit.*.jsonl"))) == 0:  # rotate: "across" ends in the next file
        log.append("request", request_id="other", status=404)
    log.append("request", request_id="across", key_id="dr-a", status=200)
    log.append("accepted", request_id="killed", key_id="dr-b", seed=3)  # the server dies while it runs
    log.close()
    report = verify(path)
    assert report.ok and report.files and (report.unfinished, report.unfinished_ids) == (1, ["killed"]), report
    r = CliRunner().invoke(cli, ["audit", "verify", str(path)])
    assert r.exit_code == 0 and "1 generation(s) accepted with no record of their end" in r.output
    assert "killed" in r.output, r.output
    _log(tmp_path / "clean.jsonl").close()
    assert verify(tmp_path / "clean.jsonl").unfinished == 0


def test_generations_a_running_server_may_still_be_answering_are_not_called_crashed(tmp_path):
    """`audit verify` beside a running server: what it accepted since its start is in flight, not a crash; what an
    earlier server accepted before this one started is."""
    path = tmp_path / "audit.jsonl"
    first = AuditLog(path)
    first.append("start", model="m")
    first.append("accepted", request_id="old", seed=1)
    first.close()  # killed: no request record, no stop
    second = AuditLog(path)
    try:
        second.append("start", model="m")
        second.append("accepted", request_id="now", seed=2)
        report = verify(path)
        assert report.ok and (report.unfinished, report.unfinished_ids, report.in_flight) == (1, ["old"], 1), report
        r = CliRunner().invoke(cli, ["audit", "verify", str(path)])
        assert "1 generation(s) accepted with no record of their end (the server stopped" in r.output, r.output
        assert "may still be answering them" in r.output, r.output
    finally:
        second.close()
    assert (verify(path).unfinished, verify(path).in_flight) == (2, 0)  # nobody holds the log now
