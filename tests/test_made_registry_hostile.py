"""edgemed's record of the directories it made (``$EDGEMED_HOME/made-dirs.json`` and its lock) is
untrusted local state: a FIFO, directory or link in its place, or a registry that is nested too
deeply, too large or of another shape, must neither hang nor break a directory output, and a
damaged registry proves nothing (``--force`` replaces no directory on its word)."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgemed.files import atomic

from edgemed.files import ownership as made
from edgemed.errors import OutputExists

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(edgemed_home, monkeypatch) -> Path:
    monkeypatch.setattr(made, "_warned", set(), raising=False)  # each test sees its own warnings
    edgemed_home.mkdir(parents=True, exist_ok=True)
    return edgemed_home


def _output(out: Path, force: bool = False) -> None:
    """A directory output, as an ONNX export writes one."""
    with atomic.atomic_path(out, force=force, kind="onnx") as tmp:
        tmp.mkdir()
        (tmp / "model.onnx").write_bytes(b"graph")


def _replaceable(out: Path) -> bool:
    try:
        _output(out, force=True)
    except OutputExists:
        return False
    return True


def _registry(home: Path) -> dict:
    return json.loads((home / "made-dirs.json").read_text())


def _run(home: Path, out: Path) -> subprocess.CompletedProcess:
    """Make ``out`` in a child process that must finish within 10 s."""
    code = textwrap.dedent(f"""
        from pathlib import Path
        from edgemed.files import atomic
        with atomic.atomic_path(Path({str(out)!r}), kind="onnx") as tmp:
            tmp.mkdir()
            (tmp / "model.onnx").write_bytes(b"graph")
    """)
    env = {**os.environ, "EDGEMED_HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=10)


# -- a foreign object at the lock's or the registry's name ----------------------------------------------
@pytest.mark.parametrize("name", ["made-dirs.lock", "made-dirs.json"])
def test_a_fifo_in_place_of_the_lock_or_registry_neither_hangs_nor_is_removed(home, tmp_path, name):
    os.mkfifo(home / name)
    r = _run(home, tmp_path / "out")  # was: every directory output hung here (TimeoutExpired)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and str(home / name) in r.stderr and "a FIFO" in r.stderr
    assert (tmp_path / "out" / "model.onnx").read_bytes() == b"graph"
    assert stat.S_ISFIFO(os.lstat(home / name).st_mode)  # left alone
    assert not _replaceable(tmp_path / "out")  # not recorded, so not edgemed's to delete


@pytest.mark.parametrize("name", ["made-dirs.lock", "made-dirs.json"])
def test_a_directory_in_place_of_the_lock_or_registry_is_left_alone(home, tmp_path, caplog, name):
    (home / name).mkdir()
    (home / name / "theirs").write_text("keep")
    with caplog.at_level(logging.WARNING, logger="edgemed"):
        _output(tmp_path / "out")  # was: IsADirectoryError (lock) / OutputExists on made-dirs.json (registry)
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert (home / name / "theirs").read_text() == "keep"
    assert any(str(home / name) in m and "a directory" in m for m in caplog.messages)


def test_a_link_in_place_of_the_lock_is_not_followed(home, tmp_path, caplog):
    target = tmp_path / "elsewhere"
    (home / "made-dirs.lock").symlink_to(target)
    with caplog.at_level(logging.WARNING, logger="edgemed"):
        _output(tmp_path / "out")
    assert not os.path.lexists(target)  # was: created through the link
    assert os.path.islink(home / "made-dirs.lock")
    assert any("a symbolic link" in m for m in caplog.messages)


# -- damaged registries prove nothing and are replaced -------------------------------------------------
def _damaged_then_replaced(home: Path, tmp_path: Path, caplog, why: str) -> None:
    """``made-dirs.json`` is damaged: edgemed made nothing here; the next output replaces the file."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    with caplog.at_level(logging.WARNING, logger="edgemed"):
        with pytest.raises(OutputExists):
            _output(theirs, force=True)
        _output(tmp_path / "new")
    assert any(why in m and str(home / "made-dirs.json") in m for m in caplog.messages), caplog.messages
    entries = _registry(home)
    assert [e["path"] for e in entries.values()] == [str(tmp_path / "new")]
    assert _replaceable(tmp_path / "new")


@pytest.mark.parametrize("text", ["[" * 100_000, "[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000],
                         ids=["open-arrays", "arrays", "objects"])
def test_a_deeply_nested_registry_proves_nothing_and_is_replaced(home, tmp_path, caplog, text):
    (home / "made-dirs.json").write_text(text)  # was: RecursionError on every directory output
    _damaged_then_replaced(home, tmp_path, caplog, "nested too deeply")


def test_an_oversized_registry_proves_nothing_and_is_replaced(home, tmp_path, caplog):
    _output(tmp_path / "out")
    text = (home / "made-dirs.json").read_text()
    (home / "made-dirs.json").write_text(text + " " * (17 << 20))  # was: read whole, and believed
    with caplog.at_level(logging.WARNING, logger="edgemed"):
        assert not _replaceable(tmp_path / "out")
    _damaged_then_replaced(home, tmp_path, caplog, "bytes, more than the")
    assert made.MAX_REGISTRY_BYTES < len(text) + (17 << 20)


@pytest.mark.parametrize("bad", [{"1:2": {"path": None}}, {"junk": [1, 2]}, {"1:2": "x"}, "path-int", "extra-field"])
def test_a_registry_of_another_shape_proves_nothing_and_is_replaced(home, tmp_path, caplog, bad):
    _output(tmp_path / "out")
    entries = _registry(home)
    (key, entry), = entries.items()
    if bad == "path-int":
        entries[key] = {**entry, "path": 0}
    elif bad == "extra-field":
        entries[key] = {**entry, "note": "x" * 100}
    else:
        entries.update(bad)
    (home / "made-dirs.json").write_text(json.dumps(entries))
    with caplog.at_level(logging.WARNING, logger="edgemed"):
        assert not _replaceable(tmp_path / "out")  # was: believed (and a null path: TypeError)
        assert (tmp_path / "out" / "model.onnx").is_file()
    _damaged_then_replaced(home, tmp_path, caplog, "does not hold edgemed's records")

