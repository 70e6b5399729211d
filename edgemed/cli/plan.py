"""``edgemed plan``: will MODEL fit this device, and with which settings? Nothing is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgemed.cli import json_flag


@click.command()
@click.argument("model", type=click.Path(path_type=Path, exists=True))
@click.option("--profile", help="Device profile (default: detected, planned as `run` loads here, with the installed "
              "llama.cpp; named: the device it describes; see `edgemed devices list`).")
@click.option("--ctx", "n_ctx", type=int, help="Check this context size instead of choosing the largest that fits.")
@click.option("--budget-mb", type=float, help="Override the profile's memory budget (MiB).")
@click.option("--root", type=click.Path(path_type=Path, exists=True, file_okay=False), default="/",
              help="Detect the device from files below this folder.")
@click.option("--serve", "serving", is_flag=True, help="Plan for `edgemed serve`: its micro-batch (the profile's n_ubatch; "
              "`run` and `chat` use n_ubatch_single where the profile sets one), and the host RAM of its prompt-prefix "
              "cache (the profile's memory.prefix_cache_mib, reduced to what the budget leaves).")
@click.option("--prefix-cache-mib", type=int, help="Plan for `edgemed serve --prefix-cache-mib N` (implies --serve): "
              "counted before the context is chosen, refused when it cannot fit.")
@json_flag()
def plan(model: Path, profile, n_ctx, budget_mb, root, serving, prefix_cache_mib, as_json):
    """Plan memory for MODEL (a .gguf): weights + KV cache + compute buffers vs the device budget.

    Picks the largest context that fits, or exits with an error saying what to change.
    """
    from edgemed.devices.detect import resolve
    from edgemed.runtime.plan import (GPU_MEMORY_NOTE, MIB, budget_from_mib, installed_build, kv_cells, make_plan,
                                      prefix_cache_request, read_shape)

    budget = budget_from_mib(budget_mb) if budget_mb is not None else None
    prof, facts = resolve(profile, root)
    cache = prefix_cache_request(prof, prefix_cache_mib) if serving or prefix_cache_mib is not None else None
    # the profile detected for this machine plans as `run` loads here: with the installed llama.cpp's offload, AMX
    # buffer and CPU features; a named profile plans for the device it describes (with the build meant for it)
    here = profile is None and Path(root).resolve() == Path("/")
    build = installed_build() if here else {}
    p = make_plan(model, prof, facts, requested_ctx=n_ctx, budget=budget, prefix_cache=cache, batched=cache is not None,
                  here=here, **build)
    load = load_description(p.llama, p.estimate.repacked)
    if as_json:
        click.echo(json.dumps({**p.to_dict(), "load_mode": load[0]}, indent=2))
        return
    e = p.estimate
    mib = lambda n: f"{n / MIB:8.1f} MiB"  # noqa: E731
    click.echo(f"model    {model}\nprofile  {p.profile}  (budget {p.budget / MIB:.0f} MiB)")
    click.echo(f"  weights        {mib(e.weights)}")
    if e.repacked:
        click.echo(f"  CPU repacked   {mib(e.repacked)}")
    cells = kv_cells(e.n_ctx)
    padded = f": {cells} cells, as llama.cpp pads it" if cells != e.n_ctx else ""
    click.echo(f"  KV cache       {mib(e.kv_cache)}  (n_ctx {e.n_ctx}{padded}, {p.llama['type_k']}/{p.llama['type_v']})")
    fa = f"flash_attn {p.llama['flash_attn']}"
    if p.llama["flash_attn"] != prof.llama["flash_attn"]:  # on for this model's head width alone
        shape = read_shape(model)
        fa += f": heads {shape.head_dim_k} wide, one of the profile's flash_attn_head_dims"
    click.echo(f"  compute        {mib(e.compute)}  (n_ubatch {p.llama['n_ubatch']}, {fa})")
    if e.work:
        click.echo(f"  compute work   {mib(e.work)}  (ggml's work buffer, beside the compute buffer)")
    if e.adapters:
        click.echo(f"  LoRA adapters  {mib(e.adapters)}")
    if cache is not None:
        asked = f", {p.prefix_cache_asked / MIB:.0f} MiB asked" if p.prefix_cache_asked != e.prefix_cache else ""
        click.echo(f"  prefix cache   {mib(e.prefix_cache)}  (serve: saved prompt prefixes in host RAM{asked})")
    click.echo(f"  runtime        {mib(e.runtime)}")
    click.echo(f"  peak (pred.)   {mib(e.total)}  = {100 * e.total / p.budget:.0f} % of budget")
    click.echo(f"context  {e.n_ctx} tokens (limited by {p.limited_by})")
    pools = {"host": "host RAM: nothing is offloaded", "unified": "one pool: the GPU shares the host's memory "
             "(memory.unified), so offloaded layers are counted in the budget", "host+gpu": GPU_MEMORY_NOTE}
    click.echo(f"memory   {pools[p.pool]}")
    click.echo(f"load     {load[0]}: {load[1]}")
    s = p.llama
    click.echo(f"settings n_threads={s['n_threads']} n_threads_batch={s['n_threads_batch']} n_gpu_layers={s['n_gpu_layers']} "
               f"n_batch={s['n_batch']} n_ubatch={s['n_ubatch']} flash_attn={s['flash_attn']} "
               f"type_k={s['type_k']} type_v={s['type_v']} use_mmap={s['use_mmap']} use_mlock={s['use_mlock']}")


def load_description(llama: dict, repacked: int) -> tuple[str, str]:
    """llama.cpp's load mode for these settings (``runtime.params.load_mode``'s names) and what it means for memory."""
    mmap, mlock = llama["use_mmap"], llama["use_mlock"]
    name = ("mmap+mlock" if mlock else "mmap") if mmap else ("mlock" if mlock else "none")
    if not mmap:
        held = "the file is read into memory once; repacked weights are read straight into their interleaved buffers"
    elif repacked:
        held = f"the file is mapped, and {repacked / (1 << 20):.0f} MiB of repacked weights are copied beside its pages"
    else:
        held = "the file is mapped; its pages are the weights"
    return name, held + (" (locked in RAM)" if mlock else "")
