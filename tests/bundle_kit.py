"""Helpers for the packaging tests: a tiny synthetic GGUF, a card, a key pair, a packed bundle."""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CARD = '''model_name = "tiny test model"
developer = "edgemed tests"
intended_use = "Exercising the packaging code; not for patients"
intended_users = ["software engineers"]
out_of_scope_use = "Any clinical decision"
known_limitations = "Random weights"
system_prompt = "You are a careful clinical assistant."
performance_validity = { accuracy = 0.0, note = "random" }
'''


def tiny_gguf(path: Path, *, n_layers: int = 2, extra_kv: dict | None = None) -> Path:
    """A valid GGUF (llama arch, random F32 weights, a 6-token vocab, a ChatML template): a few KB."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(2048)
    w.add_block_count(n_layers)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_vocab_size(6)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "c"])
    w.add_token_types([3, 3, 3, 1, 1, 1])
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)
    for key, value in (extra_kv or {}).items():
        w.add_string(key, value)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((6, 8)).astype(np.float32))
    for i in range(n_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def inputs(tmp: Path, gguf_name: str = "tiny.gguf", **kv) -> dict:
    """Files pack needs: model, LICENSE, card.toml."""
    tmp.mkdir(parents=True, exist_ok=True)
    model = tiny_gguf(tmp / gguf_name, **kv)
    lic = tmp / "LICENSE"
    lic.write_text("Apache License, Version 2.0 (test copy)\n")
    card = tmp / "card.toml"
    card.write_text(CARD)
    return {"model": model, "license": lic, "card": card}


def installed_tiny(tmp: Path) -> dict:
    """``inputs(tmp / "src")`` packed as "tiny" and installed with `edgemed install` (in ``$EDGEMED_HOME``)."""
    from click.testing import CliRunner

    from edgemed.cli import cli
    from edgemed.packaging.bundle import PackInputs, pack

    src = inputs(tmp / "src")
    out = tmp / "tiny.edgemed"
    pack(PackInputs(model=src["model"], license=src["license"], card=src["card"], name="tiny"), out)
    result = CliRunner().invoke(cli, ["install", str(out)])
    assert result.exit_code == 0, result.output
    return src


def keypair(tmp: Path, name: str = "key.pem") -> tuple[Path, Path]:
    from edgemed.packaging import signing

    pub, _ = signing.keygen(tmp / name)
    return tmp / name, pub


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def two_versions(tmp: Path) -> dict[str, tuple[Path, bytes]]:
    """Two bundles of one model name, different content: 'old' and 'new' -> (bundle path, manifest bytes).

    Both without a card version and packed at one instant ($SOURCE_DATE_EPOCH): neither is an older release than
    the other (edgemed/packaging/release_order.py), so a test may install either over the other with force alone,
    whichever second each was packed in."""
    import os

    from edgemed import env
    from edgemed.packaging.bundle import PackInputs, pack

    out = {}
    was = os.environ.get(env.SOURCE_DATE_EPOCH_VAR)
    os.environ[env.SOURCE_DATE_EPOCH_VAR] = "1735689600"  # 2025-01-01T00:00:00Z
    try:
        for label, layers in (("old", 2), ("new", 3)):
            src = inputs(tmp / f"src-{label}", n_layers=layers)
            man = pack(PackInputs(model=src["model"], license=src["license"], name="tiny"), tmp / f"{label}.edgemed")
            out[label] = (tmp / f"{label}.edgemed", man.to_bytes())
    finally:
        if was is None:
            del os.environ[env.SOURCE_DATE_EPOCH_VAR]
        else:
            os.environ[env.SOURCE_DATE_EPOCH_VAR] = was
    return out


def installed_alone(bundle: Path, name: str = "tiny") -> None:
    """``bundle`` installed as ``name`` with no other version kept (what was there is removed first): the state a
    test listed an update's steps from (``crash_kit.steps``). ``install --force`` instead would keep the version it
    replaces for rollback, and an install links the files whose blobs the store holds, in fewer steps than it
    copies new ones, so a step number would name another step."""
    import contextlib

    from edgemed.errors import StoreError
    from edgemed.packaging.store import Store

    with contextlib.suppress(StoreError):  # nothing installed under that name
        Store().remove(name)
    Store().install(bundle)
