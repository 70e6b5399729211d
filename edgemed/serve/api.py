"""The wire format: OpenAI's request and response shapes (pydantic), and what edgemed adds to them.

Requests accept the OpenAI fields edgemed can honour and refuse, with a 400 that says
so, the ones whose silent loss would change the answer (tools, ``n`` > 1, logprobs,
logit bias, penalties). Unknown fields are ignored, as OpenAI's own server does.

edgemed's additions (request body, e.g. through the openai client's ``extra_body``):

* ``template`` + ``template_inputs`` — a medical prompt template (``edgemed run --template``)
  builds the messages; ``messages`` must then be empty. The response gains
  ``edgemed: {"template": {"id", "version"}, "parsed": {"ok", "value", "error"}}``.
* ``grammar`` — a GBNF grammar constraining the output (llama.cpp);
* ``top_k``, ``min_p``, ``repeat_penalty`` — sampler settings OpenAI does not have.

``response_format`` ``{"type": "json_schema", "json_schema": {"schema": {...}}}`` and
``{"type": "json_object"}`` constrain the output while sampling (JSON-schema grammar).
Defaults differ from OpenAI's in one place: ``temperature`` defaults to 0 (greedy, so the
same question gets the same answer).
"""

from __future__ import annotations

import json
import math
import time
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgemed.errors import Closed, ContextOverflow, EdgemedError, InputError, Overloaded, TemplateError

# -- requests ------------------------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def as_template_message(self) -> dict:
        """``{"role", "content"}`` for the GGUF chat template (``developer`` is the newer name of ``system``)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str | None = None
    schema_: dict = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


def _empty(value) -> bool:
    return value is None or value is False or value in ("none", "", [], {})


def _zero(value) -> bool:
    return value is None or value == 0


def _one(value) -> bool:
    return value is None or value == 1


#: request field -> (test that the value means "not used", why any other value is refused)
REFUSED = {
    "tools": (_empty, "tool calling is not supported by edgemed serve"),
    "functions": (_empty, "function calling is not supported by edgemed serve"),
    "tool_choice": (_empty, "tool calling is not supported by edgemed serve"),
    "logprobs": (_empty, "log probabilities are not returned by edgemed serve"),
    "top_logprobs": (_zero, "log probabilities are not returned by edgemed serve"),
    "logit_bias": (_empty, "logit_bias is not supported; use a grammar or response_format to constrain output"),
    "presence_penalty": (_zero, "presence_penalty is not supported; use repeat_penalty"),
    "frequency_penalty": (_zero, "frequency_penalty is not supported; use repeat_penalty"),
    "echo": (_empty, "echo is not supported"),
    "suffix": (_empty, "suffix (fill-in-the-middle) is not supported"),
    "best_of": (_one, "best_of is not supported"),
    "audio": (_empty, "audio output is not supported"),
}


def _not_unicode(value) -> tuple[tuple, int] | None:
    """Where in a JSON value a string is not valid Unicode (a lone surrogate such as "\\ud800", which JSON
    escapes can carry but no tokenizer can encode): ``(path, character index)``, or None. Iterative, so
    a deeply nested body cannot exhaust the stack here."""
    todo = [((), value)]
    while todo:
        path, item = todo.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return path, exc.start
        elif isinstance(item, dict):
            todo.extend((path, key) for key in item)
            todo.extend(((*path, key), sub) for key, sub in item.items())
        elif isinstance(item, list):
            todo.extend(((*path, i), sub) for i, sub in enumerate(item))
    return None


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data):
        """Every string of the body, whatever its field, is checked before anything reads it."""
        found = _not_unicode(data)
        if found:
            where = ".".join(str(p) for p in found[0]) or "body"
            raise ApiError(400, f"Invalid request: {where}: the text is not valid Unicode (a lone surrogate at "
                                f"character {found[1]}). Fix: send UTF-8 text; \\ud800-\\udfff alone are not characters.",
                           param=where)
        return data

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repeat_penalty: float = Field(1.0, gt=0)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    grammar: str | None = None
    user: str | None = None  # accepted, never stored: it may identify a patient

    def refused(self) -> None:
        extra = self.model_extra or {}
        for name, (unused, why) in REFUSED.items():
            if not unused(extra.get(name)):
                raise InputError(f"'{name}': {why}.", f"remove '{name}' from the request")

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise InputError("'stop' takes 1 to 16 non-empty strings.", "shorten the stop list")
        return tuple(stops)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(default_factory=list)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    template: str | None = None
    template_inputs: dict = Field(default_factory=dict)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def json_schema(self) -> str | None:
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return json.dumps({"type": "object"})
        if fmt.json_schema is None:
            raise InputError("response_format json_schema needs a 'json_schema' object with a 'schema'.",
                             'send {"type": "json_schema", "json_schema": {"name": "...", "schema": {...}}}')
        return json.dumps(fmt.json_schema.schema_)


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompt_value(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, list) and not all(isinstance(t, int) for t in p):
            raise InputError("'prompt' holds several prompts; edgemed serve answers one per request.",
                             "send one prompt (a string or a list of token ids) per request")
        return p


# -- responses -----------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV the slot already held (prefix reuse): not computed again


class Usage(BaseModel):
    prompt_tokens: int  # the whole prompt, cached or not
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, finished) -> "Usage":
        return cls(prompt_tokens=finished.prompt_tokens, completion_tokens=finished.completion_tokens,
                   total_tokens=finished.prompt_tokens + finished.completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=getattr(finished, "cached_tokens", 0)))


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    model_config = ConfigDict(extra="allow")  # the ``edgemed`` field
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TextChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class Completion(BaseModel):
    """Both the whole answer and each streamed chunk of /v1/completions (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "edgemed"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# -- errors -----------------------------------------------------------------------------------------
class ApiError(Exception):
    """An HTTP error in OpenAI's shape; ``message`` ends with the fix."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}


class ClientClosed(EdgemedError):
    """The client closed the connection before its answer was sent: recorded as 499, never as a server error."""

    def __init__(self):
        super().__init__("The client closed the connection before the answer was complete.",
                         "raise the client's time-out, or stream the answer (\"stream\": true)")


#: EdgemedError subclass -> (status, type, code), most specific first
ERRORS = [
    (ClientClosed, 499, "invalid_request_error", "client_closed"),
    (Overloaded, 429, "rate_limit_error", "server_overloaded"),
    (Closed, 503, "server_error", "unavailable"),
    (ContextOverflow, 400, "invalid_request_error", "context_length_exceeded"),
    (TemplateError, 400, "invalid_request_error", "invalid_template"),
    (InputError, 400, "invalid_request_error", None),
    (EdgemedError, 500, "server_error", None),
]


def as_api_error(exc: EdgemedError) -> ApiError:
    message = exc.problem if not exc.fix else f"{exc.problem} Fix: {exc.fix}"
    for kind, status, type_, code in ERRORS:
        if isinstance(exc, kind):
            headers = {}
            if hasattr(exc, "retry_after"):
                headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
            return ApiError(status, message, type_, code, headers=headers)
    raise TypeError(exc)  # unreachable: EdgemedError is the last row


def error_response(err: ApiError):
    from starlette.responses import JSONResponse

    body = ErrorResponse(error=ErrorBody(message=err.message, type=err.type, param=err.param, code=err.code))
    return JSONResponse(body.model_dump(), status_code=err.status, headers=err.headers)


#: OpenAI's finish reasons: the batcher's "cancelled" / "error" never reach a client that is still there
FINISH_REASONS = {"stop": "stop", "length": "length"}
