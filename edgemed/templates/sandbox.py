"""Sandboxed Jinja for edgemed's own prompt templates (user-supplied template folders are untrusted too).

They render like chat templates, in the limited renderer process (``limits.py``: time, output,
memory, recursion), with every input required (``StrictUndefined``).
"""

from __future__ import annotations

from edgemed.errors import TemplateError
from edgemed.templates import limits


def render(source: str, values: dict, where: str) -> str:
    """Render ``source`` with ``values``; a missing variable, an unsafe access or a broken limit is a ``TemplateError``."""
    try:
        return limits.render(source, values, flavor="prompt")
    except limits.RenderFailure as exc:
        if exc.kind == "undefined":
            raise TemplateError(f"{where}: {exc.detail}.", "pass the missing input (see `edgemed run --help`: "
                                "--question, --options, --input KEY=VALUE)") from None
        if exc.kind in ("syntax", "unsafe", "error"):
            raise TemplateError(f"{where}: the template failed to render: {exc.detail}.", f"fix {where}") from None
        raise TemplateError(f"{where}: the template {exc.reason}.", f"fix {where}") from None
