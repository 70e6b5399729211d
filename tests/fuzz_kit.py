"""Strategies and checks shared by the fuzz tests (tests/test_fuzz_readers.py)."""

from __future__ import annotations

import json
import struct

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from edgemed.errors import EdgemedError


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


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


toml_values = st.recursive(
    st.integers(-2**70, 2**70).map(str) | st.integers(0, 70_000).map(str) | st.floats(0, 1e7).map(repr)
    | st.sampled_from(["512", "1", "0", '"physical"', '"f16"', '["avx2"]', '["CPUExecutionProvider"]']) | st.sampled_from(["inf", "-inf", "nan", "+nan", "1e400", "-0.0", "0.5"])
    | st.booleans().map(lambda b: "true" if b else "false") | st.text(max_size=10).map(json.dumps)
    | st.sampled_from(["1979-05-27", "07:32:00", "'lit'", "{}", "[]", "[" * 70 + "]" * 70]),
    lambda inner: st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]")
    | st.dictionaries(st.sampled_from(["a", "b", "n_ctx"]), inner, max_size=2).map(
        lambda d: "{" + ", ".join(f"{k} = {v}" for k, v in d.items()) + "}"),
    max_leaves=6)
