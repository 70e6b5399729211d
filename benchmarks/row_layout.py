"""Which ways of feeding a prompt give a row the very K and V a cold one-call prefill gives it.

    python -m edgemed.benchmarks.row_layout                                   # Qwen2.5-1.5B Q4_K_M, 2 threads
    python -m edgemed.benchmarks.row_layout --model qwen2.5-0.5b-instruct --length 700

Prefix reuse is exact only where every kept row was computed as a cold run computes it: a row's K and V can depend,
in the last bits, on how the call that computed it was laid out, and a greedy answer can then turn on it. This
measures that on the loaded build and model. One prompt of ``--length`` tokens (the shipped medical passages, then
the conversation cases) is fed once cold, in one ``llama_decode`` (cut by llama.cpp into micro-batches of
``--ubatch`` rows), and then in other layouts, each from empty cells: split into two or more calls at given
positions, or in one call beside a second sequence. Per layout: the largest difference of the last row's logits
from the cold run's (0: bit for bit) and whether ``--greedy`` greedy tokens after it are the same. The context has
a KV stream per sequence, as the server's (``kv_unified = false``), and the profile's weight placement
(``loader.load_model``: the self-test's choice).
Results: benchmarks/results/row_layout/<model>-t<threads>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def layouts(length: int, ubatch: int) -> dict[str, list[int]]:
    """Name -> the positions where the prompt is cut into calls (``[]``: one call). Cuts past the prompt are left out."""
    u = ubatch
    cuts = {
        f"one micro-batch, then the rest ({u})": [u],
        f"a micro-batch and 32 rows ({u + 32})": [u + 32],
        f"a micro-batch and 8 rows ({u + 8})": [u + 8],
        f"a micro-batch and 4 rows ({u + 4})": [u + 4],
        f"every 4 rows past a micro-batch ({u + 4}, {u + 8}, ..., {u + 56})": list(range(u + 4, u + 60, 4)),
        "100 rows, then the rest (100)": [100],
        "every 32 rows": list(range(32, length, 32)),
        "every 16 rows": list(range(16, length, 16)),
        "37 rows, then 253 (37, 290)": [37, 290],
        f"{u + 1} rows, then the rest ({u + 1})": [u + 1],
        "a 2-row piece (100, 102)": [100, 102],
        "one row alone (100, 101)": [100, 101],
        f"{length - 3} rows, then 3": [length - 3],
    }
    kept = {name: [c for c in at if 0 < c < length] for name, at in cuts.items()}
    return {name: at for name, at in kept.items() if at}  # a layout whose cuts are all past the prompt is the cold one


def measure(model, load, ids: list[int], other: list[int], length: int, greedy: int) -> tuple[list[dict], int, int]:
    import numpy as np

    from edgemed.runtime.llamacpp import Batch, Context

    from dataclasses import replace

    # one call may carry both sequences' prompts: n_batch holds them, the micro-batch stays the profile's
    load = replace(load, n_batch=max(load.n_batch, 2 * length))
    ctx = Context(model, load, n_ctx=2 * load.n_ctx, n_seq_max=2, kv_unified=False)
    batch = Batch(ctx.lib, ctx.n_batch)
    prompt = ids[:length]

    def run(calls: list[list[tuple[int, int, int]]]) -> tuple[np.ndarray, list[int], float]:
        """``calls``: per call, (sequence, start, end) pieces; sequence 0 is the prompt, 1 the other text."""
        ctx.clear()
        t0, row = time.perf_counter(), None
        for call in calls:
            batch.clear()
            for seq, start, end in call:
                text = prompt if seq == 0 else other
                for p in range(start, end):
                    last = seq == 0 and p == length - 1
                    index = batch.add(text[p], p, seq, last)
                    row = index if last else row
            if ctx.decode(batch) != 0:
                raise RuntimeError("llama_decode failed")
        logits = ctx.logits(row)
        out, pos, current = [], length, logits
        for _ in range(greedy):
            out.append(int(np.argmax(current)))
            batch.clear()
            batch.add(out[-1], pos, 0, True)
            pos += 1
            if ctx.decode(batch) != 0:
                raise RuntimeError("llama_decode failed")
            current = ctx.logits(-1)
        return logits, out, time.perf_counter() - t0

    try:
        cold, cold_ids, seconds = run([[(0, 0, length)]])
        rows = [{"layout": "cold: one call", "cuts": [], "max_abs_diff": 0.0, "greedy_same": True, "seconds": seconds}]
        shapes = {name: [[(0, a, b)] for a, b in zip([0, *at], [*at, length])]
                  for name, at in layouts(length, ctx.n_ubatch).items()}
        shapes["one call beside a second sequence (it first)"] = [[(1, 0, length), (0, 0, length)]]
        shapes["one call beside a second sequence (it second)"] = [[(0, 0, length), (1, 0, length)]]
        shapes["a second sequence's call before"] = [[(1, 0, length)], [(0, 0, length)]]
        for name, calls in shapes.items():
            logits, out, seconds = run(calls)
            diff = float(np.max(np.abs(logits - cold)))
            cuts = [piece[1] for call in calls for piece in call if piece[0] == 0 and piece[1]]
            rows.append({"layout": name, "cuts": cuts, "max_abs_diff": diff, "greedy_same": out == cold_ids,
                         "seconds": seconds})
            print(f"{name}: max |diff| {diff:.3g}, greedy same {out == cold_ids}", flush=True)
        return rows, ctx.n_ubatch, ctx.n_batch
    finally:
        batch.close()
        ctx.close()


def report_md(m: dict) -> str:
    lines = [f"# Which prefill layouts compute a row as a cold run does: {m['model']}", "",
             f"One {m['length']}-token prompt (medical passages), fed cold in one call, then each layout below from "
             f"empty cells; micro-batches of {m['n_ubatch']} rows (n_batch {m['n_batch']}), a KV stream per sequence, "
             f"{m['threads']} threads, weights: {m['placement']}. Host: {m['cpu']}.", "",
             f"Command: `{m['command']}`, at commit {m['commit']}.", "",
             "max |diff|: the largest difference of the prompt's last logits row from the cold run's (0: bit for bit); "
             f"greedy: whether the next {m['greedy']} greedy tokens are the cold run's.", "",
             "| layout | cuts (calls start at) | max \\|diff\\| | greedy same |", "|---|---|---|---|"]
    for r in m["rows"]:
        cuts = ", ".join(map(str, r["cuts"][:6])) + (", ..." if len(r["cuts"]) > 6 else "") if r["cuts"] else "-"
        lines.append(f"| {r['layout']} | {cuts} | {r['max_abs_diff']:.3g} | {'yes' if r['greedy_same'] else 'NO'} |")
    exact = [r["layout"] for r in m["rows"][1:] if r["max_abs_diff"] == 0.0]
    lines += ["", f"Bit for bit: {len(exact)} of {len(m['rows']) - 1} layouts."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from edgemed.benchmarks.harness.machine import llama_system_info
    from edgemed.benchmarks.serve_bench_client import save_results
    from edgemed.benchmarks.serve_conversation import CASES
    from edgemed.benchmarks.serve_vs_llama_server import model_path
    from edgemed.benchmarks.serve_workloads import code_state
    from edgemed.devices.detect import detect
    from edgemed.runtime.loader import load_model
    from edgemed.runtime.session import prepare

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-1.5b-instruct", help="a pip model name or a .gguf path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--length", type=int, default=1400, help="prompt tokens (at most what the text gives)")
    ap.add_argument("--ubatch", type=int, help="micro-batch rows (default: the profile's)")
    ap.add_argument("--greedy", type=int, default=16)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    path = model_path(args.model)
    out = args.out or (Path(__file__).resolve().parent / "results" / "row_layout" / f"{path.stem}-t{args.threads}.json")
    prepared = prepare(path, None, 2 * args.length + 2 * args.greedy, args.threads)
    load = prepared.load
    if args.ubatch:
        from dataclasses import replace

        load = replace(load, n_ubatch=args.ubatch, n_batch=max(load.n_batch, args.ubatch))
    text = (Path(__file__).resolve().parent / "harness" / "data" / "medical_text.txt").read_text(encoding="utf-8")
    model = load_model(path, load)
    try:
        ids = model.tokenize(text + "\n\n" + "\n\n".join(CASES), add_special=True)
        length = min(args.length, len(ids) // 2)
        other = ids[-length:]  # the second sequence: another text of the same length
        rows, n_ubatch, n_batch = measure(model, model.load, ids, other, length, args.greedy)
        placement = model.placement.describe()
    finally:
        model.close()
    code = code_state(("edgemed", "benchmarks/row_layout.py"))  # the runtime measured, and this script
    commit = (code["commit"] or "unknown")[:12] + (f" with {', '.join(code['changed'])} changed" if code["changed"] else "")
    m = {"model": path.name, "profile": prepared.profile, "threads": args.threads, "length": length,
         "n_ubatch": n_ubatch, "n_batch": n_batch, "greedy": args.greedy, "placement": placement,
         "cpu": f"{detect().model} (llama.cpp: `{llama_system_info()}`)", "commit": commit,
         "command": "python -m edgemed.benchmarks.row_layout " + " ".join(argv if argv is not None else sys.argv[1:]),
         "load": " / ".join(f"{x:.1f}" for x in os.getloadavg()), "rows": rows}
    save_results(out, m, report_md(m))


if __name__ == "__main__":
    main()
