"""A JSON schema no value meets, and rule names a count writes out, are refused before the converter writes a grammar.

llama-cpp-python's converter took ``minLength: 5, maxLength: 2`` as five characters, ``{"type": "integer", "const":
"a"}`` as ``"a"``, ``enum: []`` as an empty grammar and dropped ``minimum: 10, maximum: 2``: every answer broke the
schema, and a strict one passed as enforced. It names each rule by its path of property names, so a 2,000-character
name under ``minItems: 1000`` wrote 2 MB of grammar from 2 kB of schema, and fifty nested ones 10 MB, caught only
after they were written. Satisfiable schemas at the edges still become grammars.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from edgemed.runtime.schema_bounds import contradiction, names_size
from edgemed.serve import api, tools

pytest.importorskip("jsonschema")
pytest.importorskip("llama_cpp")

#: (node no value meets, the field, words its message holds)
UNMET = [
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength", "minLength is 5, above its maxLength of 2",
     "set minLength to 2 or less, or maxLength to 5 or more"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 1}, "minItems",
     "minItems is 4, above its maxItems of 1", "set minItems to 1 or less, or maxItems to 4 or more"),
    ({"type": "object", "minProperties": 3, "maxProperties": 1}, "minProperties",
     "minProperties is 3, above its maxProperties of 1", "set minProperties to 1 or less"),
    ({"type": "string", "maxLength": -1}, "maxLength", "maxLength is -1", "set maxLength to 0 or more"),
    ({"type": "number", "minimum": 45, "maximum": 30}, "minimum",
     "minimum is 45 and maximum is 30, which leaves no number", "lower minimum or raise maximum"),
    ({"type": "integer", "exclusiveMinimum": 2, "exclusiveMaximum": 3}, "exclusiveMinimum",
     "exclusiveMinimum is 2 and exclusiveMaximum is 3, which leaves no integer", "until an integer lies between them"),
    ({"type": "number", "minimum": 7, "exclusiveMaximum": 7}, "minimum",
     "minimum is 7 and exclusiveMaximum is 7, which leaves no number", "lower minimum or raise exclusiveMaximum"),
    ({"type": "integer", "minimum": 2.2, "maximum": 2.8}, "minimum", "leaves no integer between them",
     "until an integer lies between them"),
    ({"enum": []}, "enum", "enum is [], which no value is in", "list at least one value in enum"),
    ({"type": "integer", "const": "a"}, "const", 'const is "a", which is not of its type "integer"',
     "make the const a value of that type"),
    ({"type": "boolean", "enum": ["yes", "no"]}, "enum", 'enum is ["yes", "no"], none of it of its type "boolean"',
     "list values of that type in enum"),
]
#: satisfiable, at the edge of each
MET = [
    {"type": "string", "minLength": 3, "maxLength": 3},
    {"type": "array", "items": {"type": "integer"}, "minItems": 0, "maxItems": 0},
    {"type": "number", "minimum": 30, "maximum": 30},
    {"type": "number", "exclusiveMinimum": 2, "exclusiveMaximum": 3},
    {"type": "integer", "minimum": 2.2, "maximum": 3},
    {"type": "integer", "const": 1.0},
    {"type": ["integer", "null"], "const": None},
    {"type": "integer", "enum": ["a", 3]},
    {"type": "object", "properties": {"minLength": {"type": "integer"}, "not": {"enum": ["x"]}}},
    {"type": "string", "enum": ["a"], "default": {"minLength": 5, "maxLength": 2}},  # values are data
]


def _nested(node: dict) -> dict:
    return {"type": "object", "required": ["visit"], "properties": {
        "visit": {"type": "object", "properties": {"vitals": node}, "required": ["vitals"]}}}


def _chat(**request):
    from test_serve_schema_check import _prompt

    return _prompt(**request)


@pytest.mark.parametrize(("node", "keyword", "problem", "fix"), UNMET, ids=[u[1] + str(i) for i, u in enumerate(UNMET)])
def test_a_schema_no_value_meets_is_a_400_naming_the_field_its_values_and_the_fix(node, keyword, problem, fix):
    schema = _nested(node)
    bound = contradiction(schema)
    assert bound.at == f"properties.visit.properties.vitals.{keyword}" and problem in bound.problem
    for strict in (True, False):
        with pytest.raises(api.ApiError) as caught:
            _chat(response_format={"type": "json_schema",
                                   "json_schema": {"name": "x", "strict": strict, "schema": schema}})
        err = caught.value
        assert (err.status, err.code) == (400, "unsatisfiable_schema")
        assert err.param == f"response_format.json_schema.schema.properties.visit.properties.vitals.{keyword}"
        assert "at 'properties.visit.properties.vitals'" in err.message and problem in err.message, err.message
        assert "Fix: " in err.message and fix in err.message.partition("Fix: ")[2], err.message
    tool = {"type": "function", "function": {"name": "chart", "parameters": schema}}
    with pytest.raises(api.ApiError) as caught:
        _chat(tools=[tool], tool_choice="required")
    assert caught.value.param == f"tools.0.function.parameters.properties.visit.properties.vitals.{keyword}"
    assert problem in caught.value.message and caught.value.code == "unsatisfiable_schema"


@pytest.mark.parametrize(("node", "keyword", "problem", "fix"), UNMET[:3] + UNMET[8:10], ids=lambda v: None)
def test_a_schema_no_value_meets_is_refused_before_the_converter_runs(node, keyword, problem, fix, monkeypatch):
    """A template's contract and ``edgemed run`` reach the converter through ``grammar_text``: refused there too."""
    import llama_cpp.llama_grammar as converter

    from edgemed.runtime.engine import GenerationSettings
    from edgemed.runtime.sampling import SchemaError, grammar_text

    monkeypatch.setattr(converter, "json_schema_to_gbnf", _never)
    with pytest.raises(SchemaError) as caught:
        grammar_text(GenerationSettings(json_schema=json.dumps(_nested(node))))
    assert f"'properties.visit.properties.vitals.{keyword}' cannot be met: {problem}" in caught.value.problem
    assert fix in caught.value.fix


@pytest.mark.parametrize("node", MET)
def test_a_schema_at_the_edge_of_its_bounds_still_becomes_a_grammar(node):
    from edgemed.runtime.engine import GenerationSettings
    from edgemed.runtime.sampling import grammar_text

    schema = _nested(node)
    assert contradiction(schema) is None
    assert grammar_text(GenerationSettings(json_schema=json.dumps(schema)))
    assert _chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})


def test_what_not_holds_may_be_met_by_nothing():
    assert contradiction({"type": "object", "properties": {"v": {"not": {"enum": []}}}}) is None  # it is anything


def _never(*args, **kwargs):
    raise AssertionError("the converter ran")


LONG = "x" * 2000


def _deep(depth: int, name: str) -> dict:
    node = {"type": "string"}
    for i in range(depth):
        node = {"type": "object", "properties": {f"{name}{i}": node}}
    return node


#: (schema, at least this much grammar written by the old code, the part named)
NAMED = [
    ({"type": "object", "properties": {LONG: {"type": "array", "minItems": 1000, "items": {
        "type": "object", "properties": {"dose": {"type": "number"}}}}}}, 2_000_000, "properties.xxxx"),
    ({"type": "object", "properties": {LONG: {"type": "string", "pattern": "^[0-9]{1000}$"}}}, 2_000_000,
     "properties.xxxx"),
    (_deep(50, LONG), 10_000_000, "properties.xxxx"),  # no count at all: each level repeats the names above it
    (_deep(200, "y" * 200), 16_000_000, "properties.yyyy"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/" + "D" * 1100}}, "$defs": {"D" * 1100: {
        "type": "array", "maxItems": 1000, "items": {"type": "object", "properties": {"q": {"type": "string"}}}}}},
     1_100_000, "$defs.DDDD"),  # a $defs target is named by its own name
]


@pytest.mark.parametrize(("schema", "written", "part"), NAMED, ids=["items", "pattern", "nested", "deeper", "ref"])
def test_rule_names_a_count_writes_out_are_refused_before_the_converter_runs(schema, written, part, monkeypatch):
    import llama_cpp.llama_grammar as converter

    from edgemed.runtime.engine import GenerationSettings
    from edgemed.runtime.sampling import MAX_GRAMMAR_CHARS, SchemaError, grammar_text

    size, most = names_size(schema)
    assert size > MAX_GRAMMAR_CHARS and most.startswith(part)
    monkeypatch.setattr(converter, "json_schema_to_gbnf", _never)
    with pytest.raises(SchemaError) as caught:
        grammar_text(GenerationSettings(json_schema=json.dumps(schema)))
    problem = caught.value.problem
    assert f"at least {size:,} characters of rule names alone" in problem and f"('{part}" in problem, problem
    assert len(problem) < 600 and "shorten the property names" in caught.value.fix  # the 2,000-character name is cut
    monkeypatch.setattr(converter, "SchemaConverter", _never)
    function = SimpleNamespace(name="chart", parameters=schema, strict=False)
    with pytest.raises(api.ApiError) as caught:
        tools.grammar([function], parallel=False, where={"chart": 0})
    assert caught.value.param == "tools.0.function.parameters" and "rule names alone" in caught.value.message


@pytest.mark.parametrize("schema", [s for s, _, _ in NAMED] + [
    {"type": "object", "properties": {f"{'p' * 30}{i}": {"type": "array", "maxItems": 1000, "items": {
        "type": "object", "properties": {"a": {"type": "string"}}}} for i in range(20)}},
    {"type": "object", "properties": {"é" * 2000: {"type": "string"}, "k" * 300: {"anyOf": [
        {"type": "array", "items": {"type": "object", "properties": {"r": {"type": "string"}}}, "maxItems": 500},
        {"type": "string", "pattern": "^(ab){100}.{2,50}$"}]}}},
    {"allOf": [{"type": "object", "properties": {"d" * 300: {"type": "string"}}}, {"$ref": "#/$defs/E"}],
     "$defs": {"E": {"type": "object", "properties": {"e" * 200: {"type": "integer"}}}}},
], ids=lambda s: None)
def test_the_names_counted_are_at_most_what_the_converter_writes(schema):
    """A lower bound: a schema the bound refuses writes a grammar beyond ``MAX_GRAMMAR_CHARS``, one refused anyway."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    from edgemed.runtime.schema_check import for_grammar

    assert names_size(schema)[0] <= len(json_schema_to_gbnf(json.dumps(for_grammar(schema))))


@pytest.mark.parametrize("schema", [
    # twenty arrays of up to 1000 objects under 31-character names: 1 MB of grammar, 0.7 MB of it names
    {"type": "object", "properties": {f"{'p' * 30}{i}": {"type": "array", "maxItems": 1000, "items": {
        "type": "object", "properties": {"a": {"type": "string"}}}} for i in range(20)}},
    {"type": "object", "properties": {LONG: {"type": "string", "maxLength": 1000}}},  # a long name, no copies of it
    _deep(10, "z" * 30),
], ids=["many-arrays", "long-name", "nested"])
def test_long_names_within_the_bound_still_become_a_grammar(schema):
    from edgemed.runtime.engine import GenerationSettings
    from edgemed.runtime.sampling import MAX_GRAMMAR_CHARS, grammar_text

    gbnf = grammar_text(GenerationSettings(json_schema=json.dumps(schema)))
    assert gbnf and len(gbnf) <= MAX_GRAMMAR_CHARS
    assert _chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
