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
these lines stay off the terminal unless asked for.
"""

from __future__ import annotations

import ctypes
import logging
import threading

log = logging.getLogger("edgemed.llama_cpp")

#: ggml_log_level -> Python logging level (llama.cpp's ggml.h; CONT continues the previous record).
LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.INFO, 4: logging.INFO}
_CONT = 5

_lock = threading.Lock()
_pending: list[str] = []
_pending_level = logging.DEBUG
_callback = None  # the ctypes callback object: kept alive for as long as llama.cpp may call it


def _emit(level: int, text: str) -> None:
    text = text.rstrip()
    if text:
        log.log(level, "%s", text)


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
