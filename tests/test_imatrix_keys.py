"""The importance matrix is keyed by the float GGUF's own tensor names, so the quantizer uses every entry.

A tied model's GGUF has no ``output.weight``: llama.cpp computes the head with ``token_embd.weight``. The head's
statistics keyed as ``output.weight`` were handed to the quantizer and never used (llama.cpp said so only at INFO:
'did not find weights for token_embd.weight'), and the report counted them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

from edgemed.converters import arch_spec  # noqa: E402
from edgemed.converters.gguf.imatrix import compute_imatrix  # noqa: E402
from edgemed.converters.gguf.quantize import quantize  # noqa: E402
from edgemed.converters.pipeline import ConvertOptions, convert  # noqa: E402
from edgemed.converters.source.checkpoint import Checkpoint  # noqa: E402
from edgemed.errors import EdgemedError  # noqa: E402
from edgemed.formats.gguf_header import read_header  # noqa: E402
from edgemed.runtime import native_log  # noqa: E402

QUIET = dict(echo=lambda s: None)
MISSING = r"did not find weights for (\S+)"  # llama.cpp's INFO line for a quantized tensor the matrix has no entry for


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tiny Qwen2 with tied embeddings (Qwen2's default), rows 256 wide so the head is a K-quant, its f16 GGUF,
    a calibration text, and the importance matrix computed on it."""
    root = tmp_path_factory.mktemp("tied")
    path = tiny.build_model(root / "qwen2", "qwen2", hidden_size=256)
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is True
    f16 = root / "f16.gguf"
    convert(path, f16, ConvertOptions(out_type="f16", parity=False), **QUIET)
    calib = root / "calib.txt"
    calib.write_text("\n\n".join(tiny.CORPUS), encoding="utf-8")
    ckpt = Checkpoint.open(path)
    values = compute_imatrix(ckpt, arch_spec(ckpt.architecture), calib, **QUIET).values
    return {"ckpt": path, "f16": f16, "calib": calib, "values": values, "root": root}


def test_every_key_names_a_tensor_of_the_float_gguf(tied):
    names = {t.name for t in read_header(tied["f16"]).tensors}
    assert "output.weight" not in names  # tied: llama.cpp computes the head with the embedding
    assert set(tied["values"]) <= names, sorted(set(tied["values"]) - names)
    head = tied["values"]["token_embd.weight"]  # the head's input is the final-normed hidden state: one per column
    assert head.shape == (256,) and (head > 0).all()


def test_the_quantizer_uses_the_heads_statistics(tied, tmp_path):
    with native_log.watch(MISSING) as missing:
        quantize(tied["f16"], tmp_path / "q4_k_m.gguf", "q4_k_m", imatrix=tied["values"])
    assert "token_embd.weight" not in {m.group(1) for m in missing}
    # the watch does hear the line: without the head's entry llama.cpp says it quantized the head without one
    rest = {k: v for k, v in tied["values"].items() if k != "token_embd.weight"}
    with native_log.watch(MISSING) as missing:
        quantize(tied["f16"], tmp_path / "plain.gguf", "q4_k_m", imatrix=rest)
    assert "token_embd.weight" in {m.group(1) for m in missing}


def test_a_key_no_tensor_has_is_refused_before_quantizing(tied, tmp_path):
    stray = dict(tied["values"], **{"output.weight": tied["values"]["token_embd.weight"]})
    out = tmp_path / "x.gguf"
    with pytest.raises(EdgemedError, match=r"output\.weight.*converter bug") as err:
        quantize(tied["f16"], out, "q4_k_m", imatrix=stray)
    assert "report it" in err.value.fix
    assert not out.exists()


def test_the_report_counts_the_entries_the_quantizer_used(tied, tmp_path):
    out = tmp_path / "m.gguf"
    report = convert(tied["ckpt"], out, ConvertOptions(out_type="q4_k_m", parity=False, imatrix_from=tied["calib"]), **QUIET)
    names = {t.name for t in read_header(tied["f16"]).tensors}
    assert report.imatrix["tensors"] == len(set(tied["values"]) & names) == len(tied["values"])
