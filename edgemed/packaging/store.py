"""The local model store: install, list, remove and resolve bundles by name.

Layout under ``$EDGEMED_HOME/store``::

    blobs/sha256/<digest>    each distinct file once, read-only
    models/<name>/           an installed bundle directory; its files are hard links to blobs
    index.json               name -> sha256 of its manifest.json, source, signer, install time
    journal.json             the one operation that changes models/ (present only while it runs)
    tmp/                     owner-tagged staging (edgemed.debris); swept by the next operation
    lock                     flock held by install and remove (and by a reader settling a journal)

Content addressing: two bundles that share a file (same sha256) share one blob
(one inode, two links). A blob whose link count falls to 1 belongs to no model and
is removed. Every load goes through ``resolve_model``, which verifies the bundle
(fast path, or ``--full``) before returning the model path.

Crash safety (a kill at any instant leaves the old model or the new one installed):
files are streamed into ``tmp/``, hashed as they are written and checked against the
manifest. Then ``journal.json`` is written (atomically) naming the model, the new
manifest's sha256, the staged folder, the aside name and the index record. Only then
does ``models/<name>`` change: one ``renameat2(RENAME_EXCHANGE)``, or two renames
(old -> aside, staged -> models) where exchange is unavailable. Settling a journal
(``_settle``) is the same code after success and after a kill: if ``models/<name>``
holds the new manifest, roll forward (write the index record, drop the old copy);
otherwise roll back (rename the aside back, drop the staged copy). The journal goes
last. Every store operation settles a journal first; readers settle one that no live
operation holds, and read a live one through.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import BinaryIO, Iterator

from edgemed import env
from edgemed.atomic import step, swap_in, write_text
from edgemed.debris import debris_path, discard, is_debris, owned, sweep
from edgemed.errors import InputError, IntegrityError, StoreError
from edgemed.packaging.bundle import Verified, read_manifest, verify_dir
from edgemed.packaging.digest import VerifiedCache, copy_hashed, file_digest
from edgemed.packaging.manifest import MANIFEST, SIGNATURE, FileEntry, Manifest, check_name

log = logging.getLogger(__name__)

JOURNAL = "journal.json"


class Store:
    def __init__(self, root: Path | None = None):
        self.root = Path(root or env.store_dir())
        self.blobs = self.root / "blobs" / "sha256"
        self.models = self.root / "models"
        self.tmp = self.root / "tmp"
        self.index_path = self.root / "index.json"
        self.journal_path = self.root / JOURNAL
        self.cache = VerifiedCache()

    # -- housekeeping ---------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, wait: bool = True) -> Iterator[bool]:
        """Hold the store lock (settling a dead operation's journal, then sweeping); yields False
        at once, without the lock, if ``wait`` is False and a live operation holds it."""
        import fcntl

        for d in (self.blobs, self.models, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        with open(self.root / "lock", "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                self._settle()
                self._collect_garbage()
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _collect_garbage(self) -> int:
        """Under the lock, after ``_settle``: drop staging debris and blobs no model links to. Returns bytes freed."""
        freed = 0
        sweep(self.root)  # a killed write of index.json or journal.json
        sweep(self.tmp)
        for p in self.tmp.iterdir():  # staging that edgemed named before owner tags; under the lock none is live
            kind, dot, rest = p.name.partition(".")
            if kind not in ("install", "old", "rm") or not dot or p.is_symlink():
                continue
            model = rest.rpartition(".")[0]  # old.<name>.<pid>: the only copy of a model a replacement was killed over
            if kind == "old" and model and not os.path.lexists(self.models / model):
                os.rename(p, self.models / model)
            elif p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        for blob in self.blobs.iterdir():
            st = blob.lstat()
            if st.st_nlink <= 1:
                step("store.gc-blob")
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

    # -- the journal -----------------------------------------------------------------------
    def _journal(self) -> dict | None:
        try:
            j = json.loads(self.journal_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StoreError(f"The store journal {self.journal_path} is unreadable ({exc}).",
                             f"check the models with `edgemed list`, then delete {self.journal_path}") from None
        names = [j.get(k) for k in ("stage", "aside", "trash") if isinstance(j, dict) and j.get(k) is not None]
        if (not isinstance(j, dict) or j.get("op") not in ("install", "remove") or not isinstance(j.get("name"), str)
                or not all(isinstance(n, str) and "/" not in n and is_debris(Path(n)) for n in names)):
            raise StoreError(f"The store journal {self.journal_path} is not one edgemed wrote.",
                             f"check the models with `edgemed list`, then delete {self.journal_path}")
        check_name(j["name"])
        return j

    def _settle(self) -> None:
        """Under the lock: finish or undo the operation a journal describes (the same after success and after a kill)."""
        j = self._journal()
        if j is None:
            return
        dest = self.models / j["name"]
        leftovers = [self.tmp / j[k] for k in ("stage", "aside", "trash") if j.get(k)]
        before = self.index()
        idx = dict(before)
        if j["op"] == "remove":
            if os.path.lexists(dest):
                step("store.remove-rename")
                os.rename(dest, self.tmp / j["trash"])
            idx.pop(j["name"], None)
        elif _manifest_sha256(dest) == j["sha256"]:  # the new model is in place: roll forward
            idx[j["name"]] = j["record"]
        elif not os.path.lexists(dest) and os.path.lexists(self.tmp / j["aside"]):  # the old one was moved aside: back
            step("store.restore")
            os.rename(self.tmp / j["aside"], dest)
        if idx != before:
            step("store.index")
            self._write_index(idx)
        for p in leftovers:
            if os.path.lexists(p):
                step("store.discard")
                discard(p)
        step("store.journal-done")
        self.journal_path.unlink()

    def _view(self) -> dict:
        """The index as a reader should see it: a dead operation's journal is settled first, a live one read through."""
        if self.journal_path.exists() and self.root.is_dir():
            with self.locked(wait=False):
                pass
        idx = self.index()
        j = self._journal()
        if j is not None and j["op"] == "install" and _manifest_sha256(self.models / j["name"]) == j["sha256"]:
            idx[j["name"]] = j["record"]
        elif j is not None and j["op"] == "remove":
            idx.pop(j["name"], None)
        return idx

    # -- install ---------------------------------------------------------------------------
    def install(self, bundle: Path, *, name: str | None = None, public_key=None, force: bool = False) -> tuple[str, Manifest, str | None]:
        """Install a bundle (tar or directory); return (name, manifest, signer key id)."""
        from edgemed.packaging import signing
        from edgemed.packaging.archive import is_tar, read_tar

        bundle = Path(bundle)
        if not bundle.exists():
            raise InputError(f"Bundle '{bundle}' does not exist.", "pass a .edgemed file or bundle directory made by `edgemed pack`")
        signer: dict = {}

        with self.locked(), owned(self.tmp):
            stage = debris_path(self.tmp, "install")
            step("store.stage")
            stage.mkdir()

            def sink(entry: FileEntry, src: BinaryIO) -> str:
                dest = stage / entry.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                step("store.stage-file")
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
                step("store.stage-manifest")
                (stage / MANIFEST).write_bytes(data)
                if sig is not None:
                    (stage / SIGNATURE).write_bytes(sig)
                target = check_name(name or man.name)
                self._dedupe(stage, man)
                record = {"manifest_sha256": hashlib.sha256(data).hexdigest(), "source": str(bundle.absolute()),
                          "signed_by": signer.get("key_id"), "installed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                aside = debris_path(self.tmp, f"old-{target}")
                write_text(self.journal_path, json.dumps({"op": "install", "name": target, "sha256": record["manifest_sha256"],
                                                          "stage": stage.name, "aside": aside.name, "record": record}) + "\n")
            except BaseException:
                discard(stage)
                raise
            try:  # from here on the journal decides, by the same rule after success, an error or a kill
                swap_in(stage, self.models / target, aside)
            finally:
                self._settle()
            self._collect_garbage()
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
                step("store.link")
                os.link(blob, tmp_link)
                step("store.link-replace")
                os.replace(tmp_link, staged)
                continue
            tmp_blob = self.blobs / f".{entry.sha256}.{os.getpid()}"
            try:
                step("store.blob-link")
                os.link(staged, tmp_blob)
            except FileExistsError:  # a killed install's leftover with our pid: it is unlinked debris
                tmp_blob.unlink()
                os.link(staged, tmp_blob)
            except OSError as exc:  # a file system without hard links: keep the private copy
                log.warning("cannot hard-link into the store (%s); '%s' is stored unshared", exc, entry.path)
                continue
            step("store.blob-replace")
            os.replace(tmp_blob, blob)

    # -- queries ---------------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        check_name(name)
        d = self.models / name
        if not d.is_dir() and self.journal_path.exists():
            self._view()  # a dead install may have left it aside: settle, then look again
        if not d.is_dir():
            raise StoreError(f"No model named '{name}' is installed.", "run `edgemed list` to see installed models, or `edgemed install BUNDLE`")
        return d

    def verify(self, name: str, *, full: bool = False, public_key=None) -> Verified:
        d = self.model_dir(name)
        rec = self._view().get(name) or {}
        if not rec:
            raise IntegrityError(f"'{name}' is in the store but not in its index.", f"reinstall it: edgemed install BUNDLE --force")
        return verify_dir(d, full=full, public_key=public_key, cache=self.cache, expect_manifest_sha256=rec.get("manifest_sha256"))

    def list(self) -> list[dict]:
        out = []
        idx = self._view()
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
        with self.locked(), owned(self.tmp):
            check_name(name)
            if not (self.models / name).is_dir() and name not in self.index():
                self.model_dir(name)  # raises: no such model
            trash = debris_path(self.tmp, f"rm-{name}")
            write_text(self.journal_path, json.dumps({"op": "remove", "name": name, "trash": trash.name}) + "\n")
            self._settle()
            return self._collect_garbage()

    def disk_usage(self) -> int:
        return sum(p.stat().st_size for p in self.blobs.iterdir()) if self.blobs.is_dir() else 0


def _manifest_sha256(model_dir: Path) -> str | None:
    """sha256 of ``model_dir/manifest.json``, or None when there is no such regular file."""
    p = model_dir / MANIFEST
    if p.is_symlink() or not p.is_file():
        return None
    return hashlib.sha256(p.read_bytes()).hexdigest()


def resolve_model(name_or_path: str | Path, *, full: bool = False) -> Path:
    """What ``edgemed run MODEL`` loads: a verified model path.

    - an installed model name: the store's bundle, verified (fast path unless ``full``);
    - a bundle directory: verified in place;
    - a .gguf file (or ONNX directory): returned as is (there is no manifest to check);
    - a tar bundle: refused with the install command to run;
    - a missing path: returned as is, for the engine's own "does not exist" message.

    The rule is ``edgemed.packaging.ref`` (``runnable``); this is its model path.
    """
    from edgemed.packaging.ref import runnable

    return runnable(name_or_path, full=full).model_path
