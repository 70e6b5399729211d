"""A JSON schema's counts are bounded by what they add up to written out, not one at a time: ``(a{999}){999}``,
``a{999}b{999}...`` and thirty properties of ``maxLength: 1000`` each passed the bound of one count, and a reversed
count (``{5,2}``) was written as ``{5}``. Each is refused before the converter writes anything; a schema at the bound
still becomes a grammar."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from edgemed.runtime.schema_pattern import (
    MAX_SCHEMA_COUNT,
    MAX_SCHEMA_SIZE,
    grammar_size,
    pattern_size,
)
from edgemed.serve import api, tools

pytest.importorskip("jsonschema")
pytest.importorskip("llama_cpp")


@pytest.mark.parametrize(("pattern", "size"), [
    ("^abc$", 3),
    (r"^[0-9]{2}\.[0-9]$", 4),
    ("^a{3}$", 3),
    ("^(ab){3}$", 6),
    ("^(a{3}){4}$", 12),  # a count in a counted group multiplies
    ("^((a{3}b){4}c){5}$", 5 * (4 * (3 + 1) + 1)),
    ("^a{2,5}$", 5),
    ("^a{2,}$", 3),  # two, then a*
    ("^a{,4}$", 4),
    ("^a{3}?$", 3),  # lazy: written greedy, once
    ("^(a+?){4}$", 4),
    ("^(a+){4}$", 4),
    ("^(a*|bc?){2}$", 6),  # the grammar writes each alternative
    ("^xa{0}$", 2),  # its rule is written, then no copy of it
    ("^((x{999}){20}){0,0}$", 19_980),
    ("^a{}$", 3),  # "{}" is the characters
    ("no anchors", 0),  # left to the converter, which refuses it
])
def test_a_patterns_size_is_its_counts_written_out(pattern, size):
    assert pattern_size(pattern) == size


def test_a_schemas_size_adds_its_patterns_and_lengths_and_leaves_values_out():
    schema = {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "^(x{3}){2}$"},
        "b": {"type": "string", "maxLength": 40, "minLength": 2},
        "c": {"type": "string", "minLength": 5},  # five, then char*
        "d": {"type": "array", "items": {"type": "string", "maxLength": 7}, "minItems": 1, "maxItems": 3},
        "e": {"type": "string", "minLength": 9, "maxLength": 4},  # the converter writes the nine
        "f": {"enum": [{"maxLength": 999}], "default": {"pattern": "^a{999}$"}},
        "g": {"type": "string", "maxLength": -50},
    }}
    assert grammar_size(schema) == 6 + 40 + 6 + 7 + 3 + 9


def _pattern_schema(pattern: str) -> dict:
    return {"type": "object", "properties": {"mrn": {"type": "string", "pattern": pattern}}, "required": ["mrn"]}


def _refused_by_grammar_text(schema: dict):
    from edgemed.runtime.engine import GenerationSettings
    from edgemed.runtime.sampling import SchemaError, grammar_text

    started = time.monotonic()
    with pytest.raises(SchemaError) as refused:
        grammar_text(GenerationSettings(json_schema=json.dumps(schema)))
    assert time.monotonic() - started < 1.0
    return refused.value


@pytest.mark.parametrize(("pattern", "size"), [
    ("^(a{999}){999}$", "998,001"),
    ("^" + "a{999}b" * 21 + "$", "20,999"),  # each under the bound, adding up
    ("^(([0-9]{30}-){30}){30}$", "27,900"),  # nested groups
    ("^([a-z]+[0-9]{100}){300}$", "30,300"),  # a "+" inside the counted group
    ("^(x{,500}){50}$", "25,000"),
    ("^(x{400,}){60}$", "24,060"),
    ("^(a{200}?){200}?$", "40,000"),  # lazy forms
])
def test_counts_that_add_up_beyond_the_bound_are_a_400_before_the_converter_writes_them(pattern, size):
    from test_serve_schema_check import _prompt

    schema = _pattern_schema(pattern)
    with pytest.raises(api.ApiError) as caught:
        _prompt(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    err = caught.value
    assert (err.status, err.code) == (400, "unsupported_schema_pattern")
    assert err.param == "response_format.json_schema.schema.properties.mrn.pattern"
    assert f"{size} characters written out" in err.message, err.message
    assert f"at most {MAX_SCHEMA_SIZE:,} characters" in err.message and "Fix: lower the counts" in err.message
    problem = _refused_by_grammar_text(schema).problem
    assert "properties.mrn.pattern" in problem and f"{MAX_SCHEMA_SIZE:,}" in problem
    tool = SimpleNamespace(name="mrn", parameters=schema, strict=False)
    with pytest.raises(api.ApiError) as caught:
        tools.grammar([tool], parallel=False, where={"mrn": 0})
    assert caught.value.param == "tools.0.function.parameters.properties.mrn.pattern"


@pytest.mark.parametrize(("pattern", "count", "fix"), [("^a{5,2}$", "{5,2}", "{2,5}"),
                                                       ("^([0-9]{2}-){10,3}$", "{10,3}", "{3,10}")])
def test_a_reversed_count_is_a_400_naming_it(pattern, count, fix):
    """The converter wrote ``{5,2}`` as ``{5}``, silently, and the answer's check could not read the pattern."""
    from test_serve_schema_check import _prompt

    schema = _pattern_schema(pattern)
    for strict in (True, False):
        with pytest.raises(api.ApiError) as caught:
            _prompt(response_format={"type": "json_schema",
                                     "json_schema": {"name": "x", "strict": strict, "schema": schema}})
        err = caught.value
        assert (err.status, err.code) == (400, "unsupported_schema_pattern")
        assert err.param == "response_format.json_schema.schema.properties.mrn.pattern"
        assert f"the count {count}" in err.message and "upper bound is below its lower bound" in err.message
        assert f"Fix: write its lower bound first ({fix})" in err.message, err.message
    assert f"the count {count}" in _refused_by_grammar_text(schema).problem


#: counts of MAX_SCHEMA_COUNT a schema holds at the bound
AT_THE_BOUND = MAX_SCHEMA_SIZE // MAX_SCHEMA_COUNT


def _many(n: int, node: dict) -> dict:
    return {"type": "object", "properties": {f"note{i}": dict(node) for i in range(n)}}


@pytest.mark.parametrize("schema", [
    _many(AT_THE_BOUND + 1, {"type": "string", "maxLength": MAX_SCHEMA_COUNT}),
    _many(AT_THE_BOUND + 1, {"type": "array", "items": {"type": "integer"}, "minItems": MAX_SCHEMA_COUNT - 1}),
    _many(3, {"type": "string", "pattern": "^([0-9]{1000}){8}$"}),  # each pattern within the bound
], ids=["maxLength", "minItems", "patterns"])
def test_a_schemas_counts_that_add_up_beyond_the_bound_are_refused_before_its_grammar_is_written(schema):
    from test_serve_schema_check import _prompt

    size = f"{grammar_size(schema):,}"
    problem = _refused_by_grammar_text(schema).problem
    assert f"comes to {size} with its counts written out" in problem and f"at most {MAX_SCHEMA_SIZE:,}" in problem
    tool = {"type": "function", "function": {"name": "notes", "parameters": schema}}
    with pytest.raises(api.ApiError) as caught:
        _prompt(tools=[tool], tool_choice="required")
    assert caught.value.status == 400 and caught.value.param == "tools.0.function.parameters", caught.value
    assert size in caught.value.message and "Fix: lower those counts" in caught.value.message


@pytest.mark.parametrize("schema", [
    _pattern_schema(f"^([0-9]{{{MAX_SCHEMA_COUNT}}}){{{AT_THE_BOUND}}}$"),
    _pattern_schema("^(([0-9]{10}-){10}){180}$"),
    _many(AT_THE_BOUND, {"type": "string", "maxLength": MAX_SCHEMA_COUNT}),
    _many(2, {"type": "string", "pattern": f"^([A-Z]{{{MAX_SCHEMA_COUNT}}}){{{AT_THE_BOUND // 2}}}$"}),
], ids=["pattern", "nested", "maxLength", "patterns"])
def test_a_schema_at_the_bound_still_becomes_a_grammar(schema):
    from test_serve_schema_check import _prompt

    from edgemed.runtime.engine import GenerationSettings
    from edgemed.runtime.sampling import MAX_GRAMMAR_CHARS, grammar_text

    assert grammar_size(schema) <= MAX_SCHEMA_SIZE
    gbnf = grammar_text(GenerationSettings(json_schema=json.dumps(schema)))
    assert gbnf and len(gbnf) < MAX_GRAMMAR_CHARS
    assert _prompt(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})


def test_a_count_too_long_to_read_as_a_number_is_refused_as_a_count():
    """Python reads at most 4,300 digits as a number: the count's own check raised, and the request was a 500."""
    from test_serve_schema_check import _prompt

    schema = _pattern_schema("^a{" + "9" * 5000 + "}$")
    with pytest.raises(api.ApiError) as caught:
        _prompt(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    err = caught.value
    assert (err.status, err.code) == (400, "unsupported_schema_pattern")
    assert f"up to {MAX_SCHEMA_COUNT}" in err.message and f"Fix: repeat at most {MAX_SCHEMA_COUNT}" in err.message
