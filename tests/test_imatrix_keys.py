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


@pytest.fixture(scope="module")
def untied(tmp_path_factory, tied):
    """A tiny Llama with its own output.weight (rows 256 wide), its f16 GGUF and its importance matrix: the
    embedding is looked up, not multiplied, so no matrix has an entry for it."""
    root = tmp_path_factory.mktemp("untied")
    path = tiny.build_model(root / "llama", "llama", hidden_size=256)
    f16 = root / "f16.gguf"
    convert(path, f16, ConvertOptions(out_type="f16", parity=False), **QUIET)
    ckpt = Checkpoint.open(path)
    values = compute_imatrix(ckpt, arch_spec(ckpt.architecture), tied["calib"], **QUIET).values
    assert "output.weight" in values and "token_embd.weight" not in values
    return {"f16": f16, "values": values}


UNCOVERED = "edgemed.converters.gguf.quantize"


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == UNCOVERED and r.levelname == "WARNING"]


def test_tensors_the_matrix_misses_are_warned_of_once_by_count_and_name(tied, tmp_path, caplog):
    """A matrix made for another model, or cut short, quantized part of the model without it and nothing said so."""
    gone = ["blk.0.attn_q.weight", "blk.1.ffn_up.weight"]
    part = {k: v for k, v in tied["values"].items() if k not in gone}
    with caplog.at_level("WARNING", logger=UNCOVERED), native_log.watch(MISSING) as missing:
        quantize(tied["f16"], tmp_path / "a.gguf", "q4_k_m", imatrix=part)
    assert sorted({m.group(1) for m in missing}) == gone  # what llama.cpp did, in its own words
    [said] = _warnings(caplog)
    weighed = sum(t.type_name not in ("F32", "F16", "Q8_0") for t in read_header(tmp_path / "a.gguf").tensors)
    assert f"no entry for 2 of the {weighed} tensors" in said and "blk.0.attn_q.weight, blk.1.ffn_up.weight" in said
    assert "--imatrix-from TEXT" in said and "converter bug" in said, said
    assert (tmp_path / "a.gguf").exists()  # llama.cpp only recommends a matrix for K-quants: written, and said
    caplog.clear()
    with caplog.at_level("WARNING", logger=UNCOVERED):  # --quant auto quantizes one float GGUF many times: said once
        quantize(tied["f16"], tmp_path / "b.gguf", "q4_0", imatrix=part)
    assert _warnings(caplog) == []


def test_more_than_a_few_missing_are_counted_and_the_first_named(tied, tmp_path, caplog):
    few = {"token_embd.weight": tied["values"]["token_embd.weight"]}
    with caplog.at_level("WARNING", logger=UNCOVERED):
        quantize(tied["f16"], tmp_path / "a.gguf", "q4_k_m", imatrix=few)
    [said] = _warnings(caplog)
    assert "blk.0.attn_k.weight, blk.0.attn_output.weight" in said and " more)" in said, said


@pytest.mark.parametrize("qtype", ["q4_k_m", "q4_0"])
def test_a_matrix_of_this_model_warns_of_nothing(tied, untied, tmp_path, caplog, qtype):
    """The embedding of a model with its own head has no entry (llama.cpp says 'did not find weights' for it at INFO):
    it is not a missing one; a tied model's embedding is its head, and has one."""
    for name, model in (("tied", tied), ("untied", untied)):
        with caplog.at_level("WARNING", logger=UNCOVERED):
            quantize(model["f16"], tmp_path / f"{name}.gguf", qtype, imatrix=model["values"])
    assert _warnings(caplog) == []


def test_types_that_cannot_go_without_a_matrix_are_refused_before_llama_cpp_runs(tied, tmp_path):
    """llama.cpp refuses IQ2_XS for a tensor without an entry, and lets token_embd.weight through to ggml, whose
    quantizer then aborts the whole process (exit 134): both are refused, with the fix, before llama.cpp starts."""
    from edgemed.errors import InputError

    out = tmp_path / "iq.gguf"
    for name in ("blk.0.attn_q.weight", "token_embd.weight"):
        part = {k: v for k, v in tied["values"].items() if k != name}
        with pytest.raises(InputError, match=rf"asked as IQ2_XS.*has none for them \({name}\)") as err:
            quantize(tied["f16"], out, "q4_k_m", imatrix=part, tensor_types={name: "IQ2_XS"})
        assert "--imatrix-from TEXT" in err.value.fix and "Q4_K" in err.value.fix
        assert not out.exists()
    with pytest.raises(InputError, match="the matrix is missing"):
        quantize(tied["f16"], out, "q4_k_m", tensor_types={"blk.0.attn_q.weight": "IQ1_M"})
    # with its entry the same type is written; where llama.cpp exempts a name and ggml copes, so does edgemed
    quantize(tied["f16"], out, "q4_k_m", imatrix=tied["values"], tensor_types={"blk.0.attn_q.weight": "IQ2_XS"})
    rest = {k: v for k, v in tied["values"].items() if k != "token_embd.weight"}
    quantize(tied["f16"], tmp_path / "iq3.gguf", "q4_k_m", imatrix=rest, tensor_types={"token_embd.weight": "IQ3_XXS"})
    written = {t.name: t.type_name for t in read_header(tmp_path / "iq3.gguf").tensors}
    assert written["token_embd.weight"] == "IQ3_XXS"


def test_which_types_need_an_entry_follows_llama_cpp():
    from edgemed.converters.gguf.quantize import Q2_K_S, needs_imatrix

    assert needs_imatrix("blk.0.attn_q.weight", "IQ1_M") and not needs_imatrix("output.weight", "IQ1_M")
    assert needs_imatrix("output.weight", "IQ2_XXS")  # llama.cpp lets it through; ggml aborts
    assert needs_imatrix("blk.0.ffn_down.weight", "Q2_K", Q2_K_S) and not needs_imatrix("blk.0.ffn_down.weight", "Q2_K")
    assert not needs_imatrix("token_embd.weight", "Q2_K", Q2_K_S) and not needs_imatrix("blk.0.attn_q.weight", "Q4_K")
