"""A tool's ``parameters`` schema is held to the counts a response format's schema is held to, before the converter
writes the grammar out: ``minItems: 100000`` wrote a 1.8 MB grammar, and 10**8 would have been about 1.8 GB, built on
the server's event loop."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from edgemed.runtime.sampling import MAX_SCHEMA_COUNT
from edgemed.serve import tools
from edgemed.serve.api import ApiError


@pytest.mark.parametrize("count", ["minItems", "maxLength", "maxProperties"])
def test_a_tool_schema_count_beyond_the_bound_is_refused_before_its_grammar_is_written(count):
    huge = {"type": "object", "properties": {"doses": {"type": "array" if count == "minItems" else "string",
                                                       count: 10**8}}}
    if count == "maxProperties":
        huge = {"type": "object", "maxProperties": 10**8}
    functions = [SimpleNamespace(name="ok", parameters={"type": "object"}, strict=False),
                 SimpleNamespace(name="dose", parameters=huge, strict=False)]
    started = time.monotonic()
    with pytest.raises(ApiError) as e:
        tools.grammar(functions, parallel=False, where={"ok": 0, "dose": 1})
    assert time.monotonic() - started < 1.0
    assert e.value.status == 400 and e.value.param == "tools.1.function.parameters", e.value
    assert count in str(e.value) and str(MAX_SCHEMA_COUNT) in str(e.value) and "'dose'" in str(e.value)


def test_a_tool_schema_within_the_bound_still_becomes_a_grammar():
    fine = {"type": "object", "properties": {"doses": {"type": "array", "items": {"type": "number"},
                                                       "maxItems": MAX_SCHEMA_COUNT // 100}}}
    assert "call" in tools.grammar([SimpleNamespace(name="dose", parameters=fine, strict=False)], parallel=True)


def test_a_count_in_a_tool_schemas_pattern_beyond_the_bound_is_refused_before_its_grammar_is_written():
    """A pattern's count is written out in full too (``{1000000}`` a million-character rule)."""
    huge = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^x{1000000}$"}}}
    with pytest.raises(ApiError) as e:
        tools.grammar([SimpleNamespace(name="code", parameters=huge, strict=False)], parallel=False, where={"code": 0})
    assert e.value.status == 400 and e.value.param == "tools.0.function.parameters.properties.code.pattern", e.value
    assert "{1000000}" in str(e.value) and str(MAX_SCHEMA_COUNT) in str(e.value) and "'code'" in str(e.value)
