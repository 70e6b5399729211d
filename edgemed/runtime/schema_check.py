"""Which keywords of a JSON schema its grammar enforces while sampling, and an answer checked against the whole schema.

llama-cpp-python's converter (``json_schema_to_gbnf``, 0.3.36) reads each schema node by the first of its branches
that matches: ``$ref``, ``anyOf``/``oneOf``, a list of types, ``const``, ``enum``, object ``properties``, ``allOf``,
array ``items``, string ``pattern``, string ``format`` (date, time, date-time, uuid), string lengths, a bare type.
Every other keyword of that node is dropped without a word: ``minimum``/``maximum``, ``multipleOf``, ``format:
email``, ``uniqueItems``, a ``maxLength`` beside a ``pattern``... so a "strict" vitals schema was answered with a
temperature of 373.2. ``unenforced`` names those keywords (a strict schema holding one is refused before sampling);
``violations`` validates the finished answer against the whole schema with ``jsonschema`` (a non-strict answer that
breaks a keyword says so). ``oneOf`` counts as unenforced: the grammar takes a value matching two alternatives.
How a ``pattern`` and the counts are written for the converter (``for_grammar``, ``grammar_size``) is
``schema_pattern``'s; its names are read from here too.
"""

from __future__ import annotations

from edgemed.runtime.schema_pattern import (  # noqa: F401 - read from here by the grammar's callers
    MAX_SCHEMA_COUNT,
    MAX_SCHEMA_SIZE,
    PatternError,
    for_grammar,
    grammar_pattern,
    grammar_size,
    pattern_size,
)

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
