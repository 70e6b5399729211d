"""The command line's file layer: what each command reads is bounded, what it writes is refused with a message that
names the real option and the fix, and an option that would be ignored is refused rather than dropped."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from edgemed.errors import InputError


# -- run --item-json PATH:LINE reads one line, bounded ------------------------------------------------------------
def test_item_json_refuses_a_line_over_the_bound_without_holding_it(tmp_path):
    from edgemed.cli.run import MAX_ITEM_LINE_BYTES, _item

    item = {"question": "Which drug?", "options": {"A": "x", "B": "y"}, "answer_idx": "A"}
    jsonl = tmp_path / "items.jsonl"
    with open(jsonl, "wb") as fh:
        fh.write(b'{"question": "' + b"a" * (32 * MAX_ITEM_LINE_BYTES) + b'"}\n')  # a 32 MiB line 1
        fh.write(json.dumps(item).encode() + b"\n")
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as err:
            _item(f"{jsonl}:1")
        assert _item(f"{jsonl}:2") == item  # the long line before it is skipped, not held
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MAX_ITEM_LINE_BYTES, peak  # the line whole would be 32
    assert "line 1" in err.value.problem and "1 MiB" in err.value.problem and str(jsonl) in err.value.problem
    with pytest.raises(InputError, match="fewer than 3 lines"):
        _item(f"{jsonl}:3")


def test_item_json_takes_a_line_exactly_at_the_bound(tmp_path):
    from edgemed.cli.run import MAX_ITEM_LINE_BYTES, _item

    head = b'{"question": "'
    text = head + b"q" * (MAX_ITEM_LINE_BYTES - len(head) - 2) + b'"}'
    assert len(text) == MAX_ITEM_LINE_BYTES
    (tmp_path / "one.jsonl").write_bytes(text + b"\n")
    assert len(_item(f"{tmp_path / 'one.jsonl'}:1")["question"]) == MAX_ITEM_LINE_BYTES - len(head) - 2
    (tmp_path / "over.jsonl").write_bytes(text + b" \n")
    with pytest.raises(InputError, match="longer than 1 MiB"):
        _item(f"{tmp_path / 'over.jsonl'}:1")


# -- a file where edgemed's home or store goes ----------------------------------------------------------------------
@pytest.mark.parametrize("args", [["list"], ["install", "BUNDLE"], ["remove", "tiny"], ["rollback", "tiny"]])
def test_a_home_that_is_a_file_is_named_not_a_traceback_nor_a_damaged_index(tmp_path, monkeypatch, args):
    from click.testing import CliRunner

    from edgemed.cli import cli

    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    monkeypatch.setenv("EDGEMED_HOME", str(afile))
    args = [str(afile) if a == "BUNDLE" else a for a in args]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and "Traceback" not in r.output and not isinstance(r.exception, OSError), r.output
    assert f"'{afile}' is a file, not a folder" in r.output and "EDGEMED_HOME" in r.output, r.output
    assert "damaged" not in r.output and "index.json" not in r.output, r.output
    assert afile.read_text() == "not a folder\n"


def test_a_file_where_a_store_folder_goes_is_named(tmp_path, edgemed_home):
    from click.testing import CliRunner

    from edgemed.cli import cli

    (edgemed_home / "store").mkdir(parents=True)
    (edgemed_home / "store" / "blobs").write_text("x")
    r = CliRunner().invoke(cli, ["remove", "tiny"])
    assert r.exit_code == 1 and not isinstance(r.exception, OSError), r.output
    assert f"'{edgemed_home / 'store' / 'blobs'}' is a file, not a folder" in r.output, r.output
    assert (edgemed_home / "store" / "blobs").read_text() == "x"
