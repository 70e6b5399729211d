"""The layer-at-a-time HF reference (converters/quality/layered.py) against the whole-model one it replaces.

The oracles below are the whole-model code that ``parity.source_logits`` and ``imatrix.compute_imatrix`` ran
before (whole model in float32, PEFT unmerged for logits, PEFT merged for the imatrix); they live here only.

Tolerance. Without an adapter the same transformers modules run the same kernels on the same shapes, so the
logits are bit-identical where the LM head is one block (tiny models: asserted exactly); a head split into
vocabulary blocks changes only the GEMM's N, which measured bit-identical too on SmolLM2 and Qwen2.5-0.5B.
With an adapter the layered run merges ``W + s·B·A`` in float32 where PEFT adds ``s·B·(A·x)``: rounding of
the order of float32 epsilon (1.2e-7) per layer, measured at most 3e-6 of the largest logit on the tiny
models. ``TOL`` = 1e-5 of the largest |logit| bounds both with room and is still 5 orders of magnitude below
what a conversion's F16 gate (NMSE 1e-4, i.e. ~1e-2 relative) can see.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

import tiny  # noqa: E402

TOL = 1e-5  # of the largest |logit|; see the module docstring


# -- the whole-model oracles ----------------------------------------------------------------
def whole_logits(model_dir: Path, lora: Path | None, prompts=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgemed.converters.quality.layered import CTX_MARGIN
    from edgemed.converters.quality.prompts import token_lists

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(lora))
    model.eval()
    ids, logits = [], []
    with torch.inference_mode():
        for t in token_lists(tok, prompts, model.config.max_position_embeddings - CTX_MARGIN):  # the gate's ids (its chat in the template too): the oracle checks the math
            ids.append(t)
            logits.append(model(torch.tensor([t])).logits[0].float().numpy())
    return ids, logits


def whole_imatrix(ckpt, spec, text_path: Path, lora: Path | None = None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgemed.converters.gguf.imatrix import CHUNK_TOKENS, MAX_CHUNKS, read_calibration_text

    tok = AutoTokenizer.from_pretrained(ckpt.path)
    model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32)
    if lora is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(lora)).merge_and_unload()
    model.eval()
    name_map = spec.name_map(int(ckpt.hparam("num_hidden_layers")))
    # a tied head is the embedding: its GGUF has no output.weight, and llama-imatrix keys the head token_embd.weight
    tied = {"output.weight": "token_embd.weight"} if model.config.tie_word_embeddings else {}
    sums, counts = {}, {}
    for module_name, module in model.named_modules():
        found = name_map.get_type_and_name(f"{module_name}.weight", try_suffixes=(".weight",))
        if not isinstance(module, torch.nn.Linear) or found is None:
            continue

        def hook(_m, inputs, _o, key=tied.get(found[1], found[1])):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            sums[key] = sums.get(key, 0) + (x * x).sum(dim=0)
            counts[key] = counts.get(key, 0) + x.shape[0]

        module.register_forward_hook(hook)
    ids = tok("\n\n".join(read_calibration_text(text_path)), add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        for i in range(0, min(len(ids), CHUNK_TOKENS * MAX_CHUNKS), CHUNK_TOKENS):
            model(torch.tensor([ids[i:i + CHUNK_TOKENS]]))
    return {k: (sums[k] / counts[k]).numpy().astype(np.float32) for k in sums}


def assert_same_logits(want, got, exact: bool = False) -> None:
    want_ids, want_logits = want
    got_ids, got_logits = got
    assert got_ids == want_ids
    assert [g.shape for g in got_logits] == [w.shape for w in want_logits]
    assert all(g.dtype == np.float32 for g in got_logits)
    a, b = np.concatenate(want_logits), np.concatenate(got_logits)
    if exact:
        assert np.array_equal(a, b)
    tol = TOL * float(np.abs(a).max())
    assert float(np.abs(a - b).max()) <= tol
    top2 = np.sort(a, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tol  # positions whose argmax rounding cannot flip
    assert (a.argmax(1) == b.argmax(1))[clear].all()


def _src(model: Path, lora: Path | None):
    """The opened ``Source`` a command hands down: the checkpoint and, when given, the adapter."""
    from edgemed.converters.source.source import Source

    return Source.open(model, lora=lora)


# -- tiny checkpoints -----------------------------------------------------------------------
def _resave(src: Path, out: Path, *, dtype=None, shard: str | None = None) -> Path:
    """``src`` re-saved as ``dtype`` and/or in shards of ``shard`` (tokenizer files copied)."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    return out


@pytest.fixture(scope="module")
def tinies(tmp_path_factory):
    root = tmp_path_factory.mktemp("layered")
    out = {}
    for arch in ("llama", "qwen2"):
        for tie in (False, True):
            base = tiny.build_model(root / f"{arch}-{tie}", arch, tie=tie)
            out[arch, tie, "single"] = base
            out[arch, tie, "sharded"] = _resave(base, root / f"{arch}-{tie}-sharded", shard="100KB")
            out[arch, tie, "lora"] = tiny.build_lora(base, root / f"{arch}-{tie}-lora")
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("with_lora", [False, True], ids=["base", "lora"])
def test_layered_logits_equal_whole_model(tinies, arch, tie, layout, with_lora):
    from edgemed.converters.quality.layered import reference_logits

    model = tinies[arch, tie, layout]
    if layout == "sharded":
        assert (model / "model.safetensors.index.json").exists() and len(list(model.glob("*.safetensors"))) > 1
    lora = tinies[arch, tie, "lora"] if with_lora else None
    assert_same_logits(whole_logits(model, lora), reference_logits(_src(model, lora)), exact=not with_lora)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_sources_are_widened_like_transformers(tinies, tmp_path, dtype):
    import torch

    from edgemed.converters.quality.layered import reference_logits

    model = _resave(tinies["qwen2", False, "single"], tmp_path / dtype, dtype=getattr(torch, dtype), shard="60KB")
    assert_same_logits(whole_logits(model, None), reference_logits(_src(model, None)), exact=True)


def _adapter(base: Path, out: Path, **config) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, **config))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(out, save_embedding_layers=False)
    return out


@pytest.mark.parametrize("config", [
    {"target_modules": ["q_proj", "lm_head"]},  # a LoRA delta on the head, merged block by block
    {"target_modules": ["v_proj"], "modules_to_save": ["lm_head", "embed_tokens"]},  # full replacements
    {"target_modules": ["down_proj"], "use_rslora": True, "rank_pattern": {"layers.1.mlp.down_proj": 2}},
], ids=["head-lora", "modules-to-save", "rslora-rank-pattern"])
def test_adapter_forms_match_peft(tinies, tmp_path, config):
    from edgemed.converters.quality.layered import reference_logits

    base = tinies["llama", False, "single"]
    lora = _adapter(base, tmp_path / "adapter", **config)
    want = whole_logits(base, lora)
    assert_same_logits(want, reference_logits(_src(base, lora)))
    plain = np.concatenate(whole_logits(base, None)[1])
    assert np.abs(np.concatenate(want[1]) - plain).max() > 0.1  # the adapter really changes the model


def test_small_row_blocks_and_one_layer_at_a_time(tinies):
    """Embeddings gathered and the head filled over many small blocks; never two layers' weights at once."""
    import torch

    from edgemed.converters.source.checkpoint import Checkpoint
    from edgemed.converters.quality.layered import LayeredModel

    model_dir = tinies["llama", False, "sharded"]
    want = whole_logits(model_dir, None)
    model = LayeredModel(Checkpoint.open(model_dir), block_bytes=4 * 64 * 50)  # 50 rows a block: 8 blocks of 384
    assert len(list(model.blocks("lm_head.weight", None))) == 8
    loaded = []

    def watch(name, layer):
        real = [i for i, lay in enumerate(model.decoder.layers) if not next(lay.parameters()).is_meta]
        loaded.append((name, real))
        return []

    with torch.inference_mode():
        got = want[0], model.logits(model.hidden(want[0], watch))
    assert loaded == [("model.layers.0", [0]), ("model.layers.1", [1])]
    assert all(p.is_meta for p in model.skeleton.parameters())  # everything released after the run
    assert_same_logits(want, got)


# -- imatrix ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,tie,with_lora", [("llama", False, False), ("llama", False, True), ("qwen2", True, False)])
def test_imatrix_equals_whole_model(tinies, tmp_path, arch, tie, with_lora):
    from edgemed.converters import arch_spec
    from edgemed.converters.source.checkpoint import Checkpoint
    from edgemed.converters.gguf.imatrix import compute_imatrix
    from edgemed.converters.source.source import Source

    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(tiny.CORPUS[:30]))  # several 256-token chunks
    ckpt = Checkpoint.open(tinies[arch, tie, "single"])
    spec = arch_spec(ckpt.architecture)
    lora = tinies[arch, tie, "lora"] if with_lora else None
    want = whole_imatrix(ckpt, spec, calib, lora)
    got = compute_imatrix(Source.with_adapter(ckpt, lora), spec, calib, echo=lambda s: None).values
    assert list(got) == list(want) and ("token_embd.weight" if tie else "output.weight") in got and "blk.1.ffn_down.weight" in got
    for name in want:
        assert got[name].dtype == np.float32
        if with_lora:
            np.testing.assert_allclose(got[name], want[name], rtol=TOL, atol=0)
        else:
            np.testing.assert_array_equal(got[name], want[name])


# -- parity report on a converted GGUF ----------------------------------------------------------
@pytest.mark.parametrize("with_lora", [False, True], ids=["base", "lora"])
def test_gguf_parity_report_equals_whole_model_reference(tinies, tmp_path, with_lora):
    pytest.importorskip("llama_cpp")
    from edgemed.converters.quality.layered import reference_logits
    from edgemed.converters.quality.parity import check_gguf
    from edgemed.converters.pipeline import ConvertOptions, convert

    model = tinies["qwen2", True, "single"]
    lora = tinies["qwen2", True, "lora"] if with_lora else None
    out = tmp_path / "q.gguf"
    convert(model, out, ConvertOptions(out_type="q4_k_m", parity=False, lora=lora), echo=lambda s: None)
    want = check_gguf(_src(model, lora), out, "q4_k_m", reference=whole_logits(model, lora))
    got = check_gguf(_src(model, lora), out, "q4_k_m", reference=reference_logits(_src(model, lora)))
    assert got.passed == want.passed and got.n_positions == want.n_positions and got.top1 == want.top1
    for key in ("nmse", "kld", "max_abs_diff"):
        assert getattr(got, key) == pytest.approx(getattr(want, key), rel=1e-4 if with_lora else 1e-12), key


# -- memory estimate ------------------------------------------------------------------------
QWEN_7B = {"hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
           "vocab_size": 152064, "num_hidden_layers": 28}


def test_estimate_counts_one_layer_hidden_states_and_logits():
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from edgemed.converters.quality.layered import estimate_peak_bytes

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN_7B), dtype=torch.float32)
    layer = 4 * sum(p.numel() for p in model.model.layers[0].parameters())
    base = estimate_peak_bytes(QWEN_7B, 150, logits=False)
    assert layer < base < layer + 600 * 2**20  # one layer (0.93 GB) + tensors in flight, not the model
    assert estimate_peak_bytes(QWEN_7B, 150) - base == 4 * 150 * QWEN_7B["vocab_size"]
    assert estimate_peak_bytes(QWEN_7B, 8192, longest=256, logits=False) > base
    assert estimate_peak_bytes(QWEN_7B, 150, logits=False, lora=True) > base
    assert estimate_peak_bytes(QWEN_7B, 150) < 6 * 2**30 - 2**30  # leaves the budget room for the process itself


# -- real checkpoints -----------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_layered_equals_whole_model(smollm2_hf):
    from edgemed.converters.quality.layered import reference_logits

    assert_same_logits(whole_logits(smollm2_hf, None), reference_logits(_src(smollm2_hf, None)))


QWEN = "qwen2.5-0.5b-instruct"


def _qwen_checkpoint() -> Path | None:
    """Where ``pip_models.hf_checkpoint()`` built it (as tests/test_onnx_real.py looks), at collection time,
    before the autouse fixture points EDGEMED_HOME at a temporary folder."""
    from conftest import TEST_CACHE

    from edgemed import env

    candidates = [env.home() / "checkpoints" / QWEN, env.home() / "cache" / "checkpoints" / QWEN, TEST_CACHE / "checkpoints" / QWEN]
    return next((p for p in candidates if (p / "config.json").exists()), None)


QWEN_DIR = _qwen_checkpoint()


@pytest.mark.slow
@pytest.mark.skipif(QWEN_DIR is None, reason=f"{QWEN} HF checkpoint not built here (run pip_models.hf_checkpoint('{QWEN}') once)")
def test_qwen_layered_equals_whole_model():
    from edgemed.converters.quality.layered import reference_logits

    assert_same_logits(whole_logits(QWEN_DIR, None), reference_logits(_src(QWEN_DIR, None)))


def test_adapter_parts_the_merge_cannot_apply_are_refused(tinies, tmp_path):
    """An embedding LoRA (lora_embedding_A/B) was dropped silently by the merge; PEFT's whole-model reference
    would have caught that, a reference that merges with the same class cannot, so the adapter is refused."""
    from edgemed.converters.quality.layered import reference_logits
    from edgemed.errors import AdapterError

    base = tinies["llama", False, "single"]
    lora = _adapter(base, tmp_path / "emb", target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(AdapterError, match="lora_embedding_A"):
        reference_logits(_src(base, lora))
