"""Every environment variable edgemed reads lives here, and only here."""

from __future__ import annotations

import os
from pathlib import Path

#: Where edgemed keeps its own state: cached checkpoints, the model store.
HOME_VAR = "EDGEMED_HOME"
#: Where derived, re-creatable files go (dequantized example checkpoints, joined parts).
CACHE_VAR = "EDGEMED_CACHE_DIR"
#: Largest bundle (sum of its files, bytes) that install/verify accept from an archive.
MAX_BUNDLE_VAR = "EDGEMED_MAX_BUNDLE_BYTES"
#: Reproducible builds: a fixed creation time (seconds since 1970) for packed bundles.
SOURCE_DATE_EPOCH_VAR = "SOURCE_DATE_EPOCH"
#: Set to 1 to allow network access from libraries that would otherwise be told to stay offline.
ALLOW_NETWORK_VAR = "EDGEMED_ALLOW_NETWORK"
#: Extra folders of device profile TOML files (os.pathsep-separated); they add to, or override, the shipped ones.
PROFILES_VAR = "EDGEMED_PROFILES_DIR"
#: Extra folders of prompt template files (os.pathsep-separated), each with its own index.toml.
TEMPLATES_VAR = "EDGEMED_TEMPLATES_DIR"
#: Tests only: SIGKILL the process at its Nth filesystem step (edgemed.files.atomic.step); 0 counts without killing.
KILL_AT_VAR = "EDGEMED_TEST_KILL_AT"
#: Tests only: append each counted filesystem step ("N what") to this file.
STEP_LOG_VAR = "EDGEMED_TEST_STEP_LOG"
#: Set to 0 to skip the host self-test before llama.cpp loads a model in process (runtime/selftest.py).
SELFTEST_VAR = "EDGEMED_SELFTEST"
#: Set by the self-test in its child process (the child must not test itself).
SELFTEST_CHILD_VAR = "EDGEMED_SELFTEST_CHILD"
#: The memory a conversion may use at its peak ("6GiB", "6000MB", or bytes), instead of what is available now.
MEMORY_BUDGET_VAR = "EDGEMED_MEMORY_BUDGET"
#: Fault injection for edgemed's own tests (e.g. ``selftest-crash:all``); never set it in production.
FAULT_VAR = "EDGEMED_FAULT"

# Variables that keep Hugging Face libraries and telemetry from reaching the network.
_OFFLINE_VARS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}


def worker_env() -> dict:
    """The environment of a worker process edgemed starts with ``python -m edgemed...`` (the template renderer, the
    grammar probe, the self-test): this one, with the folder holding this edgemed package first on ``PYTHONPATH``, so
    the worker imports the same code whether it is installed or run from a checkout, and ``PYTHONSAFEPATH`` set, so
    ``-m`` does not put the working folder first on the import path (Python 3.11+; ``worker_cwd`` covers older)."""
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (worker_cwd(), environ.get("PYTHONPATH")) if p)
    environ["PYTHONSAFEPATH"] = "1"
    return environ


def worker_cwd() -> str:
    """The folder a worker process runs in: the one holding this edgemed package. ``python -m`` imports from its
    working folder first, so a worker started in the user's folder would run a ``json.py`` or ``struct.py`` lying
    there (a downloaded checkpoint, a shared drive) before the standard library's."""
    return str(Path(__file__).resolve().parents[1])


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


def _dirs(var: str) -> list[Path]:
    value = os.environ.get(var, "")
    return [Path(part).expanduser() for part in value.split(os.pathsep) if part]


def profile_dirs() -> list[Path]:
    """User device-profile folders: ``$EDGEMED_PROFILES_DIR`` entries, then ``$EDGEMED_HOME/profiles``."""
    return _dirs(PROFILES_VAR) + [home() / "profiles"]


def template_dirs() -> list[Path]:
    """User prompt-template folders from ``$EDGEMED_TEMPLATES_DIR`` (each holds an index.toml)."""
    return _dirs(TEMPLATES_VAR)


def enforce_offline() -> None:
    """Tell every library we load that the network is off limits (unless allowed)."""
    if os.environ.get(ALLOW_NETWORK_VAR) == "1":
        return
    for key, value in _OFFLINE_VARS.items():
        os.environ.setdefault(key, value)


def store_dir() -> Path:
    """The local model store (``$EDGEMED_HOME/store``)."""
    return home() / "store"


def _int_var(var: str, lowest: int, highest: int, example: str) -> int | None:
    """An integer environment variable in ``[lowest, highest]``, or None when unset; anything else is refused."""
    value = os.environ.get(var)
    if not value:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 20 and lowest <= int(text) <= highest):
        from edgemed.errors import InputError

        shown = value[:40] + ("..." if len(value) > 40 else "")
        raise InputError(f"${var} must be a whole number from {lowest} to {highest}, not {shown!r}.",
                         f"set {var}={example}, or unset it")
    return int(text)


def max_bundle_bytes() -> int:
    """Upper bound on the bytes an archive may declare (default 256 GiB; at most 1 PiB)."""
    value = _int_var(MAX_BUNDLE_VAR, 1, 1 << 50, str(256 << 30))
    return 256 << 30 if value is None else value


def source_date_epoch() -> int | None:
    """``$SOURCE_DATE_EPOCH`` as an int, if set (reproducible bundle timestamps; a tar header holds 0 .. 8^11 - 1)."""
    return _int_var(SOURCE_DATE_EPOCH_VAR, 0, 8 ** 11 - 1, "1700000000")


def memory_budget() -> str | None:
    """``$EDGEMED_MEMORY_BUDGET`` as written (``converters.memory_room.parse_size`` reads it), or None when unset."""
    return os.environ.get(MEMORY_BUDGET_VAR) or None


def kill_at_step() -> int | None:
    """``$EDGEMED_TEST_KILL_AT`` (the crash tests' injected kill), or None when unset or not a number."""
    value = os.environ.get(KILL_AT_VAR, "")
    return int(value) if value.isdigit() else None


def step_log() -> Path | None:
    """``$EDGEMED_TEST_STEP_LOG``: where the crash tests read the filesystem steps a command takes."""
    value = os.environ.get(STEP_LOG_VAR)
    return Path(value) if value else None
