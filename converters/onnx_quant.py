"""float32 ONNX -> int4 weights with onnxruntime's ``MatMulNBitsQuantizer``.

Every ``MatMul`` whose right-hand side is a constant weight (the attention and
MLP projections, the LM head) becomes a ``MatMulNBits`` contrib op: int4 blocks
of ``block_size`` input channels with one float scale each (and a zero point
when asymmetric). ``accuracy_level`` 4 lets the CPU kernel quantize activations
to int8 and use integer dot products (the fast path on x86 and ARM); it does not
change the stored weights. Embedding ``Gather`` stays float32 unless
``embeddings`` is set, then it becomes ``GatherBlockQuantized``.
The quantizer needs the ``onnx_ir`` package.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgemed.errors import require

log = logging.getLogger(__name__)

DATA_SUFFIX = ".data"


def quantize_int4(src: Path, dst: Path, *, block_size: int = 32, symmetric: bool = True, accuracy_level: int = 4,
                  embeddings: bool = False) -> None:
    """Write ``dst`` (+ ``dst.data``) with int4 weights from the float32 graph ``src``."""
    onnx = require("onnx", "convert")
    require("onnx_ir", "convert")
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    ops = ("MatMul", "Gather") if embeddings else ("MatMul",)
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
                                          op_types_to_quantize=ops)
    model = onnx.load(str(src))
    quantizer = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level, op_types_to_quantize=ops, algo_config=config)
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # it logs two INFO lines per node
    try:
        quantizer.process()
    finally:
        quiet.setLevel(level)
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)
    _single_data_file(dst, onnx)


def save_single_file(model, dst: Path) -> None:
    """Save an ``onnx.ModelProto`` as ``dst`` plus one external-data file ``dst.data``."""
    import onnx

    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + DATA_SUFFIX, size_threshold=1024)


def _single_data_file(dst: Path, onnx) -> None:
    """Re-save so that the weights live in exactly ``dst.data`` (the quantizer picks its own name)."""
    expected = dst.with_name(dst.name + DATA_SUFFIX)
    extra = [p for p in dst.parent.iterdir() if p not in (dst, expected) and p.name.startswith(dst.stem)]
    if expected.exists() and not extra:
        return
    model = onnx.load(str(dst))
    for p in [*extra, expected]:
        if p.exists():
            p.unlink()
    save_single_file(model, dst)
