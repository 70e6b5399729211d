"""A parse that is not ok makes ``run`` ask again, constrained; one that is ok is reported as the answer. So a reply
that says two things (a letter and another option's text, an answer and its correction, a JSON object and prose that
contradicts it) or was cut short must not parse ok: each such case here once did. And a reply that says one thing
must: each such case here was once refused by the checks for the others."""

from __future__ import annotations

import json

import pytest

from edgemed.templates import get_template

TRIAGE = {"case": "slurred speech for 40 minutes"}
ROUTINE = json.dumps({"urgency": "routine", "red_flags": [], "action": "home"})


# -- json contracts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply", [
    f"```json\n{ROUTINE}\n```\nOn second thought this is an emergency: call 911.",
    f"This is an emergency, whatever the JSON says.\n{ROUTINE}",
    f"{ROUTINE}\nActually: emergency.",
    f"```json\n{ROUTINE}\n```\n```json\n{{\"urgency\": \"emergency\"}}\n```",
])
def test_prose_outside_the_json_object_is_no_answer(reply):
    """The object was taken from the first '{' to the last '}' and the prose around it ignored."""
    parsed = get_template("triage").parse(reply, TRIAGE)
    assert not parsed.ok and "prose outside the JSON object" in parsed.error


@pytest.mark.parametrize("reply", [ROUTINE, f"  {ROUTINE}\n", f"```json\n{ROUTINE}\n```", f"```\n{ROUTINE}```\n",
                                   f"<think>Is it {{urgent}}?</think>\n{ROUTINE}"])
def test_the_object_alone_or_in_one_code_fence_is_the_answer(reply):
    parsed = get_template("triage").parse(reply, TRIAGE)
    assert parsed.ok and parsed.value["urgency"] == "routine", parsed


@pytest.mark.parametrize("reply", [f"\ufeff{ROUTINE}", f"\ufeff```json\n{ROUTINE}\n```",
                                   f"```json\n\ufeff{ROUTINE}\n```", f"```json\r\n{ROUTINE}\r\n```",
                                   f"```json\r\n{ROUTINE}```\r\n", f"```json {ROUTINE} ```", f"```{ROUTINE}```"])
def test_a_byte_order_mark_windows_line_ends_or_a_one_line_fence_keep_the_answer(reply):
    """Each was refused as prose outside the object."""
    parsed = get_template("triage").parse(reply, TRIAGE)
    assert parsed.ok and parsed.value["urgency"] == "routine", parsed


@pytest.mark.parametrize("reply", [f"```json\n{ROUTINE}", f"```json {ROUTINE}", f"Here it is: ```json {ROUTINE} ```",
                                   f"```json {ROUTINE} ``` Call 911.", f"\ufeffNote: {ROUTINE}"])
def test_an_unterminated_fence_or_prose_beside_a_fence_stays_no_answer(reply):
    parsed = get_template("triage").parse(reply, TRIAGE)
    assert not parsed.ok and "prose outside the JSON object" in parsed.error, parsed


@pytest.mark.parametrize("answer, error", [
    ({"urgency": "routine", "red_flags": [], "action": ""}, "$.action: empty"),
    ({"urgency": "routine", "red_flags": [], "action": "home", "urgency ": "emergency"}, "$: unexpected key 'urgency '"),
    ({"urgency": "routine", "red_flags": [], "action": " "}, "$.action: does not match the pattern '\\\\S'"),
    ({"urgency": "routine", "red_flags": [], "action": "\t\n"}, "$.action: does not match the pattern '\\\\S'"),
])
def test_the_triage_schema_refuses_an_empty_action_and_keys_it_does_not_name(answer, error):
    triage = get_template("triage")
    parsed = triage.parse(json.dumps(answer), TRIAGE)
    assert not parsed.ok and parsed.error == error
    schema = json.loads(triage.contract.json_schema())  # and the grammar that constrains sampling says so too
    assert schema["additionalProperties"] is False and schema["properties"]["action"]["minLength"] == 1


def test_a_blank_action_is_refused_by_the_parse_and_the_pattern_kept_from_the_grammar():
    """'"action": " "' passed minLength 1. llama-cpp-python turns only an anchored pattern (^...$) into a grammar and
    asserts on "\\S": the schema the model reads names it, the one its sampling is constrained by leaves it out."""
    triage = get_template("triage")
    assert triage.contract.schema["properties"]["action"]["pattern"] == "\\S"
    assert '"pattern":"\\\\S"' in triage.messages(TRIAGE)[0]["content"]
    assert "pattern" not in json.loads(triage.contract.json_schema())["properties"]["action"]
    assert triage.parse(json.dumps({"urgency": "routine", "red_flags": [], "action": " go home "}), TRIAGE).ok


# -- choice contracts: the letter and the option's text ---------------------------------------------------------
SCURVY = {"question": "Which vitamin deficiency causes scurvy?",
          "options": {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"}}
YES_NO = {"question": "Does daily aspirin prevent a first myocardial infarction after 70?", "context": "c"}


def _mcq(reply: str):
    return get_template("mcq").parse(reply, SCURVY)


def _pubmedqa(reply: str):
    return get_template("pubmedqa").parse(reply, YES_NO)


@pytest.mark.parametrize("reply", [
    "Answer: B. Vitamin C",
    "Answer: B (Vitamin C)",
    "Answer: **B** \u2013 Vitamin C deficiency causes scurvy.",
    "The answer is B, vitamin C.",
    "Answer: A. Vitamin B12",
])
def test_a_letter_with_another_options_text_is_no_answer(reply):
    """Read as the letter: 'Answer: B. Vitamin C' was option B (vitamin B12), the text it names being C's."""
    parsed = _mcq(reply)
    assert not parsed.ok and parsed.value is None and "another option's text" in parsed.error, parsed


@pytest.mark.parametrize("reply, expected", [
    ("Answer: C. Vitamin C", "C"),
    ("Answer: C (Vitamin C)", "C"),
    ("Answer: **C** \u2013 Vitamin C deficiency causes scurvy.", "C"),
    ("Answer: B. Vitamin B12 deficiency causes anaemia, not scurvy.", "B"),  # wrong, but one answer
    ("Answer: C - ascorbic acid", "C"),
    ("Answer: C. Vitamin C deficiency causes scurvy; vitamin A deficiency causes night blindness.", "C"),
    # another option's text ruled out in its clause, or set against this option's own text
    ("Answer: C. Vitamin D is not involved.", "C"),
    ("Answer: C \u2014 Vitamin D deficiency would cause rickets instead.", "C"),
    ("Answer: C. Vitamin A deficiency causes night blindness, whereas vitamin C deficiency causes scurvy.", "C"),
])
def test_a_letter_with_its_own_text_or_other_words_is_that_letter(reply, expected):
    parsed = _mcq(reply)
    assert parsed.ok and parsed.value == expected, parsed


ASPIRIN = {"A": "Aspirin", "B": "Aspirin plus clopidogrel", "C": "Warfarin", "D": "Heparin"}
IRON = {"A": "Iron", "B": "Iron and folate", "C": "Folate", "D": "Vitamin B12"}
HYPERTENSION = {"A": "Hypertension", "B": "Hypertension and diabetes", "C": "Diabetes", "D": "Smoking"}
DOSE = {"A": "2 mg", "B": "4 mg", "C": "6 mg", "D": "8 mg"}
TABLETS = {"A": "2", "B": "4", "C": "6", "D": "8"}
COMBINED = [
    ("Answer: B. Aspirin + clopidogrel", ASPIRIN),
    ("Answer: B. Aspirin and clopidogrel (dual antiplatelet therapy)", ASPIRIN),
    ("Answer: B. Iron + folic acid", IRON),
    ("Answer: B. Hypertension, diabetes", HYPERTENSION),
    ("Answer: B. 2 tablets of 2 mg = 4 mg", DOSE),
    ("Answer: B. 2 tablets of 2 mg = 4 mg", TABLETS),
    ("Answer: B. 2.5 mg, rounded up to 4 mg", TABLETS),
]


SURGERY = {"A": "Surgery", "B": "Radiotherapy", "C": "Chemotherapy", "D": "Observation"}
METFORMIN = {"A": "Metformin", "B": "Insulin", "C": "Glipizide", "D": "Sitagliptin"}


@pytest.mark.parametrize("reply, options, expected", [
    ("Answer: D. Surgery is not indicated for a small non-functioning adenoma.", SURGERY, "D"),
    ("Answer: D (surgery is reserved for tumours > 4 cm)", SURGERY, "D"),
    ("Answer: A. Insulin is not first-line.", METFORMIN, "A"),
])
def test_another_options_text_ruled_out_after_the_letter_keeps_the_letter(reply, options, expected):
    """Each was refused as the letter and another option's text: the explanation names that option to rule it out."""
    parsed = get_template("mcq").parse(reply, {"question": "q", "options": options})
    assert parsed.ok and parsed.value == expected, parsed


@pytest.mark.parametrize("reply", [
    "Answer: A. Metformin or Insulin",
    "Answer: A. Metformin; if eGFR < 30, then B.",
    "Answer: A\n\nHowever, if the eGFR is below 30, the answer would be B.",
])
def test_two_options_joined_or_one_under_a_condition_is_no_answer(reply):
    """Each was read as A: the answer line joins B's text to A's, or gives B under a condition."""
    parsed = get_template("mcq").parse(reply, {"question": "q", "options": METFORMIN})
    assert not parsed.ok and parsed.value is None, parsed


@pytest.mark.parametrize("reply, options", COMBINED)
def test_a_letter_whose_own_text_opens_with_another_options_is_that_letter(reply, options):
    """Each was refused as the letter and another option's text: A's 'Aspirin' opens B's 'Aspirin plus clopidogrel',
    and '2' opens the working '2 tablets of 2 mg = 4 mg'."""
    parsed = get_template("mcq").parse(reply, {"question": "q", "options": options})
    assert parsed.ok and parsed.value == "B", parsed


@pytest.mark.parametrize("reply, options", [
    ("Answer: A. Aspirin plus clopidogrel", ASPIRIN),
    ("Answer: B. Aspirin", ASPIRIN),
    ("Answer: B (Aspirin)", ASPIRIN),
    ("Answer: **B** \u2013 *Aspirin*.", ASPIRIN),
    ("Answer: B. Warfarin", ASPIRIN),
    ("Answer: A. Iron and folate", IRON),
    ("Answer: B. 2", TABLETS),
    ("Answer: B (2)", TABLETS),
    ("Answer: B. 2, twice daily", TABLETS),
    ("Answer: B. 2 mg", DOSE),
])
def test_a_combination_or_a_number_that_is_another_options_text_is_still_a_clash(reply, options):
    parsed = get_template("mcq").parse(reply, {"question": "q", "options": options})
    assert not parsed.ok and "another option's text" in parsed.error, parsed


# -- choice contracts: a correction, a second answer, an alternative under a condition ---------------------------
CORRECTED_MCQ = [
    "Answer: C. No, D.",
    "Answer: C \u2014 no, D",
    "Answer: C\nActually, D.",
    "Answer: C\n\nCorrection: the answer is D.",
    "Answer: C\n\nRevised answer: D",
    "Answer: C\n\nUpdated answer: D",
    "Answer: C\nThe answer should be D.",
    "Answer: C\n\nWait, the answer is not C; it is D.",
    "Answer: C (D in pregnancy)",
    "Answer: C; but D if pregnant",
    "C; but D if pregnant",
    "**C. Vitamin C**\nThat's a common distractor; the real answer is D.",
    "Answer: C\n\nOn second thought, D.",
    "Answer: C\nSorry, I meant D.",
    "Answer: C\n\nHmm, D actually.",
    "Answer: C\n\nI change my answer to D.",
    "Answer: C\n\nD is the correct answer.",
    "Answer: C\nThe correct answer is actually D.",
    "Answer: C\nScratch that: D",
    "Answer: C\n\nIn pregnancy, D.",
    "Answer: C. D.",
    "Answer: C\n\nD",
    # an alternative under a condition on the answer's line or in the sentence after it, however the answer is given
    "Answer:\nC\n\nIn pregnancy, D.",
    "**C. Vitamin C**\nIn pregnancy, D.",
    "Answer: C; for children, D.",
]
# each was read as its first answer: an apology or a conclusion that gives another, a second one said to be right too,
# an alternative after a condition or an arrow; or as the answer line below a first line that is another choice alone
CORRECTED_MCQ += [
    "Answer: C\n\nI apologize for the confusion. The correct answer is D.",
    "Answer: C\n\nVitamin C deficiency causes scurvy. However, the correct answer is D.",
    "Answer: C\n\nTherefore, D.",
    "Answer: C\n\nHence D.",
    "Answer: C\n\nNope, D.",
    "Answer: C\n\nApologies, D.",
    "Answer: C\n\nActually, it should be D.",
    "Answer: C\n\nHowever, D is also correct.",
    "Answer: C\n\nBoth C and D are correct.",
    "Answer: C\n\nIt could also be D.",
    "Answer: C\n\nAlternatively, D.",
    "Answer: C, unless pregnant, then D.",
    "Answer: C \u2192 D",
    "**C**\n\nAnswer: D",
    "C\n\nVitamin C deficiency causes scurvy.\n\nAnswer: D",
    # X alone after the answer, as before
    "Answer: C\n\n**D**",
    "Answer: C\n\nWait. D.",
]
CORRECTED_YES_NO = [
    "Answer: yes. No, wait \u2014 the trial showed no reduction.",
    "Answer: No. Yes.",
    "Answer: yes, if the dose is under 100 mg; otherwise no",
    "Answer: maybe. Evidence is limited; in some subgroups, yes.",
    "Answer: no\nActually, yes.",
    # below 'maybe' a correction still counts, and a yes under a condition on its own line
    "Answer: maybe\n\nActually, yes.",
    "Answer: maybe\n\nThe answer is yes.",
    "Answer: maybe. If the subgroup analysis is trusted, yes.",
    "Answer: yes\n\nIf the dose is over 100 mg, no.",
    # a conclusion that gives another, an arrow, a first line that is another choice alone
    "Answer: yes\n\nOverall, no.",
    "Answer: yes\n\nTherefore, no.",
    "Answer: yes\n\nBottom line: no.",
    "Answer: no\n\nYes, in fact.",
    "Answer: maybe\n\nIn conclusion, yes.",
    "Answer: yes \u2192 no",
    "Yes.\n\nAnswer: no",
    "Answer: yes\nNo.",
]


@pytest.mark.parametrize("reply", CORRECTED_MCQ)
def test_a_second_choice_after_the_answer_is_no_answer_mcq(reply):
    """Each was read as its first choice, C, the correction or the alternative dropped without a word."""
    parsed = _mcq(reply)
    assert not parsed.ok and parsed.value is None and parsed.error, parsed


@pytest.mark.parametrize("reply", CORRECTED_YES_NO)
def test_a_second_choice_after_the_answer_is_no_answer_yes_no(reply):
    parsed = _pubmedqa(reply)
    assert not parsed.ok and parsed.value is None, parsed


# what only discusses another option, or restates the answer, stays the answer
CLEAR_MCQ = [
    "Answer: C\n\nExplanation: Scurvy results from a lack of vitamin C (ascorbic acid). Option A (vitamin A) causes "
    "night blindness; option B (B12) causes megaloblastic anaemia; option D (vitamin D) causes rickets in children.",
    "Answer: C. Vitamin C\n\nA is incorrect because vitamin A deficiency causes night blindness.\nB is incorrect: B12 "
    "deficiency causes anaemia.\nD is incorrect: vitamin D deficiency causes rickets.",
    "Answer: C\n\nWhy not the others?\n- A: night blindness\n- B: anaemia\n- D: rickets",
    "Answer: C\n\nNote: in infants, D deficiency causes rickets.",
    "Answer: C\n\nVitamin C deficiency leads to scurvy. It is not D, which causes rickets.",
    "Answer: C\n\nThe other options are incorrect: A causes night blindness, B causes anaemia, D causes rickets.",
    "Answer: C\nVitamin C. Not A, B or D.",
    "Answer: C\n\n(A, B and D are distractors.)",
    "Answer: C\nD is a common distractor.",
    "Answer: C\nB is the most common wrong answer.",
    "Final answer: C\n\nSo the answer is C, not D.",
    "Answer: C\n\nActually, vitamin C deficiency is scurvy.",
    "Answer: C\n\nWait, let me double-check: scurvy is vitamin C deficiency. Yes, C.",
    "Answer: C\n\nIn contrast, A, B and D cause other diseases.",
    "Answer: C\n\nNo, it is not B: B12 deficiency causes anaemia.",
    "Answer: C\n\nThe answer is not D; D deficiency causes rickets.",
    "Answer: **C. Vitamin C**\n\nScurvy is due to vitamin C deficiency, not vitamin D (rickets) or vitamin A.",
    "C. Vitamin C\n\nExplanation: Option A, vitamin A, causes night blindness.",
    "Scurvy is vitamin C deficiency; vitamin D deficiency causes rickets.\n\nAnswer: C",
]
# each was refused as a second choice: a label in brackets, a purpose, the mixed evidence that 'maybe' means, a choice
# word in the explanation that is not presented as the answer
CLEAR_MCQ += [
    "Answer: C\n\nCompare pernicious anemia (B) in vegans.",
    "Answer: C\n\n...Vitamin D (D) in excess causes hypercalcemia.",
    "Answer: C\n\nNote that B12 deficiency (B) when severe causes neuropathy.",
    "Answer: C\n\nFor bone health, D.",
    "Answer: C. Pernicious anemia (B) in vegans is a different deficiency.",
    "Answer: C\n\nScurvy is vitamin C deficiency. In pregnancy, needs rise.",
]
# each was refused as a second choice: the options ruled out one by one as questions, labels or a bulleted list, and a
# first line that is the answer alone
CLEAR_MCQ += [
    "Answer: C\n\nA? No. B? No. D? No.",
    "Answer: C\n\nA: No. B: No. C: Yes. D: No.",
    "Answer: C\n\nWait, D? No.",
    "Answer: C\n\nEliminated options:\n- A\n- B\n- D",
    "C\n\nAnswer: C",
]
CLEAR_YES_NO = [
    ("Answer: maybe\n\nIn women, yes; in men, no.", "maybe"),
    ("Answer: maybe\n\nIf the subgroup analysis is trusted, yes.", "maybe"),
    ("Answer: maybe\n\nMaybe: yes in one cohort, no in the other.", "maybe"),
    ("Answer: maybe\n\nThe study was small. Yes, there was a trend, but it was not significant.", "maybe"),
    ("Answer: no\n\nDoes aspirin help? No. Does it harm? Yes: it increases bleeding.", "no"),
    ("Answer: no\n\nThe trial found no reduction in cardiovascular events, and major haemorrhage increased.", "no"),
    ("Answer: yes\n\nIn patients over 70, aspirin reduced events; however, bleeding increased.", "yes"),
    ("Answer: maybe\n\nSome trials say yes, others say no; the evidence is mixed.", "maybe"),
    ("Answer: yes\n\nYes \u2014 the trial showed a 20% reduction.", "yes"),
    ("Answer: No\n\nNo, aspirin did not reduce events.", "no"),
    ("Answer: no. The trial showed no benefit; if anything, harm.", "no"),
    ("Answer: no\n\nWhile some observational data suggested yes, the randomized trial did not.", "no"),
    ("Answer: yes. The results were significant, no doubt.", "yes"),
    # a choice word that answers a question in the explanation
    ("Answer: no\n\nSafety concerns? Yes.", "no"),
    ("Answer: yes\n\nCould this be chance? No.", "yes"),
    ("Answer: no\n\n1. Did aspirin reduce MI? No.\n2. Did it increase bleeding? Yes.", "no"),
    ("Answer: yes\n\nLong-term data? Maybe.", "yes"),
]


@pytest.mark.parametrize("reply", CLEAR_MCQ)
def test_discussing_another_option_keeps_the_answer_mcq(reply):
    parsed = _mcq(reply)
    assert parsed.ok and parsed.value == "C", parsed


@pytest.mark.parametrize("reply, expected", CLEAR_YES_NO)
def test_discussing_another_choice_keeps_the_answer_yes_no(reply, expected):
    parsed = _pubmedqa(reply)
    assert parsed.ok and parsed.value == expected, parsed


@pytest.mark.parametrize("tail", ["\n" + "no, " * 10_000, "\n" + "_" * 40_000, "\n. " + " " * 40_000 + "D x",
                                  "\nD" + " " * 40_000 + "x", "\nin " + "a" * 40_000 + ",", "\n" + "D, " * 13_000 + "x",
                                  "\nwait" + " ," * 20_000 + "x", "\nbut D" + " " * 40_000 + "x"])
def test_a_long_hostile_tail_is_read_in_linear_time(tail):
    """serve parses in its event loop: the patterns that look for a second choice must not backtrack on a long run."""
    import time

    started = time.perf_counter()
    _mcq("Answer: C" + tail)
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("tail", [" but" * 12_000, " whereas" * 6_000 + " vitamin c", " or" * 16_000,
                                  " ," * 25_000, "\nBoth" + " C and" * 9_000, "\n" + ". therefore," * 4_000,
                                  "\n" + " it could be" * 4_000, " ->" * 16_000])
def test_a_long_hostile_answer_line_or_conclusion_is_read_in_linear_time(tail):
    """The clause after another option's text, the options joined to this one's and the conclusions below it."""
    import time

    started = time.perf_counter()
    _mcq("Answer: C. Vitamin D" + tail)
    _mcq("Answer: C. Vitamin C" + tail)
    assert time.perf_counter() - started < 5


# -- a reply cut at max_tokens ----------------------------------------------------------------------------------
CUT = [("open_question", {"question": "Dose of adrenaline in anaphylaxis?"}, "Answer: give 0.5 mg of"),
       ("mcq", SCURVY, "Answer: C. Vitamin C, or rather"),
       ("triage", TRIAGE, ROUTINE)]


@pytest.mark.parametrize("name, inputs, reply", CUT, ids=[c[0] for c in CUT])
def test_a_reply_cut_at_max_tokens_is_no_answer(name, inputs, reply):
    """'Answer: give 0.5 mg of' was parsed ok beside finish_reason 'length'."""
    template = get_template(name)
    assert template.parse(reply, inputs).ok  # complete, each is an answer
    parsed = template.parse(reply, inputs, truncated=True)
    assert not parsed.ok and parsed.value is None and "cut at the token limit" in parsed.error


def _chat_prompt(template: str, inputs: dict):
    import asyncio
    from types import SimpleNamespace

    from edgemed.serve import api
    from edgemed.serve.endpoints import chat_prompt
    from edgemed.serve.middleware import RequestRecord
    from edgemed.templates import load_templates

    class Batcher:
        def chat_template(self):
            return None

        def render_chat(self, messages, tools=None):
            return "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>"

    served = SimpleNamespace(batcher=Batcher(), templates=load_templates(), config=SimpleNamespace(model_id="m"))
    body = api.ChatRequest(model="m", messages=[], template=template, template_inputs=inputs)
    return asyncio.run(chat_prompt(served, RequestRecord("r1", "chat", None), body))


def test_serve_parses_a_reply_cut_at_max_tokens_as_no_answer():
    prompt = _chat_prompt("open_question", {"question": "Dose of adrenaline in anaphylaxis?"})
    cut = prompt.extra("Answer: give 0.5 mg of", "length")["edgemed"]["parsed"]
    assert cut["ok"] is False and cut["value"] is None and "cut at the token limit" in cut["error"]
    whole = prompt.extra("Answer: give 0.5 mg IM.", "stop")["edgemed"]["parsed"]
    assert whole == {"ok": True, "value": "give 0.5 mg IM.", "error": None}


def _answer(index: int, text: str):
    from edgemed.serve.endpoints import Answer

    return Answer(index=index, parts=[text])


def test_serve_parses_each_of_n_choices_on_that_choice():
    """With n > 1 only the first choice's text was parsed, and put on the response as if it were every choice's."""
    from edgemed.serve.endpoints import ChatShape

    prompt = _chat_prompt("mcq", SCURVY)
    shape = ChatShape(id="chatcmpl-r1", model="m", extra=prompt.extra, n=3)
    out = shape.whole([_answer(0, "Answer: C"), _answer(1, "Answer: B. Vitamin C"), _answer(2, "Answer: D because")],
                      ["stop", "stop", "length"])
    parsed = [c["edgemed"]["parsed"] for c in out["choices"]]
    assert [p["ok"] for p in parsed] == [True, False, False] and parsed[0]["value"] == "C"
    assert "cut at the token limit" in parsed[2]["error"]
    assert out["edgemed"]["parsed"] == parsed[0] and out["edgemed"]["template"]["id"] == "mcq"  # as with n = 1


def test_serve_keeps_the_shape_of_one_choice():
    from edgemed.serve.endpoints import ChatShape

    prompt = _chat_prompt("mcq", SCURVY)
    out = ChatShape(id="chatcmpl-r1", model="m", extra=prompt.extra).whole([_answer(0, "Answer: C")], ["stop"])
    assert out["edgemed"]["parsed"] == {"ok": True, "value": "C", "error": None} and "edgemed" not in out["choices"][0]
    streamed = ChatShape(id="chatcmpl-r1", model="m", extra=prompt.extra).final(_answer(0, "Answer: C. Vitamin"), "length")
    assert streamed[-1]["edgemed"]["parsed"]["ok"] is False  # the final chunk of a stream says so too
