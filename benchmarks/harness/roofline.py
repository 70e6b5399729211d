"""The memory-bandwidth roofline for decoding: how fast could this model decode on this machine?

Decoding one token reads every weight once (matrix-vector work, memory bound)
plus the KV cache so far. So the ceiling is ``read bandwidth / bytes read per token``,
and a configuration's decode tok/s as a fraction of it says how close the
runtime gets to the hardware (above 100 % means a figure is wrong).

* **Read bandwidth** (the ceiling, ``stream_read_bandwidth``): as many threads as the
  decode, each reducing its slice of one buffer >= 8x the last-level cache (1 GiB when
  the memory allows) with ``numpy.maximum.reduce`` over uint8; pages touched first, best
  of N, bytes read counted once.
* **Copy bandwidth** (``stream_copy_bandwidth``, the ceiling of older reports, kept for
  comparison): a stream copy (``numpy.copyto``), counted the STREAM way (bytes read +
  bytes written). It is no limit for decoding: a copy's write also reads the line
  first (write-allocate), so the traffic is 3x what it counts, and decoding mostly reads.
* **Bytes per token**: from the artifact's tensor table (GGUF header, ONNX
  initializers, torch parameters). The token-embedding table is a lookup: one row
  is read per token, not the table — unless it is tied to the output head, which
  reads it all. The KV cache read is added at the mean position of the timed
  decode (prompt + half the new tokens), at the cache's element size (llama.cpp: the
  run's ``type_k`` / ``type_v``; onnxruntime: fp32; torch: the weights' dtype).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class WeightFacts:
    n_params: int           # weight elements
    weight_bytes: int       # bytes of all weight tensors as stored
    read_bytes: int         # weight bytes one decoded token reads (embedding: one row unless tied)
    kv_bytes_per_pos: int   # K + V bytes, all layers, for one cached position
    kv_k_per_pos: int = 0   # K elements, all layers, for one cached position (0: not recorded)
    kv_v_per_pos: int = 0   # V elements, likewise

    def bytes_per_token(self, kv_positions: float) -> float:
        return self.read_bytes + self.kv_bytes_per_pos * kv_positions

    def to_dict(self) -> dict:
        return asdict(self)


# -- bandwidth ------------------------------------------------------------------------------
def llc_bytes() -> int:
    """Largest CPU cache in bytes (Linux sysfs, e.g. "32768K"); 32 MiB when unknown."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    best = 0
    for size in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = size.read_text().strip().upper()
            best = max(best, int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        except (OSError, ValueError):
            continue
    return best or 32 * MIB


def _available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def read_buffer_bytes() -> int:
    """>= 8x the LLC and at least 256 MiB; 1 GiB when at least 8 GiB are available (so it fits comfortably)."""
    size = max(256 * MIB, 8 * llc_bytes())
    avail = _available_bytes()
    if avail is not None and avail >= 8 * GIB:
        size = max(size, GIB)
    return size


READ_METHOD = "numpy.maximum.reduce over uint8, one slice per thread, pages touched first, bytes read counted once, best of N"


def stream_read_bandwidth(threads: int = 1, size_bytes: int | None = None, repeats: int = 7) -> dict:
    """Best-of-``repeats`` read bandwidth (bytes/s, each byte read counted once) with ``threads`` readers at once.

    The ceiling for decoding, which reads weights and KV cache and writes little. ``threads`` should be the
    decode's thread count: one core alone may not reach what the memory gives. The buffer (``read_buffer_bytes``)
    is split into one contiguous slice per thread, every slice reduced at once; numpy releases the GIL in the
    reduction, so the threads run in parallel. The buffer is written (every page touched) and read once before
    the timed passes: page faults are not bandwidth.

    The kernel is ``numpy.maximum.reduce`` over uint8: a SIMD byte max (pmaxub / umax, 16-64 bytes per
    instruction), memory bound by a margin: it was the fastest of the reductions tried (bitwise or, max over
    uint64, count_nonzero), and far faster from a cache-resident buffer than from memory, so from memory it
    waits on memory, not on arithmetic. A widening ``add.reduce`` (uint8 into uint64) is compute bound.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    threads = max(1, int(threads))
    size = (size_bytes or read_buffer_bytes()) // (64 * threads) * (64 * threads)
    buf = np.ones(size, dtype=np.uint8)  # written: every page faulted in before the timing
    step = size // threads
    parts = [buf[i * step:(i + 1) * step] for i in range(threads)]

    def read(part) -> int:
        return int(np.maximum.reduce(part))

    times = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        if list(pool.map(read, parts)) != [1] * threads:  # one untimed pass, which reads what was written
            raise RuntimeError("the read kernel returned a wrong value")
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(read, parts))
            times.append(time.perf_counter() - t)
    best = min(times)
    return {"method": READ_METHOD, "buffer_bytes": int(size), "llc_bytes": llc_bytes(), "threads": threads,
            "repeats": repeats, "bytes_per_s": size / best, "runs_bytes_per_s": [size / t for t in times]}


def stream_copy_bandwidth(size_bytes: int | None = None, repeats: int = 7, threads: int = 1) -> dict:
    """Best-of-``repeats`` copy bandwidth (bytes/s, read + written) on a buffer >= 8x the LLC.

    With ``threads`` > 1 the buffer is split into that many slices copied at once
    (numpy releases the GIL while copying), as a decoder with that many threads reads.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    size = size_bytes or max(256 * MIB, 8 * llc_bytes())
    src = np.ones(size // 8, dtype=np.float64)
    dst = np.empty_like(src)
    bounds = np.linspace(0, src.size, threads + 1, dtype=np.int64)
    slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def copy(part: slice) -> None:
        np.copyto(dst[part], src[part])

    times = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(copy, slices))  # touch every page first: page faults are not bandwidth
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(copy, slices))
            times.append(time.perf_counter() - t)
    best = min(times)
    return {"method": "numpy.copyto, bytes read + written, best of N", "buffer_bytes": int(src.nbytes),
            "llc_bytes": llc_bytes(), "threads": threads, "repeats": repeats, "bytes_per_s": 2 * src.nbytes / best,
            "runs_bytes_per_s": [2 * src.nbytes / t for t in times]}


# -- bytes per token, one reader per artifact kind -------------------------------------------
def gguf_facts(path: Path, type_k: str = "f16", type_v: str = "f16") -> WeightFacts:
    """From the GGUF header; the KV cache at llama.cpp's ``type_k`` / ``type_v`` (the profiles' default: f16)."""
    from edgemed.constants import KV_TYPES
    from edgemed.formats.gguf_header import read_header

    header = read_header(path)
    meta = header.metadata
    arch = meta.get("general.architecture", "llama")
    tensors = {t.name: t for t in header.tensors}
    n_params = sum(t.n_elements for t in header.tensors)
    weight_bytes = sum(t.n_bytes for t in header.tensors)
    read = weight_bytes
    embd = tensors.get("token_embd.weight")
    n_vocab = int(meta.get(f"{arch}.vocab_size") or 0) or (embd.n_elements // int(meta[f"{arch}.embedding_length"]) if embd else 0)
    if embd is not None and "output.weight" in tensors and n_vocab:
        read -= embd.n_bytes - embd.n_bytes // n_vocab  # untied: a lookup reads one row
    n_layer = int(meta[f"{arch}.block_count"])
    n_head = int(meta[f"{arch}.attention.head_count"])
    n_kv = meta.get(f"{arch}.attention.head_count_kv", n_head)
    n_kv = max(n_kv) if isinstance(n_kv, list) else int(n_kv)
    head_k = int(meta.get(f"{arch}.attention.key_length") or int(meta[f"{arch}.embedding_length"]) // n_head)
    head_v = int(meta.get(f"{arch}.attention.value_length") or head_k)
    k_el, v_el = n_layer * n_kv * head_k, n_layer * n_kv * head_v
    kv = round(k_el * KV_TYPES[type_k].bytes_per_element + v_el * KV_TYPES[type_v].bytes_per_element)
    return WeightFacts(n_params, weight_bytes, read, kv, k_el, v_el)


def onnx_facts(path: Path) -> WeightFacts:
    import json

    import onnx

    model = onnx.load(str(next(path.glob("*.onnx"))), load_external_data=False)
    sizes = {}
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        sizes[init.name] = (n, n * itemsize, list(init.dims))
    gathered = {node.input[0] for node in model.graph.node if node.op_type in ("Gather", "GatherBlockQuantized")}
    weight_bytes = sum(b for _, b, _ in sizes.values())
    read = weight_bytes
    for name in gathered & set(sizes):
        n, b, dims = sizes[name]
        if dims and dims[0] > 1000:  # the embedding table (a vocabulary-sized first axis)
            read -= b - b // dims[0]
    dec = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]
    kv = int(dec["num_hidden_layers"]) * int(dec["num_key_value_heads"]) * int(dec["head_size"]) * 2 * 4  # fp32 cache
    # MatMulNBits packs a K x N weight into bytes with scales and zero points beside it: K * N parameters
    n_params = sum(n for n, _, _ in sizes.values())
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            packed = [name for name in node.input[1:4] if name in sizes]
            n_params += attrs["K"] * attrs["N"] - sum(sizes[name][0] for name in packed)
    return WeightFacts(n_params, weight_bytes, read, kv)


def torch_facts(model) -> WeightFacts:
    """From a loaded ``transformers`` causal LM (parameters as held in memory)."""
    params = dict(model.named_parameters())
    n_params = sum(p.numel() for p in params.values())
    weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    read = weight_bytes
    if head is None or head.weight.data_ptr() != emb.data_ptr():
        read -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    cfg = model.config
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_hidden_layers * n_kv * head_dim * 2 * emb.element_size()
    return WeightFacts(n_params, weight_bytes, read, kv)


def timing_bytes_per_token(timing: dict) -> tuple[float, str | None]:
    """Bytes one decoded token reads, from a timing raw result, and the KV cache type it assumes ("K/V").

    llama.cpp runs record their ``type_k`` / ``type_v``: the KV read is recomputed at those element sizes (the
    raw ``bytes_per_token`` assumes f16; raws without the K / V element counts split an f16 figure evenly, as
    for every model where keys and values are the same width). Other runtimes keep the raw figure (None)."""
    from edgemed.constants import KV_TYPES

    w, rs, pos = timing.get("weights") or {}, timing.get("runtime_settings") or {}, timing.get("kv_positions")
    tk, tv = rs.get("type_k"), rs.get("type_v")
    if tk not in KV_TYPES or tv not in KV_TYPES or pos is None or "read_bytes" not in w:
        return timing["bytes_per_token"], None
    k_el, v_el = w.get("kv_k_per_pos") or w["kv_bytes_per_pos"] / 4, w.get("kv_v_per_pos") or w["kv_bytes_per_pos"] / 4
    kv = k_el * KV_TYPES[tk].bytes_per_element + v_el * KV_TYPES[tv].bytes_per_element
    return w["read_bytes"] + kv * pos, f"{tk}/{tv}"


def timing_threads(runtime_settings: dict | None, settings: dict | None = None) -> int | None:
    """The thread count a timing result decoded with: the runtime's own reading (``runtime_settings.n_threads``),
    else the settings it was measured with; None when neither says. Its roofline is against the read bandwidth at
    that count, which may be another run's than the report's (a timing kept from an earlier run)."""
    threads = (runtime_settings or {}).get("n_threads") or (settings or {}).get("threads")
    return int(threads) if threads else None


def bandwidths(saved: dict | None) -> dict:
    """``{"read": {...} | None, "copy": {...} | None}`` from a bandwidth.json of either layout.

    Since the read ceiling: ``{"threads", "read", "copy"}``; before it, the copy measurement alone (flat)."""
    saved = saved or {}
    if "read" in saved or "copy" in saved:
        return {"read": saved.get("read"), "copy": saved.get("copy")}
    return {"read": None, "copy": saved if saved.get("bytes_per_s") else None}


def rooflines(decode_tok_s: float | None, bytes_per_token: float | None, bw: dict | None) -> dict:
    """The read-bandwidth roofline (``ceiling_tok_s``, ``fraction``, None without a read figure) and, under
    ``copy``, the same against the copy bandwidth (the older reports' figure)."""
    figures = bandwidths(bw)
    out = roofline(decode_tok_s, bytes_per_token, (figures["read"] or {}).get("bytes_per_s"))
    out["copy"] = roofline(decode_tok_s, bytes_per_token, (figures["copy"] or {}).get("bytes_per_s"))
    return out


def roofline(decode_tok_s: float | None, bytes_per_token: float | None, bandwidth: float | None) -> dict:
    """Ceiling tok/s and the measured fraction of it (None where a figure is missing)."""
    if not (decode_tok_s and bytes_per_token and bandwidth):
        return {"ceiling_tok_s": None, "fraction": None}
    ceiling = bandwidth / bytes_per_token
    return {"ceiling_tok_s": ceiling, "fraction": decode_tok_s / ceiling}
