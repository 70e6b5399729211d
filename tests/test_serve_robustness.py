"""Serving when something goes wrong: a donor cancelled while another request waits for its prefix, a host-cache
state larger than the whole cache, model output nested past JSON's depth, and a scheduler that stopped while the
HTTP server still answers. The real SmolLM2 (1 thread), the real batcher, a real uvicorn server."""

from __future__ import annotations


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
        shared = header + b.tokenize(RULE * 3)
        d_prompt, s_prompt = shared + b.tokenize("Question: chest pain?"), shared + b.tokenize("Question: syncope?")
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
