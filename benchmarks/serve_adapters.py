"""Serving LoRA adapters per request: `edgemed serve` against `llama-server --lora`, same base, same adapter files.

    python -m edgemed.benchmarks.anchors build              # once: llama-server from the installed sdist
    EDGEMED_CACHE_DIR=/tmp/emcache python -m edgemed.benchmarks.serve_adapters       # Qwen2.5-0.5B Q4_K_M, 2 threads
    python -m edgemed.benchmarks.serve_adapters --rounds 3  # on a quiet box

What is made (once, cached under ``$EDGEMED_CACHE_DIR/serve-adapters/<model>``): the model's Hugging Face
checkpoint (``pip_models.hf_checkpoint``: dequantized from the pip Q4_K_M GGUF), a Q4_K_M base converted from it
with ``edgemed convert`` (no imatrix: llama.cpp's plain recipe; it records the checkpoint's sha256, which
``edgemed serve`` requires of a base an adapter names; the pip file records none), and ``--adapters`` (4) real PEFT
LoRAs on that checkpoint (rank 16, alpha 32, targets q/k/v/o and the MLP, A and B random non-zero, a seed each),
each written as a GGUF LoRA adapter for that checkpoint by the writer ``edgemed convert CKPT --lora L
--adapter-only`` uses (``converters/gguf/adapter.write_adapter_gguf``; the same bytes as that command with its parity
gate off: the adapter tests gate it), its tensors ``--adapter-type`` (cached per type): Q8_0 by default, F16 where
a tensor's rows are not a multiple of 32 (``lora_b`` at rank 16), about a fifth smaller than all-F16. Q8_0 is the
default because it passes the F16 parity gate with a KLD against the merged HF model of 4.9e-6 nats (F16's:
4.1e-6; SmolLM2 at rank 8, `pytest -s tests/test_adapter_q8.py`, docs/convert.md), four orders of magnitude below what a Q4_K_M base itself
costs (0.094 nats there), so the adapters measured are what a deployment that minds memory ships. The same base
and the same .lora.gguf files go to both servers.

Servers (both up at once, idle while the other is measured; the device-profile settings of
``serve_vs_llama_server``: 4 slots, 2 threads, the same context per slot, batch 512, flash attention off, no mmap):
- ``edgemed serve BASE --adapter a1 ... --adapter a4 --no-prefix-cache``: a request picks one with model
  ``NAME:ADAPTER``; adapter groups take the one context in turns of ``--adapter-turn`` steps (serve's default
  unless given; ``Context.set_adapters`` at each change); ``--compare-turn N`` adds a server with turns of N
  steps, measured in the same rounds;
- ``llama-server -m BASE --lora a1 ... --lora a4 --lora-init-without-apply -np 4 -c 4*ctx ... --cache-ram 0``: a
  request applies one with ``"lora": [{"id": i, "scale": 1.0}]`` (the others default to 0, per its README); it does
  not batch requests with different adapters together;
- ``edgemed serve BASE`` without adapters, for memory only.
Prompt reuse is off on both (``--no-prefix-cache``; ``cache_prompt: false`` and ``--cache-ram 0``): every prompt is
computed cold, so the figures compare decoding with adapters, not caching.

Load: 4 closed-loop streams (``--requests`` each, back to back), greedy, ``--tokens`` new tokens (the questions
ask for long answers; finish reasons are in the JSON), with 0 (the base), 1, 2 and 4 distinct adapters spread
over the streams (stream i uses adapter i mod k). Rounds interleave levels and servers, the server order flipped
each round; ``os.getloadavg()`` is kept per run. Figures per level and server, measured by the client the same way
for both: decode tok/s (``serve_vs_llama_server``'s definition: median per-request decode rate x streams decoding at
once), end-to-end tok/s, TTFT p50; each server's row is its best run (all runs are in the JSON). The ratios,
edgemed / llama-server and each adapter level / the no-adapter level on the same server, are taken inside each round
(``provenance.paired_ratios``: two runs of the same round, under the same load), and the page gives their median
and range (``provenance.paired``); the goal is judged on the median of the e2e ratio at the mixed loads.
``--rerender JSON`` recomputes a stored result's figures from the runs it keeps and rewrites its JSON and page.

Memory: VmRSS and VmHWM (/proc/PID/status) of each server ``SETTLE_S`` after its load: edgemed with the base alone
(given as many runs of the load, all on the base, as the adapters' server had: a server's heap grows with the requests
it has served, not only with its adapters), edgemed with the adapters, llama-server with the adapters; "as many merged models" = adapters x the base-alone server
(a merged model is the base's size: the same tensors, other values).

Adapter switch cost (in this process, after the servers stop): llama.cpp marks the scheduler for a re-reserve on
every ``llama_set_adapters_lora`` that changes the set, so the next decode re-plans its graph. Timed on this base:
a 1-row decode with the adapter unchanged vs right after a switch; then whole steps of 4 sequences (one row each):
one decode of 4 rows (base; one adapter), 2 groups and 4 groups decoded in turn with switches (what edgemed's
batcher does), 4 one-row decodes without switches (the floor of per-group decoding) and 4 contexts with one adapter
each (no switch, but a KV cache and compute buffer per context). Adapter turns (``--turns``): edgemed's batcher
in this process, one request per adapter at once, timed for each ``adapter_turn`` (tok/s, steps, switches).

Results: benchmarks/results/serve_adapters/<base>-t<threads>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from edgemed.benchmarks.process_memory import read_status
from edgemed.benchmarks.provenance import machine, paired, paired_ratios, range_cell
from edgemed.benchmarks.serve_bench_client import (EdgemedServer, LlamaServer, add_server_arg, matched_extra_buffers, run_gated, run_level, save_results,
                                                    settle)
from edgemed.benchmarks.serve_streams import QUESTIONS
from edgemed.benchmarks.serve_vs_llama_server import _r, summarize

SLOTS = 4
STREAMS = 4
LEVELS = (0, 1, 2, 4)
GOAL_RATIO = 0.95  # edgemed / llama-server e2e tok/s on the mixed loads (decode overstates llama-server there)
MIXED = 2  # distinct adapters over the streams from which a load is mixed (the goal applies)
GOAL_MEMORY = 1.10  # edgemed with the adapters / edgemed with the base alone (VmRSS)
ADAPTER_TYPES = ("f16", "q8_0")  # --adapter-type: the adapters' tensor types (converters/gguf/adapter.TENSOR_TYPES)
DEFAULT_ADAPTER_TYPE = "q8_0"  # why: the module docstring
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: questions that ask for long answers, so greedy decoding rarely ends before --tokens
LONG = " Answer in detail, in at least 400 words."


# -- the files ---------------------------------------------------------------------------------------

def make_lora(checkpoint: Path, out: Path, *, rank: int, alpha: int, seed: int, std: float = 0.02) -> Path:
    """A PEFT LoRA on ``checkpoint`` with random non-zero A and B (a trained adapter's shape, not its values), as
    the adapter tests make it (tests/adapter_kit.py); written once (``out``/adapter_config.json marks it done)."""
    if (out / "adapter_config.json").is_file():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edgemed.files.atomic import atomic_path

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, std)
    with atomic_path(out, force=True) as tmp:
        peft_model.save_pretrained(tmp)
    return out


def prepare(model: str, n_adapters: int, rank: int, adapter_type: str = DEFAULT_ADAPTER_TYPE,
            echo=print) -> tuple[Path, list[Path]]:
    """The Q4_K_M base converted from ``model``'s checkpoint and ``n_adapters`` GGUF LoRA adapters for it, their
    tensors ``adapter_type`` (cached, per type)."""
    from edgemed import env
    from edgemed.converters import arch_spec
    from edgemed.converters.gguf.adapter import write_adapter_gguf
    from edgemed.converters.pipeline import ConvertOptions, convert
    from edgemed.converters.source import pip_models
    from edgemed.converters.source.source import Source
    from edgemed.files.atomic import atomic_path

    checkpoint = pip_models.hf_checkpoint(model)
    work = env.cache_dir("serve-adapters") / model
    work.mkdir(exist_ok=True)
    base = work / f"{model}-q4_k_m.gguf"
    quiet = lambda s: None  # noqa: E731
    if not base.is_file():
        echo(f"converting {checkpoint.name} to {base.name} (Q4_K_M, no imatrix)")
        convert(checkpoint, base, ConvertOptions(out_type="q4_k_m", parity=False), echo=quiet)
    files = []
    typed = work / f"adapters-{adapter_type}"  # the file names are the adapters' names on both servers: same per type
    typed.mkdir(exist_ok=True)
    for i in range(1, n_adapters + 1):
        out = typed / f"spec{i}-r{rank}.lora.gguf"
        if not out.is_file():
            echo(f"making LoRA {i} (rank {rank}, seed {i}) and writing it as a {adapter_type.upper()} adapter for {base.name}")
            lora = make_lora(checkpoint, work / f"lora{i}-r{rank}", rank=rank, alpha=2 * rank, seed=i)
            src = Source.open(checkpoint, lora=lora)
            with atomic_path(out, force=True) as tmp:
                write_adapter_gguf(src.checkpoint, arch_spec(src.checkpoint.architecture), src.adapter, tmp,
                                   base_source_sha256=src.checkpoint.digest(), tensor_type=adapter_type)
        files.append(out)
    return base, files


# -- the load ----------------------------------------------------------------------------------------

def adapter_of(stream: int, k: int) -> int | None:
    """Which adapter (0-based) stream ``stream`` uses at level ``k`` (None: the base)."""
    return None if k == 0 else stream % k


def fields_for(server, adapter: int | None, names: list[str]) -> dict:
    """The body fields that pick adapter ``adapter`` (0-based; None: the base) on ``server``: edgemed by model
    ``NAME:ADAPTER``, llama-server by ``lora`` (adapters not listed run at scale 0)."""
    if isinstance(server, EdgemedServer):
        return {"model": server.model_id if adapter is None else f"{server.model_id}:{names[adapter]}"}
    return {"lora": [] if adapter is None else [{"id": adapter, "scale": 1.0}]}


def request_fields(server, k: int, names: list[str]):
    """stream index -> the body fields of its requests at level ``k`` (``adapter_of``)."""
    return lambda stream: fields_for(server, adapter_of(stream, k), names)


def compare_answers(servers: dict, prompt: str, names: list[str], tokens: int = 24) -> dict:
    """One greedy request per adapter (and the base) on each server: how many distinct answers each server gives (the
    adapters must change the answer) and on how many both servers answer alike. No text is kept, only the counts."""
    import httpx2

    texts: dict = {}
    for label, server in servers.items():
        with httpx2.Client() as client:
            for a in [None, *range(len(names))]:
                body = {"model": server.model_id, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                        "cache_prompt": False} | fields_for(server, a, names)
                resp = client.post(server.url + "/v1/completions", json=body, timeout=300)
                resp.raise_for_status()
                texts.setdefault(label, []).append(resp.json()["choices"][0]["text"])
    out = {"tokens": tokens, "asked": len(names) + 1, "distinct": {k: len(set(v)) for k, v in texts.items()}}
    if "edgemed" in texts and "llama-server" in texts:
        e, l = texts["edgemed"], texts["llama-server"]
        out["equal"] = sum(x == y for x, y in zip(e, l))
        out["equal_per_model"] = {name: x == y for name, x, y in zip(["base", *names], e, l)}
    return out


# -- adapter switch cost -----------------------------------------------------------------------------

def switch_cost(base: Path, files: list[Path], threads: int, prompt: str, steps: int = 16) -> dict:
    """Milliseconds (median of ``steps``) of decodes with and without an adapter switch (module docstring)."""
    from edgemed.runtime.engine import LoadSettings
    from edgemed.runtime.llamacpp import Adapter, Batch, Context, Model

    load = LoadSettings(n_ctx=SLOTS * 512, n_threads=threads, n_threads_batch=threads, use_mmap=False)
    model = Model(base, load)
    adapters = [Adapter(model, f) for f in files[:4]]
    ctxs: list = []
    try:
        ids = model.tokenize(prompt, True, True)[:200]
        main = Context(model, load, n_ctx=SLOTS * 512, n_seq_max=SLOTS, kv_unified=False)
        ctxs.append(main)
        for s in range(SLOTS):
            main.eval(ids, 0, seq=s)
        batch = Batch(model.lib, SLOTS)
        n0 = len(ids)
        tok = ids[-1]

        def decode(ctx, seqs: list[int], pos: dict) -> float:
            batch.clear()
            for s in seqs:
                batch.add(tok, pos[s], s, True)
                pos[s] += 1
            t = time.perf_counter()
            if ctx.decode(batch) != 0:
                raise RuntimeError("llama_decode failed in the switch-cost run")
            return time.perf_counter() - t

        def measure(step) -> dict:
            pos = {s: n0 for s in range(SLOTS)}
            times = []
            for i in range(steps + 2):
                t = time.perf_counter()
                step(i, pos)
                times.append(time.perf_counter() - t)
            for s in range(SLOTS):
                main.trim(s, n0)
            times = times[2:]  # the first steps warm up
            return {"median_ms": round(1000 * statistics.median(times), 3), "min_ms": round(1000 * min(times), 3)}

        def one(adapter_for_step):
            def step(i, pos):
                a = adapter_for_step(i)
                main.set_adapters([] if a is None else [(adapters[a], 1.0)])
                decode(main, [0], pos)
            return step

        def groups(n_groups: int):
            members = [[s for s in range(SLOTS) if s % n_groups == g] for g in range(n_groups)]

            def step(i, pos):
                order = range(n_groups) if i % 2 == 0 else range(n_groups - 1, -1, -1)  # the group on the context first
                for g in order:
                    main.set_adapters([(adapters[g], 1.0)])
                    decode(main, members[g], pos)
            return step

        def rows_apart(adapter):
            def step(i, pos):
                main.set_adapters([] if adapter is None else [(adapters[adapter], 1.0)])
                for s in range(SLOTS):
                    decode(main, [s], pos)
            return step

        def whole(adapter):
            def step(i, pos):
                main.set_adapters([] if adapter is None else [(adapters[adapter], 1.0)])
                decode(main, list(range(SLOTS)), pos)
            return step

        out = {
            "1 row, base": measure(one(lambda i: None)),
            "1 row, one adapter kept": measure(one(lambda i: 0)),
            "1 row, adapter switched before each decode": measure(one(lambda i: i % 2)),
            "step of 4 rows, base (one decode)": measure(whole(None)),
            "step of 4 rows, one adapter (one decode)": measure(whole(0)),
        }
        for n in (2, 4):
            if n <= len(adapters):
                out[f"step of 4 rows, {n} adapter groups in turn (switches)"] = measure(groups(n))
        out["step of 4 rows, 4 one-row decodes, one adapter (no switch)"] = measure(rows_apart(0))
        # the alternative: one context per adapter (each keeps its adapter set; KV and compute buffer per context)
        per = []
        for a in range(len(adapters)):
            c = Context(model, load, n_ctx=512, n_seq_max=1, kv_unified=False)
            ctxs.append(c)
            c.set_adapters([(adapters[a], 1.0)])
            c.eval(ids, 0, seq=0)
            per.append(c)

        def per_context(i, pos):
            for c in per:
                batch.clear()
                batch.add(tok, pos[0], 0, True)
                if c.decode(batch) != 0:
                    raise RuntimeError("llama_decode failed in the switch-cost run")
            pos[0] += 1
        times = []
        pos = {0: n0}
        for i in range(steps + 2):
            t = time.perf_counter()
            per_context(i, pos)
            times.append(time.perf_counter() - t)
        times = times[2:]
        out[f"step of {len(per)} rows, {len(per)} contexts with one adapter each (no switch)"] = {
            "median_ms": round(1000 * statistics.median(times), 3), "min_ms": round(1000 * min(times), 3)}
        batch.close()
        return out
    finally:
        for c in ctxs:
            c.close()
        for a in adapters:
            a.close()
        model.close()


def turn_cost(base: Path, files: list[Path], threads: int, prompt: str, turns: list[int], tokens: int,
              reps: int = 2) -> dict:
    """edgemed's batcher in this process (no HTTP): ``SLOTS`` requests at once, one per adapter (as many distinct
    adapters as files, up to ``SLOTS``), greedy, ``tokens`` each, for each ``adapter_turn``; the best of ``reps``
    runs' tok/s, with the batcher's own counts (steps, seconds inside llama_decode, adapter switches)."""
    from edgemed.runtime.batch.batcher import Batcher
    from edgemed.runtime.engine import GenerationSettings, LoadSettings
    from edgemed.runtime.loader import AdapterSpec

    load = LoadSettings(n_ctx=SLOTS * 512, n_threads=threads, n_threads_batch=threads, use_mmap=False)
    names = [f"a{i}" for i in range(min(SLOTS, len(files)))]
    out = {}
    for turn in turns:
        b = Batcher(base, load, slots=SLOTS, prefix_cache=False, adapter_turn=turn,
                    adapters={n: AdapterSpec(f) for n, f in zip(names, files)})
        b.start()
        runs = []
        try:
            for rep in range(reps):
                def one(i: int, gate) -> None:
                    gate.wait()
                    for _ in b.submit(prompt, GenerationSettings(max_tokens=tokens, temperature=0.0),
                                      request_id=f"turn{turn}-{rep}-{i}", adapter=names[i % len(names)]):
                        pass
                s0, t0 = b.stats(), time.perf_counter()
                run_gated(SLOTS, one)
                wall, s1 = time.perf_counter() - t0, b.stats()
                d = {k: s1[k] - s0[k] for k in ("tokens_generated_total", "decode_steps_total", "decode_seconds_total",
                                                "adapter_switches_total")}
                runs.append({"tok_s": round(d["tokens_generated_total"] / wall, 2), "wall_s": round(wall, 3),
                             "steps": d["decode_steps_total"], "switches": d["adapter_switches_total"],
                             "ms_per_step": round(1000 * d["decode_seconds_total"] / max(d["decode_steps_total"], 1), 2)})
        finally:
            b.close()
        out[str(turn)] = {"best": max(runs, key=lambda r: r["tok_s"]), "runs": runs}
    return out


# -- the run -----------------------------------------------------------------------------------------

def levels_out(runs: dict) -> dict:
    """Per level (``"k"`` -> server -> its runs' summaries, each with its ``round``): each server's runs and its best
    run (highest decode tok/s: its row on the page), and ratios taken inside each round, for decode and e2e
    (``provenance.paired``: the median of the per-round ratios, their range and rounds): ``vs_no_adapter`` (this level
    / level 0 on the same server) and, against llama-server, ``ratio_decode`` / ``ratio_e2e`` (edgemed's at the
    level, a compared arm's in its own entry), the e2e one judged against ``GOAL_RATIO`` at the mixed loads."""
    out = {}
    for k, by_server in runs.items():
        out[k] = {name: {"best": _r(max(rs, key=lambda x: x["decode_tok_s"])),
                         "best_e2e_tok_s": round(max(x["e2e_tok_s"] for x in rs), 3),
                         "decode_tok_s_runs": [round(x["decode_tok_s"], 2) for x in rs],
                         "e2e_tok_s_runs": [round(x["e2e_tok_s"], 2) for x in rs], "runs": [_r(x) for x in rs]}
                  for name, rs in by_server.items()}
    aggregates = (("decode_tok_s", "decode"), ("e2e_tok_s", "e2e"))
    for k, lv in out.items():
        goal = GOAL_RATIO if int(k) >= MIXED else None
        for name, rs in runs[k].items():
            if name in runs.get("0", {}):
                for key, short in aggregates:
                    p = paired(paired_ratios(rs, runs["0"][name], key))
                    field = "vs_no_adapter" + ("" if short == "decode" else "_e2e")
                    lv[name][field], lv[name][field + "_paired"] = p["median"], p
            if name.startswith("edgemed") and "llama-server" in runs[k]:  # edgemed and its compared arms
                into = lv if name == "edgemed" else lv[name]
                for key, short in aggregates:
                    p = paired(paired_ratios(rs, runs[k]["llama-server"], key), goal if short == "e2e" else None)
                    into[f"ratio_{short}"], into[f"ratio_{short}_paired"] = p["median"], p
        if "llama-server" in runs[k]:
            lv["goal"] = goal
    return out


#: How a result's figures are taken, recorded in every result (and in a re-rendered one).
SUMMARY = {"best_of": "each server's row: its run with the highest decode tok/s per level",
           "ratios": "taken inside each round (the two runs of that round), median and range over the rounds"}


def rerender(path: Path) -> None:
    """Recompute a stored result's figures (bests, ratios paired by round) from the runs kept in its JSON and write the
    JSON and its page again; nothing is measured."""
    import json

    result = json.loads(path.read_text())
    runs = {k: {n: lv[n]["runs"] for n in server_names(lv)} for k, lv in result["levels"].items()}
    unpaired = sorted({f"{k}: {n}" for k, by in runs.items() for n, rs in by.items() if any("round" not in x for x in rs)})
    if unpaired:
        raise SystemExit(f"{path}: runs without their round, so no ratio can be paired by round ({', '.join(unpaired)})")
    result["levels"] = levels_out(runs)
    result.update(SUMMARY)
    save_results(path, result, report_md(result))


def server_names(lv: dict) -> list[str]:
    """The servers measured at a level, edgemed first, its compared arms next, llama-server last."""
    names = [n for n, v in lv.items() if isinstance(v, dict) and "runs" in v]
    return sorted(names, key=lambda n: (n == "llama-server", n != "edgemed", n))


#: Seconds a server is left idle after its load before its resident size is read (every server alike): the size
#: between bursts, once edgemed's scheduler has handed freed heap back (decision 0014) and finished any idle work.
SETTLE_S = 2.0


def memory(server) -> dict:
    time.sleep(SETTLE_S)
    status = read_status(server.proc.pid) or {}
    return {"VmRSS_MiB": round(status.get("VmRSS", 0) / 2**20, 1), "VmHWM_MiB": round(status.get("VmHWM", 0) / 2**20, 1)}


def _types_said(m: dict) -> str:
    """The adapters' tensor types as the report says them ("Q8_0: F16 210, Q8_0 210 tensors"); results saved before
    --adapter-type were all F16."""
    counts = m.get("adapter_tensor_types")
    said = ", ".join(f"{k} {v}" for k, v in counts.items()) if counts else ""
    return m.get("adapter_type", "f16").upper() + (f": {said} tensors" if said else "")


def _cpu() -> dict:
    """The CPU the figures were taken on: its model name and llama.cpp's own view of it (the kernels it picked)."""
    from edgemed.benchmarks.harness.machine import llama_system_info
    from edgemed.devices.detect import detect

    return {"cpu": detect().model, "llama_cpp_system_info": llama_system_info()}


def _ratio_cell(x: dict) -> str:
    """decode and e2e against llama-server: paired medians with their range, and at a mixed load the goal, judged on
    the e2e median, with the rounds that miss it; "" without llama-server."""
    pd, pe = x.get("ratio_decode_paired"), x.get("ratio_e2e_paired")
    if pd is None:
        return ""
    cell = f"decode {range_cell(pd)}, e2e {range_cell(pe)}"
    if pe.get("goal"):
        miss = pe.get("rounds_missing_goal")
        cell += (f" (goal {pe['goal']} on e2e: {'met' if pe['goal_met'] else 'not met'}"
                 + (f"; {miss} of {len(pe['per_round'])} rounds miss it)" if miss else ")"))
    return cell


def report_md(m: dict) -> str:
    lines = [f"# Serving {m['adapters']} LoRA adapters per request: edgemed serve vs llama-server --lora ({m['model']})", "",
             f"{m['threads']} threads, {SLOTS} slots, {m['n_ctx_per_slot']} tokens per slot, {m['streams']} closed-loop streams, "
             f"greedy, {m['max_tokens']} tokens per request, {m['requests_per_stream']} requests per stream, prompt reuse "
             f"off on both, {m['rounds']} interleaved round{'s' * (m['rounds'] != 1)}: each server's row is its best round (all runs in the JSON); the "
             "ratios are taken inside each round (the two runs of the same round, under the same load), their median with "
             f"the range over the rounds, and the goal is judged on the median. Adapters: rank {m['rank']}, "
             f"q/k/v/o + MLP, {m['adapter_file_mib']} MiB each ({_types_said(m)}). Load average during the runs: "
             f"{m['loadavg_range'][0]:.1f}-{m['loadavg_range'][1]:.1f} on {m['machine']['cpu_count']} CPUs (shared box)"
             + (f"; CPU: {m['machine']['cpu']} (llama.cpp: `{m['machine']['llama_cpp_system_info']}`)." if m['machine'].get('cpu') else ".") , "",
             f"Command: `{m['command']}`", "",
             "Two aggregates, both measured by the client: *decode tok/s* is `serve_vs_llama_server`'s (median per-request "
             "decode rate x streams), right when the streams decode at once; *e2e tok/s* is all completion tokens / wall "
             "time of the run (prefill and waiting included). llama-server does not batch requests with different adapters "
             "(its README): at a mixed load it decodes one adapter's requests while the others wait, so their per-request "
             "rate is a lone stream's and x streams overstates its aggregate; e2e is the comparable figure there, and TTFT "
             f"shows the wait. Goal: edgemed / llama-server e2e >= {GOAL_RATIO} on the mixed loads ({MIXED} adapters and more).", "",
             "| adapters | server | decode tok/s (runs) | e2e tok/s (runs) | vs no adapter (decode, e2e) | TTFT p50 | edgemed / llama-server (decode, e2e) |",
             "|---|---|---|---|---|---|---|"]
    for k, lv in m["levels"].items():
        for name in server_names(lv):
            x = lv[name]
            runs = ", ".join(f"{v:.1f}" for v in x["decode_tok_s_runs"])
            e2e = ", ".join(f"{v:.1f}" for v in x["e2e_tok_s_runs"])
            vs0 = (f"decode {range_cell(x['vs_no_adapter_paired'])}, e2e {range_cell(x['vs_no_adapter_e2e_paired'])}"
                   if "vs_no_adapter_paired" in x and k != "0" else "-")
            ratio = _ratio_cell(lv if name == "edgemed" else x) if name != "llama-server" else ""
            lines.append(f"| {k} | {name} | {x['best']['decode_tok_s']:.1f} ({runs}) | {x['best_e2e_tok_s']:.1f} ({e2e}) | "
                         f"{vs0} | {x['best']['ttft_p50_s']:.2f} s | {ratio} |")
    mem = m["memory"]
    lines += ["", "Resident memory " + (f"{m['memory_settle_s']:g} s " if "memory_settle_s" in m else "") + "after the load (VmRSS / VmHWM, MiB):", "",
              "| process | VmRSS | VmHWM |", "|---|---|---|"]
    for name, v in mem["servers"].items():
        lines.append(f"| {name} | {v['VmRSS_MiB']} | {v['VmHWM_MiB']} |")
    lines += ["", f"edgemed with {m['adapters']} adapters / base alone: {mem['adapters_vs_base']:.3f}x VmRSS "
              f"(goal <= {GOAL_MEMORY}x); {m['adapters']} merged models (each served alone, the base-alone figure "
              f"x {m['adapters']}): {mem['merged_estimate_MiB']} MiB, against {mem['servers']['edgemed, adapters']['VmRSS_MiB']} "
              "MiB for one server with them all."]
    if m.get("switch_cost"):
        lines += ["", "Adapter switch cost on this base (in-process, llama.cpp directly, median of "
                  f"{m['switch_steps']} steps, ms):", "", "| what | median | min |", "|---|---|---|"]
        for what, v in m["switch_cost"].items():
            lines.append(f"| {what} | {v['median_ms']:.2f} | {v['min_ms']:.2f} |")
    if m.get("turn_cost"):
        lines += ["", f"Adapter turns (edgemed's batcher in-process, no HTTP: {SLOTS} requests at once, one per adapter, "
                  f"{m['max_tokens']} greedy tokens each; best of {len(next(iter(m['turn_cost'].values()))['runs'])} runs):", "",
                  "| adapter_turn | tok/s (runs) | steps | switches | ms in llama_decode per step (prompt calls included) |",
                  "|---|---|---|---|---|"]
        for turn, v in m["turn_cost"].items():
            b = v["best"]
            runs = ", ".join(f"{r['tok_s']:.1f}" for r in v["runs"])
            lines.append(f"| {turn} | {b['tok_s']:.1f} ({runs}) | {b['steps']} | {b['switches']} | {b['ms_per_step']:.2f} |")
    if m.get("answers"):
        a = m["answers"]
        lines += ["", f"Check: the same prompt, greedy, {a['tokens']} tokens, on each adapter and the base: distinct answers "
                  f"per server {a['distinct']}" + (f"; edgemed and llama-server answer alike on {a['equal']} of {a['asked']}" if 'equal' in a else '') + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b-instruct", help="a pip example model name (its HF checkpoint is made)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=96, help="max new tokens per request (greedy)")
    ap.add_argument("--requests", type=int, default=2, help="requests each client stream sends, back to back")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--adapters", type=int, default=4, help="adapters made and loaded (levels use up to this many)")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)), help="distinct adapters over the streams, per level")
    ap.add_argument("--streams", type=int, default=STREAMS)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapter-type", choices=ADAPTER_TYPES, default=DEFAULT_ADAPTER_TYPE,
                    help="the adapters' tensor types (q8_0: 8-bit where rows allow, else F16; why the default: above)")
    ap.add_argument("--ctx", type=int, default=1024, help="context per slot (both servers)")
    ap.add_argument("--switch-steps", type=int, default=16, help="steps timed per switch-cost case (0: skip)")
    ap.add_argument("--adapter-turn", type=int, metavar="STEPS", help="edgemed serve --adapter-turn (default: serve's own)")
    ap.add_argument("--compare-turn", type=int, action="append", default=[], metavar="STEPS",
                    help="also measure `edgemed serve --adapter-turn STEPS` in the same rounds (repeatable), as the "
                    "server 'edgemed turn STEPS'")
    ap.add_argument("--turns", default="1,4,16", help="adapter_turn values timed in this process at the end, one "
                    "request per adapter at once (empty: skip)")
    ap.add_argument("--only", choices=("edgemed",), help="edgemed alone (no llama-server)")
    add_server_arg(ap)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--rerender", type=Path, metavar="JSON",
                    help="recompute a stored result's ratios from its per-round runs and rewrite its JSON and page")
    args = ap.parse_args(argv)
    if args.rerender:
        return rerender(args.rerender)
    levels = [int(x) for x in args.levels.split(",")]
    if max(levels) > args.adapters:
        ap.error(f"--levels go up to {max(levels)} adapters, more than --adapters {args.adapters}")

    from edgemed.benchmarks import anchors
    from edgemed.converters.gguf.adapter import tensor_type_counts
    from edgemed.runtime.llamacpp import Model

    base, files = prepare(args.model, args.adapters, args.rank, args.adapter_type)
    names = [f.name.removesuffix(".lora.gguf") for f in files]
    vocab = Model(base, vocab_only=True)
    prompts = [vocab.render_chat([{"role": "user", "content": q + LONG}]) for q in QUESTIONS]
    vocab.close()
    common = dict(path=base, threads=args.threads, slots=SLOTS, ctx_per_slot=args.ctx)
    turn = ("--adapter-turn", str(args.adapter_turn)) if args.adapter_turn else ()
    same = {"extra_buffers": matched_extra_buffers(args.server_arg)}  # the kernels llama-server runs (--no-repack)
    servers = {"edgemed": EdgemedServer(**common, **same, adapters=tuple(files), extra=turn)}
    for steps in args.compare_turn:
        servers[f"edgemed turn {steps}"] = EdgemedServer(**common, **same, adapters=tuple(files),
                                                         extra=("--adapter-turn", str(steps)))
    if args.only is None:
        servers["llama-server"] = LlamaServer(anchors.binaries()["llama-server"], loras=tuple(files), extra=args.server_arg, **common)
    alone = EdgemedServer(**common, **same)
    runs: dict = {k: {name: [] for name in servers} for k in levels}
    mem: dict = {}
    loads: list[float] = []
    answers = None
    try:
        for s in servers.values():
            s.start()
        for s in servers.values():  # warm-up, not timed: a short request on each adapter
            for a in [None, *range(args.adapters)]:
                run_level(s, prompts, 1, 1, 4, lambda i, a=a, s=s: fields_for(s, a, names))
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(servers)[::-1]
            for k in (levels if r % 2 == 0 else levels[::-1]):
                for name in order:
                    settle_s = settle(servers.values())
                    load0 = os.getloadavg()
                    t0 = time.perf_counter()
                    rows = run_level(servers[name], prompts, args.streams, args.requests, args.tokens,
                                     request_fields(servers[name], k, names))
                    wall = time.perf_counter() - t0
                    s = summarize(rows, args.streams, wall) | {"loadavg": (load0[0], os.getloadavg()[0]), "round": r,
                                                               "settle_s": settle_s}
                    loads += list(s["loadavg"])
                    runs[k][name].append(s)
                    print(f"round {r} {name:>12s} {k} adapters: decode {s['decode_tok_s']:.1f} tok/s, e2e "
                          f"{s['e2e_tok_s']:.1f}, TTFT p50 {s['ttft_p50_s']:.2f}s, finish {s['finish']}, load {load0[0]:.1f}",
                          flush=True)
        mem["edgemed, adapters"] = memory(servers["edgemed"])
        if "llama-server" in servers:
            mem["llama-server, adapters"] = memory(servers["llama-server"])
        answers = compare_answers(servers, prompts[0], names)
    finally:
        for s in servers.values():
            s.stop()
    try:  # the base alone, after the others stopped: same settings, as many runs of the load as the adapters' server
        alone.start()  # had (every request on the base), so both sizes are read after the same number of requests
        run_level(alone, prompts, 1, 1, 4)
        for _ in range(args.rounds * len(levels)):
            run_level(alone, prompts, args.streams, args.requests, args.tokens)
        mem["edgemed, base alone"] = memory(alone)
    finally:
        alone.stop()
    switch = switch_cost(base, files, args.threads, prompts[0], args.switch_steps) if args.switch_steps else {}
    turns = [int(x) for x in args.turns.split(",")] if args.turns else []
    turned = turn_cost(base, files, args.threads, prompts[0], turns, args.tokens) if turns else {}

    out_levels = levels_out({str(k): v for k, v in runs.items()})
    base_rss = mem["edgemed, base alone"]["VmRSS_MiB"]
    memory_out = {"servers": mem, "adapters_vs_base": round(mem["edgemed, adapters"]["VmRSS_MiB"] / base_rss, 3),
                  "merged_estimate_MiB": round(args.adapters * base_rss, 1),
                  "note": "merged estimate: the base-alone server's VmRSS x adapters (a merged model has the base's tensors)"}
    described = {k: s.describe() for k, s in servers.items()}
    result = {"model": base.name, "model_path": str(base), "source": args.model, "threads": args.threads, "slots": SLOTS,
              "streams": args.streams, "n_ctx_per_slot": args.ctx, "max_tokens": args.tokens,
              "requests_per_stream": args.requests, "rounds": args.rounds, "adapters": args.adapters, "rank": args.rank,
              "adapter_files": [str(f) for f in files],
              "adapter_file_mib": round(statistics.mean(f.stat().st_size for f in files) / 2**20, 1),
              "adapter_type": args.adapter_type, "adapter_tensor_types": tensor_type_counts(files[0]),
              "levels": out_levels, "memory": memory_out, "memory_settle_s": SETTLE_S, "switch_cost": switch, "switch_steps": args.switch_steps,
              "turn_cost": turned,
              "answers": answers, "loadavg_range": (min(loads), max(loads)) if loads else (0.0, 0.0),
              **SUMMARY, "servers": described,
              "command": "python -m edgemed.benchmarks.serve_adapters " + " ".join(argv or __import__("sys").argv[1:]),
              "machine": machine(**_cpu())}
    out = args.out or Path(__file__).resolve().parent / "results" / "serve_adapters" / f"{base.stem}-t{args.threads}.json"
    save_results(out, result, report_md(result))


if __name__ == "__main__":
    main()
