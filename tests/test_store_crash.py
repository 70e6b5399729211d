"""The store survives a kill at every filesystem step of install, install --force and remove:
afterwards `verify` passes on the old model or the new one, and the next
store operation leaves no staging, no journal and no orphaned blob."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgemed.files import atomic
from edgemed.cli import cli
from edgemed.packaging.bundle import PackInputs, pack
from edgemed.packaging.store import Store

import bundle_kit  # noqa: E402
import crash_kit  # noqa: E402
from crash_kit import KILLED


@pytest.fixture
def bundles(tmp_path):
    """Two bundles of one model name, different content: 'old' and 'new'."""
    return bundle_kit.two_versions(tmp_path)


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _verify(name: str = "tiny"):
    return CliRunner().invoke(cli, ["verify", name, "--full", "--json"])


def _assert_clean(store: Store) -> None:
    """What every store operation leaves: no journal, no staging, every blob linked by a model."""
    assert not (store.root / "journal.json").exists()
    assert list(store.tmp.iterdir()) == []
    assert crash_kit.debris(store.root) == []
    assert all(b.stat().st_nlink >= 2 for b in store.blobs.iterdir())


@pytest.mark.parametrize("bundle_form,exchange,start", [
    ("tar", True, "kept"), ("tar", False, "kept"), ("dir", True, "kept"), ("dir", False, "kept"),
    ("tar", True, "alone"), ("dir", False, "alone")])
def test_install_force_killed_at_every_step_keeps_old_or_new(bundles, tmp_path, monkeypatch, exchange, bundle_form, start):
    """``start``: 'old' installed over 'new', which is kept for rollback (the update links the files of 'new' from
    their blobs, and drops that kept version as it rolls forward), or 'old' alone (the update copies its files)."""
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    new_path = bundles["new"][0]
    if bundle_form == "dir":
        new_path = tmp_path / "new-dir"
        monkeypatch.setenv("SOURCE_DATE_EPOCH", "1735689600")  # two_versions' instant: no older release either way
        pack(PackInputs(model=tmp_path / "src-new" / "tiny.gguf", license=tmp_path / "src-new" / "LICENSE", name="tiny"),
             new_path, as_dir=True)
    shas = {_sha(bundles["old"][1]): "old", _sha(bundles["new"][1]): "new"}
    if bundle_form == "dir":  # the folder's manifest too (packed apart from the tar)
        shas[_sha((new_path / "manifest.json").read_bytes())] = "new"

    def run():
        Store().install(new_path, force=True)

    def reset():  # the state each run below starts from, settled
        if start == "kept":
            Store().install(bundles["old"][0], force=True)
        else:
            bundle_kit.installed_alone(bundles["old"][0])

    Store().install(new_path)
    reset()
    names = crash_kit.steps(run, tmp_path)
    path = ("store.stage-file", "store.blob-replace") if start == "alone" else ("store.stage-blob", "store.drop-version")
    assert {"store.journal-done", "store.stage", *path} <= {s.split()[1] for s in names}, names
    seen = set()
    for n in range(1, len(names) + 1):
        reset()
        where = names[n - 1]
        assert crash_kit.killed_at(run, n) == KILLED, where
        r = _verify()  # a reader: settles the dead install first (nobody holds the lock)
        assert r.exit_code == 0, (where, r.output)
        got = shas[json.loads(r.stdout)["manifest_sha256"]]
        seen.add(got)
        with Store().locked():  # the start of any next store operation
            pass
        _assert_clean(Store())
        assert [m["name"] for m in Store().list()] == ["tiny"]
        assert _verify().exit_code == 0
    assert seen == {"old", "new"}  # the kills straddle the commit point


def test_fresh_install_killed_at_every_step_is_absent_or_whole(bundles, tmp_path, monkeypatch):
    path = bundles["new"][0]
    names = crash_kit.steps(lambda: Store(tmp_path / "count").install(path), tmp_path)
    outcomes = set()
    for n in range(1, len(names) + 1):
        monkeypatch.setenv("EDGEMED_HOME", str(tmp_path / f"home-{n}"))
        where = names[n - 1]
        assert crash_kit.killed_at(lambda: Store().install(path), n) == KILLED, where
        r = _verify()
        if r.exit_code == 0:
            outcomes.add("installed")
        else:  # rolled back: not installed at all, and a plain install (no --force) works
            assert "No model named 'tiny'" in r.output and "not in its index" not in r.output, (where, r.output)
            outcomes.add("absent")
            Store().install(path)
        with Store().locked():  # the next store operation
            pass
        _assert_clean(Store())
        assert _verify().exit_code == 0, where
    assert outcomes == {"installed", "absent"}


def test_remove_killed_at_every_step_is_present_or_gone(bundles, tmp_path):
    Store().install(bundles["old"][0])
    names = crash_kit.steps(lambda: Store().remove("tiny"), tmp_path)  # the steps of the remove alone
    assert "store.remove-rename" in {s.split()[1] for s in names}, names
    outcomes = set()
    for n in range(1, len(names) + 1):
        Store().install(bundles["old"][0], force=True)
        where = names[n - 1]
        assert crash_kit.killed_at(lambda: Store().remove("tiny"), n) == KILLED, where
        rows = Store().list()
        assert len(rows) <= 1 and all("error" not in r for r in rows), (where, rows)  # never DAMAGED
        if rows:
            assert _verify().exit_code == 0, where
            outcomes.add("present")
        else:
            r = _verify()
            assert r.exit_code != 0 and "No model named 'tiny'" in r.output, (where, r.output)
            outcomes.add("gone")
        with Store().locked():
            pass
        _assert_clean(Store())
    assert outcomes == {"present", "gone"}  # the kills straddle the commit point


def test_a_live_install_is_read_through_and_never_swept(bundles, tmp_path):
    """A reader during another process's install, at its commit point, sees a whole model."""
    import os
    import signal
    import time

    Store().install(bundles["old"][0])
    steps = crash_kit.steps(lambda: Store().install(bundles["new"][0], force=True), tmp_path)
    at = next(i for i, s in enumerate(steps, 1) if s.endswith("store.index"))  # journal written, model swapped in
    Store().install(bundles["old"][0], force=True)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child stops itself at that step, still holding the lock
        os.environ["EDGEMED_TEST_KILL_AT"] = "0"
        from edgemed.files import debris

        real = debris.step

        def pause(what):
            real(what)
            if debris._steps == at:
                os.kill(os.getpid(), signal.SIGSTOP)

        debris.step = pause
        import edgemed.files.atomic as a
        import edgemed.packaging.store as st

        a.step = st.step = pause
        try:
            Store().install(bundles["new"][0], force=True)
        finally:
            os._exit(0)
    try:
        for _ in range(200):
            if os.waitpid(pid, os.WUNTRACED | os.WNOHANG)[0]:
                break
            time.sleep(0.02)
        assert Store().journal_path.exists()
        r = _verify()
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["manifest_sha256"] == _sha(bundles["new"][1])
        assert any(Store().tmp.iterdir())  # its staging is live: the reader did not sweep it
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    with Store().locked():
        pass
    _assert_clean(Store())
    assert _verify().exit_code == 0


def test_legacy_aside_of_an_older_version_is_restored(bundles):
    s = Store()
    s.install(bundles["old"][0])
    (s.models / "tiny").rename(s.tmp / "old.tiny.12345")  # what an older edgemed left when killed mid-replace
    with s.locked():
        pass
    assert _verify().exit_code == 0 and list(s.tmp.iterdir()) == []


def _strace_works() -> bool:
    import shutil
    import subprocess

    if shutil.which("strace") is None:
        return False
    return subprocess.run(["strace", "-qq", "-o", "/dev/null", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _strace_works(), reason="needs strace (and ptrace permission)")
def test_install_force_under_strace_kill_at_every_rename(bundles):
    """The same property without edgemed's hook: the kernel-level kill from strace at each rename syscall."""
    import os
    import subprocess
    import sys

    Store().install(bundles["old"][0])
    cmd = [sys.executable, "-c", "import sys; from edgemed.cli import cli; cli(sys.argv[1:])", "install", str(bundles["new"][0]), "--force"]
    calls = "rename,renameat,renameat2"
    for n in range(1, 30):
        r = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={calls}", "-e", f"inject={calls}:signal=KILL:when={n}", *cmd],
                           capture_output=True, env=os.environ.copy(), timeout=300)
        v = _verify()
        assert v.exit_code == 0, (n, v.output)
        with Store().locked():
            pass
        _assert_clean(Store())
        if r.returncode == 0:  # fewer than n renames: every one of them has been killed at
            break
        Store().install(bundles["old"][0], force=True)
    assert n > 3


def test_a_forked_child_counts_its_steps_from_one_whatever_its_parent_counted(tmp_path, monkeypatch):
    """An in-process run with the step hook on (a test listing a command's steps) leaves the parent's count
    raised; a child forked afterwards is still killed at its own n-th step."""
    from edgemed import env
    from edgemed.files.debris import step

    monkeypatch.setenv(env.KILL_AT_VAR, str(10**9))
    for _ in range(5):
        step("parent")
    monkeypatch.delenv(env.KILL_AT_VAR)
    log = tmp_path / "child.log"
    assert crash_kit.killed_at(lambda: [step(f"child-{i}") for i in range(3)], 2, log) == KILLED
    assert log.read_text().splitlines() == ["1 child-0", "2 child-1"]


def test_a_stop_at_every_step_from_the_swap_on_says_which_version_is_installed(bundles, tmp_path, monkeypatch):
    """SIGTERM once `install --force` had swapped the new version in said "nothing half-written was left behind",
    while the new version was installed: fleet tooling took the update for a failure. Stopped at the swap and at every
    step after it, the report matches the store: the old version with nothing left behind, or the new one installed
    and the clean-up the stop cut short. The process dies by SIGTERM either way (a clean stop to a service manager)."""
    import os
    import signal

    from edgemed.packaging.store_files import manifest_sha256

    def start(home):  # 'old' installed over 'new', which is kept for rollback
        monkeypatch.setenv("EDGEMED_HOME", str(home))
        Store().install(bundles["new"][0])
        Store().install(bundles["old"][0], force=True)

    update = ["install", bundles["new"][0], "--force"]
    start(tmp_path / "count")
    log = tmp_path / "steps.log"
    assert crash_kit.terminated_at(update, 0, log).returncode == 0
    names = log.read_text().splitlines()
    swap = next(i for i, s in enumerate(names) if s.split()[1] in ("atomic.exchange", "atomic.aside"))
    assert len(names) - swap > 3, names
    outcomes = set()
    for n in range(swap + 1, len(names) + 1):
        start(tmp_path / f"home-{n}")
        proc = crash_kit.terminated_at(update, n)
        where, err = names[n - 1], proc.stderr
        assert proc.returncode == -signal.SIGTERM and "Traceback" not in err, (where, err[-2000:])
        installed = {_sha(bundles["old"][1]): "old", _sha(bundles["new"][1]): "new"}[manifest_sha256(Store().models / "tiny")]
        outcomes.add(installed)
        if installed == "new":
            assert "Stopped (SIGTERM) after 'tiny' was installed: sha256:" in err and "Not finished: " in err, (where, err)
            assert "nothing half-written" not in err, (where, err)
        else:
            assert "Stopped (SIGTERM); nothing half-written was left behind." in err, (where, err)
        assert os.environ["EDGEMED_HOME"].endswith(f"home-{n}") and _verify().exit_code == 0, where
        assert Store().record("tiny")["manifest_sha256"] == _sha(bundles[installed][1]), where
    assert outcomes == {"old", "new"}, names[swap:]  # the stops straddle the commit point


def test_a_stop_at_every_step_from_the_trash_on_says_the_model_was_removed(bundles, tmp_path, monkeypatch):
    """SIGTERM once `remove` had moved the model into its trash said "nothing half-written was left behind", while
    the model was gone (its record dropped by the next command that read the store). Stopped at the rename and at
    every step after it, the report matches the store: the model still installed with nothing left behind, or
    removed and the clean-up the stop cut short. The process dies by SIGTERM either way."""
    import signal

    def start(home):
        monkeypatch.setenv("EDGEMED_HOME", str(home))
        Store().install(bundles["new"][0])

    start(tmp_path / "count")
    log = tmp_path / "steps.log"
    assert crash_kit.terminated_at(["remove", "tiny"], 0, log).returncode == 0
    names = log.read_text().splitlines()
    rename = next(i for i, s in enumerate(names) if s.split()[1] == "store.remove-rename")
    assert len(names) - rename > 3, names
    outcomes = set()
    for n in range(rename + 1, len(names) + 1):
        start(tmp_path / f"home-{n}")
        proc = crash_kit.terminated_at(["remove", "tiny"], n)
        where, err = names[n - 1], proc.stderr
        assert proc.returncode == -signal.SIGTERM and "Traceback" not in err, (where, err[-2000:])
        removed = not (Store().models / "tiny").exists()
        outcomes.add(removed)
        if removed:
            assert "Stopped (SIGTERM) after 'tiny' was removed. Not finished: " in err, (where, err)
            assert "nothing half-written" not in err, (where, err)
            assert Store().list() == [], where  # the journal settled: its record dropped
        else:
            assert "Stopped (SIGTERM); nothing half-written was left behind." in err, (where, err)
            assert _verify().exit_code == 0, where
    assert outcomes == {False, True}, names[rename:]  # the stops straddle the commit point


@pytest.mark.parametrize("command", ["install", "rollback", "remove"])
def test_a_stop_while_the_command_prints_its_result_reports_the_change(bundles, tmp_path, monkeypatch, command):
    """A stop (here Ctrl-C) in the moment between install, rollback or remove returning and its result being printed
    said "nothing half-written was left behind", while the change had taken effect."""
    import edgemed.cli.store

    monkeypatch.setenv("EDGEMED_HOME", str(tmp_path / "home"))
    Store().install(bundles["old"][0])
    if command == "rollback":
        Store().install(bundles["new"][0], force=True)

    def stopped(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(edgemed.cli.store, "shown", stopped)
    args = {"install": ["install", bundles["new"][0], "--force"], "rollback": ["rollback", "tiny"],
            "remove": ["remove", "tiny"]}[command]
    r = CliRunner().invoke(cli, [str(a) for a in args])
    verb = {"install": "installed", "rollback": "rolled back to sha256:", "remove": "removed"}[command]
    assert r.exit_code == 130 and f"Interrupted after 'tiny' was {verb}" in r.stderr, r.output
    assert "nothing half-written" not in r.stderr and r.stdout == ""
    held = [row.get("digest") for row in Store().list()]
    assert held == {"install": ["sha256:" + _sha(bundles["new"][1])], "rollback": ["sha256:" + _sha(bundles["old"][1])],
                    "remove": []}[command], held


@pytest.mark.parametrize("command", ["install", "rollback", "remove"])
def test_a_stop_as_the_store_returns_before_the_result_is_in_hand_reports_the_change(bundles, tmp_path, monkeypatch,
                                                                                      command):
    """A stop (here Ctrl-C) that landed the instant install, rollback or remove returned, before the command had its
    result and opened its report, said "nothing half-written was left behind", while the change had taken effect.
    Now it says what took effect, the store agrees, and the exit status is still the stop's."""
    monkeypatch.setenv("EDGEMED_HOME", str(tmp_path / "home"))
    Store().install(bundles["old"][0])
    if command == "rollback":
        Store().install(bundles["new"][0], force=True)
    method = getattr(Store, command)

    def then_stopped(self, *args, **kwargs):
        method(self, *args, **kwargs)  # done, and the store's own guard is left behind
        raise KeyboardInterrupt

    monkeypatch.setattr(Store, command, then_stopped)
    args = {"install": ["install", bundles["new"][0], "--force"], "rollback": ["rollback", "tiny"],
            "remove": ["remove", "tiny"]}[command]
    r = CliRunner().invoke(cli, [str(a) for a in args])
    want = {"install": "new", "rollback": "old", "remove": None}[command]
    verb = {"install": "installed: sha256:", "rollback": "rolled back to sha256:", "remove": "removed"}[command]
    assert r.exit_code == 130 and f"Interrupted after 'tiny' was {verb}" in r.stderr, r.output
    assert "Not finished: printing " in r.stderr and "nothing half-written" not in r.stderr and r.stdout == "", r.output
    if want is not None:
        assert f"sha256:{_sha(bundles[want][1])[:12]}" in r.stderr, r.stderr
    monkeypatch.undo()
    monkeypatch.setenv("EDGEMED_HOME", str(tmp_path / "home"))
    held = [row.get("digest") for row in Store().list()]
    assert held == ([] if want is None else ["sha256:" + _sha(bundles[want][1])]), held
    _assert_clean(Store())


def test_a_store_command_stopped_before_its_commit_point_still_says_nothing_changed(bundles, tmp_path, monkeypatch):
    """The other side of the same guard: a stop before the store changed anything (here as the store lock is
    taken) is reported as nothing half-written, and the model installed stays as it was."""
    monkeypatch.setenv("EDGEMED_HOME", str(tmp_path / "home"))
    Store().install(bundles["old"][0])

    def stopped(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Store, "locked", stopped)
    r = CliRunner().invoke(cli, ["install", str(bundles["new"][0]), "--force"])
    assert r.exit_code == 130 and "Interrupted; nothing half-written was left behind." in r.stderr, r.output
    monkeypatch.undo()
    monkeypatch.setenv("EDGEMED_HOME", str(tmp_path / "home"))
    assert [row.get("digest") for row in Store().list()] == ["sha256:" + _sha(bundles["old"][1])]
