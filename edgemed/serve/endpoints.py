"""The two generation endpoints as data: one ``Endpoint`` row each (path, request model, how the prompt
is built, how the answer is shaped), read by ``routes.py`` and ``generate.py``.

A prompt builder turns the request body into a ``Prompt`` (the texts or token ids, the JSON schema or
grammar that constrains sampling, the tool plan, what edgemed adds to the answer); a ``Shape`` turns
the answers (one ``Answer`` per choice) into the endpoint's OpenAI response, whole or as SSE chunks
(head, one per piece, final, usage), with log probabilities and tool calls in OpenAI's shapes.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from starlette.concurrency import run_in_threadpool

from edgemed.errors import InputError, TemplateError, TemplateInputError
from edgemed.formats.nesting import loads_json
from edgemed.runtime.chat_template import folded, probe_system_role, system_then_user
from edgemed.runtime.engine import GenerationSettings
from edgemed.runtime.sampling import after_thought, check_gbnf, grammar_text
from edgemed.runtime.schema_check import violations
from edgemed.runtime.session import starts_in_think
from edgemed.serve import api, grammar_source
from edgemed.serve.middleware import RequestRecord
from edgemed.serve.state import Served
from edgemed.serve import tools
from edgemed.serve.grammar_source import (
    GRAMMAR,
    RESPONSE_FORMAT,
    GrammarSource,
    bound_refusal,
    pattern_refusal,
    strict_refusal,
)
from edgemed.serve.tools import CallFilter, ToolPlan


def template_version(template) -> str:
    """Templates carry no version number: their version is a digest of everything that shapes the prompt
    and its parsing (system, user, inputs, contract, safety preamble), so any edit gives a new version."""
    c = template.contract
    source = {"name": template.name, "system": template.system, "user": template.user, "inputs": template.inputs,
              "preamble": template.preamble, "contract": {"kind": c.kind, "label": c.label, "choices": list(c.choices),
                                                         "choices_from": c.choices_from, "schema": c.schema}}
    text = json.dumps(source, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _nothing(text: str, finish_reason: str | None = None) -> dict:
    return {}


@dataclass(frozen=True)
class Prompt:
    """What the batcher is given for one request, and what the answer gains."""

    values: list  # each prompt: text to tokenize, or token ids (completions may send several)
    json_schema: str | None = None  # constrains sampling (response_format, or a JSON-contract template)
    extra: Callable[..., dict] = _nothing  # (answer text, finish reason) -> edgemed's fields of the response
    tools: ToolPlan = field(default_factory=ToolPlan)
    grammar: str | None = None  # the request's own, or the one forcing a tool call
    #: the field the grammar (or JSON schema) came from, which an error about following it names
    grammar_from: GrammarSource | None = None
    #: the chat template ended the prompt with <think>: the answer starts inside a reasoning block (the response says
    #: so in its ``x-edgemed-think: open`` header, so a client folds exactly that block and nothing else)
    opened_think: bool = False
    #: with ``opened_think``: the answer's own constraint ``(json_schema, grammar)``, which ``json_schema`` and
    #: ``grammar`` hold after a thought (``after_thought``); a request with a reasoning cap asks for its answer in a
    #: call of its own, which follows this one (``serve.thought``). None: ``(json_schema, grammar)`` as they are.
    answer_only: tuple | None = None

    @property
    def value(self):
        return self.values[0]

    @property
    def answer_constraint(self) -> tuple:
        """``(json_schema, grammar)`` of the answer alone, after any thought."""
        return self.answer_only if self.answer_only is not None else (self.json_schema, self.grammar)


# -- prompts ---------------------------------------------------------------------------------------------
async def _check_grammar(grammar: str | None) -> None:
    """Refuse the client's own ``grammar`` that llama.cpp's parser cannot take safely (``check_gbnf``) as a 400 naming
    that field: the batcher checks every grammar it is given again, but cannot tell the client's from a forced tool
    call's. In a worker thread: a grammar may be 1 MiB long."""
    if grammar is None:
        return
    try:
        await run_in_threadpool(check_gbnf, grammar)
    except InputError as exc:
        error = api.as_api_error(exc)
        error.param = "grammar"
        raise error from None


#: per batcher, held weakly (the entry goes with it): its chat template text, and ``probe_system_role``'s answer for it
_SYSTEM_ROLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SYSTEM_ROLES_LOCK = threading.Lock()


def fold_system_once(batcher, messages: list[dict]) -> list[dict]:
    """``chat_template.fold_system``'s messages for the batcher's chat template, at no render of their own: whether the
    template takes a system role is probed once per batcher and chat template text (``probe_system_role``, at the
    first request with a system message) and reused, so a request's one render is its prompt's. A probe that fails is
    not kept: the request fails as ``fold_system`` would have failed it, and the next one probes again."""
    if not system_then_user(messages):
        return messages
    template = batcher.chat_template()
    with _SYSTEM_ROLES_LOCK:
        known = _SYSTEM_ROLES.get(batcher)
    if known is None or known[0] != template:  # two first requests at once may both probe: the same answer
        known = (template, probe_system_role(batcher.render_chat))
        with _SYSTEM_ROLES_LOCK:
            _SYSTEM_ROLES[batcher] = known
    return folded(messages, known[1])[0]


async def chat_prompt(served: Served, record: RequestRecord, body: api.ChatRequest) -> Prompt:
    """``messages``, or a medical template's messages, through the GGUF's chat template (with ``tools``)."""
    template = None
    json_schema = body.json_schema()
    schema_from = RESPONSE_FORMAT if json_schema is not None else None
    response_schema = json.loads(json_schema) if json_schema is not None else None
    fmt = body.response_format.json_schema if json_schema is not None else None
    if fmt is not None:
        at, names = "response_format.json_schema.schema", "The JSON schema in 'response_format'"
        refused = bound_refusal(fmt.schema_, at, names) or pattern_refusal(fmt.schema_, at, names)
        if refused is None and fmt.strict:
            refused = strict_refusal(fmt.schema_, at, names)
        if refused is not None:
            raise refused
    plan = ToolPlan()
    if body.template:
        if body.messages:
            raise InputError("Send either 'messages' or 'template' (with 'template_inputs'), not both.",
                             "leave 'messages' empty when a template builds them")
        if body.tools or body.tool_choice not in (None, "none"):  # a template's answer is its contract, never a call
            raise api.ApiError(400, "A medical template answers by its own contract; it does not call tools. Fix: "
                                    "drop 'tools' and 'tool_choice', or send 'messages' instead of 'template'.",
                               param="tools" if body.tools else "tool_choice")
        template = served.templates.get(body.template)
        if template is None:
            raise TemplateError(f"No prompt template named '{body.template}'.",
                                f"choose one of: {', '.join(sorted(served.templates))}")
        record.template = {"id": template.name, "version": template_version(template)}
        try:  # inputs missing or malformed: the fix names 'template_inputs', not the CLI's options
            await run_in_threadpool(template.fill, body.template_inputs, "api")
        except TemplateError as exc:
            error = api.as_api_error(exc)
            error.param = f"template_inputs.{exc.key}" if isinstance(exc, TemplateInputError) else "template_inputs"
            raise error from None
        messages = await run_in_threadpool(template.messages, body.template_inputs, "api")
        # a chat template without a system role (it refuses or drops one): the safety preamble goes in the user message
        messages = await run_in_threadpool(fold_system_once, served.batcher, messages)
        if template.contract.kind == "json" and json_schema is None and body.grammar is None:
            json_schema = template.contract.json_schema()
            schema_from = grammar_source.template(template.name) if json_schema is not None else None
    elif not body.messages:
        raise api.ApiError(400, "'messages' is empty. Fix: send at least one message, or a 'template' with its "
                                "inputs.", param="messages")
    else:
        messages = [m.as_template_message() for m in body.messages]
        # as a template's: a system message (the page's safety preamble) reaches a chat template without a system role
        messages = await run_in_threadpool(fold_system_once, served.batcher, messages)
        plan = tools.plan(body, served.batcher.chat_template(), served.config.model_id)
    constraint = body.grammar
    if plan.grammar is not None:
        if body.grammar is not None or json_schema is not None:
            raise api.ApiError(400, "A forced tool call is constrained by its own grammar; it cannot also follow "
                                    "'grammar' or 'response_format'. Fix: drop one of them.", param="tool_choice")
        constraint = plan.grammar
    await _check_grammar(body.grammar)
    source = grammar_source.with_bans(GRAMMAR if body.grammar else plan.source or schema_from, body)
    # Rendering (a limited, but possibly slow, untrusted template) and tokenizing (a long prompt) run in a
    # worker thread: the event loop keeps answering /health and streaming other requests meanwhile.
    prompt = await run_in_threadpool(served.batcher.render_chat, messages, plan.tools or None)
    opened_think = starts_in_think(prompt)  # a reasoning model's template may open <think> itself
    answer_only = None
    if opened_think and (json_schema is not None or constraint is not None):
        answer_only = (json_schema, constraint)
        # as `run`, the constraint is the answer's: from the first token it would leave no way to think or close it
        settings = GenerationSettings(json_schema=json_schema, grammar=constraint)
        constraint, json_schema = after_thought(await run_in_threadpool(grammar_text, settings)), None
    checked = answer_check(response_schema, plan)

    def extra(text: str, finish_reason: str | None = None) -> dict:
        out = {}
        if template is not None:  # an answer cut at max_tokens is no answer, whatever it holds ("give 0.5 mg of")
            result = template.parse(text, body.template_inputs, started_in_think=opened_think,
                                    truncated=finish_reason == "length", via="api")
            out = {"template": record.template,
                   "parsed": {"ok": result.ok, "value": result.value, "error": result.error or None}}
        if checked is not None and (report := checked(text.rpartition("</think>")[2] if opened_think else text,
                                                      finish_reason)) is not None:
            out["schema"] = report
        return {"edgemed": out} if out else {}

    return Prompt([prompt], json_schema, extra, tools=plan, grammar=constraint, grammar_from=source,
                  opened_think=opened_think, answer_only=answer_only)


def answer_check(schema: dict | None, plan: ToolPlan) -> Callable[[str, str | None], dict | None] | None:
    """The answer's ``edgemed.schema`` (``{"valid", "errors"}``), read from its text and finish reason: its content
    checked against the ``response_format`` schema, or each tool call's arguments against its function's
    ``parameters``, with every keyword (``schema_check.violations``): the grammar drops some (``minimum``, ``format``:
    see ``schema_check``), and an answer outside them must not pass for one inside. ``valid`` is null where the schema
    cannot be checked. None: nothing to check (no schema, no tools)."""
    functions = {t["function"]["name"]: t["function"].get("parameters") or {} for t in plan.tools} if plan.parse else {}
    if schema is None and not functions:
        return None

    def check(text: str, finish_reason: str | None) -> dict | None:
        if finish_reason == "length":
            return _invalid("the answer was cut at max_tokens")
        if schema is not None:
            try:
                found = [("content", loads_json(text, finite=True), schema)]
            except ValueError as exc:
                return _invalid(f"the answer is not JSON ({exc})")
        else:
            calls = tools.parse(text, set(functions)).calls
            if not calls:  # the model answered in text (tool_choice auto): nothing to check
                return None if plan.grammar is None or plan.optional else _invalid("the answer holds no tool call")
            found = [(f"tool_calls.{i}.function.arguments", json.loads(c["function"]["arguments"]),
                      functions[c["function"]["name"]]) for i, c in enumerate(calls)]
        try:
            errors = [{**e, "path": f"{at}.{e['path']}" if e["path"] else at}
                      for at, value, against in found for e in violations(against, value)]
        except ValueError as exc:  # the schema itself cannot be checked: say so rather than call the answer valid
            return {"valid": None, "errors": [{"path": "", "keyword": None, "message": str(exc)}]}
        return {"valid": not errors, "errors": errors}

    return check


def _invalid(message: str) -> dict:
    return {"valid": False, "errors": [{"path": "content", "keyword": None, "message": message}]}


async def completion_prompt(served: Served, record: RequestRecord, body: api.CompletionRequest) -> Prompt:
    """The prompts as sent: strings or lists of token ids."""
    await _check_grammar(body.grammar)
    return Prompt(body.prompts(), grammar=body.grammar,
                  grammar_from=grammar_source.with_bans(GRAMMAR if body.grammar else None, body))


# -- answers ----------------------------------------------------------------------------------------------
def _utf8() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")("replace")


@dataclass
class Answer:
    """One choice as it comes out of the batcher: its text, log probabilities, how it ended."""

    index: int
    parts: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # options.TokenLogprob of the output tokens
    prompt_logprobs: list = field(default_factory=list)  # echo
    finished: object = None
    calls: CallFilter | None = None
    echoed: bool = False  # streaming with echo: the prompt's text went out
    scoring: bool = False  # max_tokens 0 with echo: the prompt alone, scored (``generate.take``)
    offset: int | None = None  # streaming completions' logprobs: characters of the choice's text so far
    #: streaming completions' logprobs: the choice's bytes so far, holding a character the last token left unfinished
    decoder: codecs.IncrementalDecoder = field(default_factory=_utf8)

    @property
    def text(self) -> str:
        return "".join(self.parts)


def usage(answers: list[Answer]) -> api.Usage:
    """A prompt counts once however many choices share it; completion tokens add up."""
    done = [a.finished for a in answers if a.finished is not None]
    prompt = sum(f.prompt_tokens for f in done if not f.forked)
    completion = sum(f.completion_tokens for f in done)
    return api.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=api.PromptTokensDetails(cached_tokens=sum(f.cached_tokens for f in done)))


def token_text(data: bytes) -> str:
    """A token's name in log probabilities: its text, or, for a token whose bytes are not whole UTF-8 characters
    (part of an emoji or a CJK character, split by a byte-level tokenizer), OpenAI's ``bytes:`` form: the bytes
    with printable ASCII as itself and every other byte as ``\\xNN`` (``b" \\xf0\\x9f"`` is ``bytes: \\xf0\\x9f``).
    Chat entries carry the exact ``bytes`` beside it."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in data)


def chat_logprobs(entries) -> api.ChoiceLogprobs:
    return api.ChoiceLogprobs(content=[api.TokenLogprob(
        token=token_text(e.token), logprob=e.logprob, bytes=list(e.token),
        top_logprobs=[api.TopLogprob(token=token_text(t), logprob=lp, bytes=list(t)) for t, lp in e.top])
        for e in entries])


def completion_logprobs(entries, offset: int, decoder: codecs.IncrementalDecoder,
                        bos: bool = False) -> tuple[api.CompletionLogprobs, int]:
    """The legacy shape, and the offset after these tokens. ``offset``: characters of the choice's text before them;
    ``decoder``: the choice's bytes before them (it holds a character a token before left unfinished). A token's
    ``text_offset`` is the number of whole characters its predecessors' bytes decode to: the character a token
    completes belongs to the token that completes it, and a token holding only part of one stands where that
    character starts (the text between its offset and the next token's is empty). ``bos``: the first entry is the BOS
    the tokenizer put before a text prompt, a prompt token (``usage.prompt_tokens`` counts it) but none of the text the
    client sent: it is listed, at ``offset``, with an empty span."""
    tokens, offsets = [], []
    for i, e in enumerate(entries):
        tokens.append(token_text(e.token))
        offsets.append(offset)
        if not (bos and i == 0):
            offset += len(decoder.decode(e.token))
    return api.CompletionLogprobs(
        tokens=tokens, token_logprobs=[e.logprob for e in entries], text_offset=offsets,
        top_logprobs=[{token_text(t): lp for t, lp in e.top} if e.logprob is not None else None
                      for e in entries]), offset


def _cut_content(text: str | None) -> str | None:
    """The content of an answer cut at max_tokens that may hold calls: its text outside the calls, less a call it was
    still writing (from that call's ``<tool_call>`` tag on), which is neither a call nor content."""
    if text is None:
        return None
    at = text.rfind(tools.OPEN)
    return text[:at] if at >= 0 and tools.CLOSE not in text[at:] else text


# -- response shapes ------------------------------------------------------------------------------------
@dataclass
class Shape:
    """One request's OpenAI response: ``whole`` when collected, else ``head``, ``piece`` per text, ``final``, ``usage``.
    ``logprobs``: whether choices carry them; ``echo``: the prompt text (per prompt) that opens each completion;
    ``bos``: per prompt, whether its tokens open with a BOS its tokenizer added to its text (echo only)."""

    id: str
    model: str
    extra: Callable[..., dict] = _nothing
    created: int = field(default_factory=lambda: int(time.time()))  # of the streamed chunks
    logprobs: bool = False
    echo: list | None = None
    bos: list | None = None
    n: int = 1

    def chunk(self, choices: list, **more) -> dict:
        raise NotImplementedError

    def head(self, answers: list[Answer]) -> list[dict]:
        return []

    def usage(self, answers: list[Answer]) -> dict:
        return self.chunk([], usage=usage(answers))


class ChatShape(Shape):
    """Tool calls: an answer that ended by itself (``stop``) and holds calls ends with ``tool_calls``; one cut at
    max_tokens (``length``) keeps ``length`` and carries no call, not even one it finished before it was cut (a cut
    answer is no call, as a cut template answer is no answer; llama-server's finish reason is ``tool_calls`` only for
    an answer that ended by itself too). Its content is ``_cut_content``."""

    def chunk(self, choices: list, **more) -> dict:
        return api.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices,
                                       **more).model_dump(exclude_none=False)

    def head(self, answers: list[Answer]) -> list[dict]:
        return [self.chunk([api.ChunkChoice(index=a.index, delta=api.Delta(role="assistant", content=""))])
                for a in answers]

    def piece(self, answer: Answer, text: str, entries) -> list[dict]:
        lp = chat_logprobs(entries) if self.logprobs else None
        if answer.calls is not None:
            text = answer.calls.push(text)
            if not text and lp is None:
                return []
        return [self.chunk([api.ChunkChoice(index=answer.index, delta=api.Delta(content=text), logprobs=lp)])]

    def final(self, answer: Answer, reason: str) -> list[dict]:
        out = []
        if answer.calls is not None:
            rest, calls = answer.calls.finish()
            if reason != "stop":  # cut: no call (see the class)
                cut, calls = _cut_content(rest), []
                rest = cut if cut == rest or cut.strip() else ""
            if rest:
                out.append(self.chunk([api.ChunkChoice(index=answer.index, delta=api.Delta(content=rest))]))
            for i, call in enumerate(calls):  # as OpenAI streams them: id and name first, then the arguments
                fn = call["function"]
                out.append(self.chunk([api.ChunkChoice(index=answer.index, delta=api.Delta(tool_calls=[
                    api.ToolCallDelta(index=i, id=call["id"], type="function",
                                      function=api.FunctionOut(name=fn["name"], arguments=""))]))]))
                out.append(self.chunk([api.ChunkChoice(index=answer.index, delta=api.Delta(tool_calls=[
                    api.ToolCallDelta(index=i, function=api.FunctionOut(arguments=fn["arguments"]))]))]))
            if calls:
                reason = "tool_calls"
        out.append(self.chunk([api.ChunkChoice(index=answer.index, delta=api.Delta(), finish_reason=reason)],
                              **self.extra(answer.text, reason)))
        return out

    def whole(self, answers: list[Answer], reasons: list[str]) -> dict:
        choices = []
        for answer, reason in zip(answers, reasons):
            content, calls = answer.text, None
            if answer.calls is not None:
                found = tools.parse(content, answer.calls.names)
                if reason != "stop":  # cut: no call (see the class); the text as it is when it held none
                    cut = _cut_content(found.content)
                    content = cut if cut == content else (cut or "").strip() or None
                elif found.calls:
                    content, calls, reason = found.content, [api.ToolCallOut(**c) for c in found.calls], "tool_calls"
            choices.append(api.ChatChoice(index=answer.index, finish_reason=reason,
                                          message=api.AssistantMessage(content=content, tool_calls=calls),
                                          logprobs=chat_logprobs(answer.logprobs) if self.logprobs else None))
        out = api.ChatCompletion(id=self.id, model=self.model, choices=choices, usage=usage(answers),
                                 **self.extra(answers[0].text, reasons[0])).model_dump()
        if len(answers) > 1:  # n > 1: each choice carries its own parse; the top-level one stays the first choice's
            for choice, answer, reason in zip(out["choices"], answers, reasons):
                choice.update(self.extra(answer.text, reason))
        return out


class CompletionShape(Shape):
    """Choice ``i`` answers prompt ``i // n``; with ``echo`` its text opens with that prompt."""

    def chunk(self, choices: list, **more) -> dict:
        return api.Completion(id=self.id, created=self.created, model=self.model, choices=choices, **more).model_dump()

    def _echo(self, answer: Answer) -> str:
        return self.echo[answer.index // self.n] if self.echo is not None else ""

    def _bos(self, answer: Answer) -> bool:
        return bool(self.bos and self.bos[answer.index // self.n])

    def head(self, answers: list[Answer]) -> list[dict]:
        return []

    def piece(self, answer: Answer, text: str, entries, prompt: bool = False) -> list[dict]:
        if prompt:  # echo: the prompt's text and its tokens' log probabilities, before any output
            lp, answer.offset = (completion_logprobs(entries, 0, answer.decoder, self._bos(answer)) if self.logprobs
                                 else (None, None))
            answer.echoed = True
            return [self.chunk([api.TextChoice(index=answer.index, text=self._echo(answer), logprobs=lp)])]
        out = []
        if self.echo is not None and not answer.echoed:
            answer.echoed = True
            out.append(self.chunk([api.TextChoice(index=answer.index, text=self._echo(answer))]))
        lp = None
        if self.logprobs:
            offset = answer.offset if answer.offset is not None else len(self._echo(answer))
            lp, answer.offset = completion_logprobs(entries, offset, answer.decoder)
        return out + [self.chunk([api.TextChoice(index=answer.index, text=text, logprobs=lp)])]

    def final(self, answer: Answer, reason: str) -> list[dict]:
        out = []
        if self.echo is not None and not answer.echoed:
            out.append(self.chunk([api.TextChoice(index=answer.index, text=self._echo(answer))]))
        return out + [self.chunk([api.TextChoice(index=answer.index, text="", finish_reason=reason)])]

    def whole(self, answers: list[Answer], reasons: list[str]) -> dict:
        choices = []
        for answer, reason in zip(answers, reasons):
            echo = self._echo(answer)
            lp = None
            if self.logprobs:
                entries = list(answer.prompt_logprobs) + list(answer.logprobs)
                scored = bool(answer.prompt_logprobs)  # echo with logprobs: the prompt's entries come first
                lp, _ = completion_logprobs(entries, 0 if scored else len(echo), _utf8(), scored and self._bos(answer))
            choices.append(api.TextChoice(index=answer.index, text=echo + answer.text, finish_reason=reason,
                                          logprobs=lp))
        return api.Completion(id=self.id, model=self.model, choices=choices, usage=usage(answers)).model_dump()


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
