"""Checks a reader of untrusted text runs before it parses: how deeply the text nests.

``json`` and ``tomllib`` recurse once per nested array or object, so a 100k-deep
``[[[[...`` exhausts the interpreter's stack (``RecursionError``) instead of being
refused. ``too_deep`` measures the depth first, skipping string contents, so a
reader can refuse such input with its own error before handing it to the parser.
Counting brackets is a fast exact bound: text with at most ``limit`` opening
brackets cannot nest deeper, and only the rest is scanned character by character.
"""

from __future__ import annotations

MAX_DEPTH = 64  # edgemed's own files nest 4 deep at most


def _scan(text: str, *, comments: bool, literal_quote: bool) -> int:
    """Deepest nesting of [ and { outside strings (and ``#`` comments when ``comments``)."""
    depth = deepest = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth = max(0, depth - 1)
        elif c == "#" and comments:
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        elif c == '"' or (c == "'" and literal_quote):
            quote = text[i:i + 3] if text[i:i + 3] == c * 3 else c
            j = i + len(quote)
            while j < n and not text.startswith(quote, j):
                j += 2 if text[j] == "\\" and c == '"' else 1
            i = j + len(quote)
            continue
        i += 1
    return deepest


def too_deep(text: str | bytes, kind: str = "json", limit: int = MAX_DEPTH) -> bool:
    """True when ``text`` (``kind`` "json" or "toml") nests arrays or objects deeper than ``limit``."""
    if isinstance(text, bytes):
        if text.count(b"[") + text.count(b"{") <= limit:
            return False
        text = text.decode("utf-8", "replace")
    elif text.count("[") + text.count("{") <= limit:
        return False
    return _scan(text, comments=kind == "toml", literal_quote=kind == "toml") > limit



class TooDeep(ValueError):
    """Untrusted text nests deeper than a reader allows: refused like any other malformed input."""


def _no_constant(name: str):
    raise ValueError(f"{name} is not a finite number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e999: too large for a float
        raise ValueError(f"{text} is not a finite number")
    return value


def loads_json(text: str | bytes, limit: int = MAX_DEPTH, *, finite: bool = False):
    """``json.loads`` for untrusted text: nesting deeper than ``limit`` is a ``ValueError`` (``TooDeep``), like any
    malformed input, never the parser's ``RecursionError``.

    ``finite``: ``NaN``, ``Infinity`` and a number too large for a float (``1e999``) are a ``ValueError`` too ("... is
    not a finite number"), for text whose value is written out again as JSON (a model's answer): ``json.dumps`` would
    write them as invalid JSON, a strict encoder refuse them; and for requests (RFC 8259 JSON has no such numbers).
    Without it they are read as Python reads them."""
    import json

    if too_deep(text, "json", limit):
        raise TooDeep(f"arrays or objects nest more than {limit} levels deep")
    if finite:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    return json.loads(text)


def finite_decoder():
    """A ``json.JSONDecoder`` that refuses what ``loads_json(..., finite=True)`` refuses, for a reader taking several
    values from one text (``raw_decode``). It does not bound nesting: such a reader catches ``RecursionError``."""
    import json

    return json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)


def loads_toml(text: str, limit: int = MAX_DEPTH) -> dict:
    """``tomllib.loads`` for untrusted text; every failure is a ``ValueError`` (``TOMLDecodeError`` is one,
    nesting deeper than ``limit`` is ``TooDeep``)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    if too_deep(text, "toml", limit):
        raise TooDeep(f"arrays or tables nest more than {limit} levels deep")
    return tomllib.loads(text)
