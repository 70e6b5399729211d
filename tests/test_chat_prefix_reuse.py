"""The one-sequence engine (``edgemed chat``, ``run``, quickstart) keeps the cells of the previous call's prompt: a
conversation's next turn computes only its new part, and answers token for token as a cold run of the whole
history does. Whatever else writes sequence 0 (the accuracy scorer's ``eval``, another adapter set) leaves nothing
stale to reuse. The real SmolLM2 (1 thread)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

pytest.importorskip("llama_cpp")

from edgemed.runtime.engine import GenerationSettings, LoadSettings  # noqa: E402
from edgemed.runtime.llama_engine import LlamaEngine  # noqa: E402
from edgemed.runtime.llamacpp import REFEED  # noqa: E402

UNIT = 32  # micro-batch rows: cells are kept in whole micro-batches, so these short prompts reuse some

LOAD = LoadSettings(n_ctx=2048, n_threads=1, n_batch=512, n_ubatch=UNIT)
GREEDY = GenerationSettings(max_tokens=24)
SYSTEM = ("You are a careful clinical assistant. Answer briefly, say when you are unsure, never invent doses, "
          "and advise escalation for red-flag findings.")
QUESTIONS = ("A 67-year-old man has crushing chest pain for 40 minutes, sweating and nausea. What first?",
             "His ECG shows ST elevation in II, III and aVF. Which artery?",
             "Blood pressure falls to 85/50 after nitroglycerin. Why?",
             "What should be avoided in the next hour?")


def fed_prompts(engine) -> list[int]:
    """Record how many tokens each ``generate`` call feeds as prompt (its first ``eval``: several rows)."""
    fed, real = [], engine.ctx.eval

    def eval_(tokens, n_past=0, **kw):
        if len(tokens) > 1:
            fed.append(len(tokens))
        return real(tokens, n_past, **kw)

    engine.ctx.eval = eval_
    return fed


def converse(engine, questions=QUESTIONS) -> tuple[list[str], list[int]]:
    """Each turn's answer and its prompt's length in tokens, the whole history resent each turn."""
    history, answers, lengths = [{"role": "system", "content": SYSTEM}], [], []
    for q in questions:
        history.append({"role": "user", "content": q})
        lengths.append(len(engine.tokenize(engine.render_chat(history), add_special=True, parse_special=True)))
        answers.append("".join(engine.chat(history, GREEDY)))
        history.append({"role": "assistant", "content": answers[-1]})
    return answers, lengths


@pytest.fixture(scope="module")
def engines(smollm2_gguf):
    with LlamaEngine(smollm2_gguf, LOAD) as warm, LlamaEngine(smollm2_gguf, LOAD) as cold:
        cold.prefix_reuse = False
        yield warm, cold


def test_each_turn_computes_only_what_is_new_and_answers_as_a_cold_run(engines):
    warm, cold = engines
    warm.ctx.clear()
    fed = fed_prompts(warm)
    try:
        answers, lengths = converse(warm)
    finally:
        del warm.ctx.eval
    assert answers == converse(cold)[0]
    assert all(a.strip() for a in answers)
    assert fed[0] == lengths[0]                                    # nothing to keep before the first turn
    for i in range(1, len(QUESTIONS)):                             # the new answer and question, from a boundary
        assert REFEED <= fed[i] < lengths[i] - lengths[i - 1] + UNIT + 8 and fed[i] % UNIT == lengths[i] % UNIT, \
            (fed, lengths)
    assert sum(fed) < 0.75 * sum(lengths), (fed, lengths)


def test_the_same_prompt_again_feeds_its_last_tokens_only_and_answers_the_same(engines):
    warm, _ = engines
    warm.ctx.clear()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
    first = "".join(warm.chat(messages, GREEDY))
    fed = fed_prompts(warm)
    try:
        again = "".join(warm.chat(messages, GREEDY))
    finally:
        del warm.ctx.eval
    n = len(warm.ctx.prompt_cells)
    assert again == first and fed == [n - (n - REFEED) // UNIT * UNIT]  # at least REFEED, from a boundary


def test_cells_written_by_others_are_not_reused(engines):
    """The accuracy scorer keeps a prefix and feeds its own rows after it (``keep``, ``eval``), and an adapter set
    computes other cells: a later prompt reuses only what is still its own prompt's."""
    warm, cold = engines
    warm.ctx.clear()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[1]}]
    "".join(warm.chat(messages, GREEDY))
    kept = list(warm.ctx.prompt_cells)
    assert len(kept) > 40
    other = warm.tokenize("An unrelated passage scored for its perplexity.")
    assert warm.ctx.keep(40) == 40 and warm.ctx.prompt_cells == kept[:40]
    warm.ctx.eval(other, 40)                                       # the scorer's rows from position 40 on
    assert warm.ctx.prompt_cells == kept[:40]
    fed = fed_prompts(warm)
    try:
        assert "".join(warm.chat(messages, GREEDY)) == "".join(cold.chat(messages, GREEDY))
    finally:
        del warm.ctx.eval
    assert fed == [len(kept) - UNIT]                               # its own first micro-batch kept, the scorer's rows gone
    assert warm.ctx.keep(0) == 0 and warm.ctx.prompt_cells == []
    "".join(warm.chat(messages, GREEDY))
    warm.ctx.set_adapters([])                                      # cells computed under another adapter set
    assert warm.ctx.prompt_cells == []


def test_chat_cli_with_and_without_the_prefix_cache_answers_the_same(smollm2_gguf):
    from edgemed.cli import cli

    turns = "What is sepsis?\nAnd its first treatment?\n/exit\n"
    args = ["chat", str(smollm2_gguf), "--max-tokens", "16", "--ctx", "1024", "--threads", "1"]
    kept = CliRunner().invoke(cli, args, input=turns)
    fresh = CliRunner().invoke(cli, args + ["--no-prefix-cache"], input=turns)
    assert kept.exit_code == 0 and fresh.exit_code == 0, (kept.output, fresh.output)
    assert kept.output.count("you> ") == 3                          # two turns answered, then /exit
    replies = [part.split("\n")[0] for part in kept.output.split("you> ")[1:3]]
    assert all(r.strip() for r in replies), kept.output
    assert kept.stdout == fresh.stdout


def test_chat_turns_benchmark_reports_kept_tokens_and_the_same_answers(smollm2_gguf, tmp_path):
    """``benchmarks/chat_turns.py`` on a 2-turn conversation: its report's figures come from the rows it measured."""
    import json

    from edgemed.benchmarks import chat_turns

    out = tmp_path / "chat.json"
    chat_turns.main(["--model", str(smollm2_gguf), "--turns", "2", "--rounds", "1", "--threads", "1",
                     "--max-tokens", "8", "--ctx", "1024", "--out", str(out)])
    m = json.loads(out.read_text())
    first, second = m["per_turn"]
    assert m["answers_identical"] and first["kept_tokens"] == 0
    from edgemed.runtime.session import prepare

    unit = prepare(smollm2_gguf, None, 1024, 1).load.n_ubatch  # the detected profile's one-sequence micro-batch
    assert m["n_ubatch"] == unit                                       # ... read back from llama.cpp
    assert first["prompt_tokens"] > 512                                # the case alone fills a micro-batch
    assert second["kept_tokens"] == first["prompt_tokens"] // unit * unit < second["prompt_tokens"]  # whole ones
    assert second["ttft_ratio"] == second["kept_ttft_s"] / second["whole_ttft_s"]
    assert out.with_suffix(".md").read_text().count("\n| ") == 3
    chat_turns.main(["--model", str(smollm2_gguf), "--turns", "2", "--rounds", "1", "--threads", "1",
                     "--max-tokens", "8", "--ctx", "1024", "--ubatch", "64", "--out", str(out)])
    m = json.loads(out.read_text())  # kept in micro-batches of 64, read back from llama.cpp
    assert m["answers_identical"] and m["n_ubatch"] == 64
    kept = m["per_turn"][1]["kept_tokens"]
    assert kept % 64 == 0 and first["prompt_tokens"] - 64 < kept <= first["prompt_tokens"]


def test_row_layout_benchmark_feeds_each_layout_it_names(smollm2_gguf, tmp_path, monkeypatch):
    """``benchmarks/row_layout.py`` on a short prompt: every layout is fed as its cuts say (the calls the context sees
    start there), the cold run comes first, and the report's rows are the ones measured."""
    import json

    from edgemed.benchmarks import row_layout
    from edgemed.runtime import llamacpp

    starts: list[list[int]] = []
    real = llamacpp.Context.decode

    def decode(self, batch):  # where each call's rows of the prompt (sequence 0) begin
        starts.append([batch.raw.pos[i] for i in range(batch.n) if batch.raw.seq_id[i][0] == 0][:1])
        return real(self, batch)

    monkeypatch.setattr(llamacpp.Context, "decode", decode)
    out = tmp_path / "rows.json"
    row_layout.main(["--model", str(smollm2_gguf), "--length", "120", "--greedy", "2", "--threads", "1",
                     "--out", str(out)])
    m = json.loads(out.read_text())
    assert m["length"] == 120 and m["rows"][0]["layout"] == "cold: one call" and m["rows"][0]["max_abs_diff"] == 0
    names = [r["layout"] for r in m["rows"]]
    assert "one row alone (100, 101)" in names and "one call beside a second sequence (it first)" in names
    fed = [s[0] for s in starts if s]
    for r in m["rows"]:
        for cut in r["cuts"]:
            assert cut in fed  # a call of the prompt began at each cut
        assert r["greedy_same"] or r["max_abs_diff"] > 0  # the same logits give the same greedy tokens
    assert out.with_suffix(".md").read_text().count("\n| ") == len(m["rows"]) + 1
