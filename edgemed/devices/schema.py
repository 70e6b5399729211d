"""The device-profile schema: one table row per field, checked strictly.

Unknown sections or keys, missing required keys and wrong types are all errors
that name the file and the field (``jetson-orin-nano-8gb.toml: llama.n_ctx: ...``),
so a typo in a user's profile never silently falls back to a default.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from edgemed.constants import EXTRA_BUFFER_MODES, FULL_PRECISION_KV, KV_CACHE_TYPES
from edgemed.errors import ProfileError

THREAD_WORDS = ("physical", "performance")

# Upper bounds: a profile is user input, and these values size allocations in llama.cpp
# (n_batch tokens of batch buffers per sequence, n_ctx of KV cache, a thread pool).
MAX_THREADS = 1024          # more than any edge device (or server) has cores
MAX_CTX = 1 << 21           # 2M tokens: above every model's trained context today
MAX_BATCH = 1 << 16         # llama.cpp's own defaults are 2048 / 512
MAX_GPU_LAYERS = 1 << 16    # "every layer" is -1; a count past any model's depth means the same
MAX_HEAD_DIM = 1 << 16      # the planner's own bound on a GGUF's attention.key_length
MAX_GB = 1 << 20            # 1 PiB of memory: a larger (or infinite) size is a typo
MAX_PRIORITY = 1_000_000
MAX_PREFIX_CACHE_MIB = 1 << 20  # 1 TiB of host RAM for saved prompt prefixes: a larger size is a typo

Check = Callable[[Any], "str | None"]  # returns what was expected, or None when the value is fine


def _int(lo: int, hi: int) -> Check:
    def check(v):
        ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
        return None if ok else f"an integer from {lo} to {hi}"
    return check


def _num(lo: float = 0.0, hi: float = MAX_GB, open_lo: bool = False) -> Check:
    def check(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > lo if open_lo else v >= lo) and v <= hi
        return None if ok else f"a finite number {'>' if open_lo else '>='} {lo} and <= {hi}"
    return check


def _str(v):
    return None if isinstance(v, str) and v.strip() and len(v) <= 4096 else "a non-empty string (at most 4096 characters)"


def _bool(v):
    return None if isinstance(v, bool) else "true or false"


def _str_list(v):
    ok = isinstance(v, list) and len(v) <= 256 and all(isinstance(x, str) and x and len(x) <= 256 for x in v)
    return None if ok else "a list of at most 256 non-empty strings"


def _int_list(lo: int, hi: int) -> Check:
    def check(v):
        ok = isinstance(v, list) and len(v) <= 64 and all(_int(lo, hi)(x) is None for x in v)
        return None if ok else f"a list of at most 64 integers from {lo} to {hi}"
    return check


def _one_of(*choices: str) -> Check:
    return lambda v: None if isinstance(v, str) and v in choices else "one of " + ", ".join(repr(c) for c in choices)


def _threads(v):
    if (isinstance(v, str) and v in THREAD_WORDS) or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_THREADS):
        return None
    return f"an integer from 1 to {MAX_THREADS}, or one of " + ", ".join(repr(w) for w in THREAD_WORDS)


# (section, key) -> (check, required). Section "" is the top level.
FIELDS: dict[tuple[str, str], tuple[Check, bool]] = {
    ("", "name"): (_str, True),
    ("", "description"): (_str, True),
    ("", "priority"): (_int(0, MAX_PRIORITY), True),
    ("", "recommended_quant"): (_str, True),
    # the probes' platforms (detect.PROBES), or "any": a typo would match nothing, silently
    ("match", "platform"): (_one_of("jetson", "apple", "x86", "generic", "any"), True),
    ("match", "model_contains"): (_str_list, False),
    ("match", "cpu_flags"): (_str_list, False),
    ("match", "min_memory_gb"): (_num(), False),
    ("match", "max_memory_gb"): (_num(), False),
    ("memory", "total_gb"): (_num(0, open_lo=True), False),
    ("memory", "reserve_gb"): (_num(), True),
    ("memory", "max_fraction"): (_num(0, 1, open_lo=True), True),
    ("memory", "unified"): (_bool, True),
    # host RAM `edgemed serve` may keep saved prompt prefixes in (0: none); optional: absent means
    # runtime.plan.PREFIX_CACHE_MIB, so a user profile written before the key existed still loads
    ("memory", "prefix_cache_mib"): (_int(0, MAX_PREFIX_CACHE_MIB), False),
    ("llama", "n_threads"): (_threads, True),
    ("llama", "n_threads_batch"): (_threads, True),
    ("llama", "n_gpu_layers"): (_int(-1, MAX_GPU_LAYERS), True),
    ("llama", "n_ctx"): (_int(256, MAX_CTX), True),
    ("llama", "n_batch"): (_int(1, MAX_BATCH), True),
    ("llama", "n_ubatch"): (_int(1, MAX_BATCH), True),
    # the micro-batch of the one-sequence engine (run, chat, bench), where it differs from the server's
    # n_ubatch (docs/decisions/0021); optional: absent means n_ubatch for both
    ("llama", "n_ubatch_single"): (_int(1, MAX_BATCH), False),
    ("llama", "flash_attn"): (_bool, True),
    # attention head widths for which flash attention is on even where flash_attn is false (measured per CPU:
    # docs/decisions/0017); optional, so a user profile written before the key existed still loads
    ("llama", "flash_attn_head_dims"): (_int_list(1, MAX_HEAD_DIM), False),
    ("llama", "type_k"): (_one_of(*KV_CACHE_TYPES), True),
    ("llama", "type_v"): (_one_of(*KV_CACHE_TYPES), True),
    ("llama", "use_mmap"): (_bool, True),
    ("llama", "use_mlock"): (_bool, True),
    ("llama", "extra_buffers"): (_one_of(*EXTRA_BUFFER_MODES), False),
    ("onnx", "providers"): (_str_list, True),
    ("onnx", "intra_op_threads"): (_threads, True),
    # the ONNX engine runs the graph sequentially: a count above 1 is used as 1, with a warning (``inert``)
    ("onnx", "inter_op_threads"): (_int(1, MAX_THREADS), True),
}
SECTIONS = sorted({section for section, _ in FIELDS if section})


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validate(data: dict, source: str) -> None:
    """Raise ``ProfileError`` naming ``source`` and the first bad field."""

    def fail(field: str, why: str):
        raise ProfileError(f"{source}: {field}: {why}.",
                           f"fix '{field}' in {source} (see `edgemed devices show generic` for a valid profile)")

    for key, value in data.items():
        if key in SECTIONS and not isinstance(value, dict):
            fail(key, f"expected a [{key}] table, got {_short(value)}")
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
            fail(field, f"expected {expected}, got {_short(table[key])}")
    for key in ("n_ubatch", "n_ubatch_single"):
        if data["llama"].get(key, 0) > data["llama"]["n_batch"]:
            fail(f"llama.{key}", f"must not exceed llama.n_batch ({data['llama']['n_batch']})")
    if data["llama"]["type_v"] not in FULL_PRECISION_KV and not data["llama"]["flash_attn"]:
        # llama.cpp refuses a quantized V cache without flash attention, and only when the model loads
        fail("llama.type_v", f"'{data['llama']['type_v']}' (a quantized V cache) needs llama.flash_attn = true; "
                             "or use type_v = \"f16\"")
    match = data.get("match", {})
    if match.get("min_memory_gb", 0) > match.get("max_memory_gb", float("inf")):
        fail("match.min_memory_gb", "is larger than match.max_memory_gb")


def inert(data: dict, source: str) -> list[str]:
    """Set each valid value that no engine honours to the one used, and return one warning per value (naming
    ``source``, the key, why and the fix). Such a value loaded once, so a profile that holds it keeps loading."""
    notes = []
    asked = data["onnx"]["inter_op_threads"]
    if asked > 1:
        # the ONNX engine runs the graph in onnxruntime's sequential mode (runtime.onnx_engine says why), which
        # starts no inter-op thread
        data["onnx"]["inter_op_threads"] = 1
        notes.append(f"{source}: onnx.inter_op_threads = {asked} is used as 1: the ONNX engine runs the graph in "
                     "onnxruntime's sequential mode, which has no inter-op threads (its parallel mode ran a decoder's "
                     "chain of layers 2-3x slower per token where measured). Fix: set onnx.inter_op_threads = 1 in "
                     f"{source}, and give the threads to onnx.intra_op_threads.")
    return notes
