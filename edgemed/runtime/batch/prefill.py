"""Chunked prefill: how many prompt tokens one batcher step may take without stalling the running streams.

A step that carries a prompt chunk next to generating sequences lasts as long as a plain decode
step plus the chunk's own ``llama_decode`` calls, and every running stream waits for it. So while anyone is
generating, the chunk is sized from what this host and model measure: the seconds of a plain step as the streams
see it (the median of the recent times between decode calls with no prompt call between them: sampling, text and
the server's other threads cost the streams time too) and a cost model of a prompt call, ``seconds = a + b * tokens``
(``CallCost``), fitted online from the batcher's own calls. ``a`` is what a call costs whatever its size (graph
build, a pass over the weights: most of a small call on a CPU), ``b`` what each token adds. The chunk is the
largest ``n`` with ``calls * a + b * n <= credit``, where the credit grows by ``STALL_BUDGET * t_plain`` each step
(up to a few plain steps) and each prompt call spends its seconds; when the next decode call ends, whatever that
step took beyond a plain step and those seconds (the calls' batches, their rows' sampling, the server's other
threads) is spent too, and such a step is not counted as a plain one. So steps stay within
``1 + STALL_BUDGET`` plain steps on average, the plain step being what the streams saw before the prompt came (the
goal: inter-token time grows at most 2x during a long prefill). Where a call's fixed cost
alone is more than the credit of one step (a small model on a CPU: a call of a few tokens costs most of a 3-row
decode step), or more than ``FIXED_SHARE_MAX`` of the call the credit would buy, steps without prompt tokens save
up and a larger chunk follows, rather than a small chunk every step that is mostly fixed cost and barely moves the
prompt. Folding ``a`` into a per-token cost (``seconds / tokens`` of small calls) instead made every token look as
dear as a small call's share of the weight pass, and chunks collapsed to the floor at two or three running streams.
With nobody generating, a prompt takes the whole batch (nobody waits on the step).
A fixed chunk (``Batcher(prefill_chunk=N)``) skips the measurement.

The fit is hand-written (a dozen lines of weighted least squares over a short window) rather than taken from a
library: it runs on the scheduler thread once a step, numpy is not a device-side dependency of this module, and
it needs the clamps below (no negative cost, no extrapolation far past what was measured) that a generic
regression does not give.
"""

from __future__ import annotations

import collections
import statistics
import time

#: While sequences are generating, steps take on average at most (1 + STALL_BUDGET) x a plain step (the prompt
#: calls' seconds are paced by a credit that each step adds STALL_BUDGET x a plain step to): the streams' goal is
#: at most 2x. A 1,528-token prompt while 3 stream on a served 0.5B, 2 rounds each (Xeon, AVX-512): at 0.8 growth
#: 1.85 / 2.02x and first token 2.68 / 2.80x llama-server's; at 0.9 growth 1.90 / 1.93x and 2.99 / 2.40x (the
#: rounds' noise is wider than the step between the two; ``serve_workloads --parts long``, decision 0012). With
#: the work around prompt calls charged too, 0.9 gave 2.19 / 1.74 / 1.96x over 3 rounds: the streams' mean gap
#: during the prompt held at 106-116 ms while their median gap before it moved between 53 and 62 ms. At 0.8 with
#: the median plain step (``PERIOD_WINDOW``): 1.89 / 1.78 / 1.81x, first token 2.74 / 2.67 / 2.69x ...
STALL_BUDGET = 0.8
#: ... and one step at most (1 + STEP_STALL_MAX) x, unless a call's fixed cost is more than half a plain step
#: (``PrefillBudget._cap``): the credit saved over several plain steps buys one larger chunk, whose fixed cost
#: is then spread over more tokens. At 1.0 (a chunk every step or two) a 1,500-token prompt arriving while 3 stream
#: took 85 s to its first token on Qwen2.5-0.5B Q4_K_M at 2 threads (a call of a few tokens costs about a whole
#: plain step there), with the streams' mean growth 2.2x; at 4.0 one step stalls the streams at most 5x a plain
#: step (~0.35 s on that box) and the mean stays the rule's (``serve_workloads --parts long``).
STEP_STALL_MAX = 4.0
#: A plain step as the streams see it is the time from one decode call's end to the next, less the prompt calls in
#: between (sampling, text, the HTTP threads' share of the CPU and the interpreter lock count: 3 streams of
#: Qwen2.5-0.5B served at 2 threads saw 86-98 ms between tokens, where a 4-row decode call alone takes about 71 ms).
#: A gap longer than this many decode calls is idle time (no step ran), not a step.
PERIOD_MAX = 4.0
#: The plain step is the median of the last this many plain periods: the 2x rule is about the streams' typical
#: gap, and a mean would count a plain step's occasional slow one (the interpreter lock, an HTTP thread) as room
#: for prompt calls. A 4th stream joining moves the median within half as many steps.
PERIOD_WINDOW = 15
#: A prompt call beside running streams is made only when its fixed cost ``a`` is at most this share of it (or the
#: credit is full): the credit a step earns spent at once on a call of a few tokens paid mostly ``a`` (a 1,528-token
#: prompt while 3 streamed on Qwen2.5-0.5B, 2 threads: 3.6 tokens a step, first token at 66 s against 23.7 s for
#: llama-server); saved up over a few steps it buys calls of tens of tokens at the same mean stall.
FIXED_SHARE_MAX = 0.25
#: A call slowed by something else (another process took the CPU) puts the streams' credit at most this many plain
#: steps in debt, so the chunk is back within a few steps.
DEBT_STEPS = 1.0
#: Prompt tokens per step while others generate, before the step costs are measured: the first probe of the
#: cost model; the second probe is ``PREFILL_PROBE`` tokens, so the fit sees two sizes a factor of four apart.
PREFILL_FIRST = 32
PREFILL_PROBE = 8
#: The cost model's memory: the last ``FIT_WINDOW`` prompt calls, weighted by recency (a call ``FIT_HALF_LIFE``
#: calls old counts half), so a host that slows down (thermal throttling, another process) is followed
#: within a few steps.
FIT_WINDOW = 48
FIT_HALF_LIFE = 8
#: A chunk is never sized past this multiple of the largest prompt call measured in the window: the fit is a
#: line through measured sizes, and attention and cache effects bend it beyond them.
FIT_REACH = 2
#: Prompts up to this many tokens go in one step, as llama-server feeds them: chunking short ones costs
#: throughput (their slots idle longer) for stalls of well under a second; long prompts are chunked.
WHOLE_PROMPT = 128
#: The smallest chunk ever given while others generate. On a compute-bound CPU a prompt token costs a
#: sixth to a tenth of a 3-row decode step (Qwen2.5-0.5B Q4_K_M, 1 thread): a floor of 16 gave 2.8x, and at
#: 2 threads a floor of 4 still 2.0x (1.5B: 2.1x), the chunk's own call costing nearly half a decode step.
#: With the cost model the floor is only what a step gets when even a call's fixed cost exceeds the budget.
PREFILL_MIN = 2


def chunk_of(remaining: int, budget: int, whole: int, prompt: int = 1 << 30, room: int = 1 << 30,
             capacity: int | None = None) -> int:
    """Prompt tokens to feed now, of ``remaining``, within ``budget`` (what the step has left for this prompt; the
    step's whole budget is ``whole``) and the batch's free rows ``room`` (of ``capacity``, the most rows a step ever
    offers; default ``room``). Never a one-token piece of a longer prompt, taken or left behind (unless the step's
    budget is one): llama.cpp attends a single row with other kernels than several, so such a piece would make the
    prompt's KV differ from a run alone, and batched greedy text with it, and its last token alone gives other logits
    to sample from (``llamacpp.REFEED``). Where a chunk of two or one would leave one token, the prompt's rest goes
    together if the batch has room for it (one over ``budget``), else it waits for a step that has, where one can
    (``capacity`` holds it); a batch that can never hold it (a profile's ``n_batch`` of 1 or 2) takes what fits,
    one-token piece and all, rather than wait for ever.
    """
    if prompt <= WHOLE_PROMPT and budget > 0:  # ``prompt``: the whole prompt's length
        return remaining
    capacity = room if capacity is None else capacity
    take = max(0, min(remaining, budget, room))
    if 0 < take < remaining and remaining - take == 1:
        if take > 2:
            take -= 1  # leave two for the next step rather than one
        elif remaining <= room:
            return remaining  # two or three tokens left: all of them now, never the last one alone next step
        elif whole > 1 and remaining <= capacity:
            return 0
    if take == 1 < remaining and whole > 1 and capacity > 1:
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


class CallCost:
    """``seconds = a + b * tokens`` of one prompt ``llama_decode`` call, fitted by recency-weighted least squares
    over the last ``FIT_WINDOW`` calls, with one robust pass (a call slowed by another process on the host, far off
    the line, is down-weighted rather than trusted). ``prior``: ``(a, b)`` in seconds (a device profile's), used
    until the window holds two sizes at least a factor of two apart (scaled to the calls of one size measured
    meanwhile, so a prior from a slower or faster host still lets the chunk move and the window spread)."""

    def __init__(self, prior: tuple[float, float] | None = None):
        self.prior = prior
        self.points: list[tuple[int, float]] = []  # (tokens, seconds), oldest first

    def add(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.points.append((tokens, seconds))
            del self.points[:-FIT_WINDOW]

    def spread(self) -> bool:
        """Whether the window holds sizes far enough apart to separate ``a`` from ``b``."""
        sizes = [n for n, _ in self.points]
        return bool(sizes) and max(sizes) >= 2 * min(sizes)

    def largest(self) -> int:
        return max((n for n, _ in self.points), default=0)

    def fit(self) -> tuple[float, float] | None:
        """``(a, b)``, or the prior (None without one) until the window can separate them."""
        if not self.spread():
            if self.prior is None or not self.points:
                return self.prior
            # one size measured: the prior's shape, scaled to what that size costs on this host
            a0, b0 = self.prior
            n = self.points[-1][0]
            recent = [s for m, s in self.points[-FIT_HALF_LIFE:] if m == n]
            k = sorted(recent)[len(recent) // 2] / (a0 + b0 * n)
            return a0 * k, b0 * k
        last = len(self.points) - 1
        w = [0.5 ** ((last - i) / FIT_HALF_LIFE) for i in range(len(self.points))]
        a, b = _line(self.points, w)
        typical = sorted(s for _, s in self.points)[len(self.points) // 2]
        robust = w
        for _ in range(6):  # Huber reweighting: a point off the line by more than the scale counts less
            residuals = sorted(abs(s - a - b * n) for n, s in self.points)
            # three median absolute residuals, and at least a twentieth of a typical call (timer noise)
            scale = max(3 * residuals[len(residuals) // 2], 0.05 * typical)
            robust = [wi * min(1.0, scale / max(abs(s - a - b * n), 1e-12)) for wi, (n, s) in zip(w, self.points)]
            a, b = _line(self.points, robust)
        w = robust
        if a < 0 or b <= 0:  # noise over a narrow range of sizes: keep the cost non-negative and growing
            a = max(a, 0.0)
            b = sum(wi * (s - a) * n for wi, (n, s) in zip(w, self.points)) / sum(wi * n * n for wi, (n, _) in zip(w, self.points))
            if b <= 0:  # every call cost no more than ``a``: as cheap per token as the cheapest call measured
                b = min(s / n for n, s in self.points) * 1e-3
        return a, b


def _line(points: list[tuple[int, float]], w: list[float]) -> tuple[float, float]:
    """Weighted least-squares ``(a, b)`` of ``seconds = a + b * tokens``."""
    sw = sum(w)
    mx = sum(wi * n for wi, (n, _) in zip(w, points)) / sw
    my = sum(wi * s for wi, (_, s) in zip(w, points)) / sw
    sxx = sum(wi * (n - mx) ** 2 for wi, (n, _) in zip(w, points))
    if sxx <= 0:
        return my, 0.0
    b = sum(wi * (n - mx) * (s - my) for wi, (n, s) in zip(w, points)) / sxx
    return my - b * mx, b


class PrefillBudget:
    """Step costs and the prompt tokens a step may take (scheduler thread only). ``prior``: ``(a, b)`` seconds
    of a prompt call (``CallCost``), e.g. from a device profile, used until this host's calls are measured."""

    def __init__(self, fixed: int | None = None, prior: tuple[float, float] | None = None, clock=time.perf_counter):
        self.fixed = fixed
        self.t_decode = 0.0  # a plain decode step's llama_decode call (generating rows only), seconds
        self.t_period = 0.0  # a plain step as the streams see it (``PERIOD_MAX``, ``PERIOD_WINDOW``), seconds
        self._periods: collections.deque[float] = collections.deque(maxlen=PERIOD_WINDOW)
        self._clock = clock
        self._last_end: float | None = None  # when the last decode call ended
        self._fed = False  # whether a prompt call ran since then
        self._charged = 0.0  # seconds of those calls beside generating rows (spent from the credit as they ended)
        self.cost = CallCost(prior)
        self.calls = 1  # prompt calls in the last step that fed prompt tokens next to generating rows
        # stall seconds the running streams can still spare: each plain step adds STALL_BUDGET of itself,
        # each prompt call beside generating rows spends its own length
        self.credit = 0.0
        self._calls_now = 0

    def tokens(self, room: int, generating: int) -> int:
        """Prompt tokens for a step with ``generating`` decode rows and ``room`` free batch rows."""
        if not generating:
            return room
        if self.fixed is not None:
            return min(room, self.fixed)
        fit = self.cost.fit() if self.t_decode else None
        if fit is None:  # probe two sizes first: a call's fixed cost cannot be told from one size
            seen = {n for n, _ in self.cost.points}
            return min(room, PREFILL_PROBE if PREFILL_FIRST in seen else PREFILL_FIRST)
        a, b = fit
        cap = self._cap(a)
        # every call of the step pays ``a`` (``equal_pieces`` may cut the step's prompt tokens into several)
        spare = min(self.credit, cap) - self.calls * a
        n = int(spare / b + 1e-9) if spare > 0 else 0
        if n < PREFILL_MIN:  # the fixed cost does not fit what the streams can spare yet: a plain step saves up
            return 0 if self.credit < cap else min(room, PREFILL_MIN)
        if self.credit < cap and self.calls * a > FIXED_SHARE_MAX * (self.calls * a + b * min(n, room)):
            return 0  # a call now would be mostly its fixed cost: save up for a larger one (at most ``cap``)
        reach = FIT_REACH * self.cost.largest() if self.cost.points else n
        return min(room, n, reach)

    def _cap(self, a: float) -> float:
        """The most stall seconds one step may take: a plain step's length (that step's inter-token time 2x),
        or twice a call's fixed cost where that alone is more than half a plain step (a call of a few tokens would
        stall the streams nearly as long for almost no progress)."""
        return max(STEP_STALL_MAX * self.t_plain, 2 * self.calls * a)

    @property
    def t_plain(self) -> float:
        """A plain step's seconds as the running streams wait for it: the measured period between decode calls
        (prompt calls taken out), never less than the decode call itself."""
        return max(self.t_decode, self.t_period)

    def learn(self, seconds: float, generating: int, prompt: int) -> None:
        """Account one ``llama_decode``: of the decode rows (``prompt`` 0), or of ``prompt`` prompt tokens
        fed in a step where ``generating`` sequences decode (the batcher makes them separate calls)."""
        if prompt == 0:  # a step's decode call comes first: the previous step's prompt calls are all counted
            self.t_decode = seconds if not self.t_decode else 0.8 * self.t_decode + 0.2 * seconds
            end = self._clock()
            if self._last_end is not None and self._charged:
                # what the streams really waited past a plain step, less the prompt calls' seconds already
                # spent: work around the calls (their batches, their rows' sampling, the other threads' share of
                # the CPU while they ran) slows the streams as much as the calls do. A step quicker than that
                # gives nothing back (a plain step's own noise is not credit), so the streams' mean step errs short
                rest = end - self._last_end - self.t_plain - self._charged
                if rest > 0:
                    self.credit = max(self.credit - min(rest, self.t_plain), -DEBT_STEPS * self.t_plain)
            elif self._last_end is not None and not self._fed:  # a plain step: nothing fed between the calls
                period = end - self._last_end
                if seconds <= period <= PERIOD_MAX * self.t_decode:
                    self._periods.append(period)
                    self.t_period = statistics.median(self._periods)
            self._last_end, self._fed, self._charged = end, False, 0.0
            if self._calls_now:
                self.calls, self._calls_now = self._calls_now, 0
            fit = self.cost.fit()
            cap = self._cap(fit[0]) if fit else STEP_STALL_MAX * self.t_plain
            self.credit = min(self.credit + STALL_BUDGET * self.t_plain, cap)
            return
        self._fed = True
        self.cost.add(prompt, seconds)  # a prompt-only step's call is on the same line (its large sizes help)
        if generating:
            self._calls_now += 1
            self._charged += seconds
            # the streams waited this long for it; a call slowed by something else costs at most a few steps
            self.credit = max(self.credit - seconds, -DEBT_STEPS * self.t_plain)

    @property
    def chunk(self) -> int:
        """The chunk a step with generating sequences and a free batch would get now (for stats)."""
        return self.tokens(1 << 30, 1)
