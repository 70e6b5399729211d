"""PEFT LoRA adapters merged into base weights one tensor at a time.

For a target module with base weight ``W [out, in]`` the merged weight is
``W + scale * B @ A`` with ``A [r, in]``, ``B [out, r]`` and
``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA); per-module
``rank_pattern`` / ``alpha_pattern`` override r and alpha. Full replacement
weights saved through ``modules_to_save`` replace the base tensor. A copy of a
base layer (``<module>.base_layer.weight``: PEFT saves one beside a pair on the
LM head or the embedding) is what PEFT loads into that layer, so the pair is
added to the copy. A model whose LM head is its input embedding (tied) cannot
take an adapter that changes either: PEFT changes one of the two, which a file
holding one shared matrix cannot express.
The whole model is never materialised: each base tensor is merged as it streams by.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from edgemed.converters.source.checkpoint import FLOAT_DTYPES, Checkpoint, load_json, row_blocks
from edgemed.converters.source.safetensors_header import read_safetensors_header
from edgemed.errors import AdapterError, CheckpointError, InputError
from edgemed.files.hashing import files_digest

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# adapter_config.json options under which W + scale * B @ A is not what PEFT computes (another merge, a delta applied
# to some tokens only, other layers, a routing between adapters): refused when set. Options that only change training
# (dropout, initialisation, VeLoRA's backward pass) or which modules carry pairs (the tensors say so) are not here.
UNMERGEABLE = {
    "use_dora": "DoRA",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers",
    "use_qalora": "QA-LoRA (A applied to pooled inputs)",
    "alora_invocation_tokens": "Activated LoRA (applied only from its invocation tokens on)",
    "layer_replication": "layer replication (a model with repeated layers)",
    "use_bdlora": "BD-LoRA (block-diagonal factors)",
    "kasa_config": "KaSA (singular values between A and B, base weight truncated)",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing between adapters",
}


#: the two modules a model with tied word embeddings computes with one matrix (Llama and Qwen2 names)
TIED_MODULES = ("lm_head", "model.embed_tokens")
#: PEFT's copy of a base layer's weight, saved when the LM head or the embedding is a target (save_embedding_layers)
BASE_COPY = ".base_layer.weight"


#: PEFT's own defaults (``LoraConfig``) for a config that leaves ``r`` or ``lora_alpha`` out: PEFT loads such an
#: adapter with these, so a merge must use them too (``lora_alpha`` is not ``r`` by default: 8 whatever ``r`` is)
PEFT_R = 8
PEFT_LORA_ALPHA = 8


def lora_alpha(config: dict) -> float:
    """The adapter's ``lora_alpha`` as PEFT reads it: the config's, else PEFT's default (8)."""
    return float(config.get("lora_alpha", PEFT_LORA_ALPHA))


def lora_rank(config: dict) -> int:
    """The adapter's ``r`` as PEFT reads it: the config's, else PEFT's default (8); ``rank_pattern`` overrides it."""
    return int(config.get("r", PEFT_R))


def _module_of(key: str) -> str:
    """The base module an adapter tensor belongs to: "base_model.model.lm_head.lora_A.weight" -> "lm_head"."""
    key = key.removeprefix("base_model.model.")
    key = re.sub(r"\.lora_[AB](\.[^.]+)?\.weight$", "", key)
    key = key.removesuffix(BASE_COPY).removesuffix(".weight").removesuffix(".bias")
    return key.replace(".modules_to_save.default", "")


def refuse_tied_change(keys: list[str], config: dict, ckpt) -> None:
    """Refuse an adapter that changes the LM head or the input embedding of a model that ties them.

    Hugging Face computes such a model with one matrix for both, and so do its GGUF (no output.weight) and the
    layer-at-a-time reference. PEFT wraps one of the two modules: its LoRA pair, or its modules_to_save copy,
    changes that one and leaves the other as it was, i.e. it unties them. Merged into the shared matrix the
    change would reach both (PEFT's merge_and_unload does so); left out, the adapter's change is lost."""
    from edgemed.converters import arch_spec
    from edgemed.converters.arch.base import tied_embeddings

    touched = sorted({m for m in map(_module_of, keys) if m in TIED_MODULES})
    if not touched or not tied_embeddings(ckpt, arch_spec(ckpt.architecture)):
        return
    problem = (f"The adapter changes '{touched[0]}', but this model's LM head is its input embedding (config.json: "
               "tie_word_embeddings), and edgemed's files hold that one matrix once")
    if config.get("ensure_weight_tying") is True:  # PEFT changed both uses alike: its own merge keeps them one matrix
        raise AdapterError(f"{problem}; edgemed does not merge a change to both uses (PEFT's ensure_weight_tying).",
                           "merge it with PEFT's merge_and_unload(), save the merged model and convert that")
    raise AdapterError(
        f"{problem}: the adapter changes only one of its two uses, so merged it would compute another model than the "
        "one trained.",
        "train the adapter without lm_head and embed_tokens in target_modules and modules_to_save; or untie the "
        "base (save it with tie_word_embeddings false and its own lm_head.weight) and train on that")


@dataclass
class LoraPair:
    a: str  # tensor name in the adapter file
    b: str
    scale: float
    rank: int  # what PEFT uses for this module: rank_pattern's where it matches, else r (else 8)
    alpha: float  # ... alpha_pattern's where it matches, else lora_alpha (else 8)


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pattern_regex(key: str) -> str:
    """PEFT's reading of a rank_pattern / alpha_pattern key: a regex matching the module name or a dotted suffix."""
    return rf"(.*\.)?({key})$"


def _regex(pattern: str, key: str, where: Path) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise AdapterError(f"{where}: {key} {pattern[:80]!r} is not a valid regular expression ({exc}).",
                           "fix the pattern (PEFT matches these as Python regular expressions), or re-save the adapter") from None


def validate_adapter_config(config, where: Path) -> None:
    """The adapter_config.json fields the merge (and PEFT, in the parity check) reads, with their types."""
    if not isinstance(config, dict):
        raise AdapterError(f"{where} must hold a JSON object, not a {type(config).__name__}.",
                           "pass the adapter_config.json written by PeftModel.save_pretrained()")

    def bad(key, value, want):
        return AdapterError(f"{where}: '{key}' must be {want}, not {json.dumps(value)[:60]}.",
                            "fix the value or re-save the adapter with PeftModel.save_pretrained()")

    if "r" in config and not _positive_int(config["r"]):
        raise bad("r", config["r"], "a positive integer (the LoRA rank)")
    if "lora_alpha" in config and not _finite(config["lora_alpha"]):
        raise bad("lora_alpha", config["lora_alpha"], "a number")
    for flag in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if config.get(flag) is not None and not isinstance(config[flag], bool):
            raise bad(flag, config[flag], "true or false")
    if config.get("peft_type") is not None and not isinstance(config["peft_type"], str):
        raise bad("peft_type", config["peft_type"], '"LORA"')
    for key, check, want in (("rank_pattern", _positive_int, "positive integers"), ("alpha_pattern", _finite, "numbers")):
        pattern = config.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise bad(key, pattern, "an object of pattern -> value")
        for name, value in pattern.items():
            _regex(name, f"{key} key", where)
            _regex(_pattern_regex(name), f"{key} key", where)
            if not check(value):
                raise bad(f"{key}.{name}", value, want)
    targets = config.get("target_modules")
    if isinstance(targets, str):
        _regex(targets, "target_modules", where)  # PEFT full-matches a string as one regex
    elif targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise bad("target_modules", targets, "a list of module names or one regular expression")


# model_type of a transformers modeling module: "transformers.models.qwen2.modeling_qwen2" -> "qwen2"
_MODELING = re.compile(r"transformers\.models\.([a-z0-9_]+)\.modeling_")
# config.json facts that differ between two different base models of one architecture
_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")


def _last_name(name: str) -> str:
    """The last part of a model's name or path: "org/SmolDoc-base" -> "smoldoc-base" (names compare without case)."""
    return Path(name.strip().rstrip("/")).name.lower()


def _loaded_from(ckpt) -> str | None:
    """The ``_name_or_path`` in the checkpoint's config.json: the model transformers loaded before saving this one.
    A fine-tune saved by transformers 4 carries its parent's name there, so it says where the checkpoint came from,
    never which checkpoint it is."""
    saved = ckpt.config.get("_name_or_path")
    return saved.strip() if isinstance(saved, str) and saved.strip() else None


def _same_bytes(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes: one file (a link, the hub cache's shared blob) without reading it, else
    ``filecmp`` (files of other sizes unread, the rest side by side to the first difference)."""
    import filecmp

    return a.samefile(b) or filecmp.cmp(a, b, shallow=False)


def _same_tensor(ours, theirs, name: str) -> bool:
    """Whether tensor ``name`` (of one shape and dtype in both) holds the same bits in the two checkpoints; a 2-D one
    compared a row block at a time."""
    import numpy as np
    import torch

    def same(a, b) -> bool:  # as integers of the element's width: bitwise (NaN, -0.0), and numpy has no BF16
        width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return np.array_equal(*(t.contiguous().reshape(-1).view(width).numpy() for t in (a, b)))

    shape = ours.tensors[name].shape
    if len(shape) != 2:
        return same(next(ours.iter_tensors([name]))[1], next(theirs.iter_tensors([name]))[1])
    return all(same(ours.read_rows(name, lo, hi), theirs.read_rows(name, lo, hi)) for lo, hi in row_blocks(*shape))


@dataclass(frozen=True)
class BaseCheck:
    """How the base an adapter names (``base_model_name_or_path``) was found to be, or not to be, the checkpoint it is
    merged into: the report's ``lora.base_check`` and the line a conversion prints."""

    matched: bool  # False: its name differs, and nothing could be compared (merged, with a warning)
    by: str  # "folder": it names this very folder; "weights": compared, the same; "names": the weights could not be
    detail: str  # what was compared, or why the weights could not be

    def __str__(self) -> str:
        return f"{'matches' if self.matched else 'name differs'} ({_COMPARED[self.by]}): {self.detail}"


_COMPARED = {"folder": "the same folder", "weights": "weights compared", "names": "names only"}  # BaseCheck.by, in words


def _weights_compared(local: Path, ckpt) -> tuple[str | None, str]:
    """How the weights of the checkpoint folder ``local`` compare with ``ckpt``'s: ``("", how)`` when they are the same
    tensors holding the same bits, ``(what differs, "")`` when not, ``(None, why)`` when that cannot be told: ``local``
    is not a safetensors checkpoint here (none, pickle only: it is not unpickled to be compared, a folder
    ``Checkpoint`` refuses), or a tensor is stored in another dtype (a BF16 copy of an F32 model is the same model,
    rounded).

    The weights alone, not config.json (a config saved again by another transformers version is the same model; its
    shape keys were compared already). Weight files of the same names and bytes are the same weights (compared side
    by side to the first difference, no hashing); else tensor by tensor, so a copy saved in other shards is still
    the same. Two training runs of one recipe (runs/v1/model, runs/v2/model) agree in every name, shape and size and
    differ in their bits: their comparison stops at the first block that differs."""
    if not local.is_dir():
        return None, f"there is no folder '{local}' here (a hub id, or a path on another machine)"
    try:
        theirs = Checkpoint.open(local)
        if set(theirs.tensors) != set(ckpt.tensors):
            odd = sorted(set(theirs.tensors) ^ set(ckpt.tensors))
            return f"tensors {', '.join(odd[:3])}{' and more' if len(odd) > 3 else ''} are in only one of the two", ""
        for name, ref in ckpt.tensors.items():
            other = theirs.tensors[name]
            if tuple(other.shape) != tuple(ref.shape):
                return f"{name} is {list(other.shape)} there and {list(ref.shape)} here", ""
            if other.dtype != ref.dtype:
                return None, (f"'{local}' stores {name} as {other.dtype} and {ckpt.path} as {ref.dtype}, so bits "
                              "cannot be compared (a copy saved in another dtype is the same model, rounded)")
        files, their_files = ckpt.weight_files(), theirs.weight_files()
        if [f.name for f in files] == [f.name for f in their_files] and all(map(_same_bytes, files, their_files)):
            return "", f"'{local}' holds the same weight files as {ckpt.path}, byte for byte"
        differ = next((name for name in ckpt.tensors if not _same_tensor(ckpt, theirs, name)), None)
    except InputError as exc:  # pickle only (never unpickled to be compared), no config, ...
        return None, f"'{local}' is not a checkpoint edgemed compares ({exc.problem.rstrip('.')})"
    except OSError as exc:
        return None, f"'{local}' could not be read ({exc.strerror or exc})"
    if differ:
        return f"{differ} holds other values", ""
    return "", f"'{local}' holds the same tensors as {ckpt.path}, bit for bit, in other files"


def check_base(config: dict, cfg_path: Path, ckpt) -> BaseCheck | None:
    """Compare the base the adapter names with the checkpoint it is merged into.

    Raises ``AdapterError`` when the adapter's own records prove another model: PEFT's ``auto_mapping`` names
    another class, or ``base_model_name_or_path`` is a folder here whose config.json gives another architecture,
    model type or shape, or whose weights are not this checkpoint's (``_weights_compared``). Otherwise says how it
    matched: it names this very folder, or a folder holding these very weights (``by`` "folder", "weights"); or, when
    the named base cannot be read (a hub id, a path elsewhere, pickle weights, another dtype: nothing to compare
    offline, and a copy of a model may live under any name), by name alone (``by`` "names", with why): the last part
    of the name against the checkpoint's folder name, which when they differ is a warning (``matched`` False). The
    config's ``_name_or_path`` is never taken for a match (it names the model a fine-tune was made from); the warning
    says so when it alone has the adapter's base name. None when no base is named."""
    named = config.get("base_model_name_or_path")
    if not isinstance(named, str) or not named.strip():
        return None
    named = named.strip()
    ours_arch, ours_type = ckpt.config.get("architectures") or [None], ckpt.config.get("model_type")
    ours = f"{ckpt.path} ({ours_arch[0]}" + (f", model_type {ours_type})" if ours_type else ")")
    fix = "merge the adapter into the base model it was trained on (adapter_config.json: base_model_name_or_path)"

    def refuse(theirs: str) -> AdapterError:
        return AdapterError(f"The adapter was trained on '{named}' ({theirs}), not on this base model {ours}; its tensor "
                            "shapes may fit, but merged into another model it computes nonsense.", fix)

    mapping = config.get("auto_mapping")
    if isinstance(mapping, dict):
        cls_name, library = mapping.get("base_model_class"), mapping.get("parent_library")
        found = _MODELING.match(library) if isinstance(library, str) else None
        if isinstance(cls_name, str) and ours_arch[0] and cls_name.endswith("ForCausalLM") and cls_name != ours_arch[0]:
            raise refuse(f"{cls_name}, by adapter_config.json's auto_mapping")
        if found and ours_type and found.group(1) != ours_type:
            raise refuse(f"model_type {found.group(1)}, by adapter_config.json's auto_mapping")
    local = Path(named).expanduser()
    try:
        same = local.is_dir() and local.resolve() == ckpt.path.resolve()
        theirs = load_json(local / "config.json", AdapterError, "Base config", "") if (local / "config.json").is_file() else None
    except (OSError, AdapterError):
        same, theirs = False, None
    if same:
        return BaseCheck(True, "folder", f"the adapter names this checkpoint's own folder ('{named}')")
    if isinstance(theirs, dict):
        archs = theirs.get("architectures")
        their_arch = archs[0] if isinstance(archs, list) and archs else None
        if isinstance(their_arch, str) and ours_arch[0] and their_arch != ours_arch[0]:
            raise refuse(their_arch)
        if theirs.get("model_type") and ours_type and theirs["model_type"] != ours_type:
            raise refuse(f"model_type {theirs['model_type']}")
        differ = [k for k in _SHAPE_KEYS if theirs.get(k) is not None and ckpt.config.get(k) is not None
                  and theirs[k] != ckpt.config[k]]
        if differ:
            raise refuse(", ".join(f"{k} {theirs[k]} vs {ckpt.config[k]} here" for k in differ))
    weights, why = _weights_compared(local, ckpt)
    if weights == "":
        return BaseCheck(True, "weights", why)
    if weights is not None:  # a checkpoint here, of this shape, with other weights: the name proves nothing
        raise AdapterError(
            f"The adapter '{cfg_path.parent}' was trained on '{named}' (adapter_config.json: base_model_name_or_path), "
            f"a checkpoint here with the same architecture and shapes as {ckpt.path} but other weights ({weights}): "
            "merged into this one it computes nonsense, and the parity gate cannot see it (its reference merges the "
            "same adapter into the same weights).",
            f"point --lora at the adapter trained for '{ckpt.path}', or convert the checkpoint the adapter names: "
            f"`edgemed convert {named} --lora {cfg_path.parent}`")
    folder = ckpt.path.resolve().name
    if _last_name(named) == folder.lower():
        return BaseCheck(True, "names", f"'{named}' has this checkpoint's folder name ('{folder}'); its weights were "
                                        f"not compared: {why}")
    parent = _loaded_from(ckpt)
    parent = (f" Its config.json's _name_or_path, '{parent}', has the adapter's base name, but that is the model it was "
              "loaded from before it was saved (a fine-tune carries its parent's name there), not this checkpoint, so "
              "it is no match." if parent is not None and _last_name(parent) == _last_name(named) else "")
    return BaseCheck(False, "names", (
        f"the adapter '{cfg_path.parent}' names '{named}' as its base model (adapter_config.json: "
        f"base_model_name_or_path), but it is being merged into {ours}, whose folder name is '{folder}', and the "
        f"weights could not be compared ({why}).{parent} Its tensor shapes fit, so it was merged; if it was trained on "
        "another model, the output computes nonsense. Check that they belong together (the report records both "
        "names: lora.base_model_name_or_path, lora.base_check)."))


def _refuse_not_a_folder(path: Path) -> None:
    """A ``--lora`` path that is no folder, in the words of what is there (nothing, a file, a pipe, a broken link)."""
    if path.is_dir():
        return
    from edgemed.formats.input_file import odd_kind

    fix = "pass the adapter's folder, the one PeftModel.save_pretrained() wrote (adapter_config.json and its weights)"
    if path.is_file():
        raise AdapterError(f"'{path}' is a file, not a PEFT adapter folder.", fix)
    odd = odd_kind(path)  # told from its status, never opened: a FIFO would wait for a writer forever
    if odd is not None:
        raise AdapterError(f"'{path}' is {odd}, not a PEFT adapter folder.", fix)
    raise AdapterError(f"Adapter folder '{path}' does not exist.", f"check the --lora path; {fix}")


class LoraAdapter:
    """An opened adapter: which base tensors it changes and how."""

    def __init__(self, path: Path, config: dict, pairs: dict[str, LoraPair], replacements: dict[str, str], handle,
                 base_check: BaseCheck | None = None, base_copies: dict[str, str] | None = None):
        self.path = path
        self.config = config
        self.pairs = pairs  # base tensor name -> LoraPair
        self.replacements = replacements  # base tensor name -> adapter tensor name
        self.base_copies = base_copies or {}  # base tensor name -> the adapter's copy of it, which its pair adds to
        self._handle = handle
        self.base_check = base_check  # how the base it names was found to be this one (None: none named, or not checked)
        # the adapter names another base, and nothing proves it is this one
        self.base_warning = base_check.detail if base_check is not None and not base_check.matched else None

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path | str, base) -> "LoraAdapter":
        """Open and plan the adapter at ``path`` against ``base``: the opened base ``Checkpoint`` (its tensors, and its
        identity, checked against the adapter's ``base_model_name_or_path``), or a bare ``{name: TensorRef}`` table."""
        from safetensors import safe_open

        base_tensors = base if isinstance(base, dict) else base.tensors
        path = Path(path)
        cfg_path = path / ADAPTER_CONFIG
        _refuse_not_a_folder(path)
        if not cfg_path.exists():
            raise AdapterError(
                f"'{path}' is not a PEFT adapter: {ADAPTER_CONFIG} is missing.",
                "pass the directory written by PeftModel.save_pretrained()",
            )
        config = load_json(cfg_path, AdapterError, "Adapter config", "re-copy the adapter from where it was trained")
        validate_adapter_config(config, cfg_path)
        if config.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"Adapter type '{config.get('peft_type')}' is not LoRA.", "only LoRA adapters can be merged")
        for flag, what in UNMERGEABLE.items():
            if config.get(flag) not in (None, False):  # PEFT turns a variant on by any value, an empty config too
                raise AdapterError(f"Adapter uses {what} (adapter_config.json: {flag}), which edgemed cannot merge: "
                                   "as plain LoRA its weights would compute another model.",
                                   "merge it with PEFT's merge_and_unload() and convert the merged model")
        weights = path / ADAPTER_WEIGHTS[0]
        if not weights.exists():
            raise AdapterError(
                f"'{path}' has no {ADAPTER_WEIGHTS[0]}.",
                "save the adapter with safe_serialization=True (pickle adapters are refused)",
            )
        try:
            header = read_safetensors_header(weights)
        except CheckpointError as exc:
            raise AdapterError(exc.problem, "re-copy the adapter; the file is corrupt") from None
        odd = next(((k, d) for k, (d, _) in header.items() if d not in FLOAT_DTYPES), None)
        if odd:
            raise AdapterError(f"Adapter tensor '{odd[0]}' has dtype {odd[1]}; LoRA weights must be floating point.",
                               "re-save the adapter with PEFT from the trained (unquantized) model")
        try:
            handle = safe_open(str(weights), framework="pt")
            keys = list(handle.keys())
        except Exception as exc:
            raise AdapterError(f"Cannot read '{weights}': {exc}.", "re-copy the adapter; the file is corrupt") from None
        if not isinstance(base, dict):
            refuse_tied_change(keys, config, base)
        pairs, replacements, copies = cls._plan(config, keys, handle, base_tensors)  # shapes first: the plainest refusal
        checked = None if isinstance(base, dict) else check_base(config, cfg_path, base)
        return cls(path, config, pairs, replacements, handle, checked, copies)

    @property
    def base_name(self) -> str | None:
        """What adapter_config.json says the adapter was trained on (``base_model_name_or_path``)."""
        named = self.config.get("base_model_name_or_path")
        return named if isinstance(named, str) and named.strip() else None

    def warn_base(self, echo) -> None:
        """Say how the base the adapter names was checked, by its weights or by its name alone and why; loudly when
        it names another base model (the report records it: ``lora.base_check``)."""
        if self.base_warning:
            echo(f"WARNING: {self.base_warning}")
        elif self.base_check is not None:
            echo(f"adapter base: {self.base_check}")

    @staticmethod
    def _base_name(key: str) -> str:
        # "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" -> "model.layers.0.self_attn.q_proj"
        key = key.removeprefix("base_model.model.")
        return re.sub(r"\.lora_[AB](\.[^.]+)?\.weight$", "", key)

    @classmethod
    def _plan(cls, config: dict, keys: list[str], handle, base_tensors: dict):
        r_default = lora_rank(config)
        alpha_default = lora_alpha(config)
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        rslora = bool(config.get("use_rslora", False))
        pairs: dict[str, LoraPair] = {}
        replacements: dict[str, str] = {}
        copies: dict[str, str] = {}
        # lora_A/B weights are merged; any other LoRA part (an embedding's lora_embedding_A/B, lora_B biases)
        # would be dropped silently, and the parity reference (which merges with this class) could not see it
        odd = next((k for k in keys if ".lora_" in k and not re.search(r"\.lora_[AB](\.[^.]+)?\.weight$", k)), None)
        if odd is not None:
            raise AdapterError(f"Adapter tensor '{odd}' is a LoRA part edgemed cannot merge (only lora_A/lora_B weights of "
                               "linear layers are).", "merge it with PEFT's merge_and_unload() and convert the merged model")
        a_keys = [k for k in keys if ".lora_A." in k]
        for b_key in (k for k in keys if ".lora_B." in k):
            a_key = b_key.replace(".lora_B.", ".lora_A.")
            if a_key not in keys:
                raise AdapterError(f"Adapter has '{b_key}' but not its partner '{a_key}'.", "re-save the adapter with PEFT")
        for a_key in a_keys:
            b_key = a_key.replace(".lora_A.", ".lora_B.")
            if b_key not in keys:
                raise AdapterError(f"Adapter has '{a_key}' but not its partner '{b_key}'.", "re-save the adapter with PEFT")
            module = cls._base_name(a_key)
            base = f"{module}.weight"
            if base not in base_tensors:
                raise AdapterError(
                    f"Adapter targets '{module}', which this base model does not have.",
                    "check that the adapter was trained on this base model (adapter_config.json: base_model_name_or_path)",
                )
            a_shape = handle.get_slice(a_key).get_shape()
            b_shape = handle.get_slice(b_key).get_shape()
            base_shape = base_tensors[base].shape
            if len(a_shape) != 2 or len(b_shape) != 2 or len(base_shape) != 2:
                raise AdapterError(
                    f"Adapter tensors for '{module}' (A {list(a_shape)}, B {list(b_shape)}, base {list(base_shape)}) are not "
                    "all matrices; LoRA adapts 2-D linear weights only.",
                    "re-save the adapter with PEFT; target only linear layers (target_modules)",
                )
            out_f, in_f = base_shape
            if a_shape[1] != in_f or b_shape[0] != out_f or a_shape[0] != b_shape[1]:
                raise AdapterError(
                    f"Adapter shapes for '{module}' (A {list(a_shape)}, B {list(b_shape)}) do not fit the base weight {[out_f, in_f]}.",
                    "this adapter was trained on a different base model; use the matching base checkpoint",
                )
            r = cls._pattern_value(module, rank_pattern, r_default)
            if r != a_shape[0]:
                raise AdapterError(
                    f"adapter_config.json gives '{module}' rank {r}, but its lora_A has {a_shape[0]} rows.",
                    "the config does not belong to these weights: re-copy adapter_config.json with the adapter",
                )
            alpha = float(cls._pattern_value(module, alpha_pattern, alpha_default))
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            pairs[base] = LoraPair(a_key, b_key, scale, r, alpha)
        for key in keys:
            if ".lora_" in key:
                continue
            # modules_to_save: full weights, e.g. "base_model.model.lm_head.weight"; or PEFT's copy of a base layer
            # under a pair ("base_model.model.lm_head.base_layer.weight"), which PEFT loads in place of the base's
            copy = key.endswith(BASE_COPY)
            base = key.removeprefix("base_model.model.").replace(".modules_to_save.default", "").replace(BASE_COPY, ".weight")
            if base not in base_tensors:
                raise AdapterError(f"Adapter carries '{key}', which matches no base tensor.", "use the base model this adapter was trained on")
            if tuple(handle.get_slice(key).get_shape()) != tuple(base_tensors[base].shape):
                raise AdapterError(f"Adapter tensor '{key}' has a different shape from the base tensor '{base}'.", "use the matching base model")
            if copy and base not in pairs:
                raise AdapterError(f"Adapter carries a copy of the base layer '{key}' but no LoRA pair for it.",
                                   "re-save the adapter with PEFT")
            (copies if copy else replacements)[base] = key
        if not pairs and not replacements:
            raise AdapterError("Adapter holds no LoRA weights.", "check that training saved the adapter")
        return pairs, replacements, copies

    @staticmethod
    def _pattern_value(module: str, pattern: dict, default):
        # PEFT matches pattern keys as regex suffixes of the module name
        for key, value in pattern.items():
            if re.match(_pattern_regex(key), module):
                return value
        return default

    # -- merging ------------------------------------------------------------------------
    def apply(self, name: str, tensor):
        """Return ``tensor`` (a torch tensor) with this adapter merged, in float32."""
        import torch

        if name in self.replacements:
            return self._handle.get_tensor(self.replacements[name]).to(torch.float32)
        pair = self.pairs.get(name)
        if pair is None:
            return tensor
        if name in self.base_copies:
            tensor = self._handle.get_tensor(self.base_copies[name])
        a = self._handle.get_tensor(pair.a).to(torch.float32)
        b = self._handle.get_tensor(pair.b).to(torch.float32)
        return tensor.to(torch.float32) + pair.scale * (b @ a)

    def apply_rows(self, name: str, block, start: int):
        """``apply`` for rows ``[start, start + len(block))`` of base tensor ``name`` (a table read in blocks)."""
        import torch

        stop = start + block.shape[0]
        if name in self.replacements:
            return self._handle.get_slice(self.replacements[name])[start:stop].to(torch.float32)
        pair = self.pairs.get(name)
        if pair is None:
            return block
        if name in self.base_copies:
            block = self._handle.get_slice(self.base_copies[name])[start:stop]
        a = self._handle.get_tensor(pair.a).to(torch.float32)
        b = self._handle.get_slice(pair.b)[start:stop].to(torch.float32)
        return block.to(torch.float32) + pair.scale * (b @ a)

    def factors(self, name: str):
        """PEFT's unscaled pair for base tensor ``name``: float32 ``A [r, in]`` and ``B [out, r]`` (an adapter file
        carries them unmerged: ``converters/gguf/adapter.py``)."""
        import torch

        pair = self.pairs[name]
        return self._handle.get_tensor(pair.a).to(torch.float32), self._handle.get_tensor(pair.b).to(torch.float32)

    def rank(self, name: str) -> int:
        """The rank of the pair adapting base tensor ``name`` (its lora_A's rows)."""
        return int(self._handle.get_slice(self.pairs[name].a).get_shape()[0])

    def touches(self, name: str) -> bool:
        return name in self.pairs or name in self.replacements

    def base_copy(self, name: str):
        """The adapter's copy of base tensor ``name`` (float32), or None where it carries none."""
        import torch

        key = self.base_copies.get(name)
        return None if key is None else self._handle.get_tensor(key).to(torch.float32)

    def digest(self) -> str:
        return files_digest([self.path / ADAPTER_CONFIG, self.path / ADAPTER_WEIGHTS[0]])
