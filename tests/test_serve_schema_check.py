"""A JSON schema's keywords that its grammar drops (``minimum``, ``maximum``, ``format: email``, ``uniqueItems``...)
are refused for a strict schema and checked in every answer (``edgemed.schema``), for ``response_format`` and for
forced tool calls.

A strict vitals schema (``temp_c`` 30..45, ``hr`` 20..250) was answered ``{"temp_c": 373.2, "hr": 8}`` with
``finish_reason: "stop"``: llama-cpp-python's converter drops those keywords without a word. The list of dropped
keywords is checked against the converter itself: removing each one it names leaves the grammar unchanged.
"""

from __future__ import annotations

import asyncio
import copy
import json
from types import SimpleNamespace

import pytest

from edgemed.serve import api
from edgemed.serve.endpoints import chat_prompt
from edgemed.serve.middleware import RequestRecord
from edgemed.templates import load_templates

pytest.importorskip("jsonschema")
pytest.importorskip("llama_cpp")

VITALS = {"type": "object", "additionalProperties": False, "required": ["temp_c", "hr"],
          "properties": {"temp_c": {"type": "number", "minimum": 30, "maximum": 45},
                         "hr": {"type": "integer", "minimum": 20, "maximum": 250}}}
DOSE = {"type": "function", "function": {"name": "dose", "parameters": {
    "type": "object", "required": ["mg", "email"],
    "properties": {"mg": {"type": "number", "exclusiveMaximum": 100}, "email": {"type": "string", "format": "email"}}}}}
MESSAGES = [{"role": "user", "content": "Vitals as JSON."}]


class _Batcher:
    """Renders messages and speaks Hermes tool calls; nothing else of a batcher is used here."""

    def chat_template(self):
        return "{% for t in tools %}{{ t }}{% endfor %} <tool_call>"

    def render_chat(self, messages, tools=None):
        return "".join(m["content"] for m in messages)


def _prompt(**request):
    served = SimpleNamespace(batcher=_Batcher(), templates=load_templates(), config=SimpleNamespace(model_id="m"))
    body = api.ChatRequest(model="m", messages=MESSAGES, **request)
    return asyncio.run(chat_prompt(served, RequestRecord("r", "chat", None), body))


def _vitals(strict: bool | None):
    return {"type": "json_schema", "json_schema": {"name": "vitals", "strict": strict, "schema": VITALS}}


def test_a_strict_schema_with_keywords_the_grammar_drops_is_refused_naming_the_first():
    with pytest.raises(api.ApiError) as caught:
        _prompt(response_format=_vitals(True), temperature=1)
    err = caught.value
    assert (err.status, err.code) == (400, "unsupported_schema_keyword")
    assert err.param == "response_format.json_schema.schema.properties.temp_c.minimum"
    assert "properties.hr.maximum" in err.message and "Fix: drop those keywords" in err.message


def test_a_strict_forced_call_with_keywords_the_grammar_drops_is_refused():
    tool = copy.deepcopy(DOSE)
    tool["function"]["strict"] = True
    with pytest.raises(api.ApiError) as caught:
        _prompt(tools=[tool], tool_choice="required")
    assert caught.value.param == "tools.0.function.parameters.properties.mg.exclusiveMaximum"
    assert "properties.email.format" in caught.value.message


def test_a_strict_schema_the_grammar_enforces_whole_is_taken():
    schema = {"type": "object", "required": ["code"], "properties": {
        "code": {"type": "string", "pattern": "^[A-Z][0-9]{2}$"}, "when": {"type": "string", "format": "date"},
        "notes": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3, "title": "notes"}}}
    prompt = _prompt(response_format={"type": "json_schema", "json_schema": {"strict": True, "schema": schema}})
    assert prompt.json_schema is not None


def test_an_answer_outside_a_non_strict_schema_says_which_keywords_it_breaks():
    prompt = _prompt(response_format=_vitals(False))
    report = prompt.extra('{"temp_c": 373.2, "hr": 8}', "stop")["edgemed"]["schema"]
    assert report["valid"] is False
    assert [(e["path"], e["keyword"]) for e in report["errors"]] == [("content.hr", "minimum"),
                                                                     ("content.temp_c", "maximum")]
    assert prompt.extra('{"temp_c": 37.2, "hr": 80}', "stop")["edgemed"]["schema"] == {"valid": True, "errors": []}
    assert prompt.extra('{"temp_c": 37', "length")["edgemed"]["schema"]["valid"] is False  # cut: not whole JSON


def test_a_forced_calls_arguments_are_checked_against_its_parameters():
    prompt = _prompt(tools=[DOSE], tool_choice="required")
    call = {"name": "dose", "arguments": {"mg": 100, "email": "nobody"}}
    report = prompt.extra(f"<tool_call>\n{json.dumps(call)}\n</tool_call>", "stop")["edgemed"]["schema"]
    assert [(e["path"], e["keyword"]) for e in report["errors"]] == [
        ("tool_calls.0.function.arguments.email", "format"), ("tool_calls.0.function.arguments.mg", "exclusiveMaximum")]


def test_a_schema_that_cannot_be_checked_is_not_called_valid():
    schema = {"type": "object", "properties": {"x": {"$ref": "https://example.org/x.json"}}}
    prompt = _prompt(response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    assert prompt.extra('{"x": 1}', "stop")["edgemed"]["schema"]["valid"] is None


SCHEMAS = [
    VITALS,
    DOSE["function"]["parameters"],
    {"type": "array", "items": {"type": "integer", "multipleOf": 5}, "uniqueItems": True, "minItems": 1},
    {"type": "string", "pattern": "^[a-z]+$", "maxLength": 4, "format": "email"},
    {"type": ["integer", "null"], "minimum": 0},
    {"anyOf": [{"type": "integer", "maximum": 3}, {"type": "string", "minLength": 2}], "type": "object",
     "properties": {"a": {"type": "integer"}}},
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/pos", "maximum": 9}}, "minProperties": 1,
     "$defs": {"pos": {"type": "integer", "exclusiveMinimum": 0}}},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_each_keyword_named_as_dropped_is_dropped_by_the_converter(schema):
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    from edgemed.runtime.schema_check import unenforced

    dropped = unenforced(schema)
    assert dropped
    whole = json_schema_to_gbnf(json.dumps(schema))
    for path, keyword in dropped:
        less = copy.deepcopy(schema)
        node = less
        for step in path.split(".") if path else []:
            node = node[int(step)] if isinstance(node, list) else node[step]
        del node[keyword]
        assert json_schema_to_gbnf(json.dumps(less)) == whole, (path, keyword)


@pytest.mark.parametrize(("pattern", "construct"), [
    (r"^\bdose\b$", "\\b"),
    (r"^\D+$", "\\D"),
    (r"^(a)\1$", "\\1"),
    (r"^a$|^b$", "the anchor '$' inside the pattern"),
    (r"^[^\d]+$", "\\d in a negated class"),
    (r"^[0-9]+\$", "an escaped '$' at its end"),
    (r'^say "hi"$', 'the character "'),
    # an escape for a character a JSON string writes escaped: the grammar would write it bare
    (r"^a\x22b$", 'the character " (written \\x22)'),
    (r"^\u0022$", 'the character " (written \\u0022)'),
    (r"^C:\x5Cdata$", "the character \\ (written \\x5C)"),
    (r"^[a\u005c]+$", "the character \\ (written \\u005c)"),
    (r"^a\tb$", "the control character U+0009 (written \\t)"),
    (r"^line\x0Anext$", "the control character U+000A (written \\x0A)"),
    (r"^[\x00-\x1F]+$", "the range \\x00-\\x1F"),
])
def test_a_pattern_no_grammar_enforces_is_refused_strict_or_not(pattern, construct):
    schema = {"type": "object", "properties": {"mrn": {"type": "string", "pattern": pattern}}, "required": ["mrn"]}
    for strict in (True, False):
        with pytest.raises(api.ApiError) as caught:
            _prompt(response_format={"type": "json_schema",
                                     "json_schema": {"name": "x", "strict": strict, "schema": schema}})
        err = caught.value
        assert (err.status, err.code) == (400, "unsupported_schema_pattern")
        assert err.param == "response_format.json_schema.schema.properties.mrn.pattern"
        assert construct in err.message and "Fix: " in err.message


def test_a_strict_schema_with_digit_escapes_is_taken_and_its_grammar_writes_digits():
    schema = {"type": "object", "additionalProperties": False, "required": ["mrn"],
              "properties": {"mrn": {"type": "string", "pattern": r"^\d{6}$"}}}
    prompt = _prompt(response_format={"type": "json_schema",
                                      "json_schema": {"name": "x", "strict": True, "schema": schema}})
    from edgemed.runtime.engine import GenerationSettings
    from edgemed.runtime.sampling import grammar_text

    gbnf = grammar_text(GenerationSettings(json_schema=prompt.json_schema))
    assert "[0-9]" in gbnf and "\\d" not in gbnf


@pytest.mark.parametrize("pattern", [r"^a{1000000}$", r"^[0-9]{2,999999}$", r"^(ab){1001,}$"])
def test_a_count_in_a_pattern_above_the_bound_is_refused_before_the_converter_writes_it(pattern):
    """The converter writes a pattern's count out in full (``a{1000000}`` a million-character rule, ``{2,999999}``
    groups nested a million deep): one request's memory and time. Refused, naming the pattern and the limit."""
    from edgemed.runtime.engine import GenerationSettings
    from edgemed.runtime.sampling import MAX_SCHEMA_COUNT, SchemaError, grammar_text

    count = pattern[pattern.index("{"):pattern.index("}") + 1]
    schema = {"type": "object", "properties": {"mrn": {"type": "string", "pattern": pattern}}, "required": ["mrn"]}
    with pytest.raises(api.ApiError) as caught:
        _prompt(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    err = caught.value
    assert (err.status, err.code) == (400, "unsupported_schema_pattern")
    assert err.param == "response_format.json_schema.schema.properties.mrn.pattern"
    assert f"the count {count}" in err.message and f"up to {MAX_SCHEMA_COUNT}" in err.message, err.message
    assert f"Fix: repeat at most {MAX_SCHEMA_COUNT} times" in err.message, err.message
    with pytest.raises(SchemaError) as refused:
        grammar_text(GenerationSettings(json_schema=json.dumps(schema)))
    assert "properties.mrn.pattern" in refused.value.problem and str(MAX_SCHEMA_COUNT) in refused.value.problem


def test_a_count_in_a_pattern_at_the_bound_still_becomes_a_grammar():
    from edgemed.runtime.engine import GenerationSettings
    from edgemed.runtime.sampling import MAX_SCHEMA_COUNT, grammar_text

    schema = {"type": "string", "pattern": f"^[0-9]{{1,{MAX_SCHEMA_COUNT}}}$"}
    assert grammar_text(GenerationSettings(json_schema=json.dumps(schema)))
