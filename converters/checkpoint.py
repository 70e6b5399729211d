"""Read a Hugging Face checkpoint directory without loading it into memory.

Tensors are served one at a time from memory-mapped safetensors shards, so a
converter's peak memory is about one tensor, not one model. Pickle checkpoints
(``pytorch_model*.bin``) can run code when loaded: they are refused unless the
user opts in, and then read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from edgemed.errors import CheckpointError
from edgemed.hashing import files_digest

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth")


def _read_json(path: Path, what: str) -> dict:
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{what} '{path}' is missing.", f"copy the complete checkpoint, including {path.name}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{what} '{path}' is not valid JSON ({exc}).", "re-copy the file; it is corrupt or truncated") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} '{path}' must hold a JSON object.", "re-copy the file; it is not a Hugging Face config")
    return data


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
            raise CheckpointError(
                f"Checkpoint directory '{path}' does not exist.",
                "pass a Hugging Face model directory (config.json, *.safetensors, tokenizer files)",
            )
        config = _read_json(path / "config.json", "Model config")
        shards = cls._safetensors_files(path)
        if shards:
            return cls(path, config, cls._index_safetensors(shards))
        pickles = sorted({p for pat in PICKLE_PATTERNS for p in path.glob(pat)})
        if not pickles:
            raise CheckpointError(
                f"No weights found in '{path}' (no *.safetensors, no pytorch_model*.bin).",
                "copy the weight files next to config.json",
            )
        if not allow_pickle:
            raise CheckpointError(
                f"'{path}' has only pickle weights ({', '.join(p.name for p in pickles)}); loading a pickle can run arbitrary code.",
                "convert the checkpoint to safetensors, or pass --allow-pickle if you trust its origin",
            )
        return cls(path, config, cls._index_pickles(pickles), pickle_files=pickles)

    @staticmethod
    def _safetensors_files(path: Path) -> list[Path]:
        index = path / SAFETENSORS_INDEX
        if index.exists():
            weight_map = _read_json(index, "Safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"'{index}' has no weight_map.", "re-copy the index file from the source checkpoint")
            files = sorted({path / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise CheckpointError(
                    f"Shard(s) {', '.join(missing)} listed in {SAFETENSORS_INDEX} are missing from '{path}'.",
                    "copy every shard of the checkpoint",
                )
            return files
        return sorted(path.glob("*.safetensors"))

    @staticmethod
    def _index_safetensors(files: list[Path]) -> dict[str, TensorRef]:
        refs: dict[str, TensorRef] = {}
        for file in files:
            for name, (dtype, shape) in _safetensors_header(file).items():
                refs[name] = TensorRef(name, tuple(shape), dtype, file)
        return refs

    @staticmethod
    def _index_pickles(files: list[Path]) -> dict[str, TensorRef]:
        import torch

        refs: dict[str, TensorRef] = {}
        for file in files:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for name, t in state.items():
                refs[name] = TensorRef(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), file)
        return refs

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

    def weight_files(self) -> list[Path]:
        return sorted({ref.file for ref in self.tensors.values()})

    def digest(self) -> str:
        """sha256 over the config and weight files (name + content), for provenance."""
        return files_digest([self.path / "config.json", *self.weight_files()])

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


def _safetensors_header(file: Path) -> dict[str, tuple[str, list[int]]]:
    """Parse a safetensors header and check it against the file size (catches truncation)."""
    import struct

    try:
        size = file.stat().st_size
        with file.open("rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise ValueError("file is shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file size {size}")
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"Weights file '{file}' is corrupt: {exc}.", "re-copy the file from the source checkpoint") from None
    out: dict[str, tuple[str, list[int]]] = {}
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            out[name] = (info["dtype"], list(info["shape"]))
            data_end = max(data_end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise CheckpointError(f"Weights file '{file}' has a malformed entry for '{name}'.", "re-copy the file") from None
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"Weights file '{file}' is truncated: its header needs {8 + header_len + data_end} bytes, the file has {size}.",
            "re-copy the file; the copy did not complete",
        )
    return out
