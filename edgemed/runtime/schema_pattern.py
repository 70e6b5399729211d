"""A JSON schema's ``pattern``s and counts as llama-cpp-python's converter writes them into a grammar, bounded first.

A ``pattern`` is rewritten where the converter would misread it (``for_grammar``: ``\\d`` was copied as it stood),
and refused, strict or not, where no rewrite is exact (``\\b``, ``\\D``): its grammar would force text that cannot
match. Its ``.`` and classes are written without the characters a JSON string holds only escaped (``[^a-z]`` wrote a
bare ``"``). The converter writes a count out in full, before anything checks it, so a count above
``MAX_SCHEMA_COUNT``, a reversed count (``{5,2}``), or a pattern beyond ``MAX_SCHEMA_SIZE`` with its counts written out
(``(a{999}){999}``) is refused first; ``grammar_size`` adds up the whole schema's patterns and lengths for
``sampling.check_schema_counts`` (``a{999}b{999}...``, or many properties of ``maxLength: 1000``).
"""

from __future__ import annotations

import json
import re

#: Largest count a JSON schema may ask for (minItems, maxItems, minLength, maxLength, minProperties, maxProperties,
#: and a count in a ``pattern``, ``{1000}``): the converter writes a count out in full, one rule copy (or one nested
#: group) per unit, before anything checks it (``sampling.check_schema_counts``, ``grammar_pattern``).
MAX_SCHEMA_COUNT = 1000
#: Largest a JSON schema's grammar may be with its counts written out (``grammar_size``): each of a pattern's
#: characters, classes and dots once, a count repeating what it follows (a group's count all of the group, a count
#: in a counted group multiplied: ``(a{999}){999}`` is 998,001), and each minLength/maxLength/minItems/maxItems,
#: summed over the schema. Twenty counts at ``MAX_SCHEMA_COUNT``: each unit is a rule reference or a ``(char``
#: group of the converter's (about 6 to 30 characters), so a schema within it writes well under
#: ``sampling.MAX_GRAMMAR_CHARS``.
MAX_SCHEMA_SIZE = 20 * MAX_SCHEMA_COUNT

#: escape classes the converter copies into the grammar as they stand (``\\d``, an escape llama.cpp's parser does not
#: know), and what a grammar that means them says instead. Each is a subset of
#: what Python's ``re`` (the answer's check) and ECMA-262 (JSON Schema's regex dialect) match: ``\\d`` and ``\\w`` are
#: ECMA's exactly; ``\\s`` only the space, since a tab or line break in a JSON string is written escaped
#: (``\\n``), never as the character the grammar would write
CLASSES = {"d": "0-9", "w": "A-Za-z0-9_", "s": " "}
#: the same classes as code-point ranges, for a class that holds them
_CLASS_RANGES = {"d": [(0x30, 0x39)], "w": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)], "s": [(0x20, 0x20)]}
#: the characters a JSON string never holds as themselves (RFC 8259: a quote, a backslash, U+0000-U+001F are written
#: escaped, ``\\"``). A grammar writes the JSON text, so one that wrote such a character would end the string early or
#: break the JSON: ``.`` and a class are written without them, and a pattern that names one is refused
JSON_ESCAPED = ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C))
#: ``.`` as a grammar class: any character but those (the converter's own ``.`` took all of them but line breaks)
DOT = "[^\\x00-\\x1F\\x22\\x5C]"
#: why a pattern that no regex engine reads is refused
_NO_REGEX = "it is no valid regular expression"
#: the single-character escapes a pattern may write, as code points (each is a control character)
_CONTROLS = {"t": 0x09, "n": 0x0A, "r": 0x0D, "f": 0x0C, "v": 0x0B, "0": 0x00}
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
    in it), ``fix``, ``reason`` (why no grammar takes it)."""

    def __init__(self, path: str, construct: str, fix: str, reason: str = "the answer could not match it"):
        super().__init__(f"{path}: {construct}")
        self.path, self.construct, self.fix, self.reason = path, construct, fix, reason


def _escaped_in_json(code: int) -> bool:
    return any(lo <= code <= hi for lo, hi in JSON_ESCAPED)


def _json_refusal(code: int, written: str) -> ValueError:
    """The refusal of a character JSON writes escaped, named as the pattern wrote it."""
    json_text = json.dumps(chr(code))[1:-1]
    name = {0x22: 'the character "', 0x5C: "the character \\"}.get(code, f"the control character U+{code:04X}")
    if written != chr(code):
        name += f" (written {written})"
    return ValueError(name, f"leave it out: JSON writes it escaped ({json_text}), so the grammar cannot write it as "
                            "the pattern reads it")


def _code_text(code: int) -> str:
    """A code point as a grammar class writes it: an ASCII letter or digit as itself, any other by its code."""
    if chr(code).isascii() and chr(code).isalnum():
        return chr(code)
    return f"\\x{code:02X}" if code < 0x100 else f"\\u{code:04X}" if code < 0x10000 else f"\\U{code:08X}"


def _escape(pattern: str, i: int, in_negated_class: bool = False) -> tuple[str, object, int]:
    """The escape at ``pattern[i]`` (a backslash): ("code", its code point, the index after it), or ("class", its
    code-point ranges, ...) for ``\\d``, ``\\w``, ``\\s``; ``ValueError(construct, fix)`` for what has neither."""
    e = pattern[i + 1]
    i += 2
    if e in "xuU":  # \x41, \u00e9, \U0001F600: hex digits follow
        width = {"x": 2, "u": 4, "U": 8}[e]
        digits = pattern[i:i + width]
        if len(digits) < width or not all(d in "0123456789abcdefABCDEF" for d in digits):
            raise ValueError(f"the escape \\{e}{digits}", f"write \\{e} with {width} hex digits")
        if int(digits, 16) > 0x10FFFF:
            raise ValueError(f"the escape \\{e}{digits}", "write a code point up to \\U0010FFFF")
        return "code", int(digits, 16), i + width
    if e in CLASSES:
        if in_negated_class:
            raise ValueError(f"\\{e} in a negated class", f"list what the class excludes ([^0-9], not [^\\{e}])")
        return "class", _CLASS_RANGES[e], i
    if e in _CONTROLS:
        return "code", _CONTROLS[e], i
    if e in UNENFORCEABLE:
        raise ValueError(f"\\{e}", UNENFORCEABLE[e])
    if e.isalnum() or e == "_":
        raise ValueError(f"\\{e}", "write the characters it stands for, or a class of them ([0-9])")
    return "code", ord(e), i  # an escaped character is that character


def _class(pattern: str, i: int, n: int) -> tuple[str, int]:
    """The class opening at ``pattern[i]`` (``[``) as a grammar class without the characters JSON writes escaped, and
    the index after its ``]``. A negated class excludes them too; a class that lists one is refused (its grammar
    could not write it), and one whose ranges span them (``[ -~]``) is written without them."""
    at = i
    negated = pattern[i + 1:i + 2] == "^"
    i += 2 if negated else 1
    first, ranges = i, []
    while True:
        if i >= n:
            raise ValueError(f"the unclosed class {pattern[at:n]}", "close the class with ]", _NO_REGEX)
        c = pattern[i]
        if c == "]" and i > first:  # first in a class, "]" is the character
            break
        if c == "[" and pattern[i + 1:i + 2] == ":":
            raise ValueError("a POSIX class ([:digit:])", "write the range instead ([0-9])")
        written = pattern[i:i + 1]
        if c == "\\" and i + 1 < n:
            kind, value, after = _escape(pattern, i, in_negated_class=negated)
            written, i = pattern[i:after], after
            if kind == "class":
                ranges += value
                continue
            lo = value
        else:
            lo, i = ord(c), i + 1
        hi, hi_written = lo, written
        if pattern[i:i + 1] == "-" and i + 1 < n and pattern[i + 1] != "]":  # a range lo-hi
            if pattern[i + 1] == "\\" and i + 2 < n:
                kind, hi, after = _escape(pattern, i + 1, in_negated_class=negated)
                if kind == "class":
                    raise ValueError(f"the range {pattern[i - len(written):after]}",
                                     "end a range with a character, not a class escape")
                hi_written, i = pattern[i + 1:after], after
            else:
                hi, hi_written, i = ord(pattern[i + 1]), pattern[i + 1], i + 2
            if hi < lo:
                raise ValueError(f"the range {written}-{hi_written}", f"write its lower end first ({hi_written}-"
                                                                       f"{written})", _NO_REGEX)
        if negated:
            ranges.append((lo, hi))
            continue
        parts = _without_json_escaped(lo, hi)
        if not parts and lo == hi:
            raise _json_refusal(lo, written)
        if not parts:
            raise ValueError(f"the range {written}-{hi_written}", "leave it out: JSON writes each of its characters "
                                                                   "escaped, so the grammar cannot write them")
        ranges += parts
    i += 1
    if negated:
        ranges += JSON_ESCAPED
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    body = "".join(_code_text(lo) if lo == hi else _code_text(lo) + _code_text(hi) if hi == lo + 1
                   else f"{_code_text(lo)}-{_code_text(hi)}" for lo, hi in merged)
    return ("[^" if negated else "[") + body + "]", i


def _without_json_escaped(lo: int, hi: int) -> list[tuple[int, int]]:
    """The parts of the range lo..hi outside ``JSON_ESCAPED``."""
    parts = [(lo, hi)]
    for a, b in JSON_ESCAPED:
        parts = [p for x, y in parts for p in ((x, min(y, a - 1)), (max(x, b + 1), y)) if p[0] <= p[1]]
    return parts


def grammar_pattern(pattern: str) -> str:
    """``pattern`` as llama-cpp-python's converter reads it right (``ValueError(construct, fix[, reason])`` where none
    does).

    The converter copies a backslash escape into the grammar as it stands: ``\\d``, ``\\w``, ``\\s`` and an escaped
    ``.``, ``-`` or ``/`` become escapes llama.cpp's parser does not know (``^\\d+$`` gave ``"\\d"+``),
    and an escape takes a quantifier after it with the text before it (``ab\\.+``). Each becomes a one-character
    class (``[0-9]``, ``[\\x2E]``). A lazy quantifier (``+?``, ``{2}?``) becomes ``(x+)?`` in the grammar, which takes
    an empty text: it is written greedy, which matches the same whole texts. A ``]`` or ``}`` outside a class (the
    character, to Python) had the converter loop forever; each is a class too. The grammar writes the JSON text, so
    ``.`` and every class are written without the characters JSON writes escaped (``JSON_ESCAPED``: ``[^a-z]`` wrote
    a bare ``"``); a pattern that names one (``"``, ``\\x22``, ``\\\\``, ``\\n``) is refused. A count above
    ``MAX_SCHEMA_COUNT``, a reversed count (``{5,2}``: the converter wrote it as ``{5}``, and no regex engine reads
    it) and a pattern beyond ``MAX_SCHEMA_SIZE`` written out (``pattern_size``) are refused: the converter writes a
    count out in full. What has no class (``\\D``, ``\\b``, a back reference, an anchor inside the pattern) is
    refused. A pattern that is not ``^...$`` is left to the converter, which refuses it."""
    return _rewrite(pattern)[0]


def pattern_size(pattern: str) -> int:
    """How long ``pattern`` is with its counts written out, as ``MAX_SCHEMA_SIZE`` counts (``ValueError`` as
    ``grammar_pattern``): ``{n}`` and ``{m,n}`` are n copies, ``{n,}`` n + 1 (n, then ``x*``), ``*``, ``+``, ``?``,
    ``{0}`` and a lazy form one; alternatives add up (the grammar writes each)."""
    return _rewrite(pattern)[1]


def _rewrite(pattern: str) -> tuple[str, int]:
    """(``grammar_pattern``, ``pattern_size``), in one reading."""
    if len(pattern) < 2 or not pattern.startswith("^") or not pattern.endswith("$"):
        return pattern, 0
    if (len(pattern) - 1 - len(pattern[:-1].rstrip("\\"))) % 2:
        raise ValueError("an escaped '$' at its end", "end the pattern with an unescaped $, as in ^[0-9]+\\$$")
    out, i, n = ["^"], 1, len(pattern) - 1
    # the size written out: per open group, its size so far; the size of the last item (what a count repeats)
    groups, last, size = [0], 0, 0
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            kind, value, after = _escape(pattern, i)
            written, i = pattern[i:after], after
            if kind == "class":
                out.append(f"[{CLASSES[written[1]]}]")
            elif _escaped_in_json(value):
                raise _json_refusal(value, written)
            else:
                out.append(f"[{_code_text(value)}]")
            groups[-1], last, size = groups[-1] + 1, 1, size + 1
            continue
        if c == "[":
            text, i = _class(pattern, i, n)
            out.append(text)
            groups[-1], last, size = groups[-1] + 1, 1, size + 1
            continue
        if c == "{":  # a count; any other "{" is the character, as Python reads it
            count = re.match(r"\{(\d*)(,(\d*))?\}", pattern[i:n])
            if count and count.group() != "{}":
                text, low, comma, high = count.group(), count.group(1), count.group(2), count.group(3)
                if any(d and (len(d.lstrip("0")) > 9 or int(d) > MAX_SCHEMA_COUNT) for d in (low, high)):
                    raise ValueError(f"the count {text}",
                                     f"repeat at most {MAX_SCHEMA_COUNT} times, or check the length after the answer",
                                     f"a constrained answer takes counts up to {MAX_SCHEMA_COUNT}")
                low = int(low or 0)
                if high and int(high) < low:
                    raise ValueError(f"the count {text}", f"write its lower bound first ({{{high},{low}}})",
                                     "its upper bound is below its lower bound, so it is no valid regular expression")
                # x{0} is written too: its rule, then no copy of it
                copies = max(1, int(high) if high else low + 1 if comma else low)
                groups[-1], size = groups[-1] + last * (copies - 1), size + last * (copies - 1)
                last *= copies
                if size > MAX_SCHEMA_SIZE:
                    raise _too_large(f"the count {text}, which takes the pattern to {size:,} characters written out")
                out.append(text)
                i += len(text)
                continue
            c = "[\\x7B]"
        elif c in "]}":  # the character: the converter loops forever on one outside a class
            c = f"[\\x{ord(c):02X}]"
        elif c == ".":
            c = DOT
        elif _escaped_in_json(ord(c)):
            raise _json_refusal(ord(c), c)
        elif c in "^$":
            raise ValueError(f"the anchor '{c}' inside the pattern", "anchor the whole pattern once, ^(a|b)$")
        if c == "?" and (out[-1] in ("*", "+", "?") or out[-1].startswith("{")):
            i += 1  # lazy: the same whole texts as greedy
            continue
        if c == "(":
            groups.append(0)
            last = 0
        elif c == ")" and len(groups) > 1:  # an unbalanced one: the converter refuses it
            last = groups.pop()
            groups[-1] += last
        elif c == "|":
            last = 0
        elif c not in "*+?)":
            groups[-1], last, size = groups[-1] + 1, 1, size + 1
        out.append(c)
        i += 1
    if size > MAX_SCHEMA_SIZE:
        raise _too_large(f"{size:,} characters written out")
    return "".join(out) + "$", size


def _too_large(construct: str) -> ValueError:
    return ValueError(construct, "lower the counts (or shorten what a count repeats), or check the length after the "
                                 "answer", f"a constrained answer's pattern is at most {MAX_SCHEMA_SIZE:,} characters "
                                           "with its counts written out (a group's count repeats all of the group)")


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
                raise PatternError(at, *exc.args) from None
        elif key in ("enum", "const", "default", "examples"):
            out[key] = value
        else:
            out[key] = _rewritten(value, at)
    return out


#: the schema counts the converter writes out, as (least, most) keyword pairs
SIZE_COUNTS = (("minLength", "maxLength"), ("minItems", "maxItems"))


def grammar_size(schema) -> int:
    """How large ``schema``'s grammar is with its counts written out, as ``MAX_SCHEMA_SIZE`` counts: each pattern's
    ``pattern_size`` (0 for one ``for_grammar`` refuses), and each node's most length or items (its least + 1 where it
    has no most: the converter writes the least, then ``x*``), summed; values (``enum``, ``const``...) are data."""
    total, todo = 0, [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, list):
            todo.extend(node)
        if not isinstance(node, dict):
            continue
        if isinstance(node.get("pattern"), str):
            try:
                total += pattern_size(node["pattern"])
            except ValueError:
                pass  # refused by for_grammar, naming what in it
        for least, most in SIZE_COUNTS:
            low, high = (node.get(k) if type(node.get(k)) is int else None for k in (least, most))
            copies = max(high, low or 0) if high is not None else low + 1 if low is not None else 0
            total += max(0, copies)
        todo.extend(v for k, v in node.items() if k not in ("enum", "const", "default", "examples"))
    return total
