"""The server's options that ``edgemed serve`` and ``edgemed plan --serve`` both take, declared once: its slots, the
context of each, and the LoRA adapters it serves. ``plan --serve`` plans the server ``serve`` starts with the same
options, so each is read here, not from the other command (the memory plan itself is ``runtime.session.plan_load``'s).
"""

from __future__ import annotations

from pathlib import Path

import click

#: ``--slots``: the requests generated at once (continuous batching), each with a KV stream of its own
SLOTS = click.IntRange(1, 64)
DEFAULT_SLOTS = 4
#: ``--ctx`` of a server: tokens per slot (prompt + answer); fewer than 64 leave no room for an answer
CTX_PER_SLOT = click.IntRange(64)


def adapters_to_serve(ref, args, none: bool) -> dict:
    """The LoRA adapters a server for ``ref`` (``packaging.ref.ModelRef``) serves, name -> ``loader.AdapterSpec``:
    ``--adapter`` NAME|FILE[:SCALE] (a file is named after itself, less .lora.gguf), else every adapter
    ``packaging.ref`` finds for the model (``--no-adapters``: none). Two under one name, or ``--no-adapters`` with
    ``--adapter``, are refused."""
    from edgemed.errors import InputError
    from edgemed.packaging.ref import adapter_specs, adapters

    if none:
        if args:
            raise InputError("--no-adapters and --adapter contradict each other.", "pass one of them")
        return {}
    if not args:
        args = sorted(adapters(ref))
    specs = adapter_specs(ref, list(args))
    named: dict = {}
    for text, spec in zip(map(str, args), specs):
        head, sep, tail = text.rpartition(":")
        bare = head if sep and head and _is_number(tail) else text  # the argument less its :SCALE
        if "/" in bare or Path(bare).exists():  # a file: named after itself, less the adapter suffixes
            name = spec.path.name
            for suffix in (".gguf", ".lora"):
                name = name[:-len(suffix)] if name.endswith(suffix) else name
        else:
            name = bare
        if name in named:
            raise InputError(f"Two adapters would be served as '{name}'.", "rename one of the files, or pass each once")
        named[name] = spec
    return named


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
