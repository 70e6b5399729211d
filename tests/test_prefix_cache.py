"""Prompt prefixes shared across slots and kept in host RAM, on the real SmolLM2 (1 thread).

Across slots: a request takes its prefix from another free slot's kept cells or a running request's computed
prompt (a KV stream copy), and requests arriving together with the same preamble compute it once (the later ones
wait for the first and copy it). Host RAM: a free slot's prefix is saved before its cells go, and restored into
a slot for a later request that shares it. Every reuse answers token for token as a cold run
(``prefix_cache=False``), never crosses token ids or adapters, and the host cache keeps to its byte bound.
"""

from __future__ import annotations

import pytest

from edgemed.runtime.batch.prefix import HOST_MIN, PrefixCache
from edgemed.runtime.engine import GenerationSettings, LoadSettings

pytest.importorskip("llama_cpp")

from edgemed.runtime.batch.batcher import MIN_SHARED, REFEED, Batcher, Finished  # noqa: E402
from serve_kit import collect  # noqa: E402
from test_serve_adapters import kit  # noqa: E402,F401 - the adapter files (made once, cached)

LOAD = LoadSettings(n_ctx=4 * 512, n_threads=1, n_threads_batch=1, n_batch=512, n_ubatch=512)
GREEDY = GenerationSettings(max_tokens=12)
QUESTIONS = ["What is the first-line treatment for anaphylaxis?", "Name a loop diuretic and its main risk.",
             "Define sepsis in one sentence.", "When is a head CT needed after a fall?"]


def preamble(topic: str, times: int = 7) -> str:
    """A template preamble of about 300 tokens (40 a time; its own per test, so no slot or host entry holds it yet)."""
    rule = (f"You are a careful {topic} assistant for clinicians. Answer briefly, cite the guideline when you know it, "
            "say when you are unsure, never invent doses, and advise escalation for red-flag findings. ")
    return rule * times + "Question: "


def common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.fixture(scope="module")
def cold(smollm2_gguf):
    with Batcher(smollm2_gguf, LOAD, slots=4, queue_size=4, prefix_cache=False) as b:
        yield b


@pytest.fixture(scope="module")
def warm(smollm2_gguf):
    with Batcher(smollm2_gguf, LOAD, slots=4, queue_size=4) as b:
        yield b


def answers(b: Batcher, prompts: list[list[int]], tag: str) -> list[tuple[str, Finished]]:
    """Submitted together (the scheduler gathers them into one admission), then collected."""
    streams = [b.submit(p, GREEDY, request_id=f"{tag}{i}") for i, p in enumerate(prompts)]
    return [collect(s) for s in streams]


# -- the host cache alone -------------------------------------------------------------------------------------
def test_host_cache_keeps_to_its_bound_least_recently_used_first():
    c = PrefixCache(250)
    assert c.put(None, [1, 2, 3], b"a" * 100) and c.put(None, [4, 5, 6], b"b" * 100)
    assert c.match(None, [1, 2, 3, 9], 10)[0] == 3
    c.take(c.match(None, [1, 2, 3, 9], 10)[1])  # [1, 2, 3] is now the most recently used
    assert c.put(None, [7, 8, 9], b"c" * 100)  # over 250: the least recently used ([4, 5, 6]) goes
    assert c.bytes == 200 and len(c) == 2 and c.evicted == 1
    assert c.match(None, [4, 5, 6], 10) == (0, None)
    assert not c.put(None, [1], b"d" * 251) and c.refused == 1 and c.bytes == 200  # bigger than the bound: not stored


def test_host_cache_matches_only_the_same_key_and_ids_and_purges_by_key():
    c = PrefixCache(1000)
    c.put(("cardio", 1.0, 7), [1, 2, 3, 4], b"x" * 10)
    assert c.match(None, [1, 2, 3, 4], 10) == (0, None)  # another adapter key: nothing
    n, e = c.match(("cardio", 1.0, 7), [1, 2, 9, 4], 10)
    assert n == 2 and e.tokens == (1, 2, 3, 4)  # up to the differing id only
    assert c.match(("cardio", 1.0, 7), [1, 2, 3, 4, 5], 3)[0] == 3  # never past the limit
    c.put(("cardio", 1.0, 7), [1, 2, 3, 4, 5], b"y" * 12)  # a longer one replaces the prefix it extends
    assert len(c) == 1 and c.bytes == 12
    assert c.purge(("cardio", 1.0, 7)) == 1 and c.bytes == 0 and len(c) == 0


def test_host_cache_entries_of_one_adapter_go_whatever_their_scope():
    c = PrefixCache(1000)
    c.put((("cardio", 1.0, 7), "dr-a"), [1, 2, 3], b"x" * 10)
    c.put((("cardio", 1.0, 7), "dr-b"), [1, 2, 3], b"y" * 10)
    c.put((None, "dr-a"), [1, 2, 3], b"z" * 10)
    assert c.match((("cardio", 1.0, 7), "dr-c"), [1, 2, 3], 10) == (0, None)  # another scope: nothing
    assert c.purge_if(lambda key: key[0] == ("cardio", 1.0, 7)) == 2 and len(c) == 1 and c.bytes == 10


def test_a_prefix_is_reused_only_within_its_scope(smollm2_gguf, cold):
    """A request's prompt KV serves requests of the same scope only, from the slot it was left in, from host RAM
    and from a running request alike; another scope computes the same prompt from its first token (a server
    scopes by API key: one clinician's prompt is neither served to another nor timed by another's probe)."""
    with Batcher(smollm2_gguf, LOAD, slots=2, queue_size=2) as b:
        first = b.tokenize(preamble("oncology", 3)) + b.tokenize(QUESTIONS[0], add_special=False)
        ref = collect(cold.submit(first, GREEDY, request_id="ref"))[0]
        once = [collect(b.submit(first, GREEDY, request_id=f"a{i}", scope="dr-a")) for i in range(2)]
        assert [f.cached_tokens for _, f in once] == [0, len(first) - REFEED]  # its own scope: the slot's cells
        text, fin = collect(b.submit(first, GREEDY, request_id="b", scope="dr-b"))
        assert fin.cached_tokens == 0 and text == ref  # another scope computes it all
        text, fin = collect(b.submit(first, GREEDY, request_id="n"))  # no scope (None) is a scope of its own
        assert fin.cached_tokens == 0 and text == ref
        assert b.stats()["prefix_host_entries"] >= 1  # the slots' cells that went were saved, each under its scope
        for scope in ("dr-a", "dr-b"):
            text, fin = collect(b.submit(first, GREEDY, request_id=f"again-{scope}", scope=scope))
            assert fin.cached_tokens == len(first) - REFEED and text == ref
        # a running request's computed prompt is not copied into another scope's request either
        long = GenerationSettings(max_tokens=24)
        second = b.tokenize(preamble("geriatrics", 3)) + b.tokenize(QUESTIONS[1], add_special=False)
        running = iter(b.submit(second, long, request_id="run", scope="dr-a"))
        next(running)  # its prompt is computed: it is generating
        text, fin = collect(b.submit(second, GREEDY, request_id="probe", scope="dr-b"))
        list(running)
        assert fin.cached_tokens == common(first, second) < MIN_SHARED  # dr-b's own earlier prompt, not dr-a's
        assert text == collect(cold.submit(second, GREEDY, request_id="c"))[0]


# -- across slots -------------------------------------------------------------------------------------------------
def test_requests_arriving_together_compute_a_shared_preamble_once(warm, cold):
    pre = warm.tokenize(preamble("emergency medicine"))
    prompts = [pre + warm.tokenize(q, add_special=False) for q in QUESTIONS]
    assert len(pre) > 250
    before = warm.stats()
    got = answers(warm, prompts, "t")
    after = warm.stats()
    ref = answers(cold, prompts, "c")
    assert [g[0] for g in got] == [r[0] for r in ref]  # token-identical greedy answers
    shares = [common(prompts[0], p) for p in prompts[1:]]
    assert min(shares) >= len(pre)
    assert [g[1].cached_tokens for g in got] == [0, *shares]
    computed = after["prompt_tokens_total"] - before["prompt_tokens_total"]
    assert computed == sum(map(len, prompts)) - sum(shares)  # the preamble once, each question's rest
    assert after["prompt_tokens_cached_copied_total"] - before["prompt_tokens_cached_copied_total"] == sum(shares)
    assert cold.stats()["prompt_tokens_cached_total"] == 0


def test_a_running_requests_prompt_serves_another_up_to_the_first_differing_token(warm, cold):
    pre = warm.tokenize(preamble("cardiology", 3))
    first = pre + warm.tokenize(QUESTIONS[0], add_special=False)
    m = len(pre) // 2
    other = list(first)
    other[m] = warm.tokenize(" banana", add_special=False)[0]  # one token differs, in the middle
    assert other[m] != first[m] and m >= MIN_SHARED
    settings = GenerationSettings(max_tokens=24)
    running = warm.submit(first, settings, request_id="run")
    it = iter(running)
    head = next(it)  # its prompt is computed: it is generating
    text, fin = collect(warm.submit(other, GREEDY, request_id="other"))
    rest = list(it)
    assert fin.cached_tokens == m  # only the part before the differing token, copied from the running slot
    assert text == collect(cold.submit(other, GREEDY, request_id="c"))[0]
    assert head.text + "".join(i.text for i in rest[:-1]) == collect(cold.submit(first, settings, request_id="c2"))[0]


def test_no_prefix_cache_reuses_nothing(cold):
    pre = cold.tokenize(preamble("nephrology", 2))
    prompts = [pre + cold.tokenize(q, add_special=False) for q in QUESTIONS[:2]]
    answers(cold, prompts, "a")
    fins = [f for _, f in answers(cold, prompts, "b")]
    assert [f.cached_tokens for f in fins] == [0, 0]
    s = cold.stats()
    assert s["prompt_tokens_cached_total"] == s["prompt_tokens_cached_copied_total"] == 0
    assert s["prefix_host_entries"] == 0 and s["prefix_host_bytes"] == 0


# -- host RAM -------------------------------------------------------------------------------------------------
def test_a_prefix_pushed_out_of_its_slot_is_restored_from_host_ram(smollm2_gguf, cold):
    with Batcher(smollm2_gguf, LOAD, slots=1, queue_size=2) as b:
        pre = b.tokenize(preamble("infectious disease", 3))
        first = pre + b.tokenize(QUESTIONS[2], add_special=False)
        collect(b.submit(first, GREEDY, request_id="a"))
        stranger = b.tokenize(preamble("dermatology", 3))  # unrelated: the slot's prefix goes to host RAM
        assert common(stranger, first) < MIN_SHARED and len(first) >= HOST_MIN
        collect(b.submit(stranger, GREEDY, request_id="b"))
        s = b.stats()
        assert s["prefix_host_entries"] == 1 and 0 < s["prefix_host_bytes"] <= b.prefix_cache_bytes
        second = pre + b.tokenize(QUESTIONS[3], add_special=False)
        text, fin = collect(b.submit(second, GREEDY, request_id="c"))
        assert fin.cached_tokens == common(first, second) > len(pre) - 2
        assert text == collect(cold.submit(second, GREEDY, request_id="c"))[0]
        s = b.stats()
        assert s["prefix_host_hits_total"] == 1 and s["prompt_tokens_cached_host_total"] == fin.cached_tokens
        # one differing token in the middle: only the part before it comes back
        m = len(pre) // 3
        changed = list(first)
        changed[m] = b.tokenize(" banana", add_special=False)[0]
        collect(b.submit(stranger, GREEDY, request_id="d"))  # the slot holds the stranger again
        text, fin = collect(b.submit(changed, GREEDY, request_id="e"))
        assert fin.cached_tokens == m
        assert text == collect(cold.submit(changed, GREEDY, request_id="e"))[0]


def test_the_host_cache_evicts_the_oldest_and_refuses_what_exceeds_its_bound(smollm2_gguf):
    def turn_over(b, topics):
        for i, t in enumerate(topics):
            collect(b.submit(b.tokenize(preamble(t, 2)), GREEDY, request_id=f"r{i}"))

    with Batcher(smollm2_gguf, LOAD, slots=1, queue_size=2) as b:
        turn_over(b, ["oncology", "neurology"])
        one = b.stats()["prefix_host_bytes"]  # one ~90-token entry
    assert one > 0
    with Batcher(smollm2_gguf, LOAD, slots=1, queue_size=2, prefix_cache_bytes=one * 3 // 2) as b:
        turn_over(b, ["oncology", "neurology", "psychiatry"])  # two saved, room for one
        s = b.stats()
        assert s["prefix_host_entries"] == 1 and s["prefix_host_bytes"] <= one * 3 // 2
        assert s["prefix_host_evicted_total"] == 1
    with Batcher(smollm2_gguf, LOAD, slots=1, queue_size=2, prefix_cache_bytes=one // 2) as b:
        turn_over(b, ["oncology", "neurology"])  # the entry exceeds the bound: not stored
        assert b.stats()["prefix_host_entries"] == 0 == b.stats()["prefix_host_bytes"]


def test_an_n_choice_slot_ended_before_its_copy_ran_saves_nothing_of_the_slots_last_request(smollm2_gguf, cold):
    """An n > 1 choice copies the prompt's KV into its own slot, and llama.cpp moves the data at the next decode.
    A request that ends in the same step (max_tokens 1) left that slot listed as holding the prompt while its memory
    still held the previous request's: saved to host RAM under this prompt, and restored for the next request with
    the same prompt, another clinician's text came back in its answer."""
    from edgemed.runtime.batch.options import Extras

    one = GenerationSettings(max_tokens=1)
    with Batcher(smollm2_gguf, LOAD, slots=2, queue_size=2) as b:
        secret = b.tokenize("Secret note for Dr Adams: patient Zed Quill has syphilis, room 12. " * 9)
        prompt = b.tokenize(preamble("cardiology", 2) + QUESTIONS[0])
        assert len(prompt) >= HOST_MIN and common(secret, prompt) < MIN_SHARED
        collect(b.submit(secret, one, request_id="x"))
        collect(b.submit(b.tokenize("Hi"), one, request_id="y"))
        for stream in b.submit_n(prompt, one, request_id="p", extras=Extras(n=2)):
            collect(stream)
        collect(b.submit(b.tokenize("Good morning"), one, request_id="u1"))
        for stream in [b.submit(b.tokenize(t), one, request_id=t) for t in ("Alpha beta", "Gamma delta")]:
            collect(stream)
        text, fin = collect(b.submit(prompt, GREEDY, request_id="again"))
    assert text == collect(cold.submit(prompt, GREEDY, request_id="again"))[0]


# -- adapters -------------------------------------------------------------------------------------------------
def test_a_running_requests_prefix_is_never_copied_to_another_adapter(kit):  # noqa: F811 (the fixture)
    from edgemed.runtime.loader import AdapterSpec

    load = LoadSettings(n_ctx=2 * 512, n_threads=1, n_threads_batch=1, n_batch=512, n_ubatch=512)
    with Batcher(kit["base"], load, slots=2, queue_size=2, adapters={"cardio": AdapterSpec(kit["cardio"])}) as b:
        prompt = b.tokenize(preamble("cardiology") + QUESTIONS[0])
        base = b.submit(prompt, GenerationSettings(max_tokens=30), request_id="base")
        it = iter(base)
        next(it)  # the base's prompt is computed and running in slot 0
        _, fin = collect(b.submit(prompt, GREEDY, request_id="lora", adapter="cardio"))
        assert fin.cached_tokens == 0  # not copied from the base's slot
        list(it)
        _, fin = collect(b.submit(prompt, GREEDY, request_id="lora2", adapter="cardio"))
        assert fin.cached_tokens == len(prompt) - REFEED  # its own adapter's cells are reused
