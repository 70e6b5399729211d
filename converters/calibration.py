"""The calibration texts edgemed ships (``data/calibration/``: PubMedQA abstracts outside its test split, MIT).

``medical`` feeds the importance matrix (``--imatrix-from medical``, and the 4-bit types by default:
``default_imatrix``); ``medical-search`` is what ``--quant auto`` measures KLD on (other abstracts, so the
search is not scored on the text that calibrated the quantizer).
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
#: the text ``edgemed convert`` calibrates with when neither ``--imatrix-from`` nor ``--no-imatrix`` is given
DEFAULT_IMATRIX = "medical"
#: the output types calibrated by default. Measured on Qwen2.5-1.5B (benchmarks/results/imatrix-default-qwen2.5-1.5b):
#: Q4_K_M with the shipped text, same size, KLD -13 % on held-out text and paired accuracy +1.44 points on 1,600
#: items (McNemar p = 0.013); Q4_0 KLD -25 %. Q8_0's quantizer reads no importance matrix; Q5_K_M is left plain
#: until it is measured. ``auto`` computes it only if a candidate has a type that reads it.
IMATRIX_BY_DEFAULT = ("q4_0", "q4_k_m", "auto")


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


def default_imatrix(out_type: str) -> Path | None:
    """The calibration text an ``out_type`` conversion uses when the user names none (``None``: plain)."""
    return shipped(IMATRIX_TEXTS[DEFAULT_IMATRIX]) if out_type in IMATRIX_BY_DEFAULT else None


def passages(path: Path) -> list[str]:
    """The paragraphs of a shipped text file (blank lines separate them)."""
    return [" ".join(p.split()) for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
