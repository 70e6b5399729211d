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


def refuse_markup(messages: list[dict], markup: frozenset[str]) -> None:
    """``InputError`` when a message's text holds the model's prompt markup written out (``<|im_end|>``).

    The rendered prompt is tokenized with its markup tokens parsed (the template is written with them), so such
    text in a message would end that message, and what follows would read as a turn of its own: a system turn forged
    from pasted text, or from a template's input. OpenAI's API reads such text as characters; refusing it says so
    at once. An assistant message is the model's own earlier answer, and may hold what the template itself strips
    (R1-Distill's ``</think>``): it is not checked."""
    if not markup:
        return
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") == "assistant":
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts = [content]
        elif isinstance(content, list):
            texts = [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        else:
            texts = []
        for text in texts:
            found = sorted(m for m in markup if m in text)
            if found:
                raise InputError(
                    f"messages[{i}] ({message.get('role', '?')}) holds '{found[0]}', markup of this model's prompt "
                    "format: the model would read it as the format's own (the end of a message, a turn or a tool "
                    "call of its own), not as text.", f"remove '{found[0]}' from the text")


def no_system_role(render_chat, system: str) -> str | None:
    """Why ``system`` goes before the first user message (``with_system``) rather than in a system message of its own,
    or None when the model's chat template takes one. ``render_chat``: the engine's (messages to prompt text).

    A template without a system role (Mistral's, Gemma 2's) either refuses a system message (the reason is its
    refusal) or leaves it out of the prompt without a word (the prompt is the same with it as without it): either way
    the text would not reach the model. ``InputError`` when the template refuses the text in the first user message
    too (the model's markup in it); the caller names where the text came from.

    A template that writes its own default system message where none is given (SmolLM2's, Qwen2.5's) renders the
    same prompt with that very text sent as ours: another text tells it from one that drops every system message."""
    probe = {"role": "user", "content": "x"}
    try:
        alone = render_chat([probe])
        if render_chat([{"role": "system", "content": system}, probe]) != alone:
            return None
        other = "." if system != "." else ","  # a text that is not the template's default
        if render_chat([{"role": "system", "content": other}, probe]) != alone:
            return None  # the system text was the template's own default: it is taken, not dropped
        why = "the model's chat template leaves a system message out of the prompt"
    except InputError as exc:
        why = exc.problem.rstrip(".")
    render_chat([{"role": "user", "content": with_system(system, probe["content"])}])
    return why


def with_system(system: str, text: str) -> str:
    """The first user message where the system text cannot be a message of its own (``no_system_role``)."""
    return f"{system}\n\n{text}"


def fold_system(render_chat, messages: list[dict]) -> tuple[list[dict], str | None]:
    """``messages`` as the model's chat template takes them, and why they were changed (None: they were not).

    A system message followed by a user message stays as it is where the template takes a system role; where it has
    none (``no_system_role``: it refuses or drops one) the system text goes before the user's, in one user message
    (``with_system``), so it reaches the model: ``edgemed run``'s --system and a template's safety preamble alike.
    Other conversations are returned as they are. ``InputError`` as ``no_system_role`` raises it; the caller names
    where the text came from."""
    if not system_then_user(messages):
        return messages, None
    return folded(messages, no_system_role(render_chat, messages[0]["content"]))


def system_then_user(messages: list[dict]) -> bool:
    """Whether ``messages`` start with a system message and then a user message, both of plain text: the only
    conversation ``fold_system`` may change."""
    return (len(messages) >= 2 and messages[0].get("role") == "system" and messages[1].get("role") == "user"
            and isinstance(messages[0].get("content"), str) and isinstance(messages[1].get("content"), str))


def folded(messages: list[dict], why: str | None) -> tuple[list[dict], str | None]:
    """``fold_system``'s answer where ``why`` (``no_system_role``'s, None: the template takes a system role) is
    already known: the system text before the first user message's, or ``messages`` as they are."""
    if why is None or not system_then_user(messages):
        return messages, None
    system, first = messages[0]["content"], messages[1]["content"]
    return [{**messages[1], "content": with_system(system, first)}, *messages[2:]], why


#: the system text ``probe_system_role`` sends: no markup, and not a real template's default system message
PROBE_SYSTEM = "."


def probe_system_role(render_chat) -> str | None:
    """``no_system_role`` for the chat template itself rather than for one system text: whether it takes a system
    role depends on the template, not on what a request's system message says, so a server learns it once (with the
    probe text ``PROBE_SYSTEM``) and folds every request's messages with ``folded``, at one render per request instead
    of ``fold_system``'s two to four probes more. A request's text the template refuses (the model's markup in it) is
    refused when its prompt is rendered. ``InputError``, ``TemplateError`` as the renders raise them."""
    return no_system_role(render_chat, PROBE_SYSTEM)


def warm() -> None:
    """Start the renderer process now (in the background), so the first render does not wait for it."""
    limits.warm()
