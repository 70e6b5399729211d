"""The one way edgemed loads a GGUF model that will compute: policy first, then the thin llama.cpp layer.

``llamacpp.Model`` loads exactly what it is given. Here, before it does, the host self-test
(``selftest.ensure``: a child process, its verdict cached per build, file and settings) says whether the
requested extra buffers survive on this host, and safer ones are chosen when they do not. The engines, the
batcher, parity, ``--quant auto``, the KLD anchor and the scorer all load through ``load_model``; only the
self-test's own child and tools that record crashes themselves use the layer directly.
"""

from __future__ import annotations

from pathlib import Path

from edgemed.runtime.engine import LoadSettings


def load_model(path: Path | str, load: LoadSettings | None = None):
    """A ``llamacpp.Model`` for ``path`` with the settings the self-test allows (``model.load`` holds them)."""
    from edgemed.formats.gguf_header import read_header
    from edgemed.runtime import llamacpp, selftest

    path = Path(path)
    tensors = read_header(path).tensors  # read once: the self-test's key and the repack overrides
    settings = selftest.ensure(path, load or LoadSettings(), tensors)
    return llamacpp.Model(path, settings, tensors=tensors)
