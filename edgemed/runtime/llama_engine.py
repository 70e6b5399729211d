"""GGUF engine on llama-cpp-python: owns one ``llama_cpp.Llama`` and streams text.

The chat template stored in the GGUF is rendered by llama-cpp-python's
sandboxed Jinja formatter (``create_chat_completion``), so the model sees the
exact prompt format it was trained with.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

from edgemed import env
from edgemed.errors import ModelLoadError, require
from edgemed.runtime.engine import GenerationSettings, LoadSettings, check_fits

log = logging.getLogger(__name__)

# KV cache type names (profiles, CLI) -> ggml type attribute in llama_cpp
KV_TYPES = {"f32": "GGML_TYPE_F32", "f16": "GGML_TYPE_F16", "bf16": "GGML_TYPE_BF16", "q8_0": "GGML_TYPE_Q8_0", "q4_0": "GGML_TYPE_Q4_0"}


def physical_cores() -> int:
    """Threads that help llama.cpp: physical cores, not SMT siblings (best effort, Linux)."""
    try:
        cores = set()
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            phys = core = None
            for line in fh:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    cores.add((phys, core))
        if cores:
            return len(cores)
    except OSError:
        pass
    return max(1, (os.cpu_count() or 2) // 2)


class LlamaEngine:
    """One loaded GGUF model."""

    supports_grammar = True  # GenerationSettings.json_schema / .grammar are enforced while sampling

    def __init__(self, path: Path, load: LoadSettings):
        env.enforce_offline()
        llama_cpp = require("llama_cpp", "gguf")
        self.path = path
        threads = load.n_threads or physical_cores()
        kwargs = dict(
            model_path=str(path),
            n_ctx=load.n_ctx,
            n_threads=threads,
            n_threads_batch=load.n_threads_batch or threads,
            n_batch=load.n_batch,
            n_ubatch=load.n_ubatch,
            n_gpu_layers=load.n_gpu_layers,
            flash_attn=load.flash_attn,
            type_k=getattr(llama_cpp, KV_TYPES[load.type_k]),
            type_v=getattr(llama_cpp, KV_TYPES[load.type_v]),
            use_mmap=load.use_mmap,
            use_mlock=load.use_mlock,
            seed=load.seed,
            verbose=False,
            **load.extra,
        )
        try:
            self.llm = llama_cpp.Llama(**kwargs)
        except ValueError as exc:  # llama-cpp-python reports load failures as ValueError
            raise ModelLoadError(
                f"llama.cpp could not load '{path}': {exc}.",
                "check that the file is a complete GGUF (compare its sha256 with the source), and that the build supports its quant type",
            ) from None
        self.n_ctx = self.llm.n_ctx()

    # -- generation ---------------------------------------------------------------------
    def _sampling(self, s: GenerationSettings) -> dict:
        return dict(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            repeat_penalty=s.repeat_penalty,
            seed=s.seed,
            stop=list(s.stop) or None,
            grammar=self._grammar(s),
        )

    def _grammar(self, s: GenerationSettings):
        if not (s.json_schema or s.grammar):
            return None
        from llama_cpp import LlamaGrammar

        if s.json_schema:
            return LlamaGrammar.from_json_schema(s.json_schema, verbose=False)
        return LlamaGrammar.from_string(s.grammar, verbose=False)

    def _check_fits(self, n_prompt: int, s: GenerationSettings) -> None:
        check_fits(n_prompt, s, self.n_ctx)

    def chat(self, messages: list[dict], settings: GenerationSettings) -> Iterator[str]:
        prompt = self.render_chat(messages)
        self._check_fits(len(self.tokenize(prompt, add_special=True, parse_special=True)), settings)
        stream = self.llm.create_chat_completion(messages=messages, stream=True, **self._sampling(settings))
        for chunk in stream:
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                yield piece

    def complete(self, prompt: str, settings: GenerationSettings) -> Iterator[str]:
        self._check_fits(len(self.tokenize(prompt, add_special=True)), settings)
        for chunk in self.llm.create_completion(prompt=prompt, stream=True, **self._sampling(settings)):
            piece = chunk["choices"][0]["text"]
            if piece:
                yield piece

    def render_chat(self, messages: list[dict]) -> str:
        """The prompt text the chat template produces (sandboxed Jinja, as llama-cpp-python renders it)."""
        from edgemed.runtime.chat_template import render

        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelLoadError(f"'{self.path}' has no chat template.", "use --prompt for raw completion, or convert with the tokenizer's chat template")
        vocab = self.llm
        return render(
            template,
            messages,
            eos_token=vocab.detokenize([vocab.token_eos()], special=True).decode("utf-8", "replace"),
            bos_token=vocab.detokenize([vocab.token_bos()], special=True).decode("utf-8", "replace"),
        )

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(path: Path, settings: LoadSettings) -> LlamaEngine:
    return LlamaEngine(path, settings)
