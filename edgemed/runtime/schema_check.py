"""Which keywords of a JSON schema its grammar enforces while sampling, and an answer checked against the whole schema.

llama-cpp-python's converter (``json_schema_to_gbnf``, 0.3.36) reads each schema node by the first of its branches
that matches: ``$ref``, ``anyOf``/``oneOf``, a list of types, ``const``, ``enum``, object ``properties``, ``allOf``,
array ``items``, string ``pattern``, string ``format`` (date, time, date-time, uuid), string lengths, a bare type.
Every other keyword of that node is dropped without a word: ``minimum``/``maximum``, ``multipleOf``, ``format:
email``, ``uniqueItems``, a ``maxLength`` beside a ``pattern``... so a "strict" vitals schema was answered with a
temperature of 373.2. ``unenforced`` names those keywords (a strict schema holding one is refused before sampling);
``violations`` validates the finished answer against the whole schema with ``jsonschema`` (a non-strict answer that
breaks a keyword says so). ``oneOf`` counts as unenforced: the grammar takes a value matching two alternatives.
A ``pattern`` is rewritten where the converter would misread it (``for_grammar``: ``\\d`` was copied as it stood),
and refused, strict or not, where no rewrite is exact (``\\b``, ``\\D``): its grammar would force text that cannot
match.
"""

from __future__ import annotations

import re

#: keywords that constrain a value (JSON Schema 2020-12 and draft 7); annotations (``title``, ``description``,
#: ``default``, ``examples``...) and unknown keywords constrain nothing, so they are never named
VALIDATION = frozenset({
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum", "maxLength",
    "minLength", "pattern", "format", "maxItems", "minItems", "uniqueItems", "maxContains", "minContains", "contains",
    "items", "prefixItems", "additionalItems", "unevaluatedItems", "maxProperties", "minProperties", "required",
    "properties", "patternProperties", "additionalProperties", "propertyNames", "unevaluatedProperties",
    "dependentRequired", "dependentSchemas", "dependencies", "allOf", "anyOf", "oneOf", "not", "if", "then", "else",
    "$ref", "$dynamicRef", "$recursiveRef",
})

#: the keywords each branch of the converter turns into grammar (a branch is the first that matches a node)
ENFORCED = {
    "ref": {"$ref"},
    "union": {"anyOf"},
    "types": {"type"},
    "const": {"const", "type"},
    "enum": {"enum", "type"},
    "object": {"type", "properties", "required", "additionalProperties"},
    "all": {"type"},  # merges the parts' properties only: everything else in them is dropped
    "tuple": {"type", "items", "prefixItems"},  # exactly the listed items
    "array": {"type", "items", "minItems", "maxItems"},
    "pattern": {"type", "pattern"},
    "format": {"type", "format"},
    "length": {"type", "minLength", "maxLength"},
    "any": {"type"},  # any object, or a value of the named type
}

#: formats the converter writes a grammar for
FORMATS = ("date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5")


def _branch(node: dict) -> str:
    """The converter's branch for ``node``, in its order."""
    kind = node.get("type")
    if node.get("$ref") is not None:
        return "ref"
    if "oneOf" in node or "anyOf" in node:
        return "union"
    if isinstance(kind, list):
        return "types"
    if "const" in node:
        return "const"
    if "enum" in node:
        return "enum"
    if kind in (None, "object") and ("properties" in node or node.get("additionalProperties", True) is not True):
        return "object"
    if kind in (None, "object") and "allOf" in node:
        return "all"
    if kind in (None, "array") and ("items" in node or "prefixItems" in node):
        return "tuple" if isinstance(node.get("items") or node.get("prefixItems"), list) else "array"
    if kind in (None, "string") and "pattern" in node:
        return "pattern"
    if kind in (None, "string") and node.get("format") in FORMATS:
        return "format"
    if kind == "string" and ("minLength" in node or "maxLength" in node):
        return "length"
    return "any"


def _children(node: dict, branch: str):
    """(path step, subschema) the converter visits under ``node``."""
    if branch == "union":
        key = "oneOf" if node.get("oneOf") else "anyOf"
        yield from ((f"{key}.{i}", s) for i, s in enumerate(node.get(key) or []))
    elif branch == "object":
        yield from ((f"properties.{k}", s) for k, s in (node.get("properties") or {}).items())
        if isinstance(node.get("additionalProperties"), dict):
            yield "additionalProperties", node["additionalProperties"]
    elif branch == "tuple":
        key = "items" if node.get("items") else "prefixItems"
        yield from ((f"{key}.{i}", s) for i, s in enumerate(node[key]))
    elif branch == "array":
        yield "items", node.get("items") or node.get("prefixItems")


def _target(root: dict, ref: str):
    """(path, subschema) a local ``$ref`` (``#/$defs/x``) points at, or None."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node, steps = root, [s.replace("~1", "/").replace("~0", "~") for s in ref[1:].split("/") if s]
    for step in steps:
        if isinstance(node, list) and step.isdigit() and int(step) < len(node):
            node = node[int(step)]
        elif isinstance(node, dict) and step in node:
            node = node[step]
        else:
            return None
    return ".".join(steps), node


def unenforced(schema: dict) -> list[tuple[str, str]]:
    """(dotted path of the node, keyword) for each validation keyword of ``schema`` the grammar made from it drops,
    in the converter's walk order; local ``$ref`` targets are walked once, at their own path."""
    found, todo, seen = [], [("", schema)], set()
    while todo:
        path, node = todo.pop(0)
        if not isinstance(node, dict):
            continue
        branch = _branch(node)
        dropped = [k for k in node if k in VALIDATION and k not in ENFORCED[branch]]
        if branch == "union" and node.get("oneOf"):  # read as anyOf; an anyOf beside it is not read at all
            dropped = ["oneOf", *(["anyOf"] if "anyOf" in node else []), *(k for k in dropped if k != "oneOf")]
        found += [(path, k) for k in dropped]
        if branch == "ref":
            target = _target(schema, node["$ref"])
            if target is not None and target[0] not in seen:
                seen.add(target[0])
                todo.append(target)
            continue
        todo += [(f"{path}.{step}" if path else step, child) for step, child in _children(node, branch)]
    return found


#: escape classes the converter copies into the grammar as they stand (``\\d``, an escape llama.cpp's parser does not
#: know), and what a grammar that means them says instead. Each is a subset of
#: what Python's ``re`` (the answer's check) and ECMA-262 (JSON Schema's regex dialect) match: ``\\d`` and ``\\w`` are
#: ECMA's exactly; ``\\s`` only the space, since a tab or line break in a JSON string is written escaped
#: (``\\n``), never as the character the grammar would write
CLASSES = {"d": "0-9", "w": "A-Za-z0-9_", "s": " "}
#: what a ``pattern`` may hold that no grammar of the converter enforces, and the fix
UNENFORCEABLE = {
    "D": "write a negated class of what you mean instead of \\D",
    "W": "write a negated class of what you mean instead of \\W",
    "S": "write a negated class of what you mean instead of \\S",
    "b": "leave out the word boundary \\b",
    "B": "leave out \\B",
}


class PatternError(ValueError):
    """A ``pattern`` whose grammar would not be the pattern: ``path`` (dotted, to the ``pattern``), ``construct`` (what
    in it), ``fix``."""

    def __init__(self, path: str, construct: str, fix: str):
        super().__init__(f"{path}: {construct}")
        self.path, self.construct, self.fix = path, construct, fix


def grammar_pattern(pattern: str) -> str:
    """``pattern`` as llama-cpp-python's converter reads it right (``ValueError(construct, fix)`` where none does).

    The converter copies a backslash escape into the grammar as it stands: ``\\d``, ``\\w``, ``\\s`` and an escaped
    ``.``, ``-`` or ``/`` become escapes llama.cpp's parser does not know (``^\\d+$`` gave ``"\\d"+``),
    and an escape takes a quantifier after it with the text before it (``ab\\.+``). Each becomes a one-character
    class (``[0-9]``, ``[\\x2E]``). A lazy quantifier (``+?``, ``{2}?``) becomes ``(x+)?`` in the grammar, which takes
    an empty text: it is written greedy, which matches the same whole texts. A ``]`` or ``}`` outside a class (the
    character, to Python) had the converter loop forever; each is a class too. What has no class (``\\D``, ``\\b``,
    a back reference, an anchor inside the pattern) is refused. A pattern that is not ``^...$`` is left to the
    converter, which refuses it."""
    if len(pattern) < 2 or not pattern.startswith("^") or not pattern.endswith("$"):
        return pattern
    if (len(pattern) - 1 - len(pattern[:-1].rstrip("\\"))) % 2:
        raise ValueError("an escaped '$' at its end", "end the pattern with an unescaped $, as in ^[0-9]+\\$$")
    out, i, n, in_class = ["^"], 1, len(pattern) - 1, False
    start = class_at = 0  # where the open class starts in out, and its first character in pattern
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            e = pattern[i + 1]
            i += 2
            if e in "xuU":  # \x41, \u00e9, \U0001F600: hex digits follow, which llama.cpp reads the same
                width = {"x": 2, "u": 4, "U": 8}[e]
                digits = pattern[i:i + width]
                if len(digits) < width or not all(d in "0123456789abcdefABCDEF" for d in digits):
                    raise ValueError(f"the escape \\{e}{digits}", f"write \\{e} with {width} hex digits")
                i += width
                text = f"\\{e}{digits}"
            elif e in CLASSES:
                if in_class and out[start] == "[^":
                    raise ValueError(f"\\{e} in a negated class", f"list what the class excludes ([^0-9], not "
                                                                     f"[^\\{e}])")
                text = CLASSES[e]
            elif e in "tnrfv0":
                text = {"t": "\\t", "n": "\\n", "r": "\\r", "f": "\\x0C", "v": "\\x0B", "0": "\\x00"}[e]
            elif e in UNENFORCEABLE:
                raise ValueError(f"\\{e}", UNENFORCEABLE[e])
            elif e.isalnum() or e == "_":
                raise ValueError(f"\\{e}", "write the characters it stands for, or a class of them ([0-9])")
            elif e in "\\\"":
                raise ValueError(f"the character {e}", "leave it out: JSON writes it escaped (\\\\, \\\"), so the "
                                                      "grammar cannot write it as the pattern reads it")
            else:  # an escaped character: as its code, which a grammar class reads as that character
                text = f"\\x{ord(e):02X}" if ord(e) < 0x100 else f"\\U{ord(e):08X}"
            out.append(text if in_class else f"[{text}]")
            continue
        if in_class:
            if c == "]" and i == class_at:  # first in a class, "]" is the character: llama.cpp would end the class
                c = "\\x5D"
            elif c == "]":
                in_class = False
            elif c == "[" and pattern[i + 1:i + 2] == ":":
                raise ValueError("a POSIX class ([:digit:])", "write the range instead ([0-9])")
            out.append(c)
            i += 1
            continue
        if c == "[":
            in_class, start = True, len(out)
            negated = pattern[i + 1:i + 2] == "^"
            out.append("[^" if negated else "[")
            i += 2 if negated else 1
            class_at = i
            continue
        if c == "{":  # a count; any other "{" is the character, as Python reads it
            count = re.match(r"\{\d*(,\d*)?\}", pattern[i:n])
            if count and count.group() != "{}":
                out.append(count.group())
                i += len(count.group())
                continue
            c = "[\\x7B]"
        elif c in "]}":  # the character: the converter loops forever on one outside a class
            c = f"[\\x{ord(c):02X}]"
        elif c == '"':
            raise ValueError("the character \"", "leave it out: JSON writes it escaped (\\\"), so the grammar "
                                                "cannot write it as the pattern reads it")
        elif c in "^$":
            raise ValueError(f"the anchor '{c}' inside the pattern", "anchor the whole pattern once, ^(a|b)$")
        if c == "?" and (out[-1] in ("*", "+", "?") or out[-1].startswith("{")):
            i += 1  # lazy: the same whole texts as greedy
            continue
        out.append(c)
        i += 1
    return "".join(out) + "$"


def for_grammar(schema):
    """A copy of ``schema`` with each ``pattern`` as the converter reads it right (``grammar_pattern``);
    ``PatternError`` naming the first it cannot take. Values (``enum``, ``const``...) are left as they are."""
    if isinstance(schema, list):
        return [for_grammar(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    return _rewritten(schema, "")


def _rewritten(node, path: str):
    if isinstance(node, list):
        return [_rewritten(item, f"{path}.{i}" if path else str(i)) for i, item in enumerate(node)]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        at = f"{path}.{key}" if path else key
        if key == "pattern" and isinstance(value, str):
            try:
                out[key] = grammar_pattern(value)
            except ValueError as exc:
                construct, fix = exc.args
                raise PatternError(at, construct, fix) from None
        elif key in ("enum", "const", "default", "examples"):
            out[key] = value
        else:
            out[key] = _rewritten(value, at)
    return out


def violations(schema: dict, value, limit: int = 10) -> list[dict]:
    """How ``value`` breaks ``schema`` (``jsonschema``, its formats checked too): at most ``limit`` of ``{"path":
    dotted path in the value, "keyword", "message"}``, by path. ``ValueError`` when the schema cannot be checked (it is
    no valid JSON schema, or refers to a schema elsewhere)."""
    from jsonschema import validators

    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    try:
        cls.check_schema(schema)
        errors = list(cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(value))
    except RecursionError:
        raise ValueError("the schema is nested too deeply to check") from None
    except Exception as exc:  # noqa: BLE001 - jsonschema's SchemaError, referencing's Unresolvable...
        raise ValueError(f"the schema cannot be checked: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    found = [{"path": ".".join(str(p) for p in e.absolute_path), "keyword": e.validator, "message": e.message}
             for e in errors]
    return sorted(found, key=lambda f: f["path"])[:limit]
