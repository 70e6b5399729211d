"""Prefill speed: edgemed's runtime against llama-server with its own defaults, and flash attention / KV type.

    python -m edgemed.benchmarks.anchors build          # once: llama-server from the installed sdist
    python -m edgemed.benchmarks.prefill_speed          # Qwen2.5-0.5B Q4_K_M, 2 threads, 2 rounds
    python -m edgemed.benchmarks.prefill_speed --quick  # SmolLM2-135M, short prompts, 1 round: a smoke run

Two questions, one run, one model file, the same thread count on both sides:

1. **edgemed vs llama-server.** A ``--short`` (700) and a ``--long`` (1,500) token chat prompt (the synthetic
   clinical record of ``serve_bench_client.long_prompt``). edgemed loads the file the way ``edgemed run`` does
   (``session.prepare``: the detected device profile, its memory plan, ``--threads``; then ``loader.load_model``,
   self-test included) and prefills with ``Context.eval``, the call ``llamacpp.generate`` makes. llama-server runs
   with its defaults (only ``-m``, ``-t``, ``-c`` and the port are given: flash attention ``auto``, ``-b 2048
   -ub 512``, mmap); its own ``timings.prompt_per_second`` of a ``/completion`` with ``cache_prompt: false`` is
   the figure. Both are server- or process-side prefill times: no HTTP, no tokenization.
2. **Flash attention and the KV type.** edgemed's context with flash attention off (f16 cache), on (f16) and on
   with a q8_0 K and V cache (a quantized V needs flash attention). Each arm prefills the long prompt, decodes
   ``--decode`` greedy tokens, prefills ``--long`` more tokens on top (depth ``--long``..2x``--long``: the prompt
   of a long conversation) and decodes again: prefill tok/s of the first and second half, their sum (a
   2x``--long`` prompt) and decode tok/s at both depths.

3. **Where the weights sit** (``--buffers MODE``, repeatable): the model loaded a second time with another
   ``extra_buffers`` mode (``runtime/buffers.py``: ``repack``, ``none``, ``all``), the profile's flash attention
   and KV type, as arm ``buffers-MODE``. llama.cpp's CPU repack kernels and its plain kernels trade prefill
   against decode differently per CPU and quant type; the arm measures that trade beside the rest.
4. **The micro-batch** (``--ubatch N``, repeatable): the profile's model, flash attention and KV type in a context
   whose ``n_ubatch`` is N (read back from llama.cpp), as arm ``ubatch-N``. The one-sequence engine keeps a
   conversation's cells in whole micro-batches (decision 0020), so a smaller one recomputes less each turn; this arm
   measures what it costs a whole prompt.

Every round runs every arm once, in an order that rotates each round (A B C D, B C D A, ...), so the load of a
shared box falls on all arms alike; ``os.getloadavg()`` is kept before and after each measurement, and the
report gives the median of the rounds and, per round, ratios taken within that round. Results:
``benchmarks/results/prefill_speed/<model>-t<threads>.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

#: edgemed's context settings compared in question 2: label -> (flash_attn, type_k, type_v)
KV_ARMS = {"fa-off-f16": (False, "f16", "f16"), "fa-on-f16": (True, "f16", "f16"), "fa-on-q8_0": (True, "q8_0", "q8_0")}
SERVER = "llama-server"
#: arm name of the model loaded again with another extra_buffers mode: BUFFERS + mode
BUFFERS = "buffers-"
#: arm name of the profile's context with another micro-batch: UBATCH + rows
UBATCH = "ubatch-"
GOAL = 0.95
#: what llama-server's default ``-fa auto`` becomes here (its log at the default verbosity does not say)
FA_AUTO_NOTE = ("auto: llama_context probes the flash-attention op and keeps it on when the layer's device runs it; "
                "the CPU backend does, so on a CPU-only build auto means on (src/llama-context.cpp, resolve())")


def llama_server_command(binary: Path, path: Path, port: int, threads: int, n_ctx: int,
                         extra: tuple[str, ...] = ()) -> list[str]:
    """llama-server as a user starts it: model, threads, context and port; every other setting its default, except
    ``extra`` (``--server-arg``: only where its defaults cannot run on the host, and then named in the report)."""
    return [str(binary), "-m", str(path), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
            "-c", str(n_ctx), *extra]


def prompt_timing(response: dict) -> tuple[int, float]:
    """``(prompt tokens computed, prefill seconds)`` from a llama-server ``/completion`` answer's ``timings``."""
    t = response.get("timings") or {}
    if not t.get("prompt_n") or not t.get("prompt_ms"):
        raise ValueError(f"the answer has no prompt timings: {sorted(t)}")
    return int(t["prompt_n"]), float(t["prompt_ms"]) / 1000.0


def rotation(arms: list[str], r: int) -> list[str]:
    """The order of round ``r``: the arms rotated by ``r`` (each arm leads once every len(arms) rounds)."""
    k = r % len(arms)
    return arms[k:] + arms[:k]


def median_by(runs: list[dict], key: str) -> float | None:
    vals = [x[key] for x in runs if x.get(key) is not None]
    return statistics.median(vals) if vals else None


def ratios_per_round(runs: dict[str, list[dict]], num: str, den: str, key: str) -> list[float]:
    """``num / den`` of ``key`` within each round both arms ran (a ratio from the same load), in round order."""
    from edgemed.benchmarks.provenance import paired_ratios

    return paired_ratios(runs.get(num, []), runs.get(den, []), key)


class EdgemedPrefill:
    """The model loaded as ``edgemed run`` loads it, and one context per arm (same model, same threads)."""

    def __init__(self, path: Path, threads: int, profile: str | None, buffers: tuple[str, ...] = ()):
        from edgemed.runtime import llamacpp
        from edgemed.runtime.loader import load_model
        from edgemed.runtime.session import prepare

        self.prepared = prepare(path, profile, threads=threads)
        self.model = load_model(path, self.prepared.load)
        # the same file again per other extra_buffers mode (weights placed at load: one model per mode)
        self.others = {mode: load_model(path, replace(self.prepared.load, extra_buffers=mode)) for mode in buffers}
        self.llamacpp = llamacpp
        self.contexts: dict = {}

    def context(self, arm: str):
        if arm not in self.contexts:
            model = self.others[arm.removeprefix(BUFFERS)] if arm.startswith(BUFFERS) else self.model
            fa, tk, tv = KV_ARMS.get(arm, (None, None, None))
            load = model.load if fa is None else replace(model.load, flash_attn=fa, type_k=tk, type_v=tv)
            if arm.startswith(UBATCH):
                load = replace(load, n_ubatch=int(arm.removeprefix(UBATCH)))
            ctx = self.llamacpp.Context(model, load)
            if arm.startswith(UBATCH) and ctx.n_ubatch != load.n_ubatch:  # read back: llama.cpp caps it at n_batch
                raise SystemExit(f"error: arm {arm}: llama.cpp runs micro-batches of {ctx.n_ubatch} rows, not "
                                 f"{load.n_ubatch} (at most n_batch = {ctx.n_batch})")
            ctx.eval(model.tokenize("Warm-up.", True, True))  # first decode allocates: not timed
            self.contexts[arm] = ctx
        return self.contexts[arm]

    def prefill(self, arm: str, tokens: list[int], n_past: int = 0):
        """Seconds to prefill ``tokens`` at ``n_past`` (the cache cleared first when 0), and the last logits."""
        ctx = self.context(arm)
        if n_past == 0:
            ctx.clear()
        t0 = time.perf_counter()
        logits = ctx.eval(tokens, n_past)
        return time.perf_counter() - t0, logits

    def decode(self, arm: str, logits, pos: int, n: int) -> float:
        """Greedy decode of ``n`` tokens from ``pos``: tokens per second (one ``eval`` per token, as ``generate``)."""
        ctx = self.context(arm)
        t0 = time.perf_counter()
        for i in range(n):
            logits = ctx.eval([int(logits[-1].argmax())], pos + i)
        return n / (time.perf_counter() - t0)

    def describe(self) -> dict:
        from edgemed.runtime import buffers

        load = self.model.load
        build = self.llamacpp.build()
        return {"extra_buffers_mode": buffers.resolve(load.extra_buffers, build),
                "other_buffers": {m: buffers.resolve(m, build) for m in self.others}, "profile": self.prepared.profile, "n_ctx": load.n_ctx, "n_threads": load.n_threads,
                "n_threads_batch": load.n_threads_batch, "n_batch": load.n_batch, "n_ubatch": load.n_ubatch,
                "profile_flash_attn": load.flash_attn, "profile_type_k": load.type_k, "profile_type_v": load.type_v,
                "use_mmap": load.use_mmap, "extra_buffers": load.extra_buffers}

    def close(self) -> None:
        for ctx in self.contexts.values():
            ctx.close()
        for model in (self.model, *self.others.values()):
            model.close()


def server_prefill(server, tokens: list[int]) -> tuple[int, float]:
    import httpx2

    body = {"prompt": tokens, "n_predict": 1, "cache_prompt": False, "temperature": 0}
    resp = httpx2.post(server.url + "/completion", json=body, timeout=900)
    resp.raise_for_status()
    return prompt_timing(resp.json())


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def measure(args) -> dict:
    from edgemed.benchmarks import anchors
    from edgemed.runtime import native_build
    from edgemed.benchmarks.serve_bench_client import LlamaServer, long_prompt
    from edgemed.benchmarks.serve_vs_llama_server import model_path

    path = model_path(args.model)
    em = EdgemedPrefill(path, args.threads, args.profile, tuple(args.buffers))
    n_ctx = em.model.load.n_ctx
    if 2 * args.long + 2 * args.decode + 8 > n_ctx:
        raise SystemExit(f"error: 2 x --long + decode ({2 * args.long + 2 * args.decode}) does not fit the profile's "
                         f"context of {n_ctx}; use a smaller --long")
    short = em.model.tokenize(long_prompt(em.model, args.short), True, True)
    long2 = em.model.tokenize(long_prompt(em.model, 2 * args.long), True, True)
    long1, rest = long2[:args.long], long2[args.long:2 * args.long]

    class DefaultLlamaServer(LlamaServer):
        name = SERVER

        def command(self) -> list[str]:
            return llama_server_command(self.binary, self.path, self.port, self.threads, n_ctx, self.extra)

    server = None if args.no_server else DefaultLlamaServer(anchors.binaries()["llama-server"], path=path,
                                                            threads=args.threads, slots=1, ctx_per_slot=n_ctx,
                                                            extra=tuple(args.server_arg))
    mine = list(KV_ARMS) + [BUFFERS + mode for mode in args.buffers] + [UBATCH + str(n) for n in args.ubatch]
    arms = mine + ([] if server is None else [SERVER])
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    t_start = time.perf_counter()
    try:
        if server is not None:
            server.start()
            server_prefill(server, short[:32])  # warm-up, not timed
        for arm in mine:
            em.context(arm)
        for r in range(args.rounds):
            for arm in rotation(arms, r):
                row: dict = {"round": r}
                if arm == SERVER:
                    for label, toks in (("short", short), ("long", long1)):
                        l0 = _load()
                        n, secs = server_prefill(server, toks)
                        row[f"{label}_tokens"], row[f"{label}_prefill_s"] = n, round(secs, 4)
                        row[f"{label}_prefill_tok_s"] = round(n / secs, 2)
                        row[f"{label}_loadavg"] = (l0, _load())
                else:
                    l0 = _load()
                    secs, _ = em.prefill(arm, short)
                    row |= {"short_tokens": len(short), "short_prefill_s": round(secs, 4),
                            "short_prefill_tok_s": round(len(short) / secs, 2), "short_loadavg": (l0, _load())}
                    l0 = _load()
                    secs, logits = em.prefill(arm, long1)
                    row |= {"long_tokens": len(long1), "long_prefill_s": round(secs, 4),
                            "long_prefill_tok_s": round(len(long1) / secs, 2)}
                    row["decode_tok_s_at_long"] = round(em.decode(arm, logits, len(long1), args.decode), 2)
                    secs2, logits = em.prefill(arm, rest, len(long1) + args.decode)
                    row |= {"second_half_prefill_s": round(secs2, 4),
                            "second_half_prefill_tok_s": round(len(rest) / secs2, 2),
                            "double_prefill_tok_s": round((len(long1) + len(rest)) / (secs + secs2), 2)}
                    row["decode_tok_s_at_double"] = round(
                        em.decode(arm, logits, len(long1) + len(rest) + args.decode, args.decode), 2)
                    row["long_loadavg"] = (l0, _load())
                runs[arm].append(row)
                print(f"round {r} {arm:>12s}: " + ", ".join(f"{k} {v}" for k, v in row.items()
                                                            if k.endswith("tok_s")), flush=True)
    finally:
        described = em.describe()
        em.close()
        server_info = None
        if server is not None:
            server.stop()
            server_info = server.describe() | {"flash_attn": FA_AUTO_NOTE, "changed": list(args.server_arg),
                                               "compiled_by": anchors.built_with()}
    keys = ("short_prefill_tok_s", "long_prefill_tok_s", "second_half_prefill_tok_s", "double_prefill_tok_s",
            "decode_tok_s_at_long", "decode_tok_s_at_double")
    medians = {a: {k: median_by(runs[a], k) for k in keys if median_by(runs[a], k) is not None} for a in arms}
    profile_arm = next(a for a, v in KV_ARMS.items()
                       if v == (described["profile_flash_attn"], described["profile_type_k"], described["profile_type_v"]))
    vs_server = {}
    if server is not None:
        for a in mine:
            vs_server[a] = {k: {"per_round": (rr := ratios_per_round(runs, a, SERVER, k)),
                                "median": statistics.median(rr) if rr else None}
                            for k in ("short_prefill_tok_s", "long_prefill_tok_s")}
    vs_fa_off = {a: {k: {"per_round": (rr := ratios_per_round(runs, a, "fa-off-f16", k)),
                         "median": statistics.median(rr) if rr else None} for k in keys}
                 for a in mine if a != "fa-off-f16"}
    return {"model": path.name, "model_path": str(path), "threads": args.threads, "rounds": args.rounds,
            "short_tokens": len(short), "long_tokens": len(long1), "double_tokens": len(long1) + len(rest),
            "decode_tokens": args.decode, "edgemed": described | {"compiled_by": list(native_build.compilers()),
                                                                  "library_sha256": native_build.digest()},
            "profile_arm": profile_arm,
            "llama_server": server_info, "arms": arms, "runs": runs, "medians": medians,
            "ratio_vs_llama_server": vs_server, "ratio_vs_fa_off": vs_fa_off, "goal": GOAL,
            "wall_s": round(time.perf_counter() - t_start, 1),
            "command": "python -m edgemed.benchmarks.prefill_speed " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "note": "a shared box under other work: load averages are per measurement"}}


def _fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def report_md(m: dict) -> str:
    e, loads = m["edgemed"], [x for rs in m["runs"].values() for r in rs for k, x in r.items() if k.endswith("loadavg")]
    lo, hi = min(min(x) for x in loads), max(max(x) for x in loads)
    lines = [f"# Prefill speed: {m['model']}, {m['threads']} threads", "",
             f"edgemed loads as `edgemed run` does (profile `{e['profile']}`: n_ctx {e['n_ctx']}, n_batch "
             f"{e['n_batch']}, n_ubatch {e['n_ubatch']}, flash_attn {e['profile_flash_attn']}, KV "
             f"{e['profile_type_k']}/{e['profile_type_v']}"
             + (f", extra buffers `{e['extra_buffers_mode']}`" if e.get("extra_buffers_mode") else "")
             + (f"; arms `{BUFFERS}MODE`: the same file loaded again with that mode, the profile's other settings"
                if e.get("other_buffers") else "")
             + (f"; arms `{UBATCH}N`: the profile's context with micro-batches of N rows (read back)"
                if any(a.startswith(UBATCH) for a in m["arms"]) else "") + "); llama-server with its defaults"
             + (f" except `{' '.join(m['llama_server']['changed'])}`" if (m["llama_server"] or {}).get("changed") else "")
             + " "
             f"(`{' '.join(m['llama_server']['command'][1:]) if m['llama_server'] else 'not run'}`"
             + ("; flash attention `auto`, which is on for the CPU backend" if m["llama_server"] else "") + "). "
             f"Median of {m['rounds']} interleaved rounds (arm order rotated each round). "
             + (f"**Taken under load**: the box is shared ({m['machine']['cpu_count']} CPUs, 1-minute load average "
                f"{lo:.1f}-{hi:.1f} during the run), so absolute figures are low and noisy; the ratios are taken within "
                "each round." if hi > m["threads"] + 0.5 else
                f"Quiet box: 1-minute load average {lo:.1f}-{hi:.1f} on {m['machine']['cpu_count']} CPUs during the run, "
                f"the measured process's own {m['threads']} threads included; ratios are taken within each round."), "",
             f"Command: `{m['command']}` ({m['wall_s']:.0f} s)", "",
             f"Builds: edgemed's llama.cpp compiled by {', '.join(e.get('compiled_by') or []) or 'a compiler that left no name'}"
             + (f"; llama-server by {m['llama_server'].get('compiled_by') or 'an unknown compiler'}"
                if m["llama_server"] else "") + ".", "",
             (f"| arm | prefill {m['short_tokens']} tok/s | prefill {m['long_tokens']} tok/s | prefill at depth "
              f"{m['long_tokens']}-{m['double_tokens']} | prefill {m['double_tokens']} (sum) | decode at "
              f"{m['long_tokens']} | decode at {m['double_tokens']} |"), "|---|---|---|---|---|---|---|"]
    for a in m["arms"]:
        md = m["medians"][a]
        label = f"edgemed {a}" + (" (profile)" if a == m["profile_arm"] else "") if a != SERVER else (
            "llama-server (defaults" + "".join(f" {x}" for x in (m["llama_server"] or {}).get("changed", ())) + ")")
        lines.append(f"| {label} | {_fmt(md.get('short_prefill_tok_s'))} | {_fmt(md.get('long_prefill_tok_s'))} | "
                     f"{_fmt(md.get('second_half_prefill_tok_s'))} | {_fmt(md.get('double_prefill_tok_s'))} | "
                     f"{_fmt(md.get('decode_tok_s_at_long'))} | {_fmt(md.get('decode_tok_s_at_double'))} |")
    if m["ratio_vs_llama_server"]:
        lines += ["", f"edgemed / llama-server prefill tok/s, per round (median); goal >= {m['goal']}x:", "",
                  f"| edgemed arm | {m['short_tokens']} tokens | {m['long_tokens']} tokens |", "|---|---|---|"]
        for a, rr in m["ratio_vs_llama_server"].items():
            cells = [f"{_fmt(v['median'], '.3f')}x ({', '.join(f'{x:.3f}' for x in v['per_round'])})" for v in rr.values()]
            lines.append(f"| {a}{' (profile)' if a == m['profile_arm'] else ''} | " + " | ".join(cells) + " |")
    lines += ["", "Against flash attention off (f16), per round (median):", "",
              "| arm | " + " | ".join(k.replace("_tok_s", "").replace("_", " ") for k in next(iter(m["ratio_vs_fa_off"].values()))) + " |",
              "|---|" + "---|" * len(next(iter(m["ratio_vs_fa_off"].values())))]
    for a, rr in m["ratio_vs_fa_off"].items():
        lines.append(f"| {a} | " + " | ".join(f"{_fmt(v['median'], '.3f')}x" for v in rr.values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from edgemed.benchmarks.serve_bench_client import add_server_arg

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b-instruct", help="an installed example model name or a .gguf path")
    ap.add_argument("--profile", help="device profile (default: the detected one, as `edgemed run`)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--short", type=int, default=700, help="tokens of the short prompt")
    ap.add_argument("--long", type=int, default=1500, help="tokens of the long prompt (the flash-attention arms go to 2x)")
    ap.add_argument("--decode", type=int, default=16, help="greedy tokens decoded at each depth")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-server", action="store_true", help="edgemed's arms only (no llama-server)")
    ap.add_argument("--quick", action="store_true", help="SmolLM2-135M, 64/128-token prompts, 4 decode tokens, 1 round")
    add_server_arg(ap)
    ap.add_argument("--ubatch", action="append", default=[], type=int,
                    help="one more arm: the profile's context with micro-batches of this many rows (n_ubatch, read "
                    "back), its flash attention and KV type; repeatable")
    ap.add_argument("--buffers", action="append", default=[], choices=("all", "repack", "none"),
                    help="one more arm: the model loaded with this extra_buffers mode, the profile's flash attention "
                         "and KV type (repeatable)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    args.argv = argv
    if any(n < 1 for n in args.ubatch) or len(set(args.ubatch)) != len(args.ubatch):
        ap.error(f"--ubatch takes distinct row counts of at least 1, got {args.ubatch}")
    if args.quick:
        args.model, args.short, args.long, args.decode, args.rounds = "smollm2-135m-instruct", 64, 128, 4, 1
    from edgemed.benchmarks.serve_bench_client import save_results

    from edgemed.errors import EdgemedError

    try:
        result = measure(args)
    except EdgemedError as exc:
        raise SystemExit(f"error: {exc}") from None
    out = args.out or (Path(__file__).resolve().parent / "results" / "prefill_speed"
                       / f"{Path(result['model']).stem}-t{args.threads}.json")
    save_results(out, result, report_md(result))


if __name__ == "__main__":
    main()
