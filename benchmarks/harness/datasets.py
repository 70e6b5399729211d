"""Medical QA evaluation items from the files people actually have: MCQ JSONL and PubMedQA's own JSON.

Two formats, told apart by content, not by file name (``_parse``):

* **MCQ JSONL** — one object per line, ``{"question", "options": {"A": ..}, "answer_idx": "B", ...}``: MedQA-USMLE,
  MedMCQA, MMLU-medical and the medagents-benchmark files (its PubMedQA file is the official test split and carries
  the abstract inside ``question``).
* **PubMedQA** ``ori_pqal.json`` — one object, PMID -> ``{QUESTION, CONTEXTS, LABELS, final_decision, ...}``.
  Options are ``A yes / B no / C maybe``; ``context=False`` drops the abstract (the question-only setting).

**PubMedQA is evaluated on its official test split only** (``PUBMEDQA_RULE``): the items of ``ori_pqal.json`` are
the 500 PMIDs of ``test_ground_truth.json`` beside it, and without that file the data set is refused. The other
500 expert-labelled PQA-L abstracts are the importance-matrix calibration text of the 4-bit conversions, so they
must never be scored.

**Sampling is a seeded permutation, then the first n** (``draw``): never the first n of the file, because the
PubMedQA files are sorted by label, and prefix-stable: a larger n keeps every item of a smaller one (same seed),
so a run extended from 300 to 600 items per set scores only the 300 new ones and resumes from the records.

``SUITE`` is the default accuracy set of the reproduction (``--eval-data DIR``): MedMCQA, MMLU-medical and the
PubMedQA test split with the per-set counts and the reason for them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from edgemed.errors import InputError

PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}
PUBMEDQA_GROUND_TRUTH = "test_ground_truth.json"
PUBMEDQA_RULE = ("PubMedQA items come only from the official test split (the 500 PMIDs of test_ground_truth.json); "
                 "the other 500 PQA-L abstracts are imatrix calibration text, not evaluation data")
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
    if not truth_file.is_file():
        raise InputError(f"{path} is PubMedQA without {PUBMEDQA_GROUND_TRUTH} beside it, so its official test split "
                         f"cannot be told from the other PQA-L items ({PUBMEDQA_RULE}).",
                         f"copy {PUBMEDQA_GROUND_TRUTH} from the same PubMedQA release next to {path.name}")
    try:
        wanted = json.loads(truth_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{truth_file} is not valid JSON ({exc.msg}).", "re-copy it from the PubMedQA repository") from None
    if not isinstance(wanted, dict) or not wanted:
        raise InputError(f"{truth_file} is not an object PMID -> label.", "re-copy it from the PubMedQA repository")
    letter = {v: k for k, v in PUBMEDQA_OPTIONS.items()}
    items = []
    for pmid, gold in wanted.items():
        if pmid not in data:
            raise InputError(f"{truth_file} names PMID {pmid}, which {path} does not contain.",
                             f"use the {path.name} and {PUBMEDQA_GROUND_TRUTH} from the same PubMedQA release")
        if gold not in letter:
            raise InputError(f"{truth_file}: PMID {pmid} has the label {gold!r}, not yes/no/maybe.", "re-copy that file")
        entry = data[pmid]
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


def draw(items: list, n: int, seed: int) -> list:
    """The first ``n`` of a permutation of ``items`` fixed by ``seed`` alone: the draw for a larger ``n`` starts with
    the draw for a smaller one (``random.Random(seed).shuffle`` is a Fisher-Yates pass over the whole list, so the
    order does not depend on ``n``; ``random.sample`` does not have this property: it changes method with ``n``)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return order[:n]


def load_items(path: Path, n: int | None, seed: int, *, context: bool = True) -> list[Item]:
    """``n`` items of ``path`` drawn with ``seed`` (``draw``; all of them, in the drawn order, when ``n`` is None)."""
    path = Path(path)
    reader, payload = _parse(path)
    items = reader(path, payload, context)
    if n is None:
        n = len(items)
    if n < 1 or n > len(items):
        raise InputError(f"Asked for {n} items from '{path}', which has {len(items)}.",
                         f"pass --eval-n between 1 and {len(items)}")
    return draw(items, n, seed)


def load_eval_set(paths, counts, seed: int, *, context: bool = True) -> list[Item]:
    """The items of several files: ``counts[i]`` drawn from ``paths[i]`` (the same seed for each file)."""
    paths, counts = list(paths), list(counts)
    if len(paths) != len(counts):
        raise InputError(f"{len(counts)} item counts for {len(paths)} evaluation files.",
                         "pass one --eval-n for every file, or a single one for all")
    return [it for path, n in zip(paths, counts) for it in load_items(Path(path), n, seed, context=context)]


# -- the reproduction's default accuracy set -------------------------------------------------
@dataclass(frozen=True)
class SuiteSet:
    name: str   # the data set name items carry (folder name for split-named files)
    path: str   # relative to the data folder (laid out as the shared data: medagentsbench/, pubmedqa/)
    n: int      # items drawn by default


#: 1,600 paired items. The pooled paired test is what must resolve a point: at the discordance Q4_K_M showed on the
#: 1.5B (26 of 600 pairs, 4.3 %), 1,600 pairs give a 95 % interval of about +-1.0 point on the difference and detect
#: 1.46 points with 80 % power (stats.mcnemar_mdd); 1 point at 80 % needs ~3,400, which a larger --eval-n reaches by
#: extending these same items. PubMedQA: its whole official test split (the cheapest set per item); MMLU-medical as
#: many, for a like per-set precision; MedMCQA 600. Cost: benchmarks/results/harness_cost.md.
SUITE = (
    SuiteSet("medmcqa", "medagentsbench/medmcqa/test.jsonl", 600),
    SuiteSet("mmlu", "medagentsbench/mmlu/test.jsonl", 500),
    SuiteSet("pubmedqa", "pubmedqa/ori_pqal.json", 500),
)


def suite_files(data_dir: Path) -> list[tuple[Path, int]]:
    """(file, default count) of each ``SUITE`` set under ``data_dir``; a missing file is named with its fix."""
    data_dir = Path(data_dir)
    out = []
    for row in SUITE:
        path = data_dir / row.path
        if not path.is_file():
            raise InputError(f"--eval-data {data_dir} has no {row.path} (the {row.name} set of the default suite).",
                             "point --eval-data at a folder laid out like the shared data (medagentsbench/medmcqa/"
                             "test.jsonl, medagentsbench/mmlu/test.jsonl, pubmedqa/ori_pqal.json + "
                             f"{PUBMEDQA_GROUND_TRUTH}), or pass the files with --eval")
        out.append((path.resolve(), row.n))
    return out
