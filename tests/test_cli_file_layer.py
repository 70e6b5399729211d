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


# -- an option that would be ignored is refused, naming both options ---------------------------------------------
def _cli(*args):
    from click.testing import CliRunner

    from edgemed.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def test_export_refuses_system_where_no_modelfile_is_written(tmp_path):
    import bundle_kit as kit

    kit.installed_tiny(tmp_path)
    for other in (["--gguf", tmp_path / "x.gguf"], ["--llama-server"]):
        r = _cli("export", "tiny", *other, "--system", "Answer briefly.")
        assert r.exit_code == 1 and "--system" in r.output and other[0] in r.output and "--ollama" in r.output, r.output
    assert not (tmp_path / "x.gguf").exists()
    r = _cli("export", "tiny", "--ollama", tmp_path / "od", "--system", "Answer briefly.")
    assert r.exit_code == 0 and 'SYSTEM """Answer briefly."""' in (tmp_path / "od" / "Modelfile").read_text(), r.output


def test_pack_refuses_report_with_no_report(tmp_path):
    import bundle_kit as kit

    src = kit.inputs(tmp_path / "src")
    report = tmp_path / "r.json"
    report.write_text("{}")
    r = _cli("pack", src["model"], "--license", src["license"], "--report", report, "--no-report", "-o", tmp_path / "b.edgemed")
    assert r.exit_code == 1 and "--report" in r.output and "--no-report" in r.output and "contradict" in r.output, r.output
    assert not (tmp_path / "b.edgemed").exists()


@pytest.mark.parametrize("graph", ["genai", "torch"])  # the default too, when it is given
def test_convert_refuses_onnx_graph_without_to_onnx(tmp_path, graph):
    r = _cli("convert", tmp_path / "ckpt", "--onnx-graph", graph, "-o", tmp_path / "m.gguf")
    assert r.exit_code == 1 and f"--onnx-graph {graph}" in r.output and "--to gguf" in r.output, r.output
    r = _cli("convert", tmp_path / "ckpt", "--to", "gguf", "--onnx-graph", graph)
    assert r.exit_code == 1 and "--to onnx" in r.output, r.output


# -- a refusal's fix names the option the command has ----------------------------------------------------------
def _fix(result) -> str:
    return result.output.partition("Fix:")[2]


def test_keygen_and_export_fixes_name_their_own_options(tmp_path, monkeypatch):
    import bundle_kit as kit

    pytest.importorskip("cryptography")
    monkeypatch.chdir(tmp_path)
    r = _cli("keygen", ".")
    assert r.exit_code == 1 and "-o " not in _fix(r) and "PRIVATE_KEY" in _fix(r), r.output
    assert _cli("keygen", "k.pem").exit_code == 0
    r = _cli("keygen", "k.pem")
    assert r.exit_code == 1 and "-o " not in _fix(r) and "choose another PRIVATE_KEY path" in _fix(r), r.output
    kit.installed_tiny(tmp_path / "b")
    assert _cli("export", "tiny", "--ollama", tmp_path / "od", "--gguf", tmp_path / "t.gguf").exit_code == 0
    for args, option in ((["--ollama", tmp_path / "od"], "--ollama"), (["--gguf", tmp_path / "t.gguf"], "--gguf")):
        r = _cli("export", "tiny", *args)
        assert r.exit_code == 1 and "already exists" in r.output, r.output
        assert f"choose another {option} path, or pass --force" in _fix(r) and "-o " not in _fix(r), r.output


@pytest.mark.parametrize("first, second", [("k", "k.pem"), ("k.pem", "k")])
def test_keygen_never_writes_over_another_keys_public_half(tmp_path, monkeypatch, first, second):
    """`keygen k` then `keygen k.pem`: both name their public half k.pub.pem. The second was refused with "pass
    --force", which would have replaced the first key's public half."""
    pytest.importorskip("cryptography")
    monkeypatch.chdir(tmp_path)
    assert _cli("keygen", first).exit_code == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {first, "k.pub.pem"}
    for extra in ([], ["--force"], ["--public-only", "--force"]):
        if "--public-only" in extra:
            (tmp_path / second).write_bytes(before[first])  # a private key there too: still not its public file
        r = _cli("keygen", second, *extra)
        assert r.exit_code == 1 and "Traceback" not in r.output, (extra, r.output)
        assert f"'{first}'" in r.output and f"'{second}'" in r.output and "k.pub.pem" in r.output, r.output
        assert "--force" not in _fix(r), r.output
        assert (tmp_path / "k.pub.pem").read_bytes() == before["k.pub.pem"]
    assert (tmp_path / first).read_bytes() == before[first]


# -- a file output given with a trailing separator names a folder ----------------------------------------------
@pytest.mark.parametrize("tail", ["/", "//", "/."])
def test_a_file_output_with_a_trailing_separator_is_refused(tmp_path, monkeypatch, tail):
    """`pack ... -o newdir/` wrote a file 'newdir', `export NAME --gguf gdir/` a file 'gdir'."""
    import bundle_kit as kit

    src = kit.installed_tiny(tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "there").mkdir()
    cases = [(["pack", src["model"], "--license", src["license"], "-o"], "-o", "NAME.edgemed"),
             (["export", "tiny", "--gguf"], "--gguf", "NAME.gguf"),
             (["convert", tmp_path / "no-ckpt", "-o"], "-o", "NAME.gguf")]
    if kit_has_crypto():
        cases.append((["keygen"], "PRIVATE_KEY", "key.pem"))
    for folder in ("newdir", "there"):
        for args, option, example in cases:
            r = _cli(*args, folder + tail)
            if option == "--gguf" and folder == "there":  # click's own check of an existing folder (dir_okay=False)
                assert r.exit_code == 2 and "is a directory" in r.output, r.output
                continue
            assert r.exit_code == 1 and "names a folder" in r.output and option in r.output, (args, r.output)
            assert f"{folder}/{example}" in _fix(r), (args, r.output)
    assert not (tmp_path / "newdir").exists() and not any((tmp_path / "there").iterdir())
    assert not (tmp_path / "newdir.pub.pem").exists() and not (tmp_path / "there.pub.pem").exists()
    r = _cli("pack", src["model"], "--license", src["license"], "--dir", "-o", "newdir" + tail)  # a folder output: fine
    assert r.exit_code == 0 and (tmp_path / "newdir" / "manifest.json").is_file(), r.output


def kit_has_crypto() -> bool:
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return False
    return True
