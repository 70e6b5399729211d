"""The artifacts a reproduction measures, made from one HF checkpoint, reused when already there.

Layout (fixed, so artifacts can be made ahead of time with ``edgemed convert``)::

    <out>/artifacts/<quant>.gguf            edgemed convert SRC --quant <quant> -o <out>/artifacts/<quant>.gguf
    <out>/artifacts/onnx-<quant>/           edgemed convert SRC --to onnx --quant <quant> -o <out>/artifacts/onnx-<quant>

An existing artifact is reused only when its conversion report (``<quant>.gguf.report.json``,
``onnx-<quant>/report.json``) names the same source checkpoint (sha256 of config + weights);
one made from another source is refused, never silently measured. A missing one is converted
in a child process (the converter's own progress, memory and atomic output).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from edgemed.benchmarks.harness.configs import Config
from edgemed.conversion_report import report_path
from edgemed.errors import InputError

log = logging.getLogger(__name__)


def source_digest(src: Path) -> str:
    """The digest ``edgemed convert`` records for a checkpoint (config + weight files)."""
    from edgemed.converters.checkpoint import Checkpoint

    return Checkpoint.open(src).digest()


def gguf_path(out: Path, quant: str) -> Path:
    return out / "artifacts" / f"{quant}.gguf"


def onnx_path(out: Path, quant: str) -> Path:
    return out / "artifacts" / f"onnx-{quant}"


def _report(artifact: Path) -> Path:
    return report_path(artifact, "gguf" if artifact.suffix == ".gguf" else "onnx")


def _check_reuse(artifact: Path, digest: str) -> bool:
    """True when ``artifact`` exists and was made from the checkpoint with ``digest``."""
    if not artifact.exists():
        return False
    report = _report(artifact)
    try:
        named = json.loads(report.read_text(encoding="utf-8"))["source"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"'{artifact}' exists but its conversion report '{report.name}' is missing or unreadable, so "
                         "its source cannot be checked.",
                         f"delete '{artifact}' to have it converted again, or re-run `edgemed convert` to make it") from None
    if named != digest:
        raise InputError(f"'{artifact}' was converted from another checkpoint (source sha256 {named[:12]}..., "
                         f"this one is {digest[:12]}...).", f"delete '{artifact}' or use another -o folder")
    return True


def _convert(src: Path, artifact: Path, args: list[str], echo) -> None:
    echo(f"converting {src.name} -> {artifact.relative_to(artifact.parent.parent)} ...")
    cmd = [sys.executable, "-m", "edgemed", "convert", str(src), *args, "-o", str(artifact)]
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        raise InputError(f"Converting {src} to {artifact.name} failed (exit {proc.returncode}); the message is above.",
                         f"fix the cause, or make the artifact yourself: {' '.join(cmd[2:])}")


def prepare(src: Path, out: Path, quants: list[str], onnx: list[str], baselines: dict[str, str], echo=print) -> list[Config]:
    """Configurations for a reproduction: GGUF quants, ONNX types, HF baselines (converting what is missing)."""
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    digest = source_digest(src)
    configs = []
    for quant in quants:
        path = gguf_path(out, quant)
        if not _check_reuse(path, digest):
            _convert(src, path, ["--quant", quant], echo)
        configs.append(Config(quant, "gguf", str(path)))
    for quant in onnx:
        path = onnx_path(out, quant)
        if not _check_reuse(path, digest):
            _convert(src, path, ["--to", "onnx", "--quant", quant], echo)
        configs.append(Config(f"onnx-{quant}", "onnx", str(path)))
    for name, dtype in baselines.items():
        configs.append(Config(name, "hf", str(src), dtype))
    return configs
