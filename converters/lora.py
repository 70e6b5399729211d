"""PEFT LoRA adapters merged into base weights one tensor at a time.

For a target module with base weight ``W [out, in]`` the merged weight is
``W + scale * B @ A`` with ``A [r, in]``, ``B [out, r]`` and
``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA); per-module
``rank_pattern`` / ``alpha_pattern`` override r and alpha. Full replacement
weights saved through ``modules_to_save`` replace the base tensor.
The whole model is never materialised: each base tensor is merged as it streams by.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from edgemed.errors import AdapterError
from edgemed.hashing import files_digest

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class LoraPair:
    a: str  # tensor name in the adapter file
    b: str
    scale: float


class LoraAdapter:
    """An opened adapter: which base tensors it changes and how."""

    def __init__(self, path: Path, config: dict, pairs: dict[str, LoraPair], replacements: dict[str, str], handle):
        self.path = path
        self.config = config
        self.pairs = pairs  # base tensor name -> LoraPair
        self.replacements = replacements  # base tensor name -> adapter tensor name
        self._handle = handle

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path | str, base_tensors: dict) -> "LoraAdapter":
        from safetensors import safe_open

        path = Path(path)
        cfg_path = path / ADAPTER_CONFIG
        if not cfg_path.exists():
            raise AdapterError(
                f"'{path}' is not a PEFT adapter: {ADAPTER_CONFIG} is missing.",
                "pass the directory written by PeftModel.save_pretrained()",
            )
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise AdapterError(f"'{cfg_path}' is not valid JSON ({exc}).", "re-copy the adapter") from None
        if config.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"Adapter type '{config.get('peft_type')}' is not LoRA.", "only LoRA adapters can be merged")
        for flag, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D) layers")):
            if config.get(flag):
                raise AdapterError(f"Adapter uses {what}, which edgemed cannot merge.", "merge it with PEFT's merge_and_unload() and convert the merged model")
        weights = path / ADAPTER_WEIGHTS[0]
        if not weights.exists():
            raise AdapterError(
                f"'{path}' has no {ADAPTER_WEIGHTS[0]}.",
                "save the adapter with safe_serialization=True (pickle adapters are refused)",
            )
        try:
            handle = safe_open(str(weights), framework="pt")
            keys = list(handle.keys())
        except Exception as exc:
            raise AdapterError(f"Cannot read '{weights}': {exc}.", "re-copy the adapter; the file is corrupt") from None
        pairs, replacements = cls._plan(config, keys, handle, base_tensors)
        return cls(path, config, pairs, replacements, handle)

    @staticmethod
    def _base_name(key: str) -> str:
        # "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" -> "model.layers.0.self_attn.q_proj"
        key = key.removeprefix("base_model.model.")
        return re.sub(r"\.lora_[AB](\.[^.]+)?\.weight$", "", key)

    @classmethod
    def _plan(cls, config: dict, keys: list[str], handle, base_tensors: dict):
        r_default = int(config.get("r", 8))
        alpha_default = float(config.get("lora_alpha", r_default))
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        rslora = bool(config.get("use_rslora", False))
        pairs: dict[str, LoraPair] = {}
        replacements: dict[str, str] = {}
        a_keys = [k for k in keys if ".lora_A." in k]
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
            out_f, in_f = base_tensors[base].shape
            if a_shape[1] != in_f or b_shape[0] != out_f or a_shape[0] != b_shape[1]:
                raise AdapterError(
                    f"Adapter shapes for '{module}' (A {list(a_shape)}, B {list(b_shape)}) do not fit the base weight {[out_f, in_f]}.",
                    "this adapter was trained on a different base model; use the matching base checkpoint",
                )
            r = cls._pattern_value(module, rank_pattern, r_default)
            alpha = float(cls._pattern_value(module, alpha_pattern, alpha_default))
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            pairs[base] = LoraPair(a_key, b_key, scale)
        for key in keys:
            if ".lora_" in key:
                continue
            # modules_to_save: full weights, e.g. "base_model.model.lm_head.weight"
            base = key.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
            if base not in base_tensors:
                raise AdapterError(f"Adapter carries '{key}', which matches no base tensor.", "use the base model this adapter was trained on")
            if tuple(handle.get_slice(key).get_shape()) != tuple(base_tensors[base].shape):
                raise AdapterError(f"Adapter tensor '{key}' has a different shape from the base tensor '{base}'.", "use the matching base model")
            replacements[base] = key
        if not pairs and not replacements:
            raise AdapterError("Adapter holds no LoRA weights.", "check that training saved the adapter")
        return pairs, replacements

    @staticmethod
    def _pattern_value(module: str, pattern: dict, default):
        # PEFT matches pattern keys as regex suffixes of the module name
        for key, value in pattern.items():
            if re.search(rf"(^|\.){key}$", module):
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
        a = self._handle.get_tensor(pair.a).to(torch.float32)
        b = self._handle.get_tensor(pair.b).to(torch.float32)
        return tensor.to(torch.float32) + pair.scale * (b @ a)

    def touches(self, name: str) -> bool:
        return name in self.pairs or name in self.replacements

    def digest(self) -> str:
        return files_digest([self.path / ADAPTER_CONFIG, self.path / ADAPTER_WEIGHTS[0]])
