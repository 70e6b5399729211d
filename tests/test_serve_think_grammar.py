"""On a model whose chat template opens ``<think>`` (R1 distills), a served request's constraint (a template's JSON
contract, ``response_format``, ``grammar``) applies to the answer after the thought, as ``edgemed run`` does.

Applied from the first token, the triage schema forced JSON at once: the model could neither think nor write
``</think>``, and the parse then read the whole reply as an unfinished thought ("no JSON object in the reply").
The grammars are followed here token by token with llama.cpp's own grammar sampler on SmolLM2's vocabulary.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
from types import SimpleNamespace

import pytest

from edgemed.runtime.engine import GenerationSettings, LoadSettings
from edgemed.runtime.sampling import after_thought, grammar_text
from edgemed.serve import api
from edgemed.serve.endpoints import chat_prompt
from edgemed.serve.middleware import RequestRecord
from edgemed.templates import load_templates

pytest.importorskip("llama_cpp")

TRIAGE = '{"urgency": "emergency", "red_flags": ["hypotension"], "action": "Call emergency services now."}'


class _Batcher:
    """Renders like a reasoning model's chat template; nothing else of a batcher is used here."""

    def __init__(self, opens_think: bool):
        self.opens_think = opens_think

    def chat_template(self):
        return None

    def render_chat(self, messages, tools=None):
        text = "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|Assistant|>"
        return text + ("<think>\n" if self.opens_think else "")


def _prompt(opens_think: bool, **request):
    served = SimpleNamespace(batcher=_Batcher(opens_think), templates=load_templates(),
                             config=SimpleNamespace(model_id="r1-like"))
    body = api.ChatRequest(model="r1-like", **request)
    return asyncio.run(chat_prompt(served, RequestRecord("r1", "chat", None), body))


def _triage(opens_think: bool):
    return _prompt(opens_think, messages=[], template="triage",
                   template_inputs={"case": "Crushing chest pain radiating to the left arm, sweating, BP 90/60."})


def _gbnf(prompt) -> str:
    """The grammar the batcher is given for ``prompt`` (``Batcher.submit_n``: the grammar, or the schema's)."""
    return grammar_text(GenerationSettings(json_schema=prompt.json_schema, grammar=prompt.grammar))


@pytest.fixture(scope="module")
def vocab(smollm2_gguf):
    from edgemed.runtime.llamacpp import Model

    model = Model(smollm2_gguf, LoadSettings(n_ctx=256, n_threads=1), vocab_only=True)
    yield model
    model.close()


def accepts(model, gbnf: str, text: str) -> bool:
    """Whether llama.cpp's grammar sampler lets a model write ``text`` (as SmolLM2's tokens) and then end."""
    import numpy as np

    from edgemed.runtime.llamacpp import _token_data_dtype

    lc, n = model.lib, model.n_vocab
    sampler = lc.llama_sampler_init_grammar(model.vocab, gbnf.encode("utf-8"), b"root")
    assert sampler, "the grammar does not parse"
    cur = np.zeros(n, dtype=_token_data_dtype(lc))
    try:
        for token in [*model.tokenize(text), model.eos()]:
            cur["id"], cur["logit"], cur["p"] = np.arange(n, dtype=np.int32), 0.0, 0.0
            array = lc.llama_token_data_array(ctypes.cast(cur.ctypes.data, ctypes.POINTER(lc.llama_token_data)), n,
                                              -1, False)
            lc.llama_sampler_apply(sampler, ctypes.byref(array))
            if not math.isfinite(float(cur["logit"][cur["id"] == token][0])):
                return False
            if token != model.eos():
                lc.llama_sampler_accept(sampler, token)
        return True
    finally:
        lc.llama_sampler_free(sampler)


def test_a_template_answer_may_think_first_when_the_chat_template_opened_think(vocab):
    prompt = _triage(True)
    gbnf = _gbnf(prompt)
    thought = "Chest pain, sweating and BP 90/60: <b>cardiogenic shock</b> is likely.\n"
    assert accepts(vocab, gbnf, thought + "</think>\n\n" + TRIAGE)
    assert accepts(vocab, gbnf, "</think>" + TRIAGE)  # no thought at all
    assert not accepts(vocab, gbnf, TRIAGE)  # the thought is closed before the answer
    assert not accepts(vocab, gbnf, thought + "</think>\n\nCall emergency services now.")  # the answer is the JSON
    parsed = prompt.extra(thought + "</think>\n\n" + TRIAGE, "stop")["edgemed"]["parsed"]
    assert parsed["ok"] and parsed["value"]["urgency"] == "emergency"


def test_without_an_opened_thought_the_constraint_applies_from_the_first_token(vocab):
    prompt = _triage(False)
    assert prompt.grammar is None and '"urgency"' in prompt.json_schema
    assert accepts(vocab, _gbnf(prompt), TRIAGE)
    assert not accepts(vocab, _gbnf(prompt), "Shock.\n</think>\n\n" + TRIAGE)


def test_a_clients_grammar_and_response_format_follow_the_thought_too(vocab):
    messages = [{"role": "user", "content": "Is aspirin an NSAID?"}]
    grammar = _gbnf(_prompt(True, messages=messages, grammar='root ::= "yes" | "no"'))
    assert accepts(vocab, grammar, "It inhibits COX.</think>\nyes") and not accepts(vocab, grammar, "yes")
    schema = {"type": "object", "properties": {"nsaid": {"type": "boolean"}}, "required": ["nsaid"]}
    shaped = _gbnf(_prompt(True, messages=messages, response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema}}))
    assert accepts(vocab, shaped, 'COX inhibitor.</think>\n\n{"nsaid": true}')
    assert not accepts(vocab, shaped, '{"nsaid": true}')


@pytest.mark.parametrize("thought", ["", "a < b", "<<", "</thin", "</think", "x </think <", "</t</th</ <</think",
                                     "<think> nested", "</>", "<\n/think>", "\u00e9\u4e2d <"])
def test_the_thought_may_hold_anything_but_the_closing_tag(vocab, thought):
    gbnf = after_thought('root ::= "yes"')
    assert accepts(vocab, gbnf, thought + "</think>yes")
    assert not accepts(vocab, gbnf, thought + "</think>no</think>yes")


def test_the_answer_grammar_keeps_its_rules_under_new_names(vocab):
    """``root`` is renamed where it is a rule name (not in a literal, a class or a comment), and the added rules take
    a prefix none of the grammar's own rules has."""
    own = 'root ::= "[root]" thought-text # root\nthought-text ::= "ok" | "(" root ")"'
    gbnf = after_thought(own)
    assert accepts(vocab, gbnf, "hmm</think>[root]ok")
    assert accepts(vocab, gbnf, "hmm</think>[root]([root]ok)")
    assert not accepts(vocab, gbnf, "hmm</think>ok")
