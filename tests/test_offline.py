"""`edgemed run` works with the network unavailable, and tells libraries to stay offline.

Two ways to take the network away: a socket guard installed in a fresh
interpreter before edgemed is imported (any connect or DNS lookup is recorded
and refused), and, where the kernel allows it, a new empty network namespace
(`unshare -rn`: not even loopback is up).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

GUARD = r'''
import atexit, os, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args)[:200])
    raise OSError("network disabled by the test guard")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
socket.gethostbyname = refuse
@atexit.register
def report():
    sys.stderr.write("GUARD attempts=%d HF_HUB_OFFLINE=%s\n" % (len(attempts), os.environ.get("HF_HUB_OFFLINE")))
from edgemed.cli import main
sys.argv = ["edgemed"] + sys.argv[1:]
main()
'''

ARGS = ["run", "--template", "mcq", "--question", "Which vitamin deficiency causes scurvy?",
        "--options", '{"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"}',
        "--max-tokens", "16", "--ctx", "512", "--threads", "1"]  # 1 thread: shared CI cores


def _env(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(EDGEMED_HOME=str(tmp_path / "home"), no_proxy="", http_proxy="http://203.0.113.1:9",
               https_proxy="http://203.0.113.1:9")
    return env


def test_run_with_a_socket_guard(smollm2_gguf, tmp_path):
    proc = subprocess.run([sys.executable, "-c", GUARD, ARGS[0], str(smollm2_gguf), *ARGS[1:]],
                          capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Parsed answer: " in proc.stdout
    assert "GUARD attempts=0 HF_HUB_OFFLINE=1" in proc.stderr


def _netns_available() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _netns_available(), reason="unshare -rn (user + network namespace) is not permitted here")
def test_run_in_an_empty_network_namespace(smollm2_gguf, tmp_path):
    probe = subprocess.run(["unshare", "-rn", sys.executable, "-c",
                            "import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)"],
                           capture_output=True, text=True)
    assert probe.returncode != 0  # the namespace really has no network
    proc = subprocess.run(["unshare", "-rn", sys.executable, "-m", "edgemed", ARGS[0], str(smollm2_gguf), *ARGS[1:]],
                          capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Parsed answer: " in proc.stdout
