"""A fast reader for the parts of a GGUF header the planner needs: scalar metadata and the tensor table.

``gguf.GGUFReader`` builds a numpy view for every element of every array — for a
tokenizer with 150k entries that takes seconds on a small CPU, before every
run. This reader walks the same layout with ``struct`` and keeps only scalars,
short numeric arrays and the length of long arrays; sizes and type names come
from the ``gguf`` package's own tables. Tests check it against ``GGUFReader``.

Layout (GGUF v2/v3, little-endian): magic ``GGUF``, u32 version, u64 tensor count,
u64 metadata count; each metadata entry is (string key, u32 type, value); each
tensor entry is (string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from edgemed.errors import InputError

# GGUF metadata value type -> struct format (scalars); 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
SHORT_ARRAY = 4096  # numeric arrays up to this length are kept (per-layer hyper-parameters)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str      # ggml type, e.g. "Q4_K"
    n_elements: int
    n_bytes: int
    dims: tuple[int, ...] = ()  # ggml order: dims[0] is the row length, dims[1] the number of rows


@dataclass(frozen=True)
class Header:
    version: int
    metadata: dict      # key -> scalar, str, list (short numeric arrays) or ArrayLength
    tensors: tuple[TensorInfo, ...]


@dataclass(frozen=True)
class ArrayLength:
    """A long or string array: only its length is kept."""

    length: int


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.take("Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return s

    def skip_string(self) -> None:
        self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype in _SCALARS:
                size = struct.calcsize("<" + _SCALARS[etype])
                if count <= SHORT_ARRAY:
                    values = list(struct.unpack_from(f"<{count}{_SCALARS[etype]}", self.buf, self.pos))
                    self.pos += size * count
                    return values
                self.pos += size * count
                return ArrayLength(count)
            for _ in range(count):
                if etype == _STRING:
                    self.skip_string()
                else:
                    self.value(etype)
            return ArrayLength(count)
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_header(path: Path | str) -> Header:
    """Metadata and tensor table of the GGUF at ``path`` (tensor data is not read)."""
    from edgemed.errors import require

    gguf = require("gguf", "gguf")
    path = Path(path)
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf)
            if bytes(buf[:4]) != b"GGUF":
                raise ValueError("bad magic")
            cur.pos = 4
            version, n_tensors, n_kv = cur.take("I"), cur.take("Q"), cur.take("Q")
            metadata = {}
            for _ in range(n_kv):
                key = cur.string()
                metadata[key] = cur.value(cur.take("I"))
            tensors = []
            for _ in range(n_tensors):
                name = cur.string()
                dims = [cur.take("Q") for _ in range(cur.take("I"))]
                qtype = gguf.GGMLQuantizationType(cur.take("I"))
                cur.take("Q")  # offset into the data section
                n = 1
                for d in dims:
                    n *= d
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                tensors.append(TensorInfo(name, qtype.name, n, n // block * type_size, tuple(dims)))
    except (ValueError, OSError, struct.error, IndexError) as exc:
        raise InputError(f"'{path}' is not a readable GGUF file ({exc}).",
                         "pass a .gguf produced by `edgemed convert`, or check that the copy is complete") from None
    return Header(version, metadata, tuple(tensors))
