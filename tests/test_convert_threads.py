"""`--threads N` bounds the torch work of a conversion and of `check` too (the HF parity reference, the importance
matrix, the ONNX export and onnxruntime-genai's builder child), not only llama.cpp and ONNX Runtime; torch's own
setting is put back afterwards for a process that goes on."""

from __future__ import annotations

import os
import subprocess
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

from edgemed.cli import cli  # noqa: E402

import tiny  # noqa: E402

BEFORE = 3  # torch's setting before the command: neither the machine's core count nor what is asked


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny.build_model(tmp_path_factory.mktemp("threads") / "llama", "llama")


@pytest.fixture
def seen(monkeypatch):
    """torch's intra-op threads as each probed torch step starts, by step; torch set to BEFORE, put back after."""
    import torch

    from edgemed.converters.gguf import imatrix
    from edgemed.converters.quality import parity

    found: dict[str, list[int]] = {}

    def probe(module, name):
        real = getattr(module, name)

        def wrapped(*a, **kw):
            found.setdefault(name, []).append(torch.get_num_threads())
            return real(*a, **kw)
        monkeypatch.setattr(module, name, wrapped)

    probe(parity, "source_logits")
    probe(imatrix, "compute_imatrix")
    own = torch.get_num_threads()
    torch.set_num_threads(BEFORE)
    yield found
    torch.set_num_threads(own)


def test_convert_and_check_run_torch_on_the_threads_asked(model, tmp_path, seen):
    import torch

    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(cli, ["convert", str(model), "--quant", "q4_0", "--threads", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert seen == {"compute_imatrix": [1], "source_logits": [1]}  # q4_0 is calibrated by default
    assert torch.get_num_threads() == BEFORE
    seen.clear()
    result = CliRunner().invoke(cli, ["check", str(model), str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert seen == {"source_logits": [1]} and torch.get_num_threads() == BEFORE
    seen.clear()
    result = CliRunner().invoke(cli, ["convert", str(model), "--to", "onnx", "--quant", "fp32", "--threads", "1",
                                      "-o", str(tmp_path / "m-onnx")])
    assert result.exit_code == 0, result.output
    assert seen == {"source_logits": [1]} and torch.get_num_threads() == BEFORE


def test_without_threads_torch_keeps_its_setting(model, tmp_path, seen):
    result = CliRunner().invoke(cli, ["convert", str(model), "--quant", "f16", "-o", str(tmp_path / "m.gguf")])
    assert result.exit_code == 0, result.output
    assert seen == {"source_logits": [BEFORE]}


def test_the_builder_child_gets_the_threads(model, tmp_path, monkeypatch):
    from edgemed.converters.onnx import builder

    envs = []

    def run(cmd, **kw):
        envs.append(kw["env"])
        return SimpleNamespace(returncode=1, stderr="stopped here")
    monkeypatch.setattr(subprocess, "run", run)
    for threads in (2, None):
        with pytest.raises(Exception, match="stopped here"):
            builder.build(model, tmp_path / "out", "fp32", cache=tmp_path / "cache", threads=threads)
    assert envs[0]["OMP_NUM_THREADS"] == "2"
    assert envs[1].get("OMP_NUM_THREADS") == os.environ.get("OMP_NUM_THREADS")
