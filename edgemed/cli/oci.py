"""``edgemed push | pull | login``: bundles through an OCI registry, as CNCF ModelPack artifacts.

What a registry answers is printed through ``shown``: a character a terminal acts on is written escaped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgemed.cli import echo_json_result, json_flag, reporting
from edgemed.formats.terminal_text import shown


def _size(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 100_000 else f"{n / 1e3:,.1f} KB"


_INSECURE = ("Allow plain HTTP to this registry (only on a network you trust). "
             "Loopback addresses (127.0.0.1, localhost) use plain HTTP without it.")


@click.command()
@click.argument("bundle")
@click.argument("target", metavar="oci://HOST[:PORT]/REPO:TAG")
@click.option("--insecure", is_flag=True, help=_INSECURE)
@json_flag("Print the result (digest, pinned reference, bytes uploaded) as JSON.")
def push(bundle, target, insecure, as_json):
    """Push BUNDLE (a .edgemed file, a bundle directory, or an installed model's name) to a registry.

    One layer per bundle file (the GGUF uncompressed, the signature too), so bundles that
    share a GGUF share its blob; blobs the registry has are not uploaded again. Credentials
    come from ~/.docker/config.json, or $DOCKER_CONFIG/config.json where that is set (edgemed
    login, docker login and oras login write it).
    Then, on every device: edgemed pull oci://HOST/REPO:TAG
    """
    from edgemed.packaging.oci_push import push as do_push

    r = do_push(bundle, target, insecure=insecure)
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
        return
    click.echo(shown(f"pushed {r.ref}: {r.layers} files, {_size(r.bytes_uploaded)} uploaded "
                     f"({r.blobs_present} already in the registry)"))
    click.echo(shown(f"digest {r.digest}"))
    click.echo(shown(f"pull it pinned: edgemed pull {r.pinned}"))


@click.command()
@click.argument("source", metavar="oci://HOST[:PORT]/REPO:TAG|@sha256:DIGEST")
@click.option("--name", help="Install under this name (default: the bundle's name).")
@click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Require a valid signature by this public key.")
@click.option("--force", is_flag=True, help="Replace an installed model of the same name (kept for `edgemed rollback`); "
              "a model that is this very bundle already is left as it is (installed again if its copy fails verify).")
@click.option("--allow-signer-change", is_flag=True,
              help="With --force: replace a signed model with one another signer (or nobody) signed; without it, an "
                   "update must come from the installed model's signer or a key trust.toml trusts for its origin.")
@click.option("--allow-downgrade", is_flag=True,
              help="With --force: install the bundle even though it is an older release than the installed model (its "
                   "card version, else its creation time); without it that is refused. edgemed rollback NAME returns "
                   "to the copy kept before the last update.")
@click.option("--insecure", is_flag=True, help=_INSECURE)
@json_flag("Print the result (name, origin, bytes downloaded and resumed) as JSON.")
def pull(source, name, key, force, allow_signer_change, allow_downgrade, insecure, as_json):
    """Pull a model from a registry into the local store.

    The trust policy ($EDGEMED_HOME/trust.toml) must accept the bundle's signature, which is
    checked before any weight is downloaded. Every file is hashed as it arrives and checked
    against its digest; nothing is installed until all of them match. Files the store already
    holds are not downloaded; an interrupted pull resumes where it stopped when run again.
    An older release than the installed one (card version, else creation time) is refused
    without --allow-downgrade, so a tag moved back does not roll devices back.
    Then: edgemed run NAME
    """
    from edgemed.packaging import signing
    from edgemed.packaging.oci_pull import done
    from edgemed.packaging.oci_pull import pull as do_pull
    from edgemed.packaging.store import Store

    public_key = signing.load_public_key(key) if key else None
    store, pulled = Store(), []  # pulled: the pull's result, once it is in hand
    left = "printing its report (`edgemed list` shows the model)"
    # opened before the pull: a stop just after it returned, before its result is in hand, is told by the store
    with reporting(lambda: done(pulled[0], left) if pulled else store.change_made(left)):
        pulled.append(do_pull(source, name=name, insecure=insecure, public_key=public_key, force=force, store=store,
                              allow_signer_change=allow_signer_change, allow_downgrade=allow_downgrade))
        _said(pulled[0], as_json)


def _said(r, as_json: bool) -> None:
    """What a pull that finished prints (``r``: its result)."""
    if as_json:
        echo_json_result(json.dumps(r.to_dict(), indent=2))  # a stop after it adds no failure document
        return
    if r.already_installed:
        click.echo(shown(f"{r.name} is already installed from this bundle ({r.origin}); nothing was changed "
                         f"(edgemed verify {r.name} --full checks its files)"))
        return
    note = r.release.note(r.name) if r.release is not None else None
    if note:
        click.echo(shown(note))
    if r.repaired:
        click.echo(shown(f"{r.name} held this bundle, but its installed copy did not verify ({r.repaired}); "
                         "installed it again from the registry"))
    resumed = f", {_size(r.bytes_resumed)} resumed" if r.bytes_resumed else ""
    sig = f"; signature valid (key {r.signed_by})" if r.signed_by else ""
    click.echo(shown(f"installed {r.name} from {r.origin}: {r.files} files, {_size(r.bytes_downloaded)} downloaded{resumed}, "
                     f"{r.blobs_in_store} already in the store; every sha256 matches{sig}. Run it: edgemed run {r.name} --prompt '...'"))


@click.command()
@click.argument("registry", metavar="HOST[:PORT]")
@click.option("-u", "--username", required=True, help="The registry account.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input (else it is asked for).")
@click.option("--insecure", is_flag=True, help=_INSECURE)
def login(registry, username, password_stdin, insecure):
    """Log in to a registry: check the credentials there, then keep them in ~/.docker/config.json
    ($DOCKER_CONFIG/config.json where that is set).

    The file is the one docker and oras use (readable by its owner only); push and pull read it.
    """
    from edgemed.errors import InputError
    from edgemed.packaging.oci import login as do_login

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True)
    if not password:
        raise InputError("No password was given.", "pipe it in with --password-stdin, or type it when asked")
    path = do_login(registry, username, password, insecure=insecure)
    click.echo(shown(f"logged in to {registry} as {username}; credentials stored in {path}"))
