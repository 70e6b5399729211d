"""Conversion cost: wall time and peak RSS of HF -> GGUF, each run in its own process.

    python -m edgemed.benchmarks.convert_cost [--model qwen2.5-0.5b-instruct] [--quant q4_k_m]

Measures ``edgemed convert`` without the parity check (the converter alone:
streaming write + llama.cpp quantization + tokenizer check) and with it (which
also loads the HF model in float32 to compare logits), and sets both against the
checkpoint's size on disk. Prints a table and writes
``benchmarks/results/convert_cost-<model>-<quant>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


# Runs the command as its own child and reports that child's peak RSS, so every
# measurement starts from a fresh process whatever ran before it.
_WRAPPER = (
    "import resource, subprocess, sys, json, time\n"
    "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "print(json.dumps({'rc': p.returncode, 'wall_s': time.perf_counter() - t, "
    "'peak_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, 'out': p.stdout[-400:], 'err': p.stderr[-2000:]}))"
)


def measure(cmd: list[str]) -> dict:
    """Run ``cmd`` in a fresh process; wall seconds and its peak RSS."""
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, check=True)
    r = json.loads(proc.stdout)
    if r["rc"] != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{r['err']}")
    return {"wall_s": round(r["wall_s"], 2), "peak_rss_mb": round(r["peak_kib"] / 1024, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-0.5b-instruct", help="example model name (edgemed.converters.sources) or HF dir")
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--with-parity", action="store_true", help="also measure a run that includes the parity check")
    args = ap.parse_args(argv)

    from edgemed.converters import sources

    ckpt = Path(args.model) if Path(args.model).is_dir() else sources.hf_checkpoint(args.model)
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = [sys.executable, "-m", "edgemed", "convert", str(ckpt), "--quant", args.quant, "--force"]
        # Fresh processes, one per configuration; the second starts after the first's peak is recorded.
        runs["convert"] = measure(base + ["--no-parity", "-o", f"{tmp}/a.gguf"])
        out_bytes = Path(f"{tmp}/a.gguf").stat().st_size
        if args.with_parity:
            runs["convert+parity"] = measure(base + ["-o", f"{tmp}/b.gguf"])
            report = json.loads(Path(f"{tmp}/b.gguf.report.json").read_text())
            runs["convert+parity"]["parity"] = {k: report["parity"][k] for k in ("nmse", "kld", "top1")}
    result = {
        "model": args.model, "quant": args.quant, "checkpoint_mb": round(ckpt_bytes / 2**20, 1),
        "output_mb": round(out_bytes / 2**20, 1), "runs": runs,
        "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    print(f"HF -> {args.quant.upper()} for {args.model}: checkpoint {result['checkpoint_mb']} MB -> {result['output_mb']} MB")
    for name, r in runs.items():
        ratio = r["peak_rss_mb"] / result["checkpoint_mb"]
        print(f"  {name:16s} wall {r['wall_s']:7.1f} s   peak RSS {r['peak_rss_mb']:8.1f} MB ({ratio:.2f}x checkpoint size)")
        if "parity" in r:
            print(f"  {'':16s} parity NMSE {r['parity']['nmse']:.3e}  KLD {r['parity']['kld']:.3e}  top-1 {r['parity']['top1']:.3f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"convert_cost-{Path(args.model).name}-{args.quant}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
