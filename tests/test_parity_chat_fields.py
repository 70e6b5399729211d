"""What parity cannot see through the source's token ids: the header fields a chat reads, and the chat tokens.

Parity fed both sides the source's ids of raw text, so a GGUF whose chat template was edited, whose EOS id, add_bos,
special-token text, trained context or rope base was changed, or whose ``<|im_start|>`` / ``<|im_end|>`` rows were
wiped passed `check` (even F16's NMSE gate) and then chatted wrongly. Each broken file here is a tiny conversion
edited in place, as a user's copy could be.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

from click.testing import CliRunner  # noqa: E402

from edgemed.cli import cli  # noqa: E402
from edgemed.converters.pipeline import ConvertOptions, convert  # noqa: E402

import tiny  # noqa: E402


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-fields")
    ckpt = tiny.build_model(root / "llama", "llama")
    out = root / "llama-f16.gguf"
    convert(ckpt, out, ConvertOptions(out_type="f16", parity=False), echo=lambda s: None)
    return ckpt, out


def _edited(src: Path, dst: Path, edit) -> Path:
    import gguf

    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(dst, "r+")
    edit(reader)
    reader.data.flush()
    del reader
    return dst


def _set(key, value):
    def edit(r):
        f = r.fields[key]
        f.parts[f.data[0]][...] = value
    return edit


def _same_length(key, old: bytes, new: bytes):
    """Replace ``old`` by ``new`` (as long) in a string field, or in the one string of an array field that is ``old``."""
    def edit(r):
        f = r.fields[key]
        for i in f.data:
            part = f.parts[i]
            raw = bytes(part)
            if old in raw and (len(f.data) == 1 or raw == old):
                part[...] = np.frombuffer(raw.replace(old, new), dtype=np.uint8)
                return
        raise AssertionError(f"{old!r} not in {key}")
    return edit


def _wipe_rows(tokens):
    """Zero the embedding rows of ``tokens`` (the F16 token_embd)."""
    def edit(r):
        t = next(t for t in r.tensors if t.name == "token_embd.weight")
        rows = np.asarray(t.data)  # [vocab, hidden], a view of the mapped file
        rows[list(tokens)] = 0
    return edit


def _normal_type(token: int):
    """Make ``token`` an ordinary token: llama.cpp no longer reads its text in a prompt as that token."""
    def edit(r):
        f = r.fields["tokenizer.ggml.token_type"]
        f.parts[f.data[token]][...] = 1  # NORMAL
    return edit


BROKEN = {
    "template": (_same_length("tokenizer.chat_template", b"<|im_start|>", b"[INST]======"), "chat template"),
    "eos": (_set("tokenizer.ggml.eos_token_id", 0), "EOS id (tokenizer.ggml.eos_token_id): source 2, GGUF 0"),
    "add_bos": (_set("tokenizer.ggml.add_bos_token", True), "rule for adding BOS to a prompt"),
    "special_text": (_same_length("tokenizer.ggml.tokens", b"<|im_end|>", b"<|im_enX|>"),
                     "text of special token 2 (tokenizer.ggml.tokens): source '<|im_end|>', GGUF '<|im_enX|>'"),
    "special_type": (_normal_type(1), "token ids for a chat its template renders"),
    "context": (_set("llama.context_length", 64), "llama.context_length: source 256, GGUF 64"),
    "rope": (_set("llama.rope.freq_base", 100000.0), "llama.rope.freq_base: source 10000.0, GGUF 100000.0"),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_check_refuses_a_gguf_whose_chat_fields_are_not_the_sources(made, tmp_path, broken):
    ckpt, good = made
    edit, said = BROKEN[broken]
    bad = _edited(good, tmp_path / f"{broken}.gguf", edit)
    result = CliRunner().invoke(cli, ["check", str(ckpt), str(bad)])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in text and "PASS" not in text, text
    assert said in text and "Fix: convert the checkpoint again" in text, text


def test_the_intact_file_passes_and_its_report_names_the_fields(made, tmp_path):
    ckpt, good = made
    result = CliRunner().invoke(cli, ["check", str(ckpt), str(good)])
    assert result.exit_code == 0 and "PASS" in result.output, result.output
    report = convert(ckpt, tmp_path / "again.gguf", ConvertOptions(out_type="f16", parity=False), echo=lambda s: None)
    fields = report.tokenizer["runtime_fields"]
    assert fields["llama.context_length"] == 256 and fields["tokenizer.ggml.eos_token_id"] == 2, fields
    assert fields["chat_tokens"] > 10


def test_the_gate_scores_a_chat_in_the_sources_template(made, tmp_path):
    """The special tokens' rows wiped (the header intact): the raw prompts never use them, the chat prompt does."""
    from edgemed.converters.quality.parity import source_logits

    ckpt, good = made
    ids, _ = source_logits(ckpt)
    assert any(1 in t and 2 in t for t in ids), ids  # <|im_start|> and <|im_end|> reach the model
    bad = _edited(good, tmp_path / "rows.gguf", _wipe_rows((1, 2)))
    result = CliRunner().invoke(cli, ["check", str(ckpt), str(bad)])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "does not match its source" in text, text
