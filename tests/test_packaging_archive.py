"""Untrusted archives: every malicious shape is refused and nothing is written outside the store's staging.

Each archive is crafted by hand (raw tar headers), so what it claims need not be true:
a member may declare 10 TB it does not hold, name '../x', or be a device node.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import bundle_kit as kit
from edgemed.cli import cli
from edgemed.errors import IntegrityError, UnsafeArchive
from edgemed.packaging.archive import hash_sink, read_tar
from edgemed.packaging.store import Store

PAYLOAD = b"GGUF" + bytes(range(1, 61))


def _manifest(files: dict[str, bytes] | None = None, sizes: dict[str, int] | None = None) -> bytes:
    files = files if files is not None else {"model/m.gguf": PAYLOAD}
    entries = [{"path": p, "size": (sizes or {}).get(p, len(d)), "sha256": hashlib.sha256(d).hexdigest(),
                "role": "model" if p.startswith("model/") else "other"} for p, d in files.items()]
    man = {"schema": "edgemed.bundle/1", "name": "evil", "files": entries, "model": {"format": "gguf", "path": entries[0]["path"]},
           "provenance": {}, "card": {}, "memory": {}, "created": "", "edgemed_version": "0"}
    return json.dumps(man).encode()


def _member(name: str, data: bytes = b"", *, kind=tarfile.REGTYPE, size: int | None = None, linkname: str = "") -> bytes:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = kind, linkname
    ti.size = len(data) if size is None else size
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        ti.devmajor, ti.devminor = 1, 3
    out = ti.tobuf(tarfile.PAX_FORMAT)
    if kind == tarfile.REGTYPE and data:
        out += data + tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE)
    return out


def _tar(path: Path, *members: bytes, trailer: bool = True) -> Path:
    path.write_bytes(b"".join(members) + (tarfile.NUL * (2 * tarfile.BLOCKSIZE) if trailer else b""))
    return path


def _good_head(extra: dict[str, bytes] | None = None) -> bytes:
    return _member("manifest.json", _manifest({"model/m.gguf": PAYLOAD, **(extra or {})}))


CASES = {
    "dotdot": lambda: [_member("manifest.json", _manifest({"../escape.gguf": PAYLOAD}))],
    "dotdot-member": lambda: [_good_head(), _member("model/../../escape.gguf", PAYLOAD)],
    "absolute": lambda: [_good_head(), _member("/tmp/edgemed-abs-escape.gguf", PAYLOAD)],
    "absolute-in-manifest": lambda: [_member("manifest.json", _manifest({"/etc/cron.d/x": PAYLOAD}))],
    "symlink": lambda: [_good_head(), _member("model/m.gguf", kind=tarfile.SYMTYPE, linkname="/etc/passwd")],
    "symlink-dir-escape": lambda: [_good_head(), _member("model", kind=tarfile.SYMTYPE, linkname="../../outside"),
                                   _member("model/m.gguf", PAYLOAD)],
    "hardlink": lambda: [_good_head(), _member("model/m.gguf", kind=tarfile.LNKTYPE, linkname="/etc/passwd")],
    "char-device": lambda: [_good_head(), _member("model/m.gguf", kind=tarfile.CHRTYPE)],
    "block-device": lambda: [_good_head(), _member("model/m.gguf", kind=tarfile.BLKTYPE)],
    "fifo": lambda: [_good_head(), _member("model/m.gguf", kind=tarfile.FIFOTYPE)],
    "huge-declared-in-tar": lambda: [_good_head(), _member("model/m.gguf", size=10 * 10**12)],
    "huge-declared-in-manifest": lambda: [_member("manifest.json", _manifest(sizes={"model/m.gguf": 10 * 10**12})),
                                          _member("model/m.gguf", size=10 * 10**12)],
    "huge-manifest": lambda: [_member("manifest.json", size=1 << 30)],
    "manifest-not-first": lambda: [_member("model/m.gguf", PAYLOAD), _good_head()],
    "extra-file": lambda: [_good_head(), _member("model/m.gguf", PAYLOAD), _member("model/backdoor.so", b"\x7fELF")],
    "duplicate": lambda: [_good_head(), _member("model/m.gguf", PAYLOAD), _member("model/m.gguf", PAYLOAD)],
    "truncated-member": lambda: [_good_head(), _member("model/m.gguf", PAYLOAD)[:512 + 10]],
    "wrong-content": lambda: [_good_head(), _member("model/m.gguf", b"GGUF" + b"\1" * 60)],
    "missing-file": lambda: [_good_head({"LICENSE": b"MIT"}), _member("model/m.gguf", PAYLOAD)],
}

EXPECT = {
    "dotdot": "unsafe path", "dotdot-member": "unsafe path", "absolute": "absolute path", "absolute-in-manifest": "absolute path",
    "symlink": "symbolic link", "symlink-dir-escape": "symbolic link", "hardlink": "hard link", "char-device": "device file",
    "block-device": "device file", "fifo": "FIFO", "huge-declared-in-tar": "declares 10000000000000 bytes",
    "huge-declared-in-manifest": "declares 10000000000000 bytes", "huge-manifest": "not manifest.json",
    "manifest-not-first": "not manifest.json", "extra-file": "extra file 'model/backdoor.so'", "duplicate": "appears twice",
    "truncated-member": "truncated", "wrong-content": "expected sha256", "missing-file": "LICENSE listed in the manifest but absent",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malicious_archive_is_refused_and_writes_nothing_outside(tmp_path, case, edgemed_home):
    work = tmp_path / "work"
    work.mkdir()
    bundle = _tar(work / "evil.edgemed", *CASES[case](), trailer=not case.startswith("truncated"))
    before = kit.snapshot(tmp_path)
    r = CliRunner().invoke(cli, ["install", str(bundle)], catch_exceptions=False)
    assert r.exit_code == 1, r.output
    assert EXPECT[case] in r.output, r.output
    assert "Traceback" not in r.output
    store = Store()
    assert list(store.models.iterdir()) == [] and list(store.tmp.iterdir()) == [] and list(store.blobs.iterdir()) == []
    # the only new paths anywhere under tmp_path are the store's own empty skeleton
    new = kit.snapshot(tmp_path) - before
    assert all(p.startswith("edgemed-home") for p in new), new
    assert not any(f.is_file() for f in edgemed_home.rglob("*") if f.name not in ("lock",)), list(edgemed_home.rglob("*"))
    assert not Path("/tmp/edgemed-abs-escape.gguf").exists() and not (tmp_path / "escape.gguf").exists()
    # verify refuses it too, without writing anything
    r = CliRunner().invoke(cli, ["verify", str(bundle)], catch_exceptions=False)
    assert r.exit_code == 1 and EXPECT[case].split()[0] in r.output, r.output


def test_compressed_archive_is_refused(tmp_path):
    t = _tar(tmp_path / "ok.tar", _good_head(), _member("model/m.gguf", PAYLOAD))
    gz = tmp_path / "evil.edgemed"
    gz.write_bytes(gzip.compress(t.read_bytes()))
    with pytest.raises(UnsafeArchive, match="not an uncompressed tar"):
        read_tar(gz, hash_sink)


def test_handmade_good_archive_is_accepted(tmp_path):
    """The crafting helpers make valid archives when asked to: the refusals above are about the attack, not the tar."""
    t = _tar(tmp_path / "ok.edgemed", _good_head(), _member("model/m.gguf", PAYLOAD))
    man, _, _ = read_tar(t, hash_sink)
    assert man.name == "evil" and man.files[0].size == len(PAYLOAD)
    s = Store()
    name, _, _ = s.install(t)
    assert (s.models / name / "model" / "m.gguf").read_bytes() == PAYLOAD


def test_size_cap_from_environment(tmp_path, monkeypatch):
    t = _tar(tmp_path / "ok.edgemed", _good_head(), _member("model/m.gguf", PAYLOAD))
    monkeypatch.setenv("EDGEMED_MAX_BUNDLE_BYTES", "10")
    with pytest.raises(UnsafeArchive, match="EDGEMED_MAX_BUNDLE_BYTES"):
        read_tar(t, hash_sink)


def test_a_bundle_folder_is_held_to_the_size_cap_and_the_free_disk_before_it_is_hashed(tmp_path, edgemed_home, monkeypatch):
    """Only the tar form checked $EDGEMED_MAX_BUNDLE_BYTES and the free disk: a folder over the cap installed, and one
    whose manifest declares a huge (sparse) file was hashed in full and copied until the disk filled."""
    import shutil

    from edgemed.packaging import bundle as bundle_mod
    from edgemed.packaging import store as store_mod
    from edgemed.packaging.bundle import PackInputs, pack

    src = kit.inputs(tmp_path / "src")
    folder = tmp_path / "tinydir"
    man = pack(PackInputs(model=src["model"], license=src["license"], card=src["card"], name="tiny"), folder, as_dir=True)

    def no_hashing(*args, **kwargs):
        raise AssertionError("a file of the bundle was hashed before its declared size was checked")

    with monkeypatch.context() as m:
        m.setattr(bundle_mod, "file_digest", no_hashing)
        m.setattr(store_mod, "copy_hashed", no_hashing)
        m.setenv("EDGEMED_MAX_BUNDLE_BYTES", str(man.total_bytes - 1))
        with pytest.raises(UnsafeArchive, match=f"declares {man.total_bytes} bytes, more than the {man.total_bytes - 1} allowed"):
            Store().install(folder)
        r = CliRunner().invoke(cli, ["install", str(folder)], catch_exceptions=False)
        assert r.exit_code == 1 and "EDGEMED_MAX_BUNDLE_BYTES" in r.output, r.output
        m.delenv("EDGEMED_MAX_BUNDLE_BYTES")
        real_usage = shutil.disk_usage
        m.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=man.total_bytes - 1))
        with pytest.raises(UnsafeArchive, match=f"only {man.total_bytes - 1} are free at"):
            Store().install(folder)
    assert list(Store().models.iterdir()) == [] and list(Store().tmp.iterdir()) == []
    Store().install(folder)  # under the cap, with room: installed as before
    assert (Store().models / "tiny" / man.model_path).is_file()


def test_verify_of_a_bundle_folder_is_held_to_the_size_cap_before_it_is_hashed(tmp_path, edgemed_home, monkeypatch):
    """`edgemed verify FOLDER` (and run ./FOLDER) hashed whatever the manifest listed: a folder declaring a huge
    (sparse) file was read in full. The folder is held to $EDGEMED_MAX_BUNDLE_BYTES first; an installed copy, held to
    it at install, is not held again (a cap raised for one install does not strand the model)."""
    from edgemed.packaging import bundle as bundle_mod
    from edgemed.packaging.bundle import PackInputs, pack, verify_dir

    src = kit.inputs(tmp_path / "src")
    folder = tmp_path / "tinydir"
    man = pack(PackInputs(model=src["model"], license=src["license"], card=src["card"], name="tiny"), folder, as_dir=True)
    Store().install(folder)

    def no_hashing(*args, **kwargs):
        raise AssertionError("a file of the bundle was hashed before its declared size was checked")

    with monkeypatch.context() as m:
        m.setattr(bundle_mod, "file_digest", no_hashing)
        m.setenv("EDGEMED_MAX_BUNDLE_BYTES", str(man.total_bytes - 1))
        with pytest.raises(UnsafeArchive, match=f"declares {man.total_bytes} bytes, more than the {man.total_bytes - 1} allowed"):
            verify_dir(folder, full=True)
        for args in (["verify", str(folder)], ["verify", str(folder), "--full"]):
            r = CliRunner().invoke(cli, args, catch_exceptions=False)
            assert r.exit_code == 1 and "EDGEMED_MAX_BUNDLE_BYTES" in r.output and "Traceback" not in r.output, r.output
    with monkeypatch.context() as m:
        m.setenv("EDGEMED_MAX_BUNDLE_BYTES", str(man.total_bytes - 1))
        assert Store().verify("tiny", full=True).manifest.total_bytes == man.total_bytes  # installed: not held again
        m.setenv("EDGEMED_MAX_BUNDLE_BYTES", str(man.total_bytes))
        assert verify_dir(folder, full=True).manifest.total_bytes == man.total_bytes  # at the cap: verified as before


def test_damaged_manifest_json_is_refused(tmp_path):
    t = _tar(tmp_path / "x.edgemed", _member("manifest.json", b"{not json"), _member("model/m.gguf", PAYLOAD))
    with pytest.raises(IntegrityError, match="not valid JSON"):
        read_tar(t, hash_sink)
    newer = json.loads(_manifest())
    newer["schema"] = "edgemed.bundle/2"
    t = _tar(tmp_path / "y.edgemed", _member("manifest.json", json.dumps(newer).encode()), _member("model/m.gguf", PAYLOAD))
    with pytest.raises(IntegrityError, match="upgrade edgemed"):
        read_tar(t, hash_sink)


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME], ids=["pax", "gnu-longname"])
def test_a_huge_extended_header_is_refused_before_it_is_read(tmp_path, edgemed_home, kind):
    """tarfile reads a PAX (or GNU long-name) header whole into memory: a sparse 4 KB-on-disk bundle declaring a
    300 MiB one cost twice that in RAM before any check of ours, in install, inspect and verify alike."""
    bundle = tmp_path / "bomb.edgemed"
    with open(bundle, "wb") as fh:
        fh.write(_member("././@LongHeader", kind=kind, size=300 << 20))
        fh.seek((300 << 20) + 2048, 1)  # a hole: zeros the file system does not store
        fh.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
    for args in (["install"], ["inspect"], ["verify"]):
        r = CliRunner().invoke(cli, [*args, str(bundle)], catch_exceptions=False)
        assert r.exit_code == 1 and "declares an extended tar header of 314,572,800 bytes" in r.output, (args, r.output)
    assert list(Store().models.iterdir()) == []


def test_manifest_paths_nest_at_most_16_deep_and_files_are_not_folders():
    """3,600 paths of 500 folders each (a 3.8 MiB manifest) took 10 s of CPU to check, before any signature was
    looked at; paths nest at most 16 deep now. A path listed as a file and as a folder is still refused."""
    from edgemed.packaging.manifest import MAX_PATH_DEPTH, Manifest

    deep = "/".join(["d"] * MAX_PATH_DEPTH) + ".gguf"
    too_deep = "/".join(["d"] * (MAX_PATH_DEPTH + 1))
    assert Manifest.from_bytes(_manifest({deep: PAYLOAD}), "test").files[0].path == deep
    with pytest.raises(UnsafeArchive, match="unsafe path"):
        Manifest.from_bytes(_manifest({too_deep: PAYLOAD}), "test")
    for files, clash in [({"model/m.gguf": PAYLOAD, "model": b"x"}, "'model'"),
                         ({"model/m.gguf": PAYLOAD, "a/b/c": b"x", "a/b": b"y"}, "'a/b'"),
                         ({"model/m.gguf": PAYLOAD, "a/b/c/d": b"x", "a": b"y", "a/b": b"z"}, "'a'")]:
        with pytest.raises(IntegrityError, match=f"{clash} is listed both as a file and as a directory"):
            Manifest.from_bytes(_manifest(files), "test")
    assert len(Manifest.from_bytes(_manifest({"model/m.gguf": PAYLOAD, "a/b/c": b"x", "a/b/d": b"y"}), "t").files) == 3


def test_thousands_of_chained_extended_headers_are_refused_not_a_traceback(tmp_path, edgemed_home):
    """tarfile reads each extended header's member by calling itself: 3,000 GNU long-name headers in a row (a 3 MB
    bundle) were a RecursionError traceback in install, inspect and verify."""
    bundle = _tar(tmp_path / "chain.edgemed", *[_member("././@LongLink", b"x" * 100, kind=tarfile.GNUTYPE_LONGNAME)
                                                 for _ in range(3000)], _good_head())
    for args in (["install"], ["inspect"], ["verify"]):
        r = CliRunner().invoke(cli, [*args, str(bundle)], catch_exceptions=False)
        assert r.exit_code == 1 and "extended tar headers in a row" in r.output, (args, r.output[-500:])
    long_name = tmp_path / "long.edgemed"  # a real long file name (a PAX header before its member) still reads
    with tarfile.open(long_name, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in (("manifest.json", _manifest({"model/" + "m" * 150 + ".gguf": PAYLOAD})),
                           ("model/" + "m" * 150 + ".gguf", PAYLOAD)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, __import__("io").BytesIO(data))
    assert read_tar(long_name, hash_sink)[0].files[0].path.endswith("m.gguf")


def test_a_global_pax_header_and_pax_key_floods_are_refused(tmp_path, edgemed_home):
    """tarfile copies a global PAX header's keys into every later member and keeps every member: 60 KB of keys
    before 5,000 directory entries (a 2.6 MB file) cost hundreds of MB before the manifest was looked at."""
    bundle = _tar(tmp_path / "global.edgemed", tarfile.TarInfo.create_pax_global_header({"k": "v" * 100}),
                  _good_head(), _member("model/m.gguf", PAYLOAD))
    for args in (["install"], ["inspect"], ["verify"]):
        r = CliRunner().invoke(cli, [*args, str(bundle)], catch_exceptions=False)
        assert r.exit_code == 1 and "holds a global PAX header" in r.output and "Fix:" in r.output, (args, r.output)
    flood = tarfile.TarInfo("manifest.json")
    flood.pax_headers = {f"k{i:03d}": "" for i in range(100)}
    data = _manifest()
    flood.size = len(data)
    bundle = _tar(tmp_path / "keys.edgemed", flood.tobuf(tarfile.PAX_FORMAT) + data + tarfile.NUL * (-len(data) % 512),
                  _member("model/m.gguf", PAYLOAD))
    with pytest.raises(UnsafeArchive, match="PAX header of 'manifest.json' holds 10[0-9] keys"):
        read_tar(bundle, hash_sink)
    assert list(Store().models.iterdir()) == []


def test_headers_are_not_kept_as_they_are_read_and_directory_entries_are_capped(tmp_path, monkeypatch):
    from edgemed.packaging import archive

    opened = []
    real_open = archive._open
    monkeypatch.setattr(archive, "_open", lambda path: opened.append(real_open(path)) or opened[-1])
    dirs = [_member(f"d{i}", kind=tarfile.DIRTYPE) for i in range(3000)]
    bundle = _tar(tmp_path / "dirs.edgemed", *dirs, _good_head(), _member("model/m.gguf", PAYLOAD))
    assert read_tar(bundle, hash_sink)[0].name == "evil"  # directory entries are skipped, as before
    assert len(opened[-1].members) <= 1  # tarfile kept every header it read (3,002 here) until the file was closed
    assert archive.peek_tar(bundle)[0].name == "evil" and len(opened[-1].members) <= 1
    monkeypatch.setattr(archive, "MAX_FILES", 2999)
    with pytest.raises(UnsafeArchive, match="more than 2,999 directory entries"):
        read_tar(bundle, hash_sink)


def test_lone_surrogates_in_a_manifest_or_a_name_are_refused(tmp_path, edgemed_home):
    """json.loads turns "\\ud800" into a lone surrogate, which no text holds: one installed bundle with
    card.version "1.0\\ud800" made `edgemed list` (and inspect) end in a UnicodeEncodeError for the whole store."""
    from edgemed.packaging.manifest import Manifest, check_relpath

    man = json.loads(_manifest())
    man["card"]["version"] = "1.0\ud800"
    data = json.dumps(man).encode()
    assert b"\\ud800" in data
    with pytest.raises(IntegrityError, match=r"field card\.version holds a lone UTF-16 surrogate"):
        Manifest.from_bytes(data, "t")
    with pytest.raises(IntegrityError, match=r"field files\[0\]\.path holds a lone UTF-16 surrogate"):
        Manifest.from_bytes(_manifest({"model/m\udc80.gguf": PAYLOAD}), "t")
    with pytest.raises(UnsafeArchive, match="unsafe path"):
        check_relpath("model/m\udcff.gguf", "archive x")  # a tar name's undecodable byte, as tarfile decodes it
    bundle = _tar(tmp_path / "s.edgemed", _member("manifest.json", data), _member("model/m.gguf", PAYLOAD))
    for args in (["install"], ["inspect"], ["verify"]):
        r = CliRunner().invoke(cli, [*args, str(bundle)], catch_exceptions=False)
        assert r.exit_code == 1 and "surrogate" in r.output and "Traceback" not in r.output, (args, r.output)
    # a copy installed by an earlier edgemed is one damaged row of `edgemed list`, not the end of it
    store = Store()
    store.install(_tar(tmp_path / "ok.edgemed", _good_head(), _member("model/m.gguf", PAYLOAD)))
    installed = store.models / "evil" / "manifest.json"
    installed.unlink()
    installed.write_bytes(data)
    row = next(r for r in store.list() if r["name"] == "evil")
    assert "surrogate" in row.get("error", ""), row


@pytest.mark.parametrize("path", ["manifest.json", "manifest.json/x", "model.sig/x", "MODEL.SIG/a/b", "Manifest.Sig"])
def test_a_path_at_or_under_a_reserved_name_is_refused(tmp_path, edgemed_home, path):
    """'manifest.json/x' passed verify, then install ended in IsADirectoryError: the manifest's own place was a
    folder. A case-insensitive file system merges 'MODEL.SIG' with the signature."""
    from edgemed.packaging.manifest import Manifest

    with pytest.raises(IntegrityError, match="reserved name"):
        Manifest.from_bytes(_manifest({"model/m.gguf": PAYLOAD, path: b"x"}), "t")
    bundle = _tar(tmp_path / "r.edgemed", _good_head({path: b"x"}), _member("model/m.gguf", PAYLOAD), _member(path, b"x"))
    for args in (["verify"], ["install"]):
        r = CliRunner().invoke(cli, [*args, str(bundle)], catch_exceptions=False)
        assert r.exit_code == 1 and "reserved name" in r.output and "Traceback" not in r.output, (args, r.output)
    store = Store()
    assert list(store.models.iterdir()) == [] and list(store.tmp.iterdir()) == []
    near = {"model/m.gguf": PAYLOAD, "manifest.json.txt": b"x", "model.sigs/y": b"y", "docs/manifest.json": b"z"}
    assert len(Manifest.from_bytes(_manifest(near), "t").files) == 4  # only the first component is reserved


@pytest.mark.parametrize("pair", [("model/Notes.md", "model/notes.md"), ("model/caf\u00e9.md", "model/cafe\u0301.md"),
                                  ("MODEL/x.md", "model/x.md"), ("model/Stra\u00dfe.md", "model/STRASSE.md")])
def test_names_one_file_system_would_merge_are_refused(tmp_path, edgemed_home, pair):
    """macOS (APFS, HFS+), Windows and FAT fold case and Unicode normalisation: two such names land in one file there,
    and the second copy would replace the first after its hash was checked."""
    from edgemed.packaging.manifest import Manifest, folded

    assert folded(pair[0]) == folded(pair[1]) and pair[0] != pair[1]
    with pytest.raises(IntegrityError, match="listed twice"):
        Manifest.from_bytes(_manifest({"model/m.gguf": PAYLOAD, pair[0]: b"x", pair[1]: b"y"}), "t")
    bundle = _tar(tmp_path / "d.edgemed", _good_head({pair[0]: b"x", pair[1]: b"y"}), _member("model/m.gguf", PAYLOAD),
                  _member(pair[0], b"x"), _member(pair[1], b"y"))
    r = CliRunner().invoke(cli, ["install", str(bundle)], catch_exceptions=False)
    assert r.exit_code == 1 and "listed twice" in r.output and "Traceback" not in r.output, r.output
    assert list(Store().models.iterdir()) == []
    assert folded("model/caf\u00e9.md") != folded("model/cafe.md")  # an accent is not folded away


@pytest.mark.parametrize("path", ["MANIFEST.JSON", "Model.SIG/x", "manife\u017ft.json"])  # U+017F folds to "s"
def test_a_reserved_name_in_any_case_is_refused_after_folding(path):
    from edgemed.packaging.manifest import Manifest

    with pytest.raises(IntegrityError, match="reserved name"):
        Manifest.from_bytes(_manifest({"model/m.gguf": PAYLOAD, path: b"x"}), "t")


def _with_checksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _old_gnu_sparse(name: str, extension_blocks: int, *, truncated: bool = False) -> bytes:
    """An old-style GNU sparse member (type 'S'): a header whose map continues in ``extension_blocks`` blocks of 21
    (offset, size) entries each; ``truncated`` ends the file where the header says another block follows."""
    head = bytearray(tarfile.TarInfo(name).tobuf(tarfile.GNU_FORMAT))
    head[156:157] = tarfile.GNUTYPE_SPARSE
    head[386:410] = b"%011o\0%011o\0" % (512, 512)
    head[482] = 1 if extension_blocks or truncated else 0
    head[483:495] = b"%011o\0" % (1 << 30)
    ext = bytearray(b"".join(b"%011o\0%011o\0" % (4096 * (i + 1), 512) for i in range(21)) + bytes(8))
    ext[504] = 1
    last = bytearray(ext)
    last[504] = 0
    return _with_checksum(head) + (b"" if truncated else bytes(ext) * (extension_blocks - 1) + bytes(last))


def _gnu_sparse_1_0(name: str, pairs: int, *, written: int) -> bytes:
    """A GNU sparse 1.0 member: a PAX header (GNU.sparse.major=1, minor=0) and a data area whose map declares
    ``pairs`` (offset, size) pairs and holds ``written`` of them."""
    data = b"%d\n" % pairs + b"".join(b"%d\n%d\n" % (4096 * i, 512) for i in range(written))
    return _pax_member("GNUSparseFile.0/" + name, data, {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                                         "GNU.sparse.name": name, "GNU.sparse.realsize": str(1 << 30)})


def _pax_member(name: str, data: bytes, pax_headers: dict[str, str]) -> bytes:
    info = tarfile.TarInfo(name)
    info.pax_headers, info.size = pax_headers, len(data)
    return info.tobuf(tarfile.PAX_FORMAT) + data + tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE)


SPARSE = {  # each a 4-10 MB tar whose first member is a sparse manifest.json
    "old-gnu-long": lambda: [_old_gnu_sparse("manifest.json", 8_000)],
    "old-gnu-truncated": lambda: [_old_gnu_sparse("manifest.json", 0, truncated=True)],
    "gnu-1.0-long": lambda: [_gnu_sparse_1_0("manifest.json", 400_000, written=400_000)],
    "gnu-1.0-truncated": lambda: [_gnu_sparse_1_0("manifest.json", 99_999_999, written=2)],
    "gnu-0.1-map": lambda: [_pax_member("manifest.json", _manifest(), {"GNU.sparse.map": "0,512", "GNU.sparse.size": "4096"})],
    "pax-realsize-not-a-number": lambda: [_pax_member("manifest.json", _manifest(), {"GNU.sparse.realsize": "lots"})],
}


@pytest.mark.parametrize("case", sorted(SPARSE))
def test_a_sparse_member_is_refused_before_its_map_is_read(tmp_path, edgemed_home, case):
    """tarfile read an old GNU sparse member's every extension block (80,000 of them: 144 MB and 6.6 s before the
    type check) and a GNU sparse 1.0 map as long as it declared; a truncated map was an IndexError or ValueError
    traceback from verify, inspect and install."""
    import tracemalloc

    truncated = case.endswith("truncated")  # the file ends inside the map
    bundle = _tar(tmp_path / "sparse.edgemed", *SPARSE[case](), *([] if truncated else [_member("model/m.gguf", PAYLOAD)]),
                  trailer=not truncated)
    tracemalloc.start()
    try:
        with pytest.raises(UnsafeArchive, match="holds a sparse file 'manifest.json'; bundles hold only regular files"):
            read_tar(bundle, hash_sink)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"{peak:,} bytes traced while refusing a {bundle.stat().st_size:,}-byte bundle"
    for args in (["verify"], ["inspect"], ["install"]):
        r = CliRunner().invoke(cli, [*args, str(bundle)], catch_exceptions=False)
        assert r.exit_code == 1 and "holds a sparse file 'manifest.json'" in r.output and "Fix:" in r.output, (args, r.output[-500:])
    assert list(Store().models.iterdir()) == [] and list(Store().tmp.iterdir()) == []
