"""Worker processes (the template renderer, the grammar probe, the self-test child) never import from the user's
working folder: `python -m` puts that folder first on the import path, so a `json.py` or `struct.py` lying there (a
downloaded checkpoint, a shared drive) ran as the user when edgemed started a worker."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("llama_cpp")

PLANTED = "import pathlib, os\npathlib.Path(os.environ['PLANTED_MARK']).write_text(__file__)\nraise SystemExit(9)\n"

WORK = """
import sys
from edgemed.templates import limits
print(limits.render("{{ x }}!", {"x": "ok"}, flavor="prompt"))
from edgemed.runtime.grammar_probe import GrammarProbe
probe = GrammarProbe(sys.argv[1])
try:
    probe.check('root ::= "yes" | "no"')
finally:
    probe.close()
print("probe ok")
from edgemed.runtime import selftest
from edgemed.runtime.engine import LoadSettings
verdict = selftest.run_child(sys.argv[1], LoadSettings(n_ctx=256, n_threads=1, n_threads_batch=1))
print("selftest", verdict.ok, verdict.detail[-200:] if not verdict.ok else "")
"""


def test_workers_do_not_import_from_the_working_folder(smollm2_gguf, tmp_path):
    hostile = tmp_path / "downloaded-model"
    hostile.mkdir()
    mark = tmp_path / "ran"
    for name in ("json.py", "struct.py", "selectors.py", "signal.py"):
        (hostile / name).write_text(PLANTED)
    # -P: the test's own interpreter does not import from that folder either (it would leave PYTHONSAFEPATH unset
    # for the workers, as a user's shell does)
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONSAFEPATH"}
    env["PLANTED_MARK"] = str(mark)
    proc = subprocess.run([sys.executable, "-P", "-c", WORK, str(smollm2_gguf)], cwd=hostile, env=env,
                          capture_output=True, text=True, timeout=300)
    assert not mark.exists(), f"a worker imported {mark.read_text()} from the working folder"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[:3] == ["ok!", "probe ok", "selftest True "], proc.stdout
