"""Medical QA evaluation items from the files people actually have: MCQ JSONL and PubMedQA's own JSON.

Two formats, told apart by content, not by file name (one row each in ``READERS``):

* **MCQ JSONL** — one object per line, ``{"question", "options": {"A": ..}, "answer_idx": "B", ...}``: MedQA-USMLE,
  MedMCQA and the medagents-benchmark files (its PubMedQA file carries the abstract inside ``question``).
* **PubMedQA** ``ori_pqal.json`` — one object, PMID -> ``{QUESTION, CONTEXTS, LABELS, final_decision, ...}``.
  When ``test_ground_truth.json`` sits beside it, only its PMIDs (the official test split) are used. Options are
  ``A yes / B no / C maybe``; ``context=False`` drops the abstract (the question-only setting).

Sampling is seeded and without replacement (``random.Random(seed).sample``): never the first N, because the
PubMedQA files are sorted by label.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from edgemed.errors import InputError

PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}
PUBMEDQA_GROUND_TRUTH = "test_ground_truth.json"
# File stems that say nothing about the data set: the folder names it instead (medagentsbench/medmcqa/test.jsonl).
_SPLIT_NAMES = {"test", "dev", "train", "val", "valid", "validation", "test_hard"}


@dataclass(frozen=True)
class Item:
    """One question with its options (letter -> text) and the gold letter; ``context`` is PubMedQA's abstract."""

    id: str
    dataset: str
    question: str
    options: dict
    answer: str
    context: str | None = None


def dataset_name(path: Path) -> str:
    return path.parent.name if path.stem.lower() in _SPLIT_NAMES else path.stem


# -- MCQ JSONL ----------------------------------------------------------------------------
def _is_mcq(obj) -> bool:
    return isinstance(obj, dict) and "question" in obj and "options" in obj


def _mcq_items(path: Path, text: str, context: bool) -> list[Item]:
    name = dataset_name(path)
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where} is not valid JSON ({exc.msg}).",
                             "fix or delete that line; each line must be one JSON object") from None
        if not _is_mcq(obj) or not isinstance(obj["options"], dict) or not obj["options"]:
            raise InputError(f"{where} has no 'question' and 'options' object.",
                             'each line needs {"question": ..., "options": {"A": ...}, "answer_idx": "A"}')
        options = {str(k): str(v) for k, v in obj["options"].items()}
        answer = str(obj.get("answer_idx", ""))
        if answer not in options:
            raise InputError(f"{where}: answer_idx {answer!r} is not one of the options {', '.join(options)}.",
                             "set answer_idx to the letter of the correct option")
        item_id = str(obj.get("realidx", obj.get("id", f"line{lineno}")))
        items.append(Item(f"{name}:{item_id}", name, str(obj["question"]), options, answer))
    return items


# -- PubMedQA ori_pqal.json ---------------------------------------------------------------
def _is_pubmedqa(obj) -> bool:
    if not isinstance(obj, dict) or not obj:
        return False
    first = next(iter(obj.values()))
    return isinstance(first, dict) and "QUESTION" in first and "final_decision" in first


def _abstract(entry: dict) -> str:
    contexts = entry.get("CONTEXTS") or []
    labels = entry.get("LABELS") or []
    if len(labels) == len(contexts):
        return "\n".join(f"{label.title()}: {text}" for label, text in zip(labels, contexts))
    return "\n".join(contexts)


def _pubmedqa_items(path: Path, data: dict, context: bool) -> list[Item]:
    truth_file = path.with_name(PUBMEDQA_GROUND_TRUTH)
    wanted = None
    if truth_file.is_file():
        try:
            wanted = json.loads(truth_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{truth_file} is not valid JSON ({exc.msg}).", "re-copy it from the PubMedQA repository") from None
    letter = {v: k for k, v in PUBMEDQA_OPTIONS.items()}
    items = []
    for pmid in (wanted if wanted is not None else data):
        if pmid not in data:
            raise InputError(f"{truth_file} names PMID {pmid}, which {path} does not contain.",
                             f"use the {path.name} and {PUBMEDQA_GROUND_TRUTH} from the same PubMedQA release")
        entry = data[pmid]
        gold = (wanted or {}).get(pmid) or entry.get("final_decision")
        if gold not in letter:
            raise InputError(f"{path}: PMID {pmid} has the label {gold!r}, not yes/no/maybe.", "fix that entry's final_decision")
        items.append(Item(f"pubmedqa:{pmid}", "pubmedqa", str(entry["QUESTION"]), dict(PUBMEDQA_OPTIONS),
                          letter[gold], _abstract(entry) if context else None))
    return items


def _parse(path: Path) -> tuple:
    """(reader, payload) for the file's format, told by content."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"Evaluation file '{path}' does not exist.",
                         "pass an MCQ JSONL file (MedQA / MedMCQA format) or PubMedQA's ori_pqal.json") from None
    except UnicodeDecodeError:
        raise InputError(f"'{path}' is not UTF-8 text.", "pass an MCQ JSONL file or PubMedQA's ori_pqal.json") from None
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        head = json.loads(first)
    except json.JSONDecodeError:
        head = None
    if _is_mcq(head):
        return _mcq_items, text
    if _is_pubmedqa(head):
        return _pubmedqa_items, head
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if _is_pubmedqa(whole):
        return _pubmedqa_items, whole
    raise InputError(f"'{path}' is neither MCQ JSONL nor PubMedQA's ori_pqal.json.",
                     'MCQ JSONL lines look like {"question": ..., "options": {"A": ...}, "answer_idx": "A"}; '
                     "PubMedQA is a JSON object PMID -> {QUESTION, CONTEXTS, final_decision}")


def load_items(path: Path, n: int | None, seed: int, *, context: bool = True) -> list[Item]:
    """``n`` items of ``path`` sampled with ``seed`` (all of them, shuffled, when ``n`` is None)."""
    path = Path(path)
    reader, payload = _parse(path)
    items = reader(path, payload, context)
    if n is None:
        n = len(items)
    if n < 1 or n > len(items):
        raise InputError(f"Asked for {n} items from '{path}', which has {len(items)}.",
                         f"pass --n between 1 and {len(items)}")
    return random.Random(seed).sample(items, n)
