"""A GGUF's facts (``edgemed.packaging.facts``) come from edgemed's bounded header reader, not from
``gguf.GGUFReader``, which builds numpy objects for every string of an array: an 8 MB file of a million empty
strings took `edgemed pack` to 1.6 GB of memory and 17 s, and the Ollama export's ``chat_template`` read it
without any check first. The facts of real files, the tokenizer hash included, stay what GGUFReader gave (a
bundle's manifest does not change when it is packed again)."""

from __future__ import annotations

import hashlib
import struct
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

import bundle_kit as kit
from edgemed.packaging.facts import chat_template, gguf_facts


def _strings_gguf(path: Path, n: int) -> Path:
    """A GGUF with no tensors whose vocabulary is ``n`` empty strings (8 bytes each), and a chat template."""
    def s(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 3))
        f.write(s(b"general.architecture") + struct.pack("<I", 8) + s(b"llama"))
        f.write(s(b"tokenizer.chat_template") + struct.pack("<I", 8) + s(kit.CHATML.encode()))
        f.write(s(b"tokenizer.ggml.tokens") + struct.pack("<II", 9, 8) + struct.pack("<Q", n))
        f.write(b"\0" * 8 * n)
    return path


def test_a_file_of_many_strings_is_read_in_bounded_memory(tmp_path):
    path = _strings_gguf(tmp_path / "strs.gguf", 300_000)  # 2.4 MB; GGUFReader: ~500 MB of numpy objects
    small = _strings_gguf(tmp_path / "small.gguf", 10)
    gguf_facts(small), chat_template(small)  # the imports, once, outside the measure
    tracemalloc.start()
    try:
        facts, _ = gguf_facts(path)
        template = chat_template(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    assert facts["arch"] == "llama" and facts["params"] == 0 and template == kit.CHATML
    tok = hashlib.sha256(b"tokenizer.ggml.tokens\0" + struct.pack("<IIQ", 9, 8, 300_000) + b"\0" * 8 * 300_000)
    assert facts["tokenizer_sha256"] == tok.hexdigest()


def _reader_facts(path: Path) -> dict:
    """The facts GGUFReader gave (the way edgemed computed them before), for comparison."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r")
    fields = reader.fields
    tok = hashlib.sha256()
    for key in sorted(k for k in fields if k.startswith("tokenizer.ggml.")):
        tok.update(key.encode() + b"\0")
        for part in fields[key].parts[2:]:
            tok.update(part.tobytes())
    template = fields["tokenizer.chat_template"].contents() if "tokenizer.chat_template" in fields else None
    arch = fields["general.architecture"].contents()
    return {"arch": arch, "tokenizer_sha256": tok.hexdigest(),
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
            "params": int(sum(int(t.n_elements) for t in reader.tensors)),
            "tensor_types": dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items())),
            "context_length": fields[f"{arch}.context_length"].contents(),
            "quant": gguf.LlamaFileType(int(fields["general.file_type"].contents())).name.removeprefix("MOSTLY_"),
            "chat_template": template}


def _check_same(path: Path) -> None:
    want = _reader_facts(path)
    facts, _ = gguf_facts(path)
    assert {k: facts[k] for k in want if k != "chat_template"} == {k: v for k, v in want.items() if k != "chat_template"}
    assert chat_template(path) == want["chat_template"]


def test_the_facts_of_a_small_model_are_what_gguf_reader_gave(tmp_path):
    _check_same(kit.tiny_gguf(tmp_path / "tiny.gguf"))


def test_the_facts_of_a_real_model_are_what_gguf_reader_gave(smollm2_gguf):
    _check_same(smollm2_gguf)  # 49k tokens, 49k merges, types, special ids: the same tokenizer hash


def test_a_damaged_string_array_is_refused_before_anything_is_allocated(tmp_path):
    from edgemed.errors import InputError

    path = _strings_gguf(tmp_path / "short.gguf", 1000)
    path.write_bytes(path.read_bytes()[:-8])  # the last string's length is missing
    for read in (gguf_facts, chat_template):
        with pytest.raises(InputError, match="is not a readable GGUF file"):
            read(path)
