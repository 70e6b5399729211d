"""Chunked prefill: how many prompt tokens one batcher step may take without stalling the running streams.

A step that carries a prompt chunk next to generating sequences lasts as long as a plain decode
step plus the chunk's own ``llama_decode``, and every running stream waits for it. So while anyone is generating,
the chunk is sized from two moving averages measured on this host and model: the seconds of a
plain decode step, and the extra seconds one prompt token adds to a step. The chunk keeps a step
within ``1 + STALL_BUDGET`` plain steps (the goal: inter-token time grows at most 2x during a long
prefill). With nobody generating, a prompt takes the whole batch (nobody waits on the step).
A fixed chunk (``Batcher(prefill_chunk=N)``) skips the measurement.
"""

from __future__ import annotations

#: While sequences are generating, a step may take at most (1 + STALL_BUDGET) x a plain decode step.
STALL_BUDGET = 0.7
#: Prompt tokens per step while others generate, before the step costs are measured.
PREFILL_FIRST = 32
#: Prompts up to this many tokens go in one step, as llama-server feeds them: chunking short ones costs
#: throughput (their slots idle longer) for stalls of well under a second; long prompts are chunked.
WHOLE_PROMPT = 128
#: The smallest chunk ever given while others generate. On a compute-bound CPU a prompt token costs a
#: sixth to a tenth of a 3-row decode step (Qwen2.5-0.5B Q4_K_M, 1 thread): a floor of 16 gave 2.8x, and at
#: 2 threads a floor of 4 still 2.0x (1.5B: 2.1x), the chunk's own call costing nearly half a decode step.
PREFILL_MIN = 2


def chunk_of(remaining: int, budget: int, whole: int, prompt: int = 1 << 30) -> int:
    """Prompt tokens to feed now. Never a one-token piece of a longer prompt (unless the step's budget is
    one): llama.cpp attends a single row with other kernels than several, so such a piece would make the
    prompt's KV differ from a run alone, and batched greedy text with it.
    """
    if prompt <= WHOLE_PROMPT and budget > 0:  # ``prompt``: the whole prompt's length
        return remaining
    take = min(remaining, budget)
    if take < remaining and remaining - take == 1 and take > 2:
        take -= 1  # leave two for the next step rather than one
    if take == 1 < remaining and whole > 1:
        return 0
    return take


def equal_pieces(takes: list[tuple[object, int]]) -> list[list[tuple[object, int]]]:
    """Cut the prompt tokens a step feeds (``(sequence, tokens)`` in slot order) into ``llama_decode`` calls
    whose sequences all get the same number of tokens, never leaving a single token behind.

    With a KV stream per slot llama.cpp computes a call as ubatches of equal tokens per sequence, so prompts
    of equal pieces share one pass over the weights (four 70-token prompts: 228 tok/s against 133 one by one,
    Qwen2.5-0.5B Q4_K_M, 2 threads, llama-batched-bench) where unequal ones would be carved up by llama.cpp
    into pieces of any size, one-token ones included (``chunk_of`` says why those are avoided).
    """
    left = [(key, n) for key, n in takes if n > 0]
    calls = []
    while left:
        n = min(rest for _, rest in left)
        # a sequence takes n only if that ends its tokens or leaves two or more; else it waits for a later call
        fed = [rest == n or (n > 1 and rest - n > 1) for _, rest in left]
        calls.append([(key, n) for (key, _), f in zip(left, fed) if f])
        left = [(key, rest - n if f else rest) for (key, rest), f in zip(left, fed) if not (f and rest == n)]
    return calls


class PrefillBudget:
    """Step-cost averages and the prompt tokens a step may take (scheduler thread only)."""

    def __init__(self, fixed: int | None = None):
        self.fixed = fixed
        self.t_decode = 0.0  # a plain decode step (generating rows only), seconds
        self.t_token = 0.0  # what one prompt token adds to a step, seconds

    def tokens(self, room: int, generating: int) -> int:
        """Prompt tokens for a step with ``generating`` decode rows and ``room`` free batch rows."""
        if not generating:
            return room
        if self.fixed is not None:
            return min(room, self.fixed)
        if not (self.t_decode and self.t_token):
            return min(room, PREFILL_FIRST)
        return min(room, max(PREFILL_MIN, int(STALL_BUDGET * self.t_decode / self.t_token)))

    def learn(self, seconds: float, generating: int, prompt: int) -> None:
        """Account one ``llama_decode``: of the decode rows (``prompt`` 0), or of ``prompt`` prompt tokens
        fed in a step where ``generating`` sequences decode (the batcher makes them separate calls)."""
        if prompt == 0:
            self.t_decode = seconds if not self.t_decode else 0.8 * self.t_decode + 0.2 * seconds
        elif generating:
            per = seconds / prompt
            self.t_token = per if not self.t_token else 0.7 * self.t_token + 0.3 * per
        elif not self.t_token:
            self.t_token = seconds / prompt  # a first guess from a prompt-only step (cheaper per token)

    @property
    def chunk(self) -> int:
        """The chunk a step with generating sequences and a free batch would get now (for stats)."""
        return self.tokens(1 << 30, 1)
