"""``edgemed pack | verify | inspect | keygen``: make, check and read model bundles.

A bundle's text is refused at read when it holds a character a terminal acts on; every line printed here goes
through ``shown`` all the same (defence in depth: a certificate subject, a file name, a store written by an older
edgemed), and ``--json`` is escaped by ``json.dumps``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgemed.cli import json_flag
from edgemed.formats.terminal_text import shown, shown_prose


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _millions(model: dict, digits: int) -> str | None:
    """The model's parameter count in millions, or None where the manifest does not know it (an ONNX bundle)."""
    params = model.get("params")
    return f"{params / 1e6:.{digits}f}M" if isinstance(params, int) and not isinstance(params, bool) and params > 0 else None


def _adapter_arg(ctx, param, values):
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            from edgemed.errors import InputError

            raise InputError(f"--adapter {v!r} is not NAME=FILE.", "pass e.g. --adapter cardio=cardio.lora.gguf")
        out.append((name, Path(path)))
    return out


@click.command()
@click.argument("model", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--name", help="Model name in the store (default: from the file name; required for an adapter-only bundle).")
@click.option("--license", "license_", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The model's license text (required with MODEL; optional for an adapter-only bundle).")
@click.option("--adapter", "adapters", multiple=True, callback=_adapter_arg, metavar="NAME=FILE",
              help="A GGUF LoRA adapter (`edgemed convert ... --adapter-only`) to ship under NAME (repeatable); "
                   "it must have been made for MODEL's checkpoint. Without MODEL: an adapter-only bundle.")
@click.option("--base-sha256", "base_sha256", metavar="HEX",
              help="Adapter-only bundle: the base checkpoint's sha256 the adapters are for (`edgemed inspect BASE`: 'source').")
@click.option("--for-model", "for_model", metavar="INSTALLED_NAME",
              help="Adapter-only bundle: the base is this installed model (its checkpoint sha256 is recorded, and its name as a hint).")
@click.option("--card", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Model card (card.toml: CHAI / HTI-1 fields; see README).")
@click.option("--template", "templates", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A prompt template file to ship (repeatable).")
@click.option("--report", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Conversion report (default: MODEL.report.json, or MODEL/report.json for an ONNX directory, when present).")
@click.option("--no-report", is_flag=True, help="Do not include the conversion report.")
@click.option("--sign", "key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Sign with this EC private key (PEM, from `edgemed keygen`): writes model.sig, the OpenSSF model signature.")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Certificate mode: the signing certificate (PEM) of the --sign key; model.sig then carries it.")
@click.option("--cert-chain", "cert_chain", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --cert: the intermediate/root certificates to ship with it (repeatable).")
@click.option("-o", "--output", type=click.Path(), help="Output (default: NAME.edgemed).")
@click.option("--dir", "as_dir", is_flag=True, help="Write the directory form (runnable in place) instead of one tar file.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@json_flag("Print the manifest as JSON.")
def pack(model, name, license_, adapters, base_sha256, for_model, card, templates, report, no_report, key, cert, cert_chain,
         output, as_dir, force, as_json):
    """Pack MODEL (a .gguf, or an ONNX directory) into a verifiable bundle.

    The bundle holds the model, LICENSE, the model card, the conversion report, any
    --adapter NAME=FILE LoRA adapters, and a manifest with every file's sha256; --sign adds
    model.sig, an OpenSSF model signature over every file that `model_signing verify key`
    checks too. Without MODEL, --adapter with --base-sha256 or --for-model makes an
    adapter-only bundle (a fleet update that ships the adapters alone).
    """
    from edgemed.packaging import signing
    from edgemed.packaging.bundle import PackInputs, pack as do_pack

    from edgemed.errors import InputError

    if (cert or cert_chain) and not key:
        raise InputError("--cert and --cert-chain sign in certificate mode, which needs the certificate's key.",
                         "pass --sign KEY.pem with --cert CERT.pem")
    if output is not None:  # as typed: a file output's trailing '/' named a folder, and made a file of that name
        from edgemed.files.atomic import file_destination

        output = Path(output) if as_dir else file_destination(output, "-o", "NAME.edgemed")
    if report is not None and no_report:  # one of the two was dropped without a word
        raise InputError(f"--report {report} and --no-report contradict each other.",
                         "pass --report FILE to ship that report, or --no-report to pack without one")
    if model is not None and license_ is None:
        raise InputError("Missing option '--license': a model bundle ships the model's license.", "pass --license LICENSE")
    if base_sha256 and for_model:
        raise InputError("--base-sha256 and --for-model both name the base.", "pass one of them")
    base_name = None
    if for_model:
        base_sha256, base_name = _installed_base(for_model)
    private_key = signing.load_private_key(key, cert, cert_chain) if key else None
    inp = PackInputs(model=model, license=license_, name=name, card=card, templates=list(templates), report=report, use_report=not no_report,
                     adapters=list(adapters), base_sha256=base_sha256, base_name=base_name)
    if output is None:
        from edgemed.packaging.manifest import check_name

        if model is None and not name:
            raise InputError("An adapter-only bundle needs a name.", "pass --name (e.g. --name mymodel-cardio)")
        output = Path(check_name(name or model.name.split(".")[0].lower()) + ".edgemed")
    from edgemed.files.atomic import refuse_input_as_output

    refuse_input_as_output(output, [("the --sign key", key), ("the --cert certificate", cert)]
                           + [("a --cert-chain certificate", c) for c in cert_chain], "bundle" if as_dir else None)
    man = do_pack(inp, output, as_dir=as_dir, private_key=private_key, force=force)
    if as_json:
        click.echo(man.to_bytes().decode())
        return
    m = man.model
    what = (f"adapters for the base {m['base_source_sha256'][:12]}..." if man.adapters_only
            else f"{m.get('arch') or 'unknown architecture'} {_millions(m, 0) or 'unknown size'} "
                 f"{m.get('quant') or 'unknown weight type'}")
    ads = f" + adapters {', '.join(a['name'] for a in man.adapters)}" if man.adapters and not man.adapters_only else \
        f" {', '.join(a['name'] for a in man.adapters)}" if man.adapters else ""
    click.echo(shown(f"wrote {output} ({'directory' if as_dir else 'tar'}, {len(man.files)} files, {_mb(man.total_bytes)}): "
                     f"{man.name} = {what}{ads}"
                     + (f", signed by key {private_key.key_id} (model.sig)" if private_key else ", unsigned")))


def _installed_base(name: str) -> tuple[str, str]:
    """(base checkpoint sha256, name) of an installed model, for ``pack --for-model``."""
    from edgemed.errors import InputError
    from edgemed.packaging.bundle import read_manifest, refuse_merged_base
    from edgemed.packaging.store import Store

    man, _, _ = read_manifest(Store().model_dir(name))
    if man.adapters_only:
        raise InputError(f"'{name}' is an adapter-only bundle, not a model.",
                         f"pass the model it is for: --for-model {man.model.get('base_name') or 'NAME'}")
    if man.merged_lora_sha256:
        refuse_merged_base(f"The installed model '{name}'", "install a GGUF converted without --lora and pack for it")
    source = man.provenance.get("source_sha256")
    if not source:
        raise InputError(f"The installed model '{name}' does not record the checkpoint it was converted from, so no adapter "
                         "can be checked against it.", "install a base GGUF made by `edgemed convert`, then pack for it")
    return source, name


@click.command()
@click.argument("bundle")
@click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Require a valid signature by this public key.")
@click.option("--cert-chain", "cert_chain", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Require a valid certificate signature chaining to this root certificate (PEM; repeatable).")
@click.option("--full", is_flag=True, help="Re-hash every byte (skip the verified cache).")
@json_flag()
def verify(bundle, key, cert_chain, full, as_json):
    """Check BUNDLE (a .edgemed file, a bundle directory or an installed name) against its manifest.

    Every file's size and sha256 must match; with --key the signature must be valid.
    A tar is always hashed in full; directories and installed models use the verified
    cache for files unchanged since their last full hash, unless --full. The cache
    sees every write made through the file system (size, inode, mtime, ctime); it
    cannot see raw writes to the disk device: use --full when that is a concern.
    """
    import hashlib

    from edgemed.packaging import signing
    from edgemed.packaging.archive import hash_sink, read_tar
    from edgemed.packaging.ref import bundle_ref, verified
    from edgemed.packaging.store import Store

    public_key = signing.load_public_key(key) if key else signing.cert_roots(cert_chain) if cert_chain else None
    ref = bundle_ref(bundle)
    kind, where = ref.kind, ref.target
    signer = {}
    if kind == "tar":
        def on_manifest(man, data, sig):
            if public_key is not None:
                signer["key_id"] = signing.verify(sig, man, data, public_key)
        man, data, sig = read_tar(where, hash_sink, on_manifest=on_manifest)
        result = dict(manifest_sha256=hashlib.sha256(data).hexdigest(), has_signature=sig is not None,
                      signed_by=signer.get("key_id"), rehashed=[f.path for f in man.files])
    else:
        v = verified(ref, full=full, public_key=public_key)
        man = v.manifest
        at_install = Store().index().get(where, {}).get("signed_by") if kind == "store" and public_key is None else None
        result = dict(manifest_sha256=v.manifest_sha256, has_signature=v.has_signature, signed_by=v.signed_by or at_install,
                      rehashed=v.hashed)
    installed_as = where if kind == "store" else None  # `install --name` may differ from the manifest's name
    if as_json:
        click.echo(json.dumps({"ok": True, "name": man.name, "installed_as": installed_as, "form": kind,
                               "files": len(man.files), "total_bytes": man.total_bytes,
                               "adapters": [a["name"] for a in man.adapters], **result}, indent=2))
        return
    n_cached = len(man.files) - len(result["rehashed"])
    how = f"{len(result['rehashed'])} re-hashed" + (f", {n_cached} unchanged since their last full hash" if n_cached else "")
    sig = (f"signature checked at install (key {result['signed_by']})" if kind == "store" and public_key is None and result["signed_by"]
           else f"signature valid (key {result['signed_by']})" if result["signed_by"]
           else "signed, signature NOT checked (pass --key)" if result["has_signature"] else "unsigned")
    ads = f", adapters {', '.join(a['name'] for a in man.adapters)}" if man.adapters else ""
    named = man.name if installed_as in (None, man.name) else f"{installed_as} (bundle {man.name})"
    click.echo(shown(f"OK {named}: {len(man.files)} files{ads}, {_mb(man.total_bytes)}, every sha256 matches ({how}); {sig}"))


def _inspect_data(bundle: str) -> dict:
    import hashlib

    from edgemed.packaging import card as card_mod
    from edgemed.packaging import signing
    from edgemed.packaging.archive import peek_tar
    from edgemed.packaging.bundle import read_manifest
    from edgemed.packaging.ref import bundle_ref
    from edgemed.packaging.store import Store

    ref = bundle_ref(bundle)
    kind, where = ref.kind, ref.target
    if kind == "tar":
        man, data, sig = peek_tar(where)
    else:
        man, data, sig = read_manifest(where if kind == "directory" else Store().model_dir(where))
    return {
        "bundle": {"source": str(where), "form": kind, "manifest_sha256": hashlib.sha256(data).hexdigest(),
                   "signature": {"present": sig is not None, "key_id": signing.signer_id(sig) if sig else None,
                                 "file": sig.file if sig else None},
                   "files": len(man.files), "total_bytes": man.total_bytes, "verified": False},
        "manifest": man.to_dict(),
        "card_missing": card_mod.missing_fields(man.card),
    }


@click.command()
@click.argument("bundle")
@json_flag("Print everything as JSON (documented in README, section Packaging).")
def inspect(bundle, as_json):
    """Show what BUNDLE holds: model facts, provenance, files, model card, memory needed.

    Reads the manifest only; `edgemed verify` checks the files.
    """
    from edgemed.packaging import card as card_mod

    info = _inspect_data(bundle)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return

    def say(line: str) -> None:  # every line is one line: what came from the bundle is escaped in it
        click.echo(shown(line))

    b, man = info["bundle"], info["manifest"]
    m, p = man["model"], man["provenance"]
    sig = ("unsigned" if not b["signature"]["present"] else f"signed by key {b['signature']['key_id']}"
           if b["signature"]["key_id"] else "signed (model.sig names no key; verify with --key or a trust policy)")
    say(f"{man['name']}  ({b['form']}: {b['source']}; {sig}; not verified here, run `edgemed verify`)")
    if m.get("format") == "adapters":
        hint = f" (installed as '{m['base_name']}' where it was packed)" if m.get("base_name") else ""
        say(f"  model      none: LoRA adapters only, for the base checkpoint {m.get('base_source_sha256')}{hint}")
    else:
        params = _millions(m, 1)
        say(f"  model      {m.get('path')}: {m.get('arch') or 'architecture unknown'}, "
            f"{params + ' params' if params else 'parameter count unknown'}, {m.get('quant') or 'weight type unknown'}, "
            f"context {m.get('context_length') or 'unknown'}")
    for a in man.get("adapters") or []:
        say(f"  adapter    {a['name']:<16} {a['path']}: {a.get('architecture')}, rank {a.get('rank') or 'mixed'}, "
            f"alpha {a.get('alpha')}, {_mb(a['size'])}, for base {str(a.get('base_source_sha256'))[:16]}")
    only = m.get("format") == "adapters"
    if not only:
        say(f"  hashes     chat template {str(m.get('chat_template_sha256') or 'none')[:16]}, "
            f"tokenizer {str(m.get('tokenizer_sha256') or 'none')[:16]}")
        say(f"  provenance source {str(p.get('source_sha256', 'unknown'))[:16]}, LoRA {str(p.get('lora_sha256', 'none'))[:16]}, "
            f"converter {p.get('converter_version', 'unknown')}, parity {'recorded' if p.get('parity') else 'not recorded'}")
    say(f"  built with {', '.join(f'{k} {v}' for k, v in p.get('built_with', {}).items())}; "
        f"needs at least {', '.join(f'{k} {v}' for k, v in p.get('min_runtime', {}).items())}")
    say(f"  files      {b['files']} files, {_mb(b['total_bytes'])}")
    for f in man["files"]:
        say(f"             {f['path']:<40} {_mb(f['size']):>12}  {f['sha256'][:16]}  {f['role']}")
    mem = man["memory"]
    if mem:
        say(f"  memory     ({mem.get('method')}) " + ", ".join(f"ctx {c}: {_mb(n)}" for c, n in mem.get("by_context", {}).items()))
    for prof, need in mem.get("profiles", {}).items():
        verdict = {True: "fits", False: "does NOT fit", None: "budget set by the machine"}[need.get("fits")]
        say(f"             {prof:<22} ctx {need['n_ctx']}: {_mb(need['bytes'])} ({verdict})")
    if not man["card"]:
        say("  card       none (pack with --card card.toml; a clinic's AI governance will ask for one)")
    for section, fields in card_mod.by_section(man["card"]).items():
        say(f"  card/{section}")
        for k, v in fields.items():  # prose keeps its lines, each indented under its field
            click.echo(f"             {shown(k)}: {shown_prose(v, ' ' * 15)}")
    if man["card"] and info["card_missing"]:
        say(f"  card gaps  {len(info['card_missing'])} CHAI/HTI-1 fields not provided: {', '.join(info['card_missing'])}")


@click.command()
@click.argument("private_key", type=click.Path())
@click.option("--force", is_flag=True)
@click.option("--public-only", is_flag=True,
              help="Write only the public half of the existing PRIVATE_KEY (again), e.g. after an interrupted --force.")
def keygen(private_key, force, public_only):
    """Make an EC P-256 key pair for signing bundles: PRIVATE_KEY and its public half beside it
    (key.pem -> key.pub.pem; any other name gains .pub.pem).

    Keep the private key on the build machine; give the .pub.pem to clinics. The pair also works
    with the OpenSSF tool: model_signing sign key --private_key key.pem, verify key --public_key key.pub.pem.
    """
    from edgemed.files.atomic import file_destination
    from edgemed.packaging import signing

    private_key = Path(private_key) if public_only else file_destination(private_key, "PRIVATE_KEY", "key.pem")
    if public_only:
        public, kid = signing.derive_public(private_key, force=force)
        click.echo(shown(f"wrote {public} (the public half of {private_key}); key id {kid}"))
        return
    public, kid = signing.keygen(private_key, force=force)
    click.echo(shown(f"wrote {private_key} (private, mode 600) and {public} (public); key id {kid}"))
