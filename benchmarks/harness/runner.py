"""Orchestrate a benchmark: one child process per configuration x phase, resumable, then the report.

``<out>/raw/<config>-<phase>.json`` is the unit of work. Each carries its key —
model digest, device profile, edgemed version, and a digest of the settings that
phase depends on. A file whose key matches is kept (the run resumes where it
stopped); a missing, unreadable or stale one is measured again. Children write
atomically, so a killed run leaves complete files or none. The accuracy phase also
resumes inside a configuration: its per-item records file is appended as it goes.

Order: the bandwidth measurement, every timing phase (measured first, while nothing
else of ours runs), then divergence (the reference configuration first), then accuracy.

The report files (machine.json, results.json, results.csv, report.md, plots/) are rewritten on every run of a
folder the bench made, which ``raw/bandwidth.json`` (the first thing a run writes) marks. In any other folder a
run refuses, before any work, to replace a file of those names unless the user says --force (``claim``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from edgemed import __version__
from edgemed.errors import OutputExists
from edgemed.files.atomic import check_destination, write_text
from edgemed.benchmarks.harness.accuracy import records_carry_over
from edgemed.benchmarks.harness.child import RAW_SCHEMA
from edgemed.benchmarks.harness.configs import PHASES, REFERENCE, Config, Settings

log = logging.getLogger(__name__)

MACHINE = "machine.json"


@dataclass
class Task:
    config: Config
    phase: str
    raw: Path
    key: dict


def resolve_settings(settings: Settings) -> Settings:
    """Fill the profile and thread count from the device profile, so every configuration gets the same."""
    from edgemed.devices.detect import resolve

    profile, facts = resolve(settings.profile)
    threads = settings.threads or profile.threads(profile.llama["n_threads"], facts) or 1
    return replace(settings, profile=profile.name, threads=int(threads))


def model_digest(path: Path) -> str:
    """sha256 of a model file, or one digest over a directory's files (names + contents); cached by stat."""
    import hashlib

    from edgemed.packaging.digest import VerifiedCache, file_digest

    cache = VerifiedCache()
    try:
        if path.is_file():
            return file_digest(path, cache, full=False)[0]
        h = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            h.update(str(file.relative_to(path)).encode() + b"\0" + file_digest(file, cache, full=False)[0].encode() + b"\n")
        return h.hexdigest()
    finally:
        cache.save()


def profile_digest(name: str | None) -> str:
    """sha256 of the device profile's settings (the named one, or the one this host detects): a result measured
    under other settings of the same name (an edited user profile, a new release's micro-batch) is measured again."""
    from edgemed.devices.detect import resolve

    profile, _ = resolve(name)
    body = json.dumps({"memory": profile.memory, "llama": profile.llama, "onnx": profile.onnx}, sort_keys=True)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def plan_tasks(out: Path, configs: list[Config], phases: list[str], settings: Settings) -> list[Task]:
    raw = out / "raw"
    digests = {c.path: model_digest(Path(c.path)) for c in configs}
    profile_sha256 = profile_digest(settings.profile)
    if "divergence" in phases and not any(c.name == REFERENCE for c in configs):
        log.info("no %s configuration: the divergence phase is skipped", REFERENCE)
        phases = [p for p in phases if p != "divergence"]
    tasks = []
    ordered = sorted(configs, key=lambda c: c.name != REFERENCE)  # the divergence reference first
    for phase in (p for p in PHASES if p in phases):
        for c in ordered if phase == "divergence" else configs:
            if phase != "timing" and not c.spec.scored:
                continue
            if phase == "accuracy" and not settings.evals:
                continue
            key = {"model_sha256": digests[c.path], "profile": settings.profile, "profile_sha256": profile_sha256,
                   "edgemed_version": __version__, "settings_sha256": settings.digest(phase)}
            if phase == "divergence":  # the reference's truncation sets how close the KLD is to the full-vocabulary one
                from edgemed.benchmarks.harness.divergence import TOP_K
                from edgemed.converters.quality.fidelity import VERSION

                key["fidelity_version"] = VERSION  # the rules of the figures (edgemed.converters.quality.fidelity): new rules, new results
                key["reference_sha256"] = digests[next(x.path for x in configs if x.name == REFERENCE)]
                key["reference_top_k"] = TOP_K
            tasks.append(Task(c, phase, raw / f"{c.name}-{phase}.json", key))
    return tasks


def load_raw(path: Path, key: dict | None = None) -> dict | None:
    """A raw result, or None when it is missing, damaged, of another schema or (given ``key``) stale."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("schema") != RAW_SCHEMA or "result" not in raw:
        return None
    if key is not None and raw.get("key") != key:
        return None
    return raw


def _run_child(task: Task, settings: Settings, out: Path, progress: bool) -> tuple[bool, str]:
    tasks_dir = out / "raw" / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    body = {"config": task.config.to_dict(), "phase": task.phase, "settings": settings.to_dict(), "key": task.key,
            "out": str(task.raw), "progress": progress,
            "records": str(out / "raw" / f"{task.config.name}-{task.phase}.records.jsonl"),
            "reference": str(out / "raw" / f"{REFERENCE}-reference.npz"), "reference_config": REFERENCE,
            "is_reference": task.config.name == REFERENCE}
    task_file = tasks_dir / f"{task.config.name}-{task.phase}.task.json"
    write_text(task_file, json.dumps(body, indent=1))
    cmd = [sys.executable, "-m", "edgemed.benchmarks.harness.child", str(task_file)]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=None if progress else subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or "")[-2000:]
        return False, f"exit {proc.returncode}" + (f": {tail.strip().splitlines()[-1]}" if tail.strip() else "")
    return True, ""


def bandwidth(out: Path, threads: int) -> dict:
    """Read and copy bandwidth, measured once per output folder and thread count (``raw/bandwidth.json``).

    ``{"threads", "read", "copy"}`` (roofline.stream_read_bandwidth / stream_copy_bandwidth). A folder from before
    the read ceiling holds the copy figure alone: it is kept (same threads) and the read one is measured beside it."""
    from edgemed.benchmarks.harness.roofline import bandwidths, stream_copy_bandwidth, stream_read_bandwidth

    path = out / "raw" / "bandwidth.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        figures = bandwidths(saved if isinstance(saved, dict) else None)
    except (OSError, ValueError):
        figures = {"read": None, "copy": None}
    figures = {k: v for k, v in figures.items() if isinstance(v, dict) and v.get("threads") == threads}
    if len(figures) == 2:
        return {"threads": threads, **figures}
    result = {"threads": threads, "read": figures.get("read") or stream_read_bandwidth(threads=threads),
              "copy": figures.get("copy") or stream_copy_bandwidth(threads=threads)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(result, indent=1))
    return result


def report_files(out: Path) -> list[Path]:
    """Every file a run (re)writes at each report; ``raw/`` holds the measurements, which a run resumes."""
    from edgemed.benchmarks.harness import plots, report

    return [out / MACHINE, *(out / name for name in report.FILES), *plots.files(out / "plots")]


def made_by_bench(out: Path) -> bool:
    """True when ``out`` is a report folder of edgemed's bench: it holds the bandwidth figure a run measures first."""
    from edgemed.benchmarks.harness.roofline import bandwidths

    try:
        saved = json.loads((out / "raw" / "bandwidth.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and any(bandwidths(saved).values())


def claim(out: Path, force: bool) -> bool:
    """Refuse, before any work, a report folder holding files a run would replace that edgemed's bench did not
    make (unless ``force``); return whether this run may replace its report files."""
    if os.path.lexists(out) and not out.is_dir():
        raise OutputExists(f"The report folder '{out}' is a file.", "name a folder with -o (a new one, or one a bench made)")
    taken = [p for p in report_files(out) if os.path.lexists(p)]
    for path in taken:
        check_destination(path, force=True)  # a directory at a report file's name is left alone, even with --force
    ours = made_by_bench(out)
    if taken and not (ours or force):
        names = ", ".join(str(p.relative_to(out)) for p in taken)
        raise OutputExists(
            f"The report folder '{out}' holds {names}, which a bench run would replace, and edgemed's bench did not "
            "make that folder (it has no raw/bandwidth.json).",
            f"choose another report folder with -o (e.g. {out / 'bench'}), move those files away, or pass --force to "
            "replace them")
    return ours or force


def run(out: Path, configs: list[Config], settings: Settings, phases: list[str], *, progress: bool = True,
        echo=print, measure: bool = True, force: bool = False, check=None) -> dict:
    """Measure every missing configuration x phase, then write the report folder; returns results.json's content.

    ``measure=False`` writes the report from the results already there and lists the missing ones (a long
    accuracy run can be reported on while it is still going). ``force``: replace report files in a folder the
    bench did not make (``claim``). ``check``: called after each measured task (an installed model's
    ``packaging.ref.loaded_as_verified``); when it raises, what that task's child wrote is taken back (the result file
    as it was before, the records cut to their length before: they measured bytes that are not the ones keyed) and
    the error ends the run, no report written."""
    from tqdm import tqdm

    from edgemed.benchmarks.harness import machine, report

    replace = claim(out, force)
    out.mkdir(parents=True, exist_ok=True)
    (out / "raw").mkdir(exist_ok=True)
    settings = resolve_settings(settings)
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names must be unique: {names}")
    bw = bandwidth(out, settings.threads)
    mach = machine.describe(settings.profile)
    mach["memory_read_bandwidth"] = {k: bw["read"][k] for k in ("bytes_per_s", "threads", "buffer_bytes", "method")}
    write_text(out / MACHINE, json.dumps(mach, indent=1), force=replace)
    tasks = plan_tasks(out, configs, phases, settings)
    failed, redone, kept = [], [], []
    bar = tqdm(tasks, desc="bench", unit="task", disable=not progress)
    for task in bar:
        label = f"{task.config.name}-{task.phase}"
        bar.set_postfix_str(label)
        if load_raw(task.raw, task.key) is not None:
            kept.append(label)
            continue
        if not measure:
            failed.append({"task": label, "error": "not measured yet (report written with --report-only)"})
            continue
        if task.phase == "divergence" and task.config.name != REFERENCE and \
                load_raw(out / "raw" / f"{REFERENCE}-divergence.json") is None:
            failed.append({"task": label, "error": "the reference logits were not written"})
            continue
        records = out / "raw" / f"{task.config.name}-{task.phase}.records.jsonl"
        old = load_raw(task.raw)
        if records.exists() and old is not None and not records_carry_over(old, task.key, settings):
            # a complete result with another key (new model, profile, version or scoring): start the items afresh;
            # only another draw (more items, another seed or set) keeps them (accuracy.records_carry_over);
            # without a result (a killed run) the records are kept and the phase resumes item by item
            records.unlink()
        raw_before = task.raw.read_text(encoding="utf-8") if task.raw.exists() else None
        records_before = records.stat().st_size if records.exists() else None
        t = time.perf_counter()
        ok, why = _run_child(task, settings, out, progress)
        if check is not None:
            try:
                check()
            except Exception:  # put back what this child changed, and only that
                if raw_before is None:
                    task.raw.unlink(missing_ok=True)
                else:
                    write_text(task.raw, raw_before)
                if records_before is None:
                    records.unlink(missing_ok=True)
                elif records.exists():
                    with open(records, "r+b") as fh:
                        fh.truncate(records_before)  # the items of earlier runs stay; this run's go
                bar.close()
                raise
        if ok:
            redone.append(label)
            log.info("%s measured in %.1f s", label, time.perf_counter() - t)
        else:
            failed.append({"task": label, "error": why})
            echo(f"{label} failed ({why}); the other configurations go on")
    bar.close()
    raws = [r for r in (load_raw(t.raw, t.key) for t in tasks) if r is not None]
    results = report.build(out, configs, settings, raws, mach, bw, failed, replace=replace)
    results["run"] = {"measured": redone, "resumed": kept}
    return results
