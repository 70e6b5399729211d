"""Orchestrate a benchmark: one child process per configuration x phase, resumable, then the report.

``<out>/raw/<config>-<phase>.json`` is the unit of work. Each carries its key (``task_key``) —
model digest, device profile and a digest of its settings, edgemed version, the harness's methods version
(``METHODS_VERSION``), the runtime's installed versions and, for llama.cpp, the digest of its native libraries
(a rebuild with another compiler keeps the version and changes the speed), a digest of the settings that
phase depends on and, for accuracy, the rules an item is asked and scored by (``accuracy.RECORDS_VERSION``). A file
whose key matches is kept (the run resumes where it stopped); a missing, unreadable or stale one is measured again,
and report.md says of each result whether this run measured it or kept it from an earlier one (with its date).
Children write atomically, so a killed run leaves complete files or none. The accuracy phase also resumes inside a
configuration: its per-item records file is appended as it goes, and is started afresh when its first line names
another artifact (sha256), key or records version (``accuracy.records_resume``).

A phase this run does not measure (left out of ``--phases``) keeps its earlier results in the report when they are
of the same artifacts, runtime and profile (``earlier_results``), each described by the settings it was measured
with; timings are compared with each other only where measured alike, and each has its roofline against the
bandwidth at its own threads, measured once per folder and thread count (``bandwidth``): a kept timing's roofline
stays as it was, and ``--report-only`` measures nothing. A ``<quant>-mmap`` configuration (the same file,
another load mode) is timed only: its twin's divergence and accuracy are of the same bytes (``twin_of``).

Order: the bandwidth at the run's threads (where a timing phase is to run and none is on file), every timing phase
(measured first, while nothing else of ours runs), then divergence (the reference configuration first), then accuracy.

The report files (machine.json, results.json, results.csv, report.md, plots/) are rewritten on every run of a
folder the bench made, which ``raw/bandwidth.json`` (the first thing a run writes) marks. In any other folder a
run refuses, before any work, to replace a file of those names unless the user says --force (``claim``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from edgemed.errors import EdgemedError, InputError, OutputExists
from edgemed.files.atomic import check_destination, inside, refuse_store, write_text
from edgemed.packaging.manifest import MANIFEST
from edgemed.benchmarks.harness.accuracy import private_replies, records_resume
from edgemed.benchmarks.harness.artifacts import model_digest
from edgemed.benchmarks.harness.child import load_raw, publish_raw
from edgemed.benchmarks.harness.configs import PHASES, REFERENCE, Config, Settings, beyond_settings
from edgemed.benchmarks.harness.keys import METHODS_VERSION, applies, profile_digest, runtime_identity, task_key, twin_of  # noqa: F401

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


def trained_context(config: Config) -> int | None:
    """The context ``config``'s model was trained on, as its file says (a GGUF's header, an ONNX export's
    genai_config.json); None for a kind that names none (an HF baseline) or a file that cannot be read, which its
    phases then report."""
    try:
        if config.kind == "gguf":
            from edgemed.runtime.plan import read_shape

            return read_shape(Path(config.path)).n_ctx_train
        if config.kind == "onnx":
            from edgemed.formats.genai_config import read_model
            from edgemed.runtime.onnx_engine import GENAI_CONFIG

            return read_model(Path(config.path) / GENAI_CONFIG).get("context_length")
    except (EdgemedError, OSError):
        return None
    return None


def fit_context(settings: Settings, configs: list[Config]) -> Settings:
    """``settings`` for the models measured (``Settings.fitted``): without --ctx, each phase's default context cut to
    the fewest tokens one of them was trained on, the same for all (their timings stay comparable); a --ctx beyond that
    is refused before any work, as ``edgemed run`` refuses it, naming a --ctx that fits."""
    trained = {c.name: n for c in configs if (n := trained_context(c))}
    if not trained:
        return settings
    name, fewest = min(trained.items(), key=lambda kv: kv[1])
    check_ctx(settings, name, fewest)
    return settings.fitted(fewest)


def check_ctx(settings: Settings, name: str, trained: int) -> None:
    """Refuse a --ctx beyond the ``trained`` tokens the configuration ``name`` was trained on, naming a --ctx that
    fits; ``bench reproduce`` asks it before converting too (``artifacts.trained_context``)."""
    if settings.ctx_given and settings.n_ctx > trained:
        raise InputError(f"--ctx {settings.n_ctx} is more than the {trained} tokens {name} was trained on: past them "
                         "its positions are ones it never saw, and its answers degrade.",
                         f"pass --ctx {trained} or less, or leave --ctx out (each phase then takes the bench's default "
                         f"context, cut to {trained})")


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
            if not applies(c, phase, configs):
                continue
            if phase == "accuracy" and not settings.evals:
                continue
            key = task_key(c, phase, settings, configs, digests, profile_sha256)
            tasks.append(Task(c, phase, raw / f"{c.name}-{phase}.json", key))
    return tasks


def earlier_results(out: Path, configs: list[Config], settings: Settings, planned: list[Task]) -> list[dict]:
    """Raw results of the phases this run does not measure (left out of ``--phases``, or accuracy without ``--eval``)
    that are still of these artifacts, runtime, profile and methods: a report rebuilt with fewer phases keeps what was
    measured before. Their settings may be another run's (its draw of items, its context): each raw file holds its own,
    and the report describes the accuracy items from them (``report.build``)."""
    done = {(t.config.name, t.phase) for t in planned}
    wanted = [(c, phase) for c in configs for phase in PHASES if (c.name, phase) not in done and applies(c, phase, configs)
              and (phase != "divergence" or any(x.name == REFERENCE for x in configs))]
    found = [(c, phase, load_raw(out / "raw" / f"{c.name}-{phase}.json")) for c, phase in wanted]
    found = [(c, phase, r) for c, phase, r in found if r is not None]
    if not found:
        return []
    digests = {c.path: model_digest(Path(c.path)) for c in configs}
    profile_sha256 = profile_digest(settings.profile)
    kept = []
    for c, phase, raw in found:
        key = task_key(c, phase, settings, configs, digests, profile_sha256)
        if isinstance(raw.get("key"), dict) and beyond_settings(raw["key"]) == beyond_settings(key):
            kept.append(raw)
    return kept


def reference_file(out: Path) -> Path:
    """The divergence reference's logits (``divergence.reference_logits``), beside its raw result."""
    return out / "raw" / f"{REFERENCE}-reference.npz"


def reference_current(out: Path, reference: Task | None) -> bool:
    """Whether the divergence reference task ``reference`` is done under its current key: its raw result and the
    logits file it wrote both carry that key. A raw result alone is not enough: a reference artifact changed and its
    re-measure failed leaves the earlier one's files, which other artifacts would be compared with."""
    from edgemed.benchmarks.harness.divergence import reference_key

    return reference is not None and load_raw(reference.raw, reference.key) is not None and \
        reference_key(reference_file(out)) == reference.key


def _run_child(task: Task, settings: Settings, out: Path, progress: bool, reference_key: dict | None = None) -> tuple[bool, str]:
    """Run one task's child. The task file holds the public settings (``Settings.to_dict``: a file's prompts by
    digest); the prompts' text goes to the child on its stdin, so it is never on disk. The task file is removed
    when the child ends, however it ends; one a killed run leaves is swept by the next (``forget_clinic_text``).
    ``reference_key``: the divergence reference's current key, which the logits it compares against must hold.
    A failure is told by the child's error file (an ``EdgemedError``: its problem and fix, whole), else by the last
    line of its stderr (a traceback's exception)."""
    tasks_dir = out / "raw" / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    error_file = tasks_dir / f"{task.config.name}-{task.phase}.error.json"
    error_file.unlink(missing_ok=True)
    body = {"config": task.config.to_dict(), "phase": task.phase, "settings": settings.to_dict(), "key": task.key,
            "out": str(task.raw), "progress": progress, "error": str(error_file),
            "records": str(out / "raw" / f"{task.config.name}-{task.phase}.records.jsonl"),
            "reference": str(reference_file(out)), "reference_config": REFERENCE, "reference_key": reference_key,
            "is_reference": task.config.name == REFERENCE}
    task_file = tasks_dir / f"{task.config.name}-{task.phase}.task.json"
    write_text(task_file, json.dumps(body, indent=1))
    cmd = [sys.executable, "-m", "edgemed.benchmarks.harness.child", str(task_file)]
    try:
        proc = subprocess.run(cmd, input=json.dumps(list(settings.prompts), ensure_ascii=False), encoding="utf-8",
                              stdout=subprocess.DEVNULL, stderr=None if progress else subprocess.PIPE, check=False)
    finally:
        task_file.unlink(missing_ok=True)
        try:
            error = json.loads(error_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            error = None
        error_file.unlink(missing_ok=True)
    if proc.returncode != 0:
        if isinstance(error, dict) and error.get("problem"):
            return False, f"exit {proc.returncode}: {error['problem']}" + (f" Fix: {error['fix']}" if error.get("fix") else "")
        tail = (proc.stderr or "")[-2000:]
        return False, f"exit {proc.returncode}" + (f": {tail.strip().splitlines()[-1]}" if tail.strip() else "")
    return True, ""


def forget_clinic_text(out: Path, keep_replies: bool = False) -> None:
    """Take out of ``out/raw`` the text that a killed run or an earlier edgemed left there: the task files (an
    earlier edgemed wrote the prompts into them; ours hold none, and are removed as each child ends), the prompts in
    the settings of raw results (rewritten in their public form, their key and result unchanged: they still resume)
    and, unless ``keep_replies`` (``--keep-replies``: then the records are made owner-only), the generated replies in
    the accuracy records (an earlier edgemed kept them all; their scores stay)."""
    for task_file in (out / "raw" / "tasks").glob("*.task.json"):
        task_file.unlink(missing_ok=True)
    for path in (out / "raw").glob("*.json"):
        publish_raw(path)
    for path in (out / "raw").glob("*.records.jsonl"):
        private_replies(path, keep_replies)


def _figures(path: Path, threads: int | None = None) -> dict:
    """The figures ``{"read", "copy"}`` the bandwidth file ``path`` holds (either layout; ``threads``: those at that
    count only), each None where it holds none (no file, a folder from before the read ceiling: copy alone)."""
    from edgemed.benchmarks.harness.roofline import bandwidths

    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = None
    figures = bandwidths(saved if isinstance(saved, dict) else None)
    return {k: v if isinstance(v, dict) and v.get("threads") and threads in (None, v["threads"]) else None
            for k, v in figures.items()}


def bandwidth(out: Path, threads: int, measure: bool = True) -> dict:
    """Read and copy bandwidth at ``threads``, ``{"threads", "read", "copy"}`` (roofline.stream_read_bandwidth /
    stream_copy_bandwidth), measured once per output folder and thread count: a figure on file is taken, and no file
    takes another count's. ``raw/bandwidth.json`` holds the first count a folder measured, and
    ``raw/bandwidth-<n>-threads.json`` each other. Without ``measure`` (``--report-only``; no timing at that count) nothing is measured:
    a figure not on file is None. A folder from before the read ceiling holds the copy figure alone: it is kept, and
    the read one measured beside it."""
    from edgemed.benchmarks.harness.roofline import stream_copy_bandwidth, stream_read_bandwidth

    first, own = out / "raw" / "bandwidth.json", out / "raw" / f"bandwidth-{threads}-threads.json"
    counts = {f["threads"] for f in _figures(first).values() if f}
    # bandwidth.json where it holds this count, or no figure yet (and this count's own file none); else the own file
    path = first if counts == {threads} or (not counts and not any(_figures(own, threads).values())) else own
    figures = _figures(path, threads)
    if all(figures.values()) or not measure:
        return {"threads": threads, **figures}
    result = {"threads": threads, "read": figures["read"] or stream_read_bandwidth(threads=threads),
              "copy": figures["copy"] or stream_copy_bandwidth(threads=threads)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(result, indent=1))
    return result


def timing_threads_of(raws: list[dict]) -> set[int]:
    """The thread counts the timing results among ``raws`` decoded with: each roofline is against the read bandwidth
    at its own (``bandwidth``: one kept from an earlier run with other threads has another ceiling than this run's)."""
    from edgemed.benchmarks.harness.roofline import timing_threads

    counts = {timing_threads(r["result"].get("runtime_settings"), r.get("settings")) for r in raws if r["phase"] == "timing"}
    return {c for c in counts if c}


def other_bandwidths(out: Path, raws: list[dict], bw: dict, measure: bool = True) -> list[dict]:
    """The bandwidth (``bandwidth``: on file, else measured with ``measure``) at each thread count a timing among
    ``raws`` decoded with that this run's (``bw``) is not: timings kept from earlier runs with other threads."""
    return [bandwidth(out, n, measure) for n in sorted(timing_threads_of(raws) - {bw["threads"]})]


def mark_as_bench(out: Path, threads: int) -> None:
    """Write ``raw/bandwidth.json`` where a run left none (it measured no bandwidth: ``--report-only``, no timing), with
    no figure in it: it marks the folder as a bench's (``made_by_bench``), and the first figure measured goes in it."""
    path = out / "raw" / "bandwidth.json"
    if not os.path.lexists(path):
        write_text(path, json.dumps({"threads": threads, "read": None, "copy": None}, indent=1))


def report_files(out: Path) -> list[Path]:
    """Every file a run (re)writes at each report; ``raw/`` holds the measurements, which a run resumes."""
    from edgemed.benchmarks.harness import plots, report

    return [out / MACHINE, *(out / name for name in report.FILES), *plots.files(out / "plots")]


def made_by_bench(out: Path) -> bool:
    """True when ``out`` is a report folder of edgemed's bench: it holds the bandwidth file a run writes first, with
    its figures or none yet (``mark_as_bench``)."""
    from edgemed.benchmarks.harness.roofline import bandwidths

    try:
        saved = json.loads((out / "raw" / "bandwidth.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and ({"threads", "read", "copy"} <= set(saved) or any(bandwidths(saved).values()))


def claim(out: Path, force: bool, inputs=()) -> bool:
    """Refuse, before any work, a report folder holding files a run would replace that edgemed's bench did not
    make (unless ``force``), one inside edgemed's store, or one inside a folder the run reads (``inputs``: the
    paths measured; a file's bundle folder, the one up to three levels above it holding a manifest.json, counts as
    read); return whether this
    run may replace its report files."""
    refuse_store(out)  # an installed model would hold files its manifest does not list, and stop verifying
    for path in inputs:
        path = Path(path)
        folder = path if path.is_dir() else next((p for p in list(path.parents)[:3] if (p / MANIFEST).is_file()), None)
        if folder is not None and inside(out, folder):
            raise OutputExists(f"The report folder '{out}' is inside '{folder}', which this run measures; a report "
                               "there would change what it reads (a bundle would no longer verify).",
                               "choose a report folder outside it with -o")
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

    settings = fit_context(settings, configs)  # before anything is written: a --ctx beyond the model is refused
    replace = claim(out, force, [c.path for c in configs if c.path])
    out.mkdir(parents=True, exist_ok=True)
    (out / "raw").mkdir(exist_ok=True)
    forget_clinic_text(out, settings.eval_replies)
    settings = resolve_settings(settings)
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names must be unique: {names}")
    tasks = plan_tasks(out, configs, phases, settings)
    # this run's timings decode at its threads: their ceiling is measured (where none is on file) before them, while
    # nothing else of ours runs
    bandwidth(out, settings.threads, measure and any(t.phase == "timing" for t in tasks))
    mark_as_bench(out, settings.threads)
    failed, redone, kept = [], [], []
    reference = next((t for t in tasks if t.phase == "divergence" and t.config.name == REFERENCE), None)
    bar = tqdm(tasks, desc="bench", unit="task", disable=not progress)
    for task in bar:
        label = f"{task.config.name}-{task.phase}"
        bar.set_postfix_str(label)
        if load_raw(task.raw, task.key) is not None and (task is not reference or reference_current(out, task)):
            kept.append(label)
            continue
        if not measure:
            failed.append({"task": label, "error": "not measured yet (report written with --report-only)"})
            continue
        if task.phase == "divergence" and task is not reference and not reference_current(out, reference):
            failed.append({"task": label, "error": f"the reference logits of the current {REFERENCE} were not written "
                                                   f"(its divergence phase failed)"})
            continue
        records = out / "raw" / f"{task.config.name}-{task.phase}.records.jsonl"
        if records.exists() and not records_resume(records, task.key, settings):
            # records of another artifact (sha256), build, profile, version or scoring, finished or killed: start
            # the items afresh; only another draw (more items, another seed or set) keeps them and a killed run
            # resumes item by item (accuracy.records_resume)
            records.unlink()
        raw_before = task.raw.read_text(encoding="utf-8") if task.raw.exists() else None
        records_before = records.stat().st_size if records.exists() else None
        t = time.perf_counter()
        ok, why = _run_child(task, settings, out, progress, reference.key if reference is not None else None)
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
    raws += earlier_results(out, configs, settings, tasks)  # phases left out of this run, measured before: kept
    bw = bandwidth(out, settings.threads, measure and settings.threads in timing_threads_of(raws))
    mach = machine.describe(settings.profile)
    if bw["read"]:
        mach["memory_read_bandwidth"] = {k: bw["read"][k] for k in ("bytes_per_s", "threads", "buffer_bytes", "method")}
    write_text(out / MACHINE, json.dumps(mach, indent=1), force=replace)
    results = report.build(out, configs, settings, raws, mach, bw, failed, replace=replace, measured=set(redone),
                           other_bandwidths=other_bandwidths(out, raws, bw, measure))
    results["run"] = {"measured": redone, "resumed": kept}
    return results
