"""``--quant auto``'s search: which tensors get more bits, decided by measured KLD (no llama.cpp here).

Every quantizable tensor is a **group** with a two-type ladder, ``low`` (4-bit) and ``high``: Q4_K -> Q6_K
where a row is whole 256-blocks, else Q5_0 -> Q8_0 (the 32-block types llama.cpp itself falls back to for
Q4_K and Q6_K). A candidate gives each group one of its two types. ``measure(label, types)`` writes a candidate
and returns its size, headline KLD (``edgemed.converters.quality.fidelity``) on held-out medical text and that mean's standard error
between passages; ``fits(types)`` whether the device planner says it fits (no device asked: every candidate fits).

**Meeting the budget** takes a margin: a candidate meets ``max_kld`` when its KLD's one-sided 95 % upper bound,
KLD + ``MARGIN_Z`` x SE, does (``Trial.upper``). Candidates a few percent apart in size differ in KLD by about
their own sampling error, so a bare mean under the budget is a coin toss on other text.

The rounds, each one candidate measured (``bound``: at most 4 + probes + ``VERIFY``):

1. **base**: every group low. It meets ``max_kld``: done (nothing smaller is on offer).
2. **stock** (when given): llama.cpp's own mix for the type (Q4_K_M: Q6_K on the output and on part of the
   ``attn_v`` / ``ffn_down`` layers). The answer must beat it: it is a candidate like the others, so nothing larger
   that meets the budget is chosen over it, and its measured point anchors the search below.
3. **all high**: every group high. It misses ``max_kld``: one more round, every tensor Q8_0; that missing too
   is an impossible budget (an error naming what was measured).
4. **probes**, one per tensor kind (``attn_q`` ... ``ffn_down``, ``token_embd``, ``output``: that kind high in
   every layer) and one per layer band (``BANDS`` contiguous bands: every kind high in those layers). The gain of
   group (kind k, layer l) is modelled as gain(kind k) x gain(band of l) / (layers in band x all bands' gain),
   so that a kind's groups add up to its probe; the gains are scaled to add up to base - all high.
5. **verify**: a candidate is the set of groups made high. ``Knapsack`` finds, for a modelled gain G, the set with
   the fewest extra bytes whose modelled gains add up to at least G (0/1 knapsack: a big tensor such as
   ``output`` that carries much of the gain is taken whole or not at all, where a ranking by gain per byte
   would overshoot). The rounds search G: a secant step between the largest measured G that misses
   ``max_kld`` and the smallest that meets it (base = 0, all high = the total, stock = its high groups' modelled
   gain), at most ``VERIFY`` rounds.
   With a device, the range ends at the most modelled gain whose set the planner says fits.

The answer is the smallest measured candidate that meets ``max_kld`` (and fits), or with only a device, the
lowest-KLD measured candidate that fits (every tensor Q8_0 first, when that fits, else all high, else the
set with the most modelled gain that fits). ``order`` in the outcome is the groups by modelled gain per byte,
for the report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

#: (low, high) per block family: 256-element blocks (K-quants) or 32-element blocks.
LADDERS = {256: ("Q4_K", "Q6_K"), 32: ("Q5_0", "Q8_0")}
TOP = "Q8_0"  # every tensor at this type: the last candidate when all-high misses the budget
MARGIN_Z = 1.645  # one-sided 95 %: a candidate meets --max-kld when KLD + MARGIN_Z x SE does
BANDS = 4     # layer bands probed (contiguous, first to last)
VERIFY = 4    # rounds after the probes that search the modelled gain
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")
STOCK = "llama.cpp Q4_K_M"  # the stock round's label


@dataclass(frozen=True)
class Group:
    """One quantizable tensor and its two types."""

    name: str
    kind: str          # "attn_q", ..., "token_embd", "output"
    layer: int | None  # None for tensors outside the layers
    low: str
    high: str
    extra_bytes: int   # bytes(high) - bytes(low)


def group_of(name: str, row: int, low_high: dict[int, tuple[str, str]] = LADDERS, extra_bytes: int = 0) -> Group | None:
    """The group of tensor ``name`` with rows of ``row`` elements (None: no ladder fits its rows)."""
    block = next((b for b in sorted(low_high, reverse=True) if row % b == 0), None)
    if block is None:
        return None
    m = _LAYER.match(name)
    kind, layer = (m.group(2), int(m.group(1))) if m else (name.removesuffix(".weight"), None)
    low, high = low_high[block]
    return Group(name, kind, layer, low, high, extra_bytes)


@dataclass
class Trial:
    """One measured candidate."""

    label: str
    types: dict[str, str]
    size_bytes: int
    kld: float
    fits: bool | None
    figures: dict = field(default_factory=dict)  # the full fidelity summary, filled by ``measure``'s caller
    se: float = 0.0  # standard error of ``kld`` (between passages, ``edgemed.converters.quality.fidelity.headline_se``)

    @property
    def upper(self) -> float:
        """The KLD this candidate is held to against a budget: its one-sided 95 % upper bound."""
        return self.kld + MARGIN_Z * self.se

    def row(self) -> dict:
        return {"label": self.label, "size_bytes": self.size_bytes, "kld": self.kld, "kld_se": self.se,
                "kld_upper": self.upper, "fits": self.fits,
                "types": _counts(self.types)} | ({"figures": self.figures} if self.figures else {})


def _counts(types: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in types.values():
        out[t] = out.get(t, 0) + 1
    return dict(sorted(out.items()))


class Impossible(Exception):
    """No candidate meets the request; ``trials`` says what was measured."""

    def __init__(self, reason: str, trials: list[Trial]):
        super().__init__(reason)
        self.reason, self.trials = reason, trials


@dataclass
class Outcome:
    chosen: Trial
    trials: list[Trial]
    order: list[str]   # the ranking (group names, most gain per byte first); empty when no probes ran
    bound: int         # the most rounds this search could have taken
    why: str


def bound(groups: list[Group]) -> int:
    """The most rounds a search over ``groups`` takes: base, stock, all high, Q8_0 or the fit top, probes, verify."""
    return 4 + len(probe_slices(groups)) + VERIFY


def probe_slices(groups: list[Group]) -> dict[str, set[str]]:
    """Probe label -> the group names it makes high: one per kind, one per layer band."""
    slices: dict[str, set[str]] = {}
    for g in groups:
        slices.setdefault(f"kind {g.kind}", set()).add(g.name)
    layers = sorted({g.layer for g in groups if g.layer is not None})
    n = min(BANDS, len(layers))
    for b in range(n):
        band = layers[b * len(layers) // n:(b + 1) * len(layers) // n]
        slices[f"layers {band[0]}-{band[-1]}"] = {g.name for g in groups if g.layer in band}
    return slices


def search(groups: list[Group], *, measure: Callable[[str, dict], Trial], max_kld: float | None = None,
           fits: Callable[[dict], bool] | None = None, stock: Callable[[], dict] | None = None,
           log: Callable[[str], None] = lambda s: None) -> Outcome:
    """Run the rounds above. ``measure(label, types) -> Trial``; ``fits(types)``: the device check (None: no device);
    ``stock()``: llama.cpp's own mix of the low type, group -> type (called only when that round runs)."""
    if max_kld is None and fits is None:
        raise ValueError("search needs max_kld, fits, or both")
    limit, trials = bound(groups), []
    fits = fits or (lambda types: True)

    def run(label: str, types: dict) -> Trial:
        if len(trials) >= limit:  # the bound is the code's promise: never a round more
            raise RuntimeError(f"auto-quant search would pass its bound of {limit} rounds")
        trial = measure(label, types)
        trials.append(trial)
        log(f"auto-quant round {len(trials)}/{limit}: {label}: {trial.size_bytes / 2**20:.1f} MiB, KLD {trial.kld:.5f}"
            f" ± {trial.se:.5f}" + ("" if trial.fits is None else f", {'fits' if trial.fits else 'does not fit'}"))
        return trial

    def ok(t: Trial) -> bool:
        return (max_kld is None or t.upper <= max_kld) and t.fits is not False

    def done(why: str, order=()) -> Outcome:
        good = [t for t in trials if ok(t)]
        key = (lambda t: (t.size_bytes, t.kld)) if max_kld is not None else (lambda t: (t.kld, t.size_bytes))
        return Outcome(min(good, key=key), trials, list(order), limit, why)

    low = {g.name: g.low for g in groups}
    high = {g.name: g.high for g in groups}
    top = {g.name: TOP for g in groups}
    if not fits(low):
        raise Impossible("even the 4-bit base does not fit the device", trials)
    if max_kld is None:  # best fidelity that fits: the biggest candidates first
        if fits(top):
            run("all Q8_0", top)
            return done("every tensor at Q8_0 fits the device: the best fidelity on offer")
        if fits(high):
            run("all high", high)
            return done("every tensor at its high type fits the device (all Q8_0 does not)")
    base = run("base", low)
    if max_kld is not None and ok(base):
        return done(f"the 4-bit base meets KLD <= {max_kld:g}: nothing smaller is on offer")
    mix = stock() if stock is not None else None
    ref = run(STOCK, mix) if mix is not None and mix != low and fits(mix) else None
    upper = run("all high", high)
    if max_kld is not None and upper.upper > max_kld:
        if high == top:
            raise Impossible(f"every tensor at its high type gives KLD {upper.kld:.5f} ± {upper.se:.5f} > {max_kld:g}",
                             trials)
        q8 = run("all Q8_0", top)
        if not ok(q8):
            raise Impossible(f"every tensor at Q8_0 gives KLD {q8.kld:.5f} ± {q8.se:.5f}"
                             + (f" > {max_kld:g}" if q8.upper > max_kld else " but does not fit the device"), trials)
        return done(f"all high gives KLD {upper.kld:.5f} ± {upper.se:.5f} > {max_kld:g}; every tensor at Q8_0 meets it")
    gains = {label: base.kld - run(f"probe {label}", low | {n: high[n] for n in names}).kld
             for label, names in probe_slices(groups).items()}
    modelled = group_gains(groups, gains, base.kld - upper.kld)
    extra = {g.name: max(1, g.extra_bytes) for g in groups}
    order = sorted(modelled, key=lambda n: (-modelled[n] / extra[n], n))
    pack = Knapsack(modelled, extra)

    def types_of(names) -> dict:
        return low | {n: high[n] for n in names}

    def label(names) -> str:
        return f"{len(names)} groups high (model {pack.gain(names):.5f})"

    points = {pack.total: upper.upper}  # modelled gain -> measured KLD (upper bound); the base is gain 0
    if upper.fits is False:  # the most modelled gain the device holds caps the range
        lo_cap, hi_cap = 0, sum(extra.values())
        while hi_cap - lo_cap > max(1, hi_cap // 4096):  # the planner is monotone in bytes: bisect the byte cap
            mid = (lo_cap + hi_cap) // 2
            lo_cap, hi_cap = (mid, hi_cap) if fits(types_of(pack.within(mid))) else (lo_cap, mid)
        names = pack.within(lo_cap)
        if not names:
            return done("nothing but the base fits the device", order)
        best = run(label(names), types_of(names))
        if max_kld is None:
            return done("the most modelled gain (probes) that fits the device", order)
        if not ok(best) and not (ref and ok(ref)):
            raise Impossible(f"the best candidate that fits gives KLD {best.kld:.5f} ± {best.se:.5f} > {max_kld:g}",
                             trials)
        points = {pack.gain(names): best.upper}
    points[0.0] = base.upper
    if ref is not None and all(ref.types[g.name] in (g.low, g.high) for g in groups):
        points[pack.gain([g.name for g in groups if ref.types[g.name] == g.high and g.high != g.low])] = ref.upper
    tried = {frozenset(t.types.items()) for t in trials}
    for _ in range(VERIFY):
        lo = max(g for g, k in points.items() if k > max_kld)
        above = [g for g, k in points.items() if k <= max_kld and g > lo]
        if not above:
            break
        hi = min(above)
        want = lo + (points[lo] - max_kld) / max(points[lo] - points[hi], 1e-12) * (hi - lo)  # secant on the model
        names = next((n for n in (pack.cover(want), pack.cover((lo + hi) / 2))
                      if frozenset(types_of(n).items()) not in tried), None)
        if names is None:
            break
        trial = run(label(names), types_of(names))
        tried.add(frozenset(trial.types.items()))
        points[pack.gain(names)] = trial.upper
    why = f"the smallest measured candidate whose KLD upper bound (+{MARGIN_Z} SE) is <= {max_kld:g}"
    chosen = done(why, order)
    if ref is not None and chosen.chosen is ref:
        chosen.why = f"{why}: llama.cpp's own mix; no smaller candidate meets the budget"
    elif ref is not None:
        chosen.why = f"{why}, {chosen.chosen.size_bytes / ref.size_bytes - 1:+.1%} in size against llama.cpp's own mix" \
            + (" (which meets it too)" if ok(ref) else f" (which misses it: {ref.kld:.5f} ± {ref.se:.5f})")
    return chosen


class Knapsack:
    """Sets of groups by modelled gain and extra bytes (0/1 knapsack, bytes in at most ``CELLS`` steps)."""

    CELLS = 20_000

    def __init__(self, gains: dict[str, float], costs: dict[str, int]):
        import numpy as np

        self.names = [n for n in sorted(gains) if gains[n] > 0]  # a group that gains nothing is never worth bytes
        self.gains = gains
        self.unit = max(1, -(-sum(costs[n] for n in self.names) // self.CELLS))
        self.w = [-(-costs[n] // self.unit) for n in self.names]
        size = sum(self.w) + 1
        best = np.full(size, -np.inf)
        best[0] = 0.0  # best[c]: the most gain at exactly c steps of bytes
        self.take = np.zeros((len(self.names), size), dtype=bool)
        for i, (n, w) in enumerate(zip(self.names, self.w)):
            cand = np.full(size, -np.inf)
            cand[w:] = best[:size - w] + gains[n]
            self.take[i] = cand > best
            best = np.maximum(best, cand)
        self.best = best
        self.total = float(sum(gains[n] for n in self.names))

    def gain(self, names) -> float:
        return float(sum(self.gains[n] for n in names))

    def _pick(self, c: int) -> list[str]:
        out = []
        for i in range(len(self.names) - 1, -1, -1):
            if self.take[i, c]:
                out.append(self.names[i])
                c -= self.w[i]
        return sorted(out)

    def cover(self, gain: float) -> list[str]:
        """The fewest bytes whose modelled gain is at least ``gain`` (everything that gains, past the total)."""
        import numpy as np

        hit = np.nonzero(self.best >= min(gain, self.total) - 1e-15)[0]
        return self._pick(int(hit[0]))

    def within(self, cap_bytes: int) -> list[str]:
        """The most modelled gain in at most ``cap_bytes`` extra bytes."""
        import numpy as np

        c = min(cap_bytes // self.unit, len(self.best) - 1)
        return self._pick(int(np.argmax(self.best[:c + 1])))


def group_gains(groups: list[Group], gains: dict[str, float], total: float) -> dict[str, float]:
    """Each group's modelled KLD gain from going high (kind probe x band probe, scaled to ``total``)."""
    slices = probe_slices(groups)
    bands = {label: names for label, names in slices.items() if label.startswith("layers ")}
    band_sum = sum(max(gains[b], 0.0) for b in bands) or 1.0
    raw: dict[str, float] = {}
    for g in groups:
        kind = max(gains[f"kind {g.kind}"], 0.0)
        if g.layer is None or not bands:
            raw[g.name] = kind
            continue
        band = next(b for b, names in bands.items() if g.name in names)
        in_band = len({x.layer for x in groups if x.name in bands[band]})
        raw[g.name] = kind * max(gains[band], 0.0) / (in_band * band_sum)
    scale = max(total, 0.0) / (sum(raw.values()) or 1.0)
    return {n: v * scale for n, v in raw.items()}


def table(trials) -> str:
    """The candidates as printed: label, size, headline KLD, top-1, fits."""
    lines = [f"  {'candidate':<34} {'MiB':>9} {'KLD':>9} {'± SE':>8} {'top-1':>7}  fits"]
    for t in trials:
        fits = "-" if t.fits is None else "yes" if t.fits else "no"
        lines.append(f"  {t.label:<34} {t.size_bytes / 2**20:9.1f} {t.kld:9.5f} {t.se:8.5f} "
                     f"{t.figures.get('top1', 0) * 100:6.1f}%  {fits}")
    return "auto-quant candidates (headline KLD vs the float intermediate, held-out PubMedQA abstracts):\n" + "\n".join(lines)
