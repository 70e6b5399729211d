"""llama.cpp's own log, routed through Python logging (logger ``edgemed.llama_cpp``).

llama.cpp writes its log through one callback. llama-cpp-python installs a callback of its own that
prints to stderr, and its table of ggml log levels is one off (ggml: NONE 0, DEBUG 1, INFO 2, WARN 3,
ERROR 4, CONT 5; llama-cpp-python reads 3 as ERROR), so llama.cpp's warnings reached the terminal at
every verbosity. This module replaces that callback once per process:

============ ====================== ===============================
llama.cpp    Python level           shown by the CLI
============ ====================== ===============================
ERROR, WARN  INFO                   with ``-v``
INFO, DEBUG  DEBUG                  with ``-vv``
============ ====================== ===============================

A warning that matters to the user is restated in edgemed's words by the code that knows why it matters
(``llamacpp.Context`` for a context longer than the model was trained on), at WARNING. Pieces of a line
(``CONT``) are joined, so each record is one whole line of llama.cpp's.

Prompts and outputs never pass through llama.cpp's log; tensor names and file paths do, which is why even
these lines stay off the terminal unless asked for. One part of llama.cpp writes past the callback: its grammar
parser prints a grammar it rejects, whole, with ``fprintf(stderr)``, and a request's grammar is request text.
``stderr_silenced`` points C's ``stderr`` at the null device around that call.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import re
import sys
import threading

log = logging.getLogger("edgemed.llama_cpp")

#: ggml_log_level -> Python logging level (llama.cpp's ggml.h; CONT continues the previous record).
LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.INFO, 4: logging.INFO}
_CONT = 5

_lock = threading.Lock()
_pending: list[str] = []
_pending_level = logging.DEBUG
_callback = None  # the ctypes callback object: kept alive for as long as llama.cpp may call it
_watchers: list[tuple[int, re.Pattern, list]] = []  # (thread, pattern, matches): see watch()


def _emit(level: int, text: str) -> None:
    text = text.rstrip()
    if text:
        me = threading.get_ident()
        for thread, pattern, found in _watchers:
            if thread == me and (m := pattern.search(text)):
                found.append(m)
        log.log(level, "%s", text)


@contextlib.contextmanager
def watch(pattern: str):
    """Meanwhile, the matches of ``pattern`` in llama.cpp's log lines written from this thread are collected in the
    list yielded, whatever the log level: how a caller reads back what llama.cpp says it did (``install`` first)."""
    found: list[re.Match] = []
    entry = (threading.get_ident(), re.compile(pattern), found)
    with _lock:
        _watchers.append(entry)
    try:
        yield found
    finally:
        with _lock:
            _watchers.remove(entry)


def _on_log(level: int, text: bytes, _user_data) -> None:
    global _pending_level
    piece = (text or b"").decode("utf-8", "replace")
    with _lock:
        if level != _CONT:
            if _pending:  # a new record: whatever was pending is a whole line now
                _emit(_pending_level, "".join(_pending))
                _pending.clear()
            _pending_level = LEVELS.get(level, logging.DEBUG)
        _pending.append(piece)
        if piece.endswith("\n"):
            _emit(_pending_level, "".join(_pending))
            _pending.clear()


def install(llama_cpp) -> None:
    """Route llama.cpp's log through ``edgemed.llama_cpp`` (idempotent; ``llama_cpp``: the raw bindings)."""
    global _callback
    if _callback is not None:
        return
    callback = llama_cpp.llama_log_callback(_on_log)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _callback = callback


_swap_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _c_stderr():
    """``(libc's stderr FILE * variable, a FILE * on the null device)``, or None where that variable is not known
    to be writable (glibc names it ``stderr``, macOS ``__stderrp``; musl's is const)."""
    import platform

    name = "__stderrp" if sys.platform == "darwin" else "stderr" if platform.libc_ver()[0] == "glibc" else None
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(None)  # the process's own lookup: the executable's copy of the variable where it has one
        variable = ctypes.c_void_p.in_dll(libc, name)
        libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
        null = libc.fopen(os.devnull.encode(), b"w")
    except (OSError, ValueError, AttributeError):
        return None
    return (variable, null) if null else None


@contextlib.contextmanager
def stderr_silenced():
    """Meanwhile, what C code writes to stdio's ``stderr`` goes nowhere; Python's own ``sys.stderr`` writes to file
    descriptor 2 directly and is untouched. Where C's ``stderr`` cannot be swapped, descriptor 2 itself is pointed at
    the null device, and a line another thread writes to stderr in that moment (a few milliseconds) is lost."""
    handles = _c_stderr()
    with _swap_lock:
        if handles is not None:
            variable, null = handles
            saved = variable.value
            variable.value = null
            try:
                yield
            finally:
                variable.value = saved
            return
        saved_fd = os.dup(2)
        try:
            null_fd = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null_fd, 2)
            finally:
                os.close(null_fd)
            try:
                yield
            finally:
                os.dup2(saved_fd, 2)
        finally:
            os.close(saved_fd)
