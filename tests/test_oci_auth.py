"""A registry's authentication answers, from small registries served here (no docker-registry needed):

- a TLS registry whose token challenge names a plain-HTTP token service: the stored credentials are never sent there
  (oras would send them; ``edgemed login`` already refused such a service);
- a 401 or 403 with no challenge: one clear error at once (oras raised a bare ValueError after about two minutes of
  retries).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

pytest.importorskip("oras")

import registry_kit  # noqa: E402
from edgemed.cli import cli  # noqa: E402


class _Registry(BaseHTTPRequestHandler):
    """GET /v2/: 200 where there is no ``challenge``; anything else, and /v2/ where there is one: ``status`` with the
    ``challenge`` header (a token registry challenges every request without a token)."""

    status, challenge, seen = 403, None, None

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("Authorization")))
        if self.path == "/v2/" and not self.challenge:
            self.send_response(200)
        else:
            self.send_response(self.status)
            if self.challenge:
                self.send_header("WWW-Authenticate", self.challenge)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_HEAD = do_GET


def _serve(host: str, handler, tls: ssl.SSLContext | None = None) -> ThreadingHTTPServer:
    srv = registry_kit.ScriptedServer((host, 0), handler)
    if tls is not None:
        srv.socket = tls.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _handler(**attrs):
    return type("Handler", (_Registry,), {"seen": [], **attrs})


def _pull(ref: str):
    return CliRunner().invoke(cli, ["pull", ref])


def test_a_401_or_403_without_a_challenge_fails_at_once_and_names_the_answer(edgemed_home):
    for status in (401, 403):
        handler = _handler(status=status)
        srv = _serve("127.0.0.1", handler)
        try:
            start = time.monotonic()
            r = _pull(f"oci://127.0.0.1:{srv.server_address[1]}/models/tiny:1")
            assert time.monotonic() - start < 30  # no two minutes of retries
            assert r.exit_code == 1 and "Traceback" not in r.output, r.output
            assert f"answered HTTP {status}" in r.output and "asked for no credentials" in r.output
            assert "Fix: check that the repository exists" in r.output
        finally:
            srv.shutdown()


def _self_signed(tmp_path, ip: str) -> tuple:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
            .sign(key, hashes.SHA256()))
    crt, pem = tmp_path / "tls.crt", tmp_path / "tls.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


def test_credentials_never_go_to_a_plain_http_token_service(tmp_path, edgemed_home, monkeypatch):
    ip = registry_kit.lan_address()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to serve a TLS registry on")
    crt, pem = _self_signed(tmp_path, ip)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(crt, pem)
    token = _serve("127.0.0.1", _handler(status=200))  # the plain-HTTP token service: it records what reaches it
    realm = f"http://127.0.0.1:{token.server_address[1]}/token"
    registry = _serve(ip, _handler(status=401, challenge=f'Bearer realm="{realm}",service="reg"'), tls)
    host = f"{ip}:{registry.server_address[1]}"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(crt))  # the registry's certificate is trusted: TLS itself is fine
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    (tmp_path / "docker").mkdir()
    secret = base64.b64encode(b"clinic-it:s3cret").decode()
    (tmp_path / "docker" / "config.json").write_text(json.dumps({"auths": {host: {"auth": secret}}}))
    try:
        r = _pull(f"oci://{host}/models/tiny:1")
        assert r.exit_code == 1 and "names a token service that is not HTTPS" in r.output, r.output
        assert realm in r.output and "Traceback" not in r.output
        assert token.RequestHandlerClass.seen == []  # not one request, so no password, reached it
        r = CliRunner().invoke(cli, ["login", host, "--username", "clinic-it", "--password-stdin"], input="s3cret\n")
        assert r.exit_code == 1 and "not HTTPS" in r.output and token.RequestHandlerClass.seen == []
    finally:
        registry.shutdown()
        token.shutdown()
