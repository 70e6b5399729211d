"""The serving studies' pages print how many requests a TTFT p99 stands on: over 2-16 samples a p99 lies between
the slowest two and reads as a tail it is not without its n."""

from __future__ import annotations

from edgemed.benchmarks import serve_conversation, serve_vs_llama_server, serve_workloads
from edgemed.benchmarks.serve_bench_client import ttft_cell

TTFT = [2.0, 2.1, 2.4, 2.5]


def test_the_cell_names_its_n():
    assert ttft_cell(2.0, 2.5, 4) == "2.00 / 2.50 s (n = 4)" and ttft_cell(None, None, 0) == "- / - s"


def test_conversation_page():
    turn = {"turn": 1, "prompt_tokens_mean": 600, "cached_tokens_mean": 0, "cached_tokens_min": 0, "ttft_p50_s": 2.0,
            "ttft_p99_s": 2.5, "decode_tok_s_median": 20.0, "ttft_s": TTFT}
    m = {"model": "m.gguf", "clinicians": 4, "turns": 1, "max_tokens": 96, "threads": 2, "slots": 4,
         "n_ctx_per_slot": 2048, "rounds": 1, "machine": {"cpu_count": 2}, "command": "python -m x",
         "servers": {"edgemed": {}}, "best": {"edgemed": [turn]}, "ratios": {}, "answers_identical": None}
    text = serve_conversation.report_md(m)
    assert "TTFT p50 / p99 (n clinicians)" in text and "| 2.00 / 2.50 s (n = 4) |" in text


def test_workloads_page():
    run = {"ttft_p50_s": 2.0, "ttft_p99_s": 2.5, "ttft_s": TTFT, "loadavg": [1.0, 1.2]}
    turn = {"turn": 1, "prompt_tokens_mean": 600, "cached_tokens_mean": 0, "ttft_p50_s": 2.0, "ttft_p99_s": 2.5,
            "ttft_s": TTFT}
    m = {"model": "m.gguf", "threads": 2, "slots": 4, "ctx": 2048, "rounds": 1, "machine": {"cpu_count": 2},
         "loadavg_start": [0.5, 0.5, 0.5], "loadavg_end": [1.0, 1.0, 1.0], "command": "python -m x", "servers": {},
         "errors": {}, "template_system_tokens": 300,
         "sizes": {"clinicians": 4, "turns": 1, "answer_tokens": 32, "template_tokens": 64},
         "parts": {"conversation": {"best": {"edgemed": [turn]}, "runs": {"edgemed": [run]}},
                   "template": {"template": "triage", "cells": {"4-together": {
                       "requests": 4, "arrival": "together", "stagger_s": 0.0, "best": {"edgemed": run},
                       "runs": {"edgemed": [run]}}}}}}
    text = serve_workloads.report_md(m)
    assert text.count("2.00 / 2.50 s (n = 4)") == 2 and "edgemed TTFT p50 / p99 (n)" in text


def test_serve_vs_llama_server_page():
    best = {"decode_tok_s": 20.0, "per_stream_tok_s": 10.0, "e2e_tok_s": 18.0, "ttft_p50_s": 0.4, "ttft_p99_s": 0.9,
            "requests": 8, "loadavg": [1.0, 1.5]}
    m = {"model": "m.gguf", "threads": 2, "n_ctx_per_slot": 2048, "max_tokens": 64, "requests_per_stream": 4,
         "rounds": 1, "machine": {"cpu_count": 2}, "command": "python -m x",
         "levels": {"2": {"edgemed": {"best": best, "decode_tok_s_runs": [20.0]}}}}
    text = serve_vs_llama_server.report_md(m)
    assert "TTFT p50 / p99 (n requests)" in text and "| 0.40 / 0.90 s (n = 8) |" in text
