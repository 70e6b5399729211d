"""``edgemed quickstart``: the whole main job on a real model, offline, in about a minute."""

from __future__ import annotations

import click

from edgemed.constants import DEFAULT_OUTPUT_TYPE, GGUF_OUTPUT_TYPES

QUESTION = "A patient on warfarin starts taking ibuprofen for back pain. What is the main risk, and what should be done?"


@click.command()
@click.option("--model", "model_name", default=None, help="Example model carried by a pip package (default: smollm2-135m-instruct).")
@click.option("--quant", type=click.Choice(GGUF_OUTPUT_TYPES), default=DEFAULT_OUTPUT_TYPE["gguf"], show_default=True,
              help="Output weight type (auto needs --max-kld or --fit-profile: `edgemed convert --quant auto`).")
@click.option("-o", "--output", type=click.Path(),
              help="Where to write the GGUF (default: under $EDGEMED_HOME, replaced by the next quickstart).")
@click.option("--force", is_flag=True, help="Replace the -o file and its .report.json if they exist.")
@click.option("--question", default=QUESTION, show_default=False, help="The medical question to ask at the end.")
def quickstart(model_name, quant, output, force, question):
    """Obtain a real model from its pip package, turn it into a Hugging Face
    checkpoint, convert it to a 4-bit GGUF with a parity report, and answer a
    medical question with it. Nothing touches the network."""
    from edgemed import env

    env.enforce_offline()  # before require_route imports transformers (huggingface_hub reads it at import)
    from edgemed.converters import require_route
    from edgemed.converters.source import pip_models
    from edgemed.converters.gguf.calibration import default_imatrix

    require_route("gguf")
    from edgemed.converters.pipeline import ConvertOptions, convert, report_path
    from edgemed.files.atomic import check_destination, file_destination, refuse_input_as_output
    from edgemed.runtime import GenerationSettings, open_engine
    from edgemed.runtime.engine import LoadSettings

    output = file_destination(output, "-o", "NAME.gguf") if output is not None else None  # 'dir/' names no file
    name = model_name or pip_models.DEFAULT
    out = output or env.home() / "quickstart" / f"{name}-{quant}.gguf"
    replace = force or output is None  # the default location is edgemed's own; a file given with -o is the user's
    if output is None:
        from edgemed.files.state import require_folder

        require_folder(out.parent, "The quickstart's folder", env.HOME_VAR)  # a file in the way: named, no traceback
        out.parent.mkdir(parents=True, exist_ok=True)  # edgemed's own folder; a folder given with -o must exist
    else:  # never the pip package's own model file (the input), nor a file in edgemed's store
        refuse_input_as_output(out, [("the pip package's model", pip_models.gguf_file(name))])
    check_destination(out, replace)  # both before the minutes of work below
    check_destination(report_path(out), replace)
    from edgemed.runtime.selftest import describe_host

    click.echo(f"host: {describe_host()}")
    click.echo(f"1/4 obtain: {name} from its pip package")
    click.echo(f"    {pip_models.gguf_file(name)}")
    click.echo("2/4 Hugging Face checkpoint (dequantized once, then cached)")
    ckpt = pip_models.hf_checkpoint(name)
    click.echo(f"    {ckpt}")
    opts = ConvertOptions(out_type=quant, force=replace, imatrix_from=default_imatrix(quant))  # as `edgemed convert` does
    calibrated = f", calibrated on {opts.imatrix_from.name}," if opts.imatrix_from else ""
    click.echo(f"3/4 convert to {quant.upper()}{calibrated} with tokenizer check and parity report")
    report = convert(ckpt, out, opts, echo=lambda s: click.echo(f"    {s}"))
    click.echo(f"    wrote {out} ({report.size_bytes / 1e6:.1f} MB) in {report.timings_s['total']:.1f} s")
    click.echo(f"4/4 answer a medical question with {out.name}")
    click.echo(f"    Q: {question}")
    click.echo("    A: ", nl=False)
    engine = open_engine(out, LoadSettings(n_ctx=2048))
    try:
        for piece in engine.chat([{"role": "user", "content": question}], GenerationSettings(max_tokens=120)):
            click.echo(piece, nl=False)
    finally:
        engine.close()
    click.echo("\n(A 135M-parameter demo model: its answers are not medical advice.)")
