"""A parse that is not ok makes ``run`` ask again, constrained; one that is ok is reported as the answer. So a reply
that says two things (a letter and another option's text, an answer and its correction, a JSON object and prose that
contradicts it) or was cut short must not parse ok. Each case here once did."""

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


@pytest.mark.parametrize("answer, error", [
    ({"urgency": "routine", "red_flags": [], "action": ""}, "$.action: empty"),
    ({"urgency": "routine", "red_flags": [], "action": "home", "urgency ": "emergency"}, "$: unexpected key 'urgency '"),
])
def test_the_triage_schema_refuses_an_empty_action_and_keys_it_does_not_name(answer, error):
    triage = get_template("triage")
    parsed = triage.parse(json.dumps(answer), TRIAGE)
    assert not parsed.ok and parsed.error == error
    schema = json.loads(triage.contract.json_schema())  # and the grammar that constrains sampling says so too
    assert schema["additionalProperties"] is False and schema["properties"]["action"]["minLength"] == 1
