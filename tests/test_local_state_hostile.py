"""Local state files that hostile or damaged contents must not break: the self-test verdict cache and
edgemed's owner lock files (every write into a folder sweeps the debris there)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from edgemed.files import atomic

from edgemed.files import debris
from edgemed.runtime import selftest
from edgemed.runtime.engine import LoadSettings

FOREIGN = "0123456789abcdef"  # an owner id nobody holds
HOST = selftest.Host("0.3.36", "CPU : AVX2 = 1 | REPACK = 1 |", ("avx2",))


# -- the self-test verdict cache ----------------------------------------------------------------------
@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private cache folder; ``check`` sees a fixed build (no llama.cpp library needed)."""
    monkeypatch.setenv("EDGEMED_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGEMED_FAULT", raising=False)
    if "edgemed.runtime.verdicts" in sys.modules:  # each test sees its own warnings
        monkeypatch.setattr(sys.modules["edgemed.runtime.verdicts"], "_warned", set())
    stub = types.ModuleType("edgemed.runtime.llamacpp")
    stub.build = lambda: types.SimpleNamespace(has_amx=False, system_info=HOST.system_info)
    monkeypatch.setitem(sys.modules, "edgemed.runtime.llamacpp", stub)
    folder = tmp_path / "cache" / "selftest"
    folder.mkdir(parents=True)
    return folder


def _check(calls: list):
    def runner(path, load):
        calls.append(load.extra_buffers)
        return selftest.Verdict(True, load.extra_buffers, None, '{"ok": true}')

    return selftest.check(Path("model.gguf"), LoadSettings(extra_buffers="none"), host=HOST, runner=runner, tensors=[])


def _digest(load=LoadSettings(extra_buffers="none")) -> str:
    return selftest.key(HOST, load, ())


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000],
                         ids=["arrays", "objects"])
def test_a_deeply_nested_cache_counts_as_empty_and_is_replaced(cache, caplog, text):
    (cache / "verdicts.json").write_text(text)
    calls = []
    with caplog.at_level(logging.WARNING, logger="edgemed"):
        assert _check(calls)[0][1].ok  # was: RecursionError, on every run until the file was deleted
    assert calls == ["none"]
    assert any("nested too deeply" in r.getMessage() for r in caplog.records)
    data = json.loads((cache / "verdicts.json").read_text())  # replaced by the new verdict
    assert list(data) == [_digest()] and data[_digest()]["ok"] is True
    _check(calls)
    assert calls == ["none"]  # and cached again


def test_a_cache_record_of_the_wrong_shape_is_not_trusted(cache, caplog):
    """A record whose fields have the wrong types ("ok": "no" is truthy) would have been taken as a pass."""
    (cache / "verdicts.json").write_text(json.dumps({_digest(): {"ok": "no", "mode": "none", "signal": None,
                                                                 "detail": ""}}))
    calls = []
    with caplog.at_level(logging.WARNING, logger="edgemed"):
        assert _check(calls)[0][1].ok is True
    assert calls == ["none"]  # checked again
    assert any("does not hold self-test verdicts" in r.getMessage() for r in caplog.records)
    assert json.loads((cache / "verdicts.json").read_text())[_digest()]["ok"] is True


def test_an_oversized_cache_is_not_read(cache):
    record = {"ok": True, "mode": "none", "signal": None, "detail": "x" * (5 << 20)}  # over the 4 MiB read limit
    (cache / "verdicts.json").write_text(json.dumps({_digest(): record}))
    calls = []
    _check(calls)
    assert calls == ["none"]  # the huge file was not read, so not trusted
    assert (cache / "verdicts.json").stat().st_size < 4096  # and the next verdict replaced it


def test_a_directory_in_place_of_the_cache_does_not_block_runs(cache, caplog):
    (cache / "verdicts.json").mkdir()
    (cache / "verdicts.json" / "mine.txt").write_text("not edgemed's")
    calls = []
    with caplog.at_level(logging.WARNING, logger="edgemed"):
        tried = _check(calls)  # was: OutputExists, every run refused
        _check(calls)
    assert tried[0][1].ok and calls == ["none", "none"]  # runs, without caching
    assert (cache / "verdicts.json" / "mine.txt").read_text() == "not edgemed's"
    assert sorted(os.listdir(cache / "verdicts.json")) == ["mine.txt"]
    warned = [r.getMessage() for r in caplog.records if "is a directory" in r.getMessage()]
    assert len(warned) == 1 and "move it away" in warned[0]


def test_a_fifo_in_place_of_the_cache_never_hangs(cache, tmp_path):
    os.mkfifo(cache / "verdicts.json")
    code = ("from edgemed.runtime import selftest as s\n"
            "assert s._read_cache() == {}\n"
            "s._remember('ab' * 32, s.Verdict(True, 'none'))\n"
            "print('done')\n")
    env = dict(os.environ, EDGEMED_CACHE_DIR=str(tmp_path / "cache"))
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=10, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("reading a FIFO in place of the self-test cache hung")
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
    assert (cache / "verdicts.json").is_fifo()


def _writer(start, i: int) -> None:
    start.wait()
    for j in range(25):
        selftest._remember(f"{i:032x}{j:032x}", selftest.Verdict(True, "none", None, f"{i}-{j}"))


def test_concurrent_writers_keep_every_verdict(cache):
    """16 processes writing 25 verdicts each at once keep all 400 (an unlocked read-modify-write kept 77)."""
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(16)
    procs = [ctx.Process(target=_writer, args=(start, i)) for i in range(16)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 16
    data = selftest._read_cache()
    assert len(data) == 400
    assert data[f"{7:032x}{24:032x}"]["detail"] == "7-24"
    assert not [n for n in os.listdir(cache) if n.endswith(".partial")]


# -- owner lock files -----------------------------------------------------------------------------------
def test_a_directory_named_like_a_lock_file_does_not_break_writes(tmp_path):
    lock = tmp_path / f".edgemed-{FOREIGN}.lock"
    lock.mkdir()
    (lock / "inside").write_text("theirs")
    piece = tmp_path / f".x.edgemed-{FOREIGN}.abcdefgh.partial"  # its "owner" is not known to be gone
    piece.write_text("maybe live")
    for n in range(2):
        atomic.write_text(tmp_path / "out.txt", f"new {n}")  # was: IsADirectoryError on every write here
    assert (tmp_path / "out.txt").read_text() == "new 1"
    assert (lock / "inside").read_text() == "theirs" and piece.read_text() == "maybe live"


def test_a_link_named_like_a_lock_file_is_not_followed_nor_removed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("theirs")
    lock = tmp_path / "out" / f".edgemed-{FOREIGN}.lock"
    lock.parent.mkdir()
    lock.symlink_to(target)
    atomic.write_text(tmp_path / "out" / "a.txt", "new")
    assert lock.is_symlink() and target.read_text() == "theirs"


def test_a_fifo_named_like_a_lock_file_does_not_hang_keygen(tmp_path):
    out = tmp_path / "keys"
    out.mkdir()
    os.mkfifo(out / f".edgemed-{FOREIGN}.lock")
    try:
        proc = subprocess.run([sys.executable, "-m", "edgemed", "keygen", str(out / "signing.pem")],
                              capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("edgemed keygen hung on a FIFO named like an edgemed lock file")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "signing.pem").is_file() and (out / f".edgemed-{FOREIGN}.lock").is_fifo()


@pytest.mark.parametrize("kind", ["directory", "fifo", "link"])
def test_our_own_lock_name_taken_by_something_else_gets_another_id(tmp_path, kind):
    """The name this process would lock in the folder is taken: it uses another id there, and leaves the object."""
    taken = debris._lock_path(tmp_path, debris._me.token)
    target = tmp_path / "target"
    if kind == "directory":
        taken.mkdir()
    elif kind == "fifo":
        os.mkfifo(taken)
    else:
        taken.symlink_to(target)
    atomic.write_text(tmp_path / "out.txt", "new")  # was: IsADirectoryError, or the FIFO or link removed
    assert (tmp_path / "out.txt").read_text() == "new"
    assert os.path.lexists(taken) and {"directory": taken.is_dir, "fifo": taken.is_fifo,
                                       "link": taken.is_symlink}[kind]()
    assert not target.exists()  # the link was not followed
    left = sorted(n for n in os.listdir(tmp_path) if n.startswith(".edgemed-") or n.endswith(".partial"))
    assert left == [taken.name]  # our stand-in lock went with the write
    with debris.owned(tmp_path) as owner:
        assert owner != debris._me.token and debris.debris_path(tmp_path, "x").name.count(owner) == 1


def test_the_verified_digest_cache_of_another_shape_or_kind_is_not_trusted_nor_waited_on(tmp_path, caplog):
    """verified-cache.json holding an entry of another shape made `verify NAME` a traceback (AttributeError), and a
    FIFO in its place made `edgemed list` hang; a digest that is not one is no hit either."""
    from edgemed.packaging.digest import VerifiedCache

    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    st = os.stat(f)
    from edgemed.packaging.digest import _stamp

    path = tmp_path / "verified-cache.json"
    for entry in ("x", {"stamp": "nope"}, {"stamp": _stamp(st), "sha256": 7}, {"stamp": _stamp(st), "sha256": "../x"}):
        path.write_text(json.dumps({"entries": {str(f): entry}}))
        assert VerifiedCache(path).lookup(f, st) is None, entry
    good = "ab" * 32
    path.write_text(json.dumps({"entries": {str(f): {"stamp": _stamp(st), "sha256": good}}}))
    assert VerifiedCache(path).lookup(f, st) == good
    path.unlink()
    os.mkfifo(path)
    code = (f"from edgemed.packaging.digest import VerifiedCache as V\nc = V(__import__('pathlib').Path({str(path)!r}))\n"
            "c.entries['k'] = {}; c.dirty = True; c.save(); print(len(c.entries))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("reading a FIFO in place of the verified cache hung")
    assert proc.returncode == 0 and proc.stdout.strip() == "1" and "left alone" in proc.stderr, proc.stderr
    assert path.is_fifo()  # not ours: never replaced
