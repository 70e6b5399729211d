"""`edgemed run` works with the network unavailable, and tells libraries to stay offline; `edgemed convert` keeps
huggingface_hub offline whatever HF_HUB_OFFLINE the user left set, unless EDGEMED_ALLOW_NETWORK=1.

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


# At exit: the offline switch huggingface_hub settled on when it was imported (what its downloads obey), and the
# variable as the process left it. ``python -c`` so the wrapper runs the real entry point, ``edgemed.cli.main``.
HUB_AT_EXIT = r'''
import atexit, os, sys
@atexit.register
def report():
    hub = sys.modules.get("huggingface_hub.constants")
    sys.stderr.write("HUB offline=%s imported=%s env=%s\n" % (getattr(hub, "HF_HUB_OFFLINE", None), hub is not None,
                                                             os.environ.get("HF_HUB_OFFLINE")))
from edgemed.cli import main
sys.argv = ["edgemed"] + sys.argv[1:]
main()
'''


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from conftest import need_converter

    need_converter()
    import tiny

    return tiny.build_model(tmp_path_factory.mktemp("offline") / "llama", "llama")


@pytest.mark.parametrize("user, allowed, offline", [
    ({}, False, True),
    ({"HF_HUB_OFFLINE": "0"}, False, True),  # left from other work: huggingface_hub read it before TRANSFORMERS_OFFLINE
    ({"HF_HUB_OFFLINE": "0"}, True, False),  # EDGEMED_ALLOW_NETWORK=1: the user's own setting stands
])
def test_convert_keeps_huggingface_hub_offline(tiny_checkpoint, tmp_path, user, allowed, offline):
    """`edgemed convert` imported transformers (and with it huggingface_hub, which reads HF_HUB_OFFLINE once, at its
    import) before the converter set the offline variables, and set them only where unset: the hub stayed online,
    and a user's HF_HUB_OFFLINE=0 kept it so. The CLI now sets them before any command loads, overriding a 0 with a
    warning, unless EDGEMED_ALLOW_NETWORK=1."""
    env = _env(tmp_path)
    env.pop("EDGEMED_ALLOW_NETWORK", None)
    env.update(user, **({"EDGEMED_ALLOW_NETWORK": "1"} if allowed else {}))
    out = tmp_path / "tiny.gguf"
    proc = subprocess.run([sys.executable, "-c", HUB_AT_EXIT, "convert", str(tiny_checkpoint), "--quant", "f16",
                           "--no-parity", "-o", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.is_file()
    env_after = user.get("HF_HUB_OFFLINE", "None") if allowed else "1"
    assert f"HUB offline={offline} imported=True env={env_after}" in proc.stderr, proc.stderr[-3000:]
    told = "HF_HUB_OFFLINE='0' in the environment would let Hugging Face libraries reach the network"
    assert (told in proc.stderr) == (bool(user) and not allowed)
    if told in proc.stderr:
        assert "EDGEMED_ALLOW_NETWORK=1" in proc.stderr


def _restored_after(monkeypatch):
    """Every variable and hub switch ``enforce_offline`` writes, put back as they were after the test."""
    from edgemed import env

    for key in (*env._OFFLINE_VARS, env.ALLOW_NETWORK_VAR):
        monkeypatch.delenv(key, raising=False)
    hub = sys.modules.get("huggingface_hub.constants")
    for name in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        if hasattr(hub, name):
            monkeypatch.setattr(hub, name, getattr(hub, name))


def test_enforce_offline_sets_the_variables_outright_and_says_which_it_overrode(monkeypatch, caplog):
    from edgemed import env

    _restored_after(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "false")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")  # on already: set to 1 without a word
    with caplog.at_level("WARNING", logger="edgemed"):
        env.enforce_offline()
    import os

    assert [os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DO_NOT_TRACK")] == ["1", "1", "1"]
    told = [r.getMessage() for r in caplog.records]
    assert len(told) == 1 and told[0].startswith("HF_HUB_OFFLINE='false' in the environment") and \
        "EDGEMED_ALLOW_NETWORK=1" in told[0]
    monkeypatch.setenv("EDGEMED_ALLOW_NETWORK", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    env.enforce_offline()
    assert os.environ["HF_HUB_OFFLINE"] == "0"  # allowed deliberately: the user's setting stands


def test_enforce_offline_turns_on_a_hub_imported_before_it(monkeypatch):
    """A library caller that imported transformers first: huggingface_hub has read its switches already, so setting
    the variables alone would leave it online."""
    constants = pytest.importorskip("huggingface_hub.constants")
    from edgemed import env

    _restored_after(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", False)
    env.enforce_offline()
    assert constants.HF_HUB_OFFLINE is True and constants.HF_HUB_DISABLE_TELEMETRY is True
    import huggingface_hub

    assert huggingface_hub.is_offline_mode()
