"""Connections held open without a whole request: a request head that never ends is let go after
``transport.HEADER_TIMEOUT_S``, a body that never arrives gets a 408 after ``middleware.BODY_TIMEOUT_S``; requests
sent whole, one after another on one connection, are answered as before."""

from __future__ import annotations

import socket
import time

import pytest

from serve_kit import ServerThread

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def _app():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from edgemed.serve.config import ServeConfig
    from edgemed.serve.metrics import Metrics
    from edgemed.serve.middleware import Guard, Observe

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def echo(request):
        return JSONResponse({"bytes": len(await request.body())})

    class NoBatcher:
        def stats(self) -> dict:
            return {}

    inner = Starlette(routes=[Route("/health", health), Route("/v1/echo", echo, methods=["POST"])])
    config = ServeConfig(model_id="m", bundle_digest="d")
    return Observe(Guard(inner, config=config), config=config, metrics=Metrics(NoBatcher()), labels={})


def _answer(sock: socket.socket) -> bytes:
    """One whole answer (head and Content-Length bytes of body) on a kept-alive connection."""
    sock.settimeout(10)
    got = b""
    while b"\r\n\r\n" not in got:
        got += sock.recv(65536)
    head, _, body = got.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _read_all(sock: socket.socket, deadline_s: float) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and the seconds that took."""
    start, got = time.monotonic(), b""
    sock.settimeout(deadline_s)
    while True:
        block = sock.recv(65536)
        if not block:
            return got, time.monotonic() - start
        got += block


def _connect(srv) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=5)


def test_a_request_head_that_never_ends_is_let_go_and_whole_requests_are_still_answered():
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from edgemed.serve.transport import header_deadline

    with ServerThread(_app(), http=header_deadline(H11Protocol, 0.5)) as srv:
        with _connect(srv) as held:
            held.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: the head goes on
            got, took = _read_all(held, 10)
            assert got == b"" and took < 5, (got, took)
        with _connect(srv) as client:  # two whole requests on one connection, each after a pause under the keep-alive
            for _ in range(2):
                client.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert _answer(client).startswith(b"HTTP/1.1 200")
                time.sleep(0.3)
            client.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # then a head that stops after an answer
            got, took = _read_all(client, 10)
            assert got == b"" and took < 5, (got, took)


def test_a_body_that_never_arrives_is_a_408_that_closes_the_connection(monkeypatch):
    from edgemed.serve import middleware

    monkeypatch.setattr(middleware, "BODY_TIMEOUT_S", 0.5)
    with ServerThread(_app()) as srv:
        with _connect(srv) as client:
            client.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 100\r\n\r\n" + b"{" * 10)
            got, took = _read_all(client, 10)
        assert got.startswith(b"HTTP/1.1 408") and b"request_timeout" in got and took < 5, (got, took)
        assert b"connection: close" in got.lower()
        with _connect(srv) as client:  # a body sent whole is read as before
            client.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\nConnection: close\r\n"
                           b"\r\nabc")
            got, _ = _read_all(client, 10)
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(b'{"bytes":3}'), got


def test_the_open_files_limit_is_raised_to_the_hard_limit_and_read_back():
    resource = pytest.importorskip("resource")
    from edgemed.serve.transport import raise_open_files_limit

    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        soft, hard = raise_open_files_limit()
        assert (soft, hard) == resource.getrlimit(resource.RLIMIT_NOFILE) and hard == before[1]
        assert soft == hard or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)
