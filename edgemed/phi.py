"""Keeping protected health information (prompts, answers, conversations) in memory, never on disk by accident.

A process that holds a clinician's text must not write it to a core file when it crashes: a core lands in the
process's working folder (for edgemed's worker processes, the folder holding the edgemed package: a checkout a
`git add .` would commit), in systemd-coredump's or apport's store, or wherever ``kernel.core_pattern`` sends it.
Nor may another process of the same user read that memory through ``ptrace`` (``gdb -p``, ``gcore``, py-spy).
Every edgemed process that holds such text (``run``, ``chat``, ``serve``, ``bench``, the template renderer and
grammar probe workers they start, the bench's measuring child) calls ``no_core_dumps`` first, as does the
self-test's child (a model-sized process whose crash is expected).

On Linux it marks the process not dumpable (``prctl(PR_SET_DUMPABLE, 0)``): the kernel writes no core of it and
refuses ``ptrace`` from anyone without ``CAP_SYS_PTRACE``, and the files under ``/proc/PID`` become root's (those
the whole system may read stay readable, its own ``status``, ``task/`` and ``cgroup`` among them, as do another
process's ``/proc/PID/task/*/stat`` CPU times; ``environ`` and ``io`` do not). The flag is not inherited across
``exec``, so each worker sets it itself. Everywhere with POSIX limits (Linux, macOS) it also sets the soft
core-file size limit to 0, which children do inherit. Each setting is read back, and what was read is logged in one
line; a setting that did not hold is a warning. ``$EDGEMED_ALLOW_CORE_DUMPS=1`` leaves both as the process started
with them, for debugging (a core file, gdb, py-spy). Decision 0024.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)

#: ``prctl`` options (linux/prctl.h).
_PR_GET_DUMPABLE, _PR_SET_DUMPABLE = 3, 4


def no_core_dumps(quiet: bool = False) -> bool | None:
    """Make this process write no core file and refuse same-user ``ptrace`` (see the module's docstring), then read
    both settings back. True: every setting this system has held; False: one did not (a warning says which); None:
    ``$EDGEMED_ALLOW_CORE_DUMPS=1`` asked to keep core dumps, and nothing was changed.

    The hard core-file limit is left as it is, so an operator who needs a core can start edgemed with
    ``EDGEMED_ALLOW_CORE_DUMPS=1``. ``quiet``: a worker process whose owner has logged the same already; only a
    setting that did not hold is said."""
    from edgemed import env

    if env.core_dumps_allowed():
        if not quiet:
            log.warning("core dumps allowed (%s=1): a crash, gcore or a debugger of this user can write the prompts "
                        "and answers this process holds to disk. Unset it outside debugging.", env.ALLOW_CORE_DUMPS_VAR)
        return None
    held, failed = [], []
    for name, setting in (("not dumpable", _not_dumpable), ("core file limit 0", _no_core_file)):
        outcome = setting()
        if outcome is True:
            held.append(name)
        elif outcome is not None:  # None: this system has no such setting
            failed.append(f"{name}: {outcome}")
    if failed:
        log.warning("core dumps may not be off (%s): a crash could write the prompts and answers this process holds to "
                    "disk. Fix: run edgemed where it may set its own limits (a container's seccomp profile or a "
                    "sandbox can refuse them), or turn core dumps off for the service (systemd: LimitCORE=0).",
                    "; ".join(failed))
        return False
    if not quiet:
        log.info("core dumps off (%s)", ", ".join(held) if held else "nothing to set on this system")
    return True


def _not_dumpable() -> bool | str | None:
    """Linux: ``PR_SET_DUMPABLE`` 0, read back with ``PR_GET_DUMPABLE``. True when it reads 0, None off Linux, else
    what went wrong."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import os

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return "the C library has no prctl"
    prctl.restype = ctypes.c_int
    zero = ctypes.c_ulong(0)  # PR_SET_DUMPABLE's value, and the arguments neither option reads
    if prctl(ctypes.c_int(_PR_SET_DUMPABLE), zero, zero, zero, zero) != 0:
        return f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(ctypes.get_errno())}"
    now = prctl(ctypes.c_int(_PR_GET_DUMPABLE), zero, zero, zero, zero)
    return True if now == 0 else f"PR_GET_DUMPABLE reads {now} after it was set to 0"


def _no_core_file() -> bool | str | None:
    """POSIX: the soft ``RLIMIT_CORE`` 0 (the hard one kept), read back. True when it reads 0, None where there are
    no such limits, else what went wrong."""
    try:
        import resource
    except ImportError:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        soft = resource.getrlimit(resource.RLIMIT_CORE)[0]
    except (ValueError, OSError) as exc:
        return f"setrlimit(RLIMIT_CORE) failed: {exc}"
    return True if soft == 0 else f"the soft RLIMIT_CORE reads {soft} after it was set to 0"
