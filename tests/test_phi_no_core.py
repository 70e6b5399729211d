"""No core file of a process that holds clinicians' text: `run`, `chat`, `serve`, `bench` and the workers they start
set the soft core-file limit to 0, whatever limit they were started with (a crash would write prompts and answers to
disk, for a worker into the folder holding the edgemed package), and on Linux make themselves not dumpable (no core
through a pipe to systemd-coredump or apport either, no gcore or gdb of the same user); each reads both back.
``EDGEMED_ALLOW_CORE_DUMPS=1`` keeps them as the process started, for debugging. Decision 0024."""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgemed import env, phi
from edgemed.cli import cli

HARD = resource.getrlimit(resource.RLIMIT_CORE)[1]
pytestmark = [
    pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc/PID/limits (Linux)"),
    pytest.mark.skipif(HARD == 0, reason="the hard core-file limit here is 0: no process can write a core to stop"),
]


def _allow_cores():
    """A shell with `ulimit -c unlimited` (as far as the hard limit goes): what the process starts with."""
    resource.setrlimit(resource.RLIMIT_CORE, (HARD, HARD))


def _soft_core_limit(pid: int) -> str:
    line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if x.startswith("Max core file size"))
    return line.split()[4]


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _start(args, **kw) -> subprocess.Popen:
    return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            preexec_fn=_allow_cores, env=_env(), cwd=env.worker_cwd(), **kw)


#: A child's own reading of what ``no_core_dumps`` set: prctl(PR_GET_DUMPABLE), then the soft and hard core limits.
READ_BACK = ("import ctypes, resource; "
             "print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0), *resource.getrlimit(resource.RLIMIT_CORE))")


def _env(**environ) -> dict:
    """A worker's environment without the developer's own opt-out, with ``environ`` added."""
    return {**{k: v for k, v in env.worker_env().items() if k != env.ALLOW_CORE_DUMPS_VAR}, **environ}


def _child(code: str, **environ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], preexec_fn=_allow_cores, env=_env(**environ),
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_helper_turns_dumps_off_and_lowers_the_soft_limit_only():
    ran = _child(f"from edgemed import phi; print(phi.no_core_dumps()); {READ_BACK}")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["True", "0", "0", str(HARD)], ran.stdout


def _command_child(args: list[str], **environ) -> tuple[list[str], str]:
    """``edgemed -v ARGS`` run in a child process of its own (it changes the process it runs in), then that process's
    own reading of its dumpable flag and core limits; and what the command said."""
    code = ("import json, sys; from click.testing import CliRunner; from edgemed.cli import cli; "
            f"r = CliRunner().invoke(cli, ['-v', *json.loads(sys.argv[1])]); print(json.dumps(r.output)); {READ_BACK}")
    ran = subprocess.run([sys.executable, "-c", code, json.dumps(args)], preexec_fn=_allow_cores,
                         env=_env(**environ), capture_output=True, text=True, timeout=120, check=False)
    assert ran.returncode == 0, ran.stderr
    said, read = ran.stdout.splitlines()
    return read.split(), json.loads(said)


COMMANDS = [["run", "--prompt", "hello"], ["chat"], ["serve", "--port", "1"], ["bench", "run"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_each_command_reads_back_dumps_off_and_says_so(command, tmp_path):
    read, said = _command_child([*command, str(tmp_path / "absent.gguf")])
    assert read == ["0", "0", str(HARD)], said
    assert "core dumps off (not dumpable, core file limit 0)" in said, said


@pytest.mark.parametrize("command", COMMANDS[:3:2], ids=lambda c: c[0])
def test_the_opt_out_keeps_dumps_as_the_process_started(command, tmp_path):
    read, said = _command_child([*command, str(tmp_path / "absent.gguf")], EDGEMED_ALLOW_CORE_DUMPS="1")
    assert read == ["1", str(HARD), str(HARD)], said
    assert "core dumps allowed (EDGEMED_ALLOW_CORE_DUMPS=1)" in said, said


def test_an_opt_out_that_is_not_1_or_0_is_refused_before_anything_changes(tmp_path):
    read, said = _command_child(["run", "--prompt", "hello", str(tmp_path / "absent.gguf")],
                                EDGEMED_ALLOW_CORE_DUMPS="yes")
    assert "EDGEMED_ALLOW_CORE_DUMPS must be 1" in said and "'yes'" in said, said
    assert read == ["1", str(HARD), str(HARD)], said


def _as_nobody() -> list[str]:
    """The words that start a program as a user of no privilege: root drops to nobody (``setpriv``, which keeps root's
    access until the program starts: this Python may live under root's own folder); any other user runs as itself."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux) to start a process as nobody")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_not_dumpable_keeps_its_own_proc_reads_and_the_benchmarks_per_thread_cpu():
    """Not dumpable, the files of /proc/PID become root's. What edgemed reads of its own (VmLck, VmHWM, the threads,
    the cgroup) still reads as a user of no privilege, and so does what the serve benchmarks read of a server started
    by the same user (per-thread CPU, ``thread_split``); gdb or gcore of that user can no longer attach."""
    nobody = _as_nobody()
    server = ("import json, threading, time\n"
              "from edgemed import phi\n"
              "held = phi.no_core_dumps()\n"
              "from edgemed.benchmarks.harness.child import peak_rss_bytes\n"
              "from edgemed.devices.facts import Host\n"
              "from edgemed.runtime.llamacpp import locked_bytes\n"
              "from edgemed.runtime.onnx_engine import os_threads\n"
              "def spin():\n"
              "    end = time.process_time() + 0.3\n"
              "    while time.process_time() < end: pass\n"
              "    time.sleep(120)\n"
              "threading.Thread(target=spin, daemon=True).start()\n"
              "time.sleep(0.5)\n"
              "print(json.dumps({'held': held, 'locked': locked_bytes(), 'peak': peak_rss_bytes(), 'threads': "
              "os_threads(), 'cgroup': Host().read('/proc/self/cgroup') is not None, "
              "'mountinfo': Host().read('/proc/self/mountinfo') is not None}), flush=True)\n"
              "import sys; sys.stdin.read()\n")
    proc = subprocess.Popen([*nobody, sys.executable, "-c", server], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_allow_cores, env=_env(),
                            cwd=env.worker_cwd())
    try:
        own = json.loads(proc.stdout.readline() or "null")
        assert own is not None, proc.stderr.read() if proc.poll() is not None else "no line"
        assert own["held"] is True and own["locked"] is not None and own["peak"] > 0, own
        assert own["threads"] >= 2 and own["cgroup"] and own["mountinfo"], own
        uid = Path(f"/proc/{proc.pid}").stat().st_uid  # the /proc/PID folder keeps its owner; its files do not
        assert uid != 0 and Path(f"/proc/{proc.pid}/status").stat().st_uid == 0  # not dumpable, seen from outside
        reader = ("import json, sys, types\n"
                  "from edgemed.benchmarks.serve_bench_client import EdgemedServer\n"
                  "server = object.__new__(EdgemedServer)\n"
                  "server.proc = types.SimpleNamespace(pid=int(sys.argv[1]))\n"
                  "try:\n"
                  "    open(f'/proc/{sys.argv[1]}/environ').close(); environ = 'read'\n"
                  "except PermissionError:\n"
                  "    environ = 'refused'\n"
                  "print(json.dumps({'threads': server.thread_cpu(), 'cpu': server.cpu_seconds(), 'environ': environ}))\n")
        ran = subprocess.run([*nobody, sys.executable, "-c", reader, str(proc.pid)], capture_output=True, text=True,
                             env=env.worker_env(), cwd=env.worker_cwd(), timeout=60, check=False)
        assert ran.returncode == 0, ran.stderr
        seen = json.loads(ran.stdout)
        assert len(seen["threads"]) >= 2 and max(seen["threads"].values()) >= 0.1 and seen["cpu"] >= 0.1, seen
        assert seen["environ"] == "refused", seen  # same user, no longer allowed into its memory
    finally:
        proc.kill()
        proc.wait()


def test_run_and_its_template_worker_write_no_core(tmp_path):
    """`edgemed run` waiting for its prompt on standard input, its template renderer already started."""
    proc = _start([sys.executable, "-m", "edgemed", "run", str(tmp_path / "model.gguf")])
    try:
        deadline = time.monotonic() + 60
        while not _children(proc.pid) and time.monotonic() < deadline:
            assert proc.poll() is None, "run ended before it read its prompt"
            time.sleep(0.1)
        workers = _children(proc.pid)
        assert workers, "the template renderer did not start"
        assert _soft_core_limit(proc.pid) == "0"
        assert all(_soft_core_limit(pid) == "0" for pid in workers)
    finally:
        proc.kill()
        proc.wait()


def test_the_template_worker_lowers_it_itself():
    """Started by something that did not (a future caller), the renderer still writes no core."""
    from edgemed.templates.limits import MAX_MEMORY_BYTES, MAX_RECURSION

    proc = _start([sys.executable, "-m", "edgemed.templates.worker", str(MAX_MEMORY_BYTES), str(MAX_RECURSION)])
    try:
        size = struct.unpack(">I", proc.stdout.read(4))[0]
        assert json.loads(proc.stdout.read(size)) == {"ready": True}
        assert _soft_core_limit(proc.pid) == "0"
    finally:
        proc.kill()
        proc.wait()


def test_the_grammar_probe_worker_lowers_it_itself(smollm2_gguf):
    proc = _start([sys.executable, "-m", "edgemed.runtime.grammar_probe", str(smollm2_gguf), "8"], text=True)
    try:
        assert json.loads(proc.stdout.readline())["ready"]
        assert _soft_core_limit(proc.pid) == "0"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("command", [["chat"], ["serve", "--port", "1"], ["bench", "run"]])
def test_chat_serve_and_bench_lower_it_before_they_load_a_model(command, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(phi, "no_core_dumps", lambda quiet=False: calls.append(quiet))
    result = CliRunner().invoke(cli, [*command, str(tmp_path / "absent.gguf")])
    assert result.exit_code != 0 and calls == [False], result.output  # the command says it; its workers stay quiet


def test_the_bench_child_lowers_it_itself(tmp_path, monkeypatch):
    """The measuring child holds the prompts and the replies: it lowers the limit before it reads them."""
    from edgemed.benchmarks.harness import child

    calls = []
    monkeypatch.setattr(phi, "no_core_dumps", lambda quiet=False: calls.append(quiet))
    (tmp_path / "task.json").write_text("not json")
    with pytest.raises(ValueError):
        child.main([str(tmp_path / "task.json")])
    assert calls == [True]
