"""A served reasoning cap (``edgemed serve --think-cap N``, a request's ``think_cap``): ``run --think cap:N``'s policy
(``session.replies``) over the batcher, as one stream.

The thought is asked for with at most N tokens, stopping at ``</think>``; a thought that was capped or closed is closed
with ``session.THOUGHT_CLOSING`` and the answer is asked for in a second ``Batcher.submit`` whose prompt is the first
prompt + the thought + that closing (its prompt KV is the first call's, found in the slot or the prefix cache). The
client reads one ``Stream``: every piece of the calls kept, the closing between them, then one ``Finished``: the
answer's finish reason, the first call's prompt and cached tokens, the kept calls' completion tokens summed. The answer
gets what the thought left of ``max_tokens``. A model that writes no ``<think>`` answers in one call.

``session.replies`` drives the calls from a thread of its own per choice (it reads each call's stream blocking, as it
reads an engine's); cancelling the outer stream cancels the call in flight and makes no further one.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

from edgemed.errors import Closed, ContextOverflow, EdgemedError
from edgemed.runtime.batch.options import Extras
from edgemed.runtime.batch.stream import Finished, Piece, Stream
from edgemed.runtime.engine import Finish, GenerationSettings
from edgemed.runtime.session import opening_settings, replies
from edgemed.serve.api import ApiError
from edgemed.templates.think import ThinkPolicy

log = logging.getLogger(__name__)

class Ended(Exception):
    """A call ended neither by stop nor length (cancelled, failed, its grammar refused): the reply ends with it."""

    def __init__(self, finished: Finished):
        super().__init__(finished.finish_reason)
        self.finished = finished


class BatcherCalls:
    """The batcher as ``session.replies``' engine for one choice: each ``complete`` is one ``submit_n`` of one choice.

    ``opening``: the first call, queued by the request before the reply is read (so its refusals are the request's
    400 or 429); ``complete`` takes it when asked for the same prompt and settings, and cancels it otherwise. The
    answer's ``max_tokens`` is what the kept calls left of ``budget``, and what its prompt leaves of a slot's context.
    """

    def __init__(self, batcher, request_id: str, prompt: str, tokens: list[int], budget: int,
                 opening: tuple[GenerationSettings, Stream], extras: Extras, more: dict):
        self.batcher, self.request_id, self.extras, self.more = batcher, request_id, extras, more
        self.budget = budget
        self._opening = (prompt, *opening)
        self._first_prompt, self._first_tokens = prompt, tokens
        self._lock = threading.Lock()
        self._current: Stream | None = opening[1]
        self._weights = opening[1].adapter  # the adapter weights the request is bound to (its audit record's)
        self.cancelled = False
        self.kept: list[Finished] = []  # the calls whose text the client gets
        self.pending: list = []  # log probabilities of pieces not yet handed on

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            stream = self._current
        if stream is not None:
            stream.cancel()

    def _stream(self, prompt: str, settings: GenerationSettings) -> Stream | None:
        taken, self._opening = self._opening, None
        if taken is not None:
            if (taken[0], taken[1]) == (prompt, settings):
                return taken[2]
            taken[2].cancel()
        try:
            source = self._first_tokens if prompt == self._first_prompt else self.batcher.tokenize(prompt)
        except ContextOverflow:  # the thought filled the context: no room is left for an answer
            return None
        room = self.batcher.n_ctx_per_slot - len(source)
        left = min(self.budget - sum(f.completion_tokens for f in self.kept), room)
        if left < 1:
            return None
        settings = replace(settings, max_tokens=min(settings.max_tokens, left))
        with self._lock:
            if self.cancelled:
                raise Ended(Finished("cancelled", 0, 0, 0.0, 0.0, 0.0))
        # the request keeps the place its opening call held (``held``): a queue filled meanwhile by other requests
        # does not turn it away halfway, after its thought
        stream = self.batcher.submit_n(source, settings, request_id=self.request_id, extras=self.extras, held=True,
                                       **self.more)[0]
        with self._lock:
            self._current = stream
            if self.cancelled:
                stream.cancel()
        if stream.adapter != self._weights:  # the request's adapter was removed and added again with another file
            stream.cancel()
            raise EdgemedError(f"The adapter '{self.more.get('adapter')}' was replaced while this request was "
                               "thinking: its answer would come from other weights than its thought and than its "
                               "audit record names", "send the request again")
        return stream

    def complete(self, prompt: str, settings: GenerationSettings):
        stream = self._stream(prompt, settings)
        if stream is None:  # the thought took all of max_tokens (or of the context): the answer is cut at once
            self.kept.append(Finished("length", 0, 0, 0.0, 0.0, 0.0))
            return Finish("length", 0)
        done = False
        try:
            for item in stream:
                if isinstance(item, Finished):
                    done = True
                    self.kept.append(item)
                    if item.finish_reason not in ("stop", "length"):
                        raise Ended(item)
                    return Finish(item.finish_reason, item.completion_tokens)
                self.pending.extend(item.logprobs)
                yield item.text
        finally:
            if not done:  # dropped by ``replies`` (a start the model did not go on with): none of it was handed on
                stream.cancel()
                self.pending.clear()


def run(calls: BatcherCalls, outer: Stream, prompt: str, settings: GenerationSettings, cap: int,
        t_submit: float, forked: bool = False) -> None:
    """Drive ``session.replies`` and put its text on ``outer``, then the one ``Finished`` (in a thread of its own);
    ``forked``: a choice after the first of n, whose prompt the request's usage counts once (the first's)."""
    ttft = 0.0
    ended: Finished | None = None
    try:
        for text in replies(calls, prompt, settings, ThinkPolicy(cap=cap)):
            ttft = ttft or (time.perf_counter() - t_submit if text else 0.0)
            logprobs, calls.pending = tuple(calls.pending), []
            outer._put(Piece(text, logprobs))
        ended = calls.kept[-1]
    except Ended as exc:
        ended = exc.finished
    except Closed as exc:  # the server stopped between the thought and its answer: a 503 to retry, as a cancel
        ended = Finished("cancelled", 0, 0, 0.0, 0.0, 0.0, error=exc.problem)
    except EdgemedError as exc:  # the answer's call could not be queued (its adapter no longer served, its grammar
        # refused by the probe): the answer ends as a failed generation, saying why
        ended = Finished("error", 0, 0, 0.0, 0.0, 0.0, error=exc.problem, fix=exc.fix)
    except Exception as exc:  # a bug: the reply ends as a failed generation, not a stream that never ends
        log.exception("request %s: the reasoning cap's calls failed", outer.request_id)
        ended = Finished("error", 0, 0, 0.0, 0.0, 0.0, error=f"{type(exc).__name__} while answering after the thought")
    first = calls.kept[0] if calls.kept else ended
    outer._put(replace(ended, prompt_tokens=first.prompt_tokens, cached_tokens=first.cached_tokens,
                       completion_tokens=sum(f.completion_tokens for f in calls.kept if f is not ended)
                       + ended.completion_tokens,
                       ttft_s=ttft, queue_s=first.queue_s, total_s=time.perf_counter() - t_submit, forked=forked))


def cap_for(config, body) -> int | None:
    """The reasoning cap of a request: its ``think_cap``, else the server's ``--think-cap``; None: no cap (and for
    completions, whose prompt is the client's own text). A ``think_cap`` above the request's ``max_tokens`` (or, when
    it names none, the server's default) is a 400; the server's is lowered to it, as ``run --think cap:N`` is."""
    if not hasattr(body, "messages"):
        return None
    cap = getattr(body, "think_cap", None)
    if cap is None:
        return config.think_cap
    limit = config.max_tokens_limit or config.default_max_tokens
    asked = body.requested_max_tokens() or min(config.default_max_tokens, limit)
    if cap > asked:
        field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        raise ApiError(400, f"think_cap {cap} is above this request's {field} of {asked}: the thought and the answer "
                            f"share those tokens. Fix: send think_cap {asked} or less, or a larger {field}.",
                       param="think_cap", code="think_cap_too_large")
    return cap


def submit_capped(batcher, prompt: str, cap: int, tokens: list[int], settings: GenerationSettings, *,
                  request_id: str, extras: Extras, **more) -> list[Stream]:
    """``Batcher.submit_n`` for a request with a reasoning cap: one stream per choice (choice i samples with seed + i),
    each answered by ``session.replies`` with ``think cap:cap``. The opening calls are one ``submit_n`` of every choice
    (one prefill, the others copy its KV, as without a cap; its refusals raise); the rest runs in a thread per choice.
    Choices after the first are ``forked``: the request's usage counts its prompt once, as without a cap."""
    t_submit = time.perf_counter()
    if settings.grammar or settings.json_schema:  # the answer's constraint, refused now if the probe refuses it
        batcher.check_grammar(settings)
    policy = ThinkPolicy(cap=cap)
    # the batcher samples choice i with seed + i: its opening is ``opening_settings`` of that choice's own settings
    owns = [settings if i == 0 else replace(settings, seed=settings.seed + i) for i in range(extras.n)]
    streams = batcher.submit_n(tokens, opening_settings(prompt, settings, policy), request_id=request_id,
                               extras=extras, **more)
    one = replace(extras, n=1)
    outers = []
    for i, (own, stream) in enumerate(zip(owns, streams)):
        calls = BatcherCalls(batcher, request_id, prompt, tokens, own.max_tokens,
                             (opening_settings(prompt, own, policy), stream), one, more)
        outer = Stream(request_id, calls.cancel, stream.adapter)
        threading.Thread(target=run, args=(calls, outer, prompt, own, cap, t_submit, i > 0), daemon=True,
                         name=f"think-cap-{request_id}").start()
        outers.append(outer)
    return outers
