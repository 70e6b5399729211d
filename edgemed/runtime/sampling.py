"""Next-token choice from a logits vector (numpy): greedy, or temperature / top-k / top-p / min-p sampling.

Follows llama.cpp's order so the two backends behave alike for the same
``GenerationSettings``: repetition penalty over the last ``REPEAT_WINDOW`` tokens,
then top-k, temperature, top-p, min-p, and a draw from a seeded generator. ``grammar_text`` is the
GBNF a request is constrained by (llama.cpp's sampler chain applies it first).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from edgemed.errors import InputError, TemplateError
from edgemed.runtime.schema_bounds import contradiction, names_size, shown
from edgemed.runtime.schema_check import MAX_SCHEMA_COUNT, MAX_SCHEMA_SIZE, grammar_size

if TYPE_CHECKING:
    from edgemed.runtime.engine import GenerationSettings

REPEAT_WINDOW = 64


class SchemaError(InputError):
    """A request's JSON schema that cannot become a grammar: a server names the field that sent it (``param``)."""


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


#: Largest GBNF handed to llama.cpp, characters (a request body is at most 1 MiB by default).
MAX_GRAMMAR_CHARS = 1 << 20
#: Deepest nesting of ( ) groups: llama.cpp parses a grammar by recursion, and ~20,000 levels overflow an 8 MiB stack
#: (a segfault that takes the server down). A JSON schema's maxLength n nests about n groups.
MAX_GRAMMAR_DEPTH = 1024
_SCHEMA_COUNTS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")
#: Keywords whose values are data, not schemas: a "maxItems" inside an enum value is a value
_SCHEMA_DATA = ("enum", "const", "default", "examples")


def check_gbnf(text: str) -> None:
    """``InputError`` for a GBNF llama.cpp's parser cannot take safely: longer than ``MAX_GRAMMAR_CHARS``, groups
    nested deeper than ``MAX_GRAMMAR_DEPTH``, or a repetition ``{m,n}`` with n < m (llama.cpp then builds rules
    until memory runs out). String literals, character classes and comments are skipped; llama.cpp checks the rest."""
    if len(text) > MAX_GRAMMAR_CHARS:
        raise InputError(f"The grammar is {len(text):,} characters long; at most {MAX_GRAMMAR_CHARS:,}.",
                         "send a shorter grammar (or a JSON schema with smaller counts)")
    depth, i, n = 0, 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
            continue
        if c in "\"[":
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and text[i] != close:
                i += 2 if text[i] == "\\" else 1
            i += 1
            continue
        if c == "(":
            depth += 1
            if depth > MAX_GRAMMAR_DEPTH:
                raise InputError(f"The grammar nests groups more than {MAX_GRAMMAR_DEPTH} deep.",
                                 "send a flatter grammar (or a JSON schema with a smaller maxLength / maxItems)")
        elif c == ")":
            depth = max(0, depth - 1)
        elif c == "{":
            end = text.find("}", i)
            if end > 0:
                low, comma, high = text[i + 1:end].partition(",")
                low, high = low.strip(), high.strip()
                if comma and low.isdigit() and high.isdigit() and int(high) < int(low):
                    raise InputError(f"The grammar repeats an item {{{low},{high}}} times: at most {high} is fewer "
                                     f"than at least {low}.", f"write {{{high},{low}}}, or the count you meant")
        i += 1


def check_schema_counts(schema: str | dict) -> None:
    """``SchemaError`` naming a bound of the JSON schema (text, or already read) that no value meets
    (``schema_bounds.contradiction``: a minLength above its maxLength, an empty enum), a count above
    ``MAX_SCHEMA_COUNT``, counts that add up beyond ``MAX_SCHEMA_SIZE`` (``schema_check.grammar_size``), or rule names
    that alone come to more than ``MAX_GRAMMAR_CHARS`` (``schema_bounds.names_size``: long property names under a
    count, or nested deep), before a converter writes them out: a response format's, and each tool's
    ``parameters``."""
    import json

    try:
        todo = [json.loads(schema) if isinstance(schema, str) else schema]
    except (ValueError, RecursionError):
        return  # the converter says what is wrong with it
    root = todo[0]
    bound = contradiction(root)
    if bound is not None:
        raise SchemaError(f"The JSON schema's '{shown(bound.at)}' cannot be met: {bound.problem}, so no answer could "
                          "match the schema.", bound.fix)
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            for name in _SCHEMA_COUNTS:
                count = item.get(name)
                if isinstance(count, (int, float)) and not isinstance(count, bool) and count > MAX_SCHEMA_COUNT:
                    raise SchemaError(f"The JSON schema's {name} is {count}; a constrained answer takes counts up to "
                                      f"{MAX_SCHEMA_COUNT}.", f"set {name} to {MAX_SCHEMA_COUNT} or less, or leave it out")
            todo.extend(v for k, v in item.items() if k not in _SCHEMA_DATA)
        elif isinstance(item, list):
            todo.extend(item)
    size = grammar_size(root)
    if size > MAX_SCHEMA_SIZE:
        raise SchemaError(f"The JSON schema comes to {size:,} with its counts written out (each pattern's characters "
                          f"and count copies, and each maxLength/minLength and maxItems/minItems, summed over the "
                          f"schema); a constrained answer's schema takes at most {MAX_SCHEMA_SIZE:,}.",
                          "lower those counts, or leave some out and check those lengths after the answer")
    written, most = names_size(root)
    if written > MAX_GRAMMAR_CHARS:
        raise SchemaError(f"The JSON schema's grammar would hold at least {written:,} characters of rule names alone: "
                          f"the converter names each part by its path of property names and writes that name once "
                          f"per copy a count makes of it ('{shown(most)}' adds the most); a grammar is at most "
                          f"{MAX_GRAMMAR_CHARS:,} characters.", "shorten the property names (and $defs names) on that "
                          "path, nest them less deeply, or lower the counts under them")


def grammar_text(settings: GenerationSettings) -> str | None:
    """The GBNF a request is constrained by: its grammar, or its JSON schema converted by llama-cpp-python (its
    patterns first written as the converter reads them right, ``schema_check.for_grammar``); checked (``check_gbnf``)
    before llama.cpp parses it."""
    if settings.grammar:
        check_gbnf(settings.grammar)
        return settings.grammar
    if settings.json_schema:
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        from edgemed.runtime.schema_check import PatternError, for_grammar

        check_schema_counts(settings.json_schema)
        try:
            text = json_schema_to_gbnf(json.dumps(for_grammar(json.loads(settings.json_schema))))
        except PatternError as exc:
            raise SchemaError(f"The JSON schema's 'pattern' at '{exc.path}' holds {exc.construct}, which cannot become "
                              f"a grammar: {exc.reason}.", exc.fix) from None
        except RecursionError:
            raise SchemaError("The JSON schema is nested too deeply to turn into a grammar.",
                              "send a flatter JSON schema") from None
        except Exception as exc:  # noqa: BLE001 - the converter asserts on schemas it does not know
            raise SchemaError(f"The JSON schema cannot be turned into a grammar: {type(exc).__name__} {exc}.",
                              "send a valid JSON schema (object types, properties, enums)") from None
        check_gbnf(text)
        return text
    return None


#: GBNF as pieces: a comment, a string literal, a character class, a word (a rule name where it is not in the others)
_GBNF_PIECES = re.compile(r'#[^\n]*|"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|[A-Za-z0-9_-]+|.', re.DOTALL)


def after_thought(gbnf: str) -> str:
    """``gbnf`` for the answer after a thought the prompt opened (an R1 distill's chat template ends it with
    ``<think>``): any text without ``</think>``, then ``</think>``, at most 4 blank characters, then what ``gbnf``
    accepts. Applied from the first token, ``gbnf`` would leave the model no way to think or to close the block;
    ``session.respond`` (``run``) constrains the answer alone too, in a second call. Its ``root`` is renamed, and the
    rules added here take a name prefix no rule of ``gbnf`` starts with."""
    pieces = [m.group() for m in _GBNF_PIECES.finditer(gbnf)]
    words = {p for p in pieces if p[0].isalnum() or p[0] in "_-"}
    t = "thought"
    while any(w.startswith(t) for w in words):
        t += "x"
    answer = "".join(f"{t}-answer" if p == "root" else p for p in pieces)
    # text without </think>: a "<" starts a prefix of the tag that either breaks off (a character that neither goes
    # on with it nor starts another "<"), or is followed by another "<" or by the closing tag itself
    return (f'root ::= {t}-text "</think>" [ \\t\\r\\n]{{0,4}} {t}-answer\n'
            f'{t}-text ::= ( [^<] | {t}-prefix* {t}-break )* {t}-prefix*\n'
            f'{t}-prefix ::= "<" ( "/" ( "t" ( "h" ( "i" ( "n" "k"? )? )? )? )? )?\n'
            f'{t}-break ::= "<" ( [^/<] | "/" ( [^t<] | "t" ( [^h<] | "h" ( [^i<] | "i" ( [^n<] | "n" ( [^k<] | '
            f'"k" [^><] ) ) ) ) ) )\n' + answer)


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
