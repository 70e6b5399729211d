"""``--quant auto``'s search: which tensors get more bits, decided by measured KLD (no llama.cpp here).

Every quantizable tensor is a **group** with a two-type ladder, ``low`` (4-bit) and ``high``: Q4_K -> Q6_K
where a row is whole 256-blocks, else Q5_0 -> Q8_0 (the 32-block types llama.cpp itself falls back to for
Q4_K and Q6_K). A candidate gives each group one of its two types. ``measure(label, types)`` writes a candidate
and returns its headline KLD (``edgemed.fidelity``) on held-out medical text; ``size(types)`` its bytes;
``fits(types)`` whether the device planner says it fits (``None``: no device asked).

The rounds, each one candidate measured (``bound`` says how many at most):

1. **base**: every group low. It meets ``max_kld``: done (nothing smaller is on offer).
2. **all high**: every group high. It misses ``max_kld``: one more round, every tensor Q8_0; that missing too
   is an impossible budget (an error naming what was measured).
3. **probes**, one per tensor kind (``attn_q`` ... ``ffn_down``, ``token_embd``, ``output``: that kind high in
   every layer) and one per layer band (``BANDS`` contiguous bands: every kind high in those layers). The gain of
   group (kind k, layer l) is modelled as gain(kind k) x gain(band of l) / (layers in band x all bands' gain),
   so that a kind's groups add up to its probe; the gains are scaled to add up to base - all high.
4. Groups are ranked by modelled gain per extra byte; candidates are the ranking's prefixes (first n groups
   high). **verify** rounds search the prefix length: a secant step on the modelled curve between the longest
   measured prefix that misses and the shortest that meets, at most ``VERIFY`` rounds.

The answer is the smallest measured candidate that meets ``max_kld`` (and fits), or with only ``fit``, the
lowest-KLD measured candidate that fits (every tensor Q8_0 first, when that fits, else all high, else the
longest prefix that fits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

#: (low, high) per block family: 256-element blocks (K-quants) or 32-element blocks.
LADDERS = {256: ("Q4_K", "Q6_K"), 32: ("Q5_0", "Q8_0")}
TOP = "Q8_0"  # every tensor at this type: the last candidate when all-high misses the budget
BANDS = 4     # layer bands probed (contiguous, first to last)
VERIFY = 4    # prefix-length rounds after the probes
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")


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

    def row(self) -> dict:
        return {"label": self.label, "size_bytes": self.size_bytes, "kld": self.kld, "fits": self.fits,
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
    """The most rounds a search over ``groups`` takes: base, all high, Q8_0 or the fit top, probes, verify."""
    return 3 + len(probe_slices(groups)) + VERIFY


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
           fits: Callable[[dict], bool] | None = None, log: Callable[[str], None] = lambda s: None) -> Outcome:
    """Run the rounds above. ``measure(label, types) -> Trial``; ``fits(types)``: the device check (None: no device)."""
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
            + ("" if trial.fits is None else f", {'fits' if trial.fits else 'does not fit'}"))
        return trial

    def ok(t: Trial) -> bool:
        return (max_kld is None or t.kld <= max_kld) and t.fits is not False

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
    upper = run("all high", high)
    if max_kld is not None and upper.kld > max_kld:
        if high == top:
            raise Impossible(f"every tensor at its high type gives KLD {upper.kld:.5f} > {max_kld:g}", trials)
        q8 = run("all Q8_0", top)
        if not ok(q8):
            raise Impossible(f"every tensor at Q8_0 gives KLD {q8.kld:.5f}" + (" > " f"{max_kld:g}" if q8.kld > max_kld else
                             " but does not fit the device"), trials)
        return done(f"all high gives KLD {upper.kld:.5f} > {max_kld:g}; every tensor at Q8_0 meets it")
    gains = {label: base.kld - run(f"probe {label}", low | {n: high[n] for n in names}).kld
             for label, names in probe_slices(groups).items()}
    modelled = group_gains(groups, gains, base.kld - upper.kld)
    extra = {g.name: max(1, g.extra_bytes) for g in groups}
    order = sorted(modelled, key=lambda n: (-modelled[n] / extra[n], n))
    curve = [0.0]
    for name in order:
        curve.append(curve[-1] + modelled[name])

    def prefix(n: int) -> dict:
        return low | {name: high[name] for name in order[:n]}

    measured = {0: base.kld, len(order): upper.kld}
    if upper.fits is False:  # the longest prefix that fits is the top of the range (sizes grow with n)
        n_max = max(n for n in range(len(order) + 1) if fits(prefix(n)))
        if n_max == 0:
            return done("nothing but the base fits the device", order)
        top_trial = run(f"top {n_max} groups high", prefix(n_max))
        if max_kld is None:
            return done(f"the {n_max} groups with the most modelled gain per byte are the most that fit", order)
        if top_trial.kld > max_kld:
            raise Impossible(f"the best candidate that fits gives KLD {top_trial.kld:.5f} > {max_kld:g}", trials)
        measured = {0: base.kld, n_max: top_trial.kld}
    for _ in range(VERIFY):
        lo = max(n for n, k in measured.items() if k > max_kld)
        hi = min(n for n, k in measured.items() if k <= max_kld and n > lo) if any(
            k <= max_kld and n > lo for n, k in measured.items()) else None
        if hi is None or hi - lo <= 1:
            break
        n = _secant(curve, lo, hi, measured[lo], measured[hi], max_kld)
        measured[n] = run(f"top {n} groups high", prefix(n)).kld
    return done(f"the smallest measured candidate with KLD <= {max_kld:g}", order)


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


def _secant(curve: list[float], lo: int, hi: int, k_lo: float, k_hi: float, target: float) -> int:
    """The prefix length in (lo, hi) where KLD, interpolated along the modelled curve, reaches ``target``."""
    span = curve[hi] - curve[lo]
    if span <= 0:
        return (lo + hi) // 2
    want = curve[lo] + (k_lo - target) / max(k_lo - k_hi, 1e-12) * span
    n = next((i for i in range(lo + 1, hi) if curve[i] >= want), hi - 1)
    return min(max(n, lo + 1), hi - 1)
