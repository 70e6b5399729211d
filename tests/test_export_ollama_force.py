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


def test_no_output_lands_in_the_store_or_in_the_bundle_it_reads(tmp_path, installed):
    """`export NAME --gguf STORE/.../LICENSE --force` wrote the GGUF over the installed bundle's LICENSE (the model
    was then damaged); so did `pack -o` and `keygen` into the store, and `export DIR --gguf DIR/LICENSE` into the
    bundle folder it read. Each is refused, --force or not, and the store still verifies."""
    from edgemed import env

    bundle = next((env.store_dir() / "models").glob("tiny*"))
    license_ = next(p for p in bundle.rglob("LICENSE*") if p.is_file())
    before = license_.read_bytes()
    runner = CliRunner()
    for args in (["export", "tiny", "--gguf", str(license_), "--force"],
                 ["export", "tiny", "--ollama", str(bundle)],
                 ["keygen", str(bundle / "manifest.json"), "--force"],
                 ["pack", str(installed["model"]), "--license", str(installed["license"]), "--name", "x",
                  "-o", str(env.store_dir() / "x.edgemed"), "--force"]):
        r = runner.invoke(cli, args)
        assert r.exit_code == 1 and "store" in r.output and "Traceback" not in r.output, (args, r.output)
    assert license_.read_bytes() == before
    assert runner.invoke(cli, ["verify", "tiny"]).exit_code == 0
    folder = tmp_path / "bundle-dir"
    assert runner.invoke(cli, ["export", "tiny", "--gguf", str(tmp_path / "tiny.gguf")]).exit_code == 0
    kit_bundle = tmp_path / "tiny.edgemed"  # the packed bundle the fixture installed (a tar): unpack it as a folder
    r = runner.invoke(cli, ["pack", str(installed["model"]), "--license", str(installed["license"]), "--name", "tiny",
                            "--dir", "-o", str(folder)])
    assert r.exit_code == 0, r.output
    mine = next(p for p in folder.rglob("LICENSE*") if p.is_file())
    r = runner.invoke(cli, ["export", str(folder), "--gguf", str(mine), "--force"])
    assert r.exit_code == 1 and "inside the bundle" in r.output, r.output
    assert kit_bundle.exists()


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("same", ["tiny.gguf", "Modelfile"])
def test_gguf_naming_a_file_the_ollama_export_writes_is_refused_before_anything_is_written(tmp_path, installed, same,
                                                                                          force):
    """`--ollama DIR --gguf DIR/tiny.gguf` wrote the Ollama export, then failed 'already exists' on the GGUF it had
    just written (with --force it wrote it twice; --gguf DIR/Modelfile put a GGUF in place of the Modelfile).
    Refused up front, naming the clash, with DIR left as it was."""
    out = tmp_path / "ollama"
    out.mkdir()
    r = _export(out, "--gguf", str(out / ".." / "ollama" / same), *(["--force"] if force else []))
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "a file --ollama" in r.output and "leave --gguf out" in r.output, r.output
    assert list(out.iterdir()) == []
