"""What a template's contract reads as the model's answer, and what the template library refuses before asking.

In a medical answer a wrong choice reported as the answer is worse than no answer: a choice is read only from a line
that gives it (``Answer: C`` at a line's start), never inferred from prose or a list of the options; answer lines that
disagree are no answer. Each case here was once read wrongly.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
from packaging.requirements import Requirement

from edgemed.errors import InputError, TemplateError
from edgemed.formats.nesting import loads_toml
from edgemed.runtime.chat_template import render as render_chat
from edgemed.templates import get_template

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
])
def test_option_labels_no_answer_can_tell_apart_are_refused(options, says):
    """An empty label made a reply with no answer line parse as that option; 'a' and 'A' read as one choice."""
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
