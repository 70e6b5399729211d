"""Conversion cost: wall time per step and peak memory of ``edgemed convert`` HF -> GGUF, in its own process tree.

    python -m edgemed.benchmarks.convert_cost [--model qwen2.5-0.5b-instruct | DIR] [--quant q4_k_m]
        [--parity with|without|both] [--imatrix-from FILE] [--memory-cap 6GiB] [--threads N]
        [-o KEEP.gguf] [--work-dir DIR] [--tag NAME] [--results-dir DIR]

Each run is a fresh ``python -m edgemed convert`` child. Its whole process tree (the converter and any
child it starts) is sampled every 50 ms: peak RSS of the tree, split into anonymous memory and file-backed
pages (llama.cpp's quantizer memory-maps its float input: those pages count in RSS but are page cache the
kernel can drop), each process's VmHWM, and the kernel's ``wait4`` maximum (``process_memory.py`` says what
each figure can and cannot see). ``--memory-cap`` runs the child in a memory cgroup with that hard limit, so a
run that finishes proves it fits; one killed at the cap is reported as such, not as a measurement.

Wall time per step (inspect, write, imatrix, quantize, tokenizer_check, parity) comes from the conversion
report's ``timings_s``; parity figures from its ``parity`` section. Writes
``<results-dir>/convert_cost-<model>-<quant>[-imatrix][-<tag>].json`` and a ``.md`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgemed.files.atomic import write_text
from edgemed.benchmarks.process_memory import MemoryCap, TreeSampler, parse_size
from edgemed.errors import InputError

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = "edgemed.convert_cost/2"
RUNS = {"with": ["convert+parity"], "without": ["convert"], "both": ["convert", "convert+parity"]}
GIB = 2**30


def convert_command(src: Path, out: Path, quant: str, parity: bool, imatrix: Path | None, threads: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "edgemed", "convert", str(src), "--quant", quant, "-o", str(out)]
    if not parity:
        cmd.append("--no-parity")
    cmd += ["--imatrix-from", str(imatrix)] if imatrix is not None else ["--no-imatrix"]  # the result names which
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def measure(cmd: list[str], log_path: Path, cap_bytes: int | None = None, interval: float = 0.05) -> dict:
    """Run ``cmd`` (stdout+stderr to ``log_path``), sampling its tree; wall time, memory figures, exit code."""
    import contextlib

    cap = MemoryCap(cap_bytes) if cap_bytes else None
    with contextlib.ExitStack() as stack:
        if cap is not None:
            stack.enter_context(cap)
        log = stack.enter_context(open(log_path, "wb"))
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=cap.join if cap is not None else None)
        with TreeSampler(proc.pid, interval) as sampler:
            _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        result = {"rc": proc.returncode, "wall_s": round(wall, 2), "memory": sampler.to_dict()}
        result["memory"]["ru_maxrss_bytes"] = usage.ru_maxrss * 1024  # Linux: KiB
        if cap is not None:
            result["cgroup"] = cap.report()
    return result


def run_one(name: str, src: Path, args, work: Path) -> dict:
    parity = name == "convert+parity"
    keep = args.output is not None and name == RUNS[args.parity][-1]  # -o keeps the last run's GGUF
    out = args.output if keep else work / f"{name}.gguf"
    cmd = convert_command(src, out, args.quant, parity, args.imatrix_from, args.threads)
    print(f"{name}: {' '.join(cmd[1:])}", file=sys.stderr)
    r = measure(cmd, work / f"{name}.log", parse_size(args.memory_cap) if args.memory_cap is not None else None)
    tail = (work / f"{name}.log").read_text(errors="replace")[-3000:]
    r["command"] = ["python", *cmd[1:]]
    if r["rc"] != 0:
        killed = r.get("cgroup", {}).get("oom_kills")
        r["failed"] = ("killed at the memory cap" if killed else f"exit {r['rc']}")
        r["log_tail"] = tail[-1500:]
        return r
    report = json.loads(Path(f"{out}.report.json").read_text(encoding="utf-8"))
    r["output_bytes"] = report["size_bytes"]
    r["timings_s"] = report["timings_s"]
    if report.get("parity"):
        r["parity"] = {k: v for k, v in report["parity"].items() if k != "per_prompt"}
    if not keep:
        out.unlink(missing_ok=True)
    return r


def machine_info() -> dict:
    import psutil

    return {"cpu_count": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total, "platform": platform.platform(),
            "python": platform.python_version(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}


def result_stem(model: str, quant: str, imatrix: bool, tag: str | None) -> str:
    return f"convert_cost-{Path(model).name}-{quant}" + ("-imatrix" if imatrix else "") + (f"-{tag}" if tag else "")


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def render_markdown(result: dict, stem: str) -> str:
    """The results JSON as a page: one row per run, memory split, per-step times, parity."""
    lines = [f"# Conversion cost: {result['model']} -> {result['quant'].upper()}", "",
             f"`{result['command_line']}` (`{stem}.json`); checkpoint {_gib(result['checkpoint_bytes'])} on disk; "
             f"machine: {result['machine']['cpu_count']} cores, {_gib(result['machine']['ram_bytes'])} RAM, "
             f"1-minute load {result['machine']['load_avg_1m_at_start']} at the start (a shared machine: wall times "
             "vary with it; memory does not).", "",
             "| run | wall | tree peak RSS | anonymous | file-backed | largest VmHWM | wait4 max | memory cap | output |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        m, cg = r["memory"], r.get("cgroup")
        cap = "-" if not cg else (f"{_gib(cg['limit_bytes'])}: peak {_gib(cg.get('peak_usage_bytes'))} charged "
                                  f"(page cache included), {cg.get('oom_kills')} OOM kills")
        out = _gib(r["output_bytes"]) if "output_bytes" in r else f"**failed: {r.get('failed')}**"
        lines.append(f"| {name} | {r['wall_s']:.1f} s | {_gib(m['tree_peak_rss_bytes'])} | {_gib(m['tree_peak_anon_bytes'])} | "
                     f"{_gib(m['tree_peak_file_bytes'])} | {_gib(m['max_vmhwm_bytes'])} | {_gib(m['ru_maxrss_bytes'])} | "
                     f"{cap} | {out} |")
    lines += ["", "Anonymous and file-backed peaks are each the tree's own maximum (they need not coincide). "
              "File-backed pages are memory-mapped files (page cache the kernel can reclaim); anonymous memory is what "
              "must fit.", "", "| run | " + " | ".join(_STEPS) + " | total |", "|---|" + "---|" * (len(_STEPS) + 1)]
    for name, r in result["runs"].items():
        t = r.get("timings_s", {})
        lines.append(f"| {name} | " + " | ".join(f"{t[s]:.1f} s" if s in t else "-" for s in _STEPS)
                     + (f" | {t['total']:.1f} s |" if "total" in t else " | - |"))
    for name, r in result["runs"].items():
        if "parity" in r:
            p = r["parity"]
            gate = "PASS" if p.get("passed") else ("reported, not gated" if p.get("passed") is None else "FAIL")
            lines += ["", f"{name}: parity over {p['n_positions']} positions: NMSE {p['nmse']:.3e}, KLD {p['kld']:.3e} "
                      f"nats, top-1 {p['top1'] * 100:.1f} % (gate: {gate})."]
    return "\n".join(lines) + "\n"


_STEPS = ("inspect", "write", "imatrix", "quantize", "tokenizer_check", "parity")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-0.5b-instruct", help="example model name (edgemed.converters.source.pip_models) or HF dir")
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--parity", choices=list(RUNS), default="with", help="measure the run with the parity check, without, or both")
    ap.add_argument("--with-parity", action="store_const", const="both", dest="parity", help="same as --parity both")
    ap.add_argument("--imatrix-from", type=Path, help="calibration text passed to edgemed convert --imatrix-from")
    ap.add_argument("--memory-cap", help="hard memory limit for the converter's process tree (e.g. 6GiB), in a cgroup")
    ap.add_argument("--threads", type=int)
    ap.add_argument("-o", "--output", type=Path, help="keep the converted GGUF here (must not exist); default: discarded")
    ap.add_argument("--work-dir", type=Path, help="where outputs and logs go while measuring [default: a temp folder]")
    ap.add_argument("--tag", help="suffix for the result files' names")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.memory_cap is not None:  # given, even empty, it must be a size
        parse_size(args.memory_cap)
    if args.imatrix_from is not None and not args.imatrix_from.is_file():
        raise InputError(f"--imatrix-from '{args.imatrix_from}' is not a file.", "name a JSONL or .txt calibration file")
    if args.output is not None and os.path.lexists(args.output):
        raise InputError(f"--output '{args.output}' already exists.", "name a path that does not exist yet")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads {args.threads} is not a thread count.", "pass --threads 1 or more")
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        if args.memory_cap is not None:  # refuse before any work when no cgroup can be had
            with MemoryCap(parse_size(args.memory_cap)):
                pass
        from edgemed.converters.source import pip_models

        src = Path(args.model) if Path(args.model).is_dir() else pip_models.hf_checkpoint(args.model)
    except InputError as exc:
        print(f"error: {exc.problem}\nfix: {exc.fix}", file=sys.stderr)
        return 2
    ckpt_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    result = {"schema": SCHEMA, "model": args.model, "checkpoint": str(src), "checkpoint_bytes": ckpt_bytes,
              "quant": args.quant, "imatrix_from": str(args.imatrix_from) if args.imatrix_from else None,
              "memory_cap": args.memory_cap, "threads": args.threads, "machine": machine_info(),
              "command_line": "python -m edgemed.benchmarks.convert_cost " + " ".join(sys.argv[1:] if argv is None else argv),
              "runs": {}}
    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="convert-cost-", dir=args.work_dir) as tmp:
        for name in RUNS[args.parity]:  # fresh processes, one after the other
            result["runs"][name] = run_one(name, src, args, Path(tmp))
    stem = result_stem(args.model, args.quant, args.imatrix_from is not None, args.tag)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_text(args.results_dir / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    page = render_markdown(result, stem)
    write_text(args.results_dir / f"{stem}.md", page)
    print(page)
    print(f"wrote {args.results_dir / stem}.json and .md", file=sys.stderr)
    return 0 if all(r["rc"] == 0 for r in result["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
