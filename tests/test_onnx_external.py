"""The external-data locations of an ONNX graph, read from its protobuf without the onnx package
(``edgemed.formats.onnx_external``): every place a tensor can sit, and hostile files refused, never waited on."""

from __future__ import annotations

import os

import pytest

from edgemed.formats.input_file import NotRegular
from edgemed.formats.onnx_external import MAX_DEPTH, external_data


def _ext(onnx, tensor, location: str):
    """``tensor`` marked as stored in ``location`` (the walk reads the marks; no data file is needed)."""
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    for key, value in (("offset", "0"), ("length", "16")):
        extra = tensor.external_data.add()
        extra.key, extra.value = key, value
    return tensor


def test_every_place_a_tensor_can_sit_is_walked(tmp_path):
    """Initializers, a Constant node's tensor, an If branch's initializer, a sparse initializer's values and a
    function's Constant, as the onnx package writes them; an inline tensor, and one with external-data entries but
    not stored externally, are not listed."""
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import helper, numpy_helper

    def tensor(name, location=None):
        t = numpy_helper.from_array(np.zeros(4, dtype=np.float32), name)
        return _ext(onnx, t, location) if location else t

    marked_only = tensor("marked_only")
    marked_only.external_data.add().key = "location"  # entries, data_location DEFAULT: read inline by onnxruntime
    branch = helper.make_graph([helper.make_node("Identity", ["b"], ["y"])], "branch", [],
                               [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])],
                               initializer=[tensor("b", "branch.data")])
    sparse = helper.make_sparse_tensor(tensor("sparse_values", "sparse.data"),
                                       numpy_helper.from_array(np.arange(4, dtype=np.int64), "idx"), [8])
    nodes = [helper.make_node("Constant", [], ["c"], value=tensor("c", "const.data")),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])],
                              initializer=[tensor("w", "model.onnx.data"), tensor("inline"), marked_only,
                                           tensor("w2", "model.onnx.data")], sparse_initializer=[sparse])
    function = helper.make_function("local", "f", [], ["k"],
                                    [helper.make_node("Constant", [], ["k"], value=tensor("k", "sub/f.data"))],
                                    [helper.make_opsetid("", 18)])
    model = helper.make_model(graph, functions=[function], opset_imports=[helper.make_opsetid("", 18),
                                                                          helper.make_opsetid("local", 1)])
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    assert external_data(path) == {"const.data": "c", "branch.data": "b", "model.onnx.data": "w",
                                   "sparse.data": "sparse_values", "sub/f.data": "k"}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _message(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _external_tensor(location: bytes) -> bytes:
    """A TensorProto (onnx.proto: name 8, external_data 13 {key 1, value 2}, data_location 14) stored in
    ``location``."""
    entry = _message(1, b"location") + _message(2, location)
    return _message(8, b"w") + _message(13, entry) + _varint(14 << 3) + _varint(1)


def _model(tensor: bytes) -> bytes:
    return _varint(1 << 3) + _varint(9) + _message(7, _message(5, tensor))  # ir_version 9, graph {initializer}


def test_a_hand_written_graph_is_read(tmp_path):
    (tmp_path / "m.onnx").write_bytes(_model(_external_tensor(b"model.onnx.data")))
    assert external_data(tmp_path / "m.onnx") == {"model.onnx.data": "w"}


HOSTILE = {
    "cut short": (lambda: _model(_external_tensor(b"model.onnx.data"))[:-3], "runs past"),
    "a length past the end": (lambda: _message(7, b"")[:1] + _varint(1 << 30), "runs past the end"),
    "a number that never ends": (lambda: b"\xff" * 12, "more than 10 bytes"),
    "a group (wire type 3)": (lambda: _varint(7 << 3 | 3), "wire type 3"),
    "a location of 5,000 bytes": (lambda: _model(_external_tensor(b"x" * 5000)), "a name of 5,000 bytes"),
    "a location that is not UTF-8": (lambda: _model(_external_tensor(b"\xff\xfe.data")), "utf-8"),
    # graph { node { attribute { g: graph { node { ... } } } } }, far deeper than any real graph
    "graphs nested in attributes": (lambda: _message(7, _nested(MAX_DEPTH)), f"nested more than {MAX_DEPTH} deep"),
}


def _nested(levels: int) -> bytes:
    graph = b""
    for _ in range(levels):
        graph = _message(1, _message(5, _message(6, graph)))  # graph.node.attribute.g
    return graph


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_graph_file_is_a_value_error(tmp_path, case):
    make, says = HOSTILE[case]
    (tmp_path / "m.onnx").write_bytes(make())
    with pytest.raises(ValueError, match=says):
        external_data(tmp_path / "m.onnx")


def test_a_fifo_or_a_folder_is_refused_without_being_opened(tmp_path):
    from fifo_kit import run_unblocked

    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)

    def walk():
        try:
            return external_data(fifo)
        except OSError as exc:
            return exc

    got = run_unblocked(walk, fifo, 10, "reading a FIFO named model.onnx blocked")
    assert isinstance(got, NotRegular) and "named pipe" in got.strerror
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(IsADirectoryError):
        external_data(tmp_path / "folder.onnx")


def _span_tensor(location: bytes, entries: dict[bytes, bytes], dims=(4,), elem: int = 1) -> bytes:
    """A TensorProto with ``dims`` (field 1, one varint each), ``elem`` (data_type 2) and external-data entries."""
    kv = _message(13, _message(1, b"location") + _message(2, location))
    for key, value in entries.items():
        kv += _message(13, _message(1, key) + _message(2, value))
    shape = b"".join(_varint(1 << 3) + _varint(d) for d in dims)
    return shape + _varint(2 << 3) + _varint(elem) + _message(8, b"w") + kv + _varint(14 << 3) + _varint(1)


SPANS = {  # the data file holds 64 bytes; a float32 [4] tensor needs 16
    "within the file": ({b"offset": b"48", b"length": b"16"}, (4,), None),
    "no length: its shape's 16 bytes, within": ({b"offset": b"48"}, (4,), None),
    "no length: its shape's 80 bytes, past the end": ({}, (4, 5), "at bytes 0 to 80, past the end of its 64 bytes"),
    "an offset past the end": ({b"offset": b"4611686018427387904", b"length": b"16"}, (4,), "past the end of its 64"),
    "a length past the end": ({b"offset": b"0", b"length": b"65"}, (4,), "at bytes 0 to 65, past the end of its 64"),
    "a negative offset": ({b"offset": b"-16", b"length": b"16"}, (4,), "the offset '-16', which is not a whole number"),
    "a length that is not a number": ({b"length": b"0x10"}, (4,), "the length '0x10', which is not a whole number"),
}


@pytest.mark.parametrize("case", list(SPANS))
def test_offsets_and_lengths_are_held_to_the_data_files_size(tmp_path, case):
    """onnx_external read only the location: an offset or length past the end of the data file (a truncated copy, a
    hand-edited graph) was left to onnxruntime, which sizes the tensor from what the graph says (older releases read
    what they were pointed at). Each tensor's bytes are held to its file before onnxruntime is handed the graph."""
    from edgemed.formats.onnx_external import external_tensors, refusal

    entries, dims, says = SPANS[case]
    (tmp_path / "model.onnx").write_bytes(_model(_span_tensor(b"model.onnx.data", entries, dims)))
    (tmp_path / "model.onnx.data").write_bytes(bytes(64))
    why = refusal(tmp_path, external_tensors(tmp_path / "model.onnx"))
    if says is None:
        assert why is None, why
    else:
        assert why is not None and says in why and "'w'" in why, why


def test_a_location_with_a_nul_byte_is_refused_not_a_value_error(tmp_path):
    """``os.path.realpath`` raises ValueError ("embedded null byte") on such a location: `edgemed run` ended in a
    traceback. It is not a file name, and said so."""
    from edgemed.formats.onnx_external import external_tensors, refusal

    (tmp_path / "model.onnx").write_bytes(_model(_span_tensor(b"model.onnx.data\x00x", {})))
    (tmp_path / "model.onnx.data").write_bytes(bytes(64))
    why = refusal(tmp_path, external_tensors(tmp_path / "model.onnx"))
    assert why is not None and "'model.onnx.data\\x00x', which is not a file name (it holds a NUL byte)" in why, why
