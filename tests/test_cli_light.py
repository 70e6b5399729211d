"""The CLI starts without heavy imports, and expected failures read as one clear paragraph."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import need_converter
from edgemed.cli import COMMANDS, cli

HEAVY = ("numpy", "torch", "transformers", "llama_cpp", "onnxruntime", "gguf", "safetensors", "peft")


def test_help_imports_nothing_heavy():
    code = (
        "import sys; from edgemed.cli import cli\n"
        "try:\n    cli(['--help'], prog_name='edgemed')\nexcept SystemExit:\n    pass\n"
        f"print('\\n' + __import__('json').dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []
    assert "convert" in out and "run" in out


def test_every_command_imports_and_has_help():
    runner = CliRunner()
    for name in COMMANDS:
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert len(result.output) > 100


def test_run_missing_model_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "nope.gguf"), "--prompt", "hi"])
    assert result.exit_code == 1
    assert "does not exist" in result.output and "edgemed convert" in result.output
    assert "Traceback" not in result.output


def test_run_non_gguf_file_is_refused(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 not a gguf")
    result = CliRunner().invoke(cli, ["run", str(bogus), "--prompt", "hi"])
    assert result.exit_code == 1 and "not a GGUF file" in result.output


def test_convert_missing_source_is_a_clear_error(tmp_path):
    need_converter()  # without the converter side, the missing extra is named first
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "missing"), "-o", str(tmp_path / "x.gguf")])
    assert result.exit_code == 1 and "does not exist" in result.output and "Traceback" not in result.output


def test_a_failure_under_json_is_a_json_document_on_stdout(tmp_path):
    """A fleet script reading `verify --json` used to get an empty stdout on failure; the message stays on stderr."""
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"GGUF\x03\x00\x00\x00")
    cases = [["verify", str(tmp_path / "nope.edgemed")], ["inspect", str(bogus)], ["plan", str(bogus)],
             ["devices", "show", "no-such-profile"], ["devices", "check", str(tmp_path)],
             ["pack", "--adapter", "no-equals-sign"]]  # an option checked before --json is read
    for args in cases:
        r = CliRunner().invoke(cli, [*args, "--json"])
        assert r.exit_code == 1, (args, r.output)
        doc = json.loads(r.stdout)
        assert doc["ok"] is False and doc["problem"] and doc["error"].endswith("Error"), (args, doc)
        assert doc["problem"] in r.stderr and "Traceback" not in r.stderr, args
        plain = CliRunner().invoke(cli, args)
        assert plain.exit_code == 1 and plain.stdout == "" and doc["problem"] in plain.stderr, args


@pytest.mark.parametrize("bad, option", [(["--temperature", "abc"], "--temperature"), (["--seed", "1.5"], "--seed"),
                                         (["--ctx", "big"], "--ctx"), (["--no-such-option"], "--no-such-option")])
def test_a_usage_error_under_json_is_a_json_document_on_stdout(tmp_path, bad, option):
    """A bad option value (exit 2) left stdout empty: a script reading `run --json` got no document. Also when the
    parse stops before --json is read (an unknown option); the usage stays on stderr, and so does the exit status."""
    for args in (["-p", "hi", "--json", *bad], ["-p", "hi", *bad, "--json"]):
        r = CliRunner().invoke(cli, ["run", str(tmp_path / "absent.gguf"), *args])
        assert r.exit_code == 2, (args, r.output)
        doc = json.loads(r.stdout)
        assert doc["ok"] is False and option in doc["problem"] and doc["fix"].endswith(" run --help`"), doc
        assert option in r.stderr and "Usage:" in r.stderr
    plain = CliRunner().invoke(cli, ["run", str(tmp_path / "absent.gguf"), "-p", "hi", *bad])
    assert plain.exit_code == 2 and plain.stdout == ""


@pytest.mark.parametrize("args, document", [
    (["run", "M", "--prompt", "--json", "--bogus"], False), (["run", "M", "-p", "--json", "--seed", "1.5"], False),
    (["run", "M", "-p--json", "--json", "--bogus"], True), (["run", "M", "--prompt=--json", "--bogus"], False),
    (["run", "M", "-p", "hi", "--bogus", "--json"], True), (["run", "M", "--bogus", "--", "--json"], False),
    (["bench", "run", "M", "--eval", "--json", "--bogus"], False), (["bench", "run", "M", "--bogus", "--json"], True)])
def test_json_given_as_an_options_value_asks_for_no_document(args, document):
    """`--json` that click reads as another option's value (here the prompt or a data set) is not the flag: a usage
    error then prints its message on stderr only, as it does without the flag."""
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and "Usage:" in r.stderr, r.output
    assert (json.loads(r.stdout)["ok"] is False) if document else r.stdout == "", r.stdout


def test_ctrl_c_under_json_is_a_json_document_on_stdout(tmp_path, monkeypatch):
    import edgemed.packaging.ref

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(edgemed.packaging.ref, "runnable", interrupted)
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "absent.gguf"), "-p", "hi", "--json"])
    assert r.exit_code == 130 and json.loads(r.stdout) == {"ok": False, "error": "KeyboardInterrupt", "problem":
                                                           "Interrupted (Ctrl-C) before it finished.", "fix": None}
    assert CliRunner().invoke(cli, ["run", str(tmp_path / "absent.gguf"), "-p", "hi"]).stdout == ""


def test_sigterm_under_json_is_a_json_document_on_stdout_and_a_stop(tmp_path):
    """SIGTERM: the process still dies by the signal (a clean stop to a service manager), and stdout now holds one
    failure document where it held nothing (mid-generation on a real model: test_run_templates)."""
    import signal

    stop = ("import os, signal, edgemed.packaging.ref as ref\n"
            "def stopped(*_):\n    os.kill(os.getpid(), signal.SIGTERM)\n"
            "ref.runnable = stopped\n"
            "from edgemed.cli import main\nmain()\n")
    for json_args, want in ((["--json"], 1), ([], 0)):
        proc = subprocess.run([sys.executable, "-c", stop, "run", str(tmp_path / "absent.gguf"), "-p", "hi",
                               *json_args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == -signal.SIGTERM and "Stopped (SIGTERM)" in proc.stderr, proc.stderr[-2000:]
        docs = proc.stdout.splitlines()
        assert len(docs) == want and all(json.loads(d)["error"] == "Terminated" for d in docs), proc.stdout


def test_every_json_option_reports_failures_as_json():
    """A new command's `--json` made with a bare click.option would print nothing on stdout when it fails."""
    import importlib

    import click

    from edgemed.cli import json_flag

    marker = json_flag()(lambda: None).__click_params__[0].callback

    def commands(cmd):
        yield cmd
        for sub in getattr(cmd, "commands", {}).values():
            yield from commands(sub)

    seen = 0
    for target in COMMANDS.values():
        module, attr = target.split(":")
        for cmd in commands(getattr(importlib.import_module(module), attr)):
            for p in cmd.params:
                if isinstance(p, click.Option) and "--json" in p.opts:
                    assert p.callback is not None and p.callback.__code__ is marker.__code__, cmd.name
                    seen += 1
    assert seen >= 15


def test_run_refuses_an_empty_binary_or_endless_piped_prompt(tmp_path):
    """An empty prompt loaded the model and answered nothing in particular; piped bytes that are not UTF-8 were a
    traceback, and an endless pipe was read whole into memory. Each is refused before the model is read."""
    from edgemed.cli.run import MAX_TEXT_BYTES

    model = tmp_path / "missing.gguf"  # never reached: the prompt is refused first
    for args, stdin, said in [(["-p", "  \n"], None, "The prompt is empty"), ([], "", "The prompt is empty"),
                              ([], b"\xff\xfe", "not UTF-8 text (byte 0 is 0xff)"),
                              ([], b"a" * (MAX_TEXT_BYTES + 1), "over 4 MiB")]:
        r = CliRunner().invoke(cli, ["run", str(model), *args], input=stdin)
        assert r.exit_code == 1 and said in r.output and "does not exist" not in r.output, (args, r.output)


def test_run_names_a_typed_byte_that_is_not_utf8(tmp_path):
    """Python keeps an argument's byte that is not UTF-8 (a Latin-1 'é') as a surrogate escape, which was refused as
    'a lone surrogate' once rendered; named here as the byte, as a file's is, before the model is looked for."""
    options = '{"A": "a", "B": "b"}'
    for args, what in [(["-p", "caf\udce9 fever"], "The text of --prompt"),
                       (["-t", "note_summary", "-i", "note=caf\udce9"], "The text of --input note"),
                       (["-t", "mcq", "-q", "caf\udce9?", "--options", options], "The text of --question"),
                       (["-t", "mcq", "--item-json", '{"question": "caf\udce9?", "options": %s}' % options],
                        "--item-json")]:
        r = CliRunner().invoke(cli, ["run", str(tmp_path / "missing.gguf"), *args])
        assert r.exit_code == 1 and "does not exist" not in r.output, (args, r.output)
        assert f"{what} is not UTF-8 text (byte " in r.output and "is 0xe9)" in r.output, (args, r.output)


def test_a_template_run_refuses_prompt_and_system_it_would_ignore(tmp_path):
    """`run -t mcq --system "Reply in French only." --prompt ...` exited 0 having used neither."""
    for extra, flag in ([["--prompt", "ignore this"], "--prompt"], [["--system", "Reply in French only."], "--system"]):
        r = CliRunner().invoke(cli, ["run", str(tmp_path / "m.gguf"), "-t", "mcq", "-q", "Which?", *extra])
        assert r.exit_code == 1 and f"so {flag} cannot be used with it" in r.output, r.output
        assert "--question/--options/-i" in r.output  # the options run has


def test_text_options_read_from_a_file_or_standard_input(tmp_path, monkeypatch):
    """Patient details on the command line are in every local user's `ps` and in shell history: --question,
    --options, --prompt, --system and each -i value take @PATH (a file) and @- (standard input) instead."""
    import io

    from edgemed.cli.run import TextSource, template_inputs
    from edgemed.errors import InputError

    note = tmp_path / "note.txt"
    note.write_text("72-year-old, chest pain since 06:00\n", encoding="utf-8")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("Which test first?".encode())))
    inputs, _ = template_inputs("@-", None, None, [f"note=@{note}", "tone=@@ward", "plain=as typed"])
    assert inputs == {"question": "Which test first?", "note": "72-year-old, chest pain since 06:00\n",
                      "tone": "@ward", "plain": "as typed"}
    with pytest.raises(InputError, match="both ask for standard input"):
        template_inputs("@-", None, None, ["note=@-"])
    with pytest.raises(InputError, match="cannot read") as err:
        TextSource()("--question", f"@{tmp_path / 'absent.txt'}")
    assert "write @@" in err.value.fix
    (tmp_path / "bin.txt").write_bytes(b"\xff")
    with pytest.raises(InputError, match="not UTF-8 text"):
        TextSource()("--input note", f"@{tmp_path / 'bin.txt'}")

    model = tmp_path / "missing.gguf"  # never reached: the inputs are read and refused first
    (tmp_path / "blank.txt").write_text("  \n")
    r = CliRunner().invoke(cli, ["run", str(model), "--prompt", f"@{tmp_path / 'blank.txt'}"])
    assert r.exit_code == 1 and "The prompt is empty" in r.output, r.output
    r = CliRunner().invoke(cli, ["run", str(model), "-t", "note_summary", "-i", f"note=@{tmp_path / 'absent.txt'}"])
    assert r.exit_code == 1 and "--input note @" in r.output and "does not exist" not in r.output, r.output
    r = CliRunner().invoke(cli, ["run", str(model), "-t", "mcq", "-q", "@-"], input="Which?")
    assert r.exit_code == 1 and "options" in r.output, r.output  # the question came from standard input; options did not


def test_a_text_option_reads_a_pipe_the_shell_made(tmp_path):
    """`-i note=@<(decrypt note.gpg)`: the note comes through a pipe, and no copy of it is written to disk."""
    import os
    import threading

    from edgemed.cli.run import TextSource

    fifo = tmp_path / "note.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("chest pain since 06:00", encoding="utf-8"))
    writer.start()
    try:
        assert TextSource()("--input note", f"@{fifo}") == "chest pain since 06:00"
    finally:
        writer.join(10)
