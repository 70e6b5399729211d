"""The ASGI app of ``edgemed serve``: OpenAI's API over a ``Batcher``, with audit, metrics and limits.

``create_app`` wires the parts: the app's ``Served`` state (``state.py``), the routes (``routes.py``;
the generation endpoints are rows of ``endpoints.py``, answered by ``generate.py``; the clinician page,
``page.py``, unless ``--no-ui``), the error shapes
and the middleware. Every error, whatever raised it, leaves in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.

Middleware, outermost first: ``Observe`` (request id, metrics, audit record; see
``middleware.py``), ``CORSMiddleware`` only when ``--cors-origin`` names origins, and only on ``/v1/``
(``ApiCors``; otherwise browsers refuse other origins the response), ``Guard`` (Host, origin, API key, audit ok,
body size).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from urllib.parse import unquote

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from edgemed.errors import EdgemedError
from edgemed.runtime import chat_template
from edgemed.serve import page
from edgemed.serve.api import ApiError, as_api_error, error_response
from edgemed.serve.config import ServeConfig
from edgemed.serve.metrics import Metrics
from edgemed.serve.middleware import CORS_PATHS, Guard, Observe, record_of
from edgemed.serve.routes import LABELS, PATTERNS, router
from edgemed.serve.state import Served, base_identity
from edgemed.templates import load_templates

log = logging.getLogger(__name__)


def create_app(batcher, config: ServeConfig, templates: dict | None = None):
    """The FastAPI app serving ``batcher`` (already started; the caller closes it after the server stops), with
    ``templates`` (default: loaded now; ``edgemed serve`` loads and checks them before the model)."""
    metrics = Metrics(batcher)
    app = FastAPI(title="edgemed", docs_url=None, redoc_url=None, openapi_url=None, lifespan=_lifespan)
    templates = load_templates() if templates is None else templates
    # the base file as loaded (the batcher has started): an adapter add later checks it is still that file
    app.state.served = Served(batcher, config, metrics, templates, int(time.time()),
                              base=base_identity(getattr(batcher, "model_path", None)))
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(EdgemedError, _edgemed_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http)
    app.include_router(router)
    if config.page_enabled:  # the clinician page at / (page.py); off with --no-ui
        app.include_router(page.router)
    # -- middleware (added innermost first) --
    app.add_middleware(Guard, config=config)
    if config.cors_origins:
        app.add_middleware(ApiCors, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"], allow_credentials=False, max_age=600,
                           expose_headers=["x-request-id", "x-edgemed-seed", "x-edgemed-think"])
    app.add_middleware(Observe, config=config, metrics=metrics, labels={**LABELS, **page.LABELS},
                       patterns=PATTERNS, stopping=app.state.served.stopping)
    return app


class ApiCors:
    """``--cors-origin``'s allowance, for the OpenAI API (``/v1/``) only: a web page on a named origin asks the model
    questions; it never reads ``/metrics`` or the clinician page's data, nor adds or removes adapters at ``/admin/``
    (``Guard`` refuses its requests there as it refuses any other origin's)."""

    def __init__(self, app, **options):
        self.app, self.cors = app, CORSMiddleware(app, **options)

    async def __call__(self, scope, receive, send):
        api = scope["type"] == "http" and scope["path"].startswith(CORS_PATHS)
        await (self.cors if api else self.app)(scope, receive, send)


class AccessLogPaths(logging.Filter):
    """uvicorn's access log line (on by default) names the route a request went to, never what a client wrote into
    its URL (a model name, an adapter name, a query string, a path that is no route: text that may hold PHI): a route
    with a parameter shows as its pattern (``/v1/models/{model_id:path}``), any other path as ``-``."""

    def __init__(self, app):
        super().__init__()
        self.routes = [(r.path_regex, r.path) for r in _flat(app.routes)]

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args  # uvicorn's: client, method, path with query string, HTTP version, status
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            path = unquote(args[2].split("?", 1)[0])  # uvicorn logs the raw path; routes match the decoded one
            shown = next((template for regex, template in self.routes if regex.match(path)), "-")
            record.args = (*args[:2], shown, *args[3:])
        return True


def _flat(routes):
    """Every route with a path pattern, through FastAPI's wrappers of included routers (none has a prefix here)."""
    for route in routes:
        if hasattr(route, "path_regex"):
            yield route
        elif getattr(route, "original_router", None) is not None:
            yield from _flat(route.original_router.routes)


@contextlib.asynccontextmanager
async def _lifespan(app):
    srv: Served = app.state.served
    config, batcher = srv.config, srv.batcher
    start = dict(host=config.host, port=config.port, model=config.model_id, bundle_digest=config.bundle_digest,
                 slots=batcher.slots, queue_size=getattr(batcher, "queue_size", None))
    if hasattr(batcher, "adapters"):  # the adapters served from the start, each with the weights it stands for
        start["adapters"] = [{"name": name, "sha256": a["sha256"], "scale": a["scale"]}
                             for name, a in sorted(batcher.adapters().items())]
    if config.audit is not None:
        head = await asyncio.to_thread(lambda: config.audit.append("start", content_logged=config.audit.content, **start))
        log.info("audit log %s: head %s (record it elsewhere to detect truncation or rewriting)",
                 config.audit.path, head)
    chat_template.warm()  # the template renderer process starts now, not at the first request
    yield
    if config.audit is not None:
        try:
            head = await asyncio.to_thread(lambda: config.audit.append("stop", model=config.model_id))
        except OSError as exc:  # the log failed while serving (requests were refused since) or fails now
            log.error("audit log %s: the stop record was not written (%s)", config.audit.path, exc)
        else:
            log.info("audit log %s: head %s at stop", config.audit.path, head)


# -- error shapes ------------------------------------------------------------------------------------------
async def _api_error(request, exc: ApiError):
    record_of(request.scope).error_code = exc.code
    return error_response(exc)


async def _edgemed_error(request, exc: EdgemedError):
    return await _api_error(request, as_api_error(exc))


async def _invalid(request, exc: RequestValidationError):
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    text = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                     for e in errors[:3])
    return await _api_error(request, ApiError(400, f"Invalid request: {text}.", param=".".join(loc) or None))


async def _http(request, exc: HTTPException):
    message = {404: f"No route {request.url.path}. Fix: the API is under /v1 (chat/completions, completions, models).",
               405: f"{request.method} is not allowed on {request.url.path}."}.get(exc.status_code, str(exc.detail))
    return await _api_error(request, ApiError(exc.status_code, message, headers=dict(exc.headers or {})))
