"""The ASGI app of ``edgemed serve``: OpenAI's API over a ``Batcher``, with audit, metrics and limits.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming as SSE or
not), ``GET /v1/models``, ``GET /health``, ``GET /metrics``. Every error, whatever raised
it, leaves in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Middleware, outermost first: ``Observe`` (request id, metrics, audit record; see
``middleware.py``), ``CORSMiddleware`` only when ``--cors-origin`` names origins (otherwise
browsers refuse other origins the response), ``Guard`` (audit ok, Host, API key, body size).

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
import time

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response, StreamingResponse

from edgemed.errors import EdgemedError, InputError, TemplateError
from edgemed.runtime import chat_template
from edgemed.runtime.engine import GenerationSettings
from edgemed.serve import api
from edgemed.serve.api import ApiError, as_api_error, error_response
from edgemed.serve.config import ServeConfig
from edgemed.serve.metrics import Metrics
from edgemed.serve.middleware import Context, Guard, Observe
from edgemed.templates import load_templates

log = logging.getLogger(__name__)


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
        chat_template.warm()  # the template renderer process starts now, not at the first request
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

    async def collect(ctx: Context, request: Request, stream) -> tuple[str, object, str]:
        """The whole answer, its ``Finished`` and OpenAI's finish reason; a client that leaves meanwhile cancels
        the stream (its slot is freed); a generation that ended neither by stop nor length raises."""
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
        text = "".join(parts)
        reason = finish(ctx, finished, text)
        if reason not in api.FINISH_REASONS.values():
            raise failed(ctx, finished)
        return text, finished, reason

    def finish(ctx: Context, finished, text: str) -> str:
        """Record a finished generation for audit and metrics; return OpenAI's finish reason (or the batcher's)."""
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
        """A generation that ended neither by stop nor length: the server shutting down (503) or a failure (500)."""
        detail = getattr(finished, "error", None) or finished.finish_reason
        if finished.finish_reason == "cancelled":
            ctx.error_code = "unavailable"
            return ApiError(503, f"Generation stopped: {detail}. Fix: retry when the server is back.", "server_error",
                            "unavailable", headers={"Retry-After": "5"})
        ctx.error_code = "generation_failed"
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
            messages = await run_in_threadpool(template.messages, body.template_inputs)
            if template.contract.kind == "json" and json_schema is None and body.grammar is None:
                json_schema = template.contract.json_schema()
        elif not body.messages:
            raise InputError("'messages' is empty.", "send at least one message, or a 'template' with its inputs")
        else:
            messages = [m.as_template_message() for m in body.messages]
        # Rendering (a limited, but possibly slow, untrusted template) and tokenizing (a long prompt) run in a
        # worker thread: the event loop keeps answering /health and streaming other requests meanwhile.
        prompt = await run_in_threadpool(batcher.render_chat, messages)
        stream = await run_in_threadpool(submit, ctx, prompt, body, json_schema)
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
        text, finished, reason = await collect(ctx, request, stream)
        choice = api.ChatChoice(message=api.AssistantMessage(content=text), finish_reason=reason)
        return api.ChatCompletion(id=rid, model=model, choices=[choice], usage=api.Usage.of(finished),
                                  **extra(text)).model_dump()

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest, request: Request):
        ctx = ctx_of(request)
        check_model(body.model)
        body.refused()
        stream = await run_in_threadpool(submit, ctx, body.prompt_value(), body, None)
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
        text, finished, reason = await collect(ctx, request, stream)
        return api.Completion(id=rid, model=model, choices=[api.TextChoice(text=text, finish_reason=reason)],
                              usage=api.Usage.of(finished)).model_dump()

    # -- middleware (added innermost first) --
    app.add_middleware(Guard, config=config)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"], allow_credentials=False, max_age=600)
    app.add_middleware(Observe, config=config, metrics=metrics)
    return app
