"""benchmarks/convert_cost and process_memory: arguments, the process-tree sampler, the cgroup cap, one tiny run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("psutil")

from edgemed.benchmarks import convert_cost as cc  # noqa: E402
from edgemed.benchmarks.process_memory import MemoryCap, TreeSampler, parse_size  # noqa: E402
from edgemed.errors import InputError  # noqa: E402

MB = 10**6

# A parent holding 200 MB of its own memory and a 64 MB memory-mapped file, with a child holding 150 MB,
# alive together for a second.
TREE = textwrap.dedent("""
    import mmap, subprocess, sys, time
    path = sys.argv[1]
    with open(path, "wb") as f:
        f.write(b"x" * (64 << 20))
    kid = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(150_000_000); time.sleep(2.5)"])
    mine = bytearray(200_000_000)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        total = sum(m[i] for i in range(0, len(m), 4096))
        time.sleep(2.0)
    kid.wait()
""")


def _measure(code: str, tmp_path, cap=None, *args):
    return cc.measure([sys.executable, "-c", code, *args], tmp_path / "log.txt", cap)


def test_sizes_and_arguments(tmp_path):
    assert parse_size("6GiB") == 6 * 2**30
    assert parse_size("6.5G") == 6_500_000_000
    assert parse_size("512 MiB") == 512 * 2**20
    assert parse_size("1073741824") == 2**30
    for bad in ("six GiB", "6XB", "0", "-1G", ""):
        with pytest.raises(InputError):
            parse_size(bad)
    with pytest.raises(InputError, match="--memory-cap must be a size"):
        cc.parse_args(["--memory-cap", "lots"])
    with pytest.raises(InputError, match="not a file"):
        cc.parse_args(["--imatrix-from", str(tmp_path / "missing.jsonl")])
    (tmp_path / "taken.gguf").write_bytes(b"")
    with pytest.raises(InputError, match="already exists"):
        cc.parse_args(["-o", str(tmp_path / "taken.gguf")])
    assert cc.parse_args(["--with-parity"]).parity == "both"  # the old flag keeps its meaning
    assert cc.parse_args([]).parity == "with"
    cmd = cc.convert_command(tmp_path, tmp_path / "o.gguf", "q4_k_m", False, tmp_path / "c.txt", 2)
    assert cmd[-7:] == ["-o", str(tmp_path / "o.gguf"), "--no-parity", "--imatrix-from", str(tmp_path / "c.txt"),
                        "--threads", "2"]
    plain = cc.convert_command(tmp_path, tmp_path / "o.gguf", "q4_k_m", True, None, None)
    assert plain[-1] == "--no-imatrix" and "--imatrix-from" not in plain  # plain: never convert's default
    assert cc.main(["--memory-cap", "lots"]) == 2


def test_sampler_sees_the_whole_tree_split_by_kind(tmp_path):
    r = _measure(TREE, tmp_path, None, str(tmp_path / "mapped.bin"))
    assert r["rc"] == 0
    m = r["memory"]
    assert len(m["processes"]) >= 2  # the child was found
    assert m["tree_peak_anon_bytes"] >= 330 * MB  # 200 MB + 150 MB held at the same time
    assert m["tree_peak_file_bytes"] >= 60 * MB  # the mapped file, counted apart
    assert 200 * MB <= m["max_vmhwm_bytes"] < m["tree_peak_rss_bytes"]  # one process's peak is not the tree's
    assert m["ru_maxrss_bytes"] >= 200 * MB
    assert m["samples"] > 10


def _cap_or_skip(limit: int) -> MemoryCap:
    try:
        cap = MemoryCap(limit)
        with cap:
            pass
    except (InputError, OSError) as exc:
        pytest.skip(f"no memory cgroup can be made here: {exc}")
    return cap


def test_memory_cap_fits_or_kills_and_leaves_no_group(tmp_path):
    cap = _cap_or_skip(200 * MB)
    hold = "import time; b = bytearray({n}); time.sleep(0.3)"
    ok = _measure(hold.format(n=50 * MB), tmp_path, 300 * MB)
    assert ok["rc"] == 0 and ok["cgroup"]["oom_kills"] in (0, None)
    assert ok["cgroup"]["peak_usage_bytes"] >= 50 * MB and ok["cgroup"]["limit_bytes"] == 300 * MB
    killed = _measure(hold.format(n=400 * MB), tmp_path, 200 * MB)
    assert killed["rc"] == -9 and killed["cgroup"]["oom_kills"] >= 1
    groups = [p for p in cap.path.parent.iterdir() if p.name.startswith(f"edgemed-convert-cost-{os.getpid()}-")]
    assert groups == []


def test_a_tiny_conversion_is_measured_and_written(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("llama_cpp")
    import tiny

    src = tiny.build_model(tmp_path / "qwen2", "qwen2")
    results = tmp_path / "results"
    keep = tmp_path / "kept.gguf"
    rc = cc.main(["--model", str(src), "--quant", "q8_0", "--parity", "without", "--results-dir", str(results),
                  "-o", str(keep), "--tag", "t"])
    assert rc == 0
    data = json.loads((results / "convert_cost-qwen2-q8_0-t.json").read_text())
    run = data["runs"]["convert"]
    assert data["schema"] == cc.SCHEMA and list(data["runs"]) == ["convert"]
    assert run["rc"] == 0 and run["timings_s"]["quantize"] > 0 and "parity" not in run
    assert run["memory"]["tree_peak_rss_bytes"] > 50 * MB
    assert keep.is_file() and run["output_bytes"] == keep.stat().st_size
    page = (results / "convert_cost-qwen2-q8_0-t.md").read_text()
    assert "| convert |" in page and "anonymous" in page


def test_a_failed_run_is_reported_as_failed():
    run = {"rc": -9, "wall_s": 3.0, "failed": "killed at the memory cap",
           "memory": {"tree_peak_rss_bytes": 2**30, "tree_peak_anon_bytes": 2**30, "tree_peak_file_bytes": 0,
                      "max_vmhwm_bytes": 2**30, "ru_maxrss_bytes": 2**30},
           "cgroup": {"limit_bytes": 2**30, "peak_usage_bytes": 2**30, "oom_kills": 1}}
    result = {"model": "m", "quant": "q4_k_m", "command_line": "x", "checkpoint_bytes": 1,
              "machine": {"cpu_count": 2, "ram_bytes": 2**34, "load_avg_1m_at_start": 1.0},
              "runs": {"convert+parity": run}}
    page = cc.render_markdown(result, "stem")
    assert "failed: killed at the memory cap" in page and "1 OOM kills" in page


def test_sampler_stops_cleanly_on_a_process_that_is_gone():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with TreeSampler(proc.pid, 0.01) as s:
        pass
    assert s.to_dict()["tree_peak_rss_bytes"] == 0
