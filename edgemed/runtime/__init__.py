"""On-device runtime: loads a model file and generates text. Never imports torch or the converters."""

from edgemed.runtime.engine import Engine, GenerationSettings, open_engine

__all__ = ["Engine", "GenerationSettings", "open_engine"]
