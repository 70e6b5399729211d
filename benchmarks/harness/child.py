"""One configuration x one phase, in its own process: ``python -m edgemed.benchmarks.harness.child TASK.json``.

The runner writes the task (configuration, phase, settings in their public form, result key, output
path) and sends the prompts' text on this process's stdin as a JSON array (a clinic's prompts are never written
to disk: ``configs.Settings``); by hand, ``... child TASK.json < prompts.json``. This process measures and writes
one JSON file atomically, so a killed child leaves either its complete result or nothing; an expected failure
(``EdgemedError``) writes its problem and fix to the task's ``error`` file instead, for the runner to report whole,
and exits 1. Peak RSS is this process's own high-water mark (``VmHWM`` on Linux, ``ru_maxrss`` elsewhere:
``peak_rss``), imports included.

Phases:
* ``timing``     load, warm-up, N timed requests (timing.py / torch_baseline.py), roofline figures;
* ``accuracy``   medical QA on this very artifact (the accuracy module), resumable per item;
* ``divergence`` the reference configuration writes its logits on medical text; every
  other configuration reports KL divergence and top-1 agreement against them.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

from edgemed.errors import EdgemedError
from edgemed.files.atomic import write_text
from edgemed.benchmarks.harness.configs import Config, Settings, public_settings

log = logging.getLogger(__name__)

RAW_SCHEMA = "edgemed.bench.raw/1"


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


def publish_raw(path: Path) -> None:
    """Rewrite a raw result whose settings hold a file's prompts by text (an earlier edgemed wrote them so) in their
    public form (``configs.public_settings``); its key and result stay as they are. Anything else is left alone."""
    raw = load_raw(path)
    if raw is None or not isinstance(raw.get("settings"), dict):
        return
    public = public_settings(raw["settings"])
    if public != raw["settings"]:
        write_text(path, json.dumps({**raw, "settings": public}, indent=1) + "\n")


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux: ``VmHWM`` from /proc/self/status, the high-water mark of this process's
    own address space. Not ``ru_maxrss``: Linux carries that across ``exec`` from
    the parent that forked us, so a child of a large parent would report the parent's
    peak. Elsewhere ``getrusage`` (macOS reports bytes).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def disk_bytes(path: Path) -> int:
    """Bytes the artifact takes on disk (all files of a directory)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _rss_now() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


# -- phases ---------------------------------------------------------------------------------
def phase_timing(config: Config, settings: Settings, task: dict) -> dict:
    from edgemed.benchmarks.harness import timing
    from edgemed.benchmarks.harness.machine import TegraStats

    module, attr = config.spec.timer.split(":")
    opener = getattr(importlib.import_module(module), attr)
    path = Path(config.path)
    with TegraStats() as tegra:
        consent = {"allow_pickle": True} if config.allow_pickle else {}  # an HF baseline's --allow-pickle
        if config.use_mmap is not None:
            consent["use_mmap"] = config.use_mmap  # a -mmap configuration: the load mode over the profile's
        timed = opener(path, settings.threads, settings.n_ctx, settings.profile, settings.seed, config.dtype, **consent)
        load_s = timed.load_s  # the runtime's load call only (imports and planning excluded)
        rss_loaded = _rss_now()
        try:
            measured = timing.measure(timed, settings.prompts, settings.runs, settings.warmup, settings.max_tokens,
                                      progress=task.get("progress", True),
                                      token_ids=settings.prompts_source == "built-in")
            weights = timed.weights()
            runtime_settings = timed.settings()
        finally:
            timed.close()
    # KV read at the mean position of the timed decode: prompt + half the new tokens
    kv_pos = sum(measured["prompt_tokens"]) / len(measured["prompt_tokens"]) + settings.max_tokens / 2
    return {"runtime": config.spec.runtime, "model_bytes": disk_bytes(path), "load_s": load_s,
            "peak_rss_bytes": peak_rss_bytes(), "rss_after_load_bytes": rss_loaded, "tegrastats": tegra.to_dict(),
            "weights": weights.to_dict(), "kv_positions": kv_pos, "bytes_per_token": weights.bytes_per_token(kv_pos),
            "runtime_settings": runtime_settings, **measured}


def phase_accuracy(config: Config, settings: Settings, task: dict) -> dict:
    from edgemed.benchmarks.harness import accuracy
    from edgemed.benchmarks.harness.configs import beyond_settings
    from edgemed.benchmarks.harness.datasets import load_eval_set
    from edgemed.benchmarks.harness.scorer import open_scorer

    items = load_eval_set(settings.evals, settings.eval_counts, settings.seed, context=settings.eval_context)
    scorer = open_scorer(Path(config.path), threads=settings.scoring_threads, n_ctx=settings.eval_ctx,
                         profile=settings.profile,  # loaded as the timing phase and `edgemed run` load it
                         ctx_source=settings.context_of("accuracy"))
    try:
        result = accuracy.evaluate(scorer, items, records_path=Path(task["records"]), score=settings.eval_score,
                                   progress=task.get("progress", True), artifact_sha256=task["key"]["model_sha256"],
                                   key=beyond_settings(task["key"]), keep_replies=settings.eval_replies)
        runtime_settings = scorer.settings()
    finally:
        scorer.close()
    return {"peak_rss_bytes": peak_rss_bytes(), "runtime_settings": runtime_settings, **result}


def phase_divergence(config: Config, settings: Settings, task: dict) -> dict:
    from edgemed.benchmarks.harness import divergence
    from edgemed.benchmarks.harness.scorer import open_scorer

    reference = Path(task["reference"])
    scorer = open_scorer(Path(config.path), threads=settings.scoring_threads, n_ctx=settings.eval_ctx,
                         profile=settings.profile, ctx_source=settings.context_of("divergence"))
    try:
        if task.get("is_reference"):  # the shipped medical passages (divergence.load_texts), under this task's key
            divergence.reference_logits(scorer, reference, key=task["key"])
        # against the reference the runner holds current: one left by an earlier reference artifact is refused
        result = divergence.divergence(scorer, reference, key=task.get("reference_key"))
        runtime_settings = scorer.settings()
    finally:
        scorer.close()
    return {"reference": task["reference_config"], "runtime_settings": runtime_settings, **result}


PHASE_FUNCTIONS = {"timing": phase_timing, "accuracy": phase_accuracy, "divergence": phase_divergence}


def run_task(task: dict, prompts: list[str]) -> dict:
    """Measure ``task`` (the runner's task file) with ``prompts``, the text its settings name by digest."""
    config = Config(**task["config"])
    settings = Settings.from_dict(task["settings"], prompts=prompts)
    started = time.time()
    result = PHASE_FUNCTIONS[task["phase"]](config, settings, task)
    return {"schema": RAW_SCHEMA, "config": config.to_dict(), "phase": task["phase"], "key": task["key"],
            "settings": settings.to_dict(), "started": started, "finished": time.time(), "pid": os.getpid(),
            "result": result}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from edgemed.phi import no_core_dumps

    no_core_dumps(quiet=True)  # it holds the prompts and what the model says to them: a crash leaves no core file
    task = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    prompts = json.loads(sys.stdin.buffer.read().decode("utf-8"))  # the runner's: the text is never in the task file
    try:
        raw = run_task(task, prompts)
    except EdgemedError as exc:  # an expected failure: its problem and its fix, whole, for the runner's report
        if task.get("error"):
            write_text(Path(task["error"]), json.dumps({"problem": exc.problem, "fix": exc.fix}))
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    write_text(Path(task["out"]), json.dumps(raw, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
