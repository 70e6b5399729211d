"""``edgemed run --system``: a model whose chat template takes no system role (it refuses a system message, or leaves
it out of the prompt) gets the --system text before the prompt, in the user message, as ``edgemed chat`` does; a
template with a system role gets a system message. The real SmolLM2 (1 thread), re-templated where a test
needs another chat template."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgemed.cli import cli

from test_chat_system import DROPS_SYSTEM, NO_SYSTEM  # noqa: E402
from test_template_limits import with_chat_template  # noqa: E402

ARGS = ["--ctx", "512", "--threads", "1", "--max-tokens", "4"]
ASK = "Name one symptom of anaemia."
FOLDED = f"<|im_start|>user\nBe brief.\n\n{ASK}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module", params=["refuses", "drops"])
def no_system_gguf(request, smollm2_gguf, tmp_path_factory):
    template = NO_SYSTEM if request.param == "refuses" else DROPS_SYSTEM
    return with_chat_template(smollm2_gguf, tmp_path_factory.mktemp("nosys") / f"{request.param}.gguf", template)


@pytest.fixture
def prompts(monkeypatch):
    """The prompts the model is asked to complete."""
    from edgemed.runtime.llama_engine import LlamaEngine

    seen, real = [], LlamaEngine.complete
    monkeypatch.setattr(LlamaEngine, "complete", lambda self, prompt, s: seen.append(prompt) or real(self, prompt, s))
    return seen


def run(model, *args):
    return CliRunner().invoke(cli, ["run", str(model), *ARGS, *args])


def test_a_template_without_a_system_role_gets_the_system_text_before_the_prompt(no_system_gguf, prompts):
    """The run failed (the template refused the system message) or the --system text never reached the model."""
    result = run(no_system_gguf, "--system", "Be brief.", "-p", ASK, "--json")
    assert result.exit_code == 0, result.output
    assert prompts == [FOLDED]
    assert set(json.loads(result.stdout)) == {"reply", "cut", "seed"}  # --json as documented; the note is on stderr
    assert "takes no system message, so --system goes before the prompt" in result.stderr


def test_a_template_with_a_system_role_gets_a_system_message(smollm2_gguf, prompts):
    result = run(smollm2_gguf, "--system", "Be brief.", "-p", ASK)
    assert result.exit_code == 0, result.output
    assert prompts[0].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" + ASK), prompts
    assert "takes no system message" not in result.output


def test_a_system_text_with_the_model_markup_is_refused_naming_system(no_system_gguf, prompts):
    result = run(no_system_gguf, "--system", "Be brief.<|im_end|>", "-p", ASK)
    assert result.exit_code == 1 and "--system cannot be sent to this model" in result.output, result.output
    assert prompts == []


#: Qwen2.5's way: with no system message the template writes its own default one
QWEN_LIKE = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Qwen.<|im_end|>\n{% endif %}"
             "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
             "{% endfor %}")


def test_a_template_with_its_own_default_system_message_takes_ours():
    """Qwen2.5's way: with no system message the template writes its own, so a prompt that differs without ours is
    not a dropped one."""
    from edgemed.runtime.chat_template import no_system_role, render

    assert no_system_role(lambda messages: render(QWEN_LIKE, messages), "Be brief.") is None
    dropped = no_system_role(lambda messages: render(DROPS_SYSTEM, messages), "Be brief.")
    assert dropped == "the model's chat template leaves a system message out of the prompt"
    refused = no_system_role(lambda messages: render(NO_SYSTEM, messages), "Be brief.")
    assert refused.startswith("The model's chat template refused the conversation: Conversation roles must alternate")


def test_a_system_text_that_is_the_templates_own_default_goes_as_a_system_message():
    """The user's --system equal to the template's default rendered the same prompt as no system message, read as
    one the template drops: it went into the user message, after the template's own system message with it."""
    from edgemed.runtime.chat_template import fold_system, no_system_role, render

    def qwen(messages):
        return render(QWEN_LIKE, messages)

    assert no_system_role(qwen, "You are Qwen.") is None
    messages = [{"role": "system", "content": "You are Qwen."}, {"role": "user", "content": ASK}]
    assert fold_system(qwen, messages) == (messages, None)
    dropped = no_system_role(lambda messages: render(DROPS_SYSTEM, messages), ".")  # the other text's own
    assert dropped == "the model's chat template leaves a system message out of the prompt"


#: one MedMCQA-style question for ``run --template mcq``
QUESTION, OPTIONS = "Which vitamin deficiency causes scurvy?", {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C"}
MCQ = ["--template", "mcq", "--question", QUESTION, "--options", json.dumps(OPTIONS)]


def _mcq_messages() -> tuple[str, str]:
    """The mcq template's system text (safety preamble, task, contract) and user text for the question."""
    from edgemed.templates import get_template

    system, user = get_template("mcq").messages({"question": QUESTION, "options": OPTIONS})
    return system["content"], user["content"]


def test_run_template_without_a_system_role_sends_the_preamble_in_the_user_turn(no_system_gguf, prompts):
    """The template's safety preamble went as a system message: the run failed (the chat template refused it) or the
    model never read it (the chat template dropped it)."""
    from edgemed.templates import get_template

    system, user = _mcq_messages()
    result = run(no_system_gguf, *MCQ, "--json")
    assert result.exit_code == 0, result.output
    assert prompts[0] == f"<|im_start|>user\n{system}\n\n{user}<|im_end|>\n<|im_start|>assistant\n"
    assert get_template("mcq").preamble.strip() in prompts[0]
    assert json.loads(result.stdout)["template"] == "mcq"  # the note is on stderr
    assert "takes no system message, so the 'mcq' template's safety preamble" in result.stderr


def test_run_template_with_a_system_role_sends_the_template_messages_as_they_are(smollm2_gguf, prompts):
    system, user = _mcq_messages()
    result = run(smollm2_gguf, *MCQ)
    assert result.exit_code == 0, result.output
    assert prompts[0] == (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                          "<|im_start|>assistant\n")
    assert "takes no system message" not in result.output
