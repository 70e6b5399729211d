"""Our llama.cpp-compatible KL divergence against llama.cpp's own tool, ``llama-perplexity``, on the same windows.

    python -m edgemed.benchmarks.anchors build      # once: llama-perplexity from the installed llama-cpp-python sdist
    python -m edgemed.benchmarks.kld_anchor --reference F16.gguf Q4_K_M.gguf [Q4_0.gguf ...] [--text FILE]
        [--ctx 256] [--threads 1] -o benchmarks/results/kld_anchor-<name>

**llama-perplexity's side** (the same llama.cpp commit as the runtime): ``-m REF -f TEXT -c N
--kl-divergence-base BASE`` once, then ``-m Q --kl-divergence-base BASE --kl-divergence`` per quant; its
"Mean KLD" (with its uncertainty), the KLD percentiles and "Same top p" are parsed from its log. What the tool
does, and how it was checked against ``edgemed.converters.quality.fidelity``'s rule: ``llama_perplexity.py``.

**Our side**, in the same run: the same text tokenized through the runtime's llama.cpp layer with the same rule,
the same windows (checked token for token against the ones llama-perplexity stored in its base file), every
row's logits from edgemed's runtime (``runtime.logits``, the one whole-sequence path) for REF and each quant (full vocabulary, one window at a time: the
reference's logits wait in a scratch file, n x vocab x 4 B a window), KL per row by ``edgemed.converters.quality.fidelity.kl_rows``,
then ``fidelity.summarize`` over the windows: its ``llamacpp`` figure (to agree within ``AGREE``) and, for
contrast, its headline (every row but each window's first) on the same windows; and the same rows with
llama-perplexity's own estimator (``llama_perplexity.llamacpp_kl``), which tells a difference in the estimator
from one in the logits. Both sides use the same
threads, one window per batch (``-b = -ub = n``: one sequence, one micro-batch), flash attention off, F16 KV
cache and the same CPU weight placement (llama.cpp's extra buffers on, or ``--no-repack`` on both).

Default text: the shipped medical passages (``harness/data/medical_text.txt``) joined by blank lines, as the
file separates them (1,371 tokens with SmolLM2's tokenizer, 1,369 with Qwen2.5's); default ``--ctx 256`` gives
5 windows and 635 scored rows. Results: ``<output>.json`` and ``<output>.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

from edgemed.converters.quality import fidelity
from edgemed.benchmarks import llama_perplexity as lp
from edgemed.errors import EdgemedError, InputError

DEFAULT_CTX = 256
AGREE = 0.05  # relative difference between our llama.cpp-compatible mean KL and llama-perplexity's
BLOCK = 64  # rows per KL block: 64 x 151,936 x 8 B = 78 MB a float64 array


# -- text, tokens, windows ---------------------------------------------------------------------------------
def default_text() -> str:
    from edgemed.benchmarks.harness.divergence import load_texts

    return "\n\n".join(load_texts()) + "\n"


def as_prompt(raw: bytes) -> str:
    """What llama-perplexity's ``-f`` makes of a file: its bytes, one trailing newline dropped (UTF-8 here)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"The text file is not UTF-8 (byte {exc.start}).", "convert it to UTF-8 first") from None
    return text[:-1] if text.endswith("\n") else text


def adds_bos(model) -> bool:
    """The vocabulary's ``add_bos``, as llama_tokenize applies it with ``add_special``."""
    plain, special = model.tokenize("a", add_special=False), model.tokenize("a", add_special=True)
    return special[:1] == [model.bos()] and special[1:] == plain


def windows(tokens: list[int], n_ctx: int, bos: int | None) -> tuple[list[list[int]], list[list[int]]]:
    """llama-perplexity's chunks of ``tokens`` (``len // n_ctx``) as stored, and as decoded (first token -> ``bos``)."""
    chunks = [tokens[k * n_ctx:(k + 1) * n_ctx] for k in range(len(tokens) // n_ctx)]
    fed = [([bos] + c[1:]) if bos is not None else list(c) for c in chunks]
    return chunks, fed


# -- our side -----------------------------------------------------------------------------------------------
def _load(path: Path, ctx: int, threads: int, extra_buffers: str):
    """``runtime.logits.SequenceLogits`` for windows of ``ctx`` tokens with llama-perplexity's settings (flash
    attention off, one window a batch), refused when the weights were not placed as ``extra_buffers`` asks."""
    from edgemed.runtime.logits import SequenceLogits

    run = SequenceLogits(path, ctx, threads=threads, extra_buffers=extra_buffers, flash_attn=False)
    if run.model.placement.mode != extra_buffers:
        mode = run.model.placement.mode
        run.close()
        raise InputError(f"edgemed placed {path.name}'s weights as '{mode}', not '{extra_buffers}', so the two "
                         "sides would run different kernels.", "run again with --extra-buffers none")
    return run


def reference_pass(path, fed, ctx, threads, extra_buffers, scratch: Path, base_chunk) -> tuple:
    """REF's logits of every window into a scratch file; how far its log-probs are from the base file's."""
    import numpy as np

    run = _load(path, ctx, threads, extra_buffers)
    try:
        store = np.lib.format.open_memmap(scratch / "reference.npy", mode="w+", dtype=np.float32,
                                          shape=(len(fed), ctx, run.n_vocab))
        rows, worst = fidelity.llamacpp_rows(ctx), 0.0
        for k, window in enumerate(fed):
            store[k] = run(window)                                       # [n, vocab] float32
            base, floor = base_chunk(k)                                   # [rows, vocab], [rows]
            ours = fidelity.log_softmax(store[k][rows]).astype(np.float32)
            kept = base > floor[:, None] + 1e-3                          # entries above the 16-nat floor
            worst = max(worst, float(np.abs(ours - base)[kept].max()))
        store.flush()
        return store, worst
    finally:
        run.close()


def quant_pass(path, fed, ctx, threads, extra_buffers, reference) -> dict:
    """KL per row of every window against REF's stored logits; fidelity's figures and llama.cpp-style stats."""
    import numpy as np

    run = _load(path, ctx, threads, extra_buffers)
    try:
        if run.n_vocab != reference.shape[2]:
            raise InputError(f"{path.name} has {run.n_vocab} tokens in its vocabulary, the reference "
                             f"{reference.shape[2]}.", "compare files converted from the same checkpoint")
        passages, estimator = [], []
        rows = fidelity.llamacpp_rows(ctx)
        for k, window in enumerate(fed):
            q = run(window)
            parts = [fidelity.kl_rows(reference[k][i:i + BLOCK], q[i:i + BLOCK]) for i in range(0, ctx, BLOCK)]
            passages.append((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
            ref, art = reference[k][rows], q[rows]
            estimator += [lp.llamacpp_kl(ref[i:i + BLOCK], art[i:i + BLOCK]) for i in range(0, len(art), BLOCK)]
    finally:
        run.close()
    figures = fidelity.summarize(passages)
    scored = np.concatenate([kl[rows] for kl, _ in passages])
    same = np.concatenate([agree[rows] for _, agree in passages])
    mean, err = lp.mean_and_error(scored)
    p_same = float(same.mean())
    return {"figures": figures, "kld_mean": mean, "kld_err": err, "same_top": p_same,
            "same_top_err": (p_same * (1 - p_same) / (same.size - 1)) ** 0.5, "n_rows": int(scored.size),
            "kld_mean_llamacpp_estimator": float(np.concatenate(estimator).mean()),
            "kld_percentiles": {key: float(np.percentile(scored, q)) for key, q in
                                (("p99", 99), ("p95", 95), ("median", 50), ("max", 100))}}


# -- the run ------------------------------------------------------------------------------------------------
def run(reference: Path, quants: list[Path], text: bytes, *, ctx: int, threads: int, extra_buffers: str,
        work: Path | None = None, echo=print) -> dict:
    from edgemed.files.atomic import scratch_dir
    from edgemed.runtime import llamacpp

    binary = lp.binary()
    prompt = as_prompt(text)
    vocab = llamacpp.Model(reference, vocab_only=True)
    try:
        tokens = vocab.tokenize(prompt, add_special=True)
        bos = vocab.bos() if adds_bos(vocab) else None
    finally:
        vocab.close()
    if len(tokens) < 2 * ctx:
        raise InputError(f"The text is {len(tokens)} tokens; llama-perplexity needs at least 2 x --ctx = {2 * ctx}.",
                         "use a smaller --ctx or a longer --text")
    chunks, fed = windows(tokens, ctx, bos)
    common = ["-c", str(ctx), "-b", str(ctx), "-ub", str(ctx), "-t", str(threads), "-tb", str(threads),
              "-fa", "off", "-ngl", "0", "-fit", "off", *lp.placement_flags(extra_buffers)]
    out: dict = {"reference": str(reference), "ctx": ctx, "threads": threads, "extra_buffers": extra_buffers,
                 "n_tokens": len(tokens), "n_windows": len(chunks), "add_bos": bos is not None,
                 "rows_per_window": [fidelity.llamacpp_rows(ctx).start, fidelity.llamacpp_rows(ctx).stop - 1],
                 "text_sha256": hashlib.sha256(text).hexdigest(), "binary": str(binary),
                 "rule": fidelity.RULE, "fidelity_version": fidelity.VERSION, "quants": {}}
    with scratch_dir(Path(work or tempfile.gettempdir()), "kld-anchor") as scratch:
        (scratch / "text.txt").write_bytes(text)
        base = scratch / "base.kld"
        echo(f"llama-perplexity base: {reference.name}, {len(chunks)} windows of {ctx}")
        lp.run(binary, reference, ["-f", str(scratch / "text.txt"), "--kl-divergence-base", str(base), *common],
               scratch / "base.log")
        header, stored, base_chunk = lp.read_base(base)
        if header["n_chunk"] != len(chunks) or stored != [t for c in chunks for t in c]:
            raise EdgemedError("edgemed's windows differ from the tokens llama-perplexity stored in its base file "
                               f"({header['n_chunk']} chunks there, {len(chunks)} here).",
                               "report it: the tokenizer call or the chunking rule no longer matches perplexity.cpp")
        out["windows_match"] = True
        echo(f"edgemed reference pass: {reference.name}")
        ref_logits, out["reference_logprob_max_abs_diff"] = reference_pass(
            reference, fed, ctx, threads, extra_buffers, scratch, base_chunk)
        for q in quants:
            echo(f"llama-perplexity --kl-divergence: {q.name}")
            log = lp.run(binary, q, ["--kl-divergence-base", str(base), "--kl-divergence", *common],
                         scratch / "q.log")
            theirs = lp.parse_log(log)
            if "kld_mean" not in theirs:
                raise EdgemedError(f"llama-perplexity printed no 'Mean KLD' for {q.name}.",
                                   "it prints statistics only from 100 scored rows: use a longer --text")
            theirs["statistics"] = lp.statistics_block(log)
            echo(f"edgemed pass: {q.name}")
            ours = quant_pass(q, fed, ctx, threads, extra_buffers, ref_logits)
            ours_mean = ours["figures"]["llamacpp"]["kld_mean"]
            rel = (ours_mean - theirs["kld_mean"]) / theirs["kld_mean"] if theirs["kld_mean"] else float("nan")
            out["quants"][q.name] = {"path": str(q), "llama_perplexity": theirs, "edgemed": ours,
                                     "relative_difference": rel, "agree": bool(abs(rel) <= AGREE)}
        del ref_logits
    return out


def table(result: dict) -> str:
    rows = ["| file | llama-perplexity KLD ± err | edgemed (llama.cpp rows) ± err | rel. diff | same top p | "
            "edgemed top-1 | edgemed, llama.cpp's estimator | edgemed headline KLD | edgemed every row |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["quants"].items():
        t, o = r["llama_perplexity"], r["edgemed"]
        rows.append(f"| {name} | {t['kld_mean']:.6f} ± {t['kld_err']:.6f} | {o['kld_mean']:.6f} ± {o['kld_err']:.6f} "
                    f"| {100 * r['relative_difference']:+.2f} % | {100 * t['same_top']:.2f} % | "
                    f"{100 * o['same_top']:.2f} % | {o['kld_mean_llamacpp_estimator']:.6f} | "
                    f"{o['figures']['kld_mean']:.6f} | {o['figures']['all']['kld_mean']:.6f} |")
    return "\n".join(rows)


def markdown(result: dict, command: str) -> str:
    r = result
    return "\n".join([
        f"# KL divergence: edgemed vs llama-perplexity ({Path(r['reference']).name} reference)", "",
        f"`{command}`", "",
        f"{r['n_tokens']} tokens (add_bos {r['add_bos']}), {r['n_windows']} windows of {r['ctx']}, rows "
        f"{r['rows_per_window'][0]}..{r['rows_per_window'][1]} of each scored; threads {r['threads']}, extra buffers "
        f"{r['extra_buffers']}; text sha256 {r['text_sha256'][:16]}...; windows token for token as llama-perplexity "
        f"stored them: {r['windows_match']}; reference log-probs, edgemed vs llama-perplexity's base file, max "
        f"|diff| {r['reference_logprob_max_abs_diff']:.2e} nats (its 16-bit steps included).", "",
        table(r), "",
        f"Agreement goal: |rel. diff| <= {100 * AGREE:.0f} %. \"llama.cpp's estimator\": edgemed's logits through "
        "perplexity.cpp's own KL (16-bit base log-probs, terms at base log-prob <= -16 left out); where it equals "
        "llama-perplexity's figure, the rel. diff is that estimator's, not the logits'. Headline: every row but each "
        "window's first (edgemed.converters.quality.fidelity); every row: all of them.", ""])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("quants", nargs="+", type=Path, help="GGUF files to compare with the reference")
    ap.add_argument("--reference", required=True, type=Path, help="the reference GGUF (F16)")
    ap.add_argument("--text", type=Path, help="plain UTF-8 text (default: the shipped medical passages)")
    ap.add_argument("--ctx", type=int, default=DEFAULT_CTX, help="window length in tokens")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads on both sides (the figures do not depend on it; one runs best on a shared box)")
    ap.add_argument("--extra-buffers", choices=("auto", "all", "none"), default="auto",
                    help="llama.cpp's extra CPU buffers on both sides (auto: on unless the build has AMX)")
    ap.add_argument("--work", type=Path, help="folder for the scratch files (default: the system temp folder)")
    ap.add_argument("-o", "--output", required=True, type=Path, help="writes OUTPUT.json and OUTPUT.md")
    args = ap.parse_args(argv)
    import sys

    from edgemed.files.atomic import write_text
    from edgemed.runtime import buffers, llamacpp

    try:
        for p in [args.reference, *args.quants] + ([args.text] if args.text else []):
            if not p.is_file():
                raise InputError(f"'{p}' is not a file.", "give existing GGUF files (and --text file)")
        if args.work is not None and not args.work.is_dir():  # before the run, not as a traceback from inside it
            raise InputError(f"--work '{args.work}' is not a folder.", "create it first, or leave --work out (system temp)")
        if not args.output.parent.is_dir():  # the results are written at the end: a missing folder would lose them
            raise InputError(f"-o '{args.output}': the folder '{args.output.parent}' does not exist.",
                             "create it first, or write the results elsewhere")
        mode = args.extra_buffers if args.extra_buffers != "auto" else \
            ("none" if buffers.resolve("auto", llamacpp.build()) != "all" else "all")
        text = args.text.read_bytes() if args.text else default_text().encode("utf-8")
        result = run(args.reference, args.quants, text, ctx=args.ctx, threads=args.threads, extra_buffers=mode,
                     work=args.work)
    except EdgemedError as exc:
        raise SystemExit(f"error: {exc}") from None
    command = "python -m edgemed.benchmarks.kld_anchor " + " ".join(sys.argv[1:] if argv is None else argv)
    result["command"] = command
    write_text(Path(f"{args.output}.json"), json.dumps(result, indent=2) + "\n")
    write_text(Path(f"{args.output}.md"), markdown(result, command))
    print(table(result))


if __name__ == "__main__":
    main()
