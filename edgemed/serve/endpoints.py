"""The two generation endpoints as data: one ``Endpoint`` row each (path, request model, how the prompt
is built, how the answer is shaped), read by ``routes.py`` and ``generate.py``.

A prompt builder turns the request body into a ``Prompt`` (the text or token ids, the JSON schema
that constrains sampling, what edgemed adds to the answer); a ``Shape`` turns the answer into the
endpoint's OpenAI response, whole or as SSE chunks (head, one per piece, final, usage).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from starlette.concurrency import run_in_threadpool

from edgemed.errors import InputError, TemplateError
from edgemed.serve import api
from edgemed.serve.middleware import RequestRecord
from edgemed.serve.state import Served


def template_version(template) -> str:
    """Templates carry no version number: their version is a digest of everything that shapes the prompt
    and its parsing (system, user, inputs, contract, safety preamble), so any edit gives a new version."""
    c = template.contract
    source = {"name": template.name, "system": template.system, "user": template.user, "inputs": template.inputs,
              "preamble": template.preamble, "contract": {"kind": c.kind, "label": c.label, "choices": list(c.choices),
                                                         "choices_from": c.choices_from, "schema": c.schema}}
    text = json.dumps(source, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _nothing(text: str) -> dict:
    return {}


@dataclass(frozen=True)
class Prompt:
    """What the batcher is given for one request, and what the answer gains."""

    value: str | list[int]  # text to tokenize, or token ids
    json_schema: str | None = None  # constrains sampling (response_format, or a JSON-contract template)
    extra: Callable[[str], dict] = _nothing  # answer text -> edgemed's fields of the response


# -- prompts ---------------------------------------------------------------------------------------------
async def chat_prompt(served: Served, record: RequestRecord, body: api.ChatRequest) -> Prompt:
    """``messages``, or a medical template's messages, through the GGUF's chat template."""
    template = None
    json_schema = body.json_schema()
    if body.template:
        if body.messages:
            raise InputError("Send either 'messages' or 'template' (with 'template_inputs'), not both.",
                             "leave 'messages' empty when a template builds them")
        template = served.templates.get(body.template)
        if template is None:
            raise TemplateError(f"No prompt template named '{body.template}'.",
                                f"choose one of: {', '.join(sorted(served.templates))}")
        record.template = {"id": template.name, "version": template_version(template)}
        messages = await run_in_threadpool(template.messages, body.template_inputs)
        if template.contract.kind == "json" and json_schema is None and body.grammar is None:
            json_schema = template.contract.json_schema()
    elif not body.messages:
        raise InputError("'messages' is empty.", "send at least one message, or a 'template' with its inputs")
    else:
        messages = [m.as_template_message() for m in body.messages]
    # Rendering (a limited, but possibly slow, untrusted template) and tokenizing (a long prompt) run in a
    # worker thread: the event loop keeps answering /health and streaming other requests meanwhile.
    prompt = await run_in_threadpool(served.batcher.render_chat, messages)
    if template is None:
        return Prompt(prompt, json_schema)

    def parsed(text: str) -> dict:
        result = template.parse(text, body.template_inputs)
        return {"edgemed": {"template": record.template,
                            "parsed": {"ok": result.ok, "value": result.value, "error": result.error or None}}}

    return Prompt(prompt, json_schema, parsed)


async def completion_prompt(served: Served, record: RequestRecord, body: api.CompletionRequest) -> Prompt:
    """The prompt as sent: one string or one list of token ids."""
    return Prompt(body.prompt_value())


# -- response shapes ------------------------------------------------------------------------------------
@dataclass
class Shape:
    """One answer's OpenAI response: ``whole`` when collected, else ``head``, ``piece`` per text, ``final``, ``usage``."""

    id: str
    model: str
    extra: Callable[[str], dict] = _nothing
    created: int = field(default_factory=lambda: int(time.time()))  # of the streamed chunks

    def chunk(self, choices: list, **more) -> dict:
        raise NotImplementedError

    def head(self) -> list[dict]:
        return []

    def usage(self, finished) -> dict:
        return self.chunk([], usage=api.Usage.of(finished))


class ChatShape(Shape):
    def chunk(self, choices: list, **more) -> dict:
        return api.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices,
                                       **more).model_dump()

    def head(self) -> list[dict]:
        return [self.chunk([api.ChunkChoice(delta=api.Delta(role="assistant", content=""))])]

    def piece(self, text: str) -> dict:
        return self.chunk([api.ChunkChoice(delta=api.Delta(content=text))])

    def final(self, reason: str, text: str) -> dict:
        return self.chunk([api.ChunkChoice(delta=api.Delta(), finish_reason=reason)], **self.extra(text))

    def whole(self, text: str, reason: str, finished) -> dict:
        choice = api.ChatChoice(message=api.AssistantMessage(content=text), finish_reason=reason)
        return api.ChatCompletion(id=self.id, model=self.model, choices=[choice], usage=api.Usage.of(finished),
                                  **self.extra(text)).model_dump()


class CompletionShape(Shape):
    def chunk(self, choices: list, **more) -> dict:
        return api.Completion(id=self.id, created=self.created, model=self.model, choices=choices, **more).model_dump()

    def piece(self, text: str) -> dict:
        return self.chunk([api.TextChoice(text=text)])

    def final(self, reason: str, text: str) -> dict:
        return self.chunk([api.TextChoice(text="", finish_reason=reason)])

    def whole(self, text: str, reason: str, finished) -> dict:
        return api.Completion(id=self.id, model=self.model, choices=[api.TextChoice(text=text, finish_reason=reason)],
                              usage=api.Usage.of(finished)).model_dump()


# -- the table ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    """One generation endpoint: where it is, what it accepts, how it prompts, how it answers."""

    name: str  # the handler's name, and so the label of its metrics and audit records (routes.LABELS)
    path: str
    request: type  # the pydantic body model
    id_prefix: str  # of the response id, before the request id
    prompt: Callable[[Served, RequestRecord, object], Awaitable[Prompt]]
    shape: type  # a Shape subclass


ENDPOINTS = (
    Endpoint("chat", "/v1/chat/completions", api.ChatRequest, "chatcmpl-", chat_prompt, ChatShape),
    Endpoint("completions", "/v1/completions", api.CompletionRequest, "cmpl-", completion_prompt, CompletionShape),
)
