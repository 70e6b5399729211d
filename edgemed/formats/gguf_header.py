"""A fast reader for the parts of a GGUF header the planner needs: scalar metadata and the tensor table.

``gguf.GGUFReader`` builds a numpy view for every element of every array — for a
tokenizer with 150k entries that takes seconds on a small CPU, before every
run. This reader walks the same layout with ``struct`` and keeps only scalars,
short numeric arrays and the length of long arrays; sizes and type names come
from the ``gguf`` package's own tables. Tests check it against ``GGUFReader``.

Layout (GGUF v2/v3, little-endian): magic ``GGUF``, u32 version, u64 tensor count,
u64 metadata count; each metadata entry is (string key, u32 type, value); each
tensor entry is (string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset).
The tensor data follows, from the header's end rounded up to ``general.alignment``.

The file is untrusted: every count and length is checked against the bytes left
in the file (and the caps below) before anything is read or allocated, so a
corrupt length is a clear ``InputError``, never an ``OverflowError`` or a
gigabyte allocation; a file cut inside its tensor data is an ``IntegrityError``.
The rules follow llama.cpp's own loader: no nested arrays, at most 4 dimensions,
rows a whole number of blocks, no duplicate keys or tensor names.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from edgemed.errors import InputError, IntegrityError

# GGUF metadata value type -> struct format (scalars); 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
SHORT_ARRAY = 4096       # numeric arrays up to this length are kept (per-layer hyper-parameters)
VERSIONS = (2, 3)        # v1 used 32-bit counts; llama.cpp no longer reads it
MAX_KEY_BYTES = 65535    # the GGUF spec's limit on a key
MAX_NAME_BYTES = 1024    # tensor names (llama.cpp allows 63)
MAX_STRING_BYTES = 64 << 20  # a metadata string kept in memory (chat templates are kilobytes)
MAX_DIMS = 4             # GGML_MAX_DIMS
MAX_ENTRIES = 1 << 20    # metadata keys or tensors in one file (real models: hundreds to a few thousand)
MAX_STRINGS = 1 << 24    # strings in one array, each skipped in turn (vocabularies: 32k-256k, merges up to ~1M)
_MIN_KV_BYTES = 8 + 4 + 1          # empty key, type, one-byte value
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims, type, offset
_INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str      # ggml type, e.g. "Q4_K"
    n_elements: int
    n_bytes: int
    dims: tuple[int, ...] = ()  # ggml order: dims[0] is the row length, dims[1] the number of rows
    offset: int = 0     # where its data starts, from ``Header.data_start``


@dataclass(frozen=True)
class Header:
    version: int
    metadata: dict      # key -> scalar, str, list (short numeric arrays) or ArrayLength
    tensors: tuple[TensorInfo, ...]
    table_start: int = 0  # file position of the tensor table (the metadata ends here)
    data_start: int = 0   # file position of the tensor data
    #: key -> (start, end) file positions of its GGUF-encoded type and value, for the keys ``read_header(spans=)`` names
    spans: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ArrayLength:
    """A long or string array: only its length is kept."""

    length: int


class _Corrupt(Exception):
    """A structural problem; ``read_header`` turns it into an ``InputError`` naming the file."""


class _Cursor:
    """Reads forward through ``buf``, refusing any read that would pass its end."""

    def __init__(self, buf):
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.pos:
            raise _Corrupt(f"{what} needs {n} bytes at offset {self.pos}, but only {self.size - self.pos} remain")

    def take(self, fmt: str, what: str = "a value"):
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value[0] if len(value) == 1 else value

    def length(self, what: str, cap: int) -> int:
        n = self.take("Q", f"the length of {what}")
        if n > cap:
            raise _Corrupt(f"{what} declares {n} bytes (at most {cap} allowed)")
        self.need(n, what)
        return n

    def string(self, what: str, cap: int = MAX_STRING_BYTES) -> str:
        n = self.length(what, cap)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return s

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def count(self, what: str, min_bytes: int, cap: int) -> int:
        """A u64 count of items of at least ``min_bytes`` each: bounded by ``cap`` and by the bytes left."""
        n = self.take("Q", f"the count of {what}")
        room = (self.size - self.pos) // min_bytes
        if n > min(cap, room):
            raise _Corrupt(f"it declares {n} {what}; at most {min(cap, room)} fit in the {self.size - self.pos} bytes left")
        return n

    def value(self, vtype: int, key: str):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype], f"the value of '{key}'")
        if vtype == _STRING:
            return self.string(f"the string value of '{key}'")
        if vtype != _ARRAY:
            raise _Corrupt(f"key '{key}' has unknown value type {vtype}")
        etype = self.take("I", f"the element type of '{key}'")
        if etype in _SCALARS:
            size = struct.calcsize("<" + _SCALARS[etype])
            count = self.count(f"elements in '{key}'", size, 1 << 62)
            if count <= SHORT_ARRAY:
                values = list(struct.unpack_from(f"<{count}{_SCALARS[etype]}", self.buf, self.pos))
                self.pos += size * count
                return values
            self.skip(size * count, f"the array '{key}'")
            return ArrayLength(count)
        if etype == _STRING:
            count = self.count(f"strings in '{key}'", 8, MAX_STRINGS)
            for _ in range(count):
                self.skip(self.length(f"a string in '{key}'", self.size), f"a string in '{key}'")
            return ArrayLength(count)
        kind = "nested arrays" if etype == _ARRAY else f"unknown element type {etype}"
        raise _Corrupt(f"key '{key}' holds {kind}")


def _tensor(cur: _Cursor, gguf, index: int) -> tuple[str, str, int, int, int, tuple[int, ...]]:
    """(name, type name, elements, bytes, offset, dims) of the next tensor-table entry."""
    name = cur.string(f"the name of tensor {index}", MAX_NAME_BYTES)
    n_dims = cur.take("I", f"the dimension count of '{name}'")
    if n_dims > MAX_DIMS:
        raise _Corrupt(f"tensor '{name}' has {n_dims} dimensions (at most {MAX_DIMS})")
    dims = [cur.take("Q", f"a dimension of '{name}'") for _ in range(n_dims)]
    n = 1
    for d in dims:
        n *= d
        if n > _INT64_MAX:
            raise _Corrupt(f"tensor '{name}' has dimensions {dims}: too many elements")
    raw_type = cur.take("I", f"the type of '{name}'")
    try:
        qtype = gguf.GGMLQuantizationType(raw_type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise _Corrupt(f"tensor '{name}' has unknown ggml type {raw_type}") from None
    if dims and dims[0] % block:
        raise _Corrupt(f"tensor '{name}' rows of {dims[0]} are not a whole number of {qtype.name} blocks ({block})")
    offset = cur.take("Q", f"the offset of '{name}'")
    return name, qtype.name, n, n // block * type_size, offset, tuple(dims)


def _parse(buf, gguf, spans: str | None = None) -> Header:
    cur = _Cursor(buf)
    if cur.size < 4 or bytes(buf[:4]) != b"GGUF":
        raise _Corrupt("it does not start with the GGUF magic")
    cur.pos = 4
    version = cur.take("I", "the version")
    if version not in VERSIONS:
        raise _Corrupt(f"GGUF version {version} is not one of {VERSIONS}")
    n_tensors = cur.take("Q", "the tensor count")
    n_kv = cur.count("metadata keys", _MIN_KV_BYTES, MAX_ENTRIES)
    if n_tensors > MAX_ENTRIES:
        raise _Corrupt(f"it declares {n_tensors} tensors (at most {MAX_ENTRIES})")
    metadata: dict = {}
    where: dict = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key", MAX_KEY_BYTES)
        if key in metadata:
            raise _Corrupt(f"metadata key '{key}' appears twice")
        start = cur.pos
        metadata[key] = cur.value(cur.take("I", f"the type of '{key}'"), key)
        if spans is not None and key.startswith(spans):
            where[key] = (start, cur.pos)
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1 or alignment & (alignment - 1):
        raise _Corrupt(f"general.alignment is {alignment!r}, not a power of two")
    if n_tensors > (cur.size - cur.pos) // _MIN_TENSOR_BYTES:
        raise _Corrupt(f"it declares {n_tensors} tensors; the {cur.size - cur.pos} bytes left hold fewer")
    tensors, ends, names, table_start = [], [], set(), cur.pos
    for i in range(n_tensors):
        name, type_name, n, n_bytes, offset, dims = _tensor(cur, gguf, i)
        if name in names:
            raise _Corrupt(f"tensor '{name}' appears twice")
        if offset % alignment:
            raise _Corrupt(f"tensor '{name}' starts at offset {offset}, not a multiple of the alignment {alignment}")
        names.add(name)
        tensors.append(TensorInfo(name, type_name, n, n_bytes, dims, offset))
        ends.append((offset + n_bytes, name))
    data_start = -(-cur.pos // alignment) * alignment
    end, last = max(ends, default=(0, None))
    if end and data_start + end > cur.size:  # (no tensor bytes: llama.cpp reads nothing past the header)
        raise IntegrityError(f"its tensor data needs {data_start + end} bytes ('{last}' ends at {end} past the "
                             f"header), but the file has {cur.size}")
    return Header(version, metadata, tuple(tensors), table_start, data_start, where)


def read_header(path: Path | str, *, spans: str | None = None) -> Header:
    """Metadata and tensor table of the GGUF at ``path`` (tensor data is not read, only checked to fit).

    ``spans``: a key prefix; ``Header.spans`` then holds where each key with that prefix has its raw type and value
    in the file (a long array's bytes, which ``metadata`` keeps only the length of, can then be read or hashed)."""
    from edgemed.errors import require

    gguf = require("gguf", "gguf")
    path = Path(path)
    fix = "pass a .gguf produced by `edgemed convert`, or check that the copy is complete"
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a directory, FIFO or device: never opened
            raise _Corrupt("it is not a regular file")
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise _Corrupt("it is empty")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, gguf, spans)
    except _Corrupt as exc:
        raise InputError(f"'{path}' is not a readable GGUF file: {exc}.", fix) from None
    except IntegrityError as exc:
        raise IntegrityError(f"'{path}' is truncated or damaged: {exc.problem}.",
                             "copy the file again (compare its size with the original); re-convert it if it stays short") from None
    except OSError as exc:
        raise InputError(f"'{path}' is not a readable GGUF file ({exc.strerror or exc}).", fix) from None


# -- edgemed's own keys, and LoRA adapter files -------------------------------------------------------------------
#: In a model GGUF edgemed converted: the sha256 of the checkpoint (config + weights) it was converted from.
SOURCE_SHA_KEY = "edgemed.source.sha256"
#: In an adapter GGUF edgemed wrote: the sha256 of the base checkpoint it was made for (``SOURCE_SHA_KEY`` of
#: every base GGUF converted from that checkpoint, whatever its quant type), its HF architecture, and the PEFT
#: adapter's own sha256.
BASE_SOURCE_KEY = "edgemed.base.source_sha256"
BASE_ARCH_KEY = "edgemed.base.architecture"
LORA_SHA_KEY = "edgemed.lora.sha256"
ADAPTER_FIX = "make one with `edgemed convert BASE_CHECKPOINT --lora PEFT_ADAPTER --adapter-only -o NAME.lora.gguf`"


@dataclass(frozen=True)
class AdapterFacts:
    """What the loader and the planner need from a GGUF LoRA adapter file (its header only)."""

    path: Path
    architecture: str            # general.architecture: llama.cpp refuses it on a base of another
    alpha: float                 # adapter.lora.alpha
    base_source_sha256: str | None  # BASE_SOURCE_KEY; None in an adapter another tool wrote
    n_bytes: int                 # every tensor's bytes: what llama.cpp allocates for it
    types: tuple[str, ...]       # its tensors' ggml types, sorted
    n_tensors: int


def adapter_facts(path: Path | str) -> AdapterFacts:
    """``path``'s adapter facts, or the paragraph saying it is not a GGUF LoRA adapter."""
    path = Path(path)
    header = read_header(path)
    meta = header.metadata
    kind, adapter_type, arch = meta.get("general.type"), meta.get("adapter.type"), meta.get("general.architecture")
    if kind != "adapter" or adapter_type != "lora":
        what = ("a model, not an adapter" if kind in (None, "model") and adapter_type is None else
                f"general.type {kind!r}, adapter.type {adapter_type!r}")
        raise InputError(f"'{path}' is not a GGUF LoRA adapter ({what}).", f"pass an adapter file; {ADAPTER_FIX}")
    alpha = meta.get("adapter.lora.alpha", 0.0)
    if not isinstance(arch, str) or not arch or isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise InputError(f"'{path}' lacks general.architecture or a numeric adapter.lora.alpha.", f"re-make the adapter; {ADAPTER_FIX}")
    if not header.tensors or any(not t.name.endswith((".lora_a", ".lora_b")) for t in header.tensors):
        raise InputError(f"'{path}' holds no LoRA pairs, or tensors other than '.lora_a' / '.lora_b'.",
                         f"re-make the adapter; {ADAPTER_FIX}")
    base = meta.get(BASE_SOURCE_KEY)
    return AdapterFacts(path, arch, float(alpha), base if isinstance(base, str) and base else None,
                        sum(t.n_bytes for t in header.tensors), tuple(sorted({t.type_name for t in header.tensors})),
                        len(header.tensors))
