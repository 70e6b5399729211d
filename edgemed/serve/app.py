"""The ASGI app of ``edgemed serve``: OpenAI's API over a ``Batcher``, with audit, metrics and limits.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming as SSE or
not), ``GET /v1/models``, ``GET /health``, ``GET /metrics``. Every error, whatever raised
it, leaves in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Middleware, outermost first (plain ASGI, so they see streaming responses to the end):

1. ``Observe`` — gives each request an id, and when the response is over (streams
   included) writes one audit record (``/v1/*``) and the request metrics. An exception
   that escapes the app becomes a 500 in OpenAI's shape here.
2. ``CORSMiddleware`` — only when ``--cors-origin`` names origins; otherwise none, and
   browsers refuse other origins the response.
3. ``Guard`` — 503 for every ``/v1`` request once the audit log cannot be written (fail
   closed); on loopback binds only ``Host: 127.0.0.1 / localhost / [::1]`` (so a web page
   cannot reach the server through DNS rebinding); then the API key (``/v1/*`` and
   ``/metrics``, 401); then the body size limit (413).

A client that disconnects cancels its ``Stream``, which frees the slot before the next
decode step: streaming through Starlette's disconnect listener, non-streaming through a
task that waits for ``http.disconnect`` while the answer is generated.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response, StreamingResponse

from edgemed.errors import ContextOverflow, EdgemedError, InputError, TemplateError
from edgemed.runtime.engine import GenerationSettings
from edgemed.serve import api
from edgemed.serve.config import ServeConfig
from edgemed.serve.metrics import Metrics
from edgemed.serve.security import bearer_token
from edgemed.templates import load_templates

log = logging.getLogger(__name__)

#: Host header values a loopback-bound server answers (anything else: DNS rebinding from a web page)
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]"}
#: path -> endpoint label (metrics); anything else is "other", so label values stay few
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models",
             "/health": "health", "/metrics": "metrics"}
#: status -> audit outcome, where the handler did not set one
OUTCOMES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "too_large", 429: "overloaded", 503: "unavailable"}


# -- errors -----------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}


def _batcher_errors():
    from edgemed.serve.batcher import Closed, Overloaded

    return [(Overloaded, 429, "rate_limit_error", "server_overloaded"), (Closed, 503, "server_error", "unavailable")]


#: EdgemedError subclass -> (status, type, code), most specific first (batcher's own errors prepended at start)
ERRORS = [
    (ContextOverflow, 400, "invalid_request_error", "context_length_exceeded"),
    (TemplateError, 400, "invalid_request_error", "invalid_template"),
    (InputError, 400, "invalid_request_error", None),
    (EdgemedError, 500, "server_error", None),
]


def as_api_error(exc: EdgemedError) -> ApiError:
    message = exc.problem if not exc.fix else f"{exc.problem} Fix: {exc.fix}"
    for kind, status, type_, code in _batcher_errors() + ERRORS:
        if isinstance(exc, kind):
            headers = {}
            if hasattr(exc, "retry_after"):
                headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
            return ApiError(status, message, type_, code, headers=headers)
    raise TypeError(exc)  # unreachable: EdgemedError is the last row


def error_response(err: ApiError):
    body = api.ErrorResponse(error=api.ErrorBody(message=err.message, type=err.type, param=err.param, code=err.code))
    return JSONResponse(body.model_dump(), status_code=err.status, headers=err.headers)


# -- per-request context ------------------------------------------------------------------------------
@dataclass
class Context:
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

    def audit_fields(self, model: str, digest: str) -> dict:
        fields = dict(request_id=self.request_id, endpoint=self.endpoint, client=self.client, key_id=self.key_id,
                      model=model, bundle_digest=digest, template=self.template, status=self.status,
                      outcome=self.outcome or self._outcome(), error_code=self.error_code, stream=self.stream,
                      latency_s=round(time.perf_counter() - self.started, 4))
        f = self.finished
        if f is not None:
            fields.update(finish_reason=f.finish_reason, prompt_tokens=f.prompt_tokens,
                          completion_tokens=f.completion_tokens, ttft_s=round(f.ttft_s, 4), queue_s=round(f.queue_s, 4))
        if self.prompt is not None:
            fields.update(prompt=self.prompt, output=self.output)
        return fields

    def _outcome(self) -> str:
        code = self.status or 500
        if code < 400:
            return "ok"
        return OUTCOMES.get(code, "bad_request" if code < 500 else "error")


def context_of(scope) -> Context:
    return scope["state"]["edgemed"]


# -- middleware ----------------------------------------------------------------------------------------
class Observe:
    """Request id, security headers, one audit record per API request, request metrics."""

    def __init__(self, app, *, config: ServeConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        client = scope.get("client")
        ctx = Context(uuid.uuid4().hex, ENDPOINTS.get(path, "other"), client[0] if client else None)
        scope.setdefault("state", {})["edgemed"] = ctx

        async def send_observed(message):
            if message["type"] == "http.response.start":
                ctx.status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = ctx.request_id
                headers["x-content-type-options"] = "nosniff"
                if path.startswith("/v1/"):
                    headers["cache-control"] = "no-store"  # answers may carry PHI: no proxy or browser cache
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        except Exception:
            log.exception("request %s failed", ctx.request_id)
            ctx.outcome = "error"
            if ctx.status is None:
                await error_response(ApiError(500, "The server failed on this request; it is logged under "
                                              f"request id {ctx.request_id}.", "server_error"))(scope, receive, send_observed)
        finally:
            self.metrics.request_done(ctx.endpoint, ctx.status or 500, time.perf_counter() - ctx.started)
            if self.config.audit is not None and not self.config.audit.failed and path.startswith("/v1/"):
                await _audit(self.config.audit, "request", ctx.audit_fields(self.config.model_id, self.config.bundle_digest))


async def _audit(audit, kind: str, fields: dict) -> None:
    """Append off the event loop (the write fsyncs); shielded, so a cancelled request still leaves its record."""
    with anyio.CancelScope(shield=True):
        try:
            await anyio.to_thread.run_sync(lambda: audit.append(kind, **fields))
        except OSError as exc:
            log.error("audit record not written (%s); refusing API requests until restarted", exc)


class Guard:
    """API key for ``/v1/*`` and ``/metrics``; request bodies larger than the limit are refused (413)."""

    def __init__(self, app, *, config: ServeConfig):
        self.app, self.config = app, config
        self.loopback = config.loopback  # resolved once: a host name is looked up in /etc/hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ctx = context_of(scope)
        path = scope["path"]
        headers = dict(scope["headers"])

        async def refuse(err: ApiError):
            ctx.error_code = err.code
            await error_response(err)(scope, receive, send)

        if self.loopback:
            host = headers.get(b"host", b"").decode("latin-1").lower()
            host = host[:host.index("]") + 1] if host.startswith("[") and "]" in host else host.split(":")[0]
            if host not in LOOPBACK_HOSTS | {self.config.host.lower()}:
                return await refuse(ApiError(400, f"This server answers only requests addressed to it by a loopback "
                                                  f"name (Host: 127.0.0.1 or localhost), not '{host}'. Fix: use "
                                                  "http://127.0.0.1:PORT/v1.", code="invalid_host"))
        audit = self.config.audit
        if audit is not None and audit.failed and path.startswith("/v1/"):
            return await refuse(ApiError(503, f"The audit log cannot be written ({audit.failed}), so requests are "
                                              "refused. Fix: free disk space or repair the log's storage, then restart "
                                              "the server.", "server_error", "audit_unavailable"))
        keys = self.config.api_keys
        if keys is not None and (path.startswith("/v1/") or path == "/metrics"):
            ctx.key_id = keys.identify(bearer_token(headers.get(b"authorization", b"").decode("latin-1")))
            if ctx.key_id is None:
                return await refuse(ApiError(401, "Missing or incorrect API key. Fix: send 'Authorization: Bearer KEY' "
                                                  "with a key from the server's --api-key-file.", code="invalid_api_key",
                                             headers={"WWW-Authenticate": "Bearer"}))
        limit = self.config.max_body_bytes
        too_large = ApiError(413, f"The request body is larger than the server's limit of {limit} bytes. Fix: shorten "
                                  "the request, or start the server with a larger --max-body.", code="request_too_large")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await refuse(too_large)
        body, more = bytearray(), True
        while more:  # read the (bounded) body here, so the app never sees more than the limit
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its request
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await refuse(too_large)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# -- templates --------------------------------------------------------------------------------------------
def template_version(template) -> str:
    """Templates carry no version number: their version is a digest of everything that shapes the prompt
    and its parsing (system, user, inputs, contract, safety preamble), so any edit gives a new version."""
    c = template.contract
    source = {"name": template.name, "system": template.system, "user": template.user, "inputs": template.inputs,
              "preamble": template.preamble, "contract": {"kind": c.kind, "label": c.label, "choices": list(c.choices),
                                                         "choices_from": c.choices_from, "schema": c.schema}}
    text = json.dumps(source, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# -- the app -----------------------------------------------------------------------------------------------
def create_app(batcher, config: ServeConfig):
    """The FastAPI app serving ``batcher`` (already started; the caller closes it after the server stops)."""
    metrics = Metrics(batcher)
    templates = load_templates()
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        start = dict(host=config.host, port=config.port, model=config.model_id, bundle_digest=config.bundle_digest,
                     slots=batcher.slots, queue_size=getattr(batcher, "queue_size", None))
        if config.audit is not None:
            head = await asyncio.to_thread(lambda: config.audit.append(
                "start", content_logged=config.audit.content, **start))
            log.info("audit log %s: head %s (record it elsewhere to detect truncation or rewriting)",
                        config.audit.path, head)
        yield
        if config.audit is not None:
            head = await asyncio.to_thread(lambda: config.audit.append("stop", model=config.model_id))
            log.info("audit log %s: head %s at stop", config.audit.path, head)

    app = FastAPI(title="edgemed", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.config = batcher, metrics, config

    # -- error shapes --
    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        request.scope["state"]["edgemed"].error_code = exc.code
        return error_response(exc)

    @app.exception_handler(EdgemedError)
    async def _edgemed_error(request, exc: EdgemedError):
        return await _api_error(request, as_api_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        text = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                         for e in errors[:3])
        return await _api_error(request, ApiError(400, f"Invalid request: {text}.", param=".".join(loc) or None))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        message = {404: f"No route {request.url.path}. Fix: the API is under /v1 (chat/completions, completions, models).",
                   405: f"{request.method} is not allowed on {request.url.path}."}.get(exc.status_code, str(exc.detail))
        return await _api_error(request, ApiError(exc.status_code, message, headers=dict(exc.headers or {})))

    # -- helpers --
    def ctx_of(request: Request) -> Context:
        return request.scope["state"]["edgemed"]

    def check_model(name: str) -> None:
        if name != config.model_id:
            raise ApiError(404, f"The model '{name}' is not served here. Fix: use model '{config.model_id}' "
                                "(GET /v1/models lists it).", code="model_not_found", param="model")

    def settings_for(body, prompt_tokens: int, json_schema: str | None) -> GenerationSettings:
        room = batcher.n_ctx_per_slot - prompt_tokens
        asked = body.requested_max_tokens()
        limit = config.max_tokens_limit
        if asked is not None and limit is not None and asked > limit:
            raise ApiError(400, f"max_tokens {asked} is above this server's limit of {limit}. Fix: ask for "
                                f"{limit} or fewer.", param="max_tokens", code="max_tokens_too_large")
        max_tokens = asked or min(config.default_max_tokens, limit or config.default_max_tokens, max(room, 1))
        return GenerationSettings(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=body.top_k, min_p=body.min_p, repeat_penalty=body.repeat_penalty,
                                  seed=body.seed or 0, stop=body.stops(), json_schema=json_schema,
                                  grammar=body.grammar)

    def submit(ctx: Context, prompt, body, json_schema: str | None):
        tokens = batcher.tokenize(prompt) if isinstance(prompt, str) else prompt
        settings = settings_for(body, len(tokens), json_schema)
        ctx.stream = body.stream
        if config.audit is not None and config.audit.content:
            ctx.prompt = prompt if isinstance(prompt, str) else json.dumps(prompt)
        return batcher.submit(tokens, settings, request_id=ctx.request_id)

    async def collect(request: Request, stream) -> tuple[str, object]:
        """The whole answer; a client that leaves meanwhile cancels the stream (its slot is freed)."""
        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            stream.cancel()

        watcher = asyncio.ensure_future(watch())
        parts, finished = [], None
        try:
            async for item in stream:
                if hasattr(item, "text"):
                    parts.append(item.text)
                else:
                    finished = item
        finally:
            watcher.cancel()
        return "".join(parts), finished

    def finish(ctx: Context, finished, text: str) -> str:
        """Record a finished generation; returns OpenAI's finish reason, or raises for a failed one."""
        ctx.finished = finished
        metrics.generation_done(finished)
        if ctx.prompt is not None:
            ctx.output = text
        if finished.finish_reason == "cancelled":
            ctx.outcome = "client_disconnected" if not getattr(finished, "error", None) else "cancelled"
        elif finished.finish_reason not in api.FINISH_REASONS:
            ctx.outcome = "error"
        return api.FINISH_REASONS.get(finished.finish_reason, finished.finish_reason)

    def failed(ctx: Context, finished) -> ApiError:
        ctx.error_code = "generation_failed"
        detail = getattr(finished, "error", None) or finished.finish_reason
        return ApiError(500, f"Generation stopped: {detail}. Fix: retry; if it persists, see the server log for "
                             f"request id {ctx.request_id}.", "server_error", "generation_failed")

    def sse(data) -> str:
        return "data: " + (data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)) + "\n\n"

    def streaming(ctx: Context, stream, shape: dict, include_usage: bool):
        """SSE: ``head`` events, one chunk per piece, a final chunk with the finish reason, usage if asked, [DONE].

        ``shape`` holds the endpoint's chunk builders: head() -> list, piece(text), final(reason, text), usage(finished).
        """
        async def events():
            parts, finished = [], None
            try:
                for event in shape["head"]():
                    yield sse(event)
                async for item in stream:
                    if hasattr(item, "text"):
                        parts.append(item.text)
                        yield sse(shape["piece"](item.text))
                    else:
                        finished = item
                text = "".join(parts)
                reason = finish(ctx, finished, text)
                if reason not in api.FINISH_REASONS.values():
                    err = failed(ctx, finished)
                    yield sse({"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}})
                else:
                    yield sse(shape["final"](reason, text))
                    if include_usage:
                        yield sse(shape["usage"](finished))
                yield sse("[DONE]")
            finally:
                if finished is None:  # the client went away (Starlette cancelled this generator)
                    stream.cancel()
                    ctx.outcome = "client_disconnected"
                    # the batcher ends the stream before its next step: keep its token counts for the audit
                    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                        async for item in stream:
                            if not hasattr(item, "text"):
                                finish(ctx, item, "".join(parts))

        return StreamingResponse(events(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})

    # -- routes --
    @app.get("/health")
    async def health():
        stats = batcher.stats()
        if config.audit is not None and config.audit.failed:
            return JSONResponse({"status": "audit_failed", "detail": config.audit.failed}, status_code=503)
        return {"status": "ok", "model": config.model_id, "slots": stats.get("slots"),
                "active_slots": stats.get("active_slots"), "queue_depth": stats.get("queue_depth")}

    @app.get("/metrics")
    async def prometheus():
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        card = api.ModelCard(id=config.model_id, created=created, bundle_digest=config.bundle_digest,
                             context_length=batcher.n_ctx_per_slot)
        return api.ModelList(data=[card]).model_dump()

    @app.post("/v1/chat/completions")
    async def chat(body: api.ChatRequest, request: Request):
        ctx = ctx_of(request)
        check_model(body.model)
        body.refused()
        template = None
        json_schema = body.json_schema()
        if body.template:
            if body.messages:
                raise InputError("Send either 'messages' or 'template' (with 'template_inputs'), not both.",
                                 "leave 'messages' empty when a template builds them")
            template = templates.get(body.template)
            if template is None:
                raise TemplateError(f"No prompt template named '{body.template}'.",
                                    f"choose one of: {', '.join(sorted(templates))}")
            ctx.template = {"id": template.name, "version": template_version(template)}
            messages = template.messages(body.template_inputs)
            if template.contract.kind == "json" and json_schema is None and body.grammar is None:
                json_schema = template.contract.json_schema()
        elif not body.messages:
            raise InputError("'messages' is empty.", "send at least one message, or a 'template' with its inputs")
        else:
            messages = [m.as_template_message() for m in body.messages]
        prompt = batcher.render_chat(messages)
        stream = submit(ctx, prompt, body, json_schema)
        rid, model = "chatcmpl-" + ctx.request_id, config.model_id

        def extra(text: str) -> dict:
            if template is None:
                return {}
            parsed = template.parse(text, body.template_inputs)
            return {"edgemed": {"template": ctx.template,
                                "parsed": {"ok": parsed.ok, "value": parsed.value, "error": parsed.error or None}}}

        if body.stream:
            now = int(time.time())

            def chunk(choices: list, **more) -> dict:
                return api.ChatCompletionChunk(id=rid, created=now, model=model, choices=choices, **more).model_dump()

            shape = {
                "head": lambda: [chunk([api.ChunkChoice(delta=api.Delta(role="assistant", content=""))])],
                "piece": lambda text: chunk([api.ChunkChoice(delta=api.Delta(content=text))]),
                "final": lambda reason, text: chunk([api.ChunkChoice(delta=api.Delta(), finish_reason=reason)],
                                                    **extra(text)),
                "usage": lambda finished: chunk([], usage=api.Usage.of(finished)),
            }
            return streaming(ctx, stream, shape, body.include_usage)
        text, finished = await collect(request, stream)
        reason = finish(ctx, finished, text)
        if reason not in api.FINISH_REASONS.values():
            raise failed(ctx, finished)
        choice = api.ChatChoice(message=api.AssistantMessage(content=text), finish_reason=reason)
        return api.ChatCompletion(id=rid, model=model, choices=[choice], usage=api.Usage.of(finished),
                                  **extra(text)).model_dump()

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest, request: Request):
        ctx = ctx_of(request)
        check_model(body.model)
        body.refused()
        stream = submit(ctx, body.prompt_value(), body, None)
        rid, model = "cmpl-" + ctx.request_id, config.model_id
        if body.stream:
            now = int(time.time())

            def chunk(choices: list, **more) -> dict:
                return api.Completion(id=rid, created=now, model=model, choices=choices, **more).model_dump()

            shape = {
                "head": lambda: [],
                "piece": lambda text: chunk([api.TextChoice(text=text)]),
                "final": lambda reason, text: chunk([api.TextChoice(text="", finish_reason=reason)]),
                "usage": lambda finished: chunk([], usage=api.Usage.of(finished)),
            }
            return streaming(ctx, stream, shape, body.include_usage)
        text, finished = await collect(request, stream)
        reason = finish(ctx, finished, text)
        if reason not in api.FINISH_REASONS.values():
            raise failed(ctx, finished)
        return api.Completion(id=rid, model=model, choices=[api.TextChoice(text=text, finish_reason=reason)],
                              usage=api.Usage.of(finished)).model_dump()

    # -- middleware (added innermost first) --
    app.add_middleware(Guard, config=config)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"], allow_credentials=False, max_age=600)
    app.add_middleware(Observe, config=config, metrics=metrics)
    return app
