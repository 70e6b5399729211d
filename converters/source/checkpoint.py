"""Read a Hugging Face checkpoint directory without loading it into memory.

Tensors are served one at a time from memory-mapped safetensors shards, so a
converter's peak memory is about one tensor, not one model. Pickle checkpoints
(``pytorch_model.bin``, or the shards its index lists) can run code when loaded: they
are refused unless the user opts in, and then read with ``torch.load(weights_only=True)``.
Only the pickles Hugging Face loading reads as weights are ever unpickled.

An opened ``Checkpoint`` is opened once by a command, with the user's consent flags
(``--allow-pickle``), and handed down (inside a ``source.Source``, with the adapter) to
everything that reads the weights (the GGUF and ONNX writers, the parity reference, the
importance matrix, the budget, the torch baseline). ``as_checkpoint`` opens a bare path
without consent, so a reader given a path refuses pickle weights with the same paragraph as
``convert`` (``pickle_refused``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from edgemed.converters.source.safetensors_header import (  # noqa: F401 (re-exported: the reader's public names)
    DTYPE_SIZES, parse_safetensors_header, read_safetensors_header,
)
from edgemed.errors import CheckpointError, TokenizerError
from edgemed.files.hashing import files_digest

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAME = "pytorch_model.bin"  # the pickle weights Hugging Face loading reads, or the shards its index lists
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth")  # files that look like torch pickles: named, never read, when not weights
ZIP_MAGIC = b"PK\x03\x04"  # how torch's (zip) pickle format starts; the legacy format does not


MAX_JSON_BYTES = 64 * 2**20  # config / index files are kilobytes; refuse to slurp a mislabelled blob
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # what a weight may be stored as
TORCH_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}  # pickle -> safetensors names


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def load_json(path: Path, error: type, what: str, fix: str):
    """Parse a small JSON file; any failure (missing, a directory, a FIFO or device, too large, not UTF-8, not JSON,
    nested too deeply) -> ``error``."""
    from edgemed.formats.input_file import NotRegular, read_at_most

    try:
        raw = read_at_most(path, MAX_JSON_BYTES)
        # nesting: the C parser stops at the interpreter's recursion limit with a RecursionError (caught below); a
        # scan for depth first (formats.nesting) costs seconds on a real tokenizer.json's million brackets
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except FileNotFoundError:
        raise error(f"{what} '{path}' is missing.", fix) from None
    except IsADirectoryError:
        raise error(f"{what} '{path}' is a directory, not a file.", fix) from None
    except NotRegular as exc:
        raise error(f"{what} '{path}' cannot be read: {exc.strerror} (a pipe would block the command, a device "
                    "never end).", fix) from None
    except OSError as exc:
        raise error(f"{what} '{path}' cannot be read ({exc.strerror or exc}).", "check the file's permissions") from None
    except UnicodeDecodeError:
        raise error(f"{what} '{path}' is not UTF-8 text.", fix) from None
    except RecursionError:
        raise error(f"{what} '{path}' is nested too deeply to be a real config.", fix) from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, too-long integers, too large
        raise error(f"{what} '{path}' is not valid JSON ({exc}).", fix) from None


def _read_json(path: Path, what: str) -> dict:
    data = load_json(path, CheckpointError, what, f"re-copy {path.name} from the source checkpoint; it is missing, corrupt or truncated")
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} '{path}' must hold a JSON object, not a {type(data).__name__}.",
                              "re-copy the file; it is not a Hugging Face config")
    return data


@dataclass(frozen=True)
class ShardIndex:
    """A Hugging Face shard index (``model.safetensors.index.json`` or ``pytorch_model.bin.index.json``): the shard
    each tensor is in (``weight_map``) and the bytes of tensors its writer counted (``metadata.total_size``)."""

    file: Path
    weight_map: dict[str, str]
    total_size: int | None

    @property
    def shards(self) -> list[Path]:
        """The shard files it lists: plain file names of its folder, every one there (checked on reading)."""
        return sorted({self.file.parent / name for name in self.weight_map.values()})

    def check(self, tables: dict[Path, dict[str, tuple[str, list[int]]]]) -> None:
        """Refuse shards that do not hold what the index says, tensor by tensor; ``tables``: each shard's tensors
        (name -> dtype, shape), as its header (or, for a pickle read with consent, its state dict) lists them.

        Hugging Face loading and the GGUF route take each tensor from the shard that holds it: a tensor the index
        misplaces, leaves out or lists twice, or one no shard holds, means a shard (or the index) from another save,
        and the weights converted would not be the ones the index describes."""
        where: dict[str, list[str]] = {}
        for file, table in tables.items():
            for name in table:
                where.setdefault(name, []).append(file.name)
        problems: list[str] = []
        for name, held in where.items():
            listed = self.weight_map.get(name)
            if len(held) > 1:
                lists = f"the index lists it in '{listed}'" if listed else "the index does not list it"
                problems.append(f"tensor '{name}' is in both '{held[0]}' and '{held[1]}' ({lists})")
            elif listed is None:
                problems.append(f"'{held[0]}' holds tensor '{name}', which the index does not list")
            elif listed != held[0]:
                problems.append(f"tensor '{name}' is listed in '{listed}' but stored in '{held[0]}'")
        problems += [f"tensor '{name}' is listed in '{shard}', which does not hold it, nor does any shard the "
                     "index lists" for name, shard in self.weight_map.items() if name not in where]
        if problems:
            more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
            raise CheckpointError(
                f"'{self.file}' does not match its shards: {'; '.join(problems[:3])}{more}. A shard (or the index) "
                "is from another save of the model, or cut short, so the weights read would not be the ones the "
                "index describes.",
                f"re-copy the shards named here and {self.file.name} from the source checkpoint, as one "
                "save_pretrained() wrote them: each tensor is in one shard, the one the index names")
        entries = [entry for table in tables.values() for entry in table.values()]
        if self.total_size is None or any(dtype not in DTYPE_SIZES for dtype, _ in entries):
            return  # a dtype with no byte size is refused by name (_float_only)
        held_bytes = sum(DTYPE_SIZES[dtype] * math.prod(shape) for dtype, shape in entries)
        # writers count total_size differently (huggingface_hub: each tensor's whole storage, a view's included;
        # mlx-lm: the shard files, headers included), never below the tensors' own bytes
        if self.total_size < held_bytes:
            names = ", ".join(f.name for f in list(tables)[:3]) + (", ..." if len(tables) > 3 else "")
            raise CheckpointError(
                f"'{self.file}' counts {self.total_size:,} bytes of tensors (metadata.total_size), but its shards "
                f"({names}) hold {held_bytes:,}: a shard holds bigger tensors (another dtype or shape) than the one "
                "the index was written with.",
                f"re-copy the shards from the source checkpoint (compare each file's size with the source's listing); "
                f"if they are the source's, re-copy {self.file.name} too: it is from another save")


def read_shard_index(path: Path, index_name: str, what: str) -> ShardIndex:
    """The Hugging Face index ``index_name`` of ``path``: its shards are plain file names of ``path``, every one
    there. The tensors are checked against the shards' own lists by ``ShardIndex.check``."""
    index = path / index_name
    doc = _read_json(index, what)
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"'{index}' has no weight_map.", "re-copy the index file from the source checkpoint")
    for name in weight_map.values():  # shard names are plain files of this directory, never paths elsewhere
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"'{index}' names a shard {json.dumps(name)[:80]}, which is not a file name in '{path}'.",
                                  "re-copy the index file from the source checkpoint")
    meta = doc.get("metadata")
    total = meta.get("total_size") if isinstance(meta, dict) else None
    shard_index = ShardIndex(index, weight_map, total if _is_int(total) else None)  # optional, and not always a number
    missing = [f.name for f in shard_index.shards if not f.exists()]
    if missing:
        raise CheckpointError(f"Shard(s) {', '.join(missing)} listed in {index_name} are missing from '{path}'.",
                              "copy every shard of the checkpoint")
    return shard_index


# config.json fields the converters read: (keys, kind, upper bound). Bounds keep a corrupt value
# from sizing an allocation (the vocabulary is planned as a list of vocab_size entries).
_INT_FIELDS = {"num_hidden_layers": 4096, "hidden_size": 2**20, "vocab_size": 2**24, "num_attention_heads": 2**16,
               "num_key_value_heads": 2**16, "intermediate_size": 2**22, "max_position_embeddings": 2**31 - 1,
               "head_dim": 2**16}
_FLOAT_FIELDS = ("rms_norm_eps", "rope_theta")
_ROPE_FLOATS = ("factor", "low_freq_factor", "high_freq_factor", "rope_theta")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def sliding_window_of(config: dict) -> int | None:
    """The attention window of a config whose layers (some or all) attend over a sliding window, else None: Qwen2's
    ``use_sliding_window`` with layers from ``max_window_layers`` on, or ``layer_types`` naming sliding layers. A
    window as long as the model's context changes nothing and is None too."""
    n_layers = config.get("num_hidden_layers")
    types = config.get("layer_types")
    sliding = isinstance(types, list) and "sliding_attention" in types
    if config.get("use_sliding_window") is True and _is_int(n_layers):
        start = config.get("max_window_layers", 0)
        sliding = sliding or not (_is_int(start) and start >= n_layers)
    window = config.get("sliding_window")
    if not sliding or not _is_int(window) or window <= 0:
        return None
    context = config.get("max_position_embeddings")
    return None if _is_int(context) and window >= context else window


def validate_config(config: dict, path: Path) -> None:
    """Refuse config.json values the converters would choke on, naming the field and the fix."""
    where = path / "config.json"
    window = sliding_window_of(config)
    if window is not None:  # llama.cpp's llama and qwen2 graphs attend over the whole context: another model past it
        raise CheckpointError(
            f"{where}: its layers attend over a sliding window of {window} tokens (use_sliding_window / layer_types), "
            "which llama.cpp's graph for this architecture does not have: the GGUF would compute another model for "
            "any prompt longer than the window, and a short parity check would not see it.",
            "convert a checkpoint without sliding-window layers: llama.cpp cannot run this one as it was trained")
    quant = config.get("quantization_config")
    if quant is not None:  # transformers quantizes (bitsandbytes) or unpacks the weights by it; a GGUF reads them as stored
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        raise CheckpointError(
            f"{where}: 'quantization_config' ({json.dumps(method or quant)[:60]}) tells Hugging Face loading (the ONNX "
            "route) to quantize the weights, or to read them as quantized, while a GGUF conversion reads the stored "
            "tensors as they are: the two routes would compute different models.",
            "remove 'quantization_config' from config.json once the weights are float: merge or dequantize the model "
            "first (in transformers: model.dequantize(), or merge_and_unload() for a QLoRA, then save_pretrained())")

    def bad(key: str, value, want: str, example) -> CheckpointError:
        return CheckpointError(f"{where}: '{key}' must be {want}, not {json.dumps(value)[:60]}.",
                               f"fix the value (e.g. \"{key}\": {json.dumps(example)}) or re-export the config with save_pretrained()")

    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs)):
        raise bad("architectures", archs, "a non-empty list of class names", ["LlamaForCausalLM"])
    if archs:
        _check_model_type(config, archs[0], where)
    for key, top in _INT_FIELDS.items():
        value = config.get(key)
        if value is not None and not (_is_int(value) and 0 < value <= top):
            raise bad(key, value, f"a positive integer (at most {top:,})", 28 if key == "num_hidden_layers" else 64)
    for key in _FLOAT_FIELDS:
        value = config.get(key)
        if value is not None and not (_is_number(value) and value > 0):
            raise bad(key, value, "a positive number", 1e-6 if key == "rms_norm_eps" else 10000.0)
    tie = config.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise bad("tie_word_embeddings", tie, "true or false", False)
    vocab = config.get("vocab_size")
    for key in ("bos_token_id", "eos_token_id"):
        # gguf-py skips an id outside the vocabulary with a log line: a GGUF without its end-of-text token would
        # never stop a generation where the model does
        value = config.get(key)
        ids = value if isinstance(value, list) and key == "eos_token_id" else [value]
        if value is not None and not (ids and all(_is_int(i) and 0 <= i < (vocab or 2**31) for i in ids)):
            within = f"below vocab_size ({vocab})" if vocab else "not negative"
            raise bad(key, value, f"a token id {within}" + (", or a list of them" if key == "eos_token_id" else ""),
                      2 if key == "eos_token_id" else 1)
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise bad(key, rope, "an object or null", None)
        for sub in _ROPE_FLOATS:
            if rope.get(sub) is not None and not (_is_number(rope[sub]) and rope[sub] > 0):
                raise bad(f"{key}.{sub}", rope[sub], "a positive number", 8.0)
        omax = rope.get("original_max_position_embeddings")
        if omax is not None and not (_is_int(omax) and omax > 0):
            raise bad(f"{key}.original_max_position_embeddings", omax, "a positive integer", 8192)
        kind = rope.get("rope_type", rope.get("type"))
        if kind is not None and not isinstance(kind, str):
            raise bad(f"{key}.rope_type", kind, "a string", "default")
        if kind in ("linear", "yarn", "llama3") and rope.get("factor") is None:  # transformers requires it too
            raise bad(f"{key}.factor", None, f"a positive number for {kind} rope scaling", 8.0)
    heads, kv, hidden = config.get("num_attention_heads"), config.get("num_key_value_heads"), config.get("hidden_size")
    if heads and kv and heads % kv:
        raise CheckpointError(f"{where}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv}).",
                              "re-copy config.json from the source checkpoint; these values cannot both be right")
    if heads and hidden and not config.get("head_dim") and hidden % heads:
        raise CheckpointError(f"{where}: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) "
                              "and no head_dim is given.", "re-copy config.json from the source checkpoint")


def _check_model_type(config: dict, arch: str, where: Path) -> None:
    """Refuse a 'model_type' that is not the one of the class 'architectures' names: the GGUF writer lays out the
    class, Hugging Face loading (the ONNX export, the parity reference) builds the model_type's model, so the two
    routes would compute different models (a Qwen2 loaded as Llama drops its Q/K/V biases). A missing or non-string
    model_type is refused too: Hugging Face loading cannot pick a model class without one."""
    from edgemed.converters import REGISTRY, arch_spec

    if arch not in REGISTRY:  # an unsupported class is refused by name where it is read
        return
    have, want = config.get("model_type"), arch_spec(arch).model_type
    if want is not None and not isinstance(have, str):
        what = "missing" if "model_type" not in config else f"{json.dumps(have)[:60]}, not a string"
        raise CheckpointError(
            f"{where}: 'model_type' is {what}, but 'architectures' names {arch}, and Hugging Face loading reads "
            "model_type to pick the model class: the parity reference and the ONNX route could not load the checkpoint.",
            f"set \"model_type\": \"{want}\" if the weights are a {arch}, or re-copy config.json from the source "
            "checkpoint (or re-save it with save_pretrained())")
    if want is not None and have != want:
        raise CheckpointError(
            f"{where}: 'model_type' is {json.dumps(have)[:60]}, but 'architectures' names {arch}, whose model_type is "
            f"\"{want}\": a GGUF would be written as {arch} while Hugging Face loading (the ONNX route and the parity "
            "reference) builds the model_type's model, so the two would compute different models.",
            f"set \"model_type\": \"{want}\" if the weights are a {arch}, or name the model_type's own class in "
            "'architectures'; re-copying config.json from the source checkpoint restores both")


#: The tokenizer's other files, read by gguf-py (special tokens, chat template) and by transformers. Both skip a
#: name that is not a regular file without a word, so a FIFO or a device in its place would give a GGUF without its
#: chat template or end-of-turn token; the largest real ones are a few MB.
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "added_tokens.json",
              "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")
SIDE_FILE_MAX_BYTES = 64 * 2**20


def check_side_files(model_dir: Path) -> None:
    """Refuse a tokenizer side file that is there but not a regular file of at most ``SIDE_FILE_MAX_BYTES``."""
    from edgemed.formats.input_file import open_regular

    for name in SIDE_FILES:
        path = model_dir / name
        if not os.path.lexists(path):
            continue
        try:
            with open_regular(path) as fh:
                size = os.fstat(fh.fileno()).st_size
        except OSError as exc:
            raise TokenizerError(f"Tokenizer file '{path}' cannot be read: {exc.strerror or exc}.",
                                 f"replace it with the {name} that came with the checkpoint, or remove it") from None
        if size > SIDE_FILE_MAX_BYTES:
            raise TokenizerError(f"Tokenizer file '{path}' is {size:,} bytes, far more than such a file holds "
                                 f"(at most {SIDE_FILE_MAX_BYTES:,}).", f"re-copy {name} from the source checkpoint")


def hf_tokenizer(model_dir: Path):
    """The Hugging Face tokenizer, or a TokenizerError saying why it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # transformers and tokenizers raise many types for a broken tokenizer
        raise TokenizerError(f"The Hugging Face tokenizer in '{model_dir}' cannot be loaded: {type(exc).__name__}: {exc}.",
                             "re-copy the tokenizer files (tokenizer.json, tokenizer_config.json) from the checkpoint") from None


def refuse_what_transformers_would_add(path: Path, config: dict) -> None:
    """Refuse a directory from which Hugging Face loading would read more than the files edgemed indexes.

    The ONNX route, the torch baseline and the ONNX Runtime GenAI builder load the directory with
    ``from_pretrained``, which merges a PEFT adapter it finds beside the model (``adapter_config.json``), and
    loads whatever file config.json's ``transformers_weights`` names, a pickle included, whatever
    ``use_safetensors`` says. Either would make those routes compute other weights than the ones indexed,
    hashed into the provenance and consented to (or not) with ``--allow-pickle``, and than the GGUF route,
    which reads the indexed tensors only."""
    if (path / "adapter_config.json").exists():
        raise CheckpointError(
            f"'{path}' holds a PEFT adapter (adapter_config.json) beside the model's weights: Hugging Face loading "
            "would merge it into the model, a GGUF conversion would not.",
            "move the adapter into its own folder and pass it with --lora DIR, or remove it to use the base alone",
        )
    if (path / SAFETENSORS_NAME).is_file() and (path / SAFETENSORS_INDEX).is_file():
        raise CheckpointError(
            f"'{path}' holds both {SAFETENSORS_NAME} and {SAFETENSORS_INDEX}: Hugging Face loading reads the first, "
            "a GGUF conversion the shards the second lists, so the two routes would convert different weights.",
            f"keep the weights the model is and remove the other ({SAFETENSORS_NAME}, or the index and its shards)",
        )
    safetensors = sorted(p.name for p in path.glob("*.safetensors"))
    pickles = [name for name in (PICKLE_NAME, PICKLE_INDEX) if os.path.lexists(path / name)]
    if safetensors and pickles and hf_weights_name(path) is None:
        raise CheckpointError(
            f"'{path}' holds safetensors under names Hugging Face loading does not look for "
            f"({', '.join(safetensors[:3])}{', ...' if len(safetensors) > 3 else ''}) beside pickle weights "
            f"({', '.join(pickles[:3])}), which it would load instead, unasked.",
            f"name the weights {SAFETENSORS_NAME} (or add the {SAFETENSORS_INDEX} that lists the shards), or remove "
            "the pickle files",
        )
    named = config.get("transformers_weights")
    if named is None:
        return
    default = hf_weights_name(path) or SAFETENSORS_NAME
    if named != default or not (path / default).is_file():
        raise CheckpointError(
            f"{path / 'config.json'}: 'transformers_weights' names {json.dumps(named)[:80]} as the weights to load, "
            f"not the safetensors edgemed reads and hashes ({default}).",
            "remove the 'transformers_weights' key from config.json",
        )


def hf_weights_name(path: Path) -> str | None:
    """The safetensors file Hugging Face loading reads from ``path`` (``model.safetensors``, else the shard index,
    in transformers' own order); ``None`` when neither is there: it would then fall back to a pickle, or fail."""
    for name in (SAFETENSORS_NAME, SAFETENSORS_INDEX):
        if (path / name).is_file():
            return name
    return None


def require_hf_layout(path: Path, pickle_files=()) -> None:
    """Refuse, before transformers or the GenAI builder is started, a folder whose weights they would not find
    (the GGUF route reads them under any name; ``from_pretrained`` only under the standard ones). ``pickle_files``:
    the pickle weights the checkpoint was opened with (with consent): ``Checkpoint.open`` reads the ones
    ``from_pretrained`` loads (``hf_pickle_files``), so they are what it loads."""
    if pickle_files:
        return
    if hf_weights_name(path) is not None:
        return
    names = sorted(p.name for p in Path(path).glob("*.safetensors"))
    raise CheckpointError(
        f"'{path}' has its safetensors under names Hugging Face loading does not look for ({', '.join(names[:3]) or 'none'}"
        f"{', ...' if len(names) > 3 else ''}); the ONNX route loads the model with it.",
        f"name a single file {SAFETENSORS_NAME}, or add the {SAFETENSORS_INDEX} that lists the shards; or convert "
        "with --to gguf, which reads them as they are",
    )


def hf_pickle_files(path: Path) -> list[Path]:
    """The pickle weights Hugging Face loading reads from ``path``: ``pytorch_model.bin``, else exactly the shards
    ``pytorch_model.bin.index.json`` lists (checked as the safetensors index is); [] when neither is there. Any other
    pickle (a stale ``pytorch_model_v0.bin``, Trainer's ``optimizer.pt`` or ``rng_state.pth``) is not weights to
    it, so edgemed never unpickles it either."""
    if os.path.lexists(path / PICKLE_NAME):  # a FIFO or a device there is refused by name where it is read
        return [path / PICKLE_NAME]
    if os.path.lexists(path / PICKLE_INDEX):
        return read_shard_index(path, PICKLE_INDEX, "Pickle index").shards
    return []


def no_weights_error(path: Path) -> CheckpointError:
    """No weights Hugging Face loading reads: none at all, or pickle files under other names, which are not read."""
    others = sorted({p.name for pat in PICKLE_PATTERNS for p in path.glob(pat)})
    if not others:
        return CheckpointError(f"No weights found in '{path}' (no *.safetensors, no {PICKLE_NAME}, no {PICKLE_INDEX}).",
                               "copy the weight files next to config.json")
    return CheckpointError(
        f"'{path}' has no weights Hugging Face loading reads (no *.safetensors, no {PICKLE_NAME}, no {PICKLE_INDEX}); "
        f"its pickle files ({', '.join(others[:4])}{', ...' if len(others) > 4 else ''}) are not read as weights "
        "(a Trainer's optimizer.pt or rng_state.pth is training state), and none was unpickled.",
        f"put the model's weights next to config.json as {SAFETENSORS_NAME}, or as {PICKLE_NAME} (or shards with the "
        f"{PICKLE_INDEX} that lists them), as save_pretrained() writes them: rename weights saved under another name",
    )


def pickle_refused(path: Path, pickles: list[Path]) -> CheckpointError:
    """The one refusal of a pickle-only checkpoint opened without ``--allow-pickle`` (every command says this)."""
    return CheckpointError(
        f"'{path}' has only pickle weights ({', '.join(p.name for p in pickles)}); loading a pickle can run arbitrary code.",
        "convert the checkpoint to safetensors, or pass --allow-pickle if you trust its origin",
    )


def legacy_pickle_error(file: Path) -> CheckpointError:
    """A ``pytorch_model.bin`` in torch's pre-1.6 (non-zip) format, which cannot be memory-mapped."""
    return CheckpointError(
        f"'{file}' is in torch's legacy (non-zip) serialization format, which cannot be memory-mapped, so edgemed "
        "would have to hold the whole file in memory to read it.",
        "re-save it in torch's zip format (in Python: torch.save(torch.load(path, weights_only=True), path)), or "
        "convert the checkpoint to safetensors; then run the command again",
    )


@dataclass
class TensorRef:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: F32, F16, BF16, ...
    file: Path


@dataclass
class Checkpoint:
    """A Hugging Face causal-LM directory: config, weights and tokenizer files."""

    path: Path
    config: dict
    tensors: dict[str, TensorRef]
    pickle_files: list[Path] = field(default_factory=list)

    # -- opening --------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path | str, *, allow_pickle: bool = False) -> "Checkpoint":
        path = Path(path)
        if not path.is_dir():
            hf_dir = "pass a Hugging Face model directory (config.json, *.safetensors, tokenizer files)"
            if path.suffix.lower() == ".gguf" and path.is_file():
                raise CheckpointError(f"'{path}' is a GGUF file, a model already converted, not a Hugging Face "
                                      "checkpoint directory to convert.",
                                      f"run it with `edgemed run {path}`, or package it with `edgemed pack {path} "
                                      f"--license FILE`; to convert, {hf_dir}")
            if path.is_file():
                raise CheckpointError(f"'{path}' is a file, not a Hugging Face checkpoint directory.",
                                      f"{hf_dir}: the folder that holds config.json")
            from edgemed.formats.input_file import odd_kind

            odd = odd_kind(path)  # a FIFO is not opened to find out: that would wait for a writer forever
            if odd is not None:  # something is there (or a link to nothing): "does not exist" would mislead
                why = "; edgemed reads a checkpoint from its folder, never from a pipe or a device" if path.exists() else ""
                raise CheckpointError(f"'{path}' is {odd}, not a Hugging Face checkpoint directory{why}.",
                                      f"{hf_dir}: the folder that holds config.json")
            raise CheckpointError(f"Checkpoint directory '{path}' does not exist.", hf_dir)
        config = _read_json(path / "config.json", "Model config")
        validate_config(config, path)
        refuse_what_transformers_would_add(path, config)
        check_side_files(path)
        index = None
        if (path / SAFETENSORS_INDEX).exists():
            index = read_shard_index(path, SAFETENSORS_INDEX, "Safetensors index")
        shards = index.shards if index else sorted(path.glob("*.safetensors"))
        if shards:
            tables = {file: read_safetensors_header(file) for file in shards}  # headers only: no tensor data is read
            if index:
                index.check(tables)
            return cls(path, config, _float_only(_tensor_refs(tables)))
        pickles = hf_pickle_files(path)
        if not pickles:
            raise no_weights_error(path)
        if not allow_pickle:
            raise pickle_refused(path, pickles)
        tables = cls._pickle_tables(pickles)
        if pickles != [path / PICKLE_NAME]:  # the shards pytorch_model.bin.index.json lists: checked as unpickled
            read_shard_index(path, PICKLE_INDEX, "Pickle index").check(tables)
        return cls(path, config, _float_only(_tensor_refs(tables)), pickle_files=pickles)

    @staticmethod
    def _pickle_tables(files: list[Path]) -> dict[Path, dict[str, tuple[str, list[int]]]]:
        """Each pickle's tensors (name -> dtype, shape), unpickled (``weights_only``, memory-mapped): only ever
        called with the user's consent."""
        import torch

        import zipfile

        from edgemed.formats.input_file import open_regular

        tables: dict[Path, dict[str, tuple[str, list[int]]]] = {}
        for file in files:
            try:
                with open_regular(file) as fh:  # a FIFO would block the reader, a device never end
                    zipped = zipfile.is_zipfile(fh)
                    fh.seek(0)
                    magic = fh.read(4)
            except OSError as exc:
                raise CheckpointError(f"Weights file '{file}' cannot be read ({exc.strerror or exc}).",
                                      "copy the weight file itself into the checkpoint folder") from None
            if not zipped and magic == ZIP_MAGIC:  # a zip's start without its end (the directory): cut short
                raise CheckpointError(f"Weights file '{file}' is truncated or corrupt: it starts as torch's zip format "
                                      "but its zip directory is missing or damaged.",
                                      "copy the file again from the source checkpoint (check its size against the "
                                      "original)")
            if not zipped:  # torch's own refusal ("mmap can only be used with ...") names no fix
                raise legacy_pickle_error(file)
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for a corrupt or hostile pickle
                raise CheckpointError(f"Cannot read pickle weights '{file}': {exc}.",
                                      "re-copy the file, or convert the checkpoint to safetensors") from None
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise CheckpointError(f"'{file}' does not hold a state dict of tensors.", "pass the model's saved state_dict")
            table = tables[file] = {}
            for name, t in state.items():
                dtype = str(t.dtype).removeprefix("torch.")
                table[name] = (TORCH_DTYPES.get(dtype, dtype), list(t.shape))
        return tables

    # -- facts ----------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures")
        if not archs or not isinstance(archs, list):
            raise CheckpointError(
                f"{self.path / 'config.json'} has no 'architectures' list.",
                "add the model class, e.g. \"architectures\": [\"Qwen2ForCausalLM\"]",
            )
        return archs[0]

    def hparam(self, *keys: str, default=None, required: bool = True):
        """The first of ``keys`` present in config.json (or ``default``)."""
        for key in keys:
            if key in self.config and self.config[key] is not None:
                return self.config[key]
        if default is not None or not required:
            return default
        raise CheckpointError(
            f"{self.path / 'config.json'} lacks '{keys[0]}'.",
            "re-export the config with save_pretrained(); the field is required for this architecture",
        )

    def source_dtype(self) -> str:
        """The dominant floating-point dtype of the weights (by element count)."""
        counts: dict[str, int] = {}
        for ref in self.tensors.values():
            n = 1
            for d in ref.shape:
                n *= d
            counts[ref.dtype] = counts.get(ref.dtype, 0) + n
        return max(counts, key=counts.get) if counts else "F32"

    def hf_model(self, **kw):
        """The whole ``AutoModelForCausalLM`` from this directory (``kw``: dtype, attn_implementation, ...).

        Only for a checkpoint opened with consent: a pickle-only one was refused by ``open`` unless
        ``--allow-pickle``; transformers then reads it with ``torch.load(weights_only=True)``."""
        from transformers import AutoModelForCausalLM

        require_hf_layout(self.path, self.pickle_files)
        # transformers fills a missing weight (or, with ignore_mismatched_sizes, one of another shape) with random
        # values and drops an unexpected one with a log line: the model would load and export, as another model
        model, info = AutoModelForCausalLM.from_pretrained(self.path, use_safetensors=not self.pickle_files,
                                                           output_loading_info=True, ignore_mismatched_sizes=True, **kw)
        self._refuse_loading_gaps(info)
        return model

    def _refuse_loading_gaps(self, info: dict) -> None:
        """Raise naming the weights ``from_pretrained``'s loading ``info`` says it did not take from the files."""

        def names(key: str) -> list[str]:
            return sorted(k[0] if isinstance(k, tuple) else str(k) for k in info.get(key) or ())

        def some(items: list[str]) -> str:
            return ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")

        gaps = []
        if names("missing_keys"):
            gaps.append(f"{some(names('missing_keys'))} missing from the weights (it would fill them with random values)")
        if names("mismatched_keys"):
            gaps.append(f"{some(names('mismatched_keys'))} of another shape than config.json implies")
        if names("unexpected_keys"):
            gaps.append(f"{some(names('unexpected_keys'))} stored but not part of the model (it would ignore them)")
        if info.get("error_msgs"):
            gaps.append(f"loading errors: {'; '.join(map(str, info['error_msgs']))[:300]}")
        if gaps:
            raise CheckpointError(
                f"Hugging Face loading of '{self.path}' does not take the model {self.architecture} config.json "
                f"describes from its weights: {'; '.join(gaps)}.",
                "re-copy config.json and every shard from the source checkpoint; they must belong to the same model",
            )

    def read_rows(self, name: str, lo: int, hi: int):
        """Rows ``[lo, hi)`` of the 2-D tensor ``name``, read without the rest of the table (a fresh mapping per
        call, so the pages of a large embedding do not pile up in the resident set)."""
        import torch

        ref = self.tensors[name]
        if self.pickle_files:
            return torch.load(ref.file, map_location="cpu", weights_only=True, mmap=True)[name][lo:hi].clone()
        from safetensors import safe_open

        try:
            with safe_open(str(ref.file), framework="pt") as handle:
                return handle.get_slice(name)[lo:hi]
        except Exception as exc:  # safetensors raises its own types for corrupt data
            raise CheckpointError(f"Cannot read rows {lo}-{hi} of '{name}' from '{ref.file}': {exc}.",
                                  "re-copy the shard; it is corrupt") from exc

    def weight_files(self) -> list[Path]:
        return sorted({ref.file for ref in self.tensors.values()})

    def digest(self) -> str:
        """sha256 over the config and weight files (name + content), for provenance."""
        return files_digest([self.path / "config.json", *self.weight_files()])

    def tokenizer_digest(self) -> str | None:
        """sha256 over the tokenizer files a conversion reads (tokenizer.json and the side files: the vocabulary,
        the special tokens, the chat template), by name and content; None when there are none. ``digest`` leaves
        them out (it names the weights an adapter was trained on); the GGUF embeds what these hold."""
        files = [self.path / n for n in ("tokenizer.json", *SIDE_FILES) if (self.path / n).is_file()]
        return files_digest(files) if files else None

    # -- tensors --------------------------------------------------------------------------
    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, "object"]]:
        """Yield ``(name, torch.Tensor)`` one at a time, in ``names`` order, memory-mapped."""
        import torch
        from safetensors import safe_open

        names = list(self.tensors) if names is None else names
        by_file: dict[Path, object] = {}
        try:
            for name in names:
                ref = self.tensors[name]
                if self.pickle_files:
                    state = by_file.get(ref.file)
                    if state is None:
                        state = by_file[ref.file] = torch.load(ref.file, map_location="cpu", weights_only=True, mmap=True)
                    yield name, state[name]
                    continue
                # A fresh handle per tensor: closing it unmaps the shard, so pages already read
                # do not pile up in the process's resident set (peak stays about one tensor).
                try:
                    with safe_open(str(ref.file), framework="pt") as handle:
                        tensor = handle.get_tensor(name)
                except Exception as exc:  # safetensors raises its own types for corrupt data
                    raise CheckpointError(
                        f"Cannot read tensor '{name}' from '{ref.file}': {exc}.", "re-copy the shard; it is corrupt"
                    ) from exc
                yield name, tensor
        finally:
            by_file.clear()


#: The token embedding and the LM head, by their Hugging Face names in the decoders edgemed converts.
EMBEDDING_NAME, HEAD_NAME = "model.embed_tokens.weight", "lm_head.weight"
_COMPARE_BLOCK_BYTES = 64 * 2**20  # one float32 row block of each table at a time: a 7B's head is a GiB or more


def row_blocks(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    """``(lo, hi)`` row spans of a ``rows`` x ``cols`` table that hold about ``_COMPARE_BLOCK_BYTES`` as float32: a
    table compared a block at a time, never read whole."""
    step = max(1, _COMPARE_BLOCK_BYTES // (4 * max(1, cols)))
    for lo in range(0, rows, step):
        yield lo, min(rows, lo + step)


def check_stored_head(ckpt: Checkpoint, tied: bool) -> None:
    """Refuse tied embeddings (``tied``) beside a stored ``lm_head.weight`` that is not the embedding.

    With tied embeddings the GGUF leaves the stored head out (llama.cpp then computes with the embedding) and the
    parity reference reads the embedding as the head. Transformers ties the two only when they are equal: a
    different stored head is kept and used, so the GGUF, the ONNX export (from_pretrained) and the reference
    would compute different models, and the parity gate compared one with itself. A head equal to the embedding
    (as torch's own ``.bin`` files store it) is the same model every way and passes. Reads both tables, a row
    block at a time; only checkpoints holding both pay for it."""
    if not tied or HEAD_NAME not in ckpt.tensors or EMBEDDING_NAME not in ckpt.tensors:
        return
    if _same_values(ckpt, EMBEDDING_NAME, HEAD_NAME):
        return
    raise CheckpointError(
        f"{ckpt.path / 'config.json'} ties the LM head to the token embedding (tie_word_embeddings is "
        f"{json.dumps(ckpt.config.get('tie_word_embeddings'))}), but the weights also hold an {HEAD_NAME} that differs "
        f"from {EMBEDDING_NAME}: Hugging Face loading then computes with the stored head, while a GGUF and edgemed's "
        "parity reference compute with the embedding, so the output would be another model than the source.",
        f"set \"tie_word_embeddings\": false in config.json to use the stored head, or remove {HEAD_NAME} from the "
        "weights to use the embedding",
    )


def _same_values(ckpt: Checkpoint, a: str, b: str) -> bool:
    """Whether tensors ``a`` and ``b`` hold the same values (compared as float32: exact for F16, BF16 and F32)."""
    import torch

    shape = ckpt.tensors[a].shape
    if shape != ckpt.tensors[b].shape or len(shape) != 2:
        return False
    return all(torch.equal(ckpt.read_rows(a, lo, hi).to(torch.float32), ckpt.read_rows(b, lo, hi).to(torch.float32))
               for lo, hi in row_blocks(*shape))


def as_checkpoint(source: "Checkpoint | Path | str", *, allow_pickle: bool = False) -> Checkpoint:
    """``source`` if it is an opened ``Checkpoint`` (consent already given or not), else the directory opened
    with ``allow_pickle`` (default: no consent, so pickle-only weights are refused by ``pickle_refused``)."""
    if isinstance(source, Checkpoint):
        return source
    return Checkpoint.open(source, allow_pickle=allow_pickle)


def _tensor_refs(tables: dict[Path, dict[str, tuple[str, list[int]]]]) -> dict[str, TensorRef]:
    """One reference per tensor, to the file that holds it; a tensor in two files is refused (Hugging Face loading
    would keep one of the copies without a word). Shards an index lists were checked against it already."""
    refs: dict[str, TensorRef] = {}
    for file, table in tables.items():
        for name, (dtype, shape) in table.items():
            if name in refs:
                raise CheckpointError(f"Tensor '{name}' is in both '{refs[name].file.name}' and '{file.name}'.",
                                      "remove stray shards: keep only those the checkpoint's index lists")
            refs[name] = TensorRef(name, tuple(shape), dtype, file)
    return refs


def _float_only(refs: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """Refuse integer / bool / 8-bit tensors: a weight must be floating point (GPTQ, AWQ or a damaged header are not)."""
    for ref in refs.values():
        if ref.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"Tensor '{ref.name}' in '{ref.file.name}' has dtype {ref.dtype}; edgemed converts floating-point weights "
                f"only ({', '.join(FLOAT_DTYPES)}).",
                "convert the original float checkpoint (not a pre-quantized GPTQ/AWQ/bitsandbytes one), or re-copy the shard",
            )
    return refs
