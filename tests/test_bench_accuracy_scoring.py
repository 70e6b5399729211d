"""What the accuracy harness scores for one item, with a scripted scorer (no model): where the answer cue goes, which
text of a generated reply is read as the answer, and the paired comparison and floors read from records files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgemed.benchmarks.harness import accuracy
from edgemed.benchmarks.harness.datasets import Item

ITEM = Item(id="medqa:1", dataset="medqa", question="Which vitamin deficiency causes scurvy?",
            options={"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"}, answer="C")


class ScriptedScorer:
    """One character one token; the chat template ends with ``tail`` (an R1 distill's opens the thought); each
    ``greedy`` call returns the next scripted ``(text, cut at the limit)``."""

    def __init__(self, tail: str, replies=()):
        self.tail, self.replies = tail, list(replies)
        self.counters = {"evaluated": 0, "reused": 0, "generated": 0}
        self.scored: list[str] = []    # the text of each sequence whose next-token logits were read
        self.prompts: list[str] = []   # the text each greedy call continued

    def render(self, messages):
        return "<｜User｜>" + messages[-1]["content"] + self.tail

    def tokenize(self, text, special=True):
        return [ord(c) for c in text]

    def detokenize(self, ids):
        return "".join(map(chr, ids))

    def next_logits(self, tokens):
        self.scored.append(self.detokenize(tokens))
        logits = np.zeros(128, dtype=np.float32)
        logits[ord("C")] = 5.0
        return logits

    def greedy(self, tokens, max_tokens, stop=(), until=None):
        self.prompts.append(self.detokenize(tokens))
        return self.replies.pop(0)


R1_TAIL = "<｜Assistant｜><think>\n"


def _score(scorer, generate=True):
    return accuracy.score_item(scorer, accuracy._Prepared(scorer), ITEM, "mcq", 16, generate=generate)


def test_the_answer_cue_follows_a_closed_thought_when_the_template_opens_one():
    """An R1 distill's template ends its prompt in an open thought: "Answer:" appended there was scored inside it."""
    sc = ScriptedScorer(R1_TAIL)
    rec = _score(sc, generate=False)
    assert sc.scored[-1].endswith(R1_TAIL + "\n</think>\n\nAnswer:") and rec["thinks"] is True
    assert rec["logit_pred"] == "C"
    plain = ScriptedScorer("<｜Assistant｜>")
    rec = _score(plain, generate=False)
    assert plain.scored[-1].endswith("<｜Assistant｜>Answer:") and rec["thinks"] is False


def test_a_thought_is_never_read_as_the_generated_answer():
    """A thought line 'Okay, the answer is B.' was credited as the answer: the reply was parsed as if the thought
    had not been opened. The thought is capped and closed as ``edgemed run --think cap:N`` does, then the answer read."""
    sc = ScriptedScorer(R1_TAIL, [("Okay, the answer is B.\n", True), ("I am not sure.\n", False)])
    rec = _score(sc)
    assert rec["parsed_ok"] is False and rec["gen_pred"] is None
    assert sc.prompts[1].endswith(R1_TAIL + "Okay, the answer is B.\n\n</think>\n\n")  # the answer asked after it
    sc = ScriptedScorer(R1_TAIL, [("Okay, the answer is B.\n", True), ("Answer: C\n", False)])
    rec = _score(sc)
    assert rec["parsed_ok"] is True and rec["gen_pred"] == "C"


def test_a_generated_reply_cut_at_the_token_limit_is_no_answer():
    """'Answer: C' cut at max_gen_tokens may have gone on 'or D': it was credited, as ``edgemed run`` does not."""
    rec = _score(ScriptedScorer("<｜Assistant｜>", [("Answer: C", True)]))
    assert rec["parsed_ok"] is False and rec["gen_pred"] is None
    rec = _score(ScriptedScorer("<｜Assistant｜>", [("Answer: C", False)]))  # ended by the model itself
    assert rec["parsed_ok"] is True and rec["gen_pred"] == "C"


def test_the_report_says_which_configurations_were_scored_as_reasoning_models():
    from edgemed.benchmarks.harness import scores

    def table(header, rows):
        return "\n".join("|".join(map(str, r)) for r in [header, *rows])

    rec = _score(ScriptedScorer(R1_TAIL, [("Hmm.\n", True), ("Answer: C\n", False)]))
    acc = accuracy.summarize([rec])
    assert acc["thinking"] == 1
    text = "\n".join(scores.markdown({"configs": [{"name": "f16", "accuracy": acc}], "settings": {}}, table))
    assert "`f16`: a reasoning model" in text
    acc = accuracy.summarize([_score(ScriptedScorer("<｜Assistant｜>", [("Answer: C\n", False)]))])
    text = "\n".join(scores.markdown({"configs": [{"name": "f16", "accuracy": acc}], "settings": {}}, table))
    assert acc["thinking"] == 0 and "reasoning model" not in text


@pytest.mark.parametrize("reply,value", [
    ("Answer: Option B", "B"), ("**Answer:** Option C", "C"), ("Answer: option (D)", "D"),
    ("The answer is option B.", "B"), ("Answer: Option B or C", None), ("Answer: optional A", None),
])
def test_an_answer_line_may_name_the_option_before_its_letter(reply, value):
    """'Answer: Option B', '**Answer:** Option C' and 'The answer is option B.' were no answer (a hedge still is)."""
    from edgemed.templates import get_template

    parsed = get_template("mcq").parse(reply, {"question": ITEM.question, "options": ITEM.options})
    assert (parsed.value if parsed.ok else None) == value


def test_a_hedge_cut_at_the_token_limit_is_no_answer():
    """'Answer: C (or possibly' read as C: the harness parsed it without saying the reply was cut."""
    from edgemed.templates import get_template

    tpl, inputs = get_template("mcq"), {"question": ITEM.question, "options": ITEM.options}
    assert not tpl.parse("Answer: C (or possibly", inputs, truncated=True).ok
    rec = _score(ScriptedScorer("<｜Assistant｜>", [("Answer: C (or possibly", True)]))
    assert rec["parsed_ok"] is False


@pytest.mark.parametrize("reply", ["Answer: C (or possibly D)\n", "Answer: C or D\n", "Answer: C/D\n",
                                   "Answer: C, maybe D\n", "Answer: C (or option D)\n", "Answer: C, but possibly D\n",
                                   "Answer: C|D\n", "Answer: C (second choice: D)\n"])
def test_a_hedge_the_model_ended_itself_is_no_answer_and_the_report_counts_it(reply):
    """'Answer: C (or option D)' or 'Answer: C, but possibly D', not cut, was credited as C, the gold answer: the model
    named two options. It is no answer, and report.md and results.csv say how many generated replies gave none."""
    from edgemed.benchmarks.harness import scores

    hedged = _score(ScriptedScorer("<｜Assistant｜>", [(reply, False)]))
    assert hedged["parsed_ok"] is False and hedged["gen_pred"] is None
    plain = _score(ScriptedScorer("<｜Assistant｜>", [("Answer: C\n", False)]))
    assert plain["parsed_ok"] is True and plain["gen_pred"] == "C"
    acc = accuracy.summarize([hedged, plain])
    acc["per_dataset"] = accuracy.per_dataset([hedged, plain])
    assert acc["n_gen"] == 2 and acc["unparsed"] == 1 and acc["acc_gen"] == 0.5

    def table(header, rows):
        return "\n".join("|".join(map(str, r)) for r in [header, *rows])

    entry = {"name": "q4_k_m", "accuracy": acc}
    text = "\n".join(scores.markdown({"configs": [entry], "settings": {}}, table))
    assert "q4_k_m|2|100.0 %|34.2 to 100.0|50.0 % (1 no answer)|" in text and "counted as *no answer*" in text
    assert "q4_k_m|medqa|2|100.0 %|34.2 to 100.0|50.0 % (1 no answer)|" in text  # the per-set table too
    row = scores.csv_columns(entry)
    assert row["acc_gen"] == 0.5 and row["acc_gen_n"] == 2 and row["acc_gen_no_answer"] == 1


def _records(path, rows, meta=None):
    """A records file: the meta line, then one line per (id, dataset, gold, logit_pred[, item_sha])."""
    lines = [json.dumps({"meta": meta or {"version": accuracy.RECORDS_VERSION}})]
    for row in rows:
        i, ds, gold, pick, *sha = row
        lines.append(json.dumps({"id": i, "dataset": ds, "gold": gold, "logit_pred": pick, "item_sha": sha[0] if sha else "s",
                                 "probs": {c: 0.25 for c in "ABCD"}}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_floors_count_each_item_once_as_the_harness_reads_the_records(tmp_path):
    """Every line was counted: an item redone (its question changed, or a resume) counted twice, though the harness
    keeps only its last record."""
    from edgemed.benchmarks import accuracy_baselines

    rows = [("medqa:2", "medqa", "A", "B"), ("medqa:1", "medqa", "C", "C"), ("medqa:2", "medqa", "A", "A")]
    _records(tmp_path / "f16-accuracy.records.jsonl", rows)
    _records(tmp_path / "q4-accuracy.records.jsonl", [rows[1], rows[2]])  # the same items, each once, other order
    out = accuracy_baselines.main([str(tmp_path)])
    assert out["medqa"]["items"] == 2 and out["medqa"]["runs"]["f16"]["accuracy"] == 1.0
    assert out["medqa"]["runs"]["q4"]["accuracy"] == 1.0
    # the same id asked another way (PubMedQA with its abstract, then without) is not the same item
    _records(tmp_path / "q4-accuracy.records.jsonl", [rows[1], (*rows[2], "other")])
    with pytest.raises(SystemExit, match="not the same items"):
        accuracy_baselines.main([str(tmp_path)])


def test_the_paired_comparison_pairs_only_items_asked_the_same_way(tmp_path):
    """Ids were paired whatever each side was shown: an F16 result kept from a run that gave PubMedQA its abstract
    was paired with a Q4_K_M one asked without it. Such ids are left unpaired and counted in ``excluded``."""
    from edgemed.benchmarks.harness import scores

    rows = [(f"pubmedqa:{k}", "pubmedqa", "A", "A" if k % 2 else "B") for k in range(6)]
    _records(tmp_path / "raw" / "f16-accuracy.records.jsonl", [(*r, "with-abstract") for r in rows])
    _records(tmp_path / "raw" / "q4_k_m-accuracy.records.jsonl", [(*r, "question-only") for r in rows])
    entries = [{"name": "f16", "accuracy": {"n": 6}}, {"name": "q4_k_m", "accuracy": {"n": 6, "per_dataset": {}}}]
    scores.add_paired(tmp_path, entries)
    paired = entries[1]["accuracy"]["paired_vs_reference"]
    assert paired["n"] == 0 and paired["excluded"] == 6
    assert "6 ids not paired" in scores.paired_cell(paired)
    # asked the same way but for two items: the four alike are paired, the two others counted out
    _records(tmp_path / "raw" / "q4_k_m-accuracy.records.jsonl",
             [(*r, "with-abstract" if k < 4 else "question-only") for k, r in enumerate(rows)])
    mine, base = (scores.read_records(tmp_path, n) for n in ("q4_k_m", "f16"))
    out = scores.compare(mine, base)
    assert (out[scores.POOLED]["n"], out[scores.POOLED]["excluded"]) == (4, 2)
    assert (out["pubmedqa"]["n"], out["pubmedqa"]["excluded"]) == (4, 2)
