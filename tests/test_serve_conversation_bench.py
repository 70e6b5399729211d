"""The clinicians' conversation benchmark's pure logic: per-turn figures, ratios, answer comparison, case cuts."""

import pytest

from edgemed.benchmarks import serve_conversation as sc
from edgemed.errors import EdgemedError


def _row(ttft, prompt, cached, rate=10.0, tokens=8):
    return {"ttft_s": ttft, "prompt_tokens": prompt, "cached_tokens": cached, "decode_tok_s": rate, "tokens": tokens,
            "text": ""}


def test_turn_stats_are_per_turn_over_the_clinicians():
    rows = [[_row(1.0, 300, 0), _row(0.2, 400, 298)],
            [_row(3.0, 320, 0), _row(0.4, 420, 318, rate=None)]]
    stats = sc.turn_stats(rows)
    assert [s["turn"] for s in stats] == [1, 2]
    assert stats[0]["ttft_p50_s"] == 2.0 and abs(stats[0]["ttft_p99_s"] - 2.98) < 1e-9
    assert stats[1]["prompt_tokens_mean"] == 410 and stats[1]["prompt_tokens_max"] == 420
    assert stats[1]["cached_tokens_mean"] == 308 and stats[1]["cached_tokens_min"] == 298
    assert abs(stats[1]["cached_share"] - 616 / 820) < 1e-12
    assert stats[1]["decode_tok_s_median"] == 10.0  # a request without a rate is left out, not counted as 0
    assert stats[0]["completion_tokens"] == 16
    assert stats[1]["ttft_s"] == [0.2, 0.4] and stats[1]["computed_tokens"] == [102, 102]  # each clinician's


def test_turn_stats_without_cached_tokens_say_none():
    stats = sc.turn_stats([[_row(1.0, 300, None)], [_row(2.0, 300, None)]])
    assert stats[0]["cached_tokens_mean"] is None and stats[0]["cached_share"] is None
    assert stats[0]["computed_tokens"] == [None, None]


def test_first_difference_names_the_turn_per_conversation():
    a = [["x", "y", "z"], ["p", "q"], ["m"]]
    b = [["x", "y", "z"], ["p", "Q"], []]
    assert sc.first_difference(a, b) == [None, 2, 1]


def test_cut_case_keeps_whole_sentences_within_the_budget():
    text = "One two three. Four five six. Seven eight nine."
    words = lambda s: len(s.split())  # noqa: E731 - a stand-in tokenizer
    assert sc.cut_case(text, 0, words) == text
    assert sc.cut_case(text, 100, words) == text
    assert sc.cut_case(text, 6, words) == "One two three. Four five six."
    assert sc.cut_case(text, 2, words) == "One two three."  # the first sentence always stays


def test_every_clinician_gets_a_different_case_and_enough_follow_ups():
    assert len(set(sc.CASES)) == len(sc.CASES) >= 4
    assert len(sc.FOLLOW_UPS) >= 7  # the default 8 turns without repeating a question


def test_goal_mark_reads_the_ratio_against_its_goal():
    assert sc.goal_mark(0.8, 1.0) == "met" and sc.goal_mark(1.0, 1.0) == "met"
    assert sc.goal_mark(1.2, 1.0) == "not met"
    assert sc.goal_mark(0.9, 0.95, at_most=False) == "not met" and sc.goal_mark(0.96, 0.95, at_most=False) == "met"
    assert sc.goal_mark(None, 1.0) == "-"


def test_report_marks_each_turn_against_llama_server():
    turn = {"turn": 1, "prompt_tokens_mean": 600, "cached_tokens_mean": 0, "cached_tokens_min": 0, "ttft_p50_s": 2.0,
            "ttft_p99_s": 2.5, "decode_tok_s_median": 20.0}
    m = {"model": "m.gguf", "clinicians": 4, "turns": 2, "max_tokens": 96, "threads": 2, "slots": 4,
         "n_ctx_per_slot": 2048, "rounds": 1, "machine": {"cpu_count": 2}, "command": "python -m x",
         "servers": {"edgemed": {}, "llama-server": {}},
         "best": {"edgemed": [turn, turn | {"turn": 2}], "llama-server": [turn, turn | {"turn": 2}]},
         "ratios": {"llama-server": [0.9, 1.4]}, "answers_identical": None}
    text = sc.report_md(m)
    assert "0.900x (goal <= 1.0x: met)" in text and "1.400x (goal <= 1.0x: not met)" in text
    assert "Answers with reuse" not in text  # no cold run, no claim about the answers
    assert "which this host needs" not in text
    assert "and `--no-repack`, which this host needs to run it" in sc.report_md(m | {"server_args": ["--no-repack"]})


class _Resp:
    status_code = 200

    def __init__(self, lines):
        self.lines = lines

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def iter_lines(self):
        return iter(self.lines)


class _Client:
    def __init__(self, lines):
        self.lines = lines

    def stream(self, method, url, json, timeout):
        return _Resp(self.lines)


class _Server:
    name, url, log, model_id = "fake", "http://127.0.0.1:1", "fake.log", "m"


def _chunk(content=None, finish=None):
    import json
    return "data: " + json.dumps({"choices": [{"delta": {"content": content} if content else {}, "finish_reason": finish}]})


def test_chat_turn_reads_a_whole_answer():
    row = sc.chat_turn(_Client([_chunk("Hel"), _chunk("lo"), _chunk(finish="stop"), "data: [DONE]"]), _Server(), [], 8)
    assert row["text"] == "Hello" and row["ttft_s"] >= 0


@pytest.mark.parametrize("lines", [
    [_chunk("Hel"), 'data: {"error": {"message": "out of memory"}}', "data: [DONE]"],  # failed after the 200 header
    [_chunk("Hel"), _chunk("lo")],                                                     # cut off: no [DONE]
    [_chunk("Hel"), "data: [DONE]"],                                                   # ended without finishing
], ids=["error-event", "no-done", "no-finish"])
def test_chat_turn_that_fails_mid_stream_is_an_error_not_a_turn(lines):
    with pytest.raises(EdgemedError):
        sc.chat_turn(_Client(lines), _Server(), [], 8)


def _run(r, *p50s):
    return {"round": r, "turns": [{"turn": t + 1, "ttft_p50_s": v, "ttft_p99_s": v} for t, v in enumerate(p50s)]}


def test_ratios_are_the_median_of_per_round_ratios():
    # edgemed is fastest in round 0, llama-server in round 1: best over best would pair two different rounds
    runs = {"edgemed": [_run(0, 1.0, 2.0), _run(1, 1.6, 2.4), _run(2, 1.3, 2.2)],
            "llama-server": [_run(0, 1.2, 2.0), _run(1, 1.1, 2.0), _run(2, 1.25, 2.1)]}
    out = sc.summarize(runs, 2)
    import statistics
    assert out["ratios"]["llama-server"][0] == pytest.approx(statistics.median([1.0 / 1.2, 1.6 / 1.1, 1.3 / 1.25]), abs=1e-4)
    assert out["ratios"]["llama-server"][0] != pytest.approx(1.0 / 1.1, abs=1e-3)
    p = out["ratios_paired"]["llama-server"][0]
    assert p["rounds_missing_goal"] == 2 and p["goal_met"] is False and len(p["per_round"]) == 3
    assert out["best"]["edgemed"][0]["ttft_p50_s"] == 1.0
    m = {"ratios": out["ratios"], "ratios_paired": out["ratios_paired"]}
    assert "2 of 3 rounds miss it" in sc._ratio_cell(m, "llama-server", 0)
