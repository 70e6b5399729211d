"""Every environment variable edgemed reads lives here, and only here."""

from __future__ import annotations

import os
from pathlib import Path

#: Where edgemed keeps its own state: cached checkpoints, the model store.
HOME_VAR = "EDGEMED_HOME"
#: Where derived, re-creatable files go (dequantized example checkpoints, joined parts).
CACHE_VAR = "EDGEMED_CACHE_DIR"
#: Set to 1 to allow network access from libraries that would otherwise be told to stay offline.
ALLOW_NETWORK_VAR = "EDGEMED_ALLOW_NETWORK"

# Variables that keep Hugging Face libraries and telemetry from reaching the network.
_OFFLINE_VARS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}


def home() -> Path:
    """edgemed's state directory (``$EDGEMED_HOME`` or ``~/.cache/edgemed``)."""
    value = os.environ.get(HOME_VAR)
    path = Path(value).expanduser() if value else Path.home() / ".cache" / "edgemed"
    return path


def cache_dir(kind: str) -> Path:
    """A re-creatable cache folder (``$EDGEMED_CACHE_DIR`` or ``$EDGEMED_HOME/cache``)."""
    value = os.environ.get(CACHE_VAR)
    path = (Path(value).expanduser() if value else home() / "cache") / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def enforce_offline() -> None:
    """Tell every library we load that the network is off limits (unless allowed)."""
    if os.environ.get(ALLOW_NETWORK_VAR) == "1":
        return
    for key, value in _OFFLINE_VARS.items():
        os.environ.setdefault(key, value)
