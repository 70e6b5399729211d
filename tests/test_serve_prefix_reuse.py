"""Prompt-prefix reuse per slot, on the real SmolLM2: a request whose prompt starts with the token ids a
free slot holds is prefilled from where they part, and answers exactly as a cold run does: on the tests' Q4_1
file, whose rows llama.cpp computes alike however the prompt is cut (``test_row_layouts.py``; not so on Q4_K_M).

What ``cached_tokens`` counts: the prompt tokens whose KV the slot already held and that were not fed to
llama.cpp again, i.e. the common prefix of the prompt and the slot's held ids (its last request's prompt;
the sampled tokens' cells are dropped, and the answer is fed again as prompt rows only while the server is
idle), at most the prompt's length - 2 (its last tokens are always fed again, for logits from a piece of
several rows).
"""

from __future__ import annotations

import threading
import time

import pytest

from edgemed.runtime.engine import GenerationSettings, LoadSettings

pytest.importorskip("llama_cpp")

from edgemed.runtime.batch.batcher import Batcher, Finished  # noqa: E402
from serve_kit import collect  # noqa: E402

LOAD = LoadSettings(n_ctx=4 * 512, n_threads=1, n_batch=256, n_ubatch=256)
GREEDY = GenerationSettings(max_tokens=16)
CHAT = GenerationSettings(max_tokens=32)
TURNS = ["What is the first-line treatment for anaphylaxis?", "And the adult dose?", "Which route is preferred?"]
CONVERSATIONS = [["What does HbA1c measure?", "What is a normal value?", "How often to test it?"], TURNS]
OTHERS = ["Define sepsis in one sentence.", "List three red-flag symptoms of a headache.",
          "What does HbA1c measure?", "Name a loop diuretic."]


@pytest.fixture(scope="module")
def warm(smollm2_gguf):
    with Batcher(smollm2_gguf, LOAD, slots=4, queue_size=4) as b:
        yield b


@pytest.fixture(scope="module")
def cold(smollm2_gguf):
    with Batcher(smollm2_gguf, LOAD, slots=4, queue_size=4, prefix_cache=False) as b:
        yield b


def settle(batcher: Batcher, timeout: float = 60.0) -> None:
    """Wait until the idle scheduler has fed every finished answer back into its slot."""
    end = time.monotonic() + timeout
    while batcher.stats()["answer_tokens_pending"] and time.monotonic() < end:
        time.sleep(0.02)
    assert not batcher.stats()["answer_tokens_pending"]


def chat(batcher: Batcher, turns: list[str], tag: str, *, think: bool = False) -> list[tuple[list[int], str, Finished]]:
    """A conversation through ``batcher``: each turn's prompt is the chat template's rendering of every earlier
    question and answer plus the next question; (prompt token ids, answer, finished) per turn. ``think``: the
    clinician reads each answer until the server has kept it (``settle``) before asking the next question."""
    messages, out = [], []
    for i, question in enumerate(turns):
        if think and i:
            settle(batcher)
        messages.append({"role": "user", "content": question})
        prompt = batcher.tokenize(batcher.render_chat(messages))
        text, fin = collect(batcher.submit(prompt, CHAT, request_id=f"{tag}{i}"))
        messages.append({"role": "assistant", "content": text})
        out.append((prompt, text, fin))
    return out


@pytest.mark.parametrize("turns", CONVERSATIONS, ids=["hba1c", "anaphylaxis"])
@pytest.mark.parametrize("think", [False, True], ids=["at-once", "reading"])
def test_a_conversation_reuses_its_history_and_answers_as_cold(warm, cold, turns, think):
    """Each turn reuses at least the previous turn's prompt; once the idle server has fed the answer back as
    prompt rows (``think``: the clinician reads it first), the answer too, so the turn computes only its new
    question. The answer's cells as sampled are never kept (see ``Seq.held``; kept, both conversations here
    answered differently from cold by the second or third turn): greedy answers stay token-identical to cold."""
    got, ref = chat(warm, turns, "warm", think=think), chat(cold, turns, "cold")
    assert [g[1] for g in got] == [r[1] for r in ref]  # token-identical greedy answers, every turn
    assert [r[2].cached_tokens for r in ref] == [0] * len(turns)
    assert got[0][2].cached_tokens == 0 or think  # the at-once run left this conversation's first turn cached
    for (prev, _, prev_fin), (prompt, _, fin) in zip(got, got[1:]):
        assert prompt[:len(prev)] == prev  # the history is resent as the same ids
        assert len(prev) <= fin.cached_tokens <= len(prompt) - 2
        if think:  # the answer's ids (and its end-of-turn token) were fed back while the clinician read
            assert fin.cached_tokens >= len(prev) + prev_fin.completion_tokens
        assert fin.prompt_tokens == len(prompt)  # prompt_tokens stays the whole prompt


def test_reuse_stops_where_prompts_part(smollm2_gguf):
    with Batcher(smollm2_gguf, LOAD, slots=1, queue_size=2) as b:
        base = b.tokenize(b.render_chat([{"role": "user", "content": OTHERS[1]}]))
        _, first = collect(b.submit(base, GREEDY, request_id="a"))
        assert first.cached_tokens == 0
        k = len(base) - 6
        other = (base[k] + 1) % b._model.n_vocab
        _, second = collect(b.submit(base[:k] + [other] + base[k + 1:], GREEDY, request_id="b"))
        assert second.cached_tokens == k
        _, same = collect(b.submit(base, GREEDY, request_id="c"))  # the slot holds b's ids: shares k again
        assert same.cached_tokens == k
        stranger = b.tokenize("Unrelated text about chest pain.", add_special=False)
        assert stranger[0] != base[0]
        _, none = collect(b.submit(stranger, GREEDY, request_id="d"))
        assert none.cached_tokens == 0
        stats = b.stats()
        assert stats["prompt_tokens_cached_total"] == 2 * k
        assert stats["prompt_tokens_total"] == 3 * len(base) + len(stranger) - 2 * k


def test_concurrent_requests_with_reuse_answer_as_alone(warm, cold):
    prompts = [warm.render_chat([{"role": "user", "content": q}]) for q in OTHERS]
    alone = [collect(cold.submit(p, GREEDY, request_id=f"alone{i}"))[0] for i, p in enumerate(prompts)]
    for round_ in range(2):  # the second round finds every prompt whole in some slot
        streams = [warm.submit(p, GREEDY, request_id=f"r{round_}.{i}") for i, p in enumerate(prompts)]
        results = [None] * len(streams)

        def read(i):
            results[i] = collect(streams[i])

        threads = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [r[0] for r in results] == alone
        if round_:
            assert all(r[1].cached_tokens == r[1].prompt_tokens - 2 for r in results)


def test_no_prefix_cache_flag_reaches_the_batcher(smollm2_gguf, monkeypatch, tmp_path):
    """`edgemed serve --no-prefix-cache` turns reuse off; it is on by default."""
    from serve_kit import batcher_kwargs

    args = [str(smollm2_gguf), "--port", "0", "--audit-log", str(tmp_path / "a.jsonl")]
    seen, result = batcher_kwargs(monkeypatch, args)
    assert seen.get("prefix_cache") is True, result.output
    seen, result = batcher_kwargs(monkeypatch, args + ["--no-prefix-cache"])
    assert seen.get("prefix_cache") is False, result.output

def test_http_usage_and_metrics_report_cached_tokens(smollm2_gguf, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx2")
    from serve_kit import ServerThread

    from edgemed.serve import audit
    from edgemed.serve.app import create_app
    from edgemed.serve.config import ServeConfig

    log = audit.AuditLog(tmp_path / "audit.jsonl")
    with Batcher(smollm2_gguf, LOAD, slots=2, queue_size=2) as b:
        app = create_app(b, ServeConfig(model_id="m", bundle_digest="sha256:test", audit=log))
        with ServerThread(app) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
            messages = [{"role": "user", "content": TURNS[0]}]
            first = client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0)
            assert first.usage.prompt_tokens_details.cached_tokens == 0
            messages += [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": TURNS[1]}]
            second = client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0)
            cached = second.usage.prompt_tokens_details.cached_tokens
            assert 0 < cached < second.usage.prompt_tokens
            chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0,
                                                         stream=True, stream_options={"include_usage": True}))
            usage = chunks[-1].usage
            assert usage.prompt_tokens == second.usage.prompt_tokens
            assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 2  # the same prompt again
            text = httpx.get(srv.url + "/metrics").text
            cached_total = [line for line in text.splitlines()
                            if line.startswith("edgemed_batcher_prompt_cached_tokens_total ")]
            assert cached_total and float(cached_total[0].split()[1]) == cached + usage.prompt_tokens - 2
            assert "edgemed_batcher_prompt_tokens_total " in text
    log.close()


def test_a_failure_while_keeping_an_answer_empties_that_slot_and_serving_goes_on(smollm2_gguf, cold):
    prompt = cold.render_chat([{"role": "user", "content": OTHERS[0]}])
    alone = collect(cold.submit(prompt, GREEDY, request_id="ref"))[0]
    with Batcher(smollm2_gguf, LOAD, slots=1, queue_size=2) as b:
        failed = threading.Event()

        def boom(slot):
            failed.set()
            raise RuntimeError("injected failure")

        b._keep_answer = boom  # the idle scheduler's call, after the answer ends
        assert collect(b.submit(prompt, GREEDY, request_id="x"))[0] == alone
        assert failed.wait(30)
        del b._keep_answer
        text, fin = collect(b.submit(prompt, GREEDY, request_id="y"))
        assert text == alone and fin.cached_tokens == 0  # the slot was emptied, and the scheduler still serves


def test_a_request_stops_an_idle_answer_call_and_the_answer_is_fed_again_later(smollm2_gguf, cold):
    """A request arriving while the idle scheduler feeds an answer back does not wait for that call: llama.cpp gives
    it up (its cells removed), the request is served as it would be alone, and the answer is fed again at the next
    idle moment, so the conversation's next turn finds it kept and still answers as cold."""
    ref = chat(cold, TURNS[:2], "ref")
    other = cold.tokenize("Sepsis is defined as", add_special=False)  # shares nothing: it takes the other slot
    alone = collect(cold.submit(other, GREEDY, request_id="alone"))[0]
    with Batcher(smollm2_gguf, LOAD, slots=2, queue_size=2) as b:
        real, held = b._ctx.decode_unless, threading.Event()

        def first_call_waits_for_a_request(batch, stop):
            if not held.is_set():
                held.set()
                end = time.monotonic() + 30
                while not stop() and time.monotonic() < end:
                    time.sleep(0.005)
            return real(batch, stop)

        b._ctx.decode_unless = first_call_waits_for_a_request
        messages = [{"role": "user", "content": TURNS[0]}]
        first = b.tokenize(b.render_chat(messages))
        text, fin = collect(b.submit(first, CHAT, request_id="t0"))
        assert held.wait(30)  # the answer's idle call has started
        assert collect(b.submit(other, GREEDY, request_id="other"))[0] == alone
        stats = b.stats()
        assert stats["answer_calls_interrupted_total"] == 1
        settle(b)  # fed again once idle, whole
        assert b.stats()["answer_tokens_kept_total"] >= fin.completion_tokens
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": TURNS[1]}]
        second = b.tokenize(b.render_chat(messages))
        text2, fin2 = collect(b.submit(second, CHAT, request_id="t1"))
    assert [text, text2] == [r[1] for r in ref]
    assert fin2.cached_tokens >= len(first) + fin.completion_tokens


def test_a_request_sent_straight_after_an_answer_finds_no_idle_call_running(smollm2_gguf, cold, monkeypatch):
    """A client that sends its next request straight after an answer (a script, an agent) gets the cores for it: the
    answer is fed back only after ``ANSWER_GRACE_S`` without a request, so no idle call starts and is given up
    meanwhile; it is fed once the server is idle, and the conversation's next turn still finds it."""
    from edgemed.runtime.batch import batcher as batcher_module

    monkeypatch.setattr(batcher_module, "ANSWER_GRACE_S", 5.0)  # far beyond a loaded box's turnaround
    other = cold.tokenize("Sepsis is defined as", add_special=False)
    with Batcher(smollm2_gguf, LOAD, slots=2, queue_size=2) as b:
        messages = [{"role": "user", "content": TURNS[0]}]
        first = b.tokenize(b.render_chat(messages))
        text, fin = collect(b.submit(first, CHAT, request_id="t0"))
        collect(b.submit(other, GREEDY, request_id="other"))  # straight after: within the grace
        stats = b.stats()
        assert stats["answer_calls_interrupted_total"] == 0 and stats["answer_tokens_kept_total"] == 0
        settle(b)  # then kept, once the grace is over
        assert b.stats()["answer_tokens_kept_total"] >= fin.completion_tokens
        assert b.stats()["answer_calls_interrupted_total"] == 0
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": TURNS[1]}]
        second = b.tokenize(b.render_chat(messages))
        fin2 = collect(b.submit(second, CHAT, request_id="t1"))[1]
    assert fin2.cached_tokens >= len(first) + fin.completion_tokens


def test_cells_a_given_up_idle_call_left_are_trimmed_and_no_request_fails(smollm2_gguf, cold):
    """llama.cpp gives an idle answer call up at its next graph node, and keeps the micro-batches it had finished
    ("processed ubatches will remain"). The batcher trims its slot back to the kept cells after any call that did
    not finish: else the next turn was fed on top of cells it did not know of, llama_decode refused the step (-1),
    and every running request ended with an error, another clinician's too. Here the call writes some of its rows
    and then reports itself given up, as a call stopped in its second micro-batch does."""
    from edgemed.runtime.llamacpp import Batch

    ref = chat(cold, TURNS[:2], "ref")
    other = cold.tokenize("Sepsis is defined as", add_special=False)
    alone = collect(cold.submit(other, GREEDY, request_id="alone"))[0]
    with Batcher(smollm2_gguf, LOAD, slots=2, queue_size=4) as b:
        real, queued, started, left = b._ctx.decode_unless, threading.Event(), threading.Event(), {}

        def first_call_writes_half_then_gives_up(batch, stop):
            if left:
                return real(batch, stop)
            started.set()
            queued.wait(30)  # the next turn and another clinician's request are waiting now
            part = Batch(b._ctx.lib, batch.n)
            try:
                for i in range(batch.n // 2):
                    part.add(batch.raw.token[i], batch.raw.pos[i], batch.raw.seq_id[i][0], False)
                assert real(part, lambda: False) == 0
            finally:
                part.close()
            slot = batch.raw.seq_id[0][0]
            left.update(slot=slot, kept=len(b._kept[slot]), written=batch.n // 2)
            return 2

        b._ctx.decode_unless = first_call_writes_half_then_gives_up
        messages = [{"role": "user", "content": TURNS[0]}]
        text, fin = collect(b.submit(b.tokenize(b.render_chat(messages)), CHAT, request_id="t0"))
        assert started.wait(30)  # the idle call began (after ``ANSWER_GRACE_S`` without a request)
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": TURNS[1]}]
        second = b.submit(b.tokenize(b.render_chat(messages)), CHAT, request_id="t1")
        another = b.submit(other, GREEDY, request_id="other")
        queued.set()
        (text2, fin2), (text_other, fin_other) = collect(second), collect(another)
        assert left["written"] >= 2 and b.stats()["answer_calls_interrupted_total"] == 1
    assert fin2.finish_reason in ("stop", "length") and fin_other.finish_reason in ("stop", "length"), (fin2, fin_other)
    assert [text, text2] == [r[1] for r in ref] and text_other == alone
