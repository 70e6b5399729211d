"""The calibration texts edgemed ships (``data/calibration/``: PubMedQA abstracts outside its test split, MIT).

``medical`` feeds the importance matrix (``--imatrix-from medical``); ``medical-search`` is what ``--quant auto``
measures KLD on (other abstracts, so the search is not scored on the text that calibrated the quantizer).
``data/calibration/README.md`` gives the source, the exclusion rule and the licence.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from edgemed.errors import InputError

#: ``--imatrix-from`` name -> file under data/calibration/
IMATRIX_TEXTS = {"medical": "medical.txt"}
#: what ``--quant auto`` measures KLD on (never offered to ``--imatrix-from``: it must stay held out)
SEARCH_TEXT = "medical-search.txt"


def shipped(file_name: str) -> Path:
    """The installed path of ``data/calibration/<file_name>``."""
    return Path(str(resources.files("edgemed.converters").joinpath("data", "calibration", file_name)))


def resolve(value: str | Path) -> Path:
    """``--imatrix-from``'s value as a file: a shipped text's name (``medical``) or a path to the user's own text.

    A shipped name wins over a file of the same name in the working folder; pass ``./medical`` for that file."""
    if str(value) in IMATRIX_TEXTS:
        return shipped(IMATRIX_TEXTS[str(value)])
    path = Path(value)
    if not path.exists():
        raise InputError(f"Calibration text '{path}' does not exist.",
                         f"pass a JSONL or .txt file of medical text, or a shipped text: {', '.join(IMATRIX_TEXTS)}")
    return path


def passages(path: Path) -> list[str]:
    """The paragraphs of a shipped text file (blank lines separate them)."""
    return [" ".join(p.split()) for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
