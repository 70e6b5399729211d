"""What one ``edgemed serve`` process is told: identity of the model, limits, security, audit.

Building a ``ServeConfig`` applies the bind policy (``security.check_bind``), so no code
path can produce a server on a public address without API keys.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from edgemed.errors import InputError
from edgemed.serve.audit import AuditLog
from edgemed.serve.security import ApiKeys, check_bind, check_key_roles, is_loopback

#: Largest request body accepted (bytes): a long clinical note is ~50 KB; 1 MiB leaves room.
MAX_BODY_BYTES = 1 << 20
#: max_tokens when a chat request names none (OpenAI's own default is "until the context is full").
DEFAULT_MAX_TOKENS = 512


#: ``--prefix-cache-scope``: "key", requests reuse the prompt KV of requests with the same API key only; "shared": all.
PREFIX_CACHE_SCOPES = ("key", "shared")


def check_options(host: str, api_keys: ApiKeys | None, admin_keys: ApiKeys | None, max_body_bytes: int,
                  prefix_cache_scope: str, cors_origins: tuple[str, ...], metrics_keys: ApiKeys | None = None) -> None:
    """The rules a ``ServeConfig`` is built under; the CLI applies them before it creates the audit log or loads."""
    check_bind(host, api_keys)
    if max_body_bytes < 1024:
        raise InputError(f"--max-body {max_body_bytes} is too small for any request.", "pass at least 1024 bytes")
    check_key_roles(api_keys, admin_keys, metrics_keys)
    if prefix_cache_scope not in PREFIX_CACHE_SCOPES:
        raise InputError(f"Unknown prefix cache scope '{prefix_cache_scope}'.", f"use one of {', '.join(PREFIX_CACHE_SCOPES)}")
    for origin in cors_origins:
        check_origin(origin)
    if "*" in cors_origins and api_keys is None:
        raise InputError("--cors-origin '*' without API keys would let any web page use the model.",
                         "name the exact origins (https://ehr.example.org), or add --api-key-file")


def check_origin(origin: str) -> None:
    """One ``--cors-origin`` value: ``*``, or an origin exactly as a browser sends it in its ``Origin`` header
    (``scheme://host[:port]``, lower case, no path). Anything else would never match a request, and the 403 pages get
    would not say why; ``null`` is what every ``file://`` document and every sandboxed frame of any site sends."""
    if origin == "*":
        return
    if origin.strip().lower() == "null":
        raise InputError("--cors-origin null would let every HTML file opened on this computer (an e-mail attachment) "
                         "and every sandboxed frame of any web site use the model: browsers send 'null' for all of them.",
                         "serve the page from a web server and name its origin (https://ehr.example.org)")
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise InputError(f"--cors-origin '{origin}' is not a web page's origin.",
                         "name it as scheme://host[:port], as the browser's address bar shows it "
                         "(https://ehr.example.org)")
    host = _browser_host(origin, parts.hostname)
    default = {"http": 80, "https": 443}[parts.scheme.lower()]  # a browser leaves the scheme's own port out
    exact = f"{parts.scheme.lower()}://{host}" + (f":{port}" if port not in (None, default) else "")
    if parts.username is not None or parts.password is not None or parts.path not in ("", "/") or parts.query \
            or parts.fragment or origin != exact:
        raise InputError(f"--cors-origin '{origin}' would never match: a browser sends a page's origin as "
                         "scheme://host[:port], without a path, a slash at the end, capitals or the scheme's own port.",
                         f"pass --cors-origin {exact}")


def _browser_host(origin: str, host: str) -> str:
    """``host`` (urlsplit's, lower case) as a browser writes it in ``Origin``: an IPv6 address compressed in brackets,
    an internationalised name in its ASCII (punycode) form."""
    if ":" in host:
        if "%" in host:
            raise InputError(f"--cors-origin '{origin}' names an IPv6 zone, which a browser never sends in an origin.",
                             "name the page's origin without the zone (%...), or by a host name")
        try:
            return f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError:
            raise InputError(f"--cors-origin '{origin}' is not a web page's origin: '{host}' is no IPv6 address.",
                             "name it as scheme://host[:port] (http://[::1]:8080)") from None
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        raise InputError(f"--cors-origin '{origin}' is not a web page's origin: '{host}' is not a host name.",
                         "name it as scheme://host[:port], as the browser's address bar shows it "
                         "(https://ehr.example.org)") from None


@dataclass(frozen=True)
class ServeConfig:
    model_id: str                          # the name clients pass as "model" (bundle name, or file stem)
    bundle_digest: str                     # manifest sha256 (bundle) or model file sha256, for the audit log
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: ApiKeys | None = None        # None: no authentication (allowed on loopback only)
    #: keys for /admin/ (adding and removing adapters); None: with api_keys, no admin calls at all; without, loopback only
    admin_keys: ApiKeys | None = None
    #: keys that read /metrics and nothing else (a Prometheus scraper's); admin keys read it too. /metrics needs one of
    #: them when the server has api_keys or metrics_keys (``metrics_keyed``); a server without keys serves it as is.
    metrics_keys: ApiKeys | None = None
    cors_origins: tuple[str, ...] = ()     # empty: no CORS headers at all (browsers on other origins get nothing)
    max_body_bytes: int = MAX_BODY_BYTES
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    max_tokens_limit: int | None = None    # None: whatever fits the slot's context
    audit: AuditLog | None = None          # None: no audit log (the CLI always opens one)
    ui: bool = True                        # the clinician page at / (``page.py``); see ``page_enabled``
    card: dict = field(default_factory=dict)  # the bundle's model card (manifest "card"); empty for a plain file
    #: who reuses whose prompt prefixes: "key" (requests of one API key only) or "shared" (every request);
    #: a request's ``cache_salt`` narrows it further (``generate.scope_of``)
    prefix_cache_scope: str = "key"
    #: ``--think-cap``: at most this many tokens of a reasoning model's ``<think>`` block in a chat answer, then the
    #: answer is asked for (``serve.thought``); a request's ``think_cap`` overrides it. None: no cap.
    think_cap: int | None = None
    #: NAME of an installed adapter for this base -> ``loader.AdapterSpec`` (verified, trust policy applied, with the
    #: sha256 its file was verified as), or ``AdapterNotFound``, for ``POST /admin/adapters {"adapter": NAME}``; the
    #: CLI passes ``packaging.ref.adapter_specs`` for the model, names only.
    resolve_adapter: object = field(default=None, compare=False)
    #: (served AdapterSpecs, the new AdapterSpec, the removed ones still loaded for running requests) -> None, or an
    #: ``EdgemedError``: the checks an adapter added while serving must pass before it loads (``session.admit_adapter``:
    #: base, memory plan, host self-test); None: none.
    admit_adapter: object = field(default=None, compare=False)
    #: AdapterSpec -> None, or an ``IntegrityError``: once an adapter added while serving is loaded, and before any
    #: request can name it (``Batcher.add_adapter``'s check), whether its file is still the one its bundle was verified
    #: as (``packaging.ref.loaded_as_verified``; a file given by path has nothing to compare); None: no check
    loaded_adapter: object = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_options(self.host, self.api_keys, self.admin_keys, self.max_body_bytes, self.prefix_cache_scope,
                      self.cors_origins, self.metrics_keys)
        if self.think_cap is not None and (isinstance(self.think_cap, bool) or not isinstance(self.think_cap, int)
                                           or self.think_cap < 1):
            raise InputError(f"--think-cap {self.think_cap} is not a number of tokens.",
                             "pass --think-cap N with N a whole number of 1 or more, or leave it out (no cap)")

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def metrics_keyed(self) -> bool:
        """Whether /metrics needs a metrics or admin key: on a server with API keys (a clinician's key is not one),
        or with --metrics-key-file; a server without keys (loopback only) serves it to its clients as before."""
        return self.api_keys is not None or self.metrics_keys is not None

    @property
    def page_enabled(self) -> bool:
        """The page is served unless ``--no-ui``, and never off loopback without keys (anyone on the network
        could use it; ``check_bind`` refuses that bind today, this keeps the page off should it ever be allowed)."""
        return self.ui and (self.loopback or self.api_keys is not None)
