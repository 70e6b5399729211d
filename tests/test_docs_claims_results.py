"""The figures the results pages, the README's 7B paragraph and decision records 0004, 0005 and 0008 quote are their
JSON's, and the few no result file keeps say so.

A figure quoted from a result JSON is compared with that JSON at the precision the page writes it, and each section
checked here has no figure besides those; a figure the budget's estimator gives from a config (convert_memory.md's 7B
shape) is what it computes now. A figure from a run no result file keeps (a one-off observation, or an
older planner's run whose JSON the tree has since replaced) stands in a note naming the commit that recorded it and
saying no result file keeps it; where this clone holds that commit, the figure is the one that commit recorded (a
table of such a run: each row as that commit held it).
The OpenAI page's account of a body holding ``NaN`` is checked against ``api.loads_body``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from test_docs_claims import RESULTS, ROOT, _blocks, _table_rows

GIB, MIB = 2**30, 2**20

D0004, D0005, D0008 = (f"docs/decisions/{name}.md" for name in ("0004-no-mmap-on-cpu-profiles",
                                                                    "0005-parity-without-the-cpu-repack",
                                                                    "0008-layer-at-a-time-reference"))
MEMORY = "convert_memory.md"
#: (page, its words, the commit that recorded them, the file that held them there): runs no result file keeps
RECORDED = [
    ("convert_cost.md", ("peaked at 5.6 GB (numpy's BF16 rounding made 8-byte temporaries of the 136 M-element "
                         "embedding)"), "1384b23", "DESIGN.md"),
    ("convert_cost.md", ("NMSE 1.54e-5, KLD 1.1e-5, top-1 98.6 %: PASS, in 240 s (15.6 GB RSS, nearly all the "
                         "memory-mapped 15.2 GB F16 file)"), "fe3da00", "benchmarks/results/convert_cost.md"),
    ("convert_cost.md", "10.4 GiB", "b29a9ff", "DESIGN.md"),
    (D0005, "290 MiB anonymous + 420 MiB file-backed for the 0.5B Q4_0; at 7B Q4_K_M this is 3.0 GiB, the route's "
            "largest term", "c73dcef", "benchmarks/results/convert_memory.md"),
    (D0008, "10.4 GiB", "b29a9ff", "DESIGN.md"),
    (MEMORY, ("the shared 2-core x86 box (AVX2, 24 GiB, other agents running); llama-cpp-python 0.3.36, torch 2.13 "
              "CPU, transformers 5.24, onnxruntime as installed"), "c73dcef", "benchmarks/results/convert_memory.md"),
    (MEMORY, ("both logit sets in float32 and float64, concatenated and differenced, 14-15x one float32 set (a one-off "
              "probe calling `parity.compare` on random logits of 150 positions: 374 MiB above the two 56 MiB float32 "
              "sets for a 49k vocabulary, 1,045 MiB above the two 173 MiB sets for 152k)"),
     "c73dcef", "benchmarks/results/convert_memory.md"),
    (MEMORY, ("the Q4_0/Q4_K tensors a repacked anonymous copy on AVX2: 290 MiB anonymous + 420 MiB file-backed for "
              "the 0.5B Q4_0; at 7B Q4_K_M this is 3.0 GiB, the route's largest term"),
     "c73dcef", "benchmarks/results/convert_memory.md"),
    (MEMORY, ("`torch.onnx.export` holds about 4.5x the float32 weights for a graph under protobuf's 2 GiB (SmolLM2), "
              "1.8x for a larger one (the 0.5B: external data); the int4 quantizer 1.5-1.9x; an ONNX Runtime session "
              "0.8-1.0x (fp32)"), "c73dcef", "benchmarks/results/convert_memory.md"),
    (MEMORY, "its builder alone was 5.3 GB in `onnx_vs_gguf.md`", "c73dcef", "benchmarks/results/convert_memory.md"),
    (MEMORY, "the layered imatrix took 713 s on SmolLM2 on this loaded box", "c73dcef",
     "benchmarks/results/convert_memory.md"),
    (D0008, "NMSE 1.54e-5", "fe3da00", "benchmarks/results/convert_cost.md"),
    ("onnx_vs_gguf.md", ("with transformers 5.24 on this machine: Qwen2.5-0.5B -> int4 CPU in 37 s wall, 5.3 GB peak "
                         "RSS, 862 MB output"), "c6cba6d", "DESIGN.md"),
    ("onnx_vs_gguf.md", "(32768 here, 131072 for R1-Distill)", "c6cba6d", "DESIGN.md"),
    ("onnx_vs_gguf.md", ("symmetric 0.189 / 71.5 %, asymmetric 0.153 / 71.5 %, asym + fp32 head 0.128 / 78.5 % "
                         "(+460 MB), asym + 8-bit head 0.128 / 79.2 % (+70 MB), all 8-bit 0.0024 / 96.5 %"),
     "c6cba6d", "DESIGN.md"),
    ("onnx_vs_gguf.md", "Parity on the spine's 5 medical prompts (144 positions)", "c6cba6d", "DESIGN.md"),
    ("onnx_vs_gguf.md", ("(load average 4-5 from other sessions) both engines collapse (GGUF Q4_K_M 0.7-1.6 tok/s, "
                         "ONNX 5-11 tok/s"), "c6cba6d", "DESIGN.md"),
    ("onnx_vs_gguf.md", "~400 small unfused nodes", "c6cba6d", "DESIGN.md"),
    ("onnx_vs_gguf.md", "55 s wall, 5.6 GB peak (vs 92-118 s for the traced route", "f45636a", "DESIGN.md"),
    ("onnx_vs_gguf.md", "fp32 NMSE 1.0e-11, int4 KLD 0.126 / top-1 78.5 %", "f45636a", "DESIGN.md"),
    ("onnx_vs_gguf.md", ("92-118 s wall, 5.9 GB peak RSS (export 55-60 s, fp32 parity 32-37 s incl. the HF source, "
                         "quantize 13 s, int4 parity 7 s)"), "c6cba6d", "DESIGN.md"),
]
#: (page, the text a table follows, commit, the file that held it there, the text it followed there, how many of its
#: first cells each row has as that file held them; the rest are checked against a JSON): tables of recorded runs
RECORDED_TABLES = [
    ("onnx_vs_gguf.md", "## The builder, evaluated first", "c6cba6d", "DESIGN.md", "**Builder evaluated first.**",
     (5, 5, 5, 5)),
    ("onnx_vs_gguf.md", "## Parity (", "c6cba6d", "DESIGN.md", "Parity on the spine's 5 medical prompts", (5, 4, 4)),
]
#: (page, its words, commit): an older planner's figures, each a row's of plan_memory.json as that commit held it
PLANNED = [
    ("plan_memory.md", ("2-6 % (SmolLM2: 213.0 / 340.5 MiB predicted against 217.2 / 361.6 measured, -1.9 / -5.8 %); "
                        "the Qwen2.5 rows were 636.4 / 762.4 / 1,252.1 / 1,414.1 MiB predicted against "
                        "622.7 / 774.0 / 1,266.9 / 1,418.3 measured"), "76d136c"),
    ("plan_memory.md", ("1,849 / 2,011 MiB predicted and 1,864 / 2,023 MiB measured for the 1.5B at 1,024 / 4,096 "
                        "tokens"), "1b2b285"),
]


def _flat(text: str) -> str:
    return " ".join(text.split())


def _page(name: str) -> str:
    """A results page by its name, or another page by its path from the repository's root."""
    return (ROOT / name if "/" in name else RESULTS / name).read_text(encoding="utf-8")


def _json(name: str) -> dict:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def _section(text: str, heading: str) -> str:
    """The body of the section under ``heading`` (its heading line left out), up to the next ``## ``."""
    return text.split(heading, 1)[1].split("\n", 1)[1].split("\n## ", 1)[0]


def _without_recorded(text: str) -> str:
    """``text`` on one line, the words of every recorded run cut out."""
    text = _flat(text)
    for _, words, *_ in RECORDED + PLANNED:
        text = text.replace(words, " ")
    return text


def _numbers(text: str) -> list[str]:
    """The figures of ``text`` (thousands commas dropped, both ends of a range), leaving out code spans, link
    targets, names with a digit in them (Q4_K_M, 1.5B, top-1, 4-bit, a commit) and decision numbers."""
    text = re.sub(r"`[^`]*`|\]\([^)]*\)|\btop-1\b|\b1-minute\b|\b\d+-bit\b|decision \d{4}", " ", text)
    number = r"(?<![\w.,])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:e[-+]?\d+)?)(?!\d|[.,]\d|[A-Za-wyz_])"
    return [n.replace(",", "") for n in re.findall(number, text)]


def _as_written(value: float, quoted: str) -> str:
    """``value`` written as ``quoted`` is: as many decimals, and its power of ten where it has one (4.59e-3)."""
    mantissa, _, exponent = quoted.replace(",", "").partition("e")
    decimals = len(mantissa.partition(".")[2])
    if exponent:
        return f"{value / 10 ** int(exponent):.{decimals}f}e{exponent}"
    return f"{value:.{decimals}f}"


def _labelled(text: str, found: dict[str, float]) -> None:
    """Each pattern's figure in ``text`` is its value as the page writes it, and ``text`` has no other figure."""
    for pattern, value in found.items():
        match = re.search(pattern, text)
        assert match, f"not on the page: {pattern}"
        assert _as_written(value, match[1]) == match[1].replace(",", ""), (pattern, match[1], value)
    numbers = _numbers(text)
    assert len(numbers) == len(found), f"figures with no result checked here: {numbers} ({text})"


def test_the_convert_cost_example_is_its_json():
    result = _json("convert_cost-smollm2-135m-instruct-q4_k_m.json")
    run = result["runs"]["convert"]
    memory, cgroup = run["memory"], run["cgroup"]
    text = _flat(_section(_page("convert_cost.md"), "## How cost is measured now"))
    assert "(`convert_cost-smollm2-135m-instruct-q4_k_m.json`)" in text
    assert "no OOM kill" in text and cgroup["oom_kills"] == 0 and run["rc"] == 0
    _labelled(text, {r"every (\d+) ms": memory["interval_s"] * 1000,
                     r"under a (\d[\d.]*) GiB cap": cgroup["limit_bytes"] / GIB,
                     r"(\d[\d.]*) s wall": run["wall_s"],
                     r"tree peak (\d[\d.]*) GiB RSS": memory["tree_peak_rss_bytes"] / GIB,
                     r"\((\d[\d.]*) GiB anonymous": memory["tree_peak_anon_bytes"] / GIB,
                     r"(\d[\d.]*) GiB file-backed": memory["tree_peak_file_bytes"] / GIB})


CAPPED = "## With parity, one decoder layer at a time"


def test_the_memory_cap_table_is_its_jsons():
    """Each row's cap, wall time and the step times it names, peaks and parity are its JSON's."""
    rows = _table_rows(_page("convert_cost.md"), CAPPED)
    assert len(rows) == 3, rows
    for run_cell, cap, wall, peak, anon, file_, parity in rows:
        name = re.search(r"\]\((convert_cost-[\w.+-]+)\.md\)", run_cell)
        assert name, run_cell
        ((_, run),) = _json(name[1] + ".json")["runs"].items()
        memory, cgroup = run["memory"], run["cgroup"]
        assert cap == f"{cgroup['limit_bytes'] / GIB:g} GiB", (name[1], cap)
        assert cgroup["oom_kills"] == 0, name[1]
        steps = dict(re.findall(r"([a-z_]+) (\d[\d.]*) s\b", wall))
        _labelled(wall, {r"^(\d[\d.]*) s\b": run["wall_s"],
                         **{rf"\b{step} (\d[\d.]*) s\b": run["timings_s"][step] for step in steps}})
        _labelled(_without_recorded(peak), {r"\*\*(\d[\d.]*) GiB\*\*": memory["tree_peak_rss_bytes"] / GIB})
        _labelled(anon, {r"(\d[\d.]*) GiB": memory["tree_peak_anon_bytes"] / GIB})
        _labelled(file_, {r"(\d[\d.]*) GiB": memory["tree_peak_file_bytes"] / GIB})
        if run["rc"] == 0:
            p = run["parity"]
            assert p["passed"] and "PASS" in parity, (name[1], parity)
            values = {"KLD": p["kld"], "NMSE": p["nmse"], "top-1": p["top1"] * 100}
        else:  # the gate refused: its figures are in the log the JSON keeps
            log = run["log_tail"]
            assert "refused" in parity and ": FAIL" in log, (name[1], parity)
            values = {"NMSE": float(re.search(r"NMSE (\S+?),", log)[1]),
                      "top-1": float(re.search(r"top-1 ([\d.]+)%", log)[1])}
        named = [label for label in values if re.search(rf"\b{label} \d", parity)]
        _labelled(parity, {rf"\b{label} (\d[\d.e-]*\d)": values[label] for label in named})


def test_the_memory_cap_sections_prose_is_its_jsons_or_a_recorded_run():
    results = [_json(re.search(r"\]\((convert_cost-[\w.+-]+)\.md\)", row[0])[1] + ".json")
               for row in _table_rows(_page("convert_cost.md"), CAPPED)]
    loads = [r["machine"]["load_avg_1m_at_start"] for r in results]
    prose = "\n".join(line for line in _section(_page("convert_cost.md"), CAPPED).splitlines()
                      if not line.startswith("|"))
    text = _without_recorded(prose)
    assert f"load {min(loads):.1f}-{max(loads):.1f} at their start" in text, loads
    assert "0 OOM kills" in text and all(r["runs"][k]["cgroup"]["oom_kills"] == 0 for r in results for k in r["runs"])
    kept = {f"{min(loads):.1f}", f"{max(loads):.1f}", "0",
            *(str(r["machine"]["cpu_count"]) for r in results),
            *(f"{r['runs'][k]['cgroup']['limit_bytes'] / GIB:g}" for r in results for k in r["runs"])}
    assert not set(_numbers(text)) - kept, (sorted(set(_numbers(text)) - kept), sorted(kept))


def test_the_schema_1_cost_is_its_json():
    from edgemed.converters.quality.prompts import PROMPTS

    result = _json("convert_cost-qwen2.5-0.5b-instruct-q4_k_m.json")
    convert, parity = result["runs"]["convert"], result["runs"]["convert+parity"]
    text = _without_recorded(_section(_page("convert_cost.md"), "## Cost: `convert_cost-qwen2.5-0.5b-instruct"))
    _labelled(text, {r"\(([\d,]+) MB of BF16": result["checkpoint_mb"],
                     r"\*\*(\d[\d.]*) s wall": convert["wall_s"],
                     r"(\d[\d.]*) MB peak RSS": convert["peak_rss_mb"],
                     r"\((\d[\d.]*)x the checkpoint": convert["peak_rss_mb"] / result["checkpoint_mb"],
                     r"with the parity check, (\d[\d.]*) s": parity["wall_s"],
                     r"s and (\d[\d.]*) GB": parity["peak_rss_mb"] / 1000,  # MB to GB, as the page writes both
                     r"for (\d+) prompts": len(PROMPTS)})


def test_the_plan_memory_prose_is_its_jsons_or_an_older_planners_recorded_run():
    from edgemed.formats.nesting import loads_toml

    result = _json("plan_memory.json")
    text = _page("plan_memory.md")
    prose = _without_recorded("All within the" + text.split("\nAll within the", 1)[1].split("\n## ", 1)[0])
    n_ctx = int(re.search(r"for SmolLM2 at ([\d,]+) /", prose)[1].replace(",", ""))
    row = next(r for r in result["rows"] if r["model"].startswith("smollm2") and r["n_ctx"] == n_ctx)
    profile = loads_toml((ROOT / "device_profiles" / f"{row['profile']}.toml").read_text(encoding="utf-8"))
    load_modes = {r["load_mode"] for r in result["rows"]}
    assert len(load_modes) == 1, load_modes
    mapped = _json("load_mode-qwen2.5-1.5b-q4_k_m.json")["median"]["mmap"]
    _labelled(prose, {r"within the (\d+) % goal": result["goal_pct"],
                      r"\((\d+) MiB for SmolLM2": row["breakdown"]["work"] / MIB,
                      r"for SmolLM2 at ([\d,]+) /": row["n_ctx"],
                      r"for SmolLM2 at [\d,]+ / (\d+);": profile["llama"]["n_ubatch"],
                      r"`load_mode` (\d+) is": load_modes.pop(),
                      r"mapped, ([\d,]+) MiB": mapped["peak_rss"] / MIB})


def test_the_onnx_conversion_figures_are_a_json_or_a_recorded_run():
    text = _page("onnx_vs_gguf.md")
    genai = _without_recorded("The `--onnx-graph genai` route on"
                              + text.split("The `--onnx-graph genai` route on", 1)[1].split("\n\n", 1)[0])
    assert not _numbers(genai), _numbers(genai)
    conversion = _without_recorded("Conversion (" + text.split("\nConversion (", 1)[1].split("\n\n", 1)[0])
    assert "`convert_memory-qwen2.5-0.5b-instruct.json`" in conversion and "--routes onnx-int4`" in conversion
    row = next(r for r in _json("convert_memory-qwen2.5-0.5b-instruct.json")["rows"] if r["route"] == "onnx-int4")
    steps = {"export": "export", "fp32 parity": "parity_fp32", "quantize": "quantize", "int4 parity": "parity_int4"}
    _labelled(conversion, {r"(\d[\d.]*) s wall": row["wall_s"],
                           # peak RSS as convert_memory.md defines it: the larger of the sampled sum and wait4's
                           r"([\d,]+) MiB peak RSS": max(row["vmhwm"], row["peak_sampled_rss"]) / MIB,
                           **{rf"{words} (\d[\d.]*) s\b": row["timings_s"][key] for words, key in steps.items()}})



def _results_csv(folder: str) -> dict[str, dict[str, str]]:
    import csv

    with open(RESULTS / folder / "results.csv", newline="", encoding="utf-8") as f:
        return {row["config"]: row for row in csv.DictReader(f)}


SEVEN_B = "reproduce-r1-distill-qwen-7b-shaped"
SEVEN_B_PLAN = "plan_memory-r1-distill-qwen-7b-shaped.json"
SEVEN_B_CAPPED = "convert_cost-r1-distill-qwen-7b-shaped-q4_k_m-parity-cap6g.json"


def test_the_readme_paragraph_after_the_7b_table_is_its_results():
    """The paper's memory figure, the mapped loads' extra memory, the roofline and its bandwidth, the planners'
    errors, the 1.5B re-run's ratio and the capped 7B conversion are their result files', and the paragraph has no
    other figure."""
    from edgemed.runtime.plan import METHOD

    text = _flat((ROOT / "README.md").read_text(encoding="utf-8"))
    paragraph = re.search(r'The paper\'s "memory -[\d.]+ %" now holds.*?(?= ### )', text)[0]
    reproduce = json.loads((RESULTS / SEVEN_B / "results.json").read_text(encoding="utf-8"))
    table = _results_csv(SEVEN_B)
    extra = [float(table[f"{q}-mmap"]["peak_rss_mb"]) - float(table[q]["peak_rss_mb"]) for q in ("q4_k_m", "q4_0")]
    roofline = [float(row["roofline_fraction"]) * 100 for row in table.values() if row["runtime"] == "llama.cpp"]
    (plan,) = _json(SEVEN_B_PLAN)["rows"]
    errors = [row["error_pct"] for row in _json("plan_memory.json")["rows"]]
    rerun = _results_csv("reproduce-qwen2.5-1.5b-load-mode")
    run = _json(SEVEN_B_CAPPED)["runs"]["convert+parity"]
    log = run["log_tail"]
    assert "(`planner/2`) of the Q4_K_M" in paragraph and f"the planner is `{METHOD}` now" in paragraph
    _labelled(paragraph, {r'"memory -(\d[\d.]*) %"': reproduce["paper"]["memory_reduction"] * 100,
                          r"\(\+([\d,]+)-[\d,]+ MiB here\)": min(extra),
                          r"\(\+[\d,]+-([\d,]+) MiB here\)": max(extra),
                          r"runs at (\d+)-\d+ % of the read-bandwidth roofline": min(roofline),
                          r"runs at \d+-(\d+) % of the read-bandwidth roofline": max(roofline),
                          r"roofline \((\d[\d.]*) GB/s": reproduce["bandwidth"]["read"]["bytes_per_s"] / 1e9,
                          r"GB/s with (\d+) threads": reproduce["bandwidth"]["threads"],
                          r"a filled ([\d,]+)-token context": plan["n_ctx"],
                          r"within (\d[\d.]*) % of the measured peak": abs(plan["error_pct"]),
                          r"within (-?\d[\d.]*) to \+": min(errors),
                          r"to \+(\d[\d.]*) % \(": max(errors),
                          r"gives Q4_K_M (\d[\d.]*) of F16's peak": float(rerun["q4_k_m"]["peak_rss_mb"])
                          / float(rerun["f16"]["peak_rss_mb"]),
                          r"under a (\d+) GiB hard cap": run["cgroup"]["limit_bytes"] / GIB,
                          r"\((\d[\d.]*) GiB peak RSS\)": run["memory"]["tree_peak_rss_bytes"] / GIB,
                          r"it exited (\d+) because": run["rc"],
                          r"\(top-1 (\d[\d.]*) %, must": float(re.search(r"top-1 ([\d.]+)%", log)[1]),
                          r"must be >= (\d+) %\)": float(re.search(r"must be >= (\d+)%", log)[1])})


def _measurement(page: str) -> str:
    """A decision record's Measurement section on one line, the words of every recorded run cut out."""
    return _without_recorded(_section(_page(page), "## Measurement"))


def test_decision_0004s_measurements_are_their_jsons():
    """The load-mode run, the 7B-shaped reproduce run and the planner's 1.5B row, each its result file's."""
    text = _measurement(D0004)
    mapped, read_in = (_json("load_mode-qwen2.5-1.5b-q4_k_m.json")["median"][mode] for mode in ("mmap", "none"))
    table = _results_csv(SEVEN_B)
    row = next(r for r in _json("plan_memory.json")["rows"] if r["model"].startswith("qwen2.5-1.5b")
               and r["n_ctx"] == int(re.search(r"the 1\.5B Q4_K_M at ([\d,]+) tokens", text)[1].replace(",", "")))
    _labelled(text, {r"mapped ([\d,]+) MiB peak": mapped["peak_rss"] / MIB,
                     r"\(([\d,]+) MiB file pages": mapped["rss_file"] / MIB,
                     r"\+ ([\d,]+) MiB anonymous\)": mapped["rss_anon"] / MIB,
                     r"read in ([\d,]+) MiB \(": read_in["peak_rss"] / MIB,
                     r"\(([\d,]+) MiB file\)": read_in["rss_file"] / MIB,
                     r"decode (\d[\d.]*) vs \d[\d.]* tok/s; load": mapped["decode_tok_s"],
                     r"decode \d[\d.]* vs (\d[\d.]*) tok/s; load": read_in["decode_tok_s"],
                     r"load (\d[\d.]*) vs": mapped["load_s"],
                     r"load \d[\d.]* vs (\d[\d.]*) s": read_in["load_s"],
                     r"Q4_K_M ([\d,]+) MiB read in": float(table["q4_k_m"]["peak_rss_mb"]),
                     r"against ([\d,]+) MiB mapped": float(table["q4_k_m-mmap"]["peak_rss_mb"]),
                     r"decode (\d[\d.]*) vs \d[\d.]* tok/s; Q4_K_M": float(table["q4_k_m"]["decode_tok_s_p50"]),
                     r"vs (\d[\d.]*) tok/s; Q4_K_M's": float(table["q4_k_m-mmap"]["decode_tok_s_p50"]),
                     r"peak is (\d[\d.]*) of F16's": float(table["q4_k_m"]["peak_rss_mb"])
                     / float(table["f16"]["peak_rss_mb"]),
                     r"\(([\d,]+) / [\d,]+ MiB\)": float(table["q4_k_m"]["peak_rss_mb"]),
                     r"\([\d,]+ / ([\d,]+) MiB\)": float(table["f16"]["peak_rss_mb"]),
                     r"at ([\d,]+) tokens": row["n_ctx"],
                     r"predicted ([\d,.]+) MiB": row["predicted"] / MIB,
                     r"measured ([\d,.]+) MiB": row["measured"] / MIB,
                     r"\(\+(\d[\d.]*) %\)": row["error_pct"]})  # "+" as written: above the measured


def test_decision_0004s_status_names_the_planner_it_came_with_and_the_one_that_measured_it():
    """The planner the decision came with is the one the commit named made (its parent had another), and the planner
    of the measurement is the one ``plan_memory.json`` was written with, at the commit named, as the Measurement
    says."""
    status = _flat(_page(D0004).split("\n\n", 2)[1])
    came, made = re.search(r"accepted with `(planner/\d+)` \(commit (\w+)\)", status).groups()
    measured, wrote = re.search(r"the measurement below is `(planner/\d+)`'s \(`plan_memory\.json`, written at commit "
                                r"(\w+)\)", status).groups()
    assert sorted(set(re.findall(r"planner/\d+", status))) == sorted({came, measured}), status
    assert f'METHOD = "{came}"' in _at(made, "edgemed/planner.py")
    assert f'METHOD = "{came}"' not in _at(f"{made}^", "edgemed/planner.py")
    assert json.loads(_at(wrote, "benchmarks/results/plan_memory.json")) == _json("plan_memory.json")
    assert f'METHOD = "{measured}"' in _at(wrote, "edgemed/runtime/plan.py")
    assert f"`plan_memory.json`, `{measured}`, every row loaded read in" in _measurement(D0004)


def test_decision_0005s_measurements_are_a_json_or_a_recorded_run():
    """The capped 7B conversion is its JSON's and is said to predate the change, as convert_cost.md's table notes;
    the default buffers' figures are a recorded run's."""
    text = _measurement(D0005)
    run = _json(SEVEN_B_CAPPED)["runs"]["convert+parity"]
    _labelled(text, {r"under a (\d+) GiB cap": run["cgroup"]["limit_bytes"] / GIB,
                     r"cap, (\d[\d.]*) GiB tree peak": run["memory"]["tree_peak_rss_bytes"] / GIB,
                     r"of which (\d[\d.]*) GiB anonymous": run["memory"]["tree_peak_anon_bytes"] / GIB})
    assert "in a run made before this change (commit 7e83cbf)" in text
    rows = _table_rows(_page("convert_cost.md"), CAPPED)
    assert SEVEN_B_CAPPED.removesuffix(".json") in rows[2][0], rows
    assert "The first and third runs were made before parity compared prompt by prompt and loaded the GGUF without " \
           "the CPU repack (commit 7e83cbf)" in _flat(_page("convert_cost.md"))


ONE_AND_A_HALF_B_CAPPED = "convert_cost-qwen2.5-1.5b-instruct-q4_k_m-parity-cap2.5g.json"


def test_decision_0008s_context_is_the_7b_shapes_config_and_the_capped_runs_machine():
    """The 7B's float32 weights are the estimator's parameter count of the shape's config, in float32; the box's
    cores and memory (to a tenth of a GiB) are the ones both capped runs of the Measurement record."""
    from edgemed.benchmarks.shaped_checkpoint import shape_config
    from edgemed.converters.budget.peaks import Dims

    context = _without_recorded(_section(_page(D0008), "## Context"))
    machines = {(m["cpu_count"], m["ram_bytes"]) for m in
                (_json(name)["machine"] for name in (ONE_AND_A_HALF_B_CAPPED, SEVEN_B_CAPPED))}
    assert len(machines) == 1, machines
    ((cores, ram),) = machines
    params = Dims.from_config(shape_config("r1-distill-qwen-7b")).params
    _labelled(context, {r"on the (\d+)-core box": cores,
                        r"float32 weights alone are (\d[\d.]*) GiB": params * 4 / GIB,  # float32: 4 bytes a weight
                        r"the box's (\d+\.\d) GiB \(`ram_bytes` in the capped runs' JSONs": ram / GIB})


def test_decision_0008s_measurements_are_their_jsons_a_recorded_run_or_the_tests_tolerance():
    text = _measurement(D0008)
    capped = [_json(name)["runs"]["convert+parity"] for name in (ONE_AND_A_HALF_B_CAPPED, SEVEN_B_CAPPED)]
    tolerance = re.search(r"^TOL = (\S+)", (ROOT / "tests" / "test_layered_reference.py").read_text(encoding="utf-8"),
                          re.MULTILINE)[1]
    assert capped[0]["parity"]["passed"] and "parity PASS" in text
    _labelled(text, {r"stand-in, (\d[\d.]*) GiB cap": capped[0]["cgroup"]["limit_bytes"] / GIB,
                     r"tree peak (\d[\d.]*) GiB": capped[0]["memory"]["tree_peak_rss_bytes"] / GIB,
                     r"random weights\), (\d+) GiB cap": capped[1]["cgroup"]["limit_bytes"] / GIB,
                     r"cap: (\d[\d.]*) GiB peak, parity ran": capped[1]["memory"]["tree_peak_rss_bytes"] / GIB,
                     r"within (\d[\d.e-]*) of the largest": float(tolerance)})


def _memory_results() -> list[dict]:
    return [json.loads(path.read_text(encoding="utf-8")) for path in sorted(RESULTS.glob("convert_memory-*.json"))]


def _memory_rows() -> dict[tuple[str, str], dict]:
    """Every row of the convert_memory JSONs, by (model, route)."""
    return {(result["model"], row["route"]): row for result in _memory_results() for row in result["rows"]}


def test_convert_memorys_method_is_the_scripts_and_its_runs_predate_the_commits_named():
    """The sampling period is the script's, the design's files exist, and each JSON was in the tree, as it is now,
    before each commit the page says its runs predate."""
    import inspect

    from edgemed.benchmarks.convert_memory import measure

    text = _page(MEMORY).split("\n| model | route |", 1)[0]
    period = inspect.signature(measure).parameters["period"].default
    _labelled(_without_recorded(text), {r"every (\d+) ms": period * 1000})
    for path in re.findall(r"`(converters/[\w/]+\.py)`", text):
        assert (ROOT / path).is_file(), path
    commits = re.findall(r"before commit (\w+), from which", _flat(text))
    assert len(commits) == 2, commits  # parity prompt by prompt without the repack; the 4-bit types calibrated
    for commit in commits:
        for path in sorted(RESULTS.glob("convert_memory-*.json")):
            at = _at(f"{commit}^", f"benchmarks/results/{path.name}")
            assert json.loads(at) == json.loads(path.read_text(encoding="utf-8")), (commit, path.name)


def test_convert_memorys_table_is_its_jsons():
    """Each row's estimates, peaks, ratios and biggest term ('same': the row above's) are its JSON row's, and every
    row of both JSONs is in the table once."""
    from edgemed.benchmarks.convert_memory import peak_rss

    rows, kept = _table_rows(_page(MEMORY), "| model | route |"), _memory_rows()
    seen, above = [], None
    for model, route, resident, anon, ratio, rss, peak, ratio_rss, biggest in rows:
        key = (model.strip("`"), route.strip("`"))
        row = kept[key]
        score, estimate = row["score"], row["score"]["estimate"]
        assert [resident, anon, rss, peak] == [f"{value / MIB:,.0f} MiB" for value in (
            estimate["resident"], row["peak_anon"], estimate["rss"], peak_rss(row))], key
        assert [ratio, ratio_rss] == [f"{score['ratio_anon']:.2f}", f"{score['ratio_total']:.2f}"], key
        assert biggest == ("same" if estimate["biggest"] == above else estimate["biggest"]), key
        seen.append(key)
        above = estimate["biggest"]
    assert sorted(seen) == sorted(kept), (seen, sorted(kept))


def test_convert_memorys_ratios_are_its_jsons():
    """The routes' largest ratios, the range of the steps' ratios within the JSON's goal, and the two steps outside it
    with their figures."""
    (goal,) = {result["goal"] for result in _memory_results()}
    limit = float(re.search(r"<= (\d[\d.]*)x measured", goal)[1])
    rows = _memory_rows()
    steps = {(*key, step): (v["estimate"], v["anon"]) for key, row in rows.items()
             for step, v in row["score"]["steps"].items()}
    ratio = {key: estimate / anon for key, (estimate, anon) in steps.items()}
    within = [r for r in ratio.values() if 1 <= r <= limit]
    over = [key for key, r in ratio.items() if r > limit]
    under = [key for key, r in ratio.items() if r < 1]
    assert [key[1:] for key in over] == [("onnx-fp32-genai", "export")], over  # the page's "genai route's export step"
    assert [key[1:] for key in under] == [("gguf-q4_k_m-imatrix", "tokenizer_check")], under  # "after the imatrix"
    (over,), (under,) = over, under
    assert all(r["score"]["ratio_anon"] >= 1 and r["score"]["ratio_total"] >= 1 for r in rows.values())
    (text,) = [block for block in map(_flat, _blocks(_page(MEMORY))) if block.startswith("Every route's estimate")]
    _labelled(text, {r"at most (\d[\d.]*)x it \(resident\)": max(r["score"]["ratio_anon"] for r in rows.values()),
                     r"/ (\d[\d.]*)x \(RSS\)": max(r["score"]["ratio_total"] for r in rows.values()),
                     r"`steps`\): (\d[\d.]*)-": min(within),
                     r"`steps`\): [\d.]+-(\d[\d.]*)x": max(within),
                     r"the genai route's export step, (\d[\d.]*)x": ratio[over],
                     r"an estimated ([\d,]+) MiB against": steps[over][0] / MIB,
                     r"against ([\d,]+) MiB measured\)": steps[over][1] / MIB,
                     r"after the imatrix, `tokenizer_check` measured ([\d,]+) MiB": steps[under][1] / MIB,
                     r"against an estimated ([\d,]+) MiB\)": steps[under][0] / MIB})


def test_convert_memorys_lessons_are_a_recorded_run_or_the_code():
    """What the runs taught and what was not measured: recorded figures, and the quantizer's slab size, the code's;
    the constants named are the estimator's; the builder's 5.3 GB is the onnx_vs_gguf page's recorded run."""
    from edgemed.converters.budget import peaks
    from edgemed.converters.gguf.quantize import MAX_BUF_BYTES

    page = _page(MEMORY)
    text = "What the runs taught" + page.split("\nWhat the runs taught", 1)[1].split("\n## ", 1)[0]
    _labelled(_without_recorded(text), {r"`quantize\.MAX_BUF_BYTES` \((\d+) MiB\)": MAX_BUF_BYTES / MIB})
    named = re.findall(r"`([A-Z][A-Z_]+)`", text)
    assert named and all(isinstance(getattr(peaks, name, None), (int, float)) for name in named), named
    builder = re.search(r"its builder alone was (\d[\d.]*) GB", page)[1]
    assert any(f"{builder} GB peak RSS" in words for page_, words, *_ in RECORDED if page_ == "onnx_vs_gguf.md")


SHAPE_7B = "r1-distill-qwen-7b"


def _shape_7b():
    from edgemed.benchmarks.shaped_checkpoint import shape_config
    from edgemed.converters.budget.peaks import Dims

    config = shape_config(SHAPE_7B)
    return config, Dims.from_config(config)


def _seven_b_section() -> str:
    return _page(MEMORY).split("\n## The 7B shape", 1)[1]


def test_convert_memorys_7b_shape_is_the_shaped_checkpoints():
    """The heading's shape is the config ``shaped_checkpoint`` writes, and the lead into the table has no figure."""
    config, _ = _shape_7b()
    heading, lead = _seven_b_section().split("\n", 1)[0], _section(_page(MEMORY), "## The 7B shape").split("\n|")[0]
    assert "untied" in heading and config["tie_word_embeddings"] is False
    _labelled(heading, {r"Qwen2, (\d+) layers": config["num_hidden_layers"], r"hidden (\d+)": config["hidden_size"],
                        r"(\d+)/\d+ heads": config["num_attention_heads"],
                        r"\d+/(\d+) heads": config["num_key_value_heads"],
                        r"FFN (\d+)": config["intermediate_size"], r"vocab (\d+)": config["vocab_size"]})
    assert f'`Dims.from_config(shape_config("{SHAPE_7B}"))`' in _flat(lead)
    assert not _numbers(lead), _numbers(lead)


def _seven_b_estimates(cell: str, dims) -> list:
    """The estimates a route cell names: one for a GGUF route (its flags as the estimator names them, with the
    importance matrix a 4-bit type computes by default), the four ONNX variants of one graph."""
    from edgemed.converters.budget.peaks import estimate_gguf, estimate_onnx
    from edgemed.converters.gguf.calibration import default_imatrix

    flags = re.match(r"`([^`]*)`", cell)[1]
    if flags.startswith("--to onnx"):
        graph = re.fullmatch(r"--to onnx --onnx-graph (\w+)", flags)[1]
        assert cell == f"`{flags}` (`--quant fp32` or `int4`, with or without `--no-parity`)", cell
        return [estimate_onnx(dims, out_type=q, graph=graph, parity=p) for q in ("fp32", "int4") for p in (True, False)]
    out_type = re.match(r"--quant (\w+)", flags)[1]
    imatrix = "--no-imatrix" not in flags and default_imatrix(out_type) is not None
    estimate = estimate_gguf(dims, out_type=out_type, parity="--no-parity" not in flags, imatrix=imatrix)
    assert cell == f"`{flags}`" and estimate.route == f"convert --to gguf {flags}", (cell, estimate.route)
    return [estimate]


def test_convert_memorys_7b_table_is_the_current_estimators():
    """Each route's resident peak, RSS and biggest term are what the estimator gives for the 7B shape's config now."""
    _, dims = _shape_7b()
    rows = _table_rows(_seven_b_section(), "| route |")
    assert len(rows) >= 10, rows
    for route, resident, rss, biggest in rows:
        said = {(f"{e.resident / GIB:.1f} GiB", f"{e.rss / GIB:.1f} GiB", e.biggest)
                for e in _seven_b_estimates(route, dims)}
        assert said == {(resident, rss, biggest)}, (route, said)


def test_convert_memorys_7b_refusal_is_the_budget_checks():
    """Under the budget the paragraph names, the default Q4_K_M conversion (importance matrix, parity) fits, and the
    default ONNX conversion is refused with the words quoted, its fix and figures as the checks give them."""
    from types import SimpleNamespace

    from edgemed.converters.budget import peaks
    from edgemed.converters.gguf.calibration import default_imatrix
    from edgemed.converters.onnx.export import OnnxOptions
    from edgemed.errors import InputError

    config, dims = _shape_7b()
    (text,) = [block for block in map(_flat, _blocks(_seven_b_section())) if block.startswith("So with")]
    budget = re.match(r"So with `--memory-budget (\w+)` the 7B converts to GGUF with its importance matrix and parity "
                      r"check, and the ONNX route is refused", text)[1]
    checkpoint = SimpleNamespace(config=config, tensors=None, source_dtype=lambda: "BF16", weight_files=lambda: ())
    source = SimpleNamespace(checkpoint=checkpoint, adapter=None)
    fits = peaks.check_gguf(source, SimpleNamespace(out_type="q4_k_m", parity=True, memory_budget=budget,
                                                    imatrix_from=default_imatrix("q4_k_m")))
    assert fits.route == "convert --to gguf --quant q4_k_m", fits.route
    opts = OnnxOptions(memory_budget=budget)
    with pytest.raises(InputError) as refused:
        peaks.check_onnx(source, opts)
    quoted = re.search(r'"would need (.*?)"', text)[1]
    assert all(part in str(refused.value) for part in quoted.split(" ... ")), (quoted, str(refused.value))
    fix = re.search(r"Its fix names `([^`]*)`", text)[1]
    assert fix in refused.value.fix, (fix, refused.value.fix)
    onnx = peaks.estimate_onnx(dims, out_type=opts.weight_type, graph=opts.graph)
    assert f"(peak {fits.resident / GIB:.1f} GiB)" in fix and "importance matrix included" in text
    export = float(re.search(r", (\d[\d.]*) GiB, in step", onnx.biggest)[1])
    _labelled(text, {r"would need about (\d[\d.]*) GiB": onnx.resident / GIB,
                     r"\(float32\), (\d[\d.]*) GiB, in step": export,
                     r"Q4_K_M peaks at (\d[\d.]*) GiB": fits.resident / GIB})


ONNX_DECODE = "onnx_vs_gguf-qwen2.5-0.5b-instruct.json"
ONNX_CONVERTED = "convert_memory-qwen2.5-0.5b-instruct.json"


def _builder_rows() -> list[list[str]]:
    return _table_rows(_page("onnx_vs_gguf.md"), "## The builder, evaluated first")


def test_the_builder_evaluation_is_a_recorded_run():
    """The builder's conversion and its traps are figures of a recorded run, and the paragraph has no other."""
    text = _section(_page("onnx_vs_gguf.md"), "## The builder, evaluated first").split("\n|", 1)[0]
    assert not _numbers(_without_recorded(text)), _numbers(_without_recorded(text))


def _fused_graphs_gains() -> list[float]:
    """The builder's decode speed over ours, in %, for each int4 setting the builder table has both graphs with."""
    rows = _builder_rows()
    assert len(rows) == 4, rows
    gains = []
    for builder, ours in ((rows[0], rows[1]), (rows[2], rows[3])):
        assert builder[0].startswith("builder") and ours[0].strip("*").startswith("ours"), (builder, ours)
        assert builder[1].split(",")[0] == ours[1].split(",")[0], (builder, ours)  # symmetric / asymmetric
        gains.append((float(builder[2]) / float(ours[2]) - 1) * 100)
    return gains


def test_the_fused_graphs_worth_is_the_builder_tables_decode_speeds():
    """'7-16 %' (twice on the page) is the builder's decode speed over ours, with the same int4 settings."""
    gains = _fused_graphs_gains()
    worth = f"{min(gains):.0f}-{max(gains):.0f} %"
    text = _flat(_page("onnx_vs_gguf.md"))
    assert f"the builder's fused graph is worth {worth} of decode speed" in text, (worth, gains)
    assert f"which is its {worth};" in text, (worth, gains)


def test_the_int4_recipe_section_is_a_recorded_run_and_its_jsons():
    """The variants are a recorded run's; the fp32 embedding is its shape in float32, of the directory's size."""
    text = _without_recorded(_section(_page("onnx_vs_gguf.md"), "## The int4 recipe"))
    shape = re.search(r"stays fp32: ([\d,]+) x ([\d,]+) values", text).groups()
    vocab, width = (int(n.replace(",", "")) for n in shape)
    row = next(r for r in _json(ONNX_CONVERTED)["rows"] if r["route"] == "onnx-int4")
    _labelled(text, {r"stays fp32: ([\d,]+) x": vocab, r"x ([\d,]+) values": width,
                     r"values \([^)]*\), (\d[\d.]*) MB": vocab * width * 4 / 1e6,  # float32: 4 bytes a value
                     r"MB \((\d[\d.]*) MiB\) of the int4": vocab * width * 4 / MIB,
                     r"directory's (\d[\d.]*) MB": row["size_bytes"] / 1e6,
                     r"; (\d[\d.]*) MiB, `size_mb`": _json(ONNX_DECODE)["configs"]["onnx-int4"]["size_mb"]})
    assert f"`size_bytes` in `{ONNX_CONVERTED}`" in text


def test_the_fp32_embeddings_shape_is_the_models():
    """The shape the int4 recipe section gives the embedding is the 0.5B model's (vocabulary by width), read from the
    GGUF the pip package carries where it is installed."""
    from edgemed.converters.source import pip_models

    from edgemed.errors import InputError
    from edgemed.runtime.plan import read_shape

    try:
        path = pip_models.gguf_file("qwen2.5-0.5b-instruct")
    except InputError as exc:
        pytest.skip(f"real model 'qwen2.5-0.5b-instruct' not installed: {exc.fix}")
    shape = read_shape(path)
    assert f"stays fp32: {shape.n_vocab:,} x {shape.n_embd:,} values" in _flat(_page("onnx_vs_gguf.md"))


def test_the_parity_sections_figures_are_a_recorded_run_or_their_jsons():
    """Beside the recorded run: the prompts are the spine's, the later GGUF run's positions and the int4 and GGUF
    sizes are their JSONs', and the caveat's block size is the converter's."""
    from edgemed.converters.quality.prompts import PROMPTS

    page = _page("onnx_vs_gguf.md")
    section = _section(page, "## Parity (")
    lead = _flat(section.split("\n|", 1)[0])
    assert f"the spine's {len(PROMPTS)} medical prompts" in lead
    gguf = _json("convert_cost-qwen2.5-0.5b-instruct-q4_k_m-parity-table.json")["runs"]["convert+parity"]
    _labelled(_without_recorded(lead), {r"run, on (\d+) positions": gguf["parity"]["n_positions"]})
    assert "`output_bytes` of `convert_cost-qwen2.5-0.5b-instruct-q4_k_m-parity-table.json`" in lead
    onnx = next(r for r in _json(ONNX_CONVERTED)["rows"] if r["route"] == "onnx-int4")
    mib = {name: config["size_mb"] for name, config in _json(ONNX_DECODE)["configs"].items()}
    rows = _table_rows(page, "## Parity (")
    assert [row[0].split(" ")[:2] for row in rows] == [["ONNX", "fp32"], ["ONNX", "int4"], ["GGUF", "Q4_K_M"]], rows
    _labelled(rows[1][4], {r"^(\d[\d,]*) MB": onnx["size_bytes"] / 1e6, r"(\d[\d.]*) MiB": mib["onnx-int4"]})
    _labelled(rows[2][4], {r"^(\d[\d,]*) MB": gguf["output_bytes"] / 1e6, r"(\d[\d.]*) MiB": mib["gguf-q4_k_m"]})
    caveat = _flat(next(block for block in _blocks(section) if block.startswith("Caveat:")))
    export = (ROOT / "converters" / "onnx" / "export.py").read_text(encoding="utf-8")
    block = re.search(r"block_size: int = (\d+)", export)
    _labelled(caveat, {r"\(block (\d+), RTN\)": int(block[1])})


DECODE = "## Decode: `onnx_vs_gguf-qwen2.5-0.5b-instruct.json`"
#: the decode table's configurations, by the names the JSON gives them
DECODE_ROWS = {"ONNX int4 (edgemed engine)": "onnx-int4", "GGUF Q4_K_M (llama.cpp)": "gguf-q4_k_m",
               "GGUF F16": "gguf-f16", "builder int4 default, onnxruntime-genai runtime": "genai-builder"}


def test_the_onnx_decode_table_is_its_json():
    configs = _json(ONNX_DECODE)["configs"]
    section = _section(_page("onnx_vs_gguf.md"), DECODE)
    rows = _table_rows(section, "interleaved):")
    assert [row[0] for row in rows] == list(DECODE_ROWS), rows
    for name, best, runs, prefill, peak, size in rows:
        config = configs[DECODE_ROWS[name]]
        assert best.strip("*") == f"{config['decode_tok_s']:.1f}" == f"{max(config['decode_tok_s_runs']):.1f}", name
        assert runs == ", ".join(f"{run:.1f}" for run in config["decode_tok_s_runs"]), name
        assert [prefill, peak, size] == [f"{config['prefill_tok_s']:.0f}", f"{config['peak_rss_mb']:,.0f}",
                                         f"{config['size_mb']:,.0f}"], name
    assert {len(c["decode_tok_s_runs"]) for c in configs.values()} == {3} and "(best of 3)" in section


def test_the_onnx_decode_prose_is_its_json_or_a_recorded_run():
    """The tokens, the ratio and its goal (the benchmark's), the profile's thread and shares, the fused graph's worth
    and the builder's speed; the --threads 2 collapse and the node count are a recorded run's."""
    result = _json(ONNX_DECODE)
    profile = {row["op"]: row["share"] * 100 for row in result["onnx_decode_profile"]}
    outside = next(share for op, share in profile.items() if op.startswith("(outside kernels"))
    benchmark = (ROOT / "benchmarks" / "onnx_vs_gguf.py").read_text(encoding="utf-8")
    goal = re.search(r"\(goal >= (\d[\d.]*)x\)", benchmark)
    gains = _fused_graphs_gains()
    prose = "\n".join(line for line in _section(_page("onnx_vs_gguf.md"), DECODE).splitlines()
                      if not line.startswith("|"))
    text = _without_recorded(prose)
    assert "are MiB (2^20 bytes)" in text
    _labelled(text.replace("(2^20 bytes)", " "),
              {r"\((\d+) greedy tokens": result["tokens"],
               r"= (\d[\d.]*)x \(goal": result["onnx_int4_over_gguf_q4_k_m"],
               r"\(goal >= (\d[\d.]*)x\)": float(goal[1]),
               r"decode steps only, (\d+) thread\)": result["threads"],
               r"`MatMulNBits` (\d+) %": profile["MatMulNBits"],
               r"Where/Equal\) (\d+) %": 100 - profile["MatMulNBits"] - outside,
               r"allocation\) (\d+) %": outside,
               r"which is its (\d+)-\d+ %": min(gains),
               r"which is its \d+-(\d+) %": max(gains),
               r"the rest of its (\d+) tok/s": result["configs"]["genai-builder"]["decode_tok_s"]})


def test_the_genai_graph_decode_is_its_json():
    configs = _json("onnx_vs_gguf-qwen2.5-0.5b-instruct-genai-graph.json")["configs"]
    text = _flat(_section(_page("onnx_vs_gguf.md"), "## The genai graph: "))
    _labelled(text, {r"edgemed engine (\d[\d.]*) tok/s": configs["onnx-int4"]["decode_tok_s"],
                     r"onnxruntime-genai runtime (\d[\d.]*),": configs["genai-builder"]["decode_tok_s"],
                     r"GGUF Q4_K_M (\d[\d.]*),": configs["gguf-q4_k_m"]["decode_tok_s"],
                     r"F16 (\d[\d.]*)\.": configs["gguf-f16"]["decode_tok_s"]})

def _blocks_holding(text: str, words: str) -> list[tuple[str, str]]:
    """Each block (paragraph or list item) holding ``words``, with the paragraph leading into its list."""
    blocks = [_flat(block) for block in _blocks(text)]
    found = []
    for i, block in enumerate(blocks):
        if words in block:
            lead = next((b for b in reversed(blocks[:i]) if not b.startswith("- ")), "") if block.startswith("- ") \
                else ""
            found.append((block, lead))
    return found


@pytest.mark.parametrize("page, words, commit", [(p, w, c) for p, w, c, _ in RECORDED] + PLANNED,
                         ids=[f"{p}:{w[:24]}" for p, w, *_ in RECORDED + PLANNED])
def test_a_run_no_result_file_keeps_is_a_note_naming_the_commit_that_recorded_it(page, words, commit):
    holding = _blocks_holding(_page(page), words)
    assert holding, f"{page} no longer says {words!r}: a figure of a run no result file keeps cannot be changed"
    assert any(commit in block and "no result file" in f"{block} {lead}".lower() for block, lead in holding), \
        f"{page}: {words!r} is not in a note naming commit {commit} and saying no result file keeps it"


def _at(commit: str, path: str) -> str:
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed: the recorded figures cannot be compared with their commits")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([git, "-C", str(ROOT), *args], capture_output=True, text=True, check=False)

    held = run("cat-file", "-e", f"{commit}^{{commit}}")
    if held.returncode != 0:
        pytest.skip(f"this copy has no commit {commit} (a shallow clone or an export): {held.stderr.strip()}")
    done = run("show", f"{commit}:{path}")
    assert done.returncode == 0, f"commit {commit} has no {path}: {done.stderr.strip()}"
    return done.stdout


@pytest.mark.parametrize("page, words, commit, path", RECORDED, ids=[f"{p}:{w[:24]}" for p, w, *_ in RECORDED])
def test_a_recorded_figure_is_what_its_commit_recorded(page, words, commit, path):
    assert words in _flat(_at(commit, path)), f"{path} at {commit} does not say {words!r}"


@pytest.mark.parametrize("page, words, commit", PLANNED, ids=[c for *_, c in PLANNED])
def test_an_older_planners_figures_are_plan_memory_json_at_its_commit(page, words, commit):
    rows = json.loads(_at(commit, "benchmarks/results/plan_memory.json"))["rows"]
    kept = set()
    for row in rows:
        for value in (row["predicted"] / MIB, row["measured"] / MIB, abs(row["error_pct"])):
            kept |= {f"{value:.1f}", f"{value:.0f}"}
        kept.add(str(row["n_ctx"]))
    quoted = _numbers(words)
    assert len(quoted) >= 6 and not set(quoted) - kept, (sorted(set(quoted) - kept), sorted(kept))



def test_the_7b_plan_is_the_one_its_planner_made_at_the_commit_named():
    """The 7B plan the README quotes as `planner/2`'s is the result file commit fb02b70 wrote, with that planner."""
    assert "`planner/2` at commit fb02b70, in `plan_memory-r1-distill-qwen-7b-shaped.json`" in _flat(
        _page("plan_memory.md"))
    assert json.loads(_at("fb02b70", f"benchmarks/results/{SEVEN_B_PLAN}")) == _json(SEVEN_B_PLAN)
    assert 'METHOD = "planner/2"' in _at("fb02b70", "edgemed/planner.py")


@pytest.mark.parametrize("page, after, commit, path, there, cells", RECORDED_TABLES,
                         ids=[after for _, after, *_ in RECORDED_TABLES])
def test_a_table_of_a_run_no_result_file_keeps_is_what_its_commit_recorded(page, after, commit, path, there, cells):
    """Each row's first cells (``cells``, row by row) are the row the commit recorded, and the paragraph leading into
    the table names the commit and says no result file keeps it."""
    text = _page(page)
    lead = _flat(_blocks(text.split(after, 1)[1].split("\n|", 1)[0])[-1])
    assert commit in lead and "no result file" in lead.lower(), lead
    rows, recorded = _table_rows(text, after), _table_rows(_at(commit, path), there)
    assert len(rows) == len(recorded) == len(cells), (rows, recorded)
    assert [row[:n] for row, n in zip(rows, cells)] == [row[:n] for row, n in zip(recorded, cells)]

def _body_at(path: str, literal: str) -> str:
    """A JSON text holding ``literal`` at the dotted ``path`` (a number there is a list index)."""
    text = literal
    for part in reversed(path.split(".")):
        text = f"[{'0, ' * int(part)}{text}]" if part.isdigit() else f'{{"{part}": {text}}}'
    return text


def test_the_openai_page_refuses_nan_as_loads_body_does():
    """docs/openai.md's paragraph on NaN, Infinity, -Infinity and 1e999: each literal, the status, type and code,
    each ``param`` it gives as an example, the quoted message and the words as text are what ``loads_body`` does."""
    pytest.importorskip("pydantic")
    from edgemed.serve.api import ApiError, loads_body

    blocks = [_flat(b) for b in _blocks((ROOT / "docs" / "openai.md").read_text(encoding="utf-8")) if "1e999" in b]
    assert len(blocks) == 1, "docs/openai.md should say, in one paragraph, how a body holding NaN is refused"
    (text,) = blocks
    status, type_, code = re.search(r"a (\d{3}) `(\w+)`, code `(\w+)`", text).groups()

    def refused(body: str) -> ApiError:
        with pytest.raises(ApiError) as caught:
            loads_body(body)
        error = caught.value
        assert (str(error.status), error.type, error.code) == (status, type_, code), (body, vars(error))
        return error

    for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
        assert f"`{literal}`" in text, literal
        error = refused(_body_at("a.0.b", literal))
        assert error.param == "a.0.b" and f"'a.0.b' is {literal}," in error.message, vars(error)
    examples = re.findall(r"`([\w.]+)`", re.search(r"the first such number in the body \(([^;]*);", text)[1])
    assert len(examples) >= 3, examples
    for path in examples:
        assert refused(_body_at(path, "NaN")).param == path
    assert refused('{"a": 1, "b": Infinity, "c": NaN}').param == "b"  # the first in the body
    assert "`null` when the whole body is one" in text and refused("NaN").param is None
    message = re.search(r"`(Invalid request: [^`]*)`", text)[1]
    field, literal = re.search(r"'([\w.]+)' is (\S+),", message).groups()
    actual = refused(_body_at(field, literal)).message
    assert all(part in actual for part in message.split(" ... ")), (message, actual)
    assert "inside a string are text" in text
    assert loads_body('{"content": "NaN Infinity -Infinity 1e999"}') == {"content": "NaN Infinity -Infinity 1e999"}
