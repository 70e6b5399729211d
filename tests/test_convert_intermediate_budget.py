"""A quantized conversion holds its F16/BF16 intermediate to the float gate before the quantized file's top-1 gate.
Where that intermediate is larger than the memory budget the float gate cannot run: the conversion is refused
before any work, naming the ways on, instead of writing a file whose report only says the gate was left out."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")
pytest.importorskip("psutil")

from click.testing import CliRunner  # noqa: E402

from edgemed.cli import cli  # noqa: E402
from edgemed.converters.budget import peaks  # noqa: E402
from edgemed.converters.budget.peaks import GIB  # noqa: E402

import tiny  # noqa: E402

# DeepSeek-R1-Distill-Qwen-7B's layer and vocabulary shapes with 2 layers: a 3.2 GB BF16 intermediate
CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": 2, "hidden_size": 3584,
          "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
          "tie_word_embeddings": False, "rope_theta": 1000000.0, "max_position_embeddings": 4096,
          "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16"}


def _shapes(c: dict) -> dict[str, list[int]]:
    h, ff, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    out = {"model.embed_tokens.weight": [v, h], "lm_head.weight": [v, h], "model.norm.weight": [h]}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h],
                p + "self_attn.q_proj.weight": [h, h], p + "self_attn.q_proj.bias": [h],
                p + "self_attn.k_proj.weight": [kv, h], p + "self_attn.k_proj.bias": [kv],
                p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.v_proj.bias": [kv],
                p + "self_attn.o_proj.weight": [h, h], p + "mlp.gate_proj.weight": [ff, h],
                p + "mlp.up_proj.weight": [ff, h], p + "mlp.down_proj.weight": [h, ff]}
    return out


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """config.json, a tokenizer and one BF16 safetensors file whose data is a hole (sparse: no disk used)."""
    out = tmp_path_factory.mktemp("big") / "qwen2-wide"
    out.mkdir()
    tiny.build_tokenizer(out, "qwen2")
    (out / "config.json").write_text(json.dumps(CONFIG))
    header, offset = {}, 0
    for name, shape in _shapes(CONFIG).items():
        n = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(out / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)
    return out


def test_a_quantized_conversion_whose_intermediate_exceeds_the_budget_is_refused_before_work(big, tmp_path, monkeypatch):
    from edgemed.converters.source.checkpoint import Checkpoint

    started = []
    monkeypatch.setattr("edgemed.converters.provenance.source_info", lambda *a: started.append(a))  # hashing: the first work
    inter = peaks.intermediate_bytes(Checkpoint.open(big))
    assert inter > 3 * 10**9
    peak = peaks.estimate_for_dir(big, "gguf", out_type="q8_0").resident
    assert peak < inter  # the premise: the conversion's own peak fits a budget its intermediate does not
    room = (peak + inter) // 2
    out = tmp_path / "out"
    out.mkdir()
    r = CliRunner().invoke(cli, ["convert", str(big), "--quant", "q8_0", "-o", str(out / "m.gguf")],
                           env={"EDGEMED_MEMORY_BUDGET": str(room)})
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert "Traceback" not in text and "BF16 intermediate the quantizer reads" in text, text
    assert f"about {inter / GIB:.1f} GiB" in text and f"than the {room / GIB:.1f} GiB memory budget" in text
    need = -(-inter // GIB)
    assert f"--memory-budget {need}GiB" in text and "--no-parity" in text and "Nothing was written" in text
    assert started == [] and list(out.iterdir()) == []


def test_the_intermediate_bound_holds_the_written_file(tmp_path):
    """The bound the refusal uses is at least the intermediate the tiny conversion writes, so a conversion the
    check lets through never finds its intermediate over the same budget."""
    from edgemed.converters.source.checkpoint import Checkpoint
    from edgemed.converters import arch_spec
    from edgemed.converters.gguf.tokenizer import plan_vocab
    from edgemed.converters.gguf.writer import write_float_gguf

    for arch in ("llama", "qwen2"):
        ckpt = Checkpoint.open(tiny.build_model(tmp_path / arch, arch))
        vocab = plan_vocab(ckpt.path, int(ckpt.hparam("vocab_size")), None)
        written = tmp_path / f"{arch}-f16.gguf"
        write_float_gguf(ckpt, arch_spec(ckpt.architecture), vocab, written, "f16")
        assert written.stat().st_size <= peaks.intermediate_bytes(ckpt) < written.stat().st_size + 2 * 2**20
