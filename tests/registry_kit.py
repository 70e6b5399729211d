"""A real CNCF distribution registry (Debian's ``docker-registry``, 2.8) for the tests, on 127.0.0.1 (or ``ip``).

``Registry.start(folder)`` writes a config in ``folder`` (filesystem storage there, the access log to a
file), starts ``/usr/bin/docker-registry serve`` on a free port and waits until ``GET /v2/`` answers.
``htpasswd`` (a file from ``htpasswd_line``) turns on basic auth. ``stop()`` ends the process it started.

``TokenRegistry`` is a registry scripted in this process (token auth, short-lived tokens, slow answers) and
``Storage`` the blob host it may redirect to: for the answers a real registry cannot be made to give.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BINARY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
_ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) (?P<bytes>\d+|-)')


def missing_reason() -> str | None:
    """Why the registry cannot run here (None when it can)."""
    if not (os.path.isfile(BINARY) and os.access(BINARY, os.X_OK)):
        return (f"the CNCF distribution registry is not installed ({BINARY} not found): "
                "apt-get install docker-registry (Debian), as .ci/run does")
    return None


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def lan_address() -> str | None:
    """This machine's IPv4 address on its default route (not loopback), or None (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("198.51.100.1", 9))  # TEST-NET-2: only the route is looked up
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


@dataclass
class Registry:
    folder: Path
    port: int
    proc: subprocess.Popen
    log_path: Path
    ip: str = "127.0.0.1"

    @property
    def host(self) -> str:
        return f"{self.ip}:{self.port}"

    def ref(self, repo_tag: str) -> str:
        return f"oci://{self.host}/{repo_tag}"

    @property
    def storage(self) -> Path:
        return self.folder / "data" / "docker" / "registry" / "v2"

    def blob_file(self, hex_digest: str) -> Path:
        return self.storage / "blobs" / "sha256" / hex_digest[:2] / hex_digest / "data"

    def blobs(self) -> list[str]:
        root = self.storage / "blobs" / "sha256"
        return sorted(p.name for p in root.glob("*/*") if (p / "data").is_file()) if root.is_dir() else []

    def access(self) -> list[dict]:
        """The access log so far: one dict per request (method, path, status, bytes sent)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = _ACCESS.search(line)
            if m:
                out.append({"method": m["method"], "path": m["path"], "status": int(m["status"]),
                            "bytes": 0 if m["bytes"] == "-" else int(m["bytes"])})
        return out

    @classmethod
    def start(cls, folder: Path, *, htpasswd: Path | None = None, ip: str = "127.0.0.1") -> Registry:
        folder.mkdir(parents=True, exist_ok=True)
        port = _free_port(ip)
        auth = (f"auth:\n  htpasswd:\n    realm: edgemed-tests\n    path: {htpasswd}\n" if htpasswd else "")
        config = folder / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {folder / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {ip}:{port}\n  secret: edgemed-tests-only\n" + auth)
        log_path = folder / "registry.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([BINARY, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        reg = cls(folder, port, proc, log_path, ip)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://{reg.host}/v2/", timeout=1).close()
                return reg
            except urllib.error.HTTPError:  # 401 with auth on: it is up
                return reg
            except OSError:
                time.sleep(0.05)
        reg.stop()
        raise RuntimeError(f"docker-registry did not answer on {reg.host} within 20 s: {log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def htpasswd_line(user: str, password: str) -> str | None:
    """A bcrypt htpasswd line (the registry reads only bcrypt), or None where this Python cannot make one."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt  # the C library's bcrypt; the module is gone from Python 3.13
        except ImportError:
            return None
        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))  # cost 4: a test account
    return f"{user}:{hashed}" if hashed and hashed.startswith("$2") else None


class ScriptedServer(ThreadingHTTPServer):
    """A scripted registry (the tests' own handler). A client that closes or resets a kept-alive connection once it
    has its answer is no error of the registry's: socketserver would print a traceback to stderr, which the CLI
    runner captures into the command's output, where the tests look for tracebacks of edgemed's own."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


# -- a scripted token registry and the storage it may redirect to ------------------------------------------------
_UPLOAD = re.compile(r"/v2/(?P<repo>.+)/blobs/uploads/(?P<id>[0-9a-f]*)")
_BLOB = re.compile(r"/v2/(?P<repo>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})")
_MANIFEST = re.compile(r"/v2/(?P<repo>.+)/manifests/(?P<ref>[^/]+)")


class _Answering(BaseHTTPRequestHandler):
    """HTTP/1.1 with kept-alive connections, every answer sized, nothing logged."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _answer(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _route(self) -> None:
        raise NotImplementedError

    do_GET = do_HEAD = do_POST = do_PATCH = do_PUT = lambda self: self._route()


def _error(code: str, message: str) -> bytes:
    import json

    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


class _TokenHandler(_Answering):
    def _route(self) -> None:
        from urllib.parse import parse_qs, urlsplit

        reg: TokenRegistry = self.server.script
        url = urlsplit(self.path)
        body = self._body()  # read before any answer: a refused upload's bytes leave the connection usable
        reg.seen.append((self.command, url.path, self.headers.get("Authorization")))
        if url.path == "/token":
            return self._token()
        pushing = self.command not in ("GET", "HEAD")
        m = _UPLOAD.fullmatch(url.path) or _BLOB.fullmatch(url.path) or _MANIFEST.fullmatch(url.path)
        scope = f"repository:{m['repo']}:{'pull,push' if pushing else 'pull'}" if m else None
        if not self._authorized(scope):
            return
        time.sleep(reg.delay_s.get(self.command if self.command == "PATCH" else url.path.rsplit("/", 1)[-1], 0))
        if url.path == "/v2/":
            return self._answer(200, b"{}", {"Content-Type": "application/json"})
        if m is None:
            return self._answer(404, _error("NAME_UNKNOWN", "no such path"))
        if m.re is _UPLOAD:
            return self._upload(m, body, parse_qs(url.query).get("digest", [None])[0])
        if m.re is _BLOB:
            return self._blob(m["digest"])
        return self._manifest(m["repo"], m["ref"], body)

    def _token(self) -> None:
        import base64
        import json

        reg: TokenRegistry = self.server.script
        expected = "Basic " + base64.b64encode(f"{reg.user}:{reg.password}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            return self._answer(401, _error("UNAUTHORIZED", "wrong user name or password"))
        token = f"token-{len(reg.tokens)}"
        reg.tokens[token] = time.monotonic()
        self._answer(200, json.dumps({"token": token, "expires_in": reg.token_s}).encode(),
                     {"Content-Type": "application/json"})

    def _authorized(self, scope: str | None) -> bool:
        """A token this registry issued, honours (``honoured``) and has not seen expire; else 401 and the challenge."""
        reg: TokenRegistry = self.server.script
        got = self.headers.get("Authorization", "")
        token = got[len("Bearer "):] if got.startswith("Bearer ") else None
        issued = reg.tokens.get(token)
        if issued is not None and time.monotonic() - issued < reg.token_s and (
                reg.honoured is None or list(reg.tokens).index(token) < reg.honoured):
            return True
        realm = reg.repo_realm if scope and reg.repo_realm else reg.realm
        challenge = f'Bearer realm="{realm}",service="scripted-registry"' + (f',scope="{scope}"' if scope else "")
        if issued is not None:
            challenge += ',error="invalid_token"'  # as Distribution answers an expired token
            reg.refused.append((self.command, self.path.split("?", 1)[0]))
        self._answer(401, _error("UNAUTHORIZED", "authentication required"),
                     {"WWW-Authenticate": challenge, "Content-Type": "application/json"})
        return False

    def _upload(self, m, body: bytes, digest: str | None) -> None:
        import hashlib

        reg: TokenRegistry = self.server.script
        if self.command == "POST":
            uid = f"{len(reg.uploads):08x}"
            reg.uploads[uid] = bytearray()
            return self._answer(202, headers={"Location": f"/v2/{m['repo']}/blobs/uploads/{uid}", "Range": "0-0",
                                              "Docker-Upload-UUID": uid})
        data = reg.uploads.get(m["id"])
        if data is None:
            return self._answer(404, _error("BLOB_UPLOAD_UNKNOWN", "no such upload"))
        data += body
        if self.command == "PATCH":
            return self._answer(202, headers={"Location": f"/v2/{m['repo']}/blobs/uploads/{m['id']}",
                                              "Range": f"0-{max(len(data) - 1, 0)}"})
        if digest != "sha256:" + hashlib.sha256(data).hexdigest():
            return self._answer(400, _error("DIGEST_INVALID", "the upload does not match its digest"))
        reg.blobs[digest] = bytes(reg.uploads.pop(m["id"]))
        self._answer(201, headers={"Location": f"/v2/{m['repo']}/blobs/{digest}", "Docker-Content-Digest": digest})

    def _blob(self, digest: str) -> None:
        reg: TokenRegistry = self.server.script
        if digest not in reg.blobs:
            return self._answer(404, _error("BLOB_UNKNOWN", "blob unknown to registry"))
        if reg.storage is not None and self.command == "GET":
            return self._answer(307, headers={"Location": f"{reg.storage.base}/blob/{digest}"})
        self._answer(200, reg.blobs[digest], {"Content-Type": "application/octet-stream",
                                              "Docker-Content-Digest": digest})

    def _manifest(self, repo: str, ref: str, body: bytes) -> None:
        import hashlib

        reg: TokenRegistry = self.server.script
        if self.command == "PUT":
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            kind = self.headers.get("Content-Type", "")
            reg.manifests[(repo, ref)] = reg.manifests[(repo, digest)] = (kind, body)
            return self._answer(201, headers={"Location": f"/v2/{repo}/manifests/{digest}", "Docker-Content-Digest": digest})
        if (repo, ref) not in reg.manifests:
            return self._answer(404, _error("MANIFEST_UNKNOWN", "manifest unknown"))
        kind, data = reg.manifests[(repo, ref)]
        self._answer(200, data, {"Content-Type": kind, "Docker-Content-Digest": "sha256:" + hashlib.sha256(data).hexdigest()})


class TokenRegistry:
    """A registry with token auth as Distribution and Harbor answer, scripted here (no docker-registry needed), on
    127.0.0.1: a request without a token it honours gets 401 and a Bearer challenge naming its token service
    (``/token``: a token for ``user``/``password`` sent as Basic auth, and only then); a token is honoured for
    ``token_s`` seconds, and an expired one gets the same 401 (``error="invalid_token"``). It keeps what is pushed
    (monolithic and chunked uploads; manifests by tag and digest) and serves it back.

    Scripted behaviours, attributes set between requests:
    - ``delay_s``: {a blob digest, or "PATCH"}: seconds its answer waits once the token was accepted (a slow link);
    - ``honoured``: how many of the tokens it issues it honours (None: all), the later ones refused as expired (an
      account whose rights were taken away);
    - ``storage``: a ``Storage`` that blob GETs are redirected to (307), as registries send them to a CDN or S3.

    - ``repo_realm``: the token service its challenges on repository paths name (None: its own, as /v2/ names).

    ``seen``: (method, path, Authorization) of every request; ``refused``: (method, path) of those that carried a
    token it issued and got 401 (expired, or not honoured); ``tokens``: token -> when it was issued."""

    def __init__(self, *, user: str = "clinic-it", password: str = "s3cret", token_s: float = 3600.0):
        self.user, self.password, self.token_s = user, password, token_s
        self.delay_s: dict[str, float] = {}
        self.honoured: int | None = None
        self.storage: Storage | None = None
        self.repo_realm: str | None = None
        self.seen: list[tuple[str, str, str | None]] = []
        self.refused: list[tuple[str, str]] = []
        self.tokens: dict[str, float] = {}
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.uploads: dict[str, bytearray] = {}
        self.server = _serve(_TokenHandler, self)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    @property
    def realm(self) -> str:
        return f"http://{self.host}/token"

    def ref(self, repo_tag: str) -> str:
        return f"oci://{self.host}/{repo_tag}"

    def token_requests(self) -> int:
        return sum(1 for _, path, _ in self.seen if path == "/token")

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _StorageHandler(_Answering):
    def _route(self) -> None:
        import json

        st: Storage = self.server.script
        self._body()
        st.seen.append((self.command, self.path, self.headers.get("Authorization")))
        if self.path.startswith("/token"):  # it hands a token to whoever asks (what it wanted was the password)
            return self._answer(200, json.dumps({"token": "storage-token"}).encode(), {"Content-Type": "application/json"})
        digest = self.path[len("/blob/"):] if self.path.startswith("/blob/") else None
        if st.challenge and not self.headers.get("Authorization"):
            return self._answer(403, b"", {"WWW-Authenticate": f'Bearer realm="{st.base}/token",service="storage"'})
        if digest not in st.registry.blobs:
            return self._answer(404)
        self._answer(200, st.registry.blobs[digest], {"Content-Type": "application/octet-stream"})


class Storage:
    """The blob storage a ``TokenRegistry`` redirects its blob GETs to, served on 127.0.0.1 and named ``localhost``
    there (another host to an HTTP client): ``/blob/<digest>`` answers the registry's blob. With ``challenge``, a
    request without an Authorization header gets 403 and a Bearer challenge naming the storage's own token service
    (which answers anyone), as a host wanting the registry's credentials would. ``seen``: (method, path,
    Authorization) of every request."""

    def __init__(self, registry: TokenRegistry, *, challenge: bool = False):
        self.registry, self.challenge = registry, challenge
        self.seen: list[tuple[str, str, str | None]] = []
        self.server = _serve(_StorageHandler, self)
        registry.storage = self

    @property
    def base(self) -> str:
        return f"http://localhost:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.registry.storage = None
        self.server.shutdown()
        self.server.server_close()


def _serve(handler, script) -> ScriptedServer:
    import threading

    srv = ScriptedServer(("127.0.0.1", 0), handler)
    srv.script = script
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv
