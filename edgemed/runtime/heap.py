"""Hand freed heap memory back to the operating system (glibc's ``malloc_trim``).

A server that runs for days frees far more than it holds: llama.cpp rebuilds graph metadata (a few MB of small
allocations) each time the context's LoRA adapter set changes, and request handling frees tokens, text and
buffers on several threads. glibc keeps freed memory in its arenas for reuse, so it stays in the process's
resident size until ``malloc_trim`` returns the free pages; on a Jetson that memory is the GPU's too. The batcher
calls ``release`` when it goes idle after work, so the resident size reflects what is live between bursts.

Served figures with and without it are in decision 0014. Where the C library has no ``malloc_trim`` (musl, macOS)
``release`` does nothing and says so (None).

Written against ctypes rather than a package: one libc call, no dependency for it.
"""

from __future__ import annotations

import ctypes
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def release() -> bool | None:
    """Return free heap pages to the OS: True if some were, False if none could be, None where unsupported."""
    fn = _malloc_trim()
    return None if fn is None else bool(fn(0))
