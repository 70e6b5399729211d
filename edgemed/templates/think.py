"""Reasoning models (DeepSeek-R1 distills) write ``<think>…</think>`` before the answer.

``ThinkSplitter`` turns a stream of text pieces into ``(channel, text)`` pairs,
channel ``"think"`` or ``"answer"``, even when a tag is split across pieces.
``strip_think`` removes thinking from a finished reply so answer extraction
never reads it. ``ThinkPolicy`` is the user's choice: hide, show, or cap:N.

Only a block before the answer's first word is thinking: one the chat template
opened (its prompt ends with ``<think>``) or one the reply opens first thing. A
tag once the answer has begun is the answer's own text: shown, and read by the
parse, so "Answer: A <think> no, D" is no clear A. The page (``ui/think.js``)
splits the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

from edgemed.errors import InputError

OPEN, CLOSE = "<think>", "</think>"
#: the blocks before the answer's first word (blank text between them); an unterminated one runs to the end
_LEADING = re.compile(r"(?:\s*<think>.*?(?:</think>|\Z))*", re.DOTALL)


def strip_think(text: str, started_in_think: bool = False) -> str:
    """The reply without its leading thinking. An unterminated block hides everything after it (no answer yet); a
    tag after the answer's first word is kept, as answer text."""
    if started_in_think:
        text = OPEN + text
    return text[_LEADING.match(text).end():].strip()


@dataclass(frozen=True)
class ThinkPolicy:
    """``show``: print the thinking; ``cap``: stop thinking after this many tokens and ask for the answer."""

    show: bool = False
    cap: int | None = None

    @classmethod
    def parse(cls, value: str) -> "ThinkPolicy":
        """``hide`` | ``show`` | ``cap:N`` (thinking hidden, at most N tokens)."""
        value = (value or "hide").strip().lower()
        modes = {"hide": cls(), "show": cls(show=True)}
        if value in modes:
            return modes[value]
        head, _, num = value.partition(":")
        if head == "cap" and num.isdigit() and int(num) > 0:
            return cls(cap=int(num))
        raise InputError(f"--think '{value}' is not understood.", "use --think hide, --think show or --think cap:N (N > 0 tokens)")


class ThinkSplitter:
    """Feed text pieces; get ``(channel, text)`` pairs with the tags removed."""

    def __init__(self, in_think: bool = False):
        self.in_think = in_think
        self.pending = ""
        self.answer_started = False

    def feed(self, piece: str) -> Iterator[tuple[str, str]]:
        self.pending += piece
        while self.pending:
            if self.answer_started:  # the answer has begun: a tag from here on is its text
                yield from self._emit(self.pending)
                self.pending = ""
                break
            tag = CLOSE if self.in_think else OPEN
            idx = self.pending.find(tag)
            keep = 0 if idx >= 0 else self._partial_tag(self.pending, tag)
            before = self.pending[:idx] if idx >= 0 else self.pending[: len(self.pending) - keep]
            if not self.in_think and before.strip():  # words before any <think>: the answer, tags and all
                text, self.pending = self.pending, ""
                yield from self._emit(text)
                break
            yield from self._emit(before)
            if idx < 0:
                self.pending = self.pending[len(self.pending) - keep:]
                break
            self.pending = self.pending[idx + len(tag):]
            self.in_think = not self.in_think

    def flush(self) -> Iterator[tuple[str, str]]:
        text, self.pending = self.pending, ""
        yield from self._emit(text)

    def _emit(self, text: str) -> Iterator[tuple[str, str]]:
        if not text:
            return
        if self.in_think:
            yield "think", text
            return
        if not self.answer_started:  # the blank lines after </think> are not part of the answer
            text = text.lstrip()
            if not text:
                return
            self.answer_started = True
        yield "answer", text

    @staticmethod
    def _partial_tag(text: str, tag: str) -> int:
        """Length of the longest end of ``text`` that could begin ``tag``."""
        for k in range(min(len(tag) - 1, len(text)), 0, -1):
            if text.endswith(tag[:k]):
                return k
        return 0
