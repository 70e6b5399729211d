"""convert_memory: the imatrix route calibrates on convert's shipped medical text (never an evaluation split, never a
path outside the repo), and the peak figures are named for what they are: each process's VmHWM, read from /proc,
apart from wait4's ru_maxrss."""

from __future__ import annotations

import sys

import pytest

from edgemed.benchmarks import convert_memory


def test_the_imatrix_route_calibrates_on_the_shipped_medical_text():
    from edgemed.converters.gguf.calibration import IMATRIX_TEXTS, resolve, shipped

    args, kw = convert_memory.ROUTES["gguf-q4_k_m-imatrix"]
    text = args[args.index("--imatrix-from") + 1]
    assert resolve(text) == shipped(IMATRIX_TEXTS["medical"]) and kw["imatrix"]


def test_measure_reads_vmhwm_apart_from_ru_maxrss():
    pytest.importorskip("psutil")
    r = convert_memory.measure([sys.executable, "-c", "import time; b = bytearray(200 << 20); time.sleep(0.6)"])
    assert r["rc"] == 0 and "vmhwm" not in r
    assert r["vmhwm_sampled"] >= 200 << 20 and r["ru_maxrss"] >= 200 << 20
    row = {"vmhwm_sampled": r["vmhwm_sampled"], "peak_sampled_rss": r["peak_sampled_rss"]}
    assert convert_memory.peak_rss(row) == max(r["vmhwm_sampled"], r["peak_sampled_rss"])
    assert convert_memory.peak_rss({"vmhwm": 5 << 20, "peak_sampled_rss": 3 << 20}) == 5 << 20  # a row from before
