"""The wire format: OpenAI's request and response shapes (pydantic), and what edgemed adds to them.

Requests accept the OpenAI fields edgemed can honour (tools, ``n``, logprobs, logit bias,
presence and frequency penalties, ``echo``: see docs/openai.md) and refuse, with a 400 naming
the field in ``param``, the few whose silent loss would change the answer (``suffix``,
``best_of``, audio output). Unknown fields are ignored, as OpenAI's own server does. A body holding ``NaN``,
``Infinity`` or ``1e999`` anywhere, which RFC 8259 JSON cannot, is refused before any field is read (``loads_body``).

edgemed's additions (request body, e.g. through the openai client's ``extra_body``):

* ``template`` + ``template_inputs`` — a medical prompt template (``edgemed run --template``)
  builds the messages; ``messages`` must then be empty. The response gains
  ``edgemed: {"template": {"id", "version"}, "parsed": {"ok", "value", "error"}}``.
* ``grammar`` — a GBNF grammar constraining the output (llama.cpp);
* ``think_cap`` — chat: at most this many tokens of a reasoning model's ``<think>`` block, then the answer
  (``edgemed serve --think-cap`` for this request; ``serve.thought``);
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

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from edgemed.errors import (Closed, ContextOverflow, EdgemedError, InputError, Overloaded, TemplateError,
                            retry_seconds)
from edgemed.runtime.batch.batcher import UnknownAdapter
from edgemed.runtime.engine import SEED_REPEATS, highest_seed, seed_problem
from edgemed.runtime.sampling import SchemaError
from edgemed.formats.nesting import TooDeep, loads_json

# -- requests ------------------------------------------------------------------------------------
#: Most choices per prompt (``n``), prompts per completions request, alternatives per token, biased tokens.
MAX_N = 8
MAX_PROMPTS = 8
MAX_TOP_LOGPROBS = 20
MAX_BIAS = 300
MAX_REPEAT_PENALTY = 10.0  # llama.cpp divides a repeated token's logit by it: far past any useful value
MAX_STOP_CHARS = 1024  # a stop string longer than this is no stop string a client means
#: OpenAI's fields typed "X or null" whose null means "the default": a null is read as the field left out (clients
#: that serialize every field, pydantic's ``model_dump()`` among them, send them so)
NULL_IS_DEFAULT = ("temperature", "top_p", "n", "presence_penalty", "frequency_penalty", "stream",
                   "parallel_tool_calls", "echo")



class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])

    def as_template_message(self) -> dict:
        """``{"role", "content"}`` for the GGUF chat template (``developer`` is the newer name of ``system``);
        an assistant's tool calls and a tool's answer in the shape Hugging Face templates read (arguments as
        an object, ``tool_call_id``)."""
        message = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in self.tool_calls]
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id or ""
            if self.name:
                message["name"] = self.name
        return message


def _arguments(text: str):
    """A history's tool-call arguments (JSON text) as the object templates render; text that is not JSON (``NaN``
    and ``Infinity`` included: RFC 8259 has neither) stays text."""
    try:
        return loads_json(text, finite=True)
    except ValueError:
        return text


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


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
    "functions": (_empty, "the deprecated 'functions' field is not supported; send 'tools'"),
    "function_call": (_empty, "the deprecated 'function_call' field is not supported; send 'tool_choice'"),
    "suffix": (_empty, "suffix (fill-in-the-middle) is not supported"),
    "best_of": (_one, "best_of is not supported"),
    "audio": (_empty, "audio output is not supported"),
    # a chat field (``ChatRequest.think_cap``): only a completions request has it left over
    "think_cap": (_empty, "think_cap caps the thought of a chat answer (/v1/chat/completions), whose prompt the chat "
                          "template makes; a completion's prompt is the client's own text"),
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


class _Literal(str):
    """A number JSON has no place for (``NaN``, ``Infinity``, ``-Infinity``, ``1e999``), kept as the text sent."""


def _float_or_literal(text: str):
    value = float(text)
    return _Literal(text) if math.isinf(value) else value


def _not_finite(raw: bytes | str) -> tuple[tuple, str] | None:
    """The first number in a JSON text that is not finite, in the text's order: ``(path, literal)``, or None
    (none, or the text is not JSON even as Python reads it). Iterative; the caller has bounded the nesting."""
    try:
        value = json.loads(raw, parse_constant=_Literal, parse_float=_float_or_literal)
    except (ValueError, RecursionError):
        return None
    todo = [((), value)]
    while todo:
        path, item = todo.pop()
        if isinstance(item, _Literal):
            return path, str(item)
        if isinstance(item, dict):
            todo.extend(reversed([((*path, key), sub) for key, sub in item.items()]))
        elif isinstance(item, list):
            todo.extend(reversed([((*path, i), sub) for i, sub in enumerate(item)]))
    return None


def loads_body(raw: bytes | str):
    """A request body's JSON value. ``NaN``, ``Infinity``, ``-Infinity`` and a number too large for a float
    (``1e999``) are refused here, before any field is read, with a 400 naming the literal and where it stands
    (``param``: ``repeat_penalty``, ``tools.0.function.parameters.properties.dose.maximum``): RFC 8259 JSON has
    no such numbers, Python's reader alone takes them, and none may reach a sampler, a grammar or a template.
    Other malformed JSON is the reader's ``ValueError`` (``JSONDecodeError``, ``TooDeep``, ``UnicodeDecodeError``)."""
    try:
        return loads_json(raw, finite=True)
    except (TooDeep, json.JSONDecodeError, UnicodeDecodeError):  # malformed before any such number
        raise
    except ValueError:  # "... is not a finite number": read again, to name it and its field
        found = _not_finite(raw)
        if found is None:
            raise
    path, literal = found
    where = ".".join(str(p) for p in path)
    at = f"'{where}' is {literal}" if where else f"the body is {literal}"
    raise ApiError(400, f"Invalid request: {at}, which is not a finite number; JSON (RFC 8259) has no NaN or "
                        "Infinity (Python's json.dumps writes them unless allow_nan=False). Fix: send a finite number"
                        + (f" in '{where}'." if where else "."), param=where or None, code="invalid_json")


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

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        """``NULL_IS_DEFAULT``: an explicit null takes the field's default, in this one place."""
        if isinstance(data, dict) and any(data.get(k, 0) is None for k in NULL_IS_DEFAULT if k in cls.model_fields):
            return {k: v for k, v in data.items() if not (v is None and k in NULL_IS_DEFAULT and k in cls.model_fields)}
        return data

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)  # 0: OpenAI's "most deterministic", the most likely token (top-1)
    top_k: int = Field(0, ge=0, le=2**31 - 1)  # llama.cpp's k is an int32; any k above the vocabulary keeps all
    min_p: float = Field(0.0, ge=0, le=1)
    repeat_penalty: float = Field(1.0, gt=0, le=MAX_REPEAT_PENALTY, allow_inf_nan=False)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as text) -> -100..100
    stream: bool = False
    stream_options: StreamOptions | None = None
    grammar: str | None = None
    user: str | None = None  # accepted, never stored: it may identify a patient
    #: vLLM's field: this request's prompt KV is reused only by requests with the same salt (and scope)
    cache_salt: str | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _fixed_seed(self):
        """A seed llama.cpp takes as it is (``engine.MAX_SEED``), for every choice (choice i samples with seed + i):
        it kept 32 bits of one (0 and 2^32 gave one answer) and reads 2^32 - 1 as "draw one at random", so a seed
        outside could not give its answer again, or would be another seed (``edgemed run --seed`` refuses them too, by
        the same rule: ``engine.seed_problem``)."""
        problem = None if self.seed is None else seed_problem(self.seed, "seed", self.n)
        if problem is not None:
            raise ApiError(400, f"{problem} Fix: send a seed from 0 to {highest_seed(self.n)}; {SEED_REPEATS}.",
                           param="seed")
        return self

    def refused(self) -> None:
        extra = self.model_extra or {}
        for name, (unused, why) in REFUSED.items():
            if not unused(extra.get(name)):
                raise ApiError(400, f"'{name}': {why}. Fix: remove '{name}' from the request.", param=name,
                               code="unsupported_parameter")

    def bias(self, n_vocab: int) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token id, bias) pairs, checked against the vocabulary."""
        pairs = []
        for key, value in (self.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                token = -1
            if not 0 <= token < n_vocab:
                raise ApiError(400, f"logit_bias key '{key}' is not a token id of this model (0..{n_vocab - 1}). "
                                    "Fix: key logit_bias by token ids of this model's tokenizer.", param="logit_bias")
            if not -100 <= value <= 100:
                raise ApiError(400, f"logit_bias value {value} for token {token} is outside -100..100. Fix: send a "
                                    "bias from -100 (never) to 100 (always).", param="logit_bias")
            pairs.append((token, float(value)))
        if len(pairs) > MAX_BIAS:
            raise ApiError(400, f"logit_bias has {len(pairs)} entries; at most {MAX_BIAS}. Fix: bias fewer tokens.",
                           param="logit_bias")
        return tuple(pairs)

    def top_logprobs_wanted(self) -> int | None:
        """None (no log probabilities), or how many alternatives each token's entry lists."""
        raise NotImplementedError

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):  # it would match everywhere: the answer would end before it began
            raise ApiError(400, "'stop' holds an empty string, which matches before any text. Fix: remove the empty "
                                "stop string.", param="stop")
        if len(stops) > 16:
            raise ApiError(400, f"'stop' holds {len(stops)} strings; at most 16. Fix: shorten the stop list.",
                           param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ApiError(400, f"A stop string is {max(len(s) for s in stops):,} characters long; at most "
                                f"{MAX_STOP_CHARS:,}. Fix: stop on a shorter string.", param="stop")
        return tuple(stops)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(default_factory=list)
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    template: str | None = None
    template_inputs: dict = Field(default_factory=dict)
    #: at most this many tokens of a reasoning model's ``<think>`` block, then the answer (``serve --think-cap``'s,
    #: for this request; ``serve.thought``)
    think_cap: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _whole_think_cap(cls, data):
        """``think_cap`` is a whole number of tokens, 1 or more: a float (``5.0``), a string or a boolean is refused
        rather than read as one (the pydantic default would take ``"5"`` and ``5.0``)."""
        cap = data.get("think_cap") if isinstance(data, dict) else None
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ApiError(400, f"think_cap {json.dumps(cap, default=str)} is not a number of tokens. Fix: send think_cap as a whole "
                                "number of 1 or more (at most the request's max_tokens), or leave it out for the "
                                "server's --think-cap.", param="think_cap", code="invalid_think_cap")
        return data

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def top_logprobs_wanted(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true. Fix: send \"logprobs\": true with it.",
                               param="top_logprobs")
            return None
        return self.top_logprobs or 0

    def json_schema(self) -> str | None:
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return json.dumps({"type": "object"})
        if fmt.json_schema is None:
            raise ApiError(400, "response_format json_schema needs a 'json_schema' object with a 'schema'. Fix: send "
                                '{"type": "json_schema", "json_schema": {"name": "...", "schema": {...}}}.',
                           param="response_format")
        return json.dumps(fmt.json_schema.schema_)


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    #: OpenAI's default for /v1/completions; 0 with ``echo``: score the prompt only (its text and log probabilities,
    #: no answer), as the legacy API did for scorers such as lm-eval-harness
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False

    @model_validator(mode="after")
    def _no_answer_only_with_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(400, "max_tokens 0 asks for no answer, which only scores the prompt with \"echo\": true. "
                                "Fix: send max_tokens 1 or more, or \"echo\": true to get the prompt (and its "
                                "logprobs) back.", param="max_tokens")
        return self

    @property
    def scoring(self) -> bool:
        """max_tokens 0 with echo: the prompt scored, no answer (``generate.take`` drops the one token computed)."""
        return self.max_tokens == 0

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts: one string or token-id list, or several (each answered as its own ``n`` choices)."""
        p = self.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p)):
            prompts = [p]
        elif not p:
            raise ApiError(400, "'prompt' is empty. Fix: send a prompt (text or token ids).", param="prompt")
        elif len(p) > MAX_PROMPTS:
            raise ApiError(400, f"'prompt' holds {len(p)} prompts; at most {MAX_PROMPTS} per request. Fix: split "
                                "the list over several requests.", param="prompt")
        else:
            prompts = list(p)
        for i, one in enumerate(prompts):
            if not one:
                where = "prompt" if len(prompts) == 1 and prompts[0] is p else f"prompt.{i}"
                raise ApiError(400, f"'{where}' is empty. Fix: send a prompt of at least one token (text or token "
                                    "ids).", param=where)
        return prompts


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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """Chat's ``choices[].logprobs``: one entry per output token."""

    content: list[TokenLogprob] | None
    refusal: None = None


class CompletionLogprobs(BaseModel):
    """Completions' ``choices[].logprobs`` (the legacy shape): parallel lists, a token's alternatives as a dict."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class FunctionOut(BaseModel):
    name: str | None = None
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    model_config = ConfigDict(extra="allow")  # the ``edgemed`` field
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ToolCallDelta(BaseModel):
    """A streamed call, as OpenAI sends it: the first delta has ``id``, ``type`` and ``function.name``; later ones only
    ``index`` and ``function.arguments``. Fields left unset are left out of the JSON, not sent as null: the openai
    SDK's stream accumulator copies a later ``"type": null`` over the first delta's ``"function"``."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionOut

    @model_serializer(mode="wrap")
    def _unset_left_out(self, handler):
        out = {k: v for k, v in handler(self).items() if v is not None}
        out["function"] = {k: v for k, v in out["function"].items() if v is not None}
        return out


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


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
    logprobs: CompletionLogprobs | None = None


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
    (UnknownAdapter, 404, "invalid_request_error", "model_not_found"),  # removed between the lookup and the queue
    (ContextOverflow, 400, "invalid_request_error", "context_length_exceeded"),
    (TemplateError, 400, "invalid_request_error", "invalid_template"),
    (InputError, 400, "invalid_request_error", None),
    (EdgemedError, 500, "server_error", None),
]


#: EdgemedError subclass -> the request field it is about. A JSON schema reaches the sampler from
#: ``response_format`` only: a JSON-contract template's schema is made into its grammar when the template loads.
PARAMS = [(SchemaError, "response_format")]


def as_api_error(exc: EdgemedError) -> ApiError:
    message = exc.problem if not exc.fix else f"{exc.problem} Fix: {exc.fix}"
    param = next((name for kind, name in PARAMS if isinstance(exc, kind)), None)
    for kind, status, type_, code in ERRORS:
        if isinstance(exc, kind):
            headers = {}
            if hasattr(exc, "retry_after"):
                headers["Retry-After"] = str(retry_seconds(exc.retry_after))
            return ApiError(status, message, type_, code, param=param, headers=headers)
    raise TypeError(exc)  # unreachable: EdgemedError is the last row


def error_response(err: ApiError):
    from starlette.responses import JSONResponse

    body = ErrorResponse(error=ErrorBody(message=err.message, type=err.type, param=err.param, code=err.code))
    return JSONResponse(body.model_dump(), status_code=err.status, headers=err.headers)


#: OpenAI's finish reasons: the batcher's "cancelled" / "error" never reach a client that is still there
FINISH_REASONS = {"stop": "stop", "length": "length"}
#: what a client may be told besides them ("tool_calls": the answer is calls, parsed from the text)
ANSWERED = {"stop", "length", "tool_calls"}
