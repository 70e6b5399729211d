"""The calibration texts edgemed ships (``data/calibration/``: PubMedQA abstracts outside its test split, MIT).

``medical`` feeds the importance matrix (``--imatrix-from medical``, and the 4-bit types by default:
``default_imatrix``); ``medical-search`` is what ``--quant auto`` measures KLD on (other abstracts, so the
search is not scored on the text that calibrated the quantizer).
``data/calibration/README.md`` gives the source, the exclusion rule and the licence.

``read`` is the one reader of calibration text, the user's and the shipped: a regular file only (a FIFO or a device is
refused before it is opened), at most as many bytes as the tokens used can need, UTF-8 text or a clear refusal.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
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
#: Bytes of text read per token the reader will use. BPE vocabularies average 4-5 bytes a token on English prose
#: (Qwen2.5 takes more than 8,192 tokens from the 44 KB of medical.txt); JSONL spends bytes on keys, quotes and the
#: fields it skips. 64 leaves a margin of over 10x: the importance matrix's 8,192 tokens come from at most 512 KiB,
#: and a longer file is read only that far (the log and the report say so).
MAX_BYTES_PER_TOKEN = 64
#: what the importance matrix takes from a calibration text: MAX_CHUNKS chunks of CHUNK_TOKENS tokens, one at a time
MAX_CHUNKS = 32
CHUNK_TOKENS = 256
#: the calibration text read: enough bytes for the tokens used, with a wide margin (``MAX_BYTES_PER_TOKEN``)
TEXT_BYTES = MAX_CHUNKS * CHUNK_TOKENS * MAX_BYTES_PER_TOKEN
#: the shipped texts are read whole (``passages``); each is tens of KB
SHIPPED_MAX_BYTES = 1 << 20
_FIX = "pass a UTF-8 JSONL file with one object per line, or a UTF-8 .txt file"
#: what a path that is not a regular file is, by the test that says so
_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def shipped(file_name: str) -> Path:
    """The installed path of ``data/calibration/<file_name>``."""
    return Path(str(resources.files("edgemed.converters").joinpath("data", "calibration", file_name)))


def resolve(value: str | Path) -> Path:
    """``--imatrix-from``'s value as a file: a shipped text's name (``medical``) or a path to the user's own text.

    A shipped name wins over a file of the same name in the working folder; pass ``./medical`` for that file."""
    if str(value) in IMATRIX_TEXTS:
        return shipped(IMATRIX_TEXTS[str(value)])
    path = Path(value)
    read(path, TEXT_BYTES)  # refused here, before any work: not a regular file, not UTF-8, empty, no text
    return path


def default_imatrix(out_type: str) -> Path | None:
    """The calibration text an ``out_type`` conversion uses when the user names none (``None``: plain)."""
    return shipped(IMATRIX_TEXTS[DEFAULT_IMATRIX]) if out_type in IMATRIX_BY_DEFAULT else None


def passages(path: Path) -> list[str]:
    """The paragraphs of a shipped text file (blank lines separate them), whitespace runs made one space."""
    text = read(path, SHIPPED_MAX_BYTES)
    if text.truncated:  # a packaging mistake, not the user's input
        raise RuntimeError(f"shipped text {path} is over {SHIPPED_MAX_BYTES} bytes")
    return [" ".join(p.split()) for p in text.texts]


@dataclass(frozen=True)
class CalibrationText:
    """Calibration text as read: its passages, and which bytes of the file they came from."""

    path: Path
    texts: list[str] = field(repr=False)  # JSONL objects' text fields, or the paragraphs of a .txt (blank-line separated)
    sha256: str  # of the bytes used: the whole file unless ``truncated``
    bytes_used: int
    file_bytes: int  # the file's size when it was read
    truncated: bool  # the file is longer than the bound: only its first ``bytes_used`` bytes were read

    def describe(self) -> str:
        """'', or a clause saying how much of a longer file was used."""
        if not self.truncated:
            return ""
        return f"only its first {self.bytes_used:,} of {self.file_bytes:,} bytes were read"


def read(path: Path | str, max_bytes: int) -> CalibrationText:
    """Calibration text from ``path``: every reader of the user's text comes here.

    Only a regular file is read (a FIFO would block, a device never end), opened non-blocking in case it was swapped
    for one since it was checked; at most ``max_bytes`` are read (cut back to the last whole line when the file is
    longer); the bytes must be UTF-8 text without NUL bytes and hold some text. JSONL (``.jsonl``/``.json``): the
    fields question/text/context/abstract and options of each object; otherwise paragraphs separated by blank lines."""
    path = Path(path)
    try:
        _regular(path, os.stat(path))  # before open: opening a FIFO blocks, and a device may act on being opened
    except FileNotFoundError:
        raise InputError(f"Calibration text '{path}' does not exist.", "pass a JSONL or .txt file of medical text, or "
                         f"a shipped text: {', '.join(IMATRIX_TEXTS)}") from None
    except OSError as exc:
        raise InputError(f"Calibration text '{path}' cannot be read ({exc.strerror or exc}).", _FIX) from None
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
        try:
            st = os.fstat(fd)
            _regular(path, st)  # what was opened, not what was checked
            data = _read_at_most(fd, max_bytes + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        raise InputError(f"Calibration text '{path}' cannot be read ({exc.strerror or exc}).", _FIX) from None
    truncated = len(data) > max_bytes
    data = data[:max_bytes]
    jsonl = path.suffix in (".jsonl", ".json")
    if truncated:  # the last line read may be cut short: keep whole lines
        whole = data.rfind(b"\n") + 1
        if whole:
            data = data[:whole]
        elif jsonl:
            raise InputError(f"{path}:1 is longer than the {max_bytes:,} bytes calibration reads.",
                             "put one object per line, each with a 'question' or 'text' field")
    if not data:
        raise InputError(f"Calibration text '{path}' is empty.", _FIX)
    if (nul := data.find(b"\0")) >= 0:
        raise InputError(f"Calibration text '{path}' holds a NUL byte (offset {nul}): it is a binary file, not text.", _FIX)
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        raw = decoder.decode(data, final=not truncated)
    except UnicodeDecodeError as exc:
        raise InputError(f"Calibration text '{path}' is not UTF-8 (bad byte at offset {exc.start}).",
                         f"{_FIX} (e.g. iconv -f latin1 -t utf-8)") from None
    data = data[:len(data) - len(decoder.getstate()[0])]  # a character cut at the bound is left out
    texts = _json_texts(path, raw) if jsonl else [p for p in raw.split("\n\n") if p.strip()]
    if not texts:
        where = f" (in its first {len(data):,} bytes)" if truncated else ""
        raise InputError(f"No calibration text found in '{path}'{where}.",
                         "JSONL lines need a 'question' or 'text' field" if jsonl else "give it some text")
    return CalibrationText(path, texts, hashlib.sha256(data).hexdigest(), len(data), max(st.st_size, len(data)), truncated)


def _regular(path: Path, st: os.stat_result) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    kind = next((what for test, what in _NOT_REGULAR if test(st.st_mode)), "not a regular file")
    raise InputError(f"Calibration text '{path}' is {kind}, not a regular file; calibration text is read only from a "
                     "regular file (a pipe or a device can block or never end).",
                     "save the text to a file first (e.g. `cat notes/*.txt > notes.txt`) and pass that file")


def _read_at_most(fd: int, limit: int) -> bytes:
    parts, left = [], limit
    while left > 0:
        block = os.read(fd, min(left, 1 << 20))
        if not block:
            break
        parts.append(block)
        left -= len(block)
    return b"".join(parts)


def _json_texts(path: Path, raw: str) -> list[str]:
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (ValueError, RecursionError):
            raise InputError(f"{path}:{n} is not valid JSON.",
                             "pass a JSONL file with one object per line, or a .txt file") from None
        if not isinstance(item, dict):
            raise InputError(f"{path}:{n} is a JSON {type(item).__name__}, not an object.",
                             'each line needs an object such as {"question": "..."}')
        parts = [str(item[k]) for k in ("question", "text", "context", "abstract") if item.get(k)]
        if isinstance(item.get("options"), dict):
            parts += [f"{k}. {v}" for k, v in item["options"].items()]
        if parts:
            texts.append("\n".join(parts))
    return texts
