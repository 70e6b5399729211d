"""``edgemed run`` without a template says whether the reply was cut at --max-tokens: a ``cut`` field with --json,
a line on stderr when streaming (``chat`` too), read from how the sampler stopped; --think show puts the thinking in
--json's ``think``; ``--think cap:N`` leaves a model that does not think alone; --seed is a fixed seed or refused.
The real SmolLM2 (1 thread)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgemed.cli import cli

ARGS = ["--ctx", "512", "--threads", "1"]
ASK = "Describe iron-deficiency anaemia in detail: causes, signs, tests and treatment."


def run(*args):
    return CliRunner().invoke(cli, ["run", *args, *ARGS])


def test_a_reply_cut_at_max_tokens_says_so(smollm2_gguf):
    """It looked complete: --json wrote only the reply."""
    for raw in ([], ["--raw"]):
        result = run(str(smollm2_gguf), "-p", ASK, "--max-tokens", "5", "--json", *raw)
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["cut"] is True and data["reply"] and "think" not in data, data
        streamed = run(str(smollm2_gguf), "-p", ASK, "--max-tokens", "5", *raw)
        assert streamed.exit_code == 0 and "(cut at --max-tokens 5)" in streamed.stderr, streamed.output
        assert "(cut at" not in streamed.stdout


def test_a_whole_reply_is_not_cut_and_think_show_is_in_the_json(smollm2_gguf):
    result = run(str(smollm2_gguf), "-p", "Reply with the single word: yes", "--max-tokens", "64", "--json",
                 "--think", "show")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["cut"] is False and data["think"] == "", data  # SmolLM2 does not think
    streamed = run(str(smollm2_gguf), "-p", "Reply with the single word: yes", "--max-tokens", "64")
    assert "(cut at" not in streamed.output


def test_think_show_puts_the_thinking_in_the_json(smollm2_gguf, monkeypatch):
    """--think show was ignored by plain `run --json` (no think field)."""
    from edgemed.runtime import session

    def respond(engine, prompt, settings, policy, cut=None):
        cut.append(False)
        return iter([("think", "Low ferritin points to "), ("think", "iron."), ("answer", "Iron deficiency.")])

    monkeypatch.setattr(session, "respond", respond)
    data = json.loads(run(str(smollm2_gguf), "-p", ASK, "--json", "--think", "show").stdout)
    assert data == {"reply": "Iron deficiency.", "cut": False, "seed": 0, "think": "Low ferritin points to iron."}
    assert "think" not in json.loads(run(str(smollm2_gguf), "-p", ASK, "--json").stdout)


#: (prompt, --max-tokens, --temperature, --seed, cut): a sampled reply is not always the tokenizer's own split of its
#: text. The first samples its 40 tokens, which tokenized again are 39; the second ends its turn after 18, which
#: tokenized again are 19. "cut" counted the text tokenized again: the first read as whole, the second as cut.
SAMPLED = [(ASK, 40, "1.0", "25", True), ("Name one sign of sepsis, in a few words.", 19, "1.2", "35", False)]


def test_cut_is_how_the_sampler_stopped_not_a_count_of_the_text(smollm2_gguf):
    from edgemed.runtime.llamacpp import Model

    vocab = Model(smollm2_gguf, vocab_only=True)
    try:
        for prompt, max_tokens, temperature, seed, cut in SAMPLED:
            sampled = ["-p", prompt, "--max-tokens", str(max_tokens), "--temperature", temperature, "--seed", seed]
            data = json.loads(run(str(smollm2_gguf), *sampled, "--json").stdout)
            assert (len(vocab.tokenize(data["reply"])) >= max_tokens) is not cut, data  # what the count said
            assert data["cut"] is cut and data["seed"] == int(seed), data
            streamed = run(str(smollm2_gguf), *sampled)
            assert streamed.exit_code == 0 and ("(cut at --max-tokens" in streamed.stderr) is cut, streamed.output
    finally:
        vocab.close()


def test_think_cap_leaves_a_model_that_does_not_think_alone(smollm2_gguf):
    """SmolLM2 writes no <think>: --think cap:N stopped its answer at N tokens and fed that text again as prompt,
    which changed a greedy answer; a sampled one that read back as fewer than N tokens ended there, not cut."""
    ask = ["-p", "What are the signs of sepsis?", "--max-tokens", "60", "--json"]
    hidden = json.loads(run(str(smollm2_gguf), *ask).stdout)
    for cap in ("cap:7", "cap:10"):
        assert json.loads(run(str(smollm2_gguf), *ask, "--think", cap).stdout) == hidden, cap
    prompt, max_tokens, temperature, seed, _ = SAMPLED[0]
    sampled = ["-p", prompt, "--max-tokens", str(max_tokens), "--temperature", temperature, "--seed", seed, "--json"]
    whole = json.loads(run(str(smollm2_gguf), *sampled).stdout)
    assert whole["cut"] and json.loads(run(str(smollm2_gguf), *sampled, "--think", "cap:20").stdout) == whole


def test_chat_with_a_think_cap_answers_as_without_and_says_it_was_cut(smollm2_gguf):
    """The answer stopped at the cap (or was fed again as prompt and changed), and went into the history unmarked."""
    def chat(think):
        return CliRunner().invoke(cli, ["chat", str(smollm2_gguf), "--max-tokens", "40", "--think", think, *ARGS],
                                  input="What are the signs of sepsis?\n/exit\n")

    hidden, capped = chat("hide"), chat("cap:8")
    assert hidden.exit_code == 0 and capped.exit_code == 0, capped.output
    assert capped.stdout == hidden.stdout and "(cut at --max-tokens 40" in capped.stderr, capped.output


@pytest.mark.parametrize("command", [["run", "-p", "hi"], ["chat"]], ids=["run", "chat"])
@pytest.mark.parametrize("seed", ["-1", "4294967295", "4294967296"])
def test_a_seed_that_is_not_a_fixed_seed_is_refused(tmp_path, seed, command):
    """-1 and 2^32 - 1 were both llama.cpp's "random" seed turned into 2^32 - 2, and 2^32 was seed 0, without a word;
    refused before the model is looked for, by chat as by run."""
    r = CliRunner().invoke(cli, [command[0], str(tmp_path / "absent.gguf"), *command[1:], "--temperature", "0.8",
                                 "--seed", seed], input="hi\n/exit\n")
    assert r.exit_code == 1 and f"--seed {seed} is not a fixed seed" in r.output, r.output
    assert "from 0 to 4294967294" in r.output and "does not exist" not in r.output


def test_the_highest_fixed_seed_is_taken_and_named_in_the_json(smollm2_gguf):
    hot = ["-p", "hi", "--temperature", "0.8", "--max-tokens", "8", "--json"]
    top, zero = (json.loads(run(str(smollm2_gguf), *hot, "--seed", seed).stdout) for seed in ("4294967294", "0"))
    assert top["seed"] == 4294967294 and zero["seed"] == 0 and top["reply"] != zero["reply"], (top, zero)


def test_chat_samples_with_its_seed_as_run_does(smollm2_gguf):
    """chat had no --seed: every sampled conversation drew with seed 0. Its first answer is run's with that seed."""
    hot = ["--system", "Be brief.", "--temperature", "0.8", "--max-tokens", "8", *ARGS]
    replies = []
    for seed in ("4294967294", "0"):
        alone = json.loads(run(str(smollm2_gguf), *hot, "-p", "hi", "--seed", seed, "--json").stdout)["reply"]
        chat = CliRunner().invoke(cli, ["chat", str(smollm2_gguf), *hot, "--seed", seed], input="hi\n/exit\n")
        assert chat.exit_code == 0 and f"you> hi\n{alone}\n" in chat.stdout, (alone, chat.output)
        replies.append(alone)
    assert replies[0] != replies[1], replies
