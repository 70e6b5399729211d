"""Does the converted model compute what its source computes?

Fixed medical prompts are tokenized once with the source tokenizer; the same
token ids go through the Hugging Face model (torch, float32, one decoder layer at a
time with the LoRA adapter merged per layer: ``converters/quality/layered.py``) and through the converted file. Per
position we compare next-token logits:

- NMSE   = sum((converted - source)^2) / sum(source^2) over all positions and vocab (the float types' gate)
- KLD    = mean over positions of KL(softmax(source) || softmax(converted)), in nats, and
- top-1  = share of positions whose argmax agrees, both by ``edgemed.converters.quality.fidelity``'s rules: the headline leaves out
  each prompt's first position (a prediction from one token), which is reported on its own, beside the
  llama.cpp-compatible figure (second half of each prompt) and the figure over every position.

``compare`` is shared by every backend (GGUF here, ONNX in its own module).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from edgemed.converters.quality.prompts import PROMPTS  # noqa: F401 (the gate's prompts, read here by callers)

# Float output type -> NMSE a faithful conversion must reach (over every position).
NMSE_GATES: dict[str, float | None] = {"f32": 1e-4, "f16": 1e-4, "bf16": 1e-3}
# Every other (quantized) type: the converted model's next-token argmax must agree with the source's on at
# least this share of the headline positions (``fidelity``: each prompt's first position left out), and every type
# must give finite logits. It catches catastrophic breakage: working files measured 0.60-0.97 on the headline
# positions of the current prompts (tiny test models Q4_0 0.60-0.67, Q4_K_M 0.76-0.82; SmolLM2-135M Q4_0 0.62,
# Q4_K_M 0.84, Q8_0 0.97), broken ones (layers swapped or five zeroed, 5-15 % of the quant blocks zeroed, NaN, an
# integer tensor read as float) 0.0-0.18. Decision 0022 has the table and its command.
TOP1_GATE = 0.4
#: Rows of one prompt compared at once in float64 (``compare``): 40 rows of a 152k vocabulary are 49 MB a copy.
COMPARE_ROWS = 40
# Every GGUF type, and the ONNX route's int4 graph (``int4``; its fp32 graph is gated as ``f32``: ``onnx.parity.
# GATE_TYPE``) -> the headline KLD (nats) a file may reach: the bar that catches what keeps most argmaxes (a decoder
# layer that adds nothing, damaged blocks, wiped chat-token rows). 1.3x or more what an intact conversion of
# SmolLM2-135M (the least faithful model measured) reaches, under its broken ones; decision 0022.
KLD_GATES: dict[str, float] = {"f32": 1e-3, "f16": 1e-3, "bf16": 1e-3, "q8_0": 0.03, "q5_k_m": 0.15, "q4_k_m": 0.15,
                                "q4_0": 0.7, "int4": 0.7}


def gates_for(out_type: str, when: dict | None = None) -> dict[str, float | None]:
    """The gates a file of ``out_type`` (a GGUF type, or ``onnx.parity.GATE_TYPE``'s key) is held to: ``nmse`` its
    NMSE bar (float types), else ``top1`` the top-1 floor, and ``kld`` its KLD bar; None where it has none. From
    ``NMSE_GATES``, ``TOP1_GATE`` and ``KLD_GATES``, or from ``when``, those tables as a results file recorded them
    (``{"nmse": ..., "top1": ..., "kld": ...}``: ``benchmarks/parity_gates``' gates in force when it measured)."""
    when = when or {"nmse": NMSE_GATES, "top1": TOP1_GATE, "kld": KLD_GATES}
    nmse = when["nmse"].get(out_type)
    return {"nmse": nmse, "top1": None if nmse is not None else when["top1"], "kld": when["kld"].get(out_type)}


@dataclass
class ParityReport:
    backend: str
    out_type: str
    n_prompts: int
    n_positions: int
    nmse: float
    kld: float
    top1: float
    max_abs_diff: float
    gate_nmse: float | None
    passed: bool | None
    per_prompt: list[dict] = field(default_factory=list)
    gate_top1: float | None = None  # quantized types: the minimum top-1 agreement
    gate_kld: float | None = None  # the headline KLD's ceiling for this type (``KLD_GATES``); None: not gated
    finite: bool = True  # every converted logit is a finite number
    source_finite: bool = True  # ... and every source logit (a broken checkpoint cannot vouch for anything)
    fidelity: dict = field(default_factory=dict)  # edgemed.converters.quality.fidelity.summarize: headline, first, llamacpp, all, rule
    max_abs_diff_all: float | None = None  # max |diff| over every position (max_abs_diff: the headline positions)
    metric_version: int = 0  # edgemed.converters.quality.fidelity.VERSION the figures were computed with

    def to_dict(self) -> dict:
        return asdict(self)

    def gate(self) -> str:
        rule = f"NMSE < {self.gate_nmse:g}" if self.gate_nmse is not None else f"top-1 >= {self.gate_top1:.0%}"
        kld = f", KLD <= {self.gate_kld:g} nats" if self.gate_kld is not None else ""
        return f"{rule}{kld} and finite logits"

    def summary(self) -> str:
        gate = "reported, not gated" if self.passed is None else f"gate {self.gate()}: {'PASS' if self.passed else 'FAIL'}"
        first = (self.fidelity.get("first") or {}).get("kld_mean")
        llama = (self.fidelity.get("llamacpp") or {}).get("kld_mean")
        side = "".join([f", first positions {first:.3e}" if first is not None else "",
                        f", llama.cpp-compatible {llama:.3e}" if llama is not None else ""])
        return (f"parity {self.backend} {self.out_type.upper()} vs source over {self.n_positions} positions "
                f"({self.n_prompts} medical prompts, first position of each left out): NMSE {self.nmse:.3e}, "
                f"KLD {self.kld:.3e} nats{side}, top-1 {self.top1 * 100:.1f}%, max|diff| {self.max_abs_diff:.3g}; {gate}")


def metrics(source_logits, converted_logits) -> dict:
    """Compare two [positions, vocab] logit arrays (numpy, float) over every row (no headline rule)."""
    import numpy as np

    from edgemed.converters.quality.fidelity import kl_rows

    a = np.asarray(source_logits, dtype=np.float64)
    b = np.asarray(converted_logits, dtype=np.float64)
    kl, agree = kl_rows(a, b)
    return {"nmse": _nmse(a, b), "kld": float(max(kl.mean(), 0.0)), "top1": float(agree.mean()),
            "max_abs_diff": float(np.abs(b - a).max()), "positions": a.shape[0]}


def _nmse(a, b) -> float:
    return float(((b - a) ** 2).sum() / max((a ** 2).sum(), 1e-30))


def source_logits(source, prompts=None) -> tuple[list[list[int]], list]:
    """Token ids and float32 logits of the Hugging Face source (+ its LoRA adapter) per prompt: PEFT's unmerged
    model's to float32 rounding, computed one decoder layer at a time (``layered.py``). ``prompts``: texts; by
    default ``PROMPTS`` and the chat in the source's own template (``prompts.token_lists``).

    ``source``: the command's opened ``Source`` (checkpoint, adapter, pickle consent); a ``Checkpoint`` or a
    directory stands for one without adapter (a directory opened without consent)."""
    from edgemed.converters.quality.layered import reference_logits

    return reference_logits(source, prompts)


def gguf_logits(gguf_path: Path, token_lists: list[list[int]], threads: int | None = None) -> list:
    """llama.cpp's logits at every position of each token list (``edgemed.runtime.logits``, its default placement:
    the weights read in place, no repacked copy beside the mapping)."""
    from edgemed.runtime.logits import gguf_logits as logits_of

    return list(logits_of(gguf_path, token_lists, threads=threads))


def compare(backend: str, out_type: str, token_lists, src: list, converted: list) -> ParityReport:
    """The report for per-prompt logit arrays (``src[i]``, ``converted[i]``: [tokens, vocab]). Prompt by prompt and
    ``COMPARE_ROWS`` rows at a time, so the float64 work is one block's worth (a 152k vocabulary makes every row 1.2
    MB in float64)."""
    import numpy as np

    from edgemed.converters.quality import fidelity

    rows, per_prompt, head_diff, all_diff = [], [], [], []
    num = den = 0.0
    finite = source_finite = True
    for t, s, c in zip(token_lists, src, converted):
        s, c = np.asarray(s), np.asarray(c)
        if s.shape != c.shape:
            raise ValueError(f"logit shapes differ: source {s.shape}, converted {c.shape}")
        finite, source_finite = finite and bool(np.isfinite(c).all()), source_finite and bool(np.isfinite(s).all())
        kls, agrees, sq, ref, head_max, all_max = [], [], 0.0, 0.0, float("-inf"), float("-inf")
        head = fidelity.headline_rows(len(s))
        for lo in range(0, len(s), COMPARE_ROWS):  # float64 work a block of rows at a time (LONG is ~365 rows)
            hi = min(len(s), lo + COMPARE_ROWS)
            kl, agree = fidelity.kl_rows(s[lo:hi], c[lo:hi])
            kls.append(kl)
            agrees.append(agree)
            s64 = s[lo:hi].astype(np.float64)
            diff = np.abs(c[lo:hi].astype(np.float64) - s64)
            sq, ref = sq + float((diff ** 2).sum()), ref + float((s64 ** 2).sum())
            all_max = max(all_max, float(diff.max()))
            if max(lo, head.start) < min(hi, head.stop):
                head_max = max(head_max, float(diff[max(lo, head.start) - lo:min(hi, head.stop) - lo].max()))
            del s64, diff
        kl = np.concatenate(kls) if kls else np.zeros(0)
        agree = np.concatenate(agrees) if agrees else np.zeros(0, dtype=bool)
        rows.append((kl, agree))
        num, den = num + sq, den + ref
        head_diff.append(head_max)
        all_diff.append(all_max)
        one = fidelity.summarize([(kl, agree)])
        per_prompt.append({"tokens": len(t), "nmse": sq / max(ref, 1e-30), "kld": one["kld_mean"], "top1": one["top1"],
                           "kld_first": one["first"]["kld_mean"], "max_abs_diff": all_diff[-1]})
    fid = fidelity.summarize(rows)
    max_all = float(np.max(all_diff))
    max_head = float(np.max(head_diff)) if max(head_diff) != float("-inf") else max_all
    nmse = num / max(den, 1e-30)
    gates = gates_for(out_type)
    gate, top1_gate, kld_gate = gates["nmse"], gates["top1"], gates["kld"]
    passed = finite and source_finite and (nmse < gate if gate is not None else fid["top1"] >= top1_gate) \
        and (kld_gate is None or fid["kld_mean"] <= kld_gate)
    return ParityReport(
        backend=backend, out_type=out_type, n_prompts=len(rows), n_positions=fid["n_tokens"],
        nmse=nmse, kld=fid["kld_mean"], top1=fid["top1"], max_abs_diff=max_head,
        gate_nmse=gate, passed=passed, per_prompt=per_prompt, gate_top1=top1_gate, gate_kld=kld_gate, finite=finite,
        source_finite=source_finite, fidelity=fid, max_abs_diff_all=max_all, metric_version=fidelity.VERSION,
    )


#: Why F16 tensors give non-finite logits where the source's are finite (``gate_error``'s ``f16_fix``): ggml rounds
#: a matrix product's input to F16 for an F16 weight (a LoRA pair's lora_b takes lora_a's product as its input), so
#: activations past F16's largest value become infinite; F32 (and BF16) weights take them as F32.
F16_ACTIVATIONS = ("llama.cpp rounds the input of every product with an F16 tensor to F16, and this model's "
                   "activations there pass F16's largest value (65504), so they become infinite; an F32 (or BF16) tensor's "
                   "product keeps F32's range")


def gate_error(report: ParityReport, what: str, outcome: str = "nothing was written", f16_fix: str | None = None):
    """The ``ParityError`` for a report that failed its gate; ``what`` names the artifact ("The Q4_K_M GGUF").
    ``f16_fix``: where the artifact computes with F16 tensors, the option that keeps them F32, given as the fix
    when its logits are not finite and the source's are."""
    from edgemed.errors import ParityError

    if not report.source_finite:
        return ParityError(
            f"The source checkpoint itself computes NaN or infinite logits (in transformers) on the parity prompts, so "
            f"{what} cannot be vouched for; {outcome}.",
            "re-copy the checkpoint from its source; if it is intact, its weights are broken (a diverged training run)",
        )
    if not report.finite:
        problem = f"{what} computes NaN or infinite logits on the {report.n_prompts} parity prompts"
    elif report.gate_nmse is not None and not report.nmse < report.gate_nmse:
        problem = f"{what} does not match its source: NMSE {report.nmse:.3e} (must be < {report.gate_nmse:g})"
    elif report.gate_top1 is not None and not report.top1 >= report.gate_top1:
        problem = (f"{what} picks the same next token as its source at only {report.top1:.1%} of {report.n_positions} "
                   f"positions (must be >= {report.gate_top1:.0%}; KLD {report.kld:.3g} nats)")
    else:
        problem = (f"{what} does not match its source: KL divergence {report.kld:.3g} nats over {report.n_positions} "
                   f"positions (must be <= {report.gate_kld:g} for {report.out_type.upper()}, a bar set above what "
                   f"intact {report.out_type.upper()} conversions measure; top-1 {report.top1:.1%})")
    wider = "--to onnx --quant fp32" if report.backend == "onnx" else "--quant q8_0, or f16"
    fix = ("this is a converter bug for this checkpoint: rerun with -vv and report it, with the checkpoint's config.json"
           if report.gate_nmse is not None else
           f"convert to a wider type ({wider}) and compare; if that also fails, report it with config.json")
    if not report.finite and f16_fix is not None:
        fix = f"{f16_fix}: {F16_ACTIVATIONS}"
    return ParityError(f"{problem}; {outcome}.", fix)


def gated(report: ParityReport, what: str, echo, f16_fix: str | None = None) -> dict:
    """Show ``report``; raise its ``gate_error`` when it failed; else its dict for the conversion report."""
    echo(report.summary())
    if report.passed is False:
        raise gate_error(report, what, f16_fix=f16_fix)
    return report.to_dict()


def same_vocabulary(model: Path, source, src: list, converted: list) -> None:
    """Refuse logits of ``model`` over another vocabulary than its ``source``'s (a ``Source``, a ``Checkpoint`` or a
    directory): a model whose embedding was resized is not a conversion of that checkpoint, and its logits cannot
    be compared with the source's."""
    import numpy as np

    from edgemed.errors import InputError

    for s, c in zip(src, converted):
        if np.ndim(s) == np.ndim(c) == 2 and np.shape(s)[1] != np.shape(c)[1]:
            raise InputError(f"'{model}' has a vocabulary of {np.shape(c)[1]:,} tokens and its source "
                             f"'{getattr(source, 'path', source)}' one of {np.shape(s)[1]:,}: it is not a conversion "
                             "of that checkpoint.", "pass the checkpoint it was converted from as the source")


def check_gguf(source, gguf_path: Path, out_type: str, *, threads: int | None = None,
               reference: tuple | None = None) -> ParityReport:
    """Parity of ``gguf_path`` against its HF ``source`` (the command's opened ``Source``, as ``source_logits``
    takes it). ``reference`` reuses (ids, logits) already computed."""
    ids, src = reference or source_logits(source)
    converted = gguf_logits(gguf_path, ids, threads)
    same_vocabulary(gguf_path, source, src, converted)
    return compare("gguf", out_type, ids, src, converted)


def adapter_logits(base_path: Path, adapter_path: Path, token_lists: list[list[int]], threads: int | None = None,
                   scale: float = 1.0) -> list:
    """``gguf_logits`` of ``base_path`` with the LoRA adapter ``adapter_path`` applied by llama.cpp at run time
    (checked against the base and loaded by ``runtime.loader.load_adapter``)."""
    from edgemed.runtime.loader import AdapterSpec, load_adapter
    from edgemed.runtime.logits import CTX_MARGIN, SequenceLogits

    with SequenceLogits(base_path, max(len(t) for t in token_lists) + CTX_MARGIN, threads=threads) as run:
        adapter = load_adapter(run.model, AdapterSpec(Path(adapter_path), scale))
        try:
            run.ctx.set_adapters([(adapter, scale)])
            return [run(tokens) for tokens in token_lists]
        finally:
            run.ctx.set_adapters([])  # the context lets go of the adapter before it is freed
            adapter.close()


def check_adapter_gguf(source, base_path: Path, adapter_path: Path, base_type: str, *, threads: int | None = None,
                       reference: tuple | None = None) -> ParityReport:
    """Parity of the base GGUF + LoRA adapter GGUF at run time against the HF ``source`` with its adapter merged;
    ``base_type`` (the base's type) picks the gate, as for a merged conversion of that type."""
    ids, src = reference or source_logits(source)
    converted = adapter_logits(base_path, adapter_path, ids, threads)
    same_vocabulary(base_path, source, src, converted)
    return compare("gguf+lora", base_type, ids, src, converted)


Checker = Callable[..., ParityReport]
