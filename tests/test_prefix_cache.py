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
from test_serve_prefix_reuse import settle  # noqa: E402
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


def test_room_is_made_before_a_state_is_built_and_never_from_the_entry_being_restored():
    c = PrefixCache(250)
    assert c.put(None, [1, 2, 3], bytearray(b"a" * 100)) and c.put(None, [4, 5, 6], bytearray(b"b" * 100))
    keep = c.match(None, [1, 2, 3], 10)[1]
    assert c.make_room(None, [7, 8, 9], 100, keep)  # [1, 2, 3] is older, but about to be restored: [4, 5, 6] goes
    assert c.bytes == 100 and c.evicted == 1 and c.match(None, [1, 2, 3], 10)[1] is keep
    assert not c.make_room(None, [7, 8, 9], 151, keep) and c.bytes == 100  # cannot fit beside it: nothing dropped
    assert c.make_room(None, [1, 2, 3, 4], 240) and len(c) == 0  # the entry it extends goes first, counted as no eviction
    assert c.evicted == 1 and c.bytes + 240 <= c.max_bytes
    assert not c.make_room(None, [1], 251) and not c.put(None, [1], bytearray())  # over the bound; a failed save


def test_hits_are_counted_by_the_caller_not_by_take():
    c = PrefixCache(100)
    c.put(None, [1, 2, 3], bytearray(b"a" * 10))
    assert c.take(c.match(None, [1, 2, 3], 10)[1]) == b"a" * 10 and c.hits == 0  # a restore may still fail
    c.hit()
    assert c.stats()["prefix_host_hits_total"] == 1


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


def test_the_host_cache_and_the_state_being_saved_or_restored_stay_within_the_bound(smollm2_gguf):
    """Three unrelated 300-token prompts through one slot, a bound with room for one saved state but not two, then
    the last one's state restored. The state was built before room was made for it and then copied (``bytes(buf)``)
    beside the entries, and a restore copied the entry again: 20.1 MiB of Python heap at the peak for a 10 MiB bound
    (59.7 for 20 MiB with 900-token prompts). Now room is made first, the state is written into the one buffer that is kept, and a restore reads
    that buffer: Python's heap (tracemalloc, from before the first request) holds the bound at most, plus a MiB for
    the requests' own objects."""
    import tracemalloc

    bound = 10 << 20
    load = LoadSettings(n_ctx=1024, n_threads=1, n_threads_batch=1, n_batch=512, n_ubatch=512)
    with Batcher(smollm2_gguf, load, slots=1, queue_size=2, prefix_cache_bytes=bound) as b:
        a, c, d = (b.tokenize(preamble(t, 8))[:300] for t in ("oncology", "neurology", "psychiatry"))
        assert max(common(a, c), common(a, d), common(c, d)) < MIN_SHARED
        peaks = []
        tracemalloc.start()
        try:
            for i, prompt in enumerate((a, c, d)):  # each saves the one before it; the third must evict the first
                collect(b.submit(prompt, GREEDY, request_id=f"r{i}"))
                settle(b)
                if i == 1:
                    one = b.stats()["prefix_host_bytes"]
                    assert bound // 2 < one <= bound  # one state fits, two do not
            peaks.append(tracemalloc.get_traced_memory()[1])
            collect(b.submit(b.tokenize("Hello"), GREEDY, request_id="short"))  # d's state is saved, c's evicted
            settle(b)
            tracemalloc.reset_peak()  # (the heap still holds d's entry)
            again = d + b.tokenize(QUESTIONS[0], add_special=False)
            _, fin = collect(b.submit(again, GREEDY, request_id="again"))  # restores d's (the short prompt: no save)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        for peak, what in zip(peaks, ("saves", "a restore")):
            assert peak <= bound + (1 << 20), f"{what}: {peak / 2**20:.1f} MiB of Python heap, bound {bound >> 20} MiB"
        s = b.stats()
        assert fin.cached_tokens == len(d) and s["prefix_host_hits_total"] == 1
        assert s["prefix_host_bytes"] <= bound and s["prefix_host_evicted_total"] == 2


def test_a_state_llama_cpp_writes_or_reads_short_is_not_kept(smollm2_gguf, monkeypatch):
    """llama.cpp's count of the bytes it wrote (or read) is read back against the buffer: a state written short was
    kept as it came (``bytes(buf)[:got]``) and would have been restored as a whole one."""
    with Batcher(smollm2_gguf, LOAD, slots=1, queue_size=2) as b:
        lib = b._ctx.lib

        class Short:
            def __getattr__(self, name):
                return getattr(lib, name)

            def llama_state_seq_get_data(self, ctx, dst, size, seq):
                return lib.llama_state_seq_get_data(ctx, dst, size, seq) - 1

            def llama_state_seq_set_data(self, ctx, src, size, seq):
                return lib.llama_state_seq_set_data(ctx, src, size, seq) - 1

        first = b.tokenize(preamble("oncology", 2))
        assert len(first) >= HOST_MIN
        collect(b.submit(first, GREEDY, request_id="a"))
        settle(b)
        with b._step_lock:  # the idle scheduler feeds nothing meanwhile
            whole = b._ctx.save_seq(0)
            assert len(whole) == b._ctx.seq_state_size(0) > 0
            monkeypatch.setattr(b._ctx, "lib", Short())
            assert b._ctx.save_seq(0) == bytearray()
            assert not b._ctx.restore_seq(0, whole)  # read short: refused, the sequence emptied
            monkeypatch.setattr(b._ctx, "lib", lib)
            assert b._ctx.restore_seq(0, whole)
            b._ctx.drop(0)
            b._kept[0], b._kept_key[0] = [], None
        collect(b.submit(first, GREEDY, request_id="b"))
        monkeypatch.setattr(b._ctx, "lib", Short())
        collect(b.submit(b.tokenize(preamble("neurology", 2)), GREEDY, request_id="c"))  # b's prefix, saved short
        assert b.stats()["prefix_host_entries"] == 0


def test_a_prefix_saved_for_room_never_evicts_the_one_the_request_restores(smollm2_gguf):
    """Two conversations taking turns in one slot, each prefix ~6.5 MiB, a 16 MiB cache. The displaced prefix was
    saved before the incoming request looked in host RAM, and evicted the least recently used entry: the very one
    it needed (cached tokens A0:0 B0:4 A1:276 B1:4 A2:276 B2:4, B never served). Now the entry to restore is found
    first and kept. At 9 MiB, where one state fits, the swap would need both in RAM at once: the entry being
    restored still stays (A is served every turn), and the displaced prefix is not saved (B is not)."""
    load = LoadSettings(n_ctx=1024, n_threads=1, n_threads_batch=1, n_batch=512, n_ubatch=512)
    for mib, served in ((16, "AB"), (9, "A")):
        with Batcher(smollm2_gguf, load, slots=1, queue_size=2, prefix_cache_bytes=mib << 20) as b:
            pre = {c: b.tokenize(preamble(t)) for c, t in (("A", "oncology"), ("B", "neurology"))}
            assert common(pre["A"], pre["B"]) < MIN_SHARED
            prompts, got = {}, {}
            for turn in range(3 if mib == 16 else 2):
                for c in "AB":
                    prompts[c, turn] = pre[c] + b.tokenize(f" Question {turn}: {QUESTIONS[turn]}", add_special=False)
                    got[c, turn] = collect(b.submit(prompts[c, turn], GREEDY, request_id=f"{c}{turn}"))[1].cached_tokens
                    settle(b)
            one = b._ctx.seq_state_size(0)
            assert 6 << 20 < one and 2 * one < 16 << 20 and one < 9 << 20 < 2 * one
            for (c, turn), cached in got.items():
                if turn:
                    want = common(prompts[c, turn - 1], prompts[c, turn]) if c in served else common(pre["A"], pre["B"])
                    assert cached == want > 0 if c in served else cached == want, (mib, c, turn, got)


def test_host_misses_count_requests_that_reused_nothing_and_hits_only_restores_that_worked(smollm2_gguf,
                                                                                            monkeypatch):
    """A chat turn whose history came from its own slot counted a host miss (the metric read "found no prefix
    anywhere"), so the hit ratio operators watch read too low; and a restore that then failed counted a hit."""
    with Batcher(smollm2_gguf, LOAD, slots=1, queue_size=2) as b:
        first = b.tokenize(preamble("oncology", 3))[:85]
        collect(b.submit(first, GREEDY, request_id="a"))
        assert b.stats()["prefix_host_misses_total"] == 1  # long enough to save, found nowhere
        longer = first + b.tokenize(preamble("neurology", 3), add_special=False)[:90]
        _, fin = collect(b.submit(longer, GREEDY, request_id="b"))
        assert fin.cached_tokens >= len(first) - REFEED and b.stats()["prefix_host_misses_total"] == 1  # its own slot
        stranger = b.tokenize(preamble("dermatology", 3))
        collect(b.submit(stranger, GREEDY, request_id="c"))  # "b"'s prefix goes to host RAM
        s = b.stats()
        assert s["prefix_host_entries"] == 1 and s["prefix_host_misses_total"] == 2
        monkeypatch.setattr(b._ctx, "restore_seq", lambda seq, data: False)  # llama.cpp refuses the state
        _, fin = collect(b.submit(longer, GREEDY, request_id="d"))
        s = b.stats()
        assert fin.cached_tokens == 0 and s["prefix_host_hits_total"] == 0 and s["prefix_host_misses_total"] == 3
        monkeypatch.undo()
        fins = [collect(b.submit(p, GREEDY, request_id=f"again{i}"))[1] for i, p in enumerate((stranger, longer))]
        s = b.stats()  # each restored from host RAM (the stranger was saved when "d" took the slot)
        assert [f.cached_tokens for f in fins] == [len(stranger) - REFEED, len(longer) - REFEED]
        assert s["prefix_host_hits_total"] == 2 and s["prefix_host_misses_total"] == 3


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
