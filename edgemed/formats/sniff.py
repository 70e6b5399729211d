"""The one format sniffer: a model's on-disk form, told from the bytes, not the name.

- ``gguf``: a regular file that starts with GGUF's magic;
- ``onnx``: a directory holding ``*.onnx`` files (an ``edgemed convert --to onnx`` output).

Light (no runtime import): packaging, the runtime, the CLI and the benchmarks all ask here.
"""

from __future__ import annotations

from pathlib import Path

from edgemed.errors import InputError

GGUF_MAGIC = b"GGUF"
FORMATS = ("gguf", "onnx")


def _magic(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(4)


def sniff(path: Path) -> str | None:
    """``"gguf"``, ``"onnx"``, or None when ``path`` is neither (or does not exist)."""
    path = Path(path)
    if path.is_file():
        return "gguf" if _magic(path) == GGUF_MAGIC else None
    if path.is_dir() and any(path.glob("*.onnx")):
        return "onnx"
    return None


def model_format(path: Path) -> str:
    """``sniff``, or the one-paragraph refusal that says what ``path`` is instead."""
    path = Path(path)
    fmt = sniff(path)
    if fmt is not None:
        return fmt
    if path.is_file():
        raise InputError(
            f"'{path}' is not a GGUF file (it starts with {_magic(path)!r}, not b'GGUF').",
            "pass a .gguf produced by `edgemed convert`, or check that the copy is complete",
        )
    raise InputError(
        f"Model '{path}' does not exist or is not a model file.",
        "pass the path to a .gguf file (run `edgemed convert` to make one)",
    )
