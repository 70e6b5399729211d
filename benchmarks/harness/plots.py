"""PNG plots from results.json: memory bars, latency bars, accuracy vs bits, tokens/s per configuration.

matplotlib's object API (``Figure``, no pyplot state) with the Agg canvas, so it
works headless and never opens a window. Every plot has a title, axis labels with
units and a legend; each file is written atomically. A plot whose data the run
does not have (accuracy without ``--eval``) is not drawn.
"""

from __future__ import annotations

from pathlib import Path

from edgemed.files.atomic import atomic_path

MIB = 1 << 20
COLORS = {"gguf": "#1f77b4", "onnx": "#2ca02c", "hf": "#7f7f7f"}


def _figure(width=8.0, height=4.8):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def _save(fig, path: Path, replace: bool) -> Path:
    with atomic_path(path, force=replace, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


def _timed(results):
    return [e for e in results["configs"] if "e2e_s" in e]


def memory_bars(results: dict):
    es = _timed(results)
    if not es:
        return None
    import numpy as np

    fig = _figure()
    ax = fig.add_subplot()
    x, w = np.arange(len(es)), 0.38
    disk = [e["model_bytes"] / MIB for e in es]
    peak = [e["peak_rss_bytes"] / MIB for e in es]
    b1 = ax.bar(x - w / 2, disk, w, label="model on disk", color="#9ecae1")
    b2 = ax.bar(x + w / 2, peak, w, label="peak RSS (process)", color="#08519c")
    ax.bar_label(b1, fmt="%.0f", fontsize=8)
    ax.bar_label(b2, fmt="%.0f", fontsize=8)
    ax.set_xticks(x, [e["name"] for e in es], rotation=20, ha="right")
    ax.set_ylabel("memory (MiB)")
    ax.set_xlabel("configuration")
    ax.set_title("Memory per configuration (each in its own process)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return fig


def _latency_title(results: dict) -> str:
    """What the timings measured, from their own settings (a results.json from before they were kept: the run's)."""
    n = results["timing_settings"] if "timing_settings" in results else results["settings"]
    if n is None:  # timings kept from runs with other settings
        return "Single-stream latency, p50: new tokens and runs differ per configuration (report.md)"
    return f"Single-stream latency: {n['max_tokens']} new tokens, p50 of {n['runs']} runs"


def latency_bars(results: dict):
    es = _timed(results)
    if not es:
        return None
    import numpy as np

    fig = _figure()
    ax = fig.add_subplot()
    x = np.arange(len(es))
    ttft = np.array([e["ttft_s"]["p50"] for e in es])
    e2e = np.array([e["e2e_s"]["p50"] for e in es])
    lo = e2e - np.array([e["e2e_s"]["min"] for e in es])
    hi = np.array([e["e2e_s"]["p99"] for e in es]) - e2e
    ax.bar(x, ttft, 0.6, label="TTFT p50 (prefill)", color="#fdae6b")
    bars = ax.bar(x, e2e - ttft, 0.6, bottom=ttft, label="decode (e2e p50 − TTFT p50)", color="#e6550d",
                  yerr=[lo, hi], capsize=4, error_kw={"label": "e2e min – p99"})
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in e2e], fontsize=8, padding=2)
    ax.set_xticks(x, [e["name"] for e in es], rotation=20, ha="right")
    ax.set_ylabel("end-to-end latency (s)")
    ax.set_xlabel("configuration")
    ax.set_title(_latency_title(results))
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return fig


def accuracy_vs_bits(results: dict):
    points = []  # (config, dataset, bits, acc, ci)
    for e in results["configs"]:
        acc, bits = e.get("accuracy") or {}, e.get("bits_per_weight")
        if bits is None or acc.get("acc_logit") is None:
            continue
        per = acc.get("per_dataset") or {}
        for name, d in (per.items() if per else [("all", acc)]):
            if d.get("acc_logit") is not None:
                points.append((e["name"], name, bits, d["acc_logit"], d.get("ci_logit")))
    if not points:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    markers = "osD^v<>"
    for i, ds in enumerate(sorted({p[1] for p in points})):
        pts = sorted((p for p in points if p[1] == ds), key=lambda p: p[2])
        xs, ys = [p[2] for p in pts], [p[3] * 100 for p in pts]
        err = [[(p[3] - p[4][0]) * 100 if p[4] else 0 for p in pts], [(p[4][1] - p[3]) * 100 if p[4] else 0 for p in pts]]
        ax.errorbar(xs, ys, yerr=err, marker=markers[i % len(markers)], capsize=4, label=f"{ds} (95 % Wilson CI)")
        for p in pts:
            ax.annotate(p[0], (p[2], p[3] * 100), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("bits per weight (artifact bytes × 8 / parameters)")
    ax.set_ylabel("accuracy, answer-letter logits (%)")
    ax.set_title("Medical QA accuracy vs weight precision")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def tokens_per_s(results: dict):
    es = _timed(results)
    if not es:
        return None
    import numpy as np

    fig = _figure(10.0, 4.8)
    ax1, ax2 = fig.subplots(1, 2)
    x = np.arange(len(es))
    names = [e["name"] for e in es]
    colors = [COLORS.get(e["kind"], "#444444") for e in es]
    dec = [e["decode_tok_s"]["p50"] for e in es]
    sd = [e["decode_tok_s"]["stdev"] for e in es]
    bars = ax1.bar(x, dec, 0.6, yerr=sd, capsize=4, color=colors, label="decode tok/s p50 (± sd)")
    ax1.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ceil = [(i, e["roofline"]["ceiling_tok_s"]) for i, e in enumerate(es) if (e.get("roofline") or {}).get("ceiling_tok_s")]
    if ceil:
        ax1.scatter([c[0] for c in ceil], [c[1] for c in ceil], marker="_", s=600, color="red", zorder=3,
                    label="read-bandwidth roofline")
    ax1.set_xticks(x, names, rotation=20, ha="right")
    ax1.set_ylabel("decode (tokens/s)")
    ax1.set_xlabel("configuration")
    ax1.set_title("Decode (tg)")
    ax1.legend(fontsize=8)
    ax1.grid(axis="y", alpha=0.3)
    pre = [e["prefill_tok_s"]["p50"] for e in es]
    bars = ax2.bar(x, pre, 0.6, color=colors, label="prefill tok/s p50")
    ax2.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
    ax2.set_xticks(x, names, rotation=20, ha="right")
    ax2.set_ylabel("prefill (tokens/s)")
    ax2.set_xlabel("configuration")
    ax2.set_title("Prefill (pp)")
    ax2.legend(fontsize=8)
    ax2.grid(axis="y", alpha=0.3)
    fig.suptitle("Throughput per configuration (colour: runtime — blue llama.cpp, green onnxruntime, grey torch)")
    return fig


PLOTS = (("memory", memory_bars), ("latency", latency_bars), ("accuracy_vs_bits", accuracy_vs_bits),
         ("tokens_per_s", tokens_per_s))


def files(folder: Path) -> list[Path]:
    """Every file ``render`` may write into ``folder``."""
    return [folder / f"{name}.png" for name, _ in PLOTS]


def render(results: dict, folder: Path, *, replace: bool = False) -> list[Path]:
    """Every plot the results have data for, as ``folder/<name>.png``; one already there is replaced only with
    ``replace`` (the report folder is a bench's, or the user said --force: ``runner.claim``)."""
    import matplotlib

    matplotlib.use("Agg")
    folder.mkdir(parents=True, exist_ok=True)
    return [_save(fig, folder / f"{name}.png", replace) for name, draw in PLOTS if (fig := draw(results)) is not None]
