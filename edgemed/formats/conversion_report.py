"""What a conversion report is and where it lives: the one type and the one rule both converters, ``edgemed pack``
and the benchmarks share.

- a GGUF file ``x.gguf`` has its report beside it: ``x.gguf.report.json``;
- an ONNX directory ``d/`` holds its own: ``d/report.json`` (the directory is the unit that ships).

``ConversionReport`` is one type for both routes: the shared fields, plus each format's own section
(``FORMATS``). Its JSON keeps the keys pack, inspect, bench and the tests read.

Light on purpose (stdlib only): packaging runs on devices without the converters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class ReportFormat:
    """How one format's report differs from the others'."""

    type_key: str  # the JSON key its output type is written under
    sections: tuple[str, ...]  # its own sections, written between ``lora`` and ``parity``


FORMATS: dict[str, ReportFormat] = {
    "gguf": ReportFormat("out_type", ("tokenizer",)),
    "onnx": ReportFormat("weight_type", ("quantization",)),
}


@dataclass
class ConversionReport:
    """The report of one conversion (both routes). ``to_json`` writes the keys of ``FORMATS[fmt]``."""

    fmt: str  # "gguf" or "onnx" (not written: the report's place and type key say it)
    output: str
    out_type: str
    size_bytes: int
    architecture: str
    source: dict
    lora: dict | None
    parity: dict | None  # gguf: one parity report; onnx: {"fp32": ..., "int4": ...} per gated graph; None: --no-parity
    timings_s: dict = field(default_factory=dict)
    converter: dict = field(default_factory=dict)
    tokenizer: dict | None = None  # gguf: vocabulary and the llama.cpp-vs-HF id check
    quantization: dict | None = None  # onnx: the int4 recipe (None for fp32)
    auto_quant: dict | None = None  # gguf --quant auto: the search (every candidate measured) and the chosen types
    imatrix: dict | None = None  # gguf --imatrix-from: the calibration text (name, sha256) and how much of it was used
    sha256: str | None = None  # gguf: the output file's sha256 (the report lands first; pack checks the pair by it)
    files: dict | None = None  # onnx: every file of the directory but the report, path -> {"size_bytes", "sha256"} (pack checks them)

    @property
    def weight_type(self) -> str:
        """The ONNX route's name for ``out_type``."""
        return self.out_type

    def to_dict(self) -> dict:
        spec = FORMATS[self.fmt]
        out = {"output": self.output, spec.type_key: self.out_type, "size_bytes": self.size_bytes}
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        if self.files is not None:
            out["files"] = self.files
        out |= {"architecture": self.architecture, "source": self.source, "lora": self.lora}
        out |= {name: getattr(self, name) for name in spec.sections}
        if self.auto_quant is not None:  # only --quant auto reports have it: other reports keep their keys
            out["auto_quant"] = self.auto_quant
        if self.imatrix is not None:  # likewise: only a calibrated quantization names its text
            out["imatrix"] = self.imatrix
        return out | {"parity": self.parity, "timings_s": self.timings_s, "converter": self.converter}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

