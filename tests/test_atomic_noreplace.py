"""Without --force, an output that appears while edgemed writes (another run, the user) is never replaced: the
placement itself refuses (rename-no-replace, else a hard link), and a kill at any step leaves nothing or the new file."""

from __future__ import annotations

import os

import pytest

from edgemed.errors import OutputExists
from edgemed.files import atomic, debris

import crash_kit
from crash_kit import KILLED

PLACEMENTS = ["no-replace-rename", "hard-link"]


@pytest.fixture(params=PLACEMENTS)
def placement(request, monkeypatch):
    """Each way ``place_new`` can refuse: the kernel's rename flag, or (where that flag is missing) a hard link."""
    if request.param == "hard-link":
        monkeypatch.setattr(atomic, "_rename_noreplace", lambda a, b: False)
    return request.param


def test_a_file_that_appears_while_writing_is_left_alone(tmp_path, placement):
    dest = tmp_path / "out.gguf"
    with pytest.raises(OutputExists, match="appeared while edgemed was writing") as err:
        with atomic.atomic_path(dest) as tmp:
            tmp.write_text("edgemed's")
            dest.write_text("the user's")  # another program made it meanwhile
    assert "--force" in err.value.fix
    assert dest.read_text() == "the user's" and crash_kit.debris(tmp_path) == []


@pytest.mark.parametrize("what", ["a file", "an empty directory"])
def test_the_placement_itself_refuses_what_appeared_after_the_last_check(tmp_path, monkeypatch, placement, what):
    """The output appears at the last instant, after every check in Python: only the kernel can refuse it then."""
    dest = tmp_path / "out.gguf"
    real = atomic.step

    def step(name):
        if name == "atomic.rename-new":
            dest.write_text("the user's") if what == "a file" else dest.mkdir()
        real(name)

    monkeypatch.setattr(atomic, "step", step)
    with pytest.raises(OutputExists, match="appeared while"):
        atomic.write_text(dest, "edgemed's", force=False)
    assert (dest.read_text() == "the user's") if what == "a file" else (dest.is_dir() and not any(dest.iterdir()))
    assert crash_kit.debris(tmp_path) == []


def test_a_directory_output_that_appears_is_left_alone(tmp_path):
    dest = tmp_path / "model-onnx"
    with pytest.raises(OutputExists):
        with atomic.atomic_path(dest, kind="onnx") as tmp:
            tmp.mkdir()
            (tmp / "model.onnx").write_text("edgemed's")
            dest.mkdir()  # empty: a plain rename would have replaced it
    assert dest.is_dir() and not any(dest.iterdir()) and crash_kit.debris(tmp_path) == []


def test_without_force_a_new_file_still_lands(tmp_path, placement):
    dest = tmp_path / "out.txt"
    atomic.write_text(dest, "new", force=False)
    assert dest.read_text() == "new" and os.stat(dest).st_nlink == 1 and crash_kit.debris(tmp_path) == []


def test_killed_at_every_step_of_a_new_output_leaves_nothing_or_all_of_it(tmp_path, placement):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dest = out_dir / "x.txt"
    text = "complete\n" * 1000

    def run():
        atomic.write_text(dest, text, force=False)

    names = crash_kit.steps(run, tmp_path)
    assert any(s.endswith(" atomic.link") for s in names) == (placement == "hard-link"), names
    for n in range(1, len(names) + 1):
        dest.unlink(missing_ok=True)
        assert crash_kit.killed_at(run, n) == KILLED, names[n - 1]
        assert not dest.exists() or dest.read_text() == text, names[n - 1]
        debris.sweep(out_dir)  # the next run's first act
        assert crash_kit.debris(out_dir) == [], names[n - 1]
        assert not dest.exists() or (dest.read_text() == text and os.stat(dest).st_nlink == 1), names[n - 1]


def test_a_group_is_refused_whole_before_anything_is_written(tmp_path):
    first, second = tmp_path / "a.gguf", tmp_path / "Modelfile"
    second.write_text("the user's")
    with pytest.raises(OutputExists, match="--force"):
        with atomic.atomic_paths([first, second]) as tmps:
            pytest.fail(f"the caller was let write {tmps}")
    assert not first.exists() and second.read_text() == "the user's" and crash_kit.debris(tmp_path) == []


def test_a_group_that_fails_while_writing_changes_nothing(tmp_path):
    first, second = tmp_path / "k.pub.pem", tmp_path / "k.pem"
    first.write_text("old public")
    second.write_text("old private")
    with pytest.raises(OSError):
        with atomic.atomic_paths([first, second], force=True) as (a, b):
            a.write_text("new public")
            raise OSError(28, "No space left on device")  # a full disk while the second is written
    assert (first.read_text(), second.read_text()) == ("old public", "old private")
    assert crash_kit.debris(tmp_path) == []
    with atomic.atomic_paths([first, second], force=True) as (a, b):
        a.write_text("new public")
        b.write_text("new private")
    assert (first.read_text(), second.read_text()) == ("new public", "new private")
    assert crash_kit.debris(tmp_path) == []


def test_the_race_in_the_cli(tmp_path, monkeypatch, placement):
    """`edgemed pack` without --force: a bundle someone else made at -o while it packed is kept."""
    import bundle_kit
    from click.testing import CliRunner

    from edgemed.cli import cli

    src = bundle_kit.inputs(tmp_path / "src")
    dest = tmp_path / "out.edgemed"
    real = atomic.step

    def step(name):
        if name == "atomic.written" and not dest.exists():
            dest.write_text("USER DATA")
        real(name)

    monkeypatch.setattr(atomic, "step", step)
    r = CliRunner().invoke(cli, ["pack", str(src["model"]), "--license", str(src["license"]), "-o", str(dest)])
    assert r.exit_code == 1 and "appeared while" in r.output and "Traceback" not in r.output, r.output
    assert dest.read_text() == "USER DATA" and crash_kit.debris(tmp_path) == []
