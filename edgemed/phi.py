"""Keeping protected health information (prompts, answers, conversations) in memory, never on disk by accident.

A process that holds a clinician's text must not write it to a core file when it crashes: a core lands in the
process's working folder (for edgemed's worker processes, the folder holding the edgemed package: a checkout a
`git add .` would commit) or wherever ``kernel.core_pattern`` sends it, readable by whoever reads that folder.
Every edgemed process that holds such text (``run``, ``chat``, ``serve``, ``bench``, and the template renderer
and grammar probe workers they start) calls ``no_core_dumps`` first, as does the self-test's child (a model-sized
process whose crash is expected). It imports nothing of edgemed's.
"""

from __future__ import annotations


def no_core_dumps() -> None:
    """Set this process's soft core-file size limit to 0 (children inherit it); the hard limit is left as it is, so
    an operator who needs a core for a bug report can still raise it again in a shell of their own. Where there is
    no such limit (not POSIX), nothing to do."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    except (ImportError, ValueError, OSError):
        pass
