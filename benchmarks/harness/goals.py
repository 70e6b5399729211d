"""The reproduction's goals, as a table checked against results.json.

Each row: label, a function of the results giving the measured figure (None when the
configurations it needs were not run), the comparison, the threshold, the figure's format and, for a ratio of two
timings, the pair it compares. Rows whose figure is None are left out of the report, but for the accuracy goal where
both sides were scored on no item in common: that row says it is not shown, and why (``_acc_unpaired``). A ratio of
two timings measured with other settings is not shown either, with the settings that differ (``_timed_apart``).
"""

from __future__ import annotations

import operator


def _by(results: dict) -> dict:
    return {e["name"]: e for e in results["configs"]}


def _p50(results, name, metric):
    e = _by(results).get(name) or {}
    return (e.get(metric) or {}).get("p50")


def _ratio(a, b):
    return a / b if a is not None and b else None


def _peak(results, name):
    return (_by(results).get(name) or {}).get("peak_rss_bytes")


def _best_4bit_roofline(results):
    """The highest read-bandwidth roofline fraction of a 4-bit-class artifact (None without a read figure)."""
    fractions = [(e.get("roofline") or {}).get("fraction") for e in results["configs"]
                 if e.get("bits_per_weight") is not None and e["bits_per_weight"] < 6.5 and e["kind"] != "hf"]
    fractions = [f for f in fractions if f is not None]
    return max(fractions) if fractions else None


def _acc_drop(results, name):
    """Points lost against F16 on the same items (the paired difference); None without a paired item: two
    accuracies over different items differ by the draw as much as by the model, and the goal says "same items"."""
    paired = ((_by(results).get(name) or {}).get("accuracy") or {}).get("paired_vs_reference") or {}
    return -paired["diff"] if paired.get("n") and paired.get("diff") is not None else None


def _acc_unpaired(results, name) -> str | None:
    """Why the accuracy goal is not shown where ``name`` and F16 both have an accuracy but no item in common (None
    where they have one, or either has no accuracy): each scored on another draw, or the ids they share asked
    differently (``scores.compare``'s ``excluded``)."""
    by = _by(results)
    a, b = (by.get(name) or {}).get("accuracy") or {}, (by.get("f16") or {}).get("accuracy") or {}
    paired = a.get("paired_vs_reference") or {}
    if not a.get("n") or not b.get("n") or paired.get("n"):
        return None
    asked = (f"the {paired['excluded']} ids they share were asked differently (PubMedQA with and without its abstract, "
             "or another item under the id)" if paired.get("excluded") else "they were scored on different items")
    return (f"not shown: no items in common ({asked}); score both on the same draw (the same --eval files, --seed and "
            "--eval-context / --no-eval-context) to compare them")


def _timed_apart(results, name, base) -> str | None:
    """Why a goal comparing the timings of ``name`` and ``base`` is not shown, or None where they were timed alike:
    the settings that differ, as the report's reduction of the two holds them (``report._not_alike``)."""
    why = (((_by(results).get(name) or {}).get("reductions") or {}).get(base) or {}).get("not_compared")
    return (f"not shown: timed with other settings ({why}); time both alike: run again with `--phases timing` and the "
            "same settings for every configuration") if why else None


def _kld(results, name, part=None):
    """The headline KLD of ``name`` (edgemed.converters.quality.fidelity), or one of its parts ("llamacpp", "first", "all")."""
    div = (_by(results).get(name) or {}).get("divergence") or {}
    return (div.get(part) or {}).get("kld_mean") if part else div.get("kld_mean")


GOALS = (
    ("Q4_K_M peak RSS <= 35 % of F16's", lambda r: _ratio(_peak(r, "q4_k_m"), _peak(r, "f16")), operator.le, 0.35, "pct",
     ("q4_k_m", "f16")),
    ("Q4_K_M decode >= 2.5x F16", lambda r: _ratio(_p50(r, "q4_k_m", "decode_tok_s"), _p50(r, "f16", "decode_tok_s")),
     operator.ge, 2.5, "x", ("q4_k_m", "f16")),
    ("Q4_K_M e2e latency <= 15 % of HF-torch fp32", lambda r: _ratio(_p50(r, "q4_k_m", "e2e_s"), _p50(r, "hf-fp32", "e2e_s")),
     operator.le, 0.15, "pct", ("q4_k_m", "hf-fp32")),
    ("Best 4-bit decode >= 75 % of the read-bandwidth roofline", _best_4bit_roofline, operator.ge, 0.75, "roof", None),
    ("Q4_K_M accuracy at most 1 point below F16 (logits, same items)", lambda r: _acc_drop(r, "q4_k_m"), operator.le, 0.01,
     "points", None),
    ("Q4_K_M KLD vs F16 <= 0.03 (headline: each passage's first position left out)", lambda r: _kld(r, "q4_k_m"),
     operator.le, 0.03, "plain", None),
    ("Q4_K_M KLD vs F16 <= 0.03 (llama.cpp-compatible: second half of each passage)",
     lambda r: _kld(r, "q4_k_m", "llamacpp"), operator.le, 0.03, "plain", None),
)

_FORMATS = {"pct": lambda v: f"{v * 100:.1f} %", "roof": lambda v: f"{v * 100:.1f} %", "x": lambda v: f"{v:.2f}x", "points": lambda v: f"{abs(v) * 100:.1f} points {'below' if v > 0 else 'above'}",
            "plain": lambda v: f"{v:.4f}"}


def _acc_drop_bound(results, name):
    """The most points ``name`` may have lost against F16 by the paired 95 % interval (None without one)."""
    paired = ((_by(results).get(name) or {}).get("accuracy") or {}).get("paired_vs_reference") or {}
    ci = paired.get("diff_ci")
    return -ci[0] if paired.get("n") and ci else None


def check_goals(results: dict) -> list[list[str]]:
    """Rows (goal, measured, met) for the goals whose figures this run has. The accuracy goal is met only where the
    paired 95 % interval stays within it: a point estimate within 1 point, with an interval reaching past it, is
    "not shown" (those items cannot tell). A ratio of two timings measured with other settings is "not shown", with
    the settings that differ and how to time them alike: neither "yes" nor "no" stands on it."""
    rows = []
    for label, figure, compare, threshold, fmt, timed in GOALS:
        value = figure(results)
        if value is None:
            why = _acc_unpaired(results, "q4_k_m") if fmt == "points" else None
            if why:  # both were scored, on no item in common: the row says so rather than vanish
                rows.append([label, "—", why])
            continue
        apart = _timed_apart(results, *timed) if timed else None
        if apart:
            rows.append([label, "—", apart])
            continue
        met = "yes" if compare(value, threshold) else "**no**"
        if fmt == "roof" and value > 1:  # faster than the memory it reads allows: the figures disagree
            met = "**inconsistent** (above the ceiling)"
        if fmt == "points" and met == "yes":
            bound = _acc_drop_bound(results, "q4_k_m")
            if bound is not None and bound > threshold:
                met = f"not shown (95 % interval: up to {bound * 100:.1f} points below)"
        rows.append([label, _FORMATS[fmt](value), met])
    return rows
