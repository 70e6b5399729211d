"""Reasoning models (DeepSeek-R1 distills) write ``<think>…</think>`` before the answer.

``ThinkSplitter`` turns a stream of text pieces into ``(channel, text)`` pairs,
channel ``"think"`` or ``"answer"``, even when a tag is split across pieces.
``strip_think`` removes thinking from a finished reply so answer extraction
never reads it. ``ThinkPolicy`` is the user's choice: hide, show, or cap:N.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

from edgemed.errors import InputError

OPEN, CLOSE = "<think>", "</think>"
_BLOCK = re.compile(r"<think>.*?(</think>|\Z)", re.S)


def strip_think(text: str, started_in_think: bool = False) -> str:
    """The reply without thinking. An unterminated block hides everything after it (no answer yet)."""
    if started_in_think:
        text = OPEN + text
    return _BLOCK.sub("", text).strip()


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
            tag = CLOSE if self.in_think else OPEN
            idx = self.pending.find(tag)
            if idx >= 0:
                yield from self._emit(self.pending[:idx])
                self.pending = self.pending[idx + len(tag):]
                self.in_think = not self.in_think
                continue
            keep = self._partial_tag(self.pending, tag)
            yield from self._emit(self.pending[: len(self.pending) - keep])
            self.pending = self.pending[len(self.pending) - keep:]
            break

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
