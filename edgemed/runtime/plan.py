"""Memory planner: will this model fit this device, and with how much context?

Everything comes from the GGUF's own tensor table and hyper-parameters (read
by ``edgemed.formats.gguf_header`` with the ``gguf`` package's type tables; no model load):

    peak = runtime + weights (+ CPU repacked copies) + KV cache + compute buffer (+ its work buffer)

* **weights** — the bytes of every tensor in the file (llama.cpp maps them all).
* **repacked** — on CPU, llama.cpp keeps a second, interleaved copy of some
  quant types (``repackable_bytes``) next to the mapped original. Without mmap
  (``use_mmap = false``) those tensors are read straight into the interleaved
  buffer, so they count once: the CPU profiles load that way. Which types a build repacks depends on its CPU
  features (``buffers.REPACK_RULES``: Q4_0, Q4_K, IQ4_NL on AVX2, Q2_K on AVX-512, Q4_0, Q4_K, Q5_K, Q6_K,
  Q8_0, IQ4_NL on NEON): the installed build's where the model loads here, else the ones the profile's device has
  (``target_features``).
* **tied output copy** — a model without ``output.weight`` multiplies by its token embedding: llama.cpp gives
  the output layer a copy of ``token_embd`` in the extra buffer that takes it (AMX in its layout, else
  CPU_REPACK for a type the build repacks; extra buffers ``all``), while ``token_embd`` itself stays in a plain
  buffer. The copy counts with or without mmap, in ``repacked``.
* **KV cache** — ``cells * n_layer * n_head_kv * (head_dim_k * bytes(type_k) + head_dim_v * bytes(type_v))``:
  grouped-query attention shrinks it by ``n_head / n_head_kv``; a q8_0 cache halves it. ``cells`` is what
  llama.cpp allocates for ``n_ctx`` (``kv_cells``): padded to 256, and each slot's stream padded again.
* **compute buffer** — the largest graph stage for one micro-batch of ``n_ubatch``
  tokens: attention scores ``n_ctx * n_ubatch * (n_head + 1) * 4`` bytes (not needed
  with flash attention), the activations around them, or the output logits. On a
  CPU only the pages a graph writes count; with GPU offload the whole reserved
  buffer (logits for every token of the micro-batch) is allocated.
* **compute work buffer** — ggml's per-graph scratch, allocated outside the compute buffer (``work_bytes``): the
  input of a matrix product converted to the type its weight multiplies with. Without flash attention the
  attention scores (f32) are converted to f16 for the product with the V cache: ``n_ctx * n_ubatch * n_head * 2``
  bytes (none with an f32 V cache); otherwise the widest activation, ``n_ubatch * max(n_ff, n_embd) * 2``.
* **adapters** — each LoRA adapter applied at run time: its tensors' bytes (llama.cpp reads them into a
  buffer of their own, not a mapping), from the adapter file's header. Its pairs' intermediate products
  (rank x micro-batch) are too small to count.
* **prefix cache** — ``edgemed serve`` only: host RAM its saved prompt prefixes may hold (the batcher's LRU
  never exceeds it). The size comes from the profile's ``memory.prefix_cache_mib`` (``PREFIX_CACHE_MIB`` when
  absent) and is *reduced* to what the budget leaves after the model and its context; ``--prefix-cache-mib N``
  is a request like ``--ctx``: counted before the context is chosen, and *refused* when it cannot fit.
* **runtime** — the interpreter and llama.cpp library, plus llama.cpp's
  vocabulary tables (``RUNTIME_PER_TOKEN`` per vocabulary entry).

``choose_context`` picks the largest context (a multiple of 256, at most the
profile's and the model's) that fits the profile's budget, or refuses before
anything is loaded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from edgemed.constants import DEFAULT_KV_TYPE, KV_TYPES
from edgemed.devices.facts import Facts
from edgemed.devices.profiles import Profile
from edgemed.devices.schema import MAX_CTX, MAX_PREFIX_CACHE_MIB, MAX_THREADS
from edgemed.errors import InputError, PlanError, ProfileError
from edgemed.runtime.buffers import MATMUL_WEIGHT, REPACK_RULES, repackable

MIB = 1 << 20
MAX_BUDGET_MIB = 1 << 30  # 1 PiB
CTX_STEP = 256          # llama.cpp pads the KV cache to this; plans use multiples of it
#: Names the estimate's formula in manifests and plans; bump when the model of memory changes.
METHOD = "planner/4"  # 2: the repacked copy counts only with mmap; 3: KV in the cells llama.cpp pads to (kv_cells);
#                       4: the compute work buffer, the tied output copy, repacked types by the build's CPU features
MIN_CTX = 512           # below this a medical prompt plus an answer does not fit
#: The prefix cache of a profile without ``memory.prefix_cache_mib`` (the batcher's own default).
PREFIX_CACHE_MIB = 256

#: Python 3.11 + click + edgemed + llama-cpp-python imported, nothing loaded (measured: 45-50 MiB).
RUNTIME_BASE = 48 * MIB
#: llama.cpp's tokenizer tables per vocabulary entry (measured ~500 B on SmolLM2 and Qwen2.5).
RUNTIME_PER_TOKEN = 512

#: The CPU features a plan assumes where none are given (``estimate``): an x86 AVX2 build, whose repack kernels
#: take Q4_0, Q4_K and IQ4_NL (``buffers.REPACK_RULES``).
DEFAULT_FEATURES = frozenset({"AVX2"})
#: Every feature a repack rule names: a device whose CPU is not known (``platform = "any"``) may repack all of them.
ALL_REPACK_FEATURES = frozenset(f for rules in REPACK_RULES.values() for needs, _ in rules for f in needs)
#: Types llama.cpp's AMX buffer takes -> (elements per block its row must be a multiple of, bytes its layout adds
#: per block): ggml-cpu/amx (``qtype_has_amx_kernels``, ``get_row_size``: a 4-byte scale sum per Q4_K/Q5_K
#: super-block, a 4-byte compensation per Q8_0 block). Its rows (output features) come in multiples of 32.
AMX_TYPES = {"Q4_0": (32, 0), "Q4_1": (32, 0), "Q8_0": (32, 4), "Q4_K": (256, 4), "Q5_K": (256, 4),
             "Q6_K": (256, 0), "IQ4_XS": (256, 0)}


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs from a GGUF file."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    weights_bytes: int
    repackable_bytes: int
    #: the matrix weights llama.cpp's AMX buffer takes (``AMX_TYPES``), and what its layout adds to them
    amx_bytes: int = 0
    amx_extra_bytes: int = 0
    #: (type, dims, bytes) of each weight of a type some build repacks (``REPACK_RULES``), token_embd aside
    repack_weights: tuple[tuple[str, tuple[int, ...], int], ...] = ()
    #: (type, dims, bytes) of token_embd where the model has no output.weight (llama.cpp's output layer copies it)
    tied_embd: tuple[str, tuple[int, ...], int] | None = None

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * max(self.head_dim_k, self.head_dim_v)

    def repack_bytes(self, features=DEFAULT_FEATURES) -> int:
        """The weights a build with these CPU features copies into CPU_REPACK (``repackable_bytes`` for a shape
        not read from a file)."""
        if not self.repack_weights:
            return self.repackable_bytes
        return sum(n for type_name, dims, n in self.repack_weights
                   if len(dims) in (2, 3) and repackable(type_name, dims[:2], frozenset(features)))

    def tied_output_bytes(self, features=DEFAULT_FEATURES, amx: bool = False) -> int:
        """What llama.cpp's copy of a tied ``token_embd`` for the output layer holds with extra buffers ``all``: its
        AMX layout where ``amx`` and the AMX buffer takes it, else its bytes where the build repacks its type, else
        nothing (the output layer shares the plain tensor)."""
        if self.tied_embd is None:
            return 0
        type_name, dims, n = self.tied_embd
        if amx and (layout := amx_layout_bytes(type_name, dims, n)) is not None:
            return layout
        return n if repackable(type_name, dims, frozenset(features)) else 0


def amx_layout_bytes(type_name: str, dims: tuple[int, ...], n_bytes: int) -> int | None:
    """A 2-D weight's size in llama.cpp's AMX buffer (``AMX_TYPES``), or None where that buffer does not take it."""
    block, extra = AMX_TYPES.get(type_name, (0, 0))
    if block and len(dims) == 2 and dims[0] % block == 0 and dims[1] % 32 == 0:
        return n_bytes + dims[1] * (dims[0] // block) * extra
    return None


#: Hyper-parameter (after "<arch>.") -> (smallest, largest) value the planner accepts. A GGUF is untrusted:
#: a value outside these (or not an integer) is a corrupt or hostile file, refused before any arithmetic.
HPARAM_RANGES = {
    "block_count": (1, 1 << 16),
    "embedding_length": (1, 1 << 20),
    "attention.head_count": (1, 1 << 16),
    "attention.head_count_kv": (1, 1 << 16),
    "attention.key_length": (1, 1 << 16),
    "attention.value_length": (1, 1 << 16),
    "feed_forward_length": (0, 1 << 24),
    "vocab_size": (1, 1 << 24),
    "context_length": (1, 1 << 30),
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_shape(path: Path | str) -> ModelShape:
    """Hyper-parameters and tensor sizes from a GGUF file's header (no tensor data is read)."""
    from edgemed.formats.gguf_header import ArrayLength, read_header

    path = Path(path)
    header = read_header(path)
    meta = header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise InputError(f"'{path}' has no general.architecture key.", "re-convert the model with `edgemed convert`")

    def hp(name, default=None):
        key = f"{arch}.{name}"
        value = meta.get(key, default)
        if isinstance(value, list):  # per-layer values (e.g. head_count_kv): the largest is the worst case
            if not all(_is_int(v) for v in value):
                value = "a list holding non-integers"
            else:
                value = max(value) if value else default
        if value is None:
            raise InputError(f"'{path}' lacks the {key} key the planner needs.",
                             "re-convert the model with `edgemed convert`")
        lo, hi = HPARAM_RANGES[name]
        if not _is_int(value) or not lo <= value <= hi:
            raise InputError(f"'{path}' has {key} = {value!r}; the planner expects an integer from {lo} to {hi}.",
                             "the file is damaged or was not written by a GGUF converter: re-convert it with `edgemed convert`")
        return value

    n_embd, n_head = hp("embedding_length"), hp("attention.head_count")
    head_dim = max(1, n_embd // n_head)
    tokens = meta.get("tokenizer.ggml.tokens")
    n_tokens = tokens.length if isinstance(tokens, ArrayLength) else len(tokens) if isinstance(tokens, list) else None
    n_vocab = hp("vocab_size", n_tokens)
    weights = weight_facts((t.name, t.type_name, tuple(t.dims), t.n_bytes) for t in header.tensors)
    shape = ModelShape(arch=arch, n_layer=hp("block_count"), n_embd=n_embd, n_head=n_head,
                      n_head_kv=hp("attention.head_count_kv", n_head),
                      head_dim_k=hp("attention.key_length", head_dim), head_dim_v=hp("attention.value_length", head_dim),
                      n_ff=hp("feed_forward_length"), n_vocab=n_vocab, n_ctx_train=hp("context_length"),
                      repackable_bytes=0, **weights)
    return replace(shape, repackable_bytes=shape.repack_bytes(DEFAULT_FEATURES))


def weight_facts(tensors) -> dict:
    """``ModelShape``'s weight fields from a file's tensors, ``(name, type, dims, bytes)`` each (``read_shape``'s, or
    those a quantization would write: ``--quant auto``'s search counts a candidate as the file it makes): all the bytes,
    the weights some build repacks, what the AMX buffer takes and its layout adds, and a tied ``token_embd``."""
    weights = amx = amx_extra = 0
    repack, names, embd = [], set(), None
    for name, type_name, dims, n in tensors:
        weights += n
        names.add(name)
        if type_name in REPACK_RULES and not name.startswith("token_embd"):
            repack.append((type_name, dims, n))
        layout = amx_layout_bytes(type_name, dims, n) if MATMUL_WEIGHT.match(name) else None
        if layout is not None:
            amx, amx_extra = amx + n, amx_extra + layout - n
        if name == "token_embd.weight":
            embd = (type_name, dims, n)
    return {"weights_bytes": weights, "repack_weights": tuple(repack), "amx_bytes": amx, "amx_extra_bytes": amx_extra,
            "tied_embd": embd if "output.weight" not in names else None}


@dataclass(frozen=True)
class Estimate:
    """Predicted memory, in bytes, for one set of load settings."""

    n_ctx: int
    runtime: int
    weights: int
    repacked: int
    kv_cache: int
    compute: int
    adapters: int = 0  # LoRA adapters applied at run time (their tensors)
    prefix_cache: int = 0  # host RAM `edgemed serve`'s saved prompt prefixes may hold
    work: int = 0  # the compute work buffer ggml allocates beside the compute buffer (``work_bytes``)

    @property
    def total(self) -> int:
        return (self.runtime + self.weights + self.repacked + self.kv_cache + self.compute + self.work + self.adapters
                + self.prefix_cache)


def kv_cells(n_ctx: int, n_seq: int = 1) -> int:
    """The KV cells llama.cpp allocates for a context of ``n_ctx`` shared by ``n_seq`` sequences, each with a stream of
    its own (``kv_unified`` off, as ``edgemed serve``'s slots): the context padded to ``CTX_STEP``, then each stream's
    share padded to it again (``llama_context``'s constructor), so 4 slots of 300 tokens hold 4 x 512 cells."""
    cells = -(-n_ctx // CTX_STEP) * CTX_STEP
    if n_seq > 1:
        cells = -(-(cells // n_seq) // CTX_STEP) * CTX_STEP * n_seq
    return cells


def kv_cache_bytes(shape: ModelShape, n_ctx: int, type_k: str = DEFAULT_KV_TYPE, type_v: str = DEFAULT_KV_TYPE) -> int:
    per_token = shape.n_head_kv * (shape.head_dim_k * KV_TYPES[type_k].bytes_per_element
                                   + shape.head_dim_v * KV_TYPES[type_v].bytes_per_element)
    return int(n_ctx * shape.n_layer * per_token)


def compute_bytes(shape: ModelShape, n_ctx: int, n_ubatch: int, flash_attn: bool, offload: bool) -> int:
    """The compute buffer's high-water mark for one micro-batch (see the module docstring)."""
    f32 = 4
    around_attention = n_ubatch * f32 * (5 * shape.n_embd + 2 * shape.n_embd_kv)
    scores = 0 if flash_attn else n_ctx * n_ubatch * f32 * (shape.n_head + 1)
    ffn = n_ubatch * f32 * (2 * shape.n_ff + shape.n_embd)
    outputs = n_ubatch if offload else 1  # a device buffer is allocated whole; CPU pages only when written
    logits = n_ubatch * f32 * 2 * shape.n_embd + outputs * f32 * shape.n_vocab
    return max(around_attention + scores, ffn, logits)


def work_bytes(shape: ModelShape, n_ctx: int, n_ubatch: int, flash_attn: bool, type_v: str = DEFAULT_KV_TYPE) -> int:
    """The compute work buffer (``ggml_graph_plan``: kept by the backend beside the compute buffer, for the largest
    input a matrix product converts to its weight's dot type). Without flash attention the f32 attention scores
    (``n_ctx * n_ubatch * n_head``) become f16 (bf16) for the product with the V cache; an f32 V cache takes them as
    they are. Otherwise, and at the least, the widest activation at 2 bytes an element (an f16 weight's; the quant
    types' are smaller)."""
    activations = n_ubatch * max(shape.n_ff, shape.n_embd) * 2
    if flash_attn or type_v == "f32":
        return activations
    return max(activations, n_ctx * n_ubatch * shape.n_head * 2)


def estimate(shape: ModelShape, n_ctx: int, *, n_ubatch: int = 512, type_k: str = DEFAULT_KV_TYPE, type_v: str = DEFAULT_KV_TYPE,
             flash_attn: bool = False, offload: bool = False, use_mmap: bool = True, adapter_bytes: int = 0,
             prefix_cache_bytes: int = 0, n_seq: int = 1, amx: bool = False, features=DEFAULT_FEATURES,
             extra_buffers: str = "all") -> Estimate:
    """Predicted peak memory of a llama.cpp process serving this model at ``n_ctx`` (with ``adapter_bytes`` of
    LoRA adapters: ``adapters_bytes``, and ``prefix_cache_bytes`` of host prefix cache), its context shared by
    ``n_seq`` sequences of their own KV streams (``edgemed serve``'s slots): the cells llama.cpp allocates
    (``kv_cells``), not the tokens asked for. ``amx``: the weights may sit in llama.cpp's AMX buffer (an AMX build,
    extra buffers ``auto`` or ``all``): its layout is larger, and beside a mapping it is a copy of every weight it takes.
    ``features``: the CPU features of the build (``buffers.Build.features``: which types it repacks);
    ``extra_buffers``: the concrete mode (``all``, ``repack`` or ``none``; ``profile_settings`` resolves ``auto``):
    ``none`` repacks nothing, and only ``all`` copies a tied token embedding for the output layer."""
    cells = kv_cells(n_ctx, n_seq)
    # the attention of one micro-batch spans its own sequence's KV stream: on a CPU the score pages written are one
    # stream's (Qwen2.5-0.5B, 2 slots of 4,096 filled: 174.4 MiB of growth, as 1 slot of 4,096: 173.9 MiB;
    # `python -m edgemed.benchmarks.plan_memory --slots 2`); a device buffer is reserved for all the cells
    attention = cells if offload else cells // n_seq
    features = frozenset(features)
    amx = amx and not offload and extra_buffers == "all"
    repack = 0 if extra_buffers == "none" else shape.repack_bytes(features)
    tied = shape.tied_output_bytes(features, amx) if extra_buffers == "all" and not offload else 0
    return Estimate(
        n_ctx=n_ctx,
        runtime=RUNTIME_BASE + RUNTIME_PER_TOKEN * shape.n_vocab,
        weights=shape.weights_bytes + (shape.amx_extra_bytes if amx and not use_mmap else 0),
        repacked=tied + (0 if offload or not use_mmap else
                         max(repack, shape.amx_bytes + shape.amx_extra_bytes) if amx else repack),
        kv_cache=kv_cache_bytes(shape, cells, type_k, type_v),
        compute=compute_bytes(shape, attention, min(n_ubatch, n_ctx), flash_attn, offload),
        adapters=adapter_bytes,
        prefix_cache=prefix_cache_bytes,
        work=work_bytes(shape, attention, min(n_ubatch, n_ctx), flash_attn, type_v),
    )


def adapters_bytes(adapters) -> int:
    """What the LoRA adapter files ``adapters`` (paths, or objects with ``.path``) add: their tensors' bytes."""
    from edgemed.formats.gguf_header import adapter_facts

    return sum(adapter_facts(getattr(a, "path", a)).n_bytes for a in adapters)


@dataclass(frozen=True)
class Plan:
    """The outcome: settings to load with, the estimate, and the budget it was checked against."""

    model: str
    profile: str
    budget: int
    estimate: Estimate
    llama: dict          # resolved llama.cpp settings (threads as numbers, n_ctx chosen, flash_attn for this model)
    limited_by: str      # what capped the context: "budget", "profile", "model" or "request"
    prefix_cache_asked: int = 0  # the prefix cache asked for (bytes); estimate.prefix_cache is what it got
    #: where the estimate lives (``memory_pool``): "host" (nothing offloaded), "unified" (offloaded to a GPU that shares
    #: the host's memory: Jetson, Apple; the profile's ``memory.unified``), or "host+gpu" (offloaded to a GPU with its own
    #: memory, which the plan does not read: the estimate is counted against the host budget alone)
    pool: str = "host"

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.budget

    @property
    def gpu_memory_unplanned(self) -> bool:
        return self.pool == "host+gpu"

    def to_dict(self) -> dict:
        return {"model": self.model, "profile": self.profile, "budget_bytes": self.budget,
                "fits": self.fits, "limited_by": self.limited_by, "prefix_cache_asked_bytes": self.prefix_cache_asked,
                "estimate": {**asdict(self.estimate), "total": self.estimate.total}, "llama": self.llama,
                "memory_pool": self.pool}


def memory_pool(profile: Profile, offload: bool) -> str:
    """``Plan.pool`` for a plan that does (``offload``) or does not put layers on a GPU, read from the profile's
    ``memory.unified``."""
    if not offload:
        return "host"
    return "unified" if profile.memory["unified"] else "host+gpu"


#: what a plan whose GPU has its own memory says (``edgemed plan``, and a warning before a load)
GPU_MEMORY_NOTE = ("the GPU's own memory is not planned: this profile offloads layers (n_gpu_layers) to a GPU with "
                   "memory of its own (memory.unified = false), and the estimate is checked against host RAM alone; "
                   "llama.cpp fails the load if the offloaded part does not fit the GPU")


def flash_attn_for(profile: Profile, shape: ModelShape) -> bool:
    """Whether ``profile`` runs this model with flash attention: its ``flash_attn``, or on anyway when the model's
    attention heads are one of the widths in its ``flash_attn_head_dims``. On a CPU, llama.cpp's flash-attention
    kernel reads a whole prompt faster, but once the context is long it decodes at half speed with heads 64 wide
    (full speed with 128), and reads a few new tokens (a conversation's next question) slower with either
    (docs/decisions/0017): a profile lists a width only where its workload was measured to gain."""
    s = profile.llama
    widths = s.get("flash_attn_head_dims", ())
    return bool(s["flash_attn"]) or (shape.head_dim_k in widths and shape.head_dim_v in widths)


def target_features(profile: Profile) -> frozenset[str]:
    """The CPU features (``buffers.Build.features``' names) of the device ``profile`` describes, for a plan made off
    it: NEON with the dot product on a Jetson Orin (Cortex-A78AE) and every Apple M chip, AVX2 on x86 (and AVX512
    where its ``match.cpu_flags`` ask for avx512f), and every feature a repack rule names on a device whose CPU is not
    known (``platform = "any"``: it may repack any of those types)."""
    platform = profile.match["platform"]
    if platform in ("jetson", "apple"):
        return frozenset({"NEON", "DOTPROD"})
    if platform == "x86":
        return DEFAULT_FEATURES | ({"AVX512"} if "avx512f" in profile.match.get("cpu_flags", ()) else set())
    return ALL_REPACK_FEATURES


def installed_build() -> dict:
    """``make_plan``'s ``gpu``, ``amx`` and ``features`` for the llama.cpp installed here (``session.prepare``'s, so
    every plan of a load here is made alike): whether it offloads at all (None where it is not installed: the plan takes the profile's word), whether
    it has an AMX buffer edgemed may try (``buffers.amx_may_be_tried``), and its CPU features (None: the profile's)."""
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError):  # not installed, or its library does not load here (a CUDA wheel
        return {"gpu": None, "amx": False, "features": None}  # without the driver): the profile's word
    from edgemed.runtime.buffers import amx_may_be_tried
    from edgemed.runtime.llamacpp import build

    return {"gpu": bool(llama_cpp.llama_supports_gpu_offload()), "amx": amx_may_be_tried(build()),
            "features": installed_features()}


def installed_features() -> frozenset[str] | None:
    """The CPU features of the llama.cpp installed here (``buffers.Build.features``), or None where none is."""
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return None
    from edgemed.runtime.llamacpp import build

    return build().features


def profile_settings(profile: Profile, shape: ModelShape, gpu: bool | None = None, amx: bool = False,
                     features=None) -> dict:
    """The load settings of ``profile`` for this model that change the memory estimate (keyword arguments of
    ``estimate``). ``gpu``: whether the llama.cpp build that will load it offloads at all (a CPU-only wheel keeps
    every weight on the CPU whatever ``n_gpu_layers`` says, and repacks them beside a mapping); None: the device the
    profile describes, with the GPU build it is meant for (a plan made for another machine). ``amx``: the build that
    will load it has llama.cpp's AMX buffer and ``auto`` may try it (``estimate``); it counts where the profile's extra
    buffers allow it. ``features``: that build's CPU features (None: the profile's device's, ``target_features``);
    ``auto`` is ``all`` unless they hold AMX_INT8 and ``amx`` is false (``buffers.resolve``: ``repack`` there), and
    ``all`` uses an AMX buffer the build has whether or not ``auto`` would try it."""
    s = profile.llama
    offload = s["n_gpu_layers"] != 0 and gpu is not False
    features = target_features(profile) if features is None else frozenset(features)
    mode = s.get("extra_buffers", "auto")
    if mode == "auto":
        mode = "all" if amx or "AMX_INT8" not in features else "repack"
    return {"n_ubatch": s["n_ubatch"], "type_k": s["type_k"], "type_v": s["type_v"],
            "flash_attn": flash_attn_for(profile, shape), "offload": offload, "use_mmap": s["use_mmap"],
            "amx": mode == "all" and (amx or "AMX_INT8" in features), "features": tuple(sorted(features)),
            "extra_buffers": mode}


def choose_context(shape: ModelShape, profile: Profile, budget: int, requested: int | None = None,
                   adapter_bytes: int = 0, prefix_cache_bytes: int = 0, n_seq: int = 1,
                   gpu: bool | None = None, amx: bool = False, features=None) -> tuple[int, str]:
    """Largest context that fits ``budget`` (or ``requested`` if it fits); raises ``PlanError`` otherwise."""
    opts = profile_settings(profile, shape, gpu, amx, features) | {"adapter_bytes": adapter_bytes, "prefix_cache_bytes": prefix_cache_bytes,
                                               "n_seq": n_seq}
    parts = [f"LoRA adapters {adapter_bytes / MIB:.0f} MiB"] * bool(adapter_bytes) + \
        [f"--prefix-cache-mib {prefix_cache_bytes / MIB:.0f} MiB"] * bool(prefix_cache_bytes)
    with_adapters = f" ({', '.join(parts)} of it)" if parts else ""
    cap, limited_by = profile.llama["n_ctx"], "profile"
    if shape.n_ctx_train < cap:
        cap, limited_by = shape.n_ctx_train, "model"
    smallest = estimate(shape, min(MIN_CTX, cap), **opts)  # what the largest context that fits starts from
    smaller = (("pass a smaller --prefix-cache-mib (or leave it out: the profile's cache is reduced to fit), or "
                if prefix_cache_bytes else "") +
               f"use a smaller quant (the profile recommends {profile.recommended_quant}) or a smaller model; "
               "nothing was loaded")
    if requested is not None:
        # a server's --ctx is per slot (plan_load multiplied it by the slots): a refusal names what was asked
        slots = (f" (--ctx {requested // n_seq} per slot x {n_seq} slots)"
                 if n_seq > 1 and _is_int(requested) and requested % n_seq == 0 else "")
        fewer = (f"pass a smaller --ctx (tokens per slot: {requested // n_seq} now) or fewer --slots ({n_seq} now), "
                 "or " if slots else "")
        if not _is_int(requested) or not 1 <= requested <= MAX_CTX:
            raise InputError(f"The context must be an integer from 1 to {MAX_CTX} tokens in all, got {requested!r}{slots}.",
                             "pass a smaller --ctx (or fewer --slots), or leave --ctx out")
        per_seq = requested // max(n_seq, 1)
        if shape.n_ctx_train and per_seq > shape.n_ctx_train:
            raise InputError(f"A {per_seq}-token context is more than the {shape.n_ctx_train} tokens this model was "
                             "trained on: past them its positions are ones it never saw, and its answers degrade.",
                             f"pass --ctx {shape.n_ctx_train} or less, or leave --ctx out")
        est = estimate(shape, requested, **opts)
        if est.total > budget:
            raise PlanError(
                f"A {requested}-token context{slots} needs {est.total / MIB:.0f} MiB{with_adapters}, over the "
                f"'{profile.name}' budget of {budget / MIB:.0f} MiB.",
                # without --ctx the smallest context is tried too: where it does not fit, that is a second refusal
                f"{fewer}leave --ctx out to get the largest context that fits, or use a smaller quant / model"
                if smallest.total <= budget else smaller)
        return requested, "request"
    if smallest.total > budget:
        raise PlanError(
            f"The model needs {smallest.total / MIB:.0f} MiB even with a {smallest.n_ctx}-token context "
            f"(weights {smallest.weights / MIB:.0f} MiB{''.join(', ' + p for p in parts)}), over the '{profile.name}' budget of {budget / MIB:.0f} MiB.",
            smaller)
    if estimate(shape, cap, **opts).total <= budget:  # the whole cap fits: it is the answer, whatever its multiple
        return cap, limited_by
    best = smallest.n_ctx
    lo, hi = best // CTX_STEP, cap // CTX_STEP  # binary search over multiples of CTX_STEP (memory grows with n_ctx)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(shape, mid * CTX_STEP, **opts).total <= budget:
            lo = mid
        else:
            hi = mid - 1
    return max(best, lo * CTX_STEP), "budget"  # the cap did not fit: the budget chose


def _fits(shape: ModelShape, profile: Profile, budget: int, *args) -> bool:
    """Whether ``choose_context`` finds a context for ``budget`` (its other arguments as ``args``)."""
    try:
        choose_context(shape, profile, budget, *args)
    except PlanError:
        return False
    return True


def budget_from_mib(mib: float) -> int:
    """A ``--budget-mb`` value in bytes; refuses zero, negative, infinite and NaN sizes."""
    if not isinstance(mib, (int, float)) or isinstance(mib, bool) or not math.isfinite(mib) or not 0 < mib <= MAX_BUDGET_MIB:
        raise InputError(f"--budget-mb must be a number above 0 and at most {MAX_BUDGET_MIB}, got {mib!r}.",
                         "pass the memory the model may use in MiB (e.g. --budget-mb 6000), or leave it out")
    return int(mib * MIB)


def check_threads(n: int | None, what: str = "the thread count") -> int | None:
    """``n`` when it is a usable thread count (or None: the engine decides); an ``InputError`` otherwise."""
    if n is None:
        return None
    if not _is_int(n) or not 1 <= n <= MAX_THREADS:
        raise InputError(f"{what} must be an integer from 1 to {MAX_THREADS}, got {n!r}.",
                         "pass --threads N with N at most the machine's cores, or leave it out to use the profile's")
    return n


def for_engine(profile: Profile, batched: bool) -> Profile:
    """``profile`` as the engine that will load the model runs it: the one-sequence engine (``run``, ``chat``; not
    ``batched``) with the profile's ``n_ubatch_single`` where it sets one, ``edgemed serve``'s batcher with
    ``n_ubatch``. The one-sequence engine keeps a conversation's cells in whole micro-batches, so a smaller one
    recomputes fewer rows each turn; the batcher was measured slower with it (docs/decisions/0021)."""
    single = profile.llama.get("n_ubatch_single")
    if batched or single is None or single == profile.llama["n_ubatch"]:
        return profile
    return replace(profile, llama=dict(profile.llama, n_ubatch=single))


def make_plan(model: Path | str, profile: Profile, facts: Facts | None, requested_ctx: int | None = None,
              budget: int | None = None, adapters=(), prefix_cache: tuple[int, bool] | None = None,
              n_seq: int = 1, gpu: bool | None = None, here: bool = False, amx: bool = False,
              batched: bool = False, features=None) -> Plan:
    """Plan ``model`` on ``profile`` (budget from the profile and ``facts`` unless given), with the LoRA adapter
    files ``adapters`` (paths, or objects with ``.path``) applied.

    ``prefix_cache`` (``edgemed serve``): ``(bytes, fixed)`` from ``prefix_cache_request``. A fixed size (asked on
    the command line) is counted before the context is chosen and refused with the context when it cannot fit;
    otherwise (the profile's) it gets what the budget leaves after the model and its context, at most ``bytes``.
    ``here``: the model will load on the machine ``facts`` describe, so its memory caps the budget whichever profile
    was named (``Profile.budget_bytes``), and the CPU features of the llama.cpp installed here are those of the build
    that loads it unless ``features`` are given (``profile_settings``). Not ``here``, ``facts`` count only where they
    match ``profile`` (a tree of the device, or this machine of its class): another device's memory and cores are
    not this machine's, so a profile without ``memory.total_gb`` needs ``budget``, and its threads are the device's.
    ``batched``: for ``edgemed serve``'s batcher, else the one-sequence engine (``for_engine``: the micro-batch each
    runs)."""
    profile = for_engine(profile, batched)
    elsewhere = not here and facts is not None and not profile.matches(facts)
    if elsewhere:  # planned for another device: this machine's memory and cores are not its own
        facts = None
    if features is None and here:
        features = installed_features()
    shape = read_shape(model)
    adapter_bytes = adapters_bytes(adapters)
    budget_given = budget
    try:
        budget = profile.budget_bytes(facts, here) if budget is None else budget
    except ProfileError:
        if not elsewhere:
            raise
        raise ProfileError(f"Profile '{profile.name}' takes its memory size from the device it runs on (it has no "
                           "memory.total_gb), and the machine planning is not that device.",
                           "pass --budget-mb N with the MiB a model may use there (`edgemed devices detect` on the "
                           "device prints its budget), or plan on the device (or --root a copy of its /proc), or "
                           "name a profile with memory.total_gb") from None
    if not _is_int(budget) or budget < 0:
        raise InputError(f"The memory budget must be a whole number of bytes >= 0, got {budget!r}.",
                         "pass --budget-mb with a finite number of MiB, or leave it out to use the profile's")
    asked, fixed = prefix_cache or (0, False)
    if not _is_int(asked) or not 0 <= asked <= MAX_PREFIX_CACHE_MIB * MIB:
        raise InputError(f"The prefix cache must be 0 to {MAX_PREFIX_CACHE_MIB} MiB, got {asked!r} bytes.",
                         "pass --prefix-cache-mib with a whole number of MiB (0: no host cache)")
    try:
        n_ctx, limited_by = choose_context(shape, profile, budget, requested_ctx, adapter_bytes, asked if fixed else 0,
                                           n_seq, gpu, amx, features)
    except PlanError as exc:  # a budget this machine capped, or its OS reserve emptied, says so: the profile alone
        # would not explain it
        if budget_given is not None:
            raise
        notes, fix = [profile.memory_cap_note(facts, here)], exc.fix
        reserve, more_room = profile.reserve_note(facts, here)
        if reserve and (budget == 0 or _fits(shape, profile, profile.budget_bytes(facts, here, reserve=False),
                                              requested_ctx, adapter_bytes, asked if fixed else 0, n_seq, gpu, amx,
                                              features)):
            # the OS reserve is what refuses it: a budget of 0 fits no quant, so the fixes are the ones that make room
            notes.append(reserve)
            fix = more_room if budget == 0 else f"{more_room}; or {exc.fix}"
        if not any(notes):
            raise
        raise PlanError(f"{exc.problem.rstrip('.')}; {'; '.join(n for n in notes if n)}.", fix) from None
    settings = profile_settings(profile, shape, gpu, amx, features)
    est = estimate(shape, n_ctx, **settings, adapter_bytes=adapter_bytes, n_seq=n_seq)
    if asked:  # fixed: it fits (choose_context counted it); the profile's: what the budget leaves, in whole MiB
        est = replace(est, prefix_cache=asked if fixed else max(0, min(asked, (budget - est.total) // MIB * MIB)))
    # llama.cpp never uses a batch larger than the context; llama-cpp-python would still allocate it
    n_batch = min(profile.llama["n_batch"], n_ctx)
    llama = dict(profile.llama, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(profile.llama["n_ubatch"], n_batch),
                 flash_attn=flash_attn_for(profile, shape),
                 n_threads=check_threads(profile.threads(profile.llama["n_threads"], facts)),
                 n_threads_batch=check_threads(profile.threads(profile.llama["n_threads_batch"], facts)))
    llama.pop("n_ubatch_single", None)  # chosen above (for_engine): n_ubatch is what this engine runs
    pool = memory_pool(profile, settings["offload"])
    return Plan(model=str(model), profile=profile.name, budget=budget, estimate=est, llama=llama, limited_by=limited_by,
                prefix_cache_asked=asked, pool=pool)


def prefix_cache_request(profile: Profile, mib: int | None = None) -> tuple[int, bool]:
    """The prefix cache ``edgemed serve`` asks the plan for, as ``make_plan``'s ``prefix_cache``: ``mib`` (from
    ``--prefix-cache-mib``: fixed) or the profile's ``memory.prefix_cache_mib`` (reduced to fit)."""
    if mib is not None:
        if not _is_int(mib) or not 0 <= mib <= MAX_PREFIX_CACHE_MIB:
            raise InputError(f"--prefix-cache-mib must be a whole number from 0 to {MAX_PREFIX_CACHE_MIB}, got {mib!r}.",
                             "pass the host RAM saved prompt prefixes may hold, in MiB (0: none), or leave it out "
                             "to use the device profile's")
        return mib * MIB, True
    return profile.memory.get("prefix_cache_mib", PREFIX_CACHE_MIB) * MIB, False


def adapter_room(plan: Plan, served=(), added=()) -> tuple[int, int]:
    """``(needed, budget)`` in bytes once the LoRA adapter files ``added`` join ``served`` (what the server holds
    now) on the model ``plan`` was made for: the plan's total with its own adapters replaced by these."""
    base = plan.estimate.total - plan.estimate.adapters
    return base + adapters_bytes(list(served)) + adapters_bytes(list(added)), plan.budget
