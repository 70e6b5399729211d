"""Output contracts: what a template asks the model to end with, and how the reply is parsed.

Three kinds, one row each in ``KINDS``:
* ``choice`` — a labelled line such as ``Answer: B`` from a fixed set (options' letters, or yes/no/maybe);
* ``json``   — one JSON object matching a schema; engines that support grammars enforce it while sampling;
* ``text``   — free text (the whole reply, thinking removed), optionally after a label.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from edgemed.formats.nesting import loads_json
from edgemed.templates.think import strip_think


@dataclass(frozen=True)
class Parsed:
    ok: bool
    value: object          # the choice, the JSON object, or the text
    answer_text: str       # the reply with thinking removed
    error: str = ""
    labelled: bool = False  # a choice found on the instructed 'Answer: X' line (not inferred from prose or a list)


@dataclass(frozen=True)
class Contract:
    kind: str
    label: str = "Answer"
    choices: tuple[str, ...] = ()       # fixed choices (yes/no/maybe)
    choices_from: str = ""              # or: the keys of this input (an options table)
    schema: dict = field(default_factory=dict)

    def resolve_choices(self, inputs: dict) -> tuple[str, ...]:
        if self.choices_from:
            return tuple(str(k) for k in inputs.get(self.choices_from, {}))
        return self.choices

    def instruction(self, choices: tuple[str, ...]) -> str:
        return KINDS[self.kind][0](self, choices)

    def parse(self, reply: str, choices: tuple[str, ...], started_in_think: bool = False) -> Parsed:
        return KINDS[self.kind][1](self, strip_think(reply, started_in_think), choices)

    def json_schema(self) -> str | None:
        """JSON text for engines that constrain sampling (``GenerationSettings.json_schema``)."""
        return json.dumps(self.schema) if self.kind == "json" else None


def choice_grammar(choices: tuple[str, ...]) -> str:
    """A GBNF grammar that accepts exactly one of ``choices`` (used to ask again when a reply has no answer line)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


# -- choice -----------------------------------------------------------------------------
def _choice_instruction(c: Contract, choices) -> str:
    return (f"End your reply with a final line of the form '{c.label}: X', where X is exactly one of: "
            f"{', '.join(choices)}.")


def _parse_choice(c: Contract, text: str, choices) -> Parsed:
    alts = "|".join(re.escape(x) for x in sorted(choices, key=len, reverse=True))
    label = re.escape(c.label)
    # Single-letter choices are matched case-sensitively outside a labelled line: "the answer is a ..." is prose.
    strict = f"(?-i:{alts})" if all(len(x) == 1 and x.isupper() for x in choices) else alts
    deco = r"[\s\*\(\[\"'_]*"  # markdown bold, brackets, quotes around the label or the choice
    # On the labelled line a choice is not followed by a lower-case word ("Answer: a patient ..." is prose) nor by
    # another choice ("Answer: A or B" is a hedge, not an answer).
    hedge = rf"\s*(?:or|and|/|,)\s*{deco}(?:{alts})\b"
    prose = r"(?![ \t]+(?-i:[a-z]))" if all(len(x) == 1 for x in choices) else ""
    patterns = (
        rf"{label}{deco}[:\-]{deco}({alts})\b{prose}(?!{hedge})",  # Answer: B / **Answer:** (b)
        rf"\banswer is{deco}[:\-]?{deco}({strict})\b",          # the correct answer is C (not "is a ...")
        rf"^{deco}({strict})\s*[\)\.\:]",                       # reply starts "B." / "(B)"
    )
    hits: list[str] = []
    for i, pattern in enumerate(patterns):
        hits = re.findall(pattern, text, flags=re.I | re.M)
        if hits:
            break
    else:  # the whole reply is one bare choice: "maybe", "Maybe.", "**B**"
        i = len(patterns)
        bare = re.fullmatch(rf"{deco}({strict}){deco}[\.\!]?{deco}", text.strip(), flags=re.I)
        hits = [bare.group(1)] if bare else []
    if hits:
        found = hits[-1]
        # the choice the pattern matched, as the pattern matched it: re.I folds more than str.lower ("ſ" is "s")
        canonical = next((x for x in choices if re.fullmatch(re.escape(x), found, flags=re.I)), None)
        if canonical is not None:
            return Parsed(True, canonical, text, labelled=i == 0)
    return Parsed(False, None, text, f"no '{c.label}: X' line with X in {', '.join(choices)}")


# -- json -------------------------------------------------------------------------------
def _json_instruction(c: Contract, choices) -> str:
    return ("Reply with one JSON object only (no prose before or after it) that matches this JSON schema:\n"
            + json.dumps(c.schema, separators=(",", ":")))


#: the JSON types a schema's ``type`` names (one, or a list of them), as the parsed reply holds them
JSON_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "boolean": bool,
              "null": type(None)}


def _schema_types(schema: dict) -> list:
    """The types a schema node allows: ``type = "number"`` or ``type = ["number", "null"]``; none when it says none."""
    kind = schema.get("type")
    return [kind] if isinstance(kind, str) else list(kind) if isinstance(kind, list) else []


def _is_type(value, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):  # Python's True is an int; JSON's true is no number
        return False
    return isinstance(value, JSON_TYPES[kind])


def _schema_errors(schema: dict, value, path: str = "$") -> list[str]:
    """A small JSON-schema check (type, required, enum, properties, items, minItems): what llama.cpp's grammar enforces."""
    kinds = _schema_types(schema)
    # a type that is no JSON type is refused when the template loads; here it is no answer, never a crash
    unknown = [k for k in kinds if not (isinstance(k, str) and k in JSON_TYPES)]
    if unknown:
        return [f"{path}: the schema's type {unknown[0]!r} is none of {', '.join(JSON_TYPES)}"]
    if kinds and not any(_is_type(value, k) for k in kinds):
        return [f"{path}: expected {' or '.join(kinds)}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "object" in kinds and isinstance(value, dict):
        errors += [f"{path}.{k}: missing" for k in schema.get("required", []) if k not in value]
        properties = schema.get("properties", {})
        for k, sub in (properties.items() if isinstance(properties, dict) else ()):
            if k in value and isinstance(sub, dict):
                errors += _schema_errors(sub, value[k], f"{path}.{k}")
    if "array" in kinds and isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        items = schema.get("items", {})
        for i, item in enumerate(value):
            errors += _schema_errors(items, item, f"{path}[{i}]") if isinstance(items, dict) else []
    return errors


def _repeated_keys(text: str) -> str:
    """The first key an object of ``text`` (valid JSON, depth already checked) names twice, or ''."""
    repeated: list[str] = []

    def pairs(items):
        seen: set[str] = set()
        for key, _ in items:
            if key in seen:
                repeated.append(key)
            seen.add(key)
        return dict(items)

    json.loads(text, object_pairs_hook=pairs)
    return repeated[0] if repeated else ""


def _parse_json(c: Contract, text: str, choices) -> Parsed:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return Parsed(False, None, text, "no JSON object in the reply")
    try:
        value = loads_json(text[start:end + 1])
    except ValueError as exc:  # JSONDecodeError and TooDeep
        return Parsed(False, None, text, f"invalid JSON: {exc}")
    twice = _repeated_keys(text[start:end + 1])
    if twice:  # json keeps the last of them: '"urgency": "emergency", ..., "urgency": "routine"' would read as routine
        return Parsed(False, None, text, f"the JSON object gives '{twice}' more than once")
    errors = _schema_errors(c.schema, value)
    return Parsed(not errors, value, text, "; ".join(errors))


# -- text -------------------------------------------------------------------------------
def _text_instruction(c: Contract, choices) -> str:
    return f"Begin your reply with '{c.label}:'." if c.label else ""


def _parse_text(c: Contract, text: str, choices) -> Parsed:
    body = text
    if c.label:  # the label that opens the reply; one further on is part of the answer ("the usual answer: ...")
        m = re.match(rf"[ \t>#*_]*{re.escape(c.label)}[ \t*_]*:[ \t*_]*", text, flags=re.I)
        body = text[m.end():] if m else text
    body = body.strip()
    return Parsed(bool(body), body, text, "" if body else "empty reply")


# kind -> (instruction, parser)
KINDS = {
    "choice": (_choice_instruction, _parse_choice),
    "json": (_json_instruction, _parse_json),
    "text": (_text_instruction, _parse_text),
}
