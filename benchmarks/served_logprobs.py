"""How far the log probabilities ``edgemed serve`` gives for an answer's tokens are from the same model's logits
computed another way.

    python -m edgemed.benchmarks.served_logprobs                       # SmolLM2-135M (the pip GGUF), 1 thread
    python -m edgemed.benchmarks.served_logprobs --model qwen2.5-0.5b-instruct --threads 2

A served token's entry is the log-softmax of the logits row the sampler read. The first answer token's row is the
prompt's last, computed with the prompt (a batch of rows); each later token's row comes from a decode step that
feeds one token. Whole-sequence rescoring (``runtime/logits.py``: every row of prompt + answer in one batch, as
``echo`` computes a prompt) computes those later rows in a batch instead, and llama.cpp's kernels may give a row
batched with others slightly other values than the same row fed alone (``row_layout.py`` measures that for K and V).

For each medical question (``QUESTIONS``, through the model's chat template) the batcher (one slot, greedy, as the
server runs it) answers ``--tokens`` tokens with ``top_logprobs`` 5; then, with ``runtime/logits.py``'s one loaded
model and context, the same tokens are scored two ways: every row of prompt + answer in one batch ("whole"), and the
prompt in one batch then one token per decode step ("one row a step", as the sampler's rows were computed). Per
token: the largest difference, over the chosen token and its 5 likeliest alternatives, between the served log
probability and each reference's, in nats. Results: benchmarks/results/served_logprobs/<model>-t<threads>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

QUESTIONS = (
    "What organ pumps blood?",
    "Name two first-line treatments for anaphylaxis.",
    "What does a high troponin level suggest?",
    "List three symptoms of hypoglycaemia.",
)
TOP = 5


def served(path: Path, prompts: list[list[int]], tokens: int, threads: int, n_ctx: int) -> list[list]:
    """Each prompt's greedy answer from the batcher: its ``TokenLogprob`` entries, in order."""
    from edgemed.runtime.batch.batcher import Batcher
    from edgemed.runtime.batch.options import Extras
    from edgemed.runtime.engine import GenerationSettings, LoadSettings

    batcher = Batcher(path, LoadSettings(n_ctx=n_ctx, n_threads=threads), slots=1, queue_size=1)
    batcher.start()
    try:
        answers = []
        for i, prompt in enumerate(prompts):
            stream = batcher.submit(prompt, GenerationSettings(max_tokens=tokens, temperature=0.0),
                                    request_id=f"logprobs-{i}", extras=Extras(top_logprobs=TOP))
            answers.append([e for item in stream if hasattr(item, "text") for e in item.logprobs])
        return answers
    finally:
        batcher.close()


def gaps(run, vocab: dict[bytes, int], prompt: list[int], entries: list) -> list[dict]:
    """Per answer token and reference: |served - reference| of the chosen token (``<name>_chosen``) and the largest
    over it and its alternatives (``<name>``). ``run``: a ``logits.SequenceLogits``."""
    import numpy as np

    from edgemed.runtime.batch.options import log_softmax
    from edgemed.runtime.logits import rows

    ids = [vocab[e.token] for e in entries]
    whole = rows(run.ctx, prompt + ids)[len(prompt) - 1:-1]
    run.ctx.clear()
    stepped = [run.ctx.eval(prompt, 0)[-1]]
    for i, token in enumerate(ids[:-1]):
        stepped.append(run.ctx.eval([token], len(prompt) + i)[-1])
    out = []
    for i, e in enumerate(entries):
        scored = [(e.token, e.logprob), *e.top]
        row = {}
        for name, ref in (("whole", whole[i]), ("one_row_a_step", stepped[i])):
            lp = log_softmax(np.asarray(ref))
            row[name] = max(abs(value - float(lp[vocab[t]])) for t, value in scored)
            row[name + "_chosen"] = abs(e.logprob - float(lp[ids[i]]))
        out.append({"position": i, "token": e.token.decode("utf-8", "replace"), **row})
    return out


def report_md(m: dict) -> str:
    lines = [f"# Served log probabilities against the model's logits: {m['model']}", "",
             f"{len(m['questions'])} medical questions through the chat template, {m['tokens']} greedy answer tokens "
             f"each, {m['threads']} thread(s): the largest |served - reference| log probability, in nats, of the chosen "
             f"token, and of it and its {TOP} likeliest alternatives. Host: {m['cpu']}; load {m['load']}.", "",
             f"Command: `{m['command']}`, at commit {m['commit']}.", "",
             "| answer token | tokens | vs whole-sequence rescoring: chosen | and alternatives "
             "| vs one row a step: chosen | and alternatives |", "|---|---|---|---|---|---|"]
    for label, rows_ in (("first", [r for q in m["rows"] for r in q["tokens"] if r["position"] == 0]),
                         ("2nd on", [r for q in m["rows"] for r in q["tokens"] if r["position"] > 0])):
        cells = [max(r[key] for r in rows_) for key in ("whole_chosen", "whole", "one_row_a_step_chosen",
                                                        "one_row_a_step")]
        lines.append(f"| {label} | {len(rows_)} | " + " | ".join(f"{c:.3g}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from edgemed.benchmarks.harness.machine import llama_system_info
    from edgemed.benchmarks.provenance import code_state
    from edgemed.benchmarks.serve_bench_client import save_results
    from edgemed.benchmarks.serve_vs_llama_server import model_path
    from edgemed.devices.detect import detect
    from edgemed.runtime.logits import SequenceLogits

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a pip model name or a .gguf path")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=24, help="answer tokens per question")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    path = model_path(args.model)
    out = args.out or (Path(__file__).resolve().parent / "results" / "served_logprobs"
                       / f"{path.stem}-t{args.threads}.json")
    n_ctx = 512
    with SequenceLogits(path, n_ctx, threads=args.threads) as run:
        model = run.model
        prompts = [model.tokenize(model.render_chat([{"role": "user", "content": q}]), True, True)
                   for q in QUESTIONS]
        vocab: dict[bytes, int] = {}
        for i in reversed(range(model.n_vocab)):  # a piece two ids share is named by the lower id
            vocab[model.piece(i, True)] = i
        answers = served(path, prompts, args.tokens, args.threads, n_ctx)
        rows = [{"question": q, "tokens": gaps(run, vocab, p, a)} for q, p, a in zip(QUESTIONS, prompts, answers)]
    code = code_state(("edgemed", "benchmarks/served_logprobs.py"))
    commit = (code["commit"] or "unknown")[:12] + (f" with {', '.join(code['changed'])} changed" if code["changed"] else "")
    m = {"model": path.name, "threads": args.threads, "tokens": args.tokens, "questions": list(QUESTIONS), "top": TOP,
         "cpu": f"{detect().model} (llama.cpp: `{llama_system_info()}`)", "commit": commit,
         "command": " ".join(["python -m edgemed.benchmarks.served_logprobs",
                                *(argv if argv is not None else sys.argv[1:])]),
         "load": " / ".join(f"{x:.1f}" for x in os.getloadavg()), "rows": rows}
    save_results(out, m, report_md(m))


if __name__ == "__main__":
    main()
