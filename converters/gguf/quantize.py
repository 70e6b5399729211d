"""Quantize a float GGUF with llama.cpp's own quantizer (through llama-cpp-python).

llama.cpp's recipe is kept as it is: for the K-quant mixes it chooses per-tensor
types itself (e.g. Q4_K_M keeps ``output.weight`` at Q6_K and gives some
attention-V / FFN-down tensors Q6_K). An optional importance matrix, computed on
medical text by ``imatrix.py``, is handed to the quantizer through the C API's
``llama_model_imatrix_data`` array.

Per-tensor types (``tensor_types``, what ``--quant auto`` chooses) go through the C API's
``tt_overrides``: in llama.cpp 0.3.36's ``llama.h`` a plain C array of ``llama_model_tensor_override``
(``const char * pattern; enum ggml_type type``) ended by a NULL pattern, which ``llama-quantize
--tensor-type`` fills the same way; llama-cpp-python declares both structs, so no C++ object crosses
the boundary. Each tensor gets an anchored exact-name pattern and ``pure`` is set, so llama.cpp's mix
rules never replace an asked type. llama.cpp may still demote a type whose block does not divide a
row; the file's tensor table is read back and a type that is not the asked one is refused.

llama.cpp looks each tensor's importance-matrix entry up by name and, finding none, quantizes that tensor without
one, saying so only at INFO level. So the matrix is checked both ways: an entry that names no tensor is refused
before any work, an asked type llama.cpp cannot write without an entry (the very-low-bit IQ types) is refused
before llama.cpp starts, and a tensor quantized with a type the matrix improves but no entry for it is a warning,
given once, with how many and which.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
from pathlib import Path

from edgemed.constants import GGUF_TYPES
from edgemed.converters.gguf.quiet import quiet
from edgemed.errors import EdgemedError, InputError, OutputError, require
from edgemed.runtime.params import Params

log = logging.getLogger(__name__)

# Rows llama.cpp keeps in memory at once while quantizing (its default is 8 GiB).
MAX_BUF_BYTES = 256 * 2**20
#: ggml types whose quantizer ignores an importance matrix (llama.cpp's Q8_0 rounds each block on its own)
IGNORES_IMATRIX = frozenset({"Q8_0", "F16", "BF16", "F32"})
#: the embedding, whose rows are looked up, not multiplied, when the model has its own head: llama.cpp's
#: llama-imatrix collects no entry for it and llama.cpp quantizes it plainly (a tied model's head is it, and has one)
EMBEDDING = "token_embd.weight"
HEAD = "output.weight"
#: ggml types llama.cpp will not write for a tensor the importance matrix has no entry for ("Missing importance
#: matrix for tensor ... in a very low-bit quantization": llama-quant.cpp's tensor_requires_imatrix), and the file
#: type under which Q2_K joins them; llama.cpp lets the embedding and the head through without one ...
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})
Q2_K_S = "LLAMA_FTYPE_MOSTLY_Q2_K_S"
NEEDS_IMATRIX_EXEMPT = (EMBEDDING, HEAD)
#: ... where ggml's quantizers for these types assert that they have one and abort the process (llama-cpp-python
#: 0.3.36: exit 134 for output.weight as IQ1_S, IQ2_XXS or IQ2_XS; IQ1_M, IQ2_S and IQ3_XXS fall back to x² weights)
ABORTS_WITHOUT_IMATRIX = frozenset({"IQ1_S", "IQ2_XXS", "IQ2_XS"})
_SHOWN = 5  # tensor names an error or warning lists before "and N more"
_warned: set[tuple] = set()  # (float GGUF, its mtime, the matrix's names): one warning per conversion, not per call


def reads_imatrix(type_name: str) -> bool:
    """Whether llama.cpp's quantizer for ggml type ``type_name`` weighs its error by an importance matrix."""
    return type_name not in IGNORES_IMATRIX


def needs_imatrix(name: str, type_name: str, ftype: str | None = None) -> bool:
    """Whether tensor ``name`` cannot be quantized to ``type_name`` without an importance-matrix entry: llama.cpp
    refuses it (``ftype``: the llama_ftype constant's name, for Q2_K in a Q2_K_S file), or ggml aborts."""
    if type_name in ABORTS_WITHOUT_IMATRIX:
        return True
    if name in NEEDS_IMATRIX_EXEMPT:
        return False
    return type_name in NEEDS_IMATRIX or (type_name == "Q2_K" and ftype == Q2_K_S)


def _listed(names: list[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def quantize(src: Path, dst: Path, qtype: str, *, threads: int | None = None, imatrix: dict[str, "object"] | None = None,
             tensor_types: dict[str, str] | None = None, ftype: str | None = None) -> None:
    """Write ``dst`` as ``qtype`` from float GGUF ``src``. ``imatrix``: gguf tensor name -> float32 array.

    ``tensor_types``: gguf tensor name -> ggml type name ("Q6_K"), written exactly (read back and checked);
    ``ftype`` then names the llama_ftype constant written as ``general.file_type`` (default: ``qtype``'s).
    """
    llama_cpp = require("llama_cpp", "gguf")
    ftype = ftype or GGUF_TYPES[qtype].llama_ftype
    if tensor_types:
        check_imatrix_needed(src, imatrix or {}, tensor_types, ftype)
    params = Params(llama_cpp.llama_model_quantize_default_params())  # every field named and read back
    params.nthread = threads or os.cpu_count() or 1
    params.ftype = getattr(llama_cpp, ftype)
    params.max_buf_size = MAX_BUF_BYTES
    keep_alive = []
    if tensor_types:
        overrides = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()  # zeroed last: NULL pattern
        for i, (name, type_name) in enumerate(sorted(tensor_types.items())):
            overrides[i].pattern = f"^{re.escape(name)}$".encode()  # std::regex (ECMAScript) reads re.escape's output
            overrides[i].type = _ggml_type(type_name)
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        params.pure = True
        keep_alive.append(overrides)
    if imatrix:
        import numpy as np

        check_imatrix_names(src, imatrix)
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # zeroed last entry ends the list
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep_alive.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep_alive.append(entries)
    errors: list[str] = []
    with quiet(), _log_errors(llama_cpp, errors):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params.raw))
    if rc != 0:
        raise _failure(src, dst, qtype, rc, errors)
    if tensor_types:
        check_types(dst, tensor_types)
    if imatrix:
        warn_uncovered(src, dst, imatrix)


def check_imatrix_names(src: Path, imatrix: dict) -> None:
    """Refuse an importance matrix with an entry that names no tensor of float GGUF ``src``.

    llama.cpp looks each tensor's entry up by name and quantizes a tensor it finds none for without one, saying so
    only at INFO level; an entry under another name is never read. The matrix is keyed by the converter's own
    names, so a stray key is the converter's bug (a tied head keyed ``output.weight`` was one), refused here
    rather than shipped as a silently uncalibrated tensor."""
    from edgemed.formats.gguf_header import read_header

    stray = sorted(set(imatrix) - {t.name for t in read_header(src).tensors})
    if stray:
        shown = ", ".join(stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
        raise EdgemedError(
            f"The importance matrix for '{src.name}' has {len(stray)} of {len(imatrix)} entries under names no tensor "
            f"of that file has ({shown}); llama.cpp would quantize without them and not say so. This is a converter bug.",
            "report it with the checkpoint's config.json; meanwhile convert with --no-imatrix",
        )


#: what to do about a matrix that misses tensors: ``edgemed convert`` makes it from the model it converts
_MAKE_IT_HERE = ("make the matrix from this model: `edgemed convert SOURCE --quant TYPE --imatrix-from TEXT` computes it "
                 "on SOURCE itself (a matrix made for another model, or cut short, covers only part of this one); from "
                 "`edgemed convert` itself this is a converter bug: report it with the checkpoint's config.json")


def check_imatrix_needed(src: Path, imatrix: dict, tensor_types: dict[str, str], ftype: str | None = None) -> None:
    """Refuse, before llama.cpp starts, asked types (``tensor_types``) that cannot be written without an
    importance-matrix entry the matrix does not have (``needs_imatrix``): llama.cpp refuses at that tensor, after
    writing the ones before it, and ggml aborts the whole process for some (the exempt names as IQ2_XS)."""
    lacking = sorted(n for n, t in tensor_types.items() if needs_imatrix(n, t, ftype) and n not in imatrix)
    if lacking:
        types = sorted({tensor_types[n] for n in lacking})
        raise InputError(
            f"{len(lacking)} tensor(s) of '{src.name}' are asked as {', '.join(types)}, which llama.cpp cannot write "
            f"without an importance-matrix entry for each, and the matrix {'has none for them' if imatrix else 'is missing'}"
            f" ({_listed(lacking)}); llama.cpp would stop there (or, for {' and '.join(NEEDS_IMATRIX_EXEMPT)} as "
            f"{', '.join(sorted(ABORTS_WITHOUT_IMATRIX))}, abort the process).",
            f"{_MAKE_IT_HERE}; or give these tensors a type that needs none (Q4_K, Q6_K, Q8_0)",
        )


def uncovered(dst: Path, imatrix: dict) -> tuple[list[str], int]:
    """The tensors llama.cpp wrote into ``dst`` with a type it weighs by an importance matrix (``reads_imatrix``)
    but found no entry for in ``imatrix`` (it quantized them without one, saying so only at INFO level: "did not find
    weights for ..."), and how many it wrote with such types. The embedding of a model with its own head is left out:
    its rows are looked up, no matrix has an entry for it, and llama.cpp quantizes it plainly."""
    from edgemed.formats.gguf_header import read_header

    tensors = read_header(dst).tensors
    untied = any(t.name == HEAD for t in tensors)
    weighed = [t.name for t in tensors if reads_imatrix(t.type_name) and not (untied and t.name == EMBEDDING)]
    return sorted(n for n in weighed if n not in imatrix), len(weighed)


def warn_uncovered(src: Path, dst: Path, imatrix: dict) -> None:
    """Warn, once for a float GGUF and matrix (``--quant auto`` quantizes one many times), that llama.cpp quantized
    part of ``dst`` without the importance matrix: how many tensors, and which first."""
    missing, weighed = uncovered(dst, imatrix)
    stat = src.stat()
    key = (str(src.resolve()), stat.st_ino, stat.st_mtime_ns, frozenset(imatrix))
    if not missing or key in _warned:
        return
    _warned.add(key)
    log.warning(
        "The importance matrix has no entry for %d of the %d tensors llama.cpp quantized from '%s' with types it "
        "weighs by one (%s): those were quantized without it, as if calibration were off for them. Fix: %s.",
        len(missing), weighed, src.name, _listed(missing), _MAKE_IT_HERE)


def _ggml_type(type_name: str) -> int:
    import gguf

    try:
        return int(gguf.GGMLQuantizationType[type_name])
    except KeyError:
        raise ValueError(f"unknown ggml type {type_name!r}") from None


def check_types(path: Path, asked: dict[str, str]) -> None:
    """Refuse ``path`` unless every tensor in ``asked`` was written with the asked type (its tensor table read back)."""
    from edgemed.formats.gguf_header import read_header

    written = {t.name: t.type_name for t in read_header(path).tensors}
    wrong = {n: (t, written.get(n, "missing")) for n, t in asked.items() if written.get(n) != t}
    if wrong:
        shown = ", ".join(f"{n}: asked {a}, wrote {w}" for n, (a, w) in sorted(wrong.items())[:5])
        raise EdgemedError(
            f"llama.cpp did not write the asked tensor types into '{path.name}' ({len(wrong)} of {len(asked)} differ: {shown}).",
            "report it with the checkpoint's config.json; meanwhile convert with a fixed --quant type",
        )


# ggml_log_level values (ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5)
_WARN, _ERROR, _CONT = 3, 4, 5


@contextlib.contextmanager
def _log_errors(llama_cpp, sink: list[str]):
    """Collect llama.cpp's warning and error lines for the block, still passing everything to the current logger."""
    previous, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(user_data))
    state = {"keep": False}

    @llama_cpp.llama_log_callback
    def collect(level, text, data):
        state["keep"] = level in (_WARN, _ERROR) or (level == _CONT and state["keep"])
        if state["keep"] and text:
            sink.append(text.decode("utf-8", "replace"))
        if previous:
            previous(level, text, data)

    llama_cpp.llama_log_set(collect, user_data)
    try:
        yield
    finally:
        llama_cpp.llama_log_set(previous, user_data)


def _failure(src: Path, dst: Path, qtype: str, rc: int, log_lines: list[str]) -> EdgemedError:
    """Say what went wrong: llama.cpp's own error line, and the disk only when the disk is the cause."""
    said = " ".join("".join(log_lines).split())
    said = said[-400:] if said else f"return code {rc}, no error logged"
    free = _free_bytes(dst.parent)
    no_space = "No space left" in said or (free is not None and free < src.stat().st_size // 2)
    if no_space:
        return OutputError(
            f"llama.cpp could not write the {qtype.upper()} file into '{dst.parent}': the disk is full "
            f"({(free or 0) / 1e6:.1f} MB free; the output needs up to {src.stat().st_size / 2e6:.1f} MB). llama.cpp said: {said}",
            "free space on that disk or write the output elsewhere (-o), then run the command again",
        )
    if re.search(r"\b(nan|inf)\b|invalid data|validation failed", said, re.IGNORECASE):
        return EdgemedError(
            f"llama.cpp refused to quantize '{src.name}' to {qtype.upper()}: a tensor holds invalid values (NaN or "
            f"infinity). llama.cpp said: {said}",
            "re-copy the checkpoint from its source; if it is intact the weights are unusable (a diverged training run)",
        )
    return EdgemedError(
        f"llama.cpp failed to quantize '{src.name}' to {qtype.upper()}. llama.cpp said: {said}",
        "rerun with -vv for llama.cpp's full log and report it with the checkpoint's config.json",
    )


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None

