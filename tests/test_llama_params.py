"""Every setting the llama.cpp layer hands to native code reaches it: named fields only, read back, and
checked on the native side (llama.cpp's getters, the process's own mappings, llama.cpp's log)."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import textwrap

import pytest

from edgemed.runtime.engine import LoadSettings
from edgemed.runtime.params import Params


class _Struct(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int32), ("flag", ctypes.c_bool), ("ptr", ctypes.c_void_p)]


def test_a_field_the_struct_does_not_have_is_refused():
    p = Params(_Struct())
    p.n, p.flag = 7, True
    p.ptr = ctypes.c_void_p(1234)
    assert p.raw.n == 7 and p.raw.flag is True and p.written == {"n": 7, "flag": True, "ptr": 1234}
    with pytest.raises(AttributeError, match="no field 'use_mmap'"):
        p.use_mmap = False
    with pytest.raises(ValueError, match="reads back"):
        p.n = 2**40  # truncated by the C type: not what was asked


def test_the_old_mmap_fields_are_gone_from_llama_cpp():
    """The regression itself: llama-cpp-python's struct took ``use_mmap`` silently; through Params it cannot."""
    llama_cpp = pytest.importorskip("llama_cpp")
    raw = llama_cpp.llama_model_default_params()
    raw.use_mmap = False  # what the layer used to do: accepted without a word, never read by llama.cpp
    assert "use_mmap" not in {f[0] for f in type(raw)._fields_}
    with pytest.raises(AttributeError):
        Params(llama_cpp.llama_model_default_params()).use_mmap = False


@pytest.mark.parametrize("mmap,mlock,mode", [(True, False, "MMAP"), (False, False, "NONE"),
                                               (False, True, "MLOCK"), (True, True, "MMAP_MLOCK")])
def test_mmap_and_mlock_become_llama_cpps_load_mode(mmap, mlock, mode):
    llama_cpp = pytest.importorskip("llama_cpp")
    from edgemed.runtime.params import load_mode

    assert load_mode(llama_cpp, LoadSettings(use_mmap=mmap, use_mlock=mlock)) == getattr(llama_cpp, f"LLAMA_LOAD_MODE_{mode}")


def _lock_limited() -> bool:
    """Whether this process may lock less than a small model (not root, a low ``ulimit -l``)."""
    import os
    import resource

    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    return os.geteuid() != 0 and soft != resource.RLIM_INFINITY and soft < 512 << 20


def test_mlock_is_read_back_from_the_locked_memory(q4_0_gguf, caplog, monkeypatch):
    """``use_mlock`` reached llama.cpp (its load mode), and nothing said whether it did anything: llama.cpp locks the
    file's buffer and not its CPU_REPACK copy (29 of a Q4_0 SmolLM2's 86 MiB locked), and a locked-memory limit
    it hits is a log line shown only at -v."""
    from edgemed.runtime import llamacpp

    if llamacpp.locked_bytes() is None:
        pytest.skip("the kernel does not report locked memory here (VmLck: Linux only)")
    caplog.set_level("WARNING", logger="edgemed.runtime.llamacpp")

    def load(buffers: str):
        caplog.clear()
        before = llamacpp.locked_bytes()
        model = llamacpp.Model(q4_0_gguf, LoadSettings(use_mlock=True, use_mmap=False, extra_buffers=buffers))
        try:
            return model.placement.seen, llamacpp.locked_bytes() - before, [r.getMessage() for r in caplog.records]
        finally:
            model.close()

    seen, grew, said = load("none")
    if _lock_limited():  # the limit stops llama.cpp: said, with the fix
        assert any("could not lock" in m and "ulimit -l" in m for m in said), said
    else:  # all of it locked, and nothing to say
        assert grew >= seen["CPU"] * (1 << 20) * 0.98 and not said, (seen, grew, said)
    seen, grew, said = load("repack")
    if "CPU_REPACK" not in seen:
        pytest.skip(f"this llama.cpp build repacks no Q4_0 weights ({seen})")
    if not _lock_limited():
        assert grew < (seen["CPU"] + seen["CPU_REPACK"]) * (1 << 20) * 0.98  # the copy is not locked
        assert any("not locked" in m and "CPU_REPACK" in m and 'extra_buffers = "none"' in m for m in said), said
    monkeypatch.setattr(llamacpp, "MLOCK_FAILED", r"model buffer size")  # as if llama.cpp had said it failed
    _, _, said = load("none")
    assert any(f"could not lock {q4_0_gguf.name}" in m for m in said), said


def test_a_context_off_the_256_grid_stops_where_it_was_asked(smollm2_gguf):
    """llama.cpp pads a context to 256 cells (1,000 asked: 1,024 made); the engine took the padded size as its limit,
    so a model planned at its whole trained context of 1,000 tokens could read positions 1,000-1,023."""
    from edgemed.runtime import llamacpp

    load = LoadSettings(n_ctx=1000, n_threads=1)
    model = llamacpp.Model(smollm2_gguf, load)
    ctx = llamacpp.Context(model, load, n_seq_max=2)
    try:
        assert model.lib.llama_n_ctx(ctx.ptr) == 1024  # what llama.cpp made
        assert (ctx.n_ctx, ctx.n_ctx_seq) == (1000, 500)  # the limits every prompt is checked against
    finally:
        ctx.close()
        model.close()


def test_every_field_set_reads_back_from_the_struct_and_from_llama_cpp(smollm2_gguf, caplog):
    """The struct's fields, llama.cpp's getters, and where it has none (flash attention, the KV cache types) its own
    lines for the context, watched at the CLI's default verbosity (llama.cpp's INFO lines are not shown there)."""
    from edgemed.runtime import llamacpp

    caplog.set_level("WARNING", logger="edgemed.llama_cpp")
    load = LoadSettings(n_ctx=512, n_threads=1, n_threads_batch=2, n_batch=256, n_ubatch=128, use_mmap=False,
                        extra_buffers="none", flash_attn=True, type_k="q8_0", type_v="q8_0")
    model = llamacpp.Model(smollm2_gguf, load)
    ctx = llamacpp.Context(model, load, n_seq_max=2)
    try:
        assert ctx.said == {"flash_attn": "enabled", "kv": [("q8_0", "q8_0")]}  # what llama.cpp says it made
        assert ctx.params.written["flash_attn_type"] == model.lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        assert ctx.params.written["type_k"] == ctx.params.written["type_v"] == 8  # GGML_TYPE_Q8_0
        lc = model.lib
        for params in (model.params, ctx.params):
            assert params.written, "nothing recorded"
            for name, value in params.written.items():
                got = getattr(params.raw, name)
                assert (got.value if isinstance(got, ctypes._SimpleCData) else got) == value, name
        assert model.params.written["load_mode"] == lc.LLAMA_LOAD_MODE_NONE
        assert model.params.written["use_extra_bufts"] is False
        # what llama.cpp itself reports for the context
        assert lc.llama_n_ctx(ctx.ptr) == 512 and lc.llama_n_batch(ctx.ptr) == 256 and lc.llama_n_ubatch(ctx.ptr) == 128
        assert lc.llama_n_seq_max(ctx.ptr) == 2
        assert lc.llama_n_threads(ctx.ptr) == 1 and lc.llama_n_threads_batch(ctx.ptr) == 2
    finally:
        ctx.close()
        model.close()


def test_a_context_llama_cpp_made_otherwise_is_refused(smollm2_gguf, monkeypatch):
    """llama.cpp overrules a context's flash attention on its own (off for Grok) and says so only in its log: a
    context whose lines contradict the settings is freed and refused, not used."""
    from edgemed.errors import ModelLoadError
    from edgemed.runtime import llamacpp

    load = LoadSettings(n_ctx=256, n_threads=1, extra_buffers="none")
    said = {"flash_attn": "enabled", "kv": [("f16", "f16"), ("q8_0", "f16")]}
    assert llamacpp.context_unread(said, load) == ("flash_attn enabled (edgemed set it disabled); a KV cache of K q8_0 "
                                                   "and V f16 (edgemed set K f16 and V f16)")
    assert llamacpp.context_unread({"flash_attn": None, "kv": []}, load) is None  # nothing said: nothing to hold to
    model = llamacpp.Model(smollm2_gguf, load)
    try:
        freed = []
        # llama.cpp's "kv_unified = true" read as its flash attention line, as if it had turned it on
        monkeypatch.setattr(llamacpp, "CONTEXT_LINE", r"^llama_context: kv_unified += (?P<flash_attn>\w+)(?P<k>)(?P<v>)")
        monkeypatch.setattr(model.lib, "llama_free", lambda ptr, free=model.lib.llama_free: freed.append(ptr) or free(ptr))
        with pytest.raises(ModelLoadError, match="with flash_attn true \\(edgemed set it disabled\\)"):
            llamacpp.Context(model, load)
        assert len(freed) == 1
    finally:
        model.close()


_RESIDENT = textwrap.dedent("""
    import json, sys
    from edgemed.runtime.engine import LoadSettings
    from edgemed.runtime.llamacpp import Context, Model
    path, mmap = sys.argv[1], sys.argv[2] == "mmap"
    model = Model(path, LoadSettings(n_ctx=256, n_threads=1, use_mmap=mmap, extra_buffers="auto"))
    ctx = Context(model, n_ctx=256)
    ctx.eval(model.tokenize("Anaphylaxis is treated with", add_special=True))
    mapped = rss = 0
    inside = False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:   # a mapping's first line
                inside = line.rstrip().endswith(path)
                mapped += inside
            elif inside and line.startswith("Rss:"):
                rss += int(head[1]) * 1024
    print(json.dumps({"mappings": mapped, "file_rss": rss, "placement": model.placement.describe()}))
""")


def _resident(path, mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _RESIDENT, str(path), mode], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_no_mmap_load_holds_repacked_weights_once(q4_0_gguf):
    """With the CPU repack on, a mapped load keeps the file's pages of every repacked tensor resident beside the
    interleaved copy; the profiles' ``use_mmap = false`` must reach llama.cpp so that the file is not mapped at all.
    The load uses ``auto``, what the profiles use: on an AMX build that is CPU_REPACK alone (llama.cpp's own default,
    ``all``, would put the weights in the AMX buffer, whose first decode segfaults there)."""
    from edgemed.formats.gguf_header import read_header
    from edgemed.runtime.buffers import pinned_weights
    from edgemed.runtime.llamacpp import build

    tensors = read_header(q4_0_gguf).tensors
    pinned = set(pinned_weights(tensors, build().features))
    repackable = sum(t.n_bytes for t in tensors if t.name in pinned)
    if not repackable:
        pytest.skip("this llama.cpp build repacks none of the Q4_0 weights (no CPU_REPACK kernels for this CPU)")
    mapped = _resident(q4_0_gguf, "mmap")
    assert mapped["mappings"] >= 1 and mapped["file_rss"] > repackable // 2  # the mechanism the test guards against
    unmapped = _resident(q4_0_gguf, "no-mmap")
    assert unmapped["mappings"] == 0 and unmapped["file_rss"] == 0, unmapped


def test_llama_cpp_log_stays_off_the_terminal_by_default(smollm2_gguf):
    """llama.cpp's warnings (levels mis-mapped by llama-cpp-python's own callback) print nothing at the CLI's
    default verbosity, and show with -v."""
    code = textwrap.dedent("""
        import logging, sys
        logging.basicConfig(level=logging.WARNING - 10 * int(sys.argv[2]))
        from edgemed.runtime.engine import LoadSettings
        from edgemed.runtime.llamacpp import Context, Model
        model = Model(sys.argv[1], LoadSettings(n_ctx=256, n_threads=1))
        ctx = Context(model, n_ctx=256)
        model.lib.llama_log_set  # the route is installed
        from edgemed.runtime import native_log
        native_log._on_log(3, b"a llama.cpp warning, ", None)
        native_log._on_log(5, b"continued\\n", None)
    """)
    quiet = subprocess.run([sys.executable, "-c", code, str(smollm2_gguf), "0"], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stderr == "" and quiet.stdout == ""
    loud = subprocess.run([sys.executable, "-c", code, str(smollm2_gguf), "1"], capture_output=True, text=True, timeout=120)
    assert "INFO:edgemed.llama_cpp:a llama.cpp warning, continued" in loud.stderr


def test_run_and_plan_print_no_llama_cpp_line_at_default_verbosity(smollm2_gguf, tmp_path):
    import os

    env = {**os.environ, "EDGEMED_CACHE_DIR": str(tmp_path / "cache")}  # a fresh cache: the self-test child runs too
    for args in (["plan", str(smollm2_gguf)],
                 ["run", str(smollm2_gguf), "--prompt", "Anaphylaxis is", "--max-tokens", "2", "--ctx", "512", "--threads", "1"]):
        proc = subprocess.run([sys.executable, "-m", "edgemed", *args], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        # nothing but run's own notice that its 2-token reply was cut (edgemed's line, not llama.cpp's)
        assert proc.stderr in ("", "(cut at --max-tokens 2)\n"), proc.stderr[-2000:]


def test_bench_mmap_configuration_loads_the_same_file_mapped(smollm2_gguf, tmp_path):
    """``--quants q4_k_m-mmap``: the reproduction's baseline of a read-in load is the same file, mapped."""
    import llama_cpp

    from edgemed.benchmarks.harness.artifacts import parse_quants
    from edgemed.benchmarks.harness.timing import open_gguf

    assert parse_quants("f16,q4_k_m,q4_k_m-mmap,q4_0-imatrix") == ["f16", "q4_k_m", "q4_k_m-mmap", "q4_0-imatrix"]
    modes = {}
    for use_mmap in (None, True):
        timed = open_gguf(smollm2_gguf, 1, 256, "x86-avx2", 0, use_mmap=use_mmap)
        try:
            modes[use_mmap] = timed.settings()["load_mode"]
        finally:
            timed.close()
    assert modes == {None: llama_cpp.LLAMA_LOAD_MODE_NONE, True: llama_cpp.LLAMA_LOAD_MODE_MMAP}  # x86 profiles read in
