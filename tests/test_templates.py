"""Medical prompt templates: golden renders for every template, contracts, <think> handling, and the
Jinja sandbox (a hostile chat template cannot run code or reach Python internals)."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from edgemed.errors import InputError, TemplateError, TemplateInputError
from edgemed.runtime.chat_template import render as render_chat
from edgemed.templates import get_template, load_templates
from edgemed.templates.contract import choice_grammar
from edgemed.templates.think import ThinkPolicy, ThinkSplitter, strip_think

GOLDEN = Path(__file__).parent / "golden"
CHATML = (GOLDEN / "chatml.jinja").read_text().rstrip("\n")
UPDATE = os.environ.get("EDGEMED_UPDATE_GOLDEN") == "1"
EXPECTED_TEMPLATES = {"mcq", "pubmedqa", "open_question", "differential", "drug", "triage",
                      "patient_education", "note_summary"}


def scenarios():
    return [(name, i) for name, t in sorted(load_templates().items()) for i in range(len(t.examples))]


def test_the_index_ships_every_template_with_a_scenario():
    templates = load_templates()
    assert set(templates) == EXPECTED_TEMPLATES
    assert all(t.examples for t in templates.values())


@pytest.mark.parametrize("name, i", scenarios())
def test_golden_render(name, i):
    """The exact prompt text a ChatML model sees for each template scenario."""
    t = get_template(name)
    prompt = render_chat(CHATML, t.messages(t.examples[i]), add_generation_prompt=True)
    golden = GOLDEN / "templates" / f"{name}-{i}.txt"
    if UPDATE:
        golden.write_text(prompt)
    assert golden.exists(), f"missing golden {golden}; run with EDGEMED_UPDATE_GOLDEN=1 and review it"
    assert prompt == golden.read_text()


def test_every_system_message_carries_the_safety_preamble_and_contract():
    for t in load_templates().values():
        system, user = t.messages(t.examples[0])
        assert system["role"] == "system" and user["role"] == "user"
        assert "never replace" in system["content"] and "emergency care now" in system["content"]
        assert t.contract.instruction(t.choices(t.examples[0])) in system["content"]


def test_missing_and_unknown_inputs_name_the_fix():
    mcq = get_template("mcq")
    with pytest.raises(TemplateError, match="needs the input 'question'"):
        mcq.messages({"options": {"A": "x"}})
    with pytest.raises(TemplateError, match="has no input colour"):
        mcq.messages({"question": "q", "options": {"A": "x"}, "colour": "red"})
    edu = get_template("patient_education")
    assert "5th grade" in edu.messages({"topic": "asthma", "reading_level": "5th grade"})[0]["content"]
    assert "6th grade" in edu.messages({"topic": "asthma"})[0]["content"]


@pytest.mark.parametrize("inputs, says", [
    ({"options": {"A": "x", "B": "y"}}, "needs the input 'question'"),
    ({"question": "q", "options": "A: x, B: y"}, "as an object of labels"),
    ({"question": "q", "options": {"A": "x"}}, "needs at least 2 options"),
    ({"question": "q", "options": {"A": "x", "a": "y"}}, "differ only in case"),
])
def test_an_input_errors_fix_names_the_way_the_caller_gives_inputs(inputs, says):
    """The CLI's fix names its options; a served request's names 'template_inputs' (it was told to pass --question,
    which no API client has)."""
    mcq = get_template("mcq")
    with pytest.raises(TemplateError, match=says) as cli:
        mcq.messages(inputs)
    assert "--" in cli.value.fix and "template_inputs" not in cli.value.fix
    with pytest.raises(TemplateError, match=says) as api:
        mcq.messages(inputs, via="api")
    assert "template_inputs" in api.value.fix and "--" not in api.value.fix, api.value.fix
    assert api.value.problem == cli.value.problem
    with pytest.raises(TemplateError, match=says) as parsed:
        mcq.parse("Answer: A", inputs, via="api")
    assert parsed.value.fix == api.value.fix


def test_a_missing_inputs_fix_says_how_to_give_that_input():
    mcq = get_template("mcq")
    with pytest.raises(TemplateError) as cli:
        mcq.fill({"options": {"A": "x", "B": "y"}})
    assert cli.value.fix == "pass it with --question '...' (or --question @FILE to read it from a file)"
    with pytest.raises(TemplateError) as api:
        mcq.fill({"options": {"A": "x", "B": "y"}}, via="api")
    assert api.value.fix == "send it in 'template_inputs': {\"question\": ...}"


def _as_run_takes_it(key: str, value) -> list[str]:
    if key == "options":
        return ["--options", json.dumps(value)]
    return ["--question", value] if key == "question" else ["-i", f"{key}={value}"]


@pytest.mark.parametrize("name", sorted(EXPECTED_TEMPLATES))
def test_a_missing_inputs_fix_is_an_option_run_has_and_takes_it_by(name, tmp_path):
    """The fix named options run does not have (--note, --case, --drugs, --topic), and ``--input options=...``, which
    run then refused (a string where an object belongs). Followed as written, it gets the command past the template,
    to the model (absent here)."""
    from click.testing import CliRunner

    from edgemed.cli import cli

    tpl = get_template(name)
    example = tpl.examples[0]
    for key in [k for k, spec in tpl.inputs.items() if spec.get("required", True) and "default" not in spec]:
        with pytest.raises(TemplateError) as missing:
            tpl.fill({k: v for k, v in example.items() if k != key})
        fix = missing.value.fix
        flag, shown = shlex.split(fix.removeprefix("pass it with ").removeprefix("pass ").split(" (or ")[0])
        assert (flag, shown) == tuple(_as_run_takes_it(key, "...")) or key == "options", fix
        value = json.dumps(example[key]) if key == "options" else example[key]
        given = [flag, f"{shown.split('=', 1)[0]}={value}" if flag == "-i" else value]
        others = [arg for k, v in example.items() if k != key for arg in _as_run_takes_it(k, v)]
        result = CliRunner().invoke(cli, ["run", str(tmp_path / "absent.gguf"), "-t", name, *others, *given])
        assert result.exit_code == 1 and "absent.gguf" in result.output, (fix, result.output)


@pytest.mark.parametrize("blank", [" ", "\n\n   \n", "\t"])
def test_a_required_input_of_only_blanks_is_missing(blank):
    """A note of blank lines (an empty decrypted file) was summarised as a case the model made up."""
    note = get_template("note_summary")
    for via in ("cli", "api"):
        with pytest.raises(TemplateError, match="needs the input 'note' .*; the one given is blank"):
            note.fill({"note": blank}, via)
    with pytest.raises(TemplateError, match="needs the input 'question'"):
        get_template("mcq").fill({"question": blank, "options": {"A": "x", "B": "y"}})
    edu = get_template("patient_education")  # an input with a default takes it, one without renders empty
    assert edu.fill({"topic": "asthma", "reading_level": blank, "language": blank})["reading_level"] == "6th grade"
    assert edu.fill({"topic": "asthma", "language": blank})["language"] == ""


def test_run_refuses_a_blank_input_before_looking_for_the_model(tmp_path):
    from click.testing import CliRunner

    from edgemed.cli import cli

    (tmp_path / "blank.txt").write_text("\n\n   \n")
    model = str(tmp_path / "absent.gguf")
    for args in (["-t", "note_summary", "-i", f"note=@{tmp_path / 'blank.txt'}"],
                 ["-t", "mcq", "--question", "   ", "--options", '{"A": "aspirin", "B": "heparin"}']):
        result = CliRunner().invoke(cli, ["run", model, *args, "--json"])
        assert result.exit_code == 1 and "absent.gguf" not in result.output, result.output
        assert json.loads(result.stdout.splitlines()[-1])["problem"].endswith("the one given is blank.")


def test_a_cut_replys_fix_names_the_way_the_caller_raises_the_limit():
    """A reply cut at its token limit is no answer, and its fix says how to give it room: the CLI's --max-tokens, and
    a request's max_tokens for a served one (the API's error, shown on the clinician page, named the CLI flag)."""
    mcq = get_template("mcq")
    inputs = {"question": "q", "options": {"A": "x", "B": "y"}}
    cli = mcq.parse("Answer: A, or", inputs, truncated=True)
    api = mcq.parse("Answer: A, or", inputs, truncated=True, via="api")
    assert not cli.ok and not api.ok and cli.answer_text == api.answer_text == "Answer: A, or"
    assert cli.error.endswith("raise max_tokens (--max-tokens) and ask again"), cli.error
    assert "max_tokens" in api.error and "--" not in api.error, api.error
    said = "the reply was cut at the token limit before it ended, so its answer may be incomplete"
    assert cli.error.split(":")[0] == api.error.split(":")[0] == said


@pytest.mark.parametrize("options", [{}, {"A": "Vitamin C"}])
def test_a_choice_from_fewer_than_two_options_is_refused(options):
    """One option is no question: the model could only name it, and its letter would read as an answer (the page
    sent one when Enter was pressed in the first option box)."""
    mcq = get_template("mcq")
    with pytest.raises(TemplateError, match=f"needs at least 2 options in 'options' \\(got {len(options)}\\)") as err:
        mcq.messages({"question": "Which vitamin deficiency causes scurvy?", "options": options})
    assert '"B"' in err.value.fix
    assert mcq.choices({"question": "q", "options": {"A": "Vitamin C", "B": "Vitamin A"}}) == ("A", "B")


@pytest.mark.parametrize("value, kind", [(["a", "b"], "an array"), ({"q": 1}, "an object"), (True, "true"),
                                         (False, "false"), (None, "null")])
def test_an_input_that_is_not_text_is_refused_naming_it(value, kind):
    """A served request's template_inputs (and an --item-json's fields) are any JSON: ["a", "b"] reached the prompt
    as "Question: ['a', 'b']", true as "True", and a false context was dropped by the text's {% if %}."""
    mcq = get_template("mcq")
    inputs = {"question": value, "options": {"A": "x", "B": "y"}}
    with pytest.raises(TemplateInputError) as api:
        mcq.messages(inputs, "api")
    assert api.value.problem == f"Template 'mcq': template_inputs.question must be text, not {kind}."
    assert api.value.key == "question" and "'template_inputs': {\"question\": \"...\"}" in api.value.fix
    with pytest.raises(TemplateInputError, match=f"the input 'question' must be text, not {kind}") as cli:
        mcq.messages(inputs)
    assert "--item-json" in cli.value.fix


def test_a_number_input_is_its_text_and_a_zero_is_kept():
    """A number is text written out (an age of 54); a context of 0 rendered nothing."""
    user = get_template("open_question").messages({"question": "Dose?", "context": 0}, "api")[1]["content"]
    assert user.startswith("Context: 0\n")
    assert get_template("mcq").fill({"question": 54, "options": {"A": 5, "B": 10.5}}) == {
        "question": "54", "options": {"A": "5", "B": "10.5"}}


@pytest.mark.parametrize("options, label, why", [
    ({"A": "", "B": "heparin"}, "A", "has no text"),
    ({"A": "aspirin", "B": "  "}, "B", "has no text"),
    ({"A": None, "B": "heparin"}, "A", "is null, not text"),
    ({"A": "aspirin", "B": {"z": [1]}}, "B", "is an object, not text"),
])
def test_an_option_without_text_is_refused_naming_it(options, label, why):
    """They reached the model as "A." and "B. {'z': [1]}": a choice between empty lines."""
    mcq = get_template("mcq")
    with pytest.raises(TemplateInputError) as err:
        mcq.messages({"question": "Which anticoagulant?", "options": options}, "api")
    assert err.value.problem.startswith(f"Template 'mcq': the option '{label}' in template_inputs.options {why}")
    assert err.value.key == f"options.{label}" and "template_inputs" in err.value.fix


@pytest.mark.parametrize("options, says", [
    ({"A": "x", "B": "y", "A ": "z"}, "the option label 'A ' has spaces around it"),
    ({" A": "x", "B": "y"}, "the option label ' A' has spaces around it"),
    ({"A\nB": "x", "C": "y"}, "the option label 'A\\nB' holds a line break or an invisible character"),
    ({"A\u200b": "x", "B": "y"}, "the option label 'A\\u200b' holds a line break or an invisible character"),
    ({"A": "x", "\uff21": "y"}, "the options 'A' and '\uff21' differ only in case or width"),
])
def test_an_option_label_no_answer_line_can_name_is_refused(options, says):
    """"A " beside "A": "Answer: A " parsed as A, so option "A " could never be the answer; "A\nB" rendered as two
    lines that read as two options, and no answer line could name it."""
    with pytest.raises(TemplateError) as err:
        get_template("mcq").messages({"question": "q", "options": options}, "api")
    assert says in err.value.problem and "label each option" in err.value.fix


# -- contracts -------------------------------------------------------------------------
MCQ_INPUTS = {"question": "q", "options": {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"}}


@pytest.mark.parametrize("reply, expected", [
    ("Scurvy is vitamin C deficiency.\nAnswer: C", "C"),
    ("**Answer:** (b)", "B"),
    ("The correct answer is D because ...", "D"),
    ("A. Vitamin A is wrong.\nAnswer: C", "C"),
    ("C. Vitamin C", "C"),
    ("<think>Maybe Answer: A? no.</think>\nAnswer: B", "B"),
    ("B", "B"),
    ("**D**.", "D"),
])
def test_choice_contract_parses(reply, expected):
    parsed = get_template("mcq").parse(reply, MCQ_INPUTS)
    assert parsed.ok and parsed.value == expected


def test_choice_contract_rejects_letters_outside_the_options_and_thinking_only():
    mcq = get_template("mcq")
    assert not mcq.parse("Answer: E", MCQ_INPUTS).ok
    assert not mcq.parse("The answer is a matter of debate. Answer a simpler question.", MCQ_INPUTS).ok
    assert not mcq.parse("<think>Answer: A", MCQ_INPUTS).ok  # unterminated thinking hides everything
    yn = get_template("pubmedqa")
    assert yn.parse("Answer: Maybe", {"question": "q", "context": "c"}).value == "maybe"
    # a reply that is one bare choice is that choice; a bare word inside prose is not
    assert yn.parse("maybe", {"question": "q", "context": "c"}).value == "maybe"
    assert yn.parse(" Yes.", {"question": "q", "context": "c"}).value == "yes"
    assert not yn.parse("maybe not", {"question": "q", "context": "c"}).ok
    assert not mcq.parse("a", MCQ_INPUTS).ok  # lower-case letter alone: prose, not option A


def test_a_choice_matched_through_unicode_case_folding_is_that_choice_not_a_crash():
    """Python's re.I folds "ſ" (long s) to "s" and "K" (Kelvin) to "k", str.lower does not: the reply's choice was
    looked up with lower() and raised StopIteration (a 500 from the server)."""
    mcq = get_template("mcq")
    inputs = {"question": "q", "options": {"s": "x", "t": "y", "k": "z"}}
    assert mcq.parse("Answer: \u017f", inputs).value == "s"
    assert mcq.parse("Answer: \u212a", inputs).value == "k"


@pytest.mark.parametrize("reply, expected, labelled", [
    ("Answer: a patient with this needs C", None, False),  # the article, not option A
    ("Answer: A patient needs rest", None, False),
    ("Answer: A or B", None, False),                        # a hedge names no answer
    ("Answer: B and C", None, False),
    ("Answer: C. Vitamin C", "C", True),
    ("Answer: C - ascorbic acid", "C", True),
    ("Answer: B\nthe reason is", "B", True),
    ("Answer: B, because of the rash", "B", True),
    ("A. Hypertension is unlikely here.\nB. Nor this.\nAnswer: C", "C", True),
    ("A. Hypertension is unlikely here.\n", None, False),  # a list's first line is no answer line
])
def test_the_answer_line_is_the_one_a_clinician_means(reply, expected, labelled):
    parsed = get_template("mcq").parse(reply, MCQ_INPUTS)
    assert (parsed.value if parsed.ok else None) == expected and parsed.labelled == labelled
    yn = get_template("pubmedqa")
    assert not yn.parse("Answer: Maybe or no", {"question": "q", "context": "c"}).ok
    assert yn.parse("Answer: no evidence of benefit", {"question": "q", "context": "c"}).value == "no"


def test_json_contract_checks_the_schema():
    triage = get_template("triage")
    good = json.dumps({"urgency": "emergency", "red_flags": ["slurred speech"], "action": "call 112"})
    assert triage.parse(good, {"case": "x"}).value["urgency"] == "emergency"
    bad = triage.parse(json.dumps({"urgency": "whenever", "red_flags": [], "action": "wait"}), {"case": "x"})
    assert not bad.ok and "is not one of" in bad.error
    assert not triage.parse("I think it is urgent.", {"case": "x"}).ok
    assert json.loads(triage.contract.json_schema())["properties"]["urgency"]["enum"][0] == "emergency"


def test_text_contract_and_choice_grammar():
    t = get_template("open_question")
    assert t.parse("<think>hmm</think>Answer: Amoxicillin.", {"question": "q"}).value == "Amoxicillin."
    assert not t.parse("<think>only thinking</think>", {"question": "q"}).ok
    assert choice_grammar(("A", "B")) == 'root ::= "A" | "B"'


# -- <think> -----------------------------------------------------------------------------
def collect(pieces, in_think=False):
    s = ThinkSplitter(in_think)
    out = [pair for p in pieces for pair in s.feed(p)] + list(s.flush())
    joined = {"think": "", "answer": ""}
    for channel, text in out:
        joined[channel] += text
    return joined


def test_think_splitter_handles_tags_split_across_pieces():
    text = "<think>The stem says scurvy.\nSo vitamin C.</think>\n\nAnswer: C"
    for size in (1, 2, 3, 5, 7, len(text)):
        got = collect([text[i:i + size] for i in range(0, len(text), size)])
        assert got == {"think": "The stem says scurvy.\nSo vitamin C.", "answer": "Answer: C"}, size


def test_think_splitter_when_the_template_opened_the_block_and_without_thinking():
    assert collect(["reasoning...", "</th", "ink>Answer: A"], in_think=True) == {"think": "reasoning...", "answer": "Answer: A"}
    assert collect(["Answer: <b>A</b> <thin"]) == {"think": "", "answer": "Answer: <b>A</b> <thin"}
    assert strip_think("x</think>Answer: B", started_in_think=True) == "Answer: B"


def test_think_policy_parsing():
    assert ThinkPolicy.parse("hide") == ThinkPolicy() and ThinkPolicy.parse("show").show
    assert ThinkPolicy.parse("cap:64").cap == 64
    for bad in ("cap:0", "cap:x", "loud"):
        with pytest.raises(InputError, match="--think"):
            ThinkPolicy.parse(bad)


# -- sandbox -----------------------------------------------------------------------------
HOSTILE = [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('touch {marker}') }}",
    "{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "{{ self.__init__.__globals__.__builtins__.open('/etc/passwd').read() }}",
    "{% set _ = messages.append({'role': 'user', 'content': 'injected'}) %}ok",
    "{{ messages[0].content.format.__globals__ }}",
]


@pytest.mark.parametrize("source", HOSTILE)
def test_hostile_chat_template_cannot_escape(source, tmp_path):
    marker = tmp_path / "PWNED"
    messages = [{"role": "user", "content": "hi"}]
    try:
        out = render_chat(source.replace("{marker}", str(marker)), messages)
    except InputError:
        out = ""
    assert not marker.exists()
    assert "class '" not in out and "root:" not in out and "<module" not in out and "function" not in out
    assert messages == [{"role": "user", "content": "hi"}]


def test_hostile_user_template_file_is_sandboxed_too(tmp_path, monkeypatch):
    folder = tmp_path / "tpl"
    folder.mkdir()
    (folder / "index.toml").write_text('[[template]]\nname = "evil"\nfile = "evil.toml"\n')
    (folder / "evil.toml").write_text(
        'name = "evil"\ntitle = "t"\nsystem = "s"\nuser = "{{ question.__class__.__mro__[1].__subclasses__() }}"\n'
        '[inputs.question]\nhelp = "q"\n[contract]\nkind = "text"\n')
    monkeypatch.setenv("EDGEMED_TEMPLATES_DIR", str(folder))
    with pytest.raises(TemplateError, match="failed to render"):
        get_template("evil").messages({"question": "x"})


def test_malformed_user_template_names_file_and_field(tmp_path, monkeypatch):
    folder = tmp_path / "tpl"
    folder.mkdir()
    (folder / "index.toml").write_text('[[template]]\nname = "mine"\nfile = "mine.toml"\n')
    (folder / "mine.toml").write_text('name = "mine"\ntitle = "t"\nsystem = "s"\nuser = "u"\n[contract]\nkind = "poem"\n')
    monkeypatch.setenv("EDGEMED_TEMPLATES_DIR", str(folder))
    with pytest.raises(TemplateError, match=r"mine.toml: contract.kind: expected one of choice, json, text"):
        load_templates()


def test_hostile_template_inside_a_real_gguf_engine(smollm2_gguf):
    """The llama.cpp engine renders the model's template through the same sandbox."""
    from edgemed.runtime import open_engine
    from edgemed.runtime.engine import LoadSettings

    engine = open_engine(smollm2_gguf, LoadSettings(n_ctx=256, n_threads=1))
    try:
        normal = engine.render_chat([{"role": "user", "content": "hi"}])
        assert normal.endswith("<|im_start|>assistant\n")
        real_meta = engine.model.meta
        engine.model.meta = lambda key: HOSTILE[0] if key == "tokenizer.chat_template" else real_meta(key)
        with pytest.raises(InputError):
            engine.render_chat([{"role": "user", "content": "hi"}])
    finally:
        engine.close()


# -- a user's template folder: each malformed part refused at load, naming the file and the field ---------------
GOOD_INDEX = '[[template]]\nname = "mine"\nfile = "mine.toml"\n'
HEAD = {"name": '"mine"', "title": '"t"', "system": '"s"', "user": '"{{ question }}"', "contract": '{ kind = "text" }'}
INPUTS = '[inputs.question]\nhelp = "q"\n'


def template_text(tables: str = INPUTS, **head) -> str:
    """A template file: top-level keys (``HEAD``, overridden or added by ``head``), then ``tables``."""
    return "".join(f"{k} = {v}\n" for k, v in (HEAD | head).items()) + tables


GOOD_TEMPLATE = template_text()
BAD_TEMPLATES = {
    "inputs a list": (template_text("", inputs='["question"]'), "inputs: expected a table, got an array"),
    "input name with a dash": (template_text('[inputs.patient-age]\nhelp = "x"\n'), "inputs.patient-age: an input's name"),
    "input name a Jinja word": (template_text('[inputs.none]\nhelp = "x"\n'), "inputs.none: an input's name"),
    "input name with a space": (template_text('[inputs."the age"]\nhelp = "x"\n'), "inputs.the age: an input's name"),
    "required a string": (template_text('[inputs.question]\nrequired = "no"\n'), "inputs.question.required: expected true or false"),
    "help a number": (template_text('[inputs.question]\nhelp = 3\n'), "inputs.question.help: expected a string, got int"),
    "choices of numbers": (template_text(contract='{ kind = "choice", choices = [1, 2] }'), "contract.choices: every choice"),
    "choices_from no input": (template_text(contract='{ kind = "choice", choices_from = "opts" }'),
                              "contract.choices_from: names no input"),
    "contract a string": (template_text(contract='"text"'), "contract: expected a table, got a string"),
    "system a number": (template_text(system="1"), "system: expected a string, got int"),
    "examples a table": (template_text(INPUTS + '[examples]\nquestion = "x"\n'), "examples: expected an array, got a table"),
    # an input named self failed every render with a TypeError; loop is shadowed inside a for loop
    "input named self": (template_text('[inputs.self]\nhelp = "x"\n', user='"{{ self }}"'), "inputs.self: an input's name"),
    "input named loop": (template_text('[inputs.loop]\nhelp = "x"\n', user='"{{ loop }}"'), "inputs.loop: an input's name"),
    # a choice contract's keys that were accepted and then ignored, or made any line an answer line
    "choice label empty": (template_text(contract='{ kind = "choice", label = "", choices = ["yes", "no"] }'),
                           "contract.label: template 'mine': a choice contract's label opens its answer line"),
    "choices differ in case": (template_text(contract='{ kind = "choice", choices = ["yes", "no", "Yes"] }'),
                               "contract.choices: template 'mine': the choices 'yes' and 'Yes' differ only in case"),
    "choices twice": (template_text(contract='{ kind = "choice", choices = ["yes", "no", "no"] }'),
                      "contract.choices: template 'mine': the choices 'no' and 'no' are the same"),
    # a variable no input declares failed only at its first use, with a fix (pass --input ward) the template refused
    "undeclared variable": (template_text(INPUTS, user='"Note: {{ question }}\\nWard: {{ ward }}"'),
                            "user: uses {{ ward }}, which is no input of 'mine' (its inputs: question)"),
    "undeclared in system": (template_text(INPUTS, system='"{% if urgent %}Hurry.{% endif %}"'),
                             "system: uses {{ urgent }}, which is no input of 'mine'"),
    "jinja syntax error": (template_text(INPUTS, user='"{{ question "'), "user: a Jinja syntax error at line 1"),
    "a choice of markdown": (template_text(contract='{ kind = "choice", choices = ["yes", "no", "**"] }'),
                             "contract.choices: template 'mine': the choice '**' has no letter or digit"),
    "choices and choices_from": (template_text(contract='{ kind = "choice", choices = ["yes"], choices_from = "question" }'),
                                 "contract.choices_from: template 'mine' gives both choices and choices_from"),
    "schema on a choice": (template_text(contract='{ kind = "choice", choices = ["yes", "no"], schema = { type = "object" } }'),
                           "contract.schema: template 'mine' has a choice contract, which does not use 'schema'"),
    "choices on a text": (template_text(contract='{ kind = "text", choices = ["yes", "no"] }'),
                          "contract.choices: template 'mine' has a text contract, which does not use 'choices'"),
    # a default of ["a", 1] rendered as Python's repr: defaults are values of their input, checked at load
    "default an array": (template_text('[inputs.question]\ndefault = ["a", 1]\n'),
                         "inputs.question.default: expected a string, got an array"),
    "default true": (template_text('[inputs.question]\ndefault = true\n'),
                     "inputs.question.default: expected a string, got true or false"),
    "options default a string": (template_text(INPUTS + '[inputs.opts]\ndefault = "A, B"\n',
                                               contract='{ kind = "choice", choices_from = "opts" }'),
                                 "inputs.opts.default: expected a table of option texts, got a string"),
    "options default blank": (template_text(INPUTS + '[inputs.opts]\ndefault = { A = "x", B = " " }\n',
                                            contract='{ kind = "choice", choices_from = "opts" }'),
                              "inputs.opts.default: the option 'B' has no text"),
    # an empty user message loaded, and the model was asked nothing
    "user empty": (template_text(user='" \\n "'), "user: empty: the model would be asked nothing"),
    # a name that is not "mine" to the eye: trailing space, zero-width space, a right-to-left override
    "name with a zero-width space": (template_text(name='"mi\\u200bne"'), "name: 'mi\\u200bne' is no template name"),
    "name with a bidi control": (template_text(name='"\\u202emine"'), "name: '\\u202emine' is no template name"),
}
#: the fix each refusal above names, where it says more than "fix the field"
FIXES = {"input named self": "rename the input", "undeclared variable": "declare [inputs.ward]", "choice label empty": 'set label = "Answer"',
         "choices differ in case": "list each choice once", "a choice of markdown": "name each choice in words", "choices and choices_from": "keep either choices",
         "schema on a choice": "remove 'schema' from [contract]", "user empty": "write the question's layout in 'user'",
         "name with a zero-width space": "rename the template"}


def _folder(tmp_path: Path, index: str, template: str | None) -> Path:
    folder = tmp_path / "tpl"
    folder.mkdir()
    (folder / "index.toml").write_text(index)
    if template is not None:
        (folder / "mine.toml").write_text(template)
    return folder


@pytest.mark.parametrize("text, says, fix", [(text, says, FIXES.get(case, "")) for case, (text, says) in BAD_TEMPLATES.items()],
                         ids=BAD_TEMPLATES.keys())
def test_a_malformed_template_file_is_refused_naming_the_field(tmp_path, monkeypatch, text, says, fix):
    monkeypatch.setenv("EDGEMED_TEMPLATES_DIR", str(_folder(tmp_path, GOOD_INDEX, text)))
    with pytest.raises(TemplateError) as exc:
        load_templates()
    assert f"mine.toml: {says}" in exc.value.problem and "mine.toml" in exc.value.fix and fix in exc.value.fix


def test_the_load_reads_a_templates_variables_without_running_any_of_it(tmp_path, monkeypatch):
    """jinja2.meta.find_undeclared_variables compiles the text, and compiling calls a filter on constants: "x" |
    center(300000000) built 300 MB in the loading process, outside the renderer's limits."""
    import jinja2.defaults

    calls = []  # Jinja's constant folding swallows whatever a filter raises: the calls are counted instead
    monkeypatch.setitem(jinja2.defaults.DEFAULT_FILTERS, "center", lambda *args, **kwargs: calls.append(args))
    text = template_text(user='"{{ question }}{{ \'x\' | center(300000000) }}"')
    monkeypatch.setenv("EDGEMED_TEMPLATES_DIR", str(_folder(tmp_path, GOOD_INDEX, text)))
    assert "mine" in load_templates() and calls == []


def test_an_optional_input_without_a_default_renders_empty(tmp_path, monkeypatch):
    """It was left out of the values, and rendering failed "'context' is undefined ... pass the missing input"."""
    text = template_text(INPUTS + '[inputs.context]\nrequired = false\nhelp = "c"\n', user='"{{ question }}|{{ context }}|"')
    monkeypatch.setenv("EDGEMED_TEMPLATES_DIR", str(_folder(tmp_path, GOOD_INDEX, text)))
    mine = load_templates()["mine"]
    assert mine.messages({"question": "fever?"})[1]["content"] == "fever?||"
    assert mine.messages({"question": "fever?", "context": "day 2"})[1]["content"] == "fever?|day 2|"


def test_a_user_message_that_renders_empty_is_refused(tmp_path, monkeypatch):
    """An optional input was the whole question: left out, the model was sent an empty user turn."""
    text = template_text('[inputs.question]\nrequired = false\nhelp = "q"\n')
    monkeypatch.setenv("EDGEMED_TEMPLATES_DIR", str(_folder(tmp_path, GOOD_INDEX, text)))
    mine = load_templates()["mine"]
    with pytest.raises(TemplateError, match="its user message comes out empty for these inputs") as err:
        mine.messages({})
    assert "question" in err.value.fix and "mine.toml" in err.value.fix
    assert mine.messages({"question": "fever?"})[1]["content"] == "fever?"


def test_a_template_folder_saved_with_a_byte_order_mark_loads(tmp_path, monkeypatch):
    """Windows Notepad starts a UTF-8 file with EF BB BF: the index was "not valid TOML (... line 1, column 1)"."""
    folder = _folder(tmp_path, GOOD_INDEX, GOOD_TEMPLATE)
    for name in ("index.toml", "mine.toml"):
        (folder / name).write_bytes(b"\xef\xbb\xbf" + (folder / name).read_bytes())
    monkeypatch.setenv("EDGEMED_TEMPLATES_DIR", str(folder))
    assert load_templates()["mine"].messages({"question": "fever?"})[1]["content"] == "fever?"


BAD_INDEXES = {
    "unknown key": ('preambel = "x"\n' + GOOD_INDEX, "preambel: unknown key"),
    "template a table": ('[template]\nname = "mine"\nfile = "mine.toml"\n', "template: expected [[template]] entries"),
    "entry without a file": ('[[template]]\nname = "mine"\n', r"template[0].file: expected a file name"),
    "file outside the folder": ('[[template]]\nname = "mine"\nfile = "../mine.toml"\n', "is not a file inside the folder"),
    "absolute file": ('[[template]]\nname = "mine"\nfile = "/etc/passwd"\n', "is not a file inside the folder"),
    "listed twice": (GOOD_INDEX + GOOD_INDEX, "template[1].name: 'mine' is listed twice"),
    "missing file": ('[[template]]\nname = "mine"\nfile = "other.toml"\n', "other.toml: no such file"),
    "preamble a number": ('preamble = 3\n' + GOOD_INDEX, "preamble: expected a string, got int"),
    # "mcq " loaded beside "mcq" without `replaces = true`
    "name with a trailing space": (GOOD_INDEX.replace('"mine"', '"mine "'),
                                   "template[0].name: 'mine ' is no template name: a template's name is letters, digits"),
}


@pytest.mark.parametrize("index, says", BAD_INDEXES.values(), ids=BAD_INDEXES.keys())
def test_a_malformed_index_is_refused_naming_the_field(tmp_path, monkeypatch, index, says):
    monkeypatch.setenv("EDGEMED_TEMPLATES_DIR", str(_folder(tmp_path, index, GOOD_TEMPLATE)))
    with pytest.raises(TemplateError) as exc:
        load_templates()
    assert says in exc.value.problem


def test_a_fifo_large_or_binary_template_file_is_refused_without_hanging(tmp_path, monkeypatch):
    folder = _folder(tmp_path, GOOD_INDEX, None)
    monkeypatch.setenv("EDGEMED_TEMPLATES_DIR", str(folder))
    os.mkfifo(folder / "mine.toml")  # nobody writes: a blocking read would wait for ever
    with pytest.raises(TemplateError, match="not a regular file"):
        load_templates()
    (folder / "mine.toml").unlink()
    (folder / "mine.toml").write_text(GOOD_TEMPLATE + "#" * (256 * 1024))
    with pytest.raises(TemplateError, match="larger than 256 KiB"):
        load_templates()
    (folder / "mine.toml").write_bytes(GOOD_TEMPLATE.encode() + b"# \xff\n")
    with pytest.raises(TemplateError, match=r"not UTF-8 text \(byte"):
        load_templates()
    (folder / "mine.toml").write_text(GOOD_TEMPLATE)
    assert load_templates()["mine"].messages({"question": "fever?"})[1]["content"] == "fever?"


def test_a_template_folder_that_is_missing_or_has_no_index_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMED_TEMPLATES_DIR", str(tmp_path / "typo"))
    with pytest.raises(TemplateError, match="does not exist") as exc:
        load_templates()
    assert "EDGEMED_TEMPLATES_DIR" in exc.value.problem and "index.toml" in exc.value.fix
    (tmp_path / "file").write_text(GOOD_INDEX)
    monkeypatch.setenv("EDGEMED_TEMPLATES_DIR", str(tmp_path / "file"))
    with pytest.raises(TemplateError, match="is not a folder"):
        load_templates()
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("EDGEMED_TEMPLATES_DIR", str(tmp_path / "empty"))
    with pytest.raises(TemplateError, match="has no index.toml"):
        load_templates()


def test_a_user_template_takes_a_loaded_name_only_when_its_entry_says_so(tmp_path, monkeypatch):
    shipped = load_templates()["triage"]
    folder = _folder(tmp_path, GOOD_INDEX.replace('"mine"', '"triage"'), GOOD_TEMPLATE.replace('"mine"', '"triage"'))
    monkeypatch.setenv("EDGEMED_TEMPLATES_DIR", str(folder))
    with pytest.raises(TemplateError, match="'triage' is already the name of the template in edgemed/templates/data/") as exc:
        load_templates()
    assert "template[0]" in exc.value.problem and "replaces = true" in exc.value.fix
    (folder / "index.toml").write_text(GOOD_INDEX.replace('"mine"', '"triage"') + "replaces = true\n")
    mine = load_templates()["triage"]
    assert mine.source == f"{folder}/mine.toml" and mine.system != shipped.system
    # the same name in two user folders: the later one must say so too
    other = tmp_path / "other"
    other.mkdir()
    (other / "index.toml").write_text(GOOD_INDEX)
    (other / "mine.toml").write_text(GOOD_TEMPLATE)
    second = tmp_path / "second"
    second.mkdir()
    (second / "index.toml").write_text(GOOD_INDEX)
    (second / "mine.toml").write_text(GOOD_TEMPLATE.replace('"s"', '"second"'))
    monkeypatch.setenv("EDGEMED_TEMPLATES_DIR", os.pathsep.join([str(other), str(second)]))
    with pytest.raises(TemplateError, match=f"already the name of the template in {other}/mine.toml"):
        load_templates()
    (second / "index.toml").write_text(GOOD_INDEX + "replaces = true\n")
    assert load_templates()["mine"].system.endswith("second")


@pytest.mark.parametrize("entry, says", [("replaces = true", "no template named 'mine' loads before this folder"),
                                         ('replaces = "yes"', "template[0].replaces: expected true or false, got a string")])
def test_a_replaces_that_is_wrong_is_refused(tmp_path, monkeypatch, entry, says):
    monkeypatch.setenv("EDGEMED_TEMPLATES_DIR", str(_folder(tmp_path, GOOD_INDEX + entry + "\n", GOOD_TEMPLATE)))
    with pytest.raises(TemplateError) as exc:
        load_templates()
    assert says in exc.value.problem


def test_every_shipped_contract_schema_turns_into_a_grammar():
    pytest.importorskip("llama_cpp")
    from edgemed.runtime.sampling import check_template_grammar

    json_templates = [t for t in load_templates().values() if t.contract.kind == "json"]
    assert json_templates
    for template in json_templates:
        check_template_grammar(template)


def test_a_contract_schema_no_grammar_can_enforce_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """Found when the template loads (run, serve), named with its file: it used to surface at each request, as a 400
    telling the client to send a valid schema."""
    pytest.importorskip("llama_cpp")
    from click.testing import CliRunner

    from edgemed.cli import cli

    schema = '{ type = "object", properties = { a = { type = "frobnicate" } } }'
    text = template_text(contract=f'{{ kind = "json", schema = {schema} }}')
    monkeypatch.setenv("EDGEMED_TEMPLATES_DIR", str(_folder(tmp_path, GOOD_INDEX, text)))
    missing = tmp_path / "no-such-model.gguf"  # never reached: the template is refused first
    for args in (["run", str(missing), "--template", "mine", "--question", "fever?"], ["serve", str(missing), "--port", "0"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, result.output
        assert "mine.toml: contract.schema" in result.output and "frobnicate" in result.output, result.output
        assert "Fix: fix 'contract.schema'" in result.output and "no-such-model" not in result.output
