"""Size and time environment variables are refused clearly when they are not what they name, never a traceback."""

from __future__ import annotations

import pytest

from edgemed import env
from edgemed.errors import InputError


@pytest.mark.parametrize("value", ["abc", "-1", "0", "1e9", "9" * 400, "1.5", "２５６"])
def test_max_bundle_bytes_refuses_what_is_not_a_byte_count(monkeypatch, value):
    monkeypatch.setenv(env.MAX_BUNDLE_VAR, value)
    with pytest.raises(InputError, match=r"\$EDGEMED_MAX_BUNDLE_BYTES must be a whole number") as exc:
        env.max_bundle_bytes()
    assert "EDGEMED_MAX_BUNDLE_BYTES=" in exc.value.fix


def test_max_bundle_bytes_reads_a_byte_count(monkeypatch):
    monkeypatch.delenv(env.MAX_BUNDLE_VAR, raising=False)
    assert env.max_bundle_bytes() == 256 << 30
    monkeypatch.setenv(env.MAX_BUNDLE_VAR, " 1048576 ")
    assert env.max_bundle_bytes() == 1 << 20


@pytest.mark.parametrize("value", ["yesterday", "-5", "9" * 30])
def test_source_date_epoch_refuses_what_a_tar_header_cannot_hold(monkeypatch, value):
    monkeypatch.setenv(env.SOURCE_DATE_EPOCH_VAR, value)
    with pytest.raises(InputError, match=r"\$SOURCE_DATE_EPOCH must be a whole number"):
        env.source_date_epoch()
    monkeypatch.setenv(env.SOURCE_DATE_EPOCH_VAR, "1700000000")
    assert env.source_date_epoch() == 1700000000


def test_a_bad_variable_is_one_paragraph_from_the_cli(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    from click.testing import CliRunner

    from edgemed.cli import cli

    sys.path.insert(0, str(Path(__file__).parent))
    import bundle_kit as kit

    src = kit.inputs(tmp_path / "in")
    monkeypatch.setenv(env.SOURCE_DATE_EPOCH_VAR, "yesterday")
    result = CliRunner().invoke(cli, ["pack", str(src["model"]), "--license", str(src["license"]), "--card",
                                      str(src["card"]), "-o", str(tmp_path / "x.edgemed")])
    assert result.exit_code == 1 and "SOURCE_DATE_EPOCH" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.edgemed").exists()
