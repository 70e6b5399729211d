"""Tool calling through the model's own chat template: which format a template speaks, the grammar that forces a
call, the calls parsed back out of the answer, and the streaming filter that turns them into OpenAI deltas.

A GGUF's chat template either renders ``tools`` (and assistant ``tool_calls`` / ``tool`` messages in a history)
or it does not; edgemed never invents a format the model was not trained on. The one format edgemed parses
is the Hermes one (Qwen2.5, Hermes, many fine-tunes), a JSON object per call between tags::

    <tool_call>
    {"name": "dose_calculator", "arguments": {"weight_kg": 70}}
    </tool_call>

A template that does not mention ``tools`` is a 400 naming the model; one that renders tools in another format
is a 400 too (its calls could not be read back). ``tool_choice``: ``none`` renders no tools and parses nothing;
``auto`` renders them and parses whatever calls the model writes (with a ``strict`` function among them, a grammar
makes any call follow its schema, as OpenAI's ``strict`` promises, and leaves text free); ``required`` and a named
function constrain sampling with a grammar (llama.cpp GBNF, from the functions' JSON schemas) so the answer is one
call (or, with ``parallel_tool_calls``, one or more) whose arguments match the schema's keywords the grammar enforces
(a strict function's schema holding one it drops is a 400; ``endpoints.answer_check`` checks the arguments after).

Hand-written rather than taken from a library: llama-cpp-python's own chat handlers hard-code per-model
formats and do not work on a template string, and llama.cpp's C++ ``common/chat`` parser is not exposed
through its C API.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

from edgemed.formats.nesting import finite_decoder, loads_json
from edgemed.serve.api import ApiError
from edgemed.serve.grammar_source import (
    GrammarSource,
    bound_refusal,
    forced_call,
    pattern_refusal,
    strict_refusal,
)

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request does with tools: what the template gets, the grammar (if forced), whether to parse."""

    tools: list[dict] = field(default_factory=list)  # rendered into the prompt (OpenAI's tool objects)
    grammar: str | None = None
    parse: bool = False
    source: GrammarSource | None = None  # with a grammar: the functions' schemas in ``tools`` it was made from
    optional: bool = False  # the grammar takes a text answer too (``auto`` with a strict function): no call is owed

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}


def template_format(template: str | None) -> str | None:
    """``"hermes"`` when the chat template renders tools as ``<tool_call>`` JSON, ``"other"`` when it renders
    tools some other way, None when it has no tools at all."""
    if not template or not re.search(r"\btools\b", template):
        return None
    return "hermes" if OPEN in template else "other"


def plan(body, template: str | None, model_id: str) -> ToolPlan:
    """The request's ``ToolPlan``; a 400 when it asks for tools the model's template cannot carry."""
    tools = body.tools or []
    choice = body.tool_choice or ("auto" if tools else "none")
    history = any(m.role == "tool" or m.tool_calls for m in body.messages)
    if not tools:
        if choice not in ("none", "auto"):
            raise ApiError(400, "'tool_choice' asks for a tool call but 'tools' is empty. Fix: send the functions "
                                "in 'tools', or drop 'tool_choice'.", param="tool_choice")
        if history:
            _require(template, model_id, "messages")
        return ToolPlan()
    kind = _require(template, model_id, "tools")
    if kind != "hermes":
        raise ApiError(400, f"The chat template of model '{model_id}' renders tools in a format edgemed cannot read "
                            "back (it parses <tool_call> JSON). Fix: serve a model whose template uses <tool_call>, "
                            "or call without 'tools'.", param="tools", code="tools_not_supported")
    functions = {t.function.name: t.function for t in tools}
    if len(functions) != len(tools):
        raise ApiError(400, "Two tools have the same function name. Fix: give each function its own name.",
                       param="tools")
    rendered = [t.model_dump(exclude_none=True) for t in tools]
    if choice == "none":
        return ToolPlan()
    where = {t.function.name: i for i, t in enumerate(tools)}
    if choice == "auto":
        if not any(f.strict for f in functions.values()) or body.grammar is not None or body.json_schema() is not None:
            return ToolPlan(rendered, None, True)
        # OpenAI's strict: a call the model makes follows its schema; it may still answer in text. Non-strict
        # functions' calls are any object, as without a grammar.
        called = [f if f.strict else f.model_copy(update={"parameters": {"type": "object"}})
                  for f in functions.values()]
        source = forced_call(list(functions), where, "send the functions with 'strict': false")
        return ToolPlan(rendered, grammar(called, body.parallel_tool_calls, where, optional=True), True, source,
                        optional=True)
    if choice == "required":
        forced = list(functions.values())
    else:
        name = choice.function.name
        if name not in functions:
            raise ApiError(400, f"'tool_choice' names the function '{name}', which is not in 'tools'. Fix: name one "
                                f"of: {', '.join(functions)}.", param="tool_choice")
        forced = [functions[name]]
    return ToolPlan(rendered, grammar(forced, body.parallel_tool_calls, where), True,
                    forced_call([f.name for f in forced], where))


def _require(template: str | None, model_id: str, param: str) -> str:
    kind = template_format(template)
    if kind is None:
        raise ApiError(400, f"The model '{model_id}' has no tool-call format in its chat template, so it cannot be "
                            "given tools or tool messages. Fix: serve a model whose chat template supports tools "
                            "(e.g. Qwen2.5), or send the conversation without tools.", param=param,
                       code="tools_not_supported")
    return kind


def _rules(functions: list) -> str:
    """The GBNF rules of a ``call`` to one of ``functions``, arguments per their schemas (llama-cpp-python's
    converter, which asserts on schemas it does not know)."""
    from llama_cpp.llama_grammar import SchemaConverter

    from edgemed.runtime.schema_check import for_grammar

    defs, calls = {}, []
    for f in functions:
        arguments = _rooted(f.name, for_grammar(f.parameters or {"type": "object"}), defs)
        calls.append({"type": "object", "properties": {"name": {"const": f.name}, "arguments": arguments},
                      "required": ["name", "arguments"]})
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if defs:
        schema = {**schema, "$defs": defs}
    converter = SchemaConverter(prop_order={"name": 0, "arguments": 1}, allow_fetch=False, dotall=False,
                                raw_pattern=False)
    converter.visit(converter.resolve_refs(schema, "tools"), "call")
    return converter.format_grammar()


def _rooted(name: str, parameters: dict, defs: dict) -> dict:
    """A copy of a function's ``parameters`` whose local ``$ref``s (``#/$defs/Dose``: relative to ``parameters``) point
    at copies of their targets in ``defs``, the root ``$defs`` of the grammar's schema, each under a name of this
    function's own: wrapped in the call object, they would be looked up from the wrong root, and two functions' refs
    of one name would share one rule. The client's schema is left as it is (the converter rewrites refs in place).
    A ref that points nowhere is left for the converter to refuse."""
    import copy

    from edgemed.runtime.schema_check import _target

    parameters, named = copy.deepcopy(parameters), {}

    def visit(node):
        if isinstance(node, list):
            for item in node:
                visit(item)
        elif isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#") and _target(parameters, ref) is not None:
                if ref not in named:
                    key = f"{name}-{ref.rstrip('/').rpartition('/')[2] or 'root'}"
                    while key in defs:
                        key += "-"
                    named[ref] = key
                    defs[key] = _target(parameters, ref)[1]  # the copy, whose own refs this walk rewrites
                node["$ref"] = f"#/$defs/{named[ref]}"
            for key, value in node.items():
                if key not in ("enum", "const", "default", "examples"):  # data, not schemas
                    visit(value)

    visit(parameters)
    return parameters


def grammar(functions: list, parallel: bool, where: dict[str, int] | None = None, optional: bool = False) -> str:
    """GBNF for one call (or several, when ``parallel``) to one of ``functions``, arguments per their schemas.
    ``where``: each function's index in the request's ``tools``, to name the schema the converter refused.
    ``optional``: text may come before the calls, or be the whole answer (``_text_rules``)."""
    from edgemed.errors import InputError
    from edgemed.runtime.sampling import check_schema_counts

    for f in functions:  # a count is written out in full by the converter, on the event loop: bounded first
        at = (where or {}).get(f.name)
        param = "tools" if at is None else f"tools.{at}.function.parameters"
        refused = bound_refusal(f.parameters, param, f"The 'parameters' schema of '{f.name}'")
        if refused is not None:
            raise refused
        try:
            check_schema_counts(f.parameters or {})
        except InputError as exc:
            raise ApiError(400, f"The 'parameters' schema of the function '{f.name}': {exc.problem} Fix: {exc.fix}.",
                           param=param) from None
        refused = pattern_refusal(f.parameters, param, f"The 'parameters' schema of '{f.name}'")
        if refused is None and f.strict:
            refused = strict_refusal(f.parameters, param, f"The 'parameters' schema of '{f.name}'")
        if refused is not None:
            raise refused
    try:
        rules = _rules(functions)
    except Exception as exc:  # noqa: BLE001 - the converter asserts on schemas it does not know
        bad = next((f for f in functions if not _converts(f)), functions[0])
        at = (where or {}).get(bad.name)
        raise ApiError(400, f"The 'parameters' schema of the function '{bad.name}' cannot be turned into a grammar: "
                            f"{type(exc).__name__} {exc}. Fix: send a JSON schema of objects, types, properties and "
                            "enums.", param="tools" if at is None else f"tools.{at}.function.parameters") from None
    one = f'"{OPEN}\\n" call "\\n{CLOSE}"'
    calls = f"{one} (\"\\n\" {one})*" if parallel else one
    if not optional:
        return f"root ::= {calls}\n" + rules
    t = "text"
    while re.search(rf"^{t}", rules, re.MULTILINE):
        t += "x"
    return f"root ::= {t} ( {calls} )?\n" + _text_rules(t) + rules


def _text_rules(t: str) -> str:
    """GBNF rules, named ``t`` and ``t-...``, of text that ``parse`` finds no call in: without ``<tool_call>``, and
    not a bare JSON object (or fenced one) either, so its first character after blanks is no ``{`` or backtick."""
    body = OPEN[1:]  # the tag after its "<": a "<" breaks off a prefix of it, or is followed by a character that does
    prefix = '"<"' + "".join(f' ( "{c}"' for c in body[:-1]) + " )?" * (len(body) - 1)
    brk = '"<" ' + "".join(f'( [^{c}<] | "{c}" ' for c in body[:-1]) + f"[^{body[-1]}<]" + " )" * (len(body) - 1)
    return (f"{t} ::= [ \\t\\r\\n]* ( [^ \\t\\r\\n{{`<] {t}-any | {t}-prefix* {t}-break {t}-any | {t}-prefix+ )?\n"
            f"{t}-any ::= ( [^<] | {t}-prefix* {t}-break )* {t}-prefix*\n"
            f"{t}-prefix ::= {prefix}\n"
            f"{t}-break ::= {brk}\n")


def _converts(function) -> bool:
    try:
        _rules([function])
    except Exception:  # noqa: BLE001 - as in ``grammar``
        return False
    return True


@dataclass
class Parsed:
    content: str | None
    calls: list[dict]  # OpenAI tool-call objects


#: what a call may start with: the template's tag, or (small models drop it) a fenced or bare JSON object
OPENERS = (OPEN, "```", "{")
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def _call(obj, names) -> dict | None:
    """An OpenAI tool-call object from ``{"name", "arguments"}``, or None when ``obj`` is not a call."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if names is not None and obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            loads_json(args, finite=True)
        except ValueError:  # NaN / Infinity too: model text, and no JSON a client's parser reads
            args = json.dumps(args)  # arguments are always JSON text
    else:
        args = json.dumps(args, ensure_ascii=False)
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": obj["name"], "arguments": args}}


def _bare(text: str, names) -> list[dict]:
    """Calls written without the tag: the whole answer one or more JSON objects (maybe in a ```json fence),
    each naming one of the functions, as llama.cpp's Hermes parser also reads them."""
    body = text.strip()
    fenced = _FENCE.match(body)
    body = fenced.group(1) if fenced else body
    decoder, calls, at = finite_decoder(), [], 0
    while at < len(body):
        try:
            obj, end = decoder.raw_decode(body, at)
        except (ValueError, RecursionError):  # not JSON, or nested past the decoder's depth: the text is content
            return []
        call = _call(obj, names)
        if call is None:
            return []
        calls.append(call)
        at = end
        while at < len(body) and body[at].isspace():
            at += 1
    return calls


def parse(text: str, names=None) -> Parsed:
    """The calls written in ``text`` (well-formed ones: a JSON object with the ``name`` of one of ``names``, any
    name when None) and the text around them."""
    calls, kept, at = [], [], 0
    for match in _CALL.finditer(text):
        try:
            call = _call(loads_json(match.group(1), finite=True), names)
        except ValueError:
            call = None  # not a call: it stays in the content
        if call is None:
            continue
        calls.append(call)
        kept.append(text[at:match.start()])
        at = match.end()
    if not calls:
        bare = _bare(text, names)
        return Parsed(None, bare) if bare else Parsed(text, [])
    kept.append(text[at:])
    return Parsed("".join(kept).strip() or None, calls)


class CallFilter:
    """Streams the content of an answer that may hold calls. While the answer's start could still open a call
    (``OPENERS``) it is held; an answer that opens with one is kept whole for the end, when its calls are parsed
    (and, if it held none after all, sent as content). Other text is passed on until ``<tool_call>`` appears in
    it (held back while the text could still be its beginning); after that, nothing until the end."""

    def __init__(self, names=None):
        self.names = names
        self.text = ""
        self.sent = 0
        self.calling = False
        self.decided = False

    def push(self, piece: str) -> str:
        self.text += piece
        if self.calling:
            return ""
        if not self.decided:
            head = self.text.lstrip()
            if any(head.startswith(o) for o in OPENERS):
                self.calling = self.decided = True
                return ""
            if not head or any(o.startswith(head) for o in OPENERS):
                return ""
            self.decided = True
        at = self.text.find(OPEN, self.sent)
        if at >= 0:
            self.calling = True
            return self._release(at)
        held = next((k for k in range(min(len(OPEN) - 1, len(self.text)), 0, -1) if self.text.endswith(OPEN[:k])), 0)
        return self._release(len(self.text) - held)

    def _release(self, end: int) -> str:
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """What is left to send as content (a held tail that never became a call), and the calls."""
        parsed = parse(self.text, self.names)
        if not parsed.calls:
            return self._release(len(self.text)), []
        # content before the first call went out already; content between or after calls follows here
        rest = parsed.content or ""
        before = self.text[:self.sent].strip()
        if rest.startswith(before):
            rest = rest[len(before):]
        return rest if rest.strip() else "", parsed.calls
