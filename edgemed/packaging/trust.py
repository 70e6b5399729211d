"""The device's trust policy: which signers it accepts, for bundles from where (``$EDGEMED_HOME/trust.toml``).

::

    [local]                                   # bundles from a file or folder (edgemed install PATH, run DIR)
    require_signature = false                 # the default here
    keys = ["keys/vendor.pub.pem"]            # PEM public keys; a relative path is under $EDGEMED_HOME
    roots = ["keys/clinic-ca.pem"]            # certificate mode: root certificates a signing certificate chains to

    [registries."registry.clinic.example"]    # every repository of a registry ...
    keys = ["keys/vendor.pub.pem"]
    [registries."registry.clinic.example/radiology"]   # ... or one repository (or a folder of them)
    keys = ["keys/radiology.pub.pem"]
    require_signature = true                  # the default for every oci:// origin

A bundle pulled from ``oci://HOST[:PORT]/REPO[:TAG|@DIGEST]`` is judged by the most specific
``registries`` entry whose name is ``HOST[:PORT]`` or a ``/``-bounded prefix of ``HOST[:PORT]/REPO``;
with no entry, a signature is required and no key is trusted, so a pull is refused until the clinic
names its signers. Everything else is judged by ``[local]``; with no trust.toml at all (nothing at that name:
a dangling link, a folder or a file that cannot be read there is refused, never taken for none), local bundles
behave as before (a signature is checked when ``--key`` is given).

The rule, for the entry that applies: a key given on the command line (``--key``) must verify the
signature, and where a trust.toml exists the entry must trust it too; otherwise an unsigned bundle passes only when ``require_signature`` is false; a signed one
must verify with one of the entry's keys (a signature by any other key is refused, whatever
``require_signature`` says), unless the entry lists no key and does not require a signature.
``install`` and ``pull`` apply it before any file is stored; ``run`` (and serve, chat, bench) apply it
again to the installed copy, with the signer's key recorded at install, so a key removed from
trust.toml stops its models from loading.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from edgemed import env
from edgemed.errors import InputError, SignatureError
from edgemed.packaging import signing
from edgemed.formats.input_file import read_at_most
from edgemed.formats.nesting import loads_toml

POLICY = "trust.toml"
#: Largest trust.toml read (bytes): a policy names a few keys per registry.
MAX_POLICY_BYTES = 1 << 20
_ENTRY_KEYS = {"keys", "roots", "require_signature"}


@dataclass(frozen=True)
class Entry:
    where: str                         # how messages name it: "[local]" or [registries."HOST/REPO"]
    keys: tuple = ()                   # signing.PublicKey
    require_signature: bool = False
    roots: signing.CertRoots | None = None  # certificate mode: the roots a signing certificate must chain to


@dataclass
class Policy:
    path: Path
    exists: bool = False
    local: Entry = field(default_factory=lambda: Entry("[local]"))
    registries: dict[str, Entry] = field(default_factory=dict)

    def entry_for(self, origin: str | None) -> tuple[Entry, str | None]:
        """(the entry that judges ``origin``, the registry/repository it names or None for a local bundle)."""
        repo = oci_repository(origin)
        if repo is None:
            return self.local, None
        best = max((n for n in self.registries if repo == n or repo.startswith(n + "/")), key=len, default=None)
        if best is None:
            return Entry(f'[registries."{repo}"] (absent)', (), True), repo
        return self.registries[best], repo


def oci_repository(origin: str | None) -> str | None:
    """``HOST[:PORT]/REPO`` of an ``oci://`` origin (tag and digest dropped); None for any other origin."""
    if not origin or not origin.startswith("oci://"):
        return None
    ref = origin[len("oci://"):].split("@", 1)[0]
    head, _, last = ref.rpartition("/")
    if head and ":" in last:  # a tag on the last component (a port sits only on the host)
        last = last.split(":", 1)[0]
    return f"{head}/{last}" if head else last


def load(home: Path | None = None) -> Policy:
    """The policy in ``$EDGEMED_HOME/trust.toml`` (an empty one where there is no file)."""
    stranded = env.stranded_home() if home is None else None
    home = Path(home) if home is not None else env.home()
    path = home / POLICY
    if not os.path.lexists(path):
        if stranded is not None and os.path.lexists(stranded / POLICY):
            raise InputError(f"A trust policy is at {stranded / POLICY}, in an older edgemed state folder that is no "
                             f"longer read, and there is none at {path}: without it, signatures would go unchecked.",
                             f"move that folder's trust.toml and keys/ into {home} (or set {env.HOME_VAR}={stranded} "
                             f"to go on using that folder)")
        return Policy(path)
    fix = f"correct {path} (see `edgemed install --help` and docs/packaging.md, section Trust policy)"
    try:  # something there that cannot be read (a dangling link, a folder, a FIFO) is refused, never taken as no policy
        raw = loads_toml(read_at_most(path, MAX_POLICY_BYTES).decode("utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError, TOMLDecodeError and TooDeep are ValueErrors
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise InputError(f"Cannot read the trust policy {path}: {why}. Without it, signatures would go unchecked, so "
                         "nothing that reads it goes on.",
                         f"{fix}; where it is a link, restore what it points to") from None
    unknown = sorted(set(raw) - {"local", "registries"})
    if unknown:
        raise InputError(f"The trust policy {path} has sections edgemed does not know: {', '.join(unknown)}.",
                         f"{fix}: its sections are [local] and [registries.\"HOST/REPO\"]")
    policy = Policy(path, exists=True, local=_entry(raw.get("local", {}), "[local]", False, home, path, fix))
    regs = raw.get("registries", {})
    if not isinstance(regs, dict):
        raise InputError(f"In {path}, 'registries' is not a table.", fix)
    for name, table in regs.items():
        if not name or name.startswith(("oci://", "/")) or name.endswith("/") or any(c in name for c in "@ \t"):
            raise InputError(f"In {path}, the registry entry {name!r} is not HOST[:PORT] or HOST[:PORT]/REPOSITORY.",
                             f'{fix}: e.g. [registries."registry.clinic.example/models"]')
        policy.registries[name] = _entry(table, f'[registries."{name}"]', True, home, path, fix)
    return policy


def paths_as_written(home: Path) -> list[str]:
    """Every key and root path ``home/trust.toml`` names, as written there (nothing loaded, nothing checked); [] where
    the file is not there or cannot be read (the commands that read it refuse it anyway)."""
    try:
        raw = loads_toml(read_at_most(Path(home) / POLICY, MAX_POLICY_BYTES).decode("utf-8"))
    except (OSError, ValueError):
        return []
    regs = raw.get("registries")
    tables = [raw.get("local"), *(regs.values() if isinstance(regs, dict) else ())]
    return [v for t in tables if isinstance(t, dict) for k in ("keys", "roots")
            for v in (t.get(k) if isinstance(t.get(k), list) else ()) if isinstance(v, str)]


def _entry(table, where: str, require_default: bool, home: Path, path: Path, fix: str) -> Entry:
    if not isinstance(table, dict):
        raise InputError(f"In {path}, {where} is not a table.", fix)
    unknown = sorted(set(table) - _ENTRY_KEYS)
    if unknown:
        raise InputError(f"In {path}, {where} has keys edgemed does not know: {', '.join(unknown)}.",
                         f"{fix}: an entry has keys = [...] and require_signature = true|false")
    req = table.get("require_signature", require_default)
    lists = {k: table.get(k, []) for k in ("keys", "roots")}
    if not isinstance(req, bool) or not all(isinstance(v, list) and all(isinstance(f, str) for f in v) for v in lists.values()):
        raise InputError(f"In {path}, {where}: require_signature must be true or false, keys and roots lists of paths.", fix)
    found = {}
    for k, files in lists.items():
        found[k] = [Path(f) if Path(f).is_absolute() else home / f for f in files]
        for f, p in zip(files, found[k]):
            if not p.is_file():
                raise InputError(f"The trust policy {path} names the {k[:-1]} {p} ({where}), which does not exist.",
                                 _missing_fix(f, home, where))
    keys = tuple(signing.load_public_key(p) for p in found["keys"])
    return Entry(where, keys, req, signing.cert_roots(found["roots"]) if found["roots"] else None)


def _missing_fix(written: str, home: Path, where: str) -> str:
    """The fix for a key or root the policy names that is not there. ``edgemed home --move`` brings a policy written
    into the new state folder (and its keys) into the old one before it moves the whole: killed between those two
    renames, the keys are in the old folder (``env.legacy_home()``) and the policy in the new one. Then the file is
    not lost, and running the move again joins them."""
    legacy = env.legacy_home()
    if not Path(written).is_absolute() and Path(home) == env.default_home() != legacy and (legacy / written).is_file():
        return (f"it is in {legacy / written}: an interrupted `edgemed home --move` left it there; run "
                "`edgemed home --move` again, which joins the policy and its keys")
    return f"put the signer's .pub.pem (or the root certificate) there, or remove it from {where}"


def _fix(policy: Policy, entry: Entry, repo: str | None) -> str:
    table = f'[registries."{repo}"]' if repo is not None else "[local]"
    also = "" if policy.exists else ", or pass --key MAKER.pub.pem"  # with a trust.toml, --key must be in it anyway
    return (f"if you trust this bundle's maker, add their public key to {policy.path} under {table} "
            f"(keys = [\"keys/maker.pub.pem\"], the file under {policy.path.parent}){also}; otherwise do not install it")


def decide(origin: str | None, sig: signing.Signature | None, manifest, manifest_bytes: bytes, *, key=None,
           policy: Policy | None = None) -> signing.PublicKey | None:
    """Apply the policy to a bundle about to be installed (or run); return the key that verified it (None: unchecked).
    Raises SignatureError with a one-paragraph fix."""
    policy = policy if policy is not None else load()
    if key is not None:  # the operator named the signer for this command
        key = signing.as_public_key(key)
        signing.verify(sig, manifest, manifest_bytes, key)
        if policy.exists:  # and the policy must trust it too: `run` applies the policy to the installed copy
            decide(origin, sig, manifest, manifest_bytes, policy=policy)
        return key
    entry, repo = policy.entry_for(origin)
    source = origin or "a local file"
    if sig is None:
        if entry.require_signature:
            raise SignatureError(f"The bundle from {source} is not signed, and the trust policy ({entry.where} in "
                                 f"{policy.path}) requires a signature.",
                                 "ask the maker for a signed bundle (edgemed pack --sign key.pem) and push it again; only if "
                                 f"unsigned bundles are acceptable there, set require_signature = false under {entry.where}")
        return None
    signer = signing.signer_id(sig)
    if signer is not None and signer.startswith("cert ") and entry.roots is not None:
        signing.verify(sig, manifest, manifest_bytes, entry.roots)  # certificate mode: the chain decides
        return entry.roots
    if not entry.keys:
        if entry.require_signature:
            elsewhere = [w for w, e in policy.registries.items() if any(k.key_id == signing.signer_id(sig) for k in e.keys)]
            also = f" (its signer, key {signing.signer_id(sig)}, is trusted for {', '.join(elsewhere)} only)" if elsewhere else ""
            raise SignatureError(f"No signer is trusted for {repo or source}: {policy.path} has no entry for it{also}.",
                                 _fix(policy, entry, repo))
        return None
    match = next((k for k in entry.keys if k.key_id == signer), None)
    if match is None and signer is None and not sig.legacy:  # model.sig names no key: the signature decides which
        match = signing.verify_unnamed(sig, manifest, manifest_bytes, entry.keys)
        if match is None:
            raise SignatureError(f"The bundle from {source} carries a model.sig that names no key (older model-signing "
                                 "versions wrote none, and anyone can remove it), and none of the keys the trust policy "
                                 f"trusts there ({entry.where} in {policy.path}: "
                                 f"{', '.join(k.key_id for k in entry.keys)}) made it.", _fix(policy, entry, repo))
        return match  # verified in full by verify_unnamed
    if match is None:
        trusted = ", ".join(k.key_id for k in entry.keys)
        raise SignatureError(f"The bundle from {source} is signed by key {signer}, which the trust policy does not trust "
                             f"there ({entry.where} in {policy.path} trusts {trusted}).", _fix(policy, entry, repo))
    signing.verify(sig, manifest, manifest_bytes, match)
    return match


def check_update(name: str, installed: dict | None, origin: str | None, sig: signing.Signature | None, manifest,
                 manifest_bytes: bytes, key, *, policy: Policy, allow_signer_change: bool = False):
    """Replacing the installed ``name`` (its index record ``installed``): a model that was signed is replaced only by
    a bundle its signer signed, or one a key that the installed model's own origin trusts signed (a rotation made in
    trust.toml). Otherwise a signer trusted for one repository, or a bundle of the same name from another maker,
    would replace it. ``key``: what ``decide`` verified the new bundle with (None: nothing). ``allow_signer_change``
    (``--allow-signer-change``): the operator means to change the model's maker.

    Returns the key that verified the new bundle (``key``, or the one this check found: the installed model's own, or
    one its origin's entry trusts), so the new record names its signer as the one it replaces did; None when neither
    is signed, or the change of signer was allowed without one."""
    if not installed or not (installed.get("signer_key") or installed.get("signed_by")):
        return key  # an unsigned model: there is no signer to continue
    old_pem, old_id = installed.get("signer_key"), installed.get("signed_by")
    new_id = signing.signer_id(sig) if sig is not None else None
    if sig is not None and isinstance(key, signing.CertRoots) and new_id == old_id:
        return key  # certificate mode: the same signing identity, its chain to the roots verified (decide); another
        # identity under a shared CA is another maker unless the installed origin's entry trusts it (below)
    if sig is not None and old_pem:
        if isinstance(key, signing.PublicKey) and key.pem.decode("ascii") == old_pem:
            return key
        old_key = signing.public_key_from_pem(old_pem.encode("ascii"), Path(f"the key '{name}' was signed with"))
        try:
            signing.verify(sig, manifest, manifest_bytes, old_key)
            return old_key  # the installed model's own signer signed this one
        except SignatureError:
            pass
    if sig is not None and policy.exists:
        try:  # a signer the installed model's origin trusts (the clinic rotated the key in trust.toml)
            found = decide(installed.get("origin"), sig, manifest, manifest_bytes, policy=policy)
            if found is not None:
                return key if key is not None else found
        except SignatureError:
            pass
    if allow_signer_change:
        return key
    was = installed.get("origin") or installed.get("source") or "an earlier install"
    now = (f"signed by key {new_id}" if key is not None else f"signed by key {new_id}, not checked") if sig is not None \
        else "not signed"
    raise SignatureError(
        f"'{name}' is installed from {was}, signed by key {old_id}; this bundle from {origin or 'a local file'} is {now}. "
        "An installed model is replaced only by a bundle from its own signer.",
        f"if a new maker for '{name}' is intended, pass --allow-signer-change (the replaced version is kept for "
        f"`edgemed rollback {name}`); if its maker changed keys, add the new key to {policy.path} under the entry for "
        f"{was}; otherwise install it under another name (--name)")


def check_installed(record: dict, sig: signing.Signature | None, manifest, manifest_bytes: bytes) -> None:
    """At run: the installed copy's signature is the one checked at install, and today's policy still trusts its signer.

    The signature file's sha256 recorded at install stands for the library's check (as the manifest's sha256 in the
    index stands for the files'): run does not import model-signing (seconds of start-up) for a model with a key
    signature. ``edgemed verify NAME --key`` re-checks the signature in full. A certificate signature is checked
    against the entry's roots, through the library."""
    recorded, recorded_sig = record.get("signer_key"), record.get("signature_sha256")
    got_sig = hashlib.sha256(sig.data).hexdigest() if sig is not None else None
    if recorded_sig is not None and got_sig != recorded_sig:
        raise SignatureError(f"The installed model's signature ({signing.MODEL_SIG}) is not the one checked at install "
                             f"(sha256 {recorded_sig}, now {got_sig or 'absent'}).",
                             "reinstall the model from its bundle: edgemed install BUNDLE --force")
    if recorded and sig is not None and recorded_sig is None:  # a record without the signature's digest: check it in full
        signing.verify(sig, manifest, manifest_bytes, signing.public_key_from_pem(recorded.encode("ascii"), Path("the signer's key recorded at install")))
    policy = load()
    if not policy.exists:
        return  # no policy: as before (the signature was checked at install when a key was given)
    origin = record.get("origin")
    entry, repo = policy.entry_for(origin)
    if sig is None:
        if entry.require_signature:
            raise SignatureError(f"The installed model from {origin or record.get('source')} is not signed, and the trust policy "
                                 f"({entry.where} in {policy.path}) now requires a signature.",
                                 f"install a signed copy (edgemed install BUNDLE --force), or set require_signature = false under {entry.where}")
        return
    signer = signing.signer_id(sig)
    if signer is not None and signer.startswith("cert ") and entry.roots is not None:
        # the certificates must have been in force when this signature file (its sha256 recorded then) was installed
        signing.verify(sig, manifest, manifest_bytes, entry.roots, at=_installed_at(record) if recorded_sig else None)
        return
    if entry.keys and signer is None and not sig.legacy:
        _check_unnamed(record, sig, manifest, manifest_bytes, entry, policy, repo)
        return
    if entry.keys:
        trusted = any(k.key_id == signer for k in entry.keys) and (not recorded or any(k.pem.decode("ascii") == recorded for k in entry.keys))
        if not trusted:
            raise SignatureError(f"The installed model is signed by key {signer}, which the trust policy no longer trusts "
                                 f"({entry.where} in {policy.path}).", _fix(policy, entry, repo))
        if not recorded:  # installed with its signature not checked: the key id model.sig names is only its claim
            _check_unchecked(record, sig, manifest, manifest_bytes, next(k for k in entry.keys if k.key_id == signer))
    elif entry.require_signature:
        raise SignatureError(f"No signer is trusted for {repo or 'local bundles'} in {policy.path}, which requires a signature.",
                             _fix(policy, entry, repo))


def _check_unchecked(record: dict, sig: signing.Signature, manifest, manifest_bytes: bytes, key: signing.PublicKey) -> None:
    """A model installed while no key applied (install said "signature not checked") and now judged by a policy that
    trusts the key its model.sig names: the signature is checked in full, here, before the model is trusted."""
    try:
        signing.verify(sig, manifest, manifest_bytes, key)
    except SignatureError as exc:
        where = record.get("origin") or record.get("source") or "an earlier install"
        raise SignatureError(f"The installed model '{manifest.name}' (from {where}) was installed with its signature not "
                             f"checked, and that signature does not hold: {exc.problem}",
                             "do not run it; install a copy from its maker again (edgemed install BUNDLE --force checks "
                             "the signature now), or check this one with `edgemed verify NAME --key MAKER.pub.pem`") from None


def _installed_at(record: dict):
    """When the index says the model was installed (an aware datetime), or None where it says nothing readable."""
    import datetime

    try:
        return datetime.datetime.strptime(record.get("installed") or "", "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return None


def _check_unnamed(record: dict, sig: signing.Signature, manifest, manifest_bytes: bytes, entry: Entry, policy: Policy,
                   repo: str | None) -> None:
    """At run, an installed model whose model.sig names no key: the key recorded at install (which verified this very
    signature file, its sha256 recorded with it) must still be trusted. Installed with its signature not checked
    (nothing recorded), each key the entry trusts is tried in full, as ``decide`` does."""
    recorded = record.get("signer_key")
    if recorded:
        if any(k.pem.decode("ascii") == recorded for k in entry.keys):
            return
        raise SignatureError(f"The installed model is signed by key {record.get('signed_by')}, which the trust policy no "
                             f"longer trusts ({entry.where} in {policy.path}).", _fix(policy, entry, repo))
    where = record.get("origin") or record.get("source") or "an earlier install"
    fix = ("do not run it; install a copy from its maker again (edgemed install BUNDLE --force checks the signature "
           "now), or check this one with `edgemed verify NAME --key MAKER.pub.pem`")
    try:
        found = signing.verify_unnamed(sig, manifest, manifest_bytes, entry.keys)
    except SignatureError as exc:
        raise SignatureError(f"The installed model '{manifest.name}' (from {where}) was installed with its signature not "
                             f"checked, and that signature does not hold: {exc.problem}", fix) from None
    if found is None:
        raise SignatureError(f"The installed model '{manifest.name}' (from {where}) was installed with its signature not "
                             "checked; its model.sig names no key, and none of the keys the trust policy trusts "
                             f"({entry.where} in {policy.path}) made it.", fix)
