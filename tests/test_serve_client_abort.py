"""A client that leaves early is the client's doing, not a server error: ``edgemed serve`` records it with
nginx's 499 ("client closed request") in ``/metrics`` and outcome ``client_disconnected`` in the audit log,
never a 5xx, so an alert on 5xx does not fire on client time-outs. Three ways to leave, against a real
uvicorn server and the real SmolLM2: a body cut short, a non-streaming answer abandoned mid-generation,
a stream abandoned mid-stream. Each frees its slot, and the next request is answered.
"""

from __future__ import annotations

import json
import re
import socket

import pytest

from serve_kit import ServerThread, audit_lines, wait_until

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package ships with

from edgemed.runtime.engine import LoadSettings  # noqa: E402
from edgemed.serve import audit  # noqa: E402
from edgemed.serve.app import create_app  # noqa: E402
from edgemed.runtime.batch.batcher import Batcher  # noqa: E402
from edgemed.serve.config import ServeConfig  # noqa: E402

MODEL = "smollm2-abort"
LONG = "Write a long essay on the history of medicine, century by century."
REQUESTS = re.compile(r'^edgemed_requests_total\{code="(\d+)",endpoint="(\w+)"\} (\S+)$', re.M)


def serving(smollm2_gguf, tmp_path_factory, slots: int):
    """A real uvicorn server on a real batcher of ``slots`` slots, with an audit log (``srv.audit_path``)."""
    audit_path = tmp_path_factory.mktemp("abort") / "audit.jsonl"
    batcher = Batcher(smollm2_gguf, LoadSettings(n_ctx=1024, n_threads=1), slots=slots, queue_size=2)
    batcher.start()
    log = audit.AuditLog(audit_path)
    try:
        with ServerThread(create_app(batcher, ServeConfig(model_id=MODEL, bundle_digest="sha256:test", audit=log))) as srv:
            srv.batcher, srv.audit_path = batcher, audit_path
            yield srv
    finally:
        batcher.close()
        log.close()


@pytest.fixture(scope="module")
def server(smollm2_gguf, tmp_path_factory):
    yield from serving(smollm2_gguf, tmp_path_factory, 1)


def records(server) -> list[dict]:
    """The audit's ``request`` records: one per request once it is over (a generation's ``accepted`` record,
    written before it is queued, is left out)."""
    return [r for r in audit_lines(server.audit_path) if r["kind"] == "request"]


def requests_by_code(server) -> dict[str, float]:
    """``/metrics``' request counter, summed over endpoints: {code: count}."""
    counts: dict[str, float] = {}
    for code, _, value in REQUESTS.findall(httpx.get(server.url + "/metrics", timeout=30).text):
        counts[code] = counts.get(code, 0) + float(value)
    return counts


def raw_request(server, body: bytes, *, declared: int | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    length = len(body) if declared is None else declared
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(length).encode() + b"\r\n\r\n" + body)
    return sock


def chat_body(**extra) -> bytes:
    return json.dumps({"model": MODEL, "max_tokens": 300, "messages": [{"role": "user", "content": LONG}], **extra}).encode()


def recorded_as_client_closed(server, before_records: int, before_counts: dict) -> dict:
    """The request's audit record (one, new, outcome client_disconnected, status 499) and the metrics' view:
    one more 499, no 5xx at all. Then the server still answers."""
    assert wait_until(lambda: len(records(server)) > before_records, timeout=20)
    new = [r for r in records(server)[before_records:] if r["kind"] == "request"]
    assert len(new) == 1, new
    rec = new[0]
    assert (rec["outcome"], rec["status"], rec["endpoint"]) == ("client_disconnected", 499, "chat"), rec
    counts = requests_by_code(server)
    assert counts.get("499", 0) == before_counts.get("499", 0) + 1, counts
    assert not [code for code in counts if code.startswith("5")], counts
    assert wait_until(lambda: server.batcher.stats()["active_slots"] == 0 and server.batcher.stats()["queue_depth"] == 0)
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    assert wait_until(lambda: (records(server)[-1]["status"], records(server)[-1]["outcome"]) == (200, "ok"))
    return rec


def test_body_cut_short_is_499_not_500(server):
    before, counts = len(records(server)), requests_by_code(server)
    sock = raw_request(server, b'{"model":"', declared=1000)  # 10 bytes of 1000, then gone
    sock.close()
    rec = recorded_as_client_closed(server, before, counts)
    assert rec.get("finish_reason") is None  # nothing was generated


def test_non_streaming_client_gone_mid_generation_is_499_not_503(server):
    before, counts = len(records(server)), requests_by_code(server)
    generated = server.batcher.stats()["tokens_generated_total"]
    sock = raw_request(server, chat_body())
    assert wait_until(lambda: server.batcher.stats()["tokens_generated_total"] >= generated + 3)
    sock.close()
    rec = recorded_as_client_closed(server, before, counts)
    assert rec["finish_reason"] == "cancelled" and 0 < rec["completion_tokens"] < 300 and rec["stream"] is False


def test_streaming_client_gone_mid_stream_is_499(server):
    before, counts = len(records(server)), requests_by_code(server)
    sock = raw_request(server, chat_body(stream=True))
    got = b""
    while got.count(b"data: ") < 5:  # the head, then a few pieces of the answer
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200")
    sock.close()
    rec = recorded_as_client_closed(server, before, counts)
    assert rec["finish_reason"] == "cancelled" and rec["completion_tokens"] < 300 and rec["stream"] is True


def test_a_stream_read_to_its_end_is_200_however_fast_the_client_hangs_up(server):
    """uvicorn reports a disconnect once a response is complete: a client that closes right after [DONE] got
    everything, so it is not a client that left (the race this guards against recorded such streams as 499)."""
    for _ in range(5):
        before = len(records(server))
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                          content=chat_body(stream=True, max_tokens=3), headers={"Content-Type": "application/json"}) as r:
            body = "".join(r.iter_text())
        assert body.rstrip().endswith("data: [DONE]")
        assert wait_until(lambda: len(records(server)) > before, timeout=20)
        rec = [r for r in records(server)[before:] if r["kind"] == "request"][-1]
        assert (rec["status"], rec["outcome"]) == (200, "ok"), rec


def test_a_stream_that_fails_after_its_headers_is_a_5xx_in_metrics_and_audit(server):
    """The other side of the line: a server failure after the 200 headers went out is still the server's: the
    stream ends with an ``error`` event, and /metrics and the audit record say 500 (a 5xx alert fires)."""
    before, counts = len(records(server)), requests_by_code(server)
    ctx = server.batcher._ctx
    real, calls = ctx.decode, []

    def fail_after_a_few(batch):
        calls.append(1)
        return -1 if len(calls) > 4 else real(batch)  # llama.cpp refuses a batch mid-generation

    ctx.decode = fail_after_a_few
    try:
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, content=chat_body(stream=True),
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status_code == 200
            body = "".join(r.iter_text())
    finally:
        ctx.decode = real
    assert '"code": "generation_failed"' in body and body.rstrip().endswith("data: [DONE]")
    assert wait_until(lambda: len(records(server)) > before, timeout=20)
    rec = [r for r in records(server)[before:] if r["kind"] == "request"][-1]
    assert (rec["status"], rec["outcome"], rec["stream"]) == (500, "error", True), rec
    assert requests_by_code(server).get("500", 0) == counts.get("500", 0) + 1


def test_a_stream_whose_code_raises_after_its_headers_is_a_500_in_metrics_and_audit(server, monkeypatch):
    """A bug (an exception, not an ``error`` event) in the middle of a stream: the client's stream breaks off, and the
    audit record and /metrics say 500 ``server_error``, not the 200 the headers had said."""
    from edgemed.serve import generate

    before, counts = len(records(server)), requests_by_code(server)
    real, calls = generate.take, []

    def take_then_fail(answer, item):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("a bug in the stream")
        return real(answer, item)

    monkeypatch.setattr(generate, "take", take_then_fail)
    got = []
    with pytest.raises(httpx.HTTPError):
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, content=chat_body(stream=True),
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status_code == 200
            for text in r.iter_text():
                got.append(text)
    monkeypatch.undo()
    events = "".join(got)  # an error event before the connection closes: no client takes the cut for an end
    assert '"code": "server_error"' in events and "cut off" in events and "[DONE]" not in events, events
    assert wait_until(lambda: len(records(server)) > before, timeout=20)
    rec = [r for r in records(server)[before:] if r["kind"] == "request"][-1]
    assert (rec["status"], rec["outcome"], rec["error_code"]) == (500, "error", "server_error"), rec
    assert requests_by_code(server).get("500", 0) == counts.get("500", 0) + 1


@pytest.fixture(scope="module")
def two_slots(smollm2_gguf, tmp_path_factory):
    yield from serving(smollm2_gguf, tmp_path_factory, 2)


def test_a_stream_of_two_choices_left_mid_stream_keeps_both_counts_in_the_audit(two_slots):
    """n=2 streamed: each choice's items come through their own reader. The client leaves mid-stream: the record
    still says how the generations ended and how many tokens they made (both choices summed), and it is written
    as soon as the batcher has ended them (it used to miss both, after a 5 s wait for a wake-up that had been
    switched off by the first readers closing late)."""
    server = two_slots
    before, counts = len(records(server)), requests_by_code(server)
    sock = raw_request(server, chat_body(stream=True, n=2))
    got = b""
    while got.count(b'"content"') < 8:  # a few pieces of both answers
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200") and b'"index": 1' in got
    generated = server.batcher.stats()["tokens_generated_total"]
    sock.close()
    assert wait_until(lambda: len(records(server)) > before, timeout=20)
    rec = [r for r in records(server)[before:] if r["kind"] == "request"][-1]
    assert (rec["outcome"], rec["status"], rec["stream"]) == ("client_disconnected", 499, True), rec
    assert rec.get("finish_reason") == "cancelled", rec
    assert generated <= rec["completion_tokens"] < 2 * 300, rec
    assert rec["latency_s"] < 4.5, rec  # not held up by a reader that could not be woken
    assert requests_by_code(server).get("499", 0) == counts.get("499", 0) + 1
