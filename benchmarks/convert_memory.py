"""Conversion budget: ``converters/budget/peaks.py``'s estimate vs the measured peak, each route in its own process.

    python -m edgemed.benchmarks.convert_memory --model smollm2-135m-instruct
    python -m edgemed.benchmarks.convert_memory --model qwen2.5-0.5b-instruct --routes gguf-q4_k_m onnx-int4
    python -m edgemed.benchmarks.convert_memory --rescore benchmarks/results/convert_memory-smollm2-135m-instruct.json

Each route runs as ``edgemed convert`` in a fresh child process. A sampler reads ``/proc/<pid>/status`` of
the child and its own children every 20 ms: resident anonymous memory (``RssAnon``: what the budget must
hold) and file-backed pages (``RssFile``: mapped safetensors / GGUF pages, which count in RSS but the kernel
can drop and re-read), and each process's ``VmHWM`` (the kernel's own peak RSS of that process, anonymous + file;
the last sample is at most one period before it ends): ``vmhwm_sampled`` is the largest. ``ru_maxrss`` is the
child's from ``wait4``: the largest single process of the tree, which on Linux also counts this script's own RSS,
carried across the fork and exec (result files written before ``vmhwm_sampled`` hold that figure as ``vmhwm``). The
measured peak RSS is the larger of ``vmhwm_sampled`` and the sampled sum over the tree. The report's step timings
place each sample in a step, so every step's peak is set against its own term of the estimate. Goal: estimate >=
measured and <= 1.5x measured. The imatrix route calibrates on the shipped medical text (``--imatrix-from
medical``, the abstracts PubMedQA does not score), as ``edgemed convert`` does.
``--rescore`` recomputes the estimates for saved measurements without rerunning anything.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from edgemed.benchmarks.process_memory import read_status, tree_pids

RESULTS = Path(__file__).resolve().parent / "results"
CALIBRATION = "medical"  # convert's shipped calibration text: PubMedQA abstracts outside its scored test split
# route name -> (convert arguments, budget route keywords)
ROUTES: dict[str, tuple[list[str], dict]] = {
    "gguf-f16": (["--to", "gguf", "--quant", "f16"], {"route": "gguf", "out_type": "f16"}),
    "gguf-q8_0": (["--to", "gguf", "--quant", "q8_0"], {"route": "gguf", "out_type": "q8_0"}),
    "gguf-q4_k_m": (["--to", "gguf", "--quant", "q4_k_m"], {"route": "gguf", "out_type": "q4_k_m"}),
    "gguf-q4_k_m-imatrix": (["--to", "gguf", "--quant", "q4_k_m", "--imatrix-from", CALIBRATION],
                            {"route": "gguf", "out_type": "q4_k_m", "imatrix": True}),
    "onnx-fp32": (["--to", "onnx", "--quant", "fp32"], {"route": "onnx", "out_type": "fp32"}),
    "onnx-int4": (["--to", "onnx", "--quant", "int4"], {"route": "onnx", "out_type": "int4"}),
    "onnx-fp32-genai": (["--to", "onnx", "--quant", "fp32", "--onnx-graph", "genai"],
                        {"route": "onnx", "out_type": "fp32", "graph": "genai"}),
    "onnx-int4-genai": (["--to", "onnx", "--quant", "int4", "--onnx-graph", "genai"],
                        {"route": "onnx", "out_type": "int4", "graph": "genai"}),
}
KIB = 1024
# The measured child: `edgemed convert`, with the wall-clock time at which the route's Timings start written
# to stderr, so that the report's step durations place every sample in its step exactly.
_LAUNCHER = (
    "import sys, time\n"
    "from edgemed.converters import route as core\n"
    "_init = core.Timings.__init__\n"
    "def _stamped(self):\n"
    "    _init(self); print(f'EDGEMED_T0 {time.time():.3f}', file=sys.stderr, flush=True)\n"
    "core.Timings.__init__ = _stamped\n"
    "from edgemed.cli import main\n"
    "sys.argv = ['edgemed', *sys.argv[1:]]\n"
    "main()\n"
)


def measure(cmd: list[str], period: float = 0.02, kill_above: int | None = None) -> dict:
    """Run ``cmd``; its samples (t, anon, file) summed over its process tree, the largest ``VmHWM`` of a process of
    the tree (sampled), its ``ru_maxrss`` (wait4), rc and wall time."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    samples: list[tuple[float, int, int]] = []
    texts: dict[str, str] = {}
    hwm = [0]  # the largest VmHWM any process of the tree reported
    done = threading.Event()

    def sample():
        while not done.is_set():
            stats = [read_status(p) or {} for p in tree_pids(proc.pid)]
            anon = sum(s.get("RssAnon", 0) + s.get("RssShmem", 0) for s in stats)
            file = sum(s.get("RssFile", 0) for s in stats)
            hwm[0] = max([hwm[0], *(s.get("VmHWM", 0) for s in stats)])
            if anon:
                samples.append((round(time.time() - t0, 3), anon, file))
            if kill_above and anon + file > kill_above:  # this machine is shared: stop a run that grows past the cap
                os.killpg(proc.pid, signal.SIGKILL)  # the child and its own children (the genai builder)
                return
            done.wait(period)

    def read(name, stream):
        texts[name] = stream.read()

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read, args=("out", proc.stdout)),
               threading.Thread(target=read, args=("err", proc.stderr))]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    done.set()
    for t in threads:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    stamp = [line for line in texts.get("err", "").splitlines() if line.startswith("EDGEMED_T0 ")]
    return {"t0": float(stamp[0].split()[1]) - t0 if stamp else None, "rc": proc.returncode, "wall_s": round(wall, 2), "samples": samples, "stdout": texts.get("out", ""),
            "stderr": texts.get("err", "")[-3000:], "vmhwm_sampled": hwm[0], "ru_maxrss": usage.ru_maxrss * KIB,
            "peak_sampled_rss": max((a + f for _, a, f in samples), default=0)}


def _run(model_dir: Path, name: str, work: Path, kill_above: int | None = None) -> dict:
    """One route in a fresh process (``measure``'s figures)."""
    args, _ = ROUTES[name]
    out = work / (name + (".gguf" if args[1] == "gguf" else ""))
    r = measure([sys.executable, "-c", _LAUNCHER, "convert", str(model_dir), *args, "-o", str(out), "--force", "--json"],
                kill_above=kill_above)
    if r["rc"] != 0:
        peak = max((a + f for _, a, f in r["samples"]), default=0)
        raise SystemExit(f"{name} failed (rc {r['rc']}, RSS {peak / 2**30:.2f} GiB when it ended):\n{r['stderr'][-1500:]}")
    report = json.loads(r["stdout"][r["stdout"].index("{"):])
    steps = _step_peaks(r["samples"], report["timings_s"], r["t0"])
    return {"route": name, "wall_s": r["wall_s"], "vmhwm_sampled": r["vmhwm_sampled"], "ru_maxrss": r["ru_maxrss"],
            "peak_anon": max(s[1] for s in r["samples"]), "peak_file": max(s[2] for s in r["samples"]),
            "peak_sampled_rss": r["peak_sampled_rss"], "steps": steps, "timings_s": report["timings_s"],
            "size_bytes": report["size_bytes"]}


def _step_peaks(samples, timings: dict, t0: float) -> dict[str, dict]:
    """Peak anon / file per step; ``t0``: when the route's clock started (seconds after the child did)."""
    order = [k for k in timings if k not in ("inspect", "total")]
    marks, t = {"imports+inspect": (0.0, t0 + timings["inspect"])}, t0 + timings["inspect"]
    for k in order:
        marks[k] = (t, t + timings[k])
        t += timings[k]
    marks["finish"] = (t, t0 + timings["total"] + 0.5)
    peaks = {}
    for k, (a, b) in marks.items():
        inside = [s for s in samples if a <= s[0] <= b]
        if inside:
            peaks[k] = {"anon": max(s[1] for s in inside), "file": max(s[2] for s in inside), "seconds": round(b - a, 2)}
    return peaks


def score(row: dict, model_dir: Path) -> dict:
    """The budget estimate for ``row``'s route on ``model_dir`` next to what was measured."""
    from edgemed.converters.budget import peaks as budget

    _, kw = ROUTES[row["route"]]
    est = budget.estimate_for_dir(model_dir, **kw)
    measured_anon = max(row["peak_anon"], 1)
    measured_total = peak_rss(row)
    return {"estimate": est.to_dict(), "ratio_anon": round(est.resident / measured_anon, 3),
            "ratio_total": round(est.rss / measured_total, 3),
            "steps": {k: {"estimate": est.phase_bytes(k), **v} for k, v in row["steps"].items() if est.phase_bytes(k)}}


def peak_rss(row: dict) -> int:
    """A row's measured peak RSS: the larger of the sampled tree sum and the largest process peak (``vmhwm_sampled``;
    a row from before it has wait4's ``ru_maxrss`` under the name ``vmhwm``)."""
    return max(row.get("vmhwm_sampled") or row.get("ru_maxrss") or row.get("vmhwm") or 0, row["peak_sampled_rss"])


def _table(rows: list[dict]) -> str:
    mib = 2 ** 20
    lines = ["| route | estimate, resident | measured RssAnon peak | ratio | estimate, RSS (+ mapped) | peak RSS | ratio | biggest term |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["score"]["estimate"]
        lines.append(f"| {r['route']} | {e['resident'] / mib:,.0f} MiB | {r['peak_anon'] / mib:,.0f} MiB | "
                     f"{r['score']['ratio_anon']:.2f} | {e['rss'] / mib:,.0f} MiB | "
                     f"{peak_rss(r) / mib:,.0f} MiB | {r['score']['ratio_total']:.2f} | "
                     f"{e['biggest']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="example model name (converters.source.pip_models) or HF dir")
    ap.add_argument("--routes", nargs="+", default=list(ROUTES), choices=list(ROUTES))
    ap.add_argument("--kill-above-gib", type=float, default=6.0,
                    help="kill a run whose RSS (anonymous + file-backed) passes this (default 6 GiB: a shared machine)")
    ap.add_argument("--rescore", type=Path, help="recompute the estimates of a saved result file; run nothing")
    ap.add_argument("-o", "--out", type=Path, help="result JSON (default benchmarks/results/convert_memory-<model>.json)")
    args = ap.parse_args(argv)

    from edgemed.files.atomic import write_text
    from edgemed.converters.source import pip_models

    if args.rescore:
        result = json.loads(args.rescore.read_text())
        model_dir, out = Path(result["checkpoint"]), args.rescore
        rows = result["rows"]
    else:
        model_dir = Path(args.model) if Path(args.model).is_dir() else pip_models.hf_checkpoint(args.model)
        out = args.out or RESULTS / f"convert_memory-{Path(args.model).name}.json"
        old = {r["route"]: r for r in json.loads(out.read_text())["rows"]} if out.exists() else {}
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            for name in args.routes:
                old[name] = _run(model_dir, name, Path(tmp), int(args.kill_above_gib * 2**30))
                print(f"{name}: peak RSS {peak_rss(old[name]) / 2**20:,.0f} MiB, RssAnon peak "
                      f"{old[name]['peak_anon'] / 2**20:,.0f} MiB, {old[name]['wall_s']} s", flush=True)
                rows = [old[k] for k in ROUTES if k in old]
                write_text(out, json.dumps({"model": args.model, "checkpoint": str(model_dir), "rows": rows}, indent=1) + "\n")
    for row in rows:
        row["score"] = score(row, model_dir)
    result = {"model": args.model if not args.rescore else result["model"], "checkpoint": str(model_dir),
              "goal": "estimate >= measured and <= 1.5x measured", "rows": rows}
    print(_table(rows))
    write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
