"""The routes of ``edgemed serve``, at module level on one ``APIRouter``: ``GET /health``, ``/metrics``,
``/v1/models``, ``/v1/models/{id}``, and a ``POST`` route per row of ``endpoints.ENDPOINTS`` (``/v1/chat/completions``,
``/v1/completions``; streaming as SSE or not), whose bodies are read by ``parse_body``. Each reads the app's ``Served`` from the request.
``LABELS`` (path -> the handler's name) is what the metrics and the audit call each route, read off the router.
"""

import json

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from edgemed.serve import api
from edgemed.serve.endpoints import ENDPOINTS, Endpoint
from edgemed.serve.generate import generate
from edgemed.serve.state import served

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    srv = served(request)
    stats = srv.batcher.stats()
    audit = srv.config.audit
    if audit is not None and audit.failed:
        return JSONResponse({"status": "audit_failed", "detail": audit.failed}, status_code=503)
    return {"status": "ok", "model": srv.config.model_id, "slots": stats.get("slots"),
            "active_slots": stats.get("active_slots"), "queue_depth": stats.get("queue_depth")}


@router.get("/metrics")
async def metrics(request: Request):
    data, content_type = served(request).metrics.render()
    return Response(data, media_type=content_type)


def _card(request: Request) -> api.ModelCard:
    srv = served(request)
    return api.ModelCard(id=srv.config.model_id, created=srv.created, bundle_digest=srv.config.bundle_digest,
                         context_length=srv.batcher.n_ctx_per_slot)


@router.get("/v1/models")
async def models(request: Request):
    return api.ModelList(data=[_card(request)]).model_dump()


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request):
    card = _card(request)
    if model_id != card.id:
        raise api.ApiError(404, f"The model '{model_id}' is not served here. Fix: use model '{card.id}' "
                                "(GET /v1/models lists it).", code="model_not_found", param="model")
    return card.model_dump()


#: content part types that carry something other than text
NOT_TEXT = {"image_url": "images", "input_image": "images", "image": "images", "input_audio": "audio",
            "audio": "audio", "file": "files", "input_file": "files", "video_url": "video"}


async def parse_body(request: Request, model: type):
    """The request body as ``model``: malformed JSON, a part this text model cannot read, or a field failing
    validation is a 400 naming the field in ``param`` (OpenAI's shape), read here rather than by FastAPI
    so that ``param`` names the field and never a position in the JSON text."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
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
            if kind in NOT_TEXT:
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

#: path -> endpoint label of the metrics and the audit (``middleware.Observe``): every route's handler name. The
#: middleware looks a request's path up as it is, so a route with a path parameter (``/v1/models/{id}``) cannot be
#: found here and is labelled "other" (which also keeps a client from minting labels with made-up ids).
LABELS = {route.path: route.name for route in router.routes if "{" not in route.path}
