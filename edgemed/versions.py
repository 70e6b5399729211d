"""Which version of a distribution is installed: the one helper the converters, packaging and benchmarks share.

Light on purpose (``importlib.metadata`` only): packaging runs on devices without the converters, and
``edgemed --help`` must not pay for it.
"""

from __future__ import annotations

from importlib import metadata


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` (e.g. "llama-cpp-python"), or None when it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def installed_versions(dists, *, missing: bool = True) -> dict[str, str | None]:
    """``{dist: version}`` for each of ``dists``; ``missing=False`` leaves out the ones not installed."""
    found = {d: installed_version(d) for d in dists}
    return found if missing else {d: v for d, v in found.items() if v is not None}
