"""On-device runtime: everything that runs inference, and nothing that serves HTTP or converts.

- ``llamacpp``: the thin llama.cpp layer (native objects, parameter structs read back; no policy);
- ``loader``: the one way a model that will compute is loaded (the host self-test first);
- ``engine`` (+ ``llama_engine``, ``onnx_engine``): one sequence at a time, for run/chat/bench;
- ``batch``: the continuous-batching engine the server drives (many sequences on one context);
- ``logits``: logits of a GGUF for whole token sequences (parity, auto-quant, the benchmarks);
- ``plan``, ``buffers``, ``selftest``/``verdicts``, ``params``, ``sampling``, ``chat_template``, ``session``.
Never imports torch, the converters, the server or the benchmarks (import-linter contracts).
"""

from edgemed.runtime.engine import Engine, GenerationSettings, open_engine

__all__ = ["Engine", "GenerationSettings", "open_engine"]
