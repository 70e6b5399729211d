"""Helpers for the kill-at-every-step tests.

``killed_at(fn, n)`` runs ``fn`` in a forked child with ``$EDGEMED_TEST_KILL_AT=n``: the
child SIGKILLs itself at its n-th filesystem step (edgemed.files.debris.step), the way
``strace -e inject=...:signal=KILL:when=n`` would, and nothing of it runs after that
(no finally, no atexit). ``steps(fn)`` lists the steps a clean run takes.

Run as a script, it is the convert driver: one process that imports torch and llama.cpp
once, then forks a child per injected kill (the driver itself never computes, so forking
is safe), and prints one JSON line per step.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import traceback
from pathlib import Path

KILLED = -9
_TAGGED = re.compile(r"\..+\.edgemed-([0-9a-f]{16})\.[0-9a-z]{8}.*\.partial|\.edgemed-([0-9a-f]{16})\.lock")


def killed_at(fn, n: int, log: Path | None = None) -> int:
    """Run ``fn()`` in a forked child that is killed at step ``n`` (0: never); -9 if killed, else its exit code."""
    from edgemed import env

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 3
        try:
            os.environ[env.KILL_AT_VAR] = str(n)
            if log is not None:
                os.environ[env.STEP_LOG_VAR] = str(log)
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


#: ``edgemed`` whose injected kill (``$EDGEMED_TEST_KILL_AT``) is a SIGTERM: a service manager's stop, which the CLI
#: turns into ``Terminated`` where the command is, rather than SIGKILL's end with nothing run after it
_TERMINATED_CLI = ("import signal, types\n"
                   "import edgemed.files.debris as debris\n"
                   "debris.signal = types.SimpleNamespace(SIGKILL=signal.SIGTERM)\n"
                   "from edgemed.cli import main\nmain()\n")


def terminated_at(args: list[str], n: int, log: Path | None = None):
    """Run ``edgemed ARGS`` in a child process that sends itself SIGTERM at its n-th filesystem step (0: never);
    returns the ``subprocess.CompletedProcess`` (its stdout and stderr as text)."""
    import subprocess

    from edgemed import env

    extra = {env.KILL_AT_VAR: str(n), **({env.STEP_LOG_VAR: str(log)} if log is not None else {})}
    return subprocess.run([sys.executable, "-c", _TERMINATED_CLI, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **extra}, check=False)


def steps(fn, tmp: Path) -> list[str]:
    """The filesystem steps a clean run of ``fn`` takes (it must succeed)."""
    log = tmp / f"steps-{os.getpid()}-{len(list(tmp.glob('steps-*')))}.log"
    assert killed_at(fn, 0, log) == 0, "the clean run failed"
    return log.read_text().splitlines() if log.exists() else []


def debris(folder: Path) -> list[str]:
    """Every owner-tagged temporary name in ``folder`` (recursively)."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob(".*") if _TAGGED.fullmatch(p.name))


def owners(folder: Path) -> set[str]:
    """The distinct owners whose debris or lock files are in ``folder``."""
    return {next(g for g in _TAGGED.fullmatch(Path(d).name).groups() if g) for d in debris(folder)}


def sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _convert_driver(src: str, out: str) -> None:
    """For each step of ``convert --force``: kill a child there, report the state it left."""
    import llama_cpp  # noqa: F401  (loaded once here; the children reuse it)
    import torch  # noqa: F401

    from edgemed.converters.pipeline import ConvertOptions, convert

    out_p = Path(out)

    def run() -> None:
        convert(Path(src), out_p, ConvertOptions(out_type="f16", parity=False, force=True), echo=lambda s: None)

    names = steps(run, out_p.parent.parent)
    reference = sha(out_p)
    print(json.dumps({"steps": names, "reference": reference}), flush=True)
    for n in range(1, len(names) + 1):
        status = killed_at(run, n)
        print(json.dumps({"n": n, "status": status, "dest": sha(out_p), "owners": sorted(owners(out_p.parent))}), flush=True)
    status = killed_at(run, 0)  # the next run, after the last kill
    print(json.dumps({"final": status, "dest": sha(out_p), "debris": debris(out_p.parent)}), flush=True)


if __name__ == "__main__":
    _convert_driver(sys.argv[1], sys.argv[2])
