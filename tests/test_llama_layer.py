"""The one llama.cpp layer, host-safe extra buffers, and the self-test that survives a native crash."""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgemed.errors import InputError, ModelLoadError
from edgemed.formats.gguf_header import TensorInfo
from edgemed.runtime import buffers, selftest
from edgemed.runtime.engine import LoadSettings

ROOT = Path(__file__).resolve().parents[1]
AVX2_BUILD = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | AVX512 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
# What a native (-DGGML_NATIVE=ON) build prints on a Sapphire Rapids Xeon (AWS m7i)
AMX_BUILD = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
             "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | "
             "OPENMP = 1 | REPACK = 1 | ")
SPR_CPUINFO = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\n"
               "flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n")


def test_only_the_layer_loads_models_or_creates_contexts():
    """No module but runtime/llamacpp.py loads a GGUF, creates a context or uses llama-cpp-python's generators."""
    forbidden = re.compile(r"\bLlama\(|llama_model_load_from_file|llama_init_from_model|create_chat_completion|"
                           r"create_completion\(")
    layer = ROOT / "edgemed" / "runtime" / "llamacpp.py"
    offenders = []
    for folder in ("edgemed", "converters", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            if path != layer and forbidden.search(path.read_text(encoding="utf-8")):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
    assert "llama_model_load_from_file" in layer.read_text(encoding="utf-8")


def test_the_layer_holds_no_policy_and_the_loader_consults_the_self_test(monkeypatch, smollm2_gguf):
    """``llamacpp`` loads exactly what it is given (no self-test, no cache, no child process); the one
    loader above it asks the self-test first and loads with the settings it returns."""
    import ast

    from edgemed.runtime import llamacpp, loader

    tree = ast.parse((ROOT / "edgemed" / "runtime" / "llamacpp.py").read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {"selftest", "verdicts", "subprocess", "edgemed.runtime.selftest", "edgemed.runtime.verdicts"} & imported
    assert "cache_dir" not in (ROOT / "edgemed" / "runtime" / "llamacpp.py").read_text(encoding="utf-8")

    asked = []
    monkeypatch.setattr(selftest, "ensure", lambda path, load, tensors=None: asked.append(load) or
                        replace(load, extra_buffers="none"))
    model = loader.load_model(smollm2_gguf, LoadSettings(n_ctx=128, n_threads=1, extra_buffers="all"))
    try:
        assert [a.extra_buffers for a in asked] == ["all"]
        assert model.load.extra_buffers == "none" and model.placement.mode == "none"
    finally:
        model.close()
    asked.clear()
    direct = llamacpp.Model(smollm2_gguf, LoadSettings(n_ctx=128, n_threads=1, extra_buffers="none"))
    direct.close()
    assert asked == []  # the layer itself never runs the self-test


# -- host-safe settings as data -------------------------------------------------------------------
def test_auto_keeps_amx_builds_off_the_amx_buffer():
    assert buffers.Build(AMX_BUILD).has_amx and not buffers.Build(AVX2_BUILD).has_amx
    assert buffers.resolve("auto", buffers.Build(AMX_BUILD)) == "repack"
    assert buffers.resolve("auto", buffers.Build(AVX2_BUILD)) == "all"
    for mode in ("all", "repack", "none"):
        assert buffers.resolve(mode, buffers.Build(AMX_BUILD)) == mode
    with pytest.raises(InputError, match="extra_buffers"):
        buffers.resolve("amx", buffers.Build(AVX2_BUILD))


def test_cpu_flags_of_a_sapphire_rapids_fixture(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(SPR_CPUINFO)
    flags = selftest.cpu_flags(info)
    assert {"amx_int8", "amx_tile", "avx512f"} <= flags
    assert selftest.cpu_flags(tmp_path / "missing") == frozenset()


def test_only_weights_the_repack_kernels_take_are_pinned():
    feats = buffers.Build(AVX2_BUILD).features
    tensors = [TensorInfo("token_embd.weight", "Q4_K", 0, 0, (896, 151936)),       # get_rows too: never
               TensorInfo("blk.0.ffn_up.weight", "Q4_K", 0, 0, (896, 4864)),
               TensorInfo("blk.0.attn_q.weight", "Q4_0", 0, 0, (896, 896)),
               TensorInfo("blk.0.attn_k.weight", "Q4_0", 0, 0, (896, 130)),         # rows not a multiple of 8
               TensorInfo("blk.0.ffn_down.weight", "Q6_K", 0, 0, (4864, 896)),      # no x86 repack kernel
               TensorInfo("blk.0.attn_norm.weight", "F32", 0, 0, (896,)),
               TensorInfo("output.weight", "Q4_K", 0, 0, (896, 151936))]
    assert buffers.pinned_weights(tensors, feats) == ["blk.0.ffn_up.weight", "blk.0.attn_q.weight", "output.weight"]
    assert buffers.pinned_weights(tensors, frozenset({"SSE3"})) == []  # no AVX2: nothing is pinned


def test_only_layers_left_on_the_cpu_are_pinned():
    """An override outranks n_gpu_layers in llama.cpp: an offloaded layer's weights must never be pinned to the CPU."""
    feats = buffers.Build(AVX2_BUILD).features
    tensors = [TensorInfo(f"blk.{i}.ffn_up.weight", "Q4_K", 0, 0, (896, 4864)) for i in range(4)]
    tensors.append(TensorInfo("output.weight", "Q4_K", 0, 0, (896, 151936)))
    every = [t.name for t in tensors]
    assert buffers.pinned_weights(tensors, feats) == every  # CPU build: every layer is on the CPU
    assert buffers.pinned_weights(tensors, feats, n_gpu_layers=-1, gpu=False) == every  # no GPU device: same
    assert buffers.pinned_weights(tensors, feats, n_gpu_layers=-1, gpu=True) == []  # all offloaded
    assert buffers.pinned_weights(tensors, feats, n_gpu_layers=99, gpu=True) == []
    assert buffers.pinned_weights(tensors, feats, n_gpu_layers=0, gpu=True) == every
    # llama.cpp offloads the last n of the n_layer + 1 layers (the output layer counts as the last)
    assert buffers.pinned_weights(tensors, feats, n_gpu_layers=1, gpu=True) == every[:4]
    assert buffers.pinned_weights(tensors, feats, n_gpu_layers=3, gpu=True) == every[:2]
    assert [buffers.cpu_layers(28, n, True) for n in (-1, 0, 1, 29, 40)] == [0, 29, 28, 0, 0]
    assert buffers.cpu_layers(28, -1, False) == 29


def test_profiles_carry_the_setting():
    from edgemed.devices import get_profile
    from edgemed.devices.schema import validate
    from edgemed.errors import ProfileError

    data = get_profile("generic").to_dict()
    data = {k: v for k, v in data.items() if k != "source"}
    validate(dict(data, llama=dict(data["llama"], extra_buffers="none")), "t.toml")
    with pytest.raises(ProfileError, match="extra_buffers"):
        validate(dict(data, llama=dict(data["llama"], extra_buffers="amx")), "t.toml")


# -- the real layer ----------------------------------------------------------------------------
def _native_log(caplog, path, mode) -> tuple[str, list]:
    from edgemed.runtime import llamacpp

    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="edgemed.llama_cpp"):  # llama.cpp's log, routed through logging
        model = llamacpp.Model(path, LoadSettings(n_ctx=128, n_threads=1, extra_buffers=mode))
        ctx = llamacpp.Context(model, n_ctx=128)
        logits = ctx.eval(model.tokenize("Anaphylaxis is treated with", add_special=True))
        ctx.close()
        model.close()
    return caplog.text, logits


def test_repack_mode_keeps_cpu_repack_without_amx(caplog, q4_0_gguf):
    from edgemed.runtime.llamacpp import build

    if not {"REPACK", "AVX2"} <= build().features:
        pytest.skip("this llama.cpp build has no CPU_REPACK kernels for x86 (needs AVX2 and REPACK)")
    log_repack, repacked = _native_log(caplog, q4_0_gguf, "repack")
    log_none, plain = _native_log(caplog, q4_0_gguf, "none")
    assert "CPU_REPACK model buffer size" in log_repack and "AMX" not in log_repack
    assert "CPU_REPACK" not in log_none
    assert abs(repacked - plain).max() < 0.05 * abs(plain).max()  # same model, other kernel layout


def test_engine_reports_where_weights_went(smollm2_gguf):
    from edgemed.runtime.llama_engine import LlamaEngine

    with LlamaEngine(smollm2_gguf, LoadSettings(n_ctx=256, n_threads=1, extra_buffers="none")) as engine:
        assert engine.model.placement.mode == "none"
        assert engine.load.extra_buffers == "none"


# -- the self-test ------------------------------------------------------------------------------
def test_devices_check_reports_a_native_crash_as_one_paragraph(smollm2_gguf, monkeypatch, tmp_path):
    from edgemed.cli import cli

    monkeypatch.setenv("EDGEMED_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGEMED_FAULT", "selftest-crash:all")  # the child kills itself with SIGSEGV
    result = CliRunner().invoke(cli, ["devices", "check", str(smollm2_gguf), "--extra-buffers", "all"])
    assert result.exit_code == 1, result.output
    text = result.output
    assert "killed by SIGSEGV" in text and "extra_buffers = \"all\"" in text
    assert "llama-cpp-python" in text and "REPACK" in text               # the build info
    assert "extra_buffers = \"repack\" passes" in text and "$EDGEMED_PROFILES_DIR" in text
    assert "Traceback" not in text
    ok = CliRunner().invoke(cli, ["devices", "check", str(smollm2_gguf), "--extra-buffers", "none"])
    assert ok.exit_code == 0 and ok.output.startswith("ok:")


def _counting():
    calls = []

    def runner(path, load):
        calls.append(load.extra_buffers)
        return selftest.Verdict(load.extra_buffers != "all", load.extra_buffers, None if load.extra_buffers != "all" else "SIGSEGV")
    return calls, runner


def test_verdicts_are_cached_and_redone_when_build_flags_or_settings_change(smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMED_CACHE_DIR", str(tmp_path / "cache"))
    host = selftest.Host("0.3.36", AVX2_BUILD, ("avx2", "avx512f"))
    load = LoadSettings(extra_buffers="none")
    calls, runner = _counting()
    assert selftest.check(smollm2_gguf, load, host=host, runner=runner)[0][1].ok
    selftest.check(smollm2_gguf, load, host=host, runner=runner)
    assert calls == ["none"]                                                     # reused
    selftest.check(smollm2_gguf, load, host=replace(host, system_info=AMX_BUILD), runner=runner)
    selftest.check(smollm2_gguf, load, host=replace(host, cpu_flags=("amx_int8", "avx2")), runner=runner)
    selftest.check(smollm2_gguf, replace(load, flash_attn=True), host=host, runner=runner)
    selftest.check(smollm2_gguf, replace(load, n_threads=7), host=host, runner=runner)  # threads: same kernels
    assert calls == ["none"] * 4


def test_crashing_default_falls_back_to_safe_settings_and_says_so_once(smollm2_gguf, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("EDGEMED_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGEMED_FAULT", "selftest-crash:all")
    monkeypatch.delenv("EDGEMED_SELFTEST", raising=False)
    load = LoadSettings(n_ctx=256, n_threads=1, extra_buffers="all")
    with caplog.at_level(logging.WARNING, logger="edgemed"):
        first = selftest.ensure(smollm2_gguf, load)
        second = selftest.ensure(smollm2_gguf, load)                             # from the cache, no child
    assert first.extra_buffers == second.extra_buffers == "repack"
    notices = [r for r in caplog.records if "killed by SIGSEGV" in r.getMessage()]
    assert len(notices) == 1 and "uses extra_buffers = \"repack\"" in notices[0].getMessage()

    from edgemed.runtime.llama_engine import LlamaEngine

    with LlamaEngine(smollm2_gguf, load) as engine:                                # the engine takes the safe mode
        assert engine.load.extra_buffers == "repack"


def test_when_every_mode_crashes_loading_is_refused_clearly(smollm2_gguf, monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEMED_CACHE_DIR", str(tmp_path / "cache"))
    def crash(path, load):
        return selftest.Verdict(False, load.extra_buffers, "SIGSEGV")

    monkeypatch.setattr(selftest, "run_child", crash)
    with pytest.raises(ModelLoadError, match="killed by SIGSEGV") as info:
        selftest.ensure(smollm2_gguf, LoadSettings(extra_buffers="all"))
    assert "No extra-buffer setting passed" in str(info.value)


@pytest.mark.parametrize("verdict", [selftest.Verdict(False, "all", None, "ModelLoadError: llama.cpp could not load"),
                                     selftest.Verdict(False, "all", "SIGKILL", "")],   # the OOM killer's signal
                         ids=["load-error", "sigkill"])
def test_an_inconclusive_check_is_not_cached_and_does_not_switch_settings(smollm2_gguf, tmp_path, monkeypatch, verdict):
    """A file llama.cpp refuses, or a child the OOM killer took, says nothing about the host: no verdict is kept,
    no safer mode is tried, and the load in process reports the problem the usual way."""
    monkeypatch.setenv("EDGEMED_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def runner(path, load):
        calls.append(load.extra_buffers)
        return verdict

    monkeypatch.setattr(selftest, "run_child", runner)
    load = LoadSettings(extra_buffers="all")
    assert selftest.ensure(smollm2_gguf, load).extra_buffers == "all"
    assert selftest.ensure(smollm2_gguf, load).extra_buffers == "all"
    assert calls == ["all", "all"]                                                # asked again: nothing was cached
    assert not (tmp_path / "cache" / "selftest" / "verdicts.json").exists()


def test_devices_check_tells_a_failed_load_from_a_crash(smollm2_gguf, tmp_path, monkeypatch):
    """A child that exits with an error (not a signal) is reported as such: no crash paragraph, no fallback."""
    from edgemed.cli import cli

    monkeypatch.setenv("EDGEMED_CACHE_DIR", str(tmp_path / "cache"))
    failed = selftest.Verdict(False, "all", None, "ModelLoadError: llama.cpp could not load 'x.gguf'.")
    monkeypatch.setattr(selftest, "run_child", lambda path, load: failed)
    result = CliRunner().invoke(cli, ["devices", "check", str(smollm2_gguf), "--extra-buffers", "all"])
    assert result.exit_code == 1, result.output
    assert "This is not a crash of llama.cpp" in result.output and "could not load 'x.gguf'" in result.output
    assert "killed by" not in result.output and "Traceback" not in result.output


def test_plain_greedy_reads_the_argmax_and_picks_what_llama_cpp_picks(smollm2_gguf):
    """The plain greedy chain skips llama_sampler_sample's whole-vocabulary candidate array; it must pick
    the same token at every row of a batch, and any chain with state (penalty, grammar) must not skip it."""
    from edgemed.runtime import llamacpp
    from edgemed.runtime.engine import GenerationSettings

    model = llamacpp.Model(smollm2_gguf, LoadSettings(n_ctx=256, n_threads=1))
    ctx = llamacpp.Context(model, n_ctx=256)
    batch = llamacpp.Batch(model.lib, 64)
    try:
        tokens = model.tokenize("A patient with chest pain and ST elevation should receive", add_special=True)
        for i, tok in enumerate(tokens):
            batch.add(tok, i, 0, True)
        assert ctx.decode(batch) == 0
        fast = llamacpp.SamplerChain(model, GenerationSettings())
        penalized = llamacpp.SamplerChain(model, GenerationSettings(repeat_penalty=1.3))
        grammar = llamacpp.SamplerChain(model, GenerationSettings(grammar='root ::= "yes" | "no"'))
        assert fast._n_vocab == model.n_vocab and penalized._n_vocab == 0 and grammar._n_vocab == 0
        picks = [fast.sample(ctx, i) for i in range(len(tokens))]
        fast._n_vocab = 0  # the chain itself, through llama_sampler_sample
        assert picks == [fast.sample(ctx, i) for i in range(len(tokens))]
        assert len(set(picks)) > 3  # different rows, different tokens: the rows were really read
        for chain in (fast, penalized, grammar):
            chain.close()
    finally:
        batch.close()
        ctx.close()
        model.close()


def test_plain_greedy_on_a_row_without_logits_is_an_error_not_a_crash(smollm2_gguf):
    from edgemed.runtime import llamacpp
    from edgemed.runtime.engine import GenerationSettings

    model = llamacpp.Model(smollm2_gguf, LoadSettings(n_ctx=128, n_threads=1))
    ctx = llamacpp.Context(model, n_ctx=128)
    batch = llamacpp.Batch(model.lib, 16)
    chain = llamacpp.SamplerChain(model, GenerationSettings())
    try:
        for i, tok in enumerate(model.tokenize("Sepsis is", add_special=True)):
            batch.add(tok, i, 0, False)  # no row asks for logits
        assert ctx.decode(batch) == 0
        with pytest.raises(RuntimeError, match="no logits"):
            chain.sample(ctx, 0)
    finally:
        chain.close()
        batch.close()
        ctx.close()
        model.close()


def test_a_decode_given_up_removes_its_cells_and_the_callback_is_cleared(smollm2_gguf):
    """``Context.decode_unless`` reaches llama.cpp's abort callback: a call whose ``stop`` turns true after a few
    graph nodes returns 2, far sooner than the whole call, with its batch's cells gone and the earlier ones kept;
    the same rows then decode normally, and a later plain decode no longer asks the callback."""
    from edgemed.runtime import llamacpp

    model = llamacpp.Model(smollm2_gguf, LoadSettings(n_ctx=512, n_threads=1, n_batch=128, n_ubatch=128))
    ctx = llamacpp.Context(model, n_ctx=512, n_seq_max=2, kv_unified=False)
    batch = llamacpp.Batch(ctx.lib, 128)
    try:
        ids = model.tokenize("Sepsis is a life-threatening organ dysfunction caused by infection. " * 12)[:96]
        batch.clear()
        for i, t in enumerate(ids[:32]):
            batch.add(t, i, 1, False)
        assert ctx.decode(batch) == 0
        batch.clear()
        for i, t in enumerate(ids[32:]):
            batch.add(t, 32 + i, 1, False)
        asked = []
        assert ctx.decode_unless(batch, lambda: asked.append(1) or len(asked) > 3) == 2
        given_up = len(asked)
        assert given_up == 4  # asked before each node until true, then no more: no node computed after it
        assert ctx.lib.llama_memory_seq_pos_max(ctx.memory, 1) == 31  # the given-up call's cells are removed
        assert ctx.decode(batch) == 0 and ctx.lib.llama_memory_seq_pos_max(ctx.memory, 1) == 95
        asked.clear()
        ctx.trim(1, 32)
        assert ctx.decode_unless(batch, lambda: asked.append(1) or False) == 0  # asked once a node
        n = len(asked)
        assert n > 25 * given_up  # the given-up call stopped after 4 of the whole call's nodes: far sooner
        ctx.trim(1, 32)
        assert ctx.decode(batch) == 0 and len(asked) == n  # cleared after the call
    finally:
        batch.close()
        ctx.close()
        model.close()


def test_a_crash_is_kept_for_the_file_that_crashed_not_for_every_file_of_its_types(smollm2_gguf, tmp_path, monkeypatch):
    """A verdict was keyed by host, settings and weight types only: one damaged or hostile GGUF's native crash was
    then a fact about every model of its types, refused without a child until `devices check` ran again."""
    import shutil

    monkeypatch.setenv("EDGEMED_CACHE_DIR", str(tmp_path / "cache"))
    bad, good = tmp_path / "bad.gguf", tmp_path / "good.gguf"
    shutil.copyfile(smollm2_gguf, bad)
    shutil.copyfile(smollm2_gguf, good)
    host = selftest.Host("0.3.36", AVX2_BUILD, ("avx2",))
    load = LoadSettings(extra_buffers="none")
    calls = []

    def runner(path, load):
        calls.append(path.name)
        return selftest.Verdict(path.name != "bad.gguf", load.extra_buffers, None if path.name != "bad.gguf" else "SIGSEGV")

    def ok(path):
        return selftest.check(path, load, host=host, runner=runner, fallback=False)[0][1].ok

    assert not ok(bad) and not ok(bad) and calls == ["bad.gguf"]  # kept for that file
    with bad.open("ab") as fh:  # changed since: another file as far as its crash goes
        fh.write(b"\0")
    assert not ok(bad) and calls == ["bad.gguf"] * 2
    assert ok(good) and ok(good) and calls == ["bad.gguf"] * 2 + ["good.gguf"]  # not refused for bad's crash


def test_a_generation_never_feeds_its_last_token(smollm2_gguf):
    """A generation that sampled its ``max_tokens`` fed the last token too: a llama_decode whose logits no one read,
    a whole step per request. Each sampled token but the last is fed once, the cells end before the last, the greedy
    text is the one a longer generation starts with, and a next call on these cells answers as a cold one."""
    from edgemed.runtime import llamacpp
    from edgemed.runtime.engine import GenerationSettings
    from edgemed.runtime.llama_engine import LlamaEngine

    def run(engine, tokens, max_tokens, reuse):
        stream = llamacpp.generate(engine.model, engine.ctx, tokens, GenerationSettings(max_tokens=max_tokens),
                                   reuse=reuse)
        pieces = []
        while True:
            try:
                pieces.append(next(stream))
            except StopIteration as end:
                return "".join(pieces), end.value

    load = LoadSettings(n_ctx=512, n_threads=1)
    with LlamaEngine(smollm2_gguf, load) as engine, LlamaEngine(smollm2_gguf, load) as cold:
        messages = [{"role": "user", "content": "Name three symptoms of anaemia."}]
        prompt = engine.tokenize(engine.render_chat(messages), add_special=True, parse_special=True)
        fed, real = [], engine.ctx.eval
        engine.ctx.eval = lambda tokens, n_past=0, **kw: fed.append((len(tokens), n_past)) or real(tokens, n_past, **kw)
        text, finish = run(engine, prompt, 8, reuse=False)
        del engine.ctx.eval
        assert (finish.reason, finish.tokens) == ("length", 8)
        n = len(prompt)
        assert fed == [(n, 0)] + [(1, n + i) for i in range(7)], fed  # sampled tokens 1..7 fed, the 8th never
        assert engine.ctx.lib.llama_memory_seq_pos_max(engine.ctx.memory, 0) == n + 6  # the last cell: position n + 6
        assert run(cold, prompt, 16, reuse=False)[0].startswith(text) and text.strip()
        # the next turn keeps the prompt's cells and answers as a cold run of the whole conversation
        after = engine.tokenize(engine.render_chat([*messages, {"role": "assistant", "content": text},
                                                    {"role": "user", "content": "And one cause?"}]),
                                add_special=True, parse_special=True)
        assert run(engine, after, 12, reuse=True)[0] == run(cold, after, 12, reuse=False)[0]
