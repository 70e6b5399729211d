"""``edgemed run``: answer one prompt or chat turn with a model file, streaming."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("--prompt", "-p", help="A user message, rendered with the model's chat template.")
@click.option("--raw", is_flag=True, help="Send --prompt as raw text, without the chat template.")
@click.option("--system", "-s", help="A system message to put before the prompt.")
@click.option("--max-tokens", default=256, show_default=True, help="Most tokens to generate.")
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy (reproducible).")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--ctx", "n_ctx", default=4096, show_default=True, help="Context window to allocate.")
@click.option("--threads", type=int, help="CPU threads (default: physical cores).")
def run(model, prompt, raw, system, max_tokens, temperature, top_p, seed, n_ctx, threads):
    """Generate a reply with MODEL (a .gguf file, or an installed model's name), streaming it to stdout.

    With no --prompt, the prompt is read from standard input.
    """
    from edgemed.errors import InputError
    from edgemed.runtime import GenerationSettings, open_engine
    from edgemed.runtime.engine import LoadSettings

    if model is None:
        raise InputError("No model given.", "pass a .gguf path: edgemed run model.gguf --prompt '...' (make one with `edgemed convert`)")
    if prompt is None:
        if sys.stdin.isatty():
            raise InputError("No prompt given.", "pass --prompt '...' or pipe the prompt on standard input")
        prompt = sys.stdin.read()
    from edgemed.packaging.store import resolve_model

    model = resolve_model(model)  # an installed name, or a bundle directory: verified before load
    settings = GenerationSettings(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    engine = open_engine(model, LoadSettings(n_ctx=n_ctx, n_threads=threads, seed=seed))
    try:
        if raw:
            pieces = engine.complete(prompt, settings)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            pieces = engine.chat(messages, settings)
        for piece in pieces:
            click.echo(piece, nl=False)
        click.echo()
    finally:
        engine.close()
