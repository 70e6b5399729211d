"""A full, read-only or forbidden disk: every command ends in a one-paragraph message naming the fix, never a traceback;
and the verified cache, an optional speed-up, never turns a passed check into a failure.

The box runs as root, where chmod does not stop a write, so the refusals are injected at the lowest write the code
makes (the tar file's write, ``os.open``), with the errno and file name the kernel would give.
"""

from __future__ import annotations

import errno
import logging
import os
import tarfile

import pytest
from click.testing import CliRunner

import bundle_kit as kit
from edgemed.cli import cli
from edgemed.errors import output_error
from edgemed.packaging import digest
from edgemed.packaging.bundle import PackInputs, pack


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)  # a traceback fails the test


def _refused(code: int, filename) -> OSError:
    return OSError(code, os.strerror(code), None if filename is None else str(filename))


class _FullDisk:
    """A file opened for writing whose every write fails with ``code``, as a full disk fails it."""

    def __init__(self, name, mode, code):
        self.name, self.code = str(name), code
        self.fh = open(name, mode)

    def write(self, data):
        raise _refused(self.code, self.name)

    def __getattr__(self, attr):
        return getattr(self.fh, attr)


@pytest.fixture
def src(tmp_path):
    return kit.inputs(tmp_path / "src")


def _pack_args(src, out):
    return ("pack", src["model"], "--license", src["license"], "--card", src["card"], "-o", out)


def test_pack_on_a_full_disk_is_one_clean_paragraph(tmp_path, src, monkeypatch):
    monkeypatch.setattr(tarfile, "bltn_open", lambda name, mode: _FullDisk(name, mode, errno.ENOSPC))
    (tmp_path / "out").mkdir()
    r = _run(*_pack_args(src, tmp_path / "out" / "x.edgemed"))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "No space left on the disk while writing" in r.output and str(tmp_path / "out") in r.output
    assert "Fix: free space on that disk" in r.output
    assert list((tmp_path / "out").iterdir()) == []  # the partial tar went with the failure


def test_other_os_errors_keep_their_traceback(tmp_path, src, monkeypatch):
    monkeypatch.setattr(tarfile, "bltn_open", lambda name, mode: _FullDisk(name, mode, errno.EIO))
    with pytest.raises(OSError) as caught:
        _run(*_pack_args(src, tmp_path / "x.edgemed"))
    assert caught.value.errno == errno.EIO  # an I/O error is not "choose another folder": it stays visible as a bug


def test_install_into_a_read_only_store_is_one_clean_paragraph(tmp_path, src, edgemed_home, monkeypatch):
    bundle = tmp_path / "b.edgemed"
    pack(PackInputs(model=src["model"], license=src["license"], card=src["card"], name="tiny"), bundle)
    real_open = os.open
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def read_only_store(path, flags, *a, **k):
        if flags & writes and str(path).startswith(str(edgemed_home)):
            raise _refused(errno.EROFS, path)
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only_store)
    r = _run("install", bundle)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "the file system is mounted read-only" in r.output and str(edgemed_home) in r.output
    assert "Fix: choose a folder you can write to" in r.output and "EDGEMED_HOME" in r.output


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM])
def test_each_refusal_names_what_failed_and_the_fix(code):
    named, unnamed = output_error(_refused(code, "/data/x.gguf")), output_error(_refused(code, None))
    assert "'/data/x.gguf'" in named.problem and named.fix
    assert "a file" in unnamed.problem and unnamed.fix == named.fix
    assert output_error(_refused(errno.EIO, "/data/x.gguf")) is None


def test_a_write_that_names_no_file_is_named_by_the_output_it_was_for(tmp_path):
    """``write()`` on a full disk raises ENOSPC without a file name; the atomic writer names its destination."""
    from edgemed.files.atomic import atomic_path, atomic_paths

    dest = tmp_path / "out" / "x.gguf"
    dest.parent.mkdir()
    with pytest.raises(OSError) as caught:
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"part")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(dest)
    assert f"while writing '{dest}'" in output_error(caught.value).problem
    assert list(dest.parent.iterdir()) == []  # the partial temporary went with the failure
    pair = [dest, dest.with_name("Modelfile")]
    with pytest.raises(PermissionError) as caught:
        with atomic_paths(pair):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    assert caught.value.filename == f"{pair[0]} or {pair[1]}"
    with pytest.raises(OSError) as caught:  # a name the kernel gave is kept
        with atomic_path(dest):
            raise _refused(errno.ENOSPC, "/elsewhere/scratch")
    assert caught.value.filename == "/elsewhere/scratch"
    with pytest.raises(OSError) as caught:  # and an error that is not the disk's is left as it was
        with atomic_path(dest):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
    assert caught.value.filename is None


# -- the verified cache is a speed-up: failing to save it is a warning, not a failed check ----------------------
def _cache_is_a_directory(edgemed_home, monkeypatch):
    (edgemed_home / digest.CACHE_NAME).mkdir(parents=True)


def _cache_disk_is_full(edgemed_home, monkeypatch):
    def full(path, text, **kw):
        raise _refused(errno.ENOSPC, path)

    monkeypatch.setattr(digest, "write_text", full)


@pytest.mark.parametrize("refuse", [_cache_is_a_directory, _cache_disk_is_full])
def test_verify_passes_when_the_cache_cannot_be_saved(tmp_path, src, edgemed_home, monkeypatch, caplog, refuse):
    bundle = tmp_path / "b"
    pack(PackInputs(model=src["model"], license=src["license"], card=src["card"], name="tiny"), bundle, as_dir=True)
    monkeypatch.setattr(digest, "RACY_S", -1e9)  # trust fresh files, so the check has digests to cache
    refuse(edgemed_home, monkeypatch)
    with caplog.at_level(logging.WARNING, logger=digest.__name__):
        r = _run("verify", bundle)
    assert r.exit_code == 0, r.output
    warned = [rec.getMessage() for rec in caplog.records if rec.name == digest.__name__]
    assert len(warned) == 1 and str(edgemed_home / digest.CACHE_NAME) in warned[0]
