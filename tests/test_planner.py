"""Memory planner: shape reading from a GGUF tensor table, the KV/compute formulas, context choice,
refusal before loading, the `edgemed plan` command, and (slow) prediction vs measured RSS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgemed.cli import cli
from edgemed.devices import get_profile
from edgemed.errors import PlanError
from edgemed.runtime.plan import MIB, choose_context, estimate, kv_cache_bytes, profile_settings, read_shape

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")


def write_tiny_gguf(path: Path, *, n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, n_vocab=100, ctx=2048,
                    q8_rows: int | None = None, q8_embd: bool = False, output: bool = False):
    """A llama-shaped GGUF with real tensor-table entries (F32, F16 and Q4_0 blocks; with ``q8_rows``, a Q8_0
    attn_q of that many rows per layer too). Its token embedding is F16 (Q8_0 with ``q8_embd``) and tied: there is
    no output.weight unless ``output`` (F16)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_context_length(ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_vocab_size(n_vocab)
    if q8_embd:
        w.add_tensor("token_embd.weight", np.zeros((n_vocab, n_embd // 32 * 34), dtype=np.uint8),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        w.add_tensor("token_embd.weight", np.zeros((n_vocab, n_embd), dtype=np.float16))
    if output:
        w.add_tensor("output.weight", np.zeros((n_vocab, n_embd), dtype=np.float16))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        # Q4_0: 32 weights per 18-byte block; byte shape (rows, cols / 32 * 18)
        w.add_tensor(f"blk.{i}.ffn_up.weight", np.zeros((n_ff, n_embd // 32 * 18), dtype=np.uint8),
                     raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        if q8_rows:  # Q8_0: 32 weights per 34-byte block
            w.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((q8_rows, n_embd // 32 * 34), dtype=np.uint8),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def test_read_shape_from_tensor_table(tiny):
    s = read_shape(tiny)
    assert (s.arch, s.n_layer, s.n_embd, s.n_head, s.n_head_kv, s.head_dim_k, s.n_ff, s.n_vocab, s.n_ctx_train) == \
        ("llama", 2, 64, 4, 2, 16, 128, 100, 2048)
    q4 = 2 * 128 * (64 // 32) * 18
    assert s.weights_bytes == 100 * 64 * 2 + 2 * 64 * 4 + q4
    assert s.repackable_bytes == q4


def test_fast_header_reader_agrees_with_gguf_reader(tiny):
    from edgemed.formats.gguf_header import read_header

    ours = read_header(tiny)
    theirs = gguf.GGUFReader(str(tiny))
    assert [(t.name, t.type_name, t.n_elements, t.n_bytes) for t in ours.tensors] == \
        [(t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes)) for t in theirs.tensors]
    for key in ("general.architecture", "llama.block_count", "llama.embedding_length", "llama.attention.head_count_kv"):
        assert ours.metadata[key] == theirs.fields[key].contents()


def test_real_model_weights_match_llama_cpp_mapped_buffer(smollm2_gguf):
    """llama.cpp 0.3.36 reports "CPU_Mapped model buffer size = 92.10 MiB" for this file."""
    s = read_shape(smollm2_gguf)
    assert round(s.weights_bytes / MIB, 2) == 92.10
    assert (s.n_layer, s.n_head, s.n_head_kv, s.n_vocab) == (30, 9, 3, 49152)


def test_repacked_copy_counts_only_with_mmap_on_cpu(tiny):
    s = read_shape(tiny)
    mapped, read = estimate(s, 1024), estimate(s, 1024, use_mmap=False)
    assert mapped.repacked == s.repackable_bytes > 0 and read.repacked == 0
    assert mapped.total - read.total == s.repackable_bytes
    assert estimate(s, 1024, offload=True).repacked == 0


def test_a_gpu_profile_on_a_cpu_only_build_counts_the_repacked_copy(tiny):
    """With a CPU-only llama.cpp, a Jetson profile's offload never happens: the weights stay on the CPU, mapped, with
    the repacked copy beside them (1,771 MiB measured against 1,492 planned on the 1.5B). A plan for this machine
    asks the build; a plan for the device itself keeps the profile's word."""
    from edgemed.runtime.plan import make_plan

    jetson = get_profile("jetson-orin-nano-8gb")
    on_device = make_plan(tiny, jetson, None, requested_ctx=256)
    here = make_plan(tiny, jetson, None, requested_ctx=256, gpu=False)
    assert read_shape(tiny).repackable_bytes > 0
    assert on_device.estimate.repacked == 0 and here.estimate.repacked == read_shape(tiny).repackable_bytes
    llama_cpp = pytest.importorskip("llama_cpp")
    if not llama_cpp.llama_supports_gpu_offload():  # this machine: `run --profile jetson-...` plans as it will load
        from edgemed.runtime.session import prepare

        assert prepare(tiny, "jetson-orin-nano-8gb", n_ctx=256).plan.estimate.repacked == here.estimate.repacked


def test_a_tied_output_copy_is_counted_in_the_buffer_that_takes_it(tmp_path):
    """Without output.weight llama.cpp gives the output layer a copy of token_embd in the extra buffer that takes it
    (extra buffers ``all``): AMX in its layout, else CPU_REPACK where the build repacks the type; token_embd stays
    in a plain buffer. The plan had counted it once (32 MiB under on SmolLM2's AMX buffer)."""
    tied = read_shape(write_tiny_gguf(tmp_path / "tied.gguf", n_vocab=128, q8_embd=True))
    q8 = 128 * 2 * 34
    neon = frozenset({"NEON", "DOTPROD"})
    assert tied.tied_embd == ("Q8_0", (64, 128), q8)
    assert tied.tied_output_bytes(amx=True) == q8 + 128 * 2 * 4                  # AMX: 4 bytes a block more
    assert tied.tied_output_bytes(neon) == q8 and tied.tied_output_bytes() == 0  # NEON repacks Q8_0, AVX2 does not
    base = estimate(tied, 1024, use_mmap=False, features=neon, extra_buffers="none")
    assert tied.amx_extra_bytes == 0  # its layer weights are Q4_0: the AMX layout adds nothing to them
    for mode, amx, copy in (("all", True, q8 + 1024), ("all", False, q8), ("repack", True, 0), ("none", False, 0)):
        for mmap in (False, True):  # a copy whether the file is mapped or read in
            e = estimate(tied, 1024, use_mmap=mmap, features=neon, amx=amx, extra_buffers=mode)
            beside = max(tied.repack_bytes(neon), tied.amx_bytes * amx) if mmap and mode != "none" else 0
            assert (e.repacked - beside, e.weights) == (copy, base.weights), (mode, amx, mmap)
    assert estimate(tied, 1024, features=neon, offload=True).repacked == 0
    untied = read_shape(write_tiny_gguf(tmp_path / "untied.gguf", n_vocab=128, q8_embd=True, output=True))
    assert untied.tied_embd is None and untied.tied_output_bytes(neon, amx=True) == 0
    odd = read_shape(write_tiny_gguf(tmp_path / "odd.gguf", n_vocab=98, q8_embd=True))  # 98 rows: neither takes it
    assert odd.tied_output_bytes(neon, amx=True) == 0


@pytest.mark.parametrize("mode", ["all", "repack", "none"])
def test_weight_buffers_match_what_llama_cpp_reports(q4_0_gguf, mode):
    """The weights and copies planned for each extra-buffer mode are the buffers llama.cpp reports allocating (read
    back: ``Placement.seen``), with this build's features. SmolLM2 ties its Q8_0 token_embd: an AMX build copies it
    into its AMX buffer with ``all`` (117.84 MiB reported, 85.77 planned before the copy was counted)."""
    pytest.importorskip("llama_cpp")
    from edgemed.runtime.engine import LoadSettings
    from edgemed.runtime.llamacpp import Model, build

    features = build().features
    model = Model(q4_0_gguf, LoadSettings(n_ctx=512, n_threads=2, use_mmap=False, extra_buffers=mode))
    try:
        seen = model.placement.seen
    finally:
        model.close()
    assert seen, "llama.cpp's buffer lines were not read back"
    e = estimate(read_shape(q4_0_gguf), 512, use_mmap=False, features=features, extra_buffers=mode,
                 amx=mode == "all" and "AMX_INT8" in features)
    assert (e.weights + e.repacked) / MIB == pytest.approx(sum(seen.values()), abs=0.05), seen


def test_repacked_types_follow_the_cpu_features(tmp_path):
    """Which weights get a repacked copy beside a mapping depends on the build's CPU: NEON repacks Q8_0 (and Q5_K,
    Q6_K), AVX2 does not. A plan for a CPU-only load of a Jetson profile counted the x86 types alone."""
    from edgemed.runtime.plan import make_plan, target_features

    path = write_tiny_gguf(tmp_path / "mixed.gguf", q8_rows=64)
    s = read_shape(path)
    q4, q8 = 2 * 128 * 2 * 18, 2 * 64 * 2 * 34
    assert s.repack_bytes(frozenset({"AVX2"})) == s.repackable_bytes == q4
    assert s.repack_bytes(frozenset({"NEON", "DOTPROD"})) == q4 + q8
    assert s.repack_bytes(frozenset()) == 0
    jetson, x86, generic = (get_profile(n) for n in ("jetson-orin-nano-8gb", "x86-avx2", "generic"))
    assert target_features(jetson) == {"NEON", "DOTPROD"} and target_features(x86) == {"AVX2"}
    # the Jetson's own CPU, on a CPU-only build (gpu=False): its NEON kernels repack the Q8_0 weights too
    assert make_plan(path, jetson, None, requested_ctx=256, gpu=False).estimate.repacked == q4 + q8
    assert make_plan(path, jetson, None, requested_ctx=256, gpu=False, features={"AVX2"}).estimate.repacked == q4
    mapped = dict(generic.llama, use_mmap=True)  # a device whose CPU is not known: whatever any build repacks
    from dataclasses import replace

    assert make_plan(path, replace(generic, llama=mapped), None, requested_ctx=256, budget=1 << 30).estimate.repacked \
        == q4 + q8


def test_edgemed_plan_for_this_machine_plans_as_run_does(tmp_path, monkeypatch):
    """`edgemed plan` with the detected profile plans with the installed llama.cpp (offload, AMX buffer, CPU features)
    as `run` does (``session.prepare``); it had planned without them, below what `run` planned."""
    pytest.importorskip("llama_cpp")
    from dataclasses import asdict

    from edgemed.runtime import buffers, session

    monkeypatch.setattr(buffers, "amx_may_be_tried", lambda build: True)  # an AMX layout to count, on any build
    model = write_tiny_gguf(tmp_path / "tiny.gguf", q8_rows=64)
    prepared = session.prepare(model)  # the generic profile matches any machine
    shown = CliRunner().invoke(cli, ["plan", str(model), "--json"])
    assert shown.exit_code == 0, shown.output
    want = asdict(prepared.plan.estimate)
    assert json.loads(shown.output)["estimate"] == {**want, "total": prepared.plan.estimate.total}


def test_kv_cache_formula_gqa_and_cache_type(tiny):
    s = read_shape(tiny)
    # n_ctx * n_layer * n_head_kv * head_dim * (2 bytes K + 2 bytes V)
    assert kv_cache_bytes(s, 1024) == 1024 * 2 * 2 * 16 * 4
    assert kv_cache_bytes(s, 1024, "q8_0", "q8_0") == int(1024 * 2 * 2 * 16 * 2 * 34 / 32)
    mha = write_tiny_gguf(tiny.with_name("mha.gguf"), n_head_kv=4)
    assert kv_cache_bytes(read_shape(mha), 1024) == 2 * kv_cache_bytes(s, 1024)


@pytest.mark.parametrize("n_ctx, n_seq", [(300, 1), (1200, 4), (4096, 64), (2048, 4), (8192, 1)])
def test_the_plan_counts_the_kv_cells_llama_cpp_allocates(smollm2_gguf, n_ctx, n_seq):
    """llama.cpp pads the context to 256 cells, then each slot's stream again: 64 slots of 64 tokens hold 64 x 256
    cells. The plan counted the tokens asked for (48 MiB of KV where 192 MiB were allocated, on a 0.5B)."""
    pytest.importorskip("llama_cpp")
    from edgemed.runtime.engine import LoadSettings
    from edgemed.runtime.llamacpp import Context, Model
    from edgemed.runtime.plan import kv_cells

    model = Model(smollm2_gguf, LoadSettings(n_ctx=n_ctx))
    try:
        ctx = Context(model, n_ctx=n_ctx, n_seq_max=n_seq, kv_unified=False, n_batch=64)
        try:
            cells = model.lib.llama_n_ctx(ctx.ptr)  # read back from llama.cpp (ctx.n_ctx is the limit asked for)
            assert cells == kv_cells(n_ctx, n_seq) and ctx.n_ctx == min(cells, n_ctx)
            shape = read_shape(smollm2_gguf)
            assert estimate(shape, n_ctx, n_seq=n_seq).kv_cache == kv_cache_bytes(shape, cells)
        finally:
            ctx.close()
    finally:
        model.close()


def test_a_context_beyond_what_the_model_was_trained_on_is_refused(tiny):
    """--ctx 65536 on a model trained on 32,768 tokens was planned without a word."""
    shape = read_shape(tiny)
    profile = get_profile("generic")
    from edgemed.errors import InputError

    with pytest.raises(InputError, match=f"more than the {shape.n_ctx_train} tokens this model was trained on"):
        choose_context(shape, profile, 1 << 40, shape.n_ctx_train + 1)
    assert choose_context(shape, profile, 1 << 40, shape.n_ctx_train) == (shape.n_ctx_train, "request")
    assert choose_context(shape, profile, 1 << 40, 4 * shape.n_ctx_train, n_seq=4)[0] == 4 * shape.n_ctx_train


def test_compute_buffer_matches_llama_cpp_reports():
    """Numbers llama.cpp 0.3.36 printed ("CPU compute buffer size") for SmolLM2-135M, no flash attention.

    With GPU offload the whole reserved buffer counts; those sizes are what llama.cpp reserves."""
    from edgemed.runtime.plan import ModelShape, compute_bytes

    smol = ModelShape("llama", 30, 576, 9, 3, 64, 64, 1536, 49152, 8192, 0, 0)
    for n_ctx, n_ubatch, reported_mib in ((8192, 512, 166.38), (16384, 512, 326.38), (16384, 128, 81.60),
                                          (2048, 512, 99.38), (512, 128, 24.56)):
        predicted = compute_bytes(smol, n_ctx, n_ubatch, flash_attn=False, offload=True) / MIB
        assert predicted == pytest.approx(reported_mib, rel=0.03), (n_ctx, n_ubatch)


def test_the_compute_work_buffer_without_flash_attention():
    """ggml-cpu converts the attention scores to f16 for the product with the f16 V cache, in a work buffer beside the
    compute buffer: ``n_ctx * n_ubatch * n_head * 2`` bytes. SmolLM2 measured 62.7 MiB of compute at 2048 / 512 and
    120.5 at 4096 against 46.4 and 86.4 planned without it."""
    from edgemed.runtime.plan import ModelShape, compute_bytes, work_bytes

    smol = ModelShape("llama", 30, 576, 9, 3, 64, 64, 1536, 49152, 8192, 0, 0)
    assert work_bytes(smol, 4096, 512, flash_attn=False) == 4096 * 512 * 9 * 2
    activations = 512 * 1536 * 2
    assert work_bytes(smol, 4096, 512, flash_attn=True) == work_bytes(smol, 4096, 512, False, "f32") == activations
    for n_ctx, n_ubatch, measured_mib in ((2048, 512, 62.7), (4096, 512, 120.5)):
        e = estimate(smol, n_ctx, n_ubatch=n_ubatch)
        assert e.work == work_bytes(smol, n_ctx, n_ubatch, False)
        assert (e.compute + e.work) / MIB >= measured_mib > compute_bytes(smol, n_ctx, n_ubatch, False, False) / MIB


def test_choose_largest_context_and_refuse(tiny):
    s = read_shape(tiny)
    profile = get_profile("x86-avx2")
    opts = profile_settings(profile, s)  # the profile's own load settings (no mmap on CPU)
    budget = estimate(s, 1536, **opts).total + 1000
    n_ctx, why = choose_context(s, profile, budget)
    assert (n_ctx, why) == (1536, "budget")
    assert estimate(s, n_ctx + 256, **opts).total > budget
    assert choose_context(s, profile, 10 * estimate(s, 2048, **opts).total) == (2048, "model")
    with pytest.raises(PlanError, match="nothing was loaded"):
        choose_context(s, profile, estimate(s, 512, **opts).total - 1)
    with pytest.raises(PlanError, match="leave --ctx out"):
        choose_context(s, profile, budget, requested=2048)


def test_a_ctx_refusal_never_sends_the_user_to_a_second_refusal(tiny):
    """`plan --ctx 256` on a budget no context fits said "leave --ctx out to get the largest context that fits", and
    without --ctx the plan was refused again. Where even the smallest context does not fit, the fixes are the ones
    that make room; where it does, leaving --ctx out is still the advice."""
    s = read_shape(tiny)
    profile = get_profile("x86-avx2")
    opts = profile_settings(profile, s)
    short = estimate(s, 256, **opts).total - 1  # not even 256 tokens: nor the 512 the search starts from
    with pytest.raises(PlanError, match="nothing was loaded"):
        choose_context(s, profile, short)
    for requested in (256, 2048):
        with pytest.raises(PlanError) as err:
            choose_context(s, profile, short, requested=requested)
        assert "leave --ctx out" not in err.value.fix and "smaller quant" in err.value.fix
    with pytest.raises(PlanError, match="leave --ctx out") as err:
        choose_context(s, profile, estimate(s, 1024, **opts).total, requested=2048)
    assert choose_context(s, profile, estimate(s, 1024, **opts).total)[0] >= 1024  # as the fix says


def test_a_trained_context_off_the_256_grid_is_kept_whole_when_it_fits(tmp_path):
    """A model trained on 1,000 tokens was planned at 768 "limited by budget" with the budget all but unused (the
    search walks multiples of 256); one trained on 300 got 300. The whole cap is taken when it fits."""
    profile = get_profile("x86-avx2")
    for ctx in (1000, 300, 1280):
        s = read_shape(write_tiny_gguf(tmp_path / f"t{ctx}.gguf", ctx=ctx))
        assert choose_context(s, profile, 1 << 40) == (ctx, "model"), ctx
    s = read_shape(write_tiny_gguf(tmp_path / "t1000b.gguf", ctx=1000))
    opts = profile_settings(profile, s)
    assert choose_context(s, profile, estimate(s, 768, **opts).total + 1) == (768, "budget")


def test_flash_attention_and_q8_cache_allow_more_context(tiny):
    s = read_shape(tiny)
    budget = estimate(s, 1024).total
    cpu, _ = choose_context(s, get_profile("x86-avx2"), budget)
    jetson, _ = choose_context(s, get_profile("jetson-orin-nano-8gb"), budget)
    assert jetson > cpu


def test_plan_cli(tiny):
    runner = CliRunner()
    ok = runner.invoke(cli, ["plan", str(tiny), "--profile", "x86-avx2", "--json"])
    assert ok.exit_code == 0, ok.output
    data = json.loads(ok.output)
    assert data["fits"] and data["llama"]["n_ctx"] == 2048 and data["limited_by"] == "model"
    text = runner.invoke(cli, ["plan", str(tiny), "--profile", "jetson-orin-nano-8gb"])
    assert "KV cache" in text.output and "type_k=q8_0" in text.output and "n_gpu_layers=-1" in text.output
    refused = runner.invoke(cli, ["plan", str(tiny), "--budget-mb", "1"])
    assert refused.exit_code == 1 and "over the" in refused.output and "Traceback" not in refused.output
    assert "not a readable GGUF" in runner.invoke(cli, ["plan", str(tiny.parent)]).output


def test_run_and_chat_plan_their_own_micro_batch_and_serve_the_profiles(tiny):
    """x86-avx512 sets ``n_ubatch_single``: the one-sequence engine's plan (``run``, ``chat``, ``edgemed plan``) runs
    and counts micro-batches of it, the batcher's (``serve``, ``edgemed plan --serve``) those of ``n_ubatch``; a
    profile without the key plans both alike."""
    from edgemed.runtime.plan import for_engine, make_plan

    avx512 = get_profile("x86-avx512")
    single, served = avx512.llama["n_ubatch_single"], avx512.llama["n_ubatch"]
    assert single < served
    one = make_plan(tiny, avx512, None, requested_ctx=2048, budget=1 << 34)
    many = make_plan(tiny, avx512, None, requested_ctx=2048, budget=1 << 34, batched=True)
    assert (one.llama["n_ubatch"], many.llama["n_ubatch"]) == (single, served)
    assert "n_ubatch_single" not in one.llama and "n_ubatch_single" not in many.llama
    assert one.estimate.compute < many.estimate.compute  # a smaller micro-batch's graph
    avx2 = get_profile("x86-avx2")
    assert "n_ubatch_single" not in avx2.llama and for_engine(avx2, False) is avx2
    runner = CliRunner()
    plans = [json.loads(runner.invoke(cli, ["plan", str(tiny), "--profile", "x86-avx512", "--json", *flag]).output)
             for flag in ((), ("--serve",))]
    assert [p["llama"]["n_ubatch"] for p in plans] == [single, served]


def test_memory_unified_says_which_pool_the_plan_counts(tiny, tmp_path, monkeypatch, caplog):
    """``memory.unified`` is read: a profile that offloads to a GPU sharing the host's memory plans one pool; one whose
    GPU has memory of its own says that memory is not planned (``edgemed plan``, its JSON, and a warning before a
    load that would offload); a CPU profile offloads nothing."""
    import logging

    from edgemed.runtime import session
    from edgemed.runtime.plan import GPU_MEMORY_NOTE, installed_build

    text = (Path(__file__).parents[1] / "device_profiles" / "x86-avx512.toml").read_text()
    dgpu = text.replace('name = "x86-avx512"', 'name = "dgpu"').replace("n_gpu_layers = 0", "n_gpu_layers = -1")
    assert "unified = false" in dgpu and dgpu != text
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "dgpu.toml").write_text(dgpu)
    monkeypatch.setenv("EDGEMED_PROFILES_DIR", str(tmp_path / "profiles"))
    runner = CliRunner()
    pools = {}
    for name in ("x86-avx512", "jetson-orin-nano-8gb", "dgpu"):
        shown = runner.invoke(cli, ["plan", str(tiny), "--profile", name])
        assert shown.exit_code == 0, shown.output
        pools[name] = json.loads(runner.invoke(cli, ["plan", str(tiny), "--profile", name, "--json"]).output)["memory_pool"]
        assert (GPU_MEMORY_NOTE in shown.output) == (name == "dgpu"), shown.output
    assert pools == {"x86-avx512": "host", "jetson-orin-nano-8gb": "unified", "dgpu": "host+gpu"}
    # this llama.cpp build: a CPU-only one offloads nothing, whatever the profile (without llama.cpp: the profile's word)
    offloads = installed_build()["gpu"] is not False
    with caplog.at_level(logging.WARNING, logger="edgemed.runtime.session"):
        prepared = session.prepare(tiny, "dgpu", n_ctx=512)
    assert prepared.plan.pool == ("host+gpu" if offloads else "host")
    assert (GPU_MEMORY_NOTE in caplog.text) == offloads


def test_the_engines_run_the_micro_batch_their_plan_names(smollm2_gguf):
    """Read back from llama.cpp: a context made from ``prepare``'s one-sequence settings runs ``n_ubatch_single``
    rows a micro-batch, one from the batcher's settings ``n_ubatch``."""
    pytest.importorskip("llama_cpp")
    from edgemed.runtime import llamacpp
    from edgemed.runtime.loader import load_model
    from edgemed.runtime.session import prepare

    avx512 = get_profile("x86-avx512")
    one = prepare(smollm2_gguf, "x86-avx512", n_ctx=1024, threads=1).load
    many = prepare(smollm2_gguf, "x86-avx512", n_ctx=1024, threads=1, slots=2, batched=True).load
    model = load_model(smollm2_gguf, one)
    try:
        for load, rows in ((one, avx512.llama["n_ubatch_single"]), (many, avx512.llama["n_ubatch"])):
            ctx = llamacpp.Context(model, load)
            try:
                assert ctx.n_ubatch == rows and ctx.reuse_unit == rows
            finally:
                ctx.close()
    finally:
        model.close()


def test_plan_rejects_non_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all")
    result = CliRunner().invoke(cli, ["plan", str(bad)])
    assert result.exit_code == 1 and "not a readable GGUF" in result.output


def test_run_refuses_before_loading_when_the_model_cannot_fit(smollm2_gguf, tmp_path, monkeypatch):
    """A device with 0.15 GiB for models: `edgemed run` must stop at the plan, not in llama.cpp."""
    generic = (Path(__file__).parents[1] / "device_profiles" / "generic.toml").read_text()
    tiny_box = generic.replace('name = "generic"', 'name = "tiny-box"').replace("reserve_gb = 1.0", "total_gb = 0.3\nreserve_gb = 0.15")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "tiny-box.toml").write_text(tiny_box)
    monkeypatch.setenv("EDGEMED_PROFILES_DIR", str(tmp_path / "p"))
    import edgemed.runtime.llama_engine as le

    monkeypatch.setattr(le, "load", lambda *a, **k: pytest.fail("the engine was loaded"))
    result = CliRunner().invoke(cli, ["run", str(smollm2_gguf), "--prompt", "hi", "--profile", "tiny-box"])
    assert result.exit_code == 1, result.output
    assert "over the 'tiny-box' budget" in result.output and "nothing was loaded" in result.output


@pytest.mark.slow
def test_prediction_within_10_percent_of_measured_rss(smollm2_gguf):
    """One process: plan, load through the runtime, fill a 1024-token context, decode; compare peak RSS."""
    proc = subprocess.run([sys.executable, "-m", "edgemed.benchmarks.plan_memory", "--child",
                           "smollm2-135m-instruct", "1024"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(row["predicted"] - row["measured"]) / row["measured"] <= 0.10, row


@pytest.mark.slow
def test_a_long_context_is_not_under_counted(smollm2_gguf):
    """At 4096 tokens without flash attention the attention scores' f16 work buffer is 36 MiB: peak RSS 367 MiB
    against 340 planned before it was counted. The plan `run` makes here is at least what the process reaches."""
    proc = subprocess.run([sys.executable, "-m", "edgemed.benchmarks.plan_memory", "--child",
                           "smollm2-135m-instruct", "4096"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    if row["breakdown"]["work"] < 16 * MIB:
        pytest.skip(f"the {row['profile']} profile runs this model with flash attention: no score work buffer")
    assert row["measured"] <= row["predicted"] <= 1.10 * row["measured"], row


@pytest.mark.slow
def test_serve_slots_are_planned_within_10_percent_of_measured_rss(smollm2_gguf):
    """edgemed serve's batcher, 4 slots of 1,024 tokens, every slot filled: planned over every slot's cells the
    attention terms made the plan about a quarter over the peak (4 slots of 2,048: +43 %)."""
    proc = subprocess.run([sys.executable, "-m", "edgemed.benchmarks.plan_memory", "--slots", "4", "--child",
                           "smollm2-135m-instruct", "1024"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["slots"] == 4 and row["generated_chars"] > 0
    assert abs(row["predicted"] - row["measured"]) / row["measured"] <= 0.10, row


def write_tiny_adapter(path: Path, *, n_layer=2, n_embd=64, n_ff=128, r=4, general_type="adapter") -> Path:
    """A GGUF LoRA adapter for ``write_tiny_gguf``'s model: an F16 pair per ffn_up weight."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(general_type)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.ffn_up.weight.lora_a", np.zeros((r, n_embd), dtype=np.float16))
        w.add_tensor(f"blk.{i}.ffn_up.weight.lora_b", np.zeros((n_ff, r), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_adapters_count_their_tensors_and_can_tip_the_context(tiny, tmp_path):
    """A LoRA adapter adds its tensors' bytes to the plan; a budget that fits the bare model at a context may
    leave a smaller one with the adapter; a file that is not an adapter is refused by name."""
    from edgemed.errors import InputError
    from edgemed.formats.gguf_header import adapter_facts
    from edgemed.runtime.plan import make_plan

    adapter = write_tiny_adapter(tmp_path / "a.lora.gguf")
    facts = adapter_facts(adapter)
    assert facts.n_bytes == 2 * 2 * (4 * 64 + 128 * 4) and facts.types == ("F16",) and facts.base_source_sha256 is None
    s = read_shape(tiny)
    profile = get_profile("x86-avx2")
    opts = profile_settings(profile, s)
    with_adapter = estimate(s, 1536, **opts, adapter_bytes=facts.n_bytes)
    assert with_adapter.total == estimate(s, 1536, **opts).total + facts.n_bytes
    budget = estimate(s, 1536, **opts).total + 1000
    assert choose_context(s, profile, budget)[0] == 1536
    assert choose_context(s, profile, budget, adapter_bytes=facts.n_bytes)[0] < 1536
    plan = make_plan(tiny, profile, None, budget=10 * budget, adapters=[adapter, adapter])
    assert plan.estimate.adapters == 2 * facts.n_bytes and plan.to_dict()["estimate"]["adapters"] == 2 * facts.n_bytes
    with pytest.raises(InputError, match="not a GGUF LoRA adapter"):
        make_plan(tiny, profile, None, budget=10 * budget, adapters=[tiny])
    with pytest.raises(InputError, match="not a GGUF LoRA adapter"):
        adapter_facts(write_tiny_adapter(tmp_path / "m.gguf", general_type="model"))


def test_a_llama_cpp_that_does_not_load_here_leaves_the_plan_to_the_profile(monkeypatch):
    """A CUDA wheel on a machine without the driver raises while importing (not ImportError): `edgemed plan` plans
    with the profile's word, as where llama.cpp is not installed, instead of a traceback."""
    import sys

    from edgemed.runtime.plan import installed_build, installed_features

    class Broken:
        def find_spec(self, name, path=None, target=None):
            if name == "llama_cpp":
                raise RuntimeError("Failed to load shared library 'libllama.so': libcuda.so.1: cannot open shared object file")
            return None

    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    assert installed_build() == {"gpu": None, "amx": False, "features": None}
    assert installed_features() is None


def test_the_attention_of_serve_slots_covers_one_slots_cells_on_a_cpu():
    """With a KV stream per slot a micro-batch attends its own slot's cells: on a CPU the score pages written are one
    slot's (4 slots of 2,048 on Qwen2.5-0.5B: 778 MiB planned, 753 measured; 1,042 planned over every slot's cells).
    A device buffer is reserved for the whole context."""
    from edgemed.runtime.plan import ModelShape, compute_bytes, work_bytes

    smol = ModelShape("llama", 30, 576, 9, 3, 64, 64, 1536, 49152, 8192, 0, 0)
    four, one = estimate(smol, 4 * 2048, n_seq=4), estimate(smol, 2048)
    assert (four.compute, four.work) == (one.compute, one.work) == \
        (compute_bytes(smol, 2048, 512, False, False), work_bytes(smol, 2048, 512, False))
    assert four.kv_cache == 4 * one.kv_cache  # the cells themselves are every slot's
    gpu = estimate(smol, 4 * 2048, n_seq=4, offload=True)
    assert gpu.compute == compute_bytes(smol, 4 * 2048, 512, False, True)
