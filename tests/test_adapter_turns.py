"""Which adapter group decodes each step when requests under several adapters run (``Batcher._next_group``).

llama.cpp applies an adapter set to a whole context and re-plans its graph on each change, so groups take the
context in turns of ``adapter_turn`` steps, round robin. No model is loaded: the rotation is
plain bookkeeping over the groups a step sees.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from edgemed.errors import InputError
from edgemed.runtime.batch.batcher import ADAPTER_TURN, Batcher
from edgemed.runtime.engine import LoadSettings


def batcher(turn: int) -> Batcher:
    return Batcher("unused.gguf", LoadSettings(n_ctx=256), slots=4, adapter_turn=turn)


def seq(reading: bool = False) -> SimpleNamespace:
    """A sequence as ``_next_group`` sees it: generating (its prompt read), or with prompt tokens still to feed."""
    return SimpleNamespace(reading=reading)


def run(b: Batcher, groups_per_step: list[list[str]]) -> list[str]:
    """The group chosen at each step, for the groups present at that step (in order of first request); a key
    ending in ``*`` is a group with a prompt to read at that step."""
    chosen = []
    for keys in groups_per_step:
        pick = b._next_group({k if k is None else k.rstrip("*"): [seq(k is not None and k.endswith("*"))]
                              for k in keys})
        chosen.append(pick)
    return chosen


def test_groups_take_turns_of_adapter_turn_steps_in_order():
    b = batcher(2)
    assert run(b, [["a", "b", "c"]] * 8) == ["a", "a", "b", "b", "c", "c", "a", "a"]


def test_turn_one_is_every_group_every_step():
    b = batcher(1)
    assert run(b, [[None, "x"]] * 4) == [None, "x", None, "x"]


def test_a_new_group_queues_behind_the_groups_already_waiting():
    b = batcher(2)
    # a, b and c rotate; d arrives during b's turn: it queues behind c and a (waiting since before) and b (whose
    # turn began before d came), then everyone waits three turns
    steps = [["a", "b", "c"]] * 3 + [["a", "b", "c", "d"]] * 13
    assert run(b, steps) == ["a", "a", "b", "b", "c", "c", "a", "a", "b", "b", "d", "d", "c", "c", "a", "a"]


def test_a_lone_group_runs_every_step_and_a_newcomer_takes_the_next_turn():
    b = batcher(3)
    assert run(b, [["a"]] * 5 + [["a", "b"]] * 4) == ["a"] * 5 + ["b", "b", "b", "a"]


def test_a_group_that_ends_mid_turn_hands_over_at_once():
    b = batcher(4)
    assert run(b, [["a", "b"]] * 2 + [["b"]] + [["b", "c"]] * 5) == ["a", "a", "b", "b", "b", "b", "c", "c"]


def test_a_prompt_to_read_ends_the_turn_and_goes_first():
    b = batcher(8)
    # a holds the context; c's request arrives (its prompt to read) at a's third step: a keeps half its turn, then c
    # goes before b, and the round robin goes on
    steps = [["a", "b", "c"]] * 2 + [["a", "b", "c*"]] * 3 + [["a", "b", "c"]] * 9
    assert run(b, steps) == ["a"] * 4 + ["c"] * 8 + ["b", "b"]
    # neighbours that always have a prompt to read cut a group's turn to half, never to one step
    b = batcher(8)
    assert run(b, [["a", "b"]] + [["a", "b*"]] * 9) == ["a"] * 4 + ["b"] * 6
    # the holder reading a prompt of its own keeps its turn
    b = batcher(3)
    assert run(b, [["a*", "b*"]] * 4) == ["a", "a", "a", "b"]


def test_adapter_turn_must_be_positive():
    assert ADAPTER_TURN >= 1
    with pytest.raises(InputError, match="adapter_turn"):
        batcher(0)


def test_requests_admitted_together_take_one_run_of_slots_per_adapter():
    """llama.cpp puts only consecutive sequence ids in one ubatch (one KV stream per slot): a group in slots 0 and 2
    would read the weights twice a step. Arrivals a, b, a, b take slots 0, 1 (a) and 2, 3 (b)."""
    b = batcher(16)
    b._free = [3, 2, 1, 0]  # as start() leaves them
    b._reuse = lambda seq: None  # no prefix cache in this bookkeeping test
    adapter = {name: SimpleNamespace(key=name) for name in "ab"}
    queued = [SimpleNamespace(adapter=adapter[k], scope=None, followers=[], stream=SimpleNamespace(cancelled=False, request_id=i),
                              t_submit=0.0, cached=0, extras=SimpleNamespace(prompt_logprobs=False), tokens=[1, 2, 3])
              for i, k in enumerate("abab")]
    b._queue.extend(queued)
    b._admit()
    slots = {k: sorted(q.slot for q in queued if q.adapter.key == k) for k in "ab"}
    assert slots == {"a": [0, 1], "b": [2, 3]}
    assert [q.adapter.key for q in b._active] == ["a", "a", "b", "b"]  # groups in order of their first request


def test_a_new_request_joins_its_groups_run_of_slots():
    from edgemed.runtime.batch.batcher import _runs

    assert (_runs({0, 1, 3}), _runs({0, 2}), _runs(set()), _runs({2})) == (2, 2, 0, 1)
    b = batcher(16)
    b._free = [3, 2, 1, 0]
    b._reuse = lambda seq: None
    running = SimpleNamespace(adapter=None, slot=2)
    b._active.append(running)
    b._free.remove(2)
    new = SimpleNamespace(adapter=None, scope=None, followers=[], stream=SimpleNamespace(cancelled=False, request_id="n"),
                          t_submit=0.0, cached=0, extras=SimpleNamespace(prompt_logprobs=False), tokens=[1, 2, 3])
    b._queue.append(new)
    b._admit()
    assert new.slot == 1  # next to slot 2 (one run), not slot 0 (the lowest, two runs)
