"""``edgemed devices``: detect this machine, list the shipped and user profiles, show one."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def devices() -> None:
    """Device profiles: which settings suit this machine."""


@devices.command()
@click.option("--root", type=click.Path(path_type=Path, exists=True, file_okay=False), default="/",
              help="Read the machine's files below this folder (a copy of another device's /proc, /etc).")
@click.option("--json", "as_json", is_flag=True, help="Print facts and the chosen profile as JSON.")
def detect(root: Path, as_json: bool) -> None:
    """Detect this machine and print the profile edgemed would use."""
    from edgemed.devices.detect import choose, detect as detect_facts

    facts = detect_facts(root)
    profile = choose(facts)
    if as_json:
        click.echo(json.dumps({"profile": profile.name, "platform": facts.platform, "model": facts.model,
                               "physical_cores": facts.physical_cores, "logical_cores": facts.logical_cores,
                               "performance_cores": facts.performance_cores, "memory_bytes": facts.memory_bytes,
                               "memory_limit_bytes": facts.memory_limit_bytes,
                               "budget_bytes": profile.budget_bytes(facts), "details": facts.details}, indent=2))
        return
    click.echo(f"{profile.name} ({facts.summary()})")
    click.echo(f"  {facts.model}")
    click.echo(f"  memory budget for a model: {profile.budget_bytes(facts) / 1e9:.1f} GB; "
               f"recommended quant: {profile.recommended_quant}")


@devices.command(name="list")
@click.option("--json", "as_json", is_flag=True)
def list_profiles(as_json: bool) -> None:
    """List every profile (shipped, then $EDGEMED_PROFILES_DIR)."""
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
@click.option("--json", "as_json", is_flag=True)
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
