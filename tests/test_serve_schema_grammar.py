"""A JSON schema's grammar says what the schema says: a ``pattern``'s escapes (``\\d``, ``\\w``, ``\\s``, ``\\.``) and
lazy quantifiers, a tool's ``parameters`` that refer to their own ``$defs``, and a ``strict`` function's calls under
``tool_choice: "auto"`` (unconstrained, where OpenAI's ``strict`` promises a call that follows the schema).

llama-cpp-python 0.3.36's converter copied ``^\\d+$`` into the grammar as ``"\\d"+``, which llama.cpp's parser does
not take ("unknown escape"); ``^a+?b$`` as ``"a"+? "b"``, which takes ``b``; ``^a]$`` had it loop forever; it looked a tool's ``#/$defs/...`` up from the call object it wraps the parameters in, so a
forced call to a function with ``$defs`` was a 400. Each grammar here is read back as a Python regex and compared with
the pattern on many strings.
"""

from __future__ import annotations

import json
import random
import re
from types import SimpleNamespace

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("jsonschema")

_TOKENS = re.compile(r'\s+|"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|\{\d*(?:,\d*)?\}|[A-Za-z0-9-]+|[()|*+?]')
_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "\\": "\\", '"': '"', "[": "[", "]": "]"}


def _literal(body: str) -> str:
    """A GBNF string literal's text, as llama.cpp's parser reads it (an escape it does not know is its error)."""
    out, i = [], 0
    while i < len(body):
        if body[i] != "\\":
            out.append(body[i])
            i += 1
            continue
        e = body[i + 1]
        if e in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[e]
            out.append(chr(int(body[i + 2:i + 2 + width], 16)))
            i += 2 + width
        elif e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
        else:
            raise ValueError(f"unknown escape at \\{e}")
    return "".join(out)


def _regex(gbnf: str, rule: str = "root", depth: int = 0) -> str:
    """The GBNF rule as a Python regex; a rule nested more than 12 deep (the any-JSON ``value`` is recursive) takes
    nothing."""
    if depth > 12:
        return "(?!)"
    rules = dict(line.split(" ::= ", 1) for line in gbnf.strip().splitlines())
    stack = [[]]  # the atoms of each open group; a quantifier takes the last atom whole (GBNF's "x+?" is "(x+)?")
    for token in _TOKENS.findall(rules[rule]):
        atoms = stack[-1]
        if token.isspace():
            continue
        if token.startswith('"'):
            atoms.append(re.escape(_literal(token[1:-1])))
        elif token.startswith("["):
            atoms.append(re.sub(r"\\(.)", lambda m: m.group(0) if m.group(1) in "xuUtnr\\]" else _bad(m.group(1)),
                                token))
        elif token[0].isalnum() or token == "-":
            atoms.append(f"(?:{_regex(gbnf, token, depth + 1)})")
        elif token == "(":
            stack.append([])
        elif token == ")":
            stack.pop()
            stack[-1].append(f"(?:{''.join(atoms)})")
        elif token == "|":
            atoms.append("|")
        else:  # * + ? {m,n}
            atoms[-1] = f"(?:{atoms[-1]}{token})"
    return "".join(stack[0])


def _bad(escape: str):
    raise ValueError(f"unknown escape at \\{escape}")


def _grammar_regex(pattern: str) -> re.Pattern:
    from edgemed.runtime.engine import GenerationSettings
    from edgemed.runtime.sampling import grammar_text

    return re.compile(_regex(grammar_text(GenerationSettings(json_schema=json.dumps({"type": "string",
                                                                                  "pattern": pattern})))))


#: (pattern, texts it matches): each is mutated into many near misses
PATTERNS = [
    (r"^\d+$", ["0", "123"]),
    (r"^\d{3}-\d{4}$", ["555-1234"]),
    (r"^[A-Z]{2}\d{6}$", ["AB123456"]),
    (r"^\w+@\w+\.com$", ["a_b@x1.com"]),
    (r"^\d+(\.\d+)?$", ["3.14", "7"]),
    (r"^[\d\s,]+$", ["1, 2,3"]),
    (r"^\s*\w+\s*$", [" ab ", "x"]),
    (r"^a+?b$", ["aab", "ab"]),
    (r"^(ab){2}?$", ["abab"]),
    (r"^[\w.-]+$", ["a.b-c_1"]),
    (r"^[^\-/]+$", ["abc"]),
    (r"^\/api\/v\d$", ["/api/v1"]),
    (r"^\$\d+\.\d{2}$", ["$5.00"]),
    (r"^[]a]+$", ["]a"]),
    (r"^\u00e9+\x41$", ["\u00e9\u00e9A"]),
    (r"^[a-z]{2,4}$", ["ab", "abcd"]),
    (r"^a{,2}b$", ["b", "aab"]),
    # the character "]" or "}" outside a class had the converter loop forever
    (r"^a]$", ["a]"]),
    (r"^a}$", ["a}"]),
    (r"^x{a}$", ["x{a}"]),
    # "." and a class spanning a quote, a backslash or control characters: written without them (JSON escapes them)
    (r"^.+$", ["a b", "$5.00"]),
    (r"^[^a-z]+$", ["AB-1", "9 Z"]),
    (r"^[ -~]{1,6}$", ["a b", "]{}"]),
    (r"^[\x00-\x7F]+$", ["a.b"]),
]
#: what a JSON string holds unescaped (no quote, backslash or control character), some of it beyond ASCII
ALPHABET = "0123456789abzABZ_-./,$@]{} \u00e9\u0663\u00a0"


def _near(texts: list[str], rng: random.Random) -> set[str]:
    found = set(texts) | {""}
    for _ in range(400):
        s = list(rng.choice(texts))
        for _ in range(rng.randint(1, 3)):
            at = rng.randint(0, len(s))
            op = rng.random()
            if op < 0.4 and s:
                s[min(at, len(s) - 1)] = rng.choice(ALPHABET)
            elif op < 0.7:
                s.insert(at, rng.choice(ALPHABET))
            elif s:
                del s[min(at, len(s) - 1)]
        found.add("".join(s))
    return found


@pytest.mark.parametrize(("pattern", "texts"), PATTERNS)
def test_a_patterns_grammar_takes_what_the_pattern_matches(pattern, texts):
    grammar = _grammar_regex(pattern)
    wanted = re.compile(pattern)
    for text in sorted(_near(texts, random.Random(pattern))):
        taken = grammar.fullmatch(f'"{text}" ') is not None or grammar.fullmatch(f'"{text}"') is not None
        matches = wanted.search(text) is not None
        if taken:  # never an answer the pattern refuses
            assert matches, (pattern, text)
        if text.isascii():  # ECMA's \d, \w are ASCII; \s is the space alone (a tab is written escaped in JSON)
            assert taken == matches, (pattern, text)
    for text in texts:
        assert grammar.fullmatch(f'"{text}"'), (pattern, text)


#: what a grammar must never write inside a JSON string: the string would end early, or not be JSON
JSON_BREAKERS = ['"', 'a"b', "\\", "a\\b", "\x00", "\x01", "\t", "a\nb", "\x1f", '\\"']


@pytest.mark.parametrize("pattern", [r"^.+$", r"^.*x$", r"^[^a-z]+$", r"^[^0-9]*$", r"^[ -~]+$", r"^[\x00-\x7F]+$",
                                     r"^[^\n]+$", r'^[^"\\]+$', r"^(.|[^x]){1,4}$"])
def test_a_patterns_grammar_never_writes_a_quote_a_backslash_or_a_control_character(pattern):
    """The converter's ``.`` took any character but a line break, and a negated class anything it did not list: the
    grammar wrote a bare ``"`` (the string ended early), a lone ``\\`` or a control character, none of which a JSON
    string holds. The pattern's own characters are still taken."""
    grammar = _grammar_regex(pattern)
    for text in JSON_BREAKERS:
        assert not grammar.fullmatch(f'"{text}"') and not grammar.fullmatch(f'"{text}" '), (pattern, text)
    taken = [t for t in ("A", "AB", "x", "%", "AB x") if grammar.fullmatch(f'"{t}"')]
    assert taken and all(re.search(pattern, t) for t in taken), pattern
    for text in taken:
        assert json.loads(f'"{text}"') == text


DOSE_DEFS = {"type": "object", "required": ["dose"], "properties": {"dose": {"$ref": "#/$defs/Dose"}},
             "$defs": {"Dose": {"type": "object", "required": ["mg"], "properties": {"mg": {"type": "integer"}}}}}
NOTE_DEFS = {"type": "object", "required": ["dose"], "properties": {"dose": {"$ref": "#/$defs/Dose"}},
             "$defs": {"Dose": {"type": "string"}}}


def test_a_tools_parameters_refer_to_their_own_defs():
    from edgemed.serve import tools

    before = json.dumps([DOSE_DEFS, NOTE_DEFS])
    functions = [SimpleNamespace(name="dose", parameters=DOSE_DEFS, strict=True),
                 SimpleNamespace(name="note", parameters=NOTE_DEFS, strict=False)]
    gbnf = tools.grammar(functions, False)
    assert json.dumps([DOSE_DEFS, NOTE_DEFS]) == before  # the client's schemas are left as they are
    rules = dict(line.split(" ::= ", 1) for line in gbnf.strip().splitlines())
    call = re.compile(_regex(gbnf, "call"))
    assert call.fullmatch('{"name": "dose", "arguments": {"dose": {"mg": 5}}}')
    assert call.fullmatch('{"name": "note", "arguments": {"dose": "5 mg"}}')
    # each function's Dose is its own: neither takes the other's
    assert not call.fullmatch('{"name": "dose", "arguments": {"dose": "5 mg"}}')
    assert not call.fullmatch('{"name": "note", "arguments": {"dose": {"mg": 5}}}')
    assert rules


STRICT_DOSE = {"type": "function", "function": {"name": "dose", "strict": True, "parameters": {
    "type": "object", "additionalProperties": False, "required": ["mg"], "properties": {"mg": {"type": "integer"}}}}}
LOOSE_NOTE = {"type": "function", "function": {"name": "note", "parameters": {
    "type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}}}


def test_a_strict_functions_call_under_tool_choice_auto_follows_its_schema_and_text_stays_free():
    from test_serve_schema_check import _prompt

    from edgemed.serve.tools import parse

    prompt = _prompt(tools=[STRICT_DOSE, LOOSE_NOTE], tool_choice="auto")
    answer = re.compile(_regex(prompt.grammar))
    text = ["", "Give 5 mg.", "  ok <b>bold</b> <tool_cal", "later { is fine", "a\n{\"name\": \"dose\"}"]
    calls = ['<tool_call>\n{"name": "dose", "arguments": {"mg": 5}}\n</tool_call>',
             'Calling. <tool_call>\n{"name": "note", "arguments": {"anything": [1]}}\n</tool_call>']
    for taken in text + calls:
        assert answer.fullmatch(taken), taken
    broken = ['<tool_call>\n{"name": "dose", "arguments": {"mg": "five"}}\n</tool_call>',  # the strict schema's
              'text <tool_call>{"name": "dose", "arguments": {"mg": "five"}}</tool_call>',  # no way around it
              '{"name": "dose", "arguments": {"mg": "five"}}',  # a bare call, which parse reads too
              ' ```json\n{"name": "dose", "arguments": {"mg": "five"}}\n```']
    for refused in broken:
        assert not answer.fullmatch(refused), refused
        assert not answer.fullmatch(refused.replace('"five"', "5")) or "<tool_call>\n" in refused
    for taken in text:  # what the grammar takes as text holds no call
        assert parse(taken, {"dose", "note"}).calls == []
    # a text answer is no failure of the schema check: no call was owed
    assert prompt.extra("Give 5 mg.", "stop") == {}
    bad = prompt.extra('<tool_call>\n{"name": "dose", "arguments": {"mg": 5, "x": 1}}\n</tool_call>', "stop")
    assert bad["edgemed"]["schema"]["valid"] is False


def test_tool_choice_auto_without_a_strict_function_has_no_grammar():
    from test_serve_schema_check import _prompt

    assert _prompt(tools=[LOOSE_NOTE], tool_choice="auto").grammar is None


def test_llama_cpp_parses_each_grammar_and_follows_it_for_a_while(smollm2_gguf):
    """The grammars read back above are llama.cpp's too: its parser takes them (``\\d`` copied as it stood was its
    "unknown escape") and the probe follows each for a few tokens."""
    from test_serve_schema_check import _prompt

    from edgemed.runtime.engine import GenerationSettings
    from edgemed.runtime.grammar_probe import GrammarProbe
    from edgemed.runtime.sampling import grammar_text

    probe = GrammarProbe(smollm2_gguf)
    try:
        for pattern, _ in PATTERNS:
            probe.check(grammar_text(GenerationSettings(json_schema=json.dumps({"type": "string", "pattern": pattern}))))
        probe.check(_prompt(tools=[STRICT_DOSE, LOOSE_NOTE], tool_choice="auto").grammar)
    finally:
        probe.close()
