"""Token ids -> streamed text pieces, with stop strings.

Byte-level BPE tokens can end in the middle of a UTF-8 character, so the text
is decoded from all ids generated so far and a piece is released only when it
does not end in a replacement character. A stop string can span tokens: the
tail of the text that could still become a stop string is held back until it
either completes (generation stops, the stop string is not emitted) or cannot.
"""

from __future__ import annotations

from typing import Callable


def _prefix_function(s: str) -> list[int]:
    """``p[i]``: the length of the longest proper prefix of ``s[:i + 1]`` that is also its suffix (KMP)."""
    p = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = p[k - 1]
        if s[i] == s[k]:
            k += 1
        p[i] = k
    return p


class TextStream:
    """Each stop string is matched as the text grows, one KMP automaton per string: a token costs time in
    proportion to its own characters, never to the length of the text so far or of the stop strings (a
    quadratic search here ran on the scheduler thread, where every running request waited for it)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self._fail = [_prefix_function(s) for s in self.stop]
        self._state = [0] * len(self.stop)  # per stop string: its longest prefix that the text ends with
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that is now safe to show (maybe empty). Sets ``stopped``."""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # the token ends in part of a character: wait for the rest of it
            return ""
        return self._take(text)

    def flush(self) -> str:
        """Whatever is left when generation ends without a stop string: the text up to its last whole character.
        The last token may hold whole characters and then the start of one that never came (a byte-level token
        such as ``b" \\xc2"``): those whole characters are shown, the dangling bytes are not."""
        if self.stopped:
            return ""
        text = self.decode(self.ids).rstrip("\ufffd")
        piece = self._take(text) if text != self.text else ""
        return piece if self.stopped else piece + self._release(len(self.text))

    def _take(self, text: str) -> str:
        """``text`` is the whole text now: match the stop strings in what is new, release what is safe."""
        if not text.startswith(self.text):  # the decoded text changed behind the last piece: match it anew
            self._state = [0] * len(self.stop)
            start = 0
        else:
            start = len(self.text)
        self.text = text
        hit = self._scan(start)
        if hit is not None:
            self.stopped = True
            return self._release(hit)
        return self._release(len(text) - max(self._state, default=0))

    def _scan(self, start: int) -> int | None:
        """Feed ``text[start:]`` to every stop string's automaton; the earliest start of a completed stop string."""
        text, hit = self.text, None
        for j, s in enumerate(self.stop):
            fail, k, n = self._fail[j], self._state[j], len(s)
            for i in range(start, len(text)):
                c = text[i]
                while k and s[k] != c:
                    k = fail[k - 1]
                if s[k] == c:
                    k += 1
                if k == n:
                    hit = i + 1 - n if hit is None else min(hit, i + 1 - n)
                    break
            self._state[j] = k
        return hit

    def _release(self, end: int) -> str:
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent:end], end
        return piece
