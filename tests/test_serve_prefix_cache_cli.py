"""``edgemed serve --prefix-cache-mib N`` / ``--no-prefix-cache``: the real command, in a child process, with the real
SmolLM2 GGUF. Its start-up line reads the host prefix cache back from the running batcher (``prefix_cache_bytes``),
and ``/health`` answers, so the size shown is the one the server runs with."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx2")

pytestmark = pytest.mark.slow


def _serve(model, home, *args: str, timeout: float = 120, probe=None) -> list[str]:
    """Start ``edgemed serve MODEL ARGS`` on a free port, wait for /health, call ``probe(url)``, stop it (SIGINT);
    its stderr lines, then its stdout lines."""
    cmd = [sys.executable, "-m", "edgemed", "serve", str(model), "--port", "0", "--slots", "1", "--no-ui",
           "--no-adapters", "--threads", "1", *args]
    env = dict(os.environ, EDGEMED_HOME=str(home))
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        url = None
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if line.startswith("OpenAI base_url: "):
                url = line.split()[2].removesuffix("/v1")
                break
        assert url, "\n".join(lines)
        for _ in range(100):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("the server did not answer /health")
        if probe is not None:
            probe(url)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, rest = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, rest = proc.communicate()
        lines += (rest or "").splitlines() + (out or "").splitlines()
    return lines


def _memory(lines: list[str]) -> str:
    found = [line for line in lines if line.startswith("memory plan: ")]
    assert len(found) == 1, "\n".join(lines)
    return found[0]


def test_the_option_reaches_the_batcher_and_the_plan(smollm2_gguf, tmp_path):
    line = _memory(_serve(smollm2_gguf, tmp_path, "--profile", "generic", "--prefix-cache-mib", "48"))
    assert line.endswith("; prefix cache 48 MiB host RAM"), line


def test_the_profile_size_is_the_default(smollm2_gguf, tmp_path):
    line = _memory(_serve(smollm2_gguf, tmp_path, "--profile", "generic"))
    assert line.endswith("; prefix cache 256 MiB host RAM"), line  # generic.toml: prefix_cache_mib = 256


def test_no_prefix_cache_turns_it_off_and_contradicting_options_are_refused(smollm2_gguf, tmp_path):
    line = _memory(_serve(smollm2_gguf, tmp_path, "--profile", "generic", "--no-prefix-cache"))
    assert line.endswith("; prefix cache off (--no-prefix-cache)"), line
    from click.testing import CliRunner

    from edgemed.cli import cli

    result = CliRunner().invoke(cli, ["serve", str(smollm2_gguf), "--no-prefix-cache", "--prefix-cache-mib", "64"])
    assert result.exit_code != 0
    assert "--no-prefix-cache and --prefix-cache-mib 64 contradict each other" in result.output


def test_an_asked_cache_larger_than_the_budget_is_refused_before_loading(smollm2_gguf, tmp_path):
    from click.testing import CliRunner

    from edgemed.cli import cli

    result = CliRunner().invoke(cli, ["serve", str(smollm2_gguf), "--port", "0", "--profile", "jetson-orin-nano-8gb",
                                      "--prefix-cache-mib", str(64 * 1024)])
    assert result.exit_code != 0
    assert "--prefix-cache-mib 65536 MiB" in result.output and "smaller --prefix-cache-mib" in result.output


def test_audit_rotation_reaches_the_running_log(smollm2_gguf, tmp_path):
    lines = _serve(smollm2_gguf, tmp_path / "home", "--audit-rotate-mib", "3")
    assert any(line.startswith("audit log ") and line.endswith("; a new file every 3 MiB") for line in lines), lines


def test_the_access_log_names_routes_not_what_a_client_wrote_in_a_url(smollm2_gguf, tmp_path):
    """uvicorn's access log (on by default) printed each request's raw path and query string, and took a loopback
    client's X-Forwarded-For as its address: text a client chose, in a log and in the audit record's "client"."""
    secret = "PATIENT-Jane-Roe-1954"

    def probe(url):
        for path in (f"/v1/models/{secret}?q={secret}", f"/{secret}", f"/admin/adapters/{secret}"):
            httpx.request("DELETE" if path.startswith("/admin") else "GET", url + path, timeout=10)
        httpx.get(url + "/v1/models", headers={"X-Forwarded-For": secret}, timeout=10)
        # and `serve` lets go of a client that never finishes its request head (transport.header_deadline)
        import socket

        from edgemed.serve.transport import HEADER_TIMEOUT_S

        host, port = url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=HEADER_TIMEOUT_S + 20) as held:
            held.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            start = time.monotonic()
            assert held.recv(1024) == b"" and time.monotonic() - start < HEADER_TIMEOUT_S + 10

    home = tmp_path / "home"
    lines = _serve(smollm2_gguf, home, "--prefix-cache-mib", "0", probe=probe)
    access = [line for line in lines if '"GET ' in line or '"DELETE ' in line]
    assert any('"GET /v1/models/{model_id:path} HTTP' in line for line in access), "\n".join(lines)
    assert any('"GET - HTTP' in line for line in access) and any('"GET /v1/models HTTP' in line for line in access)
    assert not [line for line in lines if secret in line], "\n".join(lines)
    audit = "".join(p.read_text() for p in (home / "audit").glob("*.jsonl"))
    assert '"client":"127.0.0.1"' in audit.replace(" ", "") and secret not in audit


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_ends_running_answers_with_a_503_and_records_them(smollm2_gguf, tmp_path, sig):
    """systemd and Docker stop a service with SIGTERM: uvicorn re-raised it once shut down and the process died by it,
    before the batcher or the audit log was closed (no final head line) and with the running requests unrecorded.
    Now either signal leaves running answers the grace period less a margin, then ends them with a 503 event, records
    them so, and exits 0 with the head line."""
    import json
    import threading

    home = tmp_path / "home"
    cmd = [sys.executable, "-m", "edgemed", "serve", str(smollm2_gguf), "--port", "0", "--slots", "1", "--no-ui",
           "--no-adapters", "--threads", "1", "--ctx", "2048", "--prefix-cache-mib", "0"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, EDGEMED_HOME=str(home)))
    events: list[str] = []
    try:
        url = None
        while url is None:
            line = proc.stderr.readline()
            assert line, "the server ended before listening"
            if line.startswith("OpenAI base_url: "):
                url = line.split()[2]
        body = {"model": "m", "stream": True, "max_tokens": 2000, "messages": [
            {"role": "user", "content": "Write a very long history of medicine, century by century."}]}
        started = threading.Event()

        def stream():
            with httpx.stream("POST", url + "/chat/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    events.append(line)
                    started.set()

        for _ in range(100):
            try:
                model = httpx.get(url + "/models", timeout=2).json()["data"][0]["id"]
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        body["model"] = model
        client = threading.Thread(target=stream)
        client.start()
        assert started.wait(60)
        limits = Path(f"/proc/{proc.pid}/limits")
        if limits.exists():  # a crash writes no core file of prompts and answers
            core = next(line for line in limits.read_text().splitlines() if line.startswith("Max core file size"))
            assert core.split()[4] == "0", core
        t0 = time.monotonic()
        proc.send_signal(sig)
        client.join(60)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert time.monotonic() - t0 < 30
    assert "(record it elsewhere)" in err, err  # the audit log was closed, its head shown
    errors = [json.loads(e[6:]) for e in events if e.startswith("data: {") and '"error"' in e]
    assert errors and errors[-1]["error"]["code"] == "unavailable", events[-3:]
    records = [json.loads(x) for p in (home / "audit").glob("*.jsonl") for x in p.read_text().splitlines()]
    requests = [r for r in records if r.get("kind") == "request" and r.get("endpoint") == "chat"]
    assert requests and requests[-1]["status"] == 503 and requests[-1]["error_code"] == "unavailable", requests


SLOW_LOAD = """
import sys, time
import edgemed.runtime.batch.batcher as b
real = b.Batcher.start
def slow(self):
    print("loading now", file=sys.stderr, flush=True)
    time.sleep(60)
    return real(self)
b.Batcher.start = slow
from edgemed.cli import cli
cli(sys.argv[1:], prog_name="edgemed")
"""


def test_sigterm_while_the_model_loads_closes_the_audit_log_and_exits_cleanly(smollm2_gguf, tmp_path):
    """A stop that arrives before the server listens: the audit log is closed with its head shown, nothing is
    served, and the exit is a clean one (not a traceback, not a death by the signal)."""
    home = tmp_path / "home"
    cmd = [sys.executable, "-c", SLOW_LOAD, "serve", str(smollm2_gguf), "--port", "0", "--slots", "1", "--no-ui",
           "--no-adapters", "--threads", "1", "--ctx", "512"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, EDGEMED_HOME=str(home)))
    try:
        seen = []
        while not seen or seen[-1] != "loading now":
            line = proc.stderr.readline()
            assert line, "\n".join(seen)
            seen.append(line.rstrip("\n"))
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped (SIGTERM) before serving" in err and "(record it elsewhere)" in err and "Traceback" not in err, err
    assert "OpenAI base_url" not in err
