"""`edgemed run --template`: the answer flow (contract, forced answer, think cap) on a scripted engine,
and on the real SmolLM2 with a real MedMCQA item (the repo's sample, tests/fixtures/eval-data)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgemed.cli import cli
from edgemed.runtime.engine import Finish, GenerationSettings
from edgemed.runtime.session import ask, respond
from edgemed.templates import get_template
from edgemed.templates.think import ThinkPolicy

from conftest import EVAL_DATA

MEDMCQA = EVAL_DATA / "sample" / "medagentsbench" / "medmcqa" / "test.jsonl"  # 40 real items, MIT
ITEM = {"question": "Which vitamin deficiency causes scurvy?", "options": {"A": "A", "B": "B12", "C": "C", "D": "D"}}


class ScriptedEngine:
    """Returns scripted replies in order and records every call (prompt, settings)."""

    supports_grammar = True

    def __init__(self, *replies: str, template_opens_think: bool = False):
        self.replies = list(replies)
        self.calls: list[tuple[str, GenerationSettings]] = []
        self.suffix = "<think>\n" if template_opens_think else ""

    def render_chat(self, messages):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>" + self.suffix

    def complete(self, prompt, settings):
        self.calls.append((prompt, settings))
        text = self.replies.pop(0)
        for i in range(0, len(text), 3):  # stream in small pieces, splitting tags
            yield text[i:i + 3]
        words = len(text.split())  # a word a token: a reply of max_tokens words used them all
        return Finish("length" if words >= settings.max_tokens else "eog", min(words, settings.max_tokens))

    def tokenize(self, text, add_special=False):
        return text.split()


def test_choice_answer_is_parsed_without_a_second_call():
    engine = ScriptedEngine("Vitamin C prevents scurvy.\nAnswer: C")
    answer = ask(engine, get_template("mcq"), ITEM, GenerationSettings(), ThinkPolicy())
    assert answer.parsed.value == "C" and not answer.forced and len(engine.calls) == 1
    assert engine.calls[0][1].grammar is None and engine.calls[0][1].json_schema is None


def test_missing_answer_line_is_asked_for_with_a_grammar():
    engine = ScriptedEngine("Scurvy is a disease of sailors.", "C")
    answer = ask(engine, get_template("mcq"), ITEM, GenerationSettings(), ThinkPolicy())
    assert answer.forced and answer.parsed.ok and answer.parsed.value == "C"
    prompt, settings = engine.calls[1]
    assert prompt.endswith("sailors.\nAnswer: ") and settings.grammar == 'root ::= "A" | "B" | "C" | "D"'


OPTIONS_GONE_THROUGH = "A. A - no.\nB. B12 - no.\nC. C - yes.\nD. D - no."


@pytest.mark.parametrize("reply", [OPTIONS_GONE_THROUGH, "Answer: A\n\nAnswer: C"])
def test_an_inferred_or_contradicted_answer_is_asked_for_with_a_grammar(reply):
    """A list of the options read as its last item, and the last of two answer lines won: both were reported as the
    answer without asking again."""
    engine = ScriptedEngine(reply, "C")
    answer = ask(engine, get_template("mcq"), ITEM, GenerationSettings(), ThinkPolicy())
    assert answer.forced and answer.parsed.ok and answer.parsed.value == "C" and len(engine.calls) == 2
    assert engine.calls[1][0].endswith(reply.rstrip() + "\nAnswer: ")


@pytest.mark.parametrize("reply", ["Answer: C\nActually, D.", "Answer: B. Vitamin C"])
def test_a_corrected_or_self_contradicting_answer_is_asked_for_with_a_grammar(reply):
    """The first choice was reported as the answer: the correction, or the other option's text, dropped."""
    engine = ScriptedEngine(reply, "D")
    options = {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"}
    answer = ask(engine, get_template("mcq"), {"question": ITEM["question"], "options": options}, GenerationSettings(),
                 ThinkPolicy())
    assert answer.forced and answer.parsed.ok and answer.parsed.value == "D" and len(engine.calls) == 2


def test_a_choice_reply_cut_at_max_tokens_is_asked_for_with_a_grammar():
    """'Answer: C because vitamin' stopped at max_tokens: what came next could have been a correction."""
    engine = ScriptedEngine("Answer: C because vitamin", "C")
    answer = ask(engine, get_template("mcq"), ITEM, GenerationSettings(max_tokens=4), ThinkPolicy())
    assert answer.forced and answer.parsed.ok and answer.parsed.value == "C" and len(engine.calls) == 2
    assert "cut at the token limit" in answer.parsed.error
    complete = ScriptedEngine("Answer: C because vitamin")  # the same words, under the limit: the answer, as before
    answer = ask(complete, get_template("mcq"), ITEM, GenerationSettings(max_tokens=5), ThinkPolicy())
    assert not answer.forced and answer.parsed.ok and answer.parsed.value == "C" and len(complete.calls) == 1


def test_a_text_reply_cut_at_max_tokens_is_not_ok_and_says_why():
    engine = ScriptedEngine("Answer: give 0.5 mg of")
    answer = ask(engine, get_template("open_question"), {"question": "Adrenaline dose in anaphylaxis?"},
                 GenerationSettings(max_tokens=5), ThinkPolicy())
    assert not answer.parsed.ok and "cut at the token limit" in answer.parsed.error and len(engine.calls) == 1
    thought = "<think>Anaphylaxis: IM adrenaline"  # begun as an answer would be, then again as a capped thought
    engine = ScriptedEngine(thought, thought, "Answer: give 0.5 mg of")
    answer = ask(engine, get_template("open_question"), {"question": "q"}, GenerationSettings(max_tokens=5),
                 ThinkPolicy(cap=16))
    assert not answer.parsed.ok and "cut at the token limit" in answer.parsed.error and len(engine.calls) == 3
    engine = ScriptedEngine(thought, thought, "Answer: 0.5 mg IM.")  # the answer, whole
    answer = ask(engine, get_template("open_question"), {"question": "q"}, GenerationSettings(max_tokens=5),
                 ThinkPolicy(cap=16))
    assert answer.parsed.ok and answer.parsed.value == "0.5 mg IM."


@pytest.mark.parametrize("reply, options, expected", [
    ("Answer: B. Aspirin + clopidogrel", {"A": "Aspirin", "B": "Aspirin plus clopidogrel", "C": "Warfarin"}, "B"),
    ("Answer: C\n\nCompare pernicious anemia (B) in vegans.", {"A": "A", "B": "B12", "C": "C", "D": "D"}, "C"),
    ("Answer: C\n\nFor bone health, D.", {"A": "A", "B": "B12", "C": "C", "D": "D"}, "C"),
])
def test_a_single_answer_is_taken_without_asking_again(reply, options, expected):
    """Each was asked again, constrained, as a clash or a second choice, and the first answer dropped."""
    engine = ScriptedEngine(reply, "A")
    answer = ask(engine, get_template("mcq"), {"question": ITEM["question"], "options": options}, GenerationSettings(),
                 ThinkPolicy())
    assert not answer.forced and answer.parsed.ok and answer.parsed.value == expected and len(engine.calls) == 1


def test_without_grammars_an_inferred_answer_is_no_answer():
    engine = ScriptedEngine(OPTIONS_GONE_THROUGH)
    engine.supports_grammar = False
    answer = ask(engine, get_template("mcq"), ITEM, GenerationSettings(), ThinkPolicy())
    assert not answer.parsed.ok and answer.parsed.value is None and not answer.forced and len(engine.calls) == 1


def test_json_contract_is_enforced_while_sampling():
    reply = json.dumps({"urgency": "emergency", "red_flags": ["slurred speech"], "action": "stroke team"})
    engine = ScriptedEngine(reply)
    answer = ask(engine, get_template("triage"), {"case": "slurred speech"}, GenerationSettings(), ThinkPolicy())
    assert answer.parsed.ok and answer.parsed.value["urgency"] == "emergency"
    assert json.loads(engine.calls[0][1].json_schema)["required"] == ["urgency", "red_flags", "action"]


def test_think_cap_closes_the_thought_and_constrains_only_the_answer():
    engine = ScriptedEngine("<think>Sailors lacked fresh fruit, so", '{"urgency": "routine", "red_flags": [], "action": "diet"}')
    settings = GenerationSettings(max_tokens=100, json_schema='{"type": "object"}')
    pairs = list(respond(engine, "P", settings, ThinkPolicy(cap=16)))
    first, second = engine.calls
    assert first[1].max_tokens == 16 and first[1].stop == ("</think>",) and first[1].json_schema is None
    assert second[0] == "P<think>Sailors lacked fresh fruit, so\n</think>\n\n"
    assert second[1].json_schema == '{"type": "object"}'
    think = "".join(t for c, t in pairs if c == "think")
    answer = "".join(t for c, t in pairs if c == "answer")
    assert think.startswith("Sailors lacked") and answer.startswith('{"urgency"')


def test_template_that_opens_think_is_hidden_from_parsing():
    engine = ScriptedEngine("Fruit... maybe Answer: A?\n</think>\n\nAnswer: C", template_opens_think=True)
    answer = ask(engine, get_template("mcq"), ITEM, GenerationSettings(), ThinkPolicy())
    assert answer.parsed.value == "C" and "maybe Answer: A" in answer.think


def test_cli_reports_missing_inputs_before_loading(tmp_path):
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "none.gguf"), "--template", "mcq", "--question", "q"])
    assert result.exit_code == 1 and "needs the input 'options'" in result.output and "--options" in result.output
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "none.gguf"), "--template", "nope", "--question", "q"])
    assert result.exit_code == 1 and "choose one of:" in result.output
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "none.gguf"), "--template", "mcq", "--item-json", "{oops"])
    assert result.exit_code == 1 and "--item-json is not valid JSON" in result.output


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_options_refuse_numbers_json_cannot_write(tmp_path, number):
    """They were read as Python floats and went on into the prompt; refused before the model is looked for."""
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "absent.gguf"), "--template", "mcq", "-q", "Which?",
                                      "--options", f'{{"A": {number}, "B": "iron"}}'])
    assert result.exit_code == 1, result.output
    assert f"--options is not plain JSON: {number} is not a finite number" in result.output
    assert "quoted string" in result.output


def test_options_still_name_malformed_json():
    from edgemed.cli.run import template_inputs
    from edgemed.errors import InputError

    with pytest.raises(InputError, match="--options is not a JSON object"):
        template_inputs("Which?", '{"A": "iron",', None, [])
    assert template_inputs("Which?", '{"A": 1.5}', None, [])[0]["options"] == {"A": 1.5}


ASKED = '{"question": "Scurvy?", "options": {"A": "Vitamin A", "B": "Vitamin C"}, "answer_idx": "B"}'


@pytest.mark.parametrize("question, options, pairs, says", [
    ("Other?", None, [], "--item-json and --question both give the input 'question'"),
    (None, '{"A": "Vitamin C", "B": "Vitamin A"}', [], "--item-json and --options both give the input 'options'"),
    (None, None, ["question=Third?"], "--item-json and -i question both give the input 'question'"),
])
def test_an_items_inputs_are_not_replaced_under_its_expected_answer(tmp_path, question, options, pairs, says):
    """--options over an item's options kept its answer_idx: run printed "Expected: B" where A was now correct."""
    args = ["run", str(tmp_path / "absent.gguf"), "-t", "mcq", "--item-json", ASKED, "--json"]
    args += (["--question", question] if question else []) + (["--options", options] if options else [])
    result = CliRunner().invoke(cli, args + [a for pair in pairs for a in ("-i", pair)])
    assert result.exit_code == 1 and "absent.gguf" not in result.output, result.output
    error = json.loads(result.stdout.splitlines()[-1])
    assert error["problem"] == says + "." and "ask the item as it is" in error["fix"], error


def test_an_input_given_two_ways_is_refused():
    """--question, then -i question: the -i one won without a word."""
    from edgemed.cli.run import template_inputs
    from edgemed.errors import InputError

    with pytest.raises(InputError, match="--question and -i question both give the input 'question'") as err:
        template_inputs("Scurvy?", None, None, ["question=Rickets?"])
    assert err.value.fix == "give it once: drop --question or -i question"
    with pytest.raises(InputError, match="-i context is given twice"):
        template_inputs("Scurvy?", None, None, ["context=a", "context=b"])
    inputs, expected = template_inputs(None, None, ASKED.replace('"Scurvy?"', "null"), ["question=Rickets?"])
    assert inputs["question"] == "Rickets?" and expected == "B"  # a null field is one the item does not give


PICK = ('name = "pick"\ntitle = "Pick one"\nsystem = "Choose the best answer."\n'
        'user = "{{ question }}\\n{% for k, v in answers.items() %}{{ k }}. {{ v }}\\n{% endfor %}"\n'
        'contract = { kind = "choice", choices_from = "answers" }\n'
        '[inputs.question]\nhelp = "the question"\n[inputs.answers]\nhelp = "the answers"\n')


@pytest.fixture
def pick(tmp_path, monkeypatch):
    """A user's template whose choices come from the input 'answers', not 'options'."""
    folder = tmp_path / "tpl"
    folder.mkdir()
    (folder / "index.toml").write_text('[[template]]\nname = "pick"\nfile = "pick.toml"\n')
    (folder / "pick.toml").write_text(PICK)
    monkeypatch.setenv("EDGEMED_TEMPLATES_DIR", str(folder))
    return get_template("pick")


def test_a_choices_table_other_than_options_is_given_with_i_as_json(pick, tmp_path):
    """-i answers=... reached the template as text, which it refused, with a fix that named --options (an input it
    does not have): a template taking its choices from another input could not be run from the CLI at all."""
    from edgemed.cli.run import template_inputs

    table = tmp_path / "table.json"
    table.write_text('{"A": "Vitamin C", "B": "Vitamin D"}\n')
    for value in (f"@{table}", '{"A": "Vitamin C", "B": "Vitamin D"}'):
        inputs, _ = template_inputs("Scurvy?", None, None, [f"answers={value}"], template=pick)
        assert inputs["answers"] == {"A": "Vitamin C", "B": "Vitamin D"}
        assert "A. Vitamin C\nB. Vitamin D" in pick.messages(inputs)[1]["content"]
        assert pick.choices(inputs) == ("A", "B")
    assert template_inputs("Which?", None, None, ['options={"A": "x"}'])[0]["options"] == '{"A": "x"}'  # no template


@pytest.mark.parametrize("args, problem, fix", [
    (["-i", "answers=A: Vitamin C, B: Vitamin D"], "-i answers is not a JSON object.", "-i answers='{"),
    (["-i", 'answers=["Vitamin C", "Vitamin D"]'], "-i answers is an array, not a JSON object", "-i answers=@FILE"),
    (["-i", 'answers={"A": NaN, "B": "x"}'], "-i answers is not plain JSON: NaN is not a finite number.",
     "quoted string"),
    (["-i", 'answers={"A": "Vitamin C"}'], "needs at least 2 options in 'answers'", "-i answers='{"),
    ([], "needs the input 'answers'", "pass -i answers='{"),
    (["--options", '{"A": "Vitamin C", "B": "Vitamin D"}'],
     "template 'pick' has none: it takes its choices from the input 'answers'", "pass them with -i answers='{"),
])
def test_a_choices_table_given_wrong_names_the_input_and_the_option_that_gives_it(pick, tmp_path, args, problem, fix):
    """Refused before the model is looked for; the fix names -i answers, never --options (which gives 'options')."""
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "absent.gguf"), "-t", "pick", "-q", "Scurvy?", "--json",
                                      *args])
    assert result.exit_code == 1 and "absent.gguf" not in result.output, result.output
    error = json.loads(result.stdout.splitlines()[-1])
    assert problem in error["problem"] and fix in error["fix"] and "--options" not in error["fix"], error


def test_the_options_fix_still_names_options_for_mcq_and_template_inputs_for_a_request(pick):
    from edgemed.errors import TemplateError

    with pytest.raises(TemplateError) as mcq:
        get_template("mcq").messages({"question": "q"})
    assert "--options '{" in mcq.value.fix
    with pytest.raises(TemplateError) as api:
        pick.messages({"question": "q"}, via="api")
    assert "'template_inputs': {\"answers\": {" in api.value.fix


def test_run_a_template_whose_choices_come_from_another_input(pick, tmp_path, smollm2_gguf):
    table = tmp_path / "table.json"
    table.write_text('{"A": "Vitamin C", "B": "Vitamin D"}')
    question = "Which vitamin deficiency causes scurvy?"
    result = CliRunner().invoke(cli, ["run", str(smollm2_gguf), "-t", "pick", "-q", question, "-i", f"answers=@{table}",
                                      "--max-tokens", "16", "--ctx", "1024", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["template"] == "pick" and data["ok"] and data["answer"] in ("A", "B"), data


@pytest.mark.parametrize("field", ["options", "answer_idx"])
@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_item_json_refuses_numbers_json_cannot_write(tmp_path, field, number):
    """They were read as Python floats: an option's went into the prompt, and ``run --json`` printed
    ``"expected": NaN``, which is not JSON. Refused before the model is looked for, inline and as PATH:LINE."""
    def item(options: str, answer: str) -> str:
        return f'{{"question": "Which vitamin deficiency causes scurvy?", "options": {options}, "answer_idx": {answer}}}'

    plain = item('{"A": "Vitamin C", "B": "Vitamin D"}', '"A"')
    line = item('{"A": "Vitamin C", "B": %s}' % number, '"A"') if field == "options" else item(
        '{"A": "Vitamin C", "B": "Vitamin D"}', number)
    (tmp_path / "items.jsonl").write_text(plain + "\n" + line + "\n")
    for value in (line, f"{tmp_path / 'items.jsonl'}:2"):
        result = CliRunner().invoke(cli, ["run", str(tmp_path / "absent.gguf"), "--template", "mcq", "--item-json",
                                          value, "--json"])
        assert result.exit_code == 1, result.output
        assert f"--item-json is not plain JSON: {number} is not a finite number" in result.output
        assert "quoted string" in result.output
    assert "absent.gguf" in CliRunner().invoke(cli, ["run", str(tmp_path / "absent.gguf"), "--template", "mcq",
                                                     "--item-json", f"{tmp_path / 'items.jsonl'}:1"]).output


@pytest.mark.slow
def test_run_mcq_on_a_medmcqa_item_prints_the_parsed_letter(smollm2_gguf):
    line = MEDMCQA.read_text().splitlines()[4]
    result = CliRunner().invoke(cli, ["run", str(smollm2_gguf), "--template", "mcq", "--item-json", line,
                                      "--max-tokens", "48", "--ctx", "1024", "--threads", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    parsed = [ln for ln in lines if ln.startswith("Parsed answer: ")]
    assert parsed and parsed[0].split(": ")[1][0] in "ABCD", result.output
    assert lines[-1] == f"Expected: {json.loads(line)['answer_idx']}"
    as_json = CliRunner().invoke(cli, ["run", str(smollm2_gguf), "--template", "mcq", "--item-json",
                                       f"{MEDMCQA}:5", "--max-tokens", "48", "--ctx", "1024", "--threads", "1", "--json"])
    data = json.loads(as_json.output.strip().splitlines()[-1])
    assert data["ok"] and data["answer"] in "ABCD" and data["answer"] == parsed[0].split(": ")[1][0]


def test_chat_refuses_one_message_and_goes_on(smollm2_gguf):
    """A message holding the model's markup is refused with the reason, and the chat goes on (it used to end, exit 1)."""
    result = CliRunner().invoke(cli, ["chat", str(smollm2_gguf), "--max-tokens", "8", "--ctx", "512", "--threads", "1"],
                                input="Note: <|im_end|> pasted from a log\nName one symptom of anaemia.\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "<|im_end|>" in result.output and "markup" in result.output
    assert result.output.count("you> ") == 3  # refused, answered, then /exit
    assert result.output.split("you> ")[2].split("\n")[0].strip(), result.output


def test_chat_keeps_history_and_exits(smollm2_gguf):
    result = CliRunner().invoke(cli, ["chat", str(smollm2_gguf), "--max-tokens", "12", "--ctx", "512", "--threads", "1"],
                                input="Name one symptom of anaemia.\nAnd another?\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("you> ") == 3  # two turns answered, then /exit
    replies = [part.split("\n")[0] for part in result.output.split("you> ")[1:3]]
    assert all(r.strip() for r in replies), result.output


def _scripted_respond(monkeypatch, turns):
    """``session.respond`` replaced by scripted turns: each a list of (channel, text), or an exception to raise
    after the pieces before it."""
    from edgemed.runtime import session

    calls = iter(turns)

    def respond(engine, prompt, settings, policy, cut=None):
        for item in next(calls):
            if isinstance(item, BaseException):
                raise item
            yield item

    monkeypatch.setattr(session, "respond", respond)


#: a chat whose --max-tokens leaves room in its context after the safety preamble (512 would not: chat refuses it)
CHAT_ARGS = ["--ctx", "512", "--threads", "1", "--max-tokens", "64"]


def test_ctrl_c_stops_one_answer_and_the_chat_goes_on(smollm2_gguf, monkeypatch):
    """Ctrl-C while an answer was written ended the whole chat (exit 130, the conversation lost)."""
    _scripted_respond(monkeypatch, [[("answer", "Fati"), KeyboardInterrupt()], [("answer", "Pallor.")]])
    result = CliRunner().invoke(cli, ["chat", str(smollm2_gguf), *CHAT_ARGS],
                                input="Name one symptom of anaemia.\nName one sign of anaemia.\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "(stopped: that question is left out of the conversation)" in result.output
    assert result.output.count("you> ") == 3 and "Pallor." in result.output


def test_thinking_that_uses_every_token_is_no_answer(smollm2_gguf, monkeypatch):
    """A reasoning model still thinking at --max-tokens printed an empty line and exited 0 (`run`), or saved an empty
    turn (`chat`); both now say there is no answer and how to leave tokens for one."""
    thinking = [("think", "Let me consider iron deficiency, then B12, then ")]
    _scripted_respond(monkeypatch, [thinking, thinking, thinking, [("answer", "Fatigue.")]])
    r = CliRunner().invoke(cli, ["run", str(smollm2_gguf), "-p", "Name one symptom of anaemia.", "--threads", "1",
                                 "--max-tokens", "16"])
    assert r.exit_code == 1 and "held only its thinking, no answer" in r.output and "at most write 16" in r.output
    assert "--think cap:N" in r.output
    r = CliRunner().invoke(cli, ["run", str(smollm2_gguf), "-p", "Name one symptom.", "--threads", "1", "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["error"] == "NoAnswer", r.output
    r = CliRunner().invoke(cli, ["chat", str(smollm2_gguf), *CHAT_ARGS],
                           input="Name one symptom of anaemia.\nName one.\n/exit\n")
    assert r.exit_code == 0 and "no answer" in r.output and "Fatigue." in r.output, r.output


def test_sigterm_at_the_chat_prompt_stops_it_as_a_stop(smollm2_gguf):
    """click's prompt turned SIGTERM into its Abort, which chat took for Ctrl-D: exit 0, no word of the stop."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "edgemed", "chat", str(smollm2_gguf), *CHAT_ARGS],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 120
        seen = ""
        while "/exit to quit" not in seen:  # the model is loaded: the prompt comes next
            assert time.monotonic() < deadline and proc.poll() is None, seen
            seen += proc.stderr.readline()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGTERM and "Stopped (SIGTERM)" in err, (proc.returncode, err[-2000:])


@pytest.mark.parametrize("when, error", [("generating", "Terminated"), ("closing", None)])
def test_sigterm_under_run_json_leaves_one_document(smollm2_gguf, when, error):
    """SIGTERM while the answer was written left stdout empty under --json; once the result is printed (the model
    closing), the stop adds no second document. Either way the process dies by the signal, as a clean stop does."""
    import os
    import signal
    import subprocess
    import sys

    script = ("import os, signal\n"
              "from edgemed.runtime import session\n"
              "from edgemed.runtime.llama_engine import LlamaEngine\n"
              "respond, close = session.respond, LlamaEngine.close\n"
              "def responding(engine, *args, **kwargs):\n"
              "    engine.answered = True\n"
              "    for i, item in enumerate(respond(engine, *args, **kwargs)):\n"
              "        if i == 3 and os.environ['WHEN'] == 'generating':\n"
              "            os.kill(os.getpid(), signal.SIGTERM)\n"
              "        yield item\n"
              "def closing(self):\n"
              "    close(self)\n"
              "    if os.environ['WHEN'] == 'closing' and getattr(self, 'answered', False):\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "session.respond, LlamaEngine.close = responding, closing\n"
              "from edgemed.cli import main\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", script, "run", str(smollm2_gguf), "-p", "Describe sepsis in detail.",
                           "--max-tokens", "24", "--ctx", "512", "--threads", "1", "--json"], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, WHEN=when))
    assert proc.returncode == -signal.SIGTERM and "Stopped (SIGTERM)" in proc.stderr, proc.stderr[-2000:]
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(docs) == 1, proc.stdout
    assert docs[0].get("error") == error and ("reply" in docs[0]) == (error is None), docs


def test_a_pasted_note_between_triple_quotes_is_one_message(smollm2_gguf, monkeypatch):
    """A pasted note became one turn per line, each answered; between two lines of three double quotes it is one."""
    seen = []
    from edgemed.runtime import session

    def respond(engine, prompt, settings, policy, cut=None):
        seen.append(prompt)
        yield ("answer", f"answer {len(seen)}")

    monkeypatch.setattr(session, "respond", respond)
    note = 'Summarise:\n"""\nBP 150/95.\nHR 102, febrile.\n\nK+ 3.1.\n"""\n/exit\n'
    r = CliRunner().invoke(cli, ["chat", str(smollm2_gguf), *CHAT_ARGS], input=note)
    assert r.exit_code == 0 and len(seen) == 2, r.output  # "Summarise:", then the note as one message
    assert "BP 150/95.\nHR 102, febrile.\n\nK+ 3.1." in seen[1] and "answer 3" not in r.output


def test_chat_keeps_the_shipped_safety_preamble_whatever_a_user_folder_replaces(smollm2_gguf, monkeypatch, tmp_path):
    """chat's system message was the preamble of whichever template loaded first: a user folder replacing it changed
    (or emptied) chat's safety message."""
    from edgemed.runtime import session
    from edgemed.templates.library import safety_preamble

    folder = tmp_path / "tpl"
    folder.mkdir()
    from importlib import resources

    shipped = resources.files("edgemed.templates") / "data"
    (folder / "mcq.toml").write_text((shipped / "mcq.toml").read_text())  # the first template, replaced
    (folder / "index.toml").write_text('preamble = "Task: local wording."\n'
                                       '[[template]]\nname = "mcq"\nfile = "mcq.toml"\nreplaces = true\n')
    monkeypatch.setenv("EDGEMED_TEMPLATES_DIR", str(folder))
    prompts = []
    monkeypatch.setattr(session, "respond", lambda e, prompt, s, p, cut=None: iter([prompts.append(prompt), ("answer", "ok")][1:]))
    r = CliRunner().invoke(cli, ["chat", str(smollm2_gguf), *CHAT_ARGS], input="hi\n/exit\n")
    assert r.exit_code == 0, r.output
    assert safety_preamble().strip()[:60] in prompts[0] and "local wording" not in prompts[0]


def test_ctrl_c_in_a_pasted_note_drops_the_note(smollm2_gguf, monkeypatch):
    """click turns Ctrl-C into the Abort it gives at the end of input, so a half-pasted note was sent to the model."""
    import click

    from edgemed.runtime import session

    seen = []
    monkeypatch.setattr(session, "respond", lambda e, prompt, s, p, cut=None: iter([seen.append(prompt), ("answer", "ok")][1:]))
    answers = iter(['"""', "BP 150/95.", KeyboardInterrupt, "Name one sign of anaemia.", "/exit"])

    def prompt(*a, **k):
        nxt = next(answers)
        if nxt is KeyboardInterrupt:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise click.Abort() from None
        return nxt

    monkeypatch.setattr(click, "prompt", prompt)
    r = CliRunner().invoke(cli, ["chat", str(smollm2_gguf), *CHAT_ARGS])
    assert r.exit_code == 0 and "(note dropped)" in r.output, r.output
    assert len(seen) == 1 and "BP 150/95." not in seen[0] and "anaemia" in seen[0]


@pytest.mark.parametrize("reply", ["The case is urgent", "  \n{\"urgency\": \"emergency\"} and more"])
def test_think_cap_keeps_the_constraint_when_the_model_does_not_think(reply):
    """The first words of a model that does not think were sampled without the schema and became the answer (prose,
    then the JSON): they are dropped as soon as they show no <think>, and the answer is asked for, constrained."""
    wanted = '{"urgency":"routine","red_flags":[],"action":"x"}'
    engine = ScriptedEngine(reply, wanted)
    settings = GenerationSettings(max_tokens=100, json_schema='{"type":"object"}')
    cut: list[bool] = []
    pairs = list(respond(engine, "P", settings, ThinkPolicy(cap=16), cut))
    assert "".join(t for c, t in pairs if c == "answer") == wanted and not [t for c, t in pairs if c == "think"]
    assert engine.calls[-1] == ("P", settings) and len(engine.calls) == 2 and cut == [False]


def test_think_cap_with_a_constraint_streams_a_thought_begun_after_blank_lines():
    engine = ScriptedEngine("\n <think>Stroke signs", '{"urgency": "emergency"}')
    settings = GenerationSettings(max_tokens=100, json_schema='{"type":"object"}')
    pairs = list(respond(engine, "P", settings, ThinkPolicy(cap=16)))
    assert "".join(t for c, t in pairs if c == "think") == "Stroke signs\n"
    assert "".join(t for c, t in pairs if c == "answer") == '{"urgency": "emergency"}'
    assert engine.calls[1][0] == "P\n <think>Stroke signs\n</think>\n\n" and engine.calls[1][1] == settings


def test_run_triage_with_a_think_cap_on_a_model_that_does_not_think(smollm2_gguf):
    """SmolLM2 does not think: its first words, sampled without the schema, used to become the answer (ok: false)."""
    result = CliRunner().invoke(cli, ["run", str(smollm2_gguf), "--template", "triage", "-i",
                                      "case=Crushing chest pain for 40 minutes, sweating.", "--think", "cap:6",
                                      "--max-tokens", "96", "--ctx", "1024", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["reply"].lstrip().startswith("{") and data["ok"], data
