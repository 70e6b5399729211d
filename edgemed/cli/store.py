"""``edgemed install | list | remove | export``: the local model store and exports from it.

Every line printed here goes through ``shown``: a character a terminal acts on (from a bundle an older edgemed
installed, a certificate subject, a file name) is written escaped; ``--json`` is escaped by ``json.dumps``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgemed.cli import json_flag, reporting
from edgemed.formats.terminal_text import shown


@click.command()
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@click.option("--name", help="Install under this name (default: the bundle's name).")
@click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Require a valid signature by this public key (where there is a trust.toml, it must also trust the key).")
@click.option("--cert-chain", "cert_chain", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Require a valid certificate signature chaining to this root certificate (PEM; repeatable).")
@click.option("--force", is_flag=True, help="Replace an installed model of the same name (the replaced version is kept: edgemed rollback NAME).")
@click.option("--allow-signer-change", is_flag=True,
              help="With --force: replace a signed model with one another signer (or nobody) signed; without it, an "
                   "update must come from the installed model's signer or a key trust.toml trusts for its origin.")
@click.option("--allow-downgrade", is_flag=True,
              help="With --force: install the bundle even though it is an older release than the installed model (its "
                   "card version, else its creation time); without it that is refused. edgemed rollback NAME returns "
                   "to the copy kept before the last update.")
def install(bundle, name, key, cert_chain, force, allow_signer_change, allow_downgrade):
    """Install BUNDLE (a .edgemed file or bundle directory) into the local model store.

    Every file is checked against the manifest as it is copied; nothing is installed
    unless all of it matches and the trust policy ($EDGEMED_HOME/trust.toml) accepts
    its signer. Then: edgemed run NAME.
    """
    from edgemed.packaging import signing
    from edgemed.packaging.store import Store

    public_key = signing.load_public_key(key) if key else signing.cert_roots(cert_chain) if cert_chain else None
    store = Store()
    orders = []
    # opened before the install: a stop just after it returned, before its result is in hand, reports the install too
    with reporting(lambda: store.change_made("printing its report (`edgemed list` shows it)")):
        target, man, signer = store.install(bundle, name=name, public_key=public_key, force=force,
                                            allow_signer_change=allow_signer_change, allow_downgrade=allow_downgrade,
                                            on_order=orders.append)
        _installed(store, target, man, signer, orders)


def _installed(store, target: str, man, signer: str | None, orders: list) -> None:
    """What an install that finished prints."""
    note = orders[-1].note(target) if orders else None
    if note:
        click.echo(shown(note))
    sig = f"signature valid (key {signer})" if signer else "signature not checked (pass --key, or list the maker's key in trust.toml)"
    if man.adapters_only:
        bases = store.models_for_base(man.base_source_sha256)
        click.echo(shown(f"installed {target}: adapters {', '.join(a['name'] for a in man.adapters)} for {', '.join(bases)}, "
                         f"{man.total_bytes / 1e6:,.1f} MB, every sha256 matches; {sig}. "
                         f"Use one: edgemed run {bases[0] if bases else 'BASE'} --adapter {man.adapters[0]['name']} --prompt '...'"))
        return
    click.echo(shown(f"installed {target}: {len(man.files)} files, {man.total_bytes / 1e6:,.1f} MB, every sha256 matches; {sig}. "
                     f"Run it: edgemed run {target} --prompt '...'"))


@click.command("list")
@json_flag()
def list_(as_json):
    """List the models installed in the local store."""
    from edgemed.packaging.store import Store

    store = Store()
    rows = store.list()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no models installed (edgemed install BUNDLE)")
        return
    for r in rows:
        if "error" in r:
            click.echo(shown(f"{r['name']:<24} DAMAGED: {r['error']}"))
            continue
        sig = f"key {r['signed_by']}" if r["signed_by"] else ("signed" if r["has_signature"] else "unsigned")
        if r.get("kind") == "adapters":
            names = ", ".join(a["name"] for a in r["adapters"])
            base = (f"for {', '.join(r['for_models'])}" if r["for_models"]
                    else f"base {r['base_source_sha256'][:12]}... NOT installed (install it to use these)")
            click.echo(shown(f"{r['name']:<24} {r['version'] or '-':<10} adapters {names} ({base}) {r['size_bytes'] / 1e6:>9,.1f} MB  "
                             f"{r['digest'][:19]}  {sig}  from {r['origin']}"))
            continue
        params = f"{r['params'] / 1e6:.0f}M" if r["params"] else "?"  # an ONNX bundle's count is not recorded
        click.echo(shown(f"{r['name']:<24} {r['version'] or '-':<10} {r['arch'] or '?':<8} {params:>8} "
                         f"{r['quant'] or '?':<8} {r['size_bytes'] / 1e6:>9,.1f} MB  {r['digest'][:19]}  {sig}  from {r['origin']}"))
        if r.get("previous"):
            p = r["previous"]
            click.echo(shown(f"{'':<24} previous: {p['version'] or '-'} {p['digest'][:19]} from {p['origin']} (edgemed rollback {r['name']})"))
        for a in r.get("adapters") or []:
            where = ("" if a["bundle"] == r["name"] else f" (from {a['bundle']})") + ("" if a.get("picked", True) else " (shadowed)")
            click.echo(shown(f"{'':<24} adapter {a['name']:<16} {a['size_bytes'] / 1e6:>9,.1f} MB{where}  "
                             f"(edgemed run {r['name']} --adapter {a['name']})"))
    click.echo(shown(f"store: {store.root} ({store.disk_usage() / 1e6:,.1f} MB on disk, shared files counted once)"))


@click.command()
@click.argument("name")
def remove(name):
    """Remove NAME from the local store (files another model shares stay)."""
    from edgemed.packaging.store import Store

    store = Store()
    with reporting(lambda: store.change_made("printing the space it freed (nothing the store needs)")):
        freed = store.remove(name)
        click.echo(shown(f"removed {name}; freed {freed / 1e6:,.1f} MB"))


@click.command()
@click.argument("model")
@click.option("--ollama", "ollama_dir", type=click.Path(file_okay=False, path_type=Path), help="Write Modelfile + GGUF into this directory.")
@click.option("--llama-server", "llama_server", is_flag=True, help="Print a llama-server command line for the verified GGUF.")
@click.option("--gguf", "gguf_out", type=click.Path(dir_okay=False), help="Copy the plain GGUF here.")
@click.option("--system", help="System prompt for the Modelfile (default: the card's system_prompt).")
@click.option("--force", is_flag=True, help="Replace existing output files.")
def export(model, ollama_dir, llama_server, gguf_out, system, force):
    """Export MODEL (an installed name or a bundle directory) for other runtimes.

    MODEL is verified and must pass the trust policy ($EDGEMED_HOME/trust.toml) as for `edgemed run`.

    --ollama DIR writes DIR/Modelfile and DIR/NAME.gguf (then: ollama create NAME -f DIR/Modelfile);
    --llama-server prints a command that serves the verified GGUF; --gguf FILE copies it out.
    """
    from edgemed.errors import InputError
    from edgemed.packaging import export as ex
    from edgemed.packaging.ref import TAR, bundle_ref, trusted

    if not (ollama_dir or llama_server or gguf_out):
        raise InputError("Nothing to export.", "pass --ollama DIR, --llama-server, or --gguf FILE")
    if gguf_out is not None:  # as typed: 'gdir/' named a folder, and made a file 'gdir'
        from edgemed.files.atomic import file_destination

        gguf_out = file_destination(gguf_out, "--gguf", "NAME.gguf")
    if system is not None and not ollama_dir:  # it went nowhere, with exit 0
        other = "--gguf" if gguf_out else "--llama-server"
        raise InputError(f"--system sets the system prompt of the Modelfile that --ollama writes; {other} writes no "
                         "Modelfile, so --system would have no effect.",
                         f"pass --ollama DIR with --system, or leave --system out of {other}")
    if system is not None:
        try:
            system.encode("utf-8")
        except UnicodeEncodeError:  # bytes the terminal's encoding could not decode, kept as surrogates by click
            raise InputError("--system is not valid UTF-8 text.", "pass the system prompt as UTF-8 text") from None
    ref = bundle_ref(model)
    if ref.kind == TAR:
        raise InputError(f"'{model}' is a bundle archive.", f"install it first (edgemed install {model}), then export by name")
    v = trusted(ref)  # every file, and the trust policy as run applies it (an installed name: at Store.verify)
    # an ONNX or adapter-only bundle has no GGUF to hand on: refused before any destination is looked at
    ex.require_gguf(v, "--ollama" if ollama_dir else "--gguf" if gguf_out else "--llama-server")
    from edgemed.files.atomic import check_destination, refuse_input_as_output

    read = [("the bundle", v.root)]  # and the store, which refuse_input_as_output refuses for every output
    files = ([(gguf_out, "--gguf")] if gguf_out else []) + \
        ([(ollama_dir / f"{v.manifest.name}.gguf", "--ollama"), (ollama_dir / "Modelfile", "--ollama")] if ollama_dir else [])
    if gguf_out and ollama_dir:  # --ollama writes it first, then --gguf found it there: 'already exists', or a 2nd copy
        import os

        for out, _ in files[1:]:
            if os.path.realpath(gguf_out) == os.path.realpath(out):
                raise InputError(f"--gguf {gguf_out} is {out}, a file --ollama {ollama_dir} writes itself.",
                                 f"leave --gguf out (--ollama writes the verified GGUF to {files[1][0]}), or pass "
                                 "--gguf a path outside the Ollama folder")
    for out, option in files:  # every file written: never into the bundle read, nor into the store
        refuse_input_as_output(out, read, option=option)
    if gguf_out:  # every destination is checked before anything is written: one refused leaves none written
        check_destination(gguf_out, force, option="--gguf")
    if ollama_dir and ollama_dir.is_dir():
        for name in (f"{v.manifest.name}.gguf", "Modelfile"):
            check_destination(ollama_dir / name, force, option="--ollama")
    if ollama_dir:
        path = ex.export_ollama(v, ollama_dir, system=system, force=force)
        click.echo(shown(f"wrote {path} and {ollama_dir / (v.manifest.name + '.gguf')}; then: ollama create {v.manifest.name} -f {path}"))
    if gguf_out:
        ex.copy_verified(v, gguf_out, force=force)
        click.echo(shown(f"wrote {gguf_out} (sha256 checked)"))
    if llama_server:
        click.echo(shown(ex.llama_server_command(v)))


@click.command()
@click.argument("name")
def rollback(name):
    """Return NAME to the version it had before its last update (install --force or pull).

    The switch is atomic (a kill at any point leaves one of the two installed), and the
    version rolled back from is kept: a second rollback returns to it.
    """
    from edgemed.packaging.store import Store

    store = Store()
    with reporting(lambda: store.change_made("printing its report (`edgemed list` shows it)")):
        now, kept = store.rollback(name)
        click.echo(shown(f"{name} is back to {now.get('version') or 'the earlier version'} (sha256:{now['manifest_sha256'][:12]}, "
                         f"from {now.get('origin') or now['source']}); kept sha256:{kept['manifest_sha256'][:12]} for "
                         f"`edgemed rollback {name}`"))
