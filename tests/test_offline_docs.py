"""The docs say what ``env.enforce_offline`` does and where it runs: every command sets the Hugging Face and telemetry
offline variables first (before anything imports huggingface_hub, which reads them once), a user's 0 or false is
overridden with a warning, and EDGEMED_ALLOW_NETWORK=1 lifts it. The runtime page said only "the engine sets" them,
the architecture page the same; tests/test_offline.py checks the behaviour, this the pages that describe it."""

from __future__ import annotations

import re
from pathlib import Path

from edgemed import env

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _paragraph(path: Path, start: str) -> str:
    """The list item of ``path`` that starts with ``start``, its lines joined."""
    lines = path.read_text(encoding="utf-8").splitlines()
    first = next(i for i, line in enumerate(lines) if line.lstrip().startswith(start))
    indent = len(lines[first]) - len(lines[first].lstrip())
    item = [lines[first]]
    for line in lines[first + 1:]:
        if not line.strip() or len(line) - len(line.lstrip()) <= indent:
            break
        item.append(line)
    return " ".join(" ".join(item).split())


def test_the_runtime_page_says_every_command_sets_the_offline_variables_it_names():
    text = _paragraph(DOCS / "runtime.md", "- Offline:")
    assert "every `edgemed` command" in text and "before" in text and "huggingface_hub" in text
    named = set(re.findall(r"`([A-Z][A-Z_]+)(?:=1)?`", text))
    assert named == {*env._OFFLINE_VARS, env.ALLOW_NETWORK_VAR}, named  # the variables the code sets, and its switch
    assert "overridden, with a warning" in text and f"`{env.ALLOW_NETWORK_VAR}=1` lifts" in text


def test_the_architecture_page_says_every_command_sets_them_first():
    text = _paragraph(DOCS / "architecture.md", "10. **Offline.**")
    assert "Every command first sets the HF and telemetry offline variables" in text
    assert "huggingface_hub" in text and "overriding a user's `0` or `false` with a warning" in text
    assert f"unless `{env.ALLOW_NETWORK_VAR}=1`" in text
