"""A request's output as the server reads it (``runtime.batch.stream``): several choices read together, items
taken only when handed on, a reader that stops early cancels at once and leaves what it did not read (the
``Finished`` with its token counts, for the audit) to the next reader. No model: items are put as the batcher's
thread puts them."""

from __future__ import annotations

import asyncio
import threading

from edgemed.runtime.batch.stream import Finished, Piece, Stream, merged


def finished(reason="stop", tokens=1) -> Finished:
    return Finished(finish_reason=reason, prompt_tokens=3, completion_tokens=tokens, ttft_s=0.0, total_s=0.0, queue_s=0.0)


def stream(name="r") -> tuple[Stream, list]:
    cancels = []
    return Stream(name, lambda: cancels.append(name)), cancels


def test_two_choices_are_read_as_their_items_arrive_from_another_thread():
    (a, _), (b, _) = stream("a"), stream("b")

    def scheduler():  # the batcher's thread, interleaving two choices
        for i in range(20):
            (a if i % 2 else b)._put(Piece(f"{i} "))
        a._put(finished(tokens=10))
        b._put(finished(tokens=10))

    async def read():
        got = {0: [], 1: []}
        threading.Thread(target=scheduler).start()
        async for i, item in merged([a, b]):
            got[i].append(item)
        return got

    got = asyncio.run(asyncio.wait_for(read(), 10))
    assert [p.text for p in got[0][:-1]] == [f"{i} " for i in range(1, 20, 2)]
    assert [p.text for p in got[1][:-1]] == [f"{i} " for i in range(0, 20, 2)]
    assert all(isinstance(items[-1], Finished) for items in got.values())


def test_a_reader_that_stops_early_cancels_and_leaves_the_rest_for_the_next():
    """The server's stream left by its client: the first reader is closed mid-stream; the batcher then ends the
    choices (their ``Finished`` carry the token counts), and the drain reads them, none lost to the closed reader."""
    (a, ca), (b, cb) = stream("a"), stream("b")

    async def run():
        a._put(Piece("x"))
        b._put(Piece("y"))
        reader = merged([a, b])
        first = await reader.__anext__()
        await reader.aclose()                                   # the client went away after one piece
        assert ca == ["a"] and cb == ["b"] and a.cancelled and b.cancelled
        a._put(finished("cancelled", 5))                        # the batcher ends both before its next step
        b._put(finished("cancelled", 7))
        rest = [item for s in (a, b) async for item in s]
        return first, rest

    first, rest = asyncio.run(asyncio.wait_for(run(), 10))
    assert first == (0, Piece("x"))
    assert rest == [finished("cancelled", 5), Piece("y"), finished("cancelled", 7)]


def test_closing_a_streams_iterator_cancels_at_once():
    s, cancels = stream()

    async def run():
        s._put(Piece("x"))
        it = s.__aiter__()
        assert await it.__anext__() == Piece("x")
        await it.aclose()
        return list(cancels)                                    # before the loop turns again

    assert asyncio.run(run()) == ["r"] and s.cancelled


def test_a_late_closed_reader_does_not_silence_the_next_one():
    """The first reader's clean-up runs after the second reader started waiting: the second is still woken."""
    s, _ = stream()

    async def run():
        first = merged([s])
        waiting = asyncio.ensure_future(first.__anext__())
        await asyncio.sleep(0)                                  # the first reader waits for an item
        second = asyncio.ensure_future(s.__aiter__().__anext__())
        await asyncio.sleep(0)                                  # the second waits too, its wake the one set now
        waiting.cancel()                                        # the first gives up late
        await asyncio.sleep(0)
        threading.Thread(target=lambda: s._put(Piece("z"))).start()
        return await asyncio.wait_for(second, 5)

    assert asyncio.run(run()) == Piece("z")
