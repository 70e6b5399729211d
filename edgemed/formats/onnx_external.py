"""Where an ONNX graph keeps its weights: the external-data files its tensors name, read from the graph's protobuf.

A graph over 2 GiB (and every graph ``edgemed convert --to onnx`` writes) keeps its tensors in a side file, each
tensor naming it by a ``location`` relative to the graph. onnxruntime opens those files itself, so a location that is
absolute, climbs out of the model's folder, or names a FIFO is only found by it, with a message about its own code
(or, in older releases, not refused at all). This module lists the locations without the ``onnx`` package (a device
installs onnxruntime only) and without reading a tensor: the walk descends only into the messages that can hold a
tensor and steps over every other field by its length.

The graph is opened as a regular file, non-blocking (``input_file.open_regular``): a FIFO named ``model.onnx`` is
refused, never waited on. Light on purpose (stdlib only), as the rest of ``edgemed.formats``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from edgemed.formats.input_file import open_regular
from edgemed.formats.protobuf_wire import fields as _fields

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
TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 8, 13, 14  # TensorProto fields
ENTRY_KEY, ENTRY_VALUE = 1, 2  # StringStringEntryProto
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
#: graphs inside attributes (If, Loop, Scan) nest; a hostile file could nest until the stack runs out
MAX_DEPTH = 64
#: a location is a file name; a tensor name is shown in a message: anything longer is not one
MAX_TEXT = 4096


def external_data(path: Path) -> dict[str, str]:
    """``{location: name of the first tensor stored there}`` for every tensor of the graph ``path`` whose data is
    external, in the order met. ``NotRegular`` / ``IsADirectoryError`` / ``FileNotFoundError`` (``OSError``) as
    ``open_regular`` raises them; ``ValueError`` when the file is not a readable ONNX protobuf."""
    found: dict[str, str] = {}
    with open_regular(path) as fh:
        _walk(fh, os.fstat(fh.fileno()).st_size, "model", 0, found)
    return found


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


def _tensor(fh: BinaryIO, end: int, found: dict[str, str]) -> None:
    name, location, external = "", None, False
    for number, value in _fields(fh, end):
        if number == TENSOR_DATA_LOCATION and isinstance(value, int):
            external = value == EXTERNAL
        elif number == TENSOR_NAME and isinstance(value, tuple):  # only shown: cut, never refused
            fh.seek(value[0])
            name = fh.read(min(value[1], MAX_TEXT)).decode("utf-8", "replace")
        elif number == TENSOR_EXTERNAL_DATA and isinstance(value, tuple):
            entry = {field: _text(fh, part) for field, part in _fields(fh, value[0] + value[1])
                     if field in (ENTRY_KEY, ENTRY_VALUE) and isinstance(part, tuple)}
            if entry.get(ENTRY_KEY) == "location" and ENTRY_VALUE in entry:
                location = entry[ENTRY_VALUE]
    if external and location is not None:
        found.setdefault(location, name)
