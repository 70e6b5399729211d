"""Every environment variable edgemed reads lives here, and only here."""

from __future__ import annotations

import os
from pathlib import Path

#: Where edgemed keeps its own state: the model store, the trust policy, audit logs, keys (default: the user's data
#: folder, ``~/.local/share/edgemed`` on Linux; see ``home()``).
HOME_VAR = "EDGEMED_HOME"
#: Where derived, re-creatable files go (dequantized example checkpoints, joined parts; default: ``cache_root()``).
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
#: Set to 1 to let a process that holds prompts and answers write a core file and be traced (gdb, py-spy): edgemed.phi.
ALLOW_CORE_DUMPS_VAR = "EDGEMED_ALLOW_CORE_DUMPS"
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


#: The one entry of a state folder that is not state: the re-creatable cache (``cache_root()`` on Linux).
CACHE_ENTRY = "cache"
_told: set[str] = set()  # the state-folder warnings already given in this process


def home() -> Path:
    """edgemed's state folder: the model store, ``trust.toml``, audit logs, keys, the made-dirs record.

    ``$EDGEMED_HOME`` when set; else the user's data folder (``default_home()``: ``$XDG_DATA_HOME/edgemed`` or
    ``~/.local/share/edgemed`` on Linux, ``~/Library/Application Support/edgemed`` on macOS). Earlier versions kept it
    in ``~/.cache/edgemed`` (``legacy_home()``), where cache cleaners empty it, trust policy and all; a state
    folder left there is still used, with a warning, while the default one holds none (``edgemed home --move``
    moves it): switching silently would drop its trust policy, and with it the signature checks."""
    value = os.environ.get(HOME_VAR)
    if value:
        return Path(value).expanduser()
    new, old = default_home(), legacy_home()
    if holds_state(new):
        if holds_state(old) and new != old:
            _tell(f"{old} holds an older edgemed state folder (a store, trust policy or audit logs) that is no "
                  f"longer read: edgemed's state is in {new}. Move what you still need from there into {new}, or "
                  f"set {HOME_VAR}={old} to use it instead")
        return new
    if holds_state(old):
        _tell(f"edgemed's state (store, trust policy, audit logs) is in {old}, a cache folder that cache cleaners "
              f"empty: without its trust policy, signatures would go unchecked. Move it to {new} with "
              f"`edgemed home --move`, or set {HOME_VAR}={old} to keep it there")
        return old
    return new


def default_home() -> Path:
    """The state folder where ``$EDGEMED_HOME`` is unset and nothing is left in ``legacy_home()``."""
    import platformdirs

    return platformdirs.user_data_path("edgemed", appauthor=False)


def legacy_home() -> Path:
    """Where edgemed kept its state before it moved to the user's data folder: ``~/.cache/edgemed``."""
    return Path.home() / ".cache" / "edgemed"


def holds_state(folder: Path) -> bool:
    """Whether ``folder`` holds anything but the cache (an empty or missing folder holds no state)."""
    try:
        with os.scandir(folder) as entries:
            return any(e.name != CACHE_ENTRY for e in entries)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:  # unreadable: treat it as holding state, so it is neither passed over nor written around
        return True


def stranded_home() -> Path | None:
    """The older state folder that holds state while another is in use (``home()`` warns of it), else None."""
    if os.environ.get(HOME_VAR):
        return None
    old = legacy_home()
    return old if home() != old and holds_state(old) else None


def _tell(message: str) -> None:
    if message not in _told:
        _told.add(message)
        import logging

        logging.getLogger("edgemed").warning("%s.", message)


def cache_root() -> Path:
    """The re-creatable cache: ``$EDGEMED_CACHE_DIR``, else ``$EDGEMED_HOME/cache`` where that is set, else the
    user's cache folder (``~/.cache/edgemed/cache`` on Linux, where it has always been)."""
    value = os.environ.get(CACHE_VAR)
    if value:
        return Path(value).expanduser()
    if os.environ.get(HOME_VAR):
        return home() / CACHE_ENTRY
    return default_cache_root()


def default_cache_root() -> Path:
    """The cache where neither ``$EDGEMED_CACHE_DIR`` nor ``$EDGEMED_HOME`` is set."""
    import platformdirs

    return platformdirs.user_cache_path("edgemed", appauthor=False) / CACHE_ENTRY


def cache_dir(kind: str) -> Path:
    """A re-creatable cache folder of one kind (``cache_root() / kind``), made if missing."""
    path = cache_root() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def _dirs(var: str) -> list[Path]:
    value = os.environ.get(var, "")
    return [Path(part).expanduser() for part in value.split(os.pathsep) if part]


def profile_dirs() -> list[Path]:
    """User device-profile folders in the order they are read, a later one's profile replacing an earlier one's of the
    same name: ``$EDGEMED_HOME/profiles``, then ``$EDGEMED_PROFILES_DIR``'s entries (the folders a user names win
    over the default one)."""
    return [home() / "profiles"] + _dirs(PROFILES_VAR)


def template_dirs() -> list[Path]:
    """User prompt-template folders from ``$EDGEMED_TEMPLATES_DIR`` (each holds an index.toml)."""
    return _dirs(TEMPLATES_VAR)


#: What Hugging Face's libraries take for "on" (``huggingface_hub.constants.ENV_VARS_TRUE_VALUES``); anything else set,
#: 0 or false, turns their offline switch off.
_ON = frozenset({"1", "ON", "YES", "TRUE"})


def enforce_offline() -> None:
    """Tell every library we load that the network is off limits, unless ``$EDGEMED_ALLOW_NETWORK`` is 1.

    The variables are set outright: a user's ``HF_HUB_OFFLINE=0`` (left from other work) would otherwise keep
    huggingface_hub online, which reads ``HF_HUB_OFFLINE`` before ``TRANSFORMERS_OFFLINE``; overriding one says so in a
    warning. huggingface_hub reads them once, when it is imported, so this runs first: at the start of every ``edgemed``
    command (``cli.LazyGroup``) and of each entry point that imports transformers; one already imported has its offline
    switch turned on as well."""
    if os.environ.get(ALLOW_NETWORK_VAR) == "1":
        return
    import logging
    import sys

    for key, value in _OFFLINE_VARS.items():
        was = os.environ.get(key, "").strip()
        if was and was.upper() not in _ON:
            logging.getLogger("edgemed").warning(
                "%s=%r in the environment would let Hugging Face libraries reach the network; edgemed sets it to %s and "
                "stays offline (set %s=1 to allow the network deliberately).", key, was[:20], value, ALLOW_NETWORK_VAR)
        os.environ[key] = value
    hub = sys.modules.get("huggingface_hub.constants")  # imported before this call: its switches were read already
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
        hub.HF_HUB_DISABLE_TELEMETRY = True


def core_dumps_allowed() -> bool:
    """``$EDGEMED_ALLOW_CORE_DUMPS``: 1 keeps core dumps and same-user tracing on (debugging); 0 or unset turns them
    off (``phi.no_core_dumps``). Anything else is refused rather than guessed: a typo must neither leave clinicians'
    text open to a core file nor take away the dump someone asked for."""
    value = os.environ.get(ALLOW_CORE_DUMPS_VAR, "").strip()
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    from edgemed.errors import InputError

    shown = value[:40] + ("..." if len(value) > 40 else "")
    raise InputError(f"${ALLOW_CORE_DUMPS_VAR} must be 1 (allow core dumps, for debugging) or 0, not {shown!r}.",
                     f"set {ALLOW_CORE_DUMPS_VAR}=1 to debug with a core file, gdb or py-spy, or unset it")


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
