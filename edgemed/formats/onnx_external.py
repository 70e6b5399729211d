"""Where an ONNX graph keeps its weights: the external-data files its tensors name, read from the graph's protobuf.

A graph over 2 GiB (and every graph ``edgemed convert --to onnx`` writes) keeps its tensors in a side file, each
tensor naming it by a ``location`` relative to the graph. onnxruntime opens those files itself, so a location that is
absolute, climbs out of the model's folder, or names a FIFO is only found by it, with a message about its own code
(or, in older releases, not refused at all). This module lists the locations without the ``onnx`` package (a device
installs onnxruntime only) and without reading a tensor: the walk descends only into the messages that can hold a
tensor and steps over every other field by its length.

Each tensor also says where in that file its bytes are (``offset``, ``length``, decimal text). ``refusal`` holds
them, with the locations, to the folder and the files' sizes before onnxruntime is handed the graph: the checks the
ONNX engine makes at load and ``edgemed pack`` makes before it writes a bundle, in one place. onnxruntime sizes a
tensor from what the graph says; older releases read what they were pointed at.

The graph is opened as a regular file, non-blocking (``input_file.open_regular``): a FIFO named ``model.onnx`` is
refused, never waited on. Light on purpose (stdlib only), as the rest of ``edgemed.formats``.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO, NamedTuple

from edgemed.formats.input_file import odd_kind, open_regular
from edgemed.formats.protobuf_wire import fields as _fields
from edgemed.formats.protobuf_wire import varint

#: onnx.proto: message -> {field number: the message that field holds}, for the fields that can lead to a tensor
HOLDS = {
    "model": {7: "graph", 25: "function"},  # ModelProto.graph, .functions
    "function": {7: "node"},  # FunctionProto.node
    "graph": {1: "node", 5: "tensor", 15: "sparse"},  # GraphProto.node, .initializer, .sparse_initializer
    "node": {5: "attribute"},  # NodeProto.attribute
    # AttributeProto.t, .g, .tensors, .graphs, .sparse_tensor, .sparse_tensors
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},  # SparseTensorProto.values, .indices
}
TENSOR_DIMS, TENSOR_TYPE = 1, 2  # TensorProto fields
TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 8, 13, 14
ENTRY_KEY, ENTRY_VALUE = 1, 2  # StringStringEntryProto
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
#: graphs inside attributes (If, Loop, Scan) nest; a hostile file could nest until the stack runs out
MAX_DEPTH = 64
#: a location is a file name; a tensor name is shown in a message: anything longer is not one
MAX_TEXT = 4096
#: TensorProto.DataType -> bits per element, for a tensor that states no length (onnxruntime then reads its shape's)
ELEMENT_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 14: 64, 15: 128,
                16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4}
#: the fix for every refusal here: the files are not the ones a conversion wrote side by side
FIX = ("convert the model again with `edgemed convert --to onnx`, which writes the weights beside the graph "
       "(model.onnx.data), and copy the folder whole: external data must be a regular file inside the "
       "model's folder, not a link out of it")


class External(NamedTuple):
    """One tensor stored outside the graph: its name (only shown), the file it names, and where in it its bytes are
    as the graph wrote them (``offset``/``length``: text, None when not given), ``size`` the bytes its shape and type
    need (None when the type has no fixed size)."""

    tensor: str
    location: str
    offset: str | None
    length: str | None
    size: int | None


def external_tensors(path: Path) -> list[External]:
    """Every tensor of the graph ``path`` whose data is external, in the order met. ``NotRegular`` /
    ``IsADirectoryError`` / ``FileNotFoundError`` (``OSError``) as ``open_regular`` raises them; ``ValueError`` when
    the file is not a readable ONNX protobuf."""
    found: list[External] = []
    with open_regular(path) as fh:
        _walk(fh, os.fstat(fh.fileno()).st_size, "model", 0, found)
    return found


def external_data(path: Path) -> dict[str, str]:
    """``{location: name of the first tensor stored there}`` for every tensor of the graph ``path`` whose data is
    external, in the order met; raises as ``external_tensors``."""
    found: dict[str, str] = {}
    for t in external_tensors(path):
        found.setdefault(t.location, t.tensor)
    return found


def refusal(folder: Path, tensors: list[External]) -> str | None:
    """Why onnxruntime must not be handed the graph in ``folder`` whose external tensors are ``tensors``, as the end
    of a sentence that starts with the graph's name (None: nothing to refuse). A location must be a file name (no
    NUL byte: the OS refuses it, Python with a ValueError), relative, inside the folder by its path and by the links
    on the way, and a regular file; each tensor's offset and length decimal, and within that file."""
    root = Path(os.path.realpath(folder))
    sizes: dict[str, int] = {}
    for t in tensors:
        if t.location not in sizes:
            why = _location_fault(folder, root, t.location)
            if why:
                return (f"keeps the weights of '{t.tensor}' in the external data file {t.location!r}, {why}: onnxruntime "
                        "reads external data only from a regular file inside the model's folder.")
            sizes[t.location] = os.stat(folder / t.location).st_size
        why = _span_fault(t, sizes[t.location])
        if why:
            return f"keeps the weights of '{t.tensor}' in '{t.location}' {why}: the graph and that file are not the pair a conversion wrote."
    return None


def _location_fault(folder: Path, root: Path, location: str) -> str | None:
    if "\x00" in location:
        return "which is not a file name (it holds a NUL byte)"
    if PurePosixPath(location).is_absolute() or PureWindowsPath(location).is_absolute():
        return "an absolute path"
    if not Path(os.path.normpath(root / location)).is_relative_to(root):
        return "a path out of the model's folder"
    where = folder / location
    real = Path(os.path.realpath(where))
    if not real.is_relative_to(root):
        return f"a link to '{real}', outside the model's folder"
    if not os.path.lexists(where):
        return "which is missing"
    if os.path.isdir(where):
        return "a folder"
    kind = odd_kind(where)
    return f"{kind}, not a regular file" if kind else None


def _span_fault(t: External, file_size: int) -> str | None:
    """Why ``t``'s bytes are not within its file of ``file_size`` bytes, as onnxruntime would read them."""
    for field, text in (("offset", t.offset), ("length", t.length)):
        if text is not None and not (text.isascii() and text.isdigit()):
            return f"at the {field} {text[:40]!r}, which is not a whole number of bytes"
    offset = int(t.offset) if t.offset is not None else 0
    length = int(t.length) if t.length is not None else t.size
    if length is None:
        return None if offset <= file_size else f"from byte {offset:,}, past the end of its {file_size:,} bytes"
    if offset + length > file_size:
        return f"at bytes {offset:,} to {offset + length:,}, past the end of its {file_size:,} bytes"
    return None


def _text(fh: BinaryIO, span: tuple[int, int]) -> str:
    start, size = span
    if size > MAX_TEXT:
        raise ValueError(f"a name of {size:,} bytes at byte {start:,} (a file name is at most {MAX_TEXT:,})")
    fh.seek(start)
    return fh.read(size).decode("utf-8")  # UnicodeDecodeError is a ValueError


def _walk(fh: BinaryIO, end: int, kind: str, depth: int, found: dict[str, str]) -> None:
    if depth > MAX_DEPTH:
        raise ValueError(f"messages nested more than {MAX_DEPTH} deep")
    if kind == "tensor":
        return _tensor(fh, end, found)
    for number, value in _fields(fh, end):
        inner = HOLDS[kind].get(number)
        if inner and isinstance(value, tuple):
            _walk(fh, value[0] + value[1], inner, depth + 1, found)


def _tensor(fh: BinaryIO, end: int, found: list[External]) -> None:
    name, external, entries, dims, elem = "", False, {}, [], 0
    for number, value in _fields(fh, end):
        if number == TENSOR_DATA_LOCATION and isinstance(value, int):
            external = value == EXTERNAL
        elif number == TENSOR_NAME and isinstance(value, tuple):  # only shown: cut, never refused
            fh.seek(value[0])
            name = fh.read(min(value[1], MAX_TEXT)).decode("utf-8", "replace")
        elif number == TENSOR_EXTERNAL_DATA and isinstance(value, tuple):
            entry = {field: _text(fh, part) for field, part in _fields(fh, value[0] + value[1])
                     if field in (ENTRY_KEY, ENTRY_VALUE) and isinstance(part, tuple)}
            if entry.get(ENTRY_KEY) in ("location", "offset", "length") and ENTRY_VALUE in entry:
                entries[entry[ENTRY_KEY]] = entry[ENTRY_VALUE]
        elif number == TENSOR_DIMS:  # repeated int64: one varint each, or packed
            dims += [value] if isinstance(value, int) else list(_packed(fh, value))
        elif number == TENSOR_TYPE and isinstance(value, int):
            elem = value
    if external and "location" in entries:
        count = 1
        for d in dims:
            count *= d
        bits = ELEMENT_BITS.get(elem)
        found.append(External(name, entries["location"], entries.get("offset"), entries.get("length"),
                              None if bits is None else (count * bits + 7) // 8))


def _packed(fh: BinaryIO, span: tuple[int, int]):
    start, size = span
    fh.seek(start)
    while fh.tell() < start + size:
        yield varint(fh, start + size)
