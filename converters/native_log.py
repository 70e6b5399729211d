"""Keep llama.cpp's native log (printed by C code straight to the terminal) out of the
user's way unless edgemed runs with -vv."""

from __future__ import annotations

import contextlib
import logging


def verbose() -> bool:
    return logging.getLogger("edgemed").isEnabledFor(logging.DEBUG)


@contextlib.contextmanager
def quiet():
    """Silence C-level stdout/stderr for the block (llama.cpp loaders, quantizer)."""
    from llama_cpp import _logger
    from llama_cpp._utils import suppress_stdout_stderr

    _logger.set_verbose(verbose())
    with suppress_stdout_stderr(disable=verbose()):
        yield
