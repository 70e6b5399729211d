"""Which compiler built llama.cpp's CPU backend, read from its libraries' ELF ``.comment``.

A library clang compiled names the system GCC too (clang links GCC's start files, ``crtbeginS.o``, which carry
GCC's name), and GCC's line comes first: that build must still be named clang, and its AMX kernels tried.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from test_amx_placement import _elf

from edgemed.runtime import native_build

GCC12 = "GCC: (Debian 12.2.0-14+deb12u1) 12.2.0"
CLANG16 = "Debian clang version 16.0.6 (15~deb12u1)"


@pytest.fixture
def lib_dir(tmp_path, monkeypatch):
    """An empty library folder that ``native_build`` reads as llama-cpp-python's, its caches cleared around the test."""
    lib = tmp_path / "lib"
    lib.mkdir()
    monkeypatch.setattr(native_build, "library_dir", lambda: lib)
    native_build.compilers.cache_clear()
    yield lib
    native_build.compilers.cache_clear()


def _comment(lib, *names: str) -> None:
    (lib / "libggml-cpu.so").write_bytes(_elf([(b".comment", b"".join(n.encode() + b"\0" for n in names))]))


def test_a_clang_build_that_also_names_gccs_start_files_is_clangs(lib_dir):
    _comment(lib_dir, GCC12, CLANG16)  # the order the linker writes them in
    assert native_build.compilers() == (CLANG16, GCC12)
    assert native_build.amx_tiles_dropped_by() is None  # AMX is tried (under the self-test)


def test_a_gcc_build_is_gccs_and_the_newest_gcc_named_is_the_compiler(lib_dir):
    _comment(lib_dir, GCC12)
    assert native_build.amx_tiles_dropped_by() == GCC12
    native_build.compilers.cache_clear()
    _comment(lib_dir, GCC12, "GCC: (GNU) 13.2.1 20230801")  # GCC 13 linked against start files of the system's 12
    assert native_build.compilers()[0] == "GCC: (GNU) 13.2.1 20230801"
    assert native_build.amx_tiles_dropped_by() is None


@pytest.mark.parametrize("linker", ["Linker: LLD 16.0.6", "mold 2.4.0 (compatible with GNU ld)"])
def test_a_linker_named_beside_gcc_12_does_not_pass_for_a_compiler(lib_dir, linker):
    """A GCC 12 build linked by lld or mold names its linker in .comment too; taken first, AMX was tried on it."""
    _comment(lib_dir, GCC12, linker)
    assert native_build.compilers()[0] == GCC12 and native_build.amx_tiles_dropped_by() == GCC12
    native_build.compilers.cache_clear()
    _comment(lib_dir, GCC12, CLANG16, linker)  # clang linked by lld: clang's build, tried
    assert native_build.compilers()[0] == CLANG16 and native_build.amx_tiles_dropped_by() is None


def _compile(cc: str, lib, *flags: str) -> None:
    source = lib.parent / "add.c"
    source.write_text("int add(int a, int b) { return a + b; }\n")
    subprocess.run([cc, "-O2", "-shared", "-fPIC", *flags, "-o", str(lib / "libggml-cpu.so"), str(source)],
                   check=True, capture_output=True, timeout=120)


@pytest.mark.skipif(not (shutil.which("clang-16") or shutil.which("clang")), reason="no clang on this machine")
def test_a_library_clang_really_built_is_named_clang(lib_dir):
    _compile(shutil.which("clang-16") or shutil.which("clang"), lib_dir)
    named = native_build.compilers()
    assert "clang version" in named[0], named
    assert native_build.amx_tiles_dropped_by() is None


@pytest.mark.skipif(not ((shutil.which("clang-16") or shutil.which("clang")) and shutil.which("llvm-strip")),
                    reason="needs clang and llvm-strip")
def test_llvm_strip_leaves_no_name(lib_dir):
    """Why a clang build installed by pip can name no compiler: llvm-strip, which CMake uses for a clang build's
    installed-and-stripped files, removes ``.comment`` (GNU strip keeps it)."""
    _compile(shutil.which("clang-16") or shutil.which("clang"), lib_dir)
    subprocess.run(["llvm-strip", str(lib_dir / "libggml-cpu.so")], check=True, capture_output=True, timeout=60)
    assert native_build.compilers() == ()
    assert native_build.amx_tiles_dropped_by() is None
