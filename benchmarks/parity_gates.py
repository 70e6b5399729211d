"""Where the parity gate's bars lie: intact conversions against deliberately broken copies, per weight type.

    python -m edgemed.benchmarks.parity_gates                       # SmolLM2-135M and Qwen2.5-0.5B, four types
    python -m edgemed.benchmarks.parity_gates --model smollm2-135m-instruct --types q4_k_m
    python -m edgemed.benchmarks.parity_gates --model smollm2-135m-instruct --types onnx-fp32,onnx-int4 \
        --name parity_gates-onnx                                    # the ONNX route's outputs
    python -m edgemed.benchmarks.parity_gates --name parity_gates-onnx --render  # its files again, nothing measured

Per model (its Hugging Face checkpoint from the pip package, ``pip_models.hf_checkpoint``) and type, converts the
checkpoint as ``edgemed convert`` does (4-bit types with the default importance matrix), then breaks copies of the
file in place, each in one way a conversion or a later edit could:

- ``layer``: the middle decoder layer's attn_output and ffn_down zeroed (the layer adds nothing);
- ``rope``: rope.freq_base a tenth of the trained one (positions computed wrongly; the header check refuses this
  field, the figure stands for a rope bug inside the weights; the prompts' positions are short, so it costs little);
- ``special``: the embedding rows of the chat template's special tokens zeroed (<|im_start|>, <|im_end|>);
- ``blocks``: 1 % of the quant blocks of every decoder matrix zeroed.

An ``onnx-<weight type>`` type (``onnx-fp32``, ``onnx-int4``) is the directory ``edgemed convert --to onnx`` writes
(the traced graph, the int4 recipe's defaults), broken in a copy of its graph and data file (``break_onnx``):
``layer`` and ``special`` as above; ``blocks``: 1 % of the int4 blocks of every decoder ``MatMulNBits`` zeroed (their
scales, so the block's weights are 0 whatever its zero point), or for float32 1 % of the decoder matrices' elements
(as an F16 GGUF's "blocks" are single values). No ``rope``: the graph holds no rope-base field, as the GGUF header does.

Each file is compared with the source on the gate's own prompts (``parity.check_gguf``, ``onnx.parity.check_onnx``;
the reference computed once per model) and its headline figures (``fidelity``: first position left out) are written
to ``<results-dir>/<name>.json`` and its table to ``<name>.md`` (``--name``, default ``parity_gates``); decision 0022
reads them. Beside the gate tables in force (``gates_when_measured``) the JSON names every gate each type's rows were
held to (``gates_applied``, an ONNX type under its gate key; the "gate then" column); ``--render`` writes both files
again from the JSON's rows and tables, measuring nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from edgemed.files.atomic import write_text

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("smollm2-135m-instruct", "qwen2.5-0.5b-instruct")
TYPES = ("f16", "q8_0", "q4_0", "q4_k_m")
DAMAGE = ("layer", "rope", "special", "blocks")
#: ``--types`` entries for the ONNX route: ``onnx-`` and the weight type ``convert --to onnx --quant`` takes
ONNX_PREFIX = "onnx-"
ONNX_DAMAGE = ("layer", "special", "blocks")


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


def break_onnx(directory: Path, out: Path, how: str, special: list[int], layers: int) -> None:
    """Write into the new folder ``out`` a copy of the ONNX directory ``directory`` (``convert --to onnx``'s) with its
    graph's weights damaged (``how``: one of ``ONNX_DAMAGE``; ``special``: the chat tokens' ids; ``layers``: the
    model's decoder layer count). The copy is written anew (graph and one data file), the original left as it is."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from edgemed.converters.onnx.export import MODEL_FILE
    from edgemed.converters.onnx.quant import save_single_file

    shutil.copytree(directory, out, ignore=shutil.ignore_patterns(MODEL_FILE, MODEL_FILE + ".data"))
    model = onnx.load(str(directory / MODEL_FILE))
    inits = {t.name: t for t in model.graph.initializer}

    def edit(name, change):  # one initializer through numpy, written back in place
        array = numpy_helper.to_array(inits[name]).copy()
        change(array)
        inits[name].CopyFrom(numpy_helper.from_array(array, name))

    def zero(array):
        array[...] = 0

    # the decoder's weight products: MatMul's weight, or MatMulNBits' block scales (a zero scale: a zero block)
    products = [(n, n.input[2] if n.op_type == "MatMulNBits" else n.input[1]) for n in model.graph.node
                if n.op_type in ("MatMul", "MatMulNBits") and "/layers." in n.name and n.input[1] in inits]
    if how == "layer":
        mid = f"/layers.{layers // 2}/"
        hit = [w for n, w in products if mid in n.name and ("/o_proj/" in n.name or "/down_proj/" in n.name)]
        assert len(hit) == 2, hit
        for name in hit:
            edit(name, zero)
    elif how == "special":
        embed = next(n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")

        def rows(array):
            array[special] = 0

        edit(embed, rows)
    elif how == "blocks":
        rng = np.random.default_rng(0)

        def some(array):
            array[rng.random(array.shape) < 0.01] = 0

        assert products
        for _, name in products:
            edit(name, some)
    else:
        raise ValueError(how)
    save_single_file(model, out / MODEL_FILE)


def _measure_onnx(ckpt, model: str, weight_type: str, work: Path, threads, reference, special):
    """Rows for the intact ``convert --to onnx`` directory of ``weight_type`` and its broken copies, one at a time."""
    from edgemed.converters.onnx.export import MODEL_FILE, OnnxOptions, convert_onnx
    from edgemed.converters.onnx.parity import check_onnx

    layers = json.loads((Path(ckpt) / "config.json").read_text())["num_hidden_layers"]
    intact = work / f"{model}-onnx-{weight_type}"
    if not intact.exists():
        convert_onnx(ckpt, intact, OnnxOptions(weight_type=weight_type, parity=False, threads=threads),
                     echo=lambda s: None)
    with _scratch(work) as scratch:
        for how in ("intact", *ONNX_DAMAGE):
            path = intact
            if how != "intact":
                path = scratch / how
                break_onnx(intact, path, how, special, layers)
            t0 = time.perf_counter()
            report = check_onnx(ckpt, path / MODEL_FILE, weight_type, threads=threads, reference=reference)
            row_type = ONNX_PREFIX + weight_type
            yield {"model": model, "type": row_type, "file": how, **_figures(report, row_type),
                   "seconds": round(time.perf_counter() - t0, 1)}


@contextlib.contextmanager
def _scratch(work: Path):
    """A new folder of this run's own inside ``work`` (which may be the user's ``--work``) for the broken copies,
    removed whole afterwards: nothing of the same name already in ``work`` is overwritten or deleted."""
    folder = Path(tempfile.mkdtemp(prefix="broken-", dir=work))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _figures(report, row_type: str) -> dict:
    """A row's figures from its check's ``report``; the gates it applied must be the ones ``gates_applied`` writes for
    ``row_type`` (the block names every gate a row was held to, or the run stops here)."""
    from edgemed.converters.quality.parity import gates_for

    applied = {"nmse": report.gate_nmse, "top1": report.gate_top1, "kld": report.gate_kld}
    if applied != gates_for(gate_key(row_type)):
        raise RuntimeError(f"{row_type}: the check applied {applied}, not the gates the results would record "
                           f"({gates_for(gate_key(row_type))}): gate_key or parity.gates_for is out of step with it")
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
        if out_type.startswith(ONNX_PREFIX):
            for row in _measure_onnx(ckpt, model, out_type[len(ONNX_PREFIX):], work, threads, reference, special):
                echo(json.dumps(row))
                rows.append(row)
            continue
        intact = work / f"{model}-{out_type}.gguf"
        if not intact.exists():
            convert(ckpt, intact, ConvertOptions(out_type=out_type, parity=False, threads=threads), echo=lambda s: None)
        with _scratch(work) as scratch:
            for how in ("intact", *DAMAGE):
                path = intact
                if how != "intact":
                    path = scratch / f"{how}.gguf"
                    shutil.copyfile(intact, path)
                    _break(path, how, special)
                t0 = time.perf_counter()
                report = check_gguf(ckpt, path, out_type, threads=threads, reference=reference)
                row = {"model": model, "type": out_type, "file": how, **_figures(report, out_type),
                       "seconds": round(time.perf_counter() - t0, 1)}
                echo(json.dumps(row))
                rows.append(row)
                if path != intact:
                    path.unlink()  # the next copy's disk space; the scratch folder goes afterwards anyway
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | type | file | KLD (nats) | KLD p99 | top-1 | NMSE | gate then |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['type'].upper()} | {r['file']} | {r['kld']:.4f} | {r['kld_p99']:.3f} | "
                     f"{r['top1'] * 100:.1f} % | {r['nmse']:.2e} | {'PASS' if r['passed'] else 'FAIL'} |")
    return "\n".join(lines)


def gate_key(row_type: str) -> str:
    """The gate tables' key for a row's type: a GGUF type is its own; ``onnx-<weight type>`` is gated under
    ``onnx.parity.GATE_TYPE``'s key (fp32 as ``f32``, int4 as ``int4``), as ``check_onnx`` gates it."""
    if not row_type.startswith(ONNX_PREFIX):
        return row_type
    from edgemed.converters.onnx.parity import GATE_TYPE

    weight_type = row_type[len(ONNX_PREFIX):]
    return GATE_TYPE.get(weight_type, weight_type)


def gates_applied(rows: list[dict], when: dict) -> dict[str, dict]:
    """Row type -> every gate its files were held to (``parity.gates_for``: ``nmse``, ``top1``, ``kld``; None where
    it had none) under ``when``, the gate tables in force when the rows were measured (``gates_when_measured``): what
    the "gate then" column applied, type by type, an ONNX type under its own key."""
    from edgemed.converters.quality.parity import gates_for

    return {t: gates_for(gate_key(t), when) for t in dict.fromkeys(r["type"] for r in rows)}


def with_gates_applied(doc: dict) -> dict:
    """A results document with its ``gates_applied`` (re)made from its rows and ``gates_when_measured``, beside them."""
    out = {k: v for k, v in doc.items() if k not in ("gates_applied", "rows")}
    return {**out, "gates_applied": gates_applied(doc["rows"], doc["gates_when_measured"]), "rows": doc["rows"]}


def _gate_words(gates: dict) -> str:
    words = [f"NMSE < {gates['nmse']:g}" if gates["nmse"] is not None else f"top-1 >= {gates['top1']:g}",
             f"KLD <= {gates['kld']:g}" if gates["kld"] is not None else "no KLD bar"]
    return ", ".join(words)


def write(results_dir: Path, name: str, doc: dict) -> None:
    """``<name>.json`` (``doc`` with its ``gates_applied``) and its page ``<name>.md`` in ``results_dir``."""
    doc = with_gates_applied(doc)
    results_dir.mkdir(parents=True, exist_ok=True)
    write_text(results_dir / f"{name}.json", json.dumps(doc, indent=1) + "\n", force=True)
    then = "; ".join(f"{t.upper()}: {_gate_words(g)}" for t, g in doc["gates_applied"].items())
    page = (f"# Parity gates: intact conversions against broken copies\n\n`{doc['command']}` (figures in "
            f"`{name}.json`). Headline positions (each prompt's first left out); \"gate then\": the gates in force "
            f"when measured ({then}; `gates_applied`, from the tables in `gates_when_measured`).\n\n"
            f"{table(doc['rows'])}\n")
    write_text(results_dir / f"{name}.md", page, force=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help=f"pip model name (repeatable) [default: {', '.join(MODELS)}]")
    ap.add_argument("--types", default=",".join(TYPES),
                    help=f"comma-separated GGUF types, or {ONNX_PREFIX}fp32 / {ONNX_PREFIX}int4 for the ONNX route")
    ap.add_argument("--work", type=Path, help="folder for the converted files [default: a temporary one]")
    ap.add_argument("--threads", type=int, help="CPU threads")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--name", default="parity_gates", help="the results files' name: <name>.json and <name>.md")
    ap.add_argument("--render", action="store_true",
                    help="measure nothing: write <name>.json's gates_applied and <name>.md again from its rows and "
                         "gates_when_measured")
    args = ap.parse_args()

    if args.render:
        path = args.results_dir / f"{args.name}.json"
        if not path.is_file():
            ap.error(f"--render reads {path}, which does not exist: pass the --results-dir and --name it was written "
                     "with, or measure first (leave out --render)")
        write(args.results_dir, args.name, json.loads(path.read_text(encoding="utf-8")))
        print(f"{path} and its .md written again from its rows")
        return

    from edgemed.converters.quality.fidelity import RULE, VERSION
    from edgemed.converters.quality.parity import KLD_GATES, NMSE_GATES, TOP1_GATE

    rows = []
    with tempfile.TemporaryDirectory(prefix="parity-gates-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for model in args.model or MODELS:
            rows += measure(model, args.types.split(","), work, args.threads)
    command = "python -m edgemed.benchmarks.parity_gates"
    if args.model or args.types != ",".join(TYPES) or args.name != "parity_gates":
        command += "".join(f" --model {m}" for m in args.model or ()) + f" --types {args.types}" + (
            f" --name {args.name}" if args.name != "parity_gates" else "")
    doc = {"command": command, "rule": RULE, "metric_version": VERSION,
           "gates_when_measured": {"nmse": NMSE_GATES, "top1": TOP1_GATE, "kld": KLD_GATES}, "rows": rows}
    write(args.results_dir, args.name, doc)
    print(table(rows))


if __name__ == "__main__":
    main()
