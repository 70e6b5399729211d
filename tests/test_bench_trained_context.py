"""``edgemed bench`` without ``--ctx`` measures a model trained on fewer tokens than the bench's default contexts at
its own (the default was refused, with a fix that went in a circle); a result's key changes only where a context does;
the refusals that are left name the phase, how its context was chosen, and a fix that works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgemed.benchmarks.harness.configs import EVAL_CTX, PHASES, TIMING_CTX, Settings


def test_the_default_contexts_are_cut_to_the_trained_one_and_keys_change_only_there():
    default = Settings()
    assert default.fitted(8192) == default and default.fitted(None) == default  # as before: the same keys
    assert default.fitted(EVAL_CTX) == default
    cut = default.fitted(3000)
    assert (cut.n_ctx, cut.eval_ctx) == (TIMING_CTX, 3000)
    assert cut.digest("timing") == default.digest("timing")  # the timing context is unchanged: its key too
    assert cut.digest("accuracy") != default.digest("accuracy") and cut.digest("divergence") != default.digest("divergence")
    assert cut.context_of("accuracy") == "the bench's default 4096, cut to the 3000 tokens the model was trained on"
    assert cut.context_of("timing") == "the bench's default 2048"
    given = Settings(n_ctx=8192, eval_ctx=8192, ctx_given=True)
    assert given.fitted(2048) == given and given.context_of("divergence") == "--ctx 8192"  # the user's stays
    assert all(Settings(ctx_given=True).digest(p) == default.digest(p) for p in PHASES)  # not itself in a key


@pytest.fixture(scope="module")
def short_models(tmp_path_factory):
    """F16 GGUFs of tiny checkpoints trained on 1024 and on 256 tokens: both fewer than the bench's 4096."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("matplotlib")
    import tiny
    from edgemed.converters.pipeline import ConvertOptions, convert

    root = tmp_path_factory.mktemp("trained")
    made = {}
    for trained in (1024, 256):
        src = tiny.build_model(root / f"src{trained}", max_position_embeddings=trained)
        made[trained] = root / f"t{trained}.gguf"
        convert(src, made[trained], ConvertOptions(out_type="f16", parity=False), echo=lambda s: None)
    return made


def _qa(path: Path) -> Path:
    path.write_text(json.dumps({"realidx": 0, "question": "Which vitamin deficiency causes scurvy?",
                                "options": {"A": "A", "B": "B12", "C": "D", "D": "C"}, "answer_idx": "D"}) + "\n")
    return path


def _bench(model: Path, out: Path, *extra: str):
    from edgemed.cli import cli

    return CliRunner().invoke(cli, ["bench", "run", str(model), "-o", str(out), "--runs", "1", "--warmup", "0",
                                    "--max-tokens", "4", "--threads", "1", *extra, "--json"])


def _raw(out: Path, name: str) -> dict:
    return json.loads((out / "raw" / f"{name}.json").read_text(encoding="utf-8"))


def test_a_model_trained_on_fewer_tokens_is_measured_at_its_own_context(short_models, tmp_path):
    """Trained on 1024 tokens, no --ctx: timing and accuracy were both refused (2048 and 4096 are more than 1024,
    "leave --ctx out" the fix); now each is measured at 1024, and the result says so."""
    out = tmp_path / "out"
    r = _bench(short_models[1024], out, "--name", "m", "--eval", str(_qa(tmp_path / "qa.jsonl")), "--eval-n", "1")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["failed"] == []
    timing, accuracy = _raw(out, "m-timing"), _raw(out, "m-accuracy")
    assert timing["settings"]["n_ctx"] == timing["result"]["runtime_settings"]["n_ctx"] == 1024
    assert accuracy["settings"]["eval_ctx"] == accuracy["result"]["runtime_settings"]["n_ctx"] == 1024
    assert accuracy["result"]["n"] == 1


def test_what_the_trained_context_cannot_hold_is_refused_in_the_benchs_words(short_models, tmp_path):
    """Trained on 256 tokens: the item and the divergence passages need more. Each refusal names its phase and how
    its context was chosen, and a fix that works (no --ctx can: divergence named no --max-tokens, accuracy a --ctx
    that was then refused); a --ctx beyond the trained context is refused before any work."""
    out = tmp_path / "out"
    r = _bench(short_models[256], out, "--name", "f16", "--eval", str(_qa(tmp_path / "qa.jsonl")), "--eval-n", "1")
    assert r.exit_code == 1, r.output
    failed = {f["task"]: f["error"] for f in json.loads(r.stdout)["failed"]}
    assert set(failed) == {"f16-accuracy", "f16-divergence"}, failed  # timing measured, at 256
    assert _raw(out, "f16-timing")["result"]["runtime_settings"]["n_ctx"] == 256
    cut = "(the bench's default 4096, cut to the 256 tokens the model was trained on)"
    accuracy, divergence = failed["f16-accuracy"], failed["f16-divergence"]
    assert f"than the 256-token context of the accuracy phase {cut}" in accuracy and "none was scored" in accuracy
    assert "Fix: the model was trained on 256 tokens" in accuracy and "--skip-accuracy" in accuracy
    assert f"than the 256-token context of the divergence phase {cut}" in divergence
    assert "Fix: the model was trained on 256 tokens" in divergence and "leave divergence out of --phases" in divergence
    assert "--ctx" not in accuracy + divergence and "--max-tokens" not in divergence

    r = _bench(short_models[256], tmp_path / "given", "--ctx", "512", "--phases", "timing")
    assert r.exit_code == 1 and "--ctx 512 is more than the 256 tokens" in r.output and "leave --ctx out" in r.output
    assert not (tmp_path / "given").exists()


def test_timings_fix_stays_within_the_trained_context(short_models, tmp_path):
    """Trained on 256 tokens, 300 new tokens: no context holds them, and the timing phase's fix named a --ctx past 256
    (which the bench refuses); it now names what does work, and no --ctx."""
    r = _bench(short_models[256], tmp_path / "out", "--name", "m", "--phases", "timing", "--max-tokens", "300")
    assert r.exit_code == 1, r.output
    timing = {f["task"]: f["error"] for f in json.loads(r.stdout)["failed"]}["m-timing"]
    assert "Fix: the model was trained on 256 tokens" in timing and "lower --max-tokens" in timing, timing
    assert "--ctx" not in timing.split("Fix:")[1], timing


def test_reproduce_refuses_a_ctx_beyond_the_trained_context_before_converting(tmp_path):
    """`bench reproduce --ctx` past the checkpoint's trained context was refused only after every conversion; it is
    now refused first, in the same words, and nothing is written."""
    pytest.importorskip("matplotlib")
    import tiny

    from edgemed.cli import cli

    src = tiny.build_model(tmp_path / "src", max_position_embeddings=256)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["bench", "reproduce", str(src), "--quants", "q8_0,f16", "--baselines", "",
                                 "--ctx", "512", "--phases", "timing", "-o", str(out)])
    assert r.exit_code == 1, r.output
    assert "--ctx 512 is more than the 256 tokens q8_0 was trained on" in r.output and "pass --ctx 256 or less" in r.output
    assert not out.exists()  # no artifact converted
