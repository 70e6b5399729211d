"""Serving when something goes wrong: a donor cancelled while another request waits for its prefix, a host-cache
state larger than the whole cache, model output nested past JSON's depth, and a scheduler that stopped while the
HTTP server still answers. The real SmolLM2 (1 thread), the real batcher, a real uvicorn server."""

from __future__ import annotations

import threading

import pytest

from edgemed.runtime.engine import GenerationSettings, LoadSettings

pytest.importorskip("llama_cpp")

from edgemed.runtime.batch.batcher import Batcher  # noqa: E402
from serve_kit import collect, wait_until  # noqa: E402
from test_serve_prefix_reuse import settle  # noqa: E402

LOAD = LoadSettings(n_ctx=2 * 512, n_threads=1, n_threads_batch=1, n_batch=512, n_ubatch=512)
GREEDY = GenerationSettings(max_tokens=8)
RULE = ("You are a careful cardiology assistant for clinicians. Answer briefly, cite the guideline when you know "
        "it, say when you are unsure, never invent doses, and advise escalation for red-flag findings. ")


def test_a_donor_cancelled_before_it_computed_the_prefix_leaves_the_waiting_request_whole(smollm2_gguf):
    """S reused a short header from its own slot and waited to copy a preamble from D; D was cancelled before it had
    computed it. S's position went to 0 over its own cells, llama.cpp refused the batch, and the failed step ended
    every running request with an error."""
    with Batcher(smollm2_gguf, LOAD, slots=2, queue_size=4) as b, \
            Batcher(smollm2_gguf, LOAD, slots=2, queue_size=4, prefix_cache=False) as cold:
        header = b.tokenize("Case review. ")
        for s in [b.submit(header + b.tokenize(x), GREEDY, request_id=x) for x in ("ok", "go")]:
            collect(s)                                                    # both slots now keep the header
        settle(b)                                                         # their answers fed back: idle
        preamble = header + b.tokenize(RULE * 3)
        d_prompt, s_prompt = preamble + b.tokenize("Question: chest pain?"), preamble + b.tokenize("Question: syncope?")
        with b._step_lock:                                                # the scheduler admits, cannot step
            d = b.submit(d_prompt, GREEDY, request_id="d")
            s = b.submit(s_prompt, GREEDY, request_id="s")
            assert wait_until(lambda: any(q.donor is not None for q in list(b._active)), 30)
            d.cancel()
        text, fin = collect(s)
        assert fin.finish_reason != "error", fin
        assert text == collect(cold.submit(s_prompt, GREEDY, request_id="s"))[0]


def test_a_state_larger_than_the_host_cache_is_never_built(smollm2_gguf):
    from edgemed.runtime.batch.prefix import HOST_MIN

    with Batcher(smollm2_gguf, LOAD, slots=1, queue_size=2, prefix_cache_bytes=1024) as b:
        saves = []
        real = b._ctx.save_seq
        b._ctx.save_seq = lambda seq: saves.append(seq) or real(seq)
        for i, topic in enumerate(("oncology", "neurology")):
            prompt = b.tokenize(RULE.replace("cardiology", topic) * 2)
            assert len(prompt) >= HOST_MIN
            collect(b.submit(prompt, GREEDY, request_id=f"r{i}"))
        assert saves == [] and b.stats()["prefix_host_entries"] == 0


def test_model_output_nested_past_json_depth_is_content():
    from edgemed.serve import tools

    parsed = tools.parse("[" * 5000, {"f"})
    assert parsed.calls == [] and parsed.content == "[" * 5000
    assert tools.parse("{\"name\": \"f\", \"arguments\": " + "[" * 5000 + "]" * 5000 + "}", {"f"}).calls == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop fails on purpose
def test_health_says_when_the_scheduler_has_stopped(smollm2_gguf):
    httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package ships with
    pytest.importorskip("uvicorn")
    from edgemed.serve.app import create_app
    from edgemed.serve.config import ServeConfig
    from serve_kit import ServerThread

    b = Batcher(smollm2_gguf, LOAD, slots=1, queue_size=2)
    b.start()
    try:
        with ServerThread(create_app(b, ServeConfig(model_id="m", bundle_digest="sha256:test"))) as srv:
            assert httpx.get(srv.url + "/health", timeout=30).status_code == 200

            def broken():
                raise MemoryError("a host-cache save could not be allocated")

            b._admit = broken                                             # the loop's own code fails
            stream = b.submit(b.tokenize("Hello"), GREEDY, request_id="x")
            assert collect(stream)[1].finish_reason == "error"
            assert wait_until(lambda: not b.alive(), 30)
            health = httpx.get(srv.url + "/health", timeout=30)
            assert health.status_code == 503 and health.json()["status"] == "scheduler_stopped"
    finally:
        b.close()


def test_cached_token_counters_never_go_down(smollm2_gguf):
    """S first counted the header its own slot kept, then copied a longer prefix from D: the counters moved the
    header's tokens from "slot" to "copied", and a scrape in between saw ``*_cached_slot_total`` fall (Prometheus
    reads a fall as a restart). Now a request's cached tokens are counted once, when it ends, from where they
    came in the end."""
    names = ("prompt_tokens_cached_total", "prompt_tokens_cached_slot_total", "prompt_tokens_cached_copied_total",
             "prompt_tokens_cached_host_total")
    with Batcher(smollm2_gguf, LOAD, slots=2, queue_size=4) as b:
        header = b.tokenize("Case review. ")
        for s in [b.submit(header + b.tokenize(x), GREEDY, request_id=x) for x in ("ok", "go")]:
            collect(s)                                                    # both slots now keep the header
        settle(b)
        preamble = header + b.tokenize(RULE * 3)
        seen = [{k: b.stats()[k] for k in names}]
        with b._step_lock:                                                # the scheduler admits, cannot step
            d = b.submit(preamble + b.tokenize("Question: chest pain?"), GREEDY, request_id="d")
            s = b.submit(preamble + b.tokenize("Question: syncope?"), GREEDY, request_id="s")
            assert wait_until(lambda: any(q.donor is not None for q in list(b._active)), 30)
            waiting = next(q for q in list(b._active) if q.donor is not None)
            assert waiting.cached == len(header) and waiting.cached_from == "slot"  # its own slot's header, for now
            seen.append({k: b.stats()[k] for k in names})
        fins = [collect(x)[1] for x in (d, s)]
        seen.append({k: b.stats()[k] for k in names})
        assert fins[1].cached_tokens > len(header)                        # it did copy D's longer prefix
        for earlier, later in zip(seen, seen[1:]):
            assert all(later[k] >= earlier[k] for k in names), (earlier, later)
        assert seen[-1]["prompt_tokens_cached_total"] - seen[0]["prompt_tokens_cached_total"] == \
            sum(f.cached_tokens for f in fins)
        assert seen[-1]["prompt_tokens_cached_copied_total"] - seen[0]["prompt_tokens_cached_copied_total"] == \
            fins[1].cached_tokens


def test_host_cache_copies_and_heap_trims_let_the_lock_go(smollm2_gguf, monkeypatch):
    """Saving a slot's state to host RAM, restoring one and trimming the heap take milliseconds to tens of them
    (a 1,500-token history of the 1.5B is ~40 MB); they ran under the batcher's lock, which /health, /metrics,
    a cancel and a submit take on the event loop, so every stream paused for each. Now another thread gets the
    lock while each runs."""
    from edgemed.runtime import heap

    with Batcher(smollm2_gguf, LOAD, slots=1, queue_size=2, prefix_cache_bytes=64 << 20) as b:
        free: dict[str, list[bool]] = {"save": [], "restore": [], "trim": []}

        def lock_free() -> bool:
            got = []
            reader = threading.Thread(target=lambda: got.append(b.stats()), daemon=True)
            reader.start()
            reader.join(2)
            return bool(got)

        def watched(name, real):
            return lambda *a: free[name].append(lock_free()) or real(*a)

        monkeypatch.setattr(b._ctx, "save_seq", watched("save", b._ctx.save_seq))
        monkeypatch.setattr(b._ctx, "restore_seq", watched("restore", b._ctx.restore_seq))
        monkeypatch.setattr(heap, "release", watched("trim", heap.release))
        one, other = (b.tokenize(RULE.replace("cardiology", t) * 2) for t in ("oncology", "neurology"))
        for i, prompt in enumerate((one, other, one + b.tokenize("Question: staging?"))):
            collect(b.submit(prompt, GREEDY, request_id=f"r{i}"))   # the second saves the first; the third restores it
        assert wait_until(lambda: free["trim"], 10)                 # idle after work: the heap is trimmed
        assert b.stats()["prefix_host_hits_total"] == 1
        assert free["save"] and free["restore"] and all(free["save"] + free["restore"] + free["trim"]), free


def test_requests_being_admitted_count_in_flight_while_the_lock_is_let_go(smollm2_gguf):
    """While a host-cache save let the lock go, the request being admitted was neither queued nor active, so a
    full server took more requests than its slots and queue hold."""
    from edgemed.errors import Overloaded

    with Batcher(smollm2_gguf, LOAD, slots=1, queue_size=1, prefix_cache_bytes=64 << 20) as b:
        one, other = (b.tokenize(RULE.replace("cardiology", t) * 2) for t in ("oncology", "neurology"))
        collect(b.submit(one, GREEDY, request_id="first"))                # the slot keeps it: saved when it goes
        settle(b)
        answers: dict[str, object] = {}
        real = b._ctx.save_seq

        def save_seq(seq):
            def more():  # another client, while the scheduler copies the first prompt's state out
                for name in ("third", "fourth"):
                    try:
                        answers[name] = b.submit(other + b.tokenize(f" {name}"), GREEDY, request_id=name)
                    except Overloaded as exc:
                        answers[name] = exc
            client = threading.Thread(target=more)
            client.start()
            client.join(10)
            return real(seq)

        b._ctx.save_seq = save_seq
        second = b.submit(other, GREEDY, request_id="second")            # admitted: the slot's prefix is saved
        collect(second)
        b._ctx.save_seq = real
        assert set(answers) == {"third", "fourth"}
        assert not isinstance(answers["third"], Overloaded)               # the one place in the queue
        assert isinstance(answers["fourth"], Overloaded), answers         # one running, one queued: full
        collect(answers["third"])
