"""File digests: hash-while-copy, and the verified cache (the fast path) over ``files.hashing.file_sha256``.

The fast path: after a file has been hashed in full, its digest is remembered
with the file's (device, inode, size, mtime_ns, ctime_ns). The next check
re-stats the file and reuses the digest only if all five are unchanged. Any
write through the file system changes mtime and ctime (ctime cannot be set back
from user space), a replace changes the inode, so a hit means "not written since
it was hashed". A file written in the same clock tick as its hash could slip
through, so entries younger than ``RACY_S`` seconds are never cached (git's
"racy clean" rule). What the fast path cannot see: raw writes to the block
device, or someone who can edit the cache file itself; ``--full`` re-hashes,
and what it finds is remembered, for every name of that file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import BinaryIO

from edgemed import env
from edgemed.files.atomic import write_text
from edgemed.files.hashing import BLOCK, file_sha256, stamp  # stamp: re-exported (its readers import it from here)
from edgemed.errors import EdgemedError, IntegrityError

log = logging.getLogger(__name__)

RACY_S = 2.0
CACHE_NAME = "verified-cache.json"
#: The cache's size bound: about 200 bytes an entry, so far more files than a device's store holds
MAX_CACHE_BYTES = 64 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


def copy_hashed(src: BinaryIO, dst: BinaryIO | None, size: int, name: str) -> str:
    """Copy exactly ``size`` bytes from ``src`` to ``dst`` (or nowhere), returning their sha256.

    Never reads past ``size``: a member that claims less than it holds cannot grow
    the output, and one that holds less than it claims is reported as truncated.
    """
    h = hashlib.sha256()
    left = size
    while left:
        block = src.read(min(BLOCK, left))
        if not block:
            raise IntegrityError(f"'{name}' is truncated: expected {size} bytes, got {size - left}.",
                                 "the copy is incomplete; copy the bundle again and verify")
        h.update(block)
        if dst is not None:
            dst.write(block)
        left -= len(block)
    return h.hexdigest()


def _stamp(st: os.stat_result) -> list[int]:
    return list(stamp(st))  # as the cache's JSON holds it


class VerifiedCache:
    """Digests of files hashed in full, keyed by absolute path and guarded by their stat stamp."""

    def __init__(self, path: Path | None = None):
        from edgemed.files.state import load

        self.path = path or env.home() / CACHE_NAME
        self._follows_home = path is None  # the default cache: it moves with `edgemed home --move`
        self.dirty = False
        # A missing, damaged or foreign cache counts as empty: everything is re-hashed, which is always safe. Read
        # as every state file is (a regular file, bounded, never blocking on a FIFO); a foreign object there is
        # never replaced.
        raw, self.writable = load(
            self.path, MAX_CACHE_BYTES, lambda d: isinstance(d, dict) and isinstance(d.get("entries"), dict),
            "verified digests",
            lambda why: log.warning("the verified cache '%s' %s; every file is hashed in full", self.path, why),
            lambda why: log.warning("the verified cache '%s' %s; it counts as empty and is rewritten", self.path, why))
        self.entries: dict[str, dict] = raw.get("entries", {}) if raw else {}

    def lookup(self, path: Path, st: os.stat_result) -> str | None:
        e = self.entries.get(str(path))  # an entry of another shape (the file was edited) is no hit
        if isinstance(e, dict) and e.get("stamp") == _stamp(st) and isinstance(e.get("sha256"), str) \
                and _SHA256.fullmatch(e["sha256"]):
            return e["sha256"]
        return None

    def record(self, path: Path, st: os.stat_result, digest: str) -> None:
        """Remember ``digest``, just hashed in full from ``path`` as it was at ``st``. An entry of any path with this
        stamp (the same inode: a hard link, as a store blob and its models' files are) that says another digest is
        dropped: it was recorded before a write the stamp did not show (a raw write to the disk), and a fast check of
        that other name would otherwise still answer with it."""
        held = _stamp(st)
        for key in [k for k, e in self.entries.items() if isinstance(e, dict) and e.get("stamp") == held
                    and e.get("sha256") != digest]:
            del self.entries[key]
            self.dirty = True
        newest = max(st.st_mtime_ns, st.st_ctime_ns) / 1e9
        if time.time() - newest < RACY_S:
            return  # too fresh to trust a stamp; hash again next time
        self.entries[str(path)] = {"stamp": _stamp(st), "sha256": digest}
        self.dirty = True

    def forget_under(self, root: Path) -> None:
        prefix = str(root) + os.sep
        for key in [k for k in self.entries if k.startswith(prefix)]:
            del self.entries[key]
            self.dirty = True

    def save(self) -> None:
        """Write the cache, if anything changed. A cache that cannot be written (a read-only store, a full disk)
        costs only speed, the next check re-hashes, so that is a warning, never a failed check."""
        if not self.dirty or not self.writable:
            return
        if self._follows_home and self.path.parent != env.home():  # the state moved while this command ran: not
            log.debug("the state folder moved; the verified cache is not saved")  # a state folder made again there
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text(self.path, json.dumps({"schema": "edgemed.verified-cache/1", "entries": self.entries}))
        except (OSError, EdgemedError) as exc:
            why = exc.problem if isinstance(exc, EdgemedError) else exc.strerror or str(exc)
            log.warning("could not save the verified cache '%s' (%s); the next check re-hashes", self.path, why)
            return
        self.dirty = False


def file_digest(path: Path, cache: VerifiedCache | None, full: bool) -> tuple[str, bool]:
    """(sha256, from_cache). With ``full`` or no cache, always hashes the bytes."""
    path = path.absolute()
    st = os.stat(path)
    if cache is not None and not full:
        hit = cache.lookup(path, st)
        if hit:
            return hit, True
    digest = file_sha256(path)
    if cache is not None and _stamp(os.stat(path)) == _stamp(st):  # unchanged while we hashed it
        cache.record(path, st, digest)
    return digest, False
