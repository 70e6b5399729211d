"""The self-test child says, as data, when layers asked for the GPU run on the CPU (``Placement.offload_unread``), so
``edgemed devices check --json`` carries it beside the placement in words."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from edgemed.runtime.engine import LoadSettings


def _cpu_only_build():
    llama_cpp = pytest.importorskip("llama_cpp")
    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build can offload to a GPU: the CPU-only case is another machine's")


def _child_says(capsys, path, load: LoadSettings) -> dict:
    from edgemed.runtime import selftest

    selftest._child(str(path), json.dumps(asdict(load)))
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_child_says_offload_asked_and_no_gpu_buffer(smollm2_gguf, capsys, monkeypatch):
    """A build that answers it can offload (faked here on a CPU build, as tests/test_llama_readback.py does) and
    placed every weight in a CPU buffer: the child's line names it; asked for no GPU layer, it is null."""
    from edgemed.runtime import llamacpp

    _cpu_only_build()
    monkeypatch.setattr(llamacpp.lib(), "llama_supports_gpu_offload", lambda: True)
    asked = LoadSettings(n_ctx=256, n_gpu_layers=-1, use_mmap=False, extra_buffers="none")
    said = _child_says(capsys, smollm2_gguf, asked)
    assert said["ok"] and said["offload_unread"].startswith("llama.cpp put none of the weights in a GPU buffer"), said
    assert said["offload_unread"] in said["placement"]  # the same fact, in words, in the placement
    said = _child_says(capsys, smollm2_gguf, LoadSettings(n_ctx=256, n_gpu_layers=0, use_mmap=False, extra_buffers="none"))
    assert said["ok"] and said["offload_unread"] is None, said


def test_devices_check_json_carries_the_childs_offload_unread(smollm2_gguf, tmp_path, monkeypatch):
    """On a CPU-only build a profile that asks for the GPU gets the reason as data in each passing verdict's child;
    one that asks for none gets null."""
    from click.testing import CliRunner

    from edgemed.cli import cli

    _cpu_only_build()
    monkeypatch.setenv("EDGEMED_CACHE_DIR", str(tmp_path / "cache"))  # no verdict cached by an earlier run
    for profile, expected in (("jetson-orin-nano-8gb", "this llama.cpp build cannot offload"), ("x86-avx2", None)):
        result = CliRunner().invoke(cli, ["devices", "check", str(smollm2_gguf), "--profile", profile, "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        unread = [v["child"]["offload_unread"] for v in report["verdicts"] if v["ok"]]
        assert unread, report
        for said in unread:
            assert (said is None) if expected is None else said.startswith(expected), (profile, said)
