"""The local model store: install, list, remove and resolve bundles by name.

Layout under ``$EDGEMED_HOME/store``::

    blobs/sha256/<digest>    each distinct file once, read-only
    models/<name>/           an installed bundle directory; its files are hard links to blobs
    index.json               name -> sha256 of its manifest.json, source, signer, install time
    tmp/                     staging for installs in progress (cleared by the next store operation)
    lock                     flock held by install and remove

Content addressing: two bundles that share a file (same sha256) share one blob
(one inode, two links). A blob whose link count falls to 1 belongs to no model and
is removed. Installs are atomic: files are streamed into ``tmp/``, hashed as they
are written and checked against the manifest, then the staged directory is renamed
into ``models/``; a killed install leaves only ``tmp/`` debris and unlinked blobs,
which the next operation clears. Every load goes through ``resolve_model``, which
verifies the bundle (fast path, or ``--full``) before returning the model path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Iterator

from edgemed import env
from edgemed.atomic import remove as remove_path
from edgemed.atomic import write_text
from edgemed.errors import InputError, IntegrityError, StoreError
from edgemed.packaging.bundle import Verified, read_manifest, verify_dir
from edgemed.packaging.digest import VerifiedCache, copy_hashed, file_digest
from edgemed.packaging.manifest import MANIFEST, SIGNATURE, FileEntry, Manifest, check_name

log = logging.getLogger(__name__)


class Store:
    def __init__(self, root: Path | None = None):
        self.root = Path(root or env.store_dir())
        self.blobs = self.root / "blobs" / "sha256"
        self.models = self.root / "models"
        self.tmp = self.root / "tmp"
        self.index_path = self.root / "index.json"
        self.cache = VerifiedCache()

    # -- housekeeping ---------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        import fcntl

        for d in (self.blobs, self.models, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        with open(self.root / "lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                self._collect_garbage()
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _collect_garbage(self) -> int:
        """Under the lock: drop staging debris and blobs no model links to. Returns bytes freed."""
        freed = 0
        for p in self.tmp.iterdir():
            remove_path(p)
        for blob in self.blobs.iterdir():
            st = blob.lstat()
            if st.st_nlink <= 1:
                freed += st.st_size
                blob.unlink()
        return freed

    def index(self) -> dict:
        try:
            return json.loads(self.index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except ValueError:
            raise StoreError(f"The store index {self.index_path} is damaged.", "reinstall your models (edgemed install BUNDLE --force)") from None

    def _write_index(self, idx: dict) -> None:
        write_text(self.index_path, json.dumps(idx, indent=2, sort_keys=True) + "\n")

    # -- install ---------------------------------------------------------------------------
    def install(self, bundle: Path, *, name: str | None = None, public_key=None, force: bool = False) -> tuple[str, Manifest, str | None]:
        """Install a bundle (tar or directory); return (name, manifest, signer key id)."""
        import hashlib

        from edgemed.packaging import signing
        from edgemed.packaging.archive import is_tar, read_tar

        bundle = Path(bundle)
        if not bundle.exists():
            raise InputError(f"Bundle '{bundle}' does not exist.", "pass a .edgemed file or bundle directory made by `edgemed pack`")
        signer: dict = {}

        with self.locked():
            stage = Path(tempfile.mkdtemp(prefix="install.", dir=self.tmp))

            def sink(entry: FileEntry, src: BinaryIO) -> str:
                dest = stage / entry.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
                with os.fdopen(fd, "wb") as dst:
                    return copy_hashed(src, dst, entry.size, entry.path)

            def check_signature(man: Manifest, data: bytes, sig: bytes | None) -> None:
                target = check_name(name or man.name)
                if (self.models / target).exists() and not force:
                    raise StoreError(f"A model named '{target}' is already installed.",
                                     f"pass --force to replace it, or remove it first: edgemed remove {target}")
                if public_key is not None:
                    signer["key_id"] = signing.verify(data, sig, public_key)

            try:
                if is_tar(bundle):
                    man, data, sig = read_tar(bundle, sink, check_space=self.root, on_manifest=check_signature)
                else:
                    man, data, sig = read_manifest(bundle)
                    check_signature(man, data, sig)
                    verify_dir(bundle, full=True)  # the source must be whole before we copy it
                    for entry in man.files:
                        with open(bundle / entry.path, "rb") as fh:
                            got = sink(entry, fh)
                        if got != entry.sha256:
                            raise IntegrityError(f"'{entry.path}' changed while it was being installed: expected sha256 {entry.sha256}, actual {got}.",
                                                 "install again once nothing writes to the bundle")
                (stage / MANIFEST).write_bytes(data)
                if sig is not None:
                    (stage / SIGNATURE).write_bytes(sig)
                target = check_name(name or man.name)
                self._dedupe(stage, man)
                dest = self.models / target
                old = None
                if dest.exists():
                    old = self.tmp / f"old.{target}.{os.getpid()}"
                    os.replace(dest, old)
                os.replace(stage, dest)
                idx = self.index()
                idx[target] = {"manifest_sha256": hashlib.sha256(data).hexdigest(), "source": str(bundle.absolute()),
                               "signed_by": signer.get("key_id"), "installed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                self._write_index(idx)
                if old is not None:
                    remove_path(old)
                    self._collect_garbage()
            except BaseException:
                remove_path(stage)
                raise
        self.cache.forget_under(self.models / target)
        self.cache.save()
        return target, man, signer.get("key_id")

    def _dedupe(self, stage: Path, man: Manifest) -> None:
        """Replace each staged file by a link to its blob (creating the blob if new)."""
        for entry in man.files:
            staged = stage / entry.path
            blob = self.blobs / entry.sha256
            os.chmod(staged, 0o444)
            if blob.exists() and file_digest(blob, self.cache, full=False)[0] == entry.sha256:
                tmp_link = staged.with_name(staged.name + ".link")
                os.link(blob, tmp_link)
                os.replace(tmp_link, staged)
                continue
            tmp_blob = self.blobs / f".{entry.sha256}.{os.getpid()}"
            try:
                os.link(staged, tmp_blob)
            except OSError as exc:  # a file system without hard links: keep the private copy
                log.warning("cannot hard-link into the store (%s); '%s' is stored unshared", exc, entry.path)
                continue
            os.replace(tmp_blob, blob)

    # -- queries ---------------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        check_name(name)
        d = self.models / name
        if not d.is_dir():
            raise StoreError(f"No model named '{name}' is installed.", "run `edgemed list` to see installed models, or `edgemed install BUNDLE`")
        return d

    def verify(self, name: str, *, full: bool = False, public_key=None) -> Verified:
        d = self.model_dir(name)
        rec = self.index().get(name) or {}
        if not rec:
            raise IntegrityError(f"'{name}' is in the store but not in its index.", f"reinstall it: edgemed install BUNDLE --force")
        return verify_dir(d, full=full, public_key=public_key, cache=self.cache, expect_manifest_sha256=rec.get("manifest_sha256"))

    def list(self) -> list[dict]:
        out = []
        idx = self.index()
        for name in sorted(idx):
            d = self.models / name
            try:
                man, _, sig = read_manifest(d)
            except Exception as exc:  # list shows damaged entries rather than failing
                out.append({"name": name, "error": str(exc).splitlines()[0]})
                continue
            m = man.model
            out.append({"name": name, "arch": m.get("arch"), "quant": m.get("quant"), "params": m.get("params"),
                        "size_bytes": man.total_bytes, "signed_by": idx[name].get("signed_by"), "has_signature": sig is not None,
                        "installed": idx[name].get("installed"), "path": str(d / man.model_path)})
        return out

    def remove(self, name: str) -> int:
        """Remove a model; return the bytes freed (files no other model shares)."""
        with self.locked():
            d = self.model_dir(name)
            trash = self.tmp / f"rm.{name}.{os.getpid()}"
            os.replace(d, trash)
            idx = self.index()
            idx.pop(name, None)
            self._write_index(idx)
            remove_path(trash)
            return self._collect_garbage()

    def disk_usage(self) -> int:
        return sum(p.stat().st_size for p in self.blobs.iterdir()) if self.blobs.is_dir() else 0


def resolve_model(name_or_path: str | Path, *, full: bool = False) -> Path:
    """What ``edgemed run MODEL`` loads: a verified model path.

    - an installed model name: the store's bundle, verified (fast path unless ``full``);
    - a bundle directory: verified in place;
    - a .gguf file (or ONNX directory): returned as is (there is no manifest to check);
    - a tar bundle: refused with the install command to run;
    - a missing path: returned as is, for the engine's own "does not exist" message.
    """
    from edgemed.packaging.archive import is_tar

    p = Path(name_or_path)
    if p.exists():
        if p.is_dir() and (p / MANIFEST).is_file():
            return verify_dir(p, full=full, cache=VerifiedCache()).model_path
        if is_tar(p):
            raise InputError(f"'{p}' is a bundle archive; it must be installed before it runs.",
                             f"run `edgemed install {p}`, then `edgemed run NAME`")
        return p
    text = str(name_or_path)
    if os.sep in text or text.endswith((".gguf", ".edgemed", ".onnx")):
        return p  # a path that does not exist: the engine says so, naming the fix
    return Store().verify(text, full=full).model_path
