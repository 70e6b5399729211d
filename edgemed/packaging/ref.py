"""The one answer to "what does this MODEL (or BUNDLE) argument name?".

``resolve`` turns an argument into a ``ModelRef`` (nothing is verified or hashed there):

    file       an existing path with no manifest: a .gguf, an ONNX (or HF checkpoint) directory,
               or a path-looking argument that does not exist (the loader says so, naming the fix)
    directory  a bundle directory (it holds manifest.json)
    tar        a bundle archive (``edgemed pack``'s default form)
    store      an installed model's name

The kind names are what ``verify --json`` and ``inspect --json`` print as ``form``. Then:
``bundle_ref`` refuses anything but a bundle (verify, inspect, export); ``runnable`` gives the
path an engine loads, a bundle verified first (run, chat, serve, bench, devices check);
``with_digest`` adds a plain file's sha256 through the verified cache (serve's audit identity).

LoRA adapters: ``adapters`` lists what a resolved model can apply by name (NAME -> file, scale 1.0): its own
bundle's adapters, then those of installed adapter-only bundles made for the same base checkpoint (the sha256
both record); ``adapter_specs`` turns ``--adapter`` arguments (NAME[:SCALE] or FILE[:SCALE]) into what the
loader takes, an installed adapter bundle verified and checked by the trust policy first.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from edgemed.errors import InputError
from edgemed.packaging.manifest import MANIFEST

log = logging.getLogger(__name__)

FILE, DIRECTORY, TAR, STORE = "file", "directory", "tar", "store"
_PATH_SUFFIXES = (".gguf", ".edgemed", ".onnx")  # an argument ending so is a path, never a store name


class Vouched(NamedTuple):
    """A file as it was verified: its ``digest.stamp`` then, the sha256 it was checked as, and what ``edgemed verify``
    takes to check it again ("": a plain file, no bundle). ``loaded_as_verified`` compares it after the load."""

    stamp: tuple
    sha256: str
    verify: str


@dataclass(frozen=True)
class ModelRef:
    kind: str                 # FILE, DIRECTORY, TAR or STORE
    path: Path | None         # the path given (FILE, DIRECTORY, TAR); for STORE, None until ``runnable``
    name: str                 # STORE: the installed name; a verified bundle: its manifest's name; else the file's stem
    digest: str | None = None  # "manifest:sha256:<hex>" or "file:sha256:<hex>", once known
    model_path: Path | None = None  # what an engine loads, once known (FILE at once; bundles after verification)
    #: (path, ``Vouched``) of every file verified or hashed for this ref: a bundle's files, or a plain file whose
    #: digest names it (``with_digest``); ``loaded_as_verified`` compares the model's again once it is loaded
    stamps: tuple = ()

    @property
    def source(self) -> str:
        """The argument as ``inspect`` names it: the installed name, or the path."""
        return self.name if self.kind == STORE else str(self.path)

    @property
    def target(self) -> Path | str:
        """The bundle to read: its path, or the installed name (for ``Store``)."""
        return self.name if self.kind == STORE else self.path


def _is_path_text(text: str) -> bool:
    return os.sep in text or "/" in text or text.endswith(_PATH_SUFFIXES)


def _installed_too(text: str) -> bool:
    """Whether ``text``, which exists as a path, is also written as an installed model's name: a file of that name
    in the working folder would otherwise load in its place, past the store's verification and trust policy."""
    from edgemed.packaging.manifest import NAME_RE

    if _is_path_text(text) or not NAME_RE.fullmatch(text):
        return False
    from edgemed import env

    return (Path(env.store_dir()) / "models" / text).is_dir()


def resolve(arg: str | Path) -> ModelRef:
    """Classify ``arg`` (see the module docstring); reads at most a tar header."""
    from edgemed.packaging.archive import is_tar

    p = Path(arg)
    if p.exists():
        if _installed_too(str(arg)):  # the bare name of a model in the store: the path must be written as one
            raise InputError(f"'{arg}' names both an installed model and a file or folder in this folder.",
                             f"pass ./{arg} for the file, or run from another folder for the installed model "
                             "(edgemed never guesses which of the two to load)")
        if p.is_dir() and (p / MANIFEST).exists():
            return ModelRef(DIRECTORY, p, p.name)
        if is_tar(p):
            return ModelRef(TAR, p, p.name.split(".")[0])
        return ModelRef(FILE, p, p.stem, model_path=p)
    text = str(arg)
    if _is_path_text(text):
        return ModelRef(FILE, p, p.stem, model_path=p)  # missing: the loader's own message names the fix
    return ModelRef(STORE, None, text)


def bundle_ref(arg: str | Path) -> ModelRef:
    """``resolve``, refusing anything that is not a bundle (verify, inspect, export)."""
    ref = resolve(arg)
    if ref.kind == FILE:
        if ref.path.exists():
            raise InputError(f"'{arg}' is not a bundle (no manifest.json, not a tar).",
                             "pass a .edgemed file or directory made by `edgemed pack`")
        raise InputError(f"Bundle '{arg}' does not exist.", "check the path; `edgemed list` shows installed models")
    return ref


def verified(ref: ModelRef, *, full: bool = False, public_key=None):
    """Verify a bundle directory (through the verified cache) or an installed model; returns ``bundle.Verified``."""
    from edgemed.packaging.bundle import verify_dir
    from edgemed.packaging.digest import VerifiedCache

    if ref.kind == DIRECTORY:
        return verify_dir(ref.path, full=full, public_key=public_key, cache=VerifiedCache())
    if ref.kind == STORE:
        return _store_verify(ref.name, full=full, public_key=public_key)
    raise ValueError(f"{ref.kind} is not a verifiable bundle directory")


def _store_verify(name: str, *, full: bool = False, public_key=None):
    """``Store.verify``, where a damaged file's fix names where this copy came from (the store records it): the
    bundle's maker is not who a device that pulls from a registry asks, and the pull mends a damaged copy."""
    from edgemed.errors import EdgemedError, IntegrityError
    from edgemed.packaging.bundle import DAMAGED, REINSTALL
    from edgemed.packaging.store import Store, get_again

    store = Store()
    try:
        return store.verify(name, full=full, public_key=public_key)
    except IntegrityError as exc:
        if exc.fix in (DAMAGED, REINSTALL):
            try:
                exc.fix = get_again(name, store.record(name) or {})
            except (EdgemedError, OSError):
                pass  # the index cannot be read now: the fix stays the bundle's
        raise


def trusted(ref: ModelRef, *, full: bool = False):
    """``verified``, and the trust policy as ``run`` and ``install`` apply it (``_check_trust``): what hands a bundle's
    model to another runtime (``export``) reads it through this, so an unsigned or untrusted bundle directory is
    refused there as it is by run."""
    v = verified(ref, full=full)
    _check_trust(ref, v)
    return v


def runnable(arg: str | Path, *, full: bool = False) -> ModelRef:
    """What ``edgemed run MODEL`` loads: ``model_path`` set, a bundle verified first (fast path unless ``full``).

    A tar bundle is refused with the install command to run; a plain file or directory is returned
    as is (there is no manifest to check), its digest left for ``with_digest``.
    """
    ref = resolve(arg)
    if ref.kind == TAR:
        raise InputError(f"'{ref.path}' is a bundle archive; it must be installed before it runs.",
                         f"run `edgemed install {ref.path}`, then `edgemed run NAME`")
    if ref.kind == FILE:
        return ref
    v = verified(ref, full=full)
    if v.manifest.adapters_only:
        man = v.manifest
        raise InputError(f"'{arg}' holds only LoRA adapters ({', '.join(a['name'] for a in man.adapters)}) for the base "
                         f"checkpoint {man.base_source_sha256[:12]}..., no model to run.",
                         f"run its base with an adapter: edgemed run {man.model.get('base_name') or 'BASE'} "
                         f"--adapter {man.adapters[0]['name']}")
    _check_trust(ref, v)
    name = ref.name if ref.kind == STORE else v.manifest.name
    return replace(ref, name=name, digest="manifest:sha256:" + v.manifest_sha256, model_path=v.model_path,
                   path=ref.path if ref.path is not None else v.root,
                   stamps=_vouched(v, ref.name if ref.kind == STORE else str(ref.path)))


def _vouched(v, verify: str) -> tuple:
    """``bundle.Verified.stamps`` as (path, ``Vouched``) pairs, ``verify`` being what `edgemed verify` takes."""
    return tuple((path, Vouched(st, sha, verify)) for path, (st, sha) in v.stamps.items())


def _check_trust(ref: ModelRef, v) -> None:
    """The trust policy (packaging.trust) for what is about to load: an installed model by its origin and the signer
    recorded at install, a bundle directory as a local bundle. Costs one signature check, no second read of the model."""
    from edgemed.packaging import trust

    if ref.kind == STORE:
        return  # Store.verify checked it (trust.check_installed), as `edgemed verify NAME` does
    policy = trust.load()
    if policy.exists:
        trust.decide(None, v.signature, v.manifest, v.manifest_bytes, policy=policy)


@dataclass(frozen=True)
class AdapterChoice:
    name: str
    path: Path
    sha256: str
    bundle: str              # the bundle it comes from: the model's own, or an installed adapter-only bundle's name
    own: bool                # True: in the model's own bundle (verified with it)
    scale: float = 1.0


def _base_of(ref: ModelRef) -> tuple[str | None, list]:
    """(the checkpoint sha256 ``ref``'s model was converted from, its own bundle's adapters as AdapterChoice)."""
    if ref.kind == FILE:
        from edgemed.formats.gguf_header import SOURCE_SHA_KEY, read_header

        try:
            source = read_header(ref.model_path).metadata.get(SOURCE_SHA_KEY)
        except (InputError, OSError):  # not a GGUF (an ONNX directory): no adapters
            return None, []
        return (source if isinstance(source, str) and source else None), []
    import hashlib

    from edgemed.errors import IntegrityError
    from edgemed.packaging.bundle import read_manifest

    root = ref.path
    man, data, _ = read_manifest(root)
    was = (ref.digest or "").removeprefix("manifest:sha256:")
    now = hashlib.sha256(data).hexdigest()
    if now != was:  # its adapters are vouched for by the manifest runnable verified, not by one written since
        raise IntegrityError(f"'{root / MANIFEST}' changed since the bundle was verified (sha256 {was or 'unknown'}, "
                             f"now {now}): its adapters are not the ones verified.",
                             f"find what writes there, then run `edgemed verify {ref.source} --full` (reinstall the "
                             "bundle if it fails) and start again")
    own = [AdapterChoice(a["name"], root / a["path"], a["sha256"], man.name, True) for a in man.adapters]
    return man.base_source_sha256, own


def adapters(ref: ModelRef) -> dict[str, AdapterChoice]:
    """The adapters ``ref`` (from ``runnable``) can apply, by name: its bundle's own, then each installed adapter-only
    bundle's for the same base checkpoint (a name the model's own bundle has is not overridden; between two installed
    adapter bundles, the later install wins). Nothing is verified here: ``adapter_specs`` verifies what it hands out."""
    if ref.model_path is None:
        raise ValueError("adapters() takes a resolved ref (packaging.ref.runnable)")
    base, own = _base_of(ref)
    found: dict[str, AdapterChoice] = {}
    if base is not None:
        from edgemed.packaging.store import Store

        store = Store()
        if store.root.is_dir():
            for bundle, man in store.adapter_bundles_for(base):
                for a in man.adapters:
                    found[a["name"]] = AdapterChoice(a["name"], store.models / bundle / a["path"], a["sha256"], bundle, False)
    found.update({a.name: a for a in own})
    return found


def _is_adapter_path(text: str) -> bool:
    return _is_path_text(text) or Path(text).exists() or Path(text.rpartition(":")[0] or text).exists()


def adapter_specs(ref: ModelRef, args, files: bool = True) -> list:
    """``--adapter`` arguments for ``ref`` as ``runtime.loader.AdapterSpec``: a FILE[:SCALE] as it is, a NAME[:SCALE]
    from ``adapters(ref)``; an installed adapter bundle is verified (fast path) and passes the trust policy first, and
    its spec carries the sha256 the adapter's file was verified as. An unknown name is ``AdapterNotFound``, naming the
    adapters there are. ``files`` False: each argument is a NAME, whole (a server's HTTP caller names an installed
    adapter: never a file on the server, nor a scale)."""
    from edgemed.errors import AdapterNotFound, IntegrityError
    from edgemed.runtime.loader import AdapterSpec

    specs, available, checked = [], None, {}
    for text in args:
        text = str(text)
        if files and _is_adapter_path(text):
            specs.append(AdapterSpec.parse(text))
            continue
        if available is None:
            available = adapters(ref)
        name, sep, tail = text.rpartition(":")
        if not files or not sep or name not in available:
            name, tail = text, None
        choice = available.get(name)
        if choice is None:
            there = ", ".join(sorted(available)) or "none"
            raise AdapterNotFound(f"--adapter '{text}': '{name}' is neither a file nor an adapter of '{ref.name}' (its adapters: {there}).",
                                  f"pass an adapter name `edgemed list` shows under {ref.name}, install the adapter bundle for it "
                                  "(edgemed install NAME-ADAPTER.edgemed), or pass the .lora.gguf file", name, sorted(available))
        if choice.own:
            vouched = dict(ref.stamps)  # verified with the model (runnable)
            if Path(choice.path).absolute() not in vouched:
                raise IntegrityError(f"--adapter '{text}': '{choice.path}' is not among the files verified with "
                                     f"'{ref.name}'.", f"run `edgemed verify {ref.source} --full` (reinstall the bundle "
                                     "if it fails) and start again")
        else:
            if choice.bundle not in checked:
                checked[choice.bundle] = _verify_installed(choice.bundle)
            vouched = checked[choice.bundle]
        spec = AdapterSpec.parse(f"{choice.path}:{tail}" if tail is not None else str(choice.path))
        # the stamp it was verified with travels with it: checked again once it is loaded (``loaded_as_verified``)
        verified = vouched.get(Path(choice.path).absolute())
        specs.append(replace(spec, stamp=verified, sha256=verified.sha256 if verified is not None else None))
    return specs


def _verify_installed(bundle: str) -> dict:
    """An installed adapter bundle, checked as ``runnable`` checks an installed model: every file, and the trust
    policy. Returns its files as path -> ``Vouched``."""
    v = _store_verify(bundle)  # every file, the signature checked at install, and today's trust policy
    return dict(_vouched(v, bundle))


def loaded_as_verified(ref: ModelRef | None, specs=()) -> None:
    """Refuse a model whose verified files changed between their verification and the load that just ended.

    ``runnable`` verifies a bundle, then the caller plans, runs the self-test and loads: seconds to minutes in which
    a file could be replaced or written, and the engine would hold bytes nobody checked. Called once the model (and
    ``specs``, the adapters from ``adapter_specs``; ``ref`` None: those alone) is loaded, for the files that loaded:
    the model's (its file, or every file under its directory) and each adapter's. Each stamp is compared with the one
    its digest was checked against (``digest.stamp``; a write changes mtime and ctime, a replacement the inode). Where
    only ctime moved (the same inode, size and mtime: another install or removal linking the shared blob, a
    permission change), the file is hashed again and let through if it is still the verified bytes. What a
    memory-mapped load reads after this call is not covered: a later write into the installed file (docs/packaging.md)."""
    from edgemed.errors import IntegrityError
    from edgemed.files.hashing import file_sha256
    from edgemed.packaging.digest import stamp

    loads = []
    if ref is not None and ref.model_path is not None:
        model = Path(ref.model_path).absolute()
        loads = [(Path(p), v) for p, v in ref.stamps if Path(p).absolute() == model or model in Path(p).absolute().parents]
    loads += [(Path(s.path), s.stamp) for s in specs if isinstance(getattr(s, "stamp", None), Vouched)]
    for path, was in loads:
        try:
            now = stamp(os.stat(path))
        except OSError:
            now = None
        if now == tuple(was.stamp):
            continue
        if now is not None and now[:4] == tuple(was.stamp[:4]) and file_sha256(path) == was.sha256:
            log.info("'%s': only its ctime changed since it was verified (a link or a permission); hashed again, "
                     "the same bytes", path)
            continue
        if was.verify:
            fix = (f"find what writes there, then run `edgemed verify {was.verify} --full` (reinstall the bundle if it "
                   "fails) and start again")
        else:  # a plain file whose sha256 the audit names: no bundle to check
            fix = "find what writes there, then start again once nothing does (the file is hashed again at start)"
        raise IntegrityError(
            f"'{path}' changed between its verification and its load (written, replaced or removed meanwhile): "
            "what was loaded is not what was verified, so it is not used.", fix)


def with_digest(ref: ModelRef) -> ModelRef:
    """``ref`` with its digest: a bundle's is known already; a plain file's sha256 comes from the verified cache
    (hashed in full only when the file changed since its last full hash)."""
    if ref.digest is not None:
        return ref
    from edgemed.packaging.digest import VerifiedCache, file_digest, stamp

    cache = VerifiedCache()
    before = stamp(os.stat(ref.model_path))  # the digest vouches for this stamp, or the load's check refuses
    digest, _ = file_digest(ref.model_path, cache, full=False)
    cache.save()
    return replace(ref, digest="file:sha256:" + digest, stamps=((ref.model_path, Vouched(before, digest, "")),))
