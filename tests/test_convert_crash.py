"""`edgemed convert` killed with SIGKILL: mid-write, and at every filesystem step; the next run
leaves no debris and the output is always the old file or the new one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

import crash_kit  # noqa: E402
import tiny  # noqa: E402

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny.build_model(tmp_path_factory.mktemp("tiny") / "llama")


def _env(home: Path) -> dict:
    return {**os.environ, "EDGEMED_HOME": str(home), "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}


# A real `edgemed convert` whose tensor casts are slowed down, so that it can be killed while the .partial grows.
SLOW_CONVERT = """
import sys, time
import edgemed.converters.gguf.writer as g
real = g._cast
def slow(t, ty):
    time.sleep(0.15)
    return real(t, ty)
g._cast = slow
from edgemed.cli import cli
cli(sys.argv[1:])
"""


def _partials(folder: Path) -> list[Path]:
    """Files being written: a .partial output, or a file inside a .partial scratch folder (the intermediate GGUF)."""
    return [p for p in folder.rglob("*") if ".partial" in str(p.relative_to(folder)) and p.is_file() and p.stat().st_size > 0]


@pytest.mark.parametrize("quant", ["f16", "q8_0"])  # q8_0 also writes an intermediate GGUF in a scratch folder
def test_sigkill_mid_write_then_rerun_leaves_no_debris(model, tmp_path, quant):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "x.gguf"
    args = ["convert", str(model), "--quant", quant, "--no-parity", "-o", str(out)]
    child = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, *args], env=_env(tmp_path / "home"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not _partials(out_dir):
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "the .partial never grew"
            time.sleep(0.02)
        time.sleep(0.2)  # a few more tensors in
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    left = crash_kit.debris(out_dir)
    assert left and not out.exists()  # a real kill mid-write: debris, no output
    again = subprocess.run([sys.executable, "-c", "import sys; from edgemed.cli import cli; cli(sys.argv[1:])", *args],
                           env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert crash_kit.debris(out_dir) == [], "the next run did not sweep the killed run's debris"
    assert sorted(p.name for p in out_dir.iterdir()) == ["x.gguf", "x.gguf.report.json"]
    assert out.read_bytes()[:4] == b"GGUF"


def test_sigterm_mid_write_cleans_up_at_once(model, tmp_path):
    """SIGTERM (a service manager's stop) killed the process outright: its debris stayed until a later run swept it.
    Now it unwinds as Ctrl-C does (no debris, no output, a line saying so), then dies by the signal as before."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "x.gguf"
    child = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, "convert", str(model), "--quant", "q8_0", "--no-parity",
                              "-o", str(out)], env=_env(tmp_path / "home"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _partials(out_dir):
            assert child.poll() is None, child.stderr.read()
            assert time.monotonic() < deadline, "the .partial never grew"
            time.sleep(0.02)
        time.sleep(0.2)
        child.send_signal(signal.SIGTERM)
        err = child.communicate(timeout=120)[1]
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGTERM, err[-3000:]  # died by the signal, after its clean-up: a clean stop
    assert "Stopped (SIGTERM)" in err and "Traceback" not in err, err[-3000:]
    assert crash_kit.debris(out_dir) == [] and list(out_dir.iterdir()) == []


def test_convert_killed_at_every_step_leaves_old_or_new(model, tmp_path):
    out_dir = tmp_path / "work" / "out"
    out_dir.mkdir(parents=True)
    out = out_dir / "x.gguf"
    proc = subprocess.run([sys.executable, str(HERE / "crash_kit.py"), str(model), str(out)], env=_env(tmp_path / "home"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    head, kills, final = lines[0], lines[1:-1], lines[-1]
    names = head["steps"]
    assert {"debris.scratch", "atomic.written"} <= {s.split()[1] for s in names}, names
    assert len(kills) == len(names)
    for k in kills:
        where = names[k["n"] - 1]
        assert k["status"] == crash_kit.KILLED, where
        assert k["dest"] == head["reference"], where  # the whole output (old and new are the same bytes), never a part
        assert len(k["owners"]) <= 1, (where, k)  # this run's own debris at most: the earlier kills' were swept
    assert final["final"] == 0 and final["dest"] == head["reference"] and final["debris"] == []
