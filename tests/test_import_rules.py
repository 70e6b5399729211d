"""The import rules of the house as import-linter contracts (``[tool.importlinter]`` in pyproject.toml), checked
on the package as it installs.

converters/, benchmarks/ and device_profiles/ sit beside edgemed/ on disk and install as ``edgemed.converters``,
``edgemed.benchmarks`` and ``edgemed.device_profiles`` (pyproject's ``package-dir``), so a graph of the edgemed/
folder alone would not hold them. The test copies every package's .py files to where the install puts them, in a
temporary folder, and runs ``lint-imports`` there.

By hand, from a checkout: ``.venv/bin/python tests/test_import_rules.py`` runs the same contracts (and the cycle
check below) the same way; arguments after it go to ``lint-imports`` (e.g. ``--verbose``, ``--contract layers``).
A bare ``lint-imports`` in the checkout stops at "Missing layer 'edgemed.benchmarks'": it reads the edgemed/ folder,
and the editable install maps benchmarks/ and converters/ in only at import time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"

NO_LINTER = "import-linter is in the test extra: pip install -e '.[test]'"
try:
    import importlinter  # noqa: F401
except ModuleNotFoundError:
    if __name__ == "__main__":
        sys.exit(f"error: {NO_LINTER}")
    pytest.skip(NO_LINTER, allow_module_level=True)


def _installed_layout(dest: Path) -> Path:
    """``dest`` holding the edgemed package as pyproject's ``package-dir`` installs it (.py files only)."""
    package_dir = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(package_dir.items()):  # edgemed first, then the folders mapped into it
        src, target = ROOT / folder, dest.joinpath(*package.split("."))
        for path in src.rglob("*.py"):
            if "__pycache__" not in path.parts:
                out = target / path.relative_to(src)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, out)
    return dest


def _run(layout: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(layout), os.environ.get("PYTHONPATH", "")])}
    # cwd is the layout, so the package found is the copy, never the checkout (lint-imports puts cwd on sys.path)
    return subprocess.run(args, cwd=layout, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    return _installed_layout(tmp_path_factory.mktemp("installed"))


def _lint(layout: Path, *args: str) -> subprocess.CompletedProcess:
    """``lint-imports`` (the venv's, beside this Python) with pyproject's contracts, on ``layout``."""
    lint = Path(sys.executable).with_name("lint-imports")
    return _run(layout, str(lint), "--no-cache", "--no-logo", *args, str(PYPROJECT))


def _cycles(layout: Path) -> subprocess.CompletedProcess:
    """Every import of ``layout``'s edgemed with a way back, one a line (the contract's ignores excepted)."""
    contracts = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"]
    ignored = [c.get("ignore_imports", []) for c in contracts if c["type"] == "acyclic_siblings"]
    script = textwrap.dedent("""
        import sys
        import grimp
        g = grimp.build_graph("edgemed", cache_dir=None)
        for ignore in sys.argv[1:]:
            importer, imported = (s.strip() for s in ignore.split("->"))
            g.remove_import(importer=importer, imported=imported)
        for a in sorted(g.modules):
            for b in sorted(g.find_modules_directly_imported_by(a)):
                if g.chain_exists(importer=b, imported=a):
                    print(a, "->", " -> ".join(g.find_shortest_chain(importer=b, imported=a)))
    """)
    return _run(layout, sys.executable, "-c", script, *(i for group in ignored for i in group))


def test_the_import_contracts_hold(layout):
    """cli -> stages -> runtime -> leaves -> bottom; the runtime and every stage below the CLI keep to their side;
    the device side never imports torch, transformers, peft or onnx; siblings import each other one way."""
    result = _lint(layout)
    assert result.returncode == 0, f"lint-imports broke a contract:\n{result.stdout}\n{result.stderr}"
    assert "0 broken" in result.stdout and "5 kept" in result.stdout, result.stdout


def test_no_import_cycle_through_a_package_either(layout):
    """``acyclic_siblings`` compares siblings; a cycle through a package's ``__init__`` and a module inside it is
    not between siblings, so every import is also checked here for a way back (the contract's ignores excepted)."""
    result = _cycles(layout)
    assert result.returncode == 0, result.stderr
    assert not result.stdout, "import cycles:\n" + result.stdout


def test_the_import_rules_run_by_hand_from_a_checkout(tmp_path):
    """A bare ``lint-imports`` in a checkout stopped at "Missing layer 'edgemed.benchmarks'" (the editable install
    maps benchmarks/ in at import time; lint-imports reads the edgemed/ folder). ``python tests/test_import_rules.py``
    is the way by hand: the same contracts on the same layout as the tests above, passing its arguments on."""
    this = Path(__file__).resolve()
    ran = subprocess.run([sys.executable, str(this)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "0 broken" in ran.stdout and "5 kept" in ran.stdout and "no import cycle" in ran.stdout, ran.stdout
    one = subprocess.run([sys.executable, str(this), "--contract", "layers"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0 and "1 kept" in one.stdout, one.stdout + one.stderr


def main(args: list[str]) -> int:
    """The contracts and the cycle check, by hand (see the module's docstring); 0 where every one holds."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgemed-imports-") as tmp:
        layout = _installed_layout(Path(tmp))
        lint = _lint(layout, *args)
        sys.stdout.write(lint.stdout)
        sys.stderr.write(lint.stderr)
        cycles = _cycles(layout)
    sys.stderr.write(cycles.stderr)
    if cycles.returncode or cycles.stdout:
        print("import cycles through a package:\n" + cycles.stdout)
        return lint.returncode or 1
    print("no import cycle through a package either")
    return lint.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
