"""One generation request, whichever endpoint: body -> ``Prompt`` -> settings -> ``Batcher.submit`` ->
the whole answer, or SSE chunks then ``[DONE]``; with the audit's and the metrics' view of how it ended.

A client that disconnects cancels its ``Stream``, which frees the slot before the next decode step:
streaming through Starlette's disconnect listener, non-streaming through a task that waits for
``http.disconnect`` while the answer is collected. Either way the request is recorded as the client's
doing (``RequestRecord.client_left``: 499, ``client_disconnected``), not as a server error.
"""

from __future__ import annotations

import asyncio
import json

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import StreamingResponse

from edgemed.runtime.engine import GenerationSettings
from edgemed.serve import api
from edgemed.serve.api import ApiError, ClientClosed
from edgemed.serve.endpoints import Endpoint
from edgemed.serve.middleware import RequestRecord
from edgemed.serve.state import Served, request_record, served


async def generate(endpoint: Endpoint, body, request: Request):
    """Answer ``body`` (already validated as ``endpoint.request``) the way ``endpoint`` describes."""
    srv, record = served(request), request_record(request)
    check_model(srv, body.model)
    body.refused()
    prompt = await endpoint.prompt(srv, record, body)
    stream = await run_in_threadpool(submit, srv, record, prompt.value, body, prompt.json_schema)
    shape = endpoint.shape(id=endpoint.id_prefix + record.request_id, model=srv.config.model_id, extra=prompt.extra)
    if body.stream:
        return streaming(srv, record, stream, shape, body.include_usage)
    text, finished, reason = await collect(srv, record, request, stream)
    return shape.whole(text, reason, finished)


def check_model(srv: Served, name: str) -> None:
    if name != srv.config.model_id:
        raise ApiError(404, f"The model '{name}' is not served here. Fix: use model '{srv.config.model_id}' "
                            "(GET /v1/models lists it).", code="model_not_found", param="model")


def settings_for(srv: Served, body, prompt_tokens: int, json_schema: str | None) -> GenerationSettings:
    config = srv.config
    room = srv.batcher.n_ctx_per_slot - prompt_tokens
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


def submit(srv: Served, record: RequestRecord, prompt, body, json_schema: str | None):
    """Tokenize, size and queue the request (in a worker thread); the ``Stream`` of its output."""
    tokens = srv.batcher.tokenize(prompt) if isinstance(prompt, str) else prompt
    settings = settings_for(srv, body, len(tokens), json_schema)
    record.stream = body.stream
    audit = srv.config.audit
    if audit is not None and audit.content:
        record.prompt = prompt if isinstance(prompt, str) else json.dumps(prompt)
    return srv.batcher.submit(tokens, settings, request_id=record.request_id)


async def collect(srv: Served, record: RequestRecord, request: Request, stream) -> tuple[str, object, str]:
    """The whole answer, its ``Finished`` and OpenAI's finish reason; a client that leaves meanwhile cancels
    the stream (its slot is freed) and raises ``ClientClosed``; a generation that ended neither by stop nor
    length raises."""
    left = False

    async def watch():
        nonlocal left
        while (await request.receive())["type"] != "http.disconnect":
            pass
        left = True
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
    reason = finish(srv, record, finished, text)
    if left:  # nobody is there to answer, and it is not the server's failure (not the 503 of a shutdown)
        record.client_left()
        raise ClientClosed()
    if reason not in api.FINISH_REASONS.values():
        raise failed(record, finished)
    return text, finished, reason


def finish(srv: Served, record: RequestRecord, finished, text: str) -> str:
    """Record a finished generation for audit and metrics; return OpenAI's finish reason (or the batcher's)."""
    record.finished = finished
    srv.metrics.generation_done(finished)
    if record.prompt is not None:
        record.output = text
    if finished.finish_reason == "cancelled":
        record.outcome = "client_disconnected" if not getattr(finished, "error", None) else "cancelled"
    elif finished.finish_reason not in api.FINISH_REASONS:
        record.outcome = "error"
    return api.FINISH_REASONS.get(finished.finish_reason, finished.finish_reason)


def failed(record: RequestRecord, finished) -> ApiError:
    """A generation that ended neither by stop nor length: the server shutting down (503) or a failure (500)."""
    detail = getattr(finished, "error", None) or finished.finish_reason
    if finished.finish_reason == "cancelled":
        record.error_code = "unavailable"
        return ApiError(503, f"Generation stopped: {detail}. Fix: retry when the server is back.", "server_error",
                        "unavailable", headers={"Retry-After": "5"})
    record.error_code = "generation_failed"
    return ApiError(500, f"Generation stopped: {detail}. Fix: retry; if it persists, see the server log for "
                         f"request id {record.request_id}.", "server_error", "generation_failed")


def sse(data) -> str:
    return "data: " + (data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)) + "\n\n"


def streaming(srv: Served, record: RequestRecord, stream, shape, include_usage: bool) -> StreamingResponse:
    """SSE: the shape's head events, one chunk per piece, a final chunk with the finish reason, usage if
    asked, then [DONE]; a generation that fails after the stream started ends it with an ``error`` event."""
    async def events():
        parts, finished, left = [], None, False
        try:
            for event in shape.head():
                yield sse(event)
            async for item in stream:
                if hasattr(item, "text"):
                    parts.append(item.text)
                    yield sse(shape.piece(item.text))
                else:
                    finished = item
            text = "".join(parts)
            reason = finish(srv, record, finished, text)
            if reason not in api.FINISH_REASONS.values():
                err = failed(record, finished)
                record.failed_status = err.status  # the headers said 200; metrics and audit say what happened
                yield sse({"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}})
            else:
                yield sse(shape.final(reason, text))
                if include_usage:
                    yield sse(shape.usage(finished))
            record.answered = True  # every event is out but the end marker: a client gone now left nothing unread
            yield sse("[DONE]")
        except (GeneratorExit, anyio.get_cancelled_exc_class()):
            left = True  # the client went away: Starlette cancelled (or closed) this generator
            raise
        finally:
            if finished is None:
                stream.cancel()
                # the batcher ends the stream before its next step: keep its token counts for the audit
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    async for item in stream:
                        if not hasattr(item, "text"):
                            finish(srv, record, item, "".join(parts))
            if left:
                record.client_left()

    return SseResponse(events(), record, media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})


class SseResponse(StreamingResponse):
    """A ``StreamingResponse`` that records a client gone before the end of the stream (``RequestRecord.client_left``),
    wherever the cancellation lands (in the generator, or in a ``send`` between two events)."""

    def __init__(self, content, record: RequestRecord, **kw):
        super().__init__(content, **kw)
        self.record = record

    async def listen_for_disconnect(self, receive) -> None:
        await super().listen_for_disconnect(receive)  # returns only on http.disconnect, else it is cancelled
        if not self.record.answered:  # the server reports a disconnect once the response is complete, too
            self.record.client_left()
