"""Continuous batching on the real SmolLM2: concurrent requests must not mix, and every stream must end.

References are the same prompts run one at a time through the same batcher (greedy),
and, for the loop itself, llama-cpp-python's own single-sequence generation. Batched text equals the single run's
because the tests' file (Q4_1) is computed alike in every layout the batcher sends (``test_row_layouts.py``); on a
Q4_K_M file it is not, and greedy text under load differs (docs/serve.md).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from edgemed.errors import ContextOverflow, InputError
from edgemed.runtime.engine import MAX_SEED, GenerationSettings, LoadSettings

pytest.importorskip("llama_cpp")

from edgemed.runtime.batch.batcher import Batcher, Closed, Finished, Overloaded, Piece  # noqa: E402
from serve_kit import collect  # noqa: E402

QUESTIONS = [
    "What is the first-line treatment for anaphylaxis?",
    "A 58-year-old woman has fatigue, weight gain, constipation and cold intolerance. Which blood tests "
    "would you order first, and why?",
    "Define sepsis in one sentence.",
    "Explain how metformin lowers blood glucose in type 2 diabetes, and name its most common side effects "
    "and the main contraindication related to kidney function.",
    "List three red-flag symptoms of a headache.",
]
LOAD = LoadSettings(n_ctx=4 * 512, n_threads=1, n_batch=256, n_ubatch=256)
GREEDY = GenerationSettings(max_tokens=24)


def wait_for(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def batcher(smollm2_gguf):
    b = Batcher(smollm2_gguf, LOAD, slots=4, queue_size=4)
    b.start()
    yield b
    b.close()


@pytest.fixture(scope="module")
def prompts(batcher):
    return [batcher.render_chat([{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def alone(batcher, prompts):
    """Each prompt run with nothing else in the batcher: the reference output."""
    return [collect(batcher.submit(p, GREEDY, request_id=f"ref{i}")) for i, p in enumerate(prompts)]


def test_concurrent_requests_match_single_runs(batcher, prompts, alone):
    steps0 = batcher.stats()["decode_steps_total"]
    s = {0: batcher.submit(prompts[0], GREEDY, request_id="c0"),
         1: batcher.submit(prompts[1], GREEDY, request_id="c1")}
    it0 = iter(s[0])
    got0 = [next(it0) for _ in range(3)]  # c0 is generating when c2 arrives
    s[2] = batcher.submit(prompts[2], GREEDY, request_id="c2")
    s[3] = batcher.submit(prompts[3], GREEDY, request_id="c3")
    wait_for(lambda: batcher.stats()["active_slots"] == 4 or s[2].done)
    s[4] = batcher.submit(prompts[4], GREEDY, request_id="c4")  # waits in the queue for a free slot
    results = {0: collect(got0 + list(it0))}
    results.update({i: collect(st) for i, st in s.items() if i != 0})
    generated = 0
    for i, (text, fin) in results.items():
        ref_text, ref_fin = alone[i]
        assert text == ref_text, f"prompt {i}: batched output differs from its single run"
        assert (fin.finish_reason, fin.completion_tokens, fin.prompt_tokens) == \
               (ref_fin.finish_reason, ref_fin.completion_tokens, ref_fin.prompt_tokens)
        generated += fin.completion_tokens
    assert len({t for t, _ in results.values()}) == len(results)  # different prompts, different answers
    assert batcher.stats()["decode_steps_total"] - steps0 < generated  # several sequences shared steps
    assert batcher.stats()["active_slots"] == 0


def test_single_run_matches_the_engine_and_llama_cpp_python(smollm2_gguf, batcher, prompts, alone):
    """The batcher's decode loop equals the run engine's (``llamacpp.generate``) and llama-cpp-python's own generation."""
    from edgemed.runtime.engine import LoadSettings
    from edgemed.runtime.llama_engine import LlamaEngine
    from edgemed.runtime.llamacpp import build

    with LlamaEngine(smollm2_gguf, LoadSettings(n_ctx=512, n_threads=1, n_batch=256)) as engine:
        assert "".join(engine.complete(prompts[0], GREEDY)) == alone[0][0]
    if build().has_amx:
        pytest.skip("llama-cpp-python's Llama() cannot be told to keep off the AMX buffer that crashes on this build")
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(smollm2_gguf), n_ctx=512, n_threads=1, n_batch=256, verbose=False)
    try:
        out = llm.create_completion(prompts[0], max_tokens=GREEDY.max_tokens, temperature=0.0, top_k=0,
                                    top_p=1.0, min_p=0.0, repeat_penalty=1.0)
    finally:
        llm.close()
    assert out["choices"][0]["text"] == alone[0][0]


def test_async_iteration_gets_the_same_stream(batcher, prompts, alone):
    async def run():
        items = [item async for item in batcher.submit(prompts[2], GREEDY, request_id="a0")]
        return "".join(i.text for i in items[:-1]), items[-1]

    text, fin = asyncio.run(run())
    assert text == alone[2][0] and fin.finish_reason == alone[2][1].finish_reason


def test_max_tokens_finishes_with_length(batcher, prompts):
    text, fin = collect(batcher.submit(prompts[1], GenerationSettings(max_tokens=5), request_id="len"))
    assert fin.finish_reason == "length" and fin.completion_tokens == 5 and text
    assert 0 < fin.ttft_s <= fin.total_s and fin.queue_s <= fin.ttft_s


def test_going_idle_after_work_hands_freed_heap_back(batcher, prompts, monkeypatch):
    """Between bursts the scheduler returns glibc's free pages to the OS once (not on every idle wake-up)."""
    from edgemed.runtime import heap

    calls = []
    monkeypatch.setattr(heap, "release", lambda: calls.append(1) or True)
    wait_for(lambda: batcher.stats()["active_slots"] == 0 and batcher.stats()["queue_depth"] == 0)
    time.sleep(0.5)  # idle work left by earlier tests (answers fed back into their slots) ends with its own trim
    before, n_calls = batcher.stats()["heap_trims_total"], len(calls)
    collect(batcher.submit(prompts[0], GenerationSettings(max_tokens=3), request_id="trim"))
    wait_for(lambda: batcher.stats()["heap_trims_total"] >= before + 1)
    time.sleep(0.3)  # idle stays idle: no second trim without work in between
    assert batcher.stats()["heap_trims_total"] == before + 1 and len(calls) - n_calls == 1


def test_heap_release_calls_the_c_library():
    from edgemed.runtime import heap

    import platform

    got = heap.release()
    if platform.libc_ver()[0] == "glibc":  # Linux with glibc (Jetson L4T too): the call must be found and made
        assert heap._malloc_trim() is not None and got in (True, False)
    else:
        assert got is None or isinstance(got, bool)


def test_stop_string_is_not_emitted(batcher, prompts, alone):
    ref = alone[3][0]
    words = [w for w in ref.split() if len(w) > 4 and ref.index(w) > 10]
    stop = words[0]
    text, fin = collect(batcher.submit(prompts[3], GenerationSettings(max_tokens=24, stop=(stop,)), request_id="stop"))
    assert fin.finish_reason == "stop"
    assert text == ref[:ref.index(stop)]


def test_grammar_and_json_schema_per_request(batcher, prompts):
    choice = GenerationSettings(max_tokens=8, grammar='root ::= "yes" | "no" | "maybe"')
    schema = json.dumps({"type": "object", "properties": {"urgent": {"type": "boolean"}}, "required": ["urgent"]})
    as_json = GenerationSettings(max_tokens=24, json_schema=schema)
    s1 = batcher.submit(prompts[2], choice, request_id="g1")
    s2 = batcher.submit(prompts[4], as_json, request_id="g2")
    s3 = batcher.submit(prompts[2], GREEDY, request_id="g3")  # unconstrained, in the same steps
    (t1, f1), (t2, f2), (t3, _) = collect(s1), collect(s2), collect(s3)
    assert t1 in {"yes", "no", "maybe"} and f1.finish_reason == "stop"
    assert isinstance(json.loads(t2)["urgent"], bool) and f2.finish_reason == "stop"
    assert t3 not in {"yes", "no", "maybe"}


def test_bad_settings_are_refused_at_submit(batcher, prompts):
    with pytest.raises(InputError, match="grammar"):
        batcher.submit(prompts[0], GenerationSettings(grammar="root ::= ("), request_id="bad")
    with pytest.raises(ContextOverflow, match="context window of 512"):
        batcher.submit("word " * 600, GREEDY, request_id="long")
    with pytest.raises(ContextOverflow):
        batcher.submit(prompts[0], GenerationSettings(max_tokens=500), request_id="long2")
    with pytest.raises(InputError, match="vocabulary"):
        batcher.submit([1, 10**9], GREEDY, request_id="ids")
    assert batcher.stats()["queue_depth"] == 0 and batcher.stats()["active_slots"] == 0


def test_a_text_sure_not_to_fit_is_refused_before_it_is_tokenized(batcher, prompts, monkeypatch):
    """Tokenizing holds the lock every request needs, and llama.cpp's special-token matching slows down faster than
    the text grows: a megabyte of markup held every other request for 17 s before it was refused as too long."""
    from edgemed.runtime.llamacpp import Model

    model = batcher._model
    texts = [prompts[1], "word " * 600, "<|im_start|>" * 50 + "hi", "é中 " * 300, "a" * 2000, "<|im_end|>x" * 7]
    for text in texts:  # a lower bound: never more than the tokens the text really is
        assert 0 < model.at_least_tokens(text) <= len(model.tokenize(text, True, True)), text[:40]
    assert model.at_least_tokens("<|im_start|>" * 600) == 600

    def no(*args, **kwargs):
        raise AssertionError("tokenized")

    monkeypatch.setattr(Model, "tokenize", no)
    for text in ["<|im_start|>" * 80_000, "x" * 2_000_000]:
        with pytest.raises(ContextOverflow,
                           match=r"at least \d+ tokens \(\d+ characters\), more than the context window of 512"):
            batcher.tokenize(text)
        with pytest.raises(ContextOverflow, match="with max_tokens=24 it needs more than the context window"):
            batcher.submit(text, GREEDY, request_id="huge")
    with pytest.raises(ContextOverflow, match="with max_tokens=24"):  # the bound counts max_tokens as check_fits does
        batcher.submit("<|im_start|>" * 500, GREEDY, request_id="near")
    assert batcher.stats()["queue_depth"] == 0 and batcher.stats()["active_slots"] == 0


def test_short_prompts_are_fed_in_chunks_when_the_batch_is_smaller(smollm2_gguf, prompts):
    """A prompt of up to WHOLE_PROMPT tokens went whole or not at all: with a profile's n_batch under it, the
    scheduler skipped it at every step (millions of empty steps, 100 % of a core, no answer)."""
    small = LoadSettings(n_ctx=2 * 512, n_threads=1, n_batch=32, n_ubatch=32)
    with Batcher(smollm2_gguf, small, slots=2, queue_size=2) as b:
        sizes = [len(b.tokenize(p)) for p in (prompts[3], prompts[1])]
        assert all(32 < n <= 128 for n in sizes)
        streams = [b.submit(prompts[3], GenerationSettings(max_tokens=12), request_id="a")]
        time.sleep(0.5)  # the second arrives while the first is read or streams
        streams.append(b.submit(prompts[1], GenerationSettings(max_tokens=6), request_id="b"))
        got = [None, None]

        def take(i):
            got[i] = collect(streams[i])

        threads = [threading.Thread(target=take, args=(i,), daemon=True) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if any(t.is_alive() for t in threads):  # end both, so that the failure is reported rather than a hang
            for stream in streams:
                stream.cancel()
        assert all(g is not None for g in got), "a short prompt larger than the batch never got its answer"
        assert [fin.finish_reason for _, fin in got] == ["length", "length"]
        assert [fin.prompt_tokens for _, fin in got] == sizes


def test_seeded_sampling_is_per_sequence(batcher, prompts):
    hot = GenerationSettings(max_tokens=16, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    a = batcher.submit(prompts[0], hot, request_id="t1")
    b = batcher.submit(prompts[0], hot, request_id="t2")  # same seed, decoded in the same steps
    (ta, _), (tb, _) = collect(a), collect(b)
    assert ta == tb
    assert collect(batcher.submit(prompts[0], hot, request_id="t3"))[0] == ta


def test_the_highest_fixed_seed_repeats(batcher, prompts):
    """The highest seed a caller may pass (``MAX_SEED``, one below llama.cpp's "draw a random seed") repeats."""
    hot = GenerationSettings(max_tokens=16, temperature=1.0, seed=MAX_SEED)
    first = collect(batcher.submit(prompts[1], hot, request_id="s1"))[0]
    assert all(collect(batcher.submit(prompts[1], hot, request_id=f"s{i}"))[0] == first for i in range(2, 4))


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 2**32, 2**40])
def test_a_seed_llama_cpp_would_not_take_as_it_is_is_refused_for_every_caller(seed):
    """The API and ``run --seed`` refuse these; a Python caller of the batcher had them masked to 32 bits (2^40 was
    seed 0: the same answer, said nowhere) or moved off llama.cpp's random draw (2^32 - 1 was 2^32 - 2). Now the
    settings refuse them where they are made, as the API does."""
    import dataclasses

    with pytest.raises(InputError) as err:
        GenerationSettings(max_tokens=4, temperature=1.0, seed=seed)
    assert f"seed {seed} is not a fixed seed" in str(err.value) and f"from 0 to {MAX_SEED}" in err.value.fix
    with pytest.raises(InputError, match=f"seed {seed} is not a fixed seed"):  # a copy with another seed, too
        dataclasses.replace(GREEDY, seed=seed)


def test_the_last_choices_seed_must_be_a_fixed_seed_too(batcher, prompts):
    """Choice i of n samples with seed + i: a seed whose last choice's seed is past ``MAX_SEED`` is refused before
    anything is queued, naming n (and not as another seed's error from inside the batcher)."""
    from edgemed.runtime.batch.options import Extras

    before = batcher.stats()["requests_total"]
    with pytest.raises(InputError) as err:  # n choices sample with seed + i: the last one's must be fixed too
        batcher.submit_n(prompts[1], GenerationSettings(max_tokens=4, temperature=1.0, seed=MAX_SEED - 1),
                         request_id="n3", extras=Extras(n=3))
    assert "seed 4294967293 is not a fixed seed" in str(err.value) and "with n=3 choices" in str(err.value)
    assert f"from 0 to {MAX_SEED - 2}" in err.value.fix
    assert batcher.stats()["requests_total"] == before
    two = batcher.submit_n(prompts[1], GenerationSettings(max_tokens=4, temperature=1.0, seed=MAX_SEED - 1),
                           request_id="n2", extras=Extras(n=2))  # the end of the range is served
    assert [collect(s)[1].finish_reason for s in two] == ["length", "length"]


def test_cancel_frees_the_slot(smollm2_gguf, prompts):
    with Batcher(smollm2_gguf, LOAD, slots=1, queue_size=1) as b:
        long = b.submit(prompts[3], GenerationSettings(max_tokens=400), request_id="x")
        waiting = b.submit(prompts[2], GenerationSettings(max_tokens=4), request_id="y")
        it = iter(long)
        assert isinstance(next(it), Piece)
        long.cancel()
        rest = list(it)
        assert isinstance(rest[-1], Finished) and rest[-1].finish_reason == "cancelled"
        assert rest[-1].completion_tokens < 400
        text, fin = collect(waiting)  # got the freed slot
        assert fin.finish_reason == "length"
        # leaving the loop early cancels too
        for _ in b.submit(prompts[3], GenerationSettings(max_tokens=400), request_id="z"):
            break
        wait_for(lambda: b.stats()["active_slots"] == 0)
        assert b.stats()["finished_total"]["cancelled"] == 2


def test_queue_full_raises_overloaded(smollm2_gguf, prompts):
    with Batcher(smollm2_gguf, LOAD, slots=1, queue_size=1) as b:
        running = b.submit(prompts[3], GenerationSettings(max_tokens=400), request_id="r")
        queued = b.submit(prompts[3], GenerationSettings(max_tokens=400), request_id="q")
        with pytest.raises(Overloaded) as err:
            b.submit(prompts[0], GREEDY, request_id="o")
        assert err.value.retry_after >= 1.0 and err.value.fix
        assert b.stats()["overloaded_total"] == 1
        running.cancel()
        queued.cancel()
        assert collect(queued)[1].finish_reason == "cancelled"
        assert collect(b.submit(prompts[2], GenerationSettings(max_tokens=3), request_id="ok"))[1].finish_reason == "length"


def test_a_held_call_keeps_its_requests_place_in_a_full_queue(smollm2_gguf, prompts):
    """``held`` (a reasoning cap's answer, after its thought): the request was taken already, so a queue other requests
    filled meanwhile neither refuses its next call nor counts it as a refusal."""
    with Batcher(smollm2_gguf, LOAD, slots=1, queue_size=1) as b:
        running = b.submit(prompts[3], GenerationSettings(max_tokens=400), request_id="r")
        queued = b.submit(prompts[3], GenerationSettings(max_tokens=400), request_id="q")
        answer = b.submit_n(prompts[2], GenerationSettings(max_tokens=3), request_id="a", held=True)[0]
        assert b.stats()["overloaded_total"] == 0
        running.cancel()
        queued.cancel()
        assert collect(answer)[1].finish_reason == "length"


def test_a_request_cancelled_behind_the_head_of_the_queue_gives_its_place_back(smollm2_gguf, prompts):
    """Only the head of the queue was dropped when cancelled: one further back kept its place until it reached the
    head, so a new request got a 429 meanwhile, and its own client waited for that turn to learn it had ended."""
    with Batcher(smollm2_gguf, LOAD, slots=1, queue_size=2) as b:
        running = b.submit(prompts[3], GenerationSettings(max_tokens=400), request_id="r")
        pieces = iter(running)  # kept: an iterator let go of cancels its stream
        next(pieces)  # generating: the slot is taken
        head = b.submit(prompts[3], GenerationSettings(max_tokens=400), request_id="h")
        behind = b.submit(prompts[2], GenerationSettings(max_tokens=4), request_id="b")
        behind.cancel()
        t0 = time.monotonic()
        assert collect(behind)[1].finish_reason == "cancelled" and time.monotonic() - t0 < 5
        assert b.stats()["queue_depth"] == 1
        late = b.submit(prompts[0], GenerationSettings(max_tokens=2), request_id="late")  # room again: no Overloaded
        running.cancel()
        head.cancel()
        assert collect(late)[1].finish_reason == "length"


def test_a_grammar_costlier_than_the_limit_for_one_token_ends_its_request_alone(smollm2_gguf, prompts, monkeypatch):
    """What the probe cannot see: a request whose grammar takes longer than GRAMMAR_TOKEN_S for one token ends
    ("costly", with the reason), and the request beside it answers as it would alone."""
    from edgemed.runtime.batch import batcher as batcher_module

    monkeypatch.setattr(batcher_module, "GRAMMAR_TOKEN_S", 0.0)  # every grammar is "too costly" now
    with Batcher(smollm2_gguf, LOAD, slots=2, queue_size=2, grammar_probe=False) as b:
        costly = b.submit(prompts[0], GenerationSettings(max_tokens=8, grammar='root ::= "yes" | "no"'),
                          request_id="g")
        plain = b.submit(prompts[1], GREEDY, request_id="p")
        fin = collect(costly)[1]
        assert fin.finish_reason == "costly" and "took" in fin.error and "for one token" in fin.error
        assert "repetition" in fin.fix and "Fix" not in fin.error  # the fix apart: a server words it for its field
        assert collect(plain)[1].finish_reason in ("stop", "length")


def test_one_requests_failing_sampler_ends_that_request_alone(smollm2_gguf, prompts, alone):
    """A sampler that raises (not a decode failure: the step's decode went well) ended every running request."""
    with Batcher(smollm2_gguf, LOAD, slots=2, queue_size=2) as b:
        bad = b.submit(prompts[0], GenerationSettings(max_tokens=16, temperature=0.7, seed=3), request_id="bad")
        good = b.submit(prompts[1], GREEDY, request_id="good")
        seq = next(q for q in list(b._active) + list(b._queue) if q.stream is bad)
        real, calls = seq.sampler.sample, []

        def fail_on_the_third(ctx, index):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("a sampler bug")
            return real(ctx, index)

        seq.sampler.sample = fail_on_the_third
        fin = collect(bad)[1]
        assert fin.finish_reason == "error" and "sampling" in fin.error
        assert collect(good)[0] == alone[1][0]


def test_close_ends_every_stream(smollm2_gguf, prompts):
    b = Batcher(smollm2_gguf, LOAD, slots=2, queue_size=2)
    b.start()
    streams = [b.submit(p, GenerationSettings(max_tokens=400), request_id=f"w{i}") for i, p in enumerate(prompts[:4])]
    wait_for(lambda: b.stats()["active_slots"] == 2)
    ended = []
    reader = threading.Thread(target=lambda: ended.extend(collect(s)[1] for s in streams))
    reader.start()
    b.close()
    reader.join(timeout=30)
    assert not reader.is_alive()
    assert [f.finish_reason for f in ended] == ["cancelled"] * 4
    with pytest.raises(Closed):
        b.submit(prompts[0], GREEDY, request_id="late")


def test_failed_step_ends_its_streams_and_the_scheduler_goes_on(smollm2_gguf, prompts):
    with Batcher(smollm2_gguf, LOAD, slots=2, queue_size=2) as b:
        real = b._ctx.decode
        b._ctx.decode = lambda batch: -1  # llama.cpp refuses the next batch
        text, fin = collect(b.submit(prompts[2], GREEDY, request_id="e1"))
        assert fin.finish_reason == "error" and "llama_decode returned -1" in fin.error
        b._ctx.decode = real
        assert b.stats()["active_slots"] == 0
        assert collect(b.submit(prompts[2], GenerationSettings(max_tokens=3), request_id="e2"))[1].finish_reason == "length"


def test_pieces_never_split_a_character():
    from edgemed.runtime.text_stream import TextStream
    from edgemed.runtime.llamacpp import Detokenizer

    class Bytes:  # token id -> its bytes; "é" is split over two tokens, "🩺" over three
        pieces = {1: b"caf", 2: b"\xc3", 3: b"\xa9 ", 4: b"\xf0\x9f", 5: b"\xa9", 6: b"\xba"}

        def piece(self, token):
            return self.pieces[token]

    stream = TextStream(Detokenizer(Bytes()))
    assert [stream.push(t) for t in range(1, 7)] == ["caf", "", "é ", "", "", "🩺"]


def test_many_clients_with_cancels_all_end(batcher, prompts):
    """Threads submit, some cancel mid-stream, some are refused: every stream ends once, every slot comes back."""
    import random

    rng = random.Random(6)
    outcomes, lock = [], threading.Lock()

    def client(i: int) -> None:
        try:
            stream = batcher.submit(prompts[i % len(prompts)], GenerationSettings(max_tokens=rng.randint(2, 12)),
                                    request_id=f"m{i}")
        except Overloaded:
            with lock:
                outcomes.append("overloaded")
            return
        items = []
        for item in stream:
            items.append(item)
            if i % 3 == 0 and isinstance(item, Piece):
                stream.cancel()
        assert sum(isinstance(x, Finished) for x in items) == 1 and isinstance(items[-1], Finished)
        with lock:
            outcomes.append(items[-1].finish_reason)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and len(outcomes) == 12
    assert set(outcomes) <= {"stop", "length", "cancelled", "overloaded"} and "length" in outcomes
    wait_for(lambda: batcher.stats()["active_slots"] == 0 and batcher.stats()["queue_depth"] == 0)


def test_kv_cache_type_and_flash_attention_from_the_settings(smollm2_gguf, prompts):
    from dataclasses import replace

    from edgemed.errors import ModelLoadError

    quantized = replace(LOAD, flash_attn=True, type_k="q8_0", type_v="q8_0")
    with Batcher(smollm2_gguf, quantized, slots=2) as b:
        text, fin = collect(b.submit(prompts[2], GenerationSettings(max_tokens=6), request_id="kv"))
        assert text and fin.finish_reason == "length"
    with pytest.raises(ModelLoadError, match="flash attention"):
        Batcher(smollm2_gguf, replace(quantized, flash_attn=False), slots=2).start()


def test_an_echo_prompt_asks_for_at_most_echo_rows_of_logits_a_call(batcher, monkeypatch):
    """Scoring a prompt needs a logits row per token; llama.cpp keeps its output buffer at the largest call's rows,
    so a whole echo prompt left n_batch x n_vocab floats resident for the server's life."""
    from edgemed.runtime.batch import batcher as module
    from edgemed.runtime.batch.options import Extras

    calls, rows = [], [0]
    real_add, real_decode = batcher._batch.add, batcher._ctx.decode

    def add(token, pos, seq, logits):
        rows[0] += bool(logits)
        return real_add(token, pos, seq, logits)

    def decode(batch):
        calls.append(rows[0])
        rows[0] = 0
        return real_decode(batch)

    monkeypatch.setattr(batcher._batch, "add", add)
    monkeypatch.setattr(batcher._ctx, "decode", decode)
    prompt = "The patient has chest pain and shortness of breath on exertion. " * 8
    n = len(batcher.tokenize(prompt))
    assert n > 3 * module.ECHO_ROWS
    echo = Extras(prompt_logprobs=True, top_logprobs=1)
    text, fin = collect(batcher.submit(prompt, GenerationSettings(max_tokens=2), request_id="echo", extras=echo))
    assert fin.finish_reason == "length" and fin.prompt_tokens == n
    assert max(calls) <= module.ECHO_ROWS and sum(calls) >= n  # every prompt row scored, a piece at a time
