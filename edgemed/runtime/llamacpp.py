"""The one llama.cpp layer: the only code in edgemed that loads a GGUF model or creates a context.

Raw ``llama_cpp`` bindings -> the thin owners here (``Model``, ``Context``, ``Batch``, ``SamplerChain``,
each freeing its native object in an idempotent ``close()``) -> the run engine, the batcher, the
converters' checks, the benchmarks and the scorer. Parameter structs are built from ``LoadSettings`` here
only, through ``params.Params`` (named fields, read back), so a host setting applies to every load. What only
llama.cpp's log says is read back too (``native_log.watch``): where the weights went (``buffers.Placement``: the
extra buffers, the layers offloaded, ``use_mlock``) and what a context was made with (flash attention, the KV types).
No policy lives here: which settings a model that will compute is loaded with (the host self-test's
verdict) is decided by ``loader.load_model`` above this layer, the one way the rest of edgemed loads one.
``generate`` is the one single-sequence generation loop; the batcher drives the same parts for many.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import re
from pathlib import Path
from typing import Generator

from edgemed import env
from edgemed.constants import FULL_PRECISION_KV, KV_TYPES
from edgemed.errors import InputError, ModelLoadError, NoTokenAllowed, require
from edgemed.runtime import buffers, native_log
from edgemed.runtime.params import Params, load_mode
from edgemed.runtime.engine import Finish, GenerationSettings, LoadSettings, check_fits
from edgemed.runtime.sampling import REPEAT_WINDOW, grammar_text  # the penalty window both backends use
from edgemed.runtime.text_stream import TextStream

log = logging.getLogger(__name__)


def lib():
    """The raw bindings, with llama.cpp's own log routed through edgemed's logging (``native_log``)."""
    llama_cpp = require("llama_cpp", "gguf")
    native_log.install(llama_cpp)
    return llama_cpp


@functools.lru_cache(maxsize=1)
def build() -> buffers.Build:
    """This process's llama.cpp build (its system info line)."""
    return buffers.Build(lib().llama_print_system_info().decode("utf-8", "replace"))


#: llama.cpp's warning when it cannot ``mlock`` a buffer (llama-mmap.cpp), logged where only ``-v`` shows it.
MLOCK_FAILED = r"failed to mlock"
MIB = 1 << 20


def locked_bytes() -> int | None:
    """This process's locked memory (``VmLck``), or None where the kernel does not say (not Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmLck:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def physical_cores(root: Path | str = "/") -> int:
    """Threads that help llama.cpp where no profile says: what a profile's ``"physical"`` resolves to, read by the
    devices module (``detect(root).usable_cores``): physical cores, not SMT siblings, and no more than the CPUs this
    process may use (a container's quota or cpuset, taskset). A container given 2 CPUs on a 64-core host ran 64; an
    arm64 Linux (a Jetson), whose /proc/cpuinfo has no ``core id`` lines, and macOS, which has no /proc/cpuinfo, ran
    half their cores when this layer counted them itself."""
    from edgemed.devices.detect import detect

    return detect(root).usable_cores


class Model:
    """A loaded GGUF model and its vocabulary, with exactly the settings given. ``vocab_only`` loads no
    weights (tokenizer checks). ``tensors``: the file's tensor table when the caller has read it already.
    A model that will compute is loaded through ``loader.load_model``, which consults the self-test first."""

    _markup: frozenset[str] | None = None  # markup_texts(), read once
    _bounds: "tuple[int, re.Pattern | None] | None" = None  # token_bounds(), read once

    def __init__(self, path: Path | str, load: LoadSettings | None = None, *, vocab_only: bool = False,
                 tensors=None):
        env.enforce_offline()
        self.path = Path(path)
        load = load or LoadSettings()
        self.load = load
        lc = self.lib = lib()
        params = self.params = Params(lc.llama_model_default_params())
        params.vocab_only = vocab_only
        params.n_gpu_layers = load.n_gpu_layers
        params.load_mode = load_mode(lc, load)
        mode = buffers.resolve(load.extra_buffers, build())
        self.placement = buffers.apply(params, self.path, mode, build(), lc.llama_max_tensor_buft_overrides(), tensors,
                                       n_gpu_layers=load.n_gpu_layers, gpu=bool(lc.llama_supports_gpu_offload()))
        locked = locked_bytes() if load.use_mlock and not vocab_only else None
        with native_log.watch(buffers.BUFFER_LINE) as seen, native_log.watch(buffers.OFFLOAD_LINE) as offloaded, \
                native_log.watch(MLOCK_FAILED) as refused:
            self.ptr = lc.llama_model_load_from_file(str(self.path).encode("utf-8"), params.raw)
        self.placement.read_log(seen, offloaded)
        if self.ptr and load.use_mlock and not vocab_only:
            self._check_locked(locked, bool(refused))
        if self.ptr and not vocab_only and (wrong := self.placement.unread(buffers.extra_buffer_types())):
            log.warning("the weights of %s are not where edgemed asked: %s (%s).", self.path.name, wrong,
                        self.placement.describe())
        if self.ptr and not vocab_only and (why := self.placement.offload_unread()):
            log.warning("n_gpu_layers = %d asks for %s's layers on a GPU, and %s: every layer runs on the CPU, slower. "
                        "Fix: %s.", load.n_gpu_layers, self.path.name, why, buffers.OFFLOAD_FIX)
        if not self.ptr:
            raise ModelLoadError(
                f"llama.cpp could not load '{self.path}'.",
                "check that the file is a complete GGUF (compare its sha256 with the source), and that the build supports its quant type",
            )
        self.vocab = lc.llama_model_get_vocab(self.ptr)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lc.llama_model_n_ctx_train(self.ptr)
        log.debug("loaded %s: %s", self.path.name, self.placement.describe())

    def _check_locked(self, before: int | None, refused: bool) -> None:
        """``use_mlock`` read back, said at WARNING (llama.cpp's own line shows only at ``-v``): llama.cpp could not
        lock (the locked-memory limit), or the process's locked memory (Linux) grew by less than the host buffers
        llama.cpp reported. It locks the file's buffer, not the copies in its CPU_REPACK or AMX buffers: a Q4_0
        SmolLM2 loaded with the repack had 29 of its 86 MiB locked."""
        after = locked_bytes()
        host = sum(mib for name, mib in self.placement.seen.items() if name.startswith(("CPU", "AMX"))) * MIB
        grew = after - before if before is not None and after is not None else None
        unlocked = host - grew if grew is not None else 0
        if refused:
            log.warning("use_mlock is set, but llama.cpp could not lock %s in memory: the system may page the "
                        "weights out, and the answers after that are slow. Fix: raise the process's locked-memory "
                        "limit (`ulimit -l`, LimitMEMLOCK= in a systemd unit, memlock in limits.conf), or set "
                        "use_mlock = false in the profile.", self.path.name)
        elif grew is not None and unlocked > max(MIB, host // 50):
            copies = sorted(name for name in self.placement.seen if name.startswith(("CPU_REPACK", "AMX")))
            log.warning("use_mlock is set, but %.0f MiB of %s's weights are not locked in memory%s, and the system "
                        "may page them out. Fix: set extra_buffers = \"none\" in the profile to lock them all "
                        "(prompts and decoding run at other speeds: docs/decisions/0018), or use_mlock = false.",
                        unlocked / MIB, self.path.name,
                        f" (llama.cpp locks the file's buffer, not its {' or '.join(copies)} copies)" if copies else "")

    # -- vocabulary ----------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(f"The text is not valid Unicode: {exc.reason} at character {exc.start}.",
                             "send UTF-8 text (no lone surrogates such as \\ud800)") from None
        n = len(raw) + 8
        while True:
            buf = (self.lib.llama_token * n)()
            got = self.lib.llama_tokenize(self.vocab, raw, len(raw), buf, n, add_special, parse_special)
            if got >= 0:
                return list(buf[:got])
            n = -got

    def token_bounds(self) -> "tuple[int, re.Pattern | None]":
        """What ``at_least_tokens`` counts with, read from the vocabulary once: the longest token's bytes, and a
        pattern of the special tokens' texts (control, user-defined, unknown: those llama.cpp matches in a text
        before it splits the rest), longest first; None when the vocabulary has none."""
        if self._bounds is None:
            lc = self.lib
            special = lc.LLAMA_TOKEN_ATTR_CONTROL | lc.LLAMA_TOKEN_ATTR_USER_DEFINED | lc.LLAMA_TOKEN_ATTR_UNKNOWN
            longest, texts = 1, set()
            for t in range(self.n_vocab):
                raw = self.piece(t, special=True)
                longest = max(longest, len(raw))
                if raw and lc.llama_vocab_get_attr(self.vocab, t) & special:
                    texts.add(raw.decode("utf-8", "replace"))
            pattern = re.compile("|".join(re.escape(x) for x in sorted(texts, key=len, reverse=True))) if texts else None
            self._bounds = (longest, pattern)
        return self._bounds

    def at_least_tokens(self, text: str) -> int:
        """A lower bound of the tokens ``tokenize(text, parse_special=True)`` gives, found without tokenizing
        (linear in the text): no token covers more bytes than the longest one, and each special token's text in it
        is a token of its own. llama.cpp's special-token matching slows down faster than the text grows (40,000
        ``<|im_start|>`` took 3.7 s on a Xeon core, 20,000 took 0.7 s), so a text sure not to fit is refused by this
        before it is tokenized."""
        longest, pattern = self.token_bounds()
        n_bytes = len(text.encode("utf-8", "surrogatepass"))
        n_special = sum(1 for _ in pattern.finditer(text)) if pattern is not None else 0
        return max(-(-n_bytes // longest), n_special)

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (maybe part of a UTF-8 character)."""
        buf = ctypes.create_string_buffer(64)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, ids: list[int], special: bool = False) -> str:
        return b"".join(self.piece(t, special) for t in ids).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def special_text(self, token: int) -> str:
        return self.piece(token, special=True).decode("utf-8", "replace") if token >= 0 else ""

    def bos(self) -> int:
        return self.lib.llama_vocab_bos(self.vocab)

    def adds_bos(self) -> bool:
        """Whether ``tokenize(text, add_special=True)`` puts a BOS before the text's tokens (the vocabulary's
        ``add_bos_token``)."""
        return bool(self.lib.llama_vocab_get_add_bos(self.vocab))

    def eos(self) -> int:
        return self.lib.llama_vocab_eos(self.vocab)

    def eog_ids(self) -> list[int]:
        return [t for t in range(self.n_vocab) if self.is_eog(t)]

    def meta(self, key: str) -> str | None:
        return _meta_str(self.lib.llama_model_meta_val_str, self.ptr, key, 1 << 12)

    def markup_texts(self) -> frozenset[str]:
        """The text of the tokens the prompt's tokenizer turns into markup: every control token (``<|im_start|>``,
        ``<|im_end|>``, ...) and every user-defined token the chat template is written with (R1-Distill's
        ``<｜User｜>`` is one: llama.cpp matches those in any text). A message must not hold them
        (``chat_template.refuse_markup``)."""
        if self._markup is None:
            lc, template = self.lib, self.meta("tokenizer.chat_template") or ""
            found = set()
            for t in range(self.n_vocab):
                attr = lc.llama_vocab_get_attr(self.vocab, t)
                if attr & lc.LLAMA_TOKEN_ATTR_CONTROL or attr & lc.LLAMA_TOKEN_ATTR_USER_DEFINED:
                    text = self.special_text(t)
                    if text and (attr & lc.LLAMA_TOKEN_ATTR_CONTROL or text in template):
                        found.add(text)
            self._markup = frozenset(found)
        return self._markup

    def render_chat(self, messages: list[dict]) -> str:
        """The prompt the GGUF's own chat template makes of ``messages`` (sandboxed Jinja, with limits)."""
        from edgemed.runtime.chat_template import refuse_markup, render

        template = self.meta("tokenizer.chat_template")
        if not template:
            raise ModelLoadError(f"'{self.path}' has no chat template.",
                                 "send a raw prompt (--raw, or the completions endpoint), or convert with the tokenizer's chat template")
        refuse_markup(messages, self.markup_texts())
        return render(template, messages, bos_token=self.special_text(self.bos()), eos_token=self.special_text(self.eos()))

    def close(self) -> None:
        ptr, self.ptr = getattr(self, "ptr", None), None
        if ptr:
            self.lib.llama_model_free(ptr)


def _meta_str(read, ptr, key: str, size: int) -> str | None:
    """A GGUF metadata string through one of llama.cpp's ``*_meta_val_str`` calls (None when the key is absent),
    growing the buffer to the length llama.cpp reports."""
    while True:
        buf = ctypes.create_string_buffer(size)
        n = read(ptr, key.encode("utf-8"), buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.value.decode("utf-8", "replace")
        size = n + 1


class Adapter:
    """A GGUF LoRA adapter loaded for one ``Model`` (``llama_adapter_lora_init``): llama.cpp checks its
    architecture and every pair's shape against the model's tensors. Applied per context (``Context.set_adapters``).
    Close it before its model; which adapter belongs on which base is decided above this layer (``loader``)."""

    def __init__(self, model: Model, path: Path | str):
        self.lib = model.lib
        self.model = model
        self.path = Path(path)
        self.ptr = self.lib.llama_adapter_lora_init(model.ptr, str(self.path).encode("utf-8"))
        if not self.ptr:
            raise ModelLoadError(
                f"llama.cpp could not load the LoRA adapter '{self.path}' for '{model.path.name}'.",
                "check that it is a GGUF LoRA adapter made for this base model (`edgemed convert BASE --lora ADAPTER "
                "--adapter-only`); run with -v to see llama.cpp's reason",
            )

    def meta(self, key: str) -> str | None:
        """An adapter metadata value as llama.cpp read it (None when absent)."""
        return _meta_str(self.lib.llama_adapter_meta_val_str, self.ptr, key, 1 << 10)

    def close(self) -> None:
        ptr, self.ptr = getattr(self, "ptr", None), None
        if ptr:
            self.lib.llama_adapter_lora_free(ptr)


#: llama.cpp's lines for a new context that say what it made, read back once per context (one pattern: each line of
#: llama.cpp's log is searched once for it; a context writes some 1,700, most of them its graph's inputs at DEBUG):
#: each KV cache (llama-kv-cache.cpp; a sliding-window model has two, a recurrent one none), ``llama_kv_cache: size =
#: 12.00 MiB (   512 cells,  30 layers,  2/2 seqs), K (q8_0):    6.00 MiB, V (q8_0):    6.00 MiB``, and flash
#: attention (llama-context.cpp, ``llama_flash_attn_type_name``: auto, disabled, enabled), written after llama.cpp
#: overrules the setting (it turns flash attention off for Grok): ``llama_context: flash_attn            = enabled``
CONTEXT_LINE = (r"^llama_(?:kv_cache: size = +[0-9.]+ MiB \(.*\), K \((?P<k>\w+)\): +[0-9.]+ MiB, V \((?P<v>\w+)\): "
                r"+[0-9.]+ MiB|context: flash_attn += (?P<flash_attn>\w+))")


def context_unread(said: dict, load: LoadSettings) -> str | None:
    """What llama.cpp's own lines for a new context (``said``: ``Context.said``) contradict in ``load``'s flash
    attention and KV cache types, or None; None too where it wrote none of them (its log not routed here)."""
    wrong = []
    want = "enabled" if load.flash_attn else "disabled"
    if said["flash_attn"] is not None and said["flash_attn"] != want:
        wrong.append(f"flash_attn {said['flash_attn']} (edgemed set it {want})")
    wrong += [f"a KV cache of K {k} and V {v} (edgemed set K {load.type_k} and V {load.type_v})"
              for k, v in said["kv"] if (k, v) != (load.type_k, load.type_v)]
    return "; ".join(wrong) or None


#: A prompt found whole in the cells still feeds its last REFEED tokens: its logits must come from a piece of
#: several rows, as in a cold run; the last token alone goes through llama.cpp's one-row kernels and its
#: logits differ enough to change greedy text (seen with SmolLM2 Q4_1 on AVX2).
REFEED = 2


class Context:
    """One llama_context: ``n_seq_max`` sequences over ``n_ctx`` cells (one KV stream each unless unified).

    ``prompt_cells``: the token ids of sequence 0's first cells when ``generate`` fed them as prompt rows, which a
    later prompt starting with the same ids keeps instead of computing again (a conversation resends its history
    each turn). Only prompt rows, never the sampled tokens after them: those are computed one row at a time, and a
    later turn resending them as prompt would answer differently from a cold run. Every other call that writes,
    drops or moves sequence 0's cells, or changes the adapters, shortens or empties the list."""

    def __init__(self, model: Model, load: LoadSettings | None = None, *, n_ctx: int | None = None, n_seq_max: int = 1,
                 kv_unified: bool = True, threads: int | None = None, n_batch: int | None = None):
        load = load or model.load
        lc = self.lib = model.lib
        self.model = model
        if load.type_v not in FULL_PRECISION_KV and not load.flash_attn:
            raise ModelLoadError(f"A {load.type_v} V cache needs flash attention, which these settings turn off.",
                                 "set flash_attn = true in the device profile, or keep type_v at f16")
        asked = threads
        threads = threads or load.n_threads or physical_cores()
        p = self.params = Params(lc.llama_context_default_params())
        p.n_seq_max = n_seq_max
        p.kv_unified = kv_unified
        p.n_ctx = n_ctx or load.n_ctx
        p.n_batch = n_batch or load.n_batch
        p.n_ubatch = min(n_batch or load.n_ubatch, p.n_batch)
        p.n_threads = threads
        p.n_threads_batch = asked or load.n_threads_batch or threads
        p.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if load.flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.type_k = KV_TYPES[load.type_k].ggml_id  # by number: llama-cpp-python has no GGML_TYPE_BF16 name
        p.type_v = KV_TYPES[load.type_v].ggml_id
        p.no_perf = True
        with native_log.watch(CONTEXT_LINE) as said:
            self.ptr = lc.llama_init_from_model(model.ptr, p.raw)
        if not self.ptr:
            raise ModelLoadError(
                f"llama.cpp could not create a context of {p.n_ctx} tokens ({n_seq_max} sequences) for '{model.path}'.",
                "use fewer --slots or a smaller --ctx, or a KV cache type the build supports",
            )
        #: what llama.cpp's log said of the context it made: flash attention, and each KV cache's (K, V) types
        flash = [m["flash_attn"] for m in said if m["flash_attn"]]
        self.said = {"flash_attn": flash[-1] if flash else None, "kv": [(m["k"], m["v"]) for m in said if m["k"]]}
        if wrong := context_unread(self.said, load):
            self.close()
            raise ModelLoadError(f"llama.cpp made the context for '{model.path.name}' with {wrong}.",
                                 "set flash_attn, type_k and type_v in the device profile to what this model and "
                                 "build take (run with -v to see llama.cpp's reason)")
        self.memory = lc.llama_get_memory(self.ptr)
        # llama.cpp pads the cells to a multiple of 256 (1,000 asked: 1,024 made): the limit is what was asked, so a
        # model planned at its whole trained context never reads positions past it
        self.n_ctx = min(lc.llama_n_ctx(self.ptr), p.n_ctx)
        self.n_batch = lc.llama_n_batch(self.ptr)
        self.n_ubatch = lc.llama_n_ubatch(self.ptr)
        self.n_ctx_seq = min(lc.llama_n_ctx_seq(self.ptr), max(1, p.n_ctx // n_seq_max))
        self._batch: Batch | None = None
        self.adapters: tuple = ()  # (Adapter, scale) pairs applied to this context (set_adapters)
        self.prompt_cells: list[int] = []
        if 0 < model.n_ctx_train < self.n_ctx_seq:  # llama.cpp's own warning is only in its log (-v)
            log.warning("The context (%d tokens a sequence) is longer than '%s' was trained on: answers past %d tokens "
                        "may degrade; use --ctx %d or less.", self.n_ctx_seq, model.path.name, *[model.n_ctx_train] * 2)

    def set_adapters(self, adapters: "list[tuple[Adapter, float]]") -> None:
        """Apply these ``(adapter, scale)`` pairs to every later decode of this context (none: the bare model).
        llama.cpp keeps the set and has no getter for it, so it is kept here too (``self.adapters``)."""
        items = list(adapters)
        arr = (self.lib.llama_adapter_lora_p_ctypes * max(1, len(items)))(*[a.ptr for a, _ in items])
        scales = (ctypes.c_float * max(1, len(items)))(*[float(s) for _, s in items])
        rc = self.lib.llama_set_adapters_lora(self.ptr, arr if items else None, len(items), scales if items else None)
        if rc != 0:
            raise ModelLoadError(f"llama.cpp refused the LoRA adapters {[a.path.name for a, _ in items]} on this context "
                                 f"(code {rc}).", "load the adapters for the model this context was made from")
        self.adapters = tuple((a, float(s)) for a, s in items)
        self.prompt_cells = []  # computed under the adapters before

    def decode(self, batch: "Batch") -> int:
        self.prompt_cells = []  # a batch of any sequences and positions
        return self.lib.llama_decode(self.ptr, batch.raw)

    def decode_unless(self, batch: "Batch", stop) -> int:
        """``decode``, given up as soon as ``stop()`` is true: llama.cpp's CPU backend asks its abort callback
        before each node of the graph, and a call given up returns 2 with the cells of the micro-batch it was in
        removed, those of the micro-batches it finished before kept (llama.h: "processed ubatches will remain"; the
        caller trims them); a backend that takes
        no abort callback runs the call through (not checked on a GPU). Only for work that can be done again later
        (the batcher's idle calls): the callback takes the interpreter lock once a node, so it is set for this call
        alone and cleared after it."""
        self.prompt_cells = []
        callback = self.lib.ggml_abort_callback(lambda _data: bool(stop()))
        self.lib.llama_set_abort_callback(self.ptr, callback, None)
        try:
            return self.lib.llama_decode(self.ptr, batch.raw)
        finally:
            self.lib.llama_set_abort_callback(self.ptr, self.lib.ggml_abort_callback(), None)  # a NULL callback

    def logits(self, index: int = -1):
        """A copy of the logits at batch row ``index`` (-1: the last row that asked for logits)."""
        import numpy as np

        ptr = self.lib.llama_get_logits_ith(self.ptr, index)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def eval(self, tokens: list[int], n_past: int = 0, *, seq: int = 0, all_rows: bool = False):
        """Feed ``tokens`` at positions ``n_past...``; logits of every row (n x vocab) or of the last (1 x vocab)."""
        import numpy as np

        if self._batch is None:
            self._batch = Batch(self.lib, self.n_batch)
        if seq == 0:
            del self.prompt_cells[n_past:]  # written again from here (``generate`` lists the prompt's rows after)
        batch, rows = self._batch, []
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            batch.clear()
            last = start + len(chunk) == len(tokens)
            for i, token in enumerate(chunk):
                batch.add(token, n_past + start + i, seq, all_rows or (last and i == len(chunk) - 1))
            rc = self.lib.llama_decode(self.ptr, batch.raw)
            if rc != 0:
                if seq == 0:
                    del self.prompt_cells[n_past:]
                raise ModelLoadError(f"llama_decode returned {rc} for {len(chunk)} tokens at position {n_past + start}.",
                                     "use a larger context (--ctx), or fewer tokens")
            if all_rows:
                rows.extend(self.logits(i) for i in range(len(chunk)))
        if not all_rows:
            rows.append(self.logits(-1))
        return np.stack(rows).astype(np.float32, copy=False)

    def drop(self, seq: int) -> None:
        """Forget every cell of sequence ``seq`` (its slot is free again)."""
        if seq == 0:
            self.prompt_cells = []
        self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def trim(self, seq: int, n: int) -> bool:
        """Remove the cells of ``seq`` from position ``n`` on, keeping its first ``n``; False (nothing
        removed) where the memory cannot drop a suffix (recurrent state), other sequences untouched."""
        done = bool(self.lib.llama_memory_seq_rm(self.memory, seq, n, -1))
        if seq == 0 and done:
            del self.prompt_cells[n:]
        return done

    def clear(self) -> None:
        self.prompt_cells = []
        self.lib.llama_memory_clear(self.memory, True)

    def reusable(self, tokens: list[int]) -> int:
        """How many of ``tokens``' first cells sequence 0 holds as a cold run of ``tokens`` would compute them: the
        ids shared with ``prompt_cells`` (leaving at least ``REFEED`` to feed again), down to a whole number of
        llama.cpp's micro-batches (``reuse_unit``)."""
        cells, n, end = self.prompt_cells, 0, min(len(self.prompt_cells), len(tokens) - REFEED)
        while n < end and cells[n] == tokens[n]:
            n += 1
        return n - n % self.reuse_unit

    @property
    def reuse_unit(self) -> int:
        """The cells a kept prompt is reused by. A cold run feeds a prompt from position 0 in micro-batches of
        ``n_ubatch`` rows (within ``n_batch`` pieces), and a row's K and V depend, in the last bits, on the
        micro-batch it was computed in (llama.cpp's CPU kernels take rows in groups, the rest one by one): reused
        cells that a micro-batch of another size computed made Qwen2.5-1.5B Q4_K_M answer differently at a
        conversation's third or fourth turn. Kept whole micro-batches from position 0 on, and fed from a boundary,
        every row is computed as the cold run computes it."""
        return self.n_ubatch if self.n_batch % self.n_ubatch == 0 else self.n_batch

    def copy_seq(self, src: int, dst: int, n: int) -> bool:
        """Give sequence ``dst`` the first ``n`` cells of ``src`` (its own cells go). Between KV streams llama.cpp
        copies the whole stream buffer (ranges are refused there), deferred to the next decode's memory update,
        so ``dst`` is trimmed to ``n`` after; False where that trim fails (``dst`` is then emptied)."""
        if dst == 0:
            self.prompt_cells = []
        self.lib.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
        if self.lib.llama_memory_seq_rm(self.memory, dst, n, -1):
            return True
        self.drop(dst)
        return False

    def seq_state_size(self, seq: int) -> int:
        """Bytes ``save_seq`` would hold for sequence ``seq`` (llama.cpp's own count), computed before any is built."""
        return int(self.lib.llama_state_seq_get_size(self.ptr, seq))

    def save_seq(self, seq: int) -> bytearray:
        """Sequence ``seq``'s KV cells (positions and K/V rows) as llama.cpp's per-sequence state, in host memory:
        one buffer of llama.cpp's own count (``seq_state_size``) that it writes into, nothing copied after. Empty
        where llama.cpp reports writing another number of bytes than that count (a state cut short is no state)."""
        size = self.seq_state_size(seq)
        data = bytearray(size)
        if size and self.lib.llama_state_seq_get_data(self.ptr, (ctypes.c_uint8 * size).from_buffer(data), size,
                                                      seq) == size:
            return data
        return bytearray()

    def restore_seq(self, seq: int, data: bytearray) -> bool:
        """Put a ``save_seq`` state into sequence ``seq`` (any sequence of this context: its own cells go first),
        read by llama.cpp from ``data`` itself (no copy: the caller keeps it); False (``seq`` emptied) where
        llama.cpp does not read it whole (not enough free cells)."""
        if seq == 0:
            self.prompt_cells = []
        size = len(data)
        if size and self.lib.llama_state_seq_set_data(self.ptr, (ctypes.c_uint8 * size).from_buffer(data), size,
                                                      seq) == size:
            return True
        self.drop(seq)
        return False

    def keep(self, n: int, seq: int = 0) -> int:
        """Keep the first ``n`` cells of ``seq``; returns how many are kept (0 where a suffix cannot be dropped)."""
        if n and self.lib.llama_memory_seq_rm(self.memory, seq, n, -1):
            if seq == 0:
                del self.prompt_cells[n:]
            return n
        self.clear()
        return 0

    def close(self) -> None:
        batch, self._batch = getattr(self, "_batch", None), None
        if batch is not None:
            batch.close()
        ptr, self.ptr = getattr(self, "ptr", None), None
        if ptr:
            self.lib.llama_free(ptr)


class Batch:
    """A llama_batch of up to ``capacity`` tokens, each in exactly one sequence."""

    def __init__(self, lc, capacity: int):
        self.lib = lc
        self.capacity = capacity
        self.raw = lc.llama_batch_init(capacity, 0, 1)
        self.n = 0
        self.raw.n_tokens = 0

    def clear(self) -> None:
        self.n = self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append one token; returns its index in the batch (the index its logits are read from)."""
        i = self.n
        b = self.raw
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits
        self.n = b.n_tokens = i + 1
        return i

    def close(self) -> None:
        raw, self.raw = getattr(self, "raw", None), None
        if raw is not None:
            self.lib.llama_batch_free(raw)


def _token_data_dtype(lc):
    """The numpy record ``_pick`` fills for llama.cpp to read as ``llama_token_data``, checked field by field
    (name, offset, width) against the bindings' structure: a layout that moved is an error here, not candidates
    read from the wrong bytes."""
    import numpy as np

    dtype = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
    struct = lc.llama_token_data
    fields = [(name, getattr(struct, name).offset, ctypes.sizeof(kind)) for name, kind in struct._fields_]
    ours = [(name, dtype.fields[name][1], dtype.fields[name][0].itemsize) for name in dtype.names]
    if fields != ours or ctypes.sizeof(struct) != dtype.itemsize:
        raise RuntimeError(f"llama_token_data is laid out as {fields} ({ctypes.sizeof(struct)} bytes) in this "
                           f"llama-cpp-python; edgemed fills {ours} ({dtype.itemsize} bytes)")
    return dtype


class SamplerChain:
    """One request's sampler: grammar, repetition penalty, then greedy or top-k/top-p/min-p/temperature/seeded draw.

    The order is llama.cpp's (and runtime/sampling.py's), so every path samples alike.
    """

    def __init__(self, model: Model, settings: GenerationSettings):
        lc = self.lib = model.lib
        self.ptr = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        try:
            gbnf = grammar_text(settings)
            if gbnf is not None:
                with native_log.stderr_silenced():  # its parser prints a grammar it rejects, whole, to stderr
                    grammar = lc.llama_sampler_init_grammar(model.vocab, gbnf.encode("utf-8"), b"root")
                if not grammar:
                    raise InputError("The grammar does not parse (llama.cpp rejected it).",
                                     "check the GBNF syntax; the start rule must be called 'root'")
                self._add(grammar)
            self._vocab_size = model.n_vocab
            shaped = self._shape(model, settings)
            if settings.temperature == 0:
                self._add(lc.llama_sampler_init_greedy())
                # nothing before greedy and nothing stateful: the chain's pick is the first maximal logit
                self._n_vocab = model.n_vocab if gbnf is None and not shaped else 0
                return
            if settings.top_k > 0:
                self._add(lc.llama_sampler_init_top_k(settings.top_k))
            if settings.top_p < 1.0:
                self._add(lc.llama_sampler_init_top_p(settings.top_p, 1))
            if settings.min_p > 0:
                self._add(lc.llama_sampler_init_min_p(settings.min_p, 1))
            self._add(lc.llama_sampler_init_temp(settings.temperature))
            self._add(lc.llama_sampler_init_dist(settings.seed))  # a fixed seed, as taken (``engine.check_seed``)
        except BaseException:
            self.close()
            raise

    def _shape(self, model: Model, settings: GenerationSettings) -> bool:
        """The stages between the grammar and the pick (here the repetition penalty); True when any was added.
        A subclass adds its own in llama.cpp's order (the server's logit bias and OpenAI penalties)."""
        if settings.repeat_penalty == 1.0:
            return False
        self._add(self.lib.llama_sampler_init_penalties(model.n_vocab, REPEAT_WINDOW, settings.repeat_penalty, 0.0, 0.0))
        return True

    def _add(self, sampler) -> None:
        self.lib.llama_sampler_chain_add(self.ptr, sampler)  # the chain owns it from here

    _n_vocab = 0  # set when the chain is plain greedy (see sample)
    _candidates = None  # the candidate array ``_pick`` fills, made at its first use

    def sample(self, ctx: Context, index: int) -> int:
        """Pick the next token from the logits at batch ``index`` (and let the chain accept it).

        A plain greedy chain is an argmax over the logits row, read in place: the same token as
        ``llama_sampler_sample`` (which takes the first maximal logit too) without building its
        candidate array of the whole vocabulary (0.26 ms a row on Qwen's 151,936 tokens, most of a
        serving step's time outside ``llama_decode``). Any other chain goes through ``_pick``."""
        if self._n_vocab:
            import numpy as np

            return int(np.ctypeslib.as_array(self._row(ctx, index), shape=(self._n_vocab,)).argmax())
        return self._pick(ctx, index)

    def _row(self, ctx: Context, index: int):
        row = self.lib.llama_get_logits_ith(ctx.ptr, index)
        if not row:  # llama.cpp has no logits for that row: an error, not a read through NULL
            raise RuntimeError(f"llama.cpp returned no logits for batch row {index}")
        return row

    def _pick(self, ctx: Context, index: int) -> int:
        """``llama_sampler_sample`` (its CPU path: edgemed sets no backend sampler) with a check between the
        chain's apply and its accept: when the chain left no token possible (a grammar no token can continue,
        or one whose every next token a -100 logit bias bans), llama.cpp would still pick one and its grammar
        would then abort the process. Here it is ``NoTokenAllowed`` for this request alone."""
        import math

        import numpy as np

        lc, n = self.lib, self._vocab_size
        if self._candidates is None:  # llama_token_data: int32 id, float logit, float p
            self._candidates = np.zeros(n, dtype=_token_data_dtype(lc))
            self._ids = np.arange(n, dtype=np.int32)
        cur = self._candidates
        cur["id"] = self._ids  # every call: stages that sort (top-k) reorder the array in place
        cur["logit"] = np.ctypeslib.as_array(self._row(ctx, index), shape=(n,))
        cur["p"] = 0.0
        array = lc.llama_token_data_array(ctypes.cast(cur.ctypes.data, ctypes.POINTER(lc.llama_token_data)), n, -1,
                                          False)
        lc.llama_sampler_apply(self.ptr, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise RuntimeError(f"llama.cpp's sampler selected candidate {array.selected} of {array.size}")
        chosen = array.data[array.selected]
        if not math.isfinite(chosen.logit):
            raise NoTokenAllowed(
                "No token is allowed at this point of the answer: the request's grammar (its grammar, "
                "response_format or tools) and its logit_bias leave nothing the model may write next.",
                "remove the -100 logit_bias on tokens the format needs, or loosen the grammar")
        lc.llama_sampler_accept(self.ptr, chosen.id)
        return int(chosen.id)

    def close(self) -> None:
        ptr, self.ptr = getattr(self, "ptr", None), None
        if ptr:
            self.lib.llama_sampler_free(ptr)


class Detokenizer:
    """ids -> text for ``TextStream``, appending only the new tokens' bytes (cost per token does not grow)."""

    def __init__(self, model: Model):
        self.model = model
        self.buf = bytearray()
        self.n = 0

    def __call__(self, ids: list[int]) -> str:
        for tok in ids[self.n:]:
            self.buf += self.model.piece(tok)
        self.n = len(ids)
        return self.buf.decode("utf-8", "replace")


def generate(model: Model, ctx: Context, tokens: list[int], settings: GenerationSettings,
             reuse: bool = True) -> Generator[str, None, Finish]:
    """Stream the continuation of ``tokens`` in sequence 0 of ``ctx``: text pieces, stop strings held back; returns
    how it ended (``Finish``: the tokens sampled, and whether an end-of-generation token, a stop string or
    ``max_tokens`` ended it). The cells before stay where they hold the prompt's first ids as prompt rows, in whole
    micro-batches (``Context.reusable``: a conversation's earlier turns, a template's preamble), and only the rest is
    fed, so the answer is the one a cold run gives; ``reuse=False``: every token is fed (the cells are cleared
    first). Each sampled token is fed only for the next one's logits: the last is never fed (a decode whose logits
    no one reads), so the cells end before it, and nothing continues from them (a next call keeps prompt rows only)."""
    if not tokens:
        raise InputError("The prompt is empty.", "send at least one token of prompt")
    check_fits(len(tokens), settings, ctx.n_ctx)
    sampler = SamplerChain(model, settings)
    text = TextStream(Detokenizer(model), settings.stop)
    try:
        n = ctx.reusable(tokens) if reuse else 0
        if not (n and ctx.trim(0, n)):  # a memory that cannot drop a suffix (recurrent state) starts again
            ctx.clear()
            n = 0
        if n:
            log.debug("prompt: %d of %d tokens kept from the previous call", n, len(tokens))
        ctx.eval(tokens[n:], n)
        ctx.prompt_cells = list(tokens)  # after the last piece: several rows each (REFEED)
        pos, reason = len(tokens), "length"
        for i in range(settings.max_tokens):
            token = sampler.sample(ctx, -1)
            if model.is_eog(token):
                reason = "eog"
                break
            piece = text.push(token)
            if piece:
                yield piece
            if text.stopped:
                return Finish("stop", len(text.ids))
            if i + 1 == settings.max_tokens or pos >= ctx.n_ctx:  # no token follows: its logits would go unread
                break
            ctx.eval([token], pos)
            pos += 1
        rest = text.flush()
        if rest:
            yield rest
        return Finish(reason, len(text.ids))
    finally:
        sampler.close()
