"""The device-profile schema: one table row per field, checked strictly.

Unknown sections or keys, missing required keys and wrong types are all errors
that name the file and the field (``jetson-orin-nano-8gb.toml: llama.n_ctx: ...``),
so a typo in a user's profile never silently falls back to a default.
"""

from __future__ import annotations

from typing import Any, Callable

from edgemed.errors import ProfileError

KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
#: llama.cpp extra CPU buffer types for weights (edgemed/runtime/buffers.py says what each means)
EXTRA_BUFFER_MODES = ("auto", "all", "repack", "none")
THREAD_WORDS = ("physical", "performance")

Check = Callable[[Any], "str | None"]  # returns what was expected, or None when the value is fine


def _int(lo: int | None = None) -> Check:
    def check(v):
        ok = isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)
        return None if ok else f"an integer{'' if lo is None else f' >= {lo}'}"
    return check


def _num(lo: float = 0.0, hi: float | None = None, open_lo: bool = False) -> Check:
    def check(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        ok = ok and (v > lo if open_lo else v >= lo) and (hi is None or v <= hi)
        bound = f"{'>' if open_lo else '>='} {lo}" + ("" if hi is None else f" and <= {hi}")
        return None if ok else f"a number {bound}"
    return check


def _str(v):
    return None if isinstance(v, str) and v.strip() else "a non-empty string"


def _bool(v):
    return None if isinstance(v, bool) else "true or false"


def _str_list(v):
    ok = isinstance(v, list) and all(isinstance(x, str) and x for x in v)
    return None if ok else "a list of strings"


def _one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else "one of " + ", ".join(repr(c) for c in choices)


def _threads(v):
    if v in THREAD_WORDS or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return None
    return "an integer >= 1, or one of " + ", ".join(repr(w) for w in THREAD_WORDS)


# (section, key) -> (check, required). Section "" is the top level.
FIELDS: dict[tuple[str, str], tuple[Check, bool]] = {
    ("", "name"): (_str, True),
    ("", "description"): (_str, True),
    ("", "priority"): (_int(0), True),
    ("", "recommended_quant"): (_str, True),
    ("match", "platform"): (_str, True),
    ("match", "model_contains"): (_str_list, False),
    ("match", "cpu_flags"): (_str_list, False),
    ("match", "min_memory_gb"): (_num(), False),
    ("match", "max_memory_gb"): (_num(), False),
    ("memory", "total_gb"): (_num(0, open_lo=True), False),
    ("memory", "reserve_gb"): (_num(), True),
    ("memory", "max_fraction"): (_num(0, 1, open_lo=True), True),
    ("memory", "unified"): (_bool, True),
    ("llama", "n_threads"): (_threads, True),
    ("llama", "n_threads_batch"): (_threads, True),
    ("llama", "n_gpu_layers"): (_int(-1), True),
    ("llama", "n_ctx"): (_int(256), True),
    ("llama", "n_batch"): (_int(1), True),
    ("llama", "n_ubatch"): (_int(1), True),
    ("llama", "flash_attn"): (_bool, True),
    ("llama", "type_k"): (_one_of(*KV_CACHE_TYPES), True),
    ("llama", "type_v"): (_one_of(*KV_CACHE_TYPES), True),
    ("llama", "use_mmap"): (_bool, True),
    ("llama", "use_mlock"): (_bool, True),
    ("llama", "extra_buffers"): (_one_of(*EXTRA_BUFFER_MODES), False),
    ("onnx", "providers"): (_str_list, True),
    ("onnx", "intra_op_threads"): (_threads, True),
    ("onnx", "inter_op_threads"): (_int(1), True),
}
SECTIONS = sorted({section for section, _ in FIELDS if section})


def validate(data: dict, source: str) -> None:
    """Raise ``ProfileError`` naming ``source`` and the first bad field."""

    def fail(field: str, why: str):
        raise ProfileError(f"{source}: {field}: {why}.",
                           f"fix '{field}' in {source} (see `edgemed devices show generic` for a valid profile)")

    for key, value in data.items():
        if isinstance(value, dict):
            if key not in SECTIONS:
                fail(key, f"unknown section (expected one of {', '.join(SECTIONS)})")
            for sub in value:
                if (key, sub) not in FIELDS:
                    fail(f"{key}.{sub}", "unknown key")
        elif ("", key) not in FIELDS:
            fail(key, "unknown key")
    for (section, key), (check, required) in FIELDS.items():
        field = f"{section}.{key}" if section else key
        table = data.get(section, {}) if section else data
        if key not in table:
            if required:
                fail(field, "missing")
            continue
        expected = check(table[key])
        if expected:
            fail(field, f"expected {expected}, got {table[key]!r}")
    if data["llama"]["n_ubatch"] > data["llama"]["n_batch"]:
        fail("llama.n_ubatch", f"must not exceed llama.n_batch ({data['llama']['n_batch']})")
    match = data.get("match", {})
    if match.get("min_memory_gb", 0) > match.get("max_memory_gb", float("inf")):
        fail("match.min_memory_gb", "is larger than match.max_memory_gb")
