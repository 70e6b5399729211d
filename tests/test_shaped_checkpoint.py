"""benchmarks/shaped_checkpoint: a real architecture with random weights, written shard by shard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from edgemed.benchmarks import shaped_checkpoint as sc  # noqa: E402
from edgemed.errors import InputError  # noqa: E402

import tiny  # noqa: E402

R1_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "deepseek-r1-distill-qwen-1.5b"  # MIT, its LICENSE and README beside it


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small trained byte-level BPE tokenizer (Qwen2's split), saved as a checkpoint's tokenizer files."""
    out = tmp_path_factory.mktemp("tok")
    tiny.build_tokenizer(out, "qwen2")
    return out


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("shaped") / "tiny"
    sc.write_checkpoint(out, "tiny", tokenizer_dir, seed=0)
    return out


@pytest.fixture(scope="module")
def qwen_tokenizer_dir(tmp_path_factory):
    """The Qwen2.5 stand-in's tokenizer, read from its pip-packaged GGUF (skipped when not installed)."""
    from transformers import AutoTokenizer

    from edgemed.converters.source import pip_models

    try:
        gguf = pip_models.gguf_file("qwen2.5-0.5b-instruct")
    except InputError as exc:
        pytest.skip(f"Qwen2.5 stand-in not installed: {exc.fix}")
    out = tmp_path_factory.mktemp("qwen-tok")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def test_7b_shape_is_the_papers_model():
    config = sc.shape_config("r1-distill-qwen-7b")
    real_15b = json.loads((R1_FIXTURE / "config.json").read_text())
    assert set(config) == set(real_15b)  # the real file's field set
    own = {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
           "num_key_value_heads": 4, "vocab_size": 152064, "max_window_layers": 28}
    assert {k: config[k] for k in own} == own
    assert {k: v for k, v in config.items() if k not in own} == {k: v for k, v in real_15b.items() if k not in own}
    shapes = sc.tensor_shapes(config)  # meta device: nothing is allocated
    assert sc.parameter_count(config) == 7_615_616_512
    assert shapes["lm_head.weight"] == (152064, 3584) and shapes["model.embed_tokens.weight"] == (152064, 3584)
    assert shapes["model.layers.27.self_attn.k_proj.bias"] == (512,)
    assert "model.layers.0.self_attn.o_proj.bias" not in shapes
    shards = sc.plan_shards(shapes, 2, 3 * 10**9)
    assert [n for s in shards for n in s] == list(shapes)
    assert len(shards) == 6


def test_tiny_loads_in_transformers_with_its_config(tiny_ckpt):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    written = json.loads((tiny_ckpt / "config.json").read_text())
    assert written == sc.shape_config("tiny")
    cfg = AutoConfig.from_pretrained(tiny_ckpt)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.vocab_size) == (64, 2, 2, 152064)
    assert cfg.tie_word_embeddings is False and cfg.use_sliding_window is False
    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32)
    assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    assert abs(float(model.model.embed_tokens.weight.detach().std()) - 0.08) < 0.002
    logits = model(torch.arange(1, 20)[None]).logits[0]
    assert torch.isfinite(logits).all()
    assert logits.argmax(-1).unique().numel() > 5  # not one answer everywhere
    assert "random" in (tiny_ckpt / "EDGEMED_SOURCE.txt").read_text()
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sc.tensor_shapes(written))


def test_same_seed_same_tensors_whatever_the_sharding(tmp_path, tokenizer_dir, tiny_ckpt):
    from safetensors import safe_open

    split = tmp_path / "split"
    sc.write_checkpoint(split, "tiny", tokenizer_dir, seed=0, shard_bytes=10**6)
    index = json.loads((split / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    other = tmp_path / "seed1"
    sc.write_checkpoint(other, "tiny", tokenizer_dir, seed=1)
    name = "model.layers.1.mlp.down_proj.weight"
    with safe_open(tiny_ckpt / "model-00001-of-00001.safetensors", "pt") as a, \
            safe_open(split / index["weight_map"][name], "pt") as b, \
            safe_open(other / "model-00001-of-00001.safetensors", "pt") as c:
        assert a.get_tensor(name).equal(b.get_tensor(name))
        assert not a.get_tensor(name).equal(c.get_tensor(name))


def test_existing_output_and_bad_input_are_refused(tmp_path, tokenizer_dir):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("user data")
    with pytest.raises(InputError, match="already exists"):
        sc.write_checkpoint(mine, "tiny", tokenizer_dir)
    assert (mine / "keep.txt").read_text() == "user data"
    with pytest.raises(InputError, match="Unknown shape"):
        sc.shape_config("r1-distill-qwen-70b")
    with pytest.raises(InputError, match="no tokenizer"):
        sc.write_checkpoint(tmp_path / "out", "tiny", mine)
    with pytest.raises(InputError, match="--bpe-from"):
        sc.write_checkpoint(tmp_path / "out", "tiny", R1_FIXTURE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no half-written output or debris left
    assert sc.parse_override("num_hidden_layers=4") == ("num_hidden_layers", 4)
    assert sc.parse_override("torch_dtype=float16") == ("torch_dtype", "float16")
    with pytest.raises(InputError):
        sc.parse_override("novalue")


def test_override_and_cli(tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "f16"
    rc = sc.main(["--shape", "tiny", "--tokenizer-from", str(tokenizer_dir), "-o", str(out),
                  "--override", "torch_dtype=float16", "--override", "num_hidden_layers=1"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["shards"] == 1
    config = json.loads((out / "config.json").read_text())
    assert (config["torch_dtype"], config["num_hidden_layers"]) == ("float16", 1)
    assert sc.main(["--shape", "tiny", "--tokenizer-from", str(tokenizer_dir), "-o", str(out)]) == 2


def test_convert_to_f16_passes_parity(tiny_ckpt, tmp_path):
    pytest.importorskip("llama_cpp")
    from edgemed.converters.pipeline import ConvertOptions, convert

    out = tmp_path / "tiny-f16.gguf"
    report = convert(tiny_ckpt, out, ConvertOptions(out_type="f16"), echo=lambda s: None)
    assert report.parity["passed"] is True
    assert report.tokenizer["n_vocab"] == 152064  # 384 tokenizer tokens, padded to the config's vocab_size


def test_real_r1_tokenizer_is_composed_and_padded(tmp_path, qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    from edgemed.converters.gguf.tokenizer import plan_vocab

    out = tmp_path / "r1"
    sc.write_checkpoint(out, "tiny", R1_FIXTURE, bpe_from=qwen_tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 151665
    assert tok.convert_tokens_to_ids(["<think>", "<｜User｜>", "<｜begin▁of▁sentence｜>"]) == [151648, 151644, 151646]
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<｜Assistant｜><think>\n")
    plan = plan_vocab(out, 152064)
    assert len(plan.tokens) == 152064 and plan.tokens[151665] == b"[PAD151665]"
    assert plan.tokens[151648] == "<think>".encode()
