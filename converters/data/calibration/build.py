"""Rebuild the shipped calibration text from PubMedQA's PQA-L file (stdlib only; not installed).

    python converters/data/calibration/build.py /path/to/pubmedqa/data

reads ``ori_pqal.json`` and ``test_ground_truth.json`` from that folder and rewrites ``medical.txt``,
``medical-search.txt`` and ``sources.json`` beside this script. The rule (README.md says why):

- only PQA-L PMIDs that are NOT in the official 500-item test split (the test split is evaluation data);
- those PMIDs in numeric order, shuffled with ``random.Random(SEED)``;
- each abstract is its CONTEXTS and LONG_ANSWER joined by spaces, whitespace collapsed, one per paragraph;
- ``medical.txt`` (the importance matrix) takes abstracts until it holds ``IMATRIX_CHARS`` characters,
  ``medical-search.txt`` (``--quant auto``'s KLD measurement) the next ``SEARCH_ABSTRACTS``, so the two never
  share an abstract.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 13
# converters/gguf/imatrix.py reads MAX_CHUNKS x CHUNK_TOKENS = 32 x 256 = 8,192 tokens; PubMedQA abstracts run ~4.6
# characters a token (Qwen2.5 and SmolLM2 tokenizers), so 44,000 characters fill it with ~15 % to spare.
IMATRIX_CHARS = 44_000
SEARCH_ABSTRACTS = 12
HERE = Path(__file__).resolve().parent


def abstract(item: dict) -> str:
    return " ".join(" ".join([*item["CONTEXTS"], item["LONG_ANSWER"]]).split())


def select(pqal: dict, test: dict) -> tuple[list[str], list[str]]:
    """(imatrix PMIDs, search PMIDs) by the rule above."""
    pool = sorted((p for p in pqal if p not in test), key=int)
    random.Random(SEED).shuffle(pool)
    imatrix, chars = [], 0
    while chars < IMATRIX_CHARS:
        imatrix.append(pool[len(imatrix)])
        chars += len(abstract(pqal[imatrix[-1]]))
    return imatrix, pool[len(imatrix):len(imatrix) + SEARCH_ABSTRACTS]


def texts(pqal: dict, pmids: list[str]) -> str:
    return "\n\n".join(abstract(pqal[p]) for p in pmids) + "\n"


def main(folder: Path) -> None:
    pqal = json.loads((folder / "ori_pqal.json").read_text(encoding="utf-8"))
    test = json.loads((folder / "test_ground_truth.json").read_text(encoding="utf-8"))
    imatrix, search = select(pqal, test)
    (HERE / "medical.txt").write_text(texts(pqal, imatrix), encoding="utf-8")
    (HERE / "medical-search.txt").write_text(texts(pqal, search), encoding="utf-8")
    (HERE / "sources.json").write_text(json.dumps({"medical.txt": imatrix, "medical-search.txt": search}, indent=1) + "\n",
                                       encoding="utf-8")
    print(f"medical.txt: {len(imatrix)} abstracts; medical-search.txt: {len(search)} abstracts")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
