"""Throughput of `edgemed serve`'s batcher with 1, 2 and 4 concurrent streams.

    python -m edgemed.benchmarks.serve_streams                       # Qwen2.5-0.5B Q4_K_M, 1 thread
    python -m edgemed.benchmarks.serve_streams --model x.gguf --threads 2 --rounds 3

Each level runs in a fresh process with the same batcher (4 slots, greedy, the same
medical prompts through the model's chat template, a short warm-up request excluded).
A level is ``--waves`` waves of N requests submitted at once; their prompts are
processed in one step, then the N sequences decode together. Per level:

- aggregate decode tok/s = tokens after each request's first / time from the wave's
  last first token to its last token (summed over waves) — the goal's figure;
- end-to-end tok/s = all completion tokens / wall time of the waves (prompts included);
- per-stream tok/s = median over requests of (tokens - 1) / (total - TTFT);
- TTFT p50 / p99 over all requests (submit -> first token; N prompts share a step);
- bare decode: the kernels' ceiling, bare ``llama_decode`` of one token for each
  of N sequences per step in the same context shape (no scheduler, no sampling),
  so the batcher's own cost and the hardware's limit can be told apart.

Rounds interleave the levels; the best aggregate of each level is reported, with
every run and the load average around it (the box is shared). Goal:
4 streams >= 2.0x the 1-stream aggregate. Results: benchmarks/results/serve_streams-<model>-t<threads>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

LEVELS = (1, 2, 4)
SLOTS = 4
RAW_STEPS = 48
QUESTIONS = (
    "A 58-year-old woman has had fatigue, weight gain, constipation and cold intolerance for six months. "
    "Explain step by step which laboratory tests you would order first and why, then how to interpret them.",
    "Explain the pathophysiology of diabetic ketoacidosis and describe, step by step, the initial management "
    "in the emergency department, including fluids, insulin and potassium.",
    "A 70-year-old man with atrial fibrillation asks about stroke prevention. Explain how you would estimate "
    "his stroke and bleeding risk and discuss the options for anticoagulation.",
    "Describe the assessment and first-line treatment of community-acquired pneumonia in an adult, including "
    "how to decide between outpatient and hospital care.",
)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), without numpy. A NaN is refused: ``sorted`` would leave it
    where it stood (NaN compares false both ways), so the result would depend on the order of the values."""
    if any(v != v for v in values):
        raise ValueError(f"percentile of values with a NaN ({sum(v != v for v in values)} of {len(values)}): a "
                         "request without a measurement is an error, not a sample")
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def child(path: str, streams: int, waves: int, tokens: int, threads: int, n_ctx: int) -> dict:
    from edgemed.runtime import GenerationSettings
    from edgemed.runtime.engine import LoadSettings
    from edgemed.runtime.batch.batcher import Batcher, Finished, Piece

    load = LoadSettings(n_ctx=n_ctx, n_threads=threads, n_batch=512, n_ubatch=512)
    settings = GenerationSettings(max_tokens=tokens)
    done: list[dict] = []
    decoded = window = e2e_wall = 0.0
    # prefix_cache off: the same questions come back every wave, and this study measures decoding, not prompt reuse
    with Batcher(Path(path), load, slots=SLOTS, queue_size=16, prefix_cache=False) as batcher:
        prompts = [batcher.render_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
        list(batcher.submit(prompts[0], GenerationSettings(max_tokens=8), request_id="warm-up"))
        load0 = os.getloadavg()[0]
        steps0 = batcher.stats()["decode_steps_total"]
        for w in range(waves):
            t0 = time.perf_counter()  # all N submitted at once; the batcher buffers what nobody reads yet
            wave = [(k, batcher.submit(prompts[k], settings, request_id=f"w{w}s{i}"))
                    for i, k in enumerate((w * streams + i) % len(prompts) for i in range(streams))]
            rows = []
            for k, stream in wave:
                items = list(stream)
                fin = items[-1]
                assert isinstance(fin, Finished) and fin.finish_reason in ("stop", "length"), fin
                text = "".join(i.text for i in items if isinstance(i, Piece))
                rows.append({"prompt": k, "finish": fin.finish_reason, "prompt_tokens": fin.prompt_tokens,
                             "tokens": fin.completion_tokens, "ttft_s": fin.ttft_s, "total_s": fin.total_s,
                             "text_sha": hashlib.sha256(text.encode()).hexdigest()[:16]})
            first, last = max(r["ttft_s"] for r in rows), max(r["total_s"] for r in rows)
            decoded += sum(r["tokens"] - 1 for r in rows)
            window += last - first
            e2e_wall += time.perf_counter() - t0
            done += rows
        steps = batcher.stats()["decode_steps_total"] - steps0
    per_stream = [(d["tokens"] - 1) / (d["total_s"] - d["ttft_s"]) for d in done if d["tokens"] > 1]
    ttft = [d["ttft_s"] for d in done]
    return {"streams": streams, "requests": len(done), "completion_tokens": sum(d["tokens"] for d in done),
            "aggregate_tok_s": decoded / window, "e2e_tok_s": sum(d["tokens"] for d in done) / e2e_wall,
            "per_stream_tok_s": statistics.median(per_stream),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99), "decode_steps": steps,
            "loadavg_before": load0, "loadavg_after": os.getloadavg()[0], "runs": sorted(done, key=lambda d: d["prompt"])}


def raw_child(path: str, streams: int, steps: int, threads: int, n_ctx: int) -> dict:
    """The kernel's ceiling: bare ``llama_decode`` of one token for each of ``streams`` sequences per step."""
    from edgemed.runtime.engine import LoadSettings
    from edgemed.runtime.llamacpp import Batch, Context
    from edgemed.runtime.loader import load_model

    load = LoadSettings(n_ctx=n_ctx, n_threads=threads, n_batch=512, n_ubatch=512)
    model = load_model(Path(path), load)
    ctx = Context(model, load, n_ctx=SLOTS * (n_ctx // SLOTS), n_seq_max=SLOTS, kv_unified=False)
    batch = Batch(model.lib, 512)
    try:
        # each sequence its own question (own tokens, own positions), fed back as if generated
        prompts = [model.tokenize(QUESTIONS[s % len(QUESTIONS)], True, True) for s in range(streams)]
        batch.clear()
        for s, prompt in enumerate(prompts):
            for j, tok in enumerate(prompt):
                batch.add(tok, j, s, False)
        assert ctx.decode(batch) == 0
        t0 = 0.0
        for k in range(steps + 4):  # 4 warm-up steps
            if k == 4:
                t0 = time.perf_counter()
            batch.clear()
            for s, prompt in enumerate(prompts):
                batch.add(prompt[k % len(prompt)], len(prompt) + k, s, True)
            assert ctx.decode(batch) == 0
        wall = time.perf_counter() - t0
    finally:
        batch.close()
        ctx.close()
        model.close()
    return {"streams": streams, "steps": steps, "step_ms": 1000 * wall / steps, "aggregate_tok_s": streams * steps / wall}


def _default_model(name: str) -> Path:
    """The repo's own Q4_K_M conversion of the example model (converted once, cached)."""
    from edgemed import env
    from edgemed.converters.source import pip_models

    ckpt = pip_models.hf_checkpoint(name)
    out = env.cache_dir("bench") / f"{ckpt.name}-q4_k_m.gguf"
    if not out.exists():
        print(f"converting {ckpt.name} -> {out.name} ...", flush=True)
        subprocess.run([sys.executable, "-m", "edgemed", "convert", str(ckpt), "--quant", "q4_k_m", "--no-parity",
                        "-o", str(out)], check=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a .gguf path, or an example model name (default qwen2.5-0.5b-instruct, converted to Q4_K_M)",
                    default="qwen2.5-0.5b-instruct")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128, help="max new tokens per request (greedy)")
    ap.add_argument("--waves", type=int, default=2, help="waves of N simultaneous requests per level")
    ap.add_argument("--rounds", type=int, default=2, help="fresh-process runs per level, interleaved; best is reported")
    ap.add_argument("--ctx", type=int, default=SLOTS * 1024, help="KV cache for all slots together")
    ap.add_argument("--out", type=Path, help="results file (default benchmarks/results/serve_streams-<model>-t<threads>.json)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child and args.raw:
        print(json.dumps(raw_child(args.model, args.child, RAW_STEPS, args.threads, args.ctx)))
        return
    if args.child:
        print(json.dumps(child(args.model, args.child, args.waves, args.tokens, args.threads, args.ctx)))
        return

    from edgemed.files.atomic import write_text

    path = Path(args.model) if args.model.endswith(".gguf") else _default_model(args.model)
    runs: dict[int, list[dict]] = {n: [] for n in LEVELS}
    raws: dict[int, list[dict]] = {n: [] for n in LEVELS}
    for _ in range(args.rounds):
        for n in LEVELS:
            for kind, into in (([], runs), (["--raw"], raws)):
                cmd = [sys.executable, "-m", "edgemed.benchmarks.serve_streams", "--model", str(path), "--child", str(n),
                       "--waves", str(args.waves), "--tokens", str(args.tokens), "--threads", str(args.threads),
                       "--ctx", str(args.ctx), *kind]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{n}-stream run failed:\n{proc.stderr[-3000:]}")
                into[n].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    best = {n: max(rs, key=lambda r: r["aggregate_tok_s"]) for n, rs in runs.items()}
    raw = {n: max(rs, key=lambda r: r["aggregate_tok_s"]) for n, rs in raws.items()}
    base, raw_base = best[1]["aggregate_tok_s"], raw[1]["aggregate_tok_s"]
    ref = {r["prompt"]: r["text_sha"] for r in best[1]["runs"]}
    print(f"{path.name}: {SLOTS} slots, greedy, <= {args.tokens} new tokens, {args.waves} waves per level, "
          f"{args.threads} threads, best of {args.rounds} fresh processes ({os.cpu_count()} CPUs, shared)")
    print(f"  {'streams':>7s} {'decode tok/s':>12s} {'(runs)':>12s} {'e2e tok/s':>9s} {'per-stream':>10s} {'TTFT p50':>9s} "
          f"{'TTFT p99':>9s} {'speedup':>8s} {'bare decode tok/s':>17s} {'bare speedup':>12s} {'same text':>9s} {'load avg':>9s}")
    levels = {}
    for n in LEVELS:
        b = best[n]
        comparable = [r for r in b["runs"] if r["prompt"] in ref]
        same = sum(ref[r["prompt"]] == r["text_sha"] for r in comparable)
        levels[str(n)] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in b.items() if k != "runs"}
        levels[str(n)].update(speedup=round(b["aggregate_tok_s"] / base, 3),
                              same_text_as_1_stream=f"{same}/{len(comparable)}",
                              aggregate_tok_s_runs=[round(r["aggregate_tok_s"], 2) for r in runs[n]],
                              bare_decode=raw[n] | {"speedup": round(raw[n]["aggregate_tok_s"] / raw_base, 3),
                                                    "aggregate_tok_s_runs": [round(r["aggregate_tok_s"], 2) for r in raws[n]]},
                              requests_detail=b["runs"])
        runs_txt = ", ".join(f"{r['aggregate_tok_s']:.1f}" for r in runs[n])
        print(f"  {n:>7d} {b['aggregate_tok_s']:>12.1f} {runs_txt:>12s} {b['e2e_tok_s']:>9.1f} {b['per_stream_tok_s']:>10.1f} "
              f"{b['ttft_p50_s']:>8.2f}s {b['ttft_p99_s']:>8.2f}s {b['aggregate_tok_s'] / base:>7.2f}x "
              f"{raw[n]['aggregate_tok_s']:>17.1f} {raw[n]['aggregate_tok_s'] / raw_base:>11.2f}x "
              f"{same:>5d}/{len(comparable):<3d} {b['loadavg_before']:>4.1f}-{b['loadavg_after']:.1f}")
    speedup4 = best[4]["aggregate_tok_s"] / base
    print(f"  aggregate decode, 4 streams / 1 stream = {speedup4:.2f}x (goal >= 2.0x): {'met' if speedup4 >= 2.0 else 'NOT met'}; "
          f"bare llama_decode with 4 vs 1 tokens per step: {raw[4]['aggregate_tok_s'] / raw_base:.2f}x (the kernels' ceiling)")
    result = {"model": path.name, "model_path": str(path), "slots": SLOTS, "threads": args.threads,
              "max_tokens": args.tokens, "waves": args.waves, "rounds": args.rounds, "n_ctx": args.ctx,
              "questions": list(QUESTIONS), "goal_speedup_4_streams": 2.0, "speedup_4_streams": round(speedup4, 3),
              "bare_decode_speedup_4_streams": round(raw[4]["aggregate_tok_s"] / raw_base, 3),
              "levels": levels,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "note": "CPU shared with other sessions; load averages are per run"}}
    out = args.out or Path(__file__).resolve().parent / "results" / f"serve_streams-{path.stem}-t{args.threads}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(result, indent=2) + "\n", force=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
