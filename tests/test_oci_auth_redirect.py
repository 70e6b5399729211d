"""Where a registry's credentials go, and how long its tokens serve, against a token registry scripted here
(``registry_kit.TokenRegistry``: no docker-registry needed) holding a bundle pushed with `edgemed push`:

- a blob GET redirected to a storage host that asks for credentials: the registry's password never goes to the token
  service the storage host names (oras fetched a fresh token there with the stored user name and password), and the
  pull fails saying why; a storage host that serves without credentials serves the pull;
- a token service other than the one the registry named on ``/v2/`` gets no credentials either;
- a token that expires mid-pull or mid-push (Distribution and Harbor answer it with 401; oras sent the same token
  again, and the next layer was "refused" with advice to log in) is renewed once; a registry refusing the renewed
  token too still fails with that advice, after one renewal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("oras")

import bundle_kit
import registry_kit

from edgemed.cli import cli

TOKEN_S = 2.0  # how long the scripted registry honours a token in the expiry tests
SLOW_S = 2.5   # how long the GGUF's answer takes there: the next layer's GET comes with an expired token


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> dict:
    """A tiny signed bundle directory and the maker's public key."""
    from edgemed.packaging import signing
    from edgemed.packaging.bundle import PackInputs, pack

    tmp = tmp_path_factory.mktemp("bundle")
    key, pub = bundle_kit.keypair(tmp)
    src = bundle_kit.inputs(tmp / "src")
    out = tmp / "tiny"
    pack(PackInputs(model=src["model"], license=src["license"], card=src["card"], name="tiny"), out, as_dir=True,
         private_key=signing.load_private_key(key))
    man = json.loads((out / "manifest.json").read_text())
    gguf = next(f["sha256"] for f in man["files"] if f["role"] == "model")
    return {"dir": out, "key": pub, "gguf": f"sha256:{gguf}"}


@pytest.fixture
def registry(tmp_path, monkeypatch, edgemed_home):
    """The scripted token registry, logged in to with `edgemed login` (credentials in this test's docker config)."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    reg = registry_kit.TokenRegistry()
    try:
        r = _cli("login", reg.host, "--username", reg.user, "--password-stdin", input=f"{reg.password}\n")
        assert r.exit_code == 0, r.output
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def pushed(registry, bundle):
    r = _cli("push", str(bundle["dir"]), registry.ref("clinic/tiny:1"))
    assert r.exit_code == 0, r.output
    return registry.ref("clinic/tiny:1")


def _cli(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, list(args), input=input)


def _pull(ref: str, bundle: dict):
    return _cli("pull", ref, "--key", str(bundle["key"]))


def _installed(home: Path) -> list[str]:
    d = home / "store" / "models"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_credentials_never_go_to_a_storage_host_the_registry_redirects_to(registry, pushed, bundle, edgemed_home):
    storage = registry_kit.Storage(registry, challenge=True)
    try:
        r = _pull(pushed, bundle)
    finally:
        storage.stop()
    assert storage.seen, "the registry did not redirect the pull"
    assert [auth for _, _, auth in storage.seen if auth] == []  # was: 'Basic <the stored user:password>' on /token
    assert not [path for _, path, _ in storage.seen if path.startswith("/token")]
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    host = storage.base.removeprefix("http://")
    said = r.output.replace("\n", " ")
    assert f"The storage host {host} that the registry {registry.host} redirected to asked for credentials" in said, said
    assert "edgemed sends them only to the registry" in said, said
    assert "Fix:" in r.output and _installed(edgemed_home) == []


def test_a_storage_host_serving_without_credentials_serves_the_pull(registry, pushed, bundle, edgemed_home):
    storage = registry_kit.Storage(registry)
    try:
        r = _pull(pushed, bundle)
    finally:
        storage.stop()
    assert r.exit_code == 0, r.output
    assert {path for _, path, _ in storage.seen} == {f"/blob/{d}" for d in registry.blobs if d != _config(registry)}
    assert [auth for _, _, auth in storage.seen if auth] == []  # requests drops the registry's token on the redirect
    assert _installed(edgemed_home) == ["tiny"]


def _config(registry) -> str:
    """The digest of the ModelPack config blob (pushed, never pulled: the bundle's manifest.json says it all)."""
    (_, body), = [v for (repo, ref), v in registry.manifests.items() if ref == "1"]
    return json.loads(body)["config"]["digest"]


def test_a_token_service_other_than_the_one_the_registry_named_first_gets_no_credentials(registry, pushed, bundle,
                                                                                          edgemed_home):
    other = registry_kit.Storage(registry)  # its /token records what reaches it
    registry.storage = None  # a token service only: blobs are not redirected
    registry.repo_realm = f"{other.base}/token"
    try:
        r = _pull(pushed, bundle)
    finally:
        other.stop()
    assert other.seen == [], other.seen  # was: GET /token with 'Basic <user:password>'
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert registry.realm in r.output and f"{other.base}/token" in r.output, r.output
    assert "edgemed sends credentials only to the first" in r.output.replace("\n", " "), r.output


def test_a_token_that_expires_mid_pull_is_renewed(registry, pushed, bundle, edgemed_home):
    registry.token_s = TOKEN_S
    registry.delay_s[bundle["gguf"]] = SLOW_S
    before, refused = registry.token_requests(), len(registry.refused)
    r = _pull(pushed, bundle)
    assert r.exit_code == 0, r.output  # was: "The registry refused layer 'LICENSE' ... Fix: log in ..."
    # the layer after the GGUF came with the token its GET was given, older than TOKEN_S by then
    assert ("GET", "/v2/clinic/tiny/blobs/" + _digest_of(bundle, "LICENSE")) in registry.refused, registry.refused
    assert registry.token_requests() - before == 1 + len(registry.refused) - refused  # the first, one per expiry
    assert _installed(edgemed_home) == ["tiny"]


def test_a_registry_refusing_the_renewed_token_fails_with_the_login_advice_after_one_renewal(registry, pushed, bundle,
                                                                                              edgemed_home):
    registry.token_s = TOKEN_S
    registry.delay_s[bundle["gguf"]] = SLOW_S
    registry.honoured = len(registry.tokens) + 1  # the pull's first token; a renewed one is refused
    before = registry.token_requests()
    r = _pull(pushed, bundle)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "The registry refused layer '" in r.output and "Fix: log in with an account allowed" in r.output, r.output
    assert registry.token_requests() - before == 2  # one renewal, no loop
    assert _installed(edgemed_home) == []


def test_a_token_that_expires_mid_chunked_push_is_renewed(registry, bundle, monkeypatch):
    from edgemed.packaging import oci_push

    monkeypatch.setattr(oci_push, "CHUNK", 1024)  # the manifest, the signature and the GGUF go up in PATCH chunks
    registry.token_s = TOKEN_S
    registry.delay_s["PATCH"] = 0.35 * TOKEN_S  # the manifest's fourth chunk (or its PUT) comes after the token's end
    r = _cli("push", str(bundle["dir"]), registry.ref("clinic/tiny:1"))
    assert r.exit_code == 0, r.output  # was: "The upload of ... failed (Issue with ...: Unauthorized)"
    assert {m for m, _ in registry.refused} & {"PATCH", "PUT"}, registry.refused  # the upload met the expired token
    assert registry.blobs[bundle["gguf"]] == (bundle["dir"] / _path_of(bundle, bundle["gguf"])).read_bytes()


def _digest_of(bundle: dict, path: str) -> str:
    man = json.loads((bundle["dir"] / "manifest.json").read_text())
    return "sha256:" + next(f["sha256"] for f in man["files"] if f["path"] == path)


def _path_of(bundle: dict, digest: str) -> str:
    man = json.loads((bundle["dir"] / "manifest.json").read_text())
    return next(f["path"] for f in man["files"] if f"sha256:{f['sha256']}" == digest)


def test_a_token_service_refusing_the_stored_login_is_named(registry, pushed, bundle, edgemed_home):
    """The password was changed since `edgemed login` (or while a long pull ran, its renewal refused)."""
    registry.password = "changed-since"
    r = _pull(pushed, bundle)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    said = r.output.replace("\n", " ")
    assert "its token service gave no token for this login" in said, said  # was: "asked for no credentials ..."
    assert f"edgemed login {registry.host}" in said, said
