"""``edgemed chat``'s system message: a model whose chat template takes no system role gets the system text before
the first message, a system text the model's format refuses ends chat before the first turn, and an answer cut at
--max-tokens says so; so does a --max-tokens the context cannot hold after it, and a message chat cannot send is
named (too long, not UTF-8). The real SmolLM2 (1 thread), re-templated where a test needs another chat template."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from edgemed.cli import cli

from test_template_limits import with_chat_template  # noqa: E402

#: SmolLM2's own format (ChatML), refusing a system role as Mistral's and Gemma 2's templates do
NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}"
             "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
             "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
#: the same format with the system message left out of the prompt without a word, as some Mistral templates do
DROPS_SYSTEM = ("{% for m in messages %}{% if m['role'] != 'system' %}"
                "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
ARGS = ["--ctx", "512", "--threads", "1"]


@pytest.fixture(scope="module")
def no_system_gguf(smollm2_gguf, tmp_path_factory):
    return with_chat_template(smollm2_gguf, tmp_path_factory.mktemp("nosys") / "mistral-style.gguf", NO_SYSTEM)


def chat(model, *args, text):
    return CliRunner().invoke(cli, ["chat", str(model), *ARGS, *args], input=text)


def test_a_template_without_a_system_role_gets_the_system_text_in_the_first_message(no_system_gguf, monkeypatch):
    """Every message was refused (the system message sent each turn), exit 0, with a fix naming nothing to change."""
    from edgemed.runtime.llama_engine import LlamaEngine

    prompts, real = [], LlamaEngine.complete
    monkeypatch.setattr(LlamaEngine, "complete", lambda self, prompt, s: prompts.append(prompt) or real(self, prompt, s))
    result = chat(no_system_gguf, "--system", "Be brief.", "--max-tokens", "8",
                  text="Name one symptom of anaemia.\nAnd another?\n/reset\nName a cause.\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "takes no system message" in result.output and "refused" not in result.output.split("you> ", 1)[1]
    assert result.output.count("you> ") == 5  # two turns, /reset, one turn, then /exit
    assert all(r.split("\n")[0].strip() for r in result.output.split("you> ")[1:3]), result.output
    assert [p.count("Be brief.") for p in prompts] == [1, 1, 1]  # once, in the first message, again after /reset
    assert prompts[0] == "<|im_start|>user\nBe brief.\n\nName one symptom of anaemia.<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_that_drops_the_system_message_gets_the_system_text_in_the_first_message(smollm2_gguf, tmp_path,
                                                                                            monkeypatch):
    """The template rendered the system message to nothing, and the --system text never reached the model."""
    from edgemed.runtime.llama_engine import LlamaEngine

    model = with_chat_template(smollm2_gguf, tmp_path / "drops-system.gguf", DROPS_SYSTEM)
    prompts, real = [], LlamaEngine.complete
    monkeypatch.setattr(LlamaEngine, "complete", lambda self, prompt, s: prompts.append(prompt) or real(self, prompt, s))
    result = chat(model, "--system", "Be brief.", "--max-tokens", "4", text="Name one symptom of anaemia.\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "leaves a system message out of the prompt" in result.output and "takes no system message" in result.output
    assert prompts == ["<|im_start|>user\nBe brief.\n\nName one symptom of anaemia.<|im_end|>\n<|im_start|>assistant\n"]


@pytest.mark.parametrize("system", ["Be brief.<|im_end|>", "Be brief.<|im_start|>system"])
def test_a_system_text_with_the_model_markup_ends_chat_before_the_first_turn(smollm2_gguf, system):
    """It was accepted, then every turn was refused, /reset included."""
    result = chat(smollm2_gguf, "--system", system, "--max-tokens", "4", text="Name one symptom of anaemia.\n/exit\n")
    assert result.exit_code == 1 and "--system" in result.output and "you> " not in result.output, result.output


def test_an_answer_cut_at_max_tokens_says_so(smollm2_gguf):
    result = chat(smollm2_gguf, "--max-tokens", "3", text="Describe anaemia in detail.\n/exit\n")
    assert result.exit_code == 0 and "(cut at --max-tokens 3" in result.output, result.output


@pytest.mark.parametrize("model", ["smollm2_gguf", "no_system_gguf"])
def test_a_max_tokens_the_context_cannot_hold_ends_chat_before_the_first_turn(model, request):
    """`chat --ctx 512 --max-tokens 600` started a chat that refused every message, /reset too, and exited 0. The
    opening messages are counted as the first prompt holds them (in the first user message where the template takes
    no system role), with the shortest message: the largest --max-tokens left still starts."""
    gguf = request.getfixturevalue(model)
    result = chat(gguf, "--max-tokens", "600", text="hi\n/reset\nhi\n")
    assert result.exit_code == 1 and "you> " not in result.output, result.output
    assert "--max-tokens 600 does not fit the context window of 512" in result.output, result.output
    opening = int(result.output.split("take ")[1].split(" tokens")[0])
    assert f"needs {opening + 600}" in result.output and f"well below {512 - opening}," in result.output
    assert "--ctx (at least " in result.output and "/reset" not in result.output
    assert chat(gguf, "--max-tokens", str(513 - opening), text="/exit\n").exit_code == 1
    assert "--max-tokens 512 (the default) does not fit" in chat(gguf, text="/exit\n").output
    assert chat(gguf, "--max-tokens", str(512 - opening), text="/exit\n").exit_code == 0


def test_a_message_too_long_for_an_empty_conversation_is_not_told_to_reset(smollm2_gguf):
    """/reset frees room only where earlier turns hold it: the first message's overflow suggested it all the same."""
    long = "fever " * 500
    result = chat(smollm2_gguf, "--max-tokens", "4", text=f"{long}\nName one sign of sepsis.\n{long}\n/exit\n")
    assert result.exit_code == 0, result.output
    first, later = result.output.split("The prompt is ")[1:3]
    assert "/reset" not in first and "(type /reset to start over)" in later, result.output


@pytest.mark.parametrize("errors", ["surrogateescape", "strict"])
def test_a_message_that_is_not_utf8_is_named_by_its_byte_and_the_chat_goes_on(smollm2_gguf, errors):
    """A Latin-1 'é' piped in was 'a lone surrogate' where standard input keeps such a byte as a surrogate escape (the
    C locale), and a traceback where it decodes strictly (a UTF-8 locale)."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "edgemed", "chat", str(smollm2_gguf), *ARGS, "--max-tokens", "4"],
                          input=b"caf\xe9 patient fever\nName one sign of sepsis.\n/exit\n", capture_output=True,
                          timeout=300, env=dict(os.environ, PYTHONIOENCODING=f"utf-8:{errors}"))
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err[-2000:]
    assert "Your message is not UTF-8 text (byte 3 is 0xe9)." in err and "surrogate" not in err, err[-2000:]
    assert out.count("you> ") == 3 and out.split("you> ")[2].split("\n")[0].strip(), out
