"""What llama.cpp did with the settings edgemed handed it, read back from llama.cpp itself: the cores a context
runs on when no profile says, and whether the layers asked for the GPU reached one."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edgemed.runtime.engine import LoadSettings

FIXTURES = Path(__file__).parent / "fixtures" / "devices"


def test_a_context_given_no_threads_runs_on_the_cores_detection_counts(smollm2_gguf, monkeypatch):
    """The llama.cpp layer counted cores itself, and fell back to half of ``os.cpu_count()`` where /proc/cpuinfo has
    no ``core id`` lines (arm64 Linux: a Jetson) or does not exist (macOS): an Orin Nano's 6 cores ran 3 threads in
    every context made without a thread count (the logits reader: parity, ``--quant auto``, the KLD anchor)."""
    from edgemed.devices import detect as detection
    from edgemed.runtime import llamacpp

    orin = FIXTURES / "jetson-orin-nano-8gb"
    want = detection.detect(orin).usable_cores
    assert want == 6
    assert llamacpp.physical_cores(orin) == want
    real = detection.detect
    monkeypatch.setattr(detection, "detect", lambda root="/", sysctl=None: real(orin))  # this process on that Orin
    load = LoadSettings(n_ctx=256)
    model = llamacpp.Model(smollm2_gguf, load)
    ctx = llamacpp.Context(model, load)
    try:
        assert model.lib.llama_n_threads(ctx.ptr) == want and model.lib.llama_n_threads_batch(ctx.ptr) == want
    finally:
        ctx.close()
        model.close()


def _cpu_only_build():
    llama_cpp = pytest.importorskip("llama_cpp")
    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build can offload to a GPU: the CPU-only case is another machine's")


def _load_warnings(caplog, path, load: LoadSettings):
    from edgemed.runtime import llamacpp

    caplog.clear()
    model = llamacpp.Model(path, load)
    try:
        return model.placement, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        model.close()


def test_layers_asked_for_a_gpu_on_a_cpu_only_build_are_said_at_load(smollm2_gguf, caplog):
    """A Jetson where pip built the ordinary CPU-only llama-cpp-python gets its profile's n_gpu_layers = -1, and
    llama.cpp ran every layer on the CPU without a word at any verbosity."""
    _cpu_only_build()
    caplog.set_level(logging.WARNING, logger="edgemed.runtime.llamacpp")
    placement, said = _load_warnings(caplog, smollm2_gguf, LoadSettings(n_ctx=256, n_gpu_layers=-1))
    assert len(said) == 1 and "n_gpu_layers = -1" in said[0] and "cannot offload" in said[0], said
    assert "built for this machine's GPU" in said[0] and "n_gpu_layers = 0 in the device profile" in said[0]
    assert placement.layers() == "CPU only: this llama.cpp build cannot offload"
    placement, said = _load_warnings(caplog, smollm2_gguf, LoadSettings(n_ctx=256, n_gpu_layers=0))
    assert said == [] and placement.offload_unread() is None
    assert "CPU only: this llama.cpp build cannot offload" in placement.describe()


def test_a_gpu_build_whose_weights_reached_no_gpu_buffer_is_said_at_load(smollm2_gguf, caplog, monkeypatch):
    """A build that reports a GPU (a CUDA build, an RPC one) and placed no weight on it: llama.cpp's own "offloaded
    N/M layers" line repeats the request, so the weight buffers it reported are read. Here a CPU build answers that it
    can offload, and its buffers are the CPU's."""
    from edgemed.runtime import llamacpp

    _cpu_only_build()
    monkeypatch.setattr(llamacpp.lib(), "llama_supports_gpu_offload", lambda: True)
    caplog.set_level(logging.WARNING, logger="edgemed.runtime.llamacpp")
    placement, said = _load_warnings(caplog, smollm2_gguf, LoadSettings(n_ctx=256, n_gpu_layers=-1, use_mmap=False,
                                                                        extra_buffers="none"))
    assert len(said) == 1 and "n_gpu_layers = -1" in said[0], said
    assert "none of the weights in a GPU buffer (it allocated CPU 92.1 MiB)" in said[0]
    assert placement.layers().startswith("every layer on the CPU: llama.cpp put none of the weights in a GPU buffer")


#: llama.cpp's own format strings for the lines read back (llama-model.cpp, ``llama_model::load_tensors``, of the
#: llama.cpp vendored in llama-cpp-python 0.3.36), filled in as a GPU build writes them
OFFLOADING_OUTPUT = "%s: offloading output layer to GPU\n"
OFFLOADING = "%s: offloading %d repeating layers to GPU\n"
OFFLOADED = "%s: offloaded %d/%d layers to GPU\n"
MODEL_BUFFER = "%s: %12s model buffer size = %8.2f MiB\n"


def _gpu_load_log(buffers_mib: dict[str, float], n_layer: int = 30, n_gpu_layers: int = -1) -> list[str]:
    n_gpu = min(n_layer + 1 if n_gpu_layers < 0 else n_gpu_layers, n_layer)
    lines = [OFFLOADING_OUTPUT % "load_tensors"] * (n_gpu > 0)
    lines += [OFFLOADING % ("load_tensors", n_gpu - (n_gpu > 0)),
              OFFLOADED % ("load_tensors", min(n_layer + 1 if n_gpu_layers < 0 else n_gpu_layers, n_layer + 1),
                           n_layer + 1)]
    return lines + [MODEL_BUFFER % ("load_tensors", name, mib) for name, mib in buffers_mib.items()]


def _read_back(lines: list[str], n_gpu_layers: int = -1):
    """The placement a GPU build's load with these log lines leaves, read through the same route as a real load:
    llama.cpp's callback (``native_log``), the watches, ``Placement.read_log``."""
    from edgemed.runtime import buffers, native_log

    placement = buffers.Placement("all", n_gpu_layers=n_gpu_layers, gpu=True)
    with native_log.watch(buffers.BUFFER_LINE) as seen, native_log.watch(buffers.OFFLOAD_LINE) as offloaded:
        for line in lines:
            native_log._on_log(2, line.encode(), None)  # GGML_LOG_LEVEL_INFO
    placement.read_log(seen, offloaded)
    return placement


@pytest.mark.parametrize("buffers_mib, on_gpu", [
    ({"CPU_Mapped": 28.12, "CUDA0": 100.43}, True),            # a CUDA build, the file mapped: the input layer on the host
    ({"CPU": 28.12, "CUDA0": 100.43}, True),
    ({"CPU_Mapped": 28.12, "Metal_Mapped": 100.43}, True),      # Apple: Metal maps the file for the GPU
    ({"CPU_Mapped": 128.55}, False),                           # the line said 31/31, and no weight left the CPU
    ({"CUDA_Host": 128.55}, False),                            # pinned host memory is not the GPU's
    ({"CPU_REPACK": 100.43, "CPU_Mapped": 28.12}, False),
])
def test_a_gpu_builds_load_log_is_read_back(buffers_mib, on_gpu):
    placement = _read_back(_gpu_load_log(buffers_mib))
    assert placement.offloaded == (31, 31) and placement.seen == pytest.approx(buffers_mib, abs=0.005)
    if on_gpu:
        assert placement.offload_unread() is None
        gpu_name = next(name for name in buffers_mib if not name.startswith("CPU"))
        assert placement.layers() == f"31/31 layers offloaded to the GPU ({gpu_name} 100.4 MiB)"
        assert placement.describe().endswith(placement.layers())
    else:
        assert "none of the weights in a GPU buffer" in placement.offload_unread()
        assert placement.layers().startswith("every layer on the CPU: ")


def test_a_partial_offload_and_none_asked_are_read_as_such():
    placement = _read_back(_gpu_load_log({"CPU_Mapped": 90.0, "CUDA0": 38.5}, n_gpu_layers=10), n_gpu_layers=10)
    assert placement.offloaded == (10, 31) and placement.offload_unread() is None
    assert placement.layers() == "10/31 layers offloaded to the GPU (CUDA0 38.5 MiB)"
    placement = _read_back([MODEL_BUFFER % ("load_tensors", "CPU_Mapped", 128.55)], n_gpu_layers=0)
    assert placement.offload_unread() is None and placement.layers() == "every layer on the CPU (n_gpu_layers = 0)"


def vendored_source(name: str) -> str:
    """A file of the llama.cpp vendored in the installed llama-cpp-python, from the anchors' unpacked sdist in the test
    cache (``python -m edgemed.benchmarks.anchors build``); skips where it is not there."""
    from conftest import TEST_CACHE

    version = pytest.importorskip("llama_cpp").__version__
    path = (TEST_CACHE / "anchors" / f"llama-cpp-python-{version}" / "src" / f"llama_cpp_python-{version}" / "vendor" /
            "llama.cpp" / "src" / name)
    if not path.is_file():
        pytest.skip(f"no llama.cpp {version} source here ({path}: built by `EDGEMED_CACHE_DIR={TEST_CACHE} python -m "
                    "edgemed.benchmarks.anchors build`)")
    return path.read_text(errors="replace")


def test_the_recorded_lines_are_llama_cpps_own():
    """The format strings above are the vendored llama.cpp's, where its source is at hand."""
    text = vendored_source("llama-model.cpp")
    for fmt in (OFFLOADING_OUTPUT, OFFLOADING, OFFLOADED, MODEL_BUFFER):
        literal = fmt.replace("\n", r"\n")  # as the C source writes it
        assert f'LLAMA_LOG_INFO("{literal}",' in text, fmt


def test_devices_check_says_cpu_only_where_the_profile_asks_for_the_gpu(smollm2_gguf, tmp_path, monkeypatch):
    """`edgemed devices check` (README: "every layer on the GPU") printed a bare ok for a Jetson profile on a CPU-only
    llama-cpp-python."""
    import json

    from click.testing import CliRunner

    from edgemed.cli import cli

    _cpu_only_build()
    monkeypatch.setenv("EDGEMED_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(cli, ["devices", "check", str(smollm2_gguf), "--profile", "jetson-orin-nano-8gb"])
    assert result.exit_code == 0, result.output
    first, *rest = result.output.splitlines()
    assert first.startswith(f"ok: {smollm2_gguf.name} loads and decodes") and \
        first.endswith("on this host, CPU only: this llama.cpp build cannot offload"), first
    assert any(line.startswith("  placement: ") and "llama.cpp placed CPU" in line for line in rest), rest
    assert any("jetson-orin-nano-8gb asks for n_gpu_layers = -1" in line and "n_gpu_layers = 0 in the device profile" in line
               for line in rest), rest
    plain = CliRunner().invoke(cli, ["devices", "check", str(smollm2_gguf), "--profile", "x86-avx2"])
    assert plain.exit_code == 0 and "CPU only" in plain.output.splitlines()[0] and "asks for n_gpu_layers" not in \
        plain.output, plain.output
    report = json.loads(CliRunner().invoke(cli, ["devices", "check", str(smollm2_gguf), "--profile",
                                                 "jetson-orin-nano-8gb", "--json"]).output)
    assert report["host"]["gpu_offload"] is False and report["n_gpu_layers"] == -1
    assert report["verdicts"][-1]["child"]["placement"].endswith("CPU only: this llama.cpp build cannot offload")
