"""Decode speed of the `edgemed run` path vs a bare llama.cpp decode loop on the same file and threads.

    python -m edgemed.benchmarks.run_overhead                       # SmolLM2 and Qwen2.5-0.5B, 1 thread
    python -m edgemed.benchmarks.run_overhead --threads 2 --rounds 5

Each measurement is a fresh process. Both sides get the same rendered chat prompt
(a MedMCQA-style question through the model's chat template), the same n_ctx,
n_batch, n_ubatch and thread count, greedy decoding and the same max tokens, so
they produce the same tokens. The bare side is ``llama_decode`` + argmax on the
llama.cpp layer's context, with no sampler chain, stop strings or text streaming. Decode tok/s = (tokens - 1) / (time of last piece -
time of first piece): prompt processing and load are excluded. Rounds alternate
bare / edgemed; the best of each side is compared. Goal: edgemed >= 0.97x bare.
Results go to benchmarks/results/run_overhead.json; a model not installed or a failed child is listed in its
``failed`` with exit status 1, and a run with fewer rows does not replace that file (``study_output``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from edgemed.benchmarks import study_output

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "run_overhead.json"
QUESTION = ("A 58-year-old woman has had fatigue, weight gain, constipation and cold intolerance for six months. "
            "Explain step by step which laboratory tests you would order first and why, then how to interpret them.")


def _settings(path, threads, n_ctx):
    from edgemed.runtime.session import prepare

    prepared = prepare(Path(path), "x86-avx2", n_ctx, threads)
    return prepared.load


def child(side: str, path: str, threads: int, n_ctx: int, max_tokens: int) -> dict:
    from edgemed.runtime import GenerationSettings, open_engine
    from edgemed.runtime.session import respond
    from edgemed.templates.think import ThinkPolicy

    load = _settings(path, threads, n_ctx)
    engine = open_engine(path, load)  # also renders the prompt, so both sides see the same text
    prompt = engine.render_chat([{"role": "user", "content": QUESTION}])
    stamps, text = [], []
    if side == "edgemed":
        settings = GenerationSettings(max_tokens=max_tokens)
        for channel, piece in respond(engine, prompt, settings, ThinkPolicy()):
            stamps.append(time.perf_counter())
            text.append(piece)
        n_tokens = len(engine.tokenize("".join(text)))
        engine.close()
    else:
        ctx, model = engine.ctx, engine.model
        ids = engine.tokenize(prompt, add_special=True, parse_special=True)
        ctx.clear()
        logits, out = ctx.eval(ids)[-1], []
        for i in range(max_tokens):
            token = int(logits.argmax())
            if model.is_eog(token):
                break
            stamps.append(time.perf_counter())
            out.append(token)
            logits = ctx.eval([token], len(ids) + i)[-1]
        text.append(model.detokenize(out))
        n_tokens = len(engine.tokenize("".join(text)))
        engine.close()
    return {"side": side, "tokens": n_tokens, "decode_s": stamps[-1] - stamps[0],
            "tok_s": (n_tokens - 1) / (stamps[-1] - stamps[0]), "text_sha": hashlib.sha256("".join(text).encode()).hexdigest()[:16]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "qwen2.5-0.5b-instruct"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "PATH"), help=argparse.SUPPRESS)
    study_output.add_arguments(ap, DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.threads, args.ctx, args.max_tokens)))
        return 0

    from edgemed.converters.source import pip_models
    from edgemed.errors import InputError

    report, failed = [], []
    for model in args.models:
        try:
            path = str(pip_models.gguf_file(model))
        except InputError as exc:
            failed.append({"arm": model, "error": f"not installed ({exc.fix})"})
            continue
        runs = {"bare": [], "edgemed": []}
        error = None
        for _ in range(args.rounds):
            for side in ("bare", "edgemed"):
                proc = subprocess.run([sys.executable, "-m", "edgemed.benchmarks.run_overhead", "--threads",
                                       str(args.threads), "--ctx", str(args.ctx), "--max-tokens", str(args.max_tokens),
                                       "--child", side, path], capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    print(f"{model} {side} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    error = error or f"{side}: {study_output.child_error(proc)}"
                    continue
                runs[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if not (runs["bare"] and runs["edgemed"]) or error:  # a side that failed once is no fair best-of-rounds
            failed.append({"arm": model, "error": error or "no run of one side"})
            continue
        same = {r["text_sha"] for r in runs["bare"] + runs["edgemed"]}
        best = {side: max(r["tok_s"] for r in rs) for side, rs in runs.items()}
        ratio = best["edgemed"] / best["bare"]
        row = {"model": model, "threads": args.threads, "n_ctx": args.ctx, "tokens": runs["bare"][0]["tokens"],
               "same_text": len(same) == 1, "bare_tok_s": best["bare"], "edgemed_tok_s": best["edgemed"],
               "ratio": ratio, "runs": runs}
        report.append(row)
        print(f"{model:<24} threads {args.threads}  bare {best['bare']:6.1f} tok/s  edgemed {best['edgemed']:6.1f} tok/s  "
              f"ratio {ratio:.3f} (goal >= 0.97)  same text: {len(same) == 1}", flush=True)
    return study_output.write(args, DEFAULT_OUT, {"goal_ratio": 0.97, "rows": report}, failed)


if __name__ == "__main__":
    sys.exit(main())
