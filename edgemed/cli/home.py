"""``edgemed home``: where edgemed keeps its state and caches, and moving the state out of ``~/.cache``."""

from __future__ import annotations

import json
import os

import click

from edgemed.cli import echo_json_result, json_flag


@click.command("home")
@click.option("--move", is_flag=True,
              help="Move the state from ~/.cache/edgemed (where earlier versions kept it, and cache cleaners "
                   "empty it) into the default state folder; its cache goes back to the cache folder.")
@click.option("--path", "path_only", is_flag=True,
              help="Print only the state folder's path (for scripts: home=$(edgemed home --path)).")
@json_flag()
def home(move, path_only, as_json):
    """Show where edgemed keeps its state (the model store, trust.toml, audit logs, keys) and its cache.

    The state folder is $EDGEMED_HOME when set, else the user's data folder (~/.local/share/edgemed on Linux).
    A state folder that earlier versions left in ~/.cache/edgemed is used, with a warning, until --move moves it:
    stop `edgemed serve` and let installs and pulls finish first (the move refuses while they hold its locks)."""
    from edgemed import env
    from edgemed.packaging import home_move

    moved = home_move.move() if move else None
    state = env.home()
    stranded = env.stranded_home()
    if os.environ.get(env.HOME_VAR):
        why = f"${env.HOME_VAR}"
    elif state == env.legacy_home() and state != env.default_home():
        why = "older default, in a cache folder: move it with `edgemed home --move`"
    else:
        why = "default"
    if path_only:
        click.echo(str(state))
        return
    policy = state / "trust.toml"
    said = _policy_state()
    facts = {"state": str(state), "state_from": why, "cache": str(env.cache_root()),
             "trust_policy": str(policy), "trust_policy_present": os.path.lexists(policy), "trust_policy_state": said,
             "older_state_left": str(stranded) if stranded else None}
    if move:
        facts["moved"] = bool(moved and moved.state_moved)
        facts["cache_left_unused"] = str(moved.left) if moved and moved.left else None
    if as_json:
        echo_json_result(json.dumps(facts, indent=2))
        return
    if move:
        if moved is None:
            click.echo("nothing to move: the older folder holds no edgemed state")
        elif moved.state_moved:
            click.echo(f"moved edgemed's state to {moved.state}" + (f", its cache to {moved.cache}" if moved.cache else ""))
        elif moved.cache:
            click.echo(f"put the cache an earlier move left in {moved.state} back at {moved.cache}")
        if moved and moved.left:
            click.echo(f"an old cache stays at {moved.left}, unused ({env.default_cache_root()} was already there): "
                       "delete it to free the space, or leave it")
    click.echo(f"state:        {state} ({why})")
    click.echo(f"trust policy: {policy} ({said})")
    click.echo(f"cache:        {env.cache_root()}")
    if stranded:
        click.echo(f"older state:  {stranded} (not read; move what you need from it into {state})")


def _policy_state() -> str:
    """What the trust policy is, as the commands that read it find it."""
    from edgemed.errors import EdgemedError
    from edgemed.packaging import trust

    try:
        policy = trust.load()
    except EdgemedError as exc:
        return f"refused: installs, pulls and runs stop here until it is fixed: {exc.problem}"
    if not policy.exists:
        return "absent: local bundles install without a signature check unless --key is given"
    return "present"
