"""``edgemed plan``: will MODEL fit this device, and with which settings? Nothing is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.core import ParameterSource

from edgemed.cli import json_flag
from edgemed.cli.serving import CTX_PER_SLOT, DEFAULT_SLOTS, SLOTS


@click.command()
@click.argument("model", type=click.Path(path_type=Path, exists=True))
@click.option("--profile", help="Device profile (default: detected, planned as `run` loads here, with the installed "
              "llama.cpp; named: the device it describes; see `edgemed devices list`).")
@click.option("--ctx", "n_ctx", type=int, help="Check this context size instead of choosing the largest that fits "
              "(with --serve, as `serve --ctx`: tokens per slot).")
@click.option("--budget-mb", type=float, help="Override the profile's memory budget (MiB).")
@click.option("--root", type=click.Path(path_type=Path, exists=True, file_okay=False), default="/",
              help="Detect the device from files below this folder.")
@click.option("--serve", "serving", is_flag=True, help="Plan for `edgemed serve` with the same options: its slots "
              "(--slots, each with a KV stream of its own), its micro-batch (the profile's n_ubatch; `run` and `chat` "
              "use n_ubatch_single where the profile sets one), the host RAM of its prompt-prefix cache (the profile's "
              "memory.prefix_cache_mib, reduced to what the budget leaves) and its LoRA adapters (default: every one "
              "found for MODEL, as serve).")
@click.option("--slots", type=SLOTS, default=DEFAULT_SLOTS, show_default=True,
              help="Plan for `edgemed serve --slots N` (implies --serve): the requests generated at once.")
@click.option("--no-prefix-cache", is_flag=True, help="Plan for `edgemed serve --no-prefix-cache` (implies --serve): "
              "no prompt reuse, no host prefix cache.")
@click.option("--prefix-cache-mib", type=int, help="Plan for `edgemed serve --prefix-cache-mib N` (implies --serve): "
              "counted before the context is chosen, refused when it cannot fit.")
@click.option("--adapter", "adapter_args", multiple=True, metavar="NAME|FILE[:SCALE]",
              help="Count this LoRA adapter (repeatable), as `run --adapter` (or, with --serve, `serve --adapter`) "
              "applies it: the NAME of one in MODEL's bundle or an installed adapter bundle for it, or a GGUF "
              "adapter file.")
@click.option("--no-adapters", is_flag=True, help="Plan for `edgemed serve --no-adapters` (implies --serve): the base "
              "model alone.")
@json_flag()
def plan(model: Path, profile, n_ctx, budget_mb, root, serving, slots, no_prefix_cache, prefix_cache_mib, adapter_args,
         no_adapters, as_json):
    """Plan memory for MODEL (a .gguf): weights + KV cache + compute buffers vs the device budget.

    Picks the largest context that fits, or exits with an error saying what to change. With --serve (and
    its options) the plan is the one `edgemed serve` makes with the same options; without, `edgemed run`'s.
    """
    from edgemed.devices.detect import resolve
    from edgemed.runtime.plan import GPU_MEMORY_NOTE, MIB, budget_from_mib, kv_cells, read_shape
    from edgemed.runtime.session import plan_load

    given = click.get_current_context().get_parameter_source("slots") != ParameterSource.DEFAULT
    serving = serving or given or no_prefix_cache or prefix_cache_mib is not None or no_adapters  # serve's options
    if serving and n_ctx is not None:  # per slot, as serve takes it, and refused where serve refuses it
        here_ctx = click.get_current_context()
        CTX_PER_SLOT.convert(n_ctx, next(p for p in here_ctx.command.params if p.name == "n_ctx"), here_ctx)
    budget = budget_from_mib(budget_mb) if budget_mb is not None else None
    prof, facts = resolve(profile, root)
    adapters = _adapters(model, adapter_args, no_adapters, serving)
    slots = slots if serving else 1
    # the profile detected for this machine plans as `run` loads here: with the installed llama.cpp's offload, AMX
    # buffer and CPU features; a named profile plans for the device it describes (with the build meant for it)
    here = profile is None and Path(root).resolve() == Path("/")
    cache = serving and not no_prefix_cache
    p = plan_load(model, prof, facts, n_ctx=n_ctx, adapters=list(adapters.values()), prefix_cache=cache,
                  prefix_cache_mib=prefix_cache_mib, slots=slots, batched=serving, budget=budget, here=here)
    load = load_description(p.llama, p.estimate.repacked)
    served = {"serve": {"slots": slots, "n_ctx_per_slot": p.estimate.n_ctx // slots, "prefix_cache": cache,
                        "adapters": sorted(adapters)}} if serving else {}
    if as_json:
        click.echo(json.dumps({**p.to_dict(), "load_mode": load[0], **served}, indent=2))
        return
    e = p.estimate
    mib = lambda n: f"{n / MIB:8.1f} MiB"  # noqa: E731
    click.echo(f"model    {model}\nprofile  {p.profile}  (budget {p.budget / MIB:.0f} MiB)")
    click.echo(f"  weights        {mib(e.weights)}")
    if e.repacked:
        click.echo(f"  CPU repacked   {mib(e.repacked)}")
    cells = kv_cells(e.n_ctx, slots)
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
    if cache:
        asked = f", {p.prefix_cache_asked / MIB:.0f} MiB asked" if p.prefix_cache_asked != e.prefix_cache else ""
        click.echo(f"  prefix cache   {mib(e.prefix_cache)}  (serve: saved prompt prefixes in host RAM{asked})")
    click.echo(f"  runtime        {mib(e.runtime)}")
    click.echo(f"  peak (pred.)   {mib(e.total)}  = {100 * e.total / p.budget:.0f} % of budget")
    per_slot = f": {slots} slots x {e.n_ctx // slots}" if slots > 1 else ""
    click.echo(f"context  {e.n_ctx} tokens{per_slot} (limited by {p.limited_by})")
    if adapters:
        click.echo(f"adapters {', '.join(adapters)}")
    pools = {"host": "host RAM: nothing is offloaded", "unified": "one pool: the GPU shares the host's memory "
             "(memory.unified), so offloaded layers are counted in the budget", "host+gpu": GPU_MEMORY_NOTE}
    click.echo(f"memory   {pools[p.pool]}")
    click.echo(f"load     {load[0]}: {load[1]}")
    s = {k: f"{prof.llama[k]} (the device's)" if k.startswith("n_threads") and v is None else v  # named elsewhere
         for k, v in p.llama.items()}
    click.echo(f"settings n_threads={s['n_threads']} n_threads_batch={s['n_threads_batch']} n_gpu_layers={s['n_gpu_layers']} "
               f"n_batch={s['n_batch']} n_ubatch={s['n_ubatch']} flash_attn={s['flash_attn']} "
               f"type_k={s['type_k']} type_v={s['type_v']} use_mmap={s['use_mmap']} use_mlock={s['use_mlock']}")


def _adapters(model: Path, args, none: bool, serving: bool) -> dict:
    """The LoRA adapters the load would apply, name -> ``loader.AdapterSpec``: `serve`'s (``--adapter``, else every
    one found for MODEL; ``--no-adapters``: none) with ``serving``, else `run --adapter`'s."""
    if not args and (none or not serving):
        return {}
    from edgemed.packaging.ref import adapter_specs, runnable

    ref = runnable(str(model))
    if serving:
        from edgemed.cli.serving import adapters_to_serve

        return adapters_to_serve(ref, args, none)
    return {str(a): spec for a, spec in zip(args, adapter_specs(ref, list(args)))}


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
