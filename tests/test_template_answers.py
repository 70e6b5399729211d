"""What a template's contract reads as the model's answer, and what the template library refuses before asking.

In a medical answer a wrong choice reported as the answer is worse than no answer: a choice is read only from a line
that gives it (``Answer: C`` at a line's start), never inferred from prose or a list of the options; answer lines that
disagree are no answer. Each case here was once read wrongly.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
from packaging.requirements import Requirement

from edgemed.errors import InputError, TemplateError
from edgemed.formats.nesting import loads_toml
from edgemed.runtime.chat_template import render as render_chat
from edgemed.templates import get_template, load_templates

ROOT = Path(__file__).resolve().parents[1]


# -- the jinja2 floor -----------------------------------------------------------------------------------------


def test_the_jinja2_floor_excludes_the_sandbox_escapes():
    """Jinja 3.1.5 fixed CVE-2024-56326 and 3.1.6 CVE-2025-27516: both let a hostile template escape the sandbox
    that chat templates and user prompt templates render in."""
    deps = loads_toml((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    jinja = Requirement(next(d for d in deps if d.lower().startswith("jinja2")))
    assert not jinja.specifier.contains("3.1.5") and not jinja.specifier.contains("3.1.4")
    assert jinja.specifier.contains("3.1.6") and jinja.specifier.contains(jinja2.__version__)


# -- a chat template's refusal ------------------------------------------------------------------------------


def test_a_chat_templates_refusal_is_cut_short():
    """raise_exception's message comes from the template (here: the user's whole message): it was printed whole."""
    huge = [{"role": "user", "content": "x" * 1_000_000}]
    with pytest.raises(InputError, match="refused the conversation") as refused:
        render_chat("{{ raise_exception(messages[0].content) }}", huge)
    assert "x" * 400 in refused.value.problem and len(refused.value.problem) < 1000


# -- a user folder's preamble -------------------------------------------------------------------------------
INDEX = '[[template]]\nname = "mine"\nfile = "mine.toml"\n'
MINE = ('name = "mine"\ntitle = "t"\nsystem = "Task: answer."\nuser = "{{ question }}"\n'
        '[inputs.question]\nhelp = "q"\n[contract]\nkind = "text"\n')


def _folder(tmp_path: Path, monkeypatch, index: str, template: str) -> Path:
    folder = tmp_path / "tpl"
    folder.mkdir(exist_ok=True)
    (folder / "index.toml").write_text(index)
    (folder / "mine.toml").write_text(template)
    monkeypatch.setenv("EDGEMED_TEMPLATES_DIR", str(folder))
    return folder


@pytest.mark.parametrize("preamble", ["", 'preamble = ""\n', 'preamble = "  \\n"\n'])
def test_a_user_folder_that_sets_no_preamble_gets_the_safety_preamble(tmp_path, monkeypatch, preamble):
    _folder(tmp_path, monkeypatch, preamble + INDEX, MINE)
    system = get_template("mine").messages({"question": "fever?"})[0]["content"]
    assert "never replace" in system and "emergency care now" in system and "\n\nTask: answer." in system


def test_a_user_folder_may_set_its_own_preamble(tmp_path, monkeypatch):
    _folder(tmp_path, monkeypatch, 'preamble = "Ward 7 rules apply."\n' + INDEX, MINE)
    system = get_template("mine").messages({"question": "fever?"})[0]["content"]
    assert system.startswith("Ward 7 rules apply.") and "never replace" not in system


# -- option labels ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, says", [
    ({"": "Vitamin A", "B": "Vitamin B12"}, "an option's label is empty ('')"),
    ({" \t": "Vitamin A", "B": "Vitamin B12"}, "an option's label is blank (' \\t')"),
    ({"a": "Vitamin A", "A": "Vitamin C"}, "the options 'a' and 'A' differ only in case"),
    ({"A": "Vitamin A", "_": "Vitamin C"}, "the option label '_' has no letter or digit"),
    ({"A": "Vitamin A", "**": "Vitamin C"}, "the option label '**' has no letter or digit"),
    ({"A": "Vitamin A", "-": "Vitamin C"}, "the option label '-' has no letter or digit"),
])
def test_option_labels_no_answer_can_tell_apart_are_refused(options, says):
    """An empty label made a reply with no answer line parse as that option; 'a' and 'A' read as one choice; a label
    of markdown ("_") made a reply of underscores that option, and a long one took seconds to read."""
    mcq = get_template("mcq")
    inputs = {"question": "Which vitamin deficiency causes scurvy?", "options": options}
    with pytest.raises(TemplateError) as exc:
        mcq.messages(inputs)
    assert "Template 'mcq'" in exc.value.problem and says in exc.value.problem and "--options" in exc.value.fix
    with pytest.raises(TemplateError):
        mcq.parse("I am not sure.", inputs)


# -- text contracts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, expected", [
    ("This may be sepsis: seek emergency care now.\nAnswer: start IV antibiotics within 1 hour.", None),
    ("Give amoxicillin 1 g TDS. In penicillin allergy the usual answer: doxycycline.", None),
    ("Answer: Amoxicillin 1 g TDS.", "Amoxicillin 1 g TDS."),
    ("**Answer:** Amoxicillin 1 g TDS.", "Amoxicillin 1 g TDS."),
])
def test_a_text_answer_drops_only_the_label_that_opens_it(reply, expected):
    """A label further on is part of the answer: everything before it (an emergency warning) used to be dropped."""
    parsed = get_template("open_question").parse(reply, {"question": "q"})
    assert parsed.ok and parsed.value == (reply if expected is None else expected)


# -- json contracts -----------------------------------------------------------------------------------------
SCHEMA = ('{ type = "object", required = ["dose_mg"], properties = { dose_mg = { type = ["number", "null"] }, '
          'note = { type = "null" }, doses = { type = "array", items = { type = ["integer", "string"] } } } }')


def _json_template(tmp_path, monkeypatch, schema: str):
    text = ('name = "mine"\ntitle = "t"\nsystem = "Task: answer."\nuser = "{{ question }}"\n'
            f'contract = {{ kind = "json", schema = {schema} }}\n[inputs.question]\nhelp = "q"\n')
    _folder(tmp_path, monkeypatch, INDEX, text)
    return load_templates()["mine"]


@pytest.mark.parametrize("reply, error", [
    ({"dose_mg": 500}, ""),
    ({"dose_mg": None, "note": None}, ""),
    ({"dose_mg": 2.5, "doses": [1, "2"]}, ""),
    ({"dose_mg": "500"}, "$.dose_mg: expected number or null"),
    ({"dose_mg": True}, "$.dose_mg: expected number or null"),  # JSON's true is no number
    ({"dose_mg": 1, "note": "x"}, "$.note: expected null"),
    ({"dose_mg": 1, "doses": [1.5]}, "$.doses[0]: expected integer or string"),
])
def test_a_schema_type_may_be_a_list_or_null(tmp_path, monkeypatch, reply, error):
    """type = ["number", "null"] passed the grammar check, then every answer was a TypeError (null: a KeyError)."""
    mine = _json_template(tmp_path, monkeypatch, SCHEMA)
    parsed = mine.parse(json.dumps(reply), {"question": "q"})
    assert parsed.ok == (not error) and parsed.error == error
    pytest.importorskip("llama_cpp.llama_grammar",
                        reason="the grammar half needs llama-cpp-python (edgemed[gguf]); the answer half ran")
    from edgemed.runtime.sampling import check_template_grammar

    check_template_grammar(mine)  # and the grammar that enforces it builds


@pytest.mark.parametrize("schema, says", [
    ('{ type = "object", properties = { dose = { type = ["number", "nul"] } } }',
     "type ['number', 'nul'] at properties.dose is not a JSON type"),
    ('{ type = "object", properties = { doses = { type = "array", items = { type = "float" } } } }',
     "type 'float' at properties.doses.items is not a JSON type"),
    ('{ type = 3 }', "type 3 is not a JSON type"),
])
def test_a_schema_type_that_is_no_json_type_is_refused_at_load(tmp_path, monkeypatch, schema, says):
    with pytest.raises(TemplateError) as exc:
        _json_template(tmp_path, monkeypatch, schema)
    assert f"mine.toml: contract.schema: {says}" in exc.value.problem and "fix 'contract.schema'" in exc.value.fix


WARNINGS = '{{ type = "object", required = ["route"], properties = {{ {} }} }}'


@pytest.mark.parametrize("properties, field, says", [
    ('warnings = { type = "array", minItems = "1" }', "properties.warnings.minItems",
     "expected a whole number of at least 0, got a string '1'"),
    ('warnings = { type = "array", minItems = -1 }', "properties.warnings.minItems", "got int -1"),
    ('warnings = { type = "array", minItems = true }', "properties.warnings.minItems", "got true or false True"),
    ('note = { type = "string", minLength = 1.5 }', "properties.note.minLength", "got float 1.5"),
    ('route = { type = "string", enum = "intravenous" }', "properties.route.enum",
     "expected an array of the values allowed, got a string 'intravenous'"),
    ('route = { type = "object", required = "dose_mg" }', "properties.route.required",
     "expected an array of property names, got a string 'dose_mg'"),
    ('route = { type = "object", required = ["dose_mg", 1] }', "properties.route.required",
     "expected an array of property names"),
    ('route = { type = "string", pattern = 7 }', "properties.route.pattern", "expected a regular expression"),
    ('route = { type = "string", pattern = "(" }', "properties.route.pattern", "'(' is no regular expression"),
    ('route = { type = "object", properties = ["dose_mg"] }', "properties.route.properties", "expected a table"),
    ('route = "string"', "properties", "the property 'route' is a string, not a table"),
    ('doses = { type = "array", items = "integer" }', "properties.doses.items", "expected a table"),
])
def test_a_schema_keyword_of_the_wrong_shape_is_refused_at_load(tmp_path, monkeypatch, properties, field, says):
    """Only ``type`` was checked: minItems = "1" made every answer a TypeError (a 500 in serve), enum = "intravenous"
    took "ven" (a substring), required = "dose_mg" asked for the keys d, o, s, e ..."""
    with pytest.raises(TemplateError) as exc:
        _json_template(tmp_path, monkeypatch, WARNINGS.format(properties))
    assert f"mine.toml: contract.schema.{field}: " in exc.value.problem and says in exc.value.problem, exc.value.problem
    assert f"fix 'contract.schema.{field}'" in exc.value.fix


PATTERNS = ('{ type = "object", required = ["code"], properties = { '
            'code = { type = "string", pattern = "^[A-Z][0-9]+$" }, note = { type = "string", pattern = "\\\\S" } } }')


@pytest.mark.parametrize("reply, error", [
    ({"code": "A12", "note": " ok "}, ""),
    ({"code": "a12"}, "$.code: does not match the pattern '^[A-Z][0-9]+$'"),
    ({"code": "A1", "note": " \t"}, "$.note: does not match the pattern '\\\\S'"),
])
def test_a_schema_pattern_is_searched_for_and_only_an_anchored_one_reaches_the_grammar(tmp_path, monkeypatch, reply,
                                                                                         error):
    """A pattern was not checked at all; llama-cpp-python's converter asserts on one that is not ^...$."""
    mine = _json_template(tmp_path, monkeypatch, PATTERNS)
    parsed = mine.parse(json.dumps(reply), {"question": "q"})
    assert parsed.ok == (not error) and parsed.error == error
    sent = json.loads(mine.contract.json_schema())["properties"]
    assert sent["code"]["pattern"] == "^[A-Z][0-9]+$" and "pattern" not in sent["note"]
    pytest.importorskip("llama_cpp.llama_grammar",
                        reason="the grammar half needs llama-cpp-python (edgemed[gguf]); the answer half ran")
    from edgemed.runtime.sampling import check_template_grammar

    check_template_grammar(mine)


def test_a_json_answer_that_gives_a_key_twice_is_no_answer():
    """json keeps the last: an answer that said emergency, then routine, read as routine."""
    reply = '{"urgency": "emergency", "red_flags": ["slurred speech"], "action": "stroke team", "urgency": "routine"}'
    parsed = get_template("triage").parse(reply, {"case": "x"})
    assert not parsed.ok and "'urgency' more than once" in parsed.error


@pytest.mark.parametrize("number", ["1e999", "-1e999", "NaN", "Infinity", "-Infinity"])
def test_a_json_answer_with_a_number_that_is_not_finite_is_no_answer(tmp_path, monkeypatch, number):
    """Python's json read NaN, Infinity and 1e999 (inf) as numbers: the answer passed the schema, then the server's
    JSON response raised (a 500, the answer lost) and the stream and `run --json` wrote NaN, which is no JSON."""
    reply = ('{"severity": "major", "mechanism": "additive", "recommendation": "avoid", '
             f'"check_with_pharmacist": true, "dose_mg": {number}}}')
    parsed = get_template("drug").parse(reply, {"drugs": "x, y", "question": "q"})
    assert not parsed.ok and parsed.error == f"invalid JSON: {number} is not a finite number"
    mine = _json_template(tmp_path, monkeypatch, SCHEMA)
    parsed = mine.parse(f'{{"dose_mg": {number}}}', {"question": "q"})
    assert not parsed.ok and "is not a finite number" in parsed.error
    assert mine.parse('{"dose_mg": 1e300}', {"question": "q"}).ok


# -- choice contracts ---------------------------------------------------------------------------------------
SCURVY = {"question": "Which vitamin deficiency causes scurvy?",
          "options": {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"}}
LIST = "A. Vitamin A - no.\nB. Vitamin B12 - no.\nC. Vitamin C - yes, this is the deficiency.\nD. Vitamin D - no."


@pytest.mark.parametrize("reply, expected", [
    # the answer line is one that starts with the label; other lines that name an answer are not it
    ("Answer: C\n\nWrong answer: A (a distractor).", "C"),
    ("Answer: C\n\nA common wrong answer: B (students confuse it).", "C"),
    ("Final answer: C. (The most common wrong answer: B.)", "C"),
    ("Correct answer: C. Incorrect answer: A (a distractor).", "C"),
    ("Answer: C\nNote: Answer: A would be right in infants.", "C"),
    ("**Final Answer**\n\n**C**", "C"),
    ("### Answer\nC", "C"),
    ("> **Answer:** (C)", "C"),
    ("So, the correct answer is C.", "C"),
    ("Answer: C. Vitamin C deficiency causes scurvy; vitamin A deficiency causes night blindness.", "C"),
    ("</think>\n\nAnswer: B", "B"),  # a closing tag with no opening: what came before it was thinking
    # a choice inferred from a list of the options or from prose is no answer
    ("Answer:\n" + LIST, None),
    (LIST, None),
    ("A. Vitamin A is wrong... Answer: C", None),
    ("A. Hypertension is unlikely here.", None),
    ("Many would say the answer is B, but I am not sure.", None),
    ("Answer: B</think> wait", None),
    # answer lines that disagree, or one that hedges or is struck through, give no answer
    ("Answer: A\n\nAnswer: C", None),
    ("Answer: not B\nAnswer: C", None),
    ("Answer: B (or C)", None),
    ("Answer: C\u0338", None),
    ("Answer: B\u0336", None),
])
def test_a_choice_is_read_only_from_the_answer_line(reply, expected):
    parsed = get_template("mcq").parse(reply, SCURVY)
    assert (parsed.value if parsed.ok else None) == expected, parsed
    assert parsed.labelled == parsed.ok and (parsed.ok or parsed.error)


def test_a_reply_that_restates_one_option_is_that_option():
    mcq = get_template("mcq")
    assert mcq.parse("C. Vitamin C", SCURVY).value == "C" and mcq.parse("**(C) vitamin c.**", SCURVY).value == "C"
    assert not mcq.parse("C. Vitamin C deficiency, or A", SCURVY).ok  # not the option's text: prose


def test_disagreeing_answer_lines_are_named_in_the_error():
    parsed = get_template("mcq").parse("Answer: A\n\nFinal answer: C", SCURVY)
    assert not parsed.ok and "disagree (A, C)" in parsed.error


def test_numbered_reasoning_is_not_a_numbered_option():
    inputs = {"question": "q", "options": {"1": "MMR", "2": "Varicella", "3": "Hepatitis B"}}
    mcq = get_template("mcq")
    steps = "Let me reason:\n1. The rash suggests measles.\n2. Koplik spots confirm.\n3. So vaccine history matters."
    assert not mcq.parse(steps + "\nThe best option is the first.", inputs).ok
    assert mcq.parse(steps + "\nAnswer: 1", inputs).value == "1"


@pytest.mark.parametrize("reply, expected", [
    ("No. Let me think again. The trial shows benefit so yes would be plausible but evidence is mixed.", None),
    ("Answer: no longer recommended? Maybe.", None),
    ("Answer: No, wait - yes", None),
    ("Answer: Yes\u0338", None),
    ("Answer: yes\nAnswer: maybe", None),
    ("Final answer: maybe", "maybe"),
    ("**Answer:** no", "no"),
])
def test_yes_no_maybe_is_read_only_from_the_answer_line(reply, expected):
    parsed = get_template("pubmedqa").parse(reply, {"question": "q", "context": "c"})
    assert (parsed.value if parsed.ok else None) == expected, parsed


# -- answers the stricter reading refused, and hedges it still took -----------------------------------------
ELIMINATION = ("Let's go through the options.\nThe answer is not A: vitamin A deficiency causes night blindness.\n"
               "The answer is not B: B12 causes anaemia.\nAnswer: C")


def _mcq(reply):
    parsed = get_template("mcq").parse(reply, SCURVY)
    return parsed.value if parsed.ok else None


def _pubmedqa(reply):
    parsed = get_template("pubmedqa").parse(reply, {"question": "q", "context": "c"})
    return parsed.value if parsed.ok else None


@pytest.mark.parametrize("reply, expected", [
    (ELIMINATION, "C"),
    ("The correct answer is not D.\n**Answer: C**", "C"),
    ("The correct answer is not D (rickets).\n\n**Answer: C**", "C"),
    ("Answer: C\n\nThe answer is not B, since B12 deficiency causes anaemia.", "C"),
    ("The answer is definitely not A.\nAnswer: C", "C"),
    ("The answer cannot be D.\nAnswer: C", "C"),
    ("Answer: C, not B (B12 deficiency causes anaemia).", "C"),
    ("Answer: C\nThis rules out B.", "C"),
    ("The answer is not B.", None),  # an option ruled out is no answer
])
def test_an_option_ruled_out_is_no_competing_answer(reply, expected):
    """'The answer is not A: ...' going through the options made the reply's answer lines 'disagree'."""
    assert _mcq(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    ("I think the answer is C.", "C"),
    ("Based on the above, the answer is C.", "C"),
    ("Given the findings, the most likely answer is C.", "C"),
    ("Based on the above, I believe the correct answer is C.", "C"),
    ("So I think the answer is C.", "C"),
    ("Scurvy is vitamin C deficiency.\n\nGiven the findings, the most likely answer is C.", "C"),
    # still prose: reported speech, a condition, a letter mid-sentence
    ("Option B looks tempting, and many say the answer is B.", None),
    ("If the patient were a child, the answer is D.", None),
    ("Students often say that in this case the answer is B.", None),
    ("I think the answer is C, but it could be D.", None),
    ("Given the findings, I think the answer is C.\nIn children, the answer is D.", None),
])
def test_a_short_lead_in_before_the_answer_is_still_the_answer_line(reply, expected):
    assert _mcq(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    ("Answer: Yes, although no RCT has tested it.", "yes"),
    ("Answer: maybe. The evidence is mixed; some studies say yes, others no.", "maybe"),
    ("Answer: yes, but maybe not in children", "yes"),
    ("Answer: yes because no harm was seen in either arm.", "yes"),
    ("Answer: no \u2014 the trial found no benefit.", "no"),
    # another choice right after the answer is a hedge
    ("Answer: yes or no", None),
    ("Answer: yes/no", None),
    ("Answer: maybe yes", None),
    ("Answer: yes (possibly no)", None),
    ("Answer: no. Yes is also possible in children.", None),
    # after a comma, a choice word that runs on into prose is prose; a listed choice is a hedge
    ("Answer: Yes, no adverse events were seen in either arm.", "yes"),
    ("Answer: Yes, no doubt.", "yes"),
    ("Answer: yes, no", None),
    ("Answer: Yes, no.", None),
    ("Answer: yes, maybe", None),
    ("Answer: yes, or no", None),
    ("Answer: Yes, no in children.", None),
    ("Answer: Yes/no depending on the dose.", None),
    ("Answer: Yes, or no in older patients.", None),
    ("Answer: No, maybe yes in children.", None),
    ("Answer: Yes, possibly no in the elderly.", None),
    ("Answer: No, maybe in selected patients.", None),
    ("Answer: yes & no depending on the dose", None),
    ("Answer: No, yes only in subgroups.", None),
])
def test_a_yes_no_maybe_answer_may_explain_itself(reply, expected):
    """'Answer: Yes, although no RCT ...' was no answer: any choice word later on the line voided it."""
    assert _pubmedqa(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    ("**C. Vitamin C**\n\nExplanation: scurvy is a deficiency of ascorbic acid.", "C"),
    ("C. Vitamin C is the answer.", "C"),
    ("C. Vitamin C\n\nScurvy is caused by lack of vitamin C.", "C"),
    ("C is the answer.\n\nScurvy is caused by lack of vitamin C.", "C"),
    ("**C. Vitamin C**\n\nAnswer: C", "C"),
    # unless another line gives a different answer, or the reply goes through the options
    ("**C. Vitamin C**\n\nAnswer: D", None),
    ("A. Vitamin A\nB. Vitamin B12\nC. Vitamin C\nD. Vitamin D\n\nScurvy is vitamin C deficiency.", None),
    ("C. Vitamin C\n\nB. Vitamin B12 causes anaemia.", None),
    ("**A. Vitamin A**\n\nIncorrect: vitamin A deficiency causes night blindness.", None),
    ("**C**\n\nScurvy results from a lack of vitamin C.", None),  # a bare letter first is no stated option
])
def test_a_first_line_that_states_one_option_is_that_option(reply, expected):
    assert _mcq(reply) == expected


@pytest.mark.parametrize("reply", [
    "Answer: C (or possibly D)",
    "Answer: C (possibly D)",
    "Answer: C, or maybe D",
    "Answer: C; D is also possible",
    "Answer: C. Perhaps D.",
    "Answer: (B) or (C)",
    "Answer: C (D)",
    "Answer: C, though it might also be D.",
    "Answer: C; also consider D.",
    "Answer: C because the answer is D in infants.",
    # a second option a few words on, after a word that offers it as an alternative
    "Answer: C (or option D)",
    "Answer: C, or possibly option D",
    "Answer: C, but possibly D",
    "Answer: C (though maybe D)",
    "Answer: C; less likely D",
    "Answer: C (second choice: D)",
    "Answer: C|D",
    "Answer: C vs. D",
    "Answer: C (70%) or D (30%)",
    "Answer: C (D possibly)",
    "Answer: C (D?)",
    # a lower-case letter no word follows is still an option, whichever case the answer is in
    "Answer: C, or d",
    "Answer: C/d",
    "answer: c, or d",
    "Answer: C, or A mild variant",
    # after an aside on the answer, another option alone after "/", "|" or "either", or the answer among the words
    "Answer: C (Vitamin C) / D",
    "Answer: C (Vitamin C) | D possibly",
    "Answer: C (Vitamin C); either D",
    "Answer: C (Vitamin C) / d",
    "Answer: C (70%) or d",
    "Answer: C (either C or D)",
])
def test_another_choice_offered_after_the_answer_is_a_hedge(reply):
    parsed = get_template("mcq").parse(reply, SCURVY)
    assert not parsed.ok and parsed.value is None and "no single" in parsed.error


@pytest.mark.parametrize("reply, expected", [
    # words a hedge uses, offering no second option
    ("Answer: C, but possibly a mild case", "C"),
    ("Answer: C (probably)", "C"),
    ("Answer: C (Vitamin C), not D", "C"),
    ("Answer: C, either way", "C"),
    ("Answer: C (B also causes bleeding, but not scurvy)", "C"),
    ("Answer: C, though possibly B12-related", "C"),
    # the article 'a' after 'or' or a comma, not option A
    ("Answer: C, or a mild variant", "C"),
    ("Answer: C, or a mild variant of it", "C"),
    ("Answer: C, a mild variant of it", "C"),
    ("So the answer is C, or a mild variant of it.", "C"),
])
def test_hedge_words_without_a_second_option_keep_the_answer(reply, expected):
    assert _mcq(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    # after "/", "|" or "either", an option that labels a list or opens prose is no second choice
    ("Answer: C (Vitamin C) | A: night blindness, B: anemia, D: rickets", "C"),
    ("Answer: C (Vitamin C) / A and B are wrong", "C"),
    ("Answer: C (Vitamin C). Either A or B would be incorrect.", "C"),
    # the answer named again is no second choice
    ("Answer: C (Vitamin C), or option C", "C"),
    ("Answer: C (C)", "C"),
])
def test_a_clear_answer_with_an_aside_is_no_hedge(reply, expected):
    """The hedge rule took any choice after an aside and an offer word: these clear answers were no answer."""
    assert _mcq(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    # with a blank beside "/" or "|", an option that opens prose or labels a list is no second choice, aside or not
    ("Answer: C / A and B are wrong", "C"),
    ("Answer: C | A and B are wrong", "C"),
    ("Answer: C / A: night blindness, B: anemia", "C"),
    # ... but one alone, one a hedge word follows, or one under a condition is
    ("Answer: C / D", None),
    ("Answer: C / d", None),
    ("Answer: C / D possibly", None),
    ("Answer: C / D in pregnancy", None),
    ("Answer: C (Vitamin C) / D in pregnancy", None),
    ("Answer: C (Vitamin C) | D if pregnant", None),
    # written tight, "/" and "|" join two choices whatever follows
    ("Answer: C/D: both fit", None),
    ("Answer: C|D: both fit", None),
    ("Answer: C/D and more", None),
])
def test_an_option_after_a_spaced_slash_must_stand_alone(reply, expected):
    """'Answer: C / A and B are wrong' was no answer (the hedge rule took any option after "/"), though with an aside
    before the "/" it was C; "C|D: both fit" and "C (Vitamin C) / D in pregnancy" were C."""
    assert _mcq(reply) == expected


@pytest.mark.parametrize("reply", [
    # the answer named again, then another option offered: a hedge as it is without the answer named again
    "Answer: C (C or D)",
    "Answer: C (C/D)",
    "Answer: C (C / D)",
    "Answer: C (C, D)",
    "Answer: C (C and D)",
    "Answer: C (C, but possibly D)",
    "Answer: C (C or possibly D)",
    # the answer line says its own answer is wrong
    "Answer: C (C and D are both wrong)",
    "Answer: C (both C and D are wrong)",
    "Answer: C (A and C are incorrect)",
    "Answer: C (C is wrong)",
    "Answer: C; option C is incorrect",
    "Answer: C (not C)",
])
def test_the_answer_named_again_with_another_or_said_to_be_wrong_is_no_answer(reply):
    """'Answer: C (C or D)' and 'Answer: C (C and D are both wrong)' were C: the answer named again hid the hedge,
    and nothing read a line that contradicts its own answer."""
    parsed = get_template("mcq").parse(reply, SCURVY)
    assert not parsed.ok and parsed.value is None and "no single" in parsed.error


@pytest.mark.parametrize("reply, expected", [
    # another option ruled out explains the answer: no hedge
    ("Answer: C (not D)", "C"),
    ("Answer: C (C, not D)", "C"),
    ("Answer: C (C and not D)", "C"),
    ("Answer: C (C, since D is wrong)", "C"),
    ("Answer: C (A, B and D are wrong)", "C"),
    ("Answer: C (D is wrong, C is right)", "C"),
    ("Answer: C (Vitamin C is wrong for rickets)", "C"),  # an option's text, not the letter, said to be wrong
    ("Answer: C (C)", "C"),
    ("Answer: C (C, or a mild variant)", "C"),
])
def test_another_option_ruled_out_beside_the_answer_named_again_keeps_it(reply, expected):
    assert _mcq(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    ("Answer: yes (yes or no)", None),
    ("Answer: yes (yes/no)", None),
    ("Answer: yes (yes and no are both wrong)", None),
    ("Answer: yes (yes is wrong)", None),
    ("Answer: no (yes is wrong)", "no"),
    ("Answer: yes (not no)", "yes"),
    ("Answer: yes (yes, no adverse events were seen)", "yes"),
])
def test_a_yes_named_again_with_another_or_said_to_be_wrong(reply, expected):
    assert _pubmedqa(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    ("Answer: yes / no harm was seen", "yes"),
    ("Answer: yes / no", None),
    ("Answer: yes / no in children", None),
    ("Answer: yes (x) / no depending on the dose", None),
    ("Answer: yes/no harm seen", None),
])
def test_a_yes_after_a_spaced_slash_reads_the_word_after_it(reply, expected):
    assert _pubmedqa(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    ("Answer: yes (hazard ratio 0.7, 95% CI 0.6-0.9), probably yes", "yes"),
    ("Answer: yes (the data suggest so) / no harm seen", "yes"),
    ("Answer: yes (yes)", "yes"),
    ("Answer: yes (x) / no", None),
    ("Answer: yes (x), probably no", None),
])
def test_a_clear_yes_with_an_aside_is_no_hedge(reply, expected):
    assert _pubmedqa(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    ("<think>Bleeding gums, poor healing: scurvy.</think>\n\n**Answer:** C", "C"),
    ("The answer is C.", "C"),
    ("Answer: (C)", "C"),
    ("C) Vitamin C", "C"),
    ("answer: c", "C"),
    ("Answer: C because the deficiency impairs collagen synthesis.", "C"),
    ("Answer: A because night blindness is the clue.", "A"),
])
def test_r1_style_replies_are_read(reply, expected):
    assert _mcq(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    ("\\boxed{C}", "C"),
    ("Scurvy follows a lack of ascorbic acid.\n\n\\boxed{C}", "C"),      # R1-Distill's closing line
    ("Answer: \\boxed{C}", "C"),
    ("So the answer is $\\boxed{C}$.", "C"),
    ("**Final Answer**\n\\[\n\\boxed{C}\n\\]", "C"),
    ("Final answer: $\\boxed{\\text{C}}$", "C"),
    ("$$\n\\boxed{B}\n$$", "B"),
    ("Reasoning.\n\n\\boxed{A}\n\nAnswer: C", None),              # a box and an answer line that disagree
    ("\\boxed{C, D}", None),
    ("The answer is \\boxed{C or D}.", None),
    ("\\boxed{}", None),
])
def test_a_latex_box_is_an_answer_line(reply, expected):
    """R1-Distill models close with \\boxed{X}: it was no answer (and ``run`` asked again)."""
    assert _mcq(reply) == expected


def test_a_boxed_yes_no_maybe():
    assert _pubmedqa("The trial found a benefit.\n\n$\\boxed{\\text{yes}}$") == "yes"


@pytest.mark.parametrize("reply", ["Reasoning.\n\n\\boxed{" + "\t" * 20_000 + "C",
                                   "boxed\nx" + " " * 20_000 + "y",
                                   "\\boxed{" + "{}" * 20_000,
                                   "\\boxed{} " * 2_000 + "x"],
                         ids=["spaces-in-a-box", "spaces-after-boxed", "brace-pairs", "many-boxes"])
def test_a_long_hostile_reply_is_read_in_linear_time(reply):
    """A model looping on whitespace, or a client's grammar, can send such a reply; serve parses it in its event loop.
    An earlier box pattern took seconds at 2,000 characters and grew eightfold per doubling."""
    import time

    started = time.perf_counter()
    assert _mcq(reply) is None
    assert time.perf_counter() - started < 5
