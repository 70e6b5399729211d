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

Each route is estimated with the settings its conversion runs with (``convert_settings``: its flags, and convert's
defaults for the rest, such as the importance matrix a 4-bit type computes unless ``--no-imatrix``); a row's
``score`` records them (``settings``) and the estimator that made its figures (``estimator``: ``peaks.METHOD``, the
edgemed commit, and the sha256 of each file under converters/ and edgemed/ changed from it). A route rerun replaces
its row; the rows kept keep their own score.
``--rescore`` recomputes the estimates for saved measurements without rerunning anything; a file whose estimates
another estimator made is refused (its measurements were taken by that code), unless ``--rescore-anyway``, which
records the estimator replaced in each row (``score.rescored_from``; null where the file named none).
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
#: where the estimator's code lives (``peaks`` reads the planner, the calibration bounds and the quantizer's slabs)
ESTIMATOR_PATHS = ("converters", "edgemed")


def convert_settings(args: list[str]) -> dict:
    """The budget estimator's keywords for ``edgemed convert SOURCE ARGS``: the route and what its conversion does,
    as the route's budget hook passes them (``peaks.gguf_settings`` / ``onnx_settings``): the flags in ``args``, and
    for the rest convert's defaults, read where the command reads them (the type: ``constants.DEFAULT_OUTPUT_TYPE``;
    the importance matrix: ``calibration.default_imatrix``; the graph: ``onnx.graphs.DEFAULT_GRAPH``). ``--to`` must
    be given; a flag not listed here is refused, so a route cannot run a setting its estimate leaves out."""
    from edgemed.constants import DEFAULT_OUTPUT_TYPE
    from edgemed.converters.gguf.calibration import default_imatrix
    from edgemed.converters.onnx.graphs import DEFAULT_GRAPH

    ap = argparse.ArgumentParser(prog="convert_settings", add_help=False)
    ap.add_argument("--to", required=True, choices=sorted(DEFAULT_OUTPUT_TYPE))
    ap.add_argument("--quant")
    ap.add_argument("--imatrix-from")
    ap.add_argument("--no-imatrix", action="store_true")
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument("--onnx-graph")
    a = ap.parse_args(args)
    out_type = a.quant or DEFAULT_OUTPUT_TYPE[a.to]
    if a.to == "onnx":
        return {"route": "onnx", "out_type": out_type, "graph": a.onnx_graph or DEFAULT_GRAPH, "parity": not a.no_parity}
    calibrated = a.imatrix_from is not None or (not a.no_imatrix and default_imatrix(out_type) is not None)
    return {"route": "gguf", "out_type": out_type, "parity": not a.no_parity, "imatrix": calibrated}


# route name -> convert arguments
_ARGS: dict[str, list[str]] = {
    "gguf-f16": ["--to", "gguf", "--quant", "f16"],
    "gguf-q8_0": ["--to", "gguf", "--quant", "q8_0"],
    "gguf-q4_k_m": ["--to", "gguf", "--quant", "q4_k_m"],  # calibrated on the shipped text: convert's default
    "gguf-q4_k_m-imatrix": ["--to", "gguf", "--quant", "q4_k_m", "--imatrix-from", CALIBRATION],
    "onnx-fp32": ["--to", "onnx", "--quant", "fp32"],
    "onnx-int4": ["--to", "onnx", "--quant", "int4"],
    "onnx-fp32-genai": ["--to", "onnx", "--quant", "fp32", "--onnx-graph", "genai"],
    "onnx-int4-genai": ["--to", "onnx", "--quant", "int4", "--onnx-graph", "genai"],
}
# route name -> (convert arguments, the budget estimator's keywords for them)
ROUTES: dict[str, tuple[list[str], dict]] = {name: (args, convert_settings(args)) for name, args in _ARGS.items()}
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
    return {"route": name, "convert_args": args, "wall_s": r["wall_s"], "vmhwm_sampled": r["vmhwm_sampled"], "ru_maxrss": r["ru_maxrss"],
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


def estimator_state() -> dict:
    """The estimator scoring rows now: ``peaks.METHOD``, the edgemed commit, and the sha256 of each file under
    ``ESTIMATOR_PATHS`` changed from it (null for one that is gone or not a file); commit None outside a git checkout."""
    from edgemed.benchmarks.provenance import code_state
    from edgemed.converters.budget.peaks import METHOD
    from edgemed.files.hashing import file_sha256

    root = Path(__file__).resolve().parent.parent
    code = code_state(ESTIMATOR_PATHS)
    changed = {p: file_sha256(root / p) if (root / p).is_file() else None for p in code["changed"]}
    return {"method": METHOD, "commit": code["commit"], "changed": changed}


def _named(state: dict | None) -> str:
    if not state:
        return "an estimator that did not name itself (the file predates estimates that record theirs)"
    changed = f" and {len(state['changed'])} file(s) changed from it" if state.get("changed") else ""
    return f"{state.get('method')} at commit {str(state.get('commit'))[:12]}{changed}"


def check_rescore(path: Path, rows: list[dict], now: dict) -> None:
    """Refuse to rescore ``rows`` (read from ``path``) when any was scored by another estimator than ``now``: its
    measurements were taken by that code state, and this one's figures beside them would mix the two."""
    other = {r["route"]: (r.get("score") or {}).get("estimator") for r in rows}
    other = {route: state for route, state in other.items() if state != now}
    if not other:
        return
    made = sorted({_named(s) for s in other.values()})
    raise SystemExit(
        f"{path}: the estimates of {', '.join(other)} were made by {'; '.join(made)}, not by this estimator "
        f"({_named(now)}). Rescoring would write this estimator's figures beside measurements taken by that code.\n"
        f"Fix: rerun the routes to measure and score them with one code state (--routes {' '.join(other)}), or pass "
        "--rescore-anyway to rescore them (each row then records the estimator it replaced).")


def score(row: dict, model_dir: Path, estimator: dict) -> dict:
    """The budget estimate for ``row``'s route on ``model_dir`` next to what was measured, with the settings it was
    estimated for and ``estimator`` (``estimator_state()``: what made the figures)."""
    from edgemed.converters.budget import peaks as budget

    _, settings = ROUTES[row["route"]]
    est = budget.estimate_for_dir(model_dir, **settings)
    measured_anon = max(row["peak_anon"], 1)
    measured_total = peak_rss(row)
    return {"estimator": estimator, "settings": settings, "estimate": est.to_dict(),
            "ratio_anon": round(est.resident / measured_anon, 3),
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
    ap.add_argument("--rescore-anyway", action="store_true",
                    help="with --rescore: rescore rows another estimator scored (each records the one it replaced)")
    ap.add_argument("-o", "--out", type=Path, help="result JSON (default benchmarks/results/convert_memory-<model>.json)")
    args = ap.parse_args(argv)
    if args.rescore_anyway and not args.rescore:
        ap.error("--rescore-anyway goes with --rescore FILE")

    from edgemed.files.atomic import write_text
    from edgemed.converters.source import pip_models

    now = estimator_state()
    if args.rescore:
        result = json.loads(args.rescore.read_text())
        model_dir, out = Path(result["checkpoint"]), args.rescore
        rows = result["rows"]
        if not args.rescore_anyway:
            check_rescore(args.rescore, rows, now)
        for row in rows:
            before = (row.get("score") or {}).get("estimator")
            row["score"] = score(row, model_dir, now)
            if before != now:
                row["score"]["rescored_from"] = before
    else:
        model_dir = Path(args.model) if Path(args.model).is_dir() else pip_models.hf_checkpoint(args.model)
        out = args.out or RESULTS / f"convert_memory-{Path(args.model).name}.json"
        old = {r["route"]: r for r in json.loads(out.read_text())["rows"]} if out.exists() else {}
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            for name in args.routes:
                old[name] = _run(model_dir, name, Path(tmp), int(args.kill_above_gib * 2**30))
                old[name]["score"] = score(old[name], model_dir, now)  # the rows kept keep their own
                print(f"{name}: peak RSS {peak_rss(old[name]) / 2**20:,.0f} MiB, RssAnon peak "
                      f"{old[name]['peak_anon'] / 2**20:,.0f} MiB, {old[name]['wall_s']} s", flush=True)
                rows = [old[k] for k in ROUTES if k in old]
                write_text(out, json.dumps({"model": args.model, "checkpoint": str(model_dir), "rows": rows}, indent=1) + "\n")
    result = {"model": args.model if not args.rescore else result["model"], "checkpoint": str(model_dir),
              "goal": "estimate >= measured and <= 1.5x measured", "rows": rows}
    print(_table(rows))
    write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
