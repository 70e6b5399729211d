"""``edgemed serve`` under hostile input: no request freezes the server, none is a 500.

A real uvicorn server on a free port serves a copy of SmolLM2 whose chat template turns hostile on cue:
the last message's content picks a nested ``range(99999)`` loop, a 128 MiB string, a float overflow,
unbounded recursion, or an empty prompt; anything else renders SmolLM2's ChatML. While the loop renders,
``/health`` answers; the hostile request ends with an ``invalid_template`` 400 in bounded time.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from serve_kit import ServerThread

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package ships with

from edgemed.runtime.engine import LoadSettings  # noqa: E402
from edgemed.serve.app import create_app  # noqa: E402
from edgemed.runtime.batch.batcher import Batcher  # noqa: E402
from edgemed.serve.config import ServeConfig  # noqa: E402
from test_template_limits import BOUNDED_S, LOOP, RECURSION, doubling, with_chat_template  # noqa: E402

MODEL = "smollm2-hostile"
ON_CUE = {
    "loop": (LOOP, "ran longer than 1 s"),
    "big": (doubling(24), "produced more than"),  # 16 MiB: over the output limit long before 1 s
    "overflow": ("{{ 2.0 ** 5000 }}", "OverflowError"),
    "recursion": (RECURSION, "recursed deeper than"),
    "empty": ("", "rendered an empty prompt"),
}
BRANCHES = "".join(("{% if" if i == 0 else "{% elif") + f" c == '{cue}' %}}" + source
                   for i, (cue, (source, _)) in enumerate(ON_CUE.items()))
TEMPLATE = ("{% set c = messages[-1].content %}" + BRANCHES
            + "{% else %}<|im_start|>user\n{{ c }}<|im_end|>\n<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def server(smollm2_gguf, tmp_path_factory):
    path = with_chat_template(smollm2_gguf, tmp_path_factory.mktemp("hostile") / "hostile.gguf", TEMPLATE)
    batcher = Batcher(path, LoadSettings(n_ctx=512, n_threads=1), slots=1, queue_size=4)
    batcher.start()
    try:
        with ServerThread(create_app(batcher, ServeConfig(model_id=MODEL, bundle_digest="sha256:test"))) as srv:
            srv.batcher = batcher  # for the tests that watch what the server asked of it
            yield srv
    finally:
        batcher.close()


def post(server, path: str, body: dict):
    """JSON with ASCII escapes, as a hostile client sends it: "\\ud800" reaches the server as a lone surrogate."""
    return httpx.post(server.url + path, content=json.dumps(body), headers={"content-type": "application/json"},
                      timeout=60)


def chat(server, content, **extra):
    return post(server, "/v1/chat/completions",
                {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": content}], **extra})


def is_openai_error(r, status: int, code: str | None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["code"] == code and "Fix:" in error["message"]
    return error


def test_health_answers_while_a_hostile_template_runs(server, monkeypatch):
    result = {}
    rendering = threading.Event()  # set while the server renders a chat template
    real_render = server.batcher.render_chat

    def render_chat(*args, **kwargs):
        rendering.set()
        try:
            return real_render(*args, **kwargs)
        finally:
            rendering.clear()

    monkeypatch.setattr(server.batcher, "render_chat", render_chat)

    def hostile():
        start = time.monotonic()
        result["response"] = chat(server, "loop")
        result["took"] = time.monotonic() - start

    thread = threading.Thread(target=hostile)
    thread.start()
    assert rendering.wait(timeout=60), "the hostile request never reached the template"
    health = []  # (status, whether the render was still running when the answer came)
    while thread.is_alive():
        r = httpx.get(server.url + "/health", timeout=30)
        health.append((r.status_code, rendering.is_set()))
        time.sleep(0.05)
    thread.join()
    assert health, "the hostile request ended before /health was asked"
    assert all(status == 200 for status, _ in health), health
    # answered while the render ran: a render that held the server's event loop would let no answer out until it
    # ended, however long it took
    assert any(during for _, during in health), health
    error = is_openai_error(result["response"], 400, "invalid_template")
    assert ON_CUE["loop"][1] in error["message"] and result["took"] < BOUNDED_S
    assert chat(server, "Name one vitamin.").status_code == 200  # and the server still serves


@pytest.mark.parametrize("cue", sorted(set(ON_CUE) - {"loop"}))
def test_a_template_breaking_a_limit_is_an_invalid_template_400(server, cue):
    start = time.monotonic()
    error = is_openai_error(chat(server, cue), 400, "invalid_template")
    assert ON_CUE[cue][1] in error["message"] and time.monotonic() - start < BOUNDED_S


def test_lone_surrogate_is_a_400_naming_the_field(server):
    error = is_openai_error(chat(server, "\ud800"), 400, None)
    assert error["param"] == "messages.0.content" and "not valid Unicode" in error["message"]
    parts = [{"type": "text", "text": "ok"}, {"type": "text", "text": "x\udfff"}]
    assert is_openai_error(chat(server, parts), 400, None)["param"] == "messages.0.content.1.text"
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "\ud800", "max_tokens": 2})
    assert is_openai_error(r, 400, None)["param"] == "prompt"
    r = chat(server, "hi", template="mcq", template_inputs={"question": "q\ud83d", "options": {"A": "a"}})
    assert is_openai_error(r, 400, None)["param"] == "template_inputs.question"


@pytest.mark.parametrize("inputs, param, says", [
    ({"question": ["a", "b"], "options": {"A": "x", "B": "y"}}, "template_inputs.question",
     "template_inputs.question must be text, not an array"),
    ({"question": "q", "options": {"A": "", "B": "y"}}, "template_inputs.options.A",
     "the option 'A' in template_inputs.options has no text"),
])
def test_a_template_input_that_is_not_text_is_a_400_naming_it(server, inputs, param, says):
    """An array reached the prompt as Python's repr ("Question: ['a', 'b']"), an empty option as "A." alone."""
    error = is_openai_error(post(server, "/v1/chat/completions", {"model": MODEL, "max_tokens": 4, "messages": [],
                                                                   "template": "mcq", "template_inputs": inputs}),
                            400, "invalid_template")
    assert error["param"] == param and says in error["message"] and "template_inputs" in error["message"], error


def test_a_schema_the_grammar_converter_rejects_is_a_400(server):
    """llama-cpp-python's converter asserts on an unknown type; the llama layer's ``grammar_text`` makes it an
    InputError."""
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "flurb"}}}
    is_openai_error(chat(server, "Name one vitamin.", response_format=fmt), 400, None)


#: a free-text field at the bound of one count
NOTE = {"type": "string", "maxLength": 1000}


@pytest.mark.parametrize("kind,value,words", [
    # llama.cpp's parser builds rules for {2,1} until memory runs out
    ("grammar", 'root ::= "a"{2,1}', "at most 1 is fewer than at least 2"),
    # its parser recurses once per group: this deep, a segfault, and the server gone with it
    ("grammar", "root ::= " + '("a" ' * 20_000 + ")" * 20_000, "nests groups more than 1024 deep"),
    # the converter nests one group per character of maxLength (a segfault, here) ...
    ("schema", {"type": "string", "maxLength": 30_000}, "maxLength is 30000"),
    # ... and writes minItems out in full (about 18 characters an item) before anything reads it
    ("schema", {"type": "array", "items": {"type": "integer"}, "minItems": 10**8}, "minItems is 100000000"),
    # ... and counts each within the bound can add up: a count of a group repeats all of it, each length is written
    ("schema", {"type": "string", "pattern": "^(a{999}){999}$"}, "998,001 characters written out"),
    ("schema", {"type": "object", "properties": {f"n{i}": NOTE for i in range(21)}},
     "comes to 21,000 with its counts written out"),
    # the converter wrote a reversed count as its lower bound
    ("schema", {"type": "string", "pattern": "^[0-9]{5,2}$"}, "the count {5,2}"),
    # ... and names each rule by its path of property names, written once per copy a count makes of it: 2 MB
    ("schema", {"type": "object", "properties": {"x" * 2000: {"type": "array", "minItems": 1000, "items": {
        "type": "object", "properties": {"dose": {"type": "number"}}}}}}, "characters of rule names alone"),
])
def test_a_grammar_llama_cpp_cannot_parse_safely_is_a_400_and_the_server_stays_up(server, kind, value, words):
    if kind == "grammar":
        r = post(server, "/v1/completions", {"model": MODEL, "prompt": "Name one vitamin.", "max_tokens": 4,
                                             "grammar": value})
    else:
        r = chat(server, "Name one vitamin.",
                 response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": value}})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text[:300]
    assert chat(server, "hi").status_code == 200


@pytest.mark.parametrize("text", ['root ::= "{2,1}" [{] "a"{1,2} # {9,3} in a comment', 'root ::= "\\"{5,1}" "b"',
                                  'root ::= ' + '("a" ' * 1024 + ")" * 1024, 'root ::= ["(((("] "a"{3} "b"{0,} "c"{2,}'])
def test_the_grammar_check_reads_literals_classes_and_comments_as_llama_cpp_does(text):
    from edgemed.runtime.sampling import check_gbnf

    check_gbnf(text)  # nothing refused: the braces and brackets are text, or the counts are in order


@pytest.mark.parametrize("kind", ["grammar", "schema"])
def test_a_grammar_too_costly_to_follow_is_refused_before_the_server_follows_it(server, kind):
    """Alternatives that match the same text under a repetition grow llama.cpp's parses exponentially: with twelve,
    one token took hours, inside the one call every other answer's step waits for. The probe process tries it first
    (and is killed at its limit); the request is a 400, and the same grammar again is refused at once."""
    ambiguous = "(" + " | ".join(["[a-z ]+"] * 12) + ")*"
    probe = server.batcher._probe
    for attempt in range(2):
        t0, probes = time.monotonic(), probe.probes
        if kind == "grammar":
            r = post(server, "/v1/completions", {"model": MODEL, "prompt": "Name one vitamin.", "max_tokens": 4,
                                                 "grammar": "root ::= " + ambiguous})
        else:
            schema = {"type": "string", "pattern": "^" + ambiguous.replace(" | ", "|") + "$"}
            r = chat(server, "Name one vitamin.",
                     response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        assert r.status_code == 400 and "The grammar was refused" in r.json()["error"]["message"], r.text[:300]
        field = "grammar" if kind == "grammar" else "response_format"  # was null: the client could not tell which
        assert r.json()["error"]["param"] == field and f"in '{field}'" in r.json()["error"]["message"], r.text[:300]
        if attempt == 0:  # the probe is killed at its limit (2 s + 1 s grace): 30 s leaves room for a loaded box
            assert probe.probes == probes + 1 and time.monotonic() - t0 < 30
        else:
            assert probe.probes == probes  # the second time from the verdict kept: the probe was not asked
    assert chat(server, "hi").status_code == 200


def test_a_count_inside_an_enum_value_is_data_not_a_schema():
    from edgemed.runtime.engine import GenerationSettings
    from edgemed.runtime.sampling import grammar_text

    schema = {"type": "object", "properties": {"v": {"enum": [{"maxItems": 5000}], "default": {"minLength": 9999}}}}
    assert grammar_text(GenerationSettings(json_schema=json.dumps(schema)))


def test_a_schema_within_the_limits_still_constrains_the_answer(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"v": {"type": "string", "maxLength": 1000}}, "required": ["v"]}}}
    r = chat(server, "Name one vitamin.", response_format=fmt, max_tokens=24)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].lstrip().startswith("{")


def test_a_schema_at_the_size_bound_still_constrains_the_answer(server):
    from edgemed.runtime.schema_check import MAX_SCHEMA_COUNT, MAX_SCHEMA_SIZE

    pattern = f"^([0-9]{{{MAX_SCHEMA_COUNT}}}){{{MAX_SCHEMA_SIZE // MAX_SCHEMA_COUNT}}}$"
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"v": {"type": "string", "pattern": pattern}}, "required": ["v"]}}}
    r = chat(server, "Name one vitamin.", response_format=fmt, max_tokens=24)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].lstrip().startswith("{")


@pytest.mark.parametrize("schema,field,words", [
    ({"type": "object", "properties": {"code": {"type": "string", "minLength": 5, "maxLength": 2}}},
     "properties.code.minLength", "minLength is 5, above its maxLength of 2"),
    ({"type": "object", "properties": {"hr": {"type": "integer", "minimum": 250, "maximum": 20}}},
     "properties.hr.minimum", "minimum is 250 and maximum is 20"),
    ({"type": "object", "properties": {"route": {"enum": []}}}, "properties.route.enum", "enum is []"),
    ({"type": "object", "properties": {"n": {"type": "integer", "const": "a"}}}, "properties.n.const", 'const is "a"'),
])
def test_a_schema_no_answer_could_match_is_a_400_naming_the_field(server, schema, field, words):
    """The converter took each silently (five characters for maxLength 2, "a" for an integer, an empty grammar for
    enum [], no bound at all for minimum 250): a 200 whose answer broke the schema every time."""
    r = chat(server, "Name one vitamin.",
             response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    error = is_openai_error(r, 400, "unsatisfiable_schema")
    assert error["param"] == f"response_format.json_schema.schema.{field}" and words in error["message"], error


def test_a_long_property_name_within_the_bound_still_constrains_the_answer(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"v" * 2000: {"type": "string", "maxLength": 1000}}, "required": ["v" * 2000]}}}
    r = chat(server, "Name one vitamin.", response_format=fmt, max_tokens=24)
    assert r.status_code == 200, r.text[:300]
    assert r.json()["choices"][0]["message"]["content"].replace(" ", "").startswith('{"vvv')


def test_a_body_nested_too_deeply_is_a_400_not_a_500(server):
    """json recurses once per level: 100k nested arrays were a RecursionError and a 500 before the parse."""
    deep = "[" * 100_000 + "]" * 100_000
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = httpx.post(server.url + path, content='{"model": "%s", "x": %s}' % (MODEL, deep),
                       headers={"content-type": "application/json"}, timeout=60)
        error = is_openai_error(r, 400, "invalid_json")
        assert "nest more than 64 levels" in error["message"], error
    # a history's tool-call arguments are JSON text parsed again: nested too deeply, they stay text (no 500)
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[" * 5000 + "]" * 5000}}
    r = post(server, "/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}, {"role": "user", "content": "and?"}]})
    assert r.status_code != 500, r.text


def test_a_grammar_that_leaves_no_token_is_a_400_and_the_server_stays_up(server):
    """llama.cpp would pick a token the grammar rejects and abort the process; the request ends alone."""
    nothing = "root ::= [^\\x00-\\U0010FFFF]"
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "Name one vitamin.", "max_tokens": 4,
                                         "grammar": nothing})
    error = is_openai_error(r, 400, "no_token_allowed")
    assert "No token is allowed" in error["message"]
    assert error["param"] == "grammar" and "Fix: loosen the grammar in 'grammar'" in error["message"], error
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "Name one vitamin.", "max_tokens": 4,
                                         "grammar": nothing, "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "no_token_allowed" and events[-1]["error"]["param"] == "grammar", r.text
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert chat(server, "hi").status_code == 200


def test_a_stop_string_longer_than_any_meant_is_a_400(server):
    error = is_openai_error(chat(server, "hi", stop=["x" * 1025]), 400, None)
    assert error["param"] == "stop" and "1,025 characters" in error["message"]
    assert chat(server, "hi", stop=["x" * 1024, "\n\n"]).status_code == 200


@pytest.mark.parametrize("options", [5, True, ["a", "b"], "AB"])
def test_template_options_that_are_not_an_object_are_a_400(server, options):
    r = post(server, "/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "template": "mcq",
                                              "template_inputs": {"question": "Which vitamin?", "options": options}})
    error = is_openai_error(r, 400, "invalid_template")
    assert "as an object of labels and answers" in error["message"], error


def test_a_template_request_with_tools_is_a_400_naming_them(server):
    """A template answers by its contract: tools sent with it were dropped without a word (200, no call)."""
    tool = {"type": "function", "function": {"name": "order_test", "parameters": {"type": "object"}}}
    base = {"model": MODEL, "max_tokens": 4, "template": "mcq", "template_inputs": {"question": "Q?", "options": {"A": "x", "B": "y"}}}
    for extra, param in [({"tools": [tool], "tool_choice": "required"}, "tools"), ({"tools": [tool]}, "tools"),
                         ({"tool_choice": "required"}, "tool_choice")]:
        error = is_openai_error(post(server, "/v1/chat/completions", {**base, **extra}), 400, None)
        assert error["param"] == param and "does not call tools" in error["message"]


def test_a_model_without_a_chat_template_answers_messages_with_a_400(smollm2_gguf, tmp_path):
    """The request's to change (the completions endpoint takes the model): it was a 500 server_error, which a 5xx
    alert counts as the server failing."""
    path = with_chat_template(smollm2_gguf, tmp_path / "plain.gguf", "")
    batcher = Batcher(path, LoadSettings(n_ctx=512, n_threads=1), slots=1, queue_size=2)
    batcher.start()
    try:
        with ServerThread(create_app(batcher, ServeConfig(model_id=MODEL, bundle_digest="sha256:test"))) as srv:
            error = is_openai_error(chat(srv, "Hello"), 400, None)
            assert "no chat template" in error["message"] and "completions endpoint" in error["message"]
            r = post(srv, "/v1/completions", {"model": MODEL, "max_tokens": 2, "prompt": "Hello"})
            assert r.status_code == 200, r.text
    finally:
        batcher.close()
