"""A stop signal to ``edgemed serve`` while a stream runs, when the batcher is slow to end the answers (a decode step
on a loaded machine takes seconds): uvicorn's own deadline cancelled the stream before the batcher had ended it, so
the client was cut off with no error event and no ``[DONE]``, a traceback was logged, and the request's audit record
came after the log's stop record saying ``ok`` / 200 with no token count. Now the stream ends with the 503
``unavailable`` event and ``[DONE]``, its record says it was cancelled (with its tokens) and comes before the stop
record; and ``audit verify`` reports a request record found after a stop record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from edgemed.serve import audit

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx2")

#: the real CLI, with the batcher taking 2 s to end the answers at shutdown, and a grace period of 3 s less 1
def start(patch: str, gguf, tmp_path, log, slots: int) -> subprocess.Popen:
    """``edgemed serve`` of ``gguf`` on a free port, 1 thread, ``slots`` slots, its audit log at ``log``, run through
    a script that first applies ``patch`` (Python source ending in running the CLI) to the server's modules."""
    script = tmp_path / "patched_serve.py"
    script.write_text(patch)
    cmd = [sys.executable, str(script), "serve", str(gguf), "--port", "0", "--slots", str(slots), "--no-ui",
           "--no-adapters", "--threads", "1", "--ctx", "2048", "--prefix-cache-mib", "0", "--audit-log", str(log)]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, EDGEMED_HOME=str(tmp_path / "home")))


def base_url(proc: subprocess.Popen) -> str:
    """The OpenAI base URL the server prints once it listens (its stderr read up to that line)."""
    while True:
        line = proc.stderr.readline()
        assert line, "the server ended before listening"
        if line.startswith("OpenAI base_url: "):
            return line.split()[2]


SLOW_END = """
import runpy, sys, time
import edgemed.cli.serve as serve
from edgemed.runtime.batch.batcher import Batcher
serve.GRACE_S, serve.GRACE_MARGIN_S = 3, 1
end_all = Batcher._end_all
def slow(self, reason, error):
    time.sleep(2)
    end_all(self, reason, error)
Batcher._end_all = slow
sys.argv = ["edgemed", *sys.argv[1:]]
runpy.run_module("edgemed", run_name="__main__")
"""


def test_a_stop_ends_a_stream_the_batcher_is_slow_to_end_with_a_503_recorded_before_the_stop(smollm2_gguf, tmp_path):
    log = tmp_path / "audit.jsonl"
    proc = start(SLOW_END, smollm2_gguf, tmp_path, log, slots=1)
    events: list[str] = []
    try:
        url = base_url(proc)
        model = httpx.get(url + "/models", timeout=30).json()["data"][0]["id"]
        body = {"model": model, "stream": True, "max_tokens": 2000, "logit_bias": {"2": -100}, "messages": [
            {"role": "user", "content": "Write a very long history of medicine, century by century."}]}
        started = threading.Event()

        def stream():
            with httpx.stream("POST", url + "/chat/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    events.append(line)
                    if len(events) > 6:
                        started.set()

        client = threading.Thread(target=stream, daemon=True)
        client.start()
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        client.join(60)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    data = [e[6:] for e in events if e.startswith("data: ")]
    assert data[-1] == "[DONE]", data[-3:]
    error = json.loads(data[-2])["error"]
    assert error["code"] == "unavailable" and error["type"] == "server_error", error

    records = [json.loads(x) for x in log.read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    request = next(r for r in records if r["kind"] == "request" and r.get("endpoint") == "chat")
    assert kinds.index("stop") > records.index(request), kinds  # the end of the request, then the stop
    assert request["status"] == 503 and request["outcome"] == "cancelled" and request["error_code"] == "unavailable"
    assert request["finish_reason"] == "cancelled" and request["completion_tokens"] > 0, request
    report = audit.verify(log)
    assert report.ok and report.after_stop is None and report.unfinished == 0, report


#: the real CLI with a grace period of 3 s less 1, where a non-streaming chat request, once queued, never collects
#: its answer: it is still running when the batcher has closed and the margin has passed, so the stop cancels it
HELD = """
import asyncio, runpy, sys
import edgemed.cli.serve as serve
from edgemed.serve import generate
serve.GRACE_S, serve.GRACE_MARGIN_S = 3, 1
async def held(*args, **kwargs):
    await asyncio.Event().wait()
generate.collect = held
sys.argv = ["edgemed", *sys.argv[1:]]
runpy.run_module("edgemed", run_name="__main__")
"""


def test_a_stop_cancelling_a_request_still_running_answers_and_records_503_not_500(smollm2_gguf, tmp_path):
    """A non-streaming request still running when the stop cancels what is left (``GRACE_MARGIN_S`` after the
    batcher closed) was answered with uvicorn's plain-text 500 and a traceback, and recorded (audit, metrics) as a
    500 server error. It is the server's shutdown: a 503 ``unavailable`` in OpenAI's shape, to retry, recorded so,
    with the token counts computed before the stop (its record had none; a stream's has them); a stream running
    beside it still ends with the 503 event and ``[DONE]``."""
    log = tmp_path / "audit.jsonl"
    proc = start(HELD, smollm2_gguf, tmp_path, log, slots=2)
    events: list[str] = []
    whole: list = []
    try:
        url = base_url(proc)
        model = httpx.get(url + "/models", timeout=30).json()["data"][0]["id"]
        body = {"model": model, "max_tokens": 2000, "logit_bias": {"2": -100}, "messages": [
            {"role": "user", "content": "Write a very long history of medicine, century by century."}]}
        started = threading.Event()

        def stream():
            with httpx.stream("POST", url + "/chat/completions", json={**body, "stream": True}, timeout=120) as r:
                for line in r.iter_lines():
                    events.append(line)
                    if len(events) > 6:
                        started.set()

        streaming = threading.Thread(target=stream, daemon=True)
        streaming.start()
        assert started.wait(60)
        plain = threading.Thread(target=lambda: whole.append(
            httpx.post(url + "/chat/completions", json={**body, "max_tokens": 8}, timeout=120)), daemon=True)
        plain.start()
        for _ in range(600):  # queued: its accepted record is written (and fsynced) before the answer is collected
            if any(r["kind"] == "accepted" and r.get("stream") is False
                   for r in map(json.loads, log.read_text().splitlines())):
                break
            threading.Event().wait(0.1)
        else:
            pytest.fail("the non-streaming request was not accepted within 60 s")
        proc.send_signal(signal.SIGTERM)
        streaming.join(60)
        plain.join(60)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    response = whole[0]
    assert response.status_code == 503, (response.status_code, response.text)
    error = response.json()["error"]
    assert error["code"] == "unavailable" and error["type"] == "server_error", error
    assert "shutting down" in error["message"] and "Fix: retry" in error["message"], error
    assert response.headers["retry-after"] == "5"
    data = [e[6:] for e in events if e.startswith("data: ")]
    assert data[-1] == "[DONE]", data[-3:]
    assert json.loads(data[-2])["error"]["code"] == "unavailable", data[-2]

    records = [json.loads(x) for x in log.read_text().splitlines()]
    stop = next(i for i, r in enumerate(records) if r["kind"] == "stop")
    ends = {r["stream"]: (i, r) for i, r in enumerate(records) if r["kind"] == "request" and r.get("endpoint") == "chat"}
    for i, request in ends.values():
        assert i < stop, records  # each request's end, then the stop
        assert request["status"] == 503 and request["outcome"] == "cancelled", request
        assert request["error_code"] == "unavailable", request
    assert set(ends) == {True, False}, ends
    # each keeps what was computed before the stop, as a stream's record does: the non-streaming one lost its counts
    plain = ends[False][1]
    assert plain["prompt_tokens"] > 0 and 0 <= plain["completion_tokens"] <= 8, plain
    assert ends[True][1]["completion_tokens"] > 0, ends[True][1]
    report = audit.verify(log)
    assert report.ok and report.after_stop is None and report.unfinished == 0, report


def test_verify_reports_a_request_record_after_the_stop_record(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = audit.AuditLog(path, reserve_bytes=0)
    try:
        log.append("start", model="m")
        log.append("accepted", request_id="r1", endpoint="chat")
        log.append("stop", model="m")
        log.append("request", request_id="r1", endpoint="chat", status=200, outcome="ok")
    finally:
        log.close()
    report = audit.verify(path)
    assert report.ok  # the chain is whole: what is wrong is the order the server wrote in
    assert report.after_stop == [{"path": str(path), "seq": 4, "kind": "request", "request_id": "r1", "stop_seq": 3}]

    from click.testing import CliRunner

    from edgemed.cli import cli

    out = CliRunner().invoke(cli, ["audit", "verify", str(path)])
    assert out.exit_code == 0 and "comes after the server's stop record (seq 3)" in out.output, out.output
    log = audit.AuditLog(path, reserve_bytes=0)  # a later start: its requests are not after a stop
    try:
        log.append("start", model="m")
        log.append("accepted", request_id="r2", endpoint="chat")
        log.append("request", request_id="r2", endpoint="chat", status=200, outcome="ok")
    finally:
        log.close()
    assert len(audit.verify(path).after_stop) == 1
