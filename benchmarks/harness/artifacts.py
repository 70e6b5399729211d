"""The artifacts a reproduction measures, made from one HF checkpoint, reused when already there.

Layout (fixed, so artifacts can be made ahead of time with ``edgemed convert``)::

    <out>/artifacts/<quant>.gguf            edgemed convert SRC --quant <quant> -o <out>/artifacts/<quant>.gguf
    <out>/artifacts/<quant>-imatrix.gguf    edgemed convert SRC --quant <quant> --imatrix-from TEXT -o ...
    <out>/artifacts/onnx-<quant>/           edgemed convert SRC --to onnx --quant <quant> -o <out>/artifacts/onnx-<quant>

An existing artifact is reused only when it is what its configuration measures (``_mismatch``): a GGUF's own
header names the configuration's type (``general.file_type``), no merged LoRA and the same checkpoint, and the file is
the one its conversion report (``<quant>.gguf.report.json``, ``onnx-<quant>/report.json``) describes (its sha256);
the report names the same source checkpoint (sha256 of config + weights), type and no LoRA and, for a GGUF, the same
calibration: a ``-imatrix`` artifact's report must name the text's sha256, a plain one must have no importance matrix.

The folder is shared: artifacts made ahead of time with ``edgemed convert`` (or put there another way) are the
user's, and one that is not of its configuration is refused, naming it and the fix, never replaced or deleted. Only
an artifact the bench converted itself, still as it made it (``MADE``: name -> digest), is converted again when it no
longer matches (another checkpoint at the same path, another calibration text). A missing one is converted in a
child process (the converter's own progress, memory and atomic output).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from edgemed.benchmarks.harness.configs import Config
from edgemed.formats.conversion_report import report_path
from edgemed.errors import InputError

log = logging.getLogger(__name__)


def model_digest(path: Path) -> str:
    """sha256 of a model file, or one digest over a directory's files (names + contents); cached by stat."""
    import hashlib

    from edgemed.packaging.digest import VerifiedCache, file_digest

    cache = VerifiedCache()
    try:
        if path.is_file():
            return file_digest(path, cache, full=False)[0]
        h = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            h.update(str(file.relative_to(path)).encode() + b"\0" + file_digest(file, cache, full=False)[0].encode() + b"\n")
        return h.hexdigest()
    finally:
        cache.save()


def source_digest(src: Path, allow_pickle: bool = False) -> str:
    """The digest ``edgemed convert`` records for a checkpoint (config + weight files); pickle-only weights are
    refused without the user's ``--allow-pickle``, with the paragraph ``convert`` gives."""
    from edgemed.converters.source.checkpoint import Checkpoint

    return Checkpoint.open(src, allow_pickle=allow_pickle).digest()


def trained_context(src: Path, quants: list[str], onnx: list[str], allow_pickle: bool = False) -> tuple[str, int] | None:
    """The configuration ``runner.fit_context`` will name and the context it will find in the artifacts ``prepare``
    makes of ``src``, before any is made: config.json's max_position_embeddings, which the converters write as the
    GGUF's and the ONNX export's context_length (the first GGUF type, else the first ONNX one, as the configurations
    are ordered). None without such artifacts or where config.json names none (the conversion then says so)."""
    from edgemed.converters.source.checkpoint import Checkpoint

    names = [*quants, *(f"onnx-{q}" for q in onnx)]
    if not names:
        return None
    trained = Checkpoint.open(src, allow_pickle=allow_pickle).hparam("max_position_embeddings", required=False)
    return (names[0], int(trained)) if trained else None


#: a ``--quants`` entry ``<quant>-imatrix``: that type quantized with an importance matrix (``--imatrix-from``)
IMATRIX_SUFFIX = "-imatrix"
#: a ``--quants`` entry ``<quant>-mmap``: ``<quant>``'s own file, loaded with the file mapped whatever the profile says
#: (on a CPU that repacks 4-bit weights: the repacked copy beside the file's pages, the baseline of a read-in load)
MMAP_SUFFIX = "-mmap"


def parse_quants(text: str | None) -> list[str]:
    """``--quants``: GGUF types, each quantized one optionally with ``-imatrix`` (``q4_k_m,q4_k_m-imatrix``), and any
    GGUF type with ``-mmap`` (the same file, loaded mapped: ``q4_k_m,q4_k_m-mmap``)."""
    from edgemed.benchmarks.harness.configs import parse_list
    from edgemed.constants import GGUF_OUTPUT_TYPES, QUANT_OUTPUT_TYPES

    allowed = {**{q: q for q in GGUF_OUTPUT_TYPES}, **{q + IMATRIX_SUFFIX: q for q in QUANT_OUTPUT_TYPES},
               **{q + MMAP_SUFFIX: q for q in GGUF_OUTPUT_TYPES}}
    return parse_list(text, allowed, "GGUF type")


def gguf_path(out: Path, quant: str) -> Path:
    return out / "artifacts" / f"{quant}.gguf"


def onnx_path(out: Path, quant: str) -> Path:
    return out / "artifacts" / f"onnx-{quant}"


def _report(artifact: Path) -> Path:
    return report_path(artifact, "gguf" if artifact.suffix == ".gguf" else "onnx")


#: In ``<out>/artifacts/``: the artifacts the bench converted itself, name -> ``model_digest`` of what it made. Only
#: those, unchanged, are the bench's to convert again; every other file there is the user's.
MADE = "made-by-bench.json"


def _made(folder: Path) -> dict:
    try:
        made = json.loads((folder / MADE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return made if isinstance(made, dict) else {}


def _record_made(artifact: Path) -> None:
    from edgemed.files.atomic import write_text

    made = {**_made(artifact.parent), artifact.name: model_digest(artifact)}
    try:
        write_text(artifact.parent / MADE, json.dumps(made, indent=1, sort_keys=True) + "\n")
    except OSError as exc:  # the artifact is whole: only a later run cannot tell it is the bench's (it refuses, never replaces)
        log.warning("could not note that the bench converted '%s' (%s): a later run treats it as yours", artifact, exc)


def _header_mismatch(artifact: Path, digest: str, quant: str) -> str | None:
    """Why the GGUF file itself is not ``quant`` converted from the checkpoint ``digest`` alone (its header), or None."""
    from edgemed.constants import file_type_name
    from edgemed.errors import EdgemedError
    from edgemed.formats.gguf_header import LORA_SHA_KEY, SOURCE_SHA_KEY, read_header

    try:
        meta = read_header(artifact).metadata
    except EdgemedError as exc:
        return f"cannot be read as a GGUF model ({exc.problem})"
    if meta.get("general.type") == "adapter":
        return "is a LoRA adapter, not a model"
    number = meta.get("general.file_type")
    if not isinstance(number, int):
        return f"states no file type (general.file_type), so it cannot be told to be the {quant} this configuration measures"
    if file_type_name(number) != quant:
        return f"is a {file_type_name(number)} GGUF (its general.file_type), not the {quant} this configuration measures"
    if meta.get(LORA_SHA_KEY):
        return f"has a LoRA adapter merged into it ({LORA_SHA_KEY} {str(meta[LORA_SHA_KEY])[:12]}...), not the checkpoint alone"
    named = meta.get(SOURCE_SHA_KEY)
    if isinstance(named, str) and named != digest:
        return f"was converted from another checkpoint ({SOURCE_SHA_KEY} {named[:12]}..., this one is {digest[:12]}...)"
    return None


def _mismatch(artifact: Path, digest: str, quant: str, imatrix: str | None) -> str | None:
    """Why the existing ``artifact`` is not the configuration's (a clause after its name), or None: ``quant`` made from
    the checkpoint with ``digest`` (GGUF: with the importance matrix of the calibration text whose sha256 is
    ``imatrix``, or with none when that is None), and the very file its conversion report describes."""
    report = _report(artifact)
    gguf = artifact.suffix == ".gguf"
    try:
        made = json.loads(report.read_text(encoding="utf-8"))
        named = made["source"]["sha256"]
        calibrated = (made.get("imatrix") or {}).get("sha256") if gguf else None
        out_type, lora = made["out_type" if gguf else "weight_type"], made.get("lora")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"exists but its conversion report '{report.name}' is missing or unreadable, so its source cannot be checked"
    wrong = _header_mismatch(artifact, digest, quant) if gguf else None
    if wrong:
        return wrong
    if gguf and isinstance(made.get("sha256"), str) and made["sha256"] != model_digest(artifact):
        return (f"is not the file its conversion report '{report.name}' describes (sha256 {made['sha256'][:12]}...): it "
                "was replaced or changed after the conversion")
    if named != digest:
        return f"was converted from another checkpoint (source sha256 {str(named)[:12]}..., this one is {digest[:12]}...)"
    if out_type != quant:
        return f"was converted to {out_type} (its conversion report), not the {quant} this configuration measures"
    if lora:
        return "has a LoRA adapter merged into it (its conversion report names one), not the checkpoint alone"
    if calibrated != imatrix:
        made_with = f"an importance matrix from text sha256 {str(calibrated)[:12]}..." if calibrated else "no importance matrix"
        wanted = f"one from --imatrix-from's text (sha256 {imatrix[:12]}...)" if imatrix else "none"
        return f"was quantized with {made_with}; this configuration needs {wanted}"
    return None


def _check_reuse(artifact: Path, digest: str, quant: str, imatrix: str | None = None, echo=print) -> bool:
    """True when ``artifact`` exists and is the configuration's (``_mismatch``); False when it is to be converted:
    missing, or one the bench converted itself (``MADE``) that no longer matches. Any other existing artifact that
    does not match is refused, naming it and why, and left as it is."""
    if not artifact.exists():
        return False
    why = _mismatch(artifact, digest, quant, imatrix)
    if why is None:
        return True
    if _made(artifact.parent).get(artifact.name) == model_digest(artifact):
        echo(f"'{artifact.name}' {why}; the bench converted it, so it is converted again")
        return False
    if why.startswith("exists but"):
        fix = f"delete '{artifact}' to have it converted again, or re-run `edgemed convert` to make it"
    else:
        fix = (f"move '{artifact}' and its conversion report out of '{artifact.parent}' (the bench then converts the "
               "artifact itself), or use another -o folder")
    raise InputError(f"'{artifact}' {why}.", fix)


def _convert(src: Path, artifact: Path, args: list[str], echo) -> None:
    echo(f"converting {src.name} -> {artifact.relative_to(artifact.parent.parent)} ...")
    cmd = [sys.executable, "-m", "edgemed", "convert", str(src), *args, "-o", str(artifact)]
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        raise InputError(f"Converting {src} to {artifact.name} failed (exit {proc.returncode}); the message is above.",
                         f"fix the cause, or make the artifact yourself: {' '.join(cmd[2:])}")
    _record_made(artifact)


def _again(artifact: Path) -> list[str]:
    """``--force`` where the bench converts one of its own artifacts again (``_check_reuse``): replaced atomically."""
    return ["--force"] if artifact.exists() else []


def _text_sha(text: Path) -> str:
    """The sha256 the conversion report gives the calibration text: of the bytes the importance matrix reads."""
    from edgemed.converters.gguf.calibration import read
    from edgemed.converters.gguf.imatrix import TEXT_BYTES

    return read(text, TEXT_BYTES).sha256


def prepare(src: Path, out: Path, quants: list[str], onnx: list[str], baselines: dict[str, str], echo=print,
            imatrix_from: Path | None = None, allow_pickle: bool = False) -> list[Config]:
    """Configurations for a reproduction: GGUF quants (``<quant>-imatrix`` calibrated on ``imatrix_from``), ONNX
    types, HF baselines (converting what is missing). ``allow_pickle``: the user's consent to read pickle-only
    weights, checked before anything is written and handed to every conversion and baseline."""
    calibrated = [q for q in quants if q.endswith(IMATRIX_SUFFIX)]
    if calibrated and imatrix_from is None:
        raise InputError(f"{', '.join(calibrated)} need the calibration text the importance matrix is made from.",
                         "pass --imatrix-from medical (the shipped abstracts) or a file of your own")
    if imatrix_from is not None and not calibrated:
        raise InputError("--imatrix-from is used only by the -imatrix types in --quants, and none is listed.",
                         "add one, e.g. --quants f16,q4_k_m,q4_k_m-imatrix, or leave --imatrix-from out")
    digest = source_digest(src, allow_pickle)  # the source (and the consent it needs) before anything is written
    text_sha = _text_sha(imatrix_from) if calibrated else None
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    consent = ["--allow-pickle"] if allow_pickle else []
    configs, todo = [], {}  # todo: path -> convert's arguments; every artifact is checked before the first conversion
    for quant in quants:
        mapped = quant.endswith(MMAP_SUFFIX)
        made = quant.removesuffix(MMAP_SUFFIX)  # a -mmap entry measures the file of the type it names
        path = gguf_path(out, made)
        base = made.removesuffix(IMATRIX_SUFFIX)
        sha = text_sha if base != made else None
        if path not in todo and not _check_reuse(path, digest, base, sha, echo):
            calibration = ["--imatrix-from", str(imatrix_from)] if sha else ["--no-imatrix"]  # never convert's default
            todo[path] = ["--quant", base, *calibration, *consent, *_again(path)]
        configs.append(Config(quant, "gguf", str(path), use_mmap=True if mapped else None))
    for quant in onnx:
        path = onnx_path(out, quant)
        if not _check_reuse(path, digest, quant, echo=echo):
            todo[path] = ["--to", "onnx", "--quant", quant, *consent, *_again(path)]
        configs.append(Config(f"onnx-{quant}", "onnx", str(path)))
    for path, args in todo.items():
        _convert(src, path, args, echo)
    for name, dtype in baselines.items():
        configs.append(Config(name, "hf", str(src), dtype, allow_pickle))
    return configs
