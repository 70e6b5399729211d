"""A JSON schema refused before the converter writes its grammar: bounds that no value meets, and rule names that a
count writes out again and again.

A ``minLength`` above its ``maxLength`` (``minItems``/``maxItems``, ``minProperties``/``maxProperties``,
``minimum``/``maximum``, exclusive bounds that leave no number, or no integer), an empty ``enum``, a ``const`` or every
``enum`` value outside the node's own ``type``: llama-cpp-python's converter takes each silently. It writes the
``minLength`` (five characters, for ``maxLength`` 2), the const (``"a"`` for an integer), or an empty grammar (``enum:
[]``), or drops the numbers, so the answer breaks the schema every time, and a strict one was taken as enforced.
``contradiction`` names the first such bound.

The converter names each part of the schema's grammar by its path (``patient-notes-item``: property names, ``item``,
``tuple-0``, an ``anyOf``'s index, a ``$defs`` name), and writes that name once per copy a count makes of it: a
2,000-character property name under ``maxItems: 1000`` wrote 2 MB of grammar from 2 kB of schema, and fifty nested
ones 10 MB, none of it a count ``schema_pattern.grammar_size`` sees. ``names_size`` adds those names up, as written,
before anything is written.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from edgemed.runtime.schema_check import _branch, _target
from edgemed.runtime.schema_pattern import MAX_SCHEMA_COUNT, grammar_pattern

#: the characters a rule name holds; the converter writes each run of others as one "-"
_NOT_IN_NAME = re.compile(r"[^a-zA-Z0-9-]+")
#: keywords whose values are data, not schemas
_DATA = ("enum", "const", "default", "examples")
#: the (least, most) count pairs, and what each counts
_COUNT_PAIRS = (("minLength", "maxLength", "characters"), ("minItems", "maxItems", "items"),
                ("minProperties", "maxProperties", "properties"))
#: a JSON Schema type, and whether a value is of it
_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: _number(v) and float(v).is_integer(),
    "number": lambda v: _number(v),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


@dataclass(frozen=True)
class Bound:
    """A bound of the schema no value meets: ``path`` (dotted, to the node), ``keyword`` (the field the client
    changes, beside ``path``), ``problem`` (its values), ``fix``."""

    path: str
    keyword: str
    problem: str
    fix: str

    @property
    def at(self) -> str:
        """The field, dotted from the schema's root."""
        return f"{self.path}.{self.keyword}" if self.path else self.keyword


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _nodes(schema):
    """(path, node) for each schema node of ``schema`` (``path``: a ``_step`` chain); values (``enum``, ``const``...)
    are data, and what ``not`` or ``if`` holds may be met by nothing (``not`` of it is anything)."""
    todo = [(None, schema)]
    while todo:
        path, node = todo.pop()
        if isinstance(node, list):
            todo.extend(((path, str(i)), item) for i, item in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        yield path, node
        for key, value in node.items():
            if key in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas") \
                    and isinstance(value, dict):
                todo.extend((((path, key), name), child) for name, child in value.items())
            elif key not in (*_DATA, "not", "if"):
                todo.append(((path, key), value))


def dotted(path) -> str:
    """A path kept as (parent, step) pairs (None at the root), dotted: joined only when a message names it, so a walk
    of long property names nested deep builds no path of each node."""
    steps = []
    while path is not None:
        path, step = path
        steps.append(step)
    return ".".join(reversed(steps))


def contradiction(schema) -> Bound | None:
    """The first bound of ``schema`` no value meets (``Bound``), or None."""
    for path, node in _nodes(schema):
        found = _node_contradiction(node)
        if found is not None:
            return Bound(dotted(path), *found)
    return None


def _node_contradiction(node: dict) -> tuple[str, str, str] | None:
    """(keyword, problem, fix) for the first bound of ``node`` no value meets, or None."""
    for least, most, what in _COUNT_PAIRS:
        low, high = node.get(least), node.get(most)
        if _number(high) and high < 0:
            return most, f"{most} is {high}, and nothing has fewer than 0 {what}", f"set {most} to 0 or more"
        if _number(low) and _number(high) and low > high:
            return (least, f"{least} is {low}, above its {most} of {high}",
                    f"set {least} to {high} or less, or {most} to {low} or more")
    empty = _empty_range(node)
    if empty is not None:
        return empty
    types = node.get("type")
    types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
    known = [t for t in types if t in _TYPES]
    of_type = (lambda v: any(_TYPES[t](v) for t in known)) if known and len(known) == len(types) else None
    if "const" in node and of_type is not None and not of_type(node["const"]):
        return ("const", f"const is {_shown(node['const'])}, which is not of its type {_shown(node['type'])}",
                "make the const a value of that type, or change the type")
    enum = node.get("enum")
    if isinstance(enum, list) and not enum:
        return "enum", "enum is [], which no value is in", "list at least one value in enum, or leave it out"
    if isinstance(enum, list) and of_type is not None and not any(of_type(v) for v in enum):
        return ("enum", f"enum is {_shown(enum)}, none of it of its type {_shown(node['type'])}",
                "list values of that type in enum, or change the type")
    return None


def _empty_range(node: dict) -> tuple[str, str, str] | None:
    """(keyword, problem, fix) where ``node``'s numeric bounds leave no number (no integer, for an integer), or None.
    ``exclusiveMinimum``/``exclusiveMaximum`` are bounds of their own (2020-12), or ``true`` beside ``minimum``/
    ``maximum`` (draft 4)."""
    lows, highs = [], []  # (value, exclusive, keyword)
    for key, exclusive_key, into in (("minimum", "exclusiveMinimum", lows), ("maximum", "exclusiveMaximum", highs)):
        if _number(node.get(key)):
            into.append((node[key], node.get(exclusive_key) is True, key))
        if _number(node.get(exclusive_key)):
            into.append((node[exclusive_key], True, exclusive_key))
    if not lows or not highs:
        return None
    low = max(lows, key=lambda b: (b[0], b[1]))
    high = min(highs, key=lambda b: (b[0], not b[1]))
    (lo, lo_ex, lo_key), (hi, hi_ex, hi_key) = low, high
    integer = node.get("type") == "integer"
    if integer:
        first = math.floor(lo) + 1 if lo_ex else math.ceil(lo)
        last = math.ceil(hi) - 1 if hi_ex else math.floor(hi)
        empty = first > last
    else:
        empty = lo > hi or (lo == hi and (lo_ex or hi_ex))
    if not empty:
        return None
    what = "integer" if integer and lo <= hi else "number"
    article = "an" if what == "integer" else "a"
    return (lo_key, f"{lo_key} is {lo} and {hi_key} is {hi}, which leaves no {what} between them",
            f"lower {lo_key} or raise {hi_key} until {article} {what} lies between them, or leave one out")


def _shown(value) -> str:
    """``value`` as JSON, cut at 60 characters."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _name_length(step: str) -> int:
    """How long ``step`` is in a rule name: each run of characters a name cannot hold is one "-"."""
    return len(_NOT_IN_NAME.sub("-", step))


def names_size(schema) -> tuple[int, str]:
    """At least how many characters ``schema``'s rule names come to in the converter's grammar, and the dotted path of
    the part that adds the most (a lower bound: a schema beyond a limit by it writes a grammar beyond that limit).

    Each part is named by its path joined by "-". A property's ``-kv`` rule (its JSON name, then its value) is written
    and referenced; a part that is no bare type (whose rule is the type's) has a rule of its own, written, and
    referenced once by its parent, or once per copy its array's count makes (``maxItems``, or ``minItems`` + 1
    without one); a pattern's counted class or group is a rule ``{name}-{n}`` referenced once per copy. Local
    ``$ref`` targets are named by their last step and walked once."""
    total, most, seen = 0, (0, None), set()
    todo = [(None, schema, 0, None)]  # (dotted path, node, its name's length, copies its parent's count makes of it)
    while todo:
        path, node, length, copies = todo.pop()
        if not isinstance(node, dict):
            continue
        branch = _branch(node)
        used = 0
        if length and branch != "any" and not (branch == "format" and str(node.get("format")).startswith("uuid")):
            used += length * (2 if copies is None else 1 + copies)  # a bare type's or a uuid's rule is the type's
        if branch == "pattern" and isinstance(node.get("pattern"), str):
            used += (length + 2) * _pattern_copies(node["pattern"])
        for name in _property_names(schema, node, branch):  # its -kv rule, written and referenced
            used += 2 * ((length + 1 if length else 0) + _name_length(name) + 3) + len(json.dumps(name))
        total += used
        if used > most[0]:
            most = (used, path)
        for step, child, name, times in _named_children(schema, node, branch):
            if branch == "ref":
                if step in seen:
                    continue
                seen.add(step)
            at = (None, step) if branch == "ref" else (path, step)
            todo.append((at, child, length + 1 + _name_length(name) if length and branch != "ref"
                         else _name_length(name), times))
    return total, dotted(most[1])


def _property_names(root, node: dict, branch: str) -> list[str]:
    """The property names the converter writes for ``node``: its ``properties``, or its ``allOf`` parts'."""
    return [name for part in _parts(root, node, branch) for name in part["properties"]]


def _parts(root, node: dict, branch: str) -> list[dict]:
    """The nodes whose ``properties`` the converter writes for ``node``: itself (an object), or its ``allOf`` parts
    (an ``anyOf`` in one, each of its alternatives; a local ``$ref``, its target)."""
    if branch == "object":
        parts = [node]
    elif branch == "all":
        parts = [_resolved(root, p) for t in node.get("allOf") or [] if isinstance(t, dict)
                 for p in (t.get("anyOf") if isinstance(t.get("anyOf"), list) else [t])]
    else:
        return []
    return [p for p in parts if isinstance(p, dict) and isinstance(p.get("properties"), dict)]


def _named_children(root, node: dict, branch: str):
    """(dotted step, child, its name's step, copies of its name a count makes) for each part the converter names
    under ``node``; a ``$ref``'s target comes with its own dotted path, named by its last step alone."""
    if branch == "ref":
        target = _target(root, node["$ref"])
        if target is not None:
            yield target[0], target[1], node["$ref"].rpartition("/")[2], None
    elif branch == "union":
        key = "oneOf" if node.get("oneOf") else "anyOf"
        for i, child in enumerate(node.get(key) or []):
            yield f"{key}.{i}", child, str(i), None
    elif branch in ("object", "all"):
        for part in _parts(root, node, branch):
            for name, child in part["properties"].items():
                yield f"properties.{name}", child, name, None
        if branch == "object" and isinstance(node.get("additionalProperties"), dict):
            yield "additionalProperties", node["additionalProperties"], "additional-value", None
    elif branch == "tuple":
        key = "items" if node.get("items") else "prefixItems"
        for i, child in enumerate(node[key]):
            yield f"{key}.{i}", child, f"tuple-{i}", None
    elif branch == "array":
        low, high = (node.get(k) if type(node.get(k)) is int else None for k in ("minItems", "maxItems"))
        times = max(high, low or 0) if high is not None else (low or 0) + 1
        yield "items", node.get("items") or node.get("prefixItems"), "item", max(0, min(times, MAX_SCHEMA_COUNT))


def _resolved(root, part):
    """An ``allOf`` part, or the target of its local ``$ref``."""
    if isinstance(part, dict) and isinstance(part.get("$ref"), str):
        target = _target(root, part["$ref"])
        return target[1] if target is not None else None
    return part


def _pattern_copies(pattern: str) -> int:
    """How many references to a part's rule the counts of ``pattern`` write (0 for one ``for_grammar`` refuses): a
    counted class or group is a rule of its own, referenced once per copy (each count's most, or its least + 1 without
    a most), not multiplied by the counts around it; a counted character is written out in the text. In the pattern
    as rewritten, a "{" is a count and every escape a class."""
    try:
        text = grammar_pattern(pattern)
    except ValueError:
        return 0
    total, in_class = 0, False
    for i, c in enumerate(text):
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "{" and text[i - 1] in "])":
            count = re.match(r"\{(\d*)(,(\d*))?\}", text[i:])
            if count:
                low, comma, high = count.group(1), count.group(2), count.group(3)
                total += int(high) if high else int(low or 0) + 1 if comma else int(low or 0)
    return total


def shown(path: str, most: int = 80) -> str:
    """A dotted path as a message names it: cut at ``most`` characters (a property name may be thousands long)."""
    return path if len(path) <= most else f"{path[:most - 3]}..."
