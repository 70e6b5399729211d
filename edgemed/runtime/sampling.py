"""Next-token choice from a logits vector (numpy): greedy, or temperature / top-k / top-p / min-p sampling.

Follows llama.cpp's order so the two backends behave alike for the same
``GenerationSettings``: repetition penalty over the last ``REPEAT_WINDOW`` tokens,
then top-k, temperature, top-p, min-p, and a draw from a seeded generator. ``grammar_text`` is the
GBNF a request is constrained by (llama.cpp's sampler chain applies it first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgemed.errors import InputError, TemplateError

if TYPE_CHECKING:
    from edgemed.runtime.engine import GenerationSettings

REPEAT_WINDOW = 64


class Sampler:
    def __init__(self, settings):
        import numpy as np

        self.s = settings
        self.rng = np.random.default_rng(settings.seed)

    def pick(self, logits, history: list[int]) -> int:
        import numpy as np

        s = self.s
        x = np.asarray(logits, dtype=np.float64).copy()
        if s.repeat_penalty != 1.0 and history:
            seen = np.unique(np.asarray(history[-REPEAT_WINDOW:], dtype=np.int64))
            v = x[seen]
            x[seen] = np.where(v > 0, v / s.repeat_penalty, v * s.repeat_penalty)
        if s.temperature == 0:
            return int(np.argmax(x))
        if 0 < s.top_k < x.size:
            kth = np.partition(x, -s.top_k)[-s.top_k]
            x[x < kth] = -np.inf
        x = x / s.temperature
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        if s.top_p < 1.0:
            order = np.argsort(-probs)
            cum = np.cumsum(probs[order])
            drop = order[(cum - probs[order]) >= s.top_p]  # keep the smallest prefix reaching top_p
            probs[drop] = 0.0
        if s.min_p > 0:
            probs[probs < s.min_p * probs.max()] = 0.0
        probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))


def grammar_text(settings: GenerationSettings) -> str | None:
    """The GBNF a request is constrained by: its grammar, or its JSON schema converted by llama-cpp-python."""
    if settings.grammar:
        return settings.grammar
    if settings.json_schema:
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        try:
            return json_schema_to_gbnf(settings.json_schema)
        except RecursionError:
            raise InputError("The JSON schema is nested too deeply to turn into a grammar.",
                             "send a flatter JSON schema") from None
        except Exception as exc:  # noqa: BLE001 - the converter asserts on schemas it does not know
            raise InputError(f"The JSON schema cannot be turned into a grammar: {type(exc).__name__} {exc}.",
                             "send a valid JSON schema (object types, properties, enums)") from None
    return None


def check_template_grammar(template) -> None:
    """Turn a JSON-contract template's schema into its grammar now: a schema llama-cpp-python's converter cannot take
    is refused when the template loads, naming the template's file, rather than at each request as the client's
    fault. Nothing to check without llama-cpp-python (an engine without grammars does not use it)."""
    schema = template.contract.json_schema()
    if schema is None:
        return
    try:
        import llama_cpp.llama_grammar  # noqa: F401
    except ImportError:
        return
    from edgemed.runtime.engine import GenerationSettings

    try:
        grammar_text(GenerationSettings(json_schema=schema))
    except InputError as exc:
        raise TemplateError(f"{template.source}: contract.schema: {exc.problem}",
                            f"fix 'contract.schema' in {template.source}") from None
