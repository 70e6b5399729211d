"""The routes of ``edgemed serve``, at module level on one ``APIRouter``: ``GET /health``, ``/metrics``,
``/v1/models``, ``/v1/models/{id}``, and a ``POST`` route per row of ``endpoints.ENDPOINTS`` (``/v1/chat/completions``,
``/v1/completions``; streaming as SSE or not), whose bodies are read by ``parse_body``. Each reads the app's ``Served`` from the request.
``/v1/models`` lists the base as MODEL and each served LoRA adapter as MODEL:ADAPTER. ``POST /admin/adapters``
(``{"name", "path" | "adapter", "scale"}``) and ``DELETE /admin/adapters/{name}`` add and remove adapters on the
running server (``middleware.Guard``: the API key when the server has keys, else loopback clients only). An added
adapter first passes ``ServeConfig.admit_adapter`` (made for this base: 400; fits the memory plan with what is
loaded, removed adapters still finishing requests included: 507; the host self-test for the model with that whole set
and the new one: 409), one add at a time; a base file that no longer reads, or that is no longer the file loaded at
start (replaced on disk), is the server's 500; a refusal loads nothing,
and says in words for an HTTP caller what is wrong, with a ``code`` and the body field at fault in ``param``. Admin
calls' audit records name the adapter with the sha256 and scale of its weights (``middleware.adapter_fields``).
``LABELS`` (path -> the handler's name) is what the metrics and the audit call each route, read off the router.
"""

import dataclasses
import json
import threading

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from edgemed.serve import api
from edgemed.serve.endpoints import ENDPOINTS, Endpoint
from edgemed.serve.generate import check_model, generate, served_models
from edgemed.serve.state import base_identity, request_record, served

router = APIRouter()
#: One admin add at a time: two adds checked against the same free memory must not both load.
_ADDING = threading.Lock()


@router.get("/health")
async def health(request: Request):
    """Liveness, open to anyone. On a server with API keys it says only its status: busy slots and queue depth,
    polled, would time other clinicians' requests, and a failed log's detail names a path (``/metrics``, keyed,
    has the load)."""
    srv = served(request)
    private = srv.config.api_keys is None
    if not srv.batcher.alive():  # the scheduler is gone: every request would be refused, so say so here too
        detail = {"detail": "the model server's scheduler is not running; see the server log"}
        return JSONResponse({"status": "scheduler_stopped", **detail}, status_code=503)
    audit = srv.config.audit
    if audit is not None and audit.failed:
        return JSONResponse({"status": "audit_failed", **({"detail": audit.failed} if private else {})},
                            status_code=503)
    if not private:
        return {"status": "ok"}
    stats = srv.batcher.stats()
    return {"status": "ok", "model": srv.config.model_id, "slots": stats.get("slots"),
            "active_slots": stats.get("active_slots"), "queue_depth": stats.get("queue_depth")}


@router.get("/metrics")
async def metrics(request: Request):
    data, content_type = served(request).metrics.render()
    return Response(data, media_type=content_type)


def _card(request: Request, name: str) -> api.ModelCard:
    srv = served(request)
    more = {}
    if name != srv.config.model_id:
        more = {"parent": srv.config.model_id, "adapter": name[len(srv.config.model_id) + 1:]}
    return api.ModelCard(id=name, created=srv.created, bundle_digest=srv.config.bundle_digest,
                         context_length=srv.batcher.n_ctx_per_slot, **more)


@router.get("/v1/models")
async def models(request: Request):
    return api.ModelList(data=[_card(request, n) for n in served_models(served(request))]).model_dump()


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request):
    check_model(served(request), model_id)
    return _card(request, model_id).model_dump()


@router.get("/admin/adapters", name="adapters")  # one label for the path, whatever the method
async def list_adapters(request: Request):
    """The adapters served (name -> file, scale, sha256) and those removed that still answer running requests
    (``finishing``: with their count; a name there is free once they end)."""
    batcher = served(request).batcher
    return {"adapters": batcher.adapters(), "finishing": batcher.finishing()}


@router.post("/admin/adapters", name="adapters")
async def add_adapter(request: Request):
    """Load a LoRA adapter on the running server: ``{"name", "path": FILE | "adapter": INSTALLED_NAME, "scale"}``.
    Every refusal is an error with a ``code`` and the body field it is about in ``param``."""
    import math
    from pathlib import Path

    from starlette.concurrency import run_in_threadpool

    from edgemed.errors import AdapterNotFound, IntegrityError
    from edgemed.runtime.loader import AdapterSpec

    srv = served(request)
    record = request_record(request)
    raw = await request.body()
    try:
        data = api.loads_body(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or \
            sum(isinstance(data.get(k), str) for k in ("path", "adapter")) != 1:
        raise api.ApiError(400, "The body must be a JSON object with \"name\" and one of \"path\" (a GGUF adapter "
                                "file on the server) or \"adapter\" (an installed adapter's name), and optionally "
                                "\"scale\". Fix: send {\"name\": \"cardio\", \"adapter\": \"cardio\"}.", code="invalid_json")
    scale = data.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or not 0 <= scale <= 4:
        raise api.ApiError(400, f"scale must be a number from 0 to 4, not {scale!r}. Fix: pass 1 (as trained) or "
                                "a fraction.", code="invalid_scale", param="scale")
    if isinstance(data.get("path"), str):
        field, path = "path", Path(data["path"])
        if not path.is_file():
            raise api.ApiError(400, f"'{path}' is not a file on the server. Fix: pass the path of a .lora.gguf that "
                                    "`edgemed convert --adapter-only` wrote.", code="adapter_not_found", param="path")
        spec = AdapterSpec(path, float(scale))
    else:
        field = "adapter"
        if srv.config.resolve_adapter is None:
            raise api.ApiError(400, "This server cannot look up installed adapters. Fix: pass \"path\".",
                               code="adapter_lookup_unavailable", param="adapter")
        try:
            spec = await run_in_threadpool(srv.config.resolve_adapter, data["adapter"])
        except AdapterNotFound as exc:
            raise api.ApiError(400, f"'{exc.name}' is not an adapter of '{srv.config.model_id}' on this server (its "
                                    f"adapters: {', '.join(exc.available) or 'none'}). Fix: send one of those as "
                                    "\"adapter\", install the adapter's bundle on the server first (`edgemed install "
                                    "NAME-ADAPTER.edgemed`), or send \"path\" with a .lora.gguf file on the server.",
                               code="adapter_not_found", param="adapter") from None
        except IntegrityError as exc:  # its bundle fails verification or the trust policy
            raise api.ApiError(409, f"{exc.problem} Fix: {exc.fix}", code="adapter_unverified", param="adapter") from None
        spec = dataclasses.replace(spec, scale=float(scale))  # with the stamp its bundle was verified with
    added = await run_in_threadpool(_admit_and_add, srv, data["name"], spec, field)
    record.adapter = data["name"]  # served now
    record.adapter_sha256, record.adapter_scale = added["sha256"], added["scale"]
    return {"added": data["name"], "model": f"{srv.config.model_id}:{data['name']}", **added}


def _admit_and_add(srv, name: str, spec, field: str) -> dict:
    """``admit_adapter``'s checks, then the load (a worker thread; one add at a time): what ``Batcher.add_adapter``
    says of it, or an ``ApiError`` whose ``param`` is the body field at fault (``field``: the adapter's)."""
    from pathlib import Path

    from edgemed.errors import EdgemedError, InputError, ModelLoadError, PlanError
    from edgemed.runtime.batch.batcher import AdapterNameTaken
    from edgemed.runtime.loader import AdapterSpec

    # the file as its bundle was verified, else as it is now: an IntegrityError with it still so is its own damage
    before = tuple(spec.stamp.stamp) if spec.stamp is not None else _file_stamp(spec.path)
    with _ADDING:
        try:  # a bad or taken name is said before the self-test's child runs for it
            srv.batcher.check_new_adapter(name)
        except AdapterNameTaken as exc:
            raise _name_taken(exc) from None
        except InputError as exc:  # a name no model name can carry
            raise api.ApiError(400, f"{exc.problem} Fix: {exc.fix}.", code="invalid_adapter_name", param="name") from None
        try:  # every verdict below reads the base file: it must still be the one the model served was loaded from
            _same_base(srv, spec)
        except EdgemedError as exc:
            raise _refused(srv, exc, field, spec, before) from None
        if srv.config.admit_adapter is not None:
            served = [AdapterSpec(Path(a["path"]), a["scale"]) for a in srv.batcher.adapters().values()]
            # removed ones still answering keep their tensors (asked second: one removed meanwhile is counted twice,
            # never missed)
            finishing = [AdapterSpec(Path(a["path"]), a["scale"]) for a in srv.batcher.finishing().values()]
            try:
                srv.config.admit_adapter(served, spec, finishing)
            except PlanError as exc:
                raise api.ApiError(507, f"{exc.problem} Fix: {exc.fix}", "server_error", "insufficient_memory") from None
            except ModelLoadError as exc:
                raise api.ApiError(409, f"{exc.problem} Fix: {exc.fix}", "server_error", "adapter_selftest_failed") from None
            except EdgemedError as exc:
                raise _refused(srv, exc, field, spec, before) from None
        try:  # an installed adapter: the bytes loaded must be the ones verified, before any request can name it
            return srv.batcher.add_adapter(name, spec, check=srv.config.loaded_adapter)
        except ModelLoadError as exc:  # a file llama.cpp does not take: the caller's to fix, not a server failure
            raise api.ApiError(400, f"{exc.problem} Fix: {exc.fix}", code="adapter_not_loadable", param=field) from None
        except EdgemedError as exc:
            raise _refused(srv, exc, field, spec, before) from None


def _same_base(srv, spec) -> None:
    """Refuse an add, as the server's fault (500 ``base_changed``), when the base file on disk is no longer the one
    loaded at start (``Served.base``: replaced by another file, or rewritten): the adapter's checks read that file, so
    their verdict would be about a model this server does not run. A file there that no longer reads as a GGUF is
    ``loader.BaseUnreadable`` (``base_unreadable``), as the checks and the load say it."""
    from edgemed.runtime.loader import loaded_base_metadata

    if srv.base is None:  # not known (a batcher with no model file)
        return
    path = srv.batcher.model_path
    if base_identity(path) == srv.base:
        return
    loaded_base_metadata(path, spec.path)  # raises where it no longer reads
    raise api.ApiError(500, f"The base model file '{path}' is no longer the file this server loaded at its start: "
                            "it was replaced or rewritten on disk since, and the server still runs the model it loaded "
                            f"then. The adapter '{spec.path.name}' was not checked against the new file, nor loaded. "
                            "Fix: restart the server to load the base file now there (then add the adapter again), or "
                            "put back the file it was started on.", "server_error", "base_changed")


def _file_stamp(path) -> tuple | None:
    """``path``'s stamp now (``files.hashing.stamp``; None: gone)."""
    import os

    from edgemed.files.hashing import stamp

    try:
        return stamp(os.stat(path))
    except OSError:
        return None


def _refused(srv, exc, field: str, spec=None, before: tuple | None = None):
    """The HTTP error for an adapter ``admit_adapter`` or the load refused (``field``: the body field naming it).
    ``spec``'s file with its stamp still ``before`` (as verified or first seen) had no change for an ``IntegrityError``
    to find: that one is the file's own damage (the header reader's "truncated or damaged"), the caller's to fix, told
    from a change as ``Batcher.add_adapter`` tells them apart."""
    from edgemed.errors import AdapterError, InputError, IntegrityError
    from edgemed.runtime.batch.batcher import AdapterNameTaken
    from edgemed.runtime.loader import BaseUnreadable, MergedBase

    model = srv.config.model_id
    if isinstance(exc, AdapterNameTaken):  # added meanwhile
        return _name_taken(exc)
    if isinstance(exc, BaseUnreadable):  # the server's own base file: nothing the caller sends mends it
        return api.ApiError(500, f"{exc.problem} Fix: {exc.fix}.", "server_error", "base_unreadable")
    if isinstance(exc, MergedBase):  # the server's base is at fault: no adapter made for its checkpoint runs on it
        return api.ApiError(409, f"{exc.problem} Fix: serve the unmerged base: restart this server on a GGUF converted "
                                 "from the plain checkpoint (`edgemed convert CHECKPOINT`), then add the adapter to it.",
                            code="base_has_merged_lora", param=field)
    if isinstance(exc, AdapterError):  # its header names another base (or architecture); a file llama.cpp reads
        # otherwise than its header is an InputError below (damaged, not another base)
        return api.ApiError(400, f"{exc.problem} Fix: send as \"{field}\" an adapter made for '{model}', the model "
                                 "this server runs; this one runs only on the base it was made for.",
                            code="adapter_base_mismatch", param=field)
    if isinstance(exc, IntegrityError):
        if spec is not None and before is not None and _file_stamp(spec.path) == before:  # damaged as it was given
            return api.ApiError(400, f"{exc.problem} Fix: {exc.fix}, then send it again.", code="adapter_not_loadable",
                                param=field)
        # the file changed between its verification (or first stat) and its load
        return api.ApiError(409, f"{exc.problem} Fix: {exc.fix}", "server_error", "adapter_changed", field)
    if isinstance(exc, InputError):  # not a GGUF LoRA adapter, or unreadable
        return api.ApiError(400, f"{exc.problem} Fix: send an adapter that `edgemed convert --adapter-only` wrote for "
                                 f"'{model}': its .lora.gguf file as \"path\", or its installed bundle's name as "
                                 "\"adapter\".", code="adapter_not_loadable", param=field)
    return api.as_api_error(exc)


def _name_taken(exc) -> api.ApiError:
    """409 for a name served now, or removed and still answering its running requests (``AdapterNameTaken``)."""
    name = exc.name
    if exc.finishing is None:
        return api.ApiError(409, f"An adapter named '{name}' is already served. Fix: remove it first (DELETE "
                                 f"/admin/adapters/{name}) to replace it, or pick another name.",
                            code="adapter_name_taken", param="name")
    return api.ApiError(409, f"The adapter '{name}' was removed and still answers {exc.finishing} running request(s); "
                             "its name is free once they end. Fix: wait until GET /admin/adapters no longer lists "
                             f"'{name}' under \"finishing\", then add it again (or pick another name).",
                        code="adapter_finishing", param="name")


@router.delete("/admin/adapters/{name}")
async def remove_adapter(name: str, request: Request):
    """Stop serving an adapter: new requests for it get 404; the running ones finish first, then it is freed."""
    from starlette.concurrency import run_in_threadpool

    removed = await run_in_threadpool(served(request).batcher.remove_adapter, name)
    record = request_record(request)
    record.adapter = name  # a served name (an unknown one raised): never text a client made up
    record.adapter_sha256, record.adapter_scale = removed["sha256"], removed["scale"]
    return {"removed": name, "requests_finishing": removed["requests"], "sha256": removed["sha256"],
            "scale": removed["scale"]}


#: content part types that carry something other than text
NOT_TEXT = {"image_url": "images", "input_image": "images", "image": "images", "input_audio": "audio",
            "audio": "audio", "file": "files", "input_file": "files", "video_url": "video"}


async def parse_body(request: Request, model: type):
    """The request body as ``model``: malformed JSON, a number JSON has no place for (``NaN``: ``api.loads_body``),
    a part this text model cannot read, or a field failing validation is a 400 naming the field in ``param``
    (OpenAI's shape), read here rather than by FastAPI so that ``param`` names the field and never a position in
    the JSON text."""
    raw = await request.body()
    try:
        data = api.loads_body(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError and TooDeep
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise api.ApiError(400, f"The request body is not valid JSON{where}: {getattr(exc, 'msg', exc)}. Fix: send "
                                "one JSON object, with content-type application/json.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise api.ApiError(400, "The request body must be a JSON object. Fix: send {\"model\": ..., ...}.",
                           code="invalid_json")
    _text_only(data, served(request).config.model_id)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        text = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in errors[:3])
        param = ".".join(str(p) for p in errors[0].get("loc", ())) if errors else None
        raise api.ApiError(400, f"Invalid request: {text}. Fix: correct '{param or 'the body'}' (see "
                                "docs/openai.md for the fields edgemed reads).", param=param or None) from None


def _text_only(data: dict, model_id: str) -> None:
    messages = data.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind in NOT_TEXT:  # any other type is the request model's to refuse (400)
                raise api.ApiError(400, f"{NOT_TEXT[kind].capitalize()} are not supported by this model: "
                                        f"'{model_id}' reads text only. Fix: send the content as text parts "
                                        "(describe the image in words).", param=f"messages.{i}.content.{j}",
                                   code="unsupported_content")


def _generation_route(endpoint: Endpoint) -> None:
    async def handler(request: Request):
        return await generate(endpoint, await parse_body(request, endpoint.request), request)

    handler.__name__ = handler.__qualname__ = endpoint.name
    router.add_api_route(endpoint.path, handler, methods=["POST"])


for _endpoint in ENDPOINTS:
    _generation_route(_endpoint)

#: path -> endpoint label of the metrics and the audit (``middleware.Observe``): every route's handler name ...
LABELS = {route.path: route.name for route in router.routes if "{" not in route.path}
#: ... and for a route with a path parameter (``/v1/models/{id}``), its path pattern -> its handler name: the label
#: is the route's, never the id a client sent (a client cannot mint label values)
PATTERNS = tuple((route.path_regex, route.name) for route in router.routes if "{" in route.path)
