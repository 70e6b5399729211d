"""``edgemed serve``'s API with the official ``openai`` client, against a real uvicorn server and the real SmolLM2.

Covers: chat and completions (streaming and not), models, medical templates per request,
JSON-schema output, OpenAI error shapes, client disconnect freeing the slot, metrics,
the audit log of the requests, and overload (429 + Retry-After, zero 5xx, healthy after).
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from serve_kit import ServerThread, audit_lines, wait_until

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package ships with

from edgemed.runtime.engine import LoadSettings  # noqa: E402
from edgemed.serve import audit  # noqa: E402
from edgemed.serve.app import create_app  # noqa: E402
from edgemed.runtime.batch.batcher import Batcher  # noqa: E402
from edgemed.serve.config import ServeConfig  # noqa: E402

MODEL = "smollm2-test"
QUESTION = "Which vitamin deficiency causes scurvy?"
OPTIONS = {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"}


def _serve(model_path: Path, audit_path: Path, *, slots: int, queue: int, **config):
    batcher = Batcher(model_path, LoadSettings(n_ctx=1024 * slots, n_threads=1), slots=slots, queue_size=queue)
    batcher.start()
    log = audit.AuditLog(audit_path)
    app = create_app(batcher, ServeConfig(model_id=MODEL, bundle_digest="sha256:test", audit=log, **config))
    return batcher, log, app


@pytest.fixture(scope="module")
def server(smollm2_gguf, tmp_path_factory):
    audit_path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    batcher, log, app = _serve(smollm2_gguf, audit_path, slots=2, queue=4)
    try:
        with ServerThread(app) as srv:
            srv.batcher, srv.audit_path = batcher, audit_path
            srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
            yield srv
    finally:
        batcher.close()
        log.close()


def records(path: Path) -> list[dict]:
    return audit_lines(path)  # complete records only: the server may be writing the next one


def test_models_lists_the_served_model(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["context_length"] == server.batcher.n_ctx_per_slot


def test_chat_streaming_and_not_agree(server):
    messages = [{"role": "user", "content": "Name one symptom of anemia."}]
    whole = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
    text = whole.choices[0].message.content
    assert whole.object == "chat.completion" and text.strip()
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 5

    chunks = list(server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stream=True,
                                                        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # greedy: the same answer either way
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_completions_streaming_and_not(server):
    whole = server.client.completions.create(model=MODEL, prompt="The heart has four", max_tokens=6)
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.usage.completion_tokens <= 6
    parts = list(server.client.completions.create(model=MODEL, prompt="The heart has four", max_tokens=6, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_template_builds_messages_and_parses_the_answer(server):
    resp = server.client.chat.completions.create(
        model=MODEL, messages=[], max_tokens=48,
        extra_body={"template": "mcq", "template_inputs": {"question": QUESTION, "options": OPTIONS}})
    extra = resp.model_extra["edgemed"]
    assert extra["template"]["id"] == "mcq" and extra["template"]["version"].startswith("sha256:")
    parsed = extra["parsed"]
    assert set(parsed) == {"ok", "value", "error"}
    assert parsed["value"] in (None, *OPTIONS) and parsed["ok"] == (parsed["value"] is not None)
    # the record is written once the response is over, just after the client has it
    assert wait_until(lambda: records(server.audit_path)[-1].get("template") == extra["template"])


def test_sse_wire_format_and_template_result_in_last_chunk(server):
    body = {"model": MODEL, "stream": True, "max_tokens": 12, "messages": [], "template": "pubmedqa",
            "template_inputs": {"question": "Does aspirin reduce fever?", "context": "Aspirin is an antipyretic."}}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    chunks = [json.loads(e[6:]) for e in events[:-2]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["edgemed"]["template"]["id"] == "pubmedqa" and "parsed" in chunks[-1]["edgemed"]
    assert r.headers["x-request-id"] == chunks[0]["id"].removeprefix("chatcmpl-")


def test_json_schema_response_format_constrains_output(server):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"]}
    resp = server.client.chat.completions.create(
        model=MODEL, max_tokens=40, messages=[{"role": "user", "content": "Is aspirin an NSAID? Reply in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "yn", "schema": schema}})
    assert json.loads(resp.choices[0].message.content)["answer"] in ("yes", "no")


def test_json_schema_bounds_the_grammar_drops_are_refused_when_strict_and_checked_otherwise(server):
    """The grammar drops minimum/maximum: a strict schema with them is a 400 naming one; otherwise the answer, whole
    or streamed, says in ``edgemed.schema`` whether it keeps them (at temperature 1 SmolLM2 wrote 373.2 and 8)."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "additionalProperties": False, "required": ["temp_c", "hr"],
              "properties": {"temp_c": {"type": "number", "minimum": 30, "maximum": 45},
                             "hr": {"type": "integer", "minimum": 20, "maximum": 250}}}
    ask = {"model": MODEL, "max_tokens": 40, "temperature": 1, "seed": 4,
           "messages": [{"role": "user", "content": "Patient temperature in Celsius and heart rate, as JSON."}]}
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(**ask, response_format={"type": "json_schema", "json_schema": {
            "name": "vitals", "strict": True, "schema": schema}})
    assert e.value.body["param"] == "response_format.json_schema.schema.properties.temp_c.minimum"
    loose = {"type": "json_schema", "json_schema": {"name": "vitals", "schema": schema}}
    resp = server.client.chat.completions.create(**ask, response_format=loose)
    report = resp.model_extra["edgemed"]["schema"]
    if resp.choices[0].finish_reason == "stop":
        value = json.loads(resp.choices[0].message.content)
        assert report["valid"] is jsonschema.Draft202012Validator(schema).is_valid(value)
    else:
        assert report["valid"] is False
    chunks = list(server.client.chat.completions.create(**ask, response_format=loose, stream=True))
    assert chunks[-1].model_extra["edgemed"]["schema"] == report  # the same seed: the same answer


def test_errors_come_in_openai_shape(server):
    c = server.client
    msg = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4o", messages=msg)
    assert e.value.code == "model_not_found" and MODEL in e.value.message
    capped = c.chat.completions.create(model=MODEL, messages=msg, max_tokens=100_000)  # capped to the room left
    assert capped.choices[0].finish_reason in ("stop", "length")
    assert capped.usage.prompt_tokens + capped.usage.completion_tokens <= server.batcher.n_ctx_per_slot
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 1100}])
    assert e.value.code == "context_length_exceeded" and "context window" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=msg, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[], extra_body={"template": "no-such-template"})
    assert e.value.code == "invalid_template" and "mcq" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[], extra_body={"template": "mcq", "template_inputs": {}})
    assert "question" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=msg, tools=[{"type": "function", "function": {"name": "f"}}])
    assert "tool" in e.value.message and MODEL in e.value.message and e.value.body["param"] == "tools"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(server.url + "/v2/nothing")
    assert r.status_code == 404 and "/v1" in r.json()["error"]["message"]


def _slots_idle(server) -> bool:
    return server.batcher.stats()["active_slots"] == 0 and server.batcher.stats()["queue_depth"] == 0


def test_streaming_client_disconnect_frees_the_slot(server):
    body = {"model": MODEL, "stream": True, "max_tokens": 400, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a long essay on the history of medicine."}]}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
            assert server.batcher.stats()["active_slots"] == 1
    assert wait_until(lambda: _slots_idle(server), timeout=20)
    # until the request's end is written, its last line may be its accepted record, which has no outcome
    assert wait_until(lambda: records(server.audit_path)[-1].get("outcome") == "client_disconnected")
    last = records(server.audit_path)[-1]
    assert last["finish_reason"] == "cancelled" and last["completion_tokens"] < 400


def test_non_streaming_client_disconnect_frees_the_slot(server):
    body = json.dumps({"model": MODEL, "max_tokens": 400, "messages": [
        {"role": "user", "content": "Write a long essay on the history of surgery."}]}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert wait_until(lambda: server.batcher.stats()["active_slots"] == 1, timeout=20)
    sock.close()
    assert wait_until(lambda: _slots_idle(server), timeout=20)
    assert wait_until(lambda: records(server.audit_path)[-1].get("outcome") == "client_disconnected")
    assert records(server.audit_path)[-1]["completion_tokens"] < 400


def test_metrics_and_health(server):
    server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert server.client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(server.url + "/v1/models/no-such-model").status_code == 404
    assert httpx.get(server.url + "/no/such/path").status_code == 404
    text = httpx.get(server.url + "/metrics").text
    for name in ("edgemed_queue_depth", "edgemed_active_slots", "edgemed_tokens_per_second",
                 "edgemed_time_to_first_token_seconds_bucket", "edgemed_time_per_output_token_seconds_bucket",
                 'edgemed_requests_total{code="200",endpoint="chat"}', "edgemed_generated_tokens_total",
                 # a route with a path parameter is labelled by its route, whatever id the client sent
                 'edgemed_requests_total{code="200",endpoint="model"}',
                 'edgemed_requests_total{code="404",endpoint="model"}',
                 'edgemed_requests_total{code="404",endpoint="other"}'):
        assert name in text, name
    assert "no-such-model" not in text
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["slots"] == 2


def test_audit_log_has_every_request_and_no_text(server):
    server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=4)
    assert wait_until(lambda: records(server.audit_path)[-1].get("status") == 200)
    report = audit.verify(server.audit_path)
    assert report.ok, report
    recs = records(server.audit_path)
    assert recs[0]["kind"] == "genesis" and recs[1]["kind"] == "start"
    last = recs[-1]
    assert last["kind"] == "request" and last["status"] == 200 and last["outcome"] == "ok"
    assert last["bundle_digest"] == "sha256:test" and last["prompt_tokens"] > 0 and last["endpoint"] == "chat"
    assert "scurvy" not in server.audit_path.read_text()
    assert "prompt" not in last and "output" not in last


def test_a_sampled_answer_names_its_seed_and_that_seed_gives_it_again(server):
    """Without a seed the server draws one: the response header and the audit record name it, so the same prompt
    with that seed gives the same answer (a clinician's answer can be had again)."""
    ask = dict(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=1.0)
    raw = server.client.chat.completions.with_raw_response.create(**ask)
    seed = int(raw.headers["x-edgemed-seed"])
    first = raw.parse().choices[0].message.content
    request_id = raw.headers["x-request-id"]
    assert wait_until(lambda: any(r.get("request_id") == request_id for r in records(server.audit_path)))
    assert next(r for r in records(server.audit_path) if r.get("request_id") == request_id)["seed"] == seed
    again = server.client.chat.completions.with_raw_response.create(**ask, seed=seed)
    assert again.parse().choices[0].message.content == first and int(again.headers["x-edgemed-seed"]) == seed


def test_a_seed_llama_cpp_would_not_take_as_it_is_is_refused(server):
    """llama.cpp keeps 32 bits of a seed and reads 2^32 - 1 as "draw one at random": the server took 2^32 as seed 0
    (the same answer, said nowhere) and -1 as a random draw. Such seeds are a 400 on ``seed``, as ``run --seed``
    refuses them; with n choices (choice i samples with seed + i) the last choice's seed must be a fixed one too."""
    from edgemed.runtime.engine import MAX_SEED

    ask = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, "temperature": 1.0}
    for seed, n in [(-1, 1), (2**32 - 1, 1), (2**32, 1), (MAX_SEED, 2)]:
        with pytest.raises(openai.BadRequestError) as e:
            server.client.chat.completions.create(**ask, seed=seed, n=n)
        assert e.value.body["param"] == "seed" and f"seed {seed} is not a fixed seed" in e.value.message, e.value.body
        assert f"Fix: send a seed from 0 to {MAX_SEED - (n - 1)}" in e.value.message, e.value.message
    for seed, n in [(0, 1), (MAX_SEED, 1), (MAX_SEED - 1, 2)]:  # the ends of the range are served, and named
        raw = server.client.chat.completions.with_raw_response.create(**ask, seed=seed, n=n)
        assert len(raw.parse().choices) == n and int(raw.headers["x-edgemed-seed"]) == seed


def test_the_api_and_the_runtime_refuse_a_seed_by_one_rule():
    """The API's seed check (a 400 on ``seed``) and the runtime's (``engine.check_seed``: the CLI's and the batcher's)
    were two copies of one rule, already worded apart: one rule now, so both take and refuse the same seeds, name the
    same top and say the same problem, each with its own fix."""
    from edgemed.errors import InputError
    from edgemed.runtime.engine import MAX_SEED, check_seed
    from edgemed.serve import api

    messages = [{"role": "user", "content": QUESTION}]
    for n in (1, 3):
        top = MAX_SEED - (n - 1)
        for seed in (0, top):
            check_seed(seed, "seed", n)
            assert api.ChatRequest(model=MODEL, messages=messages, seed=seed, n=n).seed == seed
        for seed in (-1, top + 1):
            with pytest.raises(InputError) as ran:
                check_seed(seed, "seed", n)
            with pytest.raises(api.ApiError) as served:
                api.ChatRequest(model=MODEL, messages=messages, seed=seed, n=n)
            assert (served.value.status, served.value.param) == (400, "seed")
            assert served.value.message.startswith(ran.value.problem + " Fix: "), (served.value.message, ran.value)
            assert f"from 0 to {top}" in ran.value.fix and f"Fix: send a seed from 0 to {top};" in served.value.message


# -- overload ---------------------------------------------------------------------------------------------
def test_overload_gives_429_never_5xx_and_stays_healthy(smollm2_gguf, tmp_path):
    batcher, log, app = _serve(smollm2_gguf, tmp_path / "audit.jsonl", slots=1, queue=1)
    body = {"model": MODEL, "max_tokens": 24, "messages": [{"role": "user", "content": "Describe the kidney."}]}
    responses = []  # (status, retry-after, error code): the threads only collect, the test asserts after join
    go = threading.Barrier(8)
    try:
        with ServerThread(app) as srv:
            def one():
                go.wait()
                r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120)
                code = r.json().get("error", {}).get("code") if r.status_code != 200 else None
                responses.append((r.status_code, r.headers.get("retry-after"), code))

            threads = [threading.Thread(target=one) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=180)
            assert not any(t.is_alive() for t in threads)
            statuses = [status for status, _, _ in responses]
            assert len(statuses) == 8
            assert statuses.count(429) >= 1 and statuses.count(200) >= 2, statuses
            assert not [s for s in statuses if s >= 500] and set(statuses) <= {200, 429}
            refused = [(retry, code) for status, retry, code in responses if status == 429]
            assert all(code == "server_overloaded" for _, code in refused), refused
            assert all(retry and int(retry) >= 1 for retry, _ in refused), refused
            health = httpx.get(srv.url + "/health").json()
            assert health["status"] == "ok" and health["active_slots"] == 0 and health["queue_depth"] == 0
            ok = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120)
            assert ok.status_code == 200
    finally:
        batcher.close()
        log.close()
    recs = records(tmp_path / "audit.jsonl")
    assert sorted(r["status"] for r in recs if r["kind"] == "request") == sorted(statuses + [200])
    assert {r["outcome"] for r in recs if r.get("status") == 429} == {"overloaded"}
    assert audit.verify(tmp_path / "audit.jsonl").ok
