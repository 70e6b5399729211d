"""`edgemed bench run|reproduce -o DIR` rewrites the report files (machine.json, results.*, report.md, plots/) of
a folder the bench made, and in any other folder refuses to replace files of those names, before any work,
unless --force is given."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("matplotlib")

import bundle_kit  # noqa: E402
import crash_kit  # noqa: E402
from edgemed.benchmarks.harness import report, runner  # noqa: E402
from edgemed.cli import cli  # noqa: E402
from edgemed.errors import OutputExists  # noqa: E402

FAST = ["--report-only", "--skip-accuracy", "--threads", "1"]
# raw/bandwidth.json as a bench run leaves it (runner.bandwidth): the first file a run writes into its folder
BANDWIDTH = {"threads": 1, "read": {"bytes_per_s": 2e10, "threads": 1, "buffer_bytes": 1 << 30, "method": "numpy.maximum.reduce",
                                    "repeats": 7},
             "copy": {"bytes_per_s": 3e10, "threads": 1, "buffer_bytes": 256 << 20, "method": "numpy.copyto", "repeats": 7}}


@pytest.fixture
def gguf(tmp_path):
    return bundle_kit.inputs(tmp_path / "src")["model"]


def _users_folder(tmp_path):
    docs = tmp_path / "docs"
    (docs / "plots").mkdir(parents=True)
    mine = {"report.md": "my notes\n", "results.csv": "a,b\n1,2\n", "plots/memory.png": "my chart"}
    for name, text in mine.items():
        (docs / name).write_text(text)
    return docs, mine


def _unchanged(docs, mine) -> bool:
    return all((docs / name).read_text() == text for name, text in mine.items())


def test_run_refuses_a_users_folder_before_any_work(tmp_path, gguf):
    docs, mine = _users_folder(tmp_path)
    r = CliRunner().invoke(cli, ["bench", "run", str(gguf), "-o", str(docs), *FAST])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "report.md" in r.output and "plots/memory.png" in r.output and "--force" in r.output
    assert _unchanged(docs, mine) and not (docs / "raw").exists() and not (docs / "machine.json").exists()


def test_reproduce_refuses_a_users_folder_before_any_conversion(tmp_path):
    docs, mine = _users_folder(tmp_path)
    (tmp_path / "ckpt").mkdir()
    r = CliRunner().invoke(cli, ["bench", "reproduce", str(tmp_path / "ckpt"), "--quants", "f16", "--baselines", "",
                                 "-o", str(docs), *FAST])
    assert r.exit_code == 1 and "report.md" in r.output and "--force" in r.output, r.output
    assert _unchanged(docs, mine) and not (docs / "artifacts").exists()


def test_a_folder_the_bench_made_is_rewritten_without_force(tmp_path, gguf):
    out = tmp_path / "bench"
    (out / "raw").mkdir(parents=True)
    (out / "raw" / "bandwidth.json").write_text(json.dumps(BANDWIDTH))
    (out / "report.md").write_text("# an earlier run's report\n")
    r = CliRunner().invoke(cli, ["bench", "run", str(gguf), "-o", str(out), *FAST])
    assert r.exit_code == 0, r.output
    assert (out / "report.md").read_text().startswith("# edgemed bench")
    assert json.loads((out / "results.json").read_text())["schema"] == report.SCHEMA
    assert json.loads((out / "machine.json").read_text())["memory_read_bandwidth"]["bytes_per_s"] == 2e10
    assert crash_kit.debris(out) == []


def test_force_lets_a_run_replace_a_users_report_files(tmp_path):
    docs, _ = _users_folder(tmp_path)
    with pytest.raises(OutputExists, match="--force"):
        runner.claim(docs, force=False)
    assert runner.claim(docs, force=True) is True
    assert runner.claim(tmp_path / "new", force=False) is False  # nothing to replace: new files only
    with pytest.raises(OutputExists):
        report.render(docs, _minimal({"configs": []}), replace=False)
    assert (docs / "report.md").read_text() == "my notes\n"


@pytest.mark.parametrize("force", [False, True])
def test_a_directory_at_a_report_file_name_is_refused_even_with_force(tmp_path, gguf, force):
    out = tmp_path / "bench"
    (out / "raw").mkdir(parents=True)
    (out / "raw" / "bandwidth.json").write_text(json.dumps(BANDWIDTH))
    (out / "results.csv").mkdir()
    (out / "results.csv" / "mine.txt").write_text("mine")
    r = CliRunner().invoke(cli, ["bench", "run", str(gguf), "-o", str(out), *FAST, *(["--force"] if force else [])])
    assert r.exit_code == 1 and "even with --force" in r.output, r.output
    assert (out / "results.csv" / "mine.txt").read_text() == "mine" and not (out / "machine.json").exists()


def _minimal(results: dict) -> dict:
    from edgemed.benchmarks.harness.configs import PAPER, Settings

    return {"schema": report.SCHEMA, "edgemed_version": "0", "created": "now", "scenario": "single-stream",
            "profile": "x86-avx2", "settings": Settings(threads=1, profile="x86-avx2").to_dict(), "machine": {},
            "bandwidth": BANDWIDTH, "baselines": {"same_runtime": None, "torch": []}, "paper": PAPER, "failed": [],
            **results}


def test_a_failed_measurement_ends_the_command_with_exit_1_after_the_report(tmp_path, gguf, monkeypatch):
    """A child that fails (its pickle refused, killed, out of memory) leaves the other configurations going and the
    report written, and the command says so in its exit status; --report-only lists what is missing and exits 0."""
    out = tmp_path / "bench"
    (out / "raw").mkdir(parents=True)
    (out / "raw" / "bandwidth.json").write_text(json.dumps(BANDWIDTH))
    monkeypatch.setattr(runner, "_run_child", lambda *a, **k: (False, "exit 1: killed by the test"))
    r = CliRunner().invoke(cli, ["bench", "run", str(gguf), "-o", str(out), "--skip-accuracy", "--threads", "1"])
    assert r.exit_code == 1 and "killed by the test" in r.output and "measurement(s) failed" in r.output, r.output
    assert (out / "report.md").is_file()
    r = CliRunner().invoke(cli, ["bench", "run", str(gguf), "-o", str(out), *FAST])
    assert r.exit_code == 0, r.output


def test_a_report_folder_in_the_store_or_in_what_the_run_measures_is_refused_before_any_work(tmp_path, gguf):
    """A report written into an installed bundle made it fail verification (and `remove` deleted the report with it);
    one written into a checkpoint changed the folder being measured."""
    from edgemed import env
    from edgemed.packaging.bundle import PackInputs, pack
    from edgemed.packaging.store import Store

    src = bundle_kit.inputs(tmp_path / "b")
    bundle = tmp_path / "smol.edgemed"
    pack(PackInputs(model=src["model"], license=src["license"], card=src["card"], name="smol"), bundle, as_dir=True)
    Store().install(bundle)
    installed = env.store_dir() / "models" / "smol"
    for out in (installed, installed / "bench", env.store_dir() / "reports"):
        r = CliRunner().invoke(cli, ["bench", "run", "smol", *FAST, "-o", str(out)])
        assert r.exit_code == 1 and "store" in r.output and "Traceback" not in r.output, r.output
    model = next(bundle.rglob("*.gguf"))  # a bundle folder's model, measured by path
    r = CliRunner().invoke(cli, ["bench", "run", str(model), *FAST, "-o", str(bundle / "bench")])
    assert r.exit_code == 1 and "inside" in r.output and "-o" in r.output, r.output
    assert not (bundle / "bench").exists() and CliRunner().invoke(cli, ["verify", "smol"]).exit_code == 0
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    with pytest.raises(OutputExists, match="inside"):
        runner.claim(checkpoint / "report", False, [checkpoint])
    assert runner.claim(tmp_path / "elsewhere", False, [checkpoint, gguf]) is False  # a new folder: nothing to replace
    assert not list(installed.glob("raw")) and not (checkpoint / "report").exists()
