"""`edgemed convert` checks ``<out>.report.json`` as it checks the output, before any work: a file there is replaced
only with --force, a directory never."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgemed import env
from edgemed.cli import cli

import crash_kit

pytest.importorskip("torch")

import tiny  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny.build_model(tmp_path_factory.mktemp("report-dest") / "llama")


def _convert(model, out, *extra):
    return CliRunner().invoke(cli, ["convert", str(model), "--quant", "f16", "--no-parity", "-o", str(out), *extra])


@pytest.fixture
def steps(tmp_path, monkeypatch):
    """The file-system steps the command takes (``debris.step``; nothing is killed)."""
    log = tmp_path / "steps.log"
    monkeypatch.setenv(env.KILL_AT_VAR, str(10**9))
    monkeypatch.setenv(env.STEP_LOG_VAR, str(log))
    return lambda: log.read_text().splitlines() if log.exists() else []


def test_a_users_file_at_the_report_path_is_kept_without_force(model, tmp_path, steps):
    out = tmp_path / "m.gguf"
    report = tmp_path / "m.gguf.report.json"
    report.write_text("the user's notes\n")
    r = _convert(model, out)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "m.gguf.report.json" in r.output and "--force" in r.output
    assert report.read_text() == "the user's notes\n" and not out.exists() and steps() == []  # refused before any work
    r = _convert(model, out, "--force")
    assert r.exit_code == 0, r.output
    assert json.loads(report.read_text())["output"] == str(out) and out.read_bytes()[:4] == b"GGUF"
    assert crash_kit.debris(tmp_path) == []


@pytest.mark.parametrize("force", [False, True])
def test_a_directory_at_the_report_path_is_refused_before_any_work(model, tmp_path, steps, force):
    out = tmp_path / "m.gguf"
    report = tmp_path / "m.gguf.report.json"
    report.mkdir()
    (report / "keep.txt").write_text("mine")
    r = _convert(model, out, *(["--force"] if force else []))
    assert r.exit_code == 1 and "even with --force" in r.output and "Traceback" not in r.output, r.output
    assert steps() == [] and not out.exists() and (report / "keep.txt").read_text() == "mine"


def test_the_adapter_route_checks_the_report_path_too(model, tmp_path, steps):
    from adapter_kit import make_lora

    lora = make_lora(model, tmp_path / "lora")
    out = tmp_path / "a.lora.gguf"
    report = tmp_path / "a.lora.gguf.report.json"
    report.write_text("the user's notes\n")
    r = CliRunner().invoke(cli, ["convert", str(model), "--lora", str(lora), "--adapter-only", "--no-parity", "-o", str(out)])
    assert r.exit_code == 1 and "a.lora.gguf.report.json" in r.output and "--force" in r.output, r.output
    assert report.read_text() == "the user's notes\n" and not out.exists() and steps() == []
