"""What every conversion report says about where its output came from, one way for both routes (GGUF, ONNX).

``source_info`` and ``lora_info`` are the report's ``source`` and ``lora`` sections (``edgemed pack`` reads
their sha256s into the manifest's provenance); ``converter_info`` is its ``converter`` section, naming the
tools that made the output (versions from ``edgemed.versions``, which packaging and the benchmarks share).
"""

from __future__ import annotations

import platform

from edgemed import __version__
from edgemed.converters.source.lora import lora_alpha, lora_rank
from edgemed.versions import installed_version

__all__ = ["source_info", "lora_info", "converter_info", "installed_version"]


def source_info(ckpt) -> dict:
    """The checkpoint: where it was, its digest (config + weights), its tokenizer files' digest, dtype and architecture."""
    return {"path": str(ckpt.path), "sha256": ckpt.digest(), "tokenizer_sha256": ckpt.tokenizer_digest(),
            "dtype": ckpt.source_dtype(), "architecture": ckpt.architecture}


def lora_info(adapter) -> dict | None:
    """The merged adapter (None without one): digest, the ranks and alphas its pairs were used with, rsLoRA scaling,
    tensors it changed.

    ``r`` and ``lora_alpha`` are what PEFT applies to the adapted modules: one number when every pair has the same,
    else the sorted distinct values (``rank_pattern`` / ``alpha_pattern``, kept beside them, say which module has
    which); a pattern's value where it covers a module, else the config's ``r`` / ``lora_alpha``, else PEFT's
    default (8). An adapter of full replacement weights only (``modules_to_save``) reports the config's. A GGUF
    adapter file's ``adapter.lora.alpha`` is the config's ``lora_alpha``, per-module differences folded into
    ``lora_b`` (``gguf/adapter.py``)."""
    if adapter is None:
        return None
    config = adapter.config
    info = {"path": str(adapter.path), "sha256": adapter.digest(),
            "r": _used([p.rank for p in adapter.pairs.values()], lora_rank(config)),
            "lora_alpha": _used([p.alpha for p in adapter.pairs.values()], lora_alpha(config)),
            "use_rslora": bool(config.get("use_rslora"))}
    info |= {key: dict(config[key]) for key in ("rank_pattern", "alpha_pattern") if config.get(key)}
    info["merged_tensors"] = len(adapter.pairs) + len(adapter.replacements)
    base = getattr(adapter, "base_name", None)
    if base is not None:  # what the adapter says it was trained on, and whether the source is known to be it
        info["base_model_name_or_path"] = base
        check = getattr(adapter, "base_check", None)  # None: opened against a bare tensor table, nothing compared
        info["base_check"] = ("name differs: " + adapter.base_warning if adapter.base_warning
                              else str(check) if check is not None else "matches")
    return info


def _used(values: list, default):
    """One value when all of ``values`` are the same, else their sorted distinct values; ``default`` for none."""
    distinct = sorted(set(values))
    return default if not distinct else distinct[0] if len(distinct) == 1 else distinct


def converter_info(tools: dict[str, str], **extra) -> dict:
    """edgemed's name and version, Python's, and ``{report key: installed version}`` of each ``{key: distribution}``."""
    info = {"name": "edgemed", "version": __version__, "python": platform.python_version()}
    return info | {key: installed_version(dist) for key, dist in tools.items()} | extra
