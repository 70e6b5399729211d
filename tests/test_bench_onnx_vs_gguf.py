"""onnx_vs_gguf's measured process: GGUF runs load with the device profile's settings (CPU profiles read the file in,
decision 0004), and peak RSS is the process's own VmHWM in MiB, under a name that says MiB."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("llama_cpp")

from edgemed.benchmarks import onnx_vs_gguf  # noqa: E402


def test_the_gguf_arm_loads_as_the_profile_says(smollm2_gguf):
    r = onnx_vs_gguf._gguf_decode(smollm2_gguf, 4, 1, "x86-avx2", n_ctx=256)
    assert r["device_profile"] == "x86-avx2" and r["load_mode"] == "read in"  # the profile's use_mmap = false


def test_peak_rss_is_the_worker_s_own_high_water_mark_in_mib(monkeypatch, capsys):
    from edgemed.benchmarks.harness import child

    monkeypatch.setattr(onnx_vs_gguf, "_gguf_decode", lambda *a: {"prompt_tokens": 8, "prefill_s": 0.5, "decode_s": 1.0})
    monkeypatch.setattr(child, "peak_rss_bytes", lambda: 300 << 20)  # VmHWM of this process, as child reads it
    onnx_vs_gguf.worker("gguf", "m.gguf", 5, 1, None, "x86-avx2")
    r = json.loads(capsys.readouterr().out)
    assert r["peak_rss_mib"] == 300 and "peak_rss_mb" not in r
