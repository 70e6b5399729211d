"""Read a safetensors header without trusting it.

Layout: 8 bytes little-endian header length N, N bytes of UTF-8 JSON (an object
of ``name -> {dtype, shape, data_offsets}`` plus an optional ``__metadata__``
object of strings), then the tensor data. Every length, type and offset is
checked before anything is sized from it: any byte string gives either the
tensor table or a ``CheckpointError`` naming what is wrong.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from edgemed.errors import CheckpointError

# The safetensors library's own cap on a header; real headers are a few hundred KiB.
MAX_HEADER_BYTES = 100_000_000
MAX_DIMS = 8
# safetensors dtype -> bytes per element (sub-byte F4/F6 are not here: refused as unsupported)
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class _Corrupt(ValueError):
    pass


def _reject_constant(name: str):
    raise _Corrupt(f"{name} is not a JSON number")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_safetensors_header(file: Path) -> dict[str, tuple[str, list[int]]]:
    """Parse and validate a safetensors header against the file size; reads only the header."""
    from edgemed.formats.input_file import NotRegular, open_regular

    try:
        with open_regular(file) as fh:
            size = os.fstat(fh.fileno()).st_size
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise _Corrupt("the file is shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw_len)
            _check_header_len(header_len, size)
            raw = fh.read(header_len)
    except NotRegular as exc:
        raise CheckpointError(f"Weights file '{file}' cannot be read: {exc.strerror} (a pipe would block the command, a "
                              "device never end).", "copy the weight file itself into the checkpoint folder") from None
    except OSError as exc:
        raise CheckpointError(f"Weights file '{file}' cannot be read ({exc.strerror or exc}).", "check the file and its permissions") from None
    except _Corrupt as exc:
        raise _corrupt(file, exc) from None
    return _parse_header(raw, header_len, size, file)


def parse_safetensors_header(blob: bytes, name: str = "<bytes>") -> dict[str, tuple[str, list[int]]]:
    """The same validation over a whole file held in memory (for tests and fuzzing)."""
    try:
        if len(blob) < 8:
            raise _Corrupt("the file is shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", blob[:8])
        _check_header_len(header_len, len(blob))
    except _Corrupt as exc:
        raise _corrupt(Path(name), exc) from None
    return _parse_header(blob[8:8 + header_len], header_len, len(blob), Path(name))


def _corrupt(file: Path, why) -> CheckpointError:
    return CheckpointError(f"Weights file '{file}' is corrupt: {why}.", "re-copy the file from the source checkpoint")


def _check_header_len(header_len: int, size: int) -> None:
    if header_len < 2 or header_len > MAX_HEADER_BYTES:
        raise _Corrupt(f"its header length {header_len} is outside 2..{MAX_HEADER_BYTES} bytes")
    if header_len > size - 8:
        raise _Corrupt(f"header length {header_len} exceeds the file size {size}")


def _parse_header(raw: bytes, header_len: int, size: int, file: Path) -> dict[str, tuple[str, list[int]]]:
    """Validate every entry's dtype, shape and offsets before anything is allocated from them."""
    try:
        if len(raw) != header_len:
            raise _Corrupt(f"the header is cut short ({len(raw)} of {header_len} bytes)")
        try:
            header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError:
            raise _Corrupt("its header is not UTF-8") from None
        except RecursionError:
            raise _Corrupt("its header is nested too deeply") from None
        except _Corrupt:
            raise
        except ValueError as exc:  # JSONDecodeError, integers beyond Python's digit limit
            raise _Corrupt(f"its header is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise _Corrupt(f"its header is a JSON {type(header).__name__}, not an object")
        meta = header.get("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise _Corrupt("its __metadata__ is not an object of strings")
        out: dict[str, tuple[str, list[int]]] = {}
        spans: list[tuple[int, int, str]] = []
        for name, info in header.items():
            if name != "__metadata__":
                dtype, shape, begin, end = _entry(name, info)
                out[name] = (dtype, shape)
                spans.append((begin, end, name))
    except _Corrupt as exc:
        raise _corrupt(file, exc) from None
    data_size = size - 8 - header_len
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise _corrupt(file, f"tensor '{name}' starts at byte {begin} of the data, expected {position} (overlap or gap)")
        position = end
    if position > data_size:
        raise CheckpointError(
            f"Weights file '{file}' is truncated: its header needs {8 + header_len + position} bytes, the file has {size}.",
            "re-copy the file; the copy did not complete",
        )
    return out


def _entry(name: str, info) -> tuple[str, list[int], int, int]:
    if not isinstance(info, dict):
        raise _Corrupt(f"the entry for '{name}' is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise _Corrupt(f"tensor '{name}' has an unknown dtype {json.dumps(dtype)[:40]}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and 0 <= d < 2**63 for d in shape):
        raise _Corrupt(f"tensor '{name}' has a malformed shape {json.dumps(shape)[:60]}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] < 2**63):
        raise _Corrupt(f"tensor '{name}' has malformed data_offsets {json.dumps(offsets)[:60]}")
    n = 1
    for d in shape:
        n *= d
    if n * DTYPE_SIZES[dtype] != offsets[1] - offsets[0]:
        raise _Corrupt(f"tensor '{name}' ({dtype} {shape}) needs {n * DTYPE_SIZES[dtype]} bytes but its offsets span "
                       f"{offsets[1] - offsets[0]}")
    return dtype, list(shape), offsets[0], offsets[1]

