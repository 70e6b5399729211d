"""A LoRA adapter that changes the LM head: PEFT's copy of the base layer, and models whose head is their embedding.

PEFT saves a pair on ``lm_head`` with a copy of the base layer (``lm_head.base_layer.weight``, its
``save_embedding_layers="auto"``) and loads that copy in place of the base's. edgemed used to refuse such an
adapter ("matches no base tensor"); it now adds the pair to the copy, as PEFT computes. A model with tied word
embeddings computes its head with the embedding matrix, and PEFT's pair or ``modules_to_save`` copy changes one of
the two uses only: edgemed's files hold the matrix once, so such an adapter is refused with the way out, where it
used to be refused for the wrong reason or, with a stored ``lm_head.weight``, merged without its head change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

import tiny  # noqa: E402
from adapter_kit import make_lora  # noqa: E402
from test_layered_reference import _src, assert_same_logits, whole_logits  # noqa: E402

COPY = "base_model.model.lm_head.base_layer.weight"


def _scale_copy(lora: Path, factor: float) -> None:
    from safetensors.torch import load_file, save_file

    path = lora / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[COPY] = tensors[COPY] * factor
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def untied(tmp_path_factory) -> Path:
    return tiny.build_model(tmp_path_factory.mktemp("head") / "llama", "llama", tie=False)


def _head_lora(base: Path, out: Path) -> Path:
    lora = make_lora(base, out, r=4, alpha=16, std=0.05, target_modules=["q_proj", "lm_head"])  # PEFT's own save
    from safetensors import safe_open

    assert COPY in safe_open(str(lora / "adapter_model.safetensors"), "pt").keys()
    return lora


def test_a_head_pair_saved_with_its_base_copy_computes_what_peft_computes(untied, tmp_path):
    from edgemed.converters.quality.layered import reference_logits

    lora = _head_lora(untied, tmp_path / "adapter")
    assert_same_logits(whole_logits(untied, lora), reference_logits(_src(untied, lora)))
    before = np.concatenate(whole_logits(untied, lora)[1])
    _scale_copy(lora, 1.5)  # PEFT loads the copy in place of the base layer: a changed copy changes its model
    want = whole_logits(untied, lora)
    assert np.abs(np.concatenate(want[1]) - before).max() > 0.1
    src = _src(untied, lora)
    assert_same_logits(want, reference_logits(src))
    import torch

    from edgemed.converters.source.merged_model import load_merged

    merged = load_merged(src.checkpoint, src.adapter)  # the ONNX route's model
    with torch.inference_mode():
        got = [merged(torch.tensor([ids])).logits[0].numpy() for ids in want[0]]
    assert_same_logits(want, (want[0], got))


def test_a_head_pair_converts_merged_and_as_an_adapter_file(untied, tmp_path):
    from edgemed.converters.pipeline import ConvertOptions, convert
    from edgemed.errors import AdapterError

    lora = _head_lora(untied, tmp_path / "adapter")
    quiet = dict(echo=lambda s: None)
    merged = convert(untied, tmp_path / "merged.gguf", ConvertOptions(out_type="f32", lora=lora, threads=1), **quiet)
    assert merged.parity["passed"] is True and merged.parity["nmse"] < 1e-4, merged.parity
    only = convert(untied, tmp_path / "head.lora.gguf", ConvertOptions(out_type="f32", adapter_only=True, lora=lora,
                                                                       threads=1), **quiet)
    assert only.parity["passed"] is True and only.parity["nmse"] < 1e-4, only.parity
    _scale_copy(lora, 1.5)  # a LoRA file is applied to the base GGUF's head, which this copy no longer is
    with pytest.raises(AdapterError, match="base_layer") as exc:
        convert(untied, tmp_path / "other.lora.gguf", ConvertOptions(out_type="f32", adapter_only=True, lora=lora,
                                                                     threads=1), **quiet)
    assert "without --adapter-only" in exc.value.fix
    assert not (tmp_path / "other.lora.gguf").exists()


def test_a_copy_without_its_pair_is_refused(untied, tmp_path):
    from safetensors.torch import load_file, save_file

    from edgemed.converters.source.source import Source
    from edgemed.errors import AdapterError

    lora = _head_lora(untied, tmp_path / "adapter")
    path = lora / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if ".lm_head.lora_" not in k}, path, metadata={"format": "pt"})
    with pytest.raises(AdapterError, match="no LoRA pair"):
        Source.open(untied, lora=lora)


@pytest.mark.parametrize("stored_head", [False, True], ids=["head-tied", "head-also-stored"])
@pytest.mark.parametrize("adapter", [
    {"target_modules": ["q_proj", "lm_head"]},
    {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]},
], ids=["head-pair", "head-copy", "embedding-copy"])
def test_an_adapter_on_a_tied_head_or_embedding_is_refused(tmp_path, adapter, stored_head):
    """Refused before any work, on every route, naming tie_word_embeddings: the GGUF would compute the head with
    the embedding, unchanged or changed for both uses, where PEFT changes one. With a stored lm_head.weight (which
    Hugging Face does not read) the pair used to be merged into nothing, and the parity gate passed."""
    import json

    from safetensors.torch import load_file, save_file

    from edgemed.converters.pipeline import ConvertOptions, convert
    from edgemed.errors import AdapterError

    base = tiny.build_model(tmp_path / "qwen2", "qwen2", tie=True)
    lora = make_lora(base, tmp_path / "adapter", r=4, alpha=16, std=0.05, **adapter)
    if stored_head:
        weights = load_file(base / "model.safetensors")
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
        save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
        assert json.loads((base / "config.json").read_text())["tie_word_embeddings"] is True
    for opts in (ConvertOptions(out_type="f32", lora=lora), ConvertOptions(out_type="f32", lora=lora, adapter_only=True)):
        with pytest.raises(AdapterError, match="tie_word_embeddings") as exc:
            convert(base, tmp_path / "x.gguf", opts, echo=lambda s: None)
        assert "lm_head" in exc.value.fix and not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("adapter", [
    {"target_modules": ["q_proj", "lm_head"]},
    {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
], ids=["head-pair", "head-copy"])
def test_an_adapter_that_keeps_the_tie_is_sent_to_peft_merge(tmp_path, adapter):
    """PEFT's ensure_weight_tying changes both uses alike (its merge keeps the model tied): refused, with that merge
    as the way, not the advice to untie."""
    from edgemed.converters.source.source import Source
    from edgemed.errors import AdapterError

    base = tiny.build_model(tmp_path / "qwen2", "qwen2", tie=True)
    lora = make_lora(base, tmp_path / "adapter", r=4, alpha=16, std=0.05, ensure_weight_tying=True, **adapter)
    with pytest.raises(AdapterError, match="ensure_weight_tying") as exc:
        Source.open(base, lora=lora)
    assert "merge_and_unload" in exc.value.fix
