"""The readers outside the converters: each hostile input is refused
with a one-paragraph error that names the fix, before anything is allocated or loaded; none is a traceback."""

from __future__ import annotations

import json
import os
import socket
import struct
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import bundle_kit as kit
from edgemed.cli import cli
from edgemed.errors import EdgemedError, InputError, IntegrityError, ProfileError, UnsafeArchive

gguf = pytest.importorskip("gguf")


def run_cli(*args) -> str:
    """Run the CLI; it must exit 1 with one short paragraph (no traceback). Returns the output."""
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), r.exception
    assert r.output.startswith("Error: ") and "Traceback" not in r.output and "\n\n" not in r.output.strip(), r.output
    return r.output


# -- GGUF bytes by hand -------------------------------------------------------------------------
def s(text: str | bytes, length: int | None = None) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def u32(key: str, value: int) -> bytes:
    return kv(key, 4, struct.pack("<I", value))


def gguf_bytes(kvs: list[bytes], tensors: bytes = b"", n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + b"".join(kvs) + tensors


LLAMA = [kv("general.architecture", 8, s("llama")), u32("llama.block_count", 2), u32("llama.context_length", 2048),
         u32("llama.embedding_length", 64), u32("llama.feed_forward_length", 128), u32("llama.attention.head_count", 4),
         u32("llama.vocab_size", 100)]


def write(tmp_path: Path, data: bytes, name: str = "m.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


# -- the GGUF header reader and the planner -------------------------------------------------------
def test_corrupt_string_length_in_array_is_input_error_not_overflow(tmp_path):
    # an array of 3 strings whose first length is 2**63: the old reader skipped past 2**63 and raised OverflowError
    tokens = kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 3) + s(b"a", 2**63) + s("b") + s("c"))
    path = write(tmp_path, gguf_bytes(LLAMA + [tokens, u32("x.after", 1)]))
    out = run_cli("plan", path, "--profile", "generic", "--budget-mb", "1000")
    assert "not a readable GGUF" in out and "m.gguf" in out and "Fix:" in out


@pytest.mark.parametrize("mutation", ["string", "count", "kv-count", "tensor-count", "dims", "nested"])
def test_every_length_is_bounded_by_the_file(tmp_path, mutation):
    from edgemed.formats.gguf_header import read_header

    base = LLAMA + [kv("k", 8, s("v"))]
    data = {
        "string": gguf_bytes(LLAMA + [kv("k", 8, s(b"v", 2**64 - 1))]),
        "count": gguf_bytes(LLAMA + [kv("k", 9, struct.pack("<IQ", 4, 2**62))]),
        "kv-count": b"GGUF" + struct.pack("<IQQ", 3, 0, 2**64 - 1) + b"".join(base),
        "tensor-count": b"GGUF" + struct.pack("<IQQ", 3, 2**64 - 1, len(base)) + b"".join(base),
        "dims": gguf_bytes(base, s("t") + struct.pack("<I", 2**31) + b"\0" * 64, n_tensors=1),
        # 50k arrays nested in one another: the old reader recursed once per level (RecursionError)
        "nested": gguf_bytes(LLAMA + [kv("k", 9, struct.pack("<IQ", 9, 1) * 50_000 + struct.pack("<IQ", 4, 0))]),
    }[mutation]
    with pytest.raises(InputError, match="not a readable GGUF"):
        read_header(write(tmp_path, data))


def test_plan_refuses_a_truncated_gguf(tmp_path):
    good = kit.tiny_gguf(tmp_path / "good.gguf").read_bytes()
    cut = write(tmp_path, good[:-10], "cut.gguf")
    out = run_cli("plan", cut, "--profile", "generic", "--budget-mb", "1000")
    assert "truncated" in out and "cut.gguf" in out and f"the file has {len(good) - 10}" in out
    assert CliRunner().invoke(cli, ["plan", str(tmp_path / "good.gguf"), "--profile", "generic", "--budget-mb", "1000"]).exit_code == 0


@pytest.mark.parametrize("key,value", [("llama.attention.head_count", 0), ("llama.block_count", 2**32 - 1)])
def test_hyperparameters_out_of_range_are_refused(tmp_path, key, value):
    meta = [b for b in LLAMA if key.encode() not in b] + [u32(key, value)]
    out = run_cli("plan", write(tmp_path, gguf_bytes(meta)), "--profile", "generic", "--budget-mb", "1000")
    assert key in out and "expects an integer" in out


def test_float_hyperparameter_is_refused(tmp_path):
    meta = [b for b in LLAMA if b"embedding_length" not in b] + [kv("llama.embedding_length", 12, struct.pack("<d", float("inf")))]
    assert "llama.embedding_length" in run_cli("plan", write(tmp_path, gguf_bytes(meta)), "--profile", "generic")


def profile_text(**llama) -> str:
    text = (Path(__file__).parents[1] / "device_profiles" / "generic.toml").read_text()
    for key, value in llama.items():
        text = "\n".join(f"{key} = {value}" if line.startswith(f"{key} =") else line for line in text.splitlines())
    return text.replace('name = "generic"', 'name = "custom"')


@pytest.fixture
def profiles_dir(tmp_path, monkeypatch):
    d = tmp_path / "profiles"
    d.mkdir()
    monkeypatch.setenv("EDGEMED_PROFILES_DIR", str(d))
    return d


def test_n_batch_2_pow_32_is_refused(tmp_path, profiles_dir):
    (profiles_dir / "custom.toml").write_text(profile_text(n_batch=2**32))
    model = kit.tiny_gguf(tmp_path / "tiny.gguf")
    out = run_cli("plan", model, "--profile", "custom")
    assert "llama.n_batch" in out and "65536" in out and "custom.toml" in out


def test_plan_never_prescribes_a_batch_larger_than_the_context(tmp_path, profiles_dir):
    from edgemed.devices import get_profile
    from edgemed.runtime.plan import make_plan

    (profiles_dir / "custom.toml").write_text(profile_text(n_batch=65536, n_ubatch=65536))
    plan = make_plan(kit.tiny_gguf(tmp_path / "tiny.gguf"), get_profile("custom"), None, requested_ctx=1024, budget=1 << 34)
    assert plan.llama["n_batch"] == plan.llama["n_ubatch"] == 1024


@pytest.mark.parametrize("threads", ["0", "-3", "100000"])
def test_threads_out_of_range_are_refused_before_anything(tmp_path, threads):
    out = run_cli("serve", tmp_path / "absent.gguf", "--threads", threads)
    assert "--threads must be an integer from 1 to 1024" in out


@pytest.mark.parametrize("value", ["inf", "nan", "-5", "0"])
def test_budget_must_be_a_finite_positive_size(tmp_path, value):
    out = run_cli("plan", kit.tiny_gguf(tmp_path / "tiny.gguf"), "--profile", "generic", "--budget-mb", value)
    assert "--budget-mb must be a number above 0" in out


def test_ctx_is_bounded(tmp_path):
    assert "The context must be an integer from 1 to" in run_cli("plan", kit.tiny_gguf(tmp_path / "t.gguf"), "--profile",
                                                                  "generic", "--ctx", str(10**30))


def test_a_served_context_too_large_names_the_per_slot_value_typed(tmp_path):
    """`serve --ctx 614400 --slots 4` was refused as "got 2457600", a number nobody typed."""
    from edgemed.runtime.session import prepare

    with pytest.raises(InputError, match=r"got 2457600 \(--ctx 614400 per slot x 4 slots\)"):
        prepare(kit.tiny_gguf(tmp_path / "t.gguf"), "generic", n_ctx=614400, slots=4, prefix_cache=True)  # per slot


# -- bundle manifests, the tar head, inspect ------------------------------------------------------
@pytest.fixture
def bundle_dir(tmp_path):
    from edgemed.packaging.bundle import PackInputs, pack

    inp = kit.inputs(tmp_path / "in")
    pack(PackInputs(model=inp["model"], license=inp["license"], card=inp["card"]), tmp_path / "b", as_dir=True)
    return tmp_path / "b"


@pytest.mark.parametrize("field,value", [
    ("name", 7), ("files", {"a": 1}), ("files", [1, 2]), ("model", ["path"]), ("memory", {"by_context": [1, 2]}),
    ("memory", {"profiles": {"x": {"n_ctx": "big"}}}), ("provenance", {"built_with": "llama"}), ("model.params", "many"),
    ("model.context_length", "long"), ("files.0.path", 5), ("card", "text"), ("memory", {"profiles": {"x": {"n_ctx": 1, "bytes": 2, "fits": 3}}}),
])
def test_mistyped_manifest_fields_are_integrity_errors(bundle_dir, field, value):
    man = json.loads((bundle_dir / "manifest.json").read_text())
    target, *path = field.split(".")
    if path:
        inner = man[target]
        for p in path[:-1]:
            inner = inner[int(p)]
        inner[int(path[-1]) if path[-1].isdigit() else path[-1]] = value
    else:
        man[target] = value
    (bundle_dir / "manifest.json").write_text(json.dumps(man))
    out = run_cli("inspect", bundle_dir)
    assert "manifest" in out and "fresh copy" in out


def test_deeply_nested_manifest_is_refused_not_a_recursion_error(bundle_dir):
    from edgemed.packaging.manifest import Manifest

    deep = b'{"schema": "edgemed.bundle/1", "card": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(IntegrityError, match="nests more than 64"):
        Manifest.from_bytes(deep, "x")
    (bundle_dir / "manifest.json").write_bytes(deep)
    assert "nests more than" in run_cli("inspect", bundle_dir)


def test_oversized_signature_in_a_bundle_directory_is_not_read(bundle_dir):
    from edgemed.packaging.manifest import MAX_SIGNATURE_BYTES

    (bundle_dir / "manifest.sig").write_bytes(b"{" + b" " * MAX_SIGNATURE_BYTES + b"}")
    assert "too large for a signature" in run_cli("inspect", bundle_dir)


def test_huge_number_in_manifest_is_refused(bundle_dir):
    from edgemed.packaging.manifest import Manifest

    with pytest.raises(IntegrityError, match="not valid JSON"):
        Manifest.from_bytes(b'{"schema": "edgemed.bundle/1", "files": ' + b"9" * 5000 + b"}", "x")


@pytest.mark.parametrize("field,value", [
    ("model.params", 10**400), ("model.params", 2**53), ("model.context_length", 10**400),
    ("memory.by_context", {"4096": 10**400}), ("memory.profiles", {"x": {"n_ctx": 4096, "bytes": 2**50 + 1, "fits": True}}),
], ids=["params-401-digits", "params-2**53", "context-401-digits", "by-context-401-digits", "profile-bytes-2**50+1"])
def test_a_huge_number_in_the_manifest_is_refused_at_verify_and_install(bundle_dir, field, value):
    """"params": 1 followed by 400 zeros verified and installed, then `edgemed list` (and inspect) ended in an
    OverflowError (n / 1e6) for the whole store until that model was removed."""
    from edgemed.packaging.store import Store

    man = json.loads((bundle_dir / "manifest.json").read_text())
    section, key = field.split(".")
    man[section][key] = value
    (bundle_dir / "manifest.json").write_text(json.dumps(man))
    for command in ("verify", "install", "inspect"):
        out = run_cli(command, bundle_dir)
        assert f"manifest field {field} is" in out and "2**5" in out and "fresh copy" in out, (command, out)
    assert Store().list() == []


def test_manifest_sizes_and_counts_have_an_upper_bound(bundle_dir):
    from edgemed.packaging.manifest import MAX_COUNT, MAX_PARAMS, Manifest

    man = json.loads((bundle_dir / "manifest.json").read_text())
    man["model"]["params"], man["model"]["context_length"] = MAX_PARAMS, MAX_COUNT
    assert Manifest.from_bytes(json.dumps(man).encode(), "x").model["params"] == 2**53 - 1  # the bounds themselves pass
    man["files"][0]["size"] = 10**400
    with pytest.raises(IntegrityError, match=rf"'{man['files'][0]['path']}' has an invalid size 1000.*at most 2\*\*50"):
        Manifest.from_bytes(json.dumps(man).encode(), "x")


def test_an_installed_manifest_with_a_huge_number_is_one_damaged_row_of_list(bundle_dir):
    """A store an earlier edgemed filled: the bound at read makes that model a damaged row; the rest still lists."""
    from edgemed.packaging.store import Store

    store = Store()
    store.install(bundle_dir, name="good")
    store.install(bundle_dir, name="huge")
    installed = store.models / "huge" / "manifest.json"
    man = json.loads(installed.read_text())
    man["model"]["params"] = 10**400
    installed.unlink()  # the store's files are hard links into its blobs
    installed.write_text(json.dumps(man))
    r = CliRunner().invoke(cli, ["list"], catch_exceptions=False)
    assert r.exit_code == 0 and "good" in r.output, r.output
    assert "huge" in r.output and "DAMAGED" in r.output and "model.params" in r.output, r.output


def test_a_gguf_model_path_that_is_a_folder_is_refused(bundle_dir, tmp_path):
    """With format gguf and model.path "model", validation passed because a listed file lay under model/; `export
    --gguf` then ended in IsADirectoryError. Only an ONNX model (and an adapter bundle's path) is a folder."""
    from edgemed.packaging.manifest import Manifest

    man = json.loads((bundle_dir / "manifest.json").read_text())
    assert man["model"]["format"] == "gguf" and man["model"]["path"].startswith("model/")
    man["model"]["path"] = "model"
    (bundle_dir / "manifest.json").write_text(json.dumps(man))
    for args in (["verify", bundle_dir], ["export", bundle_dir, "--gguf", tmp_path / "out.gguf"], ["install", bundle_dir]):
        out = run_cli(*args)
        assert "the model path 'model' is not among the listed files (a GGUF model is one listed file" in out, (args, out)
    assert not (tmp_path / "out.gguf").exists()
    man["model"]["format"] = "onnx"  # an ONNX model is the folder of its graph files
    assert Manifest.from_bytes(json.dumps(man).encode(), "x").model_path == "model"


def test_inspect_of_a_tar_cut_inside_its_manifest(tmp_path):
    from edgemed.packaging.bundle import PackInputs, pack

    inp = kit.inputs(tmp_path / "in")
    pack(PackInputs(model=inp["model"], license=inp["license"], card=inp["card"]), tmp_path / "b.edgemed")
    data = (tmp_path / "b.edgemed").read_bytes()
    with tarfile.open(tmp_path / "b.edgemed") as tf:
        m = tf.getmember("manifest.json")
    for cut in (m.offset_data + 10, m.offset_data + m.size // 2, m.offset_data + m.size - 1):
        (tmp_path / "cut.edgemed").write_bytes(data[:cut])
        out = run_cli("inspect", tmp_path / "cut.edgemed")
        assert "truncated" in out and "copy the bundle again" in out
        assert "truncated" in run_cli("verify", tmp_path / "cut.edgemed")


def _tar(path: Path, members: list[tuple[str, bytes | None]]) -> Path:
    """A PAX tar of (name, bytes) members; bytes None makes a directory entry."""
    import io

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            if data is None:
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return path


def test_one_head_rule_for_peek_and_read(bundle_dir, tmp_path):
    """peek_tar silently dropped an oversized manifest.sig that read_tar refused, and refused
    a directory entry that read_tar skipped; now both read the head with one function."""
    from edgemed.packaging.archive import hash_sink, peek_tar, read_tar
    from edgemed.packaging.manifest import MAX_SIGNATURE_BYTES

    manifest = (bundle_dir / "manifest.json").read_bytes()
    big_sig = _tar(tmp_path / "sig.edgemed", [("manifest.json", manifest), ("manifest.sig", b"x" * (MAX_SIGNATURE_BYTES + 1))])
    for reader in (peek_tar, lambda p: read_tar(p, hash_sink)):
        with pytest.raises(UnsafeArchive, match="manifest.sig declares"):
            reader(big_sig)
    files = [(f["path"], (bundle_dir / f["path"]).read_bytes()) for f in json.loads(manifest)["files"]]
    with_dir = _tar(tmp_path / "dir.edgemed", [("model/", None), ("manifest.json", manifest)] + files)
    assert peek_tar(with_dir)[1] == read_tar(with_dir, hash_sink)[1] == manifest


# -- device profiles ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["non-utf8", "inf", "nan", "nested", "directory", "symlink-loop", "fifo", "huge-int", "oversize"])
def test_bad_profiles_are_profile_errors(tmp_path, profiles_dir, case):
    target = profiles_dir / "custom.toml"
    if case == "non-utf8":
        target.write_bytes(profile_text().encode() + b"\n# \xff\xfe\n")
    elif case in ("inf", "nan"):
        target.write_text(profile_text().replace("[memory]", f"[memory]\ntotal_gb = {case}"))
    elif case == "nested":
        target.write_text(profile_text().replace("[match]", "[match]\ncpu_flags = " + "[" * 50_000 + "]" * 50_000))
    elif case == "directory":
        target.mkdir()
    elif case == "symlink-loop":
        os.symlink(profiles_dir / "other.toml", target)
        os.symlink(target, profiles_dir / "other.toml")
    elif case == "fifo":
        os.mkfifo(target)
    elif case == "oversize":
        target.write_text(profile_text() + "#" * (256 << 10))
    else:
        target.write_text(profile_text(n_ctx=2**70))
    from edgemed.devices import load_profiles

    with pytest.raises(ProfileError, match="toml"):
        load_profiles()
    out = run_cli("devices", "show", "custom")
    assert "custom.toml" in out and "Fix:" in out
    assert CliRunner().invoke(cli, ["devices", "show", "generic"]).exit_code == 0  # another profile's command runs
    if case in ("inf", "nan"):
        assert "memory.total_gb" in out and "finite" in out
    if case in ("fifo", "directory"):
        assert "not a regular file" in out
    if case == "oversize":
        assert "bytes a profile may have" in out


# -- audit log, API key file, serve's start-up order ----------------------------------------------
def _log(tmp_path: Path) -> Path:
    from edgemed.serve.audit import AuditLog

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append("request", request_id="r1", status=200)
    log.close()
    return path


@pytest.mark.parametrize("line", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000])
def test_deep_audit_line_is_malformed_not_a_crash(tmp_path, line):
    from edgemed.serve.audit import verify

    path = _log(tmp_path)
    with path.open("ab") as fh:
        fh.write(line + b"\n")
    report = verify(path)
    assert (report.ok, report.problem, report.line, report.records) == (False, "malformed", 3, 2)
    r = CliRunner().invoke(cli, ["audit", "verify", str(path)])
    assert r.exit_code == 1 and "malformed" in r.output and "Traceback" not in r.output


def test_audit_line_length_is_bounded(tmp_path, monkeypatch):
    from edgemed.serve import audit

    path = _log(tmp_path)
    monkeypatch.setattr(audit, "MAX_LINE_BYTES", 1000)
    with path.open("ab") as fh:
        fh.write(b'{"seq": 2, "pad": "' + b"x" * 5000 + b'"}\n{"seq": 3}\n')
    report = audit.verify(path)
    assert (report.problem, report.line) == ("malformed", 3) and "longer than 1000" in report.detail


def test_api_key_file_not_utf8(tmp_path):
    from edgemed.serve.security import ApiKeys

    keys = tmp_path / "keys.txt"
    keys.write_bytes(b"clinic \xff\xfe" + b"k" * 30 + b"\n")
    with pytest.raises(InputError, match="not UTF-8"):
        ApiKeys.from_file(keys)
    assert "not UTF-8" in run_cli("serve", tmp_path / "absent.gguf", "--api-key-file", keys)


def test_audit_log_under_proc_is_a_clear_error():
    from edgemed.serve.audit import AuditLog

    with pytest.raises(InputError, match="Cannot open the audit log '/proc/edgemed-test/a.jsonl' for writing"):
        AuditLog("/proc/edgemed-test/a.jsonl")
    with pytest.raises(InputError, match="not a regular file"):
        AuditLog("/dev/null")


def test_serve_audit_log_is_checked_before_the_model_loads(tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    from edgemed.runtime.batch import batcher

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(batcher, "Batcher", no_load)
    model = kit.tiny_gguf(tmp_path / "tiny.gguf")
    out = run_cli("serve", model, "--profile", "generic", "--port", "0", "--audit-log", "/proc/edgemed-test/a.jsonl")
    assert "Cannot open the audit log" in out and "--audit-log" in out


def test_port_in_use_is_found_before_the_model_is_touched(tmp_path):
    pytest.importorskip("uvicorn")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = run_cli("serve", tmp_path / "absent.gguf", "--port", port)
    assert f"Port {port} on 127.0.0.1 is already in use" in out and "--port" in out


def test_bind_socket_is_handed_over_listening():
    from edgemed.serve.security import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    try:
        with socket.create_connection(sock.getsockname(), timeout=2):
            pass
    finally:
        sock.close()
    with pytest.raises(EdgemedError, match="does not resolve|does not belong"):
        bind_socket("no-such-host.invalid", 0)


@pytest.mark.parametrize("threads", ["0", "-3"])
@pytest.mark.parametrize("command", ["run", "chat"])
def test_run_and_chat_refuse_thread_counts_below_one(smollm2_gguf, command, threads):
    from click.testing import CliRunner

    from edgemed.cli import cli

    args = [command, str(smollm2_gguf), "--threads", threads] + (["--prompt", "hi"] if command == "run" else [])
    result = CliRunner().invoke(cli, args, input="")
    assert result.exit_code == 1, result.output
    assert "--threads must be an integer from 1" in result.output and "Traceback" not in result.output


def test_files_read_whole_are_refused_when_they_are_devices_pipes_or_huge(tmp_path, smollm2_gguf):
    """--item-json /dev/zero:1 grew memory without end, --card and --report /dev/zero were killed for memory, and a
    signing key or certificate from /dev/zero was a MemoryError traceback: each is refused now, naming the file,
    before anything is read into memory (a FIFO is refused too rather than waited on)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    src = kit.inputs(tmp_path / "src")
    key, _ = kit.keypair(tmp_path)
    runner = CliRunner()
    for bad in ("/dev/zero", str(fifo)):
        cases = [
            ["run", str(smollm2_gguf), "-t", "mcq", "--item-json", f"{bad}:1", "--threads", "1"],
            ["pack", str(src["model"]), "--license", str(src["license"]), "--name", "t", "--card", bad,
             "-o", str(tmp_path / "a.edgemed")],
            ["pack", str(src["model"]), "--license", str(src["license"]), "--name", "t", "--report", bad,
             "-o", str(tmp_path / "b.edgemed")],
            ["pack", str(src["model"]), "--license", str(src["license"]), "--name", "t", "--sign", bad,
             "-o", str(tmp_path / "c.edgemed")],
            ["pack", str(src["model"]), "--license", str(src["license"]), "--name", "t", "--sign", str(key),
             "--cert", bad, "-o", str(tmp_path / "d.edgemed")],
            ["keygen", bad, "--public-only"],
            ["verify", str(src["model"]), "--key", bad],  # was "does not exist" for a file that is there
            ["install", str(src["model"]), "--key", bad],
        ]
        for args in cases:
            r = runner.invoke(cli, args)
            assert r.exit_code != 0 and "Traceback" not in r.output and bad in r.output, (args, r.output)
            assert "does not exist" not in r.output, (args, r.output)
            assert not isinstance(r.exception, MemoryError), args
    r = runner.invoke(cli, ["run", str(smollm2_gguf), "-t", "mcq", "--item-json", f"{src['license']}:0"])
    assert r.exit_code == 1 and "counted from 1" in r.output, r.output
    r = runner.invoke(cli, ["run", str(smollm2_gguf), "-p", "hi", "--temperature", "nan"])
    assert r.exit_code == 1 and "temperature must be from 0 to 2" in r.output, r.output


def test_keygen_refuses_a_public_key_name_and_bench_a_thread_count_below_one(tmp_path, smollm2_gguf):
    runner = CliRunner()
    r = runner.invoke(cli, ["keygen", str(tmp_path / "key.pub.pem"), "--force"])
    assert r.exit_code == 1 and "name of a public key" in r.output and "key.pem" in r.output, r.output
    assert not list(tmp_path.iterdir())
    for option in ("--threads", "--eval-threads"):
        r = runner.invoke(cli, ["bench", "run", str(smollm2_gguf), option, "0", "-o", str(tmp_path / "b")])
        assert r.exit_code == 1 and f"{option} must be an integer from 1" in r.output, r.output
