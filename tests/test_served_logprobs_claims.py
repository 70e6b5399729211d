"""docs/openai.md's figures on served log probabilities are those of benchmarks/results/served_logprobs/: the
tokens and questions measured, the largest gaps to whole-sequence rescoring and to rows computed one step at a time,
and the command that made them."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "served_logprobs" / "SmolLM2-135M-Instruct.Q4_1-t1.json"


def test_the_openai_page_gives_the_served_logprobs_results_figures():
    text = " ".join((ROOT / "docs" / "openai.md").read_text(encoding="utf-8").split())
    m = json.loads(RESULT.read_text(encoding="utf-8"))
    later = [r for q in m["rows"] for r in q["tokens"] if r["position"] > 0]
    first = [r for q in m["rows"] for r in q["tokens"] if r["position"] == 0]
    found = re.search(r"on SmolLM2-135M \(Q4_1, (\d+) thread\), (\d+) answer tokens of (\d+) medical questions differed "
                      r"from it by up to ([\d.]+) nats on the chosen token and ([\d.]+) over it and its (\d+) likeliest "
                      r"alternatives, and by ([\d.]+) from the one-step rows \(`([^`]+)`", text)
    assert found, "docs/openai.md should give the served_logprobs figures in the sentence this test reads"
    threads, tokens, questions, chosen, alternatives, top, stepped, command = found.groups()
    assert (int(threads), int(tokens), int(questions), int(top)) == (m["threads"], len(later), len(m["questions"]),
                                                                      m["top"])
    assert float(chosen) == round(max(r["whole_chosen"] for r in later), 3)
    assert float(alternatives) == round(max(r["whole"] for r in later), 3)
    assert float(stepped) == max(r["one_row_a_step"] for r in later)
    assert command == m["command"] and "benchmarks/results/served_logprobs/" in text
    assert max(max(r["whole"], r["one_row_a_step"]) for r in first) <= 1e-4  # "the first ... agrees within 1e-4"
