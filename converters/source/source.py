"""``Source``: what one command reads, opened once and handed down.

The checkpoint (``Checkpoint``, opened with the user's ``--allow-pickle`` consent or refused), the LoRA adapter
(``LoraAdapter``, opened and planned against that checkpoint, or None) and the consent itself. ``convert`` (both
routes) and ``check`` open one ``Source``; the writers, the parity reference, the importance matrix, the layered
reference and the memory budget read it, and none of them opens the adapter or the checkpoint again.

``as_source`` lets a library caller pass a ``Checkpoint`` (no adapter) or a bare directory instead: a directory is
opened without consent and without adapter, so pickle-only weights are refused with the paragraph every command
gives (``checkpoint.pickle_refused``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgemed.converters.source.checkpoint import Checkpoint


@dataclass(frozen=True)
class Source:
    checkpoint: Checkpoint
    adapter: "object | None" = None  # a LoraAdapter
    allow_pickle: bool = False  # the user's consent to pickle weights (--allow-pickle)

    @classmethod
    def open(cls, path: Path | str, *, lora: Path | str | None = None, allow_pickle: bool = False) -> "Source":
        """Open the checkpoint at ``path`` (with ``allow_pickle``), then the adapter at ``lora`` against it."""
        return cls.with_adapter(Checkpoint.open(path, allow_pickle=allow_pickle), lora, allow_pickle=allow_pickle)

    @classmethod
    def with_adapter(cls, ckpt: Checkpoint, lora: Path | str | None, *, allow_pickle: bool | None = None) -> "Source":
        """``ckpt`` (already opened and checked) with the adapter at ``lora`` opened and planned against it.
        ``allow_pickle``: the consent ``ckpt`` was opened with (default: whether it has pickle weights)."""
        adapter = None
        if lora is not None:
            from edgemed.converters.source.lora import LoraAdapter

            adapter = LoraAdapter.open(lora, ckpt)
        return cls(ckpt, adapter, bool(ckpt.pickle_files) if allow_pickle is None else allow_pickle)

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    def warn_base(self, echo) -> None:
        """The adapter's warning that it names another base model, if it has one."""
        if self.adapter is not None:
            self.adapter.warn_base(echo)


def as_source(source: "Source | Checkpoint | Path | str") -> Source:
    """``source`` if it is an opened ``Source``; a ``Checkpoint`` without adapter; else the directory opened without
    consent and without adapter (pickle-only weights refused by ``pickle_refused``)."""
    if isinstance(source, Source):
        return source
    if isinstance(source, Checkpoint):
        return Source(source, None, bool(source.pickle_files))
    return Source.open(source)
