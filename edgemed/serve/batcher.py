"""Continuous batching on llama.cpp: several requests decoded together, one ``llama_decode`` per step.

One scheduler thread owns the llama context. Each step it builds one batch:
first the next token of every sequence that is generating (logits on), then
prompt chunks of newly admitted sequences up to ``n_batch`` tokens in all
(logits only on a prompt's last token). Sequence id = slot index; each slot has
its own KV stream (``kv_unified = false``) of ``n_ctx_per_slot`` cells, so a
request can never spill into another's context. After the decode each sequence
with logits samples from its own sampler chain (grammar, penalties, greedy or
seeded sampling) and checks its own stop conditions (end-of-generation token,
stop strings, ``max_tokens``). A finished or cancelled sequence leaves before
the next step (its KV cells removed); queued requests join between steps.

Requests arrive from other threads through ``submit``, which never waits for the
model: it tokenizes, checks the context, builds the sampler and queues, or
raises ``Overloaded`` when ``slots + queue_size`` requests are already in flight.
Output goes to a ``Stream`` that can be read blocking (``for``) or from asyncio
(``async for``); its last item is always exactly one ``Finished``.

No prompt or output text is logged: request ids, token counts and timings only.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterator

from edgemed.errors import EdgemedError, InputError, ModelLoadError
from edgemed.runtime.engine import GenerationSettings, LoadSettings, check_fits
from edgemed.runtime.text_stream import TextStream

log = logging.getLogger(__name__)


class Overloaded(EdgemedError):
    """Every slot is busy and the waiting queue is full (the server answers 429 with Retry-After)."""

    def __init__(self, in_flight: int, retry_after: float):
        super().__init__(f"The model is busy: {in_flight} requests are already running or waiting.",
                         f"retry in {retry_after:.0f} s, or start the server with more slots or a longer queue")
        self.retry_after = retry_after


class Closed(EdgemedError):
    """The batcher is not running (not started yet, or shut down)."""


@dataclass(frozen=True)
class Piece:
    """Decoded text, never half a UTF-8 character, never part of a stop string."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The last item of every stream."""

    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float  # submit -> first sampled token (0.0 when none was sampled)
    total_s: float  # submit -> finished
    queue_s: float  # submit -> admitted to a slot
    error: str | None = None  # set when finish_reason is "error" (or a cancel came from shutdown)


class Stream:
    """One request's output: ``Piece`` items then one ``Finished``. Closing the iterator early cancels."""

    def __init__(self, request_id: str, on_cancel):
        self.request_id = request_id
        self._on_cancel = on_cancel
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._wake = None  # set by __aiter__: wakes the event loop, thread-safely
        self.cancelled = False
        self.done = False

    def _put(self, item) -> None:
        with self._cond:
            self._items.append(item)
            self.done = self.done or isinstance(item, Finished)
            self._cond.notify_all()
            wake = self._wake
        if wake is not None:
            wake()

    def cancel(self) -> None:
        """Stop generating (client gone): the slot is freed before the next decode step."""
        if not self.cancelled and not self.done:
            self.cancelled = True
            self._on_cancel()

    def __iter__(self) -> Iterator[Piece | Finished]:
        finished = False
        try:
            while not finished:
                with self._cond:
                    while not self._items:
                        self._cond.wait()
                    item = self._items.popleft()
                finished = isinstance(item, Finished)
                yield item
        finally:
            if not finished:
                self.cancel()

    async def __aiter__(self) -> AsyncIterator[Piece | Finished]:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def wake():
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        with self._cond:
            self._wake = wake
        finished = False
        try:
            while not finished:
                with self._cond:
                    item = self._items.popleft() if self._items else None
                    if item is None:
                        ready.clear()  # under the lock: a later _put's wake() is scheduled after this
                if item is None:
                    await ready.wait()
                    continue
                finished = isinstance(item, Finished)
                yield item
        finally:
            with self._cond:
                self._wake = None
            if not finished:
                self.cancel()


@dataclass(eq=False)
class _Seq:
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
    index: int = -1  # batch row whose logits this sequence samples from
    generated: int = 0
    t_admit: float = 0.0
    t_first: float = 0.0


@dataclass
class _Counters:
    requests_total: int = 0
    overloaded_total: int = 0
    prompt_tokens_total: int = 0
    tokens_generated_total: int = 0
    decode_steps_total: int = 0
    finished: dict = field(default_factory=lambda: collections.Counter())


class Batcher:
    """Continuous batching over one llama.cpp context; see the module docstring.

    ``load.n_ctx`` is the whole KV cache, split evenly over the slots (as llama.cpp's
    server does), so the memory plan made for ``load`` still holds; pass
    ``n_ctx_per_slot`` to size each slot instead (the cache is then ``slots`` times it).
    """

    def __init__(self, model_path: Path, load: LoadSettings, *, slots: int = 4, queue_size: int = 16,
                 n_ctx_per_slot: int | None = None):
        if slots < 1 or queue_size < 0:
            raise InputError(f"slots must be >= 1 and queue_size >= 0 (got {slots}, {queue_size}).",
                             "pass --slots 1 or more and --queue 0 or more")
        self.model_path = Path(model_path)
        self.load = load
        self.slots = slots
        self.queue_size = queue_size
        self.n_ctx_per_slot = n_ctx_per_slot or load.n_ctx // slots
        if self.n_ctx_per_slot < 16:
            raise InputError(f"{slots} slots leave {self.n_ctx_per_slot} tokens of context each.",
                             "use fewer slots or a larger context")
        self._model = self._ctx = self._batch = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._native = threading.Lock()  # request threads use the vocabulary under it; freeing waits for them
        self._queue: collections.deque[_Seq] = collections.deque()
        self._active: list[_Seq] = []
        self._free: list[int] = []
        self._stopping = False
        self._service_s = 1.0  # moving average of a request's time in a slot, for Retry-After
        self._n = _Counters()

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model and start the scheduler thread."""
        from edgemed.runtime.llamacpp import Batch, Context, Model, physical_cores

        if self._thread is not None:
            return
        threads = self.load.n_threads or physical_cores()
        self._model = Model(self.model_path, self.load)
        try:
            self.load = self._model.load  # the host self-test may have chosen safer buffers
            self.n_ctx_per_slot = min(self.n_ctx_per_slot, self._model.n_ctx_train)
            self._ctx = Context(self._model, self.load, n_ctx=self.slots * self.n_ctx_per_slot, n_seq_max=self.slots,
                                kv_unified=False)  # one KV stream per slot: a slot can never use another's cells
            self.n_ctx_per_slot = min(self.n_ctx_per_slot, self._ctx.n_ctx_seq)
            if self._ctx.n_batch < self.slots:
                raise ModelLoadError(f"n_batch {self._ctx.n_batch} is smaller than the {self.slots} slots.",
                                     "raise n_batch or use fewer slots")
            self._batch = Batch(self._model.lib, self._ctx.n_batch)
        except BaseException:
            self._free_native()
            raise
        self._free = list(range(self.slots - 1, -1, -1))
        self._thread = threading.Thread(target=self._run, name="edgemed-batcher", daemon=True)
        self._thread.start()
        log.info("batcher started: %s, %d slots x %d tokens, queue %d, %d threads", self.model_path.name,
                 self.slots, self.n_ctx_per_slot, self.queue_size, threads)

    def close(self) -> None:
        """Stop the scheduler, end every queued and running stream ("cancelled"), free llama.cpp."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        else:
            self._free_native()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    # -- text ------------------------------------------------------------------------------
    def _require_model(self):
        """The loaded model (caller holds ``_native``, so it cannot be freed meanwhile)."""
        if self._model is None or self._model.ptr is None:
            raise Closed("The model is not loaded.", "call Batcher.start() first")
        return self._model

    def render_chat(self, messages: list[dict]) -> str:
        """The prompt the GGUF's own chat template makes of ``messages`` (rendered in a Jinja sandbox)."""
        from edgemed.runtime.chat_template import render

        with self._native:
            model = self._require_model()
            template = model.meta("tokenizer.chat_template")
            bos, eos = model.special_text(model.bos()), model.special_text(model.eos())
        if not template:
            raise ModelLoadError(f"'{self.model_path}' has no chat template.",
                                 "use the completions endpoint, or convert with the tokenizer's chat template")
        return render(template, messages, bos_token=bos, eos_token=eos)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        with self._native:
            return self._require_model().tokenize(text, add_special, parse_special)

    # -- requests ----------------------------------------------------------------------------
    def _check_capacity(self) -> None:
        in_flight = len(self._queue) + len(self._active)
        if in_flight >= self.slots + self.queue_size:
            self._n.overloaded_total += 1
            retry = max(1.0, self._service_s * (1 + len(self._queue)) / self.slots)
            raise Overloaded(in_flight, retry)

    def submit(self, prompt: str | list[int], settings: GenerationSettings, *, request_id: str) -> Stream:
        """Queue a request and return its stream. Thread-safe; never waits for the model.

        Raises ``Overloaded`` (no room), ``ContextOverflow`` (prompt + max_tokens > n_ctx_per_slot),
        ``InputError`` (empty prompt, unknown token ids, a grammar that does not parse), ``Closed``.
        """
        from edgemed.runtime.llamacpp import Detokenizer, SamplerChain

        t_submit = time.perf_counter()
        with self._cond:
            if self._stopping or self._thread is None:
                raise Closed("The model server is not running.", "start it (or wait for the restart) and retry")
            self._check_capacity()
        with self._native:
            model = self._require_model()
            tokens = model.tokenize(prompt, True, True) if isinstance(prompt, str) else [int(t) for t in prompt]
            if not tokens:
                raise InputError("The prompt is empty.", "send at least one token of prompt")
            if any(not 0 <= t < model.n_vocab for t in tokens):
                raise InputError(f"The prompt has token ids outside the vocabulary (0..{model.n_vocab - 1}).",
                                 "tokenize with this model's tokenizer")
            check_fits(len(tokens), settings, self.n_ctx_per_slot)
            sampler = SamplerChain(model, settings)
        stream = Stream(request_id, self._wake)
        seq = _Seq(stream, tokens, settings, sampler, TextStream(Detokenizer(model), settings.stop), t_submit)
        with self._cond:
            try:
                if self._stopping:
                    raise Closed("The model server is shutting down.", "retry when it is back")
                self._check_capacity()
            except EdgemedError:
                sampler.close()
                raise
            self._queue.append(seq)
            self._n.requests_total += 1
            self._cond.notify_all()
        log.debug("request %s queued: %d prompt tokens, max_tokens %d", request_id, len(tokens), settings.max_tokens)
        return stream

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def stats(self) -> dict:
        with self._cond:
            n = self._n
            return {
                "model": self.model_path.name, "slots": self.slots, "n_ctx_per_slot": self.n_ctx_per_slot,
                "queue_size": self.queue_size, "queue_depth": len(self._queue), "active_slots": len(self._active),
                "requests_total": n.requests_total, "overloaded_total": n.overloaded_total,
                "prompt_tokens_total": n.prompt_tokens_total, "tokens_generated_total": n.tokens_generated_total,
                "decode_steps_total": n.decode_steps_total, "finished_total": dict(n.finished),
            }

    # -- scheduler thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._queue or self._active):
                        self._cond.wait()
                    if self._stopping:
                        break
                    self._admit()
                for seq in [s for s in self._active if s.stream.cancelled]:
                    self._finish(seq, "cancelled")
                if self._active:
                    self._step_safely()
        except BaseException:  # a bug in the loop itself: end every stream rather than hang clients
            log.exception("batcher scheduler stopped unexpectedly")
            self._end_all("error", "the model server's scheduler failed; see the server log")
            raise
        finally:
            with self._cond:
                self._stopping = True  # later submits raise Closed instead of waiting forever
            self._end_all("cancelled", "the model server is shutting down")
            self._free_native()

    def _admit(self) -> None:
        """Move queued requests into free slots (caller holds the lock)."""
        now = time.perf_counter()
        while self._queue and (self._free or self._queue[0].stream.cancelled):
            seq = self._queue.popleft()
            if seq.stream.cancelled:
                self._end(seq, "cancelled", now)
                continue
            seq.slot, seq.t_admit = self._free.pop(), now
            self._active.append(seq)
            log.debug("request %s admitted to slot %d after %.3f s", seq.stream.request_id, seq.slot,
                      now - seq.t_submit)

    def _step_safely(self) -> None:
        try:
            self._step()
        except Exception as exc:  # noqa: BLE001 - end the affected streams, keep serving
            log.exception("decode step failed; ending the %d running requests", len(self._active))
            for seq in list(self._active):
                self._finish(seq, "error", f"generation failed: {type(exc).__name__}: {exc}")

    def _step(self) -> None:
        batch, ctx = self._batch, self._ctx
        batch.clear()
        sampling: list[_Seq] = []
        for seq in self._active:  # one token per generating sequence
            if seq.pending is not None:
                seq.index = batch.add(seq.pending, seq.pos, seq.slot, True)
                seq.pos, seq.pending = seq.pos + 1, None
                sampling.append(seq)
        for seq in self._active:  # prompt chunks in arrival order, while room is left
            room = batch.capacity - batch.n
            if seq.pos >= len(seq.tokens) or room <= 0:
                continue
            end = min(len(seq.tokens), seq.pos + room)
            for p in range(seq.pos, end):
                seq.index = batch.add(seq.tokens[p], p, seq.slot, p == len(seq.tokens) - 1)
            self._n.prompt_tokens_total += end - seq.pos
            seq.pos = end
            if end == len(seq.tokens):
                sampling.append(seq)
        rc = ctx.decode(batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {batch.n} tokens")
        now = time.perf_counter()
        with self._cond:
            self._n.decode_steps_total += 1
        for seq in sampling:
            self._take(seq, seq.sampler.sample(ctx, seq.index), now)

    def _take(self, seq: _Seq, token: int, now: float) -> None:
        """Handle one sampled token: emit text, or finish on EOG / stop string / max_tokens."""
        if not seq.generated:
            seq.t_first = now
        if self._model.is_eog(token):
            self._finish(seq, "stop")
            return
        seq.generated += 1
        self._n.tokens_generated_total += 1  # written by this thread only; stats() reads it live
        text = seq.text.push(token)
        if text:
            seq.stream._put(Piece(text))
        if seq.text.stopped:
            self._finish(seq, "stop")
        elif seq.generated >= seq.settings.max_tokens or seq.pos >= self.n_ctx_per_slot:
            self._finish(seq, "length")
        else:
            seq.pending = token

    def _finish(self, seq: _Seq, reason: str, error: str | None = None) -> None:
        """End a running sequence and free its slot (KV cells, sampler)."""
        if reason in ("stop", "length"):
            rest = seq.text.flush()
            if rest:
                seq.stream._put(Piece(rest))
        self._ctx.drop(seq.slot)
        with self._cond:
            self._active.remove(seq)
            self._free.append(seq.slot)
            self._service_s = 0.8 * self._service_s + 0.2 * (time.perf_counter() - seq.t_admit)
            self._end(seq, reason, time.perf_counter(), error)

    def _end(self, seq: _Seq, reason: str, now: float, error: str | None = None) -> None:
        """Close a request's sampler and send its ``Finished`` (caller holds the lock)."""
        if seq.sampler is not None:
            seq.sampler.close()
            seq.sampler = None
        self._n.finished[reason] += 1
        admitted = seq.t_admit or now
        seq.stream._put(Finished(
            finish_reason=reason, prompt_tokens=len(seq.tokens), completion_tokens=seq.generated,
            ttft_s=(seq.t_first - seq.t_submit) if seq.t_first else 0.0, total_s=now - seq.t_submit,
            queue_s=admitted - seq.t_submit, error=error))
        log.info("request %s %s: %d prompt + %d completion tokens, %.3f s", seq.stream.request_id, reason,
                 len(seq.tokens), seq.generated, now - seq.t_submit)

    def _end_all(self, reason: str, error: str) -> None:
        with self._cond:
            now = time.perf_counter()
            for seq in list(self._active) + list(self._queue):
                if self._ctx is not None and seq.slot >= 0:
                    self._ctx.drop(seq.slot)
                self._end(seq, reason, now, error)
            self._active.clear()
            self._queue.clear()

    def _free_native(self) -> None:
        with self._native:
            for name in ("_batch", "_ctx", "_model"):  # the context before its model
                obj = getattr(self, name)
                if obj is not None:
                    obj.close()
                    setattr(self, name, None)
