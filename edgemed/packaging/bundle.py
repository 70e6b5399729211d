"""Pack a model into a bundle, and verify a bundle directory before it is loaded.

Bundle directory (runnable in place; the model file is mmap'd where it lies)::

    manifest.json        schema edgemed.bundle/1: every other file's path, size, sha256; facts; card
    model.sig            optional OpenSSF model signature over every other file (signing.py);
                         manifest.sig in a bundle an older edgemed signed (ed25519, read only)
    model/<file>.gguf    or model/<onnx dir>/...
    adapters/<name>.lora.gguf  LoRA adapters for the model (``pack --adapter NAME=FILE``), listed under
                         ``adapters`` with the base checkpoint each was made for; an adapter-only bundle
                         has no model file and names its base by that sha256 (``model.format = "adapters"``)
    LICENSE
    card.toml            the model card as written (its fields are also in the manifest)
    report.json          the conversion report, when `edgemed convert` left one (beside the GGUF, inside the ONNX directory)
    templates/...        prompt templates given with --template

The tar form holds the same entries (see archive.py).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgemed import __version__, env
from edgemed.constants import ONNX_OUTPUT_TYPES
from edgemed.files.atomic import atomic_path, refuse_input_as_output
from edgemed.files.hashing import file_sha256
from edgemed.formats.conversion_report import IN_DIRECTORY, existing_report
from edgemed.formats.input_file import odd_kind, read_at_most
from edgemed.errors import InputError, IntegrityError, UnsafeArchive
from edgemed.formats.sniff import sniff
from edgemed.formats.terminal_text import WHY_REFUSED, describe
from edgemed.packaging import facts as facts_mod
from edgemed.packaging import signing
from edgemed.packaging.digest import VerifiedCache, copy_hashed, file_digest, stamp
from edgemed.packaging.manifest import (ADAPTERS_ONLY, MANIFEST, MAX_MANIFEST_BYTES, RESERVED, SIGNATURES, FileEntry, Manifest,
                                         check_name, folded, max_signature_bytes, text_fault)
from edgemed.packaging.signing import Signature
from edgemed.versions import installed_versions
from edgemed.formats.nesting import loads_json

log = logging.getLogger(__name__)

#: the fix of a file missing, resized or altered (``ref`` names the copy's own source for an installed model)
DAMAGED = "the bundle is damaged or was altered; get a fresh copy from its maker and verify again"
REINSTALL = "reinstall the model: edgemed install BUNDLE --force"  # an installed manifest.json changed


@dataclass
class PackInputs:
    model: Path | None  # None: an adapter-only bundle (``adapters`` and ``base_sha256`` given)
    license: Path | None
    name: str | None = None
    card: Path | None = None
    templates: list[Path] = field(default_factory=list)
    report: Path | None = None  # default: the converter's report (edgemed.formats.conversion_report) when it exists
    use_report: bool = True
    adapters: list[tuple[str, Path]] = field(default_factory=list)  # (name, GGUF LoRA adapter file)
    base_sha256: str | None = None  # adapter-only: the base checkpoint's sha256 the adapters are for
    base_name: str | None = None    # adapter-only: the installed model or bundle that holds that base (a hint for install)


def refuse_merged_base(model: str, fix: str) -> None:
    """Refuse adapters for ``model``, which has a LoRA merged into its weights (``provenance.lora_sha256``): pack's
    and ``pack --for-model``'s form of the refusal the runtime makes at load (``runtime.loader.refuse_merged_base``)."""
    raise InputError(f"{model} has a LoRA adapter merged into its weights (convert --lora), and an adapter is made and "
                     "gated for the plain checkpoint: on the merged weights it would change a model it was not trained "
                     "on.", fix)


_ADAPTER_FIX = "make it with `edgemed convert BASE_CHECKPOINT --lora PEFT_ADAPTER --adapter-only -o NAME.lora.gguf`"


def _adapters(inp: PackInputs, base: str | None, arch: str | None, base_label: str) -> list[tuple[Path, str, dict]]:
    """(file, bundle path, manifest entry) per ``--adapter NAME=FILE``, each checked to be a GGUF LoRA adapter made
    for the base checkpoint ``base`` (architecture ``arch``); the refusal names the file and the fix."""
    out, seen = [], set()
    for name, path in inp.adapters:
        try:
            check_name(name)
        except InputError:
            raise InputError(f"--adapter {name!r}={path}: '{name}' is not a valid adapter name.",
                             "use 1-64 characters: lower-case letters, digits, '.', '_' or '-' (e.g. cardio=cardio.lora.gguf)") from None
        if name in seen:
            raise InputError(f"--adapter names '{name}' twice.", "give each adapter its own name")
        seen.add(name)
        if not Path(path).is_file():
            raise InputError(f"Adapter file '{path}' (for '{name}') does not exist.", f"pass an existing .lora.gguf; {_ADAPTER_FIX}")
        try:
            facts = facts_mod.adapter_entry(Path(path))
        except InputError as exc:  # not a GGUF, or a GGUF that is not a LoRA adapter (e.g. a model)
            raise InputError(f"--adapter {name}={path}: {exc.problem}", f"pass a GGUF LoRA adapter file; {_ADAPTER_FIX}") from None
        made_for = facts["base_source_sha256"]
        if made_for is None:
            raise InputError(f"The adapter '{path}' does not record the base checkpoint it was made for (another tool wrote it), "
                             "so nothing can check that it belongs on this base.", f"re-make it for this base; {_ADAPTER_FIX}")
        if base is None:
            raise InputError(f"The base {base_label} does not record the checkpoint it was converted from, so the adapter "
                             f"'{path}' (made for the checkpoint {made_for}) cannot be checked against it.",
                             "pack a base GGUF made by `edgemed convert` from the adapter's base checkpoint")
        if made_for != base:
            raise InputError(f"The adapter '{path}' was made for the base checkpoint {made_for}, but {base_label} is "
                             f"{base}: it would load on the wrong weights.",
                             f"pack it with the base it was made for, or re-make it on this base; {_ADAPTER_FIX}")
        if arch is not None and facts["architecture"] != arch:
            raise InputError(f"The adapter '{path}' is for the {facts['architecture']!r} architecture, but {base_label} is {arch!r}.",
                             "pack it with the base it was made for")
        out.append((Path(path), f"adapters/{name}.lora.gguf", {"name": name, **facts}))
    return out


def _gather_adapters_only(inp: PackInputs) -> tuple[list[tuple[Path, str, str]], dict, dict, list]:
    """An adapter-only bundle: the adapters, the base named by its checkpoint sha256, an optional license."""
    base = (inp.base_sha256 or "").strip().lower()
    if not inp.adapters:
        raise InputError("Nothing to pack: no model and no --adapter.", "pass MODEL.gguf, or --adapter NAME=FILE with --base-sha256 or --for-model")
    if not base:
        raise InputError("An adapter-only bundle must name its base.",
                         "pass --base-sha256 HEX (the base checkpoint's sha256: `edgemed inspect BASE` shows it as 'source') "
                         "or --for-model INSTALLED_NAME")
    if len(base) != 64 or any(c not in "0123456789abcdef" for c in base):
        raise InputError(f"--base-sha256 {inp.base_sha256!r} is not a sha256 (64 hex digits).",
                         "pass the base checkpoint's sha256 as `edgemed inspect BASE` shows it, or --for-model INSTALLED_NAME")
    adapters = _adapters(inp, base, None, "the base named by --base-sha256")
    files = [(src, rel, "adapter") for src, rel, _ in adapters]
    if inp.license is not None:
        if not inp.license.is_file():
            raise InputError(f"License file '{inp.license}' does not exist.", "pass --license with the adapters' license text")
        files.append((inp.license, "LICENSE", "license"))
    if inp.card is not None:
        files.append((inp.card, "card.toml", "card"))
    model_facts = {"format": ADAPTERS_ONLY, "path": "adapters", "arch": adapters[0][2]["architecture"],
                   "base_source_sha256": base, **({"base_name": inp.base_name} if inp.base_name else {})}
    return files, model_facts, {}, adapters


def _report_for(model: Path, given: Path | None) -> Path | None:
    return given if given is not None else existing_report(model)


def _onnx_files(model: Path) -> list[Path]:
    """The files of the ONNX directory ``model``, sorted. Anything in it that is neither a folder nor a regular file
    is refused, naming it, and never opened (told by ``lstat``): a symbolic link is not followed (one to a file put
    that file's bytes in the bundle, one to a folder was left out without a word), and a named pipe, socket or
    device was left out without a word (opening a pipe would block)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(model, followlinks=False):
        for n in sorted(dirnames + filenames):  # a link to a folder is listed with the folders, a dangling one with the files
            p = Path(dirpath) / n
            rel = p.relative_to(model).as_posix()
            try:
                mode = p.lstat().st_mode
            except FileNotFoundError:  # gone since the folder was listed
                continue
            if stat.S_ISLNK(mode):
                raise InputError(f"'{p}' in the ONNX directory '{model}' is a symbolic link (to '{os.readlink(p)}'); a "
                                 "bundle holds the directory's own files, and pack does not follow links.",
                                 f"replace '{rel}' with a copy of what it points to, or remove it, and pack again")
            if stat.S_ISREG(mode):
                found.append(p)
            elif not stat.S_ISDIR(mode):
                raise InputError(f"'{p}' in the ONNX directory '{model}' is {odd_kind(p) or 'not a regular file'}; a "
                                 "bundle holds regular files only, and pack does not leave one out without a word.",
                                 f"remove '{rel}' or move it out of '{model}', and pack again")
    return sorted(found)


def _gather(inp: PackInputs) -> tuple[list[tuple[Path, str, str]], dict, dict]:
    """(source, bundle path, role) for every file; model facts; provenance."""
    model = inp.model
    fmt = sniff(model)
    if fmt is None and model.is_file():
        raise InputError(f"'{model}' is not a GGUF file.", "pass a .gguf made by `edgemed convert`, or an ONNX model directory")
    if fmt == "gguf":
        model_facts, prov = facts_mod.gguf_facts(model)
        model_facts["path"] = f"model/{model.name}"
        files = [(model, model_facts["path"], "model")]
    elif fmt == "onnx":
        onnx_files = _onnx_files(model)  # first: what is not a regular file is refused before any file is read
        model_facts, prov = facts_mod.onnx_facts(model)
        model_facts["path"] = "model/onnx"
        files = [(p, f"model/onnx/{p.relative_to(model).as_posix()}", "model") for p in onnx_files]
    else:
        raise InputError(f"Model '{model}' is neither a GGUF file nor a directory with .onnx files.",
                         "pass the .gguf that `edgemed convert` wrote")
    if inp.license is None or not inp.license.is_file():
        raise InputError(f"License file '{inp.license}' does not exist." if inp.license else "A model bundle needs the model's license.",
                         "pass --license with the model's license text")
    files.append((inp.license, "LICENSE", "license"))
    if inp.card is not None:
        files.append((inp.card, "card.toml", "card"))
    report = _report_for(model, inp.report) if inp.use_report else None
    if report is None and inp.use_report and fmt == "gguf" and "converter_version" in prov:
        # edgemed convert writes the report first, then the GGUF: a converted GGUF without one was interrupted or moved
        raise InputError(f"'{model}' was made by `edgemed convert`, but its conversion report '{model.name}.report.json' "
                         "is not beside it, so its parity and provenance cannot be vouched for.",
                         "re-run `edgemed convert` (with --force) to make the pair again, pass --report with its report, "
                         "or pass --no-report to pack it without one")
    if report is not None:
        prov.update(_report_provenance(report, model))
        files.append((report, "report.json", "report"))
    if fmt == "onnx" and prov.get("out_type") in ONNX_OUTPUT_TYPES:  # the graph's weight type, as its conversion made it
        model_facts["quant"] = prov["out_type"]
    named: dict[str, Path] = {}
    for t in inp.templates:
        if not t.is_file():
            raise InputError(f"Template '{t}' does not exist.", "pass --template with an existing file")
        if folded(t.name) in named:  # one bundle path each (case- and normalisation-insensitive, as on macOS)
            raise InputError(f"Templates '{named[folded(t.name)]}' and '{t}' would both be templates/{t.name} in the bundle.",
                             "rename one of the two files, or pass only one of them")
        named[folded(t.name)] = t
        files.append((t, f"templates/{t.name}", "template"))
    return files, model_facts, prov


#: A conversion report is tens of kilobytes (the per-prompt parity included); a larger one is the wrong file.
MAX_REPORT_BYTES = 16 << 20


def _report_provenance(report: Path, model: Path) -> dict:
    """Provenance and parity from the converter's report (build-machine paths left out)."""
    try:
        r = loads_json(read_at_most(report, MAX_REPORT_BYTES).decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"Cannot read the conversion report '{report}': {exc}.", "re-run `edgemed convert`, or pass --no-report") from None
    if model.is_file() and r.get("size_bytes") not in (None, model.stat().st_size):
        raise InputError(f"The conversion report '{report}' describes a {r.get('size_bytes')}-byte file, not this {model.stat().st_size}-byte model.",
                         "the report is stale: re-run `edgemed convert`, or pass --no-report")
    if model.is_file() and isinstance(r.get("sha256"), str) and r["sha256"] != file_sha256(model):
        raise InputError(f"The conversion report '{report}' describes another file (sha256 {r['sha256'][:12]}...), not this "
                         "model: a conversion was stopped between writing its report and its output, or the files were mixed up.",
                         "re-run `edgemed convert` (with --force) to make the pair again, or pass --no-report")
    if model.is_dir():
        _check_onnx_files(r, report, model)
    src, lora = r.get("source") or {}, r.get("lora") or {}
    out = {"source_sha256": src.get("sha256"), "source_dtype": src.get("dtype"), "lora_sha256": lora.get("sha256"),
           "converter_version": (r.get("converter") or {}).get("version"), "out_type": r.get("out_type") or r.get("weight_type"),
           "parity": r.get("parity"), "tokenizer_check": r.get("tokenizer"),
           "imatrix": r.get("imatrix")}  # the calibration text a 4-bit file was quantized with (name, sha256, tokens)
    return {k: v for k, v in out.items() if v is not None}


_ONNX_REMAKE = ("re-run `edgemed convert --to onnx` (with --force) to make the directory and its report again, "
                "or pass --no-report to pack it without the report's parity and provenance")


def _check_onnx_files(r: dict, report: Path, model: Path) -> None:
    """An ONNX directory holds exactly the files its report names, of the sizes and sha256 it names, so the parity
    and provenance the bundle carries were measured on these bytes. A report without ``files`` (an older edgemed
    wrote it) is taken with a warning, as a GGUF report without its output's sha256 is taken."""
    listed = r.get("files")
    if listed is None:
        log.warning("the conversion report '%s' was written by an older edgemed and names no file digests, so nothing "
                    "checks that its parity was measured on the files of '%s'; re-run `edgemed convert --to onnx --force` "
                    "to have pack check them", report, model)
        return
    if not isinstance(listed, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size_bytes"), int) and isinstance(v.get("sha256"), str) for v in listed.values()):
        raise InputError(f"The conversion report '{report}' has a 'files' entry that is not a map of path to size_bytes "
                         "and sha256.", _ONNX_REMAKE)
    found = {p.relative_to(model).as_posix(): p for p in _onnx_files(model)}
    found.pop(IN_DIRECTORY, None)
    missing, extra = sorted(set(listed) - set(found)), sorted(set(found) - set(listed))
    changed = [rel for rel in sorted(set(listed) & set(found))
               if found[rel].stat().st_size != listed[rel]["size_bytes"] or file_sha256(found[rel]) != listed[rel]["sha256"]]
    if missing or extra or changed:
        what = "; ".join(f"{label}: {', '.join(names)}" for label, names in (
            ("other bytes than the report names", changed), ("missing", missing), ("not in the report", extra)) if names)
        raise InputError(f"The ONNX directory '{model}' does not hold the files its conversion report '{report}' "
                         f"describes ({what}), so the report's parity was not measured on these weights.", _ONNX_REMAKE)


def _runtime_versions(fmt: str) -> tuple[dict, dict]:
    dists = {"gguf": ("llama-cpp-python", "gguf"), "onnx": ("onnxruntime", "onnxruntime-genai")}[fmt]
    built = installed_versions(dists, missing=False)
    # The runtime this bundle was checked with is the minimum we vouch for; older may work, untested.
    minimum = {"edgemed": __version__, **({dists[0]: built[dists[0]]} if dists[0] in built else {})}
    return built, minimum


def build_manifest(name: str, entries: list[FileEntry], model_facts: dict, prov: dict, card: dict, memory: dict,
                   adapters: list | None = None) -> Manifest:
    built, minimum = _runtime_versions("gguf" if model_facts["format"] == ADAPTERS_ONLY else model_facts["format"])
    prov = {**prov, "built_with": built, "min_runtime": minimum}
    epoch = env.source_date_epoch()
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch if epoch is not None else time.time()))
    by_path = {e.path: e for e in entries}
    listed = [{**facts, "path": rel, "size": by_path[rel].size, "sha256": by_path[rel].sha256} for _, rel, facts in adapters or []]
    man = Manifest(name=name, files=entries, model=model_facts, provenance=prov, card=card,
                   memory=memory, adapters=listed, created=created, edgemed_version=__version__)
    man.validate("new manifest")
    fault = text_fault(man.to_dict())  # the card was checked as it was read; facts and the report's text are here
    if fault is not None:
        raise InputError(f"The bundle's manifest field {fault[0]} would hold {describe(fault[1])}, taken from the model "
                         f"file, its conversion report or the card. {WHY_REFUSED} edgemed makes no such bundle, and "
                         "refuses to read one.",
                         "remove the character where that field comes from (the GGUF's metadata, report.json or "
                         "card.toml) and pack again")
    return man


def pack(inp: PackInputs, out: Path, *, as_dir: bool = False, private_key: signing.SigningKey | None = None,
         force: bool = False) -> Manifest:
    """Write a bundle to ``out`` (tar by default, a directory with ``as_dir``), atomically; with ``private_key``
    (``signing.load_private_key``) it holds ``model.sig`` over every file."""
    from edgemed.packaging import card as card_mod

    if inp.model is None and not inp.name:
        raise InputError("An adapter-only bundle needs a name.", "pass --name (e.g. --name mymodel-cardio)")
    name = check_name(inp.name or inp.model.name.split(".")[0].lower())
    card = card_mod.load_card(inp.card) if inp.card else {}
    if inp.model is None:
        sources, model_facts, prov, adapters = _gather_adapters_only(inp)
        memory: dict = {}
    else:
        if inp.base_sha256 is not None:
            raise InputError("--base-sha256 and --for-model name the base of an adapter-only bundle; this bundle holds its base.",
                             "drop --base-sha256/--for-model, or drop MODEL to pack the adapters alone")
        sources, model_facts, prov = _gather(inp)
        if inp.adapters and model_facts["format"] != "gguf":
            raise InputError(f"'{inp.model}' is an ONNX model; LoRA adapters are GGUF files llama.cpp applies to a GGUF base.",
                             "pack the GGUF base with the adapters")
        if inp.adapters and prov.get("lora_sha256"):
            refuse_merged_base(f"'{inp.model}'", "pack the adapters with a GGUF converted without --lora (`edgemed "
                                                 "convert CHECKPOINT`), or pack the merged file alone")
        adapters = _adapters(inp, prov.get("source_sha256"), model_facts.get("arch"), f"the bundle's model '{inp.model}'")
        sources += [(src, rel, "adapter") for src, rel, _ in adapters]
        memory = facts_mod.memory_needs(inp.model, model_facts, sum(src.stat().st_size for src, _, role in sources if role == "model"))
    out = Path(out)
    read = [(f"the {role} file", src) for src, _, role in sources]
    if inp.model is not None and inp.model.is_dir():  # an output inside the ONNX folder would become part of the model
        read.append(("the ONNX model folder", inp.model))
    refuse_input_as_output(out, read, "bundle" if as_dir else None)
    if as_dir:
        with atomic_path(out, force=force, kind="bundle") as tmp:
            tmp.mkdir()
            entries = []
            for src, rel, role in sources:
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(src, "rb") as fh, open(dest, "xb") as dst:
                    digest = copy_hashed(fh, dst, os.fstat(fh.fileno()).st_size, str(src))
                entries.append(FileEntry(rel, dest.stat().st_size, digest, role))
            man = build_manifest(name, entries, model_facts, prov, card, memory, adapters)
            data = man.to_bytes()
            (tmp / MANIFEST).write_bytes(data)
            if private_key is not None:
                sig = signing.sign(man, data, private_key)
                (tmp / sig.file).write_bytes(sig.data)
        return man
    entries = [FileEntry(rel, src.stat().st_size, file_sha256(src), role) for src, rel, role in sources]
    man = build_manifest(name, entries, model_facts, prov, card, memory, adapters)
    data = man.to_bytes()
    sig = signing.sign(man, data, private_key) if private_key is not None else None
    from edgemed.packaging.archive import write_tar

    epoch = env.source_date_epoch()
    with atomic_path(out, force=force) as tmp:
        write_tar(tmp, data, sig, [(src, e) for (src, _, _), e in zip(sources, entries)], epoch if epoch is not None else int(time.time()))
    return man


# -- verification of a bundle directory ----------------------------------------------------
@dataclass
class Verified:
    root: Path
    manifest: Manifest
    manifest_sha256: str
    signed_by: str | None  # key id when a signature was checked
    has_signature: bool
    hashed: list[str] = field(default_factory=list)  # files re-hashed (the rest came from the verified cache)
    signature: Signature | None = None
    manifest_bytes: bytes = b""
    #: every listed file's (stat stamp, sha256): its ``digest.stamp`` as found before its digest was checked, and that
    #: digest; a caller that loads a file later compares it again (``packaging.ref.loaded_as_verified``)
    stamps: dict[Path, tuple[tuple, str]] = field(default_factory=dict)

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model_path


def read_manifest(root: Path) -> tuple[Manifest, bytes, Signature | None]:
    """The manifest, its bytes and the signature (``model.sig``, else an older edgemed's ``manifest.sig``), bounded
    and well formed; nothing is verified here."""
    mpath = root / MANIFEST
    for p in (mpath, *(root / n for n in SIGNATURES)):
        if p.is_symlink() or (p.exists() and not p.is_file()):
            raise UnsafeArchive(f"{p} is not a regular file.", DAMAGED)
    if not mpath.is_file():
        raise IntegrityError(f"'{root}' has no manifest.json: it is not a bundle, or the copy is incomplete.",
                             "pass a bundle made by `edgemed pack` (a .edgemed file or directory)")
    data = _read_at_most(mpath, MAX_MANIFEST_BYTES, "a manifest")
    sig = next((Signature(n, _read_at_most(root / n, max_signature_bytes(n), "a signature")) for n in SIGNATURES
                if (root / n).is_file()), None)
    man = Manifest.from_bytes(data, str(root))
    return man, data, signing.well_formed(sig)


def _read_at_most(path: Path, limit: int, what: str) -> bytes:
    """The bytes of ``path``, refused (not read) when there are more than ``limit``."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise InputError(f"Cannot read {path}: {exc.strerror or exc}.", "check the bundle's permissions, or copy it again") from None
    if len(data) > limit:
        raise IntegrityError(f"{path} holds more than {limit} bytes, too large for {what}.", DAMAGED)
    return data


def _walk(root: Path) -> dict[str, os.stat_result]:
    """Every regular file under ``root`` (relative POSIX path -> lstat); anything else is refused."""
    found: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = os.lstat(p)
            rel = p.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeArchive(f"'{rel}' in {root} is a symbolic link; bundles hold only regular files.", DAMAGED)
            if stat.S_ISREG(st.st_mode):
                found[rel] = st
            elif not stat.S_ISDIR(st.st_mode):
                raise UnsafeArchive(f"'{rel}' in {root} is not a regular file (device, FIFO or socket).", DAMAGED)
    return found


def _check_as_installed(root: Path, data: bytes | None, expected: str) -> None:
    """An installed copy's manifest.json (``data``, or read here, before it is parsed: a damaged one may not parse)
    against the sha256 recorded at install, refused with the fix for an installed model (``ref`` names where the copy
    came from). A link or a folder in its place is left to ``read_manifest``'s refusal."""
    import hashlib

    if data is None:
        try:
            if not stat.S_ISREG((root / MANIFEST).lstat().st_mode):
                return
        except FileNotFoundError:
            raise IntegrityError(f"{root}/manifest.json is gone: the installed copy is incomplete.", REINSTALL) from None
        data = _read_at_most(root / MANIFEST, MAX_MANIFEST_BYTES, "a manifest")
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise IntegrityError(f"{root}/manifest.json was changed after install: expected sha256 {expected}, actual {got}.",
                             REINSTALL)


def verify_dir(root: Path, *, full: bool = False, public_key=None, cache: VerifiedCache | None = None,
               expect_manifest_sha256: str | None = None) -> Verified:
    """Check every file of a bundle directory against its manifest (and signature, with ``public_key``).

    Refuses (IntegrityError and subclasses) a missing, extra, resized or altered file,
    naming the file and the expected and actual digests. ``full`` re-hashes every byte;
    otherwise files unchanged since their last full hash come from the verified cache.
    A folder whose manifest declares more than ``$EDGEMED_MAX_BUNDLE_BYTES`` is refused before anything is hashed
    (``archive.check_room``, as a tar is); an installed copy (``expect_manifest_sha256``: the manifest recorded at
    install, held to the cap then) is not held to it again, so a cap raised for one install does not strand the model.
    """
    import hashlib

    from edgemed.packaging.archive import check_room

    root = Path(root).absolute()
    if expect_manifest_sha256 is not None:
        _check_as_installed(root, None, expect_manifest_sha256)
    man, data, sig = read_manifest(root)
    if expect_manifest_sha256 is None:
        check_room(man, root)  # a huge (sparse) file declared in the manifest would be read in full below
    else:
        _check_as_installed(root, data, expect_manifest_sha256)  # as parsed: it may have changed since
    msha = hashlib.sha256(data).hexdigest()
    signed_by = signing.verify(sig, man, data, public_key) if public_key is not None else None
    found = _walk(root)
    extra = sorted(set(found) - {f.path for f in man.files} - set(RESERVED))
    if extra:
        raise IntegrityError(f"{root} holds extra files not listed in the manifest: {', '.join(extra)}.",
                             "remove them, or get a fresh copy of the bundle")
    hashed, stamps = [], {}
    for f in man.files:
        st = found.get(f.path)
        if st is None:
            raise IntegrityError(f"{root} is incomplete: '{f.path}' is listed in the manifest but missing.", DAMAGED)
        if st.st_size != f.size:
            raise IntegrityError(f"'{f.path}' is {st.st_size} bytes, the manifest lists {f.size} (truncated or altered): "
                                 f"expected sha256 {f.sha256}.", DAMAGED)
        digest, cached = file_digest(root / f.path, cache, full)
        if not cached:
            hashed.append(f.path)
        if digest != f.sha256:
            if cache is not None:  # remembered: the fast path (run, the pull's check for damage) sees it too
                cache.save()
            raise IntegrityError(f"'{f.path}' does not match the manifest: expected sha256 {f.sha256}, actual {digest}.", DAMAGED)
        stamps[root / f.path] = (stamp(st), f.sha256)  # found before the digest: a write since shows as another
    if cache is not None:
        cache.save()
    return Verified(root, man, msha, signed_by, sig is not None, hashed, sig, data, stamps)
