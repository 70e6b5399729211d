"""Sandboxed Jinja for edgemed's own prompt templates (user-supplied template folders are untrusted too)."""

from __future__ import annotations

from edgemed.errors import TemplateError


def render(source: str, values: dict, where: str) -> str:
    """Render ``source`` with ``values``; a missing variable or an unsafe access is a ``TemplateError``."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, trim_blocks=True,
                                        lstrip_blocks=True, keep_trailing_newline=False, autoescape=False)
    try:
        return env.from_string(source).render(**values)
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"{where}: {exc}.", "pass the missing input (see `edgemed run --help`: --question, "
                            "--options, --input KEY=VALUE)") from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"{where}: the template failed to render: {exc}.", f"fix {where}") from None
