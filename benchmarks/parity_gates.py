"""Where the parity gate's bars lie: intact conversions against deliberately broken copies, per weight type.

    python -m edgemed.benchmarks.parity_gates                       # SmolLM2-135M and Qwen2.5-0.5B, four types
    python -m edgemed.benchmarks.parity_gates --model smollm2-135m-instruct --types q4_k_m

Per model (its Hugging Face checkpoint from the pip package, ``pip_models.hf_checkpoint``) and type, converts the
checkpoint as ``edgemed convert`` does (4-bit types with the default importance matrix), then breaks copies of the
file in place, each in one way a conversion or a later edit could:

- ``layer``: the middle decoder layer's attn_output and ffn_down zeroed (the layer adds nothing);
- ``rope``: rope.freq_base a tenth of the trained one (positions computed wrongly; the header check refuses this
  field, the figure stands for a rope bug inside the weights; the prompts' positions are short, so it costs little);
- ``special``: the embedding rows of the chat template's special tokens zeroed (<|im_start|>, <|im_end|>);
- ``blocks``: 1 % of the quant blocks of every decoder matrix zeroed.

Each file is compared with the source on the gate's own prompts (``parity.check_gguf``, the reference computed once
per model) and its headline figures (``fidelity``: first position left out) are written to
``<results-dir>/parity_gates.json`` and its table to ``parity_gates.md``; decision 0022 reads them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from edgemed.files.atomic import write_text

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("smollm2-135m-instruct", "qwen2.5-0.5b-instruct")
TYPES = ("f16", "q8_0", "q4_0", "q4_k_m")
DAMAGE = ("layer", "rope", "special", "blocks")


def _break(path: Path, how: str, special: list[int]) -> None:
    """Damage ``path`` in place (``how``: one of ``DAMAGE``; ``special``: the chat tokens' ids)."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(path, "r+")
    arch = r.fields["general.architecture"].contents()
    tensors = {t.name: t for t in r.tensors}

    def raw(name):  # a writable byte view of one tensor
        t = tensors[name]
        return r.data[t.data_offset:t.data_offset + t.n_bytes]

    if how == "layer":
        mid = r.fields[f"{arch}.block_count"].contents() // 2
        for part in ("attn_output", "ffn_down"):
            raw(f"blk.{mid}.{part}.weight")[...] = 0
    elif how == "rope":
        f = r.fields[f"{arch}.rope.freq_base"]
        f.parts[f.data[0]][...] = f.contents() / 10
    elif how == "special":
        t = tensors["token_embd.weight"]
        row = t.n_bytes // int(t.shape[-1])
        for token in special:
            raw(t.name)[token * row:(token + 1) * row] = 0
    elif how == "blocks":
        rng = np.random.default_rng(0)
        for t in r.tensors:
            if t.name.startswith("blk.") and len(t.shape) == 2:
                _, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
                blocks = raw(t.name).reshape(-1, type_size)
                blocks[rng.random(blocks.shape[0]) < 0.01] = 0
    else:
        raise ValueError(how)
    r.data.flush()


def _figures(report) -> dict:
    return {"kld": report.kld, "kld_p99": report.fidelity.get("kld_p99"), "top1": report.top1, "nmse": report.nmse,
            "n_positions": report.n_positions, "passed": report.passed}


def measure(model: str, types, work: Path, threads: int | None, echo=print) -> list[dict]:
    from edgemed.converters.pipeline import ConvertOptions, convert
    from edgemed.converters.quality.parity import check_gguf, source_logits
    from edgemed.converters.quality.prompts import CHAT, chat_text
    from edgemed.converters.source import pip_models
    from edgemed.converters.source.checkpoint import hf_tokenizer

    ckpt = pip_models.hf_checkpoint(model)
    tok = hf_tokenizer(ckpt)
    text = chat_text(tok)
    special = sorted({t for t in tok(text, add_special_tokens=False)["input_ids"] if t in set(tok.all_special_ids)})
    assert text is not None and CHAT and special, "the chat prompt needs the model's template and special tokens"
    t0 = time.perf_counter()
    reference = source_logits(ckpt)
    echo(f"{model}: reference in {time.perf_counter() - t0:.1f} s")
    rows = []
    for out_type in types:
        intact = work / f"{model}-{out_type}.gguf"
        if not intact.exists():
            convert(ckpt, intact, ConvertOptions(out_type=out_type, parity=False, threads=threads), echo=lambda s: None)
        for how in ("intact", *DAMAGE):
            path = intact
            if how != "intact":
                path = work / f"{model}-{out_type}-{how}.gguf"
                shutil.copyfile(intact, path)
                _break(path, how, special)
            t0 = time.perf_counter()
            report = check_gguf(ckpt, path, out_type, threads=threads, reference=reference)
            row = {"model": model, "type": out_type, "file": how, **_figures(report),
                   "seconds": round(time.perf_counter() - t0, 1)}
            echo(json.dumps(row))
            rows.append(row)
            if path != intact:
                path.unlink()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | type | file | KLD (nats) | KLD p99 | top-1 | NMSE | gate then |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['type'].upper()} | {r['file']} | {r['kld']:.4f} | {r['kld_p99']:.3f} | "
                     f"{r['top1'] * 100:.1f} % | {r['nmse']:.2e} | {'PASS' if r['passed'] else 'FAIL'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help=f"pip model name (repeatable) [default: {', '.join(MODELS)}]")
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated GGUF types")
    ap.add_argument("--work", type=Path, help="folder for the converted files [default: a temporary one]")
    ap.add_argument("--threads", type=int, help="CPU threads")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    import tempfile

    from edgemed.converters.quality.fidelity import RULE, VERSION
    from edgemed.converters.quality.parity import KLD_GATES, NMSE_GATES, TOP1_GATE

    rows = []
    with tempfile.TemporaryDirectory(prefix="parity-gates-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for model in args.model or MODELS:
            rows += measure(model, args.types.split(","), work, args.threads)
    gates = {"nmse": NMSE_GATES, "top1": TOP1_GATE, "kld": KLD_GATES}
    doc = {"command": "python -m edgemed.benchmarks.parity_gates", "rule": RULE, "metric_version": VERSION,
           "gates_when_measured": gates, "rows": rows}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_text(args.results_dir / "parity_gates.json", json.dumps(doc, indent=1) + "\n", force=True)
    page = (f"# Parity gates: intact conversions against broken copies\n\n`{doc['command']}` (figures in "
            "`parity_gates.json`). Headline positions (each prompt's first left out); \"gate then\": the gates in force "
            f"when measured ({json.dumps(gates)}).\n\n{table(rows)}\n")
    write_text(args.results_dir / "parity_gates.md", page, force=True)
    print(table(rows))


if __name__ == "__main__":
    main()
