"""A dead operation's journal in a store that cannot be written (a full disk, a read-only mount, a store another
account owns): readers read it through, as they read a live operation's, and the model it leaves runs; writers
refuse, naming the interrupted change and the fix; once the store can be written, the next reader settles it to
the very state the readers saw. The store's refusal is simulated at the call that meets it (the tests run as root,
which a read-only permission would not stop)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os

import pytest
from click.testing import CliRunner

import bundle_kit  # noqa: E402
import crash_kit  # noqa: E402
from crash_kit import KILLED
from edgemed.cli import cli
from edgemed.files import atomic
from edgemed.packaging import store as store_mod
from edgemed.packaging.ref import runnable
from edgemed.packaging.store import Store

#: how the store refuses: (errno, the call that meets it). A full disk meets it at the index write (the lock file is
#: there already); a read-only mount and another account's store when the lock file is opened for writing.
REFUSALS = {"disk-full": (errno.ENOSPC, "index"), "read-only": (errno.EROFS, "lock"), "other-account": (errno.EACCES, "lock")}


def _unwritable(monkeypatch, code: int, where: str) -> None:
    def refuse(path):
        raise OSError(code, os.strerror(code), str(path))

    if where == "lock":
        def fake_open(path, mode="r", *args, **kw):
            if os.path.basename(path) == "lock" and mode != "r":
                refuse(path)
            return open(path, mode, *args, **kw)

        monkeypatch.setattr(store_mod, "open", fake_open, raising=False)
    else:
        real = store_mod.write_text

        def fake_write(dest, text, **kw):
            if os.path.basename(dest) == "index.json":
                refuse(dest)
            return real(dest, text, **kw)

        monkeypatch.setattr(store_mod, "write_text", fake_write)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verify():
    return CliRunner().invoke(cli, ["verify", "tiny", "--json"])


@pytest.mark.parametrize("refusal,exchange", [("disk-full", True), ("disk-full", False), ("read-only", False),
                                              ("other-account", True)])
def test_a_dead_journal_in_a_store_that_cannot_be_written_is_read_through(tmp_path, monkeypatch, caplog, refusal, exchange):
    """Was: every command, `run` and `list` included, failed with the disk's error while settling the journal."""
    b = bundle_kit.two_versions(tmp_path)
    shas = {_sha(b["old"][1]): "old", _sha(b["new"][1]): "new"}
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)

    def update():
        Store().install(b["new"][0], force=True)

    Store().install(b["old"][0])
    names = crash_kit.steps(update, tmp_path)
    stuck = set()
    for n in range(1, len(names) + 1):
        bundle_kit.installed_alone(b["old"][0])  # start from the old model alone, settled, as the listing did
        where = names[n - 1]
        assert crash_kit.killed_at(update, n) == KILLED, where
        if not Store().journal_path.exists():
            continue
        with monkeypatch.context() as m:
            _unwritable(m, *REFUSALS[refusal])
            caplog.clear()
            with caplog.at_level(logging.WARNING, "edgemed.packaging.store"):
                v = Store().verify("tiny", full=True)
            said = [r.getMessage() for r in caplog.records if "journal.json" in r.getMessage()]
            seen = shas[v.manifest_sha256]
            assert runnable("tiny").model_path.is_file(), where  # what `edgemed run tiny` loads
            rows = Store().list()
            assert [(r["name"], r["digest"]) for r in rows] == [("tiny", "sha256:" + v.manifest_sha256)], (where, rows)
            r = _verify()
            assert r.exit_code == 0 and shas[json.loads(r.stdout)["manifest_sha256"]] == seen, (where, r.output)
            if not Store().journal_path.exists():  # settled without a write the store refuses (nothing to record)
                assert said == [], (where, said)
                continue
            assert len(said) == 1 and "cannot be finished" in said[0] and "edgemed list" in said[0], (where, said)
            r = CliRunner().invoke(cli, ["remove", "tiny"])  # a writer: refused, naming the change and the fix
            fix = "free space on that disk outside the store" if refusal == "disk-full" else "make the store writable"
            assert r.exit_code == 1 and "was interrupted" in r.output and fix in " ".join(r.output.split()), (where, r.output)
            assert Store().journal_path.exists(), where
        stuck.add(seen)
        r = _verify()  # writable again: this reader settles the journal, to the state read through it
        assert r.exit_code == 0 and shas[json.loads(r.stdout)["manifest_sha256"]] == seen, (where, r.output)
        assert not Store().journal_path.exists(), where
    # journals it could not settle on both sides of the commit point (a full disk refuses only the index write, which
    # only rolling forward needs)
    assert stuck == ({"new"} if refusal == "disk-full" else {"old", "new"})
