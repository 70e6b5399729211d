"""``edgemed convert --quant auto``: per-tensor types chosen by measured KLD, written by llama.cpp's quantizer.

What it costs, whatever the search decides: llama.cpp quantizes the float intermediate at most four times (every
tensor ``low``, every tensor ``high``, llama.cpp's own Q4_K_M mix, and every tensor Q8_0 only when asked for), plus
once for the output. Each other candidate is **spliced** from those files (a tensor's bytes do not depend on the other
tensors' types), so a round is a file copy and one KLD measurement, not a quantization. The output itself is quantized
by llama.cpp with the chosen types as tensor-type overrides (``quantize.py``), its types read back and its tensor
bytes compared with the measured candidate's; if they differ, the output is measured itself.

KLD is measured against the float intermediate (F16/BF16, llama.cpp, the same engine as the candidates) on
``data/calibration/medical-search.txt``: PubMedQA abstracts outside the test split and outside the importance matrix's
text, so neither the bench's accuracy items nor its divergence passages (the held-out text the final figures come
from) steer the choice. Headline KLD by ``edgemed.converters.quality.fidelity``'s rule, with its standard error between the text's
passages (``fidelity.headline_se``): the search holds a candidate to KLD + 1.645 SE. Reference logits are computed
once and kept on disk in the scratch folder (float32, one file a passage). With an importance matrix (the default:
``calibration.default_imatrix``) every quantization to a type that reads one uses it, the stock Q4_K_M candidate
included; it is computed only when the first such quantization runs. ``--fit-profile NAME``: the device planner
(``edgemed.runtime.plan``) estimates each candidate at the profile's context (capped at the model's) against the profile's
fixed memory budget. ``--max-kld`` under ``MIN_MAX_KLD`` is refused before any work (the search would find that out
only after every round).
"""

from __future__ import annotations

import math
import mmap
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgemed.errors import InputError

AUTO = "auto"
#: general.file_type by the type holding most of the output's bytes (the mix itself is in the tensor table)
FTYPE_OF = {"Q4_K": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
            "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}
KL_ROWS = 64  # logit rows compared at once (a row of a 152k vocabulary is 1.2 MB in float64)
MIN_MAX_KLD = 1e-4  # every tensor Q8_0, the best candidate, measured 0.0006-0.006: 6x under is unreachable


def check_request(out_type: str, max_kld: float | None, fit_profile: str | None) -> None:
    """Refuse a bad combination before any work: the budget and the device belong to ``--quant auto``."""
    if out_type != AUTO:
        if max_kld is not None or fit_profile is not None:
            flag = "--max-kld" if max_kld is not None else "--fit-profile"
            raise InputError(f"{flag} chooses per-tensor types, so it needs --quant auto (got --quant {out_type}).",
                             f"pass --quant auto with {flag}, or leave {flag} out")
        return
    if max_kld is None and fit_profile is None:
        raise InputError("--quant auto needs a goal: a KLD budget, a device, or both.",
                         "pass --max-kld 0.005 and/or --fit-profile NAME (`edgemed devices list` shows profiles)")
    if max_kld is not None and (isinstance(max_kld, bool) or not isinstance(max_kld, (int, float))
                                or not math.isfinite(max_kld) or max_kld <= 0):
        raise InputError(f"--max-kld must be a number above 0 (nats), got {max_kld!r}.",
                         "pass e.g. --max-kld 0.005 (Q4_K_M of Qwen2.5-1.5B measured about 0.005)")
    if max_kld is not None and max_kld < MIN_MAX_KLD:
        raise InputError(f"--max-kld {max_kld:g} is below {MIN_MAX_KLD:g} nats: not even every tensor at Q8_0 reaches that.",
                         f"pass --max-kld {MIN_MAX_KLD:g} or more (Q8_0 measured 0.0006-0.006), or --quant f16")
    if fit_profile is not None:
        device_budget(fit_profile)  # an unknown profile or one without a fixed memory size fails here


def device_budget(name: str) -> tuple:
    """(profile, budget in bytes) of profile ``name``; it must have a fixed memory size."""
    from edgemed.devices import get_profile

    profile = get_profile(name)
    if "total_gb" not in profile.memory:  # its size is detected on the device; a workstation cannot stand in
        raise InputError(f"Device profile '{name}' has no fixed memory size (memory.total_gb): it is measured on the "
                         "device itself, so --fit-profile cannot plan for it on this machine.",
                         "choose a profile with memory.total_gb (e.g. jetson-orin-nano-8gb), or copy this one into "
                         "$EDGEMED_HOME/profiles with memory.total_gb set")
    return profile, profile.budget_bytes(None)


@dataclass
class Rung:
    """A llama.cpp-quantized file with every tensor at one level of the ladder."""

    path: Path
    header: object  # edgemed.formats.gguf_header.Header

    def tensor(self, name: str):
        return self._by_name[name]

    def __post_init__(self):
        self._by_name = {t.name: t for t in self.header.tensors}


def groups_of(header) -> list:
    """The quantizable tensors of a float GGUF header, each with its ladder (see ``auto_quant_search``)."""
    import gguf

    from edgemed.converters.gguf.auto_quant_search import group_of

    out = []
    for t in header.tensors:
        if len(t.dims) < 2 or not t.name.endswith(".weight") or "_norm" in t.name:
            continue
        g = group_of(t.name, t.dims[0])
        if g is not None:
            out.append(type(g)(**{**g.__dict__, "extra_bytes": tensor_bytes(gguf, t, g.high) - tensor_bytes(gguf, t, g.low)}))
    return out


def tensor_bytes(gguf, t, type_name: str) -> int:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return t.n_elements // block * size


def splice(rungs: list[Rung], types: dict[str, str], dst: Path) -> None:
    """Write ``dst``: the first rung's metadata, each tensor's bytes from the rung holding it at ``types[name]``."""
    import gguf

    first = rungs[0]
    align = first.header.metadata.get("general.alignment", 32)
    picks = []
    for t in first.header.tensors:
        want = types.get(t.name, t.type_name)
        rung = next((r for r in rungs if r.tensor(t.name).type_name == want), None)
        if rung is None:
            raise RuntimeError(f"no quantized file holds {t.name} as {want}")
        picks.append((rung, rung.tensor(t.name)))
    table, offset = bytearray(), 0
    for _, t in picks:
        name = t.name.encode()
        table += struct.pack(f"<Q{len(name)}sI{len(t.dims)}QIQ", len(name), name, len(t.dims), *t.dims,
                             int(gguf.GGMLQuantizationType[t.type_name]), offset)
        offset += -(-t.n_bytes // align) * align
    files = {}
    try:
        for r in rungs:
            fh = open(r.path, "rb")
            files[r.path] = (fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
        with open(dst, "wb") as out:
            out.write(files[first.path][1][:first.header.table_start])
            out.write(table)
            out.write(b"\0" * (-out.tell() % align))
            for rung, t in picks:
                start = rung.header.data_start + t.offset
                out.write(files[rung.path][1][start:start + t.n_bytes])
                out.write(b"\0" * (-t.n_bytes % align))
    finally:
        for fh, mm in files.values():
            mm.close()
            fh.close()


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two GGUFs hold the same tensors (names, types, shapes and bytes), whatever their metadata."""
    from edgemed.formats.gguf_header import read_header

    ha, hb = read_header(a), read_header(b)
    if [(t.name, t.type_name, t.dims) for t in ha.tensors] != [(t.name, t.type_name, t.dims) for t in hb.tensors]:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb, \
            mmap.mmap(fa.fileno(), 0, access=mmap.ACCESS_READ) as ma, mmap.mmap(fb.fileno(), 0, access=mmap.ACCESS_READ) as mb:
        return all(ma[ha.data_start + x.offset:ha.data_start + x.offset + x.n_bytes]
                   == mb[hb.data_start + y.offset:hb.data_start + y.offset + y.n_bytes] for x, y in zip(ha.tensors, hb.tensors))


class Reference:
    """The float intermediate's logits on the search passages (on disk), and KLD of a candidate against them."""

    def __init__(self, float_path: Path, passages: list[str], work: Path, threads: int | None = None):
        import numpy as np

        from edgemed.runtime.plan import read_shape
        from edgemed.runtime import llamacpp

        self.work, self.threads = work, threads
        n_ctx_train = read_shape(float_path).n_ctx_train  # passages stay inside it (a tiny test model's is 256)
        vocab = llamacpp.Model(float_path, vocab_only=True)
        try:
            self.tokens = [vocab.tokenize(p, add_special=True)[:n_ctx_train] for p in passages]
        finally:
            vocab.close()
        self.files = []
        for i, logits in enumerate(self._logits(float_path)):
            self.files.append(work / f"reference-{i}.npy")
            np.save(self.files[-1], logits)

    def _logits(self, path: Path):
        """Every row's logits of each passage (one passage at a time, from an empty cache: ``runtime.logits``)."""
        from edgemed.runtime.logits import gguf_logits

        return gguf_logits(path, self.tokens, threads=self.threads)

    def measure(self, path: Path) -> dict:
        """``edgemed.converters.quality.fidelity.summarize`` of KL(reference || ``path``) over the passages, + ``kld_se``."""
        import numpy as np

        from edgemed.converters.quality.fidelity import headline_se, kl_rows, summarize

        rows = []
        for ref_file, logits in zip(self.files, self._logits(path)):
            ref = np.load(ref_file, mmap_mode="r")
            parts = [kl_rows(ref[i:i + KL_ROWS], logits[i:i + KL_ROWS]) for i in range(0, len(logits), KL_ROWS)]
            rows.append((np.concatenate([k for k, _ in parts]), np.concatenate([a for _, a in parts])))
        return summarize(rows) | {"kld_se": headline_se(rows)}

    @property
    def n_positions(self) -> int:
        return sum(len(t) for t in self.tokens)


class DeviceFit:
    """Does a candidate fit profile ``name`` at the profile's context (capped at the model's)? Planner estimates."""

    def __init__(self, name: str, float_path: Path):
        import gguf

        from edgemed.formats.gguf_header import read_header
        from edgemed.runtime.plan import read_shape

        self.profile, self.budget = device_budget(name)
        self.shape = read_shape(float_path)
        self.n_ctx = min(self.profile.llama["n_ctx"], self.shape.n_ctx_train)
        self._tensors = read_header(float_path).tensors
        self._bytes = lambda t, ty: tensor_bytes(gguf, t, ty)

    def estimate(self, types: dict[str, str]):
        """The plan's estimate for the file these ``types`` (tensor name -> quant type; the rest stay as they are)
        would make, counted as ``plan.read_shape`` counts a written file: its weights, the ones the device's CPU
        repacks or its AMX buffer takes, and the output layer's copy of a tied token embedding."""
        from dataclasses import replace

        from edgemed.runtime.plan import estimate, for_engine, profile_settings, weight_facts

        written = weight_facts((t.name, types.get(t.name) or t.type_name, tuple(t.dims),
                                self._bytes(t, types[t.name]) if t.name in types else t.n_bytes) for t in self._tensors)
        shape = replace(self.shape, repackable_bytes=0, **written)  # estimate repacks by the device's features
        # the larger of what `run` and `serve` load it with (their micro-batches may differ: plan.for_engine), as a
        # bundle's memory facts count it
        return max((estimate(shape, self.n_ctx, **profile_settings(for_engine(self.profile, batched), shape))
                    for batched in (False, True)), key=lambda e: e.total)

    def __call__(self, types: dict[str, str]) -> bool:
        return self.estimate(types).total <= self.budget

    def describe(self) -> dict:
        return {"profile": self.profile.name, "n_ctx": self.n_ctx, "budget_bytes": self.budget}


def dominant_type(float_header, types: dict[str, str]) -> str:
    import gguf

    by = {}
    for t in float_header.tensors:
        if t.name in types:
            by[types[t.name]] = by.get(types[t.name], 0) + tensor_bytes(gguf, t, types[t.name])
    return max(by, key=by.get)


def run(float_path: Path, dst: Path, *, max_kld: float | None, fit_profile: str | None, work: Path,
        threads: int | None = None, imatrix: Callable[[], dict] | None = None, echo=print) -> dict:
    """Search, write ``dst`` with the chosen types, and return the report's ``auto_quant`` section.

    ``imatrix()`` gives the importance matrix; it is called only for a quantization with a type that reads one
    (``quantize.reads_imatrix``), so a search that ends at every tensor Q8_0 never computes it."""
    from edgemed.converters.quality import fidelity
    from edgemed.converters.gguf import calibration
    from edgemed.converters.gguf.auto_quant_search import LADDERS, MARGIN_Z, STOCK, TOP, Impossible, Trial, search, table
    from edgemed.converters.gguf.quantize import quantize, reads_imatrix
    from edgemed.formats.gguf_header import read_header

    clock = dict.fromkeys(("quantize_s", "reference_s", "splice_s", "measure_s"), 0.0)
    header = read_header(float_path)
    groups = groups_of(header)
    if not groups:
        raise InputError(f"'{float_path.name}' has no tensor whose rows are whole 32-element blocks, so --quant auto "
                         "has nothing to choose.", "convert with --quant q8_0 or f16")
    fit = DeviceFit(fit_profile, float_path) if fit_profile else None
    levels = {"low": {g.name: g.low for g in groups}, "high": {g.name: g.high for g in groups},
              "top": {g.name: TOP for g in groups}}
    rungs: dict[str, Rung] = {}

    def weights(types: dict | None) -> dict | None:
        """The importance matrix for a quantization to ``types`` (None: llama.cpp's own mix), if any type reads it."""
        if imatrix is None or (types is not None and not any(reads_imatrix(t) for t in types.values())):
            return None
        return imatrix()

    def rung(level: str) -> Rung:
        if level not in rungs:
            start, path = time.monotonic(), work / f"rung-{level}.gguf"
            quantize(float_path, path, "q4_k_m", threads=threads, imatrix=weights(levels[level]), tensor_types=levels[level])
            clock["quantize_s"] += time.monotonic() - start
            rungs[level] = Rung(path, read_header(path))
        return rungs[level]

    def rungs_for(types: dict) -> list[Rung]:
        """The fewest quantized files that hold a candidate's tensors: files already made first, each made once."""
        need, left = [], dict(types)
        while left:
            level = max(levels, key=lambda lv: (any(levels[lv][n] == t for n, t in left.items()), lv in rungs,
                                                sum(levels[lv][n] == t for n, t in left.items())))
            covered = {n for n, t in left.items() if levels[level][n] == t}
            if not covered:
                raise RuntimeError(f"no ladder level holds {next(iter(left))} as {next(iter(left.values()))}")
            need.append(level)
            left = {n: t for n, t in left.items() if n not in covered}
        return [rung(lv) for lv in need]

    start = time.monotonic()
    reference = Reference(float_path, calibration.passages(calibration.shipped(calibration.SEARCH_TEXT)), work, threads)
    clock["reference_s"] = time.monotonic() - start

    def measure_file(path: Path) -> dict:
        start = time.monotonic()
        figures = reference.measure(path)
        clock["measure_s"] += time.monotonic() - start
        return {k: figures[k] for k in ("kld_mean", "kld_se", "kld_p99", "top1", "n_tokens")} | {
            "llamacpp_kld_mean": (figures["llamacpp"] or {}).get("kld_mean"), "first_kld_mean": figures["first"]["kld_mean"]}

    def measure(label: str, types: dict) -> Trial:
        parts = rungs_for(types)
        start, path = time.monotonic(), work / "candidate.gguf"
        splice(parts, types, path)
        clock["splice_s"] += time.monotonic() - start
        figures = measure_file(path)
        size = path.stat().st_size
        path.unlink()
        return Trial(label, dict(types), size, figures["kld_mean"], fit(types) if fit else None, figures,
                     se=figures["kld_se"] or 0.0)

    def stock() -> dict:
        """llama.cpp's own Q4_K_M mix (its choice per tensor), quantized once: a rung of its own."""
        start, path = time.monotonic(), work / "rung-stock.gguf"
        quantize(float_path, path, "q4_k_m", threads=threads, imatrix=weights(None))
        clock["quantize_s"] += time.monotonic() - start
        rungs["stock"] = Rung(path, read_header(path))
        levels["stock"] = {g.name: rungs["stock"].tensor(g.name).type_name for g in groups}
        return levels["stock"]

    try:
        outcome = search(groups, measure=measure, max_kld=max_kld, fits=fit, stock=stock, log=echo)
    except Impossible as exc:
        echo(table(exc.trials))
        asked = " and ".join(x for x in (f"KLD <= {max_kld:g}" if max_kld is not None else "",
                                         f"fits '{fit_profile}'" if fit_profile else "") if x)
        raise InputError(f"No --quant auto candidate meets {asked}: {exc.reason} (measured on {reference.n_positions} "
                         "positions of held-out medical text; the candidates are listed above).",
                         "raise --max-kld, choose a device profile with more memory, or convert with --quant q8_0 / f16") from None
    chosen = outcome.chosen
    start = time.monotonic()
    quantize(float_path, dst, "q4_k_m", threads=threads, imatrix=weights(chosen.types), tensor_types=chosen.types,
             ftype=FTYPE_OF.get(dominant_type(header, chosen.types), FTYPE_OF["Q4_K"]))
    clock["quantize_s"] += time.monotonic() - start
    splice(rungs_for(chosen.types), chosen.types, work / "chosen.gguf")
    matches = same_tensors(dst, work / "chosen.gguf")
    figures = chosen.figures if matches else measure_file(dst)  # never report a figure of another file
    section = {
        "request": {"max_kld": max_kld, "fit_profile": fit_profile} | (fit.describe() if fit else {}),
        "measured_on": {"text": f"edgemed/converters/data/calibration/{calibration.SEARCH_TEXT}",
                        "passages": len(reference.tokens), "positions": reference.n_positions,
                        "reference": f"the float intermediate ({float_path.name})", "rule": fidelity.RULE,
                        "fidelity_version": fidelity.VERSION},
        "ladders": {f"{block}-element blocks": list(pair) for block, pair in LADDERS.items()} | {"top": TOP},
        "margin": {"z": MARGIN_Z, "rule": f"a candidate meets --max-kld when KLD + {MARGIN_Z} x SE does (SE between "
                   "passages, edgemed.converters.quality.fidelity.headline_se)"},
        "rounds": len(outcome.trials), "bound": outcome.bound, "quantize_runs": len(rungs) + 1,
        "candidates": [t.row() for t in outcome.trials],
        "chosen": {"label": chosen.label, "size_bytes": dst.stat().st_size, "kld": figures["kld_mean"], "figures": figures,
                   "matches_measured_candidate": matches, "types": dict(sorted(chosen.types.items()))},
        "why": outcome.why, "ranking": outcome.order,
        "stock": next(({"label": t.label, "size_bytes": t.size_bytes, "kld": t.kld, "kld_se": t.se, "kld_upper": t.upper}
                       for t in outcome.trials if t.label == STOCK), None),
        "timings_s": {k: round(v, 2) for k, v in clock.items()},
    }
    if fit:
        from edgemed.runtime.plan import make_plan

        plan = max((make_plan(dst, fit.profile, None, requested_ctx=fit.n_ctx, budget=fit.budget, batched=batched)
                    for batched in (False, True)), key=lambda p: p.estimate.total)  # `run`'s or `serve`'s, the larger
        section["plan"] = {"fits": plan.fits, "total_bytes": plan.estimate.total, "n_ctx": plan.estimate.n_ctx}
    echo(table(outcome.trials))
    echo(f"auto-quant chose '{chosen.label}' ({dst.stat().st_size / 2**20:.1f} MiB, KLD {figures['kld_mean']:.5f}): "
         f"{outcome.why}; {len(outcome.trials)} rounds (bound {outcome.bound}), {len(rungs) + 1} llama.cpp quantizations")
    return section

