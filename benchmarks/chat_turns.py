"""A clinician's conversation in `edgemed chat`: the wait for each turn's first words, with the earlier turns' cells
kept (the default) and with the whole history computed every turn (`edgemed chat --no-prefix-cache`).

    python -m edgemed.benchmarks.chat_turns                                   # Qwen2.5-0.5B Q4_K_M, 2 threads
    python -m edgemed.benchmarks.chat_turns --model qwen2.5-1.5b-instruct --rounds 2
    python -m edgemed.benchmarks.chat_turns --model smollm2-135m-instruct --turns 3 --rounds 1   # a smoke run

The workload is ``serve_conversation``'s for one clinician: its system message, a whole case (460-500 tokens on
Qwen2.5) as the first message, then its follow-up questions, ``--max-tokens`` greedy tokens per answer (96), the
whole history rendered by the model's chat template every turn, as `edgemed chat` does (``session.respond``, the
answer channel kept in the history). One process, one engine loaded with the detected profile's settings
(``session.prepare``), the two ways alternating by round (the order flips every round); each conversation starts
from empty cells and opens with a line of its own. Per turn: prompt tokens, tokens kept from the turn before,
first-token time (the call to the first text) and the turn's whole time; the median over rounds is reported, every
round is in the JSON. Greedy answers must be the same both ways: ``answers_identical``.
Results: benchmarks/results/chat_turns/<model>-t<threads>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from edgemed.benchmarks.serve_conversation import CASES, FOLLOW_UPS, SYSTEM

WAYS = ("kept", "whole")  # prefix_reuse on / off


def conversation(engine, opening: str, turns: int, max_tokens: int, reuse: bool) -> list[dict]:
    """One conversation from empty cells: per turn, its prompt and kept tokens, first-token and turn seconds, answer."""
    from edgemed.runtime import GenerationSettings
    from edgemed.runtime.session import respond
    from edgemed.templates.think import ThinkPolicy

    engine.prefix_reuse = reuse
    engine.ctx.clear()
    settings = GenerationSettings(max_tokens=max_tokens)
    history, rows = [{"role": "system", "content": SYSTEM}], []
    for turn in range(turns):
        question = f"{opening} {CASES[0]}" if turn == 0 else FOLLOW_UPS[(turn - 1) % len(FOLLOW_UPS)]
        history.append({"role": "user", "content": question})
        prompt = engine.render_chat(history)
        ids = engine.tokenize(prompt, add_special=True, parse_special=True)
        kept = engine.ctx.reusable(ids) if reuse else 0
        t0, first, answer = time.perf_counter(), None, []
        for channel, piece in respond(engine, prompt, settings, ThinkPolicy.parse("hide")):
            first = first or time.perf_counter()
            if channel == "answer":
                answer.append(piece)
        end = time.perf_counter()
        text = "".join(answer)
        history.append({"role": "assistant", "content": text})
        rows.append({"turn": turn + 1, "prompt_tokens": len(ids), "kept_tokens": kept,
                     "ttft_s": (first or end) - t0, "turn_s": end - t0, "answer": text})
    return rows


def summarize(runs: dict[str, list[list[dict]]], turns: int) -> list[dict]:
    """Per turn: the median first-token and turn seconds of each way over the rounds, and kept / whole."""
    out = []
    for t in range(turns):
        row = {"turn": t + 1, "prompt_tokens": runs["whole"][0][t]["prompt_tokens"],
               "kept_tokens": runs["kept"][0][t]["kept_tokens"]}
        for way in WAYS:
            row[f"{way}_ttft_s"] = statistics.median(r[t]["ttft_s"] for r in runs[way])
            row[f"{way}_turn_s"] = statistics.median(r[t]["turn_s"] for r in runs[way])
        row["ttft_ratio"] = row["kept_ttft_s"] / row["whole_ttft_s"]
        out.append(row)
    return out


def report_md(m: dict) -> str:
    lines = [f"# A clinician's conversation in `edgemed chat`: {m['model']}", "",
             f"One clinician, {m['turns']} turns, {m['max_tokens']}-token greedy answers, the whole history resent "
             f"each turn; profile `{m['profile']}`, {m['threads']} threads, context {m['n_ctx']}, micro-batch "
             f"{m.get('n_ubatch', 'as profiled')}; median of "
             f"{m['rounds']} round(s), the two ways alternating. Host: {m['cpu']}; load average at the start "
             f"{m['load_start']}, at the end {m['load_end']}.", "",
             f"Command: `{m['command']}`", "",
             "kept: the earlier turns' cells kept (the default); whole: `--no-prefix-cache`, every turn computed "
             "from its first token.", "",
             "| turn | prompt tokens | kept from the turn before | first token, kept (s) | first token, whole (s) "
             "| kept / whole | turn, kept (s) | turn, whole (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in m["per_turn"]:
        lines.append(f"| {r['turn']} | {r['prompt_tokens']} | {r['kept_tokens']} | {r['kept_ttft_s']:.2f} | "
                     f"{r['whole_ttft_s']:.2f} | {r['ttft_ratio']:.3f}x | {r['kept_turn_s']:.2f} | {r['whole_turn_s']:.2f} |")
    total = {way: sum(r[f"{way}_turn_s"] for r in m["per_turn"]) for way in WAYS}
    lines += ["", f"Whole conversation: {total['kept']:.1f} s kept, {total['whole']:.1f} s whole. "
              f"Answers the same both ways: {'yes' if m['answers_identical'] else 'NO'}.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    from edgemed.benchmarks.serve_bench_client import save_results
    from edgemed.benchmarks.serve_vs_llama_server import model_path
    from edgemed.runtime.session import open_with_adapters, prepare

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b-instruct", help="a pip model name or a .gguf path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--ubatch", type=int, help="llama.cpp's micro-batch (the unit kept cells are reused by; default: "
                    "the profile's)")
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    path = model_path(args.model)
    out = args.out or (Path(__file__).resolve().parent / "results" / "chat_turns" / f"{path.stem}-t{args.threads}.json")
    prepared = prepare(path, None, args.ctx, args.threads)
    load_start = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    runs: dict[str, list[list[dict]]] = {way: [] for way in WAYS}
    load = prepared.load
    if args.ubatch:
        from dataclasses import replace

        load = replace(load, n_ubatch=args.ubatch)
    engine = open_with_adapters(path, load)
    n_ubatch = engine.ctx.n_ubatch  # read back from llama.cpp
    try:
        for rnd in range(args.rounds):
            for way in (WAYS if rnd % 2 == 0 else WAYS[::-1]):
                rows = conversation(engine, f"(Case {rnd + 1}.)", args.turns, args.max_tokens, way == "kept")
                runs[way].append(rows)
                print(f"round {rnd} {way}: " + ", ".join(f"t{r['turn']} {r['ttft_s']:.2f}s" for r in rows)
                      + " (first token)", flush=True)
    finally:
        engine.close()
    same = all(a["answer"] == b["answer"] for rk, rw in zip(runs["kept"], runs["whole"]) for a, b in zip(rk, rw))
    from edgemed.benchmarks.harness.machine import llama_system_info
    from edgemed.devices.detect import detect

    cpu = f"{detect().model} (llama.cpp: `{llama_system_info()}`)"
    m = {"model": path.name, "profile": prepared.profile, "threads": args.threads, "n_ctx": args.ctx, "n_ubatch": n_ubatch,
         "turns": args.turns, "max_tokens": args.max_tokens, "rounds": args.rounds, "cpu": cpu,
         "command": "python -m edgemed.benchmarks.chat_turns " + " ".join(argv if argv is not None else sys.argv[1:]),
         "load_start": load_start, "load_end": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
         "answers_identical": same, "per_turn": summarize(runs, args.turns), "runs": runs}
    save_results(out, m, report_md(m))


if __name__ == "__main__":
    main()
