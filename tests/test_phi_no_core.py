"""No core file of a process that holds clinicians' text: `run`, `chat`, `serve` and the workers they start set
the soft core-file limit to 0, whatever limit they were started with (a crash would write prompts and answers to
disk, for a worker into the folder holding the edgemed package)."""

from __future__ import annotations

import json
import resource
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
                            preexec_fn=_allow_cores, env=env.worker_env(), cwd=env.worker_cwd(), **kw)


def test_the_helper_lowers_the_soft_limit_only():
    code = ("import resource; from edgemed import phi; phi.no_core_dumps(); "
            "print(*resource.getrlimit(resource.RLIMIT_CORE))")
    out = subprocess.run([sys.executable, "-c", code], preexec_fn=_allow_cores, env=env.worker_env(),
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", str(HARD)]


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
    monkeypatch.setattr(phi, "no_core_dumps", lambda: calls.append(True))
    result = CliRunner().invoke(cli, [*command, str(tmp_path / "absent.gguf")])
    assert result.exit_code != 0 and calls == [True], result.output


def test_the_bench_child_lowers_it_itself(tmp_path, monkeypatch):
    """The measuring child holds the prompts and the replies: it lowers the limit before it reads them."""
    from edgemed.benchmarks.harness import child

    calls = []
    monkeypatch.setattr(phi, "no_core_dumps", lambda: calls.append(True))
    (tmp_path / "task.json").write_text("not json")
    with pytest.raises(ValueError):
        child.main([str(tmp_path / "task.json")])
    assert calls == [True]
