"""The GPU path, checked on a machine with an NVIDIA GPU (the Jetson route, on whatever CUDA machine is lent).

    python -m edgemed.benchmarks.gpu_check --sdist llama_cpp_python-0.3.36.tar.gz \\
        --model qwen-0.5b=/path/q4_k_m.gguf --model qwen-1.5b=/path/q4_k_m.gguf --profile jetson-agx-orin-64gb

Steps, each recorded in ``benchmarks/results/gpu_check-<host>.json`` (and a short ``.md`` beside it):

1. **build**: a CUDA wheel of llama-cpp-python from the sdist (``CMAKE_ARGS=-DGGML_CUDA=on``, the same
   command as the README's Jetson section), installed into ``--venv`` over this interpreter's packages;
   ``llama_print_system_info()`` must name CUDA. ``--skip-build`` uses the interpreter as it is.
2. **devices check**: ``edgemed devices check MODEL --profile P --json`` in the CUDA venv (the self-test's
   load + 4-token decode in a child).
3. **plan vs measured**: ``edgemed plan MODEL --profile P --ctx N --json``; then a child loads the model
   with the profile's settings (every layer offloaded, flash attention, the profile's KV cache type, which
   ``--kv`` overrides), fills the context with ``N`` tokens, decodes ``--tokens`` more, and reports its host
   peak RSS (VmHWM) and the GPU memory ``nvidia-smi`` sees for its pid, next to the plan's prediction.
4. **decode**: tokens per second of that decode (greedy, one sequence), with the prompt's prefill rate.

Nothing here needs the network: the sdist and the models are files the caller brings. A machine
without ``nvidia-smi`` is refused before anything is built.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = "edgemed.bench.gpu_check/1"


def _run(cmd: list[str], *, env: dict | None = None, timeout: int = 3600) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def gpu_facts() -> dict:
    out = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"])
    if out.returncode != 0:
        raise SystemExit(f"nvidia-smi failed ({out.returncode}): {out.stderr.strip()[:300]}")
    name, total, driver = [x.strip() for x in out.stdout.splitlines()[0].split(",")]
    return {"name": name, "memory_mib": int(float(total)), "driver": driver}


def gpu_mib_of(pid: int) -> int | None:
    """GPU memory ``nvidia-smi`` attributes to ``pid`` (MiB), or None when it lists none."""
    out = _run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
    for line in out.stdout.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            return int(float(parts[1]))
    return None


def build(sdist: Path, venv: Path) -> dict:
    """A CUDA build of llama-cpp-python from ``sdist`` into ``venv`` (with this interpreter's packages visible)."""
    t0 = time.perf_counter()
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_CUDA=on", "FORCE_CMAKE": "1"}
    out = _run([str(venv / "bin" / "pip"), "install", "--no-deps", "--no-build-isolation", "--no-index", str(sdist)],
               env=env, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"the CUDA build failed:\n{out.stderr[-3000:]}")
    info = _run([str(venv / "bin" / "python"), "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"])
    system_info = info.stdout.strip()
    if "CUDA" not in system_info:
        raise SystemExit(f"the build does not name CUDA in its system info: {system_info or info.stderr[-500:]}")
    return {"seconds": round(time.perf_counter() - t0, 1), "system_info": system_info}


def _edgemed(python: str, *args: str) -> dict:
    out = _run([python, "-m", "edgemed", *args, "--json"], timeout=1800)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()[-1000:], "exit": out.returncode}
    return json.loads(out.stdout)


_CHILD = r"""
import json, sys, time
from edgemed.devices.profiles import get_profile
from edgemed.runtime.engine import LoadSettings
from edgemed.runtime.llamacpp import Context, SamplerChain
from edgemed.runtime.loader import load_model
from edgemed.runtime.engine import GenerationSettings

path, profile_name, n_ctx, n_tokens, kv = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
s = get_profile(profile_name).llama
kv_type = kv or s["type_k"]
load = LoadSettings(n_gpu_layers=-1, flash_attn=True, type_k=kv_type, type_v=kv_type, use_mmap=s["use_mmap"],
                    use_mlock=False, n_ctx=n_ctx, n_batch=512, n_ubatch=512, extra_buffers=s.get("extra_buffers", "auto"))
t0 = time.perf_counter()
model = load_model(path, load)
ctx = Context(model, load, n_ctx=n_ctx)
loaded = time.perf_counter() - t0
prompt = model.tokenize("The patient presents with chest pain radiating to the left arm. " * 4096)[: n_ctx - n_tokens - 1]
t0 = time.perf_counter()
ctx.eval(prompt)
prefill = time.perf_counter() - t0
sampler = SamplerChain(model, GenerationSettings(temperature=0.0, max_tokens=n_tokens))
pos, t0 = len(prompt), time.perf_counter()
for _ in range(n_tokens):
    token = sampler.sample(ctx, -1)
    ctx.eval([token], pos)
    pos += 1
decode = time.perf_counter() - t0
print(json.dumps({"load_s": round(loaded, 2), "prompt_tokens": len(prompt), "prefill_tok_s": round(len(prompt) / prefill, 1),
                  "decode_tok_s": round(n_tokens / decode, 2), "kv_type": kv_type,
                  "written": {k: v for k, v in model.params.written.items() if isinstance(v, (int, float, bool))}}), flush=True)
sys.stdin.readline()  # the parent reads nvidia-smi while the model is still resident, then lets us go
with open("/proc/self/status") as fh:
    hwm = next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmHWM:"))
print(json.dumps({"host_peak_rss_bytes": hwm}), flush=True)
"""


def measure(python: str, model: Path, profile: str, n_ctx: int, n_tokens: int, kv: str) -> dict:
    proc = subprocess.Popen([python, "-c", _CHILD, str(model), profile, str(n_ctx), str(n_tokens), kv],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        if not first:
            raise SystemExit(f"the measuring child failed: {proc.stderr.read()[-2000:]}")
        result = json.loads(first)
        result["gpu_mib"] = gpu_mib_of(proc.pid)
        proc.stdin.write("\n")
        proc.stdin.flush()
        result.update(json.loads(proc.stdout.readline()))
    finally:
        proc.wait(timeout=120)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", type=Path, help="llama-cpp-python sdist to build with CUDA")
    ap.add_argument("--skip-build", action="store_true", help="use this interpreter's llama-cpp-python (already CUDA)")
    ap.add_argument("--venv", type=Path, default=Path("build/gpu-venv"))
    ap.add_argument("--model", action="append", required=True, metavar="LABEL=PATH")
    ap.add_argument("--profile", default="jetson-agx-orin-64gb")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--kv", action="append", default=None, help="KV cache types to measure (default: f16, then q8_0)")
    ap.add_argument("-o", "--out", type=Path)
    args = ap.parse_args(argv)
    if shutil.which("nvidia-smi") is None:
        raise SystemExit("no nvidia-smi on this machine: the GPU check needs an NVIDIA GPU and its driver")
    if not args.skip_build and not args.sdist:
        raise SystemExit("give --sdist (llama-cpp-python's source archive) or --skip-build")
    models = {}
    for spec in args.model:
        label, _, path = spec.partition("=")
        if not path or not Path(path).is_file():
            raise SystemExit(f"--model {spec!r}: expected LABEL=PATH to a GGUF file")
        models[label] = Path(path)
    report: dict = {"schema": SCHEMA, "host": platform.node(), "gpu": gpu_facts(), "profile": args.profile,
                    "n_ctx": args.ctx, "decode_tokens": args.tokens}
    report["build"] = {"skipped": True} if args.skip_build else build(args.sdist, args.venv)
    python = sys.executable if args.skip_build else str(args.venv / "bin" / "python")
    report["models"] = {}
    for label, path in models.items():
        row = {"path": str(path), "size_bytes": path.stat().st_size,
               "devices_check": _edgemed(python, "devices", "check", str(path), "--profile", args.profile),
               "plan": _edgemed(python, "plan", str(path), "--profile", args.profile, "--ctx", str(args.ctx)),
               "runs": []}
        for kv in args.kv or ["f16", "q8_0"]:
            row["runs"].append(measure(python, path, args.profile, args.ctx, args.tokens, kv))
        report["models"][label] = row
        print(json.dumps({label: row["runs"]}, indent=1), flush=True)
    out = args.out or RESULTS / f"gpu_check-{platform.node() or 'host'}.json"
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    lines = [f"# GPU check on {report['gpu']['name']} ({report['gpu']['memory_mib']} MiB, driver {report['gpu']['driver']})", "",
             f"`python -m edgemed.benchmarks.gpu_check {' '.join(argv or sys.argv[1:])}`", "",
             "| model | KV | plan MiB | host peak MiB | GPU MiB | prefill tok/s | decode tok/s |", "|---|---|---|---|---|---|---|"]
    for label, row in report["models"].items():
        planned = row["plan"].get("estimate", {}).get("total")
        for run in row["runs"]:
            lines.append(f"| {label} | {run['kv_type']} | {planned / 2**20 if planned else float('nan'):,.0f} | "
                         f"{run['host_peak_rss_bytes'] / 2**20:,.0f} | {run['gpu_mib']} | {run['prefill_tok_s']} | {run['decode_tok_s']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
