"""``edgemed bench run`` and ``edgemed bench reproduce``: latency, memory, roofline and medical accuracy."""

from __future__ import annotations

from pathlib import Path

import click

from edgemed.cli import json_flag

SCENARIOS = ("single-stream",)


def _common(f):
    """Options shared by both commands (applied bottom-up)."""
    from edgemed.benchmarks.harness.datasets import SUITE  # a table, no heavy imports

    suite = ", ".join(f"{row.n} {row.name}" for row in SUITE)
    options = [
        json_flag("Print results.json to stdout."),
        click.option("--force", is_flag=True,
                     help="Replace report files (machine.json, results.json, results.csv, report.md, plots/*.png) in "
                          "an -o folder that edgemed's bench did not make; a bench's own folder is rewritten anyway."),
        click.option("--allow-pickle", is_flag=True,
                     help="Allow pickle (pytorch_model.bin) weights in an HF checkpoint. Only for checkpoints you trust."),
        click.option("--report-only", is_flag=True,
                     help="Write the report from the results already measured; measure nothing, list what is missing."),
        click.option("--phases", help="Comma-separated subset of timing,divergence,accuracy [default: all that apply]."),
        click.option("--skip-accuracy", is_flag=True, help="Leave out the accuracy phase (timing only is quick)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for item sampling and runtimes."),
        click.option("--eval-score", type=click.Choice(["logits", "both"]), default="logits", show_default=True,
                     help="Score each item by its answer-letter logits only, or also by a parsed generated answer "
                          "(~30 % more time; the paired test uses the logits)."),
        click.option("--keep-replies", "eval_replies", is_flag=True,
                     help="Keep each generated reply's text (--eval-score both) in OUT/raw/<config>-accuracy."
                          "records.jsonl, made readable by you only. Without it a run keeps none and takes those there "
                          "out: scores need the parsed answer, not the text, and a reply may repeat your questions."),
        click.option("--eval-context/--no-eval-context", default=False, show_default=True,
                     help="PubMedQA with its abstract, or question only (~8x fewer prompt tokens)."),
        click.option("--eval-threads", type=int,
                     help="Threads for the accuracy and divergence phases [default: --threads]; scores do not depend on it."),
        click.option("--eval-n", help="Items drawn (seeded, prefix-stable) from each data file: one count for all, or "
                                      "one per file, comma-separated [default: the suite's counts with --eval-data "
                                      f"({suite}), else 300]."),
        click.option("--eval", "evals", help="Comma-separated QA files: MCQ JSONL (MedQA/MedMCQA format) or PubMedQA JSON."),
        click.option("--eval-data", type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="A folder laid out like the shared evaluation data: measure the default medical suite "
                          "(MedMCQA, MMLU-medical, the PubMedQA test split) from it."),
        click.option("--ctx", "n_ctx", type=int,
                     help="Context window (tokens) of every phase; each prompt and its new tokens must fit it "
                          "[default: 2048 for timing, 4096 for accuracy and divergence, each cut to the context "
                          "the model was trained on where that is fewer]."),
        click.option("--profile", help="Device profile (default: detected; see `edgemed devices list`)."),
        click.option("--threads", type=int, help="CPU threads for every configuration [default: the device profile's]."),
        click.option("--max-tokens", type=int, default=64, show_default=True, help="New tokens per request (fixed: EOS is masked)."),
        click.option("--warmup", type=int, default=1, show_default=True, help="Warm-up requests, excluded from statistics."),
        click.option("--runs", type=int, default=5, show_default=True, help="Timed requests per configuration."),
        click.option("--prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Prompts file: .txt (one per line) or .jsonl (\"prompt\" field); runs cycle through them. "
                          "The report names them by sha256 and count, never by text."),
        click.option("--scenario", type=click.Choice(SCENARIOS), default="single-stream", show_default=True,
                     help="Load pattern: one request at a time."),
    ]
    for option in options:
        f = option(f)
    return f


def _counts(eval_n: str | None, files: list[Path], defaults: list[int]) -> list[int]:
    from edgemed.errors import InputError

    if not eval_n:
        return defaults
    try:
        counts = [int(c) for c in eval_n.split(",") if c.strip()]
    except ValueError:
        raise InputError(f"--eval-n {eval_n!r} is not a count or a comma-separated list of counts.",
                         "pass e.g. --eval-n 300, or --eval-n 600,500,500 (one per file)") from None
    if len(counts) == 1:
        return counts * len(files)
    if len(counts) != len(files):
        raise InputError(f"--eval-n gives {len(counts)} counts for {len(files)} data files.",
                         "pass one count for all files, or one per file in their order")
    return counts


def _settings(prompts, runs, warmup, max_tokens, threads, profile, n_ctx, evals, eval_data, eval_n, eval_context,
              eval_score, eval_threads, seed, scenario, eval_replies=False):
    """The run's settings, each refused with its fix before any work. The evaluation data is read and its draw
    checked here: the accuracy phase is asked for (``_check_accuracy_phase`` refused data with the phase left out,
    before this)."""
    from edgemed.benchmarks.harness.configs import DEFAULT_PROMPTS, Settings, read_prompts
    from edgemed.benchmarks.harness.datasets import load_items, suite_files
    from edgemed.errors import InputError
    from edgemed.runtime.plan import check_threads

    check_threads(threads, "--threads")  # 0 or less used to be taken as "the profile's" without a word
    check_threads(eval_threads, "--eval-threads")
    _check_ctx(n_ctx)
    if evals and eval_data:
        raise InputError("Both --eval and --eval-data were given.",
                         "pass --eval-data DIR for the default suite, or --eval FILES for your own files")
    if eval_n and not (evals or eval_data):
        raise InputError(f"--eval-n {eval_n} sizes the accuracy draw, and no evaluation data was given: it would "
                         "measure nothing.", "pass --eval FILES or --eval-data DIR with it, or leave --eval-n out")
    # the accuracy phase's own settings (their defaults are not refused: a script may spell them out)
    for flag, given in (("--eval-context", eval_context), ("--eval-score both", eval_score != "logits")):
        if given and not (evals or eval_data):
            raise InputError(f"{flag} sets how the accuracy phase asks or scores its items, and no evaluation data was "
                             "given: it would measure nothing.",
                             f"pass --eval FILES or --eval-data DIR with it, or leave {flag.split()[0]} out")
    if eval_data:
        suite = suite_files(eval_data)
        files, defaults = [p for p, _ in suite], [n for _, n in suite]
    else:
        files = [Path(p.strip()).resolve() for p in (evals or "").split(",") if p.strip()]
        defaults = [300] * len(files)
    counts = _counts(eval_n, files, defaults)
    twice = next((p for i, p in enumerate(files) if p in files[:i]), None)
    if twice is not None:
        raise InputError(f"--eval names '{twice}' twice.", "pass each data set file once")
    drawn: dict[str, Path] = {}  # item id -> its file: each item is asked once, in one file
    for p, n in zip(files, counts):  # read each file now, so a bad one fails before hours of timing, not after
        if not p.is_file():
            raise InputError(f"Evaluation file '{p}' does not exist.", "pass existing files to --eval, comma-separated")
        items = load_items(p, None, seed)
        if not 1 <= n <= len(items):
            raise InputError(f"--eval-n {n} for '{p}', which has {len(items)} items.",
                             f"pass --eval-n between 1 and {len(items)} for that file")
        for item in items[:n]:  # the draw the accuracy phase asks (datasets.draw is prefix-stable)
            if item.id in drawn:
                where = "twice in that file" if drawn[item.id] == p else f"in '{drawn[item.id]}' too"
                raise InputError(f"Item {item.id} of '{p}' is {where}: the paired scores need each item once.",
                                 "pass each data set once, and give each line its own id (realidx or id)")
            drawn[item.id] = p
    # else Settings' own, 2048 and 4096, each cut to the model's trained context where that is fewer (runner.fit_context)
    sized = {"n_ctx": n_ctx, "eval_ctx": n_ctx, "ctx_given": True} if n_ctx is not None else {}
    # a file's prompts are a clinic's: the settings record them by digest (prompts_source "file"), never by text
    return Settings(runs=runs, warmup=warmup, max_tokens=max_tokens,
                    prompts=read_prompts(prompts) if prompts else DEFAULT_PROMPTS,
                    prompts_source="file" if prompts else "built-in",
                    threads=threads, profile=profile, seed=seed, scenario=scenario, **sized,
                    evals=tuple(str(p) for p in files), eval_sizes=tuple(counts), eval_context=eval_context,
                    eval_score=eval_score, eval_threads=eval_threads, eval_replies=eval_replies)


def _asks_accuracy(phases: str | None, skip_accuracy: bool) -> bool:
    """Whether the accuracy phase may run: neither ``--skip-accuracy`` nor a ``--phases`` list without it."""
    from edgemed.benchmarks.harness.configs import PHASES, parse_list

    return not skip_accuracy and (not phases or "accuracy" in parse_list(phases, PHASES, "phase"))


def _check_ctx(n_ctx: int | None) -> None:
    from edgemed.devices.schema import MAX_CTX
    from edgemed.errors import InputError

    if n_ctx is not None and not 1 <= n_ctx <= MAX_CTX:
        raise InputError(f"--ctx {n_ctx}: a context is from 1 to {MAX_CTX} tokens.",
                         "pass e.g. --ctx 2048 (room for the prompt and --max-tokens), or leave --ctx out")


def _phases(phases: str | None, skip_accuracy: bool, settings, names: list[str]) -> list[str]:
    """The phases to measure: those named in ``--phases`` (each refused, with its fix, where it has nothing to
    measure), else every phase that applies. ``names``: the configurations' names (divergence needs the reference).
    Evaluation data or an accuracy setting with the accuracy phase left out was refused before
    (``_check_accuracy_phase``)."""
    from edgemed.benchmarks.harness.configs import PHASES, REFERENCE, parse_list
    from edgemed.errors import InputError

    if not phases:
        chosen = [p for p in PHASES if p != "accuracy" or (settings.evals and not skip_accuracy)]
    else:
        chosen = parse_list(phases, PHASES, "phase")
        if "accuracy" in chosen and not settings.evals:
            raise InputError("--phases names accuracy, and no evaluation data was given: it would measure nothing.",
                             "pass --eval FILES or --eval-data DIR, or leave accuracy out of --phases")
        if "divergence" in chosen and REFERENCE not in names:
            raise InputError(f"--phases names divergence, which compares each configuration with {REFERENCE}'s logits, "
                             f"and this run has no {REFERENCE} configuration: it would measure nothing.",
                             f"measure with `edgemed bench reproduce` and {REFERENCE} in --quants, or leave divergence "
                             "out of --phases")
    return chosen


def _check_accuracy_phase(phases: str | None, skip_accuracy: bool, evals: str | None, eval_data: Path | None,
                          eval_n: str | None, eval_context: bool, eval_score: str) -> None:
    """Refuse ``--phases`` naming accuracy with ``--skip-accuracy``, and the evaluation data (``--eval`` or
    ``--eval-data``, the one given) or an accuracy setting (``eval_n``: ``--eval-n`` as given) with the accuracy phase
    left out (``--skip-accuracy``, or a ``--phases`` list without it): no other phase reads them. The bench's first
    check, before any data file is read or the model is resolved: a missing or unreadable file was refused in its
    place, and mending it only led to this refusal. Without data, ``_settings`` refuses the settings."""
    from edgemed.benchmarks.harness.configs import PHASES, parse_list
    from edgemed.errors import InputError

    if phases and skip_accuracy and "accuracy" in parse_list(phases, PHASES, "phase"):
        raise InputError("--phases names accuracy and --skip-accuracy leaves it out.", "pass one of the two")
    if _asks_accuracy(phases, skip_accuracy) or not (evals or eval_data):
        return
    # the accuracy phase's own settings (their defaults are not refused: a script may spell them out)
    given = [(f"--eval-n {eval_n}", bool(eval_n)), ("--eval-context", eval_context),
             ("--eval-score both", eval_score != "logits")]
    flag = next((f for f, on in given if on), None)
    why, measure = (("--skip-accuracy leaves", "drop --skip-accuracy") if skip_accuracy else
                    ("--phases leaves", "add accuracy to --phases"))
    if flag is not None:
        raise InputError(f"{flag} sets how the accuracy phase draws, asks or scores its items, and {why} that phase "
                         "out: it would measure nothing.", f"leave {flag.split()[0]} out, or {measure}")
    # the data alone: no phase of this run reads it (only the accuracy phase's results are keyed by it)
    data_flag = "--eval-data" if eval_data else "--eval"
    raise InputError(f"{data_flag} gives the accuracy phase its items, and {why} that phase out: it would measure "
                     "nothing.", f"leave {data_flag} out, or {measure}")


def _finish(results: dict, out: Path, as_json: bool, measured: bool = True) -> None:
    """Print the results; exit 1 (the report written) when a measurement failed, so a script or CI sees it.
    ``--report-only`` (``measured`` False) lists what is missing and exits 0."""
    _print(results, out, as_json)
    failed = results["failed"]
    if measured and failed:
        click.echo(f"{len(failed)} measurement(s) failed; the report lists them. Fix: see each one's error above, "
                   "then run the command again (what was measured is kept).", err=True)
        raise click.exceptions.Exit(1)


def _print(results: dict, out: Path, as_json: bool) -> None:
    import json

    if as_json:
        click.echo(json.dumps(results, indent=1))
        return
    click.echo(f"{'config':<12} {'peak RSS MiB':>12} {'e2e p50 s':>10} {'decode tok/s':>12} {'roofline':>9} {'acc':>6}")
    for e in results["configs"]:
        if "e2e_s" not in e:
            click.echo(f"{e['name']:<12} (no timing result)")
            continue
        frac = (e.get("roofline") or {}).get("fraction")
        acc = (e.get("accuracy") or {}).get("acc_logit")
        click.echo(f"{e['name']:<12} {e['peak_rss_bytes'] / 2**20:12.0f} {e['e2e_s']['p50']:10.3f} "
                   f"{e['decode_tok_s']['p50']:12.2f} {'—' if frac is None else f'{frac * 100:.0f} %':>9} "
                   f"{'—' if acc is None else f'{acc * 100:.1f}':>6}")
    for f in results["failed"]:
        click.echo(f"failed: {f['task']}: {f['error']}", err=True)
    click.echo(f"report: {out / 'report.md'}  (results.json, results.csv, plots/, machine.json)")


@click.group()
def bench() -> None:
    """Measure models on this machine: latency, memory, roofline, medical accuracy.

    Every configuration x phase runs in its own process and writes one file
    under OUT/raw/; a killed run resumes where it stopped (results are keyed by
    model digest + device profile and its contents + edgemed and runtime versions
    + llama.cpp build + harness methods + settings).
    """
    from edgemed.phi import no_core_dumps

    no_core_dumps()  # a clinic's prompts and the replies to them never go to a core file (the measuring child sets the same itself)


def _require_bench_extra() -> None:
    """The bench's own packages (the ``bench`` extra), asked for before anything is measured: the report's plots
    need matplotlib only once every measurement has ended, and a device install (``edgemed[gguf]``) lacks it."""
    from edgemed.errors import require

    for module in ("matplotlib", "psutil", "tqdm"):
        require(module, "bench")


@bench.command("run")
@click.argument("model")
@_common
@click.option("--name", help="Configuration name in the report [default: the file name].")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), help="Report folder [default: bench-<name>].")
def run(model, name, output, scenario, prompts, runs, warmup, max_tokens, threads, profile, n_ctx, evals, eval_data, eval_n,
        eval_context, eval_score, eval_replies, eval_threads, seed, skip_accuracy, phases, report_only, allow_pickle,
        force, as_json):
    """Benchmark one MODEL (a .gguf file, an ONNX directory, an HF checkpoint directory or an installed name)."""
    import sys

    from edgemed.benchmarks.harness import runner
    from edgemed.benchmarks.harness.configs import config_for_artifact

    from edgemed.packaging.ref import STORE, resolve, runnable

    # the accuracy phase's flags first: a run that leaves the phase out reads no data file, and resolves no model, to
    # refuse it
    _check_accuracy_phase(phases, skip_accuracy, evals, eval_data, eval_n, eval_context, eval_score)
    ref = resolve(model)  # a path is measured as given; an installed name is verified first
    verified = runnable(model) if ref.kind == STORE else None
    path = verified.model_path if verified is not None else ref.path
    config = config_for_artifact(path.resolve(), name, allow_pickle)
    settings = _settings(prompts, runs, warmup, max_tokens, threads, profile, n_ctx, evals, eval_data, eval_n, eval_context,
                         eval_score, eval_threads, seed, scenario, eval_replies)
    out = output or Path(f"bench-{config.name}")
    _require_bench_extra()  # after the arguments and the model are checked, before anything is measured or written
    chosen = _phases(phases, skip_accuracy, settings, [config.name])
    results = runner.run(out, [config], settings, chosen,
                         progress=sys.stderr.isatty(), echo=lambda s: click.echo(s, err=True), measure=not report_only,
                         force=force, check=_still_verified(verified) if verified is not None else None)
    _finish(results, out, as_json, measured=not report_only)


def _still_verified(ref):
    """``runner.run``'s check for an installed model: its files as they were verified (``loaded_as_verified``), said
    the bench's way when not."""
    from edgemed.errors import IntegrityError
    from edgemed.packaging.ref import loaded_as_verified

    def check() -> None:
        try:
            loaded_as_verified(ref)
        except IntegrityError as exc:
            raise IntegrityError(f"{exc.problem} The bench keeps nothing of that measurement and writes no report.",
                                 exc.fix) from None
    return check


@bench.command("reproduce")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_common
@click.option("--quants", default="f16,q8_0,q4_k_m,q4_0", show_default=True,
              help="GGUF types to convert and measure; <type>-imatrix (e.g. q4_k_m-imatrix) is that type quantized "
              "with an importance matrix from --imatrix-from, paired against the plain type in the report.")
@click.option("--imatrix-from", help="Calibration text of the -imatrix types: 'medical' (the shipped PubMedQA abstracts, "
              "not its test split) or a JSONL / .txt file.")
@click.option("--onnx", "onnx", default="", help="ONNX types to convert and measure (e.g. int4) [default: none].")
@click.option("--baselines", default="hf-fp32,hf-bf16", show_default=True,
              help="HF-torch baselines: hf-fp32, hf-bf16, hf-fp16 (GPU only); '' for none.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True, help="Report folder.")
def reproduce(source, quants, imatrix_from, onnx, baselines, output, scenario, prompts, runs, warmup, max_tokens, threads, profile,
              n_ctx, evals, eval_data, eval_n, eval_context, eval_score, eval_replies, eval_threads, seed,
              skip_accuracy, phases, report_only, allow_pickle, force, as_json):
    """Check the paper's claim on SOURCE (an HF checkpoint): F16 vs quantized GGUF (+ ONNX) vs HF-torch.

    Artifacts go to OUT/artifacts/ (<quant>.gguf, onnx-<type>/); existing ones made
    from the same SOURCE are reused. Writes OUT/results.json (canonical), results.csv,
    report.md, plots/*.png and machine.json.
    """
    import sys

    from edgemed.benchmarks.harness import artifacts, runner
    from edgemed.benchmarks.harness.configs import HF_BASELINES, parse_list
    from edgemed.constants import ONNX_OUTPUT_TYPES

    # the accuracy phase's flags first: a run that leaves the phase out reads no data file to refuse it
    _check_accuracy_phase(phases, skip_accuracy, evals, eval_data, eval_n, eval_context, eval_score)
    runner.claim(output, force, [source])  # before the conversions: a folder whose files are not the bench's, or
    # one inside the checkpoint, is refused now
    settings = _settings(prompts, runs, warmup, max_tokens, threads, profile, n_ctx, evals, eval_data, eval_n, eval_context,
                         eval_score, eval_threads, seed, scenario, eval_replies)
    quant_names = artifacts.parse_quants(quants)
    chosen = _phases(phases, skip_accuracy, settings, quant_names)  # before the conversions
    echo = lambda s: click.echo(s, err=True)  # noqa: E731
    base = {b: HF_BASELINES[b] for b in parse_list(baselines, HF_BASELINES, "baseline")}
    if imatrix_from is not None:
        from edgemed.converters.gguf.calibration import resolve

        imatrix_from = resolve(imatrix_from).resolve()
    _require_bench_extra()  # after the arguments, before the conversions: the plots come after every measurement
    onnx_types = parse_list(onnx, ONNX_OUTPUT_TYPES, "ONNX type")
    if settings.ctx_given and (made := artifacts.trained_context(source, quant_names, onnx_types, allow_pickle)):
        runner.check_ctx(settings, *made)  # a --ctx the artifacts cannot hold, refused before minutes of converting
    configs = artifacts.prepare(source.resolve(), output, quant_names, onnx_types, base, echo=echo,
                                imatrix_from=imatrix_from, allow_pickle=allow_pickle)
    results = runner.run(output, configs, settings, chosen, progress=sys.stderr.isatty(), echo=echo,
                         measure=not report_only, force=force)
    _finish(results, output, as_json, measured=not report_only)
