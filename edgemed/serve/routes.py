"""The routes of ``edgemed serve``, at module level on one ``APIRouter``: ``GET /health``, ``/metrics``,
``/v1/models``, and a ``POST`` route per row of ``endpoints.ENDPOINTS`` (``/v1/chat/completions``,
``/v1/completions``; streaming as SSE or not). Each reads the app's ``Served`` from the request.
``LABELS`` (path -> the handler's name) is what the metrics and the audit call each route, read off the router.
"""

# No ``from __future__ import annotations`` here: FastAPI reads a handler's body model from its annotation,
# and a generation handler's annotation is its table row's request model, evaluated when the handler is made.

from fastapi import APIRouter, Request
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


@router.get("/v1/models")
async def models(request: Request):
    srv = served(request)
    card = api.ModelCard(id=srv.config.model_id, created=srv.created, bundle_digest=srv.config.bundle_digest,
                         context_length=srv.batcher.n_ctx_per_slot)
    return api.ModelList(data=[card]).model_dump()


def _generation_route(endpoint: Endpoint) -> None:
    async def handler(body: endpoint.request, request: Request):
        return await generate(endpoint, body, request)

    handler.__name__ = handler.__qualname__ = endpoint.name
    router.add_api_route(endpoint.path, handler, methods=["POST"])


for _endpoint in ENDPOINTS:
    _generation_route(_endpoint)

#: path -> endpoint label of the metrics and the audit (``middleware.Observe``): every route's handler name
LABELS = {route.path: route.name for route in router.routes}
