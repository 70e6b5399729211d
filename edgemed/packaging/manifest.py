"""The bundle manifest: one JSON schema, versioned, validated on every read.

A bundle is a directory (or a tar of one) holding ``manifest.json``, an optional
signature (``model.sig``, the OpenSSF model signature; ``manifest.sig`` in bundles an
older edgemed signed) and the files the manifest lists. The manifest names every other
file with its size and sha256, so a signature over the manifest's exact bytes covers
the whole bundle. Readers refuse a manifest whose major schema version
they do not know, any file name that could leave the bundle directory, and any text a terminal would act on
instead of showing (control characters, bidirectional overrides: ``formats.terminal_text``).
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath

from edgemed.formats.nesting import MAX_DEPTH, too_deep
from edgemed.formats.terminal_text import WHY_REFUSED, control_in, describe, first_control
from edgemed.errors import IntegrityError, InputError, UnsafeArchive
from edgemed.packaging.card import is_prose

SCHEMA = "edgemed.bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "model.sig"            # OpenSSF Model Signing (edgemed.packaging.signing)
LEGACY_SIGNATURE = "manifest.sig"  # an older edgemed's ed25519 signature, read only
SIGNATURES = (SIGNATURE, LEGACY_SIGNATURE)
RESERVED = (MANIFEST, SIGNATURE, LEGACY_SIGNATURE)
MAX_MANIFEST_BYTES = 4 << 20
MAX_SIGNATURE_BYTES = 64 << 10     # manifest.sig (a few hundred bytes)
MAX_MODEL_SIG_BYTES = 4 << 20      # model.sig lists every file: ~200 bytes per file, up to MAX_FILES


def max_signature_bytes(name: str) -> int:
    return MAX_MODEL_SIG_BYTES if name == SIGNATURE else MAX_SIGNATURE_BYTES
MAX_FILES = 10_000
ROLES = ("model", "license", "card", "report", "template", "adapter", "other")
#: ``model.format`` of a bundle that carries only LoRA adapters for a base it names by sha256 (no model file)
ADAPTERS_ONLY = "adapters"
#: Formats whose ``model.path`` is a folder of listed files (ONNX: model/onnx/...; adapters: adapters/...); any other
#: model is exactly one listed file
_FOLDER_MODELS = ("onnx", ADAPTERS_ONLY)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def check_name(name: str) -> str:
    """A model name usable as a store key and a directory name."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:  # fullmatch: "$" would let a final newline through
        raise InputError(
            f"'{name}' is not a valid model name.",
            "use 1-64 characters: lower-case letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


#: Folders a bundle path may nest (edgemed writes at most 2: model/x.gguf, adapters/y.gguf); a deeper path costs
#: every check that walks its parents and is not one edgemed makes
MAX_PATH_DEPTH = 16


def check_relpath(name: str, where: str = "bundle") -> str:
    """A file name inside a bundle: relative, POSIX, no '..', no drive, at most ``MAX_PATH_DEPTH`` components, no
    control character, bidirectional override or lone surrogate (``terminal_text.CONTROL``: a tar name's undecodable
    byte is one)."""
    parts = name.split("/")
    bad = (
        not name
        or name.startswith("/")
        or "\\" in name
        or first_control(name) is not None
        or re.match(r"^[A-Za-z]:", name)
        or any(p in ("", ".", "..") for p in parts)
        or len(name) > 1024
        or len(parts) > MAX_PATH_DEPTH
    )
    if bad:
        kind = "an absolute path" if name.startswith("/") or re.match(r"^[A-Za-z]:", name or "") else "an unsafe path"
        raise UnsafeArchive(
            f"The {where} names {kind}: {name!r}. Entries must be plain relative paths inside the bundle.",
            "do not install this file; ask the sender for a bundle made by `edgemed pack`",
        )
    return str(PurePosixPath(name))


def folded(path: str) -> str:
    """The name a case-insensitive, normalisation-insensitive file system (macOS's APFS and HFS+, Windows, FAT on a
    USB stick) takes ``path`` to be: Unicode case folding of the canonical decomposition. Two listed paths with one
    folded name would land in one file there ("Model.gguf" and "model.gguf"; "é" composed and decomposed)."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", path).casefold())


def _prose(path: tuple) -> bool:
    """The model card's prose fields may hold line breaks and tabs; no other string of a manifest may."""
    return len(path) > 1 and path[0] == "card" and is_prose(path[1:])


def text_fault(tree: dict) -> tuple[str, str] | None:
    """Where a manifest (parsed, or ``Manifest.to_dict``) holds a character no manifest may, and which:
    ``("card.version", "\x1b")``; None when it holds none."""
    return control_in(tree, _prose)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# Top-level fields and their JSON types; a reader must not meet a list where it expects an object.
_TOP_TYPES = {"name": str, "files": list, "model": dict, "provenance": dict, "card": dict, "memory": dict, "adapters": list}
_REQUIRED = ("name", "files", "model")
_KIND_NAMES = {str: "a string", list: "a list", dict: "an object"}


#: The largest size, byte count or context length a manifest may hold (1 PiB, $EDGEMED_MAX_BUNDLE_BYTES's own ceiling):
#: readers show them as floats (``n / 1e6``), which "params": 1 followed by 400 zeros overflowed, in `edgemed list`
#: for the whole store
MAX_COUNT = 1 << 50
#: A parameter count stays below 2**53, where a float (as ``list`` and ``inspect`` show it) still holds it exactly
MAX_PARAMS = (1 << 53) - 1


def _int(v, most: int = MAX_COUNT) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= most


def _opt(check):
    return lambda v: v is None or check(v)


def _str_map(v) -> bool:
    return isinstance(v, dict) and all(isinstance(x, str) for x in v.values())


def _need(v) -> bool:
    return (isinstance(v, dict) and _int(v.get("n_ctx")) and _int(v.get("bytes"))
            and v.get("fits") in (True, False, None) and _opt(_int)(v.get("budget_bytes")))


#: Fields readers print or compute with (inspect, export, the store): (section, key) -> (check, what it must be).
_FIELD_CHECKS = {
    ("model", "format"): (lambda v: v in ("gguf", "onnx", ADAPTERS_ONLY), "'gguf', 'onnx' or 'adapters'"),
    ("model", "arch"): (_opt(lambda v: isinstance(v, str)), "a string"),
    ("model", "quant"): (_opt(lambda v: isinstance(v, str)), "a string"),
    ("model", "params"): (lambda v: _int(v, MAX_PARAMS), "a whole number below 2**53"),
    ("model", "context_length"): (_opt(_int), "a whole number of at most 2**50"),
    ("model", "chat_template_sha256"): (_opt(lambda v: isinstance(v, str)), "a string"),
    ("model", "tokenizer_sha256"): (_opt(lambda v: isinstance(v, str)), "a string"),
    ("provenance", "built_with"): (_str_map, "an object of version strings"),
    ("provenance", "min_runtime"): (_str_map, "an object of version strings"),
    ("memory", "method"): (lambda v: isinstance(v, str), "a string"),
    ("memory", "by_context"): (lambda v: isinstance(v, dict) and all(_int(x) for x in v.values()),
                               "an object of byte counts (each at most 2**50)"),
    ("memory", "profiles"): (lambda v: isinstance(v, dict) and all(_need(x) for x in v.values()),
                             "an object of {n_ctx, bytes, budget_bytes, fits} (whole numbers of at most 2**50)"),
}


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str
    role: str = "other"


@dataclass
class Manifest:
    name: str
    files: list[FileEntry]
    model: dict
    provenance: dict = field(default_factory=dict)
    card: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    adapters: list = field(default_factory=list)  # LoRA adapters: {name, path, sha256, size, alpha, rank, base_source_sha256, ...}
    created: str = ""
    edgemed_version: str = ""
    schema: str = SCHEMA

    # -- reading ------------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, data: bytes, source: str = "manifest") -> "Manifest":
        if len(data) > MAX_MANIFEST_BYTES:
            raise IntegrityError(f"{source}: the manifest is {len(data)} bytes, more than the {MAX_MANIFEST_BYTES} allowed.",
                                 "this is not a bundle made by `edgemed pack`")
        damaged = "the bundle is damaged or was altered; get a fresh copy and verify again"
        if too_deep(data):
            raise IntegrityError(f"{source}: manifest.json nests more than {MAX_DEPTH} levels deep.", damaged)
        try:
            raw = json.loads(data.decode("utf-8"))
        except ValueError as exc:  # not UTF-8, not JSON, or a number too long to convert
            raise IntegrityError(f"{source}: manifest.json is not valid JSON ({exc}).", damaged) from None
        if not isinstance(raw, dict):
            raise IntegrityError(f"{source}: manifest.json is not a JSON object.", "get a fresh copy of the bundle")
        fault = text_fault(raw)  # before any of it is used or printed
        if fault is not None and 0xD800 <= ord(fault[1]) <= 0xDFFF:  # json.loads accepts "\ud800": it is no character
            raise IntegrityError(f"{source}: manifest.json field {fault[0]} holds a lone UTF-16 surrogate (an escape such "
                                 "as \\ud800 that stands for no character).", damaged)
        if fault is not None:
            raise IntegrityError(
                f"{source}: manifest.json field {fault[0]} holds {describe(fault[1])}. {WHY_REFUSED} edgemed reads no "
                "bundle whose text holds control characters (line breaks and tabs only in the card's prose), DEL or "
                "bidirectional overrides, signed or not: a signature says who made a bundle, not that its text is safe "
                "to print, so a bundle signed with such text is refused too.",
                "do not install it; ask its maker to remove the character (from card.toml, or wherever that field "
                "comes from) and pack it again with this edgemed, which refuses to make such a bundle")
        schema = raw.get("schema", "")
        family, _, major = str(schema).partition("/")
        if family != SCHEMA.split("/")[0]:
            raise IntegrityError(f"{source}: not an edgemed bundle manifest (schema {_short(schema)}).",
                                 "pass a bundle made by `edgemed pack`")
        if major != SCHEMA.split("/")[1]:
            raise IntegrityError(f"{source}: manifest schema {_short(schema)} is not one this edgemed reads ({SCHEMA}).",
                                 "upgrade edgemed on this machine: pip install -U edgemed")
        for key, kind in _TOP_TYPES.items():
            if key in raw and not isinstance(raw[key], kind) or (key in _REQUIRED and key not in raw):
                raise IntegrityError(f"{source}: manifest.json field '{key}' is "
                                     f"{'missing' if key not in raw else 'mistyped: ' + _short(raw[key])} "
                                     f"(expected {_KIND_NAMES[kind]}).", damaged)
        try:
            files = [FileEntry(**f) for f in raw["files"]]
            man = cls(
                name=raw["name"], files=files, model=dict(raw["model"]), provenance=dict(raw.get("provenance") or {}),
                card=dict(raw.get("card") or {}), memory=dict(raw.get("memory") or {}), created=str(raw.get("created", "")),
                adapters=list(raw.get("adapters") or []),
                edgemed_version=str(raw.get("edgemed_version", "")), schema=schema,
            )
        except TypeError as exc:  # a file entry that is not an object, or has other keys
            raise IntegrityError(f"{source}: manifest.json has a malformed file entry ({exc}).", damaged) from None
        man.validate(source)
        return man

    def validate(self, source: str = "manifest") -> None:
        if not isinstance(self.name, str):
            raise IntegrityError(f"{source}: the model name {_short(self.name)} is not a string.", "get a fresh copy of the bundle")
        check_name(self.name)
        if not self.files or len(self.files) > MAX_FILES:
            raise IntegrityError(f"{source}: the manifest lists {len(self.files)} files (1 to {MAX_FILES} allowed).", "get a fresh copy of the bundle")
        seen: set[str] = set()
        for f in self.files:
            if not isinstance(f.path, str) or not isinstance(f.role, str):
                raise IntegrityError(f"{source}: a file entry's path or role is not a string ({_short(f.path)}, {_short(f.role)}).",
                                     "get a fresh copy of the bundle")
            check_relpath(f.path, "manifest")
            if folded(f.path.split("/", 1)[0]) in RESERVED:  # manifest.json/x would need a folder where the manifest goes
                raise IntegrityError(f"{source}: the manifest lists '{f.path}', which is or lies under a reserved name "
                                     f"({', '.join(RESERVED)}, in any case).", "get a fresh copy of the bundle")
            if not _int(f.size):
                raise IntegrityError(f"{source}: '{f.path}' has an invalid size {_short(f.size)} (a whole number of bytes, at "
                                     "most 2**50).", "get a fresh copy of the bundle")
            if not isinstance(f.sha256, str) or not _HEX64.match(f.sha256):
                raise IntegrityError(f"{source}: '{f.path}' has an invalid sha256 {f.sha256!r}.", "get a fresh copy of the bundle")
            if f.role not in ROLES:
                raise IntegrityError(f"{source}: '{f.path}' has an unknown role {f.role!r}.", "upgrade edgemed, or get a fresh copy")
            key = folded(f.path)  # case- and normalisation-insensitive file systems would merge these
            if key in seen:
                raise IntegrityError(f"{source}: '{f.path}' is listed twice (names that differ only in case or Unicode "
                                     "normalisation are one file on macOS, Windows and USB sticks).",
                                     "get a fresh copy of the bundle")
            seen.add(key)
        folders: set[str] = set()  # every folder a listed path needs, each added once
        for key in seen:
            cut = key.rfind("/")
            while cut > 0 and key[:cut] not in folders:
                folders.add(key[:cut])
                cut = key.rfind("/", 0, cut)
        both = folders & seen  # a file may not also be a directory ("model" and "model/x.gguf")
        if both:
            raise IntegrityError(f"{source}: '{min(both)}' is listed both as a file and as a directory.",
                                 "get a fresh copy of the bundle")
        for (section, key), (check, expected) in _FIELD_CHECKS.items():
            table = getattr(self, section)
            if key in table and not check(table[key]):
                raise IntegrityError(f"{source}: manifest field {section}.{key} is {_short(table[key])}, not {expected}.",
                                     "get a fresh copy of the bundle")
        self._validate_adapters(source)
        model_path = self.model.get("path")
        folder = self.model.get("format") in _FOLDER_MODELS  # a GGUF is one file: export and the loader open it as one
        if not isinstance(model_path, str) or not any(f.path == model_path or folder and f.path.startswith(model_path + "/")
                                                      for f in self.files):
            raise IntegrityError(f"{source}: the model path {_short(model_path)} is not among the listed files"
                                 f"{'' if folder else ' (a GGUF model is one listed file, not a folder)'}.",
                                 "get a fresh copy of the bundle")

    def _validate_adapters(self, source: str) -> None:
        """Each adapter: a unique name, a listed file of role 'adapter' (same size and sha256), the base checkpoint
        it was made for; a bundle with no model names that base once, and every adapter is for it."""
        bad = "get a fresh copy of the bundle"
        names: set[str] = set()
        by_path = {f.path: f for f in self.files}
        only = self.model.get("format") == ADAPTERS_ONLY
        base = self.model.get("base_source_sha256") if only else (self.provenance.get("source_sha256") or None)
        if only and not (isinstance(base, str) and _HEX64.match(base)):
            raise IntegrityError(f"{source}: an adapter bundle must name its base by sha256 (model.base_source_sha256), "
                                 f"not {_short(base)}.", bad)
        if only and not self.adapters:
            raise IntegrityError(f"{source}: an adapter bundle lists no adapters.", bad)
        for a in self.adapters:
            if not isinstance(a, dict) or not isinstance(a.get("name"), str) or not isinstance(a.get("path"), str):
                raise IntegrityError(f"{source}: an adapter entry is malformed ({_short(a)}).", bad)
            if not NAME_RE.fullmatch(a["name"]) or a["name"] in names:
                raise IntegrityError(f"{source}: the adapter name {_short(a['name'])} is invalid or listed twice.", bad)
            names.add(a["name"])
            f = by_path.get(a["path"])
            if f is None or f.role != "adapter" or f.sha256 != a.get("sha256") or f.size != a.get("size"):
                raise IntegrityError(f"{source}: adapter '{a['name']}' names {_short(a['path'])}, which is not a listed "
                                     "adapter file of that size and sha256.", bad)
            made_for = a.get("base_source_sha256")
            if not (isinstance(made_for, str) and _HEX64.match(made_for)) or (base is not None and made_for != base):
                raise IntegrityError(f"{source}: adapter '{a['name']}' was made for the base {_short(made_for)}, not this "
                                     f"bundle's base {_short(base)}.", bad)
        named = {a["path"] for a in self.adapters}
        stray = [f.path for f in self.files if f.role == "adapter" and f.path not in named]
        if stray:
            raise IntegrityError(f"{source}: '{stray[0]}' has the role 'adapter' but no adapter entry names it.", bad)

    @property
    def adapters_only(self) -> bool:
        """True for a bundle that carries only adapters for a base it names (``base_source_sha256``)."""
        return self.model.get("format") == ADAPTERS_ONLY

    @property
    def merged_lora_sha256(self) -> str | None:
        """The sha256 of the LoRA adapter merged into this model's weights (``convert --lora``: the GGUF's
        ``edgemed.lora.sha256``, or its report's ``lora``, which pack keeps as ``provenance.lora_sha256``); None for a
        plain model and for an adapter-only bundle."""
        merged = None if self.adapters_only else self.provenance.get("lora_sha256")
        return merged if isinstance(merged, str) and merged else None

    @property
    def base_source_sha256(self) -> str | None:
        """The checkpoint this bundle's adapters apply to: the named base, or the model's own source. None for a model
        with a LoRA merged into its weights: it records the plain checkpoint's sha256 as its source, but an adapter of
        that checkpoint was made and gated for the plain weights (``runtime.loader.refuse_merged_base`` refuses the pair
        at load), so the store pairs no adapter bundle with it, nor takes it as an adapter bundle's installed base."""
        if self.adapters_only:
            return self.model.get("base_source_sha256")
        return None if self.merged_lora_sha256 else self.provenance.get("source_sha256")

    # -- writing ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["files"] = [asdict(f) for f in self.files]
        if not self.adapters:
            del d["adapters"]  # a bundle without adapters keeps the manifest bytes an older edgemed wrote
        return d

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")

    # -- queries ------------------------------------------------------------------------
    def entry(self, path: str) -> FileEntry | None:
        return next((f for f in self.files if f.path == path), None)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def model_path(self) -> str:
        return self.model["path"]
