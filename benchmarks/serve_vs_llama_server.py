"""`edgemed serve` against llama.cpp's own `llama-server`, side by side, same kernels, same load.

    python -m edgemed.benchmarks.anchors build                 # once: llama-server from the installed sdist
    python -m edgemed.benchmarks.serve_vs_llama_server         # Qwen2.5-0.5B Q4_K_M, 2 threads, 4 slots
    python -m edgemed.benchmarks.serve_vs_llama_server --model qwen2.5-1.5b-instruct --rounds 3

Both servers run at once (idle while the other is measured) on the same GGUF, threads, 4 slots, context per
slot, batch sizes, flash attention off and no mmap (edgemed's device-profile defaults, passed to
llama-server explicitly). Every request is the same ``/v1/completions`` body for both: the question
rendered through the GGUF's chat template once, greedy, ``max_tokens`` fixed, streaming with usage,
``cache_prompt: false`` for llama-server and ``--no-prefix-cache`` for edgemed: both compute every prompt cold, so
the figures compare decoding and prefill, not prompt reuse.

Load: closed loop, N client threads (N = 1, 2, 4, 8), each sending ``--requests`` requests back to back
(httpx, raw SSE: no client-side JSON beyond each chunk). Rounds interleave levels and servers (the
order of the servers flips every round), so both see the same shared-box load; ``os.getloadavg()``
is kept before and after each run and the best of the rounds is reported per level and server.

Figures per level (all measured by the client, the same way for both servers):
- decode tok/s: llama-server's definition (``timings.predicted_per_second`` = tokens after the first /
  time from the first to the last token of a request), per request, median, times the streams that
  decode at once (min(N, slots)); llama-server's own reported value is kept beside it as a check;
- end-to-end tok/s: all completion tokens / wall time of the level (prompts and queueing included);
- per-stream tok/s (the median above), TTFT p50/p99 (send -> first text chunk).
Then the prefill check: 3 streams decoding, one ~1,500-token prompt arrives; the running streams'
inter-token time before the long prompt was sent against while it was being prefilled (send -> its
first token). Results: benchmarks/results/serve_vs_llama_server-<model>-t<threads>.{json,md}.

This study compares the engines under the same settings. For llama-server as a user runs it (its own defaults,
``cache_prompt`` as clients send it, the official openai client), and for prompt reuse, see ``serve_workloads``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from edgemed.benchmarks.serve_bench_client import (LlamaServer, EdgemedServer, add_server_arg, long_prompt, matched_extra_buffers, prefill_check, run_level, ttft_cell,
                                                    save_results, settle)
from edgemed.benchmarks.serve_streams import QUESTIONS, percentile
from edgemed.benchmarks.provenance import machine, paired, paired_ratios, range_cell

LEVELS = (1, 2, 4, 8)
SLOTS = 4
GOALS = {1: 0.97, 2: None, 4: 0.95, 8: 0.95}


def model_path(name: str) -> Path:
    if name.endswith(".gguf"):
        return Path(name)
    from edgemed.converters.source import pip_models

    return Path(pip_models.gguf_file(name))


def summarize(rows: list[dict], streams: int, wall: float) -> dict:
    per = [r["decode_tok_s"] for r in rows if r["decode_tok_s"]]
    reported = [r["server_tok_s"] for r in rows if r.get("server_tok_s")]
    ttft = [r["ttft_s"] for r in rows]
    return {"streams": streams, "requests": len(rows), "completion_tokens": sum(r["tokens"] for r in rows),
            "finish": _count(r["finish"] for r in rows),
            "decode_tok_s": min(streams, SLOTS) * statistics.median(per),
            "server_reported_decode_tok_s": (min(streams, SLOTS) * statistics.median(reported)) if reported else None,
            "per_stream_tok_s": statistics.median(per), "e2e_tok_s": sum(r["tokens"] for r in rows) / wall,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99), "wall_s": wall}


def _count(items) -> dict:
    out: dict = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


def _r(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def summarize_levels(runs: dict, names: list[str]) -> dict:
    """Per level: each server's runs and its best run (highest decode tok/s, shown as that server's figures), and,
    with both servers, the edgemed / llama-server ratios taken inside each round (``provenance.paired``): the
    level's ``ratio_decode`` / ``ratio_e2e`` are the medians of those per-round ratios, judged against the goal."""
    out = {}
    for n, by_name in runs.items():
        lv: dict = {}
        for name in names:
            rs = by_name[name]
            lv[name] = {"best": _r(max(rs, key=lambda x: x["decode_tok_s"])),
                        "decode_tok_s_runs": [round(x["decode_tok_s"], 2) for x in rs],
                        "e2e_tok_s_runs": [round(x["e2e_tok_s"], 2) for x in rs], "runs": [_r(x) for x in rs]}
        if "edgemed" in names and "llama-server" in names:
            goal = GOALS.get(int(n))
            for key, short in (("decode_tok_s", "decode"), ("e2e_tok_s", "e2e")):
                p = paired(paired_ratios(by_name["edgemed"], by_name["llama-server"], key), goal if short == "decode" else None)
                lv[f"ratio_{short}"] = p["median"]
                lv[f"ratio_{short}_paired"] = p
            lv["goal"] = goal
        out[str(n)] = lv
    return out


def rerender(path: Path) -> None:
    """Recompute a stored result's level summary from its runs (kept per round in the JSON) and write the JSON and
    its page again; nothing is measured."""
    import json

    result = json.loads(path.read_text())
    names = [k for k in ("edgemed", "llama-server") if any(k in lv for lv in result["levels"].values())]
    result["levels"] = summarize_levels({n: {name: lv[name]["runs"] for name in names}
                                         for n, lv in result["levels"].items()}, names)
    save_results(path, result, report_md(result))


def _ratio_cell(lv: dict) -> str:
    """decode and e2e ratio cells: paired medians with their range, the goal and the rounds that miss it. A result
    stored before the ratios were paired has no ``ratio_decode_paired``: its single figures are shown as they are."""
    pd, pe = lv.get("ratio_decode_paired"), lv.get("ratio_e2e_paired")
    if pd is None:
        return f"{lv['ratio_decode']:.3f}x, {lv['ratio_e2e']:.3f}x" + (f" (goal {lv['goal']})" if lv["goal"] else "")
    cell = f"decode {range_cell(pd)}, e2e {range_cell(pe)}"
    if lv.get("goal"):
        cell += f" (goal {lv['goal']}: {'met' if pd['goal_met'] else 'not met'}"
        miss = pd.get("rounds_missing_goal")
        cell += (f"; {miss} of {len(pd['per_round'])} rounds miss it)" if miss else ")")
    return cell


def report_md(result: dict) -> str:
    m = result
    lines = [f"# edgemed serve vs llama-server: {m['model']}", "",
             f"{m['threads']} threads, {SLOTS} slots, {m['n_ctx_per_slot']} tokens per slot, greedy, {m['max_tokens']} "
             f"tokens per request, {m['requests_per_stream']} requests per stream (closed loop), {m['rounds']} "
             f"interleaved rounds: each server's row is its best round; the ratios are taken inside each round (the "
             f"two servers' runs of the same round, under the same load), their median with the range over the rounds, "
             f"and the goal is judged on the median. Shared {m['machine']['cpu_count']}-CPU box: load averages per run "
             f"are in the JSON.",
             "", f"Command: `{m['command']}`", ""]
    if m["levels"]:
        lines += ["| streams | server | decode tok/s (runs) | llama-server reported | per stream | e2e tok/s | TTFT p50 / p99 (n requests) | load avg | ratio (decode, e2e) |",
                  "|---|---|---|---|---|---|---|---|---|"]
    for n, lv in m["levels"].items():
        for name in [k for k in ("edgemed", "llama-server") if k in lv]:
            b = lv[name]["best"]
            runs = ", ".join(f"{x:.1f}" for x in lv[name]["decode_tok_s_runs"])
            rep = f"{b['server_reported_decode_tok_s']:.1f}" if b.get("server_reported_decode_tok_s") else "-"
            ratio = (_ratio_cell(lv) if name == "edgemed" and "ratio_decode" in lv else "")
            lines.append(f"| {n} | {name} | {b['decode_tok_s']:.1f} ({runs}) | {rep} | {b['per_stream_tok_s']:.1f} | "
                         f"{b['e2e_tok_s']:.1f} | {ttft_cell(b['ttft_p50_s'], b['ttft_p99_s'], b.get('requests'))} | "
                         f"{b['loadavg'][0]:.1f}-{b['loadavg'][1]:.1f} | {ratio} |")
    if m.get("prefill"):
        lines += ["", f"Prefill check: {m['prefill_prompt_tokens']} prompt tokens arriving while 3 streams decode.", "",
                  "| server | inter-token before (median) | during prefill (mean / max) | growth (mean, max) | long prompt TTFT |",
                  "|---|---|---|---|---|"]
        for name, p in m["prefill"].items():
            lines.append(f"| {name} | {1000 * p['gap_before_s']:.0f} ms | {1000 * p['gap_during_mean_s']:.0f} / "
                         f"{1000 * p['gap_during_max_s']:.0f} ms | {p['growth_mean']:.2f}x, {p['growth_max']:.2f}x | "
                         f"{p['long_ttft_s']:.2f} s |")
    if m.get("edgemed_step_profile"):
        lines += ["", "edgemed's scheduler, from its /metrics over the whole run: " + ", ".join(
            f"{k} {v}" for k, v in m["edgemed_step_profile"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b-instruct", help="an installed example model name or a .gguf path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=96, help="max new tokens per request (greedy)")
    ap.add_argument("--requests", type=int, default=2, help="requests each client stream sends, back to back")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every level (0: only the prefill check)")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)))
    ap.add_argument("--ctx", type=int, default=2048, help="context per slot (the prefill check needs > 1,500)")
    ap.add_argument("--prefill-tokens", type=int, default=1500, help="0 skips the prefill check")
    ap.add_argument("--only", choices=("edgemed", "llama-server"), help=argparse.SUPPRESS)
    add_server_arg(ap)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--rerender", type=Path, metavar="JSON",
                    help="recompute a stored result's ratios from its per-round runs and rewrite its JSON and page")
    args = ap.parse_args(argv)
    if args.rerender:
        return rerender(args.rerender)

    from edgemed.benchmarks import anchors
    from edgemed.runtime.llamacpp import Model

    path = model_path(args.model)
    vocab = Model(path, vocab_only=True)
    prompts = [vocab.render_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    long_text = long_prompt(vocab, args.prefill_tokens) if args.prefill_tokens else None
    n_long = len(vocab.tokenize(long_text, True, True)) if long_text else 0
    vocab.close()
    levels = [int(x) for x in args.levels.split(",")] if args.rounds else []  # --rounds 0: the prefill check alone
    common = dict(path=path, threads=args.threads, slots=SLOTS, ctx_per_slot=args.ctx)
    servers = {}
    if args.only in (None, "edgemed"):
        # the kernels llama-server runs: with --no-repack, edgemed without its extra buffers too
        servers["edgemed"] = EdgemedServer(**common, extra_buffers=matched_extra_buffers(args.server_arg))
    if args.only in (None, "llama-server"):
        servers["llama-server"] = LlamaServer(anchors.binaries()["llama-server"], extra=args.server_arg, **common)
    runs: dict = {n: {name: [] for name in servers} for n in levels}
    prefill: dict = {}
    try:
        for s in servers.values():
            s.start()
        for s in servers.values():  # warm-up: one short request each, not timed
            run_level(s, prompts, 1, 1, 8)
        profile0 = servers["edgemed"].scheduler_metrics() if "edgemed" in servers else {}
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(servers)[::-1]
            for n in levels:
                for name in order:
                    settle_s = settle(servers.values())
                    load0 = os.getloadavg()
                    t0 = time.perf_counter()
                    rows = run_level(servers[name], prompts, n, args.requests, args.tokens)
                    wall = time.perf_counter() - t0
                    s = summarize(rows, n, wall) | {"loadavg": (load0[0], os.getloadavg()[0]), "round": r,
                                                    "settle_s": settle_s}
                    runs[n][name].append(s)
                    print(f"round {r} {name:>12s} {n} streams: decode {s['decode_tok_s']:.1f} tok/s, "
                          f"e2e {s['e2e_tok_s']:.1f}, TTFT p50 {s['ttft_p50_s']:.2f}s, load {load0[0]:.1f}", flush=True)
        profile1 = servers["edgemed"].scheduler_metrics() if "edgemed" in servers else {}
        if long_text:
            for name in servers:
                settle(servers.values())
                load0 = os.getloadavg()
                prefill[name] = prefill_check(servers[name], prompts, long_text, args.tokens) | {
                    "loadavg": (load0[0], os.getloadavg()[0])}
                print(f"prefill check {name}: {prefill[name]}", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    out_levels = summarize_levels({n: runs[n] for n in levels}, list(servers))
    step = {}
    if profile1:
        d = {k: profile1[k] - profile0.get(k, 0.0) for k in profile1}
        if d.get("step_seconds_total"):
            step = {"steps": int(d.get("decode_steps_total", 0)),
                    "share_in_llama_decode": round(d["decode_seconds_total"] / d["step_seconds_total"], 4),
                    "ms_per_step": round(1000 * d["step_seconds_total"] / max(d.get("decode_steps_total", 1), 1), 2),
                    "ms_outside_decode_per_step": round(1000 * (d["step_seconds_total"] - d["decode_seconds_total"])
                                                        / max(d.get("decode_steps_total", 1), 1), 3),
                    "idle_share": round(d.get("idle_seconds_total", 0.0) / max(d.get("wall_seconds", 1), 1e-9), 4)}
    described = {k: s.describe() for k, s in servers.items()}
    anchor_info = (described.get("llama-server") or {}).get("system_info")
    result = {"model": path.name, "model_path": str(path), "threads": args.threads, "slots": SLOTS,
              "n_ctx_per_slot": args.ctx, "max_tokens": args.tokens, "requests_per_stream": args.requests,
              "rounds": args.rounds, "levels": out_levels, "prefill_prompt_tokens": n_long, "prefill": prefill,
              "edgemed_step_profile": step, "servers": described,
              "same_cpu_features": anchors.same_cpu_features(anchor_info) if anchor_info else None,
              "command": "python -m edgemed.benchmarks.serve_vs_llama_server " + " ".join(argv or __import__("sys").argv[1:]),
              "machine": machine()}
    out = args.out or Path(__file__).resolve().parent / "results" / f"serve_vs_llama_server-{path.stem}-t{args.threads}.json"
    save_results(out, result, report_md(result))


if __name__ == "__main__":
    main()
