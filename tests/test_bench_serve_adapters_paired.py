"""serve_adapters' summary: ratios taken inside each round, not best over best; stored results re-rendered that way."""

import itertools
import json
import re
import shutil
import statistics
from pathlib import Path

import pytest
from edgemed.benchmarks import serve_adapters as sa

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "serve_adapters"
#: a figure with three decimals, alone or before "x" or "-" (1.106x, 0.757-0.887)
FIGURE = r"(?<![\d.])\d\.\d{3}(?![\d.])"


def _run(r: int, decode: float, e2e: float) -> dict:
    return {"round": r, "streams": 4, "requests": 8, "completion_tokens": 768, "decode_tok_s": decode,
            "e2e_tok_s": e2e, "ttft_p50_s": 1.2, "loadavg": [1.0, 1.2]}


# edgemed is best in round 0, llama-server in round 1: best over best pairs two different rounds
RUNS = {"0": {"edgemed": [_run(0, 50.0, 40.0), _run(1, 40.0, 30.0), _run(2, 45.0, 36.0)],
              "llama-server": [_run(0, 30.0, 22.0), _run(1, 34.0, 26.0), _run(2, 31.0, 23.0)]},
        "2": {"edgemed": [_run(0, 30.0, 24.0), _run(1, 22.0, 18.0), _run(2, 26.0, 21.0)],
              "edgemed turn 4": [_run(0, 28.0, 23.0), _run(1, 25.0, 20.0), _run(2, 27.0, 22.0)],
              "llama-server": [_run(0, 60.0, 23.0), _run(1, 66.0, 26.0), _run(2, 62.0, 24.0)]}}


def _median_of_rounds(num: list[dict], den: list[dict], key: str) -> float:
    return round(statistics.median(round(a[key] / b[key], 4) for a, b in zip(num, den)), 4)


def test_edgemed_over_llama_server_is_the_median_of_per_round_ratios():
    lv = sa.levels_out({k: {n: list(v) for n, v in by.items()} for k, by in RUNS.items()})["2"]
    e, m = RUNS["2"]["edgemed"], RUNS["2"]["llama-server"]
    assert lv["ratio_e2e"] == _median_of_rounds(e, m, "e2e_tok_s")  # 21/24, not best 24 / best 26
    assert lv["ratio_e2e"] != pytest.approx(24.0 / 26.0, abs=1e-3)
    assert lv["ratio_decode"] == _median_of_rounds(e, m, "decode_tok_s")
    p = lv["ratio_e2e_paired"]
    assert p["per_round"] == [round(a["e2e_tok_s"] / b["e2e_tok_s"], 4) for a, b in zip(e, m)]
    # a mixed load: the goal is judged on the e2e median (0.875 misses 0.95); round 0 (24/23) meets it
    assert p["goal"] == sa.GOAL_RATIO and p["goal_met"] is False and p["rounds_missing_goal"] == 2
    assert lv["ratio_decode_paired"]["goal"] is None
    # the row still shows each server's best run
    assert lv["edgemed"]["best"]["decode_tok_s"] == 30.0 and lv["llama-server"]["best"]["decode_tok_s"] == 66.0


def test_a_compared_arm_and_the_no_adapter_level_are_paired_by_round_too():
    out = sa.levels_out({k: {n: list(v) for n, v in by.items()} for k, by in RUNS.items()})
    arm = out["2"]["edgemed turn 4"]
    assert arm["ratio_e2e"] == _median_of_rounds(RUNS["2"]["edgemed turn 4"], RUNS["2"]["llama-server"], "e2e_tok_s")
    assert arm["ratio_e2e_paired"]["per_round"] == [1.0, 0.7692, 0.9167]
    vs0 = out["2"]["edgemed"]
    assert vs0["vs_no_adapter"] == _median_of_rounds(RUNS["2"]["edgemed"], RUNS["0"]["edgemed"], "decode_tok_s")
    assert vs0["vs_no_adapter"] != pytest.approx(30.0 / 50.0, abs=1e-3)  # best over best
    assert vs0["vs_no_adapter_e2e_paired"]["per_round"] == [0.6, 0.6, 0.5833]
    assert out["0"]["ratio_e2e_paired"]["goal"] is None  # the base alone is not a mixed load


def test_the_page_gives_the_median_its_range_and_the_rounds_missing_the_goal():
    out = sa.levels_out({k: {n: list(v) for n, v in by.items()} for k, by in RUNS.items()})
    cell = sa._ratio_cell(out["2"])
    assert cell.startswith("decode 0.419x (0.333-0.500, 3 rounds), e2e 0.875x (0.692-1.044, 3 rounds)")
    assert "goal 0.95 on e2e: not met; 2 of 3 rounds miss it" in cell


def test_rerender_recomputes_a_stored_result_from_its_rounds(tmp_path, capsys):
    stored = RESULTS / "qwen2.5-0.5b-instruct-q4_k_m-t2.json"
    path = tmp_path / stored.name
    m = json.loads(stored.read_text())
    lv = m["levels"]["2"]
    lv.pop("ratio_e2e_paired", None)  # what a best-over-best summary left: one figure
    lv["ratio_e2e"] = round(lv["edgemed"]["best_e2e_tok_s"] / lv["llama-server"]["best_e2e_tok_s"], 3)
    path.write_text(json.dumps(m))
    sa.main(["--rerender", str(path)])
    out = json.loads(path.read_text())["levels"]["2"]
    assert out["ratio_e2e"] == _median_of_rounds(lv["edgemed"]["runs"], lv["llama-server"]["runs"], "e2e_tok_s")
    assert out["ratio_e2e"] != pytest.approx(lv["ratio_e2e"], abs=1e-3)
    page = path.with_suffix(".md").read_text()
    assert "ratios are taken inside each round" in page and "2 of 2 rounds miss it" in page
    assert page in capsys.readouterr().out  # what --rerender prints is the page it writes


def test_rerender_refuses_runs_without_their_round(tmp_path):
    m = json.loads((RESULTS / "qwen2.5-0.5b-instruct-q4_k_m-t2-half.json").read_text())
    for run in m["levels"]["2"]["edgemed"]["runs"]:
        del run["round"]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(m))
    with pytest.raises(SystemExit, match="runs without their round"):
        sa.main(["--rerender", str(path)])


@pytest.mark.parametrize("stored", sorted(RESULTS.glob("*.json")), ids=lambda p: p.stem)
def test_every_stored_result_is_what_rerender_writes(stored, tmp_path):
    """A page stored beside its JSON is what --rerender makes of it, and re-rendering changes nothing more."""
    path = tmp_path / stored.name
    shutil.copy(stored, path)
    sa.main(["--rerender", str(path)])
    assert path.with_suffix(".md").read_text() == stored.with_suffix(".md").read_text()
    assert json.loads(path.read_text()) == json.loads(stored.read_text())


def test_the_adapter_ratios_decision_0013_quotes_are_printed_by_the_results():
    """Every three-decimal figure of decision 0013 (ratios, their ranges, memory) is one a serve_adapters page
    prints, so a figure computed another way (best over best) cannot stay quoted."""
    printed = set()
    for page in RESULTS.glob("*.md"):
        printed.update(re.findall(FIGURE, page.read_text(encoding="utf-8")))
    text = next((ROOT / "docs" / "decisions").glob("0013-*.md")).read_text(encoding="utf-8")
    quoted = re.findall(FIGURE, text)
    assert len(quoted) >= 12
    assert not [q for q in quoted if q not in printed], sorted(set(quoted) - printed)


def _rows(text: str, header: str) -> list[list[str]]:
    """The cells of the table whose header row starts with ``header`` (markdown bold taken off)."""
    lines = itertools.takewhile(lambda ln: ln.startswith("|"), text[text.index(header):].splitlines()[2:])
    return [[c.strip().replace("**", "") for c in ln.strip("|").split("|")] for ln in lines]


def _paired_cell(p: dict) -> str:
    return f"{p['median']:.3f}x ({p['min']:.3f}-{p['max']:.3f})"


def test_decision_0013s_tables_give_each_files_ratios_paired_by_round():
    """The e2e ratio cells of decision 0013's two tables are the median and range the file each names keeps."""
    text = next((ROOT / "docs" / "decisions").glob("0013-*.md")).read_text(encoding="utf-8")
    stem = "qwen2.5-0.5b-instruct-q4_k_m"
    xeon = _rows(text, "| run | 2 adapters | 4 adapters |")
    assert len(xeon) == 4
    for run, two, four, mem in xeon:
        m = json.loads((RESULTS / f"{stem}{run.split('`')[1]}.json").read_text())
        assert [two, four] == [_paired_cell(m["levels"][k]["ratio_e2e_paired"]) for k in ("2", "4")], run
        assert mem == f"{m['memory']['adapters_vs_base']:.3f}x", run
    m = json.loads((RESULTS / f"{stem}-t2.json").read_text())
    turns = _rows(text, "| adapters | turn 16 (runs) |")
    assert [r[0] for r in turns] == ["2", "4"]
    for k, *_, turn16, turn4 in turns:
        assert turn16 == _paired_cell(m["levels"][k]["ratio_e2e_paired"])
        assert turn4 == _paired_cell(m["levels"][k]["edgemed turn 4"]["ratio_e2e_paired"])
