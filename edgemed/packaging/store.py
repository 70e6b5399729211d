"""The local model store: install, list, remove and resolve bundles by name.

Layout under ``$EDGEMED_HOME/store``::

    blobs/sha256/<digest>    each distinct file once, read-only
    models/<name>/           an installed bundle directory; its files are hard links to blobs
    versions/<name>/<sha>/   the version <name> had before its last update (manifest sha256), kept for rollback;
                             hard links to the same blobs, so it costs no disk the blobs do not already hold
    index.json               name -> sha256 of its manifest.json, source/origin, signer, install time, and
                             ``previous``: the record of the kept version
    journal.json             the one operation that changes models/ (present only while it runs)
    tmp/                     owner-tagged staging (edgemed.files.debris); swept by the next operation
    lock                     flock held by install, rollback and remove (and by a reader settling a journal);
                             held shared by a reader reading again what failed (``Store.reading``)

Content addressing: two bundles that share a file (same sha256) share one blob
(one inode, two links). A blob whose link count falls to 1 belongs to no model and
is removed. An install links a file whose blob the store holds already (of its size and digest) into its stage
instead of copying it, and counts only the other files against the free space: an update that changes a bundle's
card alone copies no weights and needs no room for them. Every load goes through ``packaging.ref.runnable``, which
verifies the bundle (fast path, or ``--full``) before returning the model path.

Crash safety (a kill at any instant leaves the old model or the new one installed):
files are streamed into ``tmp/``, hashed as they are written and checked against the
manifest, and synced to disk with the stage's folders (``_sync_stage``). Then ``journal.json`` is written
(atomically and synced, ``files/durable.py``: after a power cut it is never an empty file) naming the model, the new
manifest's sha256, the staged folder, the aside name and the index record. Only then
does ``models/<name>`` change: one ``renameat2(RENAME_EXCHANGE)``, or two renames
(old -> aside, staged -> models) where exchange is unavailable. A remove writes its
journal (the model and the trash name), then renames ``models/<name>`` into the trash.
Settling a journal (``_settle``) is the same code after success and after a kill: an
install rolls forward (writes the index record, drops the old copy) only if
``models/<name>`` holds the journal's manifest; otherwise it rolls back (the aside goes
back, if ``models/<name>`` is empty and the aside is a copy of that model). A remove
drops the index record only once ``models/<name>`` is gone. So settling never takes a
model out of ``models/``: it only finishes or undoes what edgemed itself moved. What it frees (copies it drops,
staging, blobs no copy links) goes before its one write, the index's, so a full disk lets a remove's journal finish in
the room the removed model frees; ``remove`` makes room for its own journal, where it finds none, by dropping the
model's kept versions first, and refuses a disk still full naming it (``_full``). The
journal goes last. Every store operation settles a journal first; readers settle one
that no live operation holds, and read a live one through, or a dead one they cannot settle (a store they cannot
write: a full disk, a read-only mount, another account's store; a warning says so, and writers refuse). Readers take no lock; one whose
read fails (a swap came between its reads of the index, the manifest and the files) reads
again holding the lock shared, under which nothing is swapped (``Store.verify``, ``list``). A stop (Ctrl-C, SIGTERM)
that comes once an install or rollback has swapped ``models/<name>``, or a remove has moved it into its trash, cannot
undo it: it goes on marked with the version now installed (or the model removed) and what it cut short
(``_stop_told``; a stop after the method returned, before the command printed its result: ``change_made``),
which the command reports instead of "nothing changed".

Update and rollback: an install over an installed model records the old record as the new
one's ``previous``; rolling forward then moves the replaced copy (the aside, or the stage
after an exchange) to ``versions/<name>/<its sha>`` instead of discarding it, and drops any
other version of that name. ``rollback`` is an install whose stage is a folder of hard links
to the kept version and whose record is the kept one (with the current one as its
``previous``), under the same journal: a kill at any step leaves the current model or the
kept one in ``models/<name>``, and the other one kept. A remove drops the kept versions too.
Rolling an install forward also links each blob the new model holds over every other copy of
that file in the store (a kept version, another model) that no longer hashes right
(``_mend_copies``): a repair writes a new blob over a damaged one, and the kept version that
shared the damaged file must not keep it, or rollback would refuse it.

Adapter-only bundles (LoRA adapters for a base named by its checkpoint sha256, no model file) install through
the same path and journal; the install is refused, before any weights are read, while no installed model was
converted from that checkpoint. ``models_for_base`` and ``adapter_bundles_for`` read the installed manifests.

Damaged or hostile state (``store_files``): index.json and journal.json are checked before
anything acts on them; a journal that fails is set aside (never deleted) and nothing is done on
its word; in ``tmp/`` only dead owners' debris is removed, and an aside copy goes back into
``models/`` only when it holds the manifest the journal or the index names.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from edgemed import env
from edgemed.files import flocks
from edgemed.files.atomic import step, swap_in, write_text
from edgemed.files.debris import debris_path, discard, is_debris, owned, sweep
from edgemed.files.durable import sync_folder, sync_tree
from edgemed.files.state import require_folder
from edgemed.errors import (Done, EdgemedError, InputError, IntegrityError, OutputError, StoreError, output_error,
                             stopped_after)
from edgemed.packaging.bundle import DAMAGED, REINSTALL, Verified, read_manifest, verify_dir
from edgemed.packaging.digest import VerifiedCache, copy_hashed, file_digest
from edgemed.packaging.manifest import MANIFEST, FileEntry, Manifest, check_name
from edgemed.packaging.release_order import card_version as _version  # the index's version: one reading, with release_order's
from edgemed.packaging.store_files import (SHA256, Damaged, aside_of, is_model_copy, manifest_sha256, read_index, read_journal,
                                           record_problem, set_aside, split_index, valid_name, warn_legacy)

log = logging.getLogger(__name__)

JOURNAL = "journal.json"
_TMP_BLOB = re.compile(r"\.[0-9a-f]{64}\.[0-9]+")  # _dedupe's link before its rename onto the blob
BLOB_HELD, BLOB_ABSENT, BLOB_DAMAGED = "held", "absent", "damaged"  # what ``Store.blob`` finds
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)  # a write refused for lack of room: freeing space lets it through


def _no_room(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _NO_ROOM


def _free_bytes(path: Path) -> int:
    """The bytes this user may still write on the disk holding ``path`` (0 where that cannot be read)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


_HELD = threading.local()


def _held() -> set[tuple[int, int]]:
    """The store locks this thread holds as a writer, by (st_dev, st_ino) of the lock file: ``reading`` leaves them be."""
    if not hasattr(_HELD, "keys"):
        _HELD.keys = set()
    return _HELD.keys


def _lock_key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _summary(rec: dict | None) -> dict | None:
    """What ``list`` says of a kept version."""
    if not rec:
        return None
    return {"version": rec.get("version"), "digest": "sha256:" + rec["manifest_sha256"], "signed_by": rec["signed_by"],
            "origin": rec.get("origin") or rec["source"], "installed": rec["installed"]}


def get_again(name: str, record: dict, kept: bool = False) -> str:
    """The fix for a damaged copy of ``name`` that ``record`` installed: get that bundle again from where it came (its
    registry, its bundle file, or any bundle). ``kept``: the copy kept for rollback, which that command installs in
    place of the current one (kept in its turn), an older release allowed."""
    origin, source = record.get("origin"), record.get("source")
    copy, older = ("the copy kept for rollback", " --allow-downgrade") if kept else ("the installed copy", "")
    if isinstance(origin, str) and origin.startswith("oci://"):
        return (f"{copy} is damaged or was altered; get it again from its registry: "
                f"edgemed pull {origin} --name {name} --force{older}")
    bundle = source if isinstance(source, str) and not origin and Path(source).exists() else "BUNDLE"
    return f"{copy} is damaged or was altered; install it again: edgemed install {bundle} --name {name} --force{older}"


#: ``source`` in an index record holds at most this many characters (``store_files``): a longer path is shortened
#: at its start, which only names where the bundle was
_MAX_SOURCE = 4096


def _source_text(text: str) -> str:
    return text if len(text) <= _MAX_SOURCE else "..." + text[-(_MAX_SOURCE - 3):]


class Store:
    def __init__(self, root: Path | None = None):
        self.root = Path(root or env.store_dir())
        self._follows_home = root is None  # the default store: it moves with `edgemed home --move`
        require_folder(self.root, "edgemed's model store", env.HOME_VAR)  # a file in the way: named once, here
        self.blobs = self.root / "blobs" / "sha256"
        self.models = self.root / "models"
        self.versions = self.root / "versions"
        self.tmp = self.root / "tmp"
        self.index_path = self.root / "index.json"
        self.journal_path = self.root / JOURNAL
        self.cache = VerifiedCache()
        self._said: set[str] = set()  # the warnings of ``_settle_dead`` already given by this Store
        self._change: tuple[str, dict] | None = None  # the last install, rollback or remove begun: verb, swap

    # -- housekeeping ---------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, wait: bool = True, make_room: Callable[[], bool] | None = None) -> Iterator[bool]:
        """Hold the store lock (settling a dead operation's journal, then sweeping); yields False
        at once, without the lock, if ``wait`` is False and a live operation holds it. Waiting, it says so.
        ``make_room``: where settling finds the disk full, what frees space (returning whether it freed any) before it
        is tried once more (``remove``: the kept versions of the model it removes)."""
        import fcntl

        self._same_home()  # before a folder is made: never a store again where the state moved away from
        for d in (self.blobs, self.models, self.tmp):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):  # a file where one of the store's folders goes
                require_folder(d, "The store's folder", env.HOME_VAR)
                raise
        try:
            fh = open(self.root / "lock", "a")
        except OSError as exc:
            raise self._unfinished(exc) or exc
        with fh:
            try:
                if wait:
                    flocks.take(fh, fcntl.LOCK_EX, self._waiting())
                else:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            key = _lock_key(fh.fileno())
            _held().add(key)
            try:
                self._same_home()  # `edgemed home --move` holds this lock while it renames
                try:
                    try:
                        self._settle()
                    except OSError as exc:
                        if not (_no_room(exc) and make_room is not None and make_room()):
                            raise
                        self._settle()  # with the room made
                except OSError as exc:
                    raise self._unfinished(exc) or exc
                self._collect_garbage()
                yield True
            finally:
                _held().discard(key)
                fcntl.flock(fh, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def reading(self) -> Iterator[bool]:
        """Hold the store lock shared: while a reader holds it, no install, pull, rollback or remove can change
        ``models/`` or the index (each holds the lock exclusively, from its first staged file to its settled
        journal). A dead operation's journal is settled first. Waiting, it says so (a long install is waited for).

        Yields False, without the lock, where this thread holds the store lock already (a writer reading: taken
        again on another descriptor, the lock would wait on itself for ever), or where the lock file cannot be
        opened (a store this user may only read: read as before, without the lock)."""
        import fcntl

        self._settle_dead()
        try:
            fd = os.open(self.root / "lock", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            log.debug("reading the store in %s without its lock (%s)", self.root, exc)
            yield False
            return
        try:
            if _lock_key(fd) in _held():
                yield False
                return
            flocks.take(fd, fcntl.LOCK_SH, self._waiting())
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _stop_told(self, verb: str) -> Iterator[dict]:
        """Around an install or a rollback, which names its swap in the dict yielded (``name``, ``record``; a remove:
        ``name``, ``removed``) before it makes it (and sets ``cleaned`` once it collected the garbage): a stop (Ctrl-C, SIGTERM) that comes once ``models/<name>`` holds that record's manifest cannot undo
        it (settling rolls it forward), so the stop goes on marked with what took effect (``errors.stopped_after``)
        and what it cut short, for the command to report the model it installed, not a change that never was."""
        swap: dict = {}
        self._change = verb, swap
        try:
            yield swap
        except KeyboardInterrupt as stop:
            done = self._took_effect(verb, swap)
            if done is not None:
                stopped_after(stop, done)
            raise

    def change_made(self, after: str) -> Done | None:
        """What the last install, rollback or remove this Store began has made take effect, for a stop (Ctrl-C,
        SIGTERM) that comes once it returned, before the command has printed its result (``after``: that report,
        which the stop cut short); None where it made none (it failed, or was stopped before its commit point) or
        none was begun. Read from the store as ``_stop_told`` reads it, so it holds for a stop at any instant."""
        if self._change is None:
            return None
        verb, swap = self._change
        return self._took_effect(verb, swap, after)

    def _took_effect(self, verb: str, swap: dict, after: str = "nothing the store needs (it was releasing its lock)"
                     ) -> Done | None:
        """What the change ``swap`` names made take effect (``_stop_told``); ``after``: what is left once the store
        has nothing left to do."""
        name, record = swap.get("name"), swap.get("record")
        with contextlib.suppress(OSError, StoreError):
            if record is not None and manifest_sha256(self.models / name) == record["manifest_sha256"]:
                return self._done(name, record, verb, swap.get("cleaned", False), after)
            if swap.get("removed") and self._removed(name):
                return self._gone(name, swap.get("cleaned", False), after)
        return None

    def _removed(self, name: str) -> bool:
        """Whether a remove of ``name`` (``swap["removed"]``, set before its journal is written) has taken effect:
        ``models/<name>`` is gone, and its journal waits to drop the record (settling does that whatever comes) or
        has dropped it. Neither: the stop came before the journal was written, and nothing changed."""
        if os.path.lexists(self.models / name):
            return False
        return os.path.lexists(self.journal_path) or name not in self._raw_index()

    def _gone(self, name: str, cleaned: bool, after: str) -> Done:
        """What a remove of ``name`` left when a stop came once it took effect (``_removed``)."""
        left = [] if cleaned else [("the clean-up of its files no other model uses (the next install, pull, "
                                    "rollback or remove does it)")]
        if os.path.lexists(self.journal_path):
            left.insert(0, f"settling its journal (dropping its record from {self.index_path.name}, its kept versions "
                           "and its folder in the trash; the next edgemed command that reads the store does it)")
        return Done(f"'{name}' was removed", "; ".join(left) or after)

    def _done(self, name: str, record: dict, verb: str, cleaned: bool, after: str) -> Done:
        """What an install or rollback of ``record`` as ``name`` left when a stop came after its swap."""
        digest = "sha256:" + record["manifest_sha256"]
        left = [] if cleaned else [("the clean-up of its staging folder and of the files no model uses any more (the "
                                    "next install, pull, rollback or remove does it)")]
        if os.path.lexists(self.journal_path):  # every reader reads the new version through it already
            kept = ", keeping the version it replaced for rollback" if record.get("previous") else ""
            left.insert(0, f"settling its journal (recording it in {self.index_path.name}{kept}; the next edgemed "
                           "command that reads the store does it)")
        version = f"version {record['version']} ({digest[:19]})" if record.get("version") else digest[:19]
        return Done(f"'{name}' {verb} {version}", "; ".join(left) or after,
                    {"name": name, "version": record.get("version"), "digest": digest,
                     "signed_by": record.get("signed_by")})

    def _waiting(self) -> str:
        return f"waiting for another edgemed command to finish with the store in {self.root} (one change at a time)"

    def _same_home(self) -> None:
        """Refuse to change the default store once ``edgemed home --move`` has moved the state folder away from it
        (this command resolved it before): what it wrote there would be in a store nothing reads."""
        if self._follows_home and env.store_dir() != self.root:
            raise InputError(f"edgemed's state moved to {env.home()} while this command ran (it had started on the "
                             f"store in {self.root}); nothing was changed.", "run the command again")

    def _collect_garbage(self) -> int:
        """Under the lock, after ``_settle``: drop dead owners' staging and blobs no model links to. Returns bytes freed."""
        sweep(self.root)  # a killed write of index.json or journal.json
        self._rescue_asides()  # before the sweep: an aside whose journal is gone may be a model's only copy
        sweep(self.tmp)
        warn_legacy(self.tmp)
        return self._collect_blobs()

    def _collect_blobs(self) -> int:
        """Under the lock: remove the blobs no model, kept version or stage links to any more. Returns bytes freed.
        Safe while a journal waits (``_settle`` frees its room this way): every copy it may keep links its blobs."""
        freed = 0
        for blob in self.blobs.iterdir():
            if not (SHA256.fullmatch(blob.name) or _TMP_BLOB.fullmatch(blob.name)):
                continue  # not a name edgemed gives a blob: not ours to remove
            st = blob.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_nlink <= 1:
                step("store.gc-blob")
                freed += st.st_size
                blob.unlink()
        return freed

    def _rescue_asides(self) -> None:
        """Under the lock, with no journal: onto a missing ``models/<name>`` the index names, put back our aside copy
        (the sweep would remove it) or an older edgemed's ``old.<name>.<pid>`` that holds the indexed manifest."""
        try:
            good, _ = split_index(self._raw_index())
        except StoreError:
            return  # nothing vouches for any copy
        for p in self.tmp.iterdir():
            name = aside_of(p.name)
            rec = good.get(name) if name is not None else None
            if rec is None or os.path.lexists(self.models / name) or not is_model_copy(p, None):
                continue
            vouched = is_model_copy(p, rec["manifest_sha256"])
            if vouched or is_debris(p):  # an older edgemed's name is never swept: leaving it loses nothing
                step("store.rescue")
                os.rename(p, self.models / name)
                log.warning("restored '%s' from %s (a replacement was interrupted)%s", name, p,
                            "" if vouched else "; its manifest is not the one the index records")

    def index(self) -> dict:
        """The index's well-formed records (name -> record); a damaged record is left out (``list`` shows it).
        Raises StoreError when the file as a whole is unusable."""
        return split_index(self._raw_index())[0]

    def _raw_index(self) -> dict:
        """index.json as a JSON object, records unchecked (a writer keeps the ones it does not change as they are)."""
        return read_index(self.index_path, self.models)

    def _write_index(self, idx: dict) -> None:
        self._write_room(self.index_path, json.dumps(idx, indent=2, sort_keys=True) + "\n")

    # -- the journal -----------------------------------------------------------------------
    def _sync_stage(self, stage: Path) -> None:
        """Before the journal names ``stage``: its folders' entries (the files ``sink`` synced, links to blobs), the
        blobs ``_dedupe`` linked in and the stage's own entry in ``tmp/`` on disk, so the folder swapped into
        ``models/`` is whole after a power cut."""
        for folder, _dirs, _files in os.walk(stage):
            sync_folder(folder)
        sync_folder(self.blobs)
        sync_folder(self.tmp)

    def _settle(self) -> None:
        """Under the lock: finish or undo the operation a journal describes (the same after success and after a kill).

        Settling acts only on what edgemed staged and can check: an install rolls forward only when ``models/<name>``
        holds the journal's manifest, and back only into an empty ``models/<name>`` from the journal's aside (never
        discarded); a remove drops the index record only once ``models/<name>`` is gone.

        What settling frees (the copies it drops, the staging, the blobs no copy links any more) goes before the one
        write it makes, the index's: once ``models/<name>`` has decided which way it goes, each of those steps is what
        the journal leads to anyway and is done again, or found done, by the next settle after a kill. So a journal
        left on a full disk finishes with the room its own change frees (a remove's: the removed model's files).
        Returns the bytes freed."""
        try:
            j = read_journal(self.journal_path)
        except Damaged as exc:
            set_aside(self.journal_path, str(exc))
            return 0
        if j is None:
            return 0
        name = j["name"]
        dest = self.models / name
        before = self._raw_index()  # a damaged index: StoreError, the journal stays, nothing has changed
        idx = dict(before)
        if j["op"] == "remove":
            if not os.path.lexists(dest):  # the remove moved it into its trash (or it was gone already)
                idx.pop(name, None)
        elif manifest_sha256(dest) == j["sha256"]:  # the new model is in place: roll forward
            idx[name] = j["record"]
        elif not os.path.lexists(dest):  # the old one was moved aside: back, whatever the index says of it
            aside = self.tmp / j["aside"]
            rec = split_index(before)[0].get(name)
            if is_model_copy(aside, None):  # a model folder edgemed named: never discarded (it may be the only copy)
                if not is_model_copy(aside, rec["manifest_sha256"] if rec else None):
                    log.warning("restored '%s' from %s; its manifest is not the one the index records", name, aside)
                step("store.restore")
                os.rename(aside, dest)
        forward = j["op"] == "install" and idx.get(name) == j["record"]
        if forward:
            self._keep_previous(name, j)
        elif j["op"] == "remove" and name not in idx:
            self._drop_versions(name, keep=None)
        for key in ("stage", "aside", "trash"):
            p = self.tmp / j[key] if key in j else None
            if p is not None and os.path.lexists(p):
                step("store.discard")
                discard(p)
        freed = self._collect_blobs()
        if idx != before:
            step("store.index")
            self._write_index(idx)
        if forward:
            self._mend_copies(name, split_index(idx)[0])
        step("store.journal-done")
        self.journal_path.unlink()
        return freed

    def _keep_previous(self, name: str, j: dict) -> None:
        """Under the lock, rolling an install forward: the replaced copy (aside, or stage after an exchange) becomes
        ``versions/<name>/<sha>`` when the new record names it as ``previous``; other kept versions of the name go.
        Each step is idempotent: a kill here is finished by the next settle (the journal is still there)."""
        prev = j["record"].get("previous")
        keep = prev["manifest_sha256"] if prev else None
        if keep is not None and keep != j["sha256"] and not os.path.lexists(self.versions / name / keep):
            copy = next((p for p in (self.tmp / j["aside"], self.tmp / j["stage"]) if is_model_copy(p, keep)), None)
            if copy is not None and self._versions_of(name, create=True) is not None:
                step("store.keep-version")
                os.rename(copy, self.versions / name / keep)
        self._drop_versions(name, keep)

    def _mend_copies(self, name: str, idx: dict) -> None:
        """Under the lock, rolling an install forward: link the store's blob over every copy of its file elsewhere in
        the store (another model, a kept version) that the copy's manifest expects to be that blob and that no longer
        hashes to it, for each blob the installed ``name`` links. A repair writes a new blob over a damaged one, but
        the damaged file stays linked wherever the old blob was (the version kept for rollback shares it), and
        rollback would refuse it. A copy that is the blob's own file is not read; one that is another file is hashed
        in full (after a repair: rare). Each file is swapped at once (a link in ``tmp/``, renamed over it); a kill
        between two leaves the journal, so the next settle goes on."""
        home = self.models / name
        try:
            blobs = {e.sha256: self.blobs / e.sha256 for e in read_manifest(home)[0].files
                     if _same_file(home / e.path, self.blobs / e.sha256)}
        except (EdgemedError, OSError):  # not whole enough to read: nothing is mended from it
            return
        for folder in self._copies(idx):
            if folder == home:
                continue
            try:
                entries = [e for e in read_manifest(folder)[0].files if e.sha256 in blobs]
            except (EdgemedError, OSError):
                continue
            for e in entries:
                if _same_file(folder / e.path, blobs[e.sha256]) or not _fails(folder / e.path, e):
                    continue
                with owned(self.tmp):
                    link = debris_path(self.tmp, "mend")
                    try:
                        step("store.mend-link")
                        os.link(blobs[e.sha256], link)
                        step("store.mend-replace")
                        os.replace(link, folder / e.path)
                    except OSError as exc:  # no hard links here, or the blob at its most: the copy stays as it is
                        discard(link)
                        log.warning("could not mend '%s' in %s from the store's blob (%s)", e.path, folder, exc)
                        continue
                log.warning("'%s' in %s did not match its manifest; it links the store's whole copy now", e.path, folder)

    def _copies(self, idx: dict) -> Iterator[Path]:
        """Every model folder of the store whose manifest is the one it is known by: ``models/<name>`` holding what
        ``idx`` records, ``versions/<name>/<sha>`` holding the manifest of that sha (a link is no copy of the store's)."""
        for name, rec in idx.items():
            if is_model_copy(self.models / name, rec["manifest_sha256"]):
                yield self.models / name
        if self.versions.is_dir() and not self.versions.is_symlink():
            for vdir in sorted(self.versions.iterdir()):
                if vdir.is_dir() and not vdir.is_symlink():
                    yield from (p for p in sorted(vdir.iterdir()) if SHA256.fullmatch(p.name) and is_model_copy(p, p.name))

    def _drop_versions(self, name: str, keep: str | None) -> int:
        """Under the lock: remove ``versions/<name>/<sha>`` folders other than ``keep`` (only names edgemed gives);
        return how many went."""
        vdir = self._versions_of(name)
        if vdir is None:
            return 0
        dropped = 0
        for p in vdir.iterdir():
            if p.name != keep and SHA256.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                step("store.drop-version")
                shutil.rmtree(p)
                dropped += 1
        if keep is None and not any(vdir.iterdir()):
            vdir.rmdir()
        return dropped

    def _versions_of(self, name: str, create: bool = False) -> Path | None:
        """``versions/<name>`` when it is a real folder of the store's (made with ``create``); None otherwise (a link
        or a file there is left alone, with a warning: edgemed keeps nothing through it)."""
        vdir = self.versions / name
        for d in (self.versions, vdir):
            if create and not os.path.lexists(d):
                d.mkdir()
            if os.path.lexists(d) and (d.is_symlink() or not d.is_dir()):
                log.warning("%s is not a folder edgemed made (a link or a file); no version of '%s' is kept through it", d, name)
                return None
        return vdir if vdir.is_dir() else None

    def kept_version(self, name: str, rec: dict | None = None) -> Path | None:
        """The folder of the version ``rollback`` would return to, when one is kept whole enough to try."""
        rec = rec if rec is not None else self.record(name)
        prev = rec.get("previous") if rec else None
        vdir = self._versions_of(name) if prev else None
        p = vdir / prev["manifest_sha256"] if vdir is not None else None
        return p if p is not None and is_model_copy(p, prev["manifest_sha256"]) else None

    def _settle_dead(self) -> None:
        """Settle the journal of an operation that died (its lock is free); a live one's is left to it. One that
        cannot be settled (a damaged index; a store this process cannot write: a full disk, a read-only mount, a
        store another account owns) is read through by ``_view``, as a live one is, and said once."""
        if os.path.lexists(self.journal_path) and self.root.is_dir():
            try:
                with self.locked(wait=False):
                    pass
            except (StoreError, OutputError, OSError) as exc:  # settling waits for a writer that can: read it through
                said = str(exc).replace("\n", " ")
                if said not in self._said:
                    self._said.add(said)
                    log.warning("%s", said)

    def _unfinished(self, exc: OSError) -> OutputError | None:
        """A store that cannot be written (``exc``: a full disk, a read-only mount, no permission) while a dead
        operation's journal waits there to be settled, as an error naming both; None for anything else."""
        clean = output_error(exc)
        if clean is None or not os.path.lexists(self.journal_path):
            return None
        if _no_room(exc):
            return self._full(exc, f"a change to the store was interrupted ({self._pending()}), and its journal ({JOURNAL}) "
                                   f"cannot be finished until there is room to record it in {self.index_path.name}; until then nothing "
                                   "can be installed, rolled back or removed (installed models are read as that change "
                                   "leaves them: `edgemed list`, `run` and `verify` work)",
                              "run `edgemed list` once: it finishes the change")
        return OutputError(f"A change to the store in {self.root} was interrupted, and its journal ({JOURNAL}) cannot "
                           f"be finished: {clean.problem} Until it is, installed models are read as the journal leaves them, "
                           "and nothing in the store can be installed, rolled back or removed.",
                           "make the store writable (free space on its disk, remount it read-write, or use the account "
                           "that owns it), then run `edgemed list` once: it finishes the change")

    def _pending(self) -> str:
        """The change the journal waits to finish, in words, for a message."""
        try:
            j = read_journal(self.journal_path)
        except (Damaged, OSError):
            j = None
        if j is None:
            return "its journal names no change edgemed can read"
        if j["op"] == "remove":
            return f"the removal of '{j['name']}'"
        version = j["record"].get("version") or "sha256:" + j["sha256"][:12]
        return f"the install or rollback of '{j['name']}' to {version}"

    def _full(self, exc: OSError, what: str, then: str) -> OutputError:
        """A write the store's disk refused for lack of room (``exc``), as an error naming the disk, the bytes free
        there, what waits for the room (``what``) and the fix, ending in ``then`` (what to run once there is room)."""
        need = getattr(exc, "edgemed_need", None)
        want = f"at least {need:,} bytes: " if need else ""
        quota = " (or within your quota)" if exc.errno == errno.EDQUOT else ""
        return OutputError(f"The disk holding the model store {self.root} is full ({_free_bytes(self.root):,} bytes free"
                           f"{quota}; writing {exc.filename or 'a file'} was refused): {what}.",
                           f"free space on that disk outside the store ({want}`df -h {self.root}` shows the disk; old "
                           f"logs and downloaded bundles are the usual room), then {then}")

    def _write_room(self, path: Path, text: str) -> None:
        """``write_text`` of one of the store's files; refused for lack of room, the error carries the bytes the write
        needed (``edgemed_need``: the new file, written whole beside the old one) for ``_full`` to name."""
        try:
            write_text(path, text)
        except OSError as exc:
            if _no_room(exc):
                exc.edgemed_need = len(text.encode("utf-8"))
            raise

    def _view(self) -> tuple[dict, dict]:
        """(records, damaged) as a reader should see the index: a dead operation's journal is settled first, a live one
        read through. ``damaged`` maps a name whose record is malformed to why. StoreError: the index is unusable."""
        self._settle_dead()
        idx, bad = split_index(self._raw_index())
        try:
            j = read_journal(self.journal_path)
        except Damaged:
            j = None  # a live operation's journal that someone changed: nothing is read through it
        if j is not None and j["op"] == "install" and manifest_sha256(self.models / j["name"]) == j["sha256"]:
            idx[j["name"]] = j["record"]
            bad.pop(j["name"], None)
        elif j is not None and j["op"] == "remove" and not os.path.lexists(self.models / j["name"]):
            idx.pop(j["name"], None)
            bad.pop(j["name"], None)
        return idx, bad

    # -- install ---------------------------------------------------------------------------
    def install(self, bundle: Path, *, name: str | None = None, public_key=None, force: bool = False,
                origin: str | None = None, allow_signer_change: bool = False, allow_downgrade: bool = False,
                on_order=None) -> tuple[str, Manifest, str | None]:
        """Install a bundle (tar or directory); return (name, manifest, signer key id). Replacing a model that was
        signed takes a bundle from its signer (``trust.check_update``) unless ``allow_signer_change``; replacing
        one with an older release is refused (``release_order.check``) unless ``allow_downgrade``, and
        ``on_order`` (when given) is called with how the releases ordered.

        ``origin``: where the bundle came from when that is not the local path given (``oci://HOST/REPO@sha256:...``
        for a pull); it is recorded in the index, shown by ``list``, and selects the trust policy's entry."""
        from edgemed.packaging import release_order, signing, trust
        from edgemed.packaging.archive import check_room, is_tar, read_tar

        bundle = Path(bundle)
        policy = trust.load()
        if not bundle.exists():
            raise InputError(f"Bundle '{bundle}' does not exist.", "pass a .edgemed file or bundle directory made by `edgemed pack`")
        signer: dict = {}

        with self._stop_told("was installed:") as swap, self.locked(), owned(self.tmp):
            self._raw_index()  # a damaged index is refused before anything is staged or swapped
            stage = debris_path(self.tmp, "install")
            step("store.stage")
            stage.mkdir()
            held: set[str] = set()  # files whose blob the store holds already (``_holds``): linked, never copied

            def link_held(entry: FileEntry) -> bool:
                dest = stage / entry.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                return entry.path in held and self._link_blob(entry.sha256, dest)

            def sink(entry: FileEntry, src: BinaryIO) -> str:
                dest = stage / entry.path
                if link_held(entry):
                    return copy_hashed(src, None, entry.size, entry.path)  # the tar's bytes checked, not written
                step("store.stage-file")
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
                with os.fdopen(fd, "wb") as dst:
                    got = copy_hashed(src, dst, entry.size, entry.path)
                    dst.flush()
                    os.fsync(dst.fileno())  # on disk before the journal can name it (``_sync_stage``)
                return got

            def check_signature(man: Manifest, data: bytes, sig: signing.Signature | None) -> None:
                target = check_name(name or man.name)
                if (self.models / target).exists() and not force:
                    raise StoreError(f"A model named '{target}' is already installed.",
                                     f"pass --force to replace it, or remove it first: edgemed remove {target}")
                if man.adapters_only:  # refused here, before any weights are read: its base must be installed
                    self._check_base_installed(man, target)
                key = trust.decide(origin, sig, man, data, key=public_key, policy=policy)  # the trust policy (trust.py)
                if (self.models / target).exists():  # an update: its signer continues the installed model's
                    key = trust.check_update(target, self.record(target), origin, sig, man, data, key, policy=policy,
                                             allow_signer_change=allow_signer_change)
                    order = release_order.check(self, target, man, data, origin or str(bundle), allow_downgrade=allow_downgrade)
                    if on_order is not None:
                        on_order(order)
                if key is not None:
                    signer["key_id"] = signing.signer_id(sig) if isinstance(key, signing.CertRoots) else key.key_id
                    signer["pem"] = key.pem.decode("ascii") if isinstance(key, signing.PublicKey) else None
                held.update(self._holds(man, None if is_tar(bundle) else bundle))
                check_room(man, bundle, self.root, held=sum(e.size for e in man.files if e.path in held))

            try:
                if is_tar(bundle):
                    man, data, sig = read_tar(bundle, sink, on_manifest=check_signature)  # the room: check_signature
                else:
                    man, data, sig = read_manifest(bundle)
                    check_room(man, bundle)  # the cap, as for a tar: before a byte of it is hashed or copied
                    check_signature(man, data, sig)  # and the room the store needs
                    verify_dir(bundle, full=True)  # the source must be whole before we copy it
                    for entry in man.files:
                        if link_held(entry):
                            continue
                        with open(bundle / entry.path, "rb") as fh:
                            got = sink(entry, fh)
                        if got != entry.sha256:
                            raise IntegrityError(f"'{entry.path}' changed while it was being installed: expected sha256 {entry.sha256}, actual {got}.",
                                                 "install again once nothing writes to the bundle")
                step("store.stage-manifest")
                (stage / MANIFEST).write_bytes(data)
                sync_tree(stage / MANIFEST)
                if sig is not None:
                    (stage / sig.file).write_bytes(sig.data)
                    sync_tree(stage / sig.file)
                target = check_name(name or man.name)
                self._dedupe(stage, man)
                self._sync_stage(stage)
                record = {"manifest_sha256": hashlib.sha256(data).hexdigest(), "source": _source_text(origin or str(bundle.absolute())),
                          "signed_by": signer.get("key_id"), "installed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "origin": origin, "version": _version(man), "signer_key": signer.get("pem"),
                          "signature_sha256": hashlib.sha256(sig.data).hexdigest() if sig is not None else None}
                record["previous"] = self._previous_of(target, record["manifest_sha256"])
                problem = record_problem(record, exact=True)
                if problem is not None:  # the journal would be set aside as not edgemed's, and the old version lost
                    raise StoreError(f"The store record for '{target}' would not be valid: {problem}.",
                                     "install from a shorter path (move the bundle), or report this as a bug")
                aside = debris_path(self.tmp, f"old-{target}")
                write_text(self.journal_path, json.dumps({"op": "install", "name": target, "sha256": record["manifest_sha256"],
                                                          "stage": stage.name, "aside": aside.name, "record": record}) + "\n")
            except BaseException:
                discard(stage)
                raise
            swap.update(name=target, record=record)  # a stop once it is in place reports it (``_stop_told``)
            try:  # from here on the journal decides, by the same rule after success, an error or a kill
                swap_in(stage, self.models / target, aside)
            finally:
                self._settle()
            self._collect_garbage()
            swap["cleaned"] = True
            self.cache.forget_under(self.models / target)
            self.cache.save()
            return target, man, signer.get("key_id")

    def _holds(self, man: Manifest, source: Path | None) -> set[str]:
        """The files of ``man`` whose blob the store holds already (``blob``), which an install links instead of
        copying (an update that changes the card alone copies no weights); ``source``: the bundle folder, whose very
        file there stands for its blob (the install hashes it in full itself; a pull's staging folder links them)."""
        return {e.path for e in man.files
                if self.blob(e.sha256, e.size, source / e.path if source is not None else None) == BLOB_HELD}

    def blob(self, sha256: str, size: int, same_as: Path | None = None) -> str:
        """Whether the store's blob ``sha256`` can stand for a file of ``size`` bytes with that digest (an install
        links it, a pull does not download it): ``BLOB_HELD``, a regular file of that size whose digest is right (the
        verified-digest cache answers for an unchanged one; or it is the file ``same_as``, which the caller hashes
        itself); ``BLOB_ABSENT``, not there, another kind of file or size, or unreadable; ``BLOB_DAMAGED``, of that
        size but its bytes hash to another digest (a caller fetches the file again rather than link the damage)."""
        blob = self.blobs / sha256
        try:
            st = blob.lstat()
            if not (stat.S_ISREG(st.st_mode) and st.st_size == size):
                return BLOB_ABSENT
            if (same_as is not None and os.path.samestat(st, os.lstat(same_as))
                    or file_digest(blob, self.cache, full=False)[0] == sha256):
                return BLOB_HELD
        except OSError:  # not there, or unreadable: the file is copied or downloaded
            return BLOB_ABSENT
        return BLOB_DAMAGED

    def _link_blob(self, sha256: str, dest: Path) -> bool:
        """Link the store's blob ``sha256`` at ``dest`` in a stage; False where it cannot be (the file is copied)."""
        try:
            step("store.stage-blob")
            os.link(self.blobs / sha256, dest)
        except OSError as exc:  # a file system without hard links, or the blob at its most links
            log.debug("cannot link the store's blob %s (%s); its file is copied", sha256, exc)
            return False
        return True

    def _previous_of(self, name: str, new_sha: str) -> dict | None:
        """The record an install of ``new_sha`` under ``name`` keeps as ``previous``: reinstalling the same version,
        the one it kept, whatever state ``models/<name>`` is in (a repair replaces a copy whose manifest.json is
        damaged or gone, and the kept version is not that copy); otherwise the installed one, when ``models/<name>``
        holds what the index says."""
        rec = split_index(self._raw_index())[0].get(name)
        if rec is not None and rec["manifest_sha256"] == new_sha:
            return rec.get("previous")
        if rec is None or manifest_sha256(self.models / name) != rec["manifest_sha256"]:
            return None
        return {k: v for k, v in rec.items() if k != "previous"}

    def rollback(self, name: str) -> tuple[dict, dict]:
        """Put back the version ``name`` had before its last update, atomically (the install journal); the current
        one is kept in its place, so a second rollback returns to it. Returns (record now installed, record kept)."""
        from edgemed.packaging import trust

        with self._stop_told("was rolled back to") as swap, self.locked(), owned(self.tmp):
            check_name(name)
            current = split_index(self._raw_index())[0].get(name)
            if current is None:
                self.model_dir(name)  # raises: no such model
                raise StoreError(f"'{name}' is in the store but not in its index ({self.index_path}).",
                                 f"reinstall it: edgemed install BUNDLE --name {name} --force")
            prev = current.get("previous")
            src = self.kept_version(name, current)
            if prev is None or src is None:
                raise StoreError(f"No earlier version of '{name}' is kept: it was installed once, or by an edgemed that "
                                 "kept none, or its kept copy is gone.",
                                 f"install the version you want with --force: edgemed install BUNDLE --name {name} --force")
            try:
                v = verify_dir(src, cache=self.cache, expect_manifest_sha256=prev["manifest_sha256"])
            except IntegrityError as exc:  # the kept files alone: a pull of the current version leaves them be
                if exc.fix not in (DAMAGED, REINSTALL):
                    raise
                which = prev.get("version") or "sha256:" + prev["manifest_sha256"][:12]
                raise IntegrityError(f"The version of '{name}' kept for rollback ({which}) does not verify: {exc.problem}",
                                     get_again(name, prev, kept=True)) from None
            trust.check_installed(prev, v.signature, v.manifest, v.manifest_bytes)  # the policy of today, as run would
            stage = debris_path(self.tmp, "install")
            record = {**prev, "previous": {k: val for k, val in current.items() if k != "previous"}}
            aside = debris_path(self.tmp, f"old-{name}")
            try:
                step("store.stage")
                stage.mkdir()
                for rel in [f.path for f in v.manifest.files] + [MANIFEST] + ([v.signature.file] if v.signature else []):
                    (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                    step("store.stage-link")
                    os.link(src / rel, stage / rel)
                self._sync_stage(stage)
                write_text(self.journal_path, json.dumps({"op": "install", "name": name, "sha256": prev["manifest_sha256"],
                                                          "stage": stage.name, "aside": aside.name, "record": record}) + "\n")
            except BaseException:
                discard(stage)
                raise
            swap.update(name=name, record=record)
            try:  # from here on the journal decides, as for an install
                swap_in(stage, self.models / name, aside)
            finally:
                self._settle()
            self._collect_garbage()
            swap["cleaned"] = True
            self.cache.forget_under(self.models / name)
            self.cache.save()
            return record, record["previous"]

    def _dedupe(self, stage: Path, man: Manifest) -> None:
        """Replace each staged file by a link to its blob (creating the blob if new)."""
        for entry in man.files:
            staged = stage / entry.path
            blob = self.blobs / entry.sha256
            if _same_file(staged, blob):  # staged as a link to the blob (``_holds``)
                continue
            os.chmod(staged, 0o444)
            if blob.exists() and file_digest(blob, self.cache, full=False)[0] == entry.sha256:
                tmp_link = _unused(stage)  # in the stage, under a name no file of the bundle has (not NAME.link)
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

    # -- adapters --------------------------------------------------------------------------
    def _manifests(self) -> Iterator[tuple[str, Manifest]]:
        """(name, manifest) of every installed bundle whose manifest reads (a damaged one is skipped: list shows it)."""
        for name in sorted(self._view()[0]):
            try:
                yield name, read_manifest(self._folder(name))[0]
            except (StoreError, IntegrityError, InputError, OSError):
                continue

    def models_for_base(self, base_source_sha256: str) -> list[str]:
        """Installed models (not adapter bundles) converted from the checkpoint ``base_source_sha256``."""
        return [n for n, m in self._manifests() if not m.adapters_only and m.base_source_sha256 == base_source_sha256]

    def adapter_bundles_for(self, base_source_sha256: str) -> list[tuple[str, Manifest]]:
        """Installed adapter-only bundles for the checkpoint ``base_source_sha256``, oldest install first."""
        idx = self._view()[0]
        found = [(n, m) for n, m in self._manifests() if m.adapters_only and m.base_source_sha256 == base_source_sha256]
        return sorted(found, key=lambda nm: (idx.get(nm[0], {}).get("installed", ""), nm[0]))

    def _check_base_installed(self, man: Manifest, target: str) -> None:
        base = man.base_source_sha256
        if self.models_for_base(base):
            return
        hint = man.model.get("base_name")
        first = (f"install the base model first (the bundle of '{hint}': edgemed install {hint}.edgemed, or edgemed pull), "
                 if hint else "install the base model's bundle first (edgemed install BASE.edgemed), ")
        raise StoreError(f"'{target}' carries adapters ({', '.join(a['name'] for a in man.adapters)}) for the base checkpoint "
                         f"{base}, and no installed model was converted from it, so they could not run here.",
                         first + f"then install this bundle again; `edgemed inspect BASE.edgemed` shows a bundle's source sha256 (it must be {base})")

    # -- queries ---------------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        check_name(name)
        d = self.models / name
        if not d.is_dir() and os.path.lexists(self.journal_path):
            self._view()  # a dead install may have left it aside: settle, then look again
            d = self._folder(name)
        if not d.is_dir():
            raise StoreError(f"No model named '{name}' is installed.", "run `edgemed list` to see installed models, or `edgemed install BUNDLE`")
        return d

    def _folder(self, name: str) -> Path:
        """Where a reader finds the files of ``name``: ``models/<name>``; or, while a dead install's journal cannot be
        settled (``_settle_dead``) and its swap stopped between its two renames (``swap_in`` without an exchange),
        the copy it set aside, when that holds the manifest the index records (settling puts it back)."""
        d = self.models / name
        if os.path.lexists(d) or not os.path.lexists(self.journal_path):
            return d
        try:
            j = read_journal(self.journal_path)
            rec = split_index(self._raw_index())[0].get(name)
        except (Damaged, StoreError):
            return d
        if j is None or j["op"] != "install" or j["name"] != name or rec is None:
            return d
        aside = self.tmp / j["aside"]
        return aside if is_model_copy(aside, rec["manifest_sha256"]) else d

    def record(self, name: str) -> dict | None:
        """The index record of an installed model as readers see it (None when it has none)."""
        return self._view()[0].get(name)

    def verify(self, name: str, *, full: bool = False, public_key=None) -> Verified:
        """Verify an installed model (``bundle.verify_dir`` against its index record, then the trust policy).

        The first read takes no lock. One that fails is read again holding the store lock shared (``reading``)
        before the failure is reported: an update, a ``pull --force`` or a rollback in another process may have
        swapped ``models/<name>`` in the middle of it (one version's manifest checked against the other's files);
        no swap can happen under the lock, so what fails then is what is on disk. Not locking the first read keeps a
        model started during an update from waiting for it (the writer holds the lock while it stages and hashes the
        whole new bundle: a minute for a large model on slow storage); a retry without the lock could meet a swap
        again (a rollback and back leaves the same record, so no change shows)."""
        try:
            return self._verify(name, full=full, public_key=public_key)
        except (IntegrityError, StoreError, OSError) as exc:
            log.debug("'%s' did not verify (%s); reading it again under the store lock", name, str(exc).splitlines()[0])
        with self.reading():
            return self._verify(name, full=full, public_key=public_key)

    def _verify(self, name: str, *, full: bool, public_key) -> Verified:
        d = self.model_dir(name)
        idx, bad = self._view()
        if name in bad:
            raise IntegrityError(f"The record of '{name}' in the store index {self.index_path} is damaged ({bad[name]}).",
                                 f"reinstall it: edgemed install BUNDLE --name {name} --force")
        rec = idx.get(name)
        if not rec:
            raise IntegrityError(f"'{name}' is in the store but not in its index ({self.index_path}).",
                                 f"reinstall it: edgemed install BUNDLE --name {name} --force")
        v = verify_dir(d, full=full, public_key=public_key, cache=self.cache, expect_manifest_sha256=rec["manifest_sha256"])
        # and what `run` checks besides: the signature is the one checked at install, and today's policy trusts it
        from edgemed.packaging import trust

        trust.check_installed(rec, v.signature, v.manifest, v.manifest_bytes)
        return v

    def list(self) -> list[dict]:
        """One row per installed model; a damaged one is a row with an ``error`` (list shows what it can).

        As ``verify``: a read that shows a row with an error, or a model whose manifest is not the one its record
        names, is read again under the shared store lock (a swap in another process may have come between reading
        the index and reading the manifests)."""
        rows, whole = self._rows()
        if whole:
            return rows
        with self.reading():
            return self._rows()[0]

    def _rows(self) -> tuple[list[dict], bool]:
        """(``list``'s rows, whether every row read whole: no error, each manifest the one its record names)."""
        whole = True
        try:
            idx, bad = self._view()
            unusable = None
        except StoreError as exc:  # the index as a whole is damaged: show the model folders, each saying so
            if not any(valid_name(d.name) for d in self._model_dirs()):
                raise
            idx, bad, unusable = {}, {}, exc
        rows = {}
        for name in idx:
            d = self._folder(name)
            try:
                man, data, sig = read_manifest(d)
            except Exception as exc:  # list shows damaged entries rather than failing
                rows[name] = {"name": name, "error": str(exc).splitlines()[0]}
                continue
            whole = whole and hashlib.sha256(data).hexdigest() == idx[name]["manifest_sha256"]
            m = man.model
            rows[name] = {"name": name, "kind": "adapters" if man.adapters_only else "model",
                          "adapters": [{"name": a["name"], "size_bytes": a["size"], "bundle": name} for a in man.adapters],
                          "base_source_sha256": man.base_source_sha256,
                          "arch": m.get("arch"), "quant": m.get("quant"), "params": m.get("params"),
                          "size_bytes": man.total_bytes, "signed_by": idx[name]["signed_by"], "has_signature": sig is not None,
                          "installed": idx[name]["installed"], "path": str(d / man.model_path),
                          "version": idx[name].get("version", _version(man)), "digest": "sha256:" + idx[name]["manifest_sha256"],
                          "origin": idx[name].get("origin") or idx[name]["source"],
                          "previous": _summary(idx[name].get("previous"))}
        bases: dict[str, list[str]] = {}
        for r in rows.values():
            if r.get("kind") == "model" and r["base_source_sha256"]:
                bases.setdefault(r["base_source_sha256"], []).append(r["name"])
        for r in sorted((r for r in rows.values() if r.get("kind") == "adapters"), key=lambda r: (r["installed"], r["name"])):
            r["for_models"] = bases.get(r["base_source_sha256"], [])  # empty: its base was removed; the adapters cannot run
            for model in r["for_models"]:
                rows[model]["adapters"] += [dict(a) for a in r["adapters"]]
        for r in rows.values():  # the one ``--adapter NAME`` picks (packaging.ref.adapters): the model's own, else the latest
            picked: dict[str, dict] = {}
            for a in r.get("adapters") or []:
                if a["name"] not in picked or picked[a["name"]]["bundle"] != r["name"]:
                    picked[a["name"]] = a
            for a in r.get("adapters") or []:
                a["picked"] = r.get("kind") == "adapters" or picked[a["name"]] is a
        for name, why in bad.items():
            shown = name if valid_name(name) else ascii(name)
            rows[shown] = {"name": shown, "error": f"its record in {self.index_path} is damaged ({why}); "
                                                    f"reinstall it: edgemed install BUNDLE --name NAME --force"}
        for d in self._model_dirs():
            if valid_name(d.name) and d.name not in rows:
                why = (f"{unusable.problem} Fix: {unusable.fix}" if unusable is not None
                       else f"it is not in the store index {self.index_path}; reinstall it: edgemed install BUNDLE --name {d.name} --force")
                rows[d.name] = {"name": d.name, "error": why}
        return [rows[n] for n in sorted(rows)], whole and not any("error" in r for r in rows.values())

    def _model_dirs(self) -> list[Path]:
        try:
            return [p for p in self.models.iterdir() if p.is_dir() and not p.is_symlink()]
        except OSError:
            return []

    def remove(self, name: str) -> int:
        """Remove a model; return the bytes freed (files no other model shares).

        It works on a full disk, where it is how an operator frees space: its journal is written before the model
        leaves ``models/`` and the index after its files are freed (``_settle``). Where even the journal (or that of
        an interrupted change, settled first) finds no room, the model's kept versions go first: the remove drops them
        in any case, and no journal guards them (they are no part of ``models/``); a kill then leaves the model
        installed, without its copy for rollback. A disk still too full is refused, naming it and the fix."""
        check_name(name)
        room = {"tried": False, "versions": 0, "bytes": 0}

        def make_room() -> bool:  # once: the model's kept versions, and the blobs only they held
            if room["tried"]:
                return False
            room.update(tried=True, versions=self._drop_versions(name, keep=None), bytes=self._collect_blobs())
            if room["versions"]:
                log.warning("the disk holding %s is full: the kept versions of '%s' were removed first, to make room "
                            "for its removal", self.root, name)
            return room["versions"] > 0 or room["bytes"] > 0

        with self._stop_told("was removed") as swap, self.locked(make_room=make_room), owned(self.tmp):
            if not (self.models / name).is_dir() and name not in self._raw_index():
                self.model_dir(name)  # raises: no such model
            trash = debris_path(self.tmp, f"rm-{name}")
            swap.update(name=name, removed=True)  # a stop once it is in the trash reports it (``_stop_told``)
            journal = json.dumps({"op": "remove", "name": name, "trash": trash.name}) + "\n"
            try:
                try:
                    self._write_room(self.journal_path, journal)
                except OSError as exc:
                    if not (_no_room(exc) and make_room()):
                        raise
                    self._write_room(self.journal_path, journal)  # with the room made
            except OSError as exc:
                if not _no_room(exc):
                    raise
                left = ("nothing was removed" if not room["versions"] else
                        f"'{name}' is still installed, and can no longer be rolled back: its kept versions were "
                        "dropped to make room, and that was not enough")
                raise self._full(exc, f"removing '{name}' writes its journal ({JOURNAL}) before the model leaves the "
                                      f"store, and there is no room for it; {left}",
                                 f"run `edgemed remove {name}` again") from exc
            try:  # from here on the journal decides: the model goes once it is in the trash
                if os.path.lexists(self.models / name):
                    step("store.remove-rename")
                    os.rename(self.models / name, trash)
            finally:
                try:
                    freed = self._settle() + room["bytes"]
                except OSError as exc:
                    if not _no_room(exc):
                        raise
                    raise self._full(exc, f"'{name}' was taken out of the store and its files no other model shares "
                                          f"were freed, but its record cannot be dropped from {self.index_path.name} "
                                          "until there is room (every command reads it as removed meanwhile)",
                                     "run `edgemed list` once: it finishes the removal") from exc
            freed += self._collect_garbage()
            swap["cleaned"] = True
            return freed

    def disk_usage(self) -> int:
        return sum(p.lstat().st_size for p in self.blobs.iterdir()) if self.blobs.is_dir() else 0


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samestat(os.lstat(a), os.lstat(b))
    except OSError:
        return False


def _fails(path: Path, entry: FileEntry) -> bool:
    """Whether the regular file ``path`` does not hold ``entry`` (its size, then every byte); anything else there (gone,
    a link, a folder) is not a file to mend."""
    try:
        st = path.lstat()
        return stat.S_ISREG(st.st_mode) and (st.st_size != entry.size or file_digest(path, None, full=True)[0] != entry.sha256)
    except OSError:
        return False


def _unused(folder: Path) -> Path:
    """A name in ``folder`` that nothing has: a bundle may hold any file name, ``X.link`` beside ``X`` included."""
    while True:
        path = folder / f".edgemed-link-{secrets.token_hex(8)}"
        if not os.path.lexists(path):
            return path
