"""Outputs never delete what edgemed did not make; debris carries its owner and the next run sweeps it;
pack survives a kill at every filesystem step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgemed.files import atomic

from edgemed.files import debris
from edgemed.cli import cli
from edgemed.errors import OutputExists

import bundle_kit  # noqa: E402
import crash_kit  # noqa: E402
from crash_kit import KILLED


def _cli(*args, cwd: Path | None = None):
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        return CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        os.chdir(old)


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "a").write_text("mine")
    (victim / "sub" / "b").write_text("mine too")
    return victim


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def src(tmp_path):
    return bundle_kit.inputs(tmp_path / "src")


# -- a directory given as the output --------------------------------------------------------------
@pytest.mark.parametrize("out", [".", "..", "sub", "sub/.."])
def test_pack_onto_cwd_or_a_directory_is_refused_and_the_victim_intact(src, tmp_path, out):
    victim = _victim(tmp_path)
    before = _tree(tmp_path / "victim")
    r = _cli("pack", src["model"], "--license", src["license"], "-o", out, "--force", cwd=victim)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "Fix:" in r.output and "directory" in r.output
    assert _tree(victim) == before


@pytest.mark.parametrize("as_dir", [False, True])
def test_pack_existing_dir_force_is_refused(src, tmp_path, as_dir):
    victim = _victim(tmp_path)
    before = _tree(victim)
    r = _cli("pack", src["model"], "--license", src["license"], "-o", victim, "--force", *(["--dir"] if as_dir else []))
    assert r.exit_code == 1 and "even with --force" in r.output and "Traceback" not in r.output, r.output
    assert _tree(victim) == before


def test_keygen_onto_a_directory_is_refused(tmp_path):
    victim = _victim(tmp_path)
    before = _tree(victim)
    for target in (victim, victim / "sub"):
        r = _cli("keygen", target, "--force")
        assert r.exit_code == 1 and "even with --force" in r.output and "Traceback" not in r.output, r.output
    r = _cli("keygen", ".", "--force", cwd=victim)
    assert r.exit_code == 1 and "current directory" in r.output
    (victim / "k.pub.pem").mkdir()  # the public half's path is a directory: the private half is not written either
    r = _cli("keygen", victim / "k.pem", "--force")
    assert r.exit_code == 1 and not (victim / "k.pem").exists()
    (victim / "k.pub.pem").rmdir()
    assert _tree(victim) == before


def test_convert_existing_dir_force_is_refused(tmp_path):
    pytest.importorskip("torch")
    import tiny

    model = tiny.build_model(tmp_path / "llama")
    victim = _victim(tmp_path)
    before = _tree(victim)
    for out in (victim, victim / "sub"):
        r = _cli("convert", model, "--quant", "f16", "--no-parity", "-o", out, "--force")
        assert r.exit_code == 1 and "even with --force" in r.output and "Traceback" not in r.output, r.output
    r = _cli("convert", model, "--quant", "f16", "--no-parity", "-o", ".", "--force", cwd=victim)
    assert r.exit_code == 1 and "current directory" in r.output
    assert _tree(victim) == before


def test_a_directory_edgemed_made_is_replaced_unless_changed(src, tmp_path):
    out = tmp_path / "b"
    args = ("pack", src["model"], "--license", src["license"], "-o", out, "--dir")
    assert _cli(*args).exit_code == 0
    first = os.stat(out).st_ino
    r = _cli(*args)
    assert r.exit_code == 1 and "--force" in r.output
    r = _cli(*args, "--force")
    assert r.exit_code == 0, r.output
    assert os.stat(out).st_ino != first and _cli("verify", out).exit_code == 0
    assert _cli("pack", src["model"], "--license", src["license"], "-o", out, "--force").exit_code == 1  # another kind: a tar
    (out / "notes.txt").write_text("the user's")  # changed since edgemed made it: no longer edgemed's to delete
    r = _cli(*args, "--force")
    assert r.exit_code == 1 and "changed since" in r.output and (out / "notes.txt").read_text() == "the user's"
    assert crash_kit.debris(tmp_path) == []


def test_a_directory_output_with_a_long_name_is_recorded_under_its_whole_name(src, tmp_path):
    """A temporary's name keeps 120 characters of the output's; the ownership record took its path from there, so
    edgemed refused to replace its own --dir output of a longer name ("its files changed since")."""
    out = tmp_path / ("b" * 125)
    args = ("pack", src["model"], "--license", src["license"], "-o", out, "--dir")
    assert _cli(*args).exit_code == 0
    r = _cli(*args, "--force")
    assert r.exit_code == 0, r.output
    assert _cli("verify", out).exit_code == 0 and crash_kit.debris(tmp_path) == []


def test_force_still_replaces_a_file(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("old")
    with pytest.raises(OutputExists, match="--force"):
        atomic.write_text(f, "new", force=False)
    atomic.write_text(f, "new")
    assert f.read_text() == "new" and crash_kit.debris(tmp_path) == []


def test_force_never_replaces_a_device_a_pipe_or_a_socket(tmp_path):
    """--force replaced whatever was at the name with a regular file: run as root, `export --gguf /dev/null --force`
    made /dev/null a 98 MB file. A FIFO, a socket or a link to a device is refused, --force or not."""
    import socket
    import stat

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    link = tmp_path / "null-link"
    link.symlink_to("/dev/null")
    try:
        for target, kind in ((fifo, "a named pipe"), (sock_path, "a socket"), (link, "a character device")):
            with pytest.raises(OutputExists, match=kind):
                atomic.write_text(target, "new", force=True)
        r = _cli("keygen", link, "--force")
        assert r.exit_code == 1 and "character device" in r.output
    finally:
        sock.close()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and link.is_symlink()


def test_no_rmtree_of_a_callers_path_remains():
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for py in [*root.glob("edgemed/**/*.py"), *root.glob("converters/**/*.py")]:
        for i, line in enumerate(py.read_text().splitlines(), 1):
            if "rmtree(" in line and py.relative_to(root).as_posix() not in (
                    "edgemed/files/debris.py", "edgemed/packaging/store.py", "converters/onnx/export.py"):
                offenders.append(f"{py.relative_to(root)}:{i}")
    assert offenders == []  # debris.py removes only debris names; store.py only its tmp/; onnx_export only its scratch
    with pytest.raises(ValueError, match="not a name"):
        debris.discard(root / "tests")


# -- owner-tagged debris --------------------------------------------------------------------------
def _hold_debris(folder: Path) -> subprocess.Popen:
    """A live process that owns a piece of debris in ``folder`` (it waits on stdin)."""
    code = ("import sys; from pathlib import Path; from edgemed.files import debris\n"
            f"f = Path({str(folder)!r})\n"
            "with debris.owned(f):\n"
            "    p = debris.debris_path(f, 'live.gguf'); p.write_text('x'); print(p.name, flush=True); sys.stdin.read(); debris.discard(p)\n")
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_sweep_removes_dead_owners_debris_only(tmp_path):
    live = _hold_debris(tmp_path)
    try:
        live_name = live.stdout.readline().strip()
        dead = _hold_debris(tmp_path)
        dead_name = dead.stdout.readline().strip()
        dead.kill()
        dead.wait()
        lookalikes = [".x.gguf.abcdefgh.partial", ".edgemed-abc", "notes.partial", ".x.edgemed-zz.partial"]
        for n in lookalikes:  # names edgemed's pattern never produced: never swept
            (tmp_path / n).write_text("user")
        gone = debris.sweep(tmp_path)
        assert [p.name for p in gone] == [dead_name]
        assert (tmp_path / live_name).exists() and all((tmp_path / n).exists() for n in lookalikes)
        assert len(crash_kit.owners(tmp_path)) == 1  # the live one: its debris and its lock
    finally:
        live.stdin.close()
        live.wait()
    assert crash_kit.debris(tmp_path) == []  # it finished cleanly: it took its lock file with it


def test_files_of_debris_shape_without_edgemeds_lock_are_never_swept(tmp_path):
    """A user's file or folder named exactly like debris, with no lock beside it (or a lock name holding a file with
    content, which edgemed's empty locks never are), is not edgemed's: the sweep before every write leaves it."""
    note = tmp_path / ".notes.edgemed-0123456789abcdef.draft001.partial"
    note.write_text("notes")
    photos = tmp_path / ".photos.edgemed-fedcba9876543210.abcdefgh-keep.partial"
    photos.mkdir()
    (photos / "p.jpg").write_bytes(b"jpg")
    lock = tmp_path / ".edgemed-00112233445566aa.lock"
    lock.write_text("user data")
    piece = tmp_path / ".x.edgemed-00112233445566aa.abcdefgh.partial"
    piece.write_text("x")
    assert all(debris.is_debris(p) for p in (note, photos, piece))
    assert debris.sweep(tmp_path) == []
    assert note.read_text() == "notes" and (photos / "p.jpg").exists() and lock.read_text() == "user data"
    assert piece.exists()
    with atomic.atomic_path(tmp_path / "out.txt") as tmp:  # a write here sweeps first: still left
        tmp.write_text("new")
    assert note.exists() and photos.exists() and lock.exists() and piece.exists()


def test_an_interrupted_directory_replacement_is_restored(tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "manifest.json").write_text("old")

    def die_between_renames():
        with debris.owned(tmp_path):
            aside = debris.debris_path(tmp_path, "b", debris.ASIDE)
            os.rename(out, aside)
            os.kill(os.getpid(), 9)

    assert crash_kit.killed_at(die_between_renames, 0) == KILLED
    assert not out.exists()
    debris.sweep(tmp_path)
    assert (out / "manifest.json").read_text() == "old" and crash_kit.debris(tmp_path) == []


# -- pack, killed at every filesystem step ------------------------------------------------------
@pytest.mark.parametrize("form", ["tar", "dir"])
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_pack_killed_at_every_step_leaves_old_or_new(src, tmp_path, monkeypatch, form, exchange):
    from edgemed.packaging.bundle import PackInputs, pack

    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / ("b" if form == "dir" else "b.edgemed")
    old = pack(PackInputs(model=src["model"], license=src["license"], name="old"), out, as_dir=form == "dir")

    def run():
        pack(PackInputs(model=src["model"], license=src["license"], name="new"), out, as_dir=form == "dir", force=True)

    names = crash_kit.steps(run, tmp_path)
    assert any("rename" in s or "exchange" in s or "replace" in s for s in names), names
    pack(PackInputs(model=src["model"], license=src["license"], name="old"), out, as_dir=form == "dir", force=True)
    for n in range(1, len(names) + 1):
        where = names[n - 1]
        assert crash_kit.killed_at(run, n) == KILLED, where
        if exchange or form == "tar":  # one rename or one exchange: old or new is in place at every instant
            assert _cli("verify", out).exit_code == 0, where
        debris.sweep(out_dir)  # the next run's first act (check_destination); it restores an aside
        assert crash_kit.debris(out_dir) == [], where
        r = _cli("inspect", out, "--json")
        assert r.exit_code == 0 and _cli("verify", out).exit_code == 0, (where, r.output)
        assert ('"name": "old"' in r.output) or ('"name": "new"' in r.output), where
    assert crash_kit.killed_at(run, 0) == 0  # and the next run succeeds
    assert crash_kit.debris(out_dir) == [] and old.name == "old"
    assert _cli("verify", out).exit_code == 0


def test_directory_outputs_are_replaced_only_by_their_own_kind(tmp_path):
    out = tmp_path / "model-onnx"

    def write(kind, force, text):
        with atomic.atomic_path(out, force=force, kind=kind) as tmp:
            tmp.mkdir()
            (tmp / "model.onnx").write_text(text)

    write("onnx", False, "one")
    with pytest.raises(OutputExists, match="--force"):
        write("onnx", False, "two")
    with pytest.raises(OutputExists, match="did not make it as a bundle"):
        write("bundle", True, "two")
    write("onnx", True, "two")
    assert (out / "model.onnx").read_text() == "two" and crash_kit.debris(tmp_path) == []
    with pytest.raises(OutputExists, match="never replaces a directory"):
        atomic.write_text(out, "a file", force=True)
    assert (out / "model.onnx").read_text() == "two"
