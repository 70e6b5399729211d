"""llama.cpp's AMX buffer: tried first where a self-test guards it, counted by the planner, read back after a load.

Whether an AMX build's kernels run depends on the compiler that built llama.cpp (GCC 12.2 builds them so their
first tile setup faults; clang 16 builds them so they run), and the system-info line cannot tell the two apart. So
``auto`` tries the AMX buffer in the self-test's child first and falls back to CPU_REPACK quietly when it crashes;
verdicts are keyed by the library files' digest; the planner counts the AMX layout; and what llama.cpp reports
allocating is read back. The crash is the tests' fault injection (a real SIGSEGV in a real child), so these run
the same on hosts with AMX and without."""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import replace

import pytest
from click.testing import CliRunner

from edgemed.runtime import buffers, native_build, selftest
from edgemed.runtime.engine import LoadSettings

AMX_BUILD = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
             "AVX512 = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
AVX2_BUILD = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "


def test_auto_tries_amx_only_where_the_self_test_guards_it(monkeypatch):
    amx, avx2 = buffers.Build(AMX_BUILD), buffers.Build(AVX2_BUILD)
    monkeypatch.setattr(native_build, "amx_tiles_dropped_by", lambda: None)
    assert buffers.resolve("auto", amx) == "repack"                     # no child first: never AMX unguarded
    assert buffers.resolve("auto", amx, tested=True) == "all"           # the child tries it, repack follows a crash
    monkeypatch.setattr(native_build, "amx_tiles_dropped_by", lambda: "GCC: (GNU) 12.2.0")
    assert buffers.resolve("auto", amx, tested=True) == "repack"        # a compiler known to break them: not tried
    assert not buffers.amx_may_be_tried(amx) and not buffers.amx_may_be_tried(avx2)
    assert buffers.resolve("auto", avx2) == buffers.resolve("auto", avx2, tested=True) == "all"
    for mode in ("all", "repack", "none"):
        assert buffers.resolve(mode, amx, tested=True) == mode


def test_verdicts_are_redone_for_another_build_of_the_same_version(smollm2_gguf, tmp_path, monkeypatch):
    """A reinstall compiled by another compiler prints the same version and system info: its library digest differs."""
    monkeypatch.setenv("EDGEMED_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def runner(path, load):
        calls.append(load.extra_buffers)
        return selftest.Verdict(True, load.extra_buffers)

    host = selftest.Host("0.3.36", AMX_BUILD, ("amx_int8",), "a" * 64)
    load = LoadSettings(extra_buffers="none")
    selftest.check(smollm2_gguf, load, host=host, runner=runner)
    selftest.check(smollm2_gguf, load, host=host, runner=runner)
    selftest.check(smollm2_gguf, load, host=replace(host, library="b" * 64), runner=runner)
    assert calls == ["none", "none"]
    assert selftest.Host.current().library == native_build.digest() != ""


@pytest.fixture
def amx_build(monkeypatch, tmp_path):
    """This process believes its llama.cpp has AMX; the child's AMX try dies of a real SIGSEGV (fault injection)."""
    from edgemed.runtime import llamacpp

    monkeypatch.setattr(llamacpp, "build", lambda: buffers.Build(AMX_BUILD))
    monkeypatch.setattr(native_build, "amx_tiles_dropped_by", lambda: None)  # a compiler whose AMX build is tried
    monkeypatch.setenv("EDGEMED_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGEMED_FAULT", "selftest-crash:all")
    monkeypatch.delenv("EDGEMED_SELFTEST", raising=False)


def test_auto_falls_back_from_a_crashing_amx_buffer_quietly(smollm2_gguf, amx_build, caplog):
    with caplog.at_level(logging.INFO, logger="edgemed"):
        used = selftest.ensure(smollm2_gguf, LoadSettings(n_ctx=256, n_threads=1, extra_buffers="auto"))
    assert used.extra_buffers == "repack"
    said = [r for r in caplog.records if r.name.startswith("edgemed.runtime.selftest")]
    assert said and all(r.levelno == logging.INFO for r in said)        # the expected course there, not a warning
    assert "AMX kernels crash (SIGSEGV)" in said[0].getMessage() and "clang" in said[0].getMessage()
    # an explicit "all" that crashes is still news: the paragraph, at WARNING
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edgemed"):
        assert selftest.ensure(smollm2_gguf, LoadSettings(n_ctx=256, n_threads=1, extra_buffers="all")).extra_buffers \
            == "repack"
    assert any(r.levelno == logging.WARNING and "killed by SIGSEGV" in r.getMessage() for r in caplog.records)


@pytest.fixture
def core_files_allowed():
    """The test process allows core files where its hard limit lets it, so the child's own limit is what is seen."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    if hard == 0:
        pytest.skip("this process may not allow core files (hard RLIMIT_CORE 0)")
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


def test_devices_check_reports_what_auto_uses(smollm2_gguf, amx_build, core_files_allowed):
    from edgemed.cli import cli

    text = CliRunner().invoke(cli, ["devices", "check", str(smollm2_gguf)])
    assert text.exit_code == 0, text.output
    assert text.output.startswith(f"ok: {smollm2_gguf.name} loads and decodes with extra_buffers = \"repack\"")
    assert "auto tried the AMX buffer first: it crashed (SIGSEGV)" in text.output and "clang" in text.output
    report = json.loads(CliRunner().invoke(cli, ["devices", "check", str(smollm2_gguf), "--json"]).output)
    assert report["uses"] == "repack"
    assert [(v["extra_buffers"], v["ok"], v["signal"]) for v in report["verdicts"]] == \
        [("all", False, "SIGSEGV"), ("repack", True, None)]
    assert report["verdicts"][-1]["child"]["core_limit"] == 0        # an expected crash leaves no model-sized core
    assert report["host"]["library_sha256"] == native_build.digest()


@pytest.mark.parametrize("verdict", [selftest.Verdict(False, "all", "SIGKILL", ""),          # the OOM killer's
                                     selftest.Verdict(False, "all", None, "no answer within 600 s")],
                         ids=["sigkill", "timeout"])
def test_an_amx_try_that_proves_nothing_loads_the_repack(smollm2_gguf, amx_build, monkeypatch, verdict):
    """The AMX buffer loads in process only after a child ran it: an inconclusive try leaves auto on CPU_REPACK."""
    calls = []

    def runner(path, load):
        calls.append(load.extra_buffers)
        return verdict if load.extra_buffers == "all" else selftest.Verdict(True, load.extra_buffers)

    monkeypatch.setattr(selftest, "run_child", runner)
    assert selftest.ensure(smollm2_gguf, LoadSettings(extra_buffers="auto")).extra_buffers == "repack"
    assert calls == ["all", "repack"]                                  # the repack it falls back to is run in a child
    assert selftest.ensure(smollm2_gguf, LoadSettings(extra_buffers="auto")).extra_buffers == "repack"
    assert calls == ["all", "repack"]                                  # kept: no AMX child at every start
    # asked for by name: loaded as asked, where the error of a load that fails reads as usual
    assert selftest.ensure(smollm2_gguf, LoadSettings(extra_buffers="all")).extra_buffers == "all"


def test_a_build_whose_amx_tile_setup_is_miscompiled_is_not_tried(smollm2_gguf, amx_build, monkeypatch):
    """Built by GCC 12, llama.cpp's AMX kernels fault on their first tile setup: no child is spent on them."""
    from edgemed.cli import cli

    calls = []

    def runner(path, load):
        calls.append(load.extra_buffers)
        return selftest.Verdict(True, load.extra_buffers)

    monkeypatch.setattr(native_build, "amx_tiles_dropped_by", lambda: "GCC: (Debian 12.2.0-14+deb12u1) 12.2.0")
    monkeypatch.setattr(selftest, "run_child", runner)
    assert selftest.ensure(smollm2_gguf, LoadSettings(extra_buffers="auto")).extra_buffers == "repack"
    assert calls == ["repack"]
    text = CliRunner().invoke(cli, ["devices", "check", str(smollm2_gguf)])
    assert text.exit_code == 0 and "extra_buffers = \"repack\"" in text.output
    assert "AMX not tried: this llama.cpp was compiled by GCC: (Debian 12.2.0-14+deb12u1) 12.2.0" in text.output
    assert "not tried" in selftest.describe_host()


@pytest.mark.parametrize("comment, dropped", [("GCC: (Debian 12.2.0-14+deb12u1) 12.2.0", True),
                                              ("GCC: (GNU) 11.4.0", True), ("GCC: (GNU) 13.2.0", False),
                                              ("clang version 16.0.6", False), ("GCC: (odd) x.y", False)])
def test_which_compilers_are_known_to_drop_the_tile_setup(tmp_path, monkeypatch, comment, dropped):
    monkeypatch.setattr(native_build, "compilers", lambda: (comment,))
    assert (native_build.amx_tiles_dropped_by() == comment) is dropped


def test_the_libraries_are_the_ones_llama_cpp_python_loads(tmp_path, monkeypatch):
    """LLAMA_CPP_LIB_PATH points llama-cpp-python at another build: the digest and the compiler are that build's."""
    import sys

    monkeypatch.delitem(sys.modules, "llama_cpp.llama_cpp", raising=False)
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(tmp_path))
    assert native_build.library_dir() == tmp_path
    monkeypatch.delenv("LLAMA_CPP_LIB_PATH")
    assert native_build.library_dir().name == "lib" and native_build.library_dir().parent.name == "llama_cpp"


def test_placement_read_back_finds_what_contradicts_the_mode():
    extra = {"AMX": 1, "CPU_REPACK": 2}
    assert buffers.Placement("repack", 168, seen={"CPU": 463.4, "CPU_REPACK": 596.5}).unread(extra) is None
    assert "no CPU_REPACK buffer" in buffers.Placement("repack", 168, seen={"CPU": 1059.9}).unread(extra)
    assert "allocated an AMX buffer" in buffers.Placement("repack", 3, seen={"AMX": 9.0, "CPU_REPACK": 1.0}).unread(extra)
    assert "extra buffer" in buffers.Placement("none", seen={"CPU": 1.0, "CPU_REPACK": 2.0}).unread(extra)
    assert buffers.Placement("all", seen={"AMX": 950.7, "CPU": 125.7}).unread(extra) is None
    assert buffers.Placement("repack", 168).unread(extra) is None        # llama.cpp said nothing: nothing to hold to
    assert buffers.Placement("all", seen={"AMX": 950.7, "CPU": 125.7}).describe().endswith(
        "llama.cpp placed AMX 950.7 MiB, CPU 125.7 MiB")


def test_a_real_load_reads_its_buffers_back(smollm2_gguf):
    from edgemed.runtime import llamacpp

    model = llamacpp.Model(smollm2_gguf, LoadSettings(extra_buffers="none", use_mmap=False))
    try:
        assert model.placement.seen == {"CPU": pytest.approx(92.1, abs=0.05)}   # the file's 92.10 MiB, read
        assert "llama.cpp placed CPU 92.1 MiB" in model.placement.describe()
    finally:
        model.close()


def _elf(sections: list[tuple[bytes, bytes]], *, shentsize: int = 64, shnum: int | None = None) -> bytes:
    """A 64-bit little-endian ELF holding only section headers and their contents (name, bytes)."""
    names = b"\0" + b"".join(n + b"\0" for n, _ in sections) + b".shstrtab\0"
    body, offsets, at = b"", [], 64
    for _, data in sections:
        offsets.append(at + len(body))
        body += data
    names_at = 64 + len(body)
    body += names
    shoff = 64 + len(body)
    head = bytearray(64)
    head[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", head, 0x28, shoff)
    count = len(sections) + 2
    struct.pack_into("<HHH", head, 0x3A, shentsize, count if shnum is None else shnum, count - 1)
    table = bytes(64)  # section 0 is the null section
    pos = 1
    for (name, data), off in zip(sections, offsets):
        table += struct.pack("<IIQQQQIIQQ", pos, 1, 0, 0, off, len(data), 0, 0, 1, 0)
        pos += len(name) + 1
    table += struct.pack("<IIQQQQIIQQ", pos, 3, 0, 0, names_at, len(names), 0, 0, 1, 0)
    return bytes(head) + body + table


def test_the_compiler_is_read_from_the_elf_comment(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "libggml-cpu.so").write_bytes(_elf([(b".text", b"\x90" * 16),
                                              (b".comment", b"GCC: (Debian 12.2.0-14+deb12u1) 12.2.0\0")]))
    (lib / "libggml-cpu.so.0").symlink_to("libggml-cpu.so")
    (lib / "libllama.so").write_bytes(_elf([(b".comment", b"clang version 16.0.6\0")]))
    assert native_build.compilers(lib) == ("GCC: (Debian 12.2.0-14+deb12u1) 12.2.0",)   # the CPU backend's
    assert [p.name for p in native_build.library_files(lib)] == ["libggml-cpu.so", "libllama.so"]  # link followed once
    before = native_build.digest(lib)
    (lib / "libllama.so").write_bytes(_elf([(b".comment", b"clang version 17.0.0\0")]))
    native_build.digest.cache_clear()
    assert native_build.digest(lib) != before


@pytest.mark.parametrize("blob", [b"not an elf at all", b"\x7fELF\x01\x01" + bytes(58),       # text; 32-bit
                                  _elf([(b".comment", b"x\0")], shentsize=40),             # a header size not 64
                                  _elf([(b".comment", b"x\0")], shnum=60000),              # more sections than bounded
                                  _elf([(b".comment", b"y" * (native_build.MAX_COMMENT + 1))]),
                                  _elf([(b".comment", b"x\0")])[:100]],                    # cut short
                         ids=["text", "elf32", "shentsize", "shnum", "huge-comment", "truncated"])
def test_a_damaged_or_foreign_library_gives_no_compiler(tmp_path, blob):
    path = tmp_path / "libggml-cpu.so"
    path.write_bytes(blob)
    assert native_build.elf_comment(path) == ()


def _tiny(path, *, q8_rows=64):
    """Two layers: Q4_0 ffn_up (AMX takes it, no padding), Q8_0 attn_q (AMX adds 4 bytes per 32-weight block),
    an F16 token embedding (never AMX)."""
    pytest.importorskip("gguf")
    from test_planner import write_tiny_gguf

    return write_tiny_gguf(path, q8_rows=q8_rows)


def test_the_planner_counts_the_amx_layout(tmp_path):
    from edgemed.devices import get_profile
    from edgemed.runtime.plan import estimate, make_plan, read_shape

    s = read_shape(_tiny(tmp_path / "tiny.gguf"))
    q4, q8 = 2 * 128 * 2 * 18, 2 * 64 * 2 * 34
    assert (s.amx_bytes, s.amx_extra_bytes) == (q4 + q8, 2 * 64 * 2 * 4)
    read, mapped = estimate(s, 1024, use_mmap=False, amx=True), estimate(s, 1024, use_mmap=True, amx=True)
    assert read.weights - estimate(s, 1024, use_mmap=False).weights == s.amx_extra_bytes and read.repacked == 0
    assert mapped.repacked == s.amx_bytes + s.amx_extra_bytes                # a copy beside the mapping
    assert estimate(s, 1024, offload=True, amx=True) == estimate(s, 1024, offload=True)
    # rows not a multiple of 32: AMX leaves the weight where it is
    odd = read_shape(_tiny(tmp_path / "odd.gguf", q8_rows=48))
    assert (odd.amx_bytes, odd.amx_extra_bytes) == (q4, 0)
    cpu = get_profile("x86-avx512")
    here = make_plan(tmp_path / "tiny.gguf", cpu, None, requested_ctx=256, budget=1 << 30, gpu=False, amx=True)
    assert here.estimate.weights == s.weights_bytes + s.amx_extra_bytes
    none = replace(cpu, llama=dict(cpu.llama, extra_buffers="none"))
    assert make_plan(tmp_path / "tiny.gguf", none, None, requested_ctx=256, budget=1 << 30, gpu=False, amx=True).estimate.weights \
        == s.weights_bytes
