"""From raw per-phase results to the report folder: results.json (canonical), results.csv, report.md, plots.

``results.json`` is the one source: CSV, Markdown and plots are rendered from it
and can be rebuilt from it alone (``render(out, results)``). The accuracy and divergence keys of results.json and
their results.csv columns are listed in ``scores.py``, which builds that part. Sizes and memory in results.csv are
MiB (2**20 bytes): ``model_mib``, ``peak_rss_mib`` (reports before these names called the same MiB figures
``model_mb`` / ``peak_rss_mb``).

``python -m edgemed.benchmarks.harness.report OUT`` renders OUT's report again from its ``raw/`` folder and
``results.json`` without measuring anything (``rebuild``): every raw result there is reported, with its date.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from pathlib import Path

from edgemed import __version__
from edgemed.files.atomic import write_text
from edgemed.benchmarks.harness.configs import PAPER, PHASES, REFERENCE, Config, Settings, asked_as, public_settings
from edgemed.benchmarks.harness import scores
from edgemed.benchmarks.harness.roofline import bandwidths, rooflines, timing_bytes_per_token, timing_threads
from edgemed.benchmarks.harness.stats import reduction

log = logging.getLogger(__name__)

SCHEMA = "edgemed.bench/1"
MIB = 1 << 20
#: The files ``render`` writes at the top of the report folder (plots: ``plots.files``).
FILES = ("results.json", "results.csv", "report.md")

#: What a timing result was measured with, as the report describes it (from its own raw file: a timing kept from an
#: earlier run has its own), and the words for each: the timing phase's settings (``configs.PHASE_SETTINGS``) and
#: the device profile. Two timings are compared (reductions) only where all of these and their key's profile settings,
#: methods and, for one runtime, its build agree (``_not_alike``).
TIMING_SHOWN = {"runs": "timed runs", "warmup": "warm-up runs", "max_tokens": "new tokens", "threads": "threads",
                "n_ctx": "n_ctx", "seed": "seed", "scenario": "scenario", "prompts_sha256": "prompts",
                "n_prompts": "number of prompts", "prompts_source": "prompts' source", "profile": "profile"}

DEFINITIONS = """\
- **Request**: the chat-rendered prompt's token ids handed to the runtime (tokenization excluded, the same text
  for every configuration), then greedy decoding of exactly `max_tokens` new tokens. End-of-generation tokens are
  masked out of the argmax (a count-based stop), so every configuration does the same work whatever it would say.
- **TTFT** (time to first token): request start to the first generated token's id (prefill + first sample).
- **TPOT** (time per output token): mean time between consecutive generated tokens after the first.
- **End-to-end latency (e2e)**: request start to the last token's id, for the fixed prompt and `max_tokens`.
  p50 / p90 / p99 over the timed runs (linear interpolation; with few runs p99 lies between the slowest two).
- **Prefill tok/s** (llama-bench *pp*): prompt tokens / TTFT. **Decode tok/s** (*tg*): (n - 1) / (time from the
  first to the last generated token).
- **Warm-up**: runs before the timed ones, recorded in the raw files and excluded from every statistic.
- **Peak RSS**: the measuring process's high-water resident memory (Linux `VmHWM`), imports and runtime included;
  every configuration runs in its own process. GGUF files are read into memory or mapped, as the load mode says
  (`runtime_settings.load_mode`; CPU profiles read them in, `-mmap` configurations map them): resident pages count.
- **Reduction** vs a baseline: 1 - value / baseline (memory: peak RSS; latency: e2e p50). Positive = better.
- **Roofline**: ceiling tok/s = read bandwidth / bytes read per decoded token; the fraction is decode tok/s p50
  over that ceiling (above 100 % the figures contradict each other). *Read bandwidth*: `numpy.maximum.reduce`
  over uint8 (SIMD, memory bound), as many threads as the decode, each on its slice of one buffer >= 8x the
  last-level cache (1 GiB with >= 8 GiB available), pages touched first, best of 7, bytes read counted once.
  *Bytes per token*: every weight as stored (quantized blocks included), the token-embedding table as one row
  unless tied to the output head, the output head, plus K + V of every layer at the mean decode position (prompt
  + half the new tokens) at the cache's element size (llama.cpp: the run's `type_k` / `type_v`; onnxruntime:
  fp32; torch: the weights' dtype); activations and writes are left out. *vs copy*: the same against the
  stream-copy bandwidth (`numpy.copyto`, read + written counted) that older reports used — no limit: a copy's
  writes cost a read too, and decoding mostly reads.
"""


def _get(d: dict | None, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def _day(stamp) -> str | None:
    return time.strftime("%Y-%m-%d", time.gmtime(stamp)) if isinstance(stamp, (int, float)) else None


def _timing_settings(raw: dict) -> dict | None:
    """The settings a timing raw result was measured with (``TIMING_SHOWN``), in their public form."""
    if not isinstance(raw.get("settings"), dict):
        return None
    s = public_settings(raw["settings"])
    return {**{k: s.get(k) for k in TIMING_SHOWN if k != "profile"}, "profile": (raw.get("key") or {}).get("profile")}


def _entry(config: Config, raws: dict[str, dict], measured: set[str]) -> dict:
    e = {"name": config.name, "kind": config.kind, "runtime": config.spec.runtime, "path": config.path,
         "dtype": config.dtype or None, "keys": {ph: r["key"] for ph, r in raws.items()},
         "raw": {ph: f"raw/{config.name}-{ph}.json" for ph in raws},
         # whether this run measured each result or kept it from an earlier run, and the day (UTC) it was measured
         "provenance": {ph: {"this_run": f"{config.name}-{ph}" in measured, "started": _day(r.get("started")),
                             "finished": _day(r.get("finished"))} for ph, r in raws.items()}}
    t = _get(raws, "timing", "result")
    if t:
        w = t["weights"]
        bpt, kv_type = timing_bytes_per_token(t)
        e.update({
            "model_bytes": t["model_bytes"], "load_s": t["load_s"], "peak_rss_bytes": t["peak_rss_bytes"],
            "rss_after_load_bytes": t.get("rss_after_load_bytes"), "tegrastats": t.get("tegrastats"),
            "n_params": w["n_params"], "weight_bytes": w["weight_bytes"], "bytes_per_token": bpt, "kv_cache_type": kv_type,
            "prompt_tokens": t["prompt_tokens"], "new_tokens": t["runs"][0]["new_tokens"], "n_runs": len(t["runs"]),
            "n_warmup": len(t["warmup_runs"]), "runtime_settings": t["runtime_settings"], **t["summary"],
            "timing_settings": _timing_settings(raws["timing"]),
        })
    e["accuracy"] = _get(raws, "accuracy", "result")
    e["divergence"] = _get(raws, "divergence", "result")
    return e


def _p50(e: dict, metric: str):
    return _get(e, metric, "p50")


def _not_alike(e: dict, base: dict) -> str | None:
    """What makes two timing results incomparable, as the report says it ("threads 2 vs 1"), or None when they were
    timed alike: the same ``TIMING_SHOWN`` settings, profile settings, methods and, for one runtime, its build. A
    result without its settings recorded (a results.json from before they were) is taken as timed alike."""
    mine, theirs = e.get("timing_settings"), base.get("timing_settings")
    why = [f"{label} {mine.get(k)} vs {theirs.get(k)}" if k != "prompts_sha256" else "other prompts"
           for k, label in TIMING_SHOWN.items() if mine and theirs and mine.get(k) != theirs.get(k)
           and k not in ("n_prompts", "prompts_source")]  # other prompts say it
    ka, kb = _get(e, "keys", "timing") or {}, _get(base, "keys", "timing") or {}
    if ka and kb:
        if ka.get("profile_sha256") != kb.get("profile_sha256") and not any(w.startswith("profile") for w in why):
            why.append("the device profile's settings")
        if ka.get("methods_version") != kb.get("methods_version"):
            why.append(f"methods version {ka.get('methods_version')} vs {kb.get('methods_version')}")
        if e["kind"] == base["kind"] and ka.get("runtime") != kb.get("runtime"):
            why.append(f"another {e['runtime']} build")
        if ka.get("settings_sha256") != kb.get("settings_sha256") and not why:
            why.append("the timing settings")
    return ", ".join(why) or None


def _derive(entries: list[dict], bw: dict | None, others: list[dict] = ()) -> dict:
    """Bits per weight, roofline and reductions vs each baseline present.

    The roofline of each timing is against the read bandwidth at its own threads (``bw``: bandwidth.json, either
    layout, at the run's; ``others``: at other thread counts, for timings kept from earlier runs), none where the
    folder has no figure at that count. A reduction is computed only between timings measured alike
    (``_not_alike``); otherwise it holds ``not_compared``, the settings that differ, and no figures."""
    by = {e["name"]: e for e in entries}
    baselines = [b for b in [REFERENCE, "hf-fp32", "hf-bf16", "hf-fp16"] if b in by and "peak_rss_bytes" in by[b]]
    ceilings = {x.get("threads"): x for x in others if x}
    for e in entries:
        if "weight_bytes" in e:
            e["bits_per_weight"] = 8 * e["weight_bytes"] / e["n_params"] if e["n_params"] else None
        threads = timing_threads(e.get("runtime_settings"), e.get("timing_settings"))
        own = bw if threads is None or (bw or {}).get("threads") in (None, threads) else ceilings.get(threads)
        e["roofline"] = {**rooflines(_p50(e, "decode_tok_s"), e.get("bytes_per_token"), own), "threads": threads}
        e["reductions"] = {}
        for b in baselines:
            base = by[b]
            if b == e["name"] or "peak_rss_bytes" not in e:
                continue
            red = {"model_bytes": reduction(e["model_bytes"], base["model_bytes"])}  # the files: no timing in it
            why = _not_alike(e, base)
            if why:
                e["reductions"][b] = {"memory": None, "latency": None, **red, "decode_speedup": None, "not_compared": why}
                continue
            speed = _p50(e, "decode_tok_s"), _p50(base, "decode_tok_s")
            e["reductions"][b] = {
                "memory": reduction(e["peak_rss_bytes"], base["peak_rss_bytes"]),
                "latency": reduction(_p50(e, "e2e_s"), _p50(base, "e2e_s")), **red,
                "decode_speedup": speed[0] / speed[1] if all(speed) else None,
            }
    return {"same_runtime": REFERENCE if REFERENCE in baselines else None,
            "torch": [b for b in baselines if b.startswith("hf-")]}


def _accuracy_keys(configs: list[Config], settings: Settings, raws: list[dict]) -> dict[str, dict]:
    """What each scored configuration's accuracy records must name to be its own (``scores.in_progress``): its
    accuracy key (``keys.task_key``, without the settings digest) with the artifact, device profile (its name and
    settings digest), runtime and versions its latest raw result was keyed with. From what the results store, not
    from this machine: a folder renders the same on a laptop that has neither the device's profile nor its runtime.
    A configuration with no result yet is keyed from its file here, under the profile's digest another result stores
    (else the profile's own, where this machine knows it); with neither, or no file, nothing ties records to it and
    none are shown."""
    from edgemed.benchmarks.harness.artifacts import model_digest
    from edgemed.benchmarks.harness.configs import beyond_settings
    from edgemed.benchmarks.harness.keys import applies, profile_digest, task_key
    from edgemed.errors import ProfileError

    ordered = sorted((r for r in raws if isinstance(r.get("key"), dict)),  # last: the latest under this profile's name
                     key=lambda r: (r["key"].get("profile") == settings.profile, r.get("finished") or 0))
    stored = {r["config"]["name"]: beyond_settings(r["key"]) for r in ordered}
    profile_sha256 = next((r["key"].get("profile_sha256") for r in reversed(ordered)
                           if r["key"].get("profile") == settings.profile), None)
    if profile_sha256 is None and any(c.name not in stored for c in configs):
        try:
            profile_sha256 = profile_digest(settings.profile)
        except ProfileError:  # a profile of the device's own, unknown here
            log.info("no result names the device profile '%s', unknown here: its records are not shown", settings.profile)
    keys = {}
    for c in configs:
        own = stored.get(c.name) or {}
        if not applies(c, "accuracy", configs) or (not own and (profile_sha256 is None or not Path(c.path).exists())):
            continue
        digests = {c.path: own.get("model_sha256") or model_digest(Path(c.path))}
        key = beyond_settings(task_key(c, "accuracy", settings, configs, digests, own.get("profile_sha256") or profile_sha256))
        keys[c.name] = {k: own.get(k, v) for k, v in key.items()}
    return keys


def build(out: Path, configs: list[Config], settings: Settings, raws: list[dict], machine: dict, bw: dict,
          failed: list[dict], *, replace: bool = False, measured: set[str] = frozenset(),
          other_bandwidths: list[dict] = ()) -> dict:
    """Assemble results.json from the raw files and render everything beside it (``replace``: see ``render``).

    ``measured``: the ``<config>-<phase>`` results this run measured; every other one was kept from an earlier run,
    and report.md says so with its date. Results kept from a run with other settings (``--phases`` left their phase
    out of this one) are described by the settings they were measured with: timings by ``timing_settings`` when they
    all agree, else each by its own (``timing_settings_differ``), and compared only where alike (``_derive``, whose
    roofline takes ``other_bandwidths`` for timings of other thread counts); accuracy by ``eval_settings``. Accuracy
    results measured with different settings from one another are flagged, each with its own
    (``eval_settings_differ``, None when they agree but for the size of their draw, ``configs.asked_as``), and paired
    only on items asked the same way (``scores.compare``)."""
    per: dict[str, dict[str, dict]] = {}
    for raw in raws:
        per.setdefault(raw["config"]["name"], {})[raw["phase"]] = raw
    entries = [_entry(c, per.get(c.name, {}), measured) for c in configs]
    baselines = _derive(entries, bw, list(other_bandwidths))
    timing = {e["name"]: e["timing_settings"] for e in entries if e.get("timing_settings")}
    alike = {json.dumps(t, sort_keys=True) for t in timing.values()}
    kept = [r for r in raws if r["phase"] == "accuracy" and isinstance(r.get("settings"), dict)]
    scored = [r["settings"] for r in kept]
    # accuracy results measured with different settings (kept from earlier runs: another seed or set, PubMedQA with
    # or without its abstract) are not described by one: each by its own (``eval_settings_differ``). The size of the
    # draw alone is no difference: a larger one extends the same items, and pairs are over the items both have
    asked = {json.dumps(asked_as(r["settings"]), sort_keys=True) for r in kept}
    differ = {r["config"]["name"]: public_settings(r["settings"]) for r in kept} if len(asked) > 1 else None
    # an accuracy result's own settings; one an earlier edgemed measured holds the prompts' text: public form only
    eval_settings = public_settings(scored[0]) if scored else settings.to_dict()
    if scored and not settings.evals:
        keep = None  # this run draws no items: the records count as the run that measured them drew them
    else:
        keep = scores.current_draw(settings)  # the items of this draw (a records file may hold a larger earlier one)
    scores.in_progress(out, entries, _accuracy_keys(configs, settings, raws), keep)  # a phase still going: its own records
    scores.add_paired(out, entries, keep)
    results = {
        "schema": SCHEMA, "edgemed_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "scenario": settings.scenario, "profile": settings.profile, "settings": settings.to_dict(),
        "timing_settings": next(iter(timing.values())) if len(alike) == 1 else None,
        "timing_settings_differ": timing if len(alike) > 1 else None,
        "eval_settings": eval_settings, "eval_settings_differ": differ, "machine": machine, "bandwidth": bw,
        "other_bandwidths": list(other_bandwidths), "baselines": baselines, "paper": PAPER,
        "configs": entries, "failed": failed,
    }
    render(out, results, replace=replace)
    return results


def render(out: Path, results: dict, *, replace: bool = False) -> None:
    """Write ``FILES`` and the plots into ``out``; files already there are replaced only with ``replace`` (the
    folder is a bench's, or the user said --force: ``runner.claim``)."""
    from edgemed.benchmarks.harness import plots

    results_json, results_csv, report_md = (out / name for name in FILES)
    write_text(results_json, json.dumps(results, indent=1) + "\n", force=replace)
    write_text(results_csv, to_csv(results), force=replace)
    files = plots.render(results, out / "plots", replace=replace)
    write_text(report_md, to_markdown(results, [f.relative_to(out) for f in files]), force=replace)


# -- CSV --------------------------------------------------------------------------------------
def csv_rows(results: dict) -> list[dict]:
    rows = []
    for e in results["configs"]:
        row = {"config": e["name"], "runtime": e["runtime"], "model_mib": _mb(e.get("model_bytes")),
               "bits_per_weight": _r(e.get("bits_per_weight"), 2), "load_s": _r(e.get("load_s"), 3),
               "peak_rss_mib": _mb(e.get("peak_rss_bytes"))}
        for m, scale, digits in (("ttft_s", 1e3, 1), ("tpot_s", 1e3, 2), ("e2e_s", 1, 3), ("prefill_tok_s", 1, 1), ("decode_tok_s", 1, 2)):
            unit = m.replace("_s", "_ms") if scale == 1e3 else m
            for stat in ("p50", "p90", "p99", "stdev"):
                v = _get(e, m, stat)
                row[f"{unit}_{stat}"] = _r(v * scale if v is not None else None, digits)
        row["roofline_fraction"] = _r(_get(e, "roofline", "fraction"), 3)
        row["roofline_fraction_vs_copy"] = _r(_get(e, "roofline", "copy", "fraction"), 3)
        for b, red in e.get("reductions", {}).items():
            row[f"memory_reduction_vs_{b}"] = _r(red["memory"], 4)
            row[f"latency_reduction_vs_{b}"] = _r(red["latency"], 4)
        row.update(scores.csv_columns(e))
        rows.append(row)
    return rows


def to_csv(results: dict) -> str:
    rows = csv_rows(results)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# -- Markdown ---------------------------------------------------------------------------------
def _r(v, digits):
    return None if v is None else round(float(v), digits)


def _mb(v):
    """Bytes as MiB (2**20) to one decimal: the unit of results.csv's ``model_mib`` / ``peak_rss_mib`` and the tables."""
    return None if v is None else round(v / MIB, 1)


def _f(v, fmt="{:.1f}", none="—"):
    return none if v is None else fmt.format(v)


def _pct(v):
    return "—" if v is None else f"{v * 100:+.1f} %"


def _reduction_cell(red: dict | None, what: str) -> str:
    """A reduction (``_derive``), or "not shown" between timings measured with other settings."""
    return "not shown" if red and red.get("not_compared") else _pct((red or {}).get(what))


def _roof(v):
    """A roofline fraction; one above 100 % is marked: the decode cannot beat the memory it reads."""
    return _pct(v).lstrip("+") + (" ⚠" if v is not None and v > 1 else "")


def _bandwidth_lines(bw: dict | None) -> list[str]:
    """The figures of ``bw`` (bandwidth.json, either layout); none where it holds none (``--report-only`` measures
    nothing: the roofline section names the timings left without a ceiling)."""
    figures = bandwidths(bw)
    read, copy = figures["read"] or {}, figures["copy"] or {}
    lines = []
    if read.get("bytes_per_s"):
        lines.append(f"Read bandwidth {read['bytes_per_s'] / 1e9:.1f} GB/s ({read['threads']} threads, "
                     f"{read['buffer_bytes'] / MIB:.0f} MiB buffer, best of {read['repeats']}, bytes read counted once) "
                     "— the ceiling.")
    elif copy.get("bytes_per_s"):
        lines.append("Read bandwidth not measured (a folder from before the read ceiling): no roofline fraction.")
    if copy.get("bytes_per_s"):
        lines.append(f"Stream-copy bandwidth {copy['bytes_per_s'] / 1e9:.1f} GB/s ({copy['threads']} threads, "
                     f"{copy['buffer_bytes'] / MIB:.0f} MiB buffer, best of {copy['repeats']}, read + write counted), "
                     "for comparison with older reports.")
    return lines


def _roofline_section(results: dict, timed: list[dict]) -> list[str]:
    others = results.get("other_bandwidths") or []
    parts = ["## Roofline\n"]
    own = _bandwidth_lines(results.get("bandwidth"))
    if others and own:
        parts.append(f"At {(results.get('bandwidth') or {}).get('threads')} threads, this run's:")
    parts += own
    for bw in others:  # timings kept from runs with other threads: each against the ceiling its own threads reach
        parts += [f"At {bw.get('threads')} threads, for the timings decoded with them:", *_bandwidth_lines(bw)]
    header = ["config", "MB read / token", "KV cache", "ceiling tok/s", "decode tok/s", "fraction", "vs copy bandwidth"]
    rows = [[e["name"], _f(e["bytes_per_token"] / 1e6), e.get("kv_cache_type") or "—",
             _f(_get(e, "roofline", "ceiling_tok_s")), _f(_p50(e, "decode_tok_s"), "{:.2f}"),
             _roof(_get(e, "roofline", "fraction")), _pct(_get(e, "roofline", "copy", "fraction")).lstrip("+")]
            for e in timed]
    if others:
        header.insert(1, "threads")
        for row, e in zip(rows, timed):
            row.insert(1, _get(e, "roofline", "threads") or "—")
    parts += ["", _table(header, rows), ""]
    measured = {(bw or {}).get("threads") for bw in [results.get("bandwidth"), *others] if bandwidths(bw)["read"]}
    missing = [f"{e['name']} ({t} threads)" for e in timed if (t := _get(e, "roofline", "threads")) not in (None, *measured)]
    if missing:
        parts += [f"No read bandwidth was measured in this folder at the thread count {', '.join(missing)} decoded "
                  "with: no ceiling for it (a run into this folder without --report-only measures it).\n"]
    over = [e["name"] for e in timed if (_get(e, "roofline", "fraction") or 0) > 1]
    if over:
        parts += [f"⚠ Inconsistent measurement: {', '.join(over)} decoded faster than the read bandwidth allows for "
                  "the bytes it reads per token; the bandwidth figure (a busy machine while it was measured?) or the "
                  "bytes-per-token model is wrong for it, and its fraction is no measure of efficiency.\n"]
    return parts


def _provenance_cell(p: dict | None) -> str:
    if not p:
        return "—"
    day = p.get("started") or "date unknown"
    return f"measured ({day})" if p.get("this_run") else f"resumed from an earlier run ({day})"


def _provenance_section(entries: list[dict]) -> list[str]:
    """Which result this run measured and which it kept from an earlier one (resumed: its key matched), with the
    day (UTC) each was measured: a table mixing runs says so."""
    rows = [[e["name"]] + [_provenance_cell((e.get("provenance") or {}).get(ph)) for ph in PHASES]
            for e in entries if e.get("provenance")]
    if not rows:
        return []
    return ["## Where each result comes from\n",
            "Measured by the run that wrote this report, or resumed from an earlier run into this folder: its key "
            "(artifact sha256, profile and its settings, runtime versions and native build, methods, the phase's "
            "settings) still matched, or its phase was left out of this run's `--phases` and it keeps the settings "
            "it was measured with. The date is the day its measurement started (UTC).\n",
            _table(["config", *PHASES], rows), ""]


def _prompts_line(s: dict) -> str:
    """How many prompts, and whence: a file's are named by digest only (``configs.Settings``)."""
    n = s.get("n_prompts") or len(s.get("prompts") or ())
    if s.get("prompts_source") == "file":
        return f"{n} prompt(s) from a file (sha256 {str(s.get('prompts_sha256'))[:12]}…, text not recorded)"
    return f"{n} prompt(s)" + (" (built-in)" if s.get("prompts_source") == "built-in" else "")


def _timing_line(results: dict) -> str:
    """The header's sentence on how the timings were measured: by their own settings (``timing_settings``; a
    results.json from before it: the run's), none when they differ (``_timing_differ`` lists each) or nothing was timed."""
    s = results["timing_settings"] if "timing_settings" in results else results["settings"]
    if s is None:
        return ("Timing settings differ between configurations (each one's: *Latency, throughput, memory*). "
                if results.get("timing_settings_differ") else "")
    return (f"{s['runs']} timed runs after {s['warmup']} warm-up per configuration, {s['max_tokens']} new tokens, "
            f"{s['threads']} threads, n_ctx {s['n_ctx']}, seed {s['seed']}, {_prompts_line(s)}. ")


def _timing_differ(results: dict) -> list[str]:
    """Each configuration's timing settings, where they differ (timings kept from earlier runs with others)."""
    differ = results.get("timing_settings_differ")
    if not differ:
        return []
    rows = [[name, s["runs"], s["warmup"], s["max_tokens"], s["threads"], s["n_ctx"], s["seed"], _prompts_line(s),
             s.get("profile") or "—"] for name, s in differ.items()]
    return ["**The timings were measured with different settings** (kept from earlier runs); each configuration's:\n",
            _table(["config", "timed runs", "warm-up", "new tokens", "threads", "n_ctx", "seed", "prompts", "profile"],
                   rows), ""]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(results: dict, plot_files: list[Path]) -> str:
    from edgemed.benchmarks.harness.goals import check_goals

    m, entries = results["machine"], results["configs"]
    timed = [e for e in entries if "e2e_s" in e]
    parts = [f"# edgemed bench — {results['scenario']}\n",
             f"edgemed {results['edgemed_version']}, profile `{results['profile']}`, {results['created']}. "
             f"{_timing_line(results)}Machine: {m['cpu']}, {m['physical_cores']} physical / {m['logical_cores']} "
             f"logical cores, {m['memory_bytes'] / 2**30:.1f} GiB, {m['os']} (`machine.json`).\n",
             "## Definitions\n", DEFINITIONS,
             "## Latency, throughput, memory\n", *_timing_differ(results),
             _table(["config", "runtime", "size MiB", "bits/weight", "peak RSS MiB", "load s", "TTFT p50 ms",
                     "TPOT p50 ms", "prefill tok/s", "decode tok/s (± sd)", "e2e p50 / p90 / p99 s", "roofline (read)"],
                    [[e["name"], e["runtime"], _f(_mb(e["model_bytes"])), _f(e.get("bits_per_weight"), "{:.2f}"),
                      _f(_mb(e["peak_rss_bytes"])), _f(e["load_s"], "{:.2f}"), _f(_p50(e, "ttft_s") * 1e3),
                      _f(_p50(e, "tpot_s") * 1e3, "{:.2f}"), _f(_p50(e, "prefill_tok_s")),
                      f"{_p50(e, 'decode_tok_s'):.2f} ± {e['decode_tok_s']['stdev']:.2f}",
                      f"{e['e2e_s']['p50']:.3f} / {e['e2e_s']['p90']:.3f} / {e['e2e_s']['p99']:.3f}",
                      _roof(_get(e, "roofline", "fraction"))] for e in timed]), ""]
    for e in timed:
        if e.get("tegrastats"):
            parts.append(f"- {e['name']}: tegrastats unified memory peak {e['tegrastats']['unified_peak_mb']} MB "
                         f"of {e['tegrastats']['unified_total_mb']} MB.")
    tokens = {tuple(e["prompt_tokens"]) for e in timed}
    if len(tokens) > 1:
        parts.append("Note: prompt token counts differ between configurations: "
                     + ", ".join(f"{e['name']} {e['prompt_tokens']}" for e in timed) + ".\n")

    base = results["baselines"]
    names = ([base["same_runtime"]] if base["same_runtime"] else []) + base["torch"]
    if names:
        header = ["config"] + [f"{w} vs {b}" for b in names for w in ("memory", "latency")] + ["paper (memory / latency)"]
        rows = [[e["name"]] + [_reduction_cell(_get(e, "reductions", b), w) for b in names for w in ("memory", "latency")]
                + [f"{PAPER['memory_reduction'] * 100:.1f} % / {PAPER['latency_reduction'] * 100:.1f} %"]
                for e in timed if e["reductions"]]
        apart = [f"- `{e['name']}` vs `{b}`: not shown, timed with other settings ({red['not_compared']}). Time both "
                 "alike: run again with `--phases timing` and the same settings for every configuration."
                 for e in timed for b, red in e["reductions"].items() if red.get("not_compared")]
        parts += ["## Reductions against named baselines\n",
                  "Memory = peak RSS, latency = e2e p50; 1 - config / baseline, only between timings measured with "
                  "the same settings. The paper's figures (4-bit vs its unquantized baseline, its own undefined "
                  "latency) are shown for comparison.\n", _table(header, rows), *(["", *apart] if apart else []), ""]

    parts += scores.markdown(results, _table)

    parts += _provenance_section(entries)
    parts += _roofline_section(results, timed)
    goals = check_goals(results)
    if goals:
        parts += ["## Goals\n", _table(["goal", "measured", "met"], goals), ""]
    if plot_files:
        parts += ["## Plots\n"] + [f"![{p.stem}]({p.as_posix()})" for p in plot_files] + [""]
    if results["failed"]:
        parts += ["## Failed\n"] + [f"- {f['task']}: {f['error']}" for f in results["failed"]] + [""]
    parts += ["## Machine\n", "```", json.dumps({k: m[k] for k in ("cpu", "platform", "physical_cores",
              "logical_cores", "memory_bytes", "memory_read_bandwidth", "os", "python", "versions", "llama_cpp_system_info") if k in m},
              indent=1), "```", ""]
    return "\n".join(parts)


# -- python -m edgemed.benchmarks.harness.report OUT ---------------------------------------------------------------
def rebuild(out: Path) -> dict:
    """Render ``out``'s report again from what is there, measuring nothing: the configurations and settings of its
    results.json, machine.json, raw/bandwidth.json (and the bandwidths at other thread counts beside it) and every raw
    result in raw/ (whatever its key: each is marked as from an earlier run, with its date). For a folder whose report an older edgemed wrote, or a run with fewer phases
    than raw/ holds. Failures of the earlier report stay listed while their result is still missing."""
    from edgemed.benchmarks.harness.child import load_raw, publish_raw

    old = json.loads((out / "results.json").read_text(encoding="utf-8"))
    settings = Settings.from_dict(old["settings"])  # an earlier edgemed's holds a file's prompts: written public
    for path in (out / "raw").glob("*.json"):
        publish_raw(path)
    configs = [Config(e["name"], e["kind"], e["path"], e.get("dtype") or "") for e in old["configs"]]
    raws = [r for c in configs for ph in PHASES if (r := load_raw(out / "raw" / f"{c.name}-{ph}.json")) is not None]
    machine = json.loads((out / "machine.json").read_text(encoding="utf-8"))
    bw = json.loads((out / "raw" / "bandwidth.json").read_text(encoding="utf-8"))
    others = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((out / "raw").glob("bandwidth-*-threads.json"))]
    have = {f"{r['config']['name']}-{r['phase']}" for r in raws}
    failed = [f for f in old.get("failed") or [] if f.get("task") not in have]
    return build(out, configs, settings, raws, machine, bw, failed, replace=True,
                 other_bandwidths=[x for x in others if x.get("threads") != bw.get("threads")])


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m edgemed.benchmarks.harness.report OUT  (a report folder edgemed's bench made)")
    rebuild(Path(sys.argv[1]))
