"""Flash attention on against off, model by model: what decides it is the width of the attention heads.

    python -m edgemed.benchmarks.flash_attn_shapes                          # every pip-carried model installed
    python -m edgemed.benchmarks.flash_attn_shapes --model qwen2.5-0.5b-instruct --model PATH.gguf --rounds 2

Why: on a CPU, llama.cpp's flash-attention kernel speeds prefill, and on some models it halves decode once the
context holds a conversation (decision 0011). A CPU profile therefore lists in ``[llama] flash_attn_head_dims`` the
head widths that get it (decision 0017); this is the measurement behind that list.

How: llama.cpp's own ``llama-bench`` (built by ``python -m edgemed.benchmarks.anchors build`` from the installed
llama-cpp-python, so the same kernels as edgemed's runtime) on each model file, ``--threads`` threads, one
repetition per call: a ``--prompt``-token prompt from an empty context, ``--decode`` tokens decoded from an empty
context and at depth ``--depth`` (the context a clinician's conversation reaches), and a ``--question``-token prompt
read at that depth (a conversation's next question, its history already in the cache). Each round runs every
(model, flash attention) pair once, the on/off order alternating between rounds so drift hits both alike; the
ratio on / off is taken per round and its median reported. The attention shape (query heads, KV heads, head
width) comes from each file's GGUF header, as the planner reads it.

Results: ``benchmarks/results/flash_attn_shapes/<cpu>-t<threads>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

TESTS = ("prefill", "decode", "decode_at_depth", "question_at_depth")


def installed_models() -> list[str]:
    """The pip-carried example models whose packages are installed (the others are skipped, not fetched)."""
    from edgemed.converters.source import pip_models
    from edgemed.errors import InputError

    names = []
    for name in pip_models.KNOWN:
        try:
            pip_models.gguf_file(name)
        except InputError:
            continue
        names.append(name)
    return names


def attention_shape(path: Path) -> dict:
    from edgemed.runtime.plan import read_shape

    s = read_shape(path)
    return {"arch": s.arch, "n_layer": s.n_layer, "n_embd": s.n_embd, "n_head": s.n_head, "n_head_kv": s.n_head_kv,
            "head_dim": s.head_dim_k, "weights_mib": round(s.weights_bytes / 2**20, 1)}


def bench_command(binary: Path, path: Path, fa: bool, args) -> list[str]:
    """One llama-bench call: the prompt and the question from an empty context and at depth (llama-bench crosses
    them), and decode from an empty context and at depth."""
    return [str(binary), "-m", str(path), "-t", str(args.threads), "-fa", "1" if fa else "0", "-r", "1",
            "-p", f"{args.prompt},{args.question}", "-n", str(args.decode), "-d", f"0,{args.depth}", "-o", "json"]


def parse(rows: list[dict], args) -> dict[str, float]:
    """tok/s of each test in TESTS from llama-bench's JSON rows (the rows of the prompt at depth and the question
    from an empty context are left out: llama-bench crosses every prompt size with every depth)."""
    out = {}
    for row in rows:
        if row["n_prompt"] == args.prompt and row["n_gen"] == 0 and row["n_depth"] == 0:
            out["prefill"] = row["avg_ts"]
        elif row["n_prompt"] == args.question and row["n_gen"] == 0 and row["n_depth"] == args.depth:
            out["question_at_depth"] = row["avg_ts"]
        elif row["n_gen"] == args.decode and row["n_prompt"] == 0:
            out["decode" if row["n_depth"] == 0 else "decode_at_depth"] = row["avg_ts"]
    missing = [t for t in TESTS if t not in out]
    if missing:
        from edgemed.benchmarks.anchors import AnchorError

        raise AnchorError(f"llama-bench gave no {', '.join(missing)} row: {json.dumps(rows)[:400]}",
                          "rebuild it (`python -m edgemed.benchmarks.anchors build --force`): its JSON output changed")
    return out


def run_bench(cmd: list[str]) -> tuple[list[dict], float]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        from edgemed.benchmarks.anchors import AnchorError

        raise AnchorError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()[-600:]}",
                          "check that the file loads (`edgemed plan FILE`), or rebuild the anchors")
    return json.loads(proc.stdout), time.monotonic() - t0


def measure(args) -> dict:
    from edgemed.benchmarks import anchors
    from edgemed.benchmarks.serve_vs_llama_server import model_path
    from edgemed.runtime.llamacpp import build

    binary = anchors.binaries()["llama-bench"]
    models = {name: model_path(name) for name in (args.model or installed_models())}
    shapes = {name: attention_shape(path) for name, path in models.items()}
    runs = {name: {"off": [], "on": []} for name in models}
    meta = None
    t_start = time.monotonic()
    for r in range(args.rounds):
        for name, path in models.items():
            for fa in ((False, True) if r % 2 == 0 else (True, False)):
                rows, seconds = run_bench(bench_command(binary, path, fa, args))
                meta = meta or {k: rows[0].get(k) for k in ("build_commit", "cpu_info", "n_batch", "n_ubatch",
                                                             "type_k", "type_v", "repack")}
                runs[name]["on" if fa else "off"].append(parse(rows, args))
                print(f"round {r + 1} {name} fa={'on' if fa else 'off'}: "
                      + ", ".join(f"{t} {v:.1f}" for t, v in runs[name]["on" if fa else "off"][-1].items())
                      + f" tok/s ({seconds:.0f} s)", flush=True)
    models_out = {}
    for name, path in models.items():
        on, off = runs[name]["on"], runs[name]["off"]
        ratios = {t: [a[t] / b[t] for a, b in zip(on, off)] for t in TESTS}
        models_out[name] = {"file": str(path), "shape": shapes[name], "runs": runs[name],
                            "ratio_on_off": {t: round(statistics.median(v), 3) for t, v in ratios.items()},
                            "ratio_on_off_per_round": {t: [round(x, 3) for x in v] for t, v in ratios.items()}}
    return {"benchmark": "flash_attn_shapes", "command": "python -m edgemed.benchmarks.flash_attn_shapes "
            + " ".join(args.argv or []), "threads": args.threads, "prompt_tokens": args.prompt,
            "decode_tokens": args.decode, "question_tokens": args.question, "depth": args.depth, "rounds": args.rounds, "llama_bench": meta,
            "llama_bench_binary": str(binary), "llama_bench_compiled_by": anchors.built_with(), "cpu": meta["cpu_info"],
            "runtime_system_info": build().system_info.strip(), "seconds": round(time.monotonic() - t_start, 1),
            "models": models_out}


def report_md(result: dict) -> str:
    lines = [f"# Flash attention on / off by attention shape, {result['threads']} threads ({result['llama_bench']['cpu_info']})",
             "", f"`{result['command'].strip()}` ({result['seconds']:.0f} s); llama.cpp {result['llama_bench']['build_commit']}, "
             f"llama-bench defaults otherwise (n_batch {result['llama_bench']['n_batch']}, n_ubatch "
             f"{result['llama_bench']['n_ubatch']}, KV {result['llama_bench']['type_k']}/{result['llama_bench']['type_v']}).",
             "", f"System info: `{result['runtime_system_info']}`"
             + (f"; llama-bench compiled by {result['llama_bench_compiled_by']}" if result.get("llama_bench_compiled_by")
                else ""), "",
             f"Prompt {result['prompt_tokens']} tokens; decode {result['decode_tokens']} tokens from an empty context "
             f"and at depth {result['depth']}; a {result.get('question_tokens', '-')}-token question read at depth "
             f"{result['depth']}; median over {result['rounds']} rounds of the per-round ratio on / off.", "",
             "| model | arch | heads / KV heads | head width | weights MiB | prefill on/off | decode on/off | "
             f"decode at {result['depth']} on/off | decode at {result['depth']} tok/s off, on | question at "
             f"{result['depth']} on/off |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in sorted(result["models"].items(), key=lambda kv: (kv[1]["shape"]["head_dim"], kv[0])):
        s, r = m["shape"], m["ratio_on_off"]
        off = statistics.median(x["decode_at_depth"] for x in m["runs"]["off"])
        on = statistics.median(x["decode_at_depth"] for x in m["runs"]["on"])
        question = f"{r['question_at_depth']:.3f}x" if "question_at_depth" in r else "-"  # runs before it was measured
        lines.append(f"| {Path(name).name if name.endswith('.gguf') else name} | {s['arch']} | {s['n_head']} / "
                     f"{s['n_head_kv']} | {s['head_dim']} | {s['weights_mib']} | {r['prefill']:.3f}x | {r['decode']:.3f}x | "
                     f"{r['decode_at_depth']:.3f}x | {off:.1f}, {on:.1f} | {question} |")
    lines += ["", "Per-round ratios are in the JSON beside this page (`ratio_on_off_per_round`)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="an example model name or a .gguf path (repeat; default: all installed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=724, help="prompt tokens (from an empty context)")
    ap.add_argument("--decode", type=int, default=16, help="tokens decoded from an empty context and at --depth")
    ap.add_argument("--depth", type=int, default=1500, help="context filled before the second decode and the question")
    ap.add_argument("--question", type=int, default=32, help="prompt tokens read at --depth (a conversation's next turn)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    from edgemed.benchmarks.serve_bench_client import save_results
    from edgemed.errors import EdgemedError

    try:
        result = measure(args)
    except EdgemedError as exc:
        raise SystemExit(f"error: {exc}") from None
    cpu = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)", "", result["llama_bench"]["cpu_info"].lower())).strip("-")
    out = args.out or (Path(__file__).resolve().parent / "results" / "flash_attn_shapes" / f"{cpu}-t{args.threads}.json")
    save_results(out, result, report_md(result))


if __name__ == "__main__":
    main()
