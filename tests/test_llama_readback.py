"""What llama.cpp did with the settings edgemed handed it, read back from llama.cpp itself: the cores a context
runs on when no profile says, and whether the layers asked for the GPU reached one."""

from __future__ import annotations

from pathlib import Path


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
