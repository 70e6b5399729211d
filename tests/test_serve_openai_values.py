"""Values OpenAI's API takes that a real ``edgemed serve`` (uvicorn, the real batcher, SmolLM2) must take too, with the
meaning OpenAI gives them, and refusals that name the field and the problem.

* An explicit ``null`` in a field OpenAI types "X or null" is the default (clients that serialize every field send
  them so): it was a 400 "Input should be a valid number".
* ``top_p: 0`` is "the most likely token"; legacy completions' ``max_tokens: 0`` with ``echo`` scores the prompt
  (its text and log probabilities, no answer). Both were 400s.
* An empty stop string was told to "shorten the stop list"; an empty completions prompt, or token ids outside the
  vocabulary, were refused with ``param: null``.
"""

from __future__ import annotations

import json

import pytest
from serve_kit import ServerThread

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package ships with

from edgemed.runtime.batch.batcher import Batcher
from edgemed.runtime.engine import LoadSettings
from edgemed.serve.app import create_app
from edgemed.serve.config import ServeConfig

MODEL = "smollm2-values"
MESSAGES = [{"role": "user", "content": "Name one symptom of anemia."}]


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    batcher = Batcher(smollm2_gguf, LoadSettings(n_ctx=1024, n_threads=1), slots=2, queue_size=4)
    batcher.start()
    try:
        with ServerThread(create_app(batcher, ServeConfig(model_id=MODEL, bundle_digest="sha256:test"))) as srv:
            yield srv
    finally:
        batcher.close()


def post(server, path: str, body: dict):
    return httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=120)


def chat(server, **fields):
    return post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 6, **fields})


def refused(response, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    return error["message"]


@pytest.mark.parametrize("field", ["temperature", "top_p", "n", "presence_penalty", "frequency_penalty", "stream",
                                   "parallel_tool_calls"])
def test_an_explicit_null_is_the_default(server, field):
    plain = chat(server)
    nulled = chat(server, **{field: None})
    assert nulled.status_code == 200, nulled.text
    assert nulled.json()["choices"] == plain.json()["choices"]  # greedy, one choice, not streamed: the defaults


def test_null_echo_and_the_range_checks_stay(server):
    got = post(server, "/v1/completions", {"prompt": "The heart", "max_tokens": 2, "echo": None})
    assert got.status_code == 200 and not got.json()["choices"][0]["text"].startswith("The heart"), got.text
    assert "less than or equal to 2" in refused(chat(server, temperature=3), "temperature")
    assert refused(chat(server, top_p=-0.1), "top_p")


def test_top_p_zero_is_the_most_likely_token(server):
    greedy = chat(server, temperature=0, max_tokens=10).json()["choices"][0]["message"]["content"]
    for seed in (1, 2, 3):
        got = chat(server, temperature=2, top_p=0, seed=seed, max_tokens=10)
        assert got.status_code == 200, got.text
        assert got.json()["choices"][0]["message"]["content"] == greedy


def test_max_tokens_zero_with_echo_scores_the_prompt(server):
    prompt = "The heart pumps blood through the body."
    got = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert got.status_code == 200, got.text
    body = got.json()
    choice = body["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == prompt and len(lp["tokens"]) == body["usage"]["prompt_tokens"]
    assert lp["token_logprobs"][0] is None and all(x <= 0 for x in lp["token_logprobs"][1:])

    with httpx.stream("POST", server.url + "/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": prompt, "max_tokens": 0, "echo": True, "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks) == prompt
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    message = refused(post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 0}), "max_tokens")
    assert "echo" in message
    assert refused(chat(server, max_tokens=0), "max_tokens")  # chat has no echo: an answer of 0 tokens is no request


def test_refusals_name_the_problem_and_the_field(server):
    message = refused(chat(server, stop=""), "stop")
    assert "empty" in message and "shorten" not in message
    assert "empty" in refused(chat(server, stop=["\n", ""]), "stop")
    assert "at most 16" in refused(chat(server, stop=[str(i) for i in range(17)]), "stop")
    assert "empty" in refused(post(server, "/v1/completions", {"prompt": ""}), "prompt")
    assert "empty" in refused(post(server, "/v1/completions", {"prompt": ["heart", ""]}), "prompt.1")
    assert "vocabulary" in refused(post(server, "/v1/completions", {"prompt": [99999999]}), "prompt")
    assert "-1" in refused(post(server, "/v1/completions", {"prompt": [1, -1]}), "prompt")
    assert "vocabulary" in refused(post(server, "/v1/completions", {"prompt": [[1, 2], [3, 99999999]]}), "prompt.1")
