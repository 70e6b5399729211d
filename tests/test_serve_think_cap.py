"""``edgemed serve --think-cap N`` and a request's ``think_cap``: a reasoning model's thought gets at most N tokens, then
the server closes it and asks for the answer, as ``edgemed run --think cap:N`` does (``session.replies``).

A scripted batcher stands in for a DeepSeek-R1 distill whose chat template opens ``<think>`` and which never closes it:
without a cap it thinks to ``max_tokens`` and the clinician gets no answer. One test runs the real SmolLM2 behind such a
template, to see the answer's call reuse the thought's prompt KV.
"""

from __future__ import annotations

import json
import threading

import pytest

from serve_kit import ServerThread, audit_lines, wait_until

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from edgemed.errors import Overloaded  # noqa: E402
from edgemed.runtime.batch.stream import Finished, Piece, Stream  # noqa: E402
from edgemed.runtime.session import THOUGHT_CLOSING  # noqa: E402
from edgemed.serve import audit  # noqa: E402
from edgemed.serve.app import create_app  # noqa: E402
from edgemed.serve.config import ServeConfig  # noqa: E402

MODEL = "r1-like"
QUESTION = [{"role": "user", "content": "Which vitamin deficiency causes scurvy?"}]
THOUGHT = "hmm "  # one token of a thought that never ends
ANSWER = ["Vitamin", " C", "."]  # the answer, a token a piece


class ScriptedBatcher:
    """A reasoning model as the server sees it: a chat template that opens ``<think>`` (``opens_think``), a thought
    of ``THOUGHT`` tokens that never closes, and after a closed thought (or with no thought) the answer ``ANSWER``.
    Tokens are characters; each call's prompt and settings are kept in ``calls``."""

    slots, queue_size, n_ctx_per_slot, n_vocab, adds_bos = 2, 4, 4096, 0x110000, False

    def __init__(self, opens_think: bool = True):
        self.opens_think = opens_think
        self.calls: list[tuple[str, object]] = []
        self.choices: list[int] = []  # each call's number of choices
        self.lock = threading.Lock()

    def chat_template(self):
        return None

    def render_chat(self, messages, tools=None):
        text = "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|Assistant|>"
        return text + ("<think>\n" if self.opens_think else "")

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def detokenize(self, ids) -> str:
        return "".join(chr(i) for i in ids)

    def stats(self) -> dict:
        return {}

    def check_grammar(self, settings) -> None:
        """The batcher's up-front grammar check: every grammar passes here."""

    def submit_n(self, prompt, settings, *, request_id, extras=None, adapter=None, scope=None, held=False):
        """One stream per choice (``extras.n``); choices after the first copy the first's prompt, as the batcher's
        do (``forked``, nothing cached)."""
        text = prompt if isinstance(prompt, str) else self.detokenize(prompt)
        n = extras.n if extras is not None else 1
        with self.lock:
            self.calls.append((text, settings))
            self.choices.append(n)
        thinking = text.endswith("<think>\n")
        pieces = [THOUGHT] * settings.max_tokens if thinking else ANSWER[:settings.max_tokens]
        reason = "length" if thinking or len(pieces) < len(ANSWER) else "stop"
        streams = []
        for i in range(n):
            stream = Stream(request_id, lambda: None)
            for piece in pieces:
                stream._put(Piece(piece))
            cached = 0 if i else 3 if thinking else len(text) - len(THOUGHT_CLOSING)
            stream._put(Finished(reason, len(text), len(pieces), 0.01, 0.02, 0.0, cached_tokens=cached, forked=i > 0))
            streams.append(stream)
        return streams


@pytest.fixture
def serve(tmp_path):
    """``serve(batcher, **config)``: a server of ``batcher`` with an audit log, and its OpenAI client."""
    opened = []

    def start(batcher, **config):
        log = audit.AuditLog(tmp_path / f"audit{len(opened)}.jsonl")
        app = create_app(batcher, ServeConfig(model_id=MODEL, bundle_digest="sha256:test", audit=log, **config))
        server = ServerThread(app).__enter__()
        opened.append((server, log))
        server.app, server.audit_path = app, log.path
        server.client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        return server

    yield start
    for server, log in opened:
        server.__exit__(None, None, None)
        log.close()


def _ask(server, stream: bool = False, **request):
    """``(content, finish_reason, usage)`` of one chat request, streamed or whole."""
    request = {"model": MODEL, "messages": QUESTION, "max_tokens": 10, **request}
    body = {k: request.pop(k) for k in ("think_cap",) if k in request}
    if not stream:
        reply = server.client.chat.completions.create(**request, extra_body=body)
        return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage
    text, reason, usage = [], None, None
    for chunk in server.client.chat.completions.create(**request, extra_body=body, stream=True,
                                                       stream_options={"include_usage": True}):
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            reason = choice.finish_reason or reason
        usage = chunk.usage or usage
    return "".join(text), reason, usage


def _request_records(path) -> list[dict]:
    assert wait_until(lambda: any(r.get("kind") == "request" for r in audit_lines(path)))
    return [r for r in audit_lines(path) if r.get("kind") == "request"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("where", ["request", "server"])
def test_a_capped_thought_is_closed_and_the_answer_asked_for(serve, stream, where):
    batcher = ScriptedBatcher()
    server = serve(batcher, **({"think_cap": 6} if where == "server" else {}))
    content, reason, usage = _ask(server, stream, **({"think_cap": 6} if where == "request" else {}))

    assert content == THOUGHT * 6 + THOUGHT_CLOSING + "".join(ANSWER)  # one text: thought, closing, answer
    assert reason == "stop"  # the answer's, not the capped thought's "length"
    prompt = batcher.render_chat(QUESTION)
    (first, thinking), (second, answering) = batcher.calls
    assert first == prompt and thinking.max_tokens == 6 and thinking.stop == ("</think>",)
    assert second == prompt + THOUGHT * 6 + THOUGHT_CLOSING
    assert answering.max_tokens == 4  # what the thought left of max_tokens 10
    assert usage.completion_tokens == 6 + 3 and usage.prompt_tokens == len(prompt)  # both calls; the first's prompt
    assert usage.prompt_tokens_details.cached_tokens == 3  # the first call's, as its prompt tokens
    records = _request_records(server.audit_path)
    assert len(records) == 1 and records[0]["completion_tokens"] == 9 and records[0]["finish_reason"] == "stop"
    metrics = server.app.state.served.metrics.registry
    assert metrics.get_sample_value("edgemed_completion_tokens_total") == 9  # the request counted once
    assert metrics.get_sample_value("edgemed_adapter_generations_total", {"adapter": ""}) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_n_choices_count_their_prompt_once(serve, stream):
    """n > 1 with a cap: the thoughts are one batcher call of n choices (one prefill, as without a cap), and the usage
    and the audit record count the prompt once, as OpenAI's usage does for n choices, not once per choice."""
    batcher = ScriptedBatcher()
    server = serve(batcher)
    request = {"model": MODEL, "messages": QUESTION, "max_tokens": 10, "n": 2, "extra_body": {"think_cap": 6}}
    if stream:
        texts, usage = ["", ""], None
        for chunk in server.client.chat.completions.create(**request, stream=True,
                                                           stream_options={"include_usage": True}):
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
            usage = chunk.usage or usage
    else:
        reply = server.client.chat.completions.create(**request)
        texts, usage = [c.message.content for c in reply.choices], reply.usage
    prompt = batcher.render_chat(QUESTION)
    assert texts == [THOUGHT * 6 + THOUGHT_CLOSING + "".join(ANSWER)] * 2
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), 2 * (6 + 3))
    assert usage.prompt_tokens_details.cached_tokens == 3
    record = _request_records(server.audit_path)[0]
    assert (record["prompt_tokens"], record["completion_tokens"]) == (len(prompt), 18)
    assert batcher.choices == [2, 1, 1]  # both thoughts in one call, then each choice's answer
    seed = batcher.calls[0][1].seed
    assert sorted(settings.seed for _, settings in batcher.calls[1:]) == [seed, seed + 1]  # each choice's own seed


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_without_a_cap_the_thought_runs_to_max_tokens_as_before(serve, stream):
    batcher = ScriptedBatcher()
    content, reason, usage = _ask(serve(batcher), stream)
    assert (content, reason, usage.completion_tokens) == (THOUGHT * 10, "length", 10)
    assert len(batcher.calls) == 1


def test_the_answer_alone_follows_the_constraint(serve):
    pytest.importorskip("llama_cpp")
    batcher = ScriptedBatcher()
    _ask(serve(batcher), think_cap=6, response_format={"type": "json_object"})
    (_, thinking), (_, answering) = batcher.calls
    assert thinking.json_schema is None and thinking.grammar is None
    assert json.loads(answering.json_schema) == {"type": "object"} and answering.grammar is None


class FullQueue(ScriptedBatcher):
    """A server whose queue other requests filled while the thought ran: a call that holds no place is refused."""

    def submit_n(self, prompt, settings, *, held=False, **kw):
        if self.calls and not held:
            raise Overloaded(6, 2.0)
        return super().submit_n(prompt, settings, **kw)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_the_answer_keeps_the_requests_place_in_a_full_queue(serve, stream):
    """The thought ends and other requests fill the queue before its answer is asked for: the answer keeps the place
    the request held (``Batcher.submit_n``'s ``held``), rather than polling for room and failing as the server's 500
    once the thought is spent."""
    batcher = FullQueue()
    server = serve(batcher)
    content, reason, usage = _ask(server, stream, think_cap=6)
    assert (content, reason) == (THOUGHT * 6 + THOUGHT_CLOSING + "".join(ANSWER), "stop")
    assert len(batcher.calls) == 2 and usage.completion_tokens == 9
    assert _request_records(server.audit_path)[0]["outcome"] == "ok"


class SwappedAdapter(ScriptedBatcher):
    """An adapter ``a`` removed and added again with another file while the thought ran: the answer's call is bound
    to other weights than the thought's."""

    def adapters(self):
        return {"a": {"sha256": "2" * 64, "scale": 1.0}}

    def submit_n(self, prompt, settings, **kw):
        streams = super().submit_n(prompt, settings, **kw)
        for stream in streams:
            stream.adapter = {"name": "a", "sha256": ("2" if len(self.calls) > 1 else "1") * 64, "scale": 1.0}
        return streams


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_answer_bound_to_other_adapter_weights_than_its_thought_is_refused(serve, stream):
    """The audit record names the weights the request was bound to (the thought's): an answer from the file put in
    their place would be recorded as theirs. The reply ends after the thought as a failed generation naming the
    change, and that answer is not generated."""
    batcher = SwappedAdapter()
    server = serve(batcher)
    with pytest.raises(openai.APIError) as caught:
        _ask(server, stream, think_cap=6, model=f"{MODEL}:a")
    assert "adapter 'a' was replaced while this request was thinking" in caught.value.message
    assert len(batcher.calls) == 2  # the answer's call was made, bound to the new weights, and dropped
    record = _request_records(server.audit_path)[0]
    assert record["adapter_sha256"] == "1" * 64 and record["outcome"] == "error", record


class RefusingProbe(ScriptedBatcher):
    """A server whose grammar probe refuses every grammar (as a costly one is refused)."""

    def check_grammar(self, settings):
        from edgemed.runtime.grammar_probe import GrammarRefused

        self.checked = settings
        raise GrammarRefused("following it took longer than the probe's limit")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_answer_grammar_the_probe_refuses_is_a_400_before_the_thought(serve, stream):
    """The constraint is the answer's, asked for after the thought: a grammar the probe refuses is the request's 400
    up front, as without a cap, not an answer that fails once the thought is spent."""
    pytest.importorskip("llama_cpp")
    batcher = RefusingProbe()
    with pytest.raises(openai.BadRequestError) as caught:
        _ask(serve(batcher), stream, think_cap=6, response_format={"type": "json_object"})
    assert "grammar was refused" in caught.value.body["message"] and caught.value.body["param"] == "response_format"
    assert batcher.calls == [] and json.loads(batcher.checked.json_schema) == {"type": "object"}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_model_that_writes_no_thought_answers_in_one_call(serve, stream):
    batcher = ScriptedBatcher(opens_think=False)
    content, reason, usage = _ask(serve(batcher, think_cap=6), stream)
    assert (content, reason, usage.completion_tokens) == ("".join(ANSWER), "stop", 3)
    assert len(batcher.calls) == 1 and batcher.calls[0][1].max_tokens == 10


@pytest.mark.parametrize("value, code", [(0, "invalid_think_cap"), (-3, "invalid_think_cap"),
                                         (2.5, "invalid_think_cap"), (6.0, "invalid_think_cap"),
                                         ("6", "invalid_think_cap"), (True, "invalid_think_cap"),
                                         (11, "think_cap_too_large")])
def test_a_bad_think_cap_is_a_400_naming_the_field(serve, value, code):
    batcher = ScriptedBatcher()
    server = serve(batcher)
    with pytest.raises(openai.BadRequestError) as caught:
        _ask(server, think_cap=value)
    error = caught.value.body
    assert error["param"] == "think_cap" and error["code"] == code and "Fix: send think_cap" in error["message"]
    assert batcher.calls == []


def test_a_think_cap_above_the_default_max_tokens_is_refused(serve):
    server = serve(ScriptedBatcher(), default_max_tokens=8)
    with pytest.raises(openai.BadRequestError) as caught:
        server.client.chat.completions.create(model=MODEL, messages=QUESTION, extra_body={"think_cap": 9})
    assert caught.value.body["code"] == "think_cap_too_large" and "max_tokens of 8" in caught.value.body["message"]


def test_serve_think_cap_option_must_be_a_positive_number():
    from click.testing import CliRunner

    from edgemed.cli import cli

    result = CliRunner().invoke(cli, ["serve", "missing-model", "--think-cap", "0"])
    assert result.exit_code != 0 and "--think-cap" in result.output
    with pytest.raises(Exception, match="--think-cap"):
        ServeConfig(model_id=MODEL, bundle_digest="sha256:test", think_cap=0)


def test_the_answer_reuses_the_thoughts_prompt_kv(smollm2_gguf, tmp_path):
    """A real model behind a template that opens ``<think>``: the answer's prompt (prompt + thought + closing) is
    mostly found cached, in the slot the thought left."""
    from edgemed.runtime.batch.batcher import Batcher
    from edgemed.runtime.engine import LoadSettings

    class Thinking(Batcher):
        def render_chat(self, messages, tools=None):
            return super().render_chat(messages, tools) + "<think>\n"

    batcher = Thinking(smollm2_gguf, LoadSettings(n_ctx=1024, n_threads=1), slots=1, queue_size=2)
    batcher.start()
    log = audit.AuditLog(tmp_path / "audit.jsonl")
    try:
        app = create_app(batcher, ServeConfig(model_id=MODEL, bundle_digest="sha256:test", audit=log))
        with ServerThread(app) as server:
            server.client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
            before = batcher.stats()["prompt_tokens_cached_total"]
            content, reason, usage = _ask(server, think_cap=8, max_tokens=24)
            reused = batcher.stats()["prompt_tokens_cached_total"] - before
    finally:
        batcher.close()
        log.close()
    assert THOUGHT_CLOSING in content and reason in ("stop", "length")
    assert usage.completion_tokens <= 24
    assert reused >= usage.prompt_tokens  # the answer's call found at least the whole first prompt cached


def test_completions_refuse_a_think_cap_rather_than_ignore_it(serve):
    batcher = ScriptedBatcher()
    server = serve(batcher)
    with pytest.raises(openai.BadRequestError) as caught:
        server.client.completions.create(model=MODEL, prompt="<think>\n", max_tokens=10, extra_body={"think_cap": 6})
    assert caught.value.body["param"] == "think_cap" and caught.value.body["code"] == "unsupported_parameter"
    assert batcher.calls == []
