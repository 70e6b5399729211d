"""Keep llama.cpp's output out of the user's way during a conversion unless edgemed runs with -vv.

llama.cpp's log goes through edgemed's logging (``edgemed.runtime.native_log``); what the quantizer and
ggml print straight to the C streams, outside that log, is silenced for the block."""

from __future__ import annotations

import contextlib
import logging


def verbose() -> bool:
    return logging.getLogger("edgemed").isEnabledFor(logging.DEBUG)


@contextlib.contextmanager
def quiet():
    """Route llama.cpp's log through logging and silence C-level stdout/stderr for the block."""
    from llama_cpp._utils import suppress_stdout_stderr

    from edgemed.runtime.llamacpp import lib

    lib()  # installs the log route
    with suppress_stdout_stderr(disable=verbose()):
        yield
