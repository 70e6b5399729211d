"""A medical template's system message (safety preamble, task, contract) reaches a model whose chat template takes no
system role (it refuses one, or drops it without a word) wherever a template is rendered: ``edgemed serve``'s template
route and the accuracy harness, as ``edgemed run --template`` (tests/test_run_system.py). A chat template with a
system role gets the template's messages as they are: the harness's stored prompts stand. The chat templates are the
real sandboxed renderer's, over small ChatML-format templates; no model is loaded."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from edgemed.benchmarks.harness import accuracy
from edgemed.runtime.chat_template import fold_system, render
from edgemed.templates import get_template, load_templates

from test_bench_accuracy_scoring import ITEM, ScriptedScorer  # noqa: E402
from test_chat_system import DROPS_SYSTEM, NO_SYSTEM  # noqa: E402

#: ChatML with a system role (SmolLM2's format)
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
INPUTS = {"question": ITEM.question, "options": ITEM.options}
NO_ROLE = pytest.mark.parametrize("chat_template", [NO_SYSTEM, DROPS_SYSTEM], ids=["refuses", "drops"])


def _mcq() -> tuple[str, str]:
    system, user = get_template("mcq").messages(INPUTS)
    return system["content"], user["content"]


def _folded() -> str:
    system, user = _mcq()
    return f"<|im_start|>user\n{system}\n\n{user}<|im_end|>\n<|im_start|>assistant\n"


def _as_is() -> str:
    system, user = _mcq()
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def test_fold_system_leaves_what_it_cannot_fold_as_it_is():
    """No system message, or a system message not followed by a user message: nothing to fold, nothing rendered."""
    def refuses(messages):
        raise AssertionError("rendered")

    for messages in ([{"role": "user", "content": "x"}], [{"role": "system", "content": "s"}],
                     [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]):
        assert fold_system(refuses, messages) == (messages, None)


@NO_ROLE
def test_fold_system_puts_the_system_text_before_the_first_user_message(chat_template):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"},
                {"role": "assistant", "content": "A."}, {"role": "user", "content": "More?"}]
    folded, why = fold_system(lambda m: render(chat_template, m), messages)
    assert folded == [{"role": "user", "content": "Be brief.\n\nQ?"}, *messages[2:]] and why
    assert fold_system(lambda m: render(CHATML, m), messages) == (messages, None)


# -- the accuracy harness ------------------------------------------------------------------------------------------
class TemplatedScorer(ScriptedScorer):
    """The scripted scorer, rendering with a real chat template."""

    def __init__(self, chat_template: str, replies=()):
        super().__init__("", replies)
        self.chat_template = chat_template

    def render(self, messages):
        return render(self.chat_template, messages)


def _score(scorer):
    return accuracy.score_item(scorer, accuracy._Prepared(scorer), ITEM, "mcq", 16)


@NO_ROLE
def test_the_harness_sends_the_preamble_in_the_user_turn_where_the_chat_template_has_no_system_role(chat_template):
    """The item failed (the chat template refused the system message), or the model was scored without the safety
    preamble and the answer instruction (the chat template dropped them)."""
    scorer = TemplatedScorer(chat_template, [("Answer: C\n", False)])
    rec = _score(scorer)
    assert scorer.prompts == [_folded()] and scorer.scored[-1] == _folded() + "Answer:"
    assert get_template("mcq").preamble.strip() in scorer.prompts[0] and rec["gen_pred"] == "C"


def test_the_harness_prompt_for_a_chat_template_with_a_system_role_is_the_template_messages_rendered():
    """Byte for byte what it was (stored results were scored on it)."""
    scorer = TemplatedScorer(CHATML, [("Answer: C\n", False)])
    _score(scorer)
    assert scorer.prompts == [_as_is()] == [render(CHATML, get_template("mcq").messages(INPUTS))]


# -- edgemed serve ---------------------------------------------------------------------------------------------------
def _served_prompt(chat_template: str, messages: list[dict] | None = None) -> str:
    """The prompt ``edgemed serve`` renders for the mcq template, or for ``messages`` where given."""
    from edgemed.serve import api
    from edgemed.serve.endpoints import chat_prompt
    from edgemed.serve.middleware import RequestRecord

    class Batcher:
        def chat_template(self):
            return chat_template

        def render_chat(self, messages, tools=None):
            return render(chat_template, messages)

    served = SimpleNamespace(batcher=Batcher(), templates=load_templates(), config=SimpleNamespace(model_id="m"))
    body = (api.ChatRequest(model="m", messages=messages) if messages else
            api.ChatRequest(model="m", messages=[], template="mcq", template_inputs=INPUTS))
    return asyncio.run(chat_prompt(served, RequestRecord("r1", "chat", None), body)).value


@NO_ROLE
def test_serve_sends_a_template_preamble_in_the_user_turn_where_the_chat_template_has_no_system_role(chat_template):
    """The request was a 400 (the chat template refused the system message), or the model never read the safety
    preamble (the chat template dropped it)."""
    assert _served_prompt(chat_template) == _folded()


def test_serve_sends_a_template_messages_as_they_are_where_the_chat_template_has_a_system_role():
    assert _served_prompt(CHATML) == _as_is()


@NO_ROLE
def test_serve_sends_a_clients_system_message_in_the_user_turn_where_the_chat_template_has_no_system_role(chat_template):
    """The clinician page's chat starts with the safety preamble as a system message: every question was a 400 (the
    chat template refused it), or the model never read it (the chat template dropped it)."""
    messages = [{"role": "system", "content": "Be careful."}, {"role": "user", "content": "Q?"},
                {"role": "assistant", "content": "A."}, {"role": "user", "content": "More?"}]
    assert _served_prompt(chat_template, messages) == ("<|im_start|>user\nBe careful.\n\nQ?<|im_end|>\n<|im_start|>"
                                                       "assistant\nA.<|im_end|>\n<|im_start|>user\nMore?<|im_end|>\n"
                                                       "<|im_start|>assistant\n")
    assert _served_prompt(CHATML, messages) == render(CHATML, messages)  # a system role: as sent
