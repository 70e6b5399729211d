"""Planner prediction vs measured peak RSS, each model and context in its own process.

    python -m edgemed.benchmarks.plan_memory                         # SmolLM2, Qwen2.5-0.5B, -1.5B if installed
    python -m edgemed.benchmarks.plan_memory --ctx 1024 4096 --models smollm2-135m-instruct
    python -m edgemed.benchmarks.plan_memory --ctx 4096 --models out/artifacts/q4_k_m.gguf --out results/X.json

For every (model, n_ctx) a fresh Python process loads the model through the
runtime (``open_engine`` with the settings ``make_plan`` chose for the profile),
fills the context with a prompt of ``n_ctx - 64`` tokens (the worst case the plan
guards against), generates 32 tokens and reports its peak RSS (``VmHWM``).
``--slots N`` (N > 1) measures ``edgemed serve``'s batcher instead: planned as serve plans N slots of ``n_ctx``
tokens each, every slot filled with a prompt of its own.
Goal: |predicted - measured| / measured <= 10 %.
Results go to benchmarks/results/plan_memory.json; a model not installed or a failed child is listed in its
``failed`` and the exit status is 1, and a run with fewer rows does not replace that file (``study_output``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from edgemed.benchmarks import study_output

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "plan_memory.json"
MODELS = ("smollm2-135m-instruct", "qwen2.5-0.5b-instruct", "qwen2.5-1.5b-instruct")
TEXT = ("A 64-year-old man with type 2 diabetes and hypertension presents with crushing chest pain radiating to "
        "the left arm, diaphoresis and nausea for 40 minutes. ECG shows ST elevation in leads II, III and aVF. ")


def peak_rss() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(model: str, n_ctx: int, profile_name: str, slots: int = 1) -> dict:
    """Runs in the measured process: plan, load through the runtime, fill the context, decode."""
    from edgemed.converters.source import pip_models
    from edgemed.devices.detect import resolve
    from edgemed.runtime.plan import installed_build, make_plan
    from edgemed.runtime import GenerationSettings, open_engine
    from edgemed.runtime.session import load_settings

    path = Path(model) if model.endswith(".gguf") else pip_models.gguf_file(model)  # a file, or a pip model's name
    profile, facts = resolve(profile_name)
    if slots > 1:
        return served(path, model, n_ctx, profile, facts, slots)
    plan = make_plan(path, profile, facts, requested_ctx=n_ctx, here=True, **installed_build())  # as `run` plans here
    engine = open_engine(path, load_settings(plan))
    ids = engine.tokenize(TEXT * (n_ctx // 20))[: n_ctx - 64 - 8]
    prompt = engine.detokenize(ids)
    out = "".join(engine.complete(prompt, GenerationSettings(max_tokens=32)))
    measured = peak_rss()
    load_mode = engine.model.params.written.get("load_mode")  # what llama.cpp was told (0: read in, 1: mapped)
    engine.close()
    return {"model": model, "n_ctx": n_ctx, "profile": profile.name, "prompt_tokens": len(ids),
            "load_mode": load_mode,
            "generated_chars": len(out), "predicted": plan.estimate.total, "measured": measured,
            "breakdown": plan.to_dict()["estimate"]}


def served(path: Path, model: str, n_ctx: int, profile, facts, slots: int) -> dict:
    """``child`` for ``edgemed serve``'s batcher: ``slots`` slots of ``n_ctx`` tokens, planned as serve plans them
    (its host prefix cache off, so that what is measured is the context's), every slot filled at once."""
    from edgemed.runtime import GenerationSettings
    from edgemed.runtime.batch.batcher import Batcher
    from edgemed.runtime.plan import installed_build, make_plan
    from edgemed.runtime.session import load_settings

    plan = make_plan(path, profile, facts, requested_ctx=n_ctx * slots, n_seq=slots, batched=True, here=True,
                     **installed_build())
    batcher = Batcher(path, load_settings(plan), slots=slots, queue_size=slots, prefix_cache=False)
    batcher.start()
    try:
        ids = [batcher.tokenize(f"Patient {i}. " + TEXT * (n_ctx // 20))[: n_ctx - 64 - 8] for i in range(slots)]
        streams = [batcher.submit(p, GenerationSettings(max_tokens=32), request_id=str(i)) for i, p in enumerate(ids)]
        chars = sum(len(getattr(item, "text", "")) for stream in streams for item in stream)
        measured = peak_rss()
    finally:
        batcher.close()
    return {"model": model, "n_ctx": n_ctx, "slots": slots, "profile": profile.name, "prompt_tokens": len(ids[0]),
            "load_mode": None, "generated_chars": chars, "predicted": plan.estimate.total, "measured": measured,
            "breakdown": plan.to_dict()["estimate"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--ctx", nargs="+", type=int, default=[1024, 4096])
    ap.add_argument("--profile", default="x86-avx2", help="CPU profile to plan with (default x86-avx2)")
    ap.add_argument("--slots", type=int, default=1, help="measure edgemed serve's batcher with this many slots, "
                                                         "each of --ctx tokens (default 1: the one-sequence engine)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "CTX"), help=argparse.SUPPRESS)
    study_output.add_arguments(ap, DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.profile, args.slots)))
        return 0
    if args.slots < 1:
        ap.error("--slots must be 1 or more")

    from edgemed.converters.source import pip_models
    from edgemed.errors import InputError

    rows, failed = [], []
    for model in args.models:
        try:
            if not (model.endswith(".gguf") and Path(model).is_file()):
                pip_models.gguf_file(model)
        except InputError as exc:
            failed += [{"arm": f"{model} ctx {n_ctx}", "error": f"not installed ({exc.fix})"} for n_ctx in args.ctx]
            continue
        for n_ctx in args.ctx:
            proc = subprocess.run([sys.executable, "-m", "edgemed.benchmarks.plan_memory", "--profile", args.profile,
                                   "--slots", str(args.slots), "--child", model, str(n_ctx)], capture_output=True,
                                  text=True, check=False)
            if proc.returncode != 0:
                print(f"{model} ctx {n_ctx}: child failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                failed.append({"arm": f"{model} ctx {n_ctx}", "error": study_output.child_error(proc)})
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["error_pct"] = 100.0 * (row["predicted"] - row["measured"]) / row["measured"]
            rows.append(row)
            print(f"{model:<24} ctx {n_ctx:>6}{f' x {args.slots} slots' if args.slots > 1 else ''}  predicted {row['predicted'] / 2**20:8.1f} MiB  "
                  f"measured {row['measured'] / 2**20:8.1f} MiB  error {row['error_pct']:+6.1f} %", flush=True)
    worst = max((abs(r["error_pct"]) for r in rows), default=None)  # over the rows measured; failed arms listed
    print(f"worst |error|: {'—' if worst is None else f'{worst:.1f} %'} (goal <= 10 %)"
          + (f"; {len(failed)} arm(s) failed" if failed else ""))
    return study_output.write(args, DEFAULT_OUT, {"goal_pct": 10.0, "worst_abs_error_pct": worst, "rows": rows}, failed)


if __name__ == "__main__":
    sys.exit(main())
