"""`edgemed export --ollama DIR` replaces the user's Modelfile or GGUF only with --force, and checks both before
writing either: a refusal leaves DIR as it was."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import bundle_kit as kit
import crash_kit
from edgemed.cli import cli


@pytest.fixture
def installed(tmp_path):
    return kit.installed_tiny(tmp_path)


def _export(out, *extra):
    return CliRunner().invoke(cli, ["export", "tiny", "--ollama", str(out), *extra])


@pytest.mark.parametrize("mine", ["Modelfile", "tiny.gguf"])
def test_a_users_file_in_the_folder_is_kept_and_nothing_is_written(tmp_path, installed, mine):
    out = tmp_path / "ollama"
    out.mkdir()
    (out / mine).write_text("the user's\n")
    r = _export(out)
    assert r.exit_code == 1 and "--force" in r.output and "Traceback" not in r.output, r.output
    assert sorted(p.name for p in out.iterdir()) == [mine] and (out / mine).read_text() == "the user's\n"


def test_force_replaces_both(tmp_path, installed):
    out = tmp_path / "ollama"
    out.mkdir()
    (out / "Modelfile").write_text("the user's\n")
    (out / "tiny.gguf").write_text("an old copy\n")
    r = _export(out, "--force")
    assert r.exit_code == 0, r.output
    assert (out / "Modelfile").read_text().startswith("# Ollama Modelfile for 'tiny'")
    assert (out / "tiny.gguf").read_bytes() == installed["model"].read_bytes()
    assert crash_kit.debris(out) == []
