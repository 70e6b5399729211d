"""What a benchmark configuration is, the table of configuration kinds, and the run settings.

A configuration is one artifact under one runtime: a GGUF quant under llama.cpp,
an ONNX int4 directory under onnxruntime, or the Hugging Face checkpoint under
torch (the baselines). Kinds are a table, so a new runtime is a row and a timer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edgemed.errors import InputError


@dataclass(frozen=True)
class Kind:
    runtime: str        # what executes it, as the report names it
    timer: str          # "module:function" that opens it for timing (see timing.py)
    scored: bool        # the accuracy and divergence phases can open it (GGUF / ONNX scorer)
    dists: tuple[str, ...] = ()  # distributions whose installed version is part of a result's key (keys.runtime_identity)
    native: bool = False  # llama.cpp: its native libraries' digest is part of the key too (a rebuild, same version)


KINDS: dict[str, Kind] = {
    "gguf": Kind("llama.cpp", "edgemed.benchmarks.harness.timing:open_gguf", True, ("llama-cpp-python",), True),
    "onnx": Kind("onnxruntime", "edgemed.benchmarks.harness.timing:open_onnx", True, ("onnxruntime",)),
    "hf": Kind("torch", "edgemed.benchmarks.harness.torch_baseline:open_hf", False, ("torch", "transformers")),
}

# --baselines names -> torch dtype of the HF baseline (fp16 only where a GPU exists)
HF_BASELINES = {"hf-fp32": "float32", "hf-bf16": "bfloat16", "hf-fp16": "float16"}

PHASES = ("timing", "divergence", "accuracy")
#: The settings each phase's results depend on (``Settings.digest``: a change re-measures that phase, others do not).
PHASE_SETTINGS = {"timing": ("runs", "warmup", "max_tokens", "prompts_sha256", "threads", "n_ctx", "scenario", "seed"),
                  "accuracy": ("evals", "eval_counts", "eval_context", "seed", "eval_ctx", "eval_score"),
                  "divergence": ("eval_ctx",)}
#: ... of the accuracy's, the one that only sizes its draw: a larger draw extends the same items (prefix-stable)
DRAW_SIZE = "eval_counts"
REFERENCE = "f16"   # the same-runtime baseline, and the divergence reference
#: The contexts of a run without --ctx: timing's, and accuracy and divergence's. A model trained on fewer tokens is
#: measured at its own (``Settings.fitted``): a longer context would be refused, as ``edgemed run`` refuses it.
TIMING_CTX, EVAL_CTX = 2048, 4096

#: The seed paper's claims, shown beside the measured reductions.
PAPER = {"memory_reduction": 0.647, "latency_reduction": 0.124}

#: Built-in benchmark prompts (clinical questions of ordinary length); --prompts replaces them.
DEFAULT_PROMPTS = (
    "A 58-year-old woman with type 2 diabetes has an eGFR of 25 mL/min. Which of her oral glucose-lowering "
    "drugs are still safe, which should be stopped, and why?",
)
#: Where a run's prompts came from: the harness's own (public: recorded by text) or a user's file (a clinic's
#: prompts are health information: recorded by digest and count only, never by text).
PROMPT_SOURCES = ("built-in", "file")


def prompts_digest(prompts) -> str:
    """sha256 of the prompts as a list, not of a file's bytes: the UTF-8 of their JSON array (``ensure_ascii`` off).
    The same prompts as .txt or .jsonl, or with other blank lines, are the same measurement and the same digest."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode("utf-8")).hexdigest()


def public_settings(d: dict) -> dict:
    """A settings dict (``Settings.to_dict``, or one an older edgemed wrote with every prompt's text in it) as it may
    be written to a shared file: a file's prompts by digest and count, never by text (``Settings.to_dict``)."""
    d = dict(d)
    if "prompts" not in d:
        return d
    prompts = tuple(d.pop("prompts") or ())
    source = d.get("prompts_source") or ("built-in" if prompts == DEFAULT_PROMPTS else "file")
    if prompts:
        d.update(prompts_sha256=prompts_digest(prompts), n_prompts=len(prompts))
    d["prompts_source"] = source
    if source == "built-in":
        d["prompts"] = list(prompts)
    return d


@dataclass(frozen=True)
class Config:
    name: str           # e.g. "q4_k_m", "onnx-int4", "hf-fp32"; also the raw file prefix
    kind: str           # key of KINDS
    path: str           # the artifact: .gguf file, ONNX directory, HF checkpoint directory
    dtype: str = ""     # torch dtype for HF baselines
    allow_pickle: bool = False  # HF baselines: the user's --allow-pickle (pickle-only weights are refused without it)
    use_mmap: bool | None = None  # GGUF: map the file (True) or read it in (False) over the profile's choice; None: the profile's

    @property
    def spec(self) -> Kind:
        return KINDS[self.kind]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Settings:
    """Everything that makes two measurements comparable; it is part of every result's key.

    The prompts' text is held here for the measuring child, never written: ``to_dict`` (results.json, raw results,
    the child's task file) gives ``prompts_sha256`` (``prompts_digest``), ``n_prompts`` and ``prompts_source``, and
    the text itself only for the built-in prompts. ``prompts`` is empty in settings read back from a report (the text
    is not there to read): they describe a measurement and cannot make one."""

    runs: int = 5
    warmup: int = 1
    max_tokens: int = 64
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    prompts_source: str | None = None  # PROMPT_SOURCES; None: "built-in" for DEFAULT_PROMPTS, else "file"
    prompts_sha256: str = ""       # derived from ``prompts``; given only without them (settings read from a report)
    n_prompts: int = 0             # likewise
    threads: int | None = None
    n_ctx: int = TIMING_CTX
    profile: str | None = None
    seed: int = 0
    scenario: str = "single-stream"
    evals: tuple[str, ...] = ()
    eval_n: int = 300              # items drawn from each file that ``eval_sizes`` does not size
    eval_sizes: tuple[int, ...] = ()  # items drawn from each of ``evals``, in order (empty: ``eval_n`` each)
    eval_context: bool = False     # PubMedQA with its abstract (False: the question-only setting, ~8x cheaper)
    eval_score: str = "logits"     # accuracy.SCORES: letter logits only, or also a parsed generated answer
    eval_threads: int | None = None  # threads for accuracy and divergence (None: ``threads``); scores do not depend on it
    eval_ctx: int = EVAL_CTX
    ctx_given: bool = False        # --ctx set n_ctx and eval_ctx; else they are the defaults, ``fitted`` to the model
    eval_replies: bool = False     # keep generated replies' text in the accuracy records (--keep-replies); not scored
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_prompts()
        if self.runs < 1:
            raise InputError(f"--runs must be at least 1, got {self.runs}.", "pass --runs 5 (the default) or more")
        if self.warmup < 0:
            raise InputError(f"--warmup must be 0 or more, got {self.warmup}.", "pass --warmup 1")
        object.__setattr__(self, "eval_sizes", tuple(int(n) for n in self.eval_sizes))
        if self.eval_sizes and len(self.eval_sizes) != len(self.evals):
            raise InputError(f"{len(self.eval_sizes)} item counts for {len(self.evals)} evaluation files.",
                             "pass one --eval-n for every --eval file, or a single one for all")
        if self.eval_score not in ("logits", "both"):
            raise InputError(f"Unknown --eval-score {self.eval_score!r}.", "choose logits or both")
        if self.max_tokens < 2:
            raise InputError(f"--max-tokens must be at least 2 (decode speed needs two tokens), got {self.max_tokens}.",
                             "pass --max-tokens 64")

    def _check_prompts(self) -> None:
        prompts = tuple(self.prompts)
        object.__setattr__(self, "prompts", prompts)
        if prompts:
            digest = prompts_digest(prompts)
            if self.prompts_sha256 and self.prompts_sha256 != digest:
                raise ValueError("these prompts are not the ones whose digest the settings name")
            object.__setattr__(self, "prompts_sha256", digest)
            object.__setattr__(self, "n_prompts", len(prompts))
        elif not self.prompts_sha256:
            raise ValueError("settings without prompts must name their digest (prompts_sha256)")
        source = self.prompts_source or ("built-in" if prompts == DEFAULT_PROMPTS else "file")
        if source not in PROMPT_SOURCES:
            raise ValueError(f"prompts_source {source!r}: one of {', '.join(PROMPT_SOURCES)}")
        if source == "built-in" and not prompts:
            raise ValueError("built-in prompts are recorded by text: settings of built-in prompts hold them")
        object.__setattr__(self, "prompts_source", source)

    def to_dict(self) -> dict:
        """The public form, written to every shared file: a file's prompts by digest and count, never by text."""
        d = asdict(self)
        if self.prompts_source == "built-in":  # the harness's own, public
            d["prompts"] = list(self.prompts)
        else:
            del d["prompts"]
        d["evals"] = list(self.evals)
        d["eval_sizes"] = list(self.eval_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict, prompts=None) -> Settings:
        """Settings from ``to_dict``'s form (or an older edgemed's, with the prompts' text), with the prompts' text
        where the caller has it (the child reads it from its stdin); keys that are not settings are left out."""
        s = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if prompts is not None:
            s["prompts"] = prompts
        s["prompts"] = tuple(s.get("prompts") or ())
        s["evals"] = tuple(s.get("evals") or ())
        return cls(**s)

    @property
    def eval_counts(self) -> tuple[int, ...]:
        """Items drawn from each of ``evals``."""
        return self.eval_sizes or (self.eval_n,) * len(self.evals)

    def fitted(self, trained: int | None) -> Settings:
        """These settings for a model trained on ``trained`` tokens (None: not known): without --ctx, each phase's
        default context cut to it (a key changes only where a context does); a --ctx is the user's and stays."""
        if self.ctx_given or not trained:
            return self
        return replace(self, n_ctx=min(self.n_ctx, trained), eval_ctx=min(self.eval_ctx, trained))

    def context_of(self, phase: str) -> str:
        """How ``phase``'s context was chosen, in a refusal's words: ``--ctx N``, the bench's default, or that default
        cut to the model's trained context (``fitted``)."""
        n, default = (self.n_ctx, TIMING_CTX) if phase == "timing" else (self.eval_ctx, EVAL_CTX)
        if self.ctx_given:
            return f"--ctx {n}"
        if n == default:
            return f"the bench's default {default}"
        return f"the bench's default {default}, cut to the {n} tokens the model was trained on"

    @property
    def scoring_threads(self) -> int:
        return self.eval_threads or self.threads or 1

    def digest(self, phase: str) -> str:
        """sha256 over the settings that phase depends on (a change re-measures; others do not)."""
        d = self.to_dict()
        d["eval_counts"] = list(self.eval_counts)
        # the prompts by their digest: a digest over their text (edgemed before prompts_sha256) is of another body and
        # never matches, so a timing result measured before is measured again, not taken under the new key
        body = json.dumps({k: d[k] for k in PHASE_SETTINGS[phase]}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()


def asked_as(settings: dict) -> dict:
    """How an accuracy result asked and scored its items: its phase's settings (``PHASE_SETTINGS``) but the draw's
    size, from the settings its raw file holds (``Settings.to_dict``; one an older edgemed wrote may lack a key, which
    then had its default). Two results that differ only in the size of their draw asked the items they share alike."""
    defaults = {name: f.default for name, f in Settings.__dataclass_fields__.items()}
    return {k: list(v) if isinstance(v := settings.get(k, defaults.get(k)), (list, tuple)) else v
            for k in PHASE_SETTINGS["accuracy"] if k != DRAW_SIZE}


def beyond_settings(key: dict | None) -> dict:
    """A result's key without its settings digest: what says which artifact, runtime, profile and methods measured it."""
    return {k: v for k, v in (key or {}).items() if k != "settings_sha256"}


def read_prompts(path: Path) -> tuple[str, ...]:
    """Prompts from a .txt file (one per non-empty line) or JSONL (a "prompt" or "question" field per line)."""
    from edgemed.formats.input_file import read_at_most

    try:  # a regular file of at most 64 MiB: a FIFO would block, /dev/zero never end
        lines = [ln.strip() for ln in read_at_most(path, 64 << 20).decode("utf-8").splitlines() if ln.strip()]
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise InputError(f"Cannot read prompts file '{path}': {why}.", "pass a readable .txt or .jsonl file") from None
    if path.suffix != ".jsonl":
        prompts = lines
    else:
        prompts = []
        for i, ln in enumerate(lines, 1):
            try:
                row = json.loads(ln)
            except ValueError:
                raise InputError(f"{path}:{i} is not JSON.", "write one JSON object per line with a \"prompt\" field") from None
            text = row.get("prompt") or row.get("question") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise InputError(f"{path}:{i} has no \"prompt\" or \"question\" string.", "add a \"prompt\" field to every line")
            prompts.append(text)
    if not prompts:
        raise InputError(f"Prompts file '{path}' is empty.", "put at least one prompt in it")
    return tuple(prompts)


def config_for_artifact(path: Path, name: str | None = None, allow_pickle: bool = False) -> Config:
    """One configuration for a model given by path (``bench run``): a .gguf file, an ONNX or an HF directory.

    An HF directory is opened here with the user's consent (``allow_pickle``): pickle-only weights are refused
    before anything is measured, with the paragraph ``convert`` gives."""
    from edgemed.formats.sniff import model_format

    if path.is_dir() and (path / "config.json").exists() and not any(path.glob("*.onnx")):
        from edgemed.converters.source.checkpoint import Checkpoint

        Checkpoint.open(path, allow_pickle=allow_pickle)
        return Config(name or "hf-fp32", "hf", str(path), "float32", allow_pickle)
    fmt = model_format(path)
    stem = path.stem if path.is_file() else path.name
    return Config(name or stem, fmt, str(path))


def parse_list(text: str | None, allowed: tuple[str, ...] | dict, what: str) -> list[str]:
    """``a,b,c`` -> ["a", "b", "c"], each checked against ``allowed``."""
    items = [t.strip().lower() for t in (text or "").split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise InputError(f"Unknown {what}: {', '.join(bad)}.", f"choose from: {', '.join(allowed)}")
    return items
