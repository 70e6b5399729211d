"""Text from untrusted input and the terminal: the characters a terminal acts on instead of showing.

A bundle's manifest and card, a registry's answer, a certificate's subject and a file name are written by someone
else and printed to an operator who decides on what they read. A terminal does not show some characters, it obeys
them: ESC starts a sequence that moves the cursor, erases a line, sets a window title, writes the clipboard (OSC 52)
or makes a link; CR goes back to the start of the line and BS back over a character; U+009B is a one-character CSI
on some terminals; the bidirectional embedding, override and isolate controls reorder what follows ("Trojan
Source", CVE-2021-42574). Any of them can hide or overwrite the line that says a bundle is unsigned.

Readers refuse such text (``control_in``: the first one in a parsed JSON or TOML tree, and where); the CLI shows
any that reach it escaped (``shown``), as Python's ``ascii`` writes them. A lone UTF-16 surrogate is in the same
class: no text holds one, and printing one raises.
"""

from __future__ import annotations

import re
from typing import Callable

#: C0 controls, DEL, C1 controls, bidi embeddings/overrides (U+202A-U+202E) and isolates (U+2066-U+2069), surrogates
_REST = "\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff"
CONTROL = re.compile(f"[\x00-\x1f{_REST}]")
#: Prose (a card's intended use, its limitations) may also break lines (\n) and hold tabs (\t)
CONTROL_IN_PROSE = re.compile(f"[\x00-\x08\x0b-\x1f{_REST}]")


def first_control(text: str, *, prose: bool = False) -> str | None:
    """The first character of ``text`` a terminal would act on (``prose``: line breaks and tabs excepted), or None."""
    found = (CONTROL_IN_PROSE if prose else CONTROL).search(text)
    return found.group() if found else None


def describe(char: str) -> str:
    """``U+001B (a control character)``: how a message names a character it refuses, without printing it."""
    code = ord(char)
    kind = ("a lone UTF-16 surrogate" if 0xD800 <= code <= 0xDFFF
            else "a bidirectional text control" if code >= 0x202A
            else "a control character")
    return f"U+{code:04X} ({kind})"


def control_in(tree, prose: Callable[[tuple], bool] | None = None) -> tuple[str, str] | None:
    """The first string in ``tree`` (parsed JSON or TOML: dicts, lists, strings, numbers) holding a control
    character, as (where, the character): where reads ``card.version`` or ``files[0].path``, and a key that holds
    one is written with ``ascii``. An object's keys are checked before its values, so ``where`` never holds one.
    ``prose(path)``, given the keys and indices down to a string value, says whether it may hold line breaks and
    tabs; keys never may. None when there is none."""
    stack: list = [(tree, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            char = first_control(value, prose=bool(prose and prose(path)))
            if char is not None:
                return _where(path), char
        elif isinstance(value, dict):
            for key in value:
                char = first_control(key) if isinstance(key, str) else None
                if char is not None:
                    return _where((*path, ascii(key))), char
            stack.extend((v, (*path, k)) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((value[i], (*path, i)) for i in range(len(value) - 1, -1, -1))
    return None


def _where(path: tuple) -> str:
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else f".{step}" if out else str(step)
    return out


#: What a refusal of such text says it is for
WHY_REFUSED = ("A terminal acts on such a character instead of showing it: printed by `edgemed inspect`, `list` or "
               "`verify`, it could hide or rewrite what edgemed says of the bundle, such as whether it is signed.")

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(found: re.Match) -> str:
    char = found.group()
    code = ord(char)
    return _SHORT.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def shown(value) -> str:
    """``value`` as text safe to print: every character ``CONTROL`` matches (line breaks and tabs too) written as
    its escape (``\\x1b``, ``\\u202e``); everything else as it is. For any string that came from a bundle, a
    registry, a certificate or a file name."""
    text = value if isinstance(value, str) else str(value)
    return CONTROL.sub(_escape, text) if CONTROL.search(text) else text


def shown_prose(text, indent: str) -> str:
    """Prose of several lines, each ``shown``, the second and later after a line break and ``indent``: a reader sees
    where the field ends, and no line of it can pass for one edgemed wrote."""
    return ("\n" + indent).join(shown(line) for line in (text if isinstance(text, str) else str(text)).split("\n"))
