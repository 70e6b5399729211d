"""``edgemed serve`` renders a chat request's chat template once: whether the template takes a system role is probed
once per batcher and chat template (``endpoints.fold_system_once``), not again for each request with a system message
(``chat_template.fold_system`` rendered it two to four times more, each an untrusted Jinja render under the
interpreter lock, before the request's first token). The prompts are the ones ``fold_system`` makes, request by
request, for every chat template the tests have: with a system role, one that refuses a system message, one that
drops it, Qwen2.5's own default system message, R1-Distill's and a Hermes tools template. The real sandboxed
renderer, over a stand-in batcher; no model is loaded."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_chat_system import DROPS_SYSTEM, NO_SYSTEM
from test_run_system import QWEN_LIKE
from test_template_system_fold import CHATML, INPUTS

from edgemed.errors import InputError
from edgemed.runtime.chat_template import fold_system, refuse_markup, render
from edgemed.serve import api
from edgemed.serve.endpoints import chat_prompt
from edgemed.serve.middleware import RequestRecord
from edgemed.templates import load_templates

R1_DISTILL = json.loads((Path(__file__).parent / "fixtures" / "deepseek-r1-distill-qwen-1.5b" /
                         "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
#: ChatML that renders tools Hermes' way (a system turn listing them, calls as <tool_call> JSON)
HERMES = ("{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
          "Call one as <tool_call>{...}</tool_call><|im_end|>\n{% endif %}" + CHATML)
#: a template whose default system message is the probe's text
DEFAULT_IS_PROBE = QWEN_LIKE.replace("You are Qwen.", ".")
CHAT_TEMPLATES = {"system-role": CHATML, "refuses": NO_SYSTEM, "drops": DROPS_SYSTEM, "qwen-default": QWEN_LIKE,
                  "default-is-probe": DEFAULT_IS_PROBE, "r1-distill": R1_DISTILL, "hermes": HERMES}
MARKUP = frozenset({"<|im_start|>", "<|im_end|>"})
TOOLS = [{"type": "function", "function": {
    "name": "dose", "description": "A drug's dose.",
    "parameters": {"type": "object", "properties": {"drug": {"type": "string"}}}}}]


class Batcher:
    """Renders as ``Batcher.render_chat`` does (the markup refused first, then the sandboxed template), counting."""

    def __init__(self, chat_template: str):
        self.template, self.renders = chat_template, 0

    def chat_template(self):
        return self.template

    def render_chat(self, messages, tools=None):
        self.renders += 1
        refuse_markup(messages, MARKUP)
        return render(self.template, messages, bos_token="<s>", eos_token="</s>", **({"tools": tools} if tools else {}))


def _served(batcher: Batcher):
    return SimpleNamespace(batcher=batcher, templates=load_templates(), config=SimpleNamespace(model_id="m"))


def _prompt(served, messages: list[dict] | None = None, **request) -> str:
    body = (api.ChatRequest(model="m", messages=messages, **request) if messages else
            api.ChatRequest(model="m", messages=[], template="mcq", template_inputs=INPUTS))
    return asyncio.run(chat_prompt(served, RequestRecord("r1", "chat", None), body)).value


def _as_before(chat_template: str, messages: list[dict], tools=None) -> str:
    """The prompt as the server made it with ``fold_system`` on each request."""
    batcher = Batcher(chat_template)
    return batcher.render_chat(fold_system(batcher.render_chat, messages)[0], tools)


def _system(text: str, *rest: dict) -> list[dict]:
    return [{"role": "system", "content": text}, {"role": "user", "content": "Q?"}, *rest]


#: in this order through one batcher: the first system message teaches it, the others reuse what it learned
REQUESTS = [
    _system("Be careful."),
    [{"role": "user", "content": "Q?"}],
    _system("Be careful.", {"role": "assistant", "content": "A."}, {"role": "user", "content": "More?"}),
    _system("You are Qwen."),  # Qwen2.5's own default, sent as ours
    _system("."), _system(","), _system(""),  # the probe's texts, and an empty one
    [{"role": "system", "content": "Be careful."}],
    [{"role": "system", "content": "Be careful."}, {"role": "assistant", "content": "A."},
     {"role": "user", "content": "Q?"}],
    [{"role": "user", "content": "Q?"}, {"role": "system", "content": "Be careful."}],
]


@pytest.mark.parametrize("name", CHAT_TEMPLATES)
def test_each_request_gets_the_prompt_fold_system_made(name):
    chat_template = CHAT_TEMPLATES[name]
    served = _served(Batcher(chat_template))
    for messages in REQUESTS:
        try:
            expected = _as_before(chat_template, messages)
        except InputError as exc:  # refused as before (a template refusing a system message it cannot fold)
            with pytest.raises(InputError) as caught:
                _prompt(served, messages)
            assert caught.value.problem == exc.problem
            continue
        assert _prompt(served, messages) == expected, messages
    template_messages = load_templates()["mcq"].messages(INPUTS)
    assert _prompt(served) == _as_before(chat_template, template_messages)
    if name == "hermes":
        assert _prompt(served, _system("Be careful."), tools=TOOLS) == _as_before(chat_template, _system("Be careful."),
                                                                                   TOOLS)


@pytest.mark.parametrize("name", ["system-role", "refuses", "drops", "qwen-default", "hermes"])
def test_a_request_renders_the_chat_template_once(name):
    """After the first request with a system message (which probes the template), each request renders once: a plain
    chat with or without a system message, a medical template's, a tools request's. Each rendered three to five
    times where it had a system message."""
    batcher = Batcher(CHAT_TEMPLATES[name])
    served = _served(batcher)
    _prompt(served, _system("Be careful."))
    requests = [lambda: _prompt(served, _system("Be brief.")), lambda: _prompt(served, [REQUESTS[1][0]]),
                lambda: _prompt(served), lambda: _prompt(served, REQUESTS[2])]
    if name == "hermes":
        requests.append(lambda: _prompt(served, _system("Be brief."), tools=TOOLS))
    for request in requests * 2:
        before = batcher.renders
        request()
        assert batcher.renders - before == 1


def test_a_system_message_holding_the_models_markup_is_still_refused():
    """The probe's text holds no markup: a request's system text with it is refused when its prompt is rendered,
    folded or not."""
    for chat_template in (CHATML, NO_SYSTEM, DROPS_SYSTEM):
        served = _served(Batcher(chat_template))
        _prompt(served, _system("Be careful."))
        with pytest.raises(InputError, match="<\\|im_end\\|>"):
            _prompt(served, _system("Be careful.<|im_end|>"))


def test_a_batcher_is_probed_again_for_another_chat_template():
    batcher = Batcher(CHATML)
    served = _served(batcher)
    assert _prompt(served, _system("Be careful.")).startswith("<|im_start|>system\nBe careful.")
    batcher.template = NO_SYSTEM
    assert _prompt(served, _system("Be careful.")).startswith("<|im_start|>user\nBe careful.\n\nQ?")
