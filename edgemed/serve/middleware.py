"""The two ASGI middlewares of ``edgemed serve`` (plain ASGI, so they see streaming responses to the end).

``Observe`` (outermost) gives each request an id and a ``RequestRecord``, adds the security headers, and when
the response is over — streams included — writes the request metrics and one audit record (``/v1/*``, ``/admin/*``,
and the key refusals of ``/metrics`` and ``KEYED_PATHS`` but not their reads; a refusal that no API key identified within
its client's budget, ``audit.RefusalBudget``, else it is counted).
An exception that escapes the app becomes a 500 in OpenAI's shape here. A client that closes the
connection before its body is all read or its answer all sent (``RequestRecord.client_left``) is recorded
with nginx's 499 and outcome ``client_disconnected``: a client's time-out is not a server error. Nor is a request
the server's own stop cancelled, still running at the end of the grace period (``cli.serve``): it is answered, where
nothing of its answer went out yet, and recorded as a 503 ``unavailable`` to retry (outcome ``cancelled``).

``Guard`` (innermost) refuses, in this order: on loopback binds, a ``Host`` that is not a loopback name (400: DNS
rebinding from a web page); a request with effects (POST, DELETE) that a page on another origin made a
browser send, unless ``--cors-origin`` names that origin and the path is the API's (``CORS_PATHS``) (403;
``security.foreign_origin``); a missing or
wrong API key on ``/v1/*`` and ``/ui/info`` (401); on ``/admin/*`` anything but an admin key (401, 403); on
``/metrics``, where ``ServeConfig.metrics_keyed``, anything but a metrics or admin key (401; a clinician's key,
403); every ``/v1`` and ``/admin`` request once the audit log cannot be written (503, fail closed: after the key
check, so only a caller with a key learns what failed, the log's path with it); a body over the limit (413:
``Content-Length`` first, then the body is read here and counted, so the app only ever sees a bounded,
buffered body); a body not all there ``BODY_TIMEOUT_S`` after the headers (408, and the connection closed).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import anyio
from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect

from edgemed.serve.api import ApiError, error_response
from edgemed.serve.config import ServeConfig
from edgemed.serve.metrics import Metrics
from edgemed.serve.security import bearer_token, foreign_origin, is_loopback

log = logging.getLogger(__name__)

#: Host header values a loopback-bound server answers (anything else: DNS rebinding from a web page)
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]"}
#: Paths outside /v1 that need the API key when the server has keys (the page's own files do not: they hold nothing
#: of the deployment, and the page must load to ask for the key). Their key refusals are audited, their reads are not.
KEYED_PATHS = {"/ui/info"}
#: Prometheus' page: the server's load and each adapter's use, for monitoring. Where the server has keys it takes a
#: metrics key (--metrics-key-file) or an admin key, never a clinician's (``ServeConfig.metrics_keyed``).
METRICS = "/metrics"
#: The error codes of ``/metrics``' key check: these refusals are audited (its scrapes are not: they read counters)
METRICS_REFUSALS = {"invalid_api_key", "metrics_forbidden"}
#: How a scraper sends its key (Prometheus' scrape_config), for the messages of /metrics' refusals
PROMETHEUS_AUTH = "in Prometheus, put the key in a file and set 'authorization: {credentials_file: FILE}' on the job"
#: Seconds a request's body may take to arrive once its headers have (``--max-body`` is 1 MiB by default: a slow
#: link sends that in a second or two); the head itself has ``transport.HEADER_TIMEOUT_S``
BODY_TIMEOUT_S = 30.0
#: The admin calls (adding and removing adapters): the API key when the server has keys, else loopback clients only
ADMIN = "/admin/"
#: Where ``--cors-origin``'s pages are let in (``app.ApiCors``): the OpenAI API. /admin/, /metrics and the page's own
#: data take only this server's page and clients that are not browsers, whatever --cors-origin names.
CORS_PATHS = ("/v1/",)
#: nginx's "client closed request": the client left before its whole request was read or its whole answer sent.
#: Recorded (metrics' code label, the audit's status) in place of any 5xx, so a client's time-out is not a server error.
CLIENT_CLOSED = 499
#: status -> audit outcome, where the handler did not set one
OUTCOMES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 408: "timed_out", 413: "too_large",
            429: "overloaded", CLIENT_CLOSED: "client_disconnected", 503: "unavailable"}


# -- per-request record -------------------------------------------------------------------------------
@dataclass
class RequestRecord:
    """What the audit record and the metrics of one request are made of (never its text, unless opted in)."""

    request_id: str
    endpoint: str
    client: str | None
    started: float = field(default_factory=time.perf_counter)
    status: int | None = None
    key_id: str | None = None
    outcome: str | None = None
    error_code: str | None = None
    template: dict | None = None
    stream: bool | None = None
    finished: object = None  # batcher.Finished
    prompt: str | None = None
    output: str | None = None
    client_closed: bool = False  # the client left before its request was read or its answer sent
    failed_status: int | None = None  # a stream that failed after its 200 headers: the error's status (500, 503)
    answered: bool = False  # a stream's last event before its end marker has been produced
    adapter: str | None = None  # the LoRA adapter the request asked for (its model MODEL:ADAPTER); None: the base
    adapter_sha256: str | None = None  # which weights that name stood for: its file's sha256 (``Stream.adapter``) ...
    adapter_scale: float | None = None  # ... at this scale
    seed: int | None = None  # the sampling seed its generation used (choice i: seed + i)
    accepted: bool = False  # its generation was queued and has an ``accepted`` audit record: its end is always written

    def client_left(self) -> None:
        """The client closed the connection early (body not all sent, or answer not all received): the request
        is recorded as ``CLIENT_CLOSED`` / ``client_disconnected``, whatever status went (or did not go) out."""
        self.client_closed = True
        self.outcome = OUTCOMES[CLIENT_CLOSED]

    @property
    def code(self) -> int:
        """The status the metrics and the audit record: 499 when the client left; a stream that failed after its 200
        headers went out, the error's status (its ``error`` event's); else the one sent (500 if none)."""
        return CLIENT_CLOSED if self.client_closed else self.failed_status or self.status or 500

    @property
    def refused_unidentified(self) -> bool:
        """Refused (4xx, nothing generated) with no API key identified: anyone on the network can send these in a
        loop, so their records are budgeted per client address."""
        return self.key_id is None and not self.accepted and self.finished is None and 400 <= self.code < 500

    def audit_fields(self, model: str, digest: str) -> dict:
        fields = dict(request_id=self.request_id, endpoint=self.endpoint, client=self.client, key_id=self.key_id,
                      model=model, bundle_digest=digest, template=self.template, status=self.code,
                      outcome=self.outcome or self._outcome(), error_code=self.error_code, stream=self.stream,
                      latency_s=round(time.perf_counter() - self.started, 4))
        fields.update(adapter_fields(self))
        if self.seed is not None:
            fields["seed"] = self.seed
        f = self.finished
        if f is not None:
            fields.update(finish_reason=f.finish_reason, prompt_tokens=f.prompt_tokens,
                          completion_tokens=f.completion_tokens, ttft_s=round(f.ttft_s, 4), queue_s=round(f.queue_s, 4))
        if self.prompt is not None:
            fields.update(prompt=self.prompt, output=self.output)
        return fields

    def _outcome(self) -> str:
        code = self.code
        if code < 400:
            return "ok"
        return OUTCOMES.get(code, "bad_request" if code < 500 else "error")


def adapter_fields(record: RequestRecord) -> dict:
    """The audit fields naming the adapter of ``record`` (none for the base): its name, and the sha256 and scale of
    the weights it stood for, so a name removed and added again with another file tells the two apart."""
    if record.adapter is None:
        return {}
    weights = {"adapter_sha256": record.adapter_sha256, "adapter_scale": record.adapter_scale}
    return {"adapter": record.adapter, **{k: v for k, v in weights.items() if v is not None}}


def record_of(scope) -> RequestRecord:
    return scope["state"]["edgemed"]


# -- middleware ----------------------------------------------------------------------------------------
class Observe:
    """Request id, security headers, one audit record per API request, request metrics."""

    def __init__(self, app, *, config: ServeConfig, metrics: Metrics, labels: dict[str, str],
                 patterns: tuple = (), stopping: threading.Event | None = None):
        """``labels``: path -> endpoint label of the metrics and the audit (``routes.LABELS``); ``patterns``:
        (compiled path pattern, label) of the routes with a path parameter (``routes.PATTERNS``); any other path is
        "other", so label values stay few. ``stopping``: set once the server ends the answers still running at a
        stop (``Served.stopping``); a request cancelled from then on was cancelled by the stop."""
        self.app, self.config, self.metrics, self.labels, self.patterns = app, config, metrics, labels, patterns
        self.stopping = stopping

    def label(self, path: str) -> str:
        found = self.labels.get(path)
        if found is None:
            found = next((name for pattern, name in self.patterns if pattern.match(path)), "other")
        return found

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        client = scope.get("client")
        record = RequestRecord(uuid.uuid4().hex, self.label(path), client[0] if client else None)
        scope.setdefault("state", {})["edgemed"] = record
        sent = False  # the whole response went out

        async def send_observed(message):
            nonlocal sent
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                sent = True
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = record.request_id
                headers["x-content-type-options"] = "nosniff"
                if path.startswith("/v1/"):
                    headers["cache-control"] = "no-store"  # answers may carry PHI: no proxy or browser cache
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        except ClientDisconnect:  # Starlette's word for a client gone while it read or wrote
            record.client_left()
        except anyio.get_cancelled_exc_class():
            if self.stopping is None or not self.stopping.is_set():
                raise
            # the stop's cancel, the request's end: answered and recorded here, not re-raised into uvicorn's plain
            # 500 and traceback (``cli.serve`` has logged how many requests it cancelled)
            if not sent:
                await _cancelled_by_stop(record, scope, receive, send_observed)
        except Exception:
            log.exception("request %s failed", record.request_id)
            record.outcome, record.client_closed = "error", False  # the server's failure, even if the client left too
            if record.status is not None:  # it failed after its headers went out: the record says 500, not what they said
                record.failed_status = record.failed_status or 500
                record.error_code = record.error_code or "server_error"
            else:
                failed = ApiError(500, f"The server failed on this request; it is logged under request id "
                                  f"{record.request_id}.", "server_error")
                await error_response(failed)(scope, receive, send_observed)
        finally:
            self.metrics.request_done(record.endpoint, record.code, time.perf_counter() - record.started)
            audit = self.config.audit  # a generation it accepted gets its end record after a failure too (its reserve)
            if audit is not None and (not audit.failed or record.accepted) and _audited(path, record):
                fields = record.audit_fields(self.config.model_id, self.config.bundle_digest)
                await _audit(audit, "request", fields, refused=record.refused_unidentified)


async def _cancelled_by_stop(record: RequestRecord, scope, receive, send) -> None:
    """A request the server's stop cancelled, still running at the end of the grace period: the server's doing, a 503
    ``unavailable`` to retry (as the batcher's end of an answer at a stop is), never a server error. A client that had
    left already stays the client's doing (499)."""
    if record.client_closed:
        return
    record.outcome, record.error_code = "cancelled", "unavailable"
    if record.status is None:  # nothing of its answer went out: the client is told
        await error_response(ApiError(503, "The model server is shutting down, and this request was still running at "
                                           "the end of its grace period. Fix: retry when the server is back.",
                                      "server_error", "unavailable", headers={"Retry-After": "5"}))(scope, receive, send)
    else:  # its headers went out: the client is cut off, and the record says 503, not what they said
        record.failed_status = record.failed_status or 503


def _audited(path: str, record: RequestRecord) -> bool:
    """Whether a request gets an audit record: every ``/v1/*`` and ``/admin/*`` one; on ``/metrics`` and
    ``KEYED_PATHS``, a key refused (key guessing leaves a trace wherever a key is asked for)."""
    return path.startswith(("/v1/", ADMIN)) or (path == METRICS and record.error_code in METRICS_REFUSALS) \
        or (path in KEYED_PATHS and record.error_code == "invalid_api_key")


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


async def _audit(audit, kind: str, fields: dict, refused: bool = False) -> None:
    """Append off the event loop (the write fsyncs); shielded, so a cancelled request still leaves its record.
    ``refused``: a refusal no key identified, recorded within its client's budget (``audit.RefusalBudget``)."""
    with anyio.CancelScope(shield=True):
        try:
            if refused:
                await anyio.to_thread.run_sync(lambda: audit.append_refused(**fields))
            else:
                await anyio.to_thread.run_sync(lambda: audit.append(kind, **fields))
        except OSError as exc:
            log.error("audit record of request %s (status %s) not written (%s); refusing API requests until restarted",
                      fields.get("request_id"), fields.get("status"), exc)


class Guard:
    """API key for ``/v1/*`` and ``KEYED_PATHS``, admin key for ``/admin/*``, metrics or admin key for ``/metrics``;
    request bodies larger than the limit are refused (413)."""

    def __init__(self, app, *, config: ServeConfig):
        self.app, self.config = app, config
        self.loopback = config.loopback  # resolved once: a host name is looked up in /etc/hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        record = record_of(scope)
        path = scope["path"]
        headers = dict(scope["headers"])

        async def refuse(err: ApiError):
            record.error_code = err.code
            await error_response(err)(scope, receive, send)

        if self.loopback:
            host = headers.get(b"host", b"").decode("latin-1").lower()
            host = host[:host.index("]") + 1] if host.startswith("[") and "]" in host else host.split(":")[0]
            if host not in LOOPBACK_HOSTS | {self.config.host.lower()}:
                return await refuse(ApiError(400, f"This server answers only requests addressed to it by a loopback "
                                                  f"name (Host: 127.0.0.1 or localhost), not '{host}'. Fix: use "
                                                  "http://127.0.0.1:PORT/v1.", code="invalid_host"))
        foreign = foreign_origin(scope["method"], headers.get(b"host", b"").decode("latin-1"),
                                 _text(headers.get(b"origin")), _text(headers.get(b"sec-fetch-site")),
                                 self.config.cors_origins if path.startswith(CORS_PATHS) else (),
                                 audited=path.startswith(("/v1/", ADMIN)))
        if foreign is not None:
            return await refuse(ApiError(403, f"This server does not act on requests that a web page on another origin "
                                              f"({foreign}) makes a browser send. Fix: use the page this server serves "
                                              "or a client that is not a browser, or start the server with "
                                              "--cors-origin naming that page's origin.", code="cross_origin_forbidden"))
        keys = self.config.api_keys
        if path.startswith(ADMIN):  # who may change what is served: admin keys, never a clinician's key
            admins = self.config.admin_keys
            if admins is not None:
                record.key_id = admins.identify(bearer_token(headers.get(b"authorization", b"").decode("latin-1")))
                if record.key_id is None:
                    return await refuse(ApiError(401, "Admin calls need a key from the server's --admin-key-file. Fix: "
                                                      "send 'Authorization: Bearer ADMIN_KEY'.", code="invalid_api_key",
                                                 headers={"WWW-Authenticate": "Bearer"}))
            elif keys is not None:
                return await refuse(ApiError(403, "Admin calls need an admin key, and this server has none: the keys of "
                                                  "--api-key-file ask questions, they do not change what is served. "
                                                  "Fix: restart the server with --admin-key-file.", code="admin_forbidden"))
            elif not (self.loopback and record.client and is_loopback(record.client)):
                return await refuse(ApiError(403, "Admin calls without API keys are taken from this machine only. Fix: "
                                                  "call from the server's own host, or start it with --admin-key-file.",
                                             code="admin_forbidden"))
        elif path == METRICS and self.config.metrics_keyed:  # monitoring: a metrics or an admin key, not a clinician's
            refused = self._metrics_key(record, bearer_token(headers.get(b"authorization", b"").decode("latin-1")))
            if refused is not None:
                return await refuse(refused)
        elif keys is not None and (path.startswith("/v1/") or path in KEYED_PATHS):
            record.key_id = keys.identify(bearer_token(headers.get(b"authorization", b"").decode("latin-1")))
            if record.key_id is None:
                return await refuse(ApiError(401, "Missing or incorrect API key. Fix: send 'Authorization: Bearer KEY' "
                                                  "with a key from the server's --api-key-file.", code="invalid_api_key",
                                             headers={"WWW-Authenticate": "Bearer"}))
        audit = self.config.audit
        # every audited call, once its key passed: the message names the log's path (the home folder, the model)
        if audit is not None and audit.failed and path.startswith(("/v1/", ADMIN)):
            return await refuse(ApiError(503, f"The audit log cannot be written ({audit.failed}), so requests are "
                                              "refused. Fix: free disk space or repair the log's storage, then restart "
                                              "the server.", "server_error", "audit_unavailable"))
        limit = self.config.max_body_bytes
        too_large = ApiError(413, f"The request body is larger than the server's limit of {limit} bytes. Fix: shorten "
                                  "the request, or start the server with a larger --max-body.", code="request_too_large")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await refuse(too_large)
        body, more = bytearray(), True
        with anyio.move_on_after(BODY_TIMEOUT_S) as reading:
            while more:  # read the (bounded) body here, so the app never sees more than the limit
                message = await receive()
                if message["type"] != "http.request":
                    return record.client_left()  # the client closed the connection before sending its whole body
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    return await refuse(too_large)
        if reading.cancelled_caught:  # a client holding the request open: the connection goes with the answer
            return await refuse(ApiError(408, f"The request body did not arrive within {BODY_TIMEOUT_S:g} s. Fix: send "
                                              "the whole body at once, as HTTP clients do.", code="request_timeout",
                                         headers={"Connection": "close"}))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _metrics_key(self, record: RequestRecord, token: str | None) -> ApiError | None:
        """Who may read ``/metrics``: a key of --metrics-key-file or --admin-key-file (its id goes on the record), else
        the refusal: 403 for a clinician's key (named in the audit record), 401 for a missing or unknown one."""
        config = self.config
        found = {name: keys.identify(token) if keys is not None else None
                 for name, keys in (("metrics", config.metrics_keys), ("admin", config.admin_keys),
                                    ("clinician", config.api_keys))}  # every set compared: no early exit
        record.key_id = found["metrics"] or found["admin"]
        if record.key_id is not None:
            return None
        if config.metrics_keys is None and config.admin_keys is None:
            fix = ("restart the server with --metrics-key-file (keys that read /metrics and nothing else) and scrape "
                   f"with one of its keys; {PROMETHEUS_AUTH}")
        else:
            fix = f"scrape with a key from the server's --metrics-key-file (or --admin-key-file); {PROMETHEUS_AUTH}"
        if found["clinician"] is not None:
            record.key_id = found["clinician"]
            return ApiError(403, "/metrics shows the server's load and how much each adapter (each specialty) is used: "
                                 "it is for monitoring, and a clinician's key from --api-key-file does not read it. "
                                 f"Fix: {fix}.", code="metrics_forbidden")
        return ApiError(401, "Missing or incorrect key for /metrics: it takes a key of the server's --metrics-key-file "
                             f"or --admin-key-file, sent as 'Authorization: Bearer KEY'. Fix: {fix}.",
                        code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
