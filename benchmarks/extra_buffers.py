"""Decode speed by llama.cpp extra-buffer mode: what the host-safe default costs.

    python -m edgemed.benchmarks.extra_buffers                 # Qwen2.5-0.5B and the 1.5B stand-in, Q4_K_M and Q4_0
    python -m edgemed.benchmarks.extra_buffers --rounds 3 --threads 2

For each model file and each mode (``all``: llama.cpp's default, AMX where the build has
it; ``repack``: CPU_REPACK kept, AMX off; ``none``: no extra buffer), a fresh process loads
the file with that mode, feeds a 32-token prompt, decodes 4 warm-up tokens and then times
``--tokens`` greedy ``llama_decode`` steps: tok/s = tokens / time. Rounds interleave every
(file, mode) pair so drift on a shared machine hits all alike; the best of the rounds is
reported. ``safe`` marks the mode ``auto`` resolves to on this build. A child killed by a
signal (the AMX crash) is recorded as such, not retried. The Q4_0 files are requantized
from the shipped Q4_K_M files (speed only: their accuracy is not the point here).
Results go to benchmarks/results/extra_buffers.json; a model not installed or a child that fails without a crash
signal is listed in its ``failed`` with exit status 1, and a run with fewer rows does not replace that file
(``study_output``). The summary table prints one decimal, the page's.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from edgemed.benchmarks import study_output

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "extra_buffers.json"
MODELS = ("qwen2.5-0.5b-instruct", "qwen2.5-1.5b-instruct")
MODES = ("all", "repack", "none")
PROMPT = ("A 67-year-old man with type 2 diabetes and chronic kidney disease presents with a serum potassium of "
          "6.4 mmol/L. The first step in management is")


def child(path: str, mode: str, threads: int, tokens: int) -> dict:
    from edgemed.runtime import llamacpp
    from edgemed.runtime.engine import LoadSettings

    load = LoadSettings(n_ctx=512, n_threads=threads, n_threads_batch=threads, extra_buffers=mode)
    t = time.perf_counter()
    model = llamacpp.Model(Path(path), load)  # the benchmark records crashes itself
    ctx = llamacpp.Context(model, load, n_ctx=512)
    load_s = time.perf_counter() - t
    ids = model.tokenize(PROMPT, add_special=True)[:32]
    logits = ctx.eval(ids)[-1]
    pos = len(ids)
    for _ in range(4):  # warm-up
        logits = ctx.eval([int(logits.argmax())], pos)[-1]
        pos += 1
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits = ctx.eval([int(logits.argmax())], pos)[-1]
        pos += 1
    dt = time.perf_counter() - t0
    placement = model.placement
    ctx.close()
    model.close()
    return {"tok_s": tokens / dt, "load_s": load_s, "placement": placement.describe(), "pinned": placement.pinned}


def q4_0_copy(src: Path) -> Path:
    """``src`` requantized to Q4_0 (cached beside the joined parts)."""
    import ctypes

    import llama_cpp

    from edgemed import env

    out = env.cache_dir("bench-q4_0") / (src.stem.replace("q4_k_m", "").rstrip("-.") + "-q4_0.gguf")
    if not out.exists():
        from edgemed.runtime.params import Params

        params = Params(llama_cpp.llama_model_quantize_default_params())
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.allow_requantize = True
        tmp = out.with_name(out.name + ".partial")
        from edgemed.converters.gguf.quiet import quiet

        with quiet():
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params.raw))
        if rc != 0:
            raise SystemExit(f"could not requantize {src} to Q4_0")
        tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    study_output.add_arguments(ap, DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.threads, args.tokens)))
        return 0

    from edgemed.converters.source import pip_models
    from edgemed.errors import InputError
    from edgemed.runtime import buffers
    from edgemed.runtime.llamacpp import build
    from edgemed.runtime.selftest import cpu_model

    files, failed = [], []
    for name in args.models:
        try:
            shipped = pip_models.gguf_file(name)
        except InputError as exc:
            failed += [{"arm": f"{name} {quant} {mode}", "error": f"not installed ({exc.fix})"}
                       for quant in ("q4_k_m", "q4_0") for mode in MODES]
            continue
        files += [(name, "q4_k_m", shipped), (name, "q4_0", q4_0_copy(shipped))]
    runs: dict[tuple, list] = {}
    for r in range(args.rounds):
        for name, quant, path in files:
            for mode in MODES:
                cmd = [sys.executable, "-m", "edgemed.benchmarks.extra_buffers", "--threads", str(args.threads),
                       "--tokens", str(args.tokens), "--child", str(path), mode]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode < 0:
                    row = {"crashed": signal.Signals(-proc.returncode).name}
                elif proc.returncode:  # not a crash of the mode under test: the arm failed, the others go on
                    print(f"{name} {quant} {mode} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    row = {"failed": study_output.child_error(proc)}
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                runs.setdefault((name, quant, mode), []).append(row)
                print(f"round {r + 1}: {name:<24} {quant:<7} {mode:<7} "
                      f"{row.get('crashed') or row.get('failed') or format(row['tok_s'], '.1f') + ' tok/s'}",
                      file=sys.stderr, flush=True)
    safe = buffers.resolve("auto", build())
    rows = []
    for (name, quant, mode), results in runs.items():
        errors = [x["failed"] for x in results if "failed" in x]
        if errors:  # a best-of-rounds over fewer rounds than the other modes is no fair comparison
            failed.append({"arm": f"{name} {quant} {mode}", "error": errors[0]})
            continue
        ok = [x for x in results if "tok_s" in x]
        rows.append({"model": name, "quant": quant, "mode": mode, "safe": mode == safe,
                     "best_tok_s": max((x["tok_s"] for x in ok), default=None),
                     "crashed": [x["crashed"] for x in results if "crashed" in x], "runs": results})
    # one decimal, as the results page gives them: the page copies these figures and never rounds them again
    print(f"\n{'model':<24} {'quant':<7} " + " ".join(f"{m:>14}" for m in MODES) + "   safe vs none")
    for name, quant, _ in files:
        best = {r["mode"]: r["best_tok_s"] for r in rows if r["model"] == name and r["quant"] == quant}
        cells = " ".join(f"{(format(best[m], '.1f') + ' tok/s') if best.get(m) else 'crashed' if m in best else 'failed':>14}"
                         for m in MODES)
        ratio = best[safe] / best["none"] if best.get(safe) and best.get("none") else None
        print(f"{name:<24} {quant:<7} {cells}   {'—' if ratio is None else f'{ratio:.2f}x'}")
    return study_output.write(args, DEFAULT_OUT, {
        "command": "python -m edgemed.benchmarks.extra_buffers " + " ".join(sys.argv[1:] if argv is None else argv),
        "cpu": cpu_model(), "system_info": build().system_info, "safe_mode": safe,
        "threads": args.threads, "tokens": args.tokens, "rounds": args.rounds, "rows": rows}, failed)


if __name__ == "__main__":
    sys.exit(main())
