"""Will this conversion fit in memory? Each route's peak, estimated from config.json before any work starts.

A route runs its steps one after another, so its peak is ``base`` (interpreter, libraries, vocabulary) plus its
largest step; a step is a sum of terms that follow from the checkpoint's shape (``Dims``), the source dtype and
the output type (the module docstrings of the steps say what each holds):

* GGUF ``write``: tensors stream from mapped shards; a cast copy of the largest (and its float32 LoRA merge);
* ``quantize``: llama.cpp works in slabs of at most ``quantize.MAX_BUF_BYTES``, a tensor mapped at a time;
* ``imatrix`` and every ``parity`` reference: one decoder layer at a time (``layered.estimate_peak_bytes``); the
  imatrix first reads at most ``imatrix.TEXT_BYTES`` of its calibration text and tokenizes it;
* ``parity``: then the artifact beside the source logits (llama.cpp: the planner's repacked copy, KV cache and
  compute; ONNX Runtime: the session), then the comparison of both logits in float64;
* ONNX ``export``: the float32 model plus the exporter's copies (or onnxruntime-genai's builder process);
  ``quantize``: the float32 graph and the quantizer's copy.

File-backed pages (mapped safetensors, the float intermediate llama.cpp quantizes, the GGUF parity maps, the
libraries' code) count in RSS, but the kernel can drop them and read them again: the estimate reports them as
``mapped`` and the budget does not count them. The budget is what this process holds plus what it can still
get (psutil's available memory, or less under a cgroup limit), or ``--memory-budget`` /
``$EDGEMED_MEMORY_BUDGET``. The factors were measured with ``python -m edgemed.benchmarks.convert_memory``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from edgemed import env
from edgemed.constants import DEFAULT_OUTPUT_TYPE
from edgemed.converters.gguf.calibration import IMATRIX_BY_DEFAULT, TEXT_BYTES, default_imatrix
from edgemed.converters.budget.memory_room import Budget, detect_budget
from edgemed.errors import InputError

MIB, GIB = 1 << 20, 1 << 30
#: Names the estimates' model of memory where a result records one (``Estimate.to_dict``, benchmarks/convert_memory's
#: JSON); bump when a term or a factor changes.
METHOD = "convert-budget/1"
DTYPE_BYTES = {"F32": 4, "F64": 8, "F16": 2, "BF16": 2}
OUT_BYTES = {"f32": 4, "f16": 2, "bf16": 2}  # float GGUF types; quantized ones go through an F16/BF16 intermediate (F32 past F16)
#: Bits per weight of each GGUF type as llama.cpp's mixes write them (Q4_K_M keeps some tensors at Q6_K).
GGUF_BPW = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q4_0": 4.5, "q4_k_m": 5.0, "q5_k_m": 5.75, "auto": 8.5}
#: Share of the blocks' weights in Q4_0 / Q4_K (4.5 bpw), which get a repacked copy on CPU (planner.REPACKED_TYPES):
#: Q4_K_M gives some attn_v / ffn_down Q6_K.
REPACKED = {"q4_0": 1.0, "q4_k_m": 0.85, "auto": 1.0}

# -- measured (benchmarks/results/convert_memory-*.json) --------------------------------------------------------
BASE_GGUF = 300 * MIB     # python + torch + gguf + llama.cpp imported, checkpoint opened (inspect step) ...
BASE_ONNX = 300 * MIB     # ... (or onnx + onnxruntime) ...
VOCAB_PER_TOKEN = 200     # ... + the vocabulary plan_vocab holds from then on (token lists)
LIBS_MAPPED = 150 * MIB   # the libraries' code: file-backed pages
QUANT_EXTRA = 64 * MIB    # llama.cpp quantize beside its slabs (output metadata, threads)
REF_LIBS = 100 * MIB      # transformers' model code imported by the reference
TOKENIZER_PER_TOKEN = 1000  # the reference's HF tokenizer
PARITY_POSITIONS = 220    # converters.quality.prompts.token_lists: 217 tokens with SmolLM2's tokenizer, 209 with Qwen2.5's
PARITY_LONGEST = 70       # ... 67 in the longest prompt (the chat)
IMATRIX_TOKENS, IMATRIX_LONGEST = 32 * 256, 256  # imatrix.MAX_CHUNKS x CHUNK_TOKENS, one chunk at a time
TEXT_COPIES = 4           # the calibration text's passages (at most imatrix.TEXT_BYTES read; up to 4 bytes a character)
TOKENIZE_PER_BYTE = 400   # the HF fast tokenizer encoding it whole, per byte: 384 measured on random ASCII with a
                          # 384-token vocabulary (a token a byte, the worst case), 291 on prose (the joined text aside)
AUTO_PASSAGE_TOKENS = 1024  # --quant auto: the longest search passage llama.cpp evaluates at once (assumed)
COMPARE_COPIES = 2        # parity.compare: both logit sets held in float32 ...
COMPARE_PROMPT_COPIES = 8  # ... and a block of one prompt's rows in float64 (casts, difference, log-softmax of both)
COMPARE_ROWS = 40         # ... that block's rows (parity.COMPARE_ROWS)
PROTOBUF_LIMIT = 2 * GIB  # torch.onnx builds a graph under this in memory; a larger one goes to external data
EXPORT_COPIES_SMALL = 5.0  # torch.onnx.export, graph < 2 GiB: model + folded constants + proto + bytes (x fp32)
EXPORT_COPIES_LARGE = 2.0  # ... > 2 GiB: tensors written as external data
ONNX_QUANT_COPIES = 2.0   # MatMulNBitsQuantizer: the fp32 graph + its working copy (x fp32)
ORT_FP32 = 1.2            # ONNX Runtime session on the fp32 graph (x graph bytes; part of it mapped)
ORT_INT4 = 1.8            # ... on the int4 graph: MatMulNBits weights + their pre-packed copies
GENAI_COPIES = 2.0        # onnxruntime-genai's builder: HF model + the graph it builds (x fp32)


@dataclass(frozen=True)
class Dims:
    """A decoder's shape: Llama-style attention, gated MLP, embedding, optional untied head."""

    n_layer: int
    hidden: int
    n_head: int
    n_kv: int
    head_dim: int
    ffn: int
    vocab: int
    params: int   # every weight's elements
    largest: int  # elements of the largest tensor (the embedding, or an FFN projection)
    tied: bool    # the LM head is the embedding
    config: dict = field(compare=False, repr=False, default_factory=dict)

    @classmethod
    def from_config(cls, config: dict, tensors: dict | None = None) -> "Dims":
        """From config.json alone (parameters by arithmetic, biases left out: < 0.01 %), or with the checkpoint's
        tensor table (``Checkpoint.tensors``: exact counts)."""
        def need(key, default=None):
            value = config.get(key) or default
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"config.json lacks a positive integer '{key}' (needed to size the conversion).",
                                 "re-export the config with save_pretrained()")
            return value

        n_layer, hidden, n_head, vocab = (need(k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"))
        n_kv, head_dim = need("num_key_value_heads", n_head), need("head_dim", hidden // n_head)
        ffn = need("intermediate_size", 4 * hidden if tensors else None)
        tied = bool(config.get("tie_word_embeddings"))
        if tensors:
            sizes = [math.prod(ref.shape) for ref in tensors.values()]
            params, largest, tied = sum(sizes), max(sizes), not any(n.endswith("lm_head.weight") for n in tensors)
        else:
            layer = 2 * hidden * head_dim * (n_head + n_kv) + 3 * hidden * ffn + 2 * hidden
            params = vocab * hidden * (1 if tied else 2) + n_layer * layer + hidden
            largest = max(vocab * hidden, hidden * ffn, hidden * n_head * head_dim)
        return cls(n_layer, hidden, n_head, n_kv, head_dim, ffn, vocab, params, largest, tied, config)

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    mapped: bool = False  # file-backed: in RSS, but the kernel can drop it; not counted against the budget


@dataclass(frozen=True)
class Step:
    name: str  # the report's step name (timings_s), ":part" for a step's consecutive parts
    terms: tuple[Term, ...]

    @property
    def resident(self) -> int:
        return sum(t.bytes for t in self.terms if not t.mapped)


@dataclass(frozen=True)
class Estimate:
    """A route's predicted peak: ``base`` plus its largest step."""

    route: str
    base: int
    steps: tuple[Step, ...]

    @property
    def peak_step(self) -> Step:
        return max(self.steps, key=lambda s: s.resident)

    @property
    def resident(self) -> int:
        return self.base + self.peak_step.resident

    @property
    def mapped(self) -> int:
        """File-backed pages a step maps at most (the libraries' code included): in RSS, not in the budget."""
        return LIBS_MAPPED + max(sum(t.bytes for t in s.terms if t.mapped) for s in self.steps)

    @property
    def rss(self) -> int:
        """The highest RSS expected, mapped pages included (what ``VmHWM`` will show)."""
        return LIBS_MAPPED + self.base + max(sum(t.bytes for t in s.terms) for s in self.steps)

    @property
    def biggest(self) -> str:
        term = max((t for t in self.peak_step.terms if not t.mapped), key=lambda t: t.bytes)
        return f"{term.name}, {term.bytes / GIB:.1f} GiB, in step '{self.peak_step.name}'"

    def phase_bytes(self, name: str) -> int | None:
        """Predicted resident bytes while step ``name`` runs (base included), or None for a step this route lacks."""
        parts = [s.resident for s in self.steps if s.name.split(":")[0] == name]  # "parity:reference", "parity:artifact", ...
        return self.base + max(parts) if parts else None

    def to_dict(self) -> dict:
        return {"method": METHOD, "route": self.route, "resident": self.resident, "mapped": self.mapped, "rss": self.rss,
                "base": self.base, "biggest": self.biggest, "steps": {s.name: {t.name: t.bytes for t in s.terms} for s in self.steps}}


# -- the estimates --------------------------------------------------------------------------------------------------
def reference_terms(dims: Dims, n_positions: int, longest: int, *, src: int, lora: bool, logits: bool) -> tuple[Term, ...]:
    """The Hugging Face reference (parity, imatrix): one decoder layer at a time (``layered.py``)."""
    from edgemed.converters.quality.layered import estimate_peak_bytes

    held = estimate_peak_bytes(dims.config, n_positions, longest=longest, source_bytes=src, lora=lora, logits=logits)
    return (Term("HF reference, one layer at a time (layered.estimate_peak_bytes)", held),
            Term("transformers' model code and tokenizer", REF_LIBS + dims.vocab * TOKENIZER_PER_TOKEN))


def _logits(dims: Dims, copies: float, what: str) -> Term:
    return Term(what, int(PARITY_POSITIONS * dims.vocab * 4 * copies))


def _parity(dims: Dims, src: int, lora: bool, artifact: tuple[Term, ...], prefix: str) -> list[Step]:
    """A parity step's three parts: the reference's logits, the artifact's (beside them), the comparison."""
    ref = reference_terms(dims, PARITY_POSITIONS, PARITY_LONGEST, src=src, lora=lora, logits=True)
    source = _logits(dims, 1, "source logits")
    return [Step(f"{prefix}:reference", ref), Step(f"{prefix}:artifact", (ref[1], source, *artifact)),
            Step(f"{prefix}:compare", (Term("transformers' model code", REF_LIBS),
                                       _logits(dims, COMPARE_COPIES, "both logits in float32 (compare)"),
                                       Term("one prompt's logits in float64 (compare)",
                                            min(PARITY_LONGEST, COMPARE_ROWS) * dims.vocab * 8 * COMPARE_PROMPT_COPIES)))]


def _llama_load(dims: Dims, out_type: str, n_ctx: int, *, repack: bool = True) -> tuple[Term, ...]:
    """llama.cpp holding a converted GGUF (mmap on: the planner's repacked copy unless ``repack`` is off -- parity
    loads with extra_buffers "none" -- KV cache, compute, every row's logits)."""
    from edgemed.runtime.plan import RUNTIME_BASE, ModelShape, estimate

    weights = int(dims.params * GGUF_BPW[out_type] / 8)
    blocks = dims.params - dims.embed_params * (1 if dims.tied else 2)  # the head stays Q6_K: not repacked
    repackable = int(blocks * REPACKED.get(out_type, 0) * 4.5 / 8) if repack else 0
    shape = ModelShape(arch="", n_layer=dims.n_layer, n_embd=dims.hidden, n_head=dims.n_head, n_head_kv=dims.n_kv,
                       head_dim_k=dims.head_dim, head_dim_v=dims.head_dim, n_ff=dims.ffn, n_vocab=dims.vocab,
                       n_ctx_train=1 << 20, weights_bytes=weights, repackable_bytes=repackable)
    est = estimate(shape, n_ctx, n_ubatch=n_ctx, use_mmap=True)  # CPU, mmap on: repacked tensors get a copy
    held = est.total - est.weights - RUNTIME_BASE + n_ctx * dims.vocab * 4  # + every row's logits
    return (Term("llama.cpp: the converted model (" + ("repacked copy, " if repack else "") + "KV cache, compute, logits)", held),
            Term("llama.cpp: the mapped GGUF", weights, mapped=True))


def estimate_gguf(dims: Dims, *, out_type: str, parity: bool = True, imatrix: bool = False, lora_bytes: int = 0,
                  source_dtype: str = "BF16", source_bytes: int | None = None) -> Estimate:  # source_bytes: as ONNX's
    """``convert --to gguf``: write (+ imatrix, quantize for quantized types), tokenizer check, parity."""
    from edgemed.converters.gguf.quantize import MAX_BUF_BYTES  # llama.cpp quantizes in slabs of at most this

    src = DTYPE_BYTES.get(source_dtype, 4)
    quantized = out_type not in OUT_BYTES
    float_bytes = 2 if quantized else OUT_BYTES[out_type]
    same = (quantized and source_dtype == "BF16") or out_type == source_dtype.lower()  # no cast copy
    copy = 0 if same else float_bytes
    if quantized and source_dtype == "F64":  # an F16 intermediate a weight overflows is written again as F32
        copy = 4                             # (pipeline._write_intermediate): an F64 source's copy is then wider
    cast = dims.largest * (copy + (4 if lora_bytes else 0))
    steps = [Step("write", (Term("largest tensor's cast copy", cast),  # safetensors hands out mapped tensors
                            Term("largest tensor, mapped", dims.largest * src, mapped=True)))]
    if imatrix:
        ref = reference_terms(dims, IMATRIX_TOKENS, IMATRIX_LONGEST, src=src, lora=bool(lora_bytes), logits=False)
        read = f"calibration text, at most {TEXT_BYTES >> 10} KiB read"
        steps += [Step("imatrix:text", (ref[1], Term(f"{read}, joined and tokenized whole",
                                                     TEXT_BYTES * (2 * TEXT_COPIES + TOKENIZE_PER_BYTE)))),
                  Step("imatrix", (*ref, Term(f"{read}: its passages", TEXT_BYTES * TEXT_COPIES)))]
    if quantized:
        slab = (Term("llama.cpp quantize slab buffers", min(dims.largest * 8, MAX_BUF_BYTES) + QUANT_EXTRA),
                Term("the mapped float intermediate, a tensor at a time", dims.largest * float_bytes, mapped=True))
        steps.append(Step("quantize", slab) if out_type != "auto" else  # --quant auto: candidates measured by llama.cpp
                     Step("auto_quant", (slab[0], *_llama_load(dims, out_type, AUTO_PASSAGE_TOKENS))))
    steps.append(Step("tokenizer_check", (Term("HF tokenizer + llama.cpp vocabulary", dims.vocab * TOKENIZER_PER_TOKEN),)))
    if parity:
        steps += _parity(dims, src, bool(lora_bytes), _llama_load(dims, out_type, PARITY_LONGEST + 8, repack=False), "parity")
    plain = not imatrix and out_type in IMATRIX_BY_DEFAULT  # calibrated by default, and turned off
    what = f"convert --to gguf --quant {out_type}" + (" --no-imatrix" if plain else "") + ("" if parity else " --no-parity")
    return Estimate(what, BASE_GGUF + dims.vocab * VOCAB_PER_TOKEN, tuple(steps))


def estimate_adapter(dims: Dims, *, base_type: str | None, parity: bool = True, lora_bytes: int = 0,
                     source_dtype: str = "BF16", source_bytes: int | None = None) -> Estimate:
    """``convert --lora A --adapter-only``: the adapter file (built whole in memory, ``gguf/adapter.py``), then its
    gate: the base GGUF (``base_type`` None: an F16 one written here first, as ``estimate_gguf`` writes one; else the
    type of the ``--base`` given) loaded by llama.cpp with the adapter applied, against the HF reference with the
    adapter merged."""
    src = DTYPE_BYTES.get(source_dtype, 4)
    steps = [Step("write", (Term("the adapter's tensors and the file built from them", 2 * lora_bytes),))]
    if parity:
        if base_type is None:
            made = estimate_gguf(dims, out_type="f16", parity=False, source_dtype=source_dtype)
            steps += [Step("base", s.terms) for s in made.steps if s.name == "write"]
        # llama.cpp copies the adapter's tensors into its own buffer (not mapped)
        adapter = Term("llama.cpp: the LoRA adapter applied at run time", lora_bytes)
        weights = base_type if base_type in GGUF_BPW else "f32" if base_type else "f16"  # a type edgemed does not write:
        load = _llama_load(dims, weights, PARITY_LONGEST + 8, repack=False)              # mapped, priced at the widest
        steps += _parity(dims, src, True, (*load, adapter), "parity")
    base = "" if base_type is None else f" --base ({base_type.upper()})"
    vocab = dims.vocab * VOCAB_PER_TOKEN if parity and base_type is None else 0  # planned for the base made here
    return Estimate(f"convert --adapter-only{base}" + ("" if parity else " --no-parity"), BASE_GGUF + vocab, tuple(steps))


def estimate_onnx(dims: Dims, *, out_type: str, graph: str = "torch", parity: bool = True, lora_bytes: int = 0,
                  source_dtype: str = "BF16", source_bytes: int | None = None) -> Estimate:
    """``convert --to onnx``: the fp32 graph (torch trace or genai builder), its parity, int4, its parity."""
    src = DTYPE_BYTES.get(source_dtype, 4)
    source_bytes = source_bytes if source_bytes is not None else dims.params * src
    fp32 = dims.params * 4
    mapped = Term("mapped safetensors", source_bytes, mapped=True)
    if graph == "genai":
        build = Term("onnxruntime-genai's builder (a child process)", int(fp32 * GENAI_COPIES))
        steps = [Step("export", (build, mapped))]
    else:
        copies = EXPORT_COPIES_SMALL if fp32 < PROTOBUF_LIMIT else EXPORT_COPIES_LARGE
        steps = [Step("export", (Term("torch model + exporter copies (float32)", int(fp32 * copies)), mapped))]
    if parity:
        steps += _parity(dims, src, bool(lora_bytes), (Term("ONNX Runtime session (fp32 graph)", int(fp32 * ORT_FP32)),), "parity_fp32")
    if out_type == "int4":
        if graph == "genai":
            steps.append(Step("quantize", (build, mapped)))
        else:
            steps.append(Step("quantize", (Term("fp32 graph + the quantizer's copy", int(fp32 * ONNX_QUANT_COPIES)),)))
        if parity:
            head = 0 if dims.tied else dims.embed_params  # the head 8-bit, the blocks 4-bit (+ scales), embeddings float32
            int4 = dims.embed_params * 4 + head * 17 // 16 + (dims.params - dims.embed_params - head) * 5 // 8
            steps += _parity(dims, src, bool(lora_bytes), (Term("ONNX Runtime session (int4 graph)", int(int4 * ORT_INT4)),), "parity_int4")
    what = f"convert --to onnx --quant {out_type} --onnx-graph {graph}" + ("" if parity else " --no-parity")
    return Estimate(what, BASE_ONNX, tuple(steps))


def estimate_for_dir(path, route: str, **kw) -> Estimate:
    """The estimate for a checkpoint (config.json + its weights' headers and sizes): an opened ``Checkpoint`` (with
    the consent it was opened with), or a directory, opened without consent to read pickle-only weights."""
    from edgemed.converters.source.checkpoint import as_checkpoint

    ckpt = as_checkpoint(path)
    kw.setdefault("source_dtype", ckpt.source_dtype())
    kw.setdefault("source_bytes", sum(f.stat().st_size for f in ckpt.weight_files()))
    return (estimate_gguf if route == "gguf" else estimate_onnx)(Dims.from_config(ckpt.config, ckpt.tensors), **kw)


# -- the check ------------------------------------------------------------------------------------------------------
def require_fits(est: Estimate, budget: Budget, alternatives: tuple[tuple[str, Estimate], ...] = ()) -> None:
    """Refuse ``est`` (an ``InputError`` with the numbers and a fix) when its resident peak exceeds ``budget``."""
    if est.resident <= budget.bytes:
        return
    fits = [f"{change} (peak {alt.resident / GIB:.1f} GiB)" for change, alt in alternatives if alt.resident <= budget.bytes]
    need = -(-est.resident // GIB)
    fix = "; ".join(fits + [f"run it on a machine with at least {need} GiB free, or close other programs"])
    raise InputError(
        f"`edgemed {est.route}` would need about {est.resident / GIB:.1f} GiB of memory at its peak, more than the "
        f"{budget.bytes / GIB:.1f} GiB budget ({budget.source}); its biggest term: {est.biggest}. File-backed "
        f"pages (mapped safetensors and GGUF files, libraries' code: up to {est.mapped / GIB:.1f} GiB) count in RSS but "
        "the kernel can drop and re-read them, so they are not counted. Nothing was written.",
        f"{fix} (or set --memory-budget / ${env.MEMORY_BUDGET_VAR} if more memory will be free)")


def _sizes(source) -> dict:
    ckpt, adapter = source.checkpoint, source.adapter
    lora = sum(f.stat().st_size for f in Path(adapter.path).glob("*.safetensors")) if adapter is not None else 0
    return {"source_dtype": ckpt.source_dtype(), "source_bytes": sum(f.stat().st_size for f in ckpt.weight_files()),
            "lora_bytes": lora}


def gguf_settings(opts) -> dict:
    """What a ``--to gguf`` conversion run with ``opts`` (``ConvertOptions``) does that its estimate depends on, as
    ``estimate_gguf``'s keywords: the output type, the parity check, the importance matrix (the user's text or the
    default one ``edgemed convert`` picks for a 4-bit type: ``calibration.default_imatrix``)."""
    return {"out_type": opts.out_type, "parity": opts.parity, "imatrix": opts.imatrix_from is not None}


def onnx_settings(opts) -> dict:
    """The same for ``--to onnx`` (``OnnxOptions``), as ``estimate_onnx``'s keywords."""
    return {"out_type": opts.weight_type, "graph": opts.graph, "parity": opts.parity}


def check_gguf(source, opts) -> Estimate:
    """The ``--to gguf`` hook: refuse before anything is written when the conversion of ``source`` (the command's
    opened ``Source``) cannot fit."""
    kw = gguf_settings(opts) | _sizes(source)
    dims = Dims.from_config(source.checkpoint.config, source.checkpoint.tensors)
    est = estimate_gguf(dims, **kw)
    alts = [(f"--quant {t}", estimate_gguf(dims, **kw | {"out_type": t, "imatrix": _calibrates(opts, t)}))
            for t in GGUF_BPW if t not in (opts.out_type, "auto")]
    if kw["parity"]:
        alts.append(("--no-parity, then `edgemed check` on a bigger machine", estimate_gguf(dims, **kw | {"parity": False})))
    if kw["imatrix"]:
        alts.append(("--no-imatrix (llama.cpp's plain recipe)", estimate_gguf(dims, **kw | {"imatrix": False})))
    require_fits(est, detect_budget(opts.memory_budget), tuple(alts))
    return est


def _calibrates(opts, out_type: str) -> bool:
    """Whether ``--quant out_type``, put in place of ``opts``' type, computes an importance matrix: a float type
    never (``--imatrix-from`` is refused with one); otherwise the user's own text still does, and without one the
    command's default for that type (``calibration.default_imatrix``) decides."""
    if out_type in OUT_BYTES:
        return False
    own = opts.imatrix_from is not None and opts.imatrix_from != default_imatrix(opts.out_type)
    return own or default_imatrix(out_type) is not None


def check_adapter(source, opts, base_type: str | None) -> Estimate:
    """The ``--adapter-only`` hook: refuse before anything is written when the adapter's gate cannot fit, on the
    ``--base`` given (``base_type``: its type) or on the F16 base made for it (None)."""
    kw = _sizes(source)
    dims = Dims.from_config(source.checkpoint.config, source.checkpoint.tensors)
    est = estimate_adapter(dims, base_type=base_type, parity=opts.parity, **kw)
    alts = [("--no-parity (the adapter is written ungated; gate it with --base on a bigger machine)",
             estimate_adapter(dims, base_type=base_type, parity=False, **kw))] if opts.parity else []
    require_fits(est, detect_budget(opts.memory_budget), tuple(alts))
    return est


def check_onnx(source, opts) -> Estimate:
    """The ``--to onnx`` hook: refuse before anything is written when the conversion of ``source`` (the command's
    opened ``Source``) cannot fit."""
    kw = onnx_settings(opts) | _sizes(source)
    dims = Dims.from_config(source.checkpoint.config, source.checkpoint.tensors)
    est = estimate_onnx(dims, **kw)
    gguf_kw = {k: v for k, v in kw.items() if k not in ("graph", "out_type")}
    alts = [("--no-parity", estimate_onnx(dims, **kw | {"parity": False}))] if kw["parity"] else []
    alts += [("--onnx-graph " + g, estimate_onnx(dims, **kw | {"graph": g})) for g in ("torch", "genai") if g != kw["graph"]]
    gguf = DEFAULT_OUTPUT_TYPE["gguf"]  # `--to gguf` as the command runs it: its default type, calibrated by default
    alts.append((f"--to gguf ({gguf.upper()})",
                 estimate_gguf(dims, out_type=gguf, imatrix=default_imatrix(gguf) is not None, **gguf_kw)))
    require_fits(est, detect_budget(opts.memory_budget), tuple(alts))
    return est
