"""``--quant auto``: the types asked are the types written, the splice is llama.cpp's own bytes, the search stays
inside its bound and picks the smallest file under a budget (or the best that fits a device)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

from click.testing import CliRunner  # noqa: E402

from edgemed.cli import cli  # noqa: E402
from edgemed.converters.gguf import auto_quant  # noqa: E402
from edgemed.converters.gguf.auto_quant_search import (  # noqa: E402
    BANDS, MARGIN_Z, STOCK, TOP, Group, Impossible, Trial, bound, probe_slices, search)
from edgemed.converters.pipeline import ConvertOptions, convert  # noqa: E402
from edgemed.converters.gguf.quantize import quantize  # noqa: E402
from edgemed.errors import EdgemedError  # noqa: E402
from edgemed.formats.gguf_header import read_header  # noqa: E402

QUIET = dict(echo=lambda s: None)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny Qwen2 whose attention rows are 256 wide (K-quants) and FFN-down rows 128 wide (32-blocks only)."""
    root = tmp_path_factory.mktemp("auto")
    ckpt = tiny.build_model(root / "qwen2", "qwen2", hidden_size=256)
    f16 = root / "f16.gguf"
    convert(ckpt, f16, ConvertOptions(out_type="f16", parity=False), **QUIET)
    return {"ckpt": ckpt, "f16": f16, "root": root, "groups": auto_quant.groups_of(read_header(f16))}


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def _mixed(groups) -> dict[str, str]:
    """Every type on the ladders, spread over the tensors (each ladder cycles low, high, Q8_0 on its own)."""
    seen: dict[str, int] = {}
    out = {}
    for g in groups:
        i = seen[g.low] = seen.get(g.low, -1) + 1
        out[g.name] = (g.low, g.high, TOP)[i % 3]
    return out


# -- llama.cpp writes what is asked ------------------------------------------------------------------------
def test_ladders_follow_row_width(model):
    kinds = {g.name: (g.low, g.high) for g in model["groups"]}
    assert kinds["blk.0.attn_q.weight"] == ("Q4_K", "Q6_K")      # rows of 256
    assert kinds["blk.0.ffn_down.weight"] == ("Q5_0", "Q8_0")    # rows of 128 (intermediate_size)
    assert "token_embd.weight" in kinds and all(g.extra_bytes > 0 for g in model["groups"])


def test_types_asked_are_the_types_written(model, tmp_path):
    asked = _mixed(model["groups"])
    out = tmp_path / "mixed.gguf"
    quantize(model["f16"], out, "q4_k_m", tensor_types=asked)
    written = _types(out)  # read back by the gguf library
    assert {n: written[n] for n in asked} == asked
    assert len(set(asked.values())) == 4  # Q4_K, Q6_K, Q5_0 and Q8_0 all asked


def test_a_type_llama_cpp_would_change_is_refused(model, tmp_path):
    """Q4_K on a 128-wide row: llama.cpp falls back to Q5_0, and the read-back refuses the file."""
    with pytest.raises(EdgemedError, match="did not write the asked tensor types.*ffn_down.*asked Q4_K, wrote Q5_0"):
        quantize(model["f16"], tmp_path / "bad.gguf", "q4_k_m", tensor_types={"blk.0.ffn_down.weight": "Q4_K"})


def test_header_positions_match_gguf_reader(model):
    ours, theirs = read_header(model["f16"]), gguf.GGUFReader(str(model["f16"]))
    assert [ours.data_start + t.offset for t in ours.tensors] == [int(t.data_offset) for t in theirs.tensors]


def test_splice_gives_llama_cpp_bytes(model, tmp_path):
    """A spliced candidate holds exactly the tensors llama.cpp writes for the same types."""
    groups = model["groups"]
    rungs = []
    for level in ("low", "high", "top"):
        path = tmp_path / f"{level}.gguf"
        types = {g.name: {"low": g.low, "high": g.high, "top": TOP}[level] for g in groups}
        quantize(model["f16"], path, "q4_k_m", tensor_types=types)
        rungs.append(auto_quant.Rung(path, read_header(path)))
    auto_quant.splice(rungs, {g.name: g.low for g in groups}, tmp_path / "again.gguf")
    assert (tmp_path / "again.gguf").read_bytes() == rungs[0].path.read_bytes()
    asked = _mixed(groups)
    auto_quant.splice(rungs, asked, tmp_path / "spliced.gguf")
    quantize(model["f16"], tmp_path / "direct.gguf", "q4_k_m", tensor_types=asked)
    assert auto_quant.same_tensors(tmp_path / "spliced.gguf", tmp_path / "direct.gguf")
    assert not auto_quant.same_tensors(tmp_path / "spliced.gguf", rungs[0].path)


# -- the search, against a synthetic model of KLD ------------------------------------------------------------
def _toy(n_layers: int = 8):
    groups = [Group(f"blk.{layer}.{kind}.weight", kind, layer, "Q4_K", "Q6_K", 100 * (1 + i))
              for layer in range(n_layers) for i, kind in enumerate(("attn_q", "attn_v", "ffn_down"))]
    groups.append(Group("output.weight", "output", None, "Q4_K", "Q6_K", 400))
    gain = {g.name: (0.02 if g.kind == "output" else 0.004 if g.kind == "attn_v" else 0.001) * (2 if g.layer == 0 else 1)
            for g in groups}
    return groups, gain


def _measurer(groups, gain, base=0.08, fits=None, se=0.0):
    calls = []

    def measure(label, types):
        calls.append(label)
        kld = base - sum(gain[n] for n, t in types.items() if t != "Q4_K") - 0.0005 * sum(t == TOP for t in types.values())
        size = sum(g.extra_bytes for g in groups if types[g.name] != "Q4_K") + 10_000
        return Trial(label, dict(types), size, max(kld, 1e-4), None if fits is None else fits(types), {"top1": 0.9},
                     se=se)
    return measure, calls


def test_loose_budget_gives_the_base_in_one_round():
    groups, gain = _toy()
    measure, calls = _measurer(groups, gain)
    out = search(groups, measure=measure, max_kld=0.1)
    assert calls == ["base"] and out.chosen.label == "base"


def test_tight_budget_gives_a_bigger_file_within_the_bound():
    groups, gain = _toy()
    measure, calls = _measurer(groups, gain)
    out = search(groups, measure=measure, max_kld=0.03)
    assert out.chosen.kld <= 0.03 and out.chosen.size_bytes > 10_000
    assert len(calls) <= bound(groups) == 4 + len(probe_slices(groups)) + 4
    assert len(probe_slices(groups)) == 4 + BANDS  # 3 kinds + output, and the layer bands
    # the most gain per byte goes high first: output (0.02 for 400 bytes), then layer 0's attn_v
    assert out.order[:2] == ["output.weight", "blk.0.attn_v.weight"]
    # nothing measured that also meets the budget is smaller
    assert out.chosen.size_bytes == min(t.size_bytes for t in out.trials if t.kld <= 0.03)


def _stock(groups):
    """A stand-in for llama.cpp's Q4_K_M mix: the output and every attn_v high."""
    return {g.name: g.high if g.kind in ("output", "attn_v") else g.low for g in groups}


def test_the_stock_mix_is_a_candidate_the_answer_must_beat():
    """llama.cpp's own mix is measured after the base: where it meets the budget nothing larger is chosen, where
    a smaller candidate meets it too that one wins, and the report says how the answer compares with it."""
    groups, gain = _toy()
    measure, calls = _measurer(groups, gain)
    stock = _stock(groups)   # KLD 0.08 - 0.02 - 8 x 0.004 - 0.004 = 0.024, 10,000 + 400 + 8 x 200 bytes
    out = search(groups, measure=measure, max_kld=0.03, stock=lambda: stock)
    assert calls[:3] == ["base", STOCK, "all high"] and len(calls) <= out.bound
    ref = next(t for t in out.trials if t.label == STOCK)
    assert ref.kld == pytest.approx(0.024) and ref.size_bytes == 12_000
    assert out.chosen.size_bytes <= ref.size_bytes and out.chosen.kld <= 0.03
    assert out.chosen is ref or "in size against llama.cpp's own mix (which meets it too)" in out.why
    if out.chosen is not ref:  # smaller than the stock mix: the change is negative
        change = f"{out.chosen.size_bytes / 12_000 - 1:+.1%}"
        assert change.startswith("-") and f", {change} in size against" in out.why, out.why
    # a budget only the stock mix (and larger) meets, among what is measured: the stock mix or smaller, never larger
    tight = search(groups, measure=_measurer(groups, gain)[0], max_kld=0.0241, stock=lambda: stock)
    assert tight.chosen.size_bytes <= 12_000 and tight.chosen.kld <= 0.0241
    # never asked when the base already meets the budget
    asked = []
    search(groups, measure=measure, max_kld=0.1, stock=lambda: asked.append(1) or stock)
    assert asked == []


def test_the_budget_is_met_with_a_margin():
    """A candidate meets --max-kld only when KLD + MARGIN_Z x SE does: with an SE, the answer is larger and its
    upper bound (not just its mean) is under the budget."""
    groups, gain = _toy()
    bare = search(groups, measure=_measurer(groups, gain)[0], max_kld=0.03)
    held = search(groups, measure=_measurer(groups, gain, se=0.002)[0], max_kld=0.03)
    assert held.chosen.upper == pytest.approx(held.chosen.kld + MARGIN_Z * 0.002) and held.chosen.upper <= 0.03
    assert held.chosen.size_bytes >= bare.chosen.size_bytes and held.chosen.kld < bare.chosen.kld
    assert bare.chosen.kld + MARGIN_Z * 0.002 > 0.03   # the answer without a margin would not pass with one
    assert held.chosen.size_bytes > bare.chosen.size_bytes
    assert held.chosen.row()["kld_upper"] == held.chosen.upper and "upper bound" in held.why


def test_search_never_passes_its_bound():
    """A KLD that does not follow the modelled curve still ends within the bound, with a candidate that meets it."""
    groups, gain = _toy()
    measure, calls = _measurer(groups, gain)

    def noisy(label, types):
        t = measure(label, types)
        t.kld += 0.01 * (len(calls) % 2)  # every other round reads worse
        return t
    out = search(groups, measure=noisy, max_kld=0.03)
    assert len(out.trials) <= out.bound and out.chosen.kld <= 0.03


def test_impossible_budget_says_what_was_measured():
    groups, gain = _toy()
    measure, _ = _measurer(groups, gain)
    with pytest.raises(Impossible) as exc:
        search(groups, measure=measure, max_kld=1e-6)
    assert [t.label for t in exc.value.trials] == ["base", "all high", "all Q8_0"]


def test_fit_only_takes_the_best_that_fits():
    groups, gain = _toy()
    roomy, calls = _measurer(groups, gain, fits=lambda types: True)
    out = search(groups, measure=roomy, fits=lambda types: True)
    assert calls == ["all Q8_0"] and out.chosen.label == "all Q8_0"
    limit = 10_000 + 2000

    def small(types):
        return sum(g.extra_bytes for g in groups if types[g.name] != "Q4_K") + 10_000 <= limit

    tight, calls = _measurer(groups, gain, fits=small)
    out = search(groups, measure=tight, fits=small)
    assert small(out.chosen.types) and "groups high" in out.chosen.label
    assert out.chosen.kld == min(t.kld for t in out.trials if t.fits)
    with pytest.raises(Impossible, match="base does not fit"):
        search(groups, measure=tight, fits=lambda types: False)


# -- the command ------------------------------------------------------------------------------------------------
def _cli(*args):
    return CliRunner().invoke(cli, ["convert", *map(str, args)])


@pytest.mark.parametrize("args,words", [
    (["--max-kld", "0.01"], "needs --quant auto"),
    (["--quant", "q4_0", "--fit-profile", "generic"], "needs --quant auto"),
    (["--quant", "auto"], "needs a goal"),
    (["--quant", "auto", "--max-kld", "-1"], "above 0"),
    (["--quant", "auto", "--max-kld", "nan"], "above 0"),
    (["--quant", "auto", "--fit-profile", "no-such-device"], "No device profile named"),
    (["--quant", "auto", "--fit-profile", "x86-avx2"], "no fixed memory size"),
    (["--to", "onnx", "--quant", "auto", "--max-kld", "0.01"], "GGUF tensor types"),
    (["--to", "onnx", "--quant", "int4", "--pre-tokenizer", "llama3"], "an ONNX export keeps the Hugging Face tokenizer"),
])
def test_bad_combinations_are_refused_before_any_work(model, tmp_path, args, words):
    result = _cli(model["ckpt"], *args, "-o", tmp_path / "x.gguf")
    assert result.exit_code != 0 and words in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "x.gguf").exists()


def test_loose_and_tight_budgets(model, tmp_path):
    loose = convert(model["ckpt"], tmp_path / "loose.gguf", ConvertOptions(out_type="auto", max_kld=10.0, parity=False), **QUIET)
    section = loose.auto_quant
    assert section["chosen"]["label"] == "base" and section["rounds"] == 1 and section["quantize_runs"] == 2
    base_kld = section["candidates"][0]["kld"]
    result = _cli(model["ckpt"], "--quant", "auto", "--max-kld", base_kld / 3, "--no-parity", "-o", tmp_path / "tight.gguf", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "tight.gguf.report.json").read_text())
    tight = report["auto_quant"]
    assert report["out_type"] == "auto" and tight["chosen"]["kld"] <= base_kld / 3
    assert report["size_bytes"] > loose.size_bytes
    assert tight["rounds"] <= tight["bound"] and len(tight["candidates"]) == tight["rounds"]
    assert {n: t for n, t in _types(tmp_path / "tight.gguf").items() if n in tight["chosen"]["types"]} == tight["chosen"]["types"]
    assert tight["chosen"]["matches_measured_candidate"] is True
    # llama.cpp's own mix was measured as a candidate; the answer is held to its KLD's upper bound
    assert tight["stock"]["label"] == STOCK and any(c["label"] == STOCK for c in tight["candidates"])
    se = tight["chosen"]["figures"]["kld_se"]
    assert se > 0 and tight["chosen"]["kld"] + MARGIN_Z * se <= base_kld / 3 and tight["margin"]["z"] == MARGIN_Z
    assert "auto-quant chose" in result.output and "probe kind" in result.output
    assert report["imatrix"]["text"] == "medical.txt"  # the command's default for auto: calibrated on the shipped text


def test_impossible_budget_is_one_paragraph(model, tmp_path):
    # the lowest budget accepted (auto_quant.MIN_MAX_KLD); every tensor Q8_0 of the tiny model reads about 0.0009
    result = _cli(model["ckpt"], "--quant", "auto", "--max-kld", "1e-4", "--no-parity", "-o", tmp_path / "x.gguf")
    assert result.exit_code == 1 and "No --quant auto candidate meets KLD <= 0.0001" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x.gguf").exists()


def test_fit_profile_picks_what_the_planner_says_fits(model, tmp_path, edgemed_home):
    """A device with room for the base but not for every tensor high: the output fits it, by the planner."""
    from edgemed.runtime.plan import make_plan

    groups = model["groups"]
    shipped = (Path(__file__).parents[1] / "device_profiles" / "jetson-orin-nano-8gb.toml").read_text()
    (edgemed_home / "profiles").mkdir(parents=True)
    probe = edgemed_home / "profiles" / "tiny-device.toml"
    probe.write_text(shipped.replace('name = "jetson-orin-nano-8gb"', 'name = "tiny-device"')
                     .replace("reserve_gb = 1.5", "reserve_gb = 0.0").replace("max_fraction = 0.8", "max_fraction = 1.0"))
    fit = auto_quant.DeviceFit("tiny-device", model["f16"])
    low = fit.estimate({g.name: g.low for g in groups}).total
    high = fit.estimate({g.name: g.high for g in groups}).total
    probe.write_text(probe.read_text().replace("total_gb = 7.4", f"total_gb = {(low + high) / 2 / 2**30:.9f}"))
    report = convert(model["ckpt"], tmp_path / "fit.gguf", ConvertOptions(out_type="auto", fit_profile="tiny-device", parity=False), **QUIET)
    section = report.auto_quant
    assert section["plan"]["fits"] is True and section["request"]["n_ctx"] == 256  # the model's trained context
    assert section["chosen"]["label"] != "base"  # the room above the base was used
    from edgemed.devices import get_profile

    assert make_plan(tmp_path / "fit.gguf", get_profile("tiny-device"), None, requested_ctx=256).fits


@pytest.mark.parametrize("shipped", ["jetson-orin-nano-8gb", "x86-avx512", "x86-avx2"])
def test_a_candidate_is_counted_as_the_planner_counts_its_file(model, tmp_path, edgemed_home, shipped):
    """The search's estimate of a candidate is the plan of the file it writes: weights, the copies the device's CPU
    repacks or its AMX buffer holds, the output layer's copy of a tied embedding (it imported a name the planner no
    longer has, and counted the repack by a list of x86 types)."""
    from edgemed.devices import get_profile
    from edgemed.runtime.plan import make_plan

    text = (Path(__file__).parents[1] / "device_profiles" / f"{shipped}.toml").read_text()
    text = text.replace(f'name = "{shipped}"', 'name = "probe-device"')
    if "total_gb" not in text:  # a size of its own, so the search may plan for it here
        text = text.replace("[memory]\n", "[memory]\ntotal_gb = 16.0\n", 1)
    (edgemed_home / "profiles").mkdir(parents=True, exist_ok=True)
    (edgemed_home / "profiles" / "probe-device.toml").write_text(text)
    out = tmp_path / "mixed.gguf"
    quantize(model["f16"], out, "q4_k_m", tensor_types=_mixed(model["groups"]))
    fit = auto_quant.DeviceFit("probe-device", model["f16"])
    plans = [make_plan(out, get_profile("probe-device"), None, requested_ctx=fit.n_ctx, batched=b) for b in (False, True)]
    assert fit.estimate(_types(out)) == max((p.estimate for p in plans), key=lambda e: e.total)  # `run`'s or `serve`'s


def test_best_fidelity_that_fits_quantizes_only_what_it_measures(model, tmp_path):
    """A roomy device: every tensor Q8_0, one round, llama.cpp run twice (the Q8_0 file and the output)."""
    from edgemed.converters.gguf.calibration import shipped

    report = convert(model["ckpt"], tmp_path / "q8.gguf",
                     ConvertOptions(out_type="auto", fit_profile="jetson-orin-nano-8gb", parity=False,
                                    imatrix_from=shipped("medical.txt")), **QUIET)
    section = report.auto_quant
    assert section["rounds"] == 1 and section["quantize_runs"] == 2 and section["chosen"]["label"] == "all Q8_0"
    # Q8_0's quantizer reads no importance matrix, so none was computed and the report names none
    assert report.imatrix is None and "imatrix" not in report.timings_s
    assert set(_types(tmp_path / "q8.gguf")[n] for n in section["chosen"]["types"]) == {"Q8_0"}
