"""Render a Hugging Face chat template (Jinja) in a sandbox, as the model was trained to see it.

Templates come with downloaded models, so they are untrusted code: they run in
Jinja's ``ImmutableSandboxedEnvironment`` (no attribute access to Python
internals, no mutation of the passed objects). The variables and helpers are
the ones transformers provides: ``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token``, ``raise_exception``, ``strftime_now``, ``tojson``.
"""

from __future__ import annotations

import json
from datetime import datetime

from edgemed.errors import InputError


def _raise(message: str):
    raise InputError(f"The model's chat template refused the conversation: {message}", "check the message roles and their order")


def _tojson(value, indent=None, ensure_ascii=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def render(template: str, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = True, **extra) -> str:
    """The prompt text ``template`` produces for ``messages``."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=bos_token, eos_token=eos_token, **extra)
    except TemplateError as exc:
        raise InputError(f"The model's chat template failed to render: {exc}.",
                         "use --raw to send the prompt without the template, or fix chat_template.jinja") from None
