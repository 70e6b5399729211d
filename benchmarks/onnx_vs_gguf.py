"""Decode speed and peak memory: ONNX int4 vs GGUF Q4_K_M vs GGUF F16, same model, same prompt, one run.

    python -m edgemed.benchmarks.onnx_vs_gguf [--model qwen2.5-0.5b-instruct] [--tokens 64] [--threads 2] [--profile]
        [--device-profile x86-avx2]

Each configuration runs in its own fresh process (peak RSS is that process's
own ``VmHWM``, not ``ru_maxrss``, which Linux carries across ``exec`` from the parent), on the same chat-rendered
medical prompt, greedy, for a fixed number of new tokens (end-of-sequence ignored, so every backend does the same
work). The GGUF configurations load with the device profile's settings (``session.prepare``: CPU profiles read the
file in rather than map it, decision 0004), as ``edgemed run`` would; the JSON records the load mode.
A short warm-up generation is run first and excluded from timing. Decode tok/s
counts tokens after the first (prefill is timed separately). Missing artifacts
are converted first with ``edgemed convert`` into the cache (``$EDGEMED_CACHE_DIR/bench``).
``--profile`` also runs the ONNX model with onnxruntime's profiler and prints
where decode time goes, by operator type.
Writes ``benchmarks/results/onnx_vs_gguf-<model>.json``. Sizes and peak RSS are MiB (2**20 bytes): ``size_mib``,
``peak_rss_mib`` (files written before these names call the same MiB figures ``size_mb`` / ``peak_rss_mb``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
QUESTION = "A 58-year-old woman with type 2 diabetes has an eGFR of 25 mL/min. Which oral drugs are safe, and which should be stopped?"
CONFIGS = (("onnx-int4", "onnx", "int4"), ("gguf-q4_k_m", "gguf", "q4_k_m"), ("gguf-f16", "gguf", "f16"))
WARMUP_TOKENS = 8
MIB = 1 << 20


# -- worker: runs inside the measured process -------------------------------------------------
def _onnx_decode(path: Path, n_tokens: int, threads: int, profile: str | None) -> dict:
    import numpy as np

    from edgemed.runtime.engine import LoadSettings
    from edgemed.runtime.onnx_engine import OnnxEngine

    t = time.perf_counter()
    extra = {"profile": profile} if profile else {}
    engine = OnnxEngine(path, LoadSettings(n_ctx=4096, n_threads=threads, extra=extra))
    load_s = time.perf_counter() - t
    prompt = engine.tokenize(engine.render_chat([{"role": "user", "content": QUESTION}]))

    def run(n):
        steps = engine.decode_steps(prompt)
        t0 = time.perf_counter()
        logits = next(steps)
        t1 = time.perf_counter()
        out = []
        for _ in range(n - 1):
            token = int(np.argmax(logits))
            out.append(token)
            logits = steps.send(token)
        out.append(int(np.argmax(logits)))
        steps.close()
        return t1 - t0, time.perf_counter() - t1, out

    run(WARMUP_TOKENS)
    prefill_s, decode_s, out = run(n_tokens)
    text = engine.detokenize(out)
    engine.close()
    return {"load_s": load_s, "prompt_tokens": len(prompt), "prefill_s": prefill_s, "decode_s": decode_s, "text": text}


def _gguf_decode(path: Path, n_tokens: int, threads: int, device_profile: str | None = None, n_ctx: int = 4096) -> dict:
    from edgemed.runtime.llama_engine import LlamaEngine
    from edgemed.runtime.session import prepare

    prepared = prepare(path, device_profile, n_ctx, threads)  # the profile's load settings, as `edgemed run` plans them
    t = time.perf_counter()
    engine = LlamaEngine(path, prepared.load)
    load_s = time.perf_counter() - t
    use_mmap = engine.load.use_mmap
    ctx = engine.ctx
    prompt = engine.tokenize(engine.render_chat([{"role": "user", "content": QUESTION}]), add_special=True, parse_special=True)

    def run(n):
        ctx.clear()
        t0 = time.perf_counter()
        token = int(ctx.eval(prompt)[-1].argmax())
        t1 = time.perf_counter()
        out = [token]
        for i in range(n - 1):
            token = int(ctx.eval([token], len(prompt) + i)[-1].argmax())
            out.append(token)
        return t1 - t0, time.perf_counter() - t1, out

    run(WARMUP_TOKENS)
    prefill_s, decode_s, out = run(n_tokens)
    text = engine.detokenize(out)
    engine.close()
    return {"load_s": load_s, "prompt_tokens": len(prompt), "prefill_s": prefill_s, "decode_s": decode_s, "text": text,
            "device_profile": prepared.profile, "load_mode": "mapped" if use_mmap else "read in"}


def _genai_decode(path: Path, n_tokens: int, threads: int) -> dict:
    """A model directory run by onnxruntime-genai itself (e.g. the output of its own model builder)."""
    import onnxruntime_genai as og

    t = time.perf_counter()
    config = og.Config(str(path))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    tok = og.Tokenizer(model)
    load_s = time.perf_counter() - t
    template = (path / "chat_template.jinja").read_text(encoding="utf-8") if (path / "chat_template.jinja").exists() else None
    from edgemed.runtime.chat_template import render

    text = render(template, [{"role": "user", "content": QUESTION}]) if template else QUESTION
    prompt = list(tok.encode(text))

    def run(n):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        gen.generate_next_token()
        t1 = time.perf_counter()
        out = [int(gen.get_next_tokens()[0])]
        while len(out) < n and not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return t1 - t0, time.perf_counter() - t1, out

    run(WARMUP_TOKENS)
    prefill_s, decode_s, out = run(n_tokens)
    return {"load_s": load_s, "prompt_tokens": len(prompt), "prefill_s": prefill_s, "decode_s": decode_s, "text": tok.decode(out)}


def worker(kind: str, path: str, n_tokens: int, threads: int, profile: str | None, device_profile: str | None = None) -> None:
    from edgemed.benchmarks.harness.child import peak_rss_bytes

    if kind == "onnx":
        r = _onnx_decode(Path(path), n_tokens, threads, profile)
    elif kind == "genai":
        r = _genai_decode(Path(path), n_tokens, threads)
    else:
        r = _gguf_decode(Path(path), n_tokens, threads, device_profile)
    r["decode_tok_s"] = (n_tokens - 1) / r["decode_s"]
    r["prefill_tok_s"] = r["prompt_tokens"] / r["prefill_s"]
    r["peak_rss_mib"] = peak_rss_bytes() / MIB  # this process's own high-water mark (VmHWM), not the parent's
    print(json.dumps(r))


# -- driver -----------------------------------------------------------------------------------
def _measure(kind: str, path: Path, args, profile: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "edgemed.benchmarks.onnx_vs_gguf", "--worker", kind, str(path),
           "--tokens", str(args.tokens), "--threads", str(args.threads)]
    if args.device_profile:
        cmd += ["--device-profile", args.device_profile]
    if profile:
        cmd += ["--profile-prefix", profile]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _artifact(ckpt: Path, cache: Path, target: str, quant: str) -> Path:
    out = cache / (f"{ckpt.name}-onnx-{quant}" if target == "onnx" else f"{ckpt.name}-{quant}.gguf")
    if not out.exists():
        print(f"converting {ckpt.name} -> {out.name} ...", flush=True)
        subprocess.run([sys.executable, "-m", "edgemed", "convert", str(ckpt), "--to", target, "--quant", quant,
                        "--no-parity", "-o", str(out)], check=True)
    return out


def summarize_profile(trace_file: Path) -> list[tuple[str, float, float]]:
    """(op type, ms per decode step, share) over the decode runs of an onnxruntime profile (prefill excluded)."""
    events = json.loads(trace_file.read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    # warm-up and measured generations each start with a prefill: keep only the short (one-token) runs
    prefill_dur = runs[0]["dur"] if runs else 0
    decode_runs = [r for r in runs if r["dur"] < 0.5 * prefill_dur]
    spans = [(r["ts"], r["ts"] + r["dur"]) for r in decode_runs]
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if any(a <= e["ts"] <= b for a, b in spans):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"]
    total_run = sum(r["dur"] for r in decode_runs)
    steps = max(len(decode_runs), 1)
    rows = sorted(by_op.items(), key=lambda kv: -kv[1])
    rows = [(op, us / steps / 1000, us / total_run) for op, us in rows]
    kernels = sum(by_op.values())
    rows.append(("(outside kernels: session overhead, copies)", (total_run - kernels) / steps / 1000, (total_run - kernels) / total_run))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-0.5b-instruct", help="example model name (edgemed.converters.source.pip_models) or HF dir")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per measured generation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="runs per configuration (fresh process each); the best is reported")
    ap.add_argument("--profile", action="store_true", help="also profile the ONNX decode with onnxruntime's profiler")
    ap.add_argument("--onnx", type=Path, help="use this ONNX int4 directory instead of converting")
    ap.add_argument("--genai", type=Path, help="also run this directory with onnxruntime-genai (e.g. its model builder's int4 output)")
    ap.add_argument("--label", default="", help="suffix for the results file (e.g. genai-graph)")
    ap.add_argument("--device-profile", help="device profile whose load settings the GGUF runs use [default: detected]")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--profile-prefix", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker[0], args.worker[1], args.tokens, args.threads, args.profile_prefix, args.device_profile)

    from edgemed import env
    from edgemed.converters.source import pip_models

    ckpt = Path(args.model) if Path(args.model).is_dir() else pip_models.hf_checkpoint(args.model)
    cache = env.cache_dir("bench")
    paths = {name: (args.onnx if name == "onnx-int4" and args.onnx else _artifact(ckpt, cache, target, quant))
             for name, target, quant in CONFIGS}
    configs = list(CONFIGS)
    if args.genai:
        configs.append(("genai-builder", "genai", "int4"))
        paths["genai-builder"] = args.genai
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    for _ in range(args.repeat):  # interleaved, so a noisy neighbour hurts every configuration alike
        for name, target, _ in configs:
            runs[name].append(_measure(target, paths[name], args))
    result = {"model": ckpt.name, "tokens": args.tokens, "threads": args.threads, "question": QUESTION, "configs": {},
              "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()}}
    print(f"{ckpt.name}: {args.tokens} new tokens, greedy, {args.threads} threads, best of {args.repeat} fresh processes")
    print(f"  {'config':12s} {'decode tok/s':>12s} {'(all runs)':>16s} {'prefill tok/s':>13s} {'peak RSS MiB':>12s} {'size MiB':>8s}")
    for name, _, _ in configs:
        rs = runs[name]
        best = max(rs, key=lambda r: r["decode_tok_s"])
        size = sum(f.stat().st_size for f in (paths[name].iterdir() if paths[name].is_dir() else [paths[name]]))
        result["configs"][name] = {
            "path": str(paths[name]), "size_mib": round(size / MIB, 1),
            "decode_tok_s": round(best["decode_tok_s"], 2), "decode_tok_s_runs": [round(r["decode_tok_s"], 2) for r in rs],
            "decode_tok_s_median": round(statistics.median(r["decode_tok_s"] for r in rs), 2),
            "prefill_tok_s": round(best["prefill_tok_s"], 1), "prompt_tokens": best["prompt_tokens"],
            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in rs), 1), "load_s": round(best["load_s"], 2),
            "text": best["text"][:200], **{k: best[k] for k in ("device_profile", "load_mode") if k in best},
        }
        c = result["configs"][name]
        runs_txt = ", ".join(f"{v:.1f}" for v in c["decode_tok_s_runs"])
        print(f"  {name:12s} {c['decode_tok_s']:12.1f} {runs_txt:>16s} {c['prefill_tok_s']:13.1f} {c['peak_rss_mib']:12.0f} {c['size_mib']:8.0f}")
    ratio = result["configs"]["onnx-int4"]["decode_tok_s"] / result["configs"]["gguf-q4_k_m"]["decode_tok_s"]
    result["onnx_int4_over_gguf_q4_k_m"] = round(ratio, 3)
    print(f"  ONNX int4 / GGUF Q4_K_M decode: {ratio:.2f}x (goal >= 0.8x)")
    if args.profile:
        prefix = str(cache / "onnx-profile")
        _measure("onnx", paths["onnx-int4"], args, profile=prefix)
        trace = max(cache.glob("onnx-profile*.json"), key=lambda p: p.stat().st_mtime)
        rows = summarize_profile(trace)
        result["onnx_decode_profile"] = [{"op": op, "ms_per_step": round(ms, 3), "share": round(sh, 4)} for op, ms, sh in rows]
        print(f"  ONNX int4 decode profile (onnxruntime profiler, {trace.name}):")
        for op, ms, share in rows[:12]:
            print(f"    {op:44s} {ms:7.2f} ms/step  {share * 100:5.1f}%")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"onnx_vs_gguf-{ckpt.name}{'-' + args.label if args.label else ''}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
