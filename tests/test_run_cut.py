"""``edgemed run`` without a template says whether the reply was cut at --max-tokens: a ``cut`` field with --json,
a line on stderr when streaming; --think show puts the thinking in --json's ``think``. The real SmolLM2 (1 thread)."""

from __future__ import annotations

import json

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
    assert data == {"reply": "Iron deficiency.", "cut": False, "think": "Low ferritin points to iron."}
    assert "think" not in json.loads(run(str(smollm2_gguf), "-p", ASK, "--json").stdout)
