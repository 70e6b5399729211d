"""Converter inputs that used to hang, exhaust memory, raise a traceback or be taken silently.

Calibration text (``--imatrix-from``) is read only from a regular file and only as far as the importance matrix can
use; sizes (``--memory-budget``, ``$EDGEMED_MEMORY_BUDGET``, the bench's ``--memory-cap``) are refused when empty,
not a size, zero or absurd; ``--max-kld`` below what any quantized file reaches is refused before any work.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fifo_kit import run_unblocked

from edgemed.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
PROSE = ("Community-acquired pneumonia in adults presents with fever, productive cough and pleuritic chest pain; "
         "chest radiography confirms the diagnosis and guides the choice of empirical antibiotics.\n\n")
DIGITS_400 = "9" * 400


def _child(code: str, *, memory: int, timeout: float = 10) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with its address space capped at ``memory`` bytes: a reader that tries to
    hold a whole huge file fails there (MemoryError) instead of taking this machine's memory."""
    cap = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))\n"
    return subprocess.run([sys.executable, "-c", cap + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny

    return tiny.build_model(tmp_path_factory.mktemp("bounds") / "llama", "llama")


def _cli(*args, env=None):
    from click.testing import CliRunner

    from edgemed.cli import cli

    return CliRunner().invoke(cli, [*map(str, args)], env=env)


def _said(result) -> str:
    return " ".join(result.output.split())


# -- calibration text: what is not a regular file ---------------------------------------------------------------
def test_imatrix_from_a_fifo_is_refused_without_hanging(model, tmp_path):
    """`edgemed convert SRC --imatrix-from FIFO`: refused at once (it used to block forever on open)."""
    pytest.importorskip("llama_cpp")
    fifo = tmp_path / "calib.fifo"
    os.mkfifo(fifo)
    result = run_unblocked(lambda: _cli("convert", model, "--quant", "q4_0", "--no-parity", "--imatrix-from", fifo,
                                        "-o", tmp_path / "x.gguf"),
                           fifo, 10, "--imatrix-from a FIFO blocked instead of being refused")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "is a named pipe (FIFO), not a regular file" in _said(result) and "Fix:" in result.output
    assert not (tmp_path / "x.gguf").exists()


def test_imatrix_from_dev_zero_is_refused_before_any_work(tmp_path):
    """`edgemed convert SRC --imatrix-from /dev/zero`: refused as a device before the source is looked at (here it
    does not exist, so this test cannot reach a read of /dev/zero whatever the code does)."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("torch")
    result = _cli("convert", tmp_path / "no-such-checkpoint", "--quant", "q4_0", "--imatrix-from", "/dev/zero",
                  "-o", tmp_path / "x.gguf")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    said = _said(result)
    assert "'/dev/zero' is a character device, not a regular file" in said and "Fix:" in said
    assert "no-such-checkpoint" not in said


def test_the_reader_never_reads_dev_zero():
    """The reader itself refuses /dev/zero (it used to read it until the process was killed): in a child whose
    address space is capped at 512 MiB, so an unbounded read fails there and not on this machine."""
    done = _child("""
        from pathlib import Path
        from edgemed.errors import InputError
        from edgemed.converters.gguf.imatrix import read_calibration_text
        try:
            read_calibration_text(Path("/dev/zero"))
        except InputError as exc:
            print(exc)
    """, memory=512 << 20)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "is a character device, not a regular file" in done.stdout


@pytest.mark.parametrize("kind", ["directory", "fifo", "socket", "device"])
def test_only_a_regular_file_is_calibration_text(tmp_path, kind):
    from edgemed.converters.gguf import calibration
    from edgemed.converters.gguf.imatrix import TEXT_BYTES

    if kind == "directory":
        path, words = tmp_path / "calib", "is a directory"
        path.mkdir()
    elif kind == "fifo":
        path, words = tmp_path / "calib", "is a named pipe (FIFO)"
        os.mkfifo(path)
    elif kind == "socket":
        path, words = tmp_path / "calib", "is a socket"
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
    else:
        path, words = Path("/dev/zero"), "is a character device"
    for reader in (lambda: calibration.resolve(path), lambda: calibration.read(path, TEXT_BYTES)):
        with pytest.raises(InputError, match="not a regular file") as exc:
            reader()
        assert words in str(exc.value) and exc.value.fix


def test_a_file_swapped_for_a_fifo_after_the_check_does_not_block(tmp_path, monkeypatch):
    """The check and the open are two steps: what was opened (non-blocking) is checked again."""
    from edgemed.converters.gguf import calibration

    path = tmp_path / "calib.txt"
    path.write_text(PROSE)
    real_stat = os.stat

    def stat_then_swap(p, *a, **kw):
        st = real_stat(p, *a, **kw)
        if Path(p) == path:
            path.unlink()
            os.mkfifo(path)
        return st

    monkeypatch.setattr(calibration.os, "stat", stat_then_swap)
    got = run_unblocked(lambda: _catch(lambda: calibration.read(path, 1 << 20)), path, 10,
                        "opening a swapped-in FIFO blocked")
    assert isinstance(got, InputError) and "named pipe (FIFO)" in str(got)


def _catch(call):
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - handed back to the test
        return exc


# -- calibration text: how much is read -------------------------------------------------------------------------
def test_a_1gb_calibration_file_is_read_only_as_far_as_it_is_used(tmp_path):
    """A 1 GB file (sparse: text, then 1 GB of holes) is read to its first MiB, in a child capped at 512 MiB of
    address space that reading it whole would break."""
    big = tmp_path / "big.txt"
    with open(big, "wb") as fh:
        fh.write(PROSE.encode() * ((3 << 20) // len(PROSE)))  # ~3 MiB of text ...
        fh.truncate(1 << 30)  # ... then holes to 1 GB: no disk used
    code = f"""
        import json, time
        from pathlib import Path
        from edgemed.converters.gguf.imatrix import read_calibration_text
        start = time.monotonic()
        texts = read_calibration_text(Path({str(big)!r}))
        print(json.dumps({{"chars": sum(len(t) for t in texts), "passages": len(texts), "s": time.monotonic() - start}}))
    """
    done = _child(code, memory=512 << 20)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout)
    assert 0 < got["chars"] <= 1 << 20 and got["passages"] > 1000 and got["s"] < 5


def test_the_longer_text_is_said_in_the_log_and_the_report(tmp_path):
    """The matrix comes from the first TEXT_BYTES of a longer file: the log says how much was used, the report's
    sha256 is of exactly those bytes, and bytes_used / file_bytes say how much of the file that was."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny

    from edgemed.converters import arch_spec
    from edgemed.converters.source.checkpoint import Checkpoint
    from edgemed.converters.gguf.imatrix import CHUNK_TOKENS, MAX_CHUNKS, TEXT_BYTES, compute_imatrix

    text = tmp_path / "long.txt"
    text.write_bytes(PROSE.encode() * (2 * TEXT_BYTES // len(PROSE)))
    ckpt = Checkpoint.open(tiny.build_model(tmp_path / "llama", "llama"))
    said: list[str] = []
    made = compute_imatrix(ckpt, arch_spec(ckpt.architecture), text, echo=said.append)
    line = said[-1]
    assert f"from {MAX_CHUNKS * CHUNK_TOKENS} tokens of long.txt" in line
    assert f"the first {MAX_CHUNKS * CHUNK_TOKENS} of" in line and "the rest is not used" in line
    prov = made.provenance()
    assert prov["file_bytes"] == text.stat().st_size and 0 < prov["bytes_used"] <= TEXT_BYTES
    assert f"only its first {prov['bytes_used']:,} of {prov['file_bytes']:,} bytes were read" in line
    with open(text, "rb") as fh:
        assert prov["sha256"] == hashlib.sha256(fh.read(prov["bytes_used"])).hexdigest()


def test_the_bound_follows_from_the_tokens_used():
    from edgemed.converters.gguf import calibration
    from edgemed.converters.gguf.imatrix import CHUNK_TOKENS, MAX_CHUNKS, TEXT_BYTES

    assert TEXT_BYTES == MAX_CHUNKS * CHUNK_TOKENS * calibration.MAX_BYTES_PER_TOKEN
    assert 256 << 10 <= TEXT_BYTES <= 4 << 20  # generous for 8,192 tokens, small beside a model


def test_a_cut_keeps_whole_lines_and_whole_characters(tmp_path):
    from edgemed.converters.gguf import calibration

    rows = tmp_path / "calib.jsonl"
    rows.write_text("\n".join(json.dumps({"question": f"Is {i} a dose in µg?"}) for i in range(2000)) + "\n")
    got = calibration.read(rows, 4096)
    assert got.truncated and got.bytes_used <= 4096 and rows.read_bytes()[:got.bytes_used].endswith(b"\n")
    assert all(t.startswith("Is ") for t in got.texts)  # no half line handed to the JSON parser
    one_line = tmp_path / "one.txt"
    one_line.write_text("µ" * 5000)  # two bytes a character, no newline: cut between characters
    got = calibration.read(one_line, 4095)
    assert got.truncated and got.bytes_used == 4094 and got.texts == ["µ" * 2047]
    long_line = tmp_path / "long-line.jsonl"
    long_line.write_text(json.dumps({"text": "x" * 10_000}) + "\n")
    with pytest.raises(InputError, match="longer than the 4,096 bytes"):
        calibration.read(long_line, 4096)


@pytest.mark.parametrize("content,words", [
    (b"", "is empty"),
    (b"\n\n  \n\t\n", "No calibration text found"),
    (b"\0" * 4096, "NUL byte"),
    (b"Fever and cough.\n\n\0\0\0binary", "NUL byte"),
    (b"Fever \xe9 cough", "not UTF-8"),
])
def test_empty_binary_or_non_utf8_text_is_refused(tmp_path, content, words):
    from edgemed.converters.gguf import calibration
    from edgemed.converters.gguf.imatrix import read_calibration_text

    path = tmp_path / "calib.txt"
    path.write_bytes(content)
    for reader in (read_calibration_text, calibration.resolve):
        with pytest.raises(InputError, match=words) as exc:
            reader(path)
        assert exc.value.fix


def test_the_budget_counts_the_calibration_text():
    from edgemed.converters.budget.peaks import Dims, estimate_gguf
    from edgemed.converters.gguf.imatrix import TEXT_BYTES

    dims = Dims.from_config({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 384,
                             "intermediate_size": 128})
    est = estimate_gguf(dims, out_type="q4_0", imatrix=True)
    terms = {s.name: {t.name: t for t in s.terms if t.name.startswith("calibration text")} for s in est.steps}
    tokenized = next(iter(terms["imatrix:text"].values()))  # read, joined and tokenized: bounded by what is read
    assert not tokenized.mapped and 100 * TEXT_BYTES <= tokenized.bytes <= 512 << 20
    held = next(iter(terms["imatrix"].values()))  # then its passages, beside the layers
    assert TEXT_BYTES <= held.bytes <= 4 * TEXT_BYTES
    assert est.phase_bytes("imatrix") >= est.base + tokenized.bytes
    plain = estimate_gguf(dims, out_type="q4_0", imatrix=False)
    assert not any(t.startswith("calibration") for s in plain.steps for t in (x.name for x in s.terms))


def test_bench_reproduce_refuses_a_fifo_before_any_work(tmp_path):
    (tmp_path / "src").mkdir()
    fifo = tmp_path / "calib.fifo"
    os.mkfifo(fifo)
    result = run_unblocked(lambda: _cli("bench", "reproduce", tmp_path / "src", "--quants", "q4_0-imatrix",
                                        "--imatrix-from", fifo, "-o", tmp_path / "out"),
                           fifo, 10, "bench reproduce --imatrix-from a FIFO blocked")
    assert result.exit_code == 1 and "named pipe (FIFO), not a regular file" in _said(result), result.output
    assert not (tmp_path / "out").exists()


# -- sizes ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,words", [
    ("", "must be a size"),
    ("   ", "must be a size"),
    ("lots", "must be a size"),
    ("-1GiB", "a negative size"),
    ("0", "is zero"),
    ("0.0000001", "less than one byte"),
    ("inf", "must be a size"),
    ("nan", "must be a size"),
    ("1e9", "must be a size"),
    ("1025TiB", "over 1 PiB"),
    (DIGITS_400, "over 1 PiB"),
    (DIGITS_400 + "GiB", "over 1 PiB"),
])
def test_a_size_that_is_not_one_is_refused(text, words):
    from edgemed.converters.budget.memory_room import parse_size

    with pytest.raises(InputError, match=words) as exc:
        parse_size(text)
    assert "--memory-budget" in str(exc.value) and "--memory-budget 6GiB" in exc.value.fix
    with pytest.raises(InputError) as exc:
        parse_size(text, "$EDGEMED_MEMORY_BUDGET")
    assert "$EDGEMED_MEMORY_BUDGET" in str(exc.value) and "EDGEMED_MEMORY_BUDGET=6GiB" in exc.value.fix


def test_sizes_up_to_1_pib_parse_exactly():
    from edgemed.converters.budget.memory_room import parse_size

    assert parse_size("1") == 1 and parse_size("1024TiB") == 1 << 50
    assert parse_size("1125899906842624") == 1 << 50 and parse_size("6.5G") == 6_500_000_000
    assert parse_size(" 0.5 KiB ") == 512 and parse_size("123456789012345") == 123456789012345
    assert parse_size("2.01KB") == 2010  # exact decimal arithmetic: in floats 2.01 x 1000 is 2009.999...


@pytest.mark.parametrize("args,env,words", [
    (["--memory-budget", DIGITS_400], None, "--memory-budget '9999"),
    (["--memory-budget", ""], None, "--memory-budget must be a size such as 6GiB"),
    (["--to", "onnx", "--memory-budget", ""], None, "--memory-budget must be a size such as 6GiB"),
    ([], {"EDGEMED_MEMORY_BUDGET": DIGITS_400}, "$EDGEMED_MEMORY_BUDGET '9999"),
    ([], {"EDGEMED_MEMORY_BUDGET": "lots"}, "$EDGEMED_MEMORY_BUDGET must be a size"),
])
def test_the_command_refuses_a_bad_budget_before_any_work(tmp_path, args, env, words):
    """The budget is read first: the source is not even looked at (here it does not exist)."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("torch")
    if "onnx" in args:
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    result = _cli("convert", tmp_path / "no-such-checkpoint", *args, "-o", tmp_path / "x.gguf", env=env)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    said = _said(result)
    assert words in said and "Fix:" in said and "Traceback" not in said
    assert "no-such-checkpoint" not in said


def test_the_bench_memory_cap_refuses_an_empty_size():
    pytest.importorskip("psutil")
    from edgemed.benchmarks import convert_cost as cc

    for bad in ("", DIGITS_400):
        with pytest.raises(InputError, match="--memory-cap"):
            cc.parse_args(["--memory-cap", bad])


# -- --max-kld --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["1e-30", "5e-05", "1e-300"])
def test_an_impossible_max_kld_is_refused_before_any_work(tmp_path, value):
    """`--quant auto --max-kld 1e-30` used to be refused only after every candidate was measured."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("torch")
    result = _cli("convert", tmp_path / "no-such-checkpoint", "--quant", "auto", "--max-kld", value,
                  "-o", tmp_path / "x.gguf")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    said = _said(result)
    assert f"--max-kld {float(value):g} is below 0.0001 nats" in said and "Fix:" in said and "no-such-checkpoint" not in said


def test_the_max_kld_floor():
    from edgemed.converters.gguf.auto_quant import MIN_MAX_KLD, check_request

    with pytest.raises(InputError, match=r"--max-kld 1e-30 is below 0.0001 nats") as exc:
        check_request("auto", 1e-30, None)
    assert "--max-kld 0.0001 or more" in exc.value.fix
    check_request("auto", MIN_MAX_KLD, None)  # the floor itself is a budget
    check_request("auto", 0.005, None)


# -- checkpoint and adapter files: what is not a regular file ----------------------------------------------------
# Each is read by the reader named: the config, safetensors index and tokenizer.json (load_json), a safetensors
# header (the checkpoint's or the adapter's), a pickle with consent. A FIFO used to block the command forever and a
# link to /dev/zero to be read until memory ran out (load_json's size check read the device's st_size, 0).
CHECKPOINT_FILES = {
    "config.json": "Checkpoint.open(ckpt)",
    "tokenizer.json": "load_tokenizer_json(ckpt / 'tokenizer.json')",
    "model.safetensors": "Checkpoint.open(ckpt)",
    "pytorch_model.bin": "Checkpoint.open(ckpt, allow_pickle=True)",
}


@pytest.mark.parametrize("kind", ["fifo", "device"])
@pytest.mark.parametrize("name", list(CHECKPOINT_FILES))
def test_a_checkpoint_file_that_is_not_a_regular_file_is_refused(model, tmp_path, name, kind):
    """In a child with a time limit and capped address space (512 MiB; 4 GiB where torch is imported, which a read to
    the end of /dev/zero passes all the same): a hang fails the test by its timeout, an unbounded read by the memory
    cap, and only an error naming the file passes."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(model, ckpt)
    if name == "pytorch_model.bin":
        (ckpt / "model.safetensors").unlink()
    (ckpt / name).unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(ckpt / name)
    else:
        (ckpt / name).symlink_to("/dev/zero")
    done = _child(f"""
        from pathlib import Path
        from edgemed.errors import EdgemedError
        from edgemed.converters.source.checkpoint import Checkpoint
        from edgemed.converters.gguf.tokenizer import load_tokenizer_json
        ckpt = Path({str(ckpt)!r})
        try:
            {CHECKPOINT_FILES[name]}
        except EdgemedError as exc:
            print(exc.problem, "|", exc.fix)
    """, memory=(4 << 30) if name == "pytorch_model.bin" else (512 << 20), timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    words = "a named pipe (FIFO)" if kind == "fifo" else "a character device"
    assert name in done.stdout and words in done.stdout and "not a regular file" in done.stdout, done.stdout


def test_an_adapter_weights_fifo_is_refused(model, tmp_path):
    """adapter_model.safetensors as a FIFO: refused through `edgemed convert --lora`, not a hang."""
    pytest.importorskip("peft")
    pytest.importorskip("gguf")
    import shutil

    import tiny

    lora = tiny.build_lora(model, tmp_path / "lora")
    (lora / "adapter_model.safetensors").unlink()
    os.mkfifo(lora / "adapter_model.safetensors")
    result = run_unblocked(lambda: _cli("convert", model, "--lora", lora, "--quant", "f16", "--no-parity", "-o",
                                        tmp_path / "x.gguf"),
                           lora / "adapter_model.safetensors", 60, "an adapter's FIFO blocked the command")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "named pipe (FIFO), not a regular file" in _said(result) and "Fix:" in result.output
    assert not (tmp_path / "x.gguf").exists()
    shutil.rmtree(lora)
