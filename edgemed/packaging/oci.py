"""Bundles as CNCF ModelPack artifacts in an OCI registry: references, media types, the client, the manifest.

One bundle is one OCI image manifest (``artifactType: application/vnd.cncf.model.manifest.v1+json``):

    config    application/vnd.cncf.model.config.v1+json, filled from the bundle manifest
              (descriptor: name, version, title, vendor, family, createdAt; config: format, paramSize,
              precision, quantization; modelfs: the layers' digests)
    layers    one per bundle file, uncompressed, the file's bundle path in ``org.cncf.model.filepath``:
              the GGUF (or ONNX files) as ``weight.v1.raw``, ``manifest.json`` and templates as
              ``weight.config.v1.raw``, LICENSE, card, report and the signature as ``doc.v1.raw``

A layer's digest is its file's sha256, so two tags whose bundles share a GGUF share one blob in the
registry, and ``pull`` links a blob the store already holds instead of downloading it. The signature
travels as a layer of the same manifest (the CNCF distribution registry 2.8 has no referrers API).

The registry protocol and docker-style credentials (``~/.docker/config.json``, or ``$DOCKER_CONFIG/config.json``
as docker reads it) come from the ``oras`` library; edgemed builds the manifest itself (oras's ``push`` sets no
``artifactType``) and does its own blob GETs (oras's download neither checks the digest nor resumes; see
``oci_pull``).

Everything a registry returns is untrusted: a manifest is bounded in size before it is parsed, and
every descriptor (media type, digest, size, file path) is checked before anything is allocated or
written on its word.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from edgemed.errors import EdgemedError, InputError, IntegrityError, require
from edgemed.formats.nesting import loads_json
from edgemed.packaging.archive import check_bytes
from edgemed.packaging.manifest import (
    MANIFEST,
    MAX_COUNT,
    MAX_FILES,
    SIGNATURES,
    Manifest,
    check_relpath,
    folded,
    max_signature_bytes,
)
from edgemed.packaging.release_order import card_version

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
CONFIG_TYPE = "application/vnd.cncf.model.config.v1+json"
WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_CONFIG_RAW = "application/vnd.cncf.model.weight.config.v1.raw"
DOC_RAW = "application/vnd.cncf.model.doc.v1.raw"
CODE_RAW = "application/vnd.cncf.model.code.v1.raw"
DATASET_RAW = "application/vnd.cncf.model.dataset.v1.raw"
FILEPATH = "org.cncf.model.filepath"
TITLE = "org.opencontainers.image.title"

#: bundle file role (manifest.ROLES) -> layer media type
ROLE_MEDIA = {"model": WEIGHT_RAW, "adapter": WEIGHT_RAW, "template": WEIGHT_CONFIG_RAW, "license": DOC_RAW, "card": DOC_RAW,
              "report": DOC_RAW, "other": DOC_RAW}
#: files at a bundle's root that its manifest does not list -> layer media type (the signatures: the OpenSSF
#: ``model.sig``, and an older edgemed's ``manifest.sig``)
META_MEDIA = {MANIFEST: WEIGHT_CONFIG_RAW, **{name: DOC_RAW for name in SIGNATURES}}
#: layer media types a pull accepts: ModelPack's uncompressed kinds (edgemed never pushes the tar forms)
RAW_MEDIA = frozenset((WEIGHT_RAW, WEIGHT_CONFIG_RAW, DOC_RAW, CODE_RAW, DATASET_RAW))
#: GGUF quantization type -> ModelPack ``precision`` (the rest: ``int<bits>`` from the Q<bits> name)
_FLOAT_PRECISION = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}

MAX_OCI_MANIFEST_BYTES = 4 << 20  # what registries accept (distribution's default limit is 4 MiB)
MAX_CONFIG_BYTES = 1 << 20
#: the most of an answer's body read where the body is only a message (an error, a challenge, a redirect) or a small
#: document asked for whole (a token): a registry sending more is cut there, its connection dropped
MAX_ANSWER_BYTES = 64 << 10
MAX_LAYERS = MAX_FILES + len(META_MEDIA)
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REF = re.compile(r"oci://(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?"
                  rf"/(?P<repo>{_COMPONENT}(?:/{_COMPONENT})*)"
                  r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})|@(?P<digest>sha256:[0-9a-f]{64}))?")
_REF_FORM = "oci://HOST[:PORT]/REPO:TAG or oci://HOST[:PORT]/REPO@sha256:DIGEST (e.g. oci://registry.clinic.local/models/cardio:1.0)"


class RegistryError(EdgemedError):
    """The registry could not be reached, refused a request, or does not hold what was asked for."""


@dataclass(frozen=True)
class Ref:
    """A parsed ``oci://HOST[:PORT]/REPO(:TAG|@sha256:DIGEST)``."""

    host: str        # as written (an IPv6 address keeps its brackets)
    port: int | None
    repo: str
    tag: str | None
    digest: str | None  # "sha256:<hex>"

    @property
    def registry(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    @property
    def reference(self) -> str:
        """What follows ``/manifests/`` in the registry API."""
        return self.digest or self.tag or "latest"

    def at(self, digest: str) -> Ref:
        return Ref(self.host, self.port, self.repo, None, digest)

    def __str__(self) -> str:
        return f"oci://{self.registry}/{self.repo}" + (f"@{self.digest}" if self.digest else f":{self.tag}")

    @property
    def is_loopback(self) -> bool:
        host = self.host.strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def parse_ref(text: str, *, need_tag: bool = False) -> Ref:
    """Parse a registry reference; a tag or a digest is required (``need_tag``: a tag, as ``push`` takes)."""
    m = _REF.fullmatch(text or "")
    if m is None or not (m["tag"] or m["digest"]):
        raise InputError(f"'{text}' is not a registry reference edgemed reads.",
                         f"write {_REF_FORM}; repository names are lower case" + ("" if m is None else "; add :TAG"))
    port = int(m["port"]) if m["port"] else None
    if port is not None and not 0 < port < 65536:
        raise InputError(f"'{text}' names port {port}, which does not exist.", f"write {_REF_FORM}")
    if need_tag and not m["tag"]:
        raise InputError(f"'{text}' names a digest; a push needs a tag.", "push to oci://HOST/REPO:TAG; pull by digest afterwards")
    return Ref(m["host"], port, m["repo"], m["tag"], m["digest"])


def hex_of(digest: str, what: str = "digest") -> str:
    """The hex part of ``sha256:<hex>``; anything else is refused (a registry's answer is untrusted)."""
    m = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if m is None:
        raise IntegrityError(f"The registry gave {what} {str(digest)[:80]!r}, not a sha256 digest.",
                             "edgemed reads sha256 digests only; push the bundle again with `edgemed push`")
    return m[1]


# -- the client ---------------------------------------------------------------------------------
def docker_config() -> Path:
    """Where credentials live, as docker keeps them: ``$DOCKER_CONFIG/config.json`` where that variable is set
    (docker then reads nothing else), ``~/.docker/config.json`` otherwise."""
    folder = os.environ.get("DOCKER_CONFIG")
    return (Path(folder).expanduser() if folder else Path.home() / ".docker") / "config.json"


def read_docker_config(path: Path) -> dict:
    """A docker config file's contents ({} where there is none); anything but a JSON object with an ``auths``
    object is refused, naming the file."""
    if not path.exists():
        return {}
    try:
        cfg = loads_json(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError and TooDeep
        raise InputError(f"{path} is not valid JSON ({exc}).", f"fix or move {path}, then log in again") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("auths", {}), dict):
        raise InputError(f"{path} is not a docker config file (no 'auths' object).", f"fix or move {path}, then log in again")
    return cfg


def token_realm_allowed(realm: str, plain: bool) -> bool:
    """Whether credentials may go to a registry's token service at ``realm``: over HTTPS, or plain HTTP only where
    the registry itself is reached over plain HTTP (a loopback one, or ``--insecure``)."""
    return realm.startswith("https://") or (plain and realm.startswith("http://"))


def bounded_body(r, *args, stream: bool = False, **kwargs):
    """A ``requests`` response hook (and ``Client.fail``'s first step): the body of an answer that is not one edgemed
    streams on purpose (a 2xx asked for with ``stream=True``: a manifest or a blob, each read to its own bound) is
    read here, at most MAX_ANSWER_BYTES of it, before anything parses it. ``Client.fail``, oras's retry on a 500
    (``res.json()``), the redirects requests follows (it reads each one whole) and oras's token requests then find
    those bytes; a longer body is cut there and its connection closed with the rest unread."""
    import http.client

    import requests
    import urllib3

    if r._content_consumed or (stream and 200 <= r.status_code < 300):
        return r
    whole = True
    try:
        body = r.raw.read(MAX_ANSWER_BYTES + 1, decode_content=True) if r.raw is not None else b""
    except (OSError, ValueError, http.client.HTTPException, urllib3.exceptions.HTTPError,
            requests.exceptions.RequestException):  # a body that breaks off is no message: the status is the answer
        body, whole = b"", False
    too_long = len(body) > MAX_ANSWER_BYTES
    if too_long:
        log.debug("HTTP %s from %s: the body is longer than %d bytes; the rest is not read", r.status_code, r.url,
                  MAX_ANSWER_BYTES)
        body, whole = body[:MAX_ANSWER_BYTES], False
    if not whole and r.raw is not None:
        r.raw.close()  # the connection goes, and what is left of the body with it
    r._content, r._content_consumed = body or b"", True
    r.close()
    if too_long and 200 <= r.status_code < 300:  # a token or an upload's answer: cut, it cannot be parsed, and asking
        # again gets the same bytes; oras's retry sleeps about two minutes on any other exception before it gives up
        raise answer_too_long()(f"The registry answered HTTP {r.status_code} to {r.request.method if r.request else ''} "
                                f"{str(r.url)[:200]} with over {MAX_ANSWER_BYTES} bytes, more than such an answer "
                                "holds; edgemed did not read the rest.",
                                f"check that {urlsplit(str(r.url)).netloc or 'the address'} is the registry itself, "
                                "not a proxy or a web page answering in its place")
    return r


@functools.cache
def answer_too_long() -> type:
    """The error of a 2xx answer cut at MAX_ANSWER_BYTES: a RegistryError (named with its fix wherever it surfaces:
    a pull, a push, a login) that is also one of oras's ``AuthenticationException``s, the kind its retry re-raises at
    once (made on first use: oras is imported only where the fleet extra is installed)."""
    import oras.auth

    return type("AnswerTooLong", (RegistryError, oras.auth.AuthenticationException), {"__module__": __name__})


@functools.cache
def credentials_withheld() -> type:
    """The error of a challenge edgemed will not answer with the registry's credentials (a storage host the registry
    redirected to, a token service other than the registry's own): a RegistryError carrying its own fix, and one of
    oras's ``AuthenticationException``s, which its retry re-raises at once."""
    import oras.auth

    return type("CredentialsWithheld", (RegistryError, oras.auth.AuthenticationException), {"__module__": __name__})


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of ``url``, the port filled in for the scheme: what makes two URLs one server."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:  # a port out of range: matches no registry
        port = -1
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


class Client:
    """An ``oras`` registry client for one registry, its scheme and its auth backend chosen by a first ``GET /v2/``.

    TLS unless the host is a loopback address or ``insecure`` is given (plain HTTP on a trusted network)."""

    PING_TIMEOUT_S = 15
    TIMEOUTS_S = (15, 120)  # connect, and silence between two reads: a stalled registry fails (a pull then resumes)

    def __init__(self, ref: Ref, *, insecure: bool = False):
        require("oras.provider", "fleet")  # oras brings requests
        import oras.container
        import oras.provider

        self.ref = ref
        self.plain = insecure or ref.is_loopback
        self.base = f"{'http' if self.plain else 'https'}://{ref.registry}"
        self.realm: str | None = None  # the token service the registry named first (its /v2/ challenge)
        backend = self._ping()
        self.oras = oras.provider.Registry(hostname=ref.registry, insecure=self.plain, tls_verify=True, auth_backend=backend)
        self.oras.session.hooks["response"].append(bounded_body)  # before any request of this session (oras's included)
        # oras sets no timeout on its requests; every request of this session (oras's, and the auth backend's) gets ours
        self.oras.session.request = functools.partial(self.oras.session.request, timeout=self.TIMEOUTS_S)
        self.container = oras.container.Container(f"{ref.registry}/{ref.repo}:{ref.tag or 'latest'}")
        self._guard_auth()
        if backend == "basic":
            self.oras.auth._basic_auth = None
        # the one file docker would read: oras on its own reads ~/.docker/config.json even where DOCKER_CONFIG
        # names another (and then skips reading when its config is already set)
        cfg = read_docker_config(docker_config())
        self.oras.auth._auth_config = {"auths": cfg.get("auths", {}), "credsStore": cfg.get("credsStore"),
                                       "credHelpers": cfg.get("credHelpers", {})}
        self.oras.auth.load_configs(self.container)
        if backend == "basic" and not self.oras.auth._basic_auth:
            raise RegistryError(f"The registry {ref.registry} asks for a user name and password, and {docker_config()} holds none for it.",
                                f"log in first: edgemed login {ref.registry} --username USER --password-stdin")
        if backend == "basic":  # sent with every request, not after a 401 each time (the registry hashes it per request)
            self.oras.session.headers["Authorization"] = f"Basic {self.oras.auth._basic_auth}"

    def _full_realm(self, realm: str | None) -> str:
        """A challenge's realm as oras requests it (oras prefixes its own scheme to one without)."""
        realm = realm or ""
        return realm if not realm or realm.startswith("http") else f"{'http' if self.plain else 'https'}://{realm}"

    def _guard_auth(self) -> None:
        """The rules oras's auth backend does not keep, kept around it:

        - credentials go to a token service (the challenge's realm) over HTTPS only, as ``edgemed login`` requires:
          a registry naming an ``http://`` realm would otherwise receive the user's password in the clear;
        - credentials go to the registry's own token service only: the one its first challenge named (``GET /v2/``),
          and only on a challenge from the registry itself. A blob GET that the registry redirects to a storage host
          (a CDN, S3) carries no credentials there (requests drops them); when that host answers with a challenge of
          its own, oras fetched a fresh token from the realm it named, sending the stored user name and password;
        - a 401 on a request that carried a token asks the token service once more (an expired token: Distribution
          and Harbor answer it with 401, and oras sent the same token again, renewing only on a 403);
        - a 401 or 403 with no challenge this client can answer fails at once, named (oras raised a bare ValueError
          and retried it, sleeping about two minutes, before a traceback)."""
        import oras.auth

        auth, plain, registry = self.oras.auth, self.plain, self.ref.registry
        home = _origin(self.base)

        def realm_checked(fn):
            def call(h, *args, **kwargs):
                realm = self._full_realm(getattr(h, "realm", None))
                if realm and not token_realm_allowed(realm, plain):
                    raise oras.auth.AuthenticationException(
                        f"The registry {registry} names a token service that is not HTTPS ({realm[:80]!r}); "
                        "edgemed sends no credentials there.")
                if realm and self.realm is None:
                    self.realm = realm  # its /v2/ asked for none: the first challenge names the registry's own
                if realm and realm != self.realm:
                    raise credentials_withheld()(
                        f"The registry {registry} named the token service {self.realm[:120]!r} first and now "
                        f"{realm[:120]!r}; edgemed sends credentials only to the first.",
                        "check that the address is the registry itself and not a proxy answering in its place; the "
                        "registry's administrator can tell which token service it uses")
                return fn(h, *args, **kwargs)
            return call

        for name in ("request_token", "request_anonymous_token"):
            if hasattr(auth, name):
                setattr(auth, name, realm_checked(getattr(auth, name)))
        if hasattr(auth, "authenticate_request"):
            answer = auth.authenticate_request

            def authenticate(original, headers, refresh=False):
                if original.headers.get("WWW-Authenticate") and _origin(original.url) != home:
                    where = urlsplit(original.url)
                    raise credentials_withheld()(
                        f"The storage host {where.netloc} that the registry {registry} redirected to asked for "
                        f"credentials (HTTP {original.status_code} to {original.request.method} {where.path[:120]}); "
                        "edgemed sends them only to the registry.",
                        "ask the registry's administrator to have its redirects work without the registry's "
                        "credentials (signed storage links), or to serve blobs itself (Distribution: storage "
                        "redirect disable: true)")
                if original.status_code == 401 and getattr(auth, "token", None):  # held, sent, refused: expired
                    refresh = True
                headers, changed = answer(original, headers, refresh=refresh)
                if not changed:
                    raise oras.auth.AuthenticationException(
                        f"The registry {registry} answered HTTP {original.status_code} to {original.request.method} "
                        f"{original.request.url} and " + ("its token service gave no token for this login."
                                                          if original.headers.get("WWW-Authenticate") else
                                                          "asked for no credentials edgemed can give."))
                return headers, changed

            auth.authenticate_request = authenticate

    def _ping(self) -> str:
        """GET /v2/: reachable, the right scheme, and which auth it asks for ('basic' or 'token')."""
        import requests

        try:  # the status and headers are the answer: the body is never read (the connection is closed with it)
            with requests.get(f"{self.base}/v2/", timeout=self.PING_TIMEOUT_S, stream=True,
                              hooks={"response": bounded_body}) as r:  # a redirect's body too: bounded
                pass
        except requests.exceptions.SSLError as exc:
            raise RegistryError(f"TLS with {self.ref.registry} failed ({_short(exc)}).",
                                "give the registry a certificate this machine trusts; if it serves plain HTTP on a network "
                                "you trust, pass --insecure") from None
        except requests.exceptions.RequestException as exc:
            raise RegistryError(f"Cannot reach the registry {self.base} ({_short(exc)}).",
                                "check the host and port, and that the registry is running and reachable from here") from None
        challenge = r.headers.get("WWW-Authenticate", "")
        if r.status_code == 401 and challenge.lower().startswith("basic"):
            return "basic"
        if r.status_code == 401 and challenge.lower().startswith("bearer"):
            import oras.auth.utils

            self.realm = self._full_realm(oras.auth.utils.parse_auth_header(challenge).realm) or None
        if r.status_code not in (200, 401):
            raise RegistryError(f"{self.base}/v2/ answered HTTP {r.status_code}: not an OCI registry API.",
                                "check the host and port of the registry")
        return "token"

    def url(self, kind: str, reference: str) -> str:
        return f"{self.base}/v2/{self.ref.repo}/{kind}/{reference}"

    def request(self, method: str, url: str, *, headers: dict | None = None, stream: bool = False):
        """One request through oras (which answers the registry's auth challenge); a network error is a RegistryError."""
        import requests

        import oras.auth

        try:
            return self.oras.do_request(url, method, headers=dict(headers or {}), stream=stream)
        except RegistryError:  # named with its own fix (an answer cut at its bound, credentials withheld)
            raise
        except oras.auth.AuthenticationException as exc:
            raise RegistryError(str(exc), "check that the repository exists and that your login may read it "
                                f"(edgemed login {self.ref.registry}); a token service must be served over HTTPS") from None
        except requests.exceptions.RequestException as exc:
            raise RegistryError(f"{method} {url} failed ({_short(exc)}).", "check the network and run the command again") from None

    def fail(self, r, what: str) -> RegistryError:
        """A RegistryError naming what was asked and what the registry said (at most MAX_ANSWER_BYTES of it read)."""
        bounded_body(r)
        try:
            errs = [e.get("message", "") for e in r.json().get("errors", [])][:3]
        except (ValueError, AttributeError, TypeError):  # the body of an error need not be JSON, nor of this shape
            errs = []
        said = f"HTTP {r.status_code}" + (f": {'; '.join(errs)}" if errs else "")
        if r.status_code in (401, 403):
            return RegistryError(f"The registry refused {what} ({said}).",
                                 f"log in with an account allowed to do this: edgemed login {self.ref.registry} --username USER --password-stdin")
        if r.status_code == 404:
            return RegistryError(f"The registry {self.ref.registry} has no {what} ({said}).",
                                 "check the repository and tag (or digest); `edgemed push` puts a bundle there")
        return RegistryError(f"The registry failed {what} ({said}).", "check the registry's log, then run the command again")


def _short(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= 200 else text[:197] + "..."


def login(registry: str, username: str, password: str, *, insecure: bool = False) -> Path:
    """Check the credentials against the registry, then store them in ``docker_config()`` as docker does
    (``auths[registry].auth`` = base64 of ``user:password``, the file readable by its owner only)."""
    require("oras.provider", "fleet")
    import oras.auth.utils as au
    import requests

    from edgemed.files.atomic import atomic_path

    ref = parse_ref(f"oci://{registry}/login:check")
    plain = insecure or ref.is_loopback
    base = f"{'http' if plain else 'https'}://{ref.registry}"
    try:
        r = requests.get(f"{base}/v2/", auth=(username, password), timeout=Client.PING_TIMEOUT_S,
                         hooks={"response": bounded_body})  # the status and headers count: the body is read bounded
        challenge = r.headers.get("WWW-Authenticate", "")
        if r.status_code == 401 and challenge.lower().startswith("bearer"):  # a token service (Harbor, cloud registries)
            h = au.parse_auth_header(challenge)
            realm = h.realm or ""
            if not token_realm_allowed(realm, plain):
                raise RegistryError(f"The registry {ref.registry} names a token service that is not HTTPS ({realm[:80]!r}).",
                                    "ask the registry's administrator to serve the token service over HTTPS")
            r = requests.get(realm, params={"service": h.service or ""}, auth=(username, password), timeout=Client.PING_TIMEOUT_S,
                             hooks={"response": bounded_body})
    except requests.exceptions.RequestException as exc:
        raise RegistryError(f"Cannot reach the registry {base} or its token service ({_short(exc)}).",
                            "check the host and port; pass --insecure only for a registry that serves plain HTTP on a network you trust") from None
    if r.status_code != 200:
        raise RegistryError(f"The registry {ref.registry} refused the user name and password (HTTP {r.status_code}).",
                            "check them with the registry's administrator and log in again")
    shown = docker_config()
    # a link (to a dotfiles folder) is followed as docker follows it: the file it names is replaced, the link stays
    path = Path(os.path.realpath(shown))
    cfg = read_docker_config(path)
    cfg.setdefault("auths", {})[ref.registry] = {"auth": au.get_basic_auth(username, password)}
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with atomic_path(path, force=True) as tmp:
        tmp.touch(mode=0o600)
        tmp.chmod(0o600)
        tmp.write_text(json.dumps(cfg, indent="\t") + "\n", encoding="utf-8")
    return shown


# -- the ModelPack manifest and config ----------------------------------------------------------
def param_size(params: int | None) -> str | None:
    """ModelPack's ``paramSize``: a count with at most one decimal and a scale letter (``134.5M``)."""
    if not isinstance(params, int) or params <= 0:
        return None
    for scale, letter in ((10 ** 15, "Q"), (10 ** 12, "T"), (10 ** 9, "B"), (10 ** 6, "M"), (10 ** 3, "K")):
        if params >= scale:
            return f"{params / scale:.1f}".rstrip("0").rstrip(".") + letter
    return str(params)


def precision(quant: str | None) -> str | None:
    if not isinstance(quant, str):
        return None
    m = re.match(r"I?Q(\d)", quant.upper())
    return _FLOAT_PRECISION.get(quant.upper()) or (f"int{m[1]}" if m else None)


def model_config(man: Manifest, layer_digests: list[str]) -> dict:
    """The ModelPack config JSON for a bundle manifest."""
    m, card = man.model, man.card
    # the version `edgemed list` shows (release_order's one reading), where the card gives it as text: a number is a
    # bundle packed before pack refused them (version = 1.10 unquoted, read as 1.1), so its words ("1.1") are not
    # the release its maker wrote, and ModelPack's descriptor.version is text; it is left out
    version = card_version(man) if isinstance(card.get("version"), str) else None
    descriptor = {"name": man.name, "createdAt": man.created or None, "version": version,
                  "title": _text(card.get("model_name")), "vendor": _text(card.get("developer")), "family": _text(m.get("arch")),
                  "description": _text(card.get("summary"))}
    config = {"format": m.get("format"), "paramSize": param_size(m.get("params")), "precision": precision(m.get("quant")),
              "quantization": m.get("quant")}
    return {"descriptor": {k: v for k, v in descriptor.items() if v},
            "config": {k: v for k, v in config.items() if v},
            "modelfs": {"type": "layers", "diff_ids": list(layer_digests)}}


def _text(value) -> str | None:
    return value if isinstance(value, str) and value else None


def layer(path: str, media_type: str, sha256: str, size: int) -> dict:
    return {"mediaType": media_type, "digest": f"sha256:{sha256}", "size": size, "annotations": {FILEPATH: path, TITLE: path}}


def image_manifest(config_sha256: str, config_size: int, layers: list[dict], man: Manifest) -> dict:
    return {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": f"sha256:{config_sha256}", "size": config_size},
            "layers": layers,
            "annotations": {"org.opencontainers.image.title": man.name, "org.opencontainers.image.created": man.created}
            if man.created else {"org.opencontainers.image.title": man.name}}


@dataclass(frozen=True)
class Layer:
    """One checked layer of a pulled manifest."""

    path: str
    media_type: str
    sha256: str
    size: int


def read_image_manifest(body: bytes, ref: Ref) -> list[Layer]:
    """Check a manifest the registry returned (untrusted) and return its layers, one per bundle file."""
    bad = f"the artifact at {ref} is not an edgemed bundle pushed as a ModelPack artifact"
    fix = "pull an artifact that `edgemed push` made, or push the bundle again"
    try:
        doc = loads_json(body.decode("utf-8"))
    except ValueError as exc:
        raise IntegrityError(f"The manifest of {ref} is not valid JSON ({_short(exc)}).", fix) from None
    if not isinstance(doc, dict):
        raise IntegrityError(f"The manifest of {ref} is not a JSON object.", fix)
    if doc.get("mediaType") != OCI_MANIFEST or doc.get("schemaVersion") != 2:
        raise IntegrityError(f"The manifest of {ref} is {str(doc.get('mediaType'))[:80]!r}, not an OCI image manifest: {bad}.", fix)
    if doc.get("artifactType") != ARTIFACT_TYPE:
        raise IntegrityError(f"The manifest of {ref} has artifactType {str(doc.get('artifactType'))[:80]!r}, "
                             f"not {ARTIFACT_TYPE}: {bad}.", fix)
    config = doc.get("config")
    if not isinstance(config, dict) or config.get("mediaType") != CONFIG_TYPE:
        raise IntegrityError(f"The manifest of {ref} has no ModelPack config ({CONFIG_TYPE}): {bad}.", fix)
    layers = doc.get("layers")
    if not isinstance(layers, list) or not 0 < len(layers) <= MAX_LAYERS:
        raise IntegrityError(f"The manifest of {ref} lists {len(layers) if isinstance(layers, list) else 'no'} layers "
                             f"(1 to {MAX_LAYERS} allowed).", fix)
    out: list[Layer] = []
    seen: set[str] = set()
    for i, d in enumerate(layers):
        if not isinstance(d, dict):
            raise IntegrityError(f"Layer {i} of {ref} is not a JSON object.", fix)
        ann = d.get("annotations")
        path = ann.get(FILEPATH) if isinstance(ann, dict) else None
        if not isinstance(path, str):
            raise IntegrityError(f"Layer {i} of {ref} has no {FILEPATH} annotation: {bad}.", fix)
        path = check_relpath(path, f"layer {i} of {ref}")
        if d.get("mediaType") not in RAW_MEDIA:
            raise IntegrityError(f"Layer '{path}' of {ref} has media type {str(d.get('mediaType'))[:80]!r}; "
                                 "edgemed reads ModelPack's uncompressed (.raw) layers only.", fix)
        size = d.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_COUNT:
            raise IntegrityError(f"Layer '{path}' of {ref} claims size {str(size)[:40]!r} (0 to {MAX_COUNT} bytes allowed).", fix)
        sha = hex_of(d.get("digest"), f"layer '{path}' the digest")
        if folded(path) in seen:  # case- and normalisation-insensitive file systems would write both to one file
            raise IntegrityError(f"Layer '{path}' appears twice in {ref}.", fix)
        seen.add(folded(path))
        out.append(Layer(path, d["mediaType"], sha, size))
    check_bytes(sum(x.size for x in out), f"The artifact {ref}")  # the cap a tar or folder is held to (the pull checks the disk)
    return out


def check_against_bundle(layers: list[Layer], man: Manifest, ref: Ref) -> None:
    """The layers must be exactly the bundle manifest's files (same sha256 and size) plus its root files."""
    fix = "the artifact does not match the bundle it carries; push the bundle again with `edgemed push`"
    by_path = {x.path: x for x in layers}
    for f in man.files:
        x = by_path.get(f.path)
        if x is None:
            raise IntegrityError(f"{ref} has no layer for the bundle file '{f.path}' (sha256 {f.sha256}).", fix)
        if (x.sha256, x.size) != (f.sha256, f.size):
            raise IntegrityError(f"Layer '{f.path}' of {ref} is sha256:{x.sha256} ({x.size} bytes); the bundle manifest "
                                 f"expects sha256:{f.sha256} ({f.size} bytes).", fix)
    listed = {f.path for f in man.files}
    for x in layers:
        if x.path not in listed and x.path not in META_MEDIA:
            raise IntegrityError(f"Layer '{x.path}' of {ref} is not a file of the bundle it carries.", fix)
        if x.path in SIGNATURES and x.size > max_signature_bytes(x.path):
            raise IntegrityError(f"Layer '{x.path}' of {ref} is {x.size} bytes; a signature is at most {max_signature_bytes(x.path)}.", fix)

