"""A request's output as the batcher hands it over: ``Piece`` items, then exactly one ``Finished``.

``Stream`` is written by the scheduler thread and read by a request thread (``for``, blocking on a
condition) or by asyncio (``async for``, woken through ``loop.call_soon_threadsafe``; no polling).
Closing the iterator early (the client went away) cancels the request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Iterator


@dataclass(frozen=True)
class Piece:
    """Decoded text, never half a UTF-8 character, never part of a stop string; with the log probabilities
    (``options.TokenLogprob``) of the tokens it ends, when the request asked for them. ``prompt``: the one
    piece (no text) carrying the prompt tokens' log probabilities (echo), before any output."""

    text: str
    logprobs: tuple = ()
    prompt: bool = False


@dataclass(frozen=True)
class Finished:
    """The last item of every stream."""

    finish_reason: str  # "stop" | "length" | "cancelled" | "error" | "refused" (its constraints allow no token)
    #                     | "costly" (its grammar took too long for one token)
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float  # submit -> first sampled token (0.0 when none was sampled)
    total_s: float  # submit -> finished
    queue_s: float  # submit -> admitted to a slot
    error: str | None = None  # set when finish_reason is "error", "refused" or "costly" (or a cancel came from shutdown)
    fix: str | None = None  # with "refused" and "costly" (the request's own doing): what the request changes
    cached_tokens: int = 0  # prompt tokens whose KV the slot already held (not fed to llama.cpp again)
    forked: bool = False  # one of n > 1 choices that copied another's prompt KV: its prompt was not computed


class Stream:
    """One request's output: ``Piece`` items then one ``Finished``. Closing the iterator early cancels."""

    def __init__(self, request_id: str, on_cancel, adapter: dict | None = None):
        self.request_id = request_id
        #: the served adapter it is generated under, as the batcher bound it (name, sha256, scale); None: the base
        self.adapter = adapter
        self._on_cancel = on_cancel
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._wake = None  # set by ``notify``: wakes the event loop, thread-safely
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

    def poll(self) -> Piece | Finished | None:
        """The next item if one is there, else None (never blocks)."""
        with self._cond:
            return self._items.popleft() if self._items else None

    def notify(self, wake) -> None:
        """Call ``wake()`` (from the scheduler thread) whenever an item arrives. One listener at a time: the
        latest reader's."""
        with self._cond:
            self._wake = wake

    def forget(self, wake) -> None:
        """Stop calling ``wake`` (and only it: a reader closed late does not silence the one after it)."""
        with self._cond:
            if self._wake is wake:
                self._wake = None

    async def __aiter__(self) -> AsyncIterator[Piece | Finished]:
        async with contextlib.aclosing(merged([self])) as items:  # closed with this one: a cancel at once
            async for _, item in items:
                yield item


def waker(loop: asyncio.AbstractEventLoop, event: asyncio.Event):
    """A function any thread may call to set ``event`` on ``loop`` (a no-op once the loop is closed)."""
    def wake():
        try:
            loop.call_soon_threadsafe(event.set)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass
    return wake


async def merged(streams) -> AsyncIterator[tuple[int, Piece | Finished]]:
    """``(index, item)`` from every stream in ``streams`` as items arrive, until each has given its ``Finished``.
    Items are taken from a stream only when they are handed on, so one left unread when the caller stops (the
    client went away) is still there for a later reader: ``Finished`` included, with its token counts for the
    audit. Stopping early cancels the streams not finished."""
    ready = asyncio.Event()
    wake = waker(asyncio.get_running_loop(), ready)
    left = list(range(len(streams)))
    for stream in streams:
        stream.notify(wake)
    try:
        while left:
            ready.clear()  # before polling: an item put after a poll found nothing sets it again
            got = False
            for i in list(left):
                item = streams[i].poll()
                if item is None:
                    continue
                got = True
                if isinstance(item, Finished):
                    left.remove(i)
                yield i, item
            if not got:
                await ready.wait()
    finally:
        for stream in streams:
            stream.forget(wake)
        for i in left:
            streams[i].cancel()
