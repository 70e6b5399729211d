"""A registry's answers are read to a bound: a huge body on ``GET /v2/`` is never read, and an error's body (a 404, a
500 that oras retries, a redirect) is read to at most ``oci.MAX_ANSWER_BYTES`` before it is parsed. A registry sending
hundreds of megabytes there took a pull from 19 MB to 839 MB of memory; the pull now fails with the registry's own
message, having taken a few megabytes at most (what the sockets hold). Served here by a small server that counts
what it managed to send (no docker-registry needed)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler

import pytest
from click.testing import CliRunner

pytest.importorskip("oras")

from registry_kit import ScriptedServer  # noqa: E402

from edgemed.cli import cli  # noqa: E402
from edgemed.packaging import oci  # noqa: E402

BIG = 64 << 20
BLOCK = b" " * (1 << 20)
MESSAGE = b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown to this registry"}]}'


class _Registry(BaseHTTPRequestHandler):
    """``/v2/``: 200; a manifest: ``status`` (a 302 to a missing one for "redirect"); the body of the answer named by
    ``big`` is MESSAGE followed by BIG bytes of spaces (still that JSON document, read whole or cut)."""

    protocol_version = "HTTP/1.1"
    big, status, sent = None, 404, None

    def log_message(self, *args):
        pass

    def do_GET(self):
        ping = self.path == "/v2/"
        status = 200 if ping else 404 if self.path.endswith("/gone") else self.status
        big = (self.big == "ping") == ping and not self.path.endswith("/gone")
        self.send_response(status)
        if status == 302:
            self.send_header("Location", "/v2/models/tiny/manifests/gone")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(MESSAGE) + (BIG if big else 0)))
        self.end_headers()
        sent = 0
        try:
            self.wfile.write(MESSAGE)
            for _ in range(BIG // len(BLOCK) if big else 0):
                self.wfile.write(BLOCK)
                sent += len(BLOCK)
        except OSError:  # the client closed the connection: the rest is never sent
            pass
        if big:
            self.sent.append(sent)


def _sent(handler, expected: int, timeout_s: float = 10.0) -> int:
    """How many answers ``handler`` recorded, once it has ``expected`` (or the time is up): a handler thread records
    what it sent when the client's close reaches it, which may be after the pull has returned."""
    import time

    deadline = time.monotonic() + timeout_s
    while len(handler.sent) < expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return len(handler.sent)


def _pull(handler, tmp_path, monkeypatch, sleep):
    """``edgemed pull`` from a registry served by ``handler``, oras's retry sleeping through ``sleep``."""
    import oras.provider  # noqa: F401 - oras.decorator imports in this order only
    import oras.decorator

    monkeypatch.setattr(oras.decorator.time, "sleep", sleep)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    srv = ScriptedServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        return CliRunner().invoke(cli, ["pull", f"oci://127.0.0.1:{srv.server_address[1]}/models/tiny:1"])
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("big, status, says", [
    ("ping", 404, "has no manifest"),
    ("manifest", 404, "has no manifest"),
    ("manifest", 302, "has no manifest"),
    ("manifest", 500, "failed manifest"),
], ids=["ping-body", "404-body", "redirect-body", "500-body-oras-retries"])
def test_a_huge_answer_is_read_to_a_bound_and_the_registrys_message_still_shown(tmp_path, edgemed_home, monkeypatch,
                                                                                big, status, says):
    handler = type("Handler", (_Registry,), {"big": big, "status": status, "sent": []})
    r = _pull(handler, tmp_path, monkeypatch, lambda s: None)  # oras retries a 500 five times, sleeping ~2 min
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert says in r.output and f"HTTP {404 if status == 302 else status}" in r.output, r.output
    if big != "ping":  # an error's message is read (and parsed) from its first bytes
        assert "manifest unknown to this registry" in r.output, r.output
    tries = 6 if status == 500 else 1  # a first try and oras's five retries
    assert _sent(handler, tries) == tries, handler.sent
    assert max(handler.sent) < 16 << 20, handler.sent  # was: all BIG bytes of every answer read into memory


def test_an_answer_the_caller_streams_is_left_to_it_and_an_error_is_cut(monkeypatch):
    """The hook reads nothing of a 2xx the caller streams (a blob: read to its own bound), and at most
    MAX_ANSWER_BYTES of anything else."""
    import io

    import requests
    import urllib3

    def answer(status: int) -> requests.Response:
        r = requests.Response()
        r.status_code, r.url = status, "http://registry/v2/x"
        r.raw = urllib3.HTTPResponse(io.BytesIO(b"x" * (1 << 20)), preload_content=False)
        return r

    blob = oci.bounded_body(answer(200), stream=True)
    assert blob.raw.tell() == 0 and len(blob.raw.read()) == 1 << 20
    for status, stream in ((404, True), (500, False)):
        cut = oci.bounded_body(answer(status), stream=stream)
        assert cut.content == b"x" * oci.MAX_ANSWER_BYTES and cut.raw.closed
    with pytest.raises(oci.answer_too_long(), match="over"):  # a 2xx no caller streams: cut, and an error at once
        oci.bounded_body(answer(200), stream=False)


class _TokenRegistry(BaseHTTPRequestHandler):
    """Token auth whose token service answers 200 with BIG bytes: no token is that long, and asking again gets the
    same answer."""

    protocol_version = "HTTP/1.1"
    sent = None

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/token"):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(BIG))
            self.end_headers()
            sent = 0
            try:
                for _ in range(BIG // len(BLOCK)):
                    self.wfile.write(BLOCK)
                    sent += len(BLOCK)
            except OSError:
                pass
            self.sent.append(sent)
            return
        port = self.server.server_address[1]
        self.send_response(401)
        self.send_header("WWW-Authenticate", f'Bearer realm="http://127.0.0.1:{port}/token",service="reg",'
                                             'scope="repository:models/tiny:pull"')
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_a_token_answer_over_the_bound_fails_at_once_without_oras_retrying(tmp_path, edgemed_home, monkeypatch):
    """A 2xx cut at MAX_ANSWER_BYTES cannot be parsed and asking again gets the same bytes: oras's retry slept about
    two minutes on it before a traceback-free but late error."""
    slept = []
    handler = type("Handler", (_TokenRegistry,), {"sent": []})
    r = _pull(handler, tmp_path, monkeypatch, slept.append)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"over {oci.MAX_ANSWER_BYTES} bytes" in r.output and "not a proxy" in r.output, r.output
    assert slept == [] and _sent(handler, 1) == 1 and handler.sent[0] < 16 << 20, (slept, handler.sent)


class _OversizedOk(BaseHTTPRequestHandler):
    """A web server in a registry's place: GET /v2/ and an upload's PUT answer 2xx with BIG bytes; HEAD of a blob is
    404 and the upload's POST names where to PUT."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _big(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(BIG))
        self.end_headers()
        try:
            for _ in range(BIG // len(BLOCK)):
                self.wfile.write(BLOCK)
        except OSError:
            pass

    def do_GET(self):
        self._big(200)

    def do_HEAD(self):
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(202)
        self.send_header("Location", "/v2/models/tiny/blobs/uploads/1")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_PUT(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._big(201)


@pytest.mark.parametrize("command", ["login", "push"])
def test_an_oversized_2xx_on_login_or_push_is_a_named_error(tmp_path, edgemed_home, monkeypatch, command):
    """oras's push and edgemed's login call the registry outside ``Client.request``: the cut answer's error must
    still be the named one, not a traceback of oras's exception."""
    import bundle_kit
    import oras.provider  # noqa: F401 - oras.decorator imports in this order only
    import oras.decorator

    monkeypatch.setattr(oras.decorator.time, "sleep", lambda s: None)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    srv = ScriptedServer(("127.0.0.1", 0), _OversizedOk)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{srv.server_address[1]}"
    try:
        if command == "login":
            r = CliRunner().invoke(cli, ["login", host, "--username", "u", "--password-stdin"], input="pw\n")
        else:
            src = bundle_kit.inputs(tmp_path / "src")
            bundle = tmp_path / "tiny.edgemed"
            packed = CliRunner().invoke(cli, ["pack", str(src["model"]), "--license", str(src["license"]), "--card",
                                              str(src["card"]), "--name", "tiny", "-o", str(bundle)])
            assert packed.exit_code == 0, packed.output
            r = CliRunner().invoke(cli, ["push", str(bundle), f"oci://{host}/models/tiny:1"])
    finally:
        srv.shutdown()
        srv.server_close()
    assert r.exit_code == 1 and "Traceback" not in r.output and not isinstance(r.exception, AssertionError), r.output
    assert f"over {oci.MAX_ANSWER_BYTES} bytes" in r.output and "not a proxy" in r.output, r.output


class _CutManifest(BaseHTTPRequestHandler):
    """A manifest answer that promises 5000 bytes and sends 21: then closes the connection ("breaks") or goes silent
    (``stall``) until the test lets it go."""

    protocol_version = "HTTP/1.1"
    how, stall = None, None

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        self.send_header("Content-Length", "5000" if self.path != "/v2/" else "2")
        self.end_headers()
        if self.path == "/v2/":
            self.wfile.write(b"{}")
            return
        self.wfile.write(b'{"schemaVersion": 2, ')
        self.wfile.flush()
        if self.how == "stalls":
            self.stall.wait(30)
        self.close_connection = True


@pytest.mark.parametrize("how", ["breaks", "stalls"])
def test_a_manifest_answer_that_breaks_off_or_stalls_is_a_named_error(tmp_path, edgemed_home, monkeypatch, how):
    """Was: urllib3's ProtocolError (or ReadTimeoutError) out of the manifest's read, a traceback."""
    import threading as th

    monkeypatch.setattr(oci.Client, "TIMEOUTS_S", (15, 1))  # a second of silence is a stall here
    stall = th.Event()
    handler = type("Handler", (_CutManifest,), {"how": how, "stall": stall})
    try:
        r = _pull(handler, tmp_path, monkeypatch, lambda s: None)
    finally:
        stall.set()
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit) and "Traceback" not in r.output, (r.exception, r.output)
    assert "manifest" in r.output and "check the network and run the pull again" in r.output, r.output
    assert r.output.count("Error:") == 1 and "\n\n" not in r.output.strip(), r.output  # one paragraph


def test_a_client_resetting_the_scripted_registry_prints_nothing_into_the_commands_output(capsys):
    """The registry the tests script stays quiet when a client resets its kept-alive connection: socketserver's
    traceback went to stderr, into the CLI runner's output, and failed the tests' no-traceback checks at random."""
    srv = ScriptedServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError:
            srv.handle_error(None, ("127.0.0.1", 1))
        assert capsys.readouterr().err == ""
        try:
            raise ValueError("a handler's own bug")
        except ValueError:
            srv.handle_error(None, ("127.0.0.1", 1))
        assert "a handler's own bug" in capsys.readouterr().err  # anything else is still shown
    finally:
        srv.server_close()
