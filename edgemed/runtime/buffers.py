"""Which CPU buffer types hold a model's weights: llama.cpp's extra buffer types, chosen per host.

llama.cpp's CPU backend can place weights in *extra* buffer types that repack
them for faster kernels: ``AMX`` (Intel Sapphire Rapids and later, when the
build was compiled with AMX_INT8) and ``CPU_REPACK`` (interleaved layouts for
AVX2 / NEON kernels). Whether the AMX kernels run depends on the compiler that
built llama.cpp: built by GCC 12.2 they fault on their first tile setup
(``native_build`` says why; reported upstream as llama.cpp #20824, Ollama
#17205), built by clang 16 they run, and on an AMX Xeon they read prompts
1.35-1.38x and decode 1.17-1.18x faster than CPU_REPACK
(``docs/decisions/0019-amx-where-the-build-runs-it.md``). Nothing in the build's
system info tells the two apart, so only a run can: the host self-test.

Modes (device profile ``llama.extra_buffers``, ``LoadSettings.extra_buffers``):

======== =====================================================================
all      llama.cpp's own default: every extra buffer type (AMX where the build
         has it, then CPU_REPACK)
repack   CPU_REPACK without AMX: ``use_extra_bufts`` off (no extra type is
         tried), and each weight the repack kernels take is pinned to
         CPU_REPACK by a tensor buffer-type override (llama.cpp's ``-ot``)
none     plain CPU buffers only
auto     ``all`` where the build has no AMX. On an AMX build: ``all`` when the
         self-test runs it first (a build whose AMX kernels crash falls back
         to ``repack`` there, quietly, and the verdict is kept), ``repack``
         where no self-test runs (``EDGEMED_SELFTEST=0``) or the compiler is
         one known to break them (``native_build.amx_tiles_dropped_by``)
======== =====================================================================

Overrides are only written for weights the repack kernels accept (their rules
are ``REPACK_RULES`` below, read off ``ggml_repack_get_optimal_repack_type``):
a weight pinned to CPU_REPACK that the kernels cannot take would abort in
llama.cpp. Where the build has no CPU_REPACK type, ``repack`` is ``none``.
Only weights of layers that llama.cpp keeps on the CPU are pinned (``cpu_layers``):
an override outranks ``n_gpu_layers``, so pinning an offloaded layer's weights
would keep them in host memory and run their products on the CPU. A CUDA build
on an AMX host (``auto`` is ``repack`` there) pinned all 168 matmul weights of a
fully offloaded 28-layer Qwen2 this way before the rule (``gpu_check``).
"""

from __future__ import annotations

import ctypes
import functools
import re
from dataclasses import dataclass
from pathlib import Path

from edgemed.constants import EXTRA_BUFFER_MODES as MODES  # noqa: E402 - the one table of names
#: The order ``devices check`` falls back through when a mode crashes: each one uses fewer extra buffers.
FALLBACKS = ("all", "repack", "none")

#: ggml type -> (alternatives: build features that must all be on, row multiple). x86 and Arm rules.
REPACK_RULES: dict[str, tuple[tuple[frozenset[str], int], ...]] = {
    "Q4_0": ((frozenset({"AVX2"}), 8), (frozenset({"NEON", "MATMUL_INT8"}), 4), (frozenset({"NEON", "DOTPROD"}), 4)),
    "Q4_K": ((frozenset({"AVX2"}), 8), (frozenset({"NEON", "MATMUL_INT8"}), 8), (frozenset({"NEON", "DOTPROD"}), 8)),
    "Q2_K": ((frozenset({"AVX512"}), 8),),
    "IQ4_NL": ((frozenset({"AVX2"}), 8), (frozenset({"NEON", "DOTPROD"}), 4)),
    "Q5_K": ((frozenset({"NEON", "MATMUL_INT8"}), 8), (frozenset({"NEON", "DOTPROD"}), 8)),
    "Q6_K": ((frozenset({"NEON", "MATMUL_INT8"}), 8), (frozenset({"NEON", "DOTPROD"}), 8)),
    "Q8_0": ((frozenset({"NEON", "MATMUL_INT8"}), 4), (frozenset({"NEON", "DOTPROD"}), 4)),
}
#: Weights that only ever feed a matrix multiplication (token_embd also feeds get_rows: never pinned).
MATMUL_WEIGHT = re.compile(r"^(blk\.\d+\.(attn_(q|k|v|qkv|output)|ffn_(gate|up|down))|output)\.weight$")

_CPU_DEVICE = 0  # GGML_BACKEND_DEVICE_TYPE_CPU


@dataclass(frozen=True)
class Build:
    """What the loaded llama.cpp build can do, from ``llama_print_system_info()``."""

    system_info: str

    @property
    def features(self) -> frozenset[str]:
        """CPU backend features that are on (``AVX2 = 1`` -> ``AVX2``)."""
        return frozenset(m.group(1) for m in re.finditer(r"([A-Z0-9_]+) = 1\b", self.system_info))

    @property
    def has_amx(self) -> bool:
        return "AMX_INT8" in self.features


def amx_may_be_tried(build: Build) -> bool:
    """An AMX build whose CPU backend no compiler known to break its kernels made (``native_build``): the one rule
    for whether ``auto`` tries the AMX buffer, and so whether the planner counts its layout."""
    from edgemed.runtime.native_build import amx_tiles_dropped_by

    return build.has_amx and amx_tiles_dropped_by() is None


def resolve(mode: str, build: Build, *, tested: bool = False) -> str:
    """``auto`` -> the concrete mode for this build; other modes as they are. ``tested``: the self-test will run
    the result in a child first and fall back from a crash (``selftest.check``), so an AMX build may try ``all``
    (``amx_may_be_tried``)."""
    if mode not in MODES:
        from edgemed.errors import InputError

        raise InputError(f"extra_buffers is {mode!r}, not one of {', '.join(MODES)}.",
                         "set llama.extra_buffers in the device profile to auto, all, repack or none")
    if mode == "auto":
        return "all" if not build.has_amx or (tested and amx_may_be_tried(build)) else "repack"
    return mode


def repackable(type_name: str, dims: tuple[int, ...], features: frozenset[str]) -> bool:
    """Whether llama.cpp's repack kernels take a 2-D weight of this type and shape on this build."""
    if len(dims) != 2:
        return False
    return any(needs <= features and dims[1] % rows == 0 for needs, rows in REPACK_RULES.get(type_name, ()))


_BLOCK = re.compile(r"^blk\.(\d+)\.")


def cpu_layers(n_layer: int, n_gpu_layers: int, gpu: bool) -> int:
    """How many layers, counted from the first, llama.cpp keeps on the CPU: ``n_layer + 1`` means every repeating
    layer and the output layer (index ``n_layer``). Its rule (``llama_model::load_tensors``): with a GPU device,
    the last ``n_gpu_layers`` of the ``n_layer + 1`` go to it (negative: all); without one, none."""
    if not gpu:
        return n_layer + 1
    offloaded = n_layer + 1 if n_gpu_layers < 0 else n_gpu_layers
    return max(n_layer + 1 - offloaded, 0)


def pinned_weights(tensors, features: frozenset[str], n_gpu_layers: int = 0, gpu: bool = False) -> list[str]:
    """Names of the matmul weights to pin to CPU_REPACK (``tensors``: gguf_header.TensorInfo): those the repack
    kernels take, in layers that stay on the CPU (``cpu_layers``; the output layer is the one after the last block)."""
    tensors = list(tensors)
    blocks = [int(m.group(1)) for t in tensors if (m := _BLOCK.match(t.name))]
    n_layer = max(blocks) + 1 if blocks else 0
    below = cpu_layers(n_layer, n_gpu_layers, gpu)

    def on_cpu(name: str) -> bool:
        m = _BLOCK.match(name)
        return (int(m.group(1)) if m else n_layer) < below

    return [t.name for t in tensors
            if MATMUL_WEIGHT.match(t.name) and on_cpu(t.name) and repackable(t.type_name, t.dims, features)]


class _Override(ctypes.Structure):
    # struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@functools.lru_cache(maxsize=1)
def _extra_bufts() -> dict[str, int]:
    """The CPU backend's extra buffer types by name (``AMX``, ``CPU_REPACK``, ...), from the loaded ggml."""
    from edgemed.runtime.native_build import library_dir

    lib_dir = library_dir()  # the folder llama-cpp-python loaded its libraries from ($LLAMA_CPP_LIB_PATH included)
    found: dict[str, int] = {}
    try:
        ggml = ctypes.CDLL(str(next(lib_dir.glob("libggml.so*"), lib_dir / "libggml.so")))
        base = ctypes.CDLL(str(next(lib_dir.glob("libggml-base.so*"), lib_dir / "libggml-base.so")))
    except OSError:
        return found
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    base.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    base.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    base.ggml_backend_buft_name.restype = ctypes.c_char_p
    base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    dev = ggml.ggml_backend_dev_by_type(_CPU_DEVICE)
    if not dev:
        return found
    reg = base.ggml_backend_dev_backend_reg(dev)
    fn = base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
    if not fn:
        return found
    get = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)
    array = get(dev)
    i = 0
    while array and array[i]:
        found[base.ggml_backend_buft_name(array[i]).decode("ascii", "replace")] = array[i]
        i += 1
    return found


#: llama.cpp's line for each weight buffer it allocated (``load_tensors:   CPU_REPACK model buffer size = 812.5 MiB``)
BUFFER_LINE = r"load_tensors:\s+(\S+) model buffer size =\s+([0-9.]+) MiB"
#: llama.cpp's count of the layers it assigned to a GPU (``load_tensors: offloaded 31/31 layers to GPU``), written only
#: by a build that can offload (``llama_supports_gpu_offload``). It repeats the request (``min(n_gpu_layers, n_layer
#: + 1)``) even where no GPU device took a layer: the weight buffers are what says where they went.
OFFLOAD_LINE = r"load_tensors: offloaded (\d+)/(\d+) layers to GPU"
#: the way out where layers asked for the GPU run on the CPU (the load's warning, ``devices check``)
OFFLOAD_FIX = ("install a llama-cpp-python built for this machine's GPU (on a Jetson, built with CUDA: README, \"On a "
               "Jetson\"; `edgemed devices check` then reports the layers offloaded), or set n_gpu_layers = 0 in the "
               "device profile")


def extra_buffer_types() -> dict[str, int]:
    """The CPU backend's extra buffer types by name (``AMX``, ``CPU_REPACK``, ...)."""
    return dict(_extra_bufts())


@dataclass
class Placement:
    """How a model's weights are placed: the concrete mode, what keeps the override array alive, and the weight
    buffers llama.cpp reported allocating (``seen``: buffer type -> MiB, read back from its log by ``llamacpp.Model``)."""

    mode: str
    pinned: int = 0
    _keep: object = None
    seen: dict[str, float] | None = None
    #: the layers asked for the GPU (``LoadSettings.n_gpu_layers``: -1 all, 0 none) and whether the build can offload
    #: at all (None: not said, as for a placement made outside a load)
    n_gpu_layers: int = 0
    gpu: bool | None = None
    #: llama.cpp's ``offloaded N/M layers to GPU`` (``OFFLOAD_LINE``), read back by ``llamacpp.Model``
    offloaded: tuple[int, int] | None = None

    def read_log(self, buffer_lines, offload_lines) -> None:
        """Take what llama.cpp's log said of the load: the ``BUFFER_LINE`` and ``OFFLOAD_LINE`` matches
        (``native_log.watch``)."""
        self.seen = {m.group(1): float(m.group(2)) for m in buffer_lines}
        self.offloaded = (int(offload_lines[-1].group(1)), int(offload_lines[-1].group(2))) if offload_lines else None

    def describe(self) -> str:
        if self.mode == "repack":
            said = f"extra buffers: CPU_REPACK only ({self.pinned} weights pinned), no AMX"
        else:
            said = {"all": "extra buffers: all (llama.cpp default)", "none": "extra buffers: none"}[self.mode]
        if self.seen:
            said += "; llama.cpp placed " + ", ".join(f"{name} {mib:.1f} MiB" for name, mib in self.seen.items())
        if (layers := self.layers()) is not None:
            said += f"; {layers}"
        return said

    def device_buffers(self) -> dict[str, float]:
        """The weight buffers llama.cpp reported on a GPU device (``CUDA0``, ``Metal_Mapped``, ...): not the CPU's own
        (``CPU``, ``CPU_Mapped``, ``CPU_REPACK``, ``AMX``) nor a backend's pinned host memory (``CUDA_Host``)."""
        return {name: mib for name, mib in (self.seen or {}).items()
                if not name.startswith(("CPU", "AMX")) and not name.endswith("_Host")}

    def layers(self) -> str | None:
        """Where the layers are, in a few words: ``CPU only: this llama.cpp build cannot offload``, ``every layer on
        the CPU`` and why, or llama.cpp's ``31/31 layers offloaded to the GPU`` with the GPU buffers; None where the
        build was not asked (``gpu`` None) or a GPU build's log said nothing."""
        if self.gpu is None:
            return None
        if not self.gpu:
            return "CPU only: this llama.cpp build cannot offload"
        if not self.n_gpu_layers:
            return "every layer on the CPU (n_gpu_layers = 0)"
        if why := self.offload_unread():
            return f"every layer on the CPU: {why}"
        if self.offloaded is None:
            return None
        on_gpu = ", ".join(f"{name} {mib:.1f} MiB" for name, mib in self.device_buffers().items()) or "no GPU buffer"
        return f"{self.offloaded[0]}/{self.offloaded[1]} layers offloaded to the GPU ({on_gpu})"

    def offload_unread(self) -> str | None:
        """Why the layers asked for the GPU (``n_gpu_layers`` not 0) run on the CPU, or None: the build cannot offload
        (a CPU-only llama-cpp-python, or a CUDA one that found no device), or llama.cpp reported its weight buffers
        and none of them is on a GPU (its ``offloaded`` line counts the layers asked, not the ones placed). None too
        where offload was not asked, or where a GPU build reported nothing (its log was not routed here)."""
        if not self.n_gpu_layers or self.gpu is None:
            return None
        if not self.gpu:
            return "this llama.cpp build cannot offload (llama_supports_gpu_offload() is false)"
        if self.seen and not self.device_buffers():
            placed = ", ".join(f"{name} {mib:.1f} MiB" for name, mib in self.seen.items())
            return f"llama.cpp put none of the weights in a GPU buffer (it allocated {placed})"
        return None

    def unread(self, extra: dict[str, int]) -> str | None:
        """What llama.cpp's own report contradicts in this placement (``extra``: the build's extra buffer types), or
        None: pinned weights that reached no CPU_REPACK buffer, an AMX buffer where the mode keeps AMX off, or an
        extra buffer at all where the mode is ``none``. None too when llama.cpp reported nothing (its log was not
        routed here)."""
        if not self.seen:
            return None
        if self.mode == "repack" and self.pinned and "CPU_REPACK" not in self.seen:
            return f"{self.pinned} weights were pinned to CPU_REPACK and llama.cpp allocated no CPU_REPACK buffer"
        if self.mode in ("repack", "none") and "AMX" in self.seen:
            return f"extra_buffers = \"{self.mode}\" keeps AMX off and llama.cpp allocated an AMX buffer"
        if self.mode == "none" and any(name in self.seen for name in extra):
            return "extra_buffers = \"none\" and llama.cpp allocated an extra buffer"
        return None


def apply(params, path: Path, mode: str, build: Build, max_overrides: int, tensors=None, *, n_gpu_layers: int = 0,
          gpu: bool = False) -> Placement:
    """Set ``use_extra_bufts`` / ``tensor_buft_overrides`` of llama_model_params for ``mode`` (not ``auto``).
    ``n_gpu_layers`` and ``gpu`` (the build offloads to a GPU device): which layers stay on the CPU to be pinned,
    kept in the placement for its read-back (``offload_unread``)."""
    placement = _place(params, path, mode, build, max_overrides, tensors, n_gpu_layers, gpu)
    placement.n_gpu_layers, placement.gpu = n_gpu_layers, gpu
    return placement


def _place(params, path: Path, mode: str, build: Build, max_overrides: int, tensors, n_gpu_layers: int,
           gpu: bool) -> Placement:
    if mode == "all":
        params.use_extra_bufts = True
        return Placement("all")
    params.use_extra_bufts = False
    if mode == "none":
        return Placement("none")
    repack = _extra_bufts().get("CPU_REPACK")
    if not repack:
        return Placement("none")
    if tensors is None:  # the caller had not read the tensor table yet
        from edgemed.formats.gguf_header import read_header

        tensors = read_header(path).tensors
    names = pinned_weights(tensors, build.features, n_gpu_layers, gpu)[: max_overrides - 1]
    if not names:
        return Placement("none")
    array = (_Override * (len(names) + 1))()
    patterns = [f"^{re.escape(name)}$".encode("ascii") for name in names]
    for i, pattern in enumerate(patterns):
        array[i].pattern = pattern
        array[i].buft = repack
    array[len(names)].pattern = None  # the list ends with a NULL pattern
    params.tensor_buft_overrides = ctypes.cast(array, ctypes.c_void_p)
    return Placement("repack", len(names), (array, patterns))
