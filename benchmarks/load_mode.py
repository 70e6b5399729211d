"""Mapped vs read-in loads of a GGUF whose weights llama.cpp's CPU backend repacks: peak memory, load time, decode.

    python -m edgemed.benchmarks.load_mode --model q4_k_m.gguf --threads 2 --rounds 3 -o benchmarks/results/load_mode-X.json

Each round loads the model once per mode, in its own process, interleaved (mmap, none, mmap, none, ...):
``mmap`` maps the file (llama.cpp's ``LLAMA_LOAD_MODE_MMAP``) and copies the repacked tensors beside their mapped
pages; ``none`` reads the file into llama.cpp's own buffers (``LLAMA_LOAD_MODE_NONE``), the repacked tensors
straight into their interleaved layout. Both with every extra buffer type on (``extra_buffers = all``). The child
reports its peak RSS (VmHWM) split at the end into file-backed and anonymous pages, the load's wall time, and
greedy decode tok/s over ``--tokens`` tokens after a short medical prompt. The page cache is warm for every load
after the first (each mode gets the same advantage).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from edgemed.files.atomic import write_text

_CHILD = r"""
import json, sys, time
from edgemed.runtime.engine import GenerationSettings, LoadSettings
from edgemed.runtime.llamacpp import Context, Model, SamplerChain

path, mode, threads, n_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
model = Model(path, LoadSettings(n_ctx=512, n_threads=threads, use_mmap=mode == "mmap", extra_buffers="all"))
load_s = time.perf_counter() - t0
ctx = Context(model, n_ctx=512, threads=threads)
prompt = model.tokenize("Question: what is the first-line treatment of anaphylaxis in adults? Answer:", add_special=True)
ctx.eval(prompt)
sampler, pos = SamplerChain(model, GenerationSettings(temperature=0.0, max_tokens=n_tokens)), len(prompt)
t0 = time.perf_counter()
for _ in range(n_tokens):
    ctx.eval([sampler.sample(ctx, -1)], pos)
    pos += 1
decode = n_tokens / (time.perf_counter() - t0)
status = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.split(":")[0] in ("VmHWM", "RssAnon", "RssFile")}
print(json.dumps({"mode": mode, "load_mode": model.params.written["load_mode"], "load_s": load_s, "decode_tok_s": decode,
                  "peak_rss": status["VmHWM"], "rss_anon": status["RssAnon"], "rss_file": status["RssFile"],
                  "placement": model.placement.describe()}))
"""

MIB = 1 << 20


def run(model: Path, mode: str, threads: int, tokens: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(model), mode, str(threads), str(tokens)],
                          capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} load failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not args.out.parent.is_dir():
        raise SystemExit(f"-o: the folder {args.out.parent} does not exist")
    runs = []
    for r in range(args.rounds):
        for mode in ("mmap", "none"):
            row = dict(run(args.model, mode, args.threads, args.tokens), round=r)
            print(json.dumps(row), flush=True)
            runs.append(row)
    summary = {}
    for mode in ("mmap", "none"):
        rows = [x for x in runs if x["mode"] == mode]
        summary[mode] = {k: statistics.median(x[k] for x in rows) for k in ("load_s", "decode_tok_s", "peak_rss", "rss_anon", "rss_file")}
    report = {"schema": "edgemed.bench.load_mode/1", "model": str(args.model), "size_bytes": args.model.stat().st_size,
              "threads": args.threads, "tokens": args.tokens, "rounds": args.rounds, "command": " ".join(sys.argv), "runs": runs,
              "median": summary}
    write_text(args.out, json.dumps(report, indent=2) + "\n")
    lines = [f"# Load mode on {args.model.name} ({args.model.stat().st_size / MIB:,.0f} MiB), {args.threads} threads, "
             f"median of {args.rounds} interleaved rounds", "", f"`python -m edgemed.benchmarks.load_mode {' '.join(argv or sys.argv[1:])}`", "",
             "| load mode | peak RSS MiB | anon MiB | file MiB | load s | decode tok/s |", "|---|---|---|---|---|---|"]
    for mode, m in summary.items():
        lines.append(f"| {mode} | {m['peak_rss'] / MIB:,.0f} | {m['rss_anon'] / MIB:,.0f} | {m['rss_file'] / MIB:,.0f} | "
                     f"{m['load_s']:.2f} | {m['decode_tok_s']:.2f} |")
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
