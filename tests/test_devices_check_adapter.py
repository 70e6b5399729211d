"""``edgemed devices check MODEL --adapter FILE``: the self-test's child loads MODEL with the adapter applied (as
``run --adapter`` does) and says so; an adapter that is not one for MODEL is refused before any child runs.
Real F16 SmolLM2 base and a real PEFT LoRA adapter file (``test_serve_adapters``' kit), a real child process."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_serve_adapters import kit  # noqa: F401  (the module fixture: base + adapter files, cached)

from edgemed.cli import cli

pytestmark = pytest.mark.slow


def _check(*args: str):
    return CliRunner().invoke(cli, ["devices", "check", *args])


def test_the_child_decodes_with_the_adapter_applied(kit, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("EDGEMED_CACHE_DIR", str(tmp_path / "cache"))
    base = str(kit["base"])
    plain = _check(base, "--extra-buffers", "none", "--json")
    assert plain.exit_code == 0, plain.output
    assert json.loads(plain.output)["verdicts"][0]["child"]["adapters"] == 0
    with_adapter = _check(base, "--extra-buffers", "none", "--adapter", f"{kit['cardio']}:0.5", "--json")
    assert with_adapter.exit_code == 0, with_adapter.output
    report = json.loads(with_adapter.output)
    assert report["adapters"] == [{"path": str(kit["cardio"]), "scale": 0.5}]
    assert report["verdicts"][0]["ok"] and report["verdicts"][0]["child"]["adapters"] == 1
    text = _check(base, "--extra-buffers", "none", "--adapter", str(kit["cardio"]), "--adapter", str(kit["triage"]))
    assert text.exit_code == 0, text.output
    assert text.output.startswith("ok: base-f16.gguf loads and decodes with the adapters cardio.lora.gguf, "
                                  "triage.lora.gguf applied")


def test_a_file_that_is_not_an_adapter_for_the_model_is_refused_before_the_child(kit, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("EDGEMED_CACHE_DIR", str(tmp_path / "cache"))
    result = _check(str(kit["base"]), "--adapter", str(kit["base"]))
    assert result.exit_code != 0
    assert "Traceback" not in result.output and "adapter" in result.output.lower()
    assert not (tmp_path / "cache" / "selftest").exists()  # no verdict: no child ran
