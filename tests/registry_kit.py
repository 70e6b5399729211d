"""A real CNCF distribution registry (Debian's ``docker-registry``, 2.8) for the tests, on 127.0.0.1 (or ``ip``).

``Registry.start(folder)`` writes a config in ``folder`` (filesystem storage there, the access log to a
file), starts ``/usr/bin/docker-registry serve`` on a free port and waits until ``GET /v2/`` answers.
``htpasswd`` (a file from ``htpasswd_line``) turns on basic auth. ``stop()`` ends the process it started.
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
from http.server import ThreadingHTTPServer
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
