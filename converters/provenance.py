"""What every conversion report says about where its output came from, one way for both routes (GGUF, ONNX).

``source_info`` and ``lora_info`` are the report's ``source`` and ``lora`` sections (``edgemed pack`` reads
their sha256s into the manifest's provenance); ``installed_version`` names the tools that made the output.
"""

from __future__ import annotations


def source_info(ckpt) -> dict:
    """The checkpoint: where it was, its digest (config + weights), dtype and architecture."""
    return {"path": str(ckpt.path), "sha256": ckpt.digest(), "dtype": ckpt.source_dtype(), "architecture": ckpt.architecture}


def lora_info(adapter) -> dict | None:
    """The merged adapter (None without one): digest, rank, alpha, rsLoRA scaling, tensors it changed."""
    if adapter is None:
        return None
    return {"path": str(adapter.path), "sha256": adapter.digest(), "r": adapter.config.get("r"),
            "lora_alpha": adapter.config.get("lora_alpha"), "use_rslora": bool(adapter.config.get("use_rslora")),
            "merged_tensors": len(adapter.pairs) + len(adapter.replacements)}


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
