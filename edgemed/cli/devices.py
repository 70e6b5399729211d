"""``edgemed devices``: detect this machine, list the shipped and user profiles, show one."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgemed.cli import json_flag


@click.group()
def devices() -> None:
    """Device profiles: which settings suit this machine."""


@devices.command()
@click.option("--root", type=click.Path(path_type=Path, exists=True, file_okay=False), default="/",
              help="Read the machine's files below this folder (a copy of another device's /proc, /etc).")
@json_flag("Print facts and the chosen profile as JSON.")
def detect(root: Path, as_json: bool) -> None:
    """Detect this machine and print the profile edgemed would use."""
    from edgemed.devices.detect import choose, detect as detect_facts
    from edgemed.formats.terminal_text import shown

    facts = detect_facts(root)
    profile = choose(facts)
    budget = profile.budget_bytes(facts)
    # a budget shown as 0.0 GB says why where the OS reserve is the cause (a small container), with the fixes
    note, fix = profile.reserve_note(facts) if budget < 0.05e9 else ("", "")
    if as_json:
        click.echo(json.dumps({"profile": profile.name, "platform": facts.platform, "model": facts.model,
                               "physical_cores": facts.physical_cores, "logical_cores": facts.logical_cores,
                               "performance_cores": facts.performance_cores, "memory_bytes": facts.memory_bytes,
                               "memory_limit_bytes": facts.memory_limit_bytes, "cpu_limit": facts.cpu_limit,
                               "usable_cores": facts.usable_cores, "budget_bytes": budget,
                               "budget_note": {"problem": note, "fix": fix} if note else None,
                               "details": facts.details}, indent=2))
        return
    # the model string and the power mode's name are the device's files (a --root tree is anyone's): shown escaped
    click.echo(f"{profile.name} ({shown(facts.summary())})")
    click.echo(f"  {shown(facts.model)}")
    click.echo(f"  memory budget for a model: {budget / 1e9:.1f} GB; recommended quant: {profile.recommended_quant}")
    if note:
        click.echo(f"  {note}.\n  Fix: {fix}.")


@devices.command(name="list")
@json_flag()
def list_profiles(as_json: bool) -> None:
    """List every profile (shipped, then $EDGEMED_HOME/profiles, then $EDGEMED_PROFILES_DIR: a later one replaces
    an earlier one of the same name)."""
    from edgemed.devices import load_profiles

    profiles = load_profiles()
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in profiles.values()], indent=2))
        return
    width = max(map(len, profiles))
    for p in sorted(profiles.values(), key=lambda p: p.name):
        click.echo(f"{p.name:<{width}}  {p.description}")


@devices.command()
@click.argument("name")
@json_flag()
def show(name: str, as_json: bool) -> None:
    """Show profile NAME: how it is matched, its memory budget and engine settings."""
    from edgemed.devices import get_profile

    p = get_profile(name)
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
        return
    click.echo(f"{p.name}: {p.description}\n  file: {p.source}\n  recommended quant: {p.recommended_quant}")
    for section in ("match", "memory", "llama", "onnx"):
        click.echo(f"[{section}]")
        for key, value in getattr(p, section).items():
            click.echo(f"  {key} = {json.dumps(value)}")


@devices.command()
@click.argument("model", required=False)
@click.option("--profile", help="Device profile whose llama settings to check (default: detected).")
@click.option("--extra-buffers", type=click.Choice(["auto", "all", "repack", "none"]),
              help="Check this extra-buffer mode instead of the profile's.")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME|FILE[:SCALE]",
              help="Check the load with this LoRA adapter applied, as `run --adapter` loads it: the NAME of one in "
              "MODEL's bundle or an installed adapter bundle for it, or a GGUF adapter file. Repeatable.")
@json_flag("Print the verdicts as JSON.")
def check(model: str | None, profile: str | None, extra_buffers: str | None, adapters: tuple, as_json: bool) -> None:
    """Load MODEL with this host's settings and decode a few tokens in a child process.

    A native crash (segfault, abort) in the child is reported as one paragraph with the
    setting that avoids it; the verdict is cached, and run/chat/serve/convert/bench consult
    it before they load llama.cpp in process. MODEL defaults to the README's SmolLM2. With --adapter
    the child decodes with the adapters applied (checked against MODEL and counted by the memory plan first),
    the verdict `run --adapter` and `serve --adapter` consult.
    """
    from dataclasses import replace

    from edgemed.errors import InputError
    from edgemed.formats.sniff import model_format
    from edgemed.packaging.ref import loaded_as_verified
    from edgemed.runtime import native_build, selftest
    from edgemed.runtime.buffers import OFFLOAD_FIX
    from edgemed.runtime.llamacpp import lib
    from edgemed.runtime.session import prepare

    ref, specs = _check_target(model, adapters)
    path = ref.model_path
    if model_format(path) != "gguf":
        raise InputError(f"'{path}' is not a GGUF file: the self-test checks llama.cpp loads only.",
                         "pass a .gguf file or an installed GGUF model name")
    if specs:
        from edgemed.formats.gguf_header import read_header
        from edgemed.runtime.loader import check_adapter

        meta = read_header(path).metadata
        for spec in specs:
            check_adapter(meta, path, spec.path)  # made for this base, before a child loads it
    prepared = prepare(path, profile, adapters=specs)
    load = prepared.load
    if extra_buffers:
        load = replace(load, extra_buffers=extra_buffers)
    # each verdict is of the verified bytes: a file changed meanwhile is refused before its verdict is kept
    tried = selftest.check(path, load, use_cache=False, adapters=specs, after_run=lambda: loaded_as_verified(ref, specs))
    host = selftest.Host.current()
    first, last = tried[0][1], tried[-1][1]
    note = ""
    if selftest.auto_fell_back(load, tried):  # auto tried the AMX buffer; CPU_REPACK is what a load uses here
        said = f"it crashed ({first.signal})" if first.conclusive else f"it did not finish ({first.signal or first.detail})"
        note = (f"  auto tried the AMX buffer first: {said}, and loads use CPU_REPACK."
                f"{selftest.amx_hint(first, host)}")
        first = last
    elif load.extra_buffers == "auto" and "AMX_INT8 = 1" in host.system_info and (
            dropped := native_build.amx_tiles_dropped_by()):
        note = (f"  AMX not tried: this llama.cpp was compiled by {dropped}, whose AMX "
                "tile setup faults; a llama-cpp-python compiled with clang runs the AMX kernels (README, \"AMX hosts\").")
    offloads = bool(lib().llama_supports_gpu_offload())
    if as_json:
        click.echo(json.dumps({"model": str(path), "adapters": [{"path": str(a.path), "scale": a.scale} for a in specs],
                               "host": {"llama_cpp": host.llama_cpp_version, "system_info": host.system_info,
                                        "library_sha256": host.library,
                                        "compiled_by": list(native_build.compilers()),
                                        "gpu_offload": offloads},
                               "n_gpu_layers": load.n_gpu_layers,
                               "uses": first.mode if first.ok else last.mode if last.ok else None,
                               "note": note.strip() or None,
                               "verdicts": [{"ok": v.ok, "extra_buffers": v.mode, "signal": v.signal,
                                            "child": _child_report(v)} for _, v in tried]},
                              indent=2))
    elif first.ok:
        with_ = f" with the adapters {', '.join(a.path.name for a in specs)} applied" if specs else ""
        cpu_only = "" if offloads else ", CPU only: this llama.cpp build cannot offload"
        click.echo(f"ok: {path.name} loads and decodes{with_} with extra_buffers = \"{first.mode}\" on this host{cpu_only}")
        if placement := (_child_report(first) or {}).get("placement"):
            click.echo(f"  placement: {placement}")  # llama.cpp's buffers, and the layers it offloaded
        if not offloads and load.n_gpu_layers:
            click.echo(f"  the profile {prepared.profile} asks for n_gpu_layers = {load.n_gpu_layers} (layers on the "
                       f"GPU), and every layer runs on the CPU: {OFFLOAD_FIX}.")
        click.echo(f"  llama-cpp-python {host.llama_cpp_version}; {host.system_info.strip()}")
        if note:
            click.echo(note)
    else:
        if first.conclusive:
            click.echo(selftest.crash_paragraph(path, first, host, last.mode if last.ok else None), err=True)
        else:  # not a native crash: the file, the memory or the time, not the host's build
            click.echo(f"The self-test could not load and decode '{path.name}' with extra_buffers = \"{first.mode}\": "
                       f"{first.detail or 'no output'}. This is not a crash of llama.cpp; check the file "
                       f"(`edgemed plan {path}`) and the free memory, then run the check again.", err=True)
    if not first.ok:
        raise SystemExit(1)


def _child_report(verdict) -> dict | None:
    """What a passing child said of its load (``selftest._child``'s JSON line: tokens decoded, placement, adapters
    applied); None otherwise."""
    if not verdict.ok:
        return None
    try:
        said = json.loads(verdict.detail)
    except ValueError:
        return None
    return said if isinstance(said, dict) else None


def _check_target(model: str | None, adapters=()) -> tuple:
    """The model to check (a ``packaging.ref.ModelRef``, verified where it is a bundle; its ``model_path`` is the
    file) and its ``--adapter`` arguments as ``loader.AdapterSpec`` (resolved as `run` does)."""
    from edgemed.packaging.ref import adapter_specs, runnable

    if model is None:
        from edgemed.converters.source import pip_models

        model = str(pip_models.gguf_file())
    ref = runnable(model)
    return ref, adapter_specs(ref, list(adapters))
