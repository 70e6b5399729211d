"""Token ids -> streamed text pieces, with stop strings.

Byte-level BPE tokens can end in the middle of a UTF-8 character, so the text
is decoded from all ids generated so far and a piece is released only when it
does not end in a replacement character. A stop string can span tokens: the
tail of the text that could still become a stop string is held back until it
either completes (generation stops, the stop string is not emitted) or cannot.
"""

from __future__ import annotations

from typing import Callable


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that is now safe to show (maybe empty). Sets ``stopped``."""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits))
        return self._release(len(text) - self._held(text))

    def flush(self) -> str:
        """Whatever is left when generation ends without a stop string."""
        return "" if self.stopped else self._release(len(self.text))

    def _held(self, text: str) -> int:
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        return held

    def _release(self, end: int) -> str:
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent:end], end
        return piece
