"""Logits of a GGUF for whole token sequences: the one place edgemed computes them.

Parity (``converters/quality/parity.py``), ``--quant auto``'s reference and candidates
(``converters/gguf/auto_quant.py``), the KLD anchor against llama-perplexity and the benchmark scorer's
whole-sequence path all read every row's logits through here, so they load, size and evaluate alike:

- the model is loaded through ``loader.load_model`` (the host self-test is consulted first);
- the context holds the longest sequence (``n_ctx``: the longest + ``CTX_MARGIN`` unless given), and one
  batch and one micro-batch take a whole sequence (``n_batch = n_ubatch = n_ctx``);
- each sequence is evaluated from an empty cache (``rows``), and its ``[n, vocab]`` float32 rows returned.

``rows`` is the only caller of ``llamacpp.Context.eval(..., all_rows=True)`` outside the layer itself (a test
scans the source for others). ``SequenceLogits`` keeps one loaded model and context for many sequences;
``gguf_logits`` is the whole thing for a list of sequences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

#: The weights' CPU placement unless a caller asks for another (``runtime/buffers.py``'s modes). "none": the
#: file's weights are computed where they are mapped. The CPU repack ("auto") would make an anonymous copy of
#: every Q4_0/Q4_K tensor beside the mapping (3.0 GiB for a 7B Q4_K_M) for a few sequences' worth of speed,
#: and both paths compute the same quantized weights. A caller that must match another tool's kernels (the KLD
#: anchor matches llama-perplexity's placement) passes its mode explicitly.
EXTRA_BUFFERS = "none"
#: Flash attention off: llama.cpp's plain attention, as llama-perplexity runs it by default on the CPU.
FLASH_ATTN = False
#: Cells beyond the longest sequence when ``n_ctx`` is not given.
CTX_MARGIN = 8


def rows(ctx, tokens: list[int]):
    """float32 logits ``[len(tokens), vocab]`` of every position of ``tokens``, from an empty cache of ``ctx``
    (a ``llamacpp.Context``; its sequence 0 then holds ``tokens``)."""
    ctx.clear()
    return ctx.eval(list(tokens), 0, all_rows=True)


class SequenceLogits:
    """One GGUF loaded (through ``load_model``) with a context of ``n_ctx`` cells; ``self(tokens)`` is ``rows``.

    ``threads``: llama.cpp's threads for both single tokens and batches (None: the physical cores).
    ``extra_buffers``, ``flash_attn``: see ``EXTRA_BUFFERS`` and ``FLASH_ATTN``. Close it (or use ``with``)."""

    def __init__(self, path: Path | str, n_ctx: int, *, threads: int | None = None, extra_buffers: str = EXTRA_BUFFERS,
                 flash_attn: bool = FLASH_ATTN):
        from edgemed.runtime import llamacpp
        from edgemed.runtime.engine import LoadSettings
        from edgemed.runtime.loader import load_model

        load = LoadSettings(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads, n_threads_batch=threads,
                            flash_attn=flash_attn, extra_buffers=extra_buffers)
        self.model = load_model(path, load)
        try:
            self.ctx = llamacpp.Context(self.model, self.model.load, n_ctx=n_ctx, n_batch=n_ctx, threads=threads)
        except BaseException:
            self.model.close()
            raise
        self.n_vocab = self.model.n_vocab

    def __call__(self, tokens: list[int]):
        return rows(self.ctx, tokens)

    def close(self) -> None:
        ctx, self.ctx = getattr(self, "ctx", None), None
        if ctx is not None:
            ctx.close()
        model, self.model = getattr(self, "model", None), None
        if model is not None:
            model.close()

    def __enter__(self) -> "SequenceLogits":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def gguf_logits(path: Path | str, token_lists: Iterable[list[int]], *, threads: int | None = None,
                extra_buffers: str = EXTRA_BUFFERS, flash_attn: bool = FLASH_ATTN,
                n_ctx: int | None = None) -> Iterator:
    """float32 ``[len(tokens), vocab]`` logits of ``path`` for each of ``token_lists``, one at a time (a generator:
    one sequence's rows are alive while the caller uses them). The model is loaded once, with a context of
    ``n_ctx`` cells (default: the longest list + ``CTX_MARGIN``), and closed after the last list."""
    token_lists = [list(t) for t in token_lists]
    if not token_lists:
        return
    with SequenceLogits(path, n_ctx or max(len(t) for t in token_lists) + CTX_MARGIN, threads=threads,
                        extra_buffers=extra_buffers, flash_attn=flash_attn) as run:
        for tokens in token_lists:
            yield run(tokens)
