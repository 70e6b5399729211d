"""The clinician's page of ``edgemed serve``: ``GET /`` and its static files (``ui/``), and ``GET /ui/info``.

The page is plain HTML, CSS and one script shipped inside the package: no CDN, no web font, no inline
script or style, and no request anywhere but this server. Its responses carry a Content-Security-Policy
that says so to the browser (``default-src 'self'``, ``connect-src 'self'``, no inline script), and with
``require-trusted-types-for 'script'`` the browser itself refuses any HTML built from a string: model
output and form inputs can only ever be shown as text.

The page talks to the same ``/v1`` API, keys and audit as any other client. What no ``/v1`` route says —
the model card's intended use, users and limitations, the template index that drives the forms, and the safety
preamble the page's chat sends first as its system message (``edgemed chat``'s default) — is
``GET /ui/info`` (read only; behind the API key when the server has keys, like ``/v1``; see ``middleware.Guard``).
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from edgemed.serve.state import served
from edgemed.templates.library import safety_preamble

#: Where the page's files live inside the package.
UI_DIR = "ui"
#: URL path -> (file under ``ui/``, media type). Nothing else is served: no directory walk, no path from the URL.
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/think.js": ("think.js", "text/javascript; charset=utf-8"),
    "/ui/app.css": ("app.css", "text/css; charset=utf-8"),
    "/ui/icon.svg": ("icon.svg", "image/svg+xml"),
}
INFO_PATH = "/ui/info"

#: The browser may load and connect to this server only; no inline script, no plugin, no framing, no form posts
#: (the page sends with fetch), and no HTML from strings (Trusted Types with no policy at all). ``no-store``: nothing
#: cached, and the page never kept in the back/forward cache, where a Back press in the tab after the clinician
#: went elsewhere would show the whole conversation again.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "font-src 'none'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
       "require-trusted-types-for 'script'; trusted-types 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), clipboard-read=()",
    "Cache-Control": "no-store",
}

#: Shown under every answer.
SAFETY_LINE = ("Decision support only: it supports, and never replaces, a qualified clinician's judgement. "
               "Check facts, doses and references before acting. In an emergency, call local emergency services.")
#: Card fields the page shows before the first question, in this order (``packaging.card.FIELDS`` names them;
#: ``license`` is the manifest's ``model.license``, the model's own metadata, which ``edgemed serve`` adds).
CARD_FIELDS = ("model_name", "version", "developer", "license", "intended_use", "intended_users", "decision_role",
               "out_of_scope_use", "known_limitations")

router = APIRouter()


def _read(name: str) -> bytes:
    return (resources.files("edgemed.serve") / UI_DIR / name).read_bytes()


def _asset_route(path: str, name: str, media_type: str) -> None:
    body = _read(name)  # read once: the files are small and ship with the package

    async def asset():
        return Response(body, media_type=media_type, headers=HEADERS)

    asset.__name__ = asset.__qualname__ = "page" if path == "/" else "page_" + name.replace(".", "_")
    router.add_api_route(path, asset, methods=["GET"], include_in_schema=False)


for _path, (_name, _type) in ASSETS.items():
    _asset_route(_path, _name, _type)


def field_kind(name: str, spec: dict, choices_from: str) -> str:
    """How the form asks for one template input: ``options`` (the choices a ``choice`` contract reads),
    ``line`` (a setting with a default, e.g. a reading level) or ``long`` (a case, a note, a question)."""
    if name == choices_from:
        return "options"
    return "line" if "default" in spec else "long"


def template_info(template) -> dict:
    """One template as the page's form needs it: its inputs, and what shape of answer its contract gives."""
    c = template.contract
    fields = [{"name": name, "help": spec.get("help", ""), "default": spec.get("default", ""),
               "required": spec.get("required", True) and "default" not in spec,
               "kind": field_kind(name, spec, c.choices_from)} for name, spec in template.inputs.items()]
    schema = c.schema or {}
    columns = list(schema.get("properties", {})) if c.kind == "json" else []
    return {"name": template.name, "title": template.title, "kind": c.kind, "label": c.label,
            "choices": list(c.choices), "choices_from": c.choices_from or None, "columns": columns,
            "fields": fields, "example": dict(template.examples[0]) if template.examples else {}}


@router.get(INFO_PATH, include_in_schema=False)
async def info(request: Request):
    """The model, its card, and the template index: what the page shows before the first question; and the shipped
    safety preamble its chat sends as the system message (a template's requests carry their own)."""
    srv = served(request)
    config = srv.config
    card = {key: config.card[key] for key in CARD_FIELDS if config.card.get(key)}
    body = {"model": config.model_id, "context_length": srv.batcher.n_ctx_per_slot, "card": card,
            "safety": SAFETY_LINE, "preamble": safety_preamble(), "keys_required": config.api_keys is not None,
            "templates": [template_info(t) for t in srv.templates.values()]}
    return JSONResponse(body, headers=HEADERS)


#: path -> endpoint label of the metrics (``middleware.Observe``), as ``routes.LABELS``
LABELS = {route.path: route.name for route in router.routes}
