"""`edgemed quickstart -o FILE` replaces an existing FILE (and its .report.json) only with --force, and refuses
before any work; its default location under $EDGEMED_HOME is its own, replaced on every run."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgemed.cli import cli

pytest.importorskip("llama_cpp")
pytest.importorskip("torch", reason="quickstart converts, so it needs the convert extra before it reads -o")


def _quickstart(*args):
    return CliRunner().invoke(cli, ["quickstart", "--quant", "f16", *[str(a) for a in args]])


@pytest.mark.parametrize("mine", ["mine.gguf", "mine.gguf.report.json"])
def test_an_existing_o_file_is_refused_before_any_work(tmp_path, mine):
    (tmp_path / mine).write_text("the user's\n")
    r = _quickstart("-o", tmp_path / "mine.gguf")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "already exists" in r.output and "--force" in r.output and "1/4" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "edgemed-home") == [mine]
    assert (tmp_path / mine).read_text() == "the user's\n"


def test_a_directory_at_o_is_refused_even_with_force(tmp_path):
    (tmp_path / "mine.gguf").mkdir()
    r = _quickstart("-o", tmp_path / "mine.gguf", "--force")
    assert r.exit_code == 1 and "even with --force" in r.output and "1/4" not in r.output, r.output


@pytest.mark.slow
def test_force_replaces_the_o_file_and_the_default_location_is_replaced_without_it(tmp_path, edgemed_home):
    mine = tmp_path / "mine.gguf"
    mine.write_text("the user's\n")
    r = _quickstart("-o", mine, "--force", "--question", "Name one symptom of anaemia.")
    assert r.exit_code == 0, r.output
    assert mine.read_bytes()[:4] == b"GGUF" and json.loads((tmp_path / "mine.gguf.report.json").read_text())["output"] == str(mine)
    default = edgemed_home / "quickstart" / "smollm2-135m-instruct-f16.gguf"
    default.parent.mkdir(parents=True)
    default.write_text("an earlier quickstart's\n")
    r = _quickstart("--question", "Name one symptom of anaemia.")
    assert r.exit_code == 0, r.output
    assert default.read_bytes()[:4] == b"GGUF"


def test_o_in_a_missing_folder_or_at_the_models_own_file_is_refused_before_any_work(tmp_path):
    """quickstart made -o's folders (mkdir -p) where every other command refuses, and took -o at the pip package's
    own GGUF, the file it converts from (with --force it began writing over its input)."""
    from edgemed.converters.source import pip_models

    r = _quickstart("-o", tmp_path / "no" / "such" / "mine.gguf")
    assert r.exit_code == 1 and "does not exist" in r.output and "1/4" not in r.output, r.output
    assert not (tmp_path / "no").exists()
    source = pip_models.gguf_file(pip_models.DEFAULT)
    before = source.stat()
    r = _quickstart("-o", source, "--force")
    assert r.exit_code == 1 and "this command reads" in r.output and "1/4" not in r.output, r.output
    assert source.stat().st_mtime_ns == before.st_mtime_ns


def test_a_home_that_is_a_file_is_named_before_any_work(tmp_path, monkeypatch):
    """The default output's folder under $EDGEMED_HOME was made with mkdir: a NotADirectoryError traceback."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    monkeypatch.setenv("EDGEMED_HOME", str(afile))
    r = _quickstart()
    assert r.exit_code == 1 and not isinstance(r.exception, OSError) and "1/4" not in r.output, r.output
    assert f"'{afile}' is a file, not a folder" in r.output and "EDGEMED_HOME" in r.output, r.output


@pytest.mark.parametrize("quant", ["q4km", "auto", "int4"])
def test_a_bad_quant_is_refused_before_any_work(monkeypatch, quant):
    """--quant was first checked by the conversion, after the checkpoint was dequantized (16 s here, minutes on a
    device); auto needs --max-kld or --fit-profile, which quickstart does not take."""
    from edgemed.converters.source import pip_models

    def no_work(*a, **k):
        raise AssertionError("quickstart began its work")

    monkeypatch.setattr(pip_models, "hf_checkpoint", no_work)
    r = CliRunner().invoke(cli, ["quickstart", "--quant", quant])
    assert r.exit_code == 2 and "1/4" not in r.output, r.output
    assert f"Invalid value for '--quant': '{quant}' is not one of" in r.output and "'q4_k_m'" in r.output, r.output


def test_o_with_a_trailing_separator_is_refused_before_any_work(tmp_path):
    r = _quickstart("-o", f"{tmp_path / 'newdir'}/")
    assert r.exit_code == 1 and "names a folder" in r.output and "1/4" not in r.output, r.output
    assert f"-o {tmp_path / 'newdir' / 'NAME.gguf'}" in r.output and not (tmp_path / "newdir").exists()
