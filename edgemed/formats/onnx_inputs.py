"""The element types of an ONNX graph's inputs, read from the graph's protobuf.

`edgemed pack` sizes an ONNX model's KV cache by the type of its past inputs (float32 in the graph `edgemed convert
--to onnx` traces), and a device installs onnxruntime only: this reads them without the ``onnx`` package and without
reading a tensor. The walk descends ``ModelProto.graph`` -> ``GraphProto.input`` and steps over every other field, the
weights among them, by its length. The graph is opened as a regular file, non-blocking (``input_file.open_regular``):
a FIFO named ``model.onnx`` is refused, never waited on. Stdlib only, as the rest of ``edgemed.formats``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

from edgemed.formats.input_file import open_regular
from edgemed.formats.protobuf_wire import fields as _fields

GRAPH, GRAPH_INPUT = 7, 11  # ModelProto.graph, GraphProto.input
VALUE_NAME, VALUE_TYPE = 1, 2  # ValueInfoProto.name, .type
TENSOR_TYPE, ELEM_TYPE = 1, 1  # TypeProto.tensor_type, TypeProto.Tensor.elem_type
#: onnx.proto TensorProto.DataType of the floating types -> (the name onnxruntime gives it, bytes per element)
FLOAT_TYPES = {1: ("float", 4), 10: ("float16", 2), 16: ("bfloat16", 2), 11: ("double", 8)}
#: an input's description is a name and a shape: bytes, kilobytes with long dimension names; larger is not one
MAX_VALUE_INFO = 1 << 20


def input_types(path: Path) -> dict[str, int]:
    """``{input name: TensorProto element type}`` of the graph ``path`` (0 for an input that states none, or is not a
    tensor). ``NotRegular`` / ``IsADirectoryError`` / ``FileNotFoundError`` (``OSError``) as ``open_regular`` raises
    them; ``ValueError`` when the file is not a readable ONNX protobuf."""
    found: dict[str, int] = {}
    with open_regular(path) as fh:
        for number, value in _fields(fh, os.fstat(fh.fileno()).st_size):
            if number != GRAPH or not isinstance(value, tuple):
                continue
            for inner, info in _fields(fh, value[0] + value[1]):
                if inner == GRAPH_INPUT and isinstance(info, tuple):
                    name, elem = _value_info(_read(fh, info))
                    found[name] = elem
    return found


def _read(fh: BinaryIO, span: tuple[int, int]) -> io.BytesIO:
    start, size = span
    if size > MAX_VALUE_INFO:
        raise ValueError(f"a graph input described in {size:,} bytes at byte {start:,} (at most {MAX_VALUE_INFO:,})")
    fh.seek(start)
    return io.BytesIO(fh.read(size))


def _value_info(buf: io.BytesIO) -> tuple[str, int]:
    """(name, element type) of a ``ValueInfoProto``."""
    end, name, elem = len(buf.getbuffer()), "", 0
    for number, value in _fields(buf, end):
        if number == VALUE_NAME and isinstance(value, tuple):
            name = buf.getvalue()[value[0]:value[0] + value[1]].decode("utf-8")  # UnicodeDecodeError is a ValueError
        elif number == VALUE_TYPE and isinstance(value, tuple):
            for kind, tensor in _fields(buf, value[0] + value[1]):
                if kind == TENSOR_TYPE and isinstance(tensor, tuple):
                    elem = next((v for n, v in _fields(buf, tensor[0] + tensor[1]) if n == ELEM_TYPE and isinstance(v, int)),
                                elem)
    return name, elem
