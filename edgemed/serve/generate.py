"""One generation request, whichever endpoint: body -> ``Prompt`` -> settings -> ``Batcher.submit`` ->
the whole answer, or SSE chunks then ``[DONE]``; with the audit's and the metrics' view of how it ended.

A client that disconnects cancels its ``Stream``, which frees the slot before the next decode step:
streaming through Starlette's disconnect listener, non-streaming through a task that waits for
``http.disconnect`` while the answer is collected. Either way the request is recorded as the client's
doing (``RequestRecord.client_left``: 499, ``client_disconnected``), not as a server error. An answer cut off,
by its client or by the server's stop cancelling the request, keeps its token counts for the audit (``ended_early``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import secrets

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from edgemed.runtime.batch.options import Extras
from edgemed.runtime.batch.stream import merged
from edgemed.runtime.engine import GenerationSettings
from edgemed.runtime.grammar_probe import GrammarRefused
from edgemed.serve import api, thought
from edgemed.serve.api import ApiError, ClientClosed
from edgemed.serve.endpoints import Answer, Endpoint, usage
from edgemed.serve.grammar_source import GrammarSource
from edgemed.serve.tools import CallFilter
from edgemed.serve.middleware import RequestRecord, adapter_fields
from edgemed.serve.state import Served, request_record, served

#: Sent as ``open`` when the chat template opened a reasoning block (the prompt ends with ``<think>``): the answer's
#: text up to ``</think>`` is reasoning. Without it, an answer's reasoning block is one the model opened itself.
THINK_HEADER = "x-edgemed-think"
#: The sampling seed the answer was generated with (the client's, or the one drawn for it; choice i used seed + i).
SEED_HEADER = "x-edgemed-seed"


async def generate(endpoint: Endpoint, body, request: Request):
    """Answer ``body`` (already validated as ``endpoint.request``) the way ``endpoint`` describes."""
    srv, record = served(request), request_record(request)
    with arriving(srv):  # an idle scheduler gathers the requests sent with this one while they are prepared
        record.adapter = check_model(srv, body.model)
        body.refused()
        prompt = await endpoint.prompt(srv, record, body)
        streams = await run_in_threadpool(submit, srv, record, prompt, body)
    echo = bos = None
    if getattr(body, "echo", False):
        echo = [p if isinstance(p, str) else await run_in_threadpool(srv.batcher.detokenize, p) for p in prompt.values]
        # a text prompt's tokens open with the BOS its tokenizer adds, if it adds one; token ids are the client's own
        texts = any(isinstance(p, str) for p in prompt.values)
        adds = texts and await run_in_threadpool(lambda: srv.batcher.adds_bos)
        bos = [adds and isinstance(p, str) for p in prompt.values]
    shape = endpoint.shape(id=endpoint.id_prefix + record.request_id, model=body.model, extra=prompt.extra,
                           logprobs=body.top_logprobs_wanted() is not None, echo=echo, bos=bos, n=body.n)
    answers = [Answer(i, calls=CallFilter(prompt.tools.names) if prompt.tools.parse else None,
                      scoring=getattr(body, "scoring", False)) for i in range(len(streams))]
    headers = {SEED_HEADER: str(record.seed), **({THINK_HEADER: "open"} if prompt.opened_think else {})}
    if body.stream:
        response = streaming(srv, record, streams, answers, shape, body.include_usage, prompt.grammar_from)
        response.headers.update(headers)
        return response
    try:
        reasons = await collect(srv, record, request, streams, answers, prompt.grammar_from)
    except anyio.get_cancelled_exc_class():  # the server's stop cancelled it before its answer was all collected
        await ended_early(srv, record, streams, answers)
        raise
    # the whole answer is read by its template's contract (and for tool calls): a long reply takes a while to read,
    # so the event loop keeps answering other requests meanwhile
    return JSONResponse(await run_in_threadpool(shape.whole, answers, reasons), headers=headers)


def arriving(srv: Served):
    """The batcher's ``arriving`` (a batcher that has none, such as a test's stand-in: nothing to announce)."""
    announce = getattr(srv.batcher, "arriving", None)
    return announce() if announce is not None else contextlib.nullcontext()


def served_models(srv: Served) -> list[str]:
    """The names a request may pass as ``model``: the base's, then ``BASE:ADAPTER`` for each adapter served now."""
    adapters = srv.batcher.adapters() if hasattr(srv.batcher, "adapters") else {}
    return [srv.config.model_id, *(f"{srv.config.model_id}:{a}" for a in sorted(adapters))]


def check_model(srv: Served, name: str) -> str | None:
    """The adapter ``name`` asks for (None: the base); a name not served is a 404 naming the ones that are."""
    names = served_models(srv)
    if name not in names:
        there = ", ".join(f"'{n}'" for n in names)
        raise ApiError(404, f"The model '{name}' is not served here. Fix: use one of {there} "
                            "(GET /v1/models lists them).", code="model_not_found", param="model")
    return None if name == srv.config.model_id else name[len(srv.config.model_id) + 1:]


def settings_for(srv: Served, body, prompt_tokens: int, json_schema: str | None,
                 grammar: str | None = None, *, seed: int) -> GenerationSettings:
    """The request's sampling settings. ``max_tokens`` beyond what is left of the slot's context is capped to it
    (the answer then ends with ``length``), as OpenAI and llama-server do; a prompt that leaves no room at all
    is a 400 ``context_length_exceeded``."""
    config = srv.config
    n_ctx = srv.batcher.n_ctx_per_slot
    room = n_ctx - prompt_tokens
    if room < 1:
        field = "messages" if hasattr(body, "messages") else "prompt"
        raise ApiError(400, f"The prompt is {prompt_tokens} tokens, which leaves no room for an answer in the context "
                            f"window of {n_ctx} tokens. Fix: shorten the prompt, or start the server with a larger "
                            "--ctx or fewer --slots.", code="context_length_exceeded", param=field)
    asked = body.requested_max_tokens()
    limit = config.max_tokens_limit
    if asked is not None and limit is not None and asked > limit:
        field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        raise ApiError(400, f"{field} {asked} is above this server's limit of {limit}. Fix: ask for "
                            f"{limit} or fewer.", param=field, code="max_tokens_too_large")
    max_tokens = min(asked or min(config.default_max_tokens, limit or config.default_max_tokens), room)
    if getattr(body, "scoring", False):  # max_tokens 0 with echo: one token is computed, and dropped (``take``)
        max_tokens = 1
    # top_p 0 is OpenAI's "most deterministic": the most likely token alone, which is top-1 whatever the temperature
    top_p, top_k = (1.0, 1) if body.top_p == 0 else (body.top_p, body.top_k)
    return GenerationSettings(max_tokens=max_tokens, temperature=body.temperature, top_p=top_p,
                              top_k=top_k, min_p=body.min_p, repeat_penalty=body.repeat_penalty,
                              seed=seed,
                              stop=body.stops(), json_schema=json_schema,
                              grammar=grammar if grammar is not None else body.grammar)


def extras_for(srv: Served, body) -> Extras:
    if body.n > srv.batcher.slots:
        raise ApiError(400, f"n={body.n} choices need as many slots; this server runs {srv.batcher.slots}. Fix: ask "
                            f"for n <= {srv.batcher.slots}, or start the server with more --slots.", param="n")
    top = body.top_logprobs_wanted()
    return Extras(presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                  logit_bias=body.bias(srv.batcher.n_vocab), top_logprobs=top,
                  prompt_logprobs=bool(getattr(body, "echo", False)) and top is not None, n=body.n)


def scope_of(srv: Served, record: RequestRecord, body):
    """Who may reuse this request's prompt KV (``Batcher.submit_n``'s ``scope``): requests with the same API key
    under ``--prefix-cache-scope key`` (every request where the server has no keys), all under ``shared``; and in
    both, only those with the same ``cache_salt``. None: everyone's scope."""
    key = record.key_id if srv.config.prefix_cache_scope == "key" else None
    salt = getattr(body, "cache_salt", None)
    return None if key is None and salt is None else (key, salt)


def submit(srv: Served, record: RequestRecord, prompt, body) -> list:
    """Tokenize, size and queue the request (in a worker thread): its streams, ``n`` per prompt, in choice order."""
    record.stream = body.stream
    extras = extras_for(srv, body)
    audit = srv.config.audit
    if audit is not None and audit.content:
        texts = [p if isinstance(p, str) else json.dumps(p) for p in prompt.values]
        record.prompt = texts[0] if len(texts) == 1 else json.dumps(texts, ensure_ascii=False)
    wanted, room = len(prompt.values) * extras.n, srv.batcher.slots + srv.batcher.queue_size
    if wanted > room:  # each choice of each prompt is one request in flight: more than fit would be 429 for ever
        raise api.ApiError(400, f"{len(prompt.values)} prompt(s) x n={extras.n} are {wanted} requests in flight, and this "
                                f"server holds at most {room} ({srv.batcher.slots} slots + {srv.batcher.queue_size} "
                                f"waiting). Fix: send at most {room} prompts x choices per request, or start the server "
                                "with more --slots or a longer --queue.", param="prompt")
    streams = []
    # one seed for the request, drawn when the client sent none: the response and the audit record name it, so the
    # answer can be had again (the prompt, the model and this seed)
    record.seed = body.seed if body.seed is not None else secrets.randbits(31)  # choices' seed + i stay below 2^32 - 1
    cap = thought.cap_for(srv.config, body)  # a reasoning cap: the thought, then the answer in a call of its own
    try:
        for i, value in enumerate(prompt.values):
            tokens = prompt_tokens(srv, body, value, i if len(prompt.values) > 1 else None)
            json_schema, grammar = (prompt.json_schema, prompt.grammar) if cap is None else prompt.answer_constraint
            settings = settings_for(srv, body, len(tokens), json_schema, grammar, seed=record.seed)
            more = {"adapter": record.adapter} if record.adapter else {}  # a batcher without adapters takes no such word
            if (scope := scope_of(srv, record, body)) is not None:
                more["scope"] = scope
            submit_n = srv.batcher.submit_n if cap is None else \
                functools.partial(thought.submit_capped, srv.batcher, value, cap)
            try:
                streams += submit_n(tokens, settings, request_id=record.request_id, extras=extras, **more)
                bound(record, getattr(streams[-1], "adapter", None))
            except GrammarRefused as exc:  # the probe's verdict: the fix names the field the grammar came from
                if prompt.grammar_from is None:
                    raise
                raise prompt.grammar_from.refused(exc) from None
        if audit is not None:  # queued, and nothing of it sent yet: a refusal (400, 429) never gets here
            accepted(audit, srv, record)
    except BaseException:
        for stream in streams:
            stream.cancel()
        raise
    return streams


def prompt_tokens(srv: Served, body, value, index: int | None) -> list[int]:
    """The tokens of one prompt, refused with a 400 naming its field (``prompt``, or ``prompt.i`` of several) when
    there are none (a text that tokenizes to nothing) or ids the model does not have."""
    tokens = srv.batcher.tokenize(value) if isinstance(value, str) else value
    field = ("prompt" if index is None else f"prompt.{index}") if not hasattr(body, "messages") else "messages"
    if not tokens:
        raise ApiError(400, f"'{field}' makes no tokens. Fix: send a prompt of at least one token.", param=field)
    n_vocab = srv.batcher.n_vocab
    bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise ApiError(400, f"'{field}' holds the token id {bad}, which is outside this model's vocabulary "
                            f"(0..{n_vocab - 1}). Fix: tokenize with this model's tokenizer, or send the prompt as "
                            "text.", param=field)
    return tokens


def bound(record: RequestRecord, weights: dict | None) -> None:
    """Note the weights the batcher bound a prompt of ``record`` to (``Stream.adapter``): its audit records name
    them. Each prompt of a request is bound on its own; one bound to other weights than the first (the adapter was
    removed and added again with another file meanwhile) refuses the request rather than record one of the two."""
    if weights is None:
        return
    if record.adapter_sha256 is not None and (record.adapter_sha256, record.adapter_scale) != \
            (weights["sha256"], weights["scale"]):
        raise api.ApiError(409, f"The adapter '{record.adapter}' was replaced while this request's prompts were queued, "
                                "so they would be answered by two different adapters. Fix: send the request again.",
                           code="adapter_changed", param="model")
    record.adapter_sha256, record.adapter_scale = weights["sha256"], weights["scale"]


def accepted(audit, srv: Served, record: RequestRecord) -> None:
    """The ``accepted`` record, written (and fsynced) once the request is queued and before anything of its answer is
    sent: a crash or a kill while it runs leaves who asked what on record, and a log that cannot take it refuses the
    request (fail closed; its streams are cancelled)."""
    fields = dict(request_id=record.request_id, endpoint=record.endpoint, client=record.client, key_id=record.key_id,
                  model=srv.config.model_id, bundle_digest=srv.config.bundle_digest, template=record.template,
                  stream=record.stream, seed=record.seed)
    fields.update(adapter_fields(record))
    try:
        audit.append("accepted", **fields)
        record.accepted = True
    except OSError as exc:
        raise api.ApiError(503, f"The audit log cannot be written ({audit.failed or exc}), so requests are refused. "
                                "Fix: free disk space or repair the log's storage, then restart the server.",
                           "server_error", "audit_unavailable") from None


def take(answer: Answer, item) -> bool:
    """Add one batcher item (a ``Piece`` or the ``Finished``) to its choice; False: a piece that is not part of the
    answer (a scoring request's one computed token, ``CompletionRequest.scoring``), not to be sent."""
    if not hasattr(item, "text"):
        if answer.scoring and item.finish_reason in api.FINISH_REASONS:  # no answer asked for: none was given
            item = dataclasses.replace(item, finish_reason="length", completion_tokens=0)
        answer.finished = item
    elif item.prompt:
        answer.prompt_logprobs.extend(item.logprobs)
    elif answer.scoring:
        return False
    else:
        answer.parts.append(item.text)
        answer.logprobs.extend(item.logprobs)
    return True


async def collect(srv: Served, record: RequestRecord, request: Request, streams, answers,
                  grammar_from: GrammarSource | None = None) -> list[str]:
    """Every choice's whole answer and OpenAI's finish reasons; a client that leaves meanwhile cancels the
    streams (their slots are freed) and raises ``ClientClosed``; a generation that ended neither by stop nor
    length raises (naming ``grammar_from`` when the request's grammar could not be followed)."""
    left = False

    async def watch():
        nonlocal left
        while (await request.receive())["type"] != "http.disconnect":
            pass
        left = True
        for stream in streams:
            stream.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        async with contextlib.aclosing(merged(streams)) as items:
            async for i, item in items:
                take(answers[i], item)
    finally:
        watcher.cancel()
    reasons = finish(srv, record, answers)
    if left:  # nobody is there to answer, and it is not the server's failure (not the 503 of a shutdown)
        record.client_left()
        raise ClientClosed()
    for answer, reason in zip(answers, reasons):
        if reason not in api.FINISH_REASONS.values():
            raise failed(record, answer.finished, grammar_from)
    return reasons


def finish(srv: Served, record: RequestRecord, answers) -> list[str]:
    """Record the finished generations for audit and metrics (one record: the choices' tokens summed); return
    OpenAI's finish reason of each (or the batcher's)."""
    done = [a.finished for a in answers if a.finished is not None]
    for finished in done:
        srv.metrics.generation_done(finished, record.adapter)
    if done:
        u = usage(answers)
        record.finished = dataclasses.replace(done[0], prompt_tokens=u.prompt_tokens,
                                              completion_tokens=u.completion_tokens)
    if record.prompt is not None:
        texts = [a.text for a in answers]
        record.output = texts[0] if len(texts) == 1 else json.dumps(texts, ensure_ascii=False)
    reasons = []
    for finished in done:
        if finished.finish_reason == "cancelled":
            record.outcome = "client_disconnected" if not getattr(finished, "error", None) else "cancelled"
        elif finished.finish_reason not in api.FINISH_REASONS:
            record.outcome = "error"
        reasons.append(api.FINISH_REASONS.get(finished.finish_reason, finished.finish_reason))
    return reasons


async def ended_early(srv: Served, record: RequestRecord, streams, answers) -> None:
    """An answer cut off before its end (its client left, or the server's stop cancelled the request): cancel its
    streams and read how the batcher ends them (before its next step; at once, once it has closed), so the audit
    record keeps what was computed: the prompt's tokens and those sampled. Shielded, and 5 s at most."""
    for stream in streams:
        stream.cancel()
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        for i, stream in enumerate(streams):
            if answers[i].finished is None:
                async for item in stream:
                    take(answers[i], item)
        finish(srv, record, answers)


def failed(record: RequestRecord, finished, grammar_from: GrammarSource | None = None) -> ApiError:
    """A generation that ended neither by stop nor length: the server shutting down (503), the request's own
    constraints leaving no token or its grammar too costly to follow (400, naming the field ``grammar_from``) or a
    failure (500)."""
    detail = getattr(finished, "error", None) or finished.finish_reason
    if finished.finish_reason == "cancelled":
        record.error_code = "unavailable"
        return ApiError(503, f"Generation stopped: {detail}. Fix: retry when the server is back.", "server_error",
                        "unavailable", headers={"Retry-After": "5"})
    if finished.finish_reason == "refused":  # the request's own grammar and logit bias left no token
        record.error_code = "no_token_allowed"
        if grammar_from is not None:
            return grammar_from.no_token(f"Generation stopped: {detail}")
        return ApiError(400, f"Generation stopped: {detail} Fix: {finished.fix}.", "invalid_request_error",
                        "no_token_allowed", param="logit_bias")  # no grammar: its bans alone
    if finished.finish_reason == "costly":  # the request's own grammar took too long to follow
        record.error_code = "grammar_too_costly"
        if grammar_from is not None:
            return grammar_from.too_costly(f"Generation stopped: {detail}")
        return ApiError(400, f"Generation stopped: {detail} Fix: {finished.fix}.", "invalid_request_error",
                        "grammar_too_costly")
    record.error_code = "generation_failed"
    return ApiError(500, f"Generation stopped: {detail}. Fix: retry; if it persists, see the server log for "
                         f"request id {record.request_id}.", "server_error", "generation_failed")


def sse(data) -> str:
    return "data: " + (data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)) + "\n\n"


def streaming(srv: Served, record: RequestRecord, streams, answers, shape, include_usage: bool,
              grammar_from: GrammarSource | None = None) -> StreamingResponse:
    """SSE: the shape's head events, chunks per piece of each choice, a final chunk per choice with its finish
    reason (after its tool calls), usage if asked, then [DONE]; a generation that fails after the stream
    started ends it with an ``error`` event."""
    async def events():
        left, ended = False, False
        try:
            for event in shape.head(answers):
                yield sse(event)
            async with contextlib.aclosing(merged(streams)) as items:  # closed before the drain below reads on
                async for i, item in items:
                    answer = answers[i]
                    if take(answer, item) and hasattr(item, "text"):
                        for event in (shape.piece(answer, item.text, item.logprobs, True) if item.prompt
                                      else shape.piece(answer, item.text, item.logprobs)):
                            yield sse(event)
            ended = True
            reasons = finish(srv, record, answers)
            bad = next((a for a, r in zip(answers, reasons) if r not in api.FINISH_REASONS.values()), None)
            if bad is not None:
                err = failed(record, bad.finished, grammar_from)
                record.failed_status = err.status  # the headers said 200; metrics and audit say what happened
                yield sse({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}})
            else:
                for answer, reason in zip(answers, reasons):
                    for event in await run_in_threadpool(shape.final, answer, reason):  # reads the answer, as above
                        yield sse(event)
                if include_usage:
                    yield sse(shape.usage(answers))
            record.answered = True  # every event is out but the end marker: a client gone now left nothing unread
            yield sse("[DONE]")
        except (GeneratorExit, anyio.get_cancelled_exc_class()):
            if srv.stopping.is_set():  # the server stopped with this answer still going: its doing, not the client's
                record.failed_status, record.error_code, record.outcome = 503, "unavailable", "cancelled"
            else:
                left = True  # the client went away: Starlette cancelled (or closed) this generator
            raise
        except Exception:  # a bug: the stream ends with an error event (a client, or the page, may take a close
            # between two whole events for the end of an answer), then the failure goes on to Observe's 500 and log
            record.failed_status = 500
            yield sse({"error": {"message": f"The server failed on this request; it is logged under request id "
                                            f"{record.request_id}. The answer above is cut off.",
                                 "type": "server_error", "param": None, "code": "server_error"}})
            raise
        finally:
            if not ended:
                await ended_early(srv, record, streams, answers)
            if left:
                record.client_left()

    return SseResponse(events(), record, media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})


class SseResponse(StreamingResponse):
    """A ``StreamingResponse`` that records a client gone before the end of the stream (``RequestRecord.client_left``),
    wherever the cancellation lands (in the generator, or in a ``send`` between two events)."""

    def __init__(self, content, record: RequestRecord, **kw):
        super().__init__(content, **kw)
        self.record = record

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # a cancel that landed in a send leaves the generator open: its ``finally`` (the streams' end and
            # token counts, how the answer ended) must run before ``Observe`` writes the audit record, not at GC
            with anyio.CancelScope(shield=True), contextlib.suppress(RuntimeError):  # RuntimeError: still running
                await self.body_iterator.aclose()

    async def listen_for_disconnect(self, receive) -> None:
        await super().listen_for_disconnect(receive)  # returns only on http.disconnect, else it is cancelled
        if not self.record.answered:  # the server reports a disconnect once the response is complete, too
            self.record.client_left()
