"""The single-file transport form: a plain (uncompressed) tar of the bundle directory.

Writing: ``manifest.json`` first, the signature (``model.sig``) second, then the listed files
in manifest order, with normalised owners, modes and times (same inputs, same
bytes). GGUF weights do not compress, so neither do we; and an uncompressed tar
cannot be a decompression bomb.

Reading an untrusted tar, streaming, one member at a time: the manifest must come
first and is checked before anything is written; then every member must be a
regular file the manifest lists, with the size it lists, a safe relative name,
seen once. Symlinks, hard links, devices, FIFOs, sparse members, compressed
input, absolute or ``..`` names and sizes beyond the manifest (or beyond
``EDGEMED_MAX_BUNDLE_BYTES``, or the free disk) are refused. Nothing is ever
extracted by ``tarfile`` itself: each member's bytes go to a caller's sink that
hashes while it copies, so nothing lands outside the caller's directory.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path
from typing import BinaryIO, Callable

from edgemed import env
from edgemed.errors import IntegrityError, UnsafeArchive
from edgemed.packaging import signing
from edgemed.packaging.digest import copy_hashed
from edgemed.packaging.manifest import MANIFEST, MAX_FILES, MAX_MANIFEST_BYTES, SIGNATURES, FileEntry, Manifest, check_relpath, max_signature_bytes
from edgemed.packaging.signing import Signature

_FIX = "do not install this file; ask the sender for a bundle made by `edgemed pack`"


def _info(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, mtime, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def write_tar(dest: Path, manifest_bytes: bytes, sig: Signature | None, sources: list[tuple[Path, FileEntry]], mtime: int) -> None:
    """Write the tar form to ``dest`` (a temporary path the caller renames), re-hashing as it copies."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT, copybufsize=1 << 20) as tf:
        tf.addfile(_info(MANIFEST, len(manifest_bytes), mtime), io.BytesIO(manifest_bytes))
        if sig is not None:
            tf.addfile(_info(sig.file, len(sig.data), mtime), io.BytesIO(sig.data))
        for src, entry in sources:
            with open(src, "rb") as fh:
                reader = _HashingReader(fh, src, entry.size)
                tf.addfile(_info(entry.path, entry.size, mtime), reader)  # tarfile copies exactly entry.size bytes
                if fh.read(1):
                    raise IntegrityError(f"'{src}' grew while it was being packed.", "pack again once nothing writes to the file")
            if reader.hexdigest() != entry.sha256:
                raise IntegrityError(f"'{src}' changed while it was being packed (expected sha256 {entry.sha256}, "
                                     f"copied {reader.hexdigest()}).", "pack again once nothing writes to the file")


class _HashingReader:
    """A read-only file object that hashes what passes through it, and says so when its file ends before ``size``
    (tarfile would raise a bare ``OSError('unexpected end of data')``)."""

    def __init__(self, fh: BinaryIO, src: Path, size: int):
        import hashlib

        self.fh, self.h, self.src, self.left = fh, hashlib.sha256(), src, size

    def read(self, n: int = -1) -> bytes:
        block = self.fh.read(n)
        self.h.update(block)
        self.left -= len(block)
        if self.left > 0 and (n < 0 or len(block) < n):  # a regular file reads short only at its end
            raise IntegrityError(f"'{self.src}' shrank while it was being packed ({self.left} bytes fewer than when "
                                 "it was hashed).", "pack again once nothing writes to the file")
        return block

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def is_tar(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        head = fh.read(512)
    return len(head) == 512 and head[257:262] == b"ustar"


def _refuse_type(m: tarfile.TarInfo, where: Path) -> None:
    kinds = [(m.issym(), f"a symbolic link '{m.name}' -> '{m.linkname}'"), (m.islnk(), f"a hard link '{m.name}' -> '{m.linkname}'"),
             (m.ischr() or m.isblk(), f"a device file '{m.name}'"), (m.isfifo(), f"a FIFO '{m.name}'"),
             (m.issparse(), f"a sparse file '{m.name}'")]
    for hit, what in kinds:
        if hit:
            raise UnsafeArchive(f"{where} holds {what}; bundles hold only regular files.", _FIX)
    if not m.isreg():
        raise UnsafeArchive(f"{where} holds '{m.name}' of unsupported type {m.type!r}.", _FIX)
    if m.size < 0:
        raise UnsafeArchive(f"{where}: '{m.name}' declares a negative size ({m.size}).", _FIX)


Sink = Callable[[FileEntry, BinaryIO], str]


#: The largest extended header (PAX or GNU long name) a bundle may hold: edgemed writes a few hundred bytes.
MAX_EXTENDED_HEADER = 64 << 10
#: Extended headers one member may have in a row (tar writers put at most a PAX header and GNU long names)
MAX_EXTENDED_CHAIN = 8
#: Keys one member's PAX header may hold (edgemed writes path and size; other writers add times, owners, xattrs)
MAX_PAX_KEYS = 64
_EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


class _SparseMember(Exception):
    """Raised inside tarfile's header parsing where a sparse map would be read; ``_BoundedInfo._proc_member`` names
    the archive."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _refuse_sparse_map(header: tarfile.TarInfo, member: tarfile.TarInfo, pax_headers: dict, *_) -> None:
    """Stands in for tarfile's readers of a GNU sparse map (PAX formats 0.0, 0.1 and 1.0), which it calls on the PAX
    header with the member that header describes."""
    raise _SparseMember(pax_headers.get("GNU.sparse.name") or pax_headers.get("path") or member.name)


class _BoundedInfo(tarfile.TarInfo):
    """A member header whose extended header is refused above ``MAX_EXTENDED_HEADER`` before tarfile reads it: it
    reads such a header whole into memory, so a sparse file declaring gigabytes there cost that much RAM before
    any check of ours ran.

    Sparse members are refused before their map is read: for an old GNU sparse header (type 'S') tarfile reads
    every extension block that follows and keeps each entry, and for GNU sparse 1.0 (declared in a PAX header) it
    reads the map from the member's data, as long as the map says (80,000 blocks cost 144 MB and 6.6 s before the
    type check; a truncated or lying map was an IndexError or ValueError traceback). Any ``GNU.sparse.*`` PAX key
    is refused with them: tarfile applies ``GNU.sparse.size`` and ``realsize`` as the member's size."""

    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse_map

    def _apply_pax_info(self, pax_headers, encoding, errors):
        if any(key.startswith("GNU.sparse.") for key in pax_headers):
            raise _SparseMember(pax_headers.get("GNU.sparse.name") or pax_headers.get("path") or self.name)
        super()._apply_pax_info(pax_headers, encoding, errors)

    def _proc_member(self, tf):
        try:
            return self._bounded_member(tf)
        except _SparseMember as exc:
            raise UnsafeArchive(f"'{tf.name}' holds a sparse file '{exc.name[:200]}'; bundles hold only regular files.", _FIX) from None

    def _bounded_member(self, tf):
        if self.type == tarfile.GNUTYPE_SPARSE:  # before ``_proc_sparse`` reads its extension blocks
            raise _SparseMember(self.name)
        if self.type not in _EXTENDED:
            return super()._proc_member(tf)
        if self.type == tarfile.XGLTYPE:  # tarfile copies its keys into every later member: a few KB times each entry
            raise UnsafeArchive(f"'{tf.name}' holds a global PAX header ({self.size:,} bytes); `edgemed pack` writes none.", _FIX)
        if self.size > MAX_EXTENDED_HEADER:
            raise UnsafeArchive(f"'{tf.name}' declares an extended tar header of {self.size:,} bytes (at most "
                                f"{MAX_EXTENDED_HEADER:,}).", _FIX)
        # tarfile reads the member an extended header describes by calling itself: thousands of them in a row were
        # a RecursionError traceback. A member has at most a few (a PAX header, a long name, a long link name).
        depth = getattr(tf, "_edgemed_extended", 0)
        if depth >= MAX_EXTENDED_CHAIN:
            raise UnsafeArchive(f"'{tf.name}' has more than {MAX_EXTENDED_CHAIN} extended tar headers in a row.", _FIX)
        tf._edgemed_extended = depth + 1
        try:
            member = super()._proc_member(tf)
        finally:
            tf._edgemed_extended = depth
        if len(member.pax_headers) > MAX_PAX_KEYS:
            raise UnsafeArchive(f"'{tf.name}': the PAX header of '{member.name[:200]}' holds {len(member.pax_headers):,} keys "
                                f"(at most {MAX_PAX_KEYS}).", _FIX)
        return member


def _open(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r|", tarinfo=_BoundedInfo)  # stream mode, uncompressed only
    except tarfile.ReadError:
        raise UnsafeArchive(f"'{path}' is not an uncompressed tar bundle.", "pass a .edgemed file made by `edgemed pack` (not gzip'd)") from None
    except OSError as exc:
        raise IntegrityError(f"Cannot read '{path}': {exc.strerror or exc}.", "check the path and its permissions") from None


def _files(tf: tarfile.TarFile, path: Path):
    """(name, member) for each file entry, after the checks every entry gets: a safe name, a regular file.

    Directory entries are skipped (a directory cannot hold data; names are checked all the same), at most
    ``MAX_FILES`` of them. tarfile keeps every header it reads in ``tf.members``, in stream mode too: they are
    dropped as they are read, so a tar of millions of small headers costs no more memory than one.
    """
    dirs = 0
    while (m := tf.next()) is not None:
        tf.members.clear()
        name = check_relpath(m.name.rstrip("/") if m.isdir() else m.name, f"archive {path.name}")
        if m.isdir():
            dirs += 1
            if dirs > MAX_FILES:
                raise UnsafeArchive(f"{path} holds more than {MAX_FILES:,} directory entries; a bundle lists at most "
                                    f"{MAX_FILES:,} files.", _FIX)
        else:
            _refuse_type(m, path)
            yield name, m


def _read_small(tf: tarfile.TarFile, m: tarfile.TarInfo, path: Path) -> bytes:
    data = tf.extractfile(m).read(m.size)
    if len(data) != m.size:
        raise IntegrityError(f"{path} is truncated inside '{m.name}' ({len(data)} of {m.size} bytes).", "copy the bundle again and verify")
    return data


def _read_head(tf: tarfile.TarFile, files, path: Path) -> tuple[Manifest, bytes, Signature | None, tuple | None]:
    """The one rule for a bundle's head, used by ``read_tar`` and ``peek_tar`` alike.

    The first file entry is ``manifest.json`` (at most ``MAX_MANIFEST_BYTES``), checked before
    anything else is read; the second may be the signature, ``model.sig`` (or an older edgemed's
    ``manifest.sig``), bounded (``max_signature_bytes``) and well formed (``signing.well_formed``).
    Returns (manifest, its bytes, the signature or None, the next (name, member) or None).
    """
    first = next(files, None)
    if first is None:
        raise IntegrityError(f"{path} holds no manifest.json.", _FIX)
    name, m = first
    if name != MANIFEST or m.size > MAX_MANIFEST_BYTES:
        raise UnsafeArchive(f"{path}: the first entry is '{name}' ({m.size} bytes), not manifest.json "
                            f"(of at most {MAX_MANIFEST_BYTES} bytes).", _FIX)
    data = _read_small(tf, m, path)
    manifest = Manifest.from_bytes(data, str(path))
    sig, after = None, next(files, None)
    if after is not None and after[0] in SIGNATURES:
        limit = max_signature_bytes(after[0])
        if after[1].size > limit:
            raise UnsafeArchive(f"{path}: {after[0]} declares {after[1].size} bytes (at most {limit}).", _FIX)
        sig, after = signing.well_formed(Signature(after[0], _read_small(tf, after[1], path))), next(files, None)
    return manifest, data, sig, after


def _damaged(path: Path, exc: Exception) -> IntegrityError:
    return IntegrityError(f"{path} is damaged or truncated ({exc}).", "copy the bundle again and verify")


def check_room(manifest: Manifest, path: Path, space: Path | None = None, held: int = 0) -> None:
    """Refuse a bundle (tar or folder) whose manifest declares more bytes than ``EDGEMED_MAX_BUNDLE_BYTES`` or, with
    ``space``, than the file system holding that directory has free: before any of its bytes is hashed or copied.
    ``held``: the bytes of its files that the store there holds already (linked, not copied), not counted as needed."""
    check_bytes(manifest.total_bytes, str(path), space, held)


def check_bytes(total: int, what: str, space: Path | None = None, held: int = 0) -> None:
    """``check_room`` for ``total`` bytes that ``what`` declares (a bundle, or a pulled artifact's layers)."""
    cap = env.max_bundle_bytes()
    if total > cap:
        raise UnsafeArchive(f"{what} declares {total} bytes, more than the {cap} allowed (${env.MAX_BUNDLE_VAR}).",
                            f"raise ${env.MAX_BUNDLE_VAR} if this bundle is expected to be that large")
    if space is not None and total - held > (free := shutil.disk_usage(space).free):
        new = f" ({total - held} of them new to the store)" if held else ""
        raise UnsafeArchive(f"{what} declares {total} bytes{new}; only {free} are free at {space}.",
                            "free disk space, or install somewhere larger (EDGEMED_HOME)")


def read_tar(path: Path, sink: Sink, check_space: Path | None = None,
             on_manifest: Callable[[Manifest, bytes, Signature | None], None] | None = None) -> tuple[Manifest, bytes, Signature | None]:
    """Stream ``path``: check the manifest, hand each listed file to ``sink`` (which returns its sha256).

    ``on_manifest(manifest, manifest_bytes, signature)`` runs once the manifest (and
    signature, if any) have been read, before any file data: signature checks go there.
    ``check_space``: a directory whose file system must hold the declared bytes.
    """
    seen: set[str] = set()
    with _open(path) as tf:
        try:
            files = _files(tf, path)
            manifest, manifest_bytes, sig_bytes, member = _read_head(tf, files, path)
            check_room(manifest, path, check_space)
            if on_manifest is not None:
                on_manifest(manifest, manifest_bytes, sig_bytes)
            while member is not None:
                name, m = member
                entry = manifest.entry(name)
                if entry is None:
                    raise IntegrityError(f"{path}: extra file '{name}' is not listed in the manifest.", _FIX)
                if name in seen:
                    raise UnsafeArchive(f"{path}: '{name}' appears twice.", _FIX)
                if m.size != entry.size:
                    raise IntegrityError(f"{path}: '{name}' declares {m.size} bytes, the manifest lists {entry.size}.", _FIX)
                seen.add(name)
                digest = sink(entry, tf.extractfile(m))
                if digest != entry.sha256:
                    raise IntegrityError(f"'{name}' does not match the manifest: expected sha256 {entry.sha256}, actual {digest}.",
                                         "the bundle is damaged or was altered; get a fresh copy and verify again")
                member = next(files, None)
        except tarfile.TarError as exc:
            raise _damaged(path, exc) from None
    missing = [f.path for f in manifest.files if f.path not in seen]
    if missing:
        raise IntegrityError(f"{path} is incomplete: {', '.join(missing)} listed in the manifest but absent.", "copy the bundle again and verify")
    return manifest, manifest_bytes, sig_bytes


def hash_sink(entry: FileEntry, src: BinaryIO) -> str:
    """A sink that only hashes (``verify`` of a tar writes nothing)."""
    return copy_hashed(src, None, entry.size, entry.path)


def peek_tar(path: Path) -> tuple[Manifest, bytes, Signature | None]:
    """Read only the manifest (and signature) at the head of a tar bundle; no file data is hashed."""
    with _open(path) as tf:
        try:
            manifest, data, sig, _ = _read_head(tf, _files(tf, path), path)
        except tarfile.TarError as exc:
            raise _damaged(path, exc) from None
    return manifest, data, sig
