"""Render a Hugging Face chat template (Jinja) in a sandbox, with limits, as the model was trained to see it.

Templates come with downloaded models, so they are untrusted code: they run in
Jinja's ``ImmutableSandboxedEnvironment`` (no attribute access to Python
internals, no mutation of the passed objects) inside a separate renderer
process with limits on time, output size, memory and recursion
(``edgemed.templates.limits``). The variables and helpers are the ones
transformers provides: ``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token``, ``raise_exception``, ``strftime_now``, ``tojson``.
"""

from __future__ import annotations

from edgemed.errors import InputError, TemplateError
from edgemed.templates import limits

FIX = ("the model file's chat template (tokenizer.chat_template) is broken or hostile: convert the model again with "
       "a working template, or send raw text (edgemed run --raw, or POST /v1/completions)")


def render(template: str, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = True, seconds: float = limits.MAX_SECONDS,
           max_output: int | None = None, **extra) -> str:
    """The prompt text ``template`` produces for ``messages``.

    ``InputError`` when the template refuses the conversation (its ``raise_exception``) or the
    messages are not valid Unicode; ``TemplateError`` when the template does not compile, fails,
    breaks a limit (``seconds``, ``max_output`` characters, memory, recursion) or renders nothing.
    """
    values = dict(extra, messages=messages, add_generation_prompt=add_generation_prompt,
                  bos_token=bos_token, eos_token=eos_token)
    try:
        prompt = limits.render(template, values, flavor="chat", seconds=seconds, max_output=max_output)
    except limits.RenderFailure as exc:
        if exc.kind == "refused":
            raise InputError(f"The model's chat template refused the conversation: {exc.detail}",
                             "check the message roles and their order") from None
        raise TemplateError(f"The model's chat template {exc.reason}.", FIX) from None
    if not prompt.strip():
        raise TemplateError("The model's chat template rendered an empty prompt for these messages.", FIX)
    return prompt


def warm() -> None:
    """Start the renderer process now (in the background), so the first render does not wait for it."""
    limits.warm()
