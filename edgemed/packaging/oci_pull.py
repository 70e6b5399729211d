"""``edgemed pull``: a ModelPack artifact from an OCI registry into the store, verified before it is visible.

Order of work (one pull at a time per machine: ``$EDGEMED_HOME/downloads/lock``):

1. The manifest, by tag or digest, bounded in size and checked as untrusted (``oci.read_image_manifest``);
   pulled by digest, its bytes must hash to that digest. Its digest pins the origin recorded in the store
   (``oci://HOST/REPO@sha256:...``), so a tag moved later does not change what was installed.
2. The ``manifest.json`` and signature layers first (small): every other layer must be one of the manifest's
   files with the same sha256 and size, and the trust policy (``trust.decide``) must accept the signature over
   the manifest, before any large blob is fetched.
3. Each layer: a blob the store already holds (``store/blobs/sha256/<hex>``) is linked, not downloaded.
   Otherwise it streams into ``downloads/<hex>.part``, hashed as it is written. An interrupted download
   resumes from the part's size with an HTTP ``Range`` request, after re-hashing the bytes already there.
   A digest or size mismatch is refused naming the layer's file path and both digests, and the bad part
   is deleted (a resumed one gets one fresh try from byte 0 first: its old bytes may be what was wrong).
   An answer that says the registry's blob is another size than the layer's (its Content-Length, the total of
   its Content-Range, a 416 naming the size) is refused before a byte of it is written, naming both sizes, and
   the part is deleted: a blob cut short in the registry (its disk filled during a push) is no interrupted
   download, and resuming it would fetch it whole again on every pull. A 416 that names no size, followed by a
   whole blob that ends short, is the same refusal.
   A name that holds this very bundle already (same manifest sha256) is left as it is (``already_installed``),
   ``--force`` or not, before the trust policy is applied (a certificate expired since the install is a warning:
   ``run`` judges the installed copy as of its install): a nightly ``edgemed pull ... --force`` on every device
   downloads nothing until the tag moves, then installs the new bundle. Unless its installed copy fails the store's
   verify (a damaged file, as ``run`` would find it): then it is installed again from the registry (``repaired``),
   the version kept for ``rollback`` still kept, since a device that only pulls has no other way to mend it.
   A name holding another bundle is refused without ``--force`` before
   anything large is fetched, and so is an older release than the one installed (``release_order``: the card's
   version, else the manifest's creation time) without ``allow_downgrade``: a tag moved back must not roll every
   device back without a word.
4. Each layer is hard-linked into a staging folder (owner-tagged debris in ``downloads/``) as soon as it is
   obtained, so a store blob it links cannot be collected while the rest downloads. The folder goes to
   ``Store.install`` with the origin; the store verifies every file again, checks the signature under the trust
   policy and swaps the model in atomically. Nothing is under ``models/`` before that.
5. At the end of every pull, installed or found installed, the downloads of every layer the store now holds are
   dropped, not only this pull's: a pull killed between the store's copy and the drop left a second copy of the
   model in ``downloads/`` that no later pull fetched, so none dropped it, and no space check counted it.

Why the GET is edgemed's own: oras's ``download_blob`` neither checks the digest nor resumes. The requests go
through oras's session (``Client.request``), so its credentials and token handling apply.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgemed import env
from edgemed.errors import (Done, EdgemedError, IntegrityError, OutputError, SignatureError, StoreError, done_before,
                             output_error, stopped_after)
from edgemed.files import flocks
from edgemed.files.debris import scratch_dir, step, sweep
from edgemed.files.hashing import BLOCK
from edgemed.packaging import oci, release_order
from edgemed.packaging.manifest import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    SIGNATURES,
    Manifest,
    check_name,
    max_signature_bytes,
)

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per read from the network (and per counted step in the crash tests)


@dataclass
class Pulled:
    name: str
    ref: str                 # as given
    origin: str              # oci://HOST/REPO@sha256:... (recorded in the store)
    files: int
    bytes_downloaded: int    # blob bytes received over the network by this pull
    bytes_resumed: int       # bytes an earlier, interrupted pull had already downloaded
    blobs_in_store: int      # layers the store already held (linked, not downloaded)
    signed_by: str | None
    downloaded: list[str] = field(default_factory=list)  # file paths of which this pull received bytes
    already_installed: bool = False  # the name holds this very bundle already (same manifest): nothing was changed
    repaired: str | None = None  # the name held this bundle, but its copy failed verify (why): installed again
    release: release_order.Order | None = None  # how the bundle ordered against the model it replaced (None: none)

    def to_dict(self) -> dict:
        return asdict(self)


def downloads_dir() -> Path:
    """Where pulls keep their resumable downloads (not the store's ``tmp/``, which every store operation sweeps)."""
    return env.home() / "downloads"


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "a") as fh:
        flocks.take(fh, fcntl.LOCK_EX, f"waiting for another pull in {root} to finish (one pull at a time)")
        try:
            sweep(root)  # the staging folders of pulls that were killed
            _age_out(root)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


#: A download no pull has touched for this long is dropped (a tag that moved on leaves its parts behind)
STALE_DOWNLOAD_S = 7 * 24 * 3600
_DOWNLOAD_NAME = re.compile(r"[0-9a-f]{64}(\.part)?")
SEEN = "seen.json"  # in downloads/: {name: [size, mtime_ns, when an age-out first saw it so]} (``_age_out``)
_MAX_SEEN_BYTES = 1 << 20


def _age_out(root: Path) -> None:
    """Under the downloads lock: drop the downloads (``<sha256>`` and ``<sha256>.part``, the names pulls give them)
    that no pull has written for ``STALE_DOWNLOAD_S``; any other name is left alone.

    A file's mtime is the clock of the pull that wrote it, and that clock can be wrong (a box with no real-time clock
    pulls at boot, before NTP sets it). So a download goes only when its mtime and the time an age-out first saw it
    as it is now (same size and mtime, recorded in ``SEEN``) are both that old: a part written with the clock days
    behind is new to the next age-out, which keeps it for the pull to resume, where its mtime alone would have it
    fetched again from byte 0. A mtime in the future (the clock was ahead) is set to now, so the part ages from today
    instead of staying until the real time reaches it. A pull resumes a part by appending to it: a part in use is
    a changed one, so fresh."""
    from edgemed.files.state import load, replace

    now = time.time()
    cutoff = now - STALE_DOWNLOAD_S
    seen, writable = load(root / SEEN, _MAX_SEEN_BYTES, lambda d: isinstance(d, dict), "download times",
                          lambda why: log.warning("%s %s; downloads age by their file times alone", root / SEEN, why),
                          lambda why: log.warning("%s %s; it is written again", root / SEEN, why))
    kept = {}
    with os.scandir(root) as entries:
        for entry in entries:
            try:
                if not (_DOWNLOAD_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)):
                    continue
                st = entry.stat(follow_symlinks=False)
                if st.st_mtime > now:
                    os.utime(entry.path, (now, now), follow_symlinks=False)
                    st = os.lstat(entry.path)
                was = seen.get(entry.name)
                unchanged = (isinstance(was, list) and was[:2] == [st.st_size, st.st_mtime_ns] and len(was) == 3
                             and isinstance(was[2], (int, float)) and was[2] <= now)
                first = was[2] if unchanged else now if writable else st.st_mtime
                if max(st.st_mtime, first) >= cutoff:
                    kept[entry.name] = [st.st_size, st.st_mtime_ns, first]
                    continue
                step("oci.age-out")
                os.unlink(entry.path)
                log.info("dropped the download %s, untouched for %d days", entry.name, STALE_DOWNLOAD_S // 86400)
            except OSError:
                continue
    if writable and kept != seen:
        try:
            if kept:
                replace(root / SEEN, json.dumps(kept))
            else:
                (root / SEEN).unlink(missing_ok=True)
        except OSError as exc:  # only the age-out's memory: every download stays, the next pull records them again
            log.warning("could not write %s (%s)", root / SEEN, exc.strerror or exc)


def pull(target: str, *, name: str | None = None, insecure: bool = False, public_key=None, force: bool = False,
         store=None, allow_signer_change: bool = False, allow_downgrade: bool = False) -> Pulled:
    """Pull ``target`` (``oci://HOST[:PORT]/REPO:TAG`` or ``...@sha256:DIGEST``) and install it as ``name``.
    ``allow_downgrade``: install it over a newer release of ``name`` (else refused before the weights download)."""
    from edgemed.packaging.store import Store

    ref = oci.parse_ref(target)
    store = store or Store()
    client = oci.Client(ref, insecure=insecure)
    body, digest = _fetch_manifest(client, ref)
    origin = ref.at(digest)
    layers = oci.read_image_manifest(body, origin)
    by_path = {x.path: x for x in layers}
    if MANIFEST not in by_path:
        raise IntegrityError(f"{origin} has no '{MANIFEST}' layer: it is not an edgemed bundle.",
                             "pull an artifact that `edgemed push` made")
    mlayer = by_path[MANIFEST]
    if mlayer.size > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"The '{MANIFEST}' layer of {origin} is {mlayer.size} bytes, more than the {MAX_MANIFEST_BYTES} a bundle manifest may hold.",
                             "pull an artifact that `edgemed push` made")
    for x in layers:  # the signatures are fetched with the manifest, before any trust: their bound comes first too
        if x.path in SIGNATURES and x.size > max_signature_bytes(x.path):
            raise IntegrityError(f"Layer '{x.path}' of {origin} is {x.size} bytes; a signature is at most "
                                 f"{max_signature_bytes(x.path)}.", "pull an artifact that `edgemed push` made")
    root = downloads_dir()
    stats = Pulled(name="", ref=target, origin=str(origin), files=len(layers), bytes_downloaded=0, bytes_resumed=0,
                   blobs_in_store=0, signed_by=None)
    with _stop_told(stats, root), _exclusive(root), scratch_dir(root, "pull") as stage:
        fetched: list[Path] = []

        def get(x: oci.Layer) -> None:
            """The layer into the staging folder: a link to the store's blob, or to a verified download."""
            if _in_store(store, x):
                src = store.blobs / x.sha256
                stats.blobs_in_store += 1
            else:
                before = stats.bytes_downloaded
                src = _fetch_blob(client, x, root, origin, stats)
                fetched.append(src)
                if stats.bytes_downloaded > before or x.size == 0:
                    stats.downloaded.append(x.path)
            dest = stage / x.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            step("oci.stage-link")
            _link_or_copy(src, dest)  # linked now: a store blob cannot be collected while the rest downloads

        meta = [mlayer] + [x for x in layers if x.path in SIGNATURES]
        try:
            for x in meta:  # small: manifest.json and the signature
                get(x)
            data = (stage / MANIFEST).read_bytes()
            man = Manifest.from_bytes(data, f"{origin} {MANIFEST}")
            oci.check_against_bundle(layers, man, origin)  # the rest must be its files, digests and sizes
            target_name = check_name(name or man.name)
            if _installed(store, target_name, data, force):  # judged when installed; run judges it as of then
                stats.repaired = _damage(store, target_name, lambda: _judge(stage, man, data, origin, public_key))
                if stats.repaired is None:
                    _warn_if_refused_now(stage, man, data, origin, public_key, target_name)
                    stats.name, stats.already_installed = target_name, True
                    _drop_downloads(root, store, layers, fetched)
                    return stats
                log.warning("%s holds this bundle, but its installed copy does not verify (%s); installing it again "
                            "from %s", target_name, stats.repaired, origin)
            sig, key = _judge(stage, man, data, origin, public_key)  # the trust policy, before anything large is fetched
            if (store.models / target_name).exists():  # an update: from the installed model's signer
                from edgemed.packaging import trust

                trust.check_update(target_name, store.record(target_name), str(origin), sig, man, data, key,
                                   policy=trust.load(), allow_signer_change=allow_signer_change)
                release_order.check(store, target_name, man, data, str(origin), allow_downgrade=allow_downgrade)
        except EdgemedError:  # refused: what it downloaded is not kept for a later pull to resume
            _forget(fetched)
            raise
        rest = [x for x in layers if x not in meta]
        held = [x for x in rest if _in_store(store, x)]
        _check_space(root, store.root, [x for x in rest if x not in held], held)
        for x in rest:
            get(x)
        repair = stats.repaired is not None  # the same bundle over its damaged copy: nothing else is replaced
        stats.name, _, stats.signed_by = store.install(stage, name=name, public_key=public_key, force=force or repair,
                                                       origin=str(origin), allow_signer_change=allow_signer_change,
                                                       allow_downgrade=allow_downgrade,
                                                       on_order=lambda order: setattr(stats, "release", order))
        _drop_downloads(root, store, layers, fetched)  # the store holds its own copy now
        return stats


@contextlib.contextmanager
def _stop_told(stats: Pulled, root: Path) -> Iterator[None]:
    """A stop (Ctrl-C, SIGTERM) once the store has the bundle (``Store.install`` marks a stop after its swap so;
    ``stats.name`` is set once it returned, or found the bundle installed) goes on marked with the pull's result, so
    the command reports the model installed and the clean-up it cut short, never a failed pull."""
    try:
        yield
    except KeyboardInterrupt as stop:
        installed = done_before(stop)
        if installed is None and not stats.name:
            raise
        left = f"the clean-up of the pull's downloads in {root} (the next pull does it)"
        if installed is not None:  # stopped in the store, past its swap
            stats.name, stats.signed_by = installed.result["name"], installed.result["signed_by"]
            stopped_after(stop, Done(f"{installed.what} from {stats.origin}", f"{installed.left}; {left}", stats.to_dict()))
        else:
            stopped_after(stop, done(stats, left))
        raise


def done(stats: Pulled, left: str) -> Done:
    """A pull that installed its bundle, or found it installed (``stats``), as a stop after that reports it; ``left``:
    what the stop cut short."""
    what = (f"'{stats.name}' was found holding {stats.origin} already (nothing was changed)" if stats.already_installed
            else f"'{stats.name}' was installed from {stats.origin}")
    return Done(what, left, stats.to_dict())


def _forget(fetched: list[Path]) -> None:
    for p in fetched:
        step("oci.forget-download")
        p.unlink(missing_ok=True)


def _drop_downloads(root: Path, store, layers: list[oci.Layer], fetched: list[Path]) -> None:
    """After a pull that succeeded: drop what it fetched, and the download (whole or part) of every layer whose blob
    the store holds, of its size: an earlier pull killed after the store's copy was made left it, and this pull,
    finding the layer in the store, never fetched it again."""
    _forget(fetched)
    for x in layers:
        try:
            st = (store.blobs / x.sha256).lstat()
        except OSError:
            continue  # not in the store (a file system without hard links keeps the installed copy unshared)
        if stat.S_ISREG(st.st_mode) and st.st_size == x.size:
            _forget([p for p in (root / x.sha256, root / f"{x.sha256}.part") if _is_file(p)])


def _is_file(p: Path) -> bool:
    try:
        return stat.S_ISREG(p.lstat().st_mode)
    except OSError:
        return False


def _damage(store, name: str, judge) -> str | None:
    """Why the installed copy of ``name`` fails the store's verify (fast path: the verified cache answers for the
    files unchanged since their last hash), or None when it passes. A signature refusal where today's trust policy
    (``judge``: the pulled bundle judged now) refuses the bundle itself is no damage: installing it again would not
    mend it (the caller warns). Any other failure is what ``run`` would refuse."""
    try:
        store.verify(name)
    except SignatureError as exc:
        try:
            judge()
        except SignatureError:
            return None
        return exc.problem
    except IntegrityError as exc:
        return exc.problem
    return None


def _judge(stage: Path, man: Manifest, data: bytes, origin: oci.Ref, public_key):
    """Apply the trust policy (``trust.decide``) to the manifest and signature alone: an untrusted or unsigned
    bundle is refused before its weights are downloaded. ``Store.install`` decides again on the staged copy.
    Returns (the signature, the key that verified it or None)."""
    from edgemed.packaging import signing, trust

    sig = signing.well_formed(next((signing.Signature(n, (stage / n).read_bytes()) for n in SIGNATURES
                                    if (stage / n).is_file()), None))
    return sig, trust.decide(str(origin), sig, man, data, key=public_key)


def _warn_if_refused_now(stage: Path, man: Manifest, data: bytes, origin: oci.Ref, public_key, name: str) -> None:
    """``name`` holds this very bundle: nothing changes, whatever the trust policy says of it now. Where it would
    refuse it now (its signing certificate expired since the install), say so: the nightly pull of an unchanged tag
    succeeds, and the operator learns the maker must re-sign before the next release can be installed."""
    try:
        _judge(stage, man, data, origin, public_key)
    except SignatureError as exc:
        log.warning("%s holds this bundle already and was left as it is (edgemed run checks it as of its install); "
                    "pulled now, it would be refused: %s", name, exc)


def _installed(store, name: str, data: bytes, force: bool) -> bool:
    """True when ``name`` holds this bundle already (with or without ``force``: there is nothing to replace); when
    it holds another one, False with ``force``, else a StoreError in the store's own words."""
    if not (store.models / name).exists():
        return False
    rec = store.record(name)
    if rec is not None and rec.get("manifest_sha256") == hashlib.sha256(data).hexdigest():
        return True
    if force:
        return False
    raise StoreError(f"A model named '{name}' is already installed.",
                     f"pass --force to replace it (the store keeps the replaced version for `edgemed rollback {name}`), "
                     f"or pull it under another name with --name")


def _in_store(store, x: oci.Layer) -> bool:
    """Whether the store's blob of ``x`` can stand for its download (``Store.blob``). A damaged one is downloaded
    again, rather than linked into every pull that shares it and refused there each time."""
    from edgemed.packaging.store import BLOB_DAMAGED, BLOB_HELD

    found = store.blob(x.sha256, x.size)
    if found == BLOB_DAMAGED:
        log.warning("the store's blob %s does not hold what its name says: the layer '%s' is downloaded instead",
                    store.blobs / x.sha256, x.path)
    return found == BLOB_HELD


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:  # a store on another file system than $EDGEMED_HOME/downloads
        shutil.copyfile(src, dest)


def _check_space(root: Path, store_root: Path, todo: list[oci.Layer], kept: list[oci.Layer] = ()) -> None:
    """Room for what is left to download into ``root`` (``todo``), and for the store's own copy of each new file:
    the install copies each staged file it does not hold, so until the downloads are dropped that file is on disk
    twice; the ones it holds already (``kept``) it links (``Store.install``), which takes no room. Where the store is
    on another file system, the files it holds are copied into the staging folder under ``root`` (a link cannot
    cross)."""
    download = sum(x.size for x in todo) - sum(_part_size(root, x) for x in todo)
    copy = sum(x.size for x in todo)
    store_at = next(p for p in (store_root, *store_root.parents) if p.exists())
    if os.stat(root).st_dev == os.stat(store_at).st_dev:
        needs = [(root, download + copy, "to download and install")]
    else:
        needs = [(root, download + sum(x.size for x in kept), "to download"), (store_at, copy, "to install")]
    for where, need, what in needs:
        free = shutil.disk_usage(where).free
        if need > free:
            raise StoreError(f"The pull needs {need / 1e6:,.1f} MB {what} in {where}; {free / 1e6:,.1f} MB are free.",
                             "free some space (edgemed remove NAME drops models), then pull again: it resumes")


def _part_size(root: Path, x: oci.Layer) -> int:
    for p in (root / x.sha256, root / f"{x.sha256}.part"):
        with contextlib.suppress(OSError):
            return min(p.stat().st_size, x.size)
    return 0


def _fetch_manifest(client: oci.Client, ref: oci.Ref) -> tuple[bytes, str]:
    """The manifest's bytes (at most MAX_OCI_MANIFEST_BYTES) and their digest; by digest, they must match it."""
    import http.client

    import urllib3

    r = client.request("GET", client.url("manifests", ref.reference), headers={"Accept": oci.OCI_MANIFEST}, stream=True)
    with r:
        if r.status_code != 200:
            raise client.fail(r, f"manifest {ref}")
        try:  # read from the socket here, past requests: its errors are urllib3's (a cut answer, a stall)
            body = r.raw.read(oci.MAX_OCI_MANIFEST_BYTES + 1, decode_content=True)
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
            raise oci.RegistryError(f"The manifest of {ref} could not be read from {ref.registry} ({oci._short(exc)}).",
                                    "check the network and run the pull again") from None
    if len(body) > oci.MAX_OCI_MANIFEST_BYTES:
        raise IntegrityError(f"The manifest of {ref} is larger than {oci.MAX_OCI_MANIFEST_BYTES} bytes.",
                             "pull an artifact that `edgemed push` made")
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if ref.digest is not None and digest != ref.digest:
        raise IntegrityError(f"The registry answered {ref} with a manifest whose digest is {digest}, not {ref.digest}.",
                             "the registry (or something between) altered it; do not use this registry until that is explained")
    return body, digest


def _fetch_blob(client: oci.Client, x: oci.Layer, root: Path, origin: oci.Ref, stats: Pulled) -> Path:
    """A verified local copy of one layer (``downloads/<hex>``), resuming a part an earlier pull left."""
    final, part = root / x.sha256, root / f"{x.sha256}.part"
    if final.exists():  # verified by an earlier pull that stopped before its install; checked again below
        os.replace(final, part)
    refused_range = False  # a 416: the registry holds no byte at the part's end, so the layer may be short there
    for attempt in (0, 1):
        if x.size == 0:  # an empty file: nothing to request, its digest is still checked
            part.touch()
        h, start = _rehash(part, x)
        resumed_from = start
        try:
            got = _download(client, x, part, h, start, stats, whole_or_short=refused_range)
        except _Restart as exc:
            part.unlink(missing_ok=True)
            refused_range = refused_range or exc.refused_range
            continue
        except _Held as exc:  # the registry's blob is not the layer's size: no retry, no resume can mend that
            part.unlink(missing_ok=True)
            raise IntegrityError(f"The registry holds {exc.held} bytes for layer '{x.path}' (sha256:{x.sha256}) of {origin}; "
                                 f"its descriptor says {x.size}.",
                                 "the registry's copy is cut short or was altered (a registry whose disk filled keeps a "
                                 "short blob); push the bundle again from a verified copy (nothing was installed)") from None
        if got == x.sha256:
            stats.bytes_resumed += resumed_from
            step("oci.download-done")
            os.replace(part, final)
            return final
        part.unlink(missing_ok=True)
        if resumed_from and attempt == 0:
            log.warning("'%s': a resumed download did not match its digest; downloading it again from the start", x.path)
            continue
        raise IntegrityError(f"Layer '{x.path}' of {origin} does not match its digest: expected sha256:{x.sha256}, "
                             f"got sha256:{got}.",
                             "the registry's copy is damaged or was altered; push the bundle again from a verified copy "
                             "(nothing was installed)")
    raise IntegrityError(f"Layer '{x.path}' of {origin} could not be downloaded whole.", "run the pull again")


def _write_all(fd: int, chunk: bytes, part: Path) -> None:
    """Write the whole ``chunk`` (a write may take only part of it: a disk or quota about to fill). A disk that
    takes nothing more stops the pull with its error naming the download; the bytes it took stay, to resume from."""
    view = memoryview(chunk)
    while view:
        try:
            n = os.write(fd, view)
        except OSError as exc:
            _disk_refused(exc.errno, part)
            raise
        if n == 0:  # a regular file takes at least a byte, or says why not: taken as a full disk
            _disk_refused(errno.ENOSPC, part)
        view = view[n:]


def _disk_refused(code: int | None, part: Path) -> None:
    """Raise the disk's own error (``errors.output_error``) for a download that cannot be written, with how to go on;
    return for an error that is not the disk's."""
    refused = output_error(OSError(code, os.strerror(code) if code else "", str(part)))
    if refused is not None:
        raise OutputError(refused.problem, f"{refused.fix}; then run the same pull again: it resumes where it stopped") from None


class _Restart(Exception):
    """The registry ignored the Range request, or refused it (416, ``refused_range``): the part is dropped and the
    download starts over."""

    def __init__(self, refused_range: bool = False):
        super().__init__()
        self.refused_range = refused_range


class _Held(Exception):
    """The registry's answer says its blob holds ``held`` bytes, not the layer's size."""

    def __init__(self, held: int):
        super().__init__(held)
        self.held = held


_CONTENT_RANGE = re.compile(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)")


def _held(r, start: int, x: oci.Layer) -> int | None:
    """What the answer ``r`` to a GET from byte ``start`` says the registry's blob holds, in bytes, where that is not
    the layer's size (None: as the descriptor says, or unstated). The total of a Content-Range (``bytes S-E/T``,
    ``bytes */T``) first; else ``start`` plus the Content-Length, unless the body is encoded (its length is then the
    encoding's)."""
    m = _CONTENT_RANGE.fullmatch(r.headers.get("Content-Range", "").strip())
    if m is not None and m[3] != "*":
        held = int(m[3])
    elif r.status_code == 416:
        return None
    elif m is not None and m[2] is not None:  # a range with no total: the registry holds at least its end
        held = int(m[2]) + 1
        return held if held > x.size else None
    elif r.headers.get("Content-Encoding", "identity").strip().lower() in ("", "identity") and \
            (length := r.headers.get("Content-Length", "").strip()).isdigit():
        held = start + int(length)
    else:
        return None
    return held if held != x.size else None


def _rehash(part: Path, x: oci.Layer) -> tuple[hashlib._Hash, int]:
    """A hash of the part's bytes so far and their count (a part longer than the layer is dropped)."""
    h = hashlib.sha256()
    try:
        size = part.stat().st_size
    except FileNotFoundError:
        return h, 0
    if size > x.size:
        part.unlink()
        return h, 0
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    with open(part, "rb", buffering=0) as fh:
        left = size
        while left and (n := fh.readinto(view[:min(BLOCK, left)])):
            h.update(view[:n])
            left -= n
    return h, size - left


def _download(client: oci.Client, x: oci.Layer, part: Path, h, start: int, stats: Pulled, *,
              whole_or_short: bool = False) -> str:
    """Append the layer's bytes from ``start`` to ``part``, hashing them; return the hex digest of the whole.

    An answer that says the registry's blob is not the layer's size (``_held``) is refused before a byte is written
    (``_Held``), and so is a 416 whose Content-Range names the blob's size. ``whole_or_short``: the registry refused
    a Range inside the layer (416) before, so this whole download ending short is the registry's size, not a cut
    connection, and is refused as such rather than left to resume."""
    from edgemed.errors import EdgemedError

    if start < x.size:
        headers = {"Range": f"bytes={start}-"} if start else {}
        r = client.request("GET", client.url("blobs", f"sha256:{x.sha256}"), headers=headers, stream=True)
        with r:
            if start and r.status_code == 200:  # the registry sends the whole blob: start over
                raise _Restart()
            if r.status_code in (200, 206, 416) and (held := _held(r, start, x)) is not None:
                raise _Held(held)
            if r.status_code == 416:  # a Range inside the layer refused: unless the answer gave the blob's size (the
                # layer's), the registry's blob may end before the part does
                raise _Restart(refused_range=not _CONTENT_RANGE.fullmatch(r.headers.get("Content-Range", "").strip()))
            if r.status_code not in (200, 206):
                raise client.fail(r, f"layer '{x.path}' (sha256:{x.sha256})")
            if start and not r.headers.get("Content-Range", "").startswith(f"bytes {start}-"):
                raise _Restart()
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o600)
            written = start
            try:
                import requests

                try:
                    for chunk in r.iter_content(CHUNK):
                        if written + len(chunk) > x.size:
                            raise IntegrityError(f"Layer '{x.path}' is longer than the {x.size} bytes its descriptor states "
                                                 f"(expected sha256:{x.sha256}).",
                                                 "the registry's copy is damaged or was altered; push the bundle again")
                        _write_all(fd, chunk, part)
                        h.update(chunk)
                        written += len(chunk)
                        stats.bytes_downloaded += len(chunk)
                        step("oci.pull-chunk")
                except requests.exceptions.RequestException as exc:
                    raise EdgemedError(f"The download of '{x.path}' stopped at {written} of {x.size} bytes ({oci._short(exc)}).",
                                       "run the same pull again: it resumes where it stopped") from None
                os.fsync(fd)
            finally:
                os.close(fd)
        if written < x.size and whole_or_short:
            raise _Held(written)
        if written < x.size:
            raise EdgemedError(f"The download of '{x.path}' stopped at {written} of {x.size} bytes (the registry closed the connection).",
                               "run the same pull again: it resumes where it stopped")
    return h.hexdigest()
