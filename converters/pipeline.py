"""``convert``: Hugging Face checkpoint (+ LoRA) -> GGUF, checked, written atomically.

Steps, each refusing bad input before anything is written:
1. open the source once (``Source``: the checkpoint with the user's pickle consent, its architecture module
   picked, the adapter opened and planned against it); every later step reads that ``Source``;
2. stream tensors into a float GGUF (the output itself for F32/F16/BF16, an
   intermediate for quantized types), then quantize with llama.cpp;
3. prove llama.cpp tokenizes medical text exactly like the HF tokenizer;
4. parity against the source: float types must pass their NMSE gate, quantized
   types a minimum top-1 agreement; every type must give finite logits;
5. write ``<out>.report.json`` (provenance, parity, the output's sha256), then rename the output into place.
A failure or Ctrl-C at any step leaves neither the output nor temporaries.

``adapter_only`` (``convert --lora A --adapter-only``) writes the adapter alone as a GGUF LoRA adapter for this
base (``gguf/adapter.py``) and gates it the same way: the base GGUF (``base_gguf``, which must have been converted
from this checkpoint; else an F16 base made here in scratch) with the adapter applied by llama.cpp at run time,
against the HF reference with the adapter merged (the base's type picks the gate: NMSE for float, top-1 for
quantized). The report names the base's checkpoint sha256 (also in the file) and the base the gate ran on.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from dataclasses import dataclass
from pathlib import Path

from edgemed import __version__, env
from edgemed.files.atomic import atomic_path, check_destination, scratch_dir, write_text
from edgemed.formats.conversion_report import ConversionReport, report_path as _report_path
from edgemed.converters import arch_spec, provenance, require_route
from edgemed.converters.budget import peaks as budget
from edgemed.converters.source.checkpoint import Checkpoint
from edgemed.converters.source.source import Source
from edgemed.converters.route import RouteOptions, Timings, torch_threads
from edgemed.constants import FLOAT_OUTPUT_TYPES, GGUF_OUTPUT_TYPES
from edgemed.converters.gguf.writer import plan_tensors, write_float_gguf
from edgemed.errors import DISK_REFUSED, InputError, OutputError
from edgemed.files.hashing import file_sha256

log = logging.getLogger(__name__)

OUTPUT_TYPES = GGUF_OUTPUT_TYPES
# report key -> distribution, in the report's ``converter`` section
TOOLS = {"llama_cpp_python": "llama-cpp-python", "gguf": "gguf"}

__all__ = ["ConvertOptions", "ConversionReport", "OUTPUT_TYPES", "convert", "report_path"]


@dataclass(kw_only=True)
class ConvertOptions(RouteOptions):
    """``--to gguf``: the shared options (lora, force, parity, threads) and the GGUF route's own."""

    out_type: str = "q4_k_m"
    pre_tokenizer: str | None = None
    imatrix_from: Path | None = None
    progress: bool = False
    max_kld: float | None = None  # out_type "auto": the KLD budget (auto_quant.py)
    fit_profile: str | None = None  # out_type "auto": the device profile the output must fit
    adapter_only: bool = False  # write the --lora adapter alone, as a GGUF LoRA adapter (out_type: its tensors, f16/f32)
    base_gguf: Path | None = None  # adapter_only: the base GGUF the parity gate applies the adapter to


def report_path(out: Path) -> Path:
    """``<out>.report.json`` (the rule lives in ``edgemed.formats.conversion_report``)."""
    return _report_path(out, "gguf")


def convert(source: Path, out: Path, opts: ConvertOptions, echo=print) -> ConversionReport:
    require_route("gguf")
    try:
        with torch_threads(opts.threads):
            return _convert(source, out, opts, echo)
    except OSError as exc:
        raise _output_error(exc, out, opts.out_type) from None


# errno values that mean "the output cannot be written here", whatever file the converter was on: the CLI's own
# (errors.DISK_REFUSED), worded here for a conversion (its -o, its F16 intermediate)
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NOT_WRITABLE = set(DISK_REFUSED) - _NO_SPACE


def _output_error(exc: OSError, out: Path, out_type: str) -> Exception:
    """A write failure as a one-paragraph error; anything that is not about the output stays what it is."""
    where = out.parent.resolve()
    about_output = exc.filename is None or Path(str(exc.filename)).resolve().parent == where
    if exc.errno in _NO_SPACE:
        return OutputError(
            f"No space left on the disk holding '{where}' while writing the {out_type.upper()} output; "
            "the partial output and temporaries were removed.",
            "free space there, or write elsewhere with -o (a quantized conversion also needs room for an F16/BF16 "
            "intermediate about the size of the source weights, F32 where a weight is beyond F16's range)",
        )
    if exc.errno in _NOT_WRITABLE and about_output:
        return OutputError(
            f"Cannot write the output into '{where}': {exc.strerror}.",
            "choose a folder you can write to with -o (check its permissions, or whether the disk is mounted read-only)",
        )
    return exc


def _check_destinations(out: Path, force: bool) -> None:
    """Refuse, before any work, an output or its ``<out>.report.json`` that is there (without ``force``) or is a
    directory: the report lands beside the output and replaces a file of that name as the output does."""
    check_destination(out, force)
    check_destination(report_path(out), force)


def _convert(source: Path, out: Path, opts: ConvertOptions, echo=print) -> ConversionReport:
    from edgemed.converters.gguf.auto_quant import AUTO, check_request

    if opts.adapter_only or opts.base_gguf is not None:
        return _convert_adapter(source, out, opts, echo)
    if opts.out_type not in OUTPUT_TYPES + (AUTO,):
        raise InputError(f"Unknown output type '{opts.out_type}'.", f"choose one of: {', '.join(OUTPUT_TYPES + (AUTO,))}")
    check_request(opts.out_type, opts.max_kld, opts.fit_profile)
    env.enforce_offline()
    _check_destinations(out, opts.force)
    timings = Timings()

    ckpt = Checkpoint.open(source, allow_pickle=opts.allow_pickle)
    spec = arch_spec(ckpt.architecture)
    plan_tensors(ckpt, spec, "f32")  # names and shapes against config.json, before any work
    src = Source.with_adapter(ckpt, opts.lora, allow_pickle=opts.allow_pickle)  # the one opening of the adapter
    adapter = src.adapter
    src.warn_base(echo)
    from edgemed.converters.gguf.runtime_fields import verify_runtime_fields
    from edgemed.converters.gguf.tokenizer import plan_vocab, verify_tokenization

    if opts.imatrix_from is not None:  # fail on a bad calibration file before writing anything
        from edgemed.converters.gguf.imatrix import read_calibration_text

        read_calibration_text(opts.imatrix_from)
    vocab = plan_vocab(ckpt.path, int(ckpt.hparam("vocab_size")), opts.pre_tokenizer)
    budget.check_gguf(src, opts)  # a conversion that cannot fit in memory is refused here, before any work
    source_info, lora_info = provenance.source_info(ckpt), provenance.lora_info(adapter)
    metadata = {
        "edgemed.converter_version": __version__,
        "edgemed.source.sha256": source_info["sha256"],
        "edgemed.source.architecture": ckpt.architecture,
    }
    if lora_info:
        metadata["edgemed.lora.sha256"] = lora_info["sha256"]
    timings.since_start("inspect")

    parity = auto = imatrix = None
    with _report_lands_with(out) as wrote_report, atomic_path(out, force=opts.force) as tmp, scratch_dir(out.parent, out.name) as work:
        quantized = opts.out_type not in FLOAT_OUTPUT_TYPES
        with timings.step("write"):
            if quantized:
                float_out, float_type = _write_intermediate(
                    Path(work), "intermediate", "bf16" if ckpt.source_dtype() == "BF16" else "f16", echo,
                    lambda path, t: write_float_gguf(ckpt, spec, vocab, path, t, adapter=adapter, metadata=metadata,
                                                     progress=opts.progress))
            else:
                float_out, float_type = tmp, opts.out_type
                write_float_gguf(ckpt, spec, vocab, tmp, float_type, adapter=adapter, metadata=metadata, progress=opts.progress)
        if quantized:
            from edgemed.converters.gguf.quantize import quantize

            made: list = []  # the Imatrix, once computed

            def weights() -> dict:
                """What the quantizer reads: the importance matrix, computed on first use (``auto`` may need none)."""
                if not made:
                    from edgemed.converters.gguf.imatrix import compute_imatrix

                    with timings.step("imatrix"):
                        made.append(compute_imatrix(src, spec, opts.imatrix_from, echo=echo))
                return made[0].values

            calibrated = weights if opts.imatrix_from is not None else None
            if opts.out_type == AUTO:
                from edgemed.converters.gguf.auto_quant import run as auto_quantize

                with timings.step("auto_quant"):
                    auto = auto_quantize(float_out, tmp, max_kld=opts.max_kld, fit_profile=opts.fit_profile, work=Path(work),
                                         threads=opts.threads, imatrix=calibrated, echo=echo)
                timings.seconds["auto_quant"] -= timings.seconds.get("imatrix", 0.0)  # each second in one step
            else:
                values = calibrated() if calibrated else None  # before the quantize step, so its time is its own
                with timings.step("quantize"):
                    quantize(float_out, tmp, opts.out_type, threads=opts.threads, imatrix=values)
            imatrix = made[0] if made else None
        with timings.step("tokenizer_check"):
            n_tok = verify_tokenization(ckpt.path, tmp)
            fields = verify_runtime_fields(ckpt, tmp)  # what parity cannot see: template, special tokens, rope, context
        tok_info = {"model": vocab.model, "pre": vocab.pre, "n_vocab": len(vocab.tokens), "verified_tokens": n_tok,
                    "chat_template": bool(vocab.special.chat_template), "runtime_fields": fields}
        if opts.parity:
            from edgemed.converters.quality.parity import check_gguf, gated, source_logits

            with timings.step("parity"):
                reference = source_logits(src)
                intermediate = _gate_intermediate(src, float_out, float_type, opts, reference, echo) if quantized else None
                report = check_gguf(src, tmp, opts.out_type, threads=opts.threads, reference=reference)
            parity = gated(report, f"The {opts.out_type.upper()} GGUF", echo,
                           f16_fix=_WIDER_THAN_F16 if opts.out_type == "f16" else None)
            if intermediate is not None:
                parity["intermediate"] = intermediate
        size = tmp.stat().st_size
        digest = file_sha256(tmp)  # the report names its output's bytes: `edgemed pack` checks the pair by it
        timings.since_start("total")
        result = ConversionReport(
            fmt="gguf", output=str(out), out_type=opts.out_type, size_bytes=size, sha256=digest, architecture=spec.arch_name,
            source=source_info, lora=lora_info, tokenizer=tok_info, parity=parity, timings_s=timings.report(),
            converter=provenance.converter_info(TOOLS), auto_quant=auto,
            imatrix=imatrix.provenance() if imatrix is not None else None,
        )
        # The report lands before the output, so a finished output is never without its report. A kill between
        # the two leaves the new report beside the old output (or beside none): `edgemed pack` refuses that pair
        # (the report's sha256 is not the output's), and the next convert --force replaces both.
        write_text(report_path(out), result.to_json(), force=opts.force)
        wrote_report.append(True)
    return result


def _write_intermediate(work: Path, stem: str, float_type: str, echo, write) -> tuple[Path, str]:
    """A float GGUF made in ``work`` for llama.cpp to read (``write(path, type)`` writes it): the quantizer's
    intermediate, or the base an adapter is gated on. ``float_type`` first (F16, or BF16 for a BF16 source); where a
    weight, or its LoRA merge, lies beyond F16's range it is written again as F32, which holds the source's values as
    they are (BF16 would hold the range but round every weight to 8 significant bits before the quantizer rounds
    again). llama.cpp reads F32, F16 and BF16 tensors alike; the budget prices the F32 write (``budget/peaks.py``)."""
    from edgemed.converters.gguf.writer import BeyondRange

    path = work / f"{stem}-{float_type}.gguf"
    try:
        write(path, float_type)
        return path, float_type
    except BeyondRange as exc:
        if float_type != "f16":
            raise
        path.unlink(missing_ok=True)
        echo(f"'{exc.tensor}' holds values beyond F16's range (|x| > 65504): writing the {stem} as F32 instead")
    path = work / f"{stem}-f32.gguf"
    write(path, "f32")
    return path, "f32"


#: The fix for an F16 GGUF (an output, or the intermediate a quantized type is made from) whose logits overflow.
_WIDER_THAN_F16 = "convert to f32 or bf16 (--quant f32 / --quant bf16)"

#: A report edgemed writes is a few KiB; a larger file at that name is not one to hold in memory and put back.
_MAX_OLD_REPORT = 4 << 20


@contextlib.contextmanager
def _report_lands_with(out: Path):
    """Yield a list the conversion appends to once it wrote ``out``'s report; when the output then does not land
    (an error or Ctrl-C at its rename), the report is put back as it was: the one of the output still in place
    (``--force``), or none."""
    path = report_path(out)
    try:
        old = path.read_bytes() if path.is_file() and path.stat().st_size <= _MAX_OLD_REPORT else None
    except OSError:
        old = None
    wrote: list = []
    try:
        yield wrote
    except BaseException:
        if wrote and old is not None:
            with atomic_path(path, force=True) as tmp:
                tmp.write_bytes(old)
        elif wrote:
            path.unlink(missing_ok=True)
        raise


#: ``--adapter-only``: the types an adapter's tensors may have (``gguf/adapter.TENSOR_TYPES``; q8_0 keeps F16 where
#: a tensor's rows are not a multiple of 32).
ADAPTER_TYPES = ("f16", "q8_0", "f32")


def _convert_adapter(source: Path, out: Path, opts: ConvertOptions, echo=print) -> ConversionReport:
    """The ``adapter_only`` steps (module docstring): refuse, write the adapter, gate it on a base, report."""
    from edgemed.converters.gguf.adapter import plan_adapter, tensor_type_counts, write_adapter_gguf

    if not opts.adapter_only:
        raise InputError("--base names the base GGUF an adapter is checked on; it goes with --adapter-only.",
                         "add --adapter-only (and --lora ADAPTER), or leave --base out")
    if opts.lora is None:
        raise InputError("--adapter-only writes a LoRA adapter, and no adapter was given.", "pass the PEFT adapter with --lora DIR")
    if opts.out_type not in ADAPTER_TYPES:
        raise InputError(f"--adapter-only writes the adapter's tensors as F16, Q8_0 or F32, not {opts.out_type.upper()}; the "
                         "base keeps its own type.", "leave --quant out (F16), or pass --quant q8_0 (smaller) or f32; to gate "
                         "the adapter on a quantized base, pass that base with --base BASE.gguf")
    env.enforce_offline()
    _check_destinations(out, opts.force)
    timings = Timings()
    ckpt = Checkpoint.open(source, allow_pickle=opts.allow_pickle)
    spec = arch_spec(ckpt.architecture)
    plan_tensors(ckpt, spec, "f32")
    src = Source.with_adapter(ckpt, opts.lora, allow_pickle=opts.allow_pickle)
    src.warn_base(echo)
    planned = plan_adapter(ckpt, spec, src.adapter)  # what the file cannot carry is refused here
    source_info, lora_info = provenance.source_info(ckpt), provenance.lora_info(src.adapter)
    base = _adapter_base(opts.base_gguf, spec, source_info["sha256"], opts.lora, lora_info["sha256"]) \
        if opts.base_gguf is not None else None
    vocab = None
    if base is None and opts.parity:
        from edgemed.converters.gguf.tokenizer import plan_vocab

        vocab = plan_vocab(ckpt.path, int(ckpt.hparam("vocab_size")), opts.pre_tokenizer)
    budget.check_adapter(src, opts, base["out_type"] if base is not None else None)  # the gate, on either base, must fit
    timings.since_start("inspect")
    parity = None
    with _report_lands_with(out) as wrote_report, atomic_path(out, force=opts.force) as tmp, \
            scratch_dir(out.parent, out.name) as work:
        with timings.step("write"):
            write_adapter_gguf(ckpt, spec, src.adapter, tmp, base_source_sha256=source_info["sha256"], tensor_type=opts.out_type)
        if opts.parity:
            from edgemed.converters.quality.parity import check_adapter_gguf, gated

            if base is None:
                with timings.step("base"):
                    made, made_type = _write_intermediate(
                        Path(work), "base", "f16", echo,
                        lambda path, t: write_float_gguf(ckpt, spec, vocab, path, t,
                                                         metadata={"edgemed.source.sha256": source_info["sha256"]}))
                base = {"path": made, "out_type": made_type,
                        "made": f"{made_type.upper()}, converted from the source for this check (not kept)"}
            with timings.step("parity"):
                report = check_adapter_gguf(src, base["path"], tmp, base["out_type"], threads=opts.threads)
            what = f"The adapter on the {base['out_type'].upper()} base"
            shown = {k: str(v) for k, v in base.items() if not (k == "path" and "made" in base)}  # scratch is gone
            parity = gated(report, what, echo, f16_fix=_adapter_f16_fix(tensor_type_counts(tmp), base)) | {"base": shown}
        size, digest = tmp.stat().st_size, file_sha256(tmp)
        timings.since_start("total")
        lora_info = (lora_info or {}) | {
            "form": "gguf-adapter", "tensor_type": opts.out_type, "tensor_types": tensor_type_counts(tmp), "pairs": len(planned),
            "base_source_sha256": source_info["sha256"]}
        lora_info.pop("merged_tensors", None)
        result = ConversionReport(
            fmt="gguf", output=str(out), out_type=opts.out_type, size_bytes=size, sha256=digest, architecture=spec.arch_name,
            source=source_info, lora=lora_info, tokenizer=None, parity=parity, timings_s=timings.report(),
            converter=provenance.converter_info(TOOLS))
        write_text(report_path(out), result.to_json(), force=opts.force)
        wrote_report.append(True)
    return result


def _adapter_f16_fix(tensor_types: dict[str, int], base: dict) -> str | None:
    """What keeps F32 the F16 tensors an adapter's gate computed with (its own: f16, or q8_0's F16 lora_b; the
    base's), for non-finite logits there (``parity.gate_error``); None when none was F16."""
    parts = (["write the adapter's tensors as F32 (--quant f32)"] if "F16" in tensor_types else []) + \
        (["gate it on an F32 base (--base, a GGUF of this checkpoint converted with --quant f32)"]
         if base["out_type"] == "f16" else [])
    return " and ".join(parts) or None


def _adapter_base(path: Path, spec, source_sha256: str, lora: Path, lora_sha256: str) -> dict:
    """``--base``: a GGUF model of this architecture converted from this very checkpoint without a LoRA merged into
    it (``lora``: the adapter being made, ``lora_sha256`` its digest), else refused now."""
    from edgemed.constants import file_type_name
    from edgemed.errors import AdapterError
    from edgemed.formats.gguf_header import SOURCE_SHA_KEY, read_header
    from edgemed.runtime.loader import refuse_merged_base

    meta = read_header(path).metadata
    if meta.get("general.type") == "adapter":
        raise InputError(f"--base '{path}' is a LoRA adapter, not a base model.", "pass the base model GGUF with --base")
    if meta.get("general.architecture") != spec.arch_name:
        raise AdapterError(f"--base '{path}' is a {meta.get('general.architecture')!r} model; the adapter is for "
                           f"{spec.arch_name!r}.", "pass a GGUF converted from the adapter's base checkpoint")
    recorded = meta.get(SOURCE_SHA_KEY)
    if recorded != source_sha256:
        said = f"was converted from the checkpoint {recorded[:12]}..." if isinstance(recorded, str) else \
            f"does not record which checkpoint it was converted from ({SOURCE_SHA_KEY})"
        raise AdapterError(f"--base '{path}' {said}, not from this one ({source_sha256[:12]}...), so the adapter "
                           "cannot be checked on it.", "convert the base from this checkpoint with `edgemed convert` and "
                           "pass that file, or leave --base out (an F16 base is made for the check)")
    refuse_merged_base(meta, str(path), lora.name, lora_sha256,
                       fix="pass a GGUF converted from this checkpoint without --lora as --base, or leave --base out (an F16 "
                           "base is made for the check)")
    number = meta.get("general.file_type", -1)
    return {"path": Path(path), "out_type": file_type_name(number if isinstance(number, int) else -1),
            "sha256": file_sha256(path)}


def _gate_intermediate(src, float_out: Path, float_type: str, opts, reference, echo) -> dict:
    """The float GGUF the quantizer reads, held to its float NMSE gate before the quantized file's looser top-1 gate
    is trusted: a conversion error (a wrong rope base, a tensor laid out wrong) costs a 4-bit file little top-1
    agreement, and would pass there. Its load is mapped; under a memory budget it cannot fit it is left out, and the
    report says so (``edgemed check SOURCE INTERMEDIATE`` on a bigger machine is the same gate)."""
    from edgemed.converters.budget.memory_room import detect_budget
    from edgemed.converters.quality.parity import check_gguf, gated

    size = float_out.stat().st_size
    budget = detect_budget(opts.memory_budget)
    if size > budget.bytes:
        why = (f"the {float_type.upper()} intermediate ({size / 2**30:.1f} GiB) is larger than the memory budget "
               f"({budget.bytes / 2**30:.1f} GiB, {budget.source})")
        echo(f"parity of the {float_type.upper()} intermediate left out: {why}")
        return {"skipped": why}
    report = check_gguf(src, float_out, float_type, threads=opts.threads, reference=reference)
    gated(report, f"The {float_type.upper()} intermediate the quantizer read", echo,
          f16_fix=f"{_WIDER_THAN_F16}, as a quantized type is checked on the F16 file it is made from first"
          if float_type == "f16" else None)
    return {"out_type": float_type, "nmse": report.nmse, "gate_nmse": report.gate_nmse, "passed": report.passed,
            "top1": report.top1, "kld": report.kld}
