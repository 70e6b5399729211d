"""A template's answer is parsed after the reasoning, also when the chat template opened ``<think>`` itself.

DeepSeek-R1-Distill's chat template ends the prompt with ``<think>\\n``: the reply then holds the reasoning, a
lone ``</think>`` and the answer. The MCQ letter must come from the answer, not from a letter in the reasoning.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from edgemed.serve import api
from edgemed.serve.endpoints import chat_prompt
from edgemed.serve.middleware import RequestRecord
from edgemed.templates import load_templates


class _Batcher:
    """Renders like a reasoning model's chat template; nothing else of a batcher is used here."""

    def __init__(self, opens_think: bool):
        self.opens_think = opens_think

    def chat_template(self):
        return None

    def render_chat(self, messages, tools=None):
        text = "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|Assistant|>"
        return text + ("<think>\n" if self.opens_think else "")


def _parsed(opens_think: bool, reply: str):
    served = SimpleNamespace(batcher=_Batcher(opens_think), templates=load_templates(),
                             config=SimpleNamespace(model_id="r1-like"))
    body = api.ChatRequest(model="r1-like", messages=[], template="mcq", template_inputs={
        "question": "Which vitamin deficiency causes scurvy?",
        "options": {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"}})
    prompt = asyncio.run(chat_prompt(served, RequestRecord("r1", "chat", None), body))
    return prompt.extra(reply)["edgemed"]["parsed"]


REPLY = "A first guess, Answer: A, is wrong: scurvy is a lack of vitamin C.\n</think>\n\nC. Vitamin C"


def test_the_letter_comes_from_the_answer_when_the_template_opened_think():
    assert _parsed(True, REPLY) == {"ok": True, "value": "C", "error": None}


def test_a_reply_with_its_own_think_block_parses_the_same():
    assert _parsed(False, "<think>" + REPLY)["value"] == "C"
