"""What the batcher keeps of each request and of itself: a request's scheduler-side state (``Seq``) and
how it ends (its sampler closed, one ``Finished`` with its counts and times sent, one log line), and
the batcher's running counters (``Counters``, read by ``Batcher.stats()`` and the metrics).

No prompt or output text is logged: ids, counts, timings only.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field

from edgemed.runtime.engine import GenerationSettings
from edgemed.runtime.text_stream import TextStream
from edgemed.runtime.batch.options import Extras
from edgemed.runtime.batch.stream import Finished, Stream

log = logging.getLogger("edgemed.runtime.batch.batcher")  # one logger for the scheduler's lines, as before the split


@dataclass(eq=False)
class Seq:
    """Scheduler-side state of one request (touched by the scheduler thread only, after submit)."""

    stream: Stream
    tokens: list[int]
    settings: GenerationSettings
    sampler: object
    text: TextStream
    t_submit: float
    slot: int = -1
    pos: int = 0  # tokens of this sequence in the KV cache
    pending: int | None = None  # sampled token still to be fed
    cached: int = 0  # prompt tokens not computed: their KV came from a cache (prefix reuse)
    cached_from: str = "slot"  # where those came from: "slot" (its own), "copied" (another slot), "host"
    donor: "Seq | None" = None  # a request computing the same prompt prefix now, which this one waits for
    share: int = 0  # with a donor: the prefix length it copies from it
    index: int = -1  # batch row whose logits this sequence samples from
    generated: int = 0
    t_admit: float = 0.0
    t_first: float = 0.0
    extras: Extras = field(default_factory=Extras)
    leader: "Seq | None" = None  # n > 1: the choice whose prompt KV this one copies (it computes no prompt)
    followers: list = field(default_factory=list)  # n > 1, on the leader: the choices waiting for its prompt
    logprobs: list = field(default_factory=list)  # entries of sampled tokens whose text is not out yet
    sampled: list = field(default_factory=list)  # every sampled token id, the end-of-generation one included
    prompt_logprobs: list = field(default_factory=list)  # echo: entries of prompt tokens computed so far
    adapter: object = None  # batcher._Loaded this request generates with (None: the base); released at its end
    scope: object = None  # who may reuse this request's prompt KV (``Batcher.submit_n``): None, everyone

    @property
    def waiting(self) -> bool:
        """A follower whose leader has not finished its prompt yet: nothing of its own to compute."""
        return (self.leader is not None and self.pos == 0) or self.donor is not None

    @property
    def reading(self) -> bool:
        """Prompt tokens left to feed now (not waiting for another request's prefix)."""
        return self.pos < len(self.tokens) and not self.waiting

    @property
    def computed(self) -> int:
        """The prompt tokens this request feeds itself: its prompt less what came from a cache."""
        return len(self.tokens) - self.cached

    def held(self) -> list[int]:
        """The prompt token ids whose KV this sequence computed in its slot (positions 0..n-1), the part a
        later request may reuse. Not the sampled tokens after them: those are decoded one row at a time,
        through llama.cpp's one-row kernels, and their KV differs from the same ids fed as a prompt enough
        to change a later greedy answer (a cold run feeds them as prompt)."""
        return self.tokens[:self.pos]

    def end(self, reason: str, now: float, error: str | None = None, fix: str | None = None) -> None:
        """Close the sampler and send this request's ``Finished`` (the caller holds the batcher's lock)."""
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
        admitted = self.t_admit or now
        self.stream._put(Finished(
            finish_reason=reason, prompt_tokens=len(self.tokens), completion_tokens=self.generated,
            ttft_s=(self.t_first - self.t_submit) if self.t_first else 0.0, total_s=now - self.t_submit,
            queue_s=admitted - self.t_submit, error=error, fix=fix, cached_tokens=self.cached,
            forked=self.leader is not None))
        log.info("request %s %s: %d prompt (%d cached) + %d completion tokens, %.3f s", self.stream.request_id,
                 reason, len(self.tokens), self.cached, self.generated, now - self.t_submit)


@dataclass
class Counters:
    """The batcher's totals since start (``stats()`` keys of the same names)."""

    requests_total: int = 0
    overloaded_total: int = 0
    prompt_tokens_total: int = 0  # fed to llama.cpp (computed)
    prompt_tokens_cached_total: int = 0  # found in a cache instead (prefix reuse), wherever from
    cached: dict = field(default_factory=lambda: collections.Counter())  # of those, by source (Seq.cached_from)
    tokens_generated_total: int = 0
    answer_tokens_kept_total: int = 0  # answers' tokens fed as prompt into their free slot while idle (``Batcher``)
    answer_calls_interrupted_total: int = 0  # of those idle calls, given up because a request arrived
    sequences_forked_total: int = 0  # n > 1 choices started from another's prompt KV (no prefill of their own)
    decode_steps_total: int = 0
    adapter_switches_total: int = 0  # adapter set changes on the context (``Batcher._use``)
    decode_seconds_total: float = 0.0  # inside llama_decode
    step_seconds_total: float = 0.0  # whole steps: batch building, llama_decode, sampling, text, hand-over
    idle_seconds_total: float = 0.0  # scheduler waiting for work (a wait in progress: ``idle_since``)
    idle_since: float | None = None  # perf_counter() when the scheduler's current wait began; None while it works
    heap_trims_total: int = 0  # idle moments that handed freed heap pages back to the OS (``runtime.heap``)
    finished: dict = field(default_factory=lambda: collections.Counter())

    def totals(self) -> dict:
        """The counters as ``stats()`` reports them (``finished`` as ``finished_total``, a plain dict). The idle
        seconds include a wait still in progress, so two readings around a run count only the idle time between
        them (counted at the wait's end, a wait that began long before the first reading fell into the run)."""
        idle = self.idle_seconds_total
        if self.idle_since is not None:
            idle += max(time.perf_counter() - self.idle_since, 0.0)
        return {"requests_total": self.requests_total, "overloaded_total": self.overloaded_total,
                "prompt_tokens_total": self.prompt_tokens_total,
                "prompt_tokens_cached_total": self.prompt_tokens_cached_total,
                "prompt_tokens_cached_slot_total": self.cached["slot"],
                "prompt_tokens_cached_copied_total": self.cached["copied"],
                "prompt_tokens_cached_host_total": self.cached["host"],
                "tokens_generated_total": self.tokens_generated_total,
                "answer_tokens_kept_total": self.answer_tokens_kept_total,
                "answer_calls_interrupted_total": self.answer_calls_interrupted_total,
                "sequences_forked_total": self.sequences_forked_total,
                "decode_steps_total": self.decode_steps_total, "adapter_switches_total": self.adapter_switches_total,
                "finished_total": dict(self.finished),
                "decode_seconds_total": self.decode_seconds_total, "step_seconds_total": self.step_seconds_total,
                "idle_seconds_total": idle, "heap_trims_total": self.heap_trims_total}
