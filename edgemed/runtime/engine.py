"""The one-sequence engine interface every backend (llama.cpp, ONNX Runtime) implements.

An engine owns one loaded model and one sequence at a time. It streams text pieces for a list of chat
messages (rendered with the model's own chat template) or for a raw prompt: ``edgemed run``/``chat``,
the quickstart and the benchmark harness use it. Several requests at once on one llama.cpp context are
the batching engine's (``runtime/batch``), which ``edgemed serve`` drives; both share ``LoadSettings``,
``GenerationSettings`` and ``check_fits`` from here.
Backends are picked from a table keyed by the model's on-disk form, not by if/elif chains, so a new
backend is one module and one table row.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generator, Protocol

from edgemed.constants import DEFAULT_KV_TYPE
from edgemed.errors import ContextOverflow, InputError
from edgemed.formats.sniff import model_format


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling and stopping settings for one generation. Greedy by default."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    #: Constrain the output: a JSON schema (JSON text). Engines with ``supports_grammar`` enforce it.
    json_schema: str | None = None
    #: Constrain the output: a GBNF grammar (llama.cpp). Engines with ``supports_grammar`` enforce it.
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InputError(f"max_tokens must be at least 1, got {self.max_tokens}.", "pass --max-tokens 1 or more")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:  # NaN fails this too
            raise InputError(f"temperature must be from 0 to {MAX_TEMPERATURE:g}, got {self.temperature}.",
                             "pass --temperature 0 for greedy decoding, up to 2 for more varied answers")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}.", "pass --top-p 1.0 to disable nucleus sampling")
        check_seed(self.seed, "seed")  # any caller's, not only the CLI's and the API's: never masked into another


#: Highest sampling temperature (OpenAI's bound): beyond it the answer is noise.
MAX_TEMPERATURE = 2.0

#: The highest seed that is a fixed seed: llama.cpp takes a seed as 32 bits, and 2^32 - 1 (what -1 becomes) as
#: "draw a random one", so a seed outside 0..MAX_SEED could not give its answer again, or would be another seed.
MAX_SEED = 2**32 - 2


def highest_seed(n: int = 1) -> int:
    """The highest seed of a generation of ``n`` choices: choice i samples with seed + i, and the last one's seed
    must be a fixed seed too (``MAX_SEED``)."""
    return MAX_SEED - (n - 1)


def seed_problem(seed: int, option: str = "--seed", n: int = 1) -> str | None:
    """What is wrong with ``seed`` (given as ``option``) as the sampling seed of ``n`` choices, in one sentence;
    None: it is a fixed seed every backend takes as it is. The fix is a seed from 0 to ``highest_seed(n)``: the CLI
    (``check_seed``) and the API (``serve.api``) say it in their own words around this one rule."""
    top = highest_seed(n)
    if 0 <= seed <= top:
        return None
    choices = f", with n={n} choices (choice i samples with seed + i)" if n > 1 else ""
    return (f"{option} {seed} is not a fixed seed: seeds are whole numbers from 0 to {top}{choices} (llama.cpp keeps "
            "32 bits of a seed and reads 4294967295 as 'pick one at random').")


#: Why a fixed seed is asked for, the end of both fixes (``check_seed``'s and the API's)
SEED_REPEATS = "the same seed and prompt give the same answer again"


def check_seed(seed: int, option: str = "--seed", n: int = 1) -> None:
    """Refuse a sampling seed that is not a fixed seed every backend takes as it is (``MAX_SEED``); with ``n``
    choices (choice i samples with seed + i), the last choice's seed too."""
    problem = seed_problem(seed, option, n)
    if problem is not None:
        raise InputError(problem, f"pass {option} from 0 to {highest_seed(n)}; {SEED_REPEATS}")


@dataclass(frozen=True)
class Finish:
    """How one generation ended: ``reason`` "eog" (the model ended its turn), "stop" (a stop string) or "length" (it
    sampled its ``max_tokens``: the text is cut there); ``tokens``: the tokens it sampled (an end-of-generation token
    not counted). Each backend's generator returns it (``finish = yield from engine.complete(...)``)."""

    reason: str
    tokens: int

    @property
    def cut(self) -> bool:
        return self.reason == "length"


@dataclass(frozen=True)
class LoadSettings:
    """How to load a model: threads, context, offload. Device profiles fill these in."""

    n_ctx: int = 4096
    n_threads: int | None = None
    n_threads_batch: int | None = None
    n_batch: int = 512
    n_ubatch: int = 512
    n_gpu_layers: int = 0
    flash_attn: bool = False
    type_k: str = DEFAULT_KV_TYPE
    type_v: str = DEFAULT_KV_TYPE
    use_mmap: bool = True
    use_mlock: bool = False
    seed: int = 0
    #: llama.cpp's extra CPU buffer types for the weights: auto, all, repack, none (runtime/buffers.py)
    extra_buffers: str = "auto"
    #: ONNX Runtime execution providers in order of preference (profile short names or full names; CPU is added last)
    providers: tuple[str, ...] = ()
    #: Backend-specific options (ONNX Runtime: ``profile``, a profiling file prefix).
    extra: dict = field(default_factory=dict)


def check_fits(n_prompt: int, settings: GenerationSettings, n_ctx: int) -> None:
    """Refuse, before generating, a prompt that leaves no room for ``max_tokens`` in the context window."""
    if n_prompt + settings.max_tokens > n_ctx:
        raise ContextOverflow(
            f"The prompt is {n_prompt} tokens; with max_tokens={settings.max_tokens} it needs "
            f"{n_prompt + settings.max_tokens}, more than the context window of {n_ctx}.",
            "shorten the prompt, lower --max-tokens, or load with a larger --ctx",
        )


class Engine(Protocol):
    """What the CLI and the benchmarks may rely on (the server uses ``runtime.batch.Batcher``)."""

    path: Path
    n_ctx: int
    #: Whether ``complete`` keeps the cells of the previous call's prompt where the new prompt starts with the same
    #: token ids, and feeds only the rest (a conversation's history; llama.cpp only). Settable: False feeds all.
    prefix_reuse: bool

    def chat(self, messages: list[dict], settings: GenerationSettings) -> Generator[str, None, Finish]:
        """Stream the assistant's reply to ``messages`` (rendered by the model's chat template)."""

    def complete(self, prompt: str, settings: GenerationSettings) -> Generator[str, None, Finish]:
        """Stream a continuation of a raw ``prompt``; the generator returns how it ended (``Finish``)."""

    def tokenize(self, text: str, add_special: bool = False) -> list[int]: ...

    def close(self) -> None: ...


# On-disk form -> module implementing ``load(path, LoadSettings) -> Engine``.
_BACKENDS: dict[str, str] = {
    "gguf": "edgemed.runtime.llama_engine",
    "onnx": "edgemed.runtime.onnx_engine",
}


def open_engine(path: Path | str, load: LoadSettings | None = None) -> Engine:
    """Load ``path`` with the backend its format needs."""
    path = Path(path)
    fmt = model_format(path)
    module_name = _BACKENDS.get(fmt)
    if module_name is None:
        raise InputError(
            f"No runtime backend for {fmt} models is installed in this edgemed.",
            f"supported formats: {', '.join(sorted(_BACKENDS))}",
        )
    module = importlib.import_module(module_name)
    return module.load(path, load or LoadSettings())
