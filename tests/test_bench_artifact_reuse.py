"""``bench reproduce`` reuses an artifact in OUT/artifacts/ only when it is what its configuration measures: a Q4_K_M
file put at artifacts/f16.gguf beside F16's report was measured as the F16. One the user put there is refused, named,
and left as it is; one the bench converted itself and that no longer matches is converted again."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

from edgemed.benchmarks.harness import artifacts  # noqa: E402
from edgemed.constants import GGUF_TYPES  # noqa: E402
from edgemed.errors import InputError  # noqa: E402
from edgemed.files.hashing import file_sha256  # noqa: E402
from edgemed.formats.gguf_header import LORA_SHA_KEY, SOURCE_SHA_KEY  # noqa: E402

SOURCE = "5" * 64


def _gguf(path: Path, quant: str, source: str = SOURCE, lora: str | None = None) -> Path:
    """A GGUF whose header says what edgemed convert writes: its type, the checkpoint and any merged LoRA."""
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(GGUF_TYPES[quant].ftype)
    w.add_string(SOURCE_SHA_KEY, source)
    if lora:
        w.add_string(LORA_SHA_KEY, lora)
    w.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _report(path: Path, quant: str, source: str = SOURCE) -> None:
    report = {"output": str(path), "out_type": quant, "sha256": file_sha256(path), "source": {"sha256": source},
              "lora": None, "imatrix": None}
    Path(f"{path}.report.json").write_text(json.dumps(report))


@pytest.fixture()
def bench(tmp_path, monkeypatch):
    """A checkpoint folder whose digest the test sets, and ``edgemed convert`` standing in: it writes the GGUF and its
    report, and refuses an existing output without --force, as the real one does."""
    src = tmp_path / "checkpoint"
    src.mkdir()
    digest = {"now": SOURCE}
    monkeypatch.setattr(artifacts, "source_digest", lambda path, allow_pickle=False: digest["now"])
    converted = []

    def convert(cmd, check=False):
        out, quant = Path(cmd[cmd.index("-o") + 1]), cmd[cmd.index("--quant") + 1]
        if out.exists() and "--force" not in cmd:
            return subprocess.CompletedProcess(cmd, 1)
        _report(_gguf(out, quant, digest["now"]), quant, digest["now"])
        converted.append((out.name, "--force" in cmd))
        return subprocess.CompletedProcess(cmd, 0)
    monkeypatch.setattr(artifacts.subprocess, "run", convert)
    return src, tmp_path / "out", digest, converted


@pytest.mark.parametrize("put, why", [
    (lambda p: _gguf(p, "q4_k_m"), "is a q4_k_m GGUF (its general.file_type), not the f16 this configuration measures"),
    (lambda p: _gguf(p, "f16", lora="a" * 64), "has a LoRA adapter merged into it"),
    (lambda p: _gguf(p, "f16", source=SOURCE, lora=None).write_bytes(p.read_bytes() + b"\0" * 32),
     "is not the file its conversion report 'f16.gguf.report.json' describes"),
])
def test_a_file_put_in_place_of_the_bench_s_artifact_is_refused_and_kept(bench, put, why):
    """The bench converted f16.gguf, then another file was put at its name beside its report (a Q4_K_M copied there,
    a merged model, other bytes): it was reused because the report still named the checkpoint. It is refused,
    naming the file, why and the fix, and neither converted over nor deleted."""
    src, out, _, converted = bench
    assert [c.name for c in artifacts.prepare(src, out, ["f16"], [], {}, echo=lambda s: None)] == ["f16"]
    assert converted == [("f16.gguf", False)]
    f16 = out / "artifacts" / "f16.gguf"
    put(f16)
    placed = f16.read_bytes()
    with pytest.raises(InputError) as refused:
        artifacts.prepare(src, out, ["f16"], [], {}, echo=lambda s: None)
    assert str(f16) in refused.value.problem and why in refused.value.problem
    assert "move" in refused.value.fix and "another -o folder" in refused.value.fix
    assert f16.read_bytes() == placed and converted == [("f16.gguf", False)]


def test_the_bench_s_own_artifact_of_an_earlier_checkpoint_is_converted_again(bench):
    """The checkpoint at SOURCE changed since the bench converted its F16: that file is the bench's, so it is
    converted again (replaced whole) rather than refused; a user's own conversion of the earlier checkpoint is
    refused, before anything is converted."""
    src, out, digest, converted = bench
    said = []
    artifacts.prepare(src, out, ["f16"], [], {}, echo=said.append)
    _report(_gguf(out / "artifacts" / "q8_0.gguf", "q8_0"), "q8_0")  # made ahead of time, by the user
    digest["now"] = "6" * 64
    with pytest.raises(InputError, match="q8_0.gguf' was converted from another checkpoint"):
        artifacts.prepare(src, out, ["f16", "q8_0"], [], {}, echo=said.append)
    assert converted == [("f16.gguf", False)]  # the refusal comes first
    for name in ("q8_0.gguf", "q8_0.gguf.report.json"):  # the user moves theirs away
        (out / "artifacts" / name).unlink()
    artifacts.prepare(src, out, ["f16", "q8_0"], [], {}, echo=said.append)
    assert converted == [("f16.gguf", False), ("f16.gguf", True), ("q8_0.gguf", False)]
    assert any("converted from another checkpoint" in s and "converted again" in s for s in said)
    assert json.loads((out / "artifacts" / "f16.gguf.report.json").read_text())["source"]["sha256"] == "6" * 64
    assert [c.name for c in artifacts.prepare(src, out, ["f16", "q8_0"], [], {}, echo=said.append)] == ["f16", "q8_0"]
    assert len(converted) == 3  # both reused now
