"""Which native llama.cpp build this process loads: the identity of its library files, and the compiler that made them.

Two installs of one llama-cpp-python version can print the same system-info line and still run different
machine code: pip compiles llama.cpp on the user's machine with whatever C++ compiler is there. On an Intel
Xeon with AMX this decides whether llama.cpp's AMX kernels run at all. GCC 12.2 (Debian 12) builds them so
that the tile configuration they load is mostly stack garbage: its ``_tile_loadconfig`` tells the optimizer the
instruction reads 8 bytes, so the stores of the tile shapes are removed, and the first ``ldtilecfg`` raises a
general-protection fault (SIGSEGV). The same source built with clang 16 runs them. So the self-test's verdicts
(``selftest.Host``) are keyed by the library files' digest (``digest``), and the crash notice names the compiler
(``compilers``, from each library's ELF ``.comment`` section, where the compiler left one: a clang build installed
by pip has none).
"""

from __future__ import annotations

import functools
import hashlib
import re
import struct
from pathlib import Path

#: Library files read for the digest: llama.cpp's shared objects as llama-cpp-python installs them.
LIB_SUFFIXES = (".so", ".dylib", ".dll")
#: Bounds for the ELF read: section headers and the ``.comment`` section (untrusted bytes, read before use).
MAX_SECTIONS = 4096
MAX_COMMENT = 64 * 1024
_SHDR = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr: name, type, flags, addr, offset, size, link, info, align, entsize


def library_dir() -> Path:
    """The folder llama-cpp-python loads its native libraries from: ``$LLAMA_CPP_LIB_PATH`` where set (its own rule),
    else its package's ``llama_cpp/lib``; found without loading them."""
    import importlib.util
    import os
    import sys

    loaded = sys.modules.get("llama_cpp.llama_cpp")
    if loaded is not None and getattr(loaded, "_base_path", None):
        return Path(loaded._base_path)
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        return Path(os.environ["LLAMA_CPP_LIB_PATH"])
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        return Path("llama_cpp-not-installed")
    return Path(spec.origin).parent / "lib"


def library_files(folder: Path | None = None) -> list[Path]:
    """The distinct library files (symbolic links followed, each file once), sorted by name."""
    folder = folder or library_dir()
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    seen: dict[Path, Path] = {}
    for entry in entries:
        if not any(s in entry.name for s in LIB_SUFFIXES):
            continue
        try:
            real = entry.resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if real.is_file() and real not in seen:
            seen[real] = entry
    return sorted(seen, key=lambda p: p.name)


@functools.lru_cache(maxsize=4)
def digest(folder: Path | None = None) -> str:
    """sha256 over the library files' names and contents: changes when llama.cpp is rebuilt or reinstalled, even at
    the same version. Empty where there is no library folder."""
    files = library_files(folder)
    if not files:
        return ""
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode("utf-8", "replace") + b"\0")
        try:
            with path.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
        except OSError:
            h.update(b"unreadable")
        h.update(b"\0")
    return h.hexdigest()


def elf_comment(path: Path) -> tuple[str, ...]:
    """The strings of a 64-bit little-endian ELF file's ``.comment`` section (compilers record themselves there:
    ``GCC: (Debian 12.2.0-14+deb12u1) 12.2.0``); () for anything else or anything out of bounds."""
    try:
        with path.open("rb") as fh:
            head = fh.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return ()
            shoff, = struct.unpack_from("<Q", head, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", head, 0x3A)
            if shentsize != _SHDR.size or not 0 < shnum <= MAX_SECTIONS or shstrndx >= shnum:
                return ()
            fh.seek(shoff)
            table = fh.read(shnum * shentsize)
            if len(table) != shnum * shentsize:
                return ()
            sections = [_SHDR.unpack_from(table, i * shentsize) for i in range(shnum)]
            names_at, names_size = sections[shstrndx][4], sections[shstrndx][5]
            if names_size > MAX_COMMENT * 16:
                return ()
            fh.seek(names_at)
            names = fh.read(names_size)
            for sec in sections:
                end = names.find(b"\0", sec[0])
                if sec[0] >= len(names) or end < 0:
                    continue
                if names[sec[0]:end] == b".comment":
                    if sec[5] > MAX_COMMENT:
                        return ()
                    fh.seek(sec[4])
                    raw = fh.read(sec[5])
                    return tuple(dict.fromkeys(s.decode("utf-8", "replace").strip()
                                               for s in raw.split(b"\0") if s.strip()))
    except (OSError, struct.error, ValueError):
        return ()
    return ()


def _gcc_version(name: str) -> tuple[int, ...] | None:
    """``GCC: (Debian 12.2.0-14+deb12u1) 12.2.0`` -> (12, 2, 0), ``GCC: (GNU) 13.2.1 20230801`` -> (13, 2, 1); None
    for another compiler or an unreadable one."""
    found = re.match(r"\s*(\d+(?:\.\d+)*)\b", name.rpartition(")")[2]) if name.startswith("GCC:") else None
    return tuple(int(p) for p in found.group(1).split(".")) if found else None


def _code_first(name: str) -> tuple:
    """Sort key: a compiler other than GCC first, then GCCs newest first. clang on Linux links the system GCC's start
    files (``crtbeginS.o``), which carry GCC's name, so a library clang compiled names GCC too, and first:
    ``GCC: (Debian 12.2.0-14+deb12u1) 12.2.0`` then ``Debian clang version 16.0.6 (15~deb12u1)``."""
    if not name.startswith("GCC:"):
        # a linker writes its name there too (``Linker: LLD 16.0.6``, ``mold 2.4.0 (compatible with GNU ld)``): only
        # a compiler's name may outrank GCC's, or a GCC 12 build linked by lld would be taken for a safe one
        return (0,) if "clang" in name or "compiler" in name.lower() else (3,)
    version = _gcc_version(name)
    return (1, *(-v for v in version)) if version else (2,)


@functools.lru_cache(maxsize=4)
def compilers(folder: Path | None = None) -> tuple[str, ...]:
    """The compilers named in the CPU backend's library (``libggml-cpu``, where the AMX kernels live; else every
    library), the one that compiled its code first (``_code_first``); () where none left its name. A library
    stripped by ``llvm-strip`` has no ``.comment``: CMake strips a clang build with it where it is installed, and
    llama-cpp-python's build backend (scikit-build-core) strips what it installs, so a ``CC=clang-16 pip install``
    can leave no name."""
    files = library_files(folder)
    cpu = [p for p in files if p.name.startswith("libggml-cpu")]
    found: dict[str, None] = {}
    for path in cpu or files:
        found.update(dict.fromkeys(elf_comment(path)))
    return tuple(sorted(found, key=_code_first))



def amx_tiles_dropped_by() -> str | None:
    """The CPU backend's compiler (the first of ``compilers``) when it is a GCC before 13, else None. GCC 12.2's
    ``_tile_loadconfig`` declares an 8-byte operand, so the stores of llama.cpp's tile shapes are dropped and its AMX
    kernels fault (this module's text); GCC 13's header calls a compiler builtin instead (public build logs show it;
    not run here), and its builds are tried under the self-test like any other. A clang build, which names the GCC of
    its start files too, is tried."""
    named = compilers()
    version = _gcc_version(named[0]) if named else None
    return named[0] if version and version[0] < 13 else None
