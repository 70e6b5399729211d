"""``NaN``, ``Infinity``, ``-Infinity`` and ``1e999`` in a request body to a real ``edgemed serve`` (uvicorn, the real
batcher, SmolLM2): RFC 8259 JSON has no such numbers, but Python's JSON reader takes them, so each body is read
with them refused before any field is, whatever field holds them (a sampler setting, a bias, a schema inside
``tools`` or ``response_format``, a field edgemed ignores). Each is an OpenAI-style 400 naming the literal, its
field in ``param`` and the fix. The bodies are sent as raw bytes: the official ``openai`` client refuses to write
them (``allow_nan=False``), a hand-rolled client using Python's ``json.dumps`` does not.

Model text is read the same way: a tool call whose arguments hold ``NaN`` is not a call (its arguments would be
JSON no client's parser reads), and a history's ``NaN`` arguments stay the text they were.
"""

from __future__ import annotations

import json

import pytest

from serve_kit import ServerThread

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package ships with

from edgemed.runtime.batch.batcher import Batcher  # noqa: E402
from edgemed.runtime.engine import LoadSettings  # noqa: E402
from edgemed.serve.app import create_app  # noqa: E402
from edgemed.serve.config import ServeConfig  # noqa: E402

MODEL = "smollm2-finite"
FIX = "Fix: send a finite number"


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    batcher = Batcher(smollm2_gguf, LoadSettings(n_ctx=512, n_threads=1), slots=1, queue_size=4)
    batcher.start()
    try:
        with ServerThread(create_app(batcher, ServeConfig(model_id=MODEL, bundle_digest="sha256:test"))) as srv:
            yield srv
    finally:
        batcher.close()


def post(server, path: str, body: str):
    return httpx.post(server.url + path, content=body.encode(), headers={"content-type": "application/json"},
                      timeout=60)


CHAT = '{"model": "%s", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], ' % MODEL
SCHEMA = '{"type": "object", "properties": {"dose_mg": {"type": "number", "maximum": NaN}}}'
TOOL = ('[{"type": "function", "function": {"name": "dose", "parameters": {"type": "object", "properties": '
        '{"weight_kg": {"type": "number", "minimum": -Infinity}}}}}]')
#: (path, body, literal, param)
CASES = [
    ("/v1/chat/completions", CHAT + '"temperature": NaN}', "NaN", "temperature"),
    ("/v1/chat/completions", CHAT + '"max_tokens": Infinity}', "Infinity", "max_tokens"),
    ("/v1/chat/completions", CHAT + '"repeat_penalty": 1e999}', "1e999", "repeat_penalty"),
    ("/v1/chat/completions", CHAT + '"stream": true, "top_p": -Infinity}', "-Infinity", "top_p"),
    ("/v1/chat/completions", CHAT + '"logit_bias": {"42": -Infinity}}', "-Infinity", "logit_bias.42"),
    ("/v1/chat/completions", CHAT + '"response_format": {"type": "json_schema", "json_schema": {"name": "d", '
                                    '"schema": %s}}}' % SCHEMA, "NaN",
     "response_format.json_schema.schema.properties.dose_mg.maximum"),
    ("/v1/chat/completions", CHAT + '"tools": %s}' % TOOL, "-Infinity",
     "tools.0.function.parameters.properties.weight_kg.minimum"),
    ("/v1/chat/completions", CHAT + '"template_inputs": {"age": NaN}}', "NaN", "template_inputs.age"),
    ("/v1/chat/completions", '{"model": "%s", "max_tokens": 1, "messages": [{"role": "user", "content": "hi", '
                             '"weight": NaN}]}' % MODEL, "NaN", "messages.0.weight"),  # a field edgemed ignores
    ("/v1/completions", '{"model": "%s", "prompt": "hi", "max_tokens": 1, "frequency_penalty": NaN}' % MODEL,
     "NaN", "frequency_penalty"),
    ("/v1/completions", '{"model": "%s", "prompt": [1, 2, Infinity], "max_tokens": 1}' % MODEL, "Infinity",
     "prompt.2"),
]


@pytest.mark.parametrize("path, body, literal, param", CASES, ids=[c[3] for c in CASES])
def test_a_number_json_has_no_place_for_is_a_400_naming_it_and_its_field(server, path, body, literal, param):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert f"'{param}' is {literal}," in error["message"] and FIX in error["message"], error["message"]


def test_the_first_in_the_body_is_named_and_the_rest_of_the_body_is_not_read(server):
    r = post(server, "/v1/chat/completions", CHAT + '"top_k": NaN, "temperature": Infinity, "suffix": "x"}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k", r.text


def test_a_body_that_is_not_json_either_way_is_still_named_malformed(server):
    r = post(server, "/v1/chat/completions", CHAT + '"temperature": NaN,')
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "invalid_json" and error["param"] is None, r.text
    assert "not valid JSON" in error["message"]


def test_finite_numbers_and_the_words_as_text_are_answered(server):
    body = ('{"model": "%s", "max_tokens": 1, "temperature": 0.0, "repeat_penalty": 1.1, "logit_bias": {"42": -100}, '
            '"messages": [{"role": "user", "content": "NaN Infinity -Infinity 1e999"}]}' % MODEL)
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text


def test_an_admin_body_with_a_nan_scale_is_refused_the_same_way(server):
    r = post(server, "/admin/adapters", '{"name": "cardio", "adapter": "cardio", "scale": NaN}')
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "scale" and FIX in error["message"], r.text


# -- model text: the tool-call parser and a history's arguments (no model) ---------------------------------------
def strict(text: str):
    """JSON as a strict reader (JavaScript's JSON.parse, the openai client) reads it: NaN and Infinity refused."""
    def refuse(name):
        raise ValueError(name)

    return json.loads(text, parse_constant=refuse)


def test_a_tool_call_with_non_finite_arguments_is_not_a_call():
    from edgemed.serve.tools import parse

    for text in ('<tool_call>\n{"name": "f", "arguments": {"a": NaN}}\n</tool_call>',
                 '{"name": "f", "arguments": {"a": Infinity}}',
                 '```json\n{"name": "f", "arguments": {"a": [1, -Infinity]}}\n```'):
        parsed = parse(text, {"f"})
        assert parsed.calls == [] and parsed.content == text, text
    as_text = parse('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": NaN}"}\n</tool_call>', {"f"})
    assert strict(as_text.calls[0]["function"]["arguments"]) == '{"a": NaN}'  # JSON text: a string, not NaN
    assert strict(parse('{"name": "f", "arguments": {"a": 1.5}}', {"f"}).calls[0]["function"]["arguments"]) == \
        {"a": 1.5}


def test_a_historys_non_finite_arguments_stay_text():
    from edgemed.serve.api import ChatMessage

    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": NaN}'}}
    message = ChatMessage(role="assistant", tool_calls=[call]).as_template_message()
    assert message["tool_calls"][0]["function"]["arguments"] == '{"a": NaN}'
    call["function"]["arguments"] = '{"a": 2}'
    assert ChatMessage(role="assistant", tool_calls=[call]).as_template_message()["tool_calls"][0]["function"][
        "arguments"] == {"a": 2}
