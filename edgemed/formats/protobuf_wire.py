"""The protobuf wire format, read field by field from a file: what edgemed's ONNX readers (``onnx_external``,
``onnx_inputs``) walk a graph with, without the ``onnx`` package (a device installs onnxruntime only) and without
reading a field they step over. Every length is checked against the message that holds it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO


def varint(fh: BinaryIO, end: int) -> int:
    value = 0
    for shift in range(0, 70, 7):
        if fh.tell() >= end:
            raise ValueError(f"a number runs past its message at byte {fh.tell():,}")
        byte = fh.read(1)
        if not byte:
            raise ValueError("the file ends inside a number")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
    raise ValueError(f"a number of more than 10 bytes at byte {fh.tell():,}")


def fields(fh: BinaryIO, end: int) -> Iterator[tuple[int, int | tuple[int, int]]]:
    """``(field number, value)`` of the message that ends at ``end``: an int (varint), or ``(start, size)`` of a
    length-delimited field, which the caller may read; the walk goes on after it either way. Fixed-size fields are
    stepped over."""
    while (at := fh.tell()) < end:
        key = varint(fh, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint(fh, end)
            continue
        if wire == 2:
            size = varint(fh, end)
        elif wire in (1, 5):  # fixed64, fixed32
            size = 8 if wire == 1 else 4
        else:
            raise ValueError(f"field {number} at byte {at:,} has wire type {wire}, which ONNX does not use")
        start = fh.tell()
        if start + size > end:
            raise ValueError(f"field {number} at byte {at:,} runs past the end of its message")
        if wire == 2:
            yield number, (start, size)
        fh.seek(start + size)
