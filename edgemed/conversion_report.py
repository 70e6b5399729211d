"""Where a conversion report lives: the one rule the converters, ``edgemed pack`` and the benchmarks share.

- a GGUF file ``x.gguf`` has its report beside it: ``x.gguf.report.json``;
- an ONNX directory ``d/`` holds its own: ``d/report.json`` (the directory is the unit that ships).

Light on purpose (no imports beyond pathlib): packaging runs on devices without the converters.
"""

from __future__ import annotations

from pathlib import Path

IN_DIRECTORY = "report.json"  # inside an ONNX output directory
SIDECAR_SUFFIX = ".report.json"  # appended to a GGUF file's name


def report_path(artifact: Path, fmt: str | None = None) -> Path:
    """The report of ``artifact``: ``fmt`` "onnx" (a directory) or "gguf" (a file); ``None`` asks the file system.

    Converters pass ``fmt`` (their output does not exist yet); readers may leave it out.
    """
    artifact = Path(artifact)
    if fmt is None:
        fmt = "onnx" if artifact.is_dir() else "gguf"
    if fmt == "onnx":
        return artifact / IN_DIRECTORY
    if fmt == "gguf":
        return artifact.with_name(artifact.name + SIDECAR_SUFFIX)
    raise ValueError(f"unknown artifact format {fmt!r}")


def existing_report(artifact: Path) -> Path | None:
    """The report of an existing ``artifact`` when there is one."""
    path = report_path(artifact)
    return path if path.is_file() else None
