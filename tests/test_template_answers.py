"""What a template's contract reads as the model's answer, and what the template library refuses before asking.

In a medical answer a wrong choice reported as the answer is worse than no answer: a choice is read only from a line
that gives it (``Answer: C`` at a line's start), never inferred from prose or a list of the options; answer lines that
disagree are no answer. Each case here was once read wrongly.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
from packaging.requirements import Requirement

from edgemed.formats.nesting import loads_toml

ROOT = Path(__file__).resolve().parents[1]


# -- the jinja2 floor -----------------------------------------------------------------------------------------


def test_the_jinja2_floor_excludes_the_sandbox_escapes():
    """Jinja 3.1.5 fixed CVE-2024-56326 and 3.1.6 CVE-2025-27516: both let a hostile template escape the sandbox
    that chat templates and user prompt templates render in."""
    deps = loads_toml((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    jinja = Requirement(next(d for d in deps if d.lower().startswith("jinja2")))
    assert not jinja.specifier.contains("3.1.5") and not jinja.specifier.contains("3.1.4")
    assert jinja.specifier.contains("3.1.6") and jinja.specifier.contains(jinja2.__version__)
