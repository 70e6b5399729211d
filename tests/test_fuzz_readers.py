"""Fuzz every reader of untrusted bytes: each input either parses or raises an ``EdgemedError``.

Seeded and bounded (``derandomize=True``, a fixed number of examples per target), so a run is the same
run every time and the whole file takes well under a minute on one core. Targets: GGUF headers (byte and
word mutations of a real header written by the ``gguf`` package, truncations, and headers assembled from
random counts, lengths and types), bundle manifests (field replacements with random JSON, byte flips), tar
bundle heads, device profiles (random TOML values), audit-log lines, API-key files, the safetensors header
reader of ``Checkpoint.open``, and the CLI's bad-input paths (``plan``, ``inspect``, ``verify``,
``audit verify``, ``devices show``): exit 0 or 1, and on 1 one paragraph with no traceback.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

import bundle_kit as kit
from edgemed.cli import cli

hypothesis = pytest.importorskip("hypothesis")
gguf = pytest.importorskip("gguf")
from fuzz_kit import (INTERESTING_U64, STATS, assert_clean_exit, fuzz, gguf_file, json_values, mutated,  # noqa: E402
                      parses_or_refuses, toml_values)
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def report_stats():
    yield
    for name, (given_, refused) in sorted(STATS.items()):
        print(f"\nfuzz {name}: {given_} inputs, {refused} refused with an EdgemedError, {given_ - refused} parsed")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def gguf_base(work) -> bytes:
    return kit.tiny_gguf(work / "base.gguf").read_bytes()


# -- GGUF ------------------------------------------------------------------------------------------
def read_gguf(path: Path):
    from edgemed.formats.gguf_header import read_header
    from edgemed.runtime.plan import read_shape

    if parses_or_refuses(read_header, path) is not None:
        parses_or_refuses(read_shape, path)


def test_fuzz_gguf_mutations(work, gguf_base):
    header_end = gguf_base.index(b"token_embd.weight") + 200  # mutate the header, not the weights
    path = work / "m.gguf"

    @fuzz(400)
    @given(st.data())
    def check(data):
        head = data.draw(mutated(gguf_base[:header_end]))
        path.write_bytes(head + gguf_base[header_end:] if len(head) == header_end else head)
        read_gguf(path)

    check()


def test_fuzz_gguf_assembled(work):
    path = work / "a.gguf"

    @fuzz(400)
    @given(gguf_file())
    def check(data):
        path.write_bytes(data)
        read_gguf(path)

    check()


# -- bundle manifests and tar heads ---------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(work) -> Path:
    from edgemed.packaging.bundle import PackInputs, pack

    inp = kit.inputs(work / "in")
    pack(PackInputs(model=inp["model"], license=inp["license"], card=inp["card"]), work / "b", as_dir=True)
    pack(PackInputs(model=inp["model"], license=inp["license"], card=inp["card"]), work / "b.edgemed")
    return work / "b"


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


@st.composite
def manifest_bytes(draw, base: dict) -> bytes:
    kind = draw(st.sampled_from(["replace", "delete", "bytes", "deep"]))
    if kind == "bytes":
        return draw(mutated(json.dumps(base).encode(), word_positions=False))
    if kind == "deep":
        n = draw(st.sampled_from([63, 64, 65, 1000, 100_000]))
        return json.dumps({**base, "card": "@"}).replace('"@"', "[" * n + "]" * n).encode()
    man = json.loads(json.dumps(base))
    paths = [p for p in _paths(man) if p]
    where = draw(st.sampled_from(paths))
    parent = man
    for step in where[:-1]:
        parent = parent[step]
    if kind == "delete":
        del parent[where[-1]]
    else:
        parent[where[-1]] = draw(json_values)
    return json.dumps(man).encode()


def test_fuzz_manifests(bundle):
    from edgemed.packaging.manifest import Manifest

    base = json.loads((bundle / "manifest.json").read_text())

    @fuzz(500)
    @given(manifest_bytes(base))
    def check(data):
        man = parses_or_refuses(Manifest.from_bytes, data, "fuzz")
        if man is not None:
            man.to_bytes(), man.total_bytes  # noqa: B018 - what inspect and install compute first

    check()


def test_fuzz_tar_heads(bundle, work):
    from edgemed.packaging.archive import hash_sink, peek_tar, read_tar

    base = (work / "b.edgemed").read_bytes()
    path = work / "m.edgemed"

    @fuzz(250)
    @given(mutated(base[:4096]))
    def check(head):
        path.write_bytes(head + base[4096:] if len(head) == 4096 else head)
        parses_or_refuses(peek_tar, path)
        parses_or_refuses(read_tar, path, hash_sink)

    check()


# -- device profiles ------------------------------------------------------------------------------
@st.composite
def profile_text(draw, base: str) -> str:
    lines = base.splitlines()
    kind = draw(st.sampled_from(["value", "value", "line", "bytes"]))
    if kind == "bytes":
        return draw(mutated(base.encode(), word_positions=False)).decode("utf-8", "surrogateescape")
    assignments = [i for i, line in enumerate(lines) if " = " in line and not line.startswith("name")]
    i = draw(st.sampled_from(assignments))
    if kind == "value":
        lines[i] = lines[i].split(" = ")[0] + " = " + draw(toml_values)
    else:
        lines.insert(i, draw(st.sampled_from(["[extra]", "[[match]]", "total_gb = 1", "junk", "[llama.deep]"])))
    return "\n".join(lines)


def test_fuzz_profiles(work, monkeypatch):
    from edgemed.devices import load_profiles
    from edgemed.devices.facts import Facts
    from edgemed.runtime.plan import make_plan

    base = (Path(__file__).parents[1] / "device_profiles" / "generic.toml").read_text().replace('"generic"', '"fuzzed"')
    folder = work / "profiles"
    folder.mkdir()
    monkeypatch.setenv("EDGEMED_PROFILES_DIR", str(folder))
    model = kit.tiny_gguf(work / "plan.gguf")
    facts = Facts(platform="linux", model="fuzz box", physical_cores=4, logical_cores=8, memory_bytes=8 << 30)

    @fuzz(250)
    @given(profile_text(base))
    def check(text):
        (folder / "fuzzed.toml").write_bytes(text.encode("utf-8", "surrogateescape"))
        profiles = parses_or_refuses(load_profiles)
        if profiles is not None:
            p = profiles["fuzzed"]
            p.matches(facts)
            parses_or_refuses(make_plan, model, p, facts)

    check()


# -- audit lines and key files ----------------------------------------------------------------------
def test_fuzz_audit_lines(work):
    from edgemed.serve.audit import AuditLog, Report, verify

    path = work / "audit.jsonl"
    log = AuditLog(path)
    for i in range(3):
        log.append("request", request_id=f"r{i}", status=200, latency_s=0.5)
    log.close()
    lines = path.read_bytes().split(b"\n")[:-1]
    fuzzed = work / "fuzzed.jsonl"

    @fuzz(300)
    @given(st.integers(0, len(lines) - 1), st.one_of(
        st.binary(max_size=64), json_values.map(lambda v: json.dumps(v).encode()),
        st.sampled_from([b"[" * 100_000, b'{"a":' * 50_000, b"9" * 5000, b'{"seq": 1e999}', b"\xff\xfe"]),
        st.just(None)), st.booleans())
    def check(index, replacement, cut):
        new = list(lines)
        new[index] = replacement if replacement is not None else lines[index].replace(b'"r', b'"x', 1)
        data = b"\n".join(new) + b"\n"
        fuzzed.write_bytes(data[:len(data) // 2] if cut else data)
        report = parses_or_refuses(verify, fuzzed)
        assert isinstance(report, Report)
        assert not report.ok or new == lines

    check()


def test_fuzz_key_files(work):
    from edgemed.serve.security import ApiKeys

    path = work / "keys.txt"
    lines = st.lists(st.text(max_size=40) | st.sampled_from(["clinic " + "k" * 20, "k" * 16, "# c", "a b c"]), max_size=4)

    @fuzz(300)
    @given(st.binary(max_size=200) | lines.map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")))
    def check(data):
        path.write_bytes(data)
        keys = parses_or_refuses(ApiKeys.from_file, path)
        if keys is not None:
            keys.identify("k" * 20)

    check()


# -- the CLI's bad-input paths ------------------------------------------------------------------------
def test_fuzz_cli_plan(work, gguf_base):
    path = work / "cli.gguf"
    header_end = gguf_base.index(b"token_embd.weight") + 200

    @fuzz(60)
    @given(mutated(gguf_base[:header_end]))
    def check(head):
        path.write_bytes(head + gguf_base[header_end:] if len(head) == header_end else head)
        assert_clean_exit(CliRunner().invoke(cli, ["plan", str(path), "--profile", "generic", "--budget-mb", "512"]))

    check()


def test_fuzz_cli_inspect_and_verify(bundle, work):
    import shutil

    base = json.loads((bundle / "manifest.json").read_text())
    copy = work / "cli-bundle"
    shutil.copytree(bundle, copy)
    tar_base = (work / "b.edgemed").read_bytes()
    tar = work / "cli.edgemed"

    @fuzz(60)
    @given(manifest_bytes(base), mutated(tar_base[:4096]))
    def check(manifest, head):
        (copy / "manifest.json").write_bytes(manifest)
        tar.write_bytes(head + tar_base[4096:] if len(head) == 4096 else head)
        for args in (["inspect", str(copy)], ["inspect", "--json", str(copy)], ["verify", str(copy)],
                     ["inspect", str(tar)], ["verify", str(tar)]):
            assert_clean_exit(CliRunner().invoke(cli, args))

    check()


def test_fuzz_cli_devices_show_and_audit_verify(work, monkeypatch):
    base = (Path(__file__).parents[1] / "device_profiles" / "generic.toml").read_text().replace('"generic"', '"cli"')
    folder = work / "cli-profiles"
    folder.mkdir()
    monkeypatch.setenv("EDGEMED_PROFILES_DIR", str(folder))
    log = work / "cli-audit.jsonl"

    @fuzz(60)
    @given(profile_text(base), st.binary(max_size=300))
    def check(text, audit_bytes):
        (folder / "cli.toml").write_bytes(text.encode("utf-8", "surrogateescape"))
        assert_clean_exit(CliRunner().invoke(cli, ["devices", "show", "cli"]))
        log.write_bytes(audit_bytes)
        assert_clean_exit(CliRunner().invoke(cli, ["audit", "verify", str(log)]))

    check()




# -- safetensors headers (converters/source/checkpoint.py, through its public Checkpoint.open) -------------
@st.composite
def safetensors_bytes(draw, tensors: dict, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["entry", "entry", "header", "length", "deep"]))
    header = json.loads(json.dumps(tensors))
    if kind == "entry":
        name = draw(st.sampled_from(sorted(header)))
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
        value = draw(json_values | st.sampled_from([[2**64, 2**64], [0, 2**63], [-8, 0], "I16", "F64", [2**40, 2**40]]))
        if key is None:
            header[name] = value
        else:
            header[name][key] = value
    elif kind == "header":
        header = draw(json_values)
    elif kind == "deep":
        n = draw(st.sampled_from([64, 1000, 100_000]))
        raw = b'{"w": ' + b"[" * n + b"]" * n + b"}"
        return struct.pack("<Q", len(raw)) + raw + data
    raw = json.dumps(header).encode()
    length = len(raw) if kind != "length" else draw(st.sampled_from(INTERESTING_U64))
    blob = struct.pack("<Q", length) + raw + data
    return blob[:draw(st.integers(0, len(blob)))] if draw(st.booleans()) else blob


def test_fuzz_safetensors_headers(work):
    np = pytest.importorskip("numpy")
    from edgemed.converters.source.checkpoint import Checkpoint

    ckpt = work / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8}))
    weights = {"a.weight": np.ones((2, 4), dtype=np.float32), "b.weight": np.zeros(4, dtype=np.float16)}
    data, tensors, offset = b"", {}, 0
    for name, array in weights.items():
        raw = array.tobytes()
        tensors[name] = {"dtype": {"float32": "F32", "float16": "F16"}[array.dtype.name], "shape": list(array.shape),
                         "data_offsets": [offset, offset + len(raw)]}
        data, offset = data + raw, offset + len(raw)
    target = ckpt / "model.safetensors"
    target.write_bytes(struct.pack("<Q", len(json.dumps(tensors))) + json.dumps(tensors).encode() + data)
    assert set(Checkpoint.open(ckpt).tensors) == set(weights)

    @fuzz(300)
    @given(safetensors_bytes(tensors, data))
    def check(blob):
        target.write_bytes(blob)
        parses_or_refuses(Checkpoint.open, ckpt)

    check()
