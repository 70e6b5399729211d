"""Security defaults of ``edgemed serve``: where it may listen, and who may ask.

* **Bind policy.** The server listens on loopback unless told otherwise; a non-loopback
  address is refused unless API keys are configured (``check_bind``). A host name counts
  as loopback only when every address it resolves to (``/etc/hosts``, no network needed)
  is a loopback address; a name that does not resolve counts as public.
* **API keys.** A key file holds one key per line, optionally after a label
  (``LABEL KEY``); ``#`` starts a comment. Keys are kept only as sha256 digests and a
  presented key is compared with every one of them with ``hmac.compare_digest`` (no early
  exit), so neither the time taken nor the digest length says which key, or how much of
  one, matched. A request is identified in the audit log by its key's *id*: the label, or
  ``key-`` + the first 8 hex digits of the key's sha256 — never the key itself.
* **Admin keys.** ``/admin/`` (adding and removing adapters, which changes every clinician's answers and names
  files on the server) takes only keys of a file of its own (``--admin-key-file``). With API keys and no admin
  keys there are no admin calls (403); with neither, loopback clients only.
* **Metrics keys.** ``/metrics`` (the server's load, and how much each adapter, each specialty, is used) is for
  monitoring: on a server with API keys (or metrics keys) it takes a key of ``--metrics-key-file``, which reads
  ``/metrics`` and nothing else, or an admin key; a clinician's key is refused (403). Without keys, loopback clients
  read it as before.
* **One key, one role.** A key, or a key id, in two of the key files is refused at start (``check_key_roles``).
* **Other web pages.** A page on another origin can make the browser of anyone using this server send it a
  request without asking first (a form post; ``fetch`` in ``no-cors`` mode with a ``text/plain`` body), and a
  browser on the server's machine is a loopback client. Such a request changes things (a generation, an adapter
  load, an audit record) even though the page never reads the answer, so one whose ``Sec-Fetch-Site`` (or, from a
  browser too old to send it, ``Origin``) says it came from another origin is refused unless ``--cors-origin``
  names that origin (``foreign_origin``). Clients that are not browsers send neither header.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from edgemed.errors import InputError

log = logging.getLogger(__name__)

#: Shortest key accepted: 16 characters (e.g. ``secrets.token_urlsafe(32)`` gives 43).
MIN_KEY_CHARS = 16
MAKE_KEY = "python -c 'import secrets; print(secrets.token_urlsafe(32))' >> keys.txt"
#: A key file of 10,000 keys is about half a megabyte; a larger file is the wrong file.
MAX_KEY_FILE_BYTES = 1 << 20


def is_loopback(host: str) -> bool:
    """True when ``host`` (address or name) can only be reached from this machine."""
    text = host.strip("[]")
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(text, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    addrs = {info[4][0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def check_bind(host: str, keys: "ApiKeys | None") -> None:
    """Refuse to listen on a non-loopback address without API keys."""
    if is_loopback(host) or (keys is not None and len(keys)):
        return
    raise InputError(
        f"Refusing to listen on '{host}' without API keys: anyone who can reach this machine could use the model.",
        f"keep the default --host 127.0.0.1, or create a key file ({MAKE_KEY}) and pass --api-key-file keys.txt",
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``, bound now, so a taken port is found before a model loads.

    ``edgemed serve`` hands this socket to uvicorn: no other process can take the port in between.
    """
    import errno

    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise InputError(f"Cannot listen on '{host}': the name does not resolve ({exc}).",
                         "pass --host with an address of this machine, e.g. 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what uvicorn sets; a live listener still blocks
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        where = f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise InputError(f"Port {port} on {host} is already in use (another server is listening there).",
                             f"stop that server, or pick a free port: --port {port + 1 if port < 65535 else 8081}") from None
        if exc.errno == errno.EACCES:
            raise InputError(f"Not allowed to listen on {where} ({exc.strerror}).",
                             "use a port of 1024 or above, e.g. --port 8080") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise InputError(f"Cannot listen on {where}: that address does not belong to this machine.",
                             "pass --host with one of this machine's addresses, or keep 127.0.0.1") from None
        raise InputError(f"Cannot listen on {where}: {exc.strerror or exc}.", "pass another --host or --port") from None
    return sock


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class ApiKeys:
    """Accepted keys as ``(key id, sha256 digest)`` pairs."""

    entries: tuple[tuple[str, bytes], ...]

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def from_lines(cls, lines: list[str], source: str = "the key file") -> "ApiKeys":
        entries: list[tuple[str, bytes]] = []
        seen: set[str] = set()
        for number, raw in enumerate(lines, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) > 2:
                raise InputError(f"{source}: line {number} has {len(parts)} words; expected KEY or LABEL KEY.",
                                 "put one key per line, optionally after a label without spaces")
            label, key = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])
            if len(key) < MIN_KEY_CHARS:
                raise InputError(f"{source}: the key on line {number} is {len(key)} characters; at least "
                                 f"{MIN_KEY_CHARS} are required.", f"generate a strong key: {MAKE_KEY}")
            key_id = label or "key-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]
            if key_id in seen:
                raise InputError(f"{source}: the key id '{key_id}' (line {number}) is used twice.",
                                 "give each key its own label, or remove the duplicate key")
            seen.add(key_id)
            entries.append((key_id, key_digest(key)))
        if not entries:
            raise InputError(f"{source} holds no keys.", f"add one key per line: {MAKE_KEY}")
        return cls(tuple(entries))

    @classmethod
    def from_file(cls, path: Path | str) -> "ApiKeys":
        """Keys from a regular UTF-8 file of at most ``MAX_KEY_FILE_BYTES``."""
        path = Path(path)
        fix = f"create it with one key per line: {MAKE_KEY}"
        try:
            mode = path.stat().st_mode
            if not stat.S_ISREG(mode):  # a FIFO would block, a device would never end
                raise InputError(f"The key file '{path}' is not a regular file.", fix)
            with open(path, "rb") as fh:
                data = fh.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise InputError(f"Cannot read the key file '{path}': {exc.strerror or exc}.", fix) from None
        if len(data) > MAX_KEY_FILE_BYTES:
            raise InputError(f"The key file '{path}' is larger than {MAX_KEY_FILE_BYTES} bytes: it is not a key file.",
                             f"pass the file of keys itself ({MAKE_KEY})")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"The key file '{path}' is not UTF-8 text (byte {exc.start}).",
                             f"write the keys as plain text, one per line: {MAKE_KEY}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("Key file %s is readable by other users; run: chmod 600 %s", path, path)
        return cls.from_lines(text.splitlines(), str(path))

    def overlaps(self, other: "ApiKeys") -> bool:
        """Whether a key is in both sets (compared by digest: the keys themselves are not kept)."""
        return bool({d for _, d in self.entries} & {d for _, d in other.entries})

    def identify(self, presented: str | None) -> str | None:
        """The id of the key ``presented`` matches, or None. Every key is compared, in constant time."""
        if not presented:
            return None
        digest = key_digest(presented)
        found = None
        for key_id, expected in self.entries:
            if hmac.compare_digest(digest, expected):
                found = key_id
        return found


#: The key files, each the keys of one role: a clinician's asks questions, an admin's changes what is served (and may
#: read /metrics), a metrics key reads /metrics alone (a Prometheus scraper's).
KEY_FILES = ("--api-key-file", "--admin-key-file", "--metrics-key-file")
#: (file, file) -> why one key must not be in both: the fix of the refusal at start
ROLE_CLASHES = {
    ("--api-key-file", "--admin-key-file"): "give the admins keys of their own: a clinician's key must not change what "
                                            "is served",
    ("--api-key-file", "--metrics-key-file"): "give the scraper a key of its own: a clinician's key must not read "
                                              "every clinician's load and use of each adapter",
    ("--admin-key-file", "--metrics-key-file"): "give the scraper a key of its own: an admin key also adds and removes "
                                                "adapters (admins need no metrics key: their own keys read /metrics)",
}


def check_key_roles(api_keys: ApiKeys | None, admin_keys: ApiKeys | None, metrics_keys: ApiKeys | None = None) -> None:
    """Refuse a key in two of the key files (``KEY_FILES``), and a key id that names keys in two of them."""
    files = dict(zip(KEY_FILES, (api_keys, admin_keys, metrics_keys)))
    for (one, other), fix in ROLE_CLASHES.items():
        a, b = files[one], files[other]
        if a is None or b is None:
            continue
        if a.overlaps(b):
            raise InputError(f"A key is in both {one} and {other}.", fix)
        shared = sorted({k for k, _ in a.entries} & {k for k, _ in b.entries})
        if shared:
            raise InputError(f"The key id '{shared[0]}' names a key in {one} and another in {other}: the audit log "
                             "could not tell who made a request.", "give each key a label of its own")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header (what OpenAI clients send)."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


#: Methods a browser sends for any page without effects of their own; every other method is checked by origin.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: ``Sec-Fetch-Site`` values of the server's own page, and of a request the user typed or bookmarked.
OWN_FETCH_SITES = frozenset({"same-origin", "none"})


def foreign_origin(method: str, host: str, origin: str | None, fetch_site: str | None,
                   allowed: tuple[str, ...] = (), *, audited: bool = False) -> str | None:
    """The origin of the web page that made a browser send this request when it is not this server's own page
    nor one of ``allowed`` (``--cors-origin``); None when the request may proceed. ``host`` is the ``Host`` header.

    The browser's ``Sec-Fetch-Site`` is read first: it is right behind a proxy that rewrites ``Host``. Without it
    (browsers before 2023), ``Origin`` is compared with ``Host``; a request with neither is not a browser's.
    A GET, HEAD or OPTIONS passes, unless ``audited`` (``/v1/``, ``/admin/``: each one writes an audit record, so a
    page looping ``fetch`` in ``no-cors`` mode would fill the log) and the browser says another site sent it.
    """
    if origin is not None and (origin in allowed or "*" in allowed):
        return None
    if method.upper() in SAFE_METHODS:
        if audited and fetch_site is not None and fetch_site.lower() not in OWN_FETCH_SITES:
            return origin or f"a {fetch_site} page"
        return None
    if fetch_site is not None:
        return None if fetch_site.lower() in OWN_FETCH_SITES else origin or f"a {fetch_site} page"
    if origin is None:
        return None
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        netloc = ""
    return None if netloc and netloc.lower() == host.lower() else origin
