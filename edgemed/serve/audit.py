"""The audit log: one JSON line per request, hash-chained, without PHI (HIPAA 164.312(b)).

Format ``edgemed.audit/1``. Every line is one record, encoded canonically (sorted keys,
no spaces, UTF-8). Each record carries

* ``seq`` — 0 for the genesis record, then 1, 2, ... with no gaps;
* ``prev`` — the ``hash`` of the record before it (64 zeros for the genesis record);
* ``hash`` — sha256 of the record's canonical encoding without the ``hash`` key.

So a record changed in place no longer matches its ``hash``; a record deleted, or moved,
breaks the next record's ``prev`` (and ``seq`` tells which of the two happened). What the
chain cannot show on its own: records cut from the *end*, or a whole file rewritten with
a freshly computed chain. Against both, write the head hash down somewhere else (the
server logs it at start and stop; ``edgemed audit verify`` prints it) and check later with
``--anchor HASH``: that record must still be in the chain.

Only the fields in ``FIELDS`` can be written; the request's text (``prompt``, ``output``)
is written only when the operator turned ``content`` on. Records are appended by one
writer under a lock, each with its own ``write`` + ``fsync`` (per record, not batched: at
clinic request rates the cost is a few milliseconds). A generation is recorded twice: an
``accepted`` record once it is queued and before any of its answer is sent (who asked, for
what; the request is refused if that record cannot be written) and its ``request`` record
once it is over (status, tokens, timings). A crash or a kill in between leaves the
``accepted`` record with no ``request`` record of its id; ``verify`` counts those
(``unfinished``), apart from the ones a running server may still be answering (``in_flight``:
accepted since its last ``start`` while a writer holds the file's lock). A failed write stops the writer for good and the
server then answers 503 instead of serving requests it cannot record (fail closed); the part of its record that did reach
the file is cut off again, so the restart that follows finds a whole chain.

A full disk must not lose the end of a generation already accepted (its answer may have gone out): the writer holds a
reserve (``RESERVE_BYTES``), a file of its own beside the log (an owner-tagged name, ``files.debris``, so only that file
is ever removed, and a killed server's is swept). When a write fails for space, the reserve is removed, a ``disk_full``
record marks the place (with how many generations were open), and from then on the writer takes only the ``request``
records of generations it had accepted (their text left out: ``content_dropped``) and the ``stop`` record; every new
request is refused (503) as after any failed write. ``verify`` reports those marks (``Report.disk_full``). The file
is opened ``O_APPEND`` with mode 0600 and held under an exclusive ``flock``, so a second server cannot interleave its own
chain into it.

Rotation (``rotate_bytes``; ``serve --audit-rotate-mib``) keeps one chain across files. Once the file reaches
the size, a ``rotated`` record ends it and it is kept as ``STEM.SEQ.SUFFIX`` (SEQ: that record's seq, 10 digits);
the live name starts again with a ``genesis`` record that ``continues`` the kept file, chained to its last hash,
with the next seq. ``verify`` follows ``continues`` back through the kept files to the first genesis (seq 0).
A tool that truncates or rewrites the live file (logrotate's ``copytruncate``) breaks the chain, and ``verify``
says so (``deleted``).

A record cut short by a kill (a write that crosses a page can land in part) leaves the file ending in half a line. The
next start never removes or rewrites those bytes: it keeps that file as rotation keeps one (``STEM.SEQ.SUFFIX``, SEQ: its
last whole record's seq) and starts the live name with a genesis that ``continues`` it and holds the torn line's length
and sha256 (``torn_bytes``, ``torn_sha256``). ``verify`` takes a kept file that ends in exactly those bytes, and reports
each such cut (``Report.torn``). Any other fault (a changed byte, a broken link, a torn line with records after it) is
refused as before.

Refused requests that no API key identifies (a wrong key, a foreign Host or Origin, a full queue on a server without
keys) are recorded one by one up to a budget (``RefusalBudget``: 30 per client address and 300 in all per minute); the
rest are counted, and each client's count is written as one ``refusals`` record once the minute is over (with the next
record, or the stop record). Otherwise a client sending wrong keys in a loop grows the log as fast as the server can
answer 401, until the disk is full and the server fails closed for every clinician.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgemed.formats.nesting import MAX_DEPTH, too_deep
from edgemed.errors import InputError, IntegrityError

log = logging.getLogger(__name__)

FORMAT = "edgemed.audit/1"
ZERO = "0" * 64
#: Longest line ``verify`` parses. Records are a few hundred bytes; with ``content`` on they hold a
#: prompt and an answer (``--max-body`` is 1 MiB by default), so the bound is generous.
MAX_LINE_BYTES = 64 << 20
#: How long ``verify`` reads again a log that ends in half a record before it reports it ``truncated``: a running
#: server's write of one record is done in microseconds, and a file really cut stays cut
TORN_TAIL_WAIT_S = 1.0

#: Bytes of the writer's reserve beside the log: freed when the disk fills, for the end records of the generations
#: accepted by then (a few hundred bytes each, text left out: at most slots + queue, 64 + 4,096) and the stop record
RESERVE_BYTES = 4 << 20
#: The errors of a write that found no room
NO_SPACE = {errno.ENOSPC, errno.EDQUOT}

#: What a record may hold (besides seq / prev / hash / time / kind). Anything else is a bug, refused.
FIELDS = {
    # request records
    "request_id", "endpoint", "client", "key_id", "model", "bundle_digest", "template", "status", "outcome",
    "finish_reason", "stream", "prompt_tokens", "completion_tokens", "latency_s", "ttft_s", "queue_s", "error_code",
    "adapter",  # the LoRA adapter a request used, or an admin call added or removed (a served name, never text)
    "adapter_sha256", "adapter_scale",  # ... the sha256 of that adapter's file and its scale: which weights it was
    "adapters",  # start: the adapters served from the start, a list sorted by name, each with ADAPTER_KEYS only
    "seed",  # the sampling seed a generation used (the client's, or the one drawn for it): with the prompt, it repeats the answer
    # genesis / start / stop records
    "format", "log_id", "edgemed_version", "host", "port", "slots", "queue_size", "content_logged",
    # rotation: a "rotated" record names the file the chain goes on in; a later file's genesis the one it continues
    "continued_in", "continues",
    # a kept file that ends in a record cut short (a kill while it was written): the torn line's length and sha256
    "torn_bytes", "torn_sha256",
    # refusals: how many refused requests of one client were counted in a window, not recorded one by one
    "suppressed", "window_start", "window_s",
    # disk_full: the generations accepted and not yet over when the disk filled; an end record written after it
    # without the text that --audit-content would have put in it
    "open_requests", "content_dropped",
}
#: What each entry of a start record's ``adapters`` holds, and nothing else.
ADAPTER_KEYS = {"name", "sha256", "scale"}
#: Request text: written only when the operator explicitly turns content logging on.
CONTENT_FIELDS = {"prompt", "output"}


def canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def record_hash(record: dict) -> str:
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


# -- verify -------------------------------------------------------------------------------------
@dataclass
class Report:
    """The outcome of ``verify``: ok, how many records, the head hash, and the first break."""

    path: str
    ok: bool
    records: int
    head: str | None
    line: int | None = None      # 1-based line of the first broken record
    problem: str | None = None   # edited | deleted | reordered | truncated | malformed | anchor-missing
    detail: str | None = None
    files: list[str] | None = None  # with rotation: every file of the chain verified, oldest first
    #: generations ``accepted`` with no ``request`` record of their id (the server died while they ran), and the
    #: first few of their request ids
    unfinished: int = 0
    unfinished_ids: list[str] | None = None
    #: generations accepted since the last start of a server that still holds the log (it may be answering them)
    in_flight: int = 0
    #: kept files of the chain that end in a record cut short (a kill while it was written), which the genesis after
    #: each accounts for: {"path", "line", "bytes", "sha256"} each, oldest first
    torn: list[dict] | None = None
    #: where the log's disk filled (``disk_full`` records): {"path", "seq", "time", "open_requests"} each, oldest first;
    #: the generations accepted before one and with no end record lost theirs to the full disk (or a kill after it)
    disk_full: list[dict] | None = None
    #: record times that step back (more than ``TIME_BACK_S``) or ahead (more than ``TIME_AHEAD_S``) from the record
    #: before (the server's clock was set): {"path", "seq", "time", "previous_time", "seconds"} each, the first
    #: ``MAX_TIME_JUMPS``. The chain is still whole; the times are what an auditor reads as "when", so each is reported.
    time_jumps: list[dict] | None = None
    #: request records written after the server's ``stop`` record (and before its next ``start``): a request the
    #: server went on with, or recorded, after it had logged that it stopped (``Report`` stays ok: the chain is whole):
    #: {"path", "seq", "kind", "request_id", "stop_seq"} each, the first ``MAX_AFTER_STOP``
    after_stop: list[dict] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _File:
    """What ``_verify`` learns of one file of a chain (rotation links them)."""

    report: Report
    first_seq: int = 0
    continues: str | None = None       # the kept file its genesis continues (None: the first genesis, seq 0)
    continues_hash: str | None = None  # the hash its genesis is chained to (that file's last record)
    continues_torn: tuple | None = None  # (torn_bytes, torn_sha256) its genesis holds: that file ends in a torn line
    torn: dict | None = None           # its last line cut short: {"line", "bytes", "sha256"}
    last_kind: str | None = None       # its last good record's kind ("rotated": the chain goes on elsewhere)
    continued_in: object = None        # when that is "rotated": the record's ``continued_in`` (the live file's name)
    anchor_seen: bool = False
    #: request ids of its ``accepted`` records with no ``request`` record after them in this file (at most
    #: MAX_TRACKED_OPEN; ``open_over``: how many more)
    opened: dict = field(default_factory=dict)
    open_over: int = 0
    #: request ids of ``request`` records among its first MAX_IN_FLIGHT records that no ``accepted`` record of this
    #: file opened: generations accepted in the file before it (rotation) and finished here
    closed_early: set = field(default_factory=set)
    last_start: int = -1  # seq of its last ``start`` record (-1: none)
    disk_full: list = field(default_factory=list)  # its ``disk_full`` records: {"seq", "time", "open_requests"}
    first_time: tuple | None = None  # (seq, time text, seconds) of its first record with a readable time
    last_time: tuple | None = None   # ... and of its last
    time_jumps: list = field(default_factory=list)  # jumps between its records (``Report.time_jumps``)
    stop_seq: int | None = None  # seq of a ``stop`` record with no ``start`` after it yet
    after_stop: list = field(default_factory=list)  # request records after it (``Report.after_stop``)


def _read_record(raw: bytes) -> dict:
    """One complete line as a record; ``ValueError`` (or ``KeyError``) when it is not one."""
    if len(raw) > MAX_LINE_BYTES:
        raise ValueError(f"longer than {MAX_LINE_BYTES} bytes")
    if too_deep(raw):
        raise ValueError(f"nests deeper than {MAX_DEPTH}")
    rec = json.loads(raw)
    if not isinstance(rec, dict):
        raise ValueError("not an object")
    return rec


def _lines(fh):
    """(complete, line) for each line of ``fh``, reading at most ``MAX_LINE_BYTES + 1`` bytes at a time.

    A line longer than that is yielded cut (its length shows it), and the rest of it is skipped.
    """
    while True:
        raw = fh.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if raw.endswith(b"\n"):
            yield True, raw[:-1]
        elif len(raw) > MAX_LINE_BYTES:
            while (more := fh.readline(MAX_LINE_BYTES)) and not more.endswith(b"\n"):
                pass
            yield True, raw
        else:
            yield False, raw


def _later_has_seq(lines, seq: int) -> bool:
    for complete, raw in lines:
        if not complete:
            return False
        try:
            if _read_record(raw).get("seq") == seq:
                return True
        except (ValueError, KeyError):
            continue
    return False


#: Most kept files ``verify`` follows back through (a chain longer than this is not one edgemed made)
MAX_CHAIN_FILES = 100_000


def verify(path: Path | str, anchor: str | None = None, follow: bool = True) -> Report:
    """Check the whole chain of ``path``; stop at the first broken record and say what is wrong.

    A file whose genesis ``continues`` a kept file (rotation) is checked with every file before it, back to the
    first genesis, unless ``follow`` is False: then that file alone, its link to the file before taken on trust.
    The file is read one line at a time: a line longer than ``MAX_LINE_BYTES`` or nested deeper
    than ``bounded.MAX_DEPTH`` is reported ``malformed`` without being parsed.
    """
    path = Path(path)
    anchor = None if anchor is None else _anchor(anchor)
    last = _verify_file(path, anchor)
    if not last.report.ok:
        return last.report
    chain = [last]
    while follow and chain[-1].continues is not None:
        later = chain[-1]
        earlier = Path(os.path.realpath(path)).parent / later.continues  # kept beside the real file, not a link
        if len(chain) > MAX_CHAIN_FILES or not os.path.lexists(earlier):
            return _broken_link(later, f"its genesis continues '{later.continues}', which is not beside it: the "
                                       "records before it cannot be checked (put the kept file back, or pass "
                                       "--no-follow to check this file alone)")
        before = _verify_file(earlier, anchor, wait=False)  # a kept file: nobody writes it any more
        cut = _torn_link(before, later)
        if cut is not None:
            return cut
        end = before.first_seq + before.report.records  # the seq after its last record
        ended = before.torn is not None or before.last_kind == "rotated"  # kept by a rotation, or as a kill left it
        if not ended or before.report.head != later.continues_hash or end != later.first_seq:
            return _broken_link(later, f"its genesis (seq {later.first_seq}) does not follow on from the end of "
                                       f"'{later.continues}' (seq {end - 1}): records between the two files are "
                                       "missing, or a file was replaced")
        chain.append(before)
    records = sum(f.report.records for f in chain)
    files = [str(f.report.path) for f in reversed(chain)] if len(chain) > 1 else None
    torn = [{"path": f.report.path, **f.torn} for f in reversed(chain) if f.torn is not None] or None
    if anchor and not any(f.anchor_seen for f in chain):
        unchecked = f" (the kept files before it, from '{chain[-1].continues}' back, were not checked)" \
            if chain[-1].continues is not None else ""
        return Report(str(path), False, records, last.report.head, last.report.records + 1, "anchor-missing",
                      f"no record has the anchored hash {anchor}: records were cut from the end, or the whole log "
                      f"was rewritten{unchecked}", files)
    unfinished, ids, in_flight = _unfinished(chain, path)
    full = [{"path": f.report.path, **mark} for f in reversed(chain) for mark in f.disk_full] or None
    late = [mark for f in reversed(chain) for mark in f.after_stop][:MAX_AFTER_STOP] or None
    return Report(str(path), True, records, last.report.head, files=files, unfinished=unfinished, unfinished_ids=ids,
                  in_flight=in_flight, torn=torn, disk_full=full, time_jumps=_time_jumps(chain), after_stop=late)


def _time_jumps(chain: list[_File]) -> list[dict] | None:
    """The time jumps of the chain's files and between them (a file's first record against the one before's last),
    oldest first."""
    jumps: list[dict] = []
    before = None
    for f in reversed(chain):  # the chain is newest first
        if f.first_time is not None:
            _time_jump(jumps, f.report.path, before, f.first_time)
            jumps.extend(f.time_jumps[:MAX_TIME_JUMPS - len(jumps)])
            before = f.last_time
    return jumps or None


def _anchor(value: str) -> str:
    """An anchor as the chain holds it: a sha256 in 64 hex digits, lower case (upper case is taken and folded)."""
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        shown = repr(value) if len(str(value)) <= 80 else repr(str(value)[:80]) + "..."
        raise InputError(f"The anchor {shown} is not a head hash: an anchor is 64 hex digits.",
                         "pass --anchor the hash printed after 'head' by `edgemed audit verify` (or logged by "
                         "`edgemed serve` at start and stop), all 64 digits and nothing else")
    return value.lower()


def _broken_link(f: _File, detail: str) -> Report:
    """The file ``f`` verified on its own; what is wrong is the link from its genesis to the file before it."""
    return Report(f.report.path, False, f.report.records, f.report.head, 1, "deleted", detail)


def _torn_link(before: _File, later: _File) -> Report | None:
    """What is wrong with ``before`` (the kept file ``later``'s genesis continues), None when nothing is: it verified
    whole, or its only fault is a last line cut short whose length and sha256 that genesis holds."""
    torn, declared = before.torn, later.continues_torn
    if torn is None and before.report.ok:
        if declared is None:
            return None
        return _broken_tail(before, before.report.records + 1, "deleted",
                            f"the genesis of '{Path(later.report.path).name}' records that this file ends in a record "
                            f"cut short ({declared[0]} bytes), and it ends after a whole record: its last bytes were "
                            "removed")
    if torn is None or before.report.problem != "truncated":
        return before.report
    if declared is None:
        return _broken_tail(before, torn["line"], "truncated",
                            f"its last line ({torn['bytes']} bytes) is a record cut short, and the genesis of "
                            f"'{Path(later.report.path).name}' that continues this file does not record it")
    if declared != (torn["bytes"], torn["sha256"]):
        return _broken_tail(before, torn["line"], "edited",
                            f"its last line, a record cut short, is {torn['bytes']} bytes with sha256 {torn['sha256']}; "
                            f"the genesis of '{Path(later.report.path).name}' records {declared[0]} bytes with sha256 "
                            f"{declared[1]}: the file was changed after it was kept")
    return None


def _broken_tail(f: _File, line: int, problem: str, detail: str) -> Report:
    """The kept file ``f`` verified up to its end; what is wrong is its end, against what the next file recorded."""
    return Report(f.report.path, False, f.report.records, f.report.head, line, problem, detail)


def _verify_file(path: Path, anchor: str | None, wait: bool = True) -> _File:
    """``wait``: a file a server may be writing (not a kept file, nor one whose lock the caller holds): one that ends
    in half a line is read again for up to ``TORN_TAIL_WAIT_S`` before it is reported ``truncated``."""
    fix = "pass the file given to `edgemed serve --audit-log`"
    deadline = time.monotonic() + (TORN_TAIL_WAIT_S if wait else 0.0)
    while True:
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise InputError(f"The audit log '{path}' is not a regular file.", fix)
            fh = open(path, "rb")
        except OSError as exc:
            raise InputError(f"Cannot read the audit log '{path}': {exc.strerror or exc}.", fix) from None
        with fh:
            found = _verify(str(path), _lines(fh), anchor)
        # A running server may be writing its next record: a write that crosses a page shows its first part first,
        # so a live log can end in half a line for a moment. Read again before calling the file cut.
        if found.report.problem != "truncated" or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


#: Generations one file's ``accepted`` records may leave open that ``verify`` names (more are only counted), and how
#: many records at the start of a file may finish a generation accepted in the file before it (rotation): at most
#: slots + queue are in flight, 64 + 4,096
MAX_TRACKED_OPEN = 10_000
MAX_IN_FLIGHT = 8_192


#: A record time more than this after the record before it is reported (a server idle over a holiday is not) ...
TIME_AHEAD_S = 30 * 86400.0
#: ... and one more than this before it (a clock stepped back by NTP's slew-or-step threshold or less is not)
TIME_BACK_S = 1.0
#: Time jumps ``verify`` lists (more are not listed)
MAX_TIME_JUMPS = 100
#: Request records after a stop record that ``verify`` lists (more are not listed)
MAX_AFTER_STOP = 100


def _seconds(text) -> float | None:
    """A record's ``time`` (``_now``: 2026-12-07T02:53:04.123Z) in seconds since 1970; None when it is not one."""
    import calendar

    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z", text) if isinstance(text, str) else None
    if m is None:
        return None
    try:
        return calendar.timegm(time.strptime(m[1], "%Y-%m-%dT%H:%M:%S")) + int(m[2]) / 1000
    except ValueError:
        return None


def _time_jump(jumps: list, path: str, before: tuple | None, after: tuple) -> None:
    """Note in ``jumps`` the step from record ``before`` to ``after`` ((seq, time, seconds) each) when it goes back
    more than ``TIME_BACK_S``, or further ahead than ``TIME_AHEAD_S``."""
    if before is None or len(jumps) >= MAX_TIME_JUMPS:
        return
    step = after[2] - before[2]
    if step < -TIME_BACK_S or step > TIME_AHEAD_S:
        jumps.append({"path": path, "seq": after[0], "time": after[1], "previous_time": before[1],
                      "seconds": round(step, 3)})


def _track_open(f: _File, rec: dict, index: int) -> None:
    rid, kind = rec.get("request_id"), rec.get("kind")
    if kind == "start" and isinstance(rec.get("seq"), int):
        f.last_start = rec["seq"]
    if kind in ("start", "stop"):
        f.stop_seq = rec.get("seq") if kind == "stop" else None
    elif kind in ("accepted", "request") and f.stop_seq is not None and len(f.after_stop) < MAX_AFTER_STOP:
        f.after_stop.append({"path": f.report.path, "seq": rec.get("seq"), "kind": kind, "request_id": rid,
                             "stop_seq": f.stop_seq})
    seconds = _seconds(rec.get("time"))
    if seconds is not None:
        now = (rec.get("seq"), rec["time"], seconds)
        _time_jump(f.time_jumps, f.report.path, f.last_time, now)
        f.first_time, f.last_time = f.first_time or now, now
    if kind == "disk_full":
        f.disk_full.append({"seq": rec.get("seq"), "time": rec.get("time"), "open_requests": rec.get("open_requests")})
    if not isinstance(rid, str):
        return
    if kind == "accepted":
        if len(f.opened) < MAX_TRACKED_OPEN:
            f.opened[rid] = rec.get("seq")
        else:
            f.open_over += 1
    elif kind == "request":
        if f.opened.pop(rid, None) is None and index < MAX_IN_FLIGHT:
            f.closed_early.add(rid)


def _unfinished(chain: list[_File], live: Path) -> tuple[int, list[str] | None, int]:
    """Generations accepted and never recorded as over, through the chain's files oldest first: (how many ended with
    their server or the disk, the first few of their ids, how many a server still holding ``live`` may be
    answering)."""
    still: dict = {}
    over = 0
    for f in reversed(chain):  # the chain is newest first
        for rid in f.closed_early:
            still.pop(rid, None)
        still.update(f.opened)
        over += f.open_over
    in_flight = 0
    if still and _writer_holds(live):
        last_start = max(f.last_start for f in chain)
        running = [rid for rid, seq in still.items() if isinstance(seq, int) and seq > last_start]
        for rid in running:
            del still[rid]
        in_flight = len(running)
    return len(still) + over, (list(still)[:5] if still else None), in_flight


def _writer_holds(path: Path) -> bool:
    """Whether a process holds the log's lock (``AuditLog`` keeps an exclusive ``flock`` while it writes; a process
    that dies lets it go)."""
    try:
        import fcntl
    except ImportError:  # no flock: nothing tells a live writer apart
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _continues(rec: dict) -> str | None:
    """The kept file a genesis record continues (a plain file name), or None."""
    name = rec.get("continues")
    if isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name:
        return name
    return None


def _verify(path: str, lines, anchor: str | None) -> _File:
    head: str | None = None
    count = 0
    f = _File(Report(path, True, 0, None))

    def broken(line: int, problem: str, detail: str) -> _File:
        f.report = Report(path, False, count, head, line, problem, detail)
        return f

    number = 0
    for complete, raw in lines:
        number += 1
        if not complete:
            if raw.strip():
                f.torn = {"line": number, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
                if count == 0:  # no record to go on from: the next start refuses it too
                    return broken(number, "truncated", f"the file holds no whole record ({len(raw)} bytes and no line "
                                                       "end): it is not an edgemed audit log, or it was cut before "
                                                       "its first record was written")
                return broken(number, "truncated", f"the last line ({len(raw)} bytes) is an incomplete record: "
                                                   "the file was cut, or a write was interrupted (a kill, a full "
                                                   "disk); the next start of `edgemed serve` on it keeps this file as "
                                                   "it is and goes on in a new one that records the cut")
            break
        try:
            rec = _read_record(raw)
            seq, prev, stored = rec["seq"], rec["prev"], rec["hash"]
        except (ValueError, KeyError) as exc:
            return broken(number, "malformed", f"line {number} is not an audit record ({exc}); it was edited or damaged")
        if record_hash(rec) != stored:
            return broken(number, "edited", f"record seq {seq} (line {number}) does not match its hash: its content was changed")
        if raw != canonical(rec):  # the same record spelled otherwise: a repeated key shows a reader another value
            return broken(number, "edited", f"record seq {seq} (line {number}) is not written as edgemed writes it "
                                            "(its bytes are not the record's canonical encoding: a key repeated, keys "
                                            "reordered, spaces or a carriage return added): the line was changed")
        expected = f.first_seq + count
        if number == 1:
            kept = _continues(rec)
            if rec.get("kind") == "genesis" and kept is not None and isinstance(seq, int) and not isinstance(seq, bool) \
                    and seq > 0 and isinstance(prev, str) and prev != ZERO:
                f.first_seq, f.continues, f.continues_hash = seq, kept, prev  # a rotated chain goes on here
                if "torn_bytes" in rec or "torn_sha256" in rec:  # ... after a file a kill cut short
                    f.continues_torn = (rec.get("torn_bytes"), rec.get("torn_sha256"))
            elif rec.get("kind") != "genesis" or seq != 0 or prev != ZERO:
                return broken(1, "deleted", f"the first line is record seq {seq}, not the genesis record: "
                                            "records at the start of the log were deleted")
        elif prev != head:
            if isinstance(seq, int) and seq > expected:
                if _later_has_seq(lines, expected):
                    return broken(number, "reordered", f"line {number} holds record seq {seq} where seq {expected} "
                                                       f"belongs, and seq {expected} comes later: records were moved")
                missing = f"seq {expected}" if seq == expected + 1 else f"seqs {expected}..{seq - 1}"
                return broken(number, "deleted", f"record {missing} before line {number} is missing (deleted)")
            if isinstance(seq, int) and seq < expected:
                return broken(number, "reordered", f"line {number} holds record seq {seq} where seq {expected} "
                                                   "belongs: records were moved or duplicated")
            return broken(number - 1, "edited", f"record seq {expected - 1} (line {number - 1}) was replaced: the "
                                                f"next record (seq {seq}) was chained to a different hash")
        elif seq != expected:
            return broken(number, "malformed", f"line {number} has seq {seq}, expected {expected}")
        head = stored
        f.last_kind = rec.get("kind")
        f.continued_in = rec.get("continued_in") if f.last_kind == "rotated" else None
        _track_open(f, rec, count)
        count += 1
        if anchor and stored == anchor:
            f.anchor_seen = True
    if count == 0:
        return broken(1, "truncated", "the log is empty: it has no genesis record")
    f.report = Report(path, True, count, head)  # an anchor is `verify`'s to look for, through every file
    return f


# -- write ----------------------------------------------------------------------------------------
#: Records of refused, unidentified requests one client address may add per window, and all clients together
REFUSALS_PER_CLIENT = 30
REFUSALS_TOTAL = 300
REFUSAL_WINDOW_S = 60.0
#: Clients whose counts are kept apart in one window; the counts of any more are summed under "other"
MAX_COUNTED_CLIENTS = 1024


class RefusalBudget:
    """Which refused requests get a record of their own: ``per_client`` per client address and ``total`` in all, per
    window of ``window_s`` seconds (windows fixed on the clock, not sliding). Beyond that ``admit`` says no and the
    request is counted; ``due`` hands out each client's count once its window is over. Not thread-safe: the log calls
    it under its lock."""

    def __init__(self, per_client: int = REFUSALS_PER_CLIENT, total: int = REFUSALS_TOTAL,
                 window_s: float = REFUSAL_WINDOW_S, clock=time.monotonic):
        if per_client < 1 or total < per_client or window_s <= 0:
            raise ValueError(f"refusal budget: per_client {per_client}, total {total}, window {window_s} s")
        self.per_client, self.total, self.window_s, self.clock = per_client, total, window_s, clock
        self._window: int | None = None
        self._started = ""
        self._written: dict[str, int] = {}  # at most `total` entries: each holds a record written
        self._total = 0
        self._counted: dict[str, int] = {}  # at most MAX_COUNTED_CLIENTS + 1 entries
        self._due: list[dict] = []

    def _roll(self) -> None:
        window = int(self.clock() // self.window_s)
        if window != self._window:
            self._close_window()
            self._window, self._started, self._written, self._total = window, _now(), {}, 0

    def _close_window(self) -> None:
        self._due.extend(dict(client=client, suppressed=n, window_start=self._started, window_s=self.window_s)
                         for client, n in self._counted.items())
        self._counted = {}

    def admit(self, client: str | None) -> bool:
        """True: write this refusal's record; False: it was counted (the first count of a window logs a warning
        naming the client, never the request)."""
        self._roll()
        client = client or "unknown"
        if self._written.get(client, 0) < self.per_client and self._total < self.total:
            self._written[client] = self._written.get(client, 0) + 1
            self._total += 1
            return True
        if client not in self._counted and len(self._counted) >= MAX_COUNTED_CLIENTS:
            client = "other"
        if not self._counted:
            log.warning("audit: more refused requests (first from %s) than the log records one by one (%d per client, "
                        "%d in all, per %g s); the rest are counted in 'refusals' records", client, self.per_client,
                        self.total, self.window_s)
        self._counted[client] = self._counted.get(client, 0) + 1
        return False

    def due(self, final: bool = False) -> list[dict]:
        """The counts of windows that are over (``final``: the current one too), each once."""
        self._roll()
        if final:
            self._close_window()
        due, self._due = self._due, []
        return due


class AuditLog:
    """The single writer of one audit file. Thread-safe; ``append`` returns the new head hash."""

    def __init__(self, path: Path | str, *, content: bool = False, rotate_bytes: int | None = None,
                 refusals: RefusalBudget | None = None, reserve_bytes: int = RESERVE_BYTES):
        import fcntl

        # with rotation, the real path: the live name is replaced by a rename, which must not replace a link to it
        self.path = Path(os.path.realpath(path)) if rotate_bytes else Path(path)
        self.content = content
        self.rotate_bytes = rotate_bytes  # None: one file for ever
        self.failed: str | None = None  # set when a write failed: the server then refuses requests (fail closed)
        self.refusals = refusals or RefusalBudget()
        self._lock = threading.Lock()
        self._open: set[str] = set()  # request ids of the generations accepted and not yet over
        self._closing = False  # the disk filled and the reserve is freed: only end records and the stop record go in
        self._reserve: tuple | None = None  # (path, open descriptor) of the reserve file this writer made
        self._reserve_owner: contextlib.ExitStack | None = None  # holds its owner lock (files.debris) while it is there
        fix = "pass --audit-log with a file in a folder this user can write (default: $EDGEMED_HOME/audit/)"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise InputError(f"Cannot open the audit log '{self.path}' for writing: {exc.strerror or exc}.", fix) from None
        mode = os.fstat(self._fd).st_mode
        if not stat.S_ISREG(mode):  # /dev/null would take the records and keep none
            os.close(self._fd)
            raise InputError(f"The audit log '{self.path}' is not a regular file.", fix)
        if mode & (stat.S_IRWXG | stat.S_IRWXO):  # a file made before (0600 is what this class creates)
            if content:  # prompts and answers (PHI) for every user of the machine to read
                os.close(self._fd)
                raise InputError(f"The audit log '{self.path}' can be read or written by other users, and "
                                 "--audit-content would write prompts and answers into it.",
                                 f"run: chmod 600 {self.path}")
            log.warning("audit log %s can be read or written by other users; run: chmod 600 %s", self.path, self.path)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not os.path.samestat(os.fstat(self._fd), os.stat(self.path)):  # rotated away while we opened it
                raise OSError("rotated")
        except OSError:
            os.close(self._fd)
            raise InputError(f"The audit log '{self.path}' is in use by another edgemed serve.",
                             "give each server its own --audit-log file") from None
        if rotate_bytes:
            try:
                self._check_rotation_possible()
            except OSError as exc:
                os.close(self._fd)
                raise InputError(f"The audit log's folder {self.path.parent} cannot take a rotation: "
                                 f"{exc.strerror or exc}.", "run with --audit-rotate-mib in a folder this user can "
                                 "write, on a file system with hard links (not FAT or exFAT), or without the option") from None
        try:
            if reserve_bytes:
                self._make_reserve(reserve_bytes)
            self._open_chain()
        except OSError as exc:  # the genesis record could not be written (/proc, a full or read-only disk)
            self._drop_reserve()
            os.close(self._fd)
            raise InputError(f"Cannot write the audit log '{self.path}': {exc.strerror or exc}.", fix) from None
        except BaseException:
            self._drop_reserve()
            os.close(self._fd)
            raise

    def _make_reserve(self, size: int) -> None:
        """Write the reserve: ``size`` bytes in a new file of this writer's beside the log (the same file system), random
        so that a compressing file system stores them all. A disk without that room refuses the start: a server that
        starts on it could answer a request and then lose its end record."""
        from edgemed.files.debris import debris_path, owned, sweep

        folder = Path(os.path.realpath(self.path)).parent
        stack = contextlib.ExitStack()
        stack.enter_context(owned(folder))
        sweep(folder)  # the reserves of servers that were killed
        path = debris_path(folder, f"{self.path.name}.reserve")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            stack.close()
            raise
        self._reserve, self._reserve_owner = (path, fd), stack  # held open: its room is freed through it, not its name
        try:
            chunk = os.urandom(min(size, 1 << 16))
            left = size
            while left > 0:
                left -= os.write(fd, chunk[:left])
            os.fsync(fd)
        except OSError as exc:
            self._drop_reserve()
            if exc.errno in NO_SPACE:
                raise InputError(f"The audit log's disk ({folder}) has no room for the {size >> 10} KiB the server "
                                 "keeps in reserve, so that the end records of requests it answered always fit.",
                                 "free disk space there, or pass --audit-log with a file on another disk") from None
            raise

    def _drop_reserve(self) -> bool:
        """Free the reserve: empty the file through its open descriptor (this writer's own file, whatever its name
        holds now), and remove its name if that is still the same file. True when its room was freed."""
        reserve, owner = self._reserve, self._reserve_owner
        self._reserve = self._reserve_owner = None
        freed = False
        if reserve is not None:
            path, fd = reserve
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                freed = True
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and os.path.samestat(st, os.fstat(fd)):  # held open: no inode reused
                    os.unlink(path)
            os.close(fd)
        if owner is not None:
            owner.close()
        return freed

    def _genesis(self, **fields) -> None:
        from edgemed import __version__

        self._put({"kind": "genesis", "format": FORMAT, "log_id": uuid.uuid4().hex, "edgemed_version": __version__,
                     **fields})

    def _open_chain(self) -> None:
        if os.fstat(self._fd).st_size == 0:
            self.head, self.seq = ZERO, 0
            self._genesis()
            return
        # this file (the kept ones before it are `verify`'s to follow), under our lock: no writer is halfway
        found = _verify_file(self.path, None, wait=False)
        report = found.report
        torn = found.torn if report.problem == "truncated" and report.records else None
        if not report.ok and torn is None:
            fix = "keep that file as evidence, and start the server with a new --audit-log path"
            if report.problem == "truncated" and not report.records:  # nothing whole: no chain to go on from
                fix = "start the server with a new --audit-log path, or an edgemed audit log's (that file is left as it is)"
            raise IntegrityError(
                f"The audit log '{self.path}' is broken at line {report.line} ({report.problem}): {report.detail}.", fix)
        if found.last_kind == "rotated":  # a kept file of a rotated log, or a rotation cut short in the live file
            self._check_live(found.continued_in)
        self.head, self.seq = report.head, found.first_seq + report.records
        if torn is not None:  # whole up to a last record a kill cut short: keep it as it is, go on in a new file
            self._keep_torn(torn)
        elif found.last_kind == "rotated":  # a rotation that was cut short (a kill, a power cut): finish it
            self.path = Path(os.path.realpath(self.path))  # the live name is replaced by a rename: never a link to it
            try:
                self._start_next(self._kept_name(self.seq - 1))
            except OSError as exc:  # the records go on here: a file that cannot rotate is still a whole chain
                log.warning("audit log %s: the rotation it ends with could not be finished (%s); records go on in "
                            "this file", self.path, exc.strerror or exc)

    def _check_live(self, continued_in) -> None:
        """This file ends in a ``rotated`` record: it is the live file only when that record names it. A kept file
        names the live file its chain goes on in; taking it for a rotation cut short would rename a new file over it
        and break the real log's chain."""
        real = Path(os.path.realpath(self.path))
        if continued_in == real.name:
            return
        plain = isinstance(continued_in, str) and _continues({"continues": continued_in}) is not None
        if not plain:
            raise InputError(f"The audit log '{self.path}' ends in a 'rotated' record that names no file its chain "
                             "goes on in: it is a kept file of a rotated log, which is never written again.",
                             "start the server with --audit-log set to that log's live file, or a new path")
        raise InputError(f"The audit log '{self.path}' is a kept file of a rotated log: its chain goes on in "
                         f"'{continued_in}' beside it, and a kept file is never written again.",
                         f"start the server with --audit-log {real.with_name(continued_in)} (the live file)")

    def _keep_torn(self, torn: dict) -> None:
        """The live file verified up to its last line, a record cut short (a kill while it was written): keep the
        file as it is, as a rotation keeps a full one, and go on at the live name in a new file whose genesis
        continues it and holds the torn line's length and sha256, so ``verify`` takes exactly those bytes there."""
        self.path = Path(os.path.realpath(self.path))  # the live name is replaced by a rename: never a link to it
        kept = self._kept_name(self.seq - 1)
        what = (f"The audit log '{self.path}' ends in a record cut short (line {torn['line']}, {torn['bytes']} bytes: "
                "the server was killed, or the disk filled, while it wrote it)")
        try:
            self._start_next(kept, torn_bytes=torn["bytes"], torn_sha256=torn["sha256"])
        except OSError as exc:
            raise IntegrityError(f"{what}, and that file could not be kept as {kept} with a new file going on after "
                                 f"it: {exc.strerror or exc}.",
                                 "let the server write in its folder (and use a file system with hard links), or keep "
                                 "that file as evidence and start the server with a new --audit-log path") from None
        log.warning("%s; that file is kept as it is in %s, and the records go on in a new %s that continues it",
                    what, kept, self.path.name)

    def _check_rotation_possible(self) -> None:
        """A rotation links the full file under its kept name and renames a new one into place: try both in the
        folder now, so a folder that refuses them is named at start, not at the first rotation hours later. The
        probes are owner-tagged names (``files.debris``): fresh, never a file that was there, swept if a kill
        leaves them."""
        from edgemed.files.debris import debris_path, owned

        folder = self.path.parent
        with owned(folder):
            probe, link = debris_path(folder, "audit-probe"), debris_path(folder, "audit-probe-link")
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            try:
                os.link(probe, link)
                os.unlink(link)
            finally:
                os.unlink(probe)

    def _kept_name(self, seq: int) -> str:
        """Where the file whose ``rotated`` record has ``seq`` is kept: ``STEM.SEQ.SUFFIX``, beside the live name."""
        return f"{self.path.stem}.{seq:010d}{self.path.suffix}"

    def _rotate(self) -> None:
        """End this file with a ``rotated`` record, keep it under its own name, and go on in a new file at the live
        name whose genesis continues it. A kill at any step leaves a chain ``verify`` accepts whole, and the next
        start finishes the rotation; a step that fails stops the writer (fail closed) as a failed write does."""
        kept = self._kept_name(self.seq)
        self._write({"kind": "rotated", "continued_in": self.path.name})  # a failed write fails closed, as any does
        try:
            self._start_next(kept)
        except OSError as exc:  # the chain stays whole in this file: answering goes on, rotating stops
            self.rotate_bytes = None
            log.warning("audit log %s could not rotate (%s): records go on in this file; fix its folder and restart "
                        "to rotate again", self.path, exc.strerror or exc)

    def _start_next(self, kept_name: str, **genesis) -> None:
        """Keep the live file as ``kept_name`` and go on at the live name in a new file whose genesis continues it
        (with ``genesis``' fields too)."""
        import fcntl

        from edgemed.files.debris import debris_path, owned, sweep

        kept = self.path.with_name(kept_name)
        linked = False
        try:  # the finished file under its own name too; the live name still shows it until the swap below
            os.link(self.path, kept)
            linked = True
        except FileExistsError:
            if not os.path.samefile(self.path, kept):  # not our earlier, interrupted try: never replaced
                raise OSError(17, f"{kept} exists and is another file", str(kept)) from None
        saved = (self._fd, self.head, self.seq, self.failed)
        fd = -1
        folder = self.path.parent
        # the new file is made under an owner-tagged name (files.debris): fresh, never one that was there; an
        # interrupted rotation's is swept once its owner is gone
        with owned(folder):
            sweep(folder)
            nxt = debris_path(folder, "audit-next")
            try:
                fd = os.open(nxt, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                self._genesis(continues=kept_name, **genesis)
                os.rename(nxt, self.path)  # from here the live name holds the new file
            except BaseException:  # as it was: the records go on in the old file, its chain unchanged
                self._fd, self.head, self.seq, self.failed = saved  # a failed write to the new file is not the old one's
                if fd >= 0:
                    os.close(fd)
                    with contextlib.suppress(OSError):
                        os.unlink(nxt)  # made above (O_EXCL)
                if linked:
                    with contextlib.suppress(OSError):
                        os.unlink(kept)  # linked above
                raise
        old = saved[0]
        with contextlib.suppress(OSError):  # the rename is done; a folder that cannot be synced loses nothing here
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        os.close(old)
        log.info("audit log: records up to seq %d kept in %s", self.seq - 2, kept)

    def _write(self, fields: dict) -> str:
        """Append one record; a failure stops the writer (fail closed). A failure for space with the reserve still
        there frees it and marks the place (``disk_full``): from then on only the end records of the generations
        accepted by then, and the stop record, go in (``append``)."""
        try:
            return self._put(fields)
        except OSError as exc:
            if self.failed is None:
                self.failed = f"writing {self.path} failed: {exc.strerror or exc}"  # write nothing new: fail closed
            if self._closing or exc.errno not in NO_SPACE or not self._drop_reserve():
                self._closing = False  # nothing more can go in
                raise
            code = errno.errorcode[exc.errno]
        self._closing = True
        log.error("audit log %s: the disk is full; the server's reserve beside it is freed for the end records of the "
                  "%d generation(s) it is answering and its stop record, and new requests are refused (503). Fix: free "
                  "disk space, then restart the server", self.path, len(self._open))
        try:
            self._put({"kind": "disk_full", "error_code": code, "open_requests": len(self._open)})
            if fields.get("kind") == "accepted":  # a new generation: refused, as every one from now on
                raise OSError(errno.ENOSPC, "the disk is full: the server takes no new requests")
            return self._put(self._closing_fields(fields))
        except OSError:
            if fields.get("kind") != "accepted":
                self._closing = False
            raise

    @staticmethod
    def _closing_fields(fields: dict) -> dict:
        """A record written from the reserve: without the request's text, which could be larger than all of it."""
        if not CONTENT_FIELDS & set(fields):
            return fields
        return {**{k: v for k, v in fields.items() if k not in CONTENT_FIELDS}, "content_dropped": True}

    def _put(self, fields: dict) -> str:
        """Write one record and fsync it; on a failure, take back what of it went in, and raise."""
        record = {**fields, "seq": self.seq, "prev": self.head, "time": _now()}
        record["hash"] = record_hash(record)
        line = canonical(record) + b"\n"
        view = memoryview(line)
        written = 0
        try:
            size = os.fstat(self._fd).st_size  # where this record starts: the file's end (O_APPEND, our lock)
            while written < len(line):
                written += os.write(self._fd, view[written:])
            os.fsync(self._fd)
        except OSError:
            if 0 < written < len(line):  # part of the line went in (a full disk): take it back, so a restart opens
                self._cut_back(size, written)
            raise
        self.head, self.seq = record["hash"], self.seq + 1
        return self.head

    def _cut_back(self, size: int, written: int) -> None:
        """Cut off the ``written`` bytes of a record that did not all go in, if the file still ends with them (only
        this writer's own bytes: shrinking a file needs no free space). Where it cannot, the torn line stays, and the
        next start keeps that file as it is (``_keep_torn``)."""
        with contextlib.suppress(OSError):
            if os.fstat(self._fd).st_size == size + written:
                os.ftruncate(self._fd, size)
                os.fsync(self._fd)

    def append(self, kind: str, **fields) -> str:
        """Append one record of ``kind``. Unknown fields are refused; text only when ``content`` is on."""
        allowed = FIELDS | (CONTENT_FIELDS if self.content else set())
        unknown = set(fields) - allowed - CONTENT_FIELDS
        if unknown:
            raise ValueError(f"audit fields not in the schema: {sorted(unknown)}")
        if any(not isinstance(a, dict) or set(a) != ADAPTER_KEYS for a in fields.get("adapters", ())):
            raise ValueError(f"audit field 'adapters' holds entries other than {sorted(ADAPTER_KEYS)}")
        kept = {k: v for k, v in fields.items() if k in allowed}
        with self._lock:
            ends = kind == "stop" or kind == "request" and kept.get("request_id") in self._open
            if self._fd < 0 or self.failed and not (self._closing and ends):
                raise OSError(f"audit log {self.path} is {'closed' if self._fd < 0 else 'failed'}")
            if self._closing:
                kept = self._closing_fields(kept)
            for counted in self.refusals.due(final=kind == "stop"):
                self._write({"kind": "refusals", **counted})
            head = self._write({"kind": kind, **kept})
            if kind == "accepted":
                self._open.add(kept.get("request_id"))
            elif kind == "request":
                self._open.discard(kept.get("request_id"))
            if self.rotate_bytes and not self.failed and os.fstat(self._fd).st_size >= self.rotate_bytes:
                self._rotate()
            return head

    def append_refused(self, **fields) -> str | None:
        """Append the record of a request refused before any key identified it, within its client's budget
        (``RefusalBudget``); None: it was counted instead, for a later ``refusals`` record."""
        with self._lock:
            admitted = self.refusals.admit(fields.get("client"))
        return self.append("request", **fields) if admitted else None

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)  # releases the flock
                self._fd = -1
            self._drop_reserve()
