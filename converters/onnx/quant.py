"""float32 ONNX -> int4 weights with onnxruntime's ``MatMulNBitsQuantizer``.

Every ``MatMul`` whose right-hand side is a constant weight (the attention and
MLP projections) becomes a ``MatMulNBits`` contrib op: int4 blocks of
``block_size`` input channels with one float scale each (and a 4-bit zero point
when asymmetric). The LM head gets ``head_bits`` (8 by default): like llama.cpp's
Q4_K_M, which keeps ``output.weight`` at Q6_K, because the head's error lands
directly on the logits (measured on Qwen2.5-0.5B: benchmarks/results/onnx_vs_gguf.md).
``accuracy_level`` 4 lets the CPU kernel quantize activations to int8 and use
integer dot products; it does not change the stored weights. Embedding
``Gather`` stays float32: quantizing it needs opset 21, where the exported
graph's ``ReduceMean`` is invalid. The quantizer needs the ``onnx_ir`` package.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgemed.errors import require

log = logging.getLogger(__name__)

DATA_SUFFIX = ".data"
_NO_OP = ("-",)  # an op type that matches nothing: quantize only the nodes named in nodes_to_include


def lm_head_node(graph) -> str | None:
    """Name of the ``MatMul`` that produces the logits (the LM head), if there is one."""
    producers = {out: node for node in graph.node for out in node.output}
    node = producers.get("logits")
    while node is not None and node.op_type != "MatMul":  # e.g. a trailing Add for a head bias
        node = producers.get(node.input[0])
    return node.name if node is not None else None


def quantize_int4(src: Path, dst: Path, *, block_size: int = 32, symmetric: bool = False, accuracy_level: int = 4,
                  head_bits: int = 8) -> None:
    """Write ``dst`` (+ ``dst.data``) with int4 weights (LM head: ``head_bits``) from the float32 graph ``src``."""
    onnx = require("onnx", "convert")
    require("onnx_ir", "convert")
    model = onnx.load(str(src))
    head = lm_head_node(model.graph)
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # two INFO lines per node
    try:
        if head and head_bits != 4:
            model = _quantize(model, head_bits, block_size, symmetric, accuracy_level, ops=_NO_OP, include=[head])
        model = _quantize(model, 4, block_size, symmetric, accuracy_level, ops=("MatMul",), include=None)
    finally:
        quiet.setLevel(level)
    save_single_file(model, dst)


def int4_step(job, fp32_model: Path, out_dir: Path, recipe: dict) -> None:
    """The ``torch`` graph row's int4 step: quantize the gated fp32 graph into ``out_dir/model.onnx``."""
    quantize_int4(fp32_model, out_dir / fp32_model.name, **recipe)


def _quantize(model, bits: int, block_size: int, symmetric: bool, accuracy_level: int, *, ops, include):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
                                          bits=bits, op_types_to_quantize=ops)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level, nodes_to_include=include, op_types_to_quantize=ops,
                                     algo_config=config)
    quantizer.process()
    return quantizer.model.model


def save_single_file(model, dst: Path) -> None:
    """Save an ``onnx.ModelProto`` as ``dst`` plus one external-data file ``dst.data``."""
    import onnx

    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + DATA_SUFFIX, size_threshold=1024)
