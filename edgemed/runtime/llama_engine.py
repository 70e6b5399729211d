"""GGUF engine for run / chat / quickstart: one model and one single-sequence context of the llama.cpp layer.

Chat messages are rendered by the GGUF's own chat template (sandboxed Jinja with
limits, ``chat_template.py``), so the model sees the prompt format it was trained
with; text is produced by ``llamacpp.generate``, the one generation loop, which keeps the cells of the previous
prompt where the next one starts with the same ids (a chat's earlier turns are not computed again).
``model`` and ``ctx`` are public: the accuracy scorer and the timing loop drive
them directly rather than reaching into a library's private objects. LoRA adapters
(``adapters``: files or ``loader.AdapterSpec``) are checked against the base, loaded
through ``loader.load_adapters`` and applied to the one context.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Generator

from edgemed.runtime import llamacpp
from edgemed.runtime.loader import load_adapters, load_model
from edgemed.runtime.engine import Finish, GenerationSettings, LoadSettings

log = logging.getLogger(__name__)


class LlamaEngine:
    """One loaded GGUF model."""

    supports_grammar = True  # GenerationSettings.json_schema / .grammar are enforced while sampling
    prefix_reuse = True  # a prompt starting with the previous one's ids feeds only the rest (``llamacpp.generate``)

    def __init__(self, path: Path, load: LoadSettings, adapters=()):
        self.path = Path(path)
        self.model = load_model(self.path, load, adapters)
        self.adapters: list = []  # (llamacpp.Adapter, scale), applied to ctx
        try:
            self.load = self.model.load  # the self-test may have chosen safer buffers
            self.ctx = llamacpp.Context(self.model, self.load)
            self.adapters = load_adapters(self.model, adapters)
            if self.adapters:
                self.ctx.set_adapters(self.adapters)
        except BaseException:
            self.close()
            raise
        self.n_ctx = self.ctx.n_ctx

    def chat(self, messages: list[dict], settings: GenerationSettings) -> Generator[str, None, Finish]:
        return self.complete(self.render_chat(messages), settings)

    def complete(self, prompt: str, settings: GenerationSettings) -> Generator[str, None, Finish]:
        tokens = self.tokenize(prompt, add_special=True, parse_special=True)
        return llamacpp.generate(self.model, self.ctx, tokens, settings, reuse=self.prefix_reuse)

    def render_chat(self, messages: list[dict]) -> str:
        """The prompt text the GGUF's chat template produces."""
        return self.model.render_chat(messages)

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        return self.model.tokenize(text, add_special, parse_special)

    def detokenize(self, ids: list[int]) -> str:
        return self.model.detokenize(ids)

    def close(self) -> None:
        ctx, self.ctx = getattr(self, "ctx", None), None
        if ctx is not None:  # the context before its adapters, the adapters before their model
            ctx.close()
        for adapter, _ in getattr(self, "adapters", ()):
            adapter.close()
        self.adapters = []
        model, self.model = getattr(self, "model", None), None
        if model is not None:
            model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(path: Path, settings: LoadSettings, adapters=()) -> LlamaEngine:
    return LlamaEngine(path, settings, adapters)
