"""`edgemed export` hands on one GGUF file: an ONNX bundle (a folder of graph files) or an adapter-only bundle (no
model) is refused for --gguf, --llama-server and --ollama, naming the bundle's format and what to do (--gguf was an
IsADirectoryError traceback, --llama-server exited 0 printing `--model .../model/onnx`); a LICENSE that is not UTF-8
(pack takes one) exports, its odd bytes shown as U+FFFD (it was a UnicodeDecodeError traceback)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import bundle_kit as kit
from edgemed.cli import cli
from edgemed.errors import InputError
from edgemed.packaging import export as ex
from edgemed.packaging.bundle import PackInputs, pack, verify_dir

BASE = "ab" * 32


def _bundle(root: Path, model: dict, files: dict[str, tuple[bytes, str]], **extra) -> Path:
    """A bundle directory written by hand: ``files`` maps a path to (bytes, role)."""
    for path, (data, _) in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    man = {"schema": "edgemed.bundle/1", "name": "x", "model": model, **extra,
           "files": [{"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest(), "role": role}
                     for p, (d, role) in files.items()]}
    (root / "manifest.json").write_text(json.dumps(man))
    return root


def _onnx(root: Path) -> Path:
    return _bundle(root, {"format": "onnx", "path": "model/onnx"},
                   {"model/onnx/model.onnx": (b"not really onnx", "model"), "LICENSE": (b"lic\n", "license")})


def _adapters(root: Path) -> Path:
    data = b"GGUF adapter bytes"
    ad = {"name": "cardio", "path": "adapters/cardio.gguf", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
          "base_source_sha256": BASE}
    return _bundle(root, {"format": "adapters", "path": "adapters", "base_source_sha256": BASE},
                   {"adapters/cardio.gguf": (data, "adapter"), "LICENSE": (b"lic\n", "license")}, adapters=[ad])


@pytest.mark.parametrize("make, says", [(_onnx, "is an onnx bundle"), (_adapters, "holds only LoRA adapters")],
                         ids=["onnx", "adapters"])
@pytest.mark.parametrize("flag", ["--gguf", "--llama-server", "--ollama"])
def test_a_bundle_without_a_gguf_is_refused_for_every_gguf_export(tmp_path, make, says, flag):
    b = make(tmp_path / "b")
    verify_dir(b)  # a sound bundle of its kind
    out = tmp_path / "out"
    args = [flag] if flag == "--llama-server" else [flag, str(out)]
    r = CliRunner().invoke(cli, ["export", str(b), *args])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert says in r.output and f"{flag} needs a bundle whose model is a GGUF" in r.output, r.output
    assert "llama-server --model" not in r.output and not out.exists()
    for call in (lambda v: ex.copy_verified(v, out), ex.llama_server_command, lambda v: ex.export_ollama(v, out)):
        with pytest.raises(InputError, match="needs a bundle whose model is a GGUF"):
            call(verify_dir(b))
    assert not out.exists()


def test_a_latin1_license_exports_with_its_odd_bytes_replaced(tmp_path):
    src = kit.inputs(tmp_path / "src")
    src["license"].write_bytes("Copyright (c) 2024 Universit\xe9 de Montr\xe9al\n".encode("latin-1"))
    pack(PackInputs(model=src["model"], license=src["license"], card=src["card"], name="tiny", use_report=False),
         tmp_path / "b", as_dir=True)
    out = tmp_path / "ollama"
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "b"), "--ollama", str(out)])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert 'LICENSE """Copyright (c) 2024 Universit\ufffd de Montr\ufffdal"""' in (out / "Modelfile").read_text(encoding="utf-8")


def test_a_license_too_large_for_a_modelfile_is_refused_unread(tmp_path, monkeypatch):
    src = kit.inputs(tmp_path / "src")
    src["license"].write_bytes(b"MIT License\n" + b"x" * 4096)
    pack(PackInputs(model=src["model"], license=src["license"], name="tiny", use_report=False), tmp_path / "b", as_dir=True)
    monkeypatch.setattr(ex, "MAX_LICENSE_BYTES", 1024)
    with pytest.raises(InputError, match="LICENSE of 'tiny' is larger than 1024 bytes"):
        ex.modelfile(verify_dir(tmp_path / "b"), "tiny.gguf", kit.CHATML)
