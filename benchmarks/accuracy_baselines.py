"""What an accuracy run's items score without a model: chance, and always giving the commonest right answer.

A medical accuracy figure means little without the floor beside it: on PubMedQA's test split most answers are
"yes", so a model answering "yes" every time scores more than a weak one that reads the question. This reads the
per-item records an accuracy run writes (``raw/<config>-accuracy.records.jsonl``: each item's dataset, gold letter
and the letter its answer-letter logits chose) and prints, per dataset and over all items:

- ``chance``: 1 / the number of options (the mean over items);
- ``majority``: the share of items whose right answer is the commonest right answer of that dataset's items (an
  oracle floor: it knows which letter is commonest in these very items);
- each configuration's accuracy, and the share of its answers that are its own commonest letter (how much of it
  is one letter given every time).

    python -m edgemed.benchmarks.accuracy_baselines benchmarks/results/reproduce-qwen2.5-1.5b-accuracy/raw \\
        --out benchmarks/results/reproduce-qwen2.5-1.5b-accuracy/baselines.json

Writes the JSON and a Markdown table beside it (``.md``). No model is loaded.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

SUFFIX = "-accuracy.records.jsonl"


def read_records(path: Path) -> list[dict]:
    """The item records of one records file as the harness reads them (``scores.read_file``: the last record of an
    id wins, a line cut by a kill is left out), ordered by id."""
    from edgemed.benchmarks.harness.scores import read_file

    found = read_file(path)
    return [found[i] for i in sorted(found)]


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per dataset (and ``all``): items, chance, majority and each run's accuracy and commonest-letter share."""
    first = next(iter(runs.values()))
    keys = [(r["dataset"], r["id"], r.get("item_sha")) for r in first]  # the same id asked another way is another item
    for name, items in runs.items():
        if [(r["dataset"], r["id"], r.get("item_sha")) for r in items] != keys:
            raise SystemExit(f"{name}: not the same items, in the same order, as the first run; compare paired runs")
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(first):
        groups[r["dataset"]].append(i)
    out = {}
    for dataset, idx in [*sorted(groups.items()), ("all", list(range(len(first))))]:
        golds = [first[i]["gold"] for i in idx]
        by_set = collections.defaultdict(list)
        for i in idx:
            by_set[first[i]["dataset"]].append(first[i]["gold"])
        majority_right = sum(collections.Counter(g).most_common(1)[0][1] for g in by_set.values())
        row = {"items": len(idx), "chance": sum(1 / len(first[i]["probs"]) for i in idx) / len(idx),
               "majority": majority_right / len(idx),
               "gold_letters": dict(collections.Counter(golds).most_common()) if dataset != "all" else None,
               "runs": {}}
        for name, items in runs.items():
            picks = [items[i]["logit_pred"] for i in idx]
            right = sum(p == g for p, g in zip(picks, golds))
            row["runs"][name] = {"accuracy": right / len(idx),
                                 "commonest_pick_share": collections.Counter(picks).most_common(1)[0][1] / len(idx)}
        out[dataset] = row
    return out


def to_markdown(summary: dict, source: str) -> str:
    names = list(next(iter(summary.values()))["runs"])
    head = ["dataset", "items", "chance", "majority (oracle)", *[f"{n} accuracy" for n in names]]
    lines = [f"# Accuracy floors of `{source}`", "",
             "`python -m edgemed.benchmarks.accuracy_baselines` on the run's per-item records (answer-letter logits).",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for dataset, row in summary.items():
        cells = [dataset, f"{row['items']:,}", f"{row['chance'] * 100:.1f} %", f"{row['majority'] * 100:.1f} %"]
        cells += [f"{row['runs'][n]['accuracy'] * 100:.1f} % (one letter {row['runs'][n]['commonest_pick_share'] * 100:.0f} %)"
                  for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "*majority*: always the commonest right letter of that dataset's items. *one letter*: the share of "
              "the configuration's answers that are its own commonest letter."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", type=Path, help="a run's raw/ folder (its *-accuracy.records.jsonl files)")
    parser.add_argument("--out", type=Path, help="write the JSON here, and the Markdown beside it (.md)")
    args = parser.parse_args(argv)
    files = sorted(args.raw.glob("*" + SUFFIX))
    if not files:
        raise SystemExit(f"{args.raw}: no *{SUFFIX} files (pass an accuracy run's raw/ folder)")
    runs = {f.name[:-len(SUFFIX)]: read_records(f) for f in files}
    summary = summarise(runs)
    text = to_markdown(summary, str(args.raw))
    print(text, end="")
    if args.out is not None:
        from edgemed.files.atomic import write_text

        write_text(args.out, json.dumps({"source": str(args.raw), "datasets": summary}, indent=1) + "\n", force=True)
        write_text(args.out.with_suffix(".md"), text, force=True)
    return summary


if __name__ == "__main__":
    main()
