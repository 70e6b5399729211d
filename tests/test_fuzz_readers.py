"""Fuzz every reader of untrusted bytes (issue 12): each input either parses or raises an ``EdgemedError``.

Seeded and bounded (``derandomize=True``, a fixed number of examples per target), so a run is the same
run every time and the whole file takes well under a minute on one core. Targets: GGUF headers (byte and
word mutations of a real header written by the ``gguf`` package, truncations, and headers assembled from
random counts, lengths and types), bundle manifests (field replacements with random JSON, byte flips), tar
bundle heads, device profiles (random TOML values), audit-log lines, API-key files, the safetensors header
reader of ``Checkpoint.open``, and the CLI's bad-input paths (``plan``, ``inspect``, ``verify``,
``audit verify``, ``devices show``): exit 0 or 1, and on 1 one paragraph with no traceback.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import bundle_kit as kit
from edgemed.cli import cli
from edgemed.errors import EdgemedError

hypothesis = pytest.importorskip("hypothesis")
gguf = pytest.importorskip("gguf")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def fuzz(n: int):
    return settings(max_examples=n, derandomize=True, deadline=None, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


#: reader -> [inputs given, inputs refused]; printed at the end of the module (pytest -s shows it)
STATS: dict[str, list[int]] = {}


def parses_or_refuses(fn, *args):
    """Call ``fn``; an ``EdgemedError`` is a refusal. Anything else propagates and fails the example."""
    counts = STATS.setdefault(getattr(fn, "__qualname__", repr(fn)), [0, 0])
    counts[0] += 1
    try:
        return fn(*args)
    except EdgemedError as exc:
        counts[1] += 1
        assert exc.problem and "Traceback" not in str(exc)
        return None


@pytest.fixture(scope="module", autouse=True)
def report_stats():
    yield
    for name, (given_, refused) in sorted(STATS.items()):
        print(f"\nfuzz {name}: {given_} inputs, {refused} refused with an EdgemedError, {given_ - refused} parsed")


def assert_clean_exit(r) -> None:
    counts = STATS.setdefault("cli", [0, 0])
    counts[0] += 1
    counts[1] += r.exit_code == 1
    assert r.exit_code in (0, 1), (r.exit_code, r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    if r.exit_code == 1 and r.output.startswith("Error: "):
        assert "\n\n" not in r.output.strip(), r.output


INTERESTING_U64 = [0, 1, 2, 3, 7, 8, 9, 12, 31, 32, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63,
                   2**64 - 1]


@st.composite
def mutated(draw, base: bytes, word_positions: bool = True) -> bytes:
    """``base`` with a few byte flips, a few 4/8-byte words replaced by edge values, and maybe a cut."""
    data = bytearray(base)
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if word_positions:
        for _ in range(draw(st.integers(0, 3))):
            width = draw(st.sampled_from([4, 8]))
            pos = draw(st.integers(0, len(data) - width))
            value = draw(st.sampled_from(INTERESTING_U64)) % (1 << (8 * width))
            data[pos:pos + width] = value.to_bytes(width, "little")
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def gguf_base(work) -> bytes:
    return kit.tiny_gguf(work / "base.gguf").read_bytes()


# -- GGUF ------------------------------------------------------------------------------------------
def read_gguf(path: Path):
    from edgemed.gguf_header import read_header
    from edgemed.planner import read_shape

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


GGUF_TYPES = list(range(14)) + [2**32 - 1]


@st.composite
def gguf_value(draw, depth: int = 0) -> tuple[int, bytes]:
    vtype = draw(st.sampled_from(GGUF_TYPES))
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    if vtype in sizes:
        return vtype, draw(st.binary(min_size=sizes[vtype], max_size=sizes[vtype]))
    if vtype == 8:
        text = draw(st.binary(max_size=16))
        n = draw(st.one_of(st.just(len(text)), st.sampled_from(INTERESTING_U64)))
        return vtype, struct.pack("<Q", n) + text
    if vtype == 9:
        etype = draw(st.sampled_from(GGUF_TYPES))
        count = draw(st.one_of(st.integers(0, 6), st.sampled_from(INTERESTING_U64)))
        body = draw(st.binary(max_size=48))
        if etype == 9 and depth < 3 and draw(st.booleans()):
            body = b"".join(struct.pack("<I", 9) + draw(gguf_value(depth + 1))[1] for _ in range(2))
        return vtype, struct.pack("<IQ", etype, count) + body
    return vtype, draw(st.binary(max_size=8))


@st.composite
def gguf_file(draw) -> bytes:
    keys = ["general.architecture", "general.alignment", "llama.block_count", "llama.embedding_length",
            "llama.attention.head_count", "llama.context_length", "llama.feed_forward_length", "tokenizer.ggml.tokens"]
    kvs = [struct.pack("<Q", 20) + b"general.architecture" + struct.pack("<I", 8) + struct.pack("<Q", 5) + b"llama"]
    for _ in range(draw(st.integers(0, 6))):
        key = draw(st.sampled_from(keys)).encode()
        vtype, payload = draw(gguf_value())
        kvs.append(struct.pack("<Q", len(key)) + key + struct.pack("<I", vtype) + payload)
    tensors = []
    for i in range(draw(st.integers(0, 3))):
        dims = draw(st.lists(st.sampled_from([0, 1, 32, 64, 2**32, 2**63]), max_size=5))
        tensors.append(struct.pack("<Q", 3) + f"t{i:02d}".encode()[:3] + struct.pack("<I", len(dims))
                       + b"".join(struct.pack("<Q", d) for d in dims)
                       + struct.pack("<IQ", draw(st.sampled_from([0, 1, 2, 8, 12, 30, 39, 2**31])),
                                     draw(st.sampled_from([0, 32, 64, 33, 2**63]))))
    n_kv = draw(st.one_of(st.just(len(kvs)), st.sampled_from(INTERESTING_U64)))
    n_t = draw(st.one_of(st.just(len(tensors)), st.sampled_from(INTERESTING_U64)))
    version = draw(st.sampled_from([1, 2, 3, 4, 2**32 - 1]))
    tail = b"\0" * draw(st.sampled_from([0, 31, 64, 4096]))
    return b"GGUF" + struct.pack("<IQQ", version, n_t, n_kv) + b"".join(kvs) + b"".join(tensors) + tail


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


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


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
toml_values = st.recursive(
    st.integers(-2**70, 2**70).map(str) | st.sampled_from(["inf", "-inf", "nan", "+nan", "1e400", "-0.0", "0.5"])
    | st.booleans().map(lambda b: "true" if b else "false") | st.text(max_size=10).map(json.dumps)
    | st.sampled_from(["1979-05-27", "07:32:00", "'lit'", "{}", "[]", "[" * 70 + "]" * 70]),
    lambda inner: st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]")
    | st.dictionaries(st.sampled_from(["a", "b", "n_ctx"]), inner, max_size=2).map(
        lambda d: "{" + ", ".join(f"{k} = {v}" for k, v in d.items()) + "}"),
    max_leaves=6)


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
    from edgemed.planner import make_plan

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

