"""``edgemed.formats.onnx_inputs``: a graph's input element types, read from its protobuf without the onnx package,
as onnx itself reads them; the weights are stepped over, and a damaged file or a FIFO is refused, never a hang."""

from __future__ import annotations

import os

import pytest

onnx = pytest.importorskip("onnx")  # only to write graphs here: the reader needs it not

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgemed.formats.input_file import NotRegular  # noqa: E402
from edgemed.formats.onnx_inputs import FLOAT_TYPES, input_types  # noqa: E402


def _graph(path, *, weights: int = 0):
    np = pytest.importorskip("numpy")
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "n"]),
              helper.make_tensor_value_info("past.0.key", TensorProto.FLOAT16, [1, 2, "past", 16]),
              helper.make_tensor_value_info("past.0.value", TensorProto.FLOAT, [1, 2, "past", 16]),
              helper.make_tensor_value_info("scale", TensorProto.BFLOAT16, None)]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    init = [numpy_helper.from_array(np.arange(weights, dtype=np.float32), "w")] if weights else []
    graph = helper.make_graph([helper.make_node("Identity", ["past.0.value"], ["y"])], "g", inputs, [out], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], doc_string="d" * 300)
    onnx.save(model, str(path))
    return model


def test_input_types_are_what_onnx_reads(tmp_path):
    model = _graph(tmp_path / "m.onnx", weights=50_000)  # an initializer before the inputs, stepped over
    want = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert input_types(tmp_path / "m.onnx") == want
    assert want["past.0.key"] == TensorProto.FLOAT16 and FLOAT_TYPES[want["past.0.key"]] == ("float16", 2)
    assert FLOAT_TYPES[TensorProto.FLOAT] == ("float", 4) and FLOAT_TYPES[TensorProto.BFLOAT16] == ("bfloat16", 2)


def test_a_damaged_graph_or_a_fifo_is_refused(tmp_path):
    _graph(tmp_path / "m.onnx", weights=1000)
    data = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        input_types(tmp_path / "cut.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError):
        input_types(tmp_path / "junk.onnx")
    os.mkfifo(tmp_path / "fifo.onnx")
    with pytest.raises(NotRegular):
        input_types(tmp_path / "fifo.onnx")
