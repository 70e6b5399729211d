"""Prometheus metrics for ``edgemed serve``, in a registry of the app's own (two apps in one process never mix).

Counters and histograms are fed per request by the app; the batcher's live state (queue
depth, active slots, tokens generated) is read from ``batcher.stats()`` at scrape time by
a custom collector, so a scrape always sees the present, not the last request's view.
``edgemed_tokens_per_second`` is the generation rate since the previous scrape (the first
scrape: since start); for any other window use ``rate(edgemed_generated_tokens_total[1m])``.
Generations are also counted per LoRA adapter (label ``adapter``; "" for the base model): only adapters the server
served when the request was taken get a label value, so a client cannot mint new series.
Which adapters are used, and how much, and the server's load are for operators: on a server with keys ``/metrics``
takes a metrics or an admin key, not a clinician's (``middleware.Guard``, ``ServeConfig.metrics_keyed``).
"""

from __future__ import annotations

import threading
import time

# Seconds. TTFT on a CPU box with a queue runs from ~50 ms to tens of seconds; TPOT from ~5 ms to ~1 s.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)

# batcher.stats() key -> (metric name, help); gauges unless named in COUNTER_STATS
GAUGE_STATS = {
    "queue_depth": ("edgemed_queue_depth", "Requests waiting for a slot."),
    "active_slots": ("edgemed_active_slots", "Slots generating or prefilling now."),
    "slots": ("edgemed_slots", "Parallel sequences the server runs (--slots)."),
    "queue_size": ("edgemed_queue_capacity", "Most requests that may wait (--queue); past it, 429."),
    "prefill_chunk": ("edgemed_prefill_chunk", "Prompt tokens a step takes now while other streams generate."),
    "prefix_host_bytes": ("edgemed_prefix_cache_host_bytes", "Bytes of prompt-prefix KV kept in host RAM now."),
    "prefix_host_entries": ("edgemed_prefix_cache_host_entries", "Prompt prefixes kept in host RAM now."),
    "prefix_host_max_bytes": ("edgemed_prefix_cache_host_max_bytes", "Most bytes the host prefix cache may hold."),
}
COUNTER_STATS = {
    "tokens_generated_total": ("edgemed_generated_tokens", "Tokens sampled by the batcher since start."),
    "prompt_tokens_total": ("edgemed_batcher_prompt_tokens",
                            "Prompt tokens the batcher has fed to llama.cpp (computed)."),
    "prompt_tokens_cached_total": ("edgemed_batcher_prompt_cached_tokens",
                                   "Prompt tokens found in a cache (prefix reuse, any source), not computed again; "
                                   "counted when the request ends."),
    "prompt_tokens_cached_slot_total": ("edgemed_batcher_prompt_cached_slot_tokens",
                                        "Cached prompt tokens found in the request's own slot."),
    "prompt_tokens_cached_copied_total": ("edgemed_batcher_prompt_cached_copied_tokens",
                                          "Cached prompt tokens copied from another slot's KV (shared prefixes)."),
    "prompt_tokens_cached_host_total": ("edgemed_batcher_prompt_cached_host_tokens",
                                        "Cached prompt tokens restored from the host-RAM prefix cache."),
    "answer_tokens_kept_total": ("edgemed_batcher_answer_kept_tokens",
                                 "Answer tokens fed back as prompt rows into their free slot while idle (a chat's "
                                 "next turn then computes only its new question)."),
    "answer_calls_interrupted_total": ("edgemed_batcher_answer_calls_interrupted",
                                       "Idle calls feeding an answer back that an arriving request stopped (their rows "
                                       "are fed again later)."),
    "prefix_host_hits_total": ("edgemed_prefix_cache_host_hits", "Requests that restored a prefix from host RAM."),
    "prefix_host_misses_total": ("edgemed_prefix_cache_host_misses",
                                 "Requests with a prompt long enough to save that reused no prefix of that length "
                                 "from any cache (their own slot, another slot, a running request or host RAM)."),
    "prefix_host_evicted_total": ("edgemed_prefix_cache_host_evictions",
                                  "Host prefix-cache entries evicted for room (least recently used)."),
    "sequences_forked_total": ("edgemed_batcher_forked_sequences",
                               "Choices of n > 1 started from another choice's prompt KV, with no prefill of their own."),
    "decode_steps_total": ("edgemed_decode_steps", "llama_decode calls (one per batcher step)."),
    "adapter_switches_total": ("edgemed_batcher_adapter_switches",
                               "Times the context's adapter set changed between steps (each costs llama.cpp a graph "
                               "re-reserve)."),
    "decode_seconds_total": ("edgemed_decode_seconds", "Seconds the scheduler spent inside llama_decode."),
    "step_seconds_total": ("edgemed_step_seconds", "Seconds of whole batcher steps (llama_decode, sampling, text)."),
    "idle_seconds_total": ("edgemed_idle_seconds", "Seconds the scheduler waited for work."),
    "heap_trims_total": ("edgemed_batcher_heap_trims",
                         "Times the scheduler, going idle, handed freed heap memory back to the OS (malloc_trim)."),
}


class _BatcherCollector:
    def __init__(self, batcher):
        self.batcher = batcher
        self._lock = threading.Lock()
        self._last = (time.monotonic(), 0)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.batcher.stats()
        for key, (name, doc) in GAUGE_STATS.items():
            if key in stats:
                yield GaugeMetricFamily(name, doc, value=float(stats[key]))
        for key, (name, doc) in COUNTER_STATS.items():
            if key in stats:
                yield CounterMetricFamily(name, doc, value=float(stats[key]))
        if "tokens_generated_total" in stats:
            now, total = time.monotonic(), int(stats["tokens_generated_total"])
            with self._lock:
                then, before = self._last
                self._last = (now, total)
            rate = (total - before) / (now - then) if now > then else 0.0
            yield GaugeMetricFamily("edgemed_tokens_per_second",
                                    "Tokens generated per second since the previous scrape.", value=rate)


class Metrics:
    """The app's metrics. ``render()`` gives the Prometheus text exposition."""

    def __init__(self, batcher):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("edgemed_requests", "HTTP requests to the API, by endpoint and status code.",
                                ["endpoint", "code"], registry=self.registry)
        self.prompt_tokens = Counter("edgemed_prompt_tokens", "Prompt tokens of finished requests.", registry=self.registry)
        self.completion_tokens = Counter("edgemed_completion_tokens", "Completion tokens of finished requests.",
                                         registry=self.registry)
        self.ttft = Histogram("edgemed_time_to_first_token_seconds", "From request arrival to the first token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("edgemed_time_per_output_token_seconds", "Mean gap between output tokens of a request.",
                              buckets=TPOT_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("edgemed_queue_wait_seconds", "Time a request waited for a slot.",
                                    buckets=TTFT_BUCKETS, registry=self.registry)
        self.latency = Histogram("edgemed_request_duration_seconds", "Whole request, arrival to last byte.",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.adapter_generations = Counter("edgemed_adapter_generations", "Finished generations, by the LoRA adapter "
                                           "they used (\"\": the base model).", ["adapter"], registry=self.registry)
        self.adapter_tokens = Counter("edgemed_adapter_completion_tokens", "Completion tokens, by the LoRA adapter "
                                      "(\"\": the base model).", ["adapter"], registry=self.registry)
        self.registry.register(_BatcherCollector(batcher))

    def request_done(self, endpoint: str, code: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(code)).inc()
        self.latency.observe(seconds)

    def generation_done(self, finished, adapter: str | None = None) -> None:
        """Observe one ``Finished``: token counts, TTFT, TPOT and queue wait; per ``adapter`` (a served one's name)."""
        self.adapter_generations.labels(adapter or "").inc()
        self.adapter_tokens.labels(adapter or "").inc(finished.completion_tokens)
        if not finished.forked:  # an n > 1 choice that copied the prompt did not compute it: usage counts it once too
            self.prompt_tokens.inc(finished.prompt_tokens)
        self.completion_tokens.inc(finished.completion_tokens)
        self.queue_wait.observe(finished.queue_s)
        if finished.completion_tokens > 0:
            self.ttft.observe(finished.ttft_s)
        if finished.completion_tokens > 1:
            self.tpot.observe((finished.total_s - finished.ttft_s) / (finished.completion_tokens - 1))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
