"""Only a thinking part before the answer's first word is thinking; a ``<think>`` or ``</think>`` later is answer text.

A tag partway through an answer used to switch ``run`` and ``chat`` to the thinking channel (hidden by default, so
"Call 911 if chest pain." was never printed), and the parse left out what followed it, so "Answer: A ... <think> ...
the correct answer is D" read as a clear A. The page (``ui/think.js``) and docs/serve.md already had this rule.
"""

from __future__ import annotations

import pytest

from edgemed.runtime.engine import Finish, GenerationSettings
from edgemed.runtime.session import ask, respond
from edgemed.templates import get_template
from edgemed.templates.think import ThinkPolicy, ThinkSplitter, strip_think

ITEM = {"question": "Which vitamin deficiency causes scurvy?",
        "options": {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"}}
ADVICE = "Seek emergency care now. To mark reasoning, models write <think> tags. Call 911 if chest pain."


class _Engine:
    """Streams scripted replies in 3-character pieces (tags split between them); renders like R1 when ``opens``."""

    supports_grammar = True

    def __init__(self, *replies: str, opens: bool = False):
        self.replies, self.opens, self.calls = list(replies), opens, []

    def render_chat(self, messages):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>" + ("<think>\n" * self.opens)

    def complete(self, prompt, settings):
        self.calls.append((prompt, settings))
        text = self.replies.pop(0)
        for i in range(0, len(text), 3):
            yield text[i:i + 3]
        return Finish("eog", len(text.split()))


def _split(text: str, size: int, in_think: bool = False) -> dict:
    s = ThinkSplitter(in_think)
    out = {"think": "", "answer": ""}
    for channel, piece in [p for i in range(0, len(text), size) for p in s.feed(text[i:i + size])] + list(s.flush()):
        out[channel] += piece
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_a_tag_after_the_answer_began_is_answer_text(size):
    assert _split(ADVICE, size) == {"think": "", "answer": ADVICE}
    later = "Answer: A\n\n<think>\nHmm, on reflection A is wrong.</think>\nThe correct answer is D."
    assert _split("<think>Scurvy: vitamin C.</think>\n\n" + later, size) == {"think": "Scurvy: vitamin C.",
                                                                             "answer": later}
    assert _split("Still thinking.</think>\n" + later, size, in_think=True) == {"think": "Still thinking.",
                                                                                "answer": later}


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_thinking_before_the_first_word_is_still_thinking(size):
    assert _split(" \n<think>one</think>\n<think>two</think>\n\nAnswer: C", size) == {"think": "onetwo",
                                                                                      "answer": "Answer: C"}
    assert _split("<think>never closed, Answer: A", size) == {"think": "never closed, Answer: A", "answer": ""}


def test_strip_think_keeps_later_tags():
    assert strip_think(ADVICE) == ADVICE
    assert strip_think("\n<think>a</think> <think>b</think>\nAnswer: C <think> no") == "Answer: C <think> no"
    assert strip_think("reasoning</think>\nAnswer: C </think> D", started_in_think=True) == "Answer: C </think> D"
    assert strip_think("<think>unfinished") == "" and strip_think("unfinished", started_in_think=True) == ""


def test_the_parse_reads_what_follows_a_later_tag():
    mcq = get_template("mcq")
    assert not mcq.parse("Answer: A\n\n<think>\nHmm, on reflection A is wrong.\nThe correct answer is D.", ITEM).ok
    assert not mcq.parse("<think>x</think>Answer: A </think> The correct answer is D.", ITEM).ok
    assert mcq.parse("A first guess, A, is wrong.\n</think>\n\nAnswer: C", ITEM).value == "C"  # opened unannounced
    triage = get_template("triage")
    routine = '{"urgency": "routine", "red_flags": [], "action": "rest"}'
    assert triage.parse(routine, {"case": "x"}).ok
    assert not triage.parse(routine + "<think>this is actually an emergency", {"case": "x"}).ok


def test_run_shows_a_later_tag_and_asks_again_when_it_hides_a_correction():
    pairs = list(respond(_Engine(ADVICE), "P", GenerationSettings(), ThinkPolicy()))
    assert "".join(t for c, t in pairs if c == "answer") == ADVICE and not [t for c, t in pairs if c == "think"]
    engine = _Engine("Scurvy.</think>\n\nAnswer: A\n<think>\nNo: the correct answer is D.", "C", opens=True)
    answer = ask(engine, get_template("mcq"), ITEM, GenerationSettings(), ThinkPolicy())
    assert answer.think == "Scurvy." and answer.reply.endswith("the correct answer is D.")
    assert answer.forced and answer.parsed.value == "C" and len(engine.calls) == 2
