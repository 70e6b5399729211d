"""Quantize a float GGUF with llama.cpp's own quantizer (through llama-cpp-python).

llama.cpp's recipe is kept as it is: for the K-quant mixes it chooses per-tensor
types itself (e.g. Q4_K_M keeps ``output.weight`` at Q6_K and gives some
attention-V / FFN-down tensors Q6_K). An optional importance matrix, computed on
medical text by ``imatrix.py``, is handed to the quantizer through the C API's
``llama_model_imatrix_data`` array.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from edgemed.converters.native_log import quiet
from edgemed.errors import EdgemedError, require

# Rows llama.cpp keeps in memory at once while quantizing (its default is 8 GiB).
MAX_BUF_BYTES = 256 * 2**20

# edgemed name -> llama_ftype constant in llama_cpp
QUANT_TYPES: dict[str, str] = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
}


def quantize(src: Path, dst: Path, qtype: str, *, threads: int | None = None, imatrix: dict[str, "object"] | None = None) -> None:
    """Write ``dst`` as ``qtype`` from float GGUF ``src``. ``imatrix``: gguf tensor name -> float32 array."""
    llama_cpp = require("llama_cpp", "gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads or os.cpu_count() or 1
    params.ftype = getattr(llama_cpp, QUANT_TYPES[qtype])
    params.max_buf_size = MAX_BUF_BYTES
    keep_alive = []
    if imatrix:
        import numpy as np

        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # zeroed last entry ends the list
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep_alive.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep_alive.append(entries)
    with quiet():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise EdgemedError(
            f"llama.cpp failed to quantize '{src.name}' to {qtype} (return code {rc}).",
            "run with -vv to see llama.cpp's log; check free disk space next to the output",
        )

