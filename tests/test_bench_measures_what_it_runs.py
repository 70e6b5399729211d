"""``edgemed bench`` measures what the device runs and refuses what it cannot measure: the scoring phases load the
model with the device profile's settings and record them; ``--ctx`` is every phase's context and is enforced; a flag
that would measure nothing, a bad ``--ctx`` or a repeated data set is refused before any work; a failed measurement
is reported with its whole error, problem and fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("matplotlib")

from edgemed.cli import cli  # noqa: E402
from edgemed.errors import ContextOverflow  # noqa: E402

MCQ = {"realidx": 0, "question": "Which vitamin deficiency causes scurvy?",
       "options": {"A": "A", "B": "B12", "C": "D", "D": "C"}, "answer_idx": "D"}


def _qa(path: Path, question: str = MCQ["question"]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**MCQ, "question": question}) + "\n", encoding="utf-8")
    return path


def _bench(*args: str):
    return CliRunner().invoke(cli, ["bench", *args])


def test_flags_that_cannot_measure_are_refused_before_any_work(tmp_path, smollm2_gguf):
    qa = _qa(tmp_path / "a" / "mcq.jsonl")
    twin = _qa(tmp_path / "b" / "mcq.jsonl")  # another file of the same data set: the same item ids
    out = tmp_path / "out"
    quick = [str(smollm2_gguf), "-o", str(out), "--report-only", "--threads", "1"]
    cases = [
        (["--ctx", "0"], "--ctx 0", "leave --ctx out"),
        (["--eval", f"{qa},{qa}", "--eval-n", "1"], "names '" + str(qa.resolve()) + "' twice", "each data set file once"),
        (["--eval", f"{qa},{twin}", "--eval-n", "1"], "Item mcq:0", "each data set once"),
        (["--phases", "accuracy"], "no evaluation data", "--eval FILES or --eval-data DIR"),
        (["--phases", "timing", "--eval-n", "5"], "--eval-n 5", "leave --eval-n out"),
        (["--phases", "divergence"], "no f16 configuration", "leave divergence out of --phases"),
    ]
    for extra, problem, fix in cases:
        r = _bench("run", *quick, *extra)
        assert r.exit_code == 1 and problem in r.output and "Fix: " in r.output and fix in r.output, (extra, r.output)
        assert "Traceback" not in r.output and not out.exists(), extra
    (tmp_path / "ckpt").mkdir()  # reproduce refuses before it converts anything
    r = _bench("reproduce", str(tmp_path / "ckpt"), "--quants", "q8_0", "--baselines", "", "--phases", "divergence",
               "-o", str(out), "--report-only")
    assert r.exit_code == 1 and "no f16 configuration" in r.output and "f16 in --quants" in r.output, r.output
    assert not out.exists()


def test_accuracy_settings_without_evaluation_data_are_refused(tmp_path, smollm2_gguf):
    """--eval-context and --eval-score both change only the accuracy phase: without --eval or --eval-data they were
    taken and measured nothing. Their defaults, spelled out, are still taken."""
    out = tmp_path / "out"
    quick = [str(smollm2_gguf), "-o", str(out), "--report-only", "--threads", "1"]
    for extra, flag in ((["--eval-context"], "--eval-context"), (["--eval-score", "both"], "--eval-score both")):
        r = _bench("run", *quick, *extra)
        assert r.exit_code == 1 and f"{flag} sets how the accuracy phase" in r.output, (extra, r.output)
        assert "Fix: pass --eval FILES or --eval-data DIR with it" in r.output and "Traceback" not in r.output
        assert not out.exists(), extra
    r = _bench("run", *quick, "--no-eval-context", "--eval-score", "logits", "--phases", "timing")
    assert r.exit_code == 0, r.output



def test_accuracy_settings_with_the_accuracy_phase_left_out_are_refused(tmp_path, smollm2_gguf):
    """--eval-n, --eval-context and --eval-score both with --skip-accuracy, or with a --phases list without accuracy,
    were taken and measured nothing. The defaults of those settings, spelled out, are still taken (the data alone,
    with the phase left out, is refused: see the next test)."""
    qa = tmp_path / "mcq.jsonl"  # the 300 items --eval-n's default draws
    qa.write_text("".join(json.dumps({**MCQ, "realidx": i}) + "\n" for i in range(300)), encoding="utf-8")
    out = tmp_path / "out"
    quick = [str(smollm2_gguf), "-o", str(out), "--report-only", "--threads", "1", "--eval", str(qa)]
    cases = [
        (["--skip-accuracy", "--eval-n", "1"], "--eval-n 1", "--skip-accuracy leaves", "drop --skip-accuracy"),
        (["--skip-accuracy", "--eval-context"], "--eval-context", "--skip-accuracy leaves", "drop --skip-accuracy"),
        (["--phases", "timing", "--eval-score", "both"], "--eval-score both", "--phases leaves",
         "add accuracy to --phases"),
        (["--phases", "timing", "--eval-n", "1"], "--eval-n 1", "--phases leaves", "add accuracy to --phases"),
    ]
    for extra, flag, why, measure in cases:
        r = _bench("run", *quick, *extra)
        assert r.exit_code == 1 and f"{flag} sets how the accuracy phase" in r.output, (extra, r.output)
        assert why in r.output and f"Fix: leave {flag.split()[0]} out, or {measure}" in r.output, (extra, r.output)
        assert "Traceback" not in r.output and not out.exists(), extra
    quick.remove("--eval")
    quick.remove(str(qa))
    r = _bench("run", *quick, "--skip-accuracy", "--no-eval-context", "--eval-score", "logits")
    assert r.exit_code == 0, r.output


def test_evaluation_data_with_the_accuracy_phase_left_out_is_refused(tmp_path, smollm2_gguf):
    """--eval FILES or --eval-data DIR with --skip-accuracy, or with a --phases list without accuracy, were taken and
    silently unused: no phase but accuracy reads them. Each is refused before any work, naming the flag given and
    both ways out. A small --eval file is refused the same way (its draw is checked only where the accuracy phase may
    run: it used to be refused with "pass --eval-n between 1 and N", which --eval-n with the phase left out is not)."""
    from conftest import EVAL_DATA

    qa = tmp_path / "mcq.jsonl"
    qa.write_text("".join(json.dumps({**MCQ, "realidx": i}) + "\n" for i in range(5)), encoding="utf-8")
    out = tmp_path / "out"
    quick = [str(smollm2_gguf), "-o", str(out), "--report-only", "--threads", "1"]
    for data in (["--eval", str(qa)], ["--eval-data", str(EVAL_DATA / "sample")]):
        flag = data[0]
        for extra, why, measure in ((["--skip-accuracy"], "--skip-accuracy leaves", "drop --skip-accuracy"),
                                    (["--phases", "timing"], "--phases leaves", "add accuracy to --phases")):
            r = _bench("run", *quick, *data, *extra)
            assert r.exit_code == 1 and f"{flag} gives the accuracy phase its items, and {why} that phase out" \
                in r.output, (data, extra, r.output)
            assert f"Fix: leave {flag} out, or {measure}" in r.output and "Traceback" not in r.output, r.output
            assert not out.exists(), (data, extra)
    (tmp_path / "ckpt").mkdir()  # reproduce refuses it before it converts anything
    r = _bench("reproduce", str(tmp_path / "ckpt"), "--quants", "q8_0", "--baselines", "", "--phases", "timing",
               "--eval", str(qa), "-o", str(out), "--report-only")
    assert r.exit_code == 1 and "Fix: leave --eval out, or add accuracy to --phases" in r.output, r.output
    r = _bench("run", *quick, "--eval", str(qa))  # the phase runs: 300 items asked of a file of 5
    assert r.exit_code == 1 and "--eval-n 300 for" in r.output and "between 1 and 5" in r.output, r.output
    r = _bench("run", *quick, "--phases", "timing")  # no data: the timing alone is measured
    assert r.exit_code == 0, r.output


def test_the_accuracy_phase_left_out_is_refused_before_any_data_is_read_or_model_resolved(tmp_path):
    """The refusal of evaluation data (or an accuracy setting) with the accuracy phase left out came after the model
    was resolved and each data file read: a missing or unreadable file, or a missing model, was refused in its place,
    and mending it only led to this refusal. It comes first now: the model and the files named here are never
    there, or never data."""
    missing, garbled, empty = tmp_path / "nowhere.jsonl", tmp_path / "garbled.jsonl", tmp_path / "empty"
    garbled.write_text("this is not JSON\n", encoding="utf-8")
    empty.mkdir()  # a folder laid out like no suite
    out = tmp_path / "out"
    run = ["run", str(tmp_path / "absent.gguf"), "-o", str(out), "--report-only"]
    (tmp_path / "ckpt").mkdir()
    reproduce = ["reproduce", str(tmp_path / "ckpt"), "--quants", "q8_0", "--baselines", "", "-o", str(out),
                 "--report-only"]
    for command, data, extra, says in [
        (run, ["--eval", str(missing)], ["--skip-accuracy"], "--eval gives the accuracy phase its items, and "
                                                             "--skip-accuracy leaves that phase out"),
        (run, ["--eval", str(garbled)], ["--phases", "timing"], "--eval gives the accuracy phase its items, and "
                                                                "--phases leaves that phase out"),
        (run, ["--eval-data", str(empty)], ["--skip-accuracy"], "--eval-data gives the accuracy phase its items"),
        (run, ["--eval", str(missing), "--eval-n", "5"], ["--skip-accuracy"], "--eval-n 5 sets how the accuracy phase"),
        (run, ["--eval", str(garbled)], ["--skip-accuracy", "--phases", "timing,accuracy"],
         "--phases names accuracy and --skip-accuracy leaves it out"),
        (reproduce, ["--eval", str(missing)], ["--phases", "timing"], "Fix: leave --eval out, or add accuracy to "
                                                                      "--phases"),
    ]:
        r = _bench(*command, *data, *extra)
        assert r.exit_code == 1 and says in " ".join(r.output.split()), (data, extra, r.output)
        assert "does not exist" not in r.output and "Traceback" not in r.output, r.output
        assert not out.exists(), (data, extra)


def test_ctx_is_the_context_of_every_phase(tmp_path):
    from edgemed.cli.bench import _settings

    args = dict(prompts=None, runs=1, warmup=0, max_tokens=8, threads=1, profile=None, n_ctx=None, evals=None,
                eval_data=None, eval_n=None, eval_context=False, eval_score="logits", eval_threads=None, seed=0,
                scenario="single-stream")
    default = _settings(**args)
    assert (default.n_ctx, default.eval_ctx) == (2048, 4096)  # unchanged keys for a run without --ctx
    asked = _settings(**(args | {"n_ctx": 8192}))
    assert (asked.n_ctx, asked.eval_ctx) == (8192, 8192)


class _Timed:
    """A runtime whose one prompt is 78 tokens in a 64-token context; generating would time positions past it."""

    n_ctx = 64
    n_ctx_train = None

    def prompt_ids(self, text: str) -> list[int]:
        return list(range(78))

    def generate(self, ids, n):
        raise AssertionError("timed a request past the context the report states")



def test_the_scoring_phases_fix_names_no_ctx_beyond_the_trained_context(monkeypatch):
    """Accuracy and divergence, as timing: items or passages that need 100 positions of a 64-token context named
    "--ctx 100 or more", with no bound, for a model trained on 256 tokens (a --ctx past it is refused before any work);
    past the trained context no --ctx holds them, and the fix says so with the figure."""
    from types import SimpleNamespace

    from edgemed.benchmarks.harness import accuracy, divergence
    from edgemed.benchmarks.harness.scorer import Scorer

    class _Scorer(Scorer):  # a passage of n characters is n tokens
        n_ctx = 64

        def tokenize(self, text: str, special: bool = True) -> list[int]:
            return list(range(len(text)))

    def refusals(n_ctx_train, need):
        scorer = _Scorer(Path("model.gguf"))
        scorer.n_ctx_train = n_ctx_train
        monkeypatch.setattr(accuracy, "positions_needed", lambda *a: need)
        with pytest.raises(ContextOverflow) as acc:
            accuracy.check_items_fit(scorer, None, [SimpleNamespace(id="mcq:0", context=None)], "", 8, False)
        with pytest.raises(ContextOverflow) as div:
            divergence._passages(scorer, ["x" * (need - 1)])  # its tokens and the next position
        return acc.value.fix, div.value.fix

    bounded = "pass --ctx 100 (up to 256, the context the model was trained on)"
    for fix in refusals(256, 100):
        assert bounded in fix and "or more" not in fix, fix
    for fix in refusals(None, 100):  # the trained context unknown
        assert "pass --ctx 100 or more" in fix, fix
    for fix in refusals(256, 300):
        assert "--ctx" not in fix and "trained on 256 tokens, fewer than the 300 positions" in fix, fix

def test_timing_refuses_a_prompt_and_its_tokens_beyond_the_context():
    from edgemed.benchmarks.harness import timing

    with pytest.raises(ContextOverflow) as err:
        timing.measure(_Timed(), ("a prompt",), runs=1, warmup=0, max_tokens=60, progress=False)
    assert "78 tokens" in err.value.problem and "138" in err.value.problem and "64" in err.value.problem
    assert "--ctx 138" in err.value.fix


def test_timings_fix_names_no_ctx_beyond_the_trained_context():
    """Trained on 256 tokens: 78 prompt tokens and 60 new ones fit a --ctx 138 (named, with its bound); 78 and 200
    fit no context the model can take, and the fix named --ctx 278, which the bench then refused."""
    from edgemed.benchmarks.harness import timing

    timed = _Timed()
    timed.n_ctx_train = 256
    with pytest.raises(ContextOverflow) as err:
        timing.measure(timed, ("a prompt",), runs=1, warmup=0, max_tokens=60, progress=False)
    assert "pass --ctx 138 (up to 256, the context the model was trained on)" in err.value.fix
    with pytest.raises(ContextOverflow) as err:
        timing.measure(timed, ("a prompt",), runs=1, warmup=0, max_tokens=200, progress=False)
    assert "--ctx" not in err.value.fix and "trained on 256 tokens, fewer than the 278" in err.value.fix
    assert "lower --max-tokens" in err.value.fix


def test_scoring_loads_as_the_device_profile_and_records_it(tmp_path, smollm2_gguf):
    """jetson-orin-nano-8gb: flash attention, q8_0 KV, every layer offloaded, as `edgemed run` and the timing phase
    load it; the accuracy result records the load llama.cpp made."""
    from edgemed.benchmarks.harness.child import phase_accuracy
    from edgemed.benchmarks.harness.configs import Config, Settings
    from edgemed.runtime.session import prepare

    profile = "jetson-orin-nano-8gb"
    settings = Settings(profile=profile, threads=1, eval_ctx=512, evals=(str(_qa(tmp_path / "mcq.jsonl")),), eval_n=1)
    task = {"records": str(tmp_path / "records.jsonl"), "progress": False, "key": {"model_sha256": "0" * 64}}
    result = phase_accuracy(Config("m", "gguf", str(smollm2_gguf)), settings, task)
    want = prepare(smollm2_gguf, profile, 512, 1).load
    assert want.flash_attn and want.type_k == "q8_0" and want.n_gpu_layers == -1  # the profile differs from defaults
    made = result["runtime_settings"]
    assert (made["flash_attn"], made["type_k"], made["type_v"], made["n_gpu_layers"], made["n_ctx"]) == \
        (True, "q8_0", "q8_0", -1, 512)
    assert result["n"] == 1


def test_a_failed_measurement_reports_its_whole_error(tmp_path, smollm2_gguf):
    """--ctx 64 with 60 new tokens: timing refuses the 78-token prompt; an item longer than the accuracy context is
    refused with every item named, before any is scored. Each failure carries its problem and its fix."""
    long_qa = _qa(tmp_path / "long.jsonl", "A patient presents with fever. " * 60)
    out = tmp_path / "out"
    r = _bench("run", str(smollm2_gguf), "--name", "m", "-o", str(out), "--ctx", "64", "--max-tokens", "60",
               "--runs", "1", "--warmup", "0", "--threads", "1", "--phases", "timing,accuracy",
               "--eval", str(long_qa), "--eval-n", "1", "--json")
    assert r.exit_code == 1, r.output
    failed = {f["task"]: f["error"] for f in json.loads(r.stdout)["failed"]}
    timing, accuracy = failed["m-timing"], failed["m-accuracy"]
    assert "Timing prompt 1 of 1: The prompt is" in timing and "more than the context window of 64" in timing
    assert "Fix: pass --ctx" in timing
    assert "1 of the 1 evaluation items to score need more positions than the 64-token context" in accuracy
    assert "long:0 needs" in accuracy and "none was scored" in accuracy and "Fix: pass --ctx" in accuracy
    assert not (out / "raw" / "m-accuracy.records.jsonl").exists()  # nothing half-written
    assert not list((out / "raw" / "tasks").glob("*"))
