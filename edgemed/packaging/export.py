"""Interop: an Ollama Modelfile + GGUF, and a plain llama-server command line.

Ollama's TEMPLATE is a Go template, not the Jinja template stored in the GGUF, so
the export maps the GGUF's chat template to a Go template by the markers the
template uses (a table, one row per prompt format). A template no row matches is
left out of the Modelfile: Ollama then falls back to the GGUF's own template, and
the export says so in a comment.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from edgemed import __version__
from edgemed.files.atomic import atomic_path, atomic_paths
from edgemed.errors import InputError, IntegrityError
from edgemed.packaging.bundle import Verified
from edgemed.packaging.digest import copy_hashed


@dataclass(frozen=True)
class PromptFormat:
    name: str
    markers: tuple[str, ...]  # all must appear in the GGUF's Jinja chat template
    go_template: str
    stops: tuple[str, ...]


FORMATS = (
    PromptFormat(
        "chatml", ("<|im_start|>", "<|im_end|>"),
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ("<|im_start|>", "<|im_end|>"),
    ),
    PromptFormat(
        "llama3", ("<|start_header_id|>", "<|eot_id|>"),
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
)

DEFAULT_CTX = 4096
MAX_LICENSE_BYTES = 1 << 20  # a Modelfile's LICENSE block: a license text, not a book


def require_gguf(v: Verified, what: str) -> None:
    """``what`` (an Ollama folder, a llama-server command line, a plain GGUF copy) hands on the bundle's one GGUF
    file: an ONNX bundle (a folder of graph files) or an adapter-only bundle (no model) is refused, named."""
    man = v.manifest
    fmt = man.model.get("format")
    if fmt == "gguf":
        return
    if man.adapters_only:
        raise InputError(f"'{man.name}' holds only LoRA adapters for the base checkpoint {str(man.base_source_sha256)[:12]}..., "
                         f"no model: {what} needs a bundle whose model is a GGUF.",
                         "export the base model's bundle instead; the adapters apply to it with "
                         f"edgemed run BASE --adapter {man.adapters[0]['name'] if man.adapters else 'NAME'}")
    raise InputError(f"'{man.name}' is an {fmt} bundle; {what} needs a bundle whose model is a GGUF.",
                     "export a GGUF bundle (edgemed convert SOURCE --to gguf, then edgemed pack it); "
                     "an ONNX bundle runs with edgemed run or edgemed serve")


def read_license(v: Verified) -> str:
    """The bundle's LICENSE as text: at most MAX_LICENSE_BYTES (a longer one is refused), bytes that are not UTF-8
    shown as U+FFFD (pack takes a license in any encoding, a Latin-1 one included)."""
    path = v.root / "LICENSE"
    with open(path, "rb") as fh:
        data = fh.read(MAX_LICENSE_BYTES + 1)
    if len(data) > MAX_LICENSE_BYTES:
        raise InputError(f"The LICENSE of '{v.manifest.name}' is larger than {MAX_LICENSE_BYTES} bytes, too large for a Modelfile.",
                         "shorten the LICENSE and re-pack, or export with --gguf and write the Modelfile by hand")
    return data.decode("utf-8", errors="replace")


def prompt_format(chat_template: str | None) -> PromptFormat | None:
    if not chat_template:
        return None
    return next((f for f in FORMATS if all(m in chat_template for m in f.markers)), None)


def _block(directive: str, text, what: str, fix: str) -> str:
    '''``DIRECTIVE """text"""``, refusing text that would end the quoted block early. Ollama's Modelfile parser drops
    the characters Go's strconv.IsPrint rejects (controls, format characters such as U+200B or a BOM, spaces other
    than ' ') before it looks for the closing quotes, so a quote, U+200B and two quotes closed the block there and
    the lines after it were read as directives: a bundle's card could replace the safety system prompt. The text is
    checked as Ollama reads it; it is written as it is (Ollama drops those characters itself).'''
    if not isinstance(text, str):
        raise InputError(f"The {what} is not text ({type(text).__name__}).", fix)
    text = text.replace("\r\n", "\n")
    seen = "".join(c for c in text if c.isprintable() or c in "\n\t")  # Python's isprintable: Go's IsPrint, + ' '
    if '"""' in seen:
        hidden = "" if '"""' in text else " once the invisible characters Ollama drops are left out"
        raise InputError(f"The {what} contains '\"\"\"'{hidden}, which a Modelfile cannot quote.", fix)
    return f'{directive} """{text}"""'


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile(v: Verified, gguf_name: str, chat_template: str | None, system: str | None = None) -> str:
    man = v.manifest
    fmt = prompt_format(chat_template)
    ctx = min(man.model.get("context_length") or DEFAULT_CTX, DEFAULT_CTX)
    lines = [f"# Ollama Modelfile for '{man.name}', exported by edgemed {__version__}",
             f"# bundle manifest sha256 {v.manifest_sha256}; model sha256 {man.entry(man.model_path).sha256}",
             f"FROM ./{gguf_name}"]
    if fmt is not None:
        lines.append(_block("TEMPLATE", fmt.go_template, "chat template", "report this as a bug"))
    else:
        lines.append("# TEMPLATE left out: no known prompt format matched; Ollama uses the template stored in the GGUF")
    given = system is not None
    system = system if given else man.card.get("system_prompt")
    if system:
        lines.append(_block("SYSTEM", system, "--system text" if given else "card's system_prompt",
                            "pass printable text with --system" if given else "edit the card's system_prompt and "
                            "re-pack, or pass --system"))
    lines += [f"PARAMETER num_ctx {ctx}", "PARAMETER temperature 0"]
    lines += [f"PARAMETER stop {_quote(s)}" for s in (fmt.stops if fmt else ())]
    lic = man.entry("LICENSE")
    if lic is not None:
        lines.append(_block("LICENSE", read_license(v).strip("\n"), "LICENSE file",
                            "edit the LICENSE and re-pack"))
    return "\n".join(lines) + "\n"


def export_ollama(v: Verified, out_dir: Path, *, system: str | None = None, force: bool = False) -> Path:
    """Write ``out_dir/Modelfile`` and ``out_dir/<name>.gguf``; return the Modelfile path.

    Both are refused (an existing one without ``force``), or both written: each is checked before
    either is written, and complete before either is renamed into place (the GGUF first).
    """
    from edgemed.packaging.facts import chat_template

    man = v.manifest
    require_gguf(v, "an Ollama export")
    gguf_name = f"{man.name}.gguf"
    text = modelfile(v, gguf_name, chat_template(v.model_path), system)  # refused text leaves no folder behind
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"'{out_dir}' cannot be made a folder: a file is in the way.", "choose another --ollama folder") from None
    with atomic_paths([out_dir / gguf_name, out_dir / "Modelfile"], force=force, option="--ollama") as (gguf_tmp, modelfile_tmp):
        _copy_checked(v, gguf_tmp)
        modelfile_tmp.write_text(text, encoding="utf-8")
    return out_dir / "Modelfile"


def copy_verified(v: Verified, dest: Path, *, force: bool = False) -> Path:
    """Copy the bundle's GGUF to ``dest`` (atomically), checking its sha256 on the way."""
    require_gguf(v, "--gguf")
    with atomic_path(dest, force=force, option="--gguf") as tmp:
        _copy_checked(v, tmp)
    return dest


def _copy_checked(v: Verified, tmp: Path) -> None:
    """Copy the bundle's GGUF to the new file ``tmp``, refusing bytes that are not the manifest's."""
    entry = v.manifest.entry(v.manifest.model_path)
    with open(v.model_path, "rb") as src, open(tmp, "xb") as dst:
        digest = copy_hashed(src, dst, entry.size, entry.path)
    if digest != entry.sha256:
        raise IntegrityError(f"'{entry.path}' changed while it was copied: expected sha256 {entry.sha256}, actual {digest}.",
                             "verify the model (edgemed verify NAME --full) and export again")


def llama_server_command(v: Verified, *, host: str = "127.0.0.1", port: int = 8080, ctx: int | None = None) -> str:
    require_gguf(v, "--llama-server")
    man = v.manifest
    n_ctx = ctx or min(man.model.get("context_length") or DEFAULT_CTX, DEFAULT_CTX)
    args = ["llama-server", "--model", str(v.model_path), "--alias", man.name, "--ctx-size", str(n_ctx), "--jinja",
            "--host", host, "--port", str(port)]
    return shlex.join(args)
