"""Bundle signatures: the OpenSSF Model Signing format (``model.sig``), made and checked offline.

``model.sig`` sits at the bundle's root. It is a Sigstore bundle holding a DSSE envelope over an
in-toto statement that lists every other file of the bundle (``manifest.json``, the model, LICENSE,
the card, the report, templates) with its sha256: the format of the OpenSSF Model Signing
specification v1.0, made and checked by its library ``model-signing`` (the ``fleet`` extra), so a
hospital's security team checks an edgemed bundle with ``model_signing verify key`` and no edgemed.
Keys are EC (P-256 by default; P-384 and P-521 are read too) in PEM: a PKCS#8 private key and its
SubjectPublicKeyInfo public key, the ones ``openssl ecparam -genkey -name prime256v1`` makes.
A key's id is the first 16 hex digits of the hint the library records in the signature (sha256
over the PEM public key), so ``inspect`` names the signer without the key.

Hashing: the library would hash every file again; edgemed already holds each file's sha256 (the
manifest, checked file by file on every read, through the verified cache on the fast path). So
edgemed hands the library those digests through a ``model_signing.hashing.Config`` whose ``hash``
returns them (``_KnownDigests``) and lets the library do the rest: build and sign the statement,
check the envelope and the key, compare statement and digests. A tar is then checked as it
streams, and ``run`` checks a signature without re-reading the model. A statement made with other
hashing (shards, BLAKE2) is refused with the fix: model-signing 1.1.1 cannot verify those itself.

Legacy: bundles signed by an older edgemed carry ``manifest.sig`` (ed25519 over a domain prefix
and ``manifest.json``). They still verify with the old ed25519 public key, read-only, and each
check logs a one-line notice to re-sign; edgemed no longer makes them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgemed.files.atomic import atomic_paths, check_destination, refuse_store
from edgemed.errors import InputError, OutputError, OutputExists, SignatureError, require
from edgemed.formats.nesting import loads_json

log = logging.getLogger(__name__)

MODEL_SIG = "model.sig"          # OpenSSF Model Signing (the one edgemed writes)
LEGACY_SIG = "manifest.sig"      # an older edgemed's ed25519 signature (read-only)
LEGACY_SCHEMA = "edgemed.signature/1"
_LEGACY_CONTEXT = b"edgemed.bundle.manifest.v1\0"
_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_MAKE_KEY = "make an EC P-256 key pair with `edgemed keygen key.pem` (key.pem signs; key.pub.pem verifies)"
_RESIGN = ("this bundle carries an older edgemed's ed25519 signature (manifest.sig), which only edgemed can check; "
           "re-sign it in the standard format: edgemed pack ... --sign key.pem (an EC key from `edgemed keygen`)")


@dataclass(frozen=True)
class Signature:
    """A bundle's signature file as read (bounded, well formed): which one, and its bytes."""
    file: str     # MODEL_SIG or LEGACY_SIG
    data: bytes

    @property
    def legacy(self) -> bool:
        return self.file == LEGACY_SIG


@dataclass(frozen=True)
class PublicKey:
    """A verifying key read from a PEM file: an EC key (model.sig) or an older ed25519 key (manifest.sig)."""
    path: Path
    kind: str     # "ec" or "ed25519"
    key_id: str
    pem: bytes    # the SubjectPublicKeyInfo PEM (a private key given is reduced to its public half)

    def fingerprint(self) -> str:
        """sha256 over the PEM public key: the hint model.sig records (EC), or the legacy key id's source."""
        return hashlib.sha256(self.pem).hexdigest()


@dataclass(frozen=True)
class SigningKey:
    path: Path
    key_id: str
    certificate: Path | None = None   # certificate mode: the signing certificate (its key is ``path``'s)
    chain: tuple = ()                 # and the certificates up to (not necessarily including) the root


@dataclass(frozen=True)
class CertRoots:
    """Certificate mode: the root (and intermediate) certificates a signing certificate must chain to."""
    paths: tuple
    key_id: str = "certificate chain"


# -- keys ----------------------------------------------------------------------------------
def _crypto():
    require("cryptography", "gguf")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    return serialization, ec, ed25519


def _spki_pem(public) -> bytes:
    s, _, _ = _crypto()
    return public.public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)


def _legacy_key_id(public) -> str:
    s, _, _ = _crypto()
    return hashlib.sha256(public.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)).hexdigest()[:16]


def _ec_key_id(pem: bytes) -> str:
    return hashlib.sha256(pem).hexdigest()[:16]


def _check_curve(key, path) -> None:
    if key.curve.name not in _CURVES:
        raise InputError(f"'{path}' is an EC key on curve {key.curve.name}; model signatures use P-256, P-384 or P-521.", _MAKE_KEY)


def load_private_key(path: Path, certificate: Path | None = None, chain=()) -> SigningKey:
    """A private EC key to sign with (read to check it; the library reads it again from ``path``); with
    ``certificate`` (PEM, for that key) and its ``chain``, model.sig carries the certificates instead of a key hint."""
    s, ec, ed = _crypto()
    try:
        key = s.load_pem_private_key(_small(path), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"Cannot read the signing key '{path}': {exc}.", f"pass an unencrypted EC private key in PEM form ({_MAKE_KEY})") from None
    if isinstance(key, ed.Ed25519PrivateKey):
        raise InputError(f"'{path}' is an ed25519 key: an older edgemed signed with those, and only edgemed can check such "
                         "signatures, so edgemed no longer makes them.", _MAKE_KEY)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InputError(f"'{path}' is not an EC private key.", _MAKE_KEY)
    _check_curve(key, path)
    if certificate is None:
        _check_public_beside(Path(path), _spki_pem(key.public_key()))
    if certificate is not None:
        check_certificate_files(Path(certificate), chain)
        return SigningKey(Path(path), f"cert {_cert_name(_small(certificate), pem=True)}", Path(certificate),
                          tuple(Path(c) for c in chain))
    return SigningKey(Path(path), _ec_key_id(_spki_pem(key.public_key())))


#: A PEM key or certificate (chain) is a few kilobytes; a larger "key" is the wrong file (or /dev/zero).
MAX_PEM_BYTES = 1 << 20


def _small(path) -> bytes:
    """The bytes of a key or certificate file: a regular file of at most ``MAX_PEM_BYTES``, else ``InputError``
    naming it (a device, a pipe or a huge file is never read)."""
    from edgemed.formats.input_file import read_at_most

    try:
        return read_at_most(Path(path), MAX_PEM_BYTES)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise InputError(f"Cannot read '{path}': {why}.", "pass the PEM file itself (a key or certificate is a few "
                         "kilobytes)") from None


def _cert_name(data: bytes, pem: bool = False) -> str:
    """A certificate's subject and the start of its sha256 fingerprint, as messages and the index name a signer."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    try:
        cert = x509.load_pem_x509_certificate(data) if pem else x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise InputError(f"Cannot read the certificate: {exc}.", "pass PEM certificates (--cert, --cert-chain)") from None
    return f"{cert.subject.rfc4514_string()[:120]} {cert.fingerprint(hashes.SHA256()).hex()[:16]}"


def cert_roots(paths) -> CertRoots:
    for p in paths:
        if not Path(p).is_file():
            raise InputError(f"Certificate '{p}' does not exist.", "pass the PEM root certificate your clinic trusts (--cert-chain)")
        _cert_name(_small(p).split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n", pem=True)
    return CertRoots(tuple(Path(p) for p in paths))


def load_public_key(path: Path) -> PublicKey:
    if not Path(path).exists():
        raise InputError(f"Public key '{path}' does not exist.", "pass the .pub.pem the bundle's maker gave you")
    return public_key_from_pem(_small(path), Path(path))  # a device, a folder or a huge file: named, never read


def public_key_from_pem(data: bytes, where: Path) -> PublicKey:
    """A verifying key from PEM bytes (``where`` names it in messages); a private key is reduced to its public half."""
    s, ec, ed = _crypto()
    try:
        key = s.load_pem_public_key(data)
    except ValueError:
        try:  # a private key also does: derive its public half
            key = s.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as exc:
            raise InputError(f"Cannot read the public key '{where}': {exc}.", "pass an EC public key in PEM form (the maker's .pub.pem)") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        _check_curve(key, where)
        pem = _spki_pem(key)
        return PublicKey(Path(where), "ec", _ec_key_id(pem), pem)
    if isinstance(key, ed.Ed25519PublicKey):
        return PublicKey(Path(where), "ed25519", _legacy_key_id(key), _spki_pem(key))
    raise InputError(f"'{where}' is neither an EC nor an ed25519 public key.", "pass the .pub.pem the bundle's maker gave you")


def as_public_key(key) -> PublicKey | CertRoots | None:
    """``key`` as a PublicKey: None, a PublicKey (or CertRoots), or a path to a PEM file."""
    if key is None or isinstance(key, (PublicKey, CertRoots)):
        return key
    return load_public_key(Path(key))


def public_path(private_key: Path) -> Path:
    """Where keygen puts a private key's public half: key.pem -> key.pub.pem (any other name gains .pub.pem)."""
    private_key = Path(private_key)
    return private_key.with_name(private_key.name.removesuffix(".pem") + ".pub.pem")


def _other_private(private_key: Path) -> Path | None:
    """The other private key whose public half keygen would also put at ``public_path(private_key)`` (``key`` and
    ``key.pem`` both have ``key.pub.pem``), when a PEM private key is there; else None."""
    from edgemed.formats.input_file import read_at_most

    name = Path(private_key).name
    other = Path(private_key).with_name(name.removesuffix(".pem") if name.endswith(".pem") else name + ".pem")
    try:
        head = read_at_most(other, MAX_PEM_BYTES)
    except (OSError, ValueError):
        return None  # none there, or not a key file: nothing to take the public file from
    return other if b"PRIVATE KEY-----" in head else None


def _refuse_shared_public(private_key: Path) -> None:
    """Refuse to write the public half of ``private_key`` where another private key's public half belongs (``key``
    then ``key.pem``): --force would have replaced it, and bundles that key signs would no longer verify against
    the file its clinics were given."""
    if not Path(private_key).name or Path(private_key).name in (".", ".."):
        return  # no name to put .pub.pem beside: check_destination refuses such a path
    other = _other_private(private_key)
    if other is not None:
        stem = Path(private_key).name.removesuffix(".pem")
        raise OutputExists(
            f"The public half of '{private_key}' would be '{public_path(private_key)}', which is the public half of "
            f"the private key '{other}' (keygen names both '{other.name}' and '{Path(private_key).name}' public "
            "halves that way): writing it would leave that key without its public file.",
            f"give the new key another name (e.g. {Path(private_key).with_name(stem + '-2.pem')}); "
            f"'{other}' and its public file stay as they are")


def _check_public_beside(private_key: Path, spki: bytes) -> None:
    """Refuse to sign with a key whose public file beside it (keygen's name for it) is another key's: bundles signed
    now would not verify against the file the clinics were given. A kill between keygen --force's two renames
    leaves just that: the old private key beside the new public one."""
    from edgemed.formats.input_file import read_at_most

    public = public_path(private_key)
    try:
        data = read_at_most(public, 64 * 1024)
    except (OSError, ValueError):
        return  # none there (or not a file keygen wrote): nothing to contradict
    if data.strip() != spki.strip():
        raise InputError(
            f"'{public}' beside the signing key '{private_key}' is not its public half (an interrupted "
            "`edgemed keygen --force` leaves the old private key beside the new public one): bundles signed now "
            "would not verify against that file.",
            f"write the key's public half again: edgemed keygen {private_key} --public-only --force (then give that "
            "file to the clinics), or sign with the key the file belongs to")


def derive_public(private_key: Path, force: bool = False) -> tuple[Path, str]:
    """Write (again) the public half of the existing ``private_key`` beside it; return (public path, key id)."""
    s, ec, _ = _crypto()
    try:
        key = s.load_pem_private_key(_small(private_key), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"Cannot read the private key '{private_key}': {exc}.", _MAKE_KEY) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InputError(f"'{private_key}' is not an EC private key.", _MAKE_KEY)
    pub = _spki_pem(key.public_key())
    public_out = public_path(private_key)
    _refuse_shared_public(private_key)
    with atomic_paths([public_out], force=force, option="PRIVATE_KEY") as (tmp,):
        tmp.write_bytes(pub)
    return public_out, _ec_key_id(pub)


def keygen(private_out: Path, force: bool = False) -> tuple[Path, str]:
    """Write a new EC P-256 private key (mode 0600) and its public key next to it; return (public path, key id).

    Both halves are refused, or both written: each is written in full before either is renamed into
    place, so a full disk or an error leaves the old pair (or none). The public half is renamed first:
    a kill between the two renames keeps the old private key beside the new public half. Signing with
    that key is then refused (``_check_public_beside``) until ``derive_public`` (``keygen --public-only``)
    writes its public half again.
    """
    refuse_store(private_out)
    if Path(private_out).name.endswith(".pub.pem"):  # --force would put a private key where a public one is expected
        raise InputError(f"'{private_out}' is the name of a public key (.pub.pem); keygen writes the private key there.",
                         f"pass the private key's name, e.g. {Path(private_out).name.removesuffix('.pub.pem')}.pem")
    _refuse_shared_public(private_out)  # before "pass --force", which would replace another key's public half
    check_destination(private_out, force, option="PRIVATE_KEY")  # a path like '.' has no name to put .pub.pem beside
    s, ec, _ = _crypto()
    public_out = public_path(private_out)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
    pub = _spki_pem(key.public_key())
    try:
        with atomic_paths([public_out, private_out], force=force, option="PRIVATE_KEY") as (pub_tmp, pem_tmp):
            pub_tmp.write_bytes(pub)
            fd = os.open(pem_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
    except OSError as exc:
        raise OutputError(
            f"Cannot write the key pair '{private_out}' and '{public_out}': {exc.strerror or exc}; "
            "the key files there were left as they were.",
            "free space on that disk, or choose a folder you can write to (check its permissions, or whether it is "
            "mounted read-only), then run edgemed keygen again",
        ) from None
    return public_out, _ec_key_id(pub)


# -- the library, fed edgemed's digests ----------------------------------------------------------
def _library():
    return require("model_signing", "fleet")


def _known_digests_config(name: str, digests: dict[str, str]):
    """A ``model_signing.hashing.Config`` whose ``hash`` returns ``digests`` (path -> sha256) instead of reading files."""
    ms = _library()
    from model_signing import manifest as ms_manifest
    from model_signing._hashing.hashing import Digest

    class _KnownDigests(ms.hashing.Config):
        def hash(self, model_path, *, files_to_hash=None):  # the digests are known: nothing is read
            ser = ms_manifest.SerializationType.from_args({"method": "files", "hash_type": "sha256", "allow_symlinks": False,
                                                           "ignore_paths": [MODEL_SIG]})
            items = [ms_manifest.FileManifestItem(path=Path(p), digest=Digest("sha256", bytes.fromhex(d))) for p, d in digests.items()]
            return ms_manifest.Manifest(name, items, ser)

    return _KnownDigests()


def expected_digests(manifest, manifest_bytes: bytes) -> dict[str, str]:
    """What a bundle's model.sig must list: manifest.json and every file the manifest lists, with their sha256."""
    return {"manifest.json": hashlib.sha256(manifest_bytes).hexdigest(), **{f.path: f.sha256 for f in manifest.files}}


def sign(manifest, manifest_bytes: bytes, key: SigningKey) -> Signature:
    """model.sig over manifest.json and every file the manifest lists (their sha256 as the manifest holds them)."""
    ms = _library()
    with tempfile.TemporaryDirectory(prefix="edgemed-sign-") as d:
        out = Path(d) / MODEL_SIG
        config = ms.signing.Config()
        if key.certificate is not None:
            config.use_certificate_signer(private_key=key.path, signing_certificate=key.certificate, certificate_chain=key.chain)
        else:
            config.use_elliptic_key_signer(private_key=key.path)
        config.set_hashing_config(_known_digests_config(manifest.name, expected_digests(manifest, manifest_bytes)))
        try:
            config.sign(Path(d), out)
        except (ValueError, TypeError) as exc:
            raise InputError(f"Cannot sign with '{key.path}': {exc}.", _MAKE_KEY) from None
        return Signature(MODEL_SIG, out.read_bytes())


def statement(sig: Signature) -> dict:
    """The in-toto statement inside model.sig (NOT authenticated: call ``verify`` for that)."""
    try:
        env = json.loads(sig.data.decode("utf-8"))["dsseEnvelope"]
        return json.loads(base64.b64decode(env["payload"], validate=True))
    except Exception:  # any malformed signature file is one answer: refuse
        raise SignatureError("model.sig is malformed (not an OpenSSF model signature).",
                             "the bundle was altered or damaged; get a fresh copy from its maker") from None


def signer_id(sig: Signature) -> str | None:
    """The key id a signature names (not checked): the legacy key id, or model.sig's public-key hint."""
    if sig.legacy:
        return _parse_legacy(sig.data)["key_id"]
    try:
        material = loads_json(sig.data.decode("utf-8"))["verificationMaterial"]
        if "x509CertificateChain" in material:
            return f"cert {_cert_name(base64.b64decode(material['x509CertificateChain']['certificates'][0]['rawBytes']))}"
        hint = material["publicKey"]["hint"]
        return hint[:16] if isinstance(hint, str) and hint else None
    except (KeyError, IndexError, TypeError, ValueError, InputError):
        return None


def well_formed(sig: Signature | None) -> Signature | None:
    """A signature file as a bundle reader hands it on: None (no signature file) or a well-formed one. Any other
    content, an empty or whitespace-only file included, is refused here (SignatureError, "malformed") whether or
    not a key is given: every command that reads a bundle (inspect, verify, install) gives the same answer."""
    if sig is None:
        return None
    if sig.legacy:
        _parse_legacy(sig.data)
    else:
        _check_statement(statement(sig))
    return sig


def _check_statement(st) -> None:
    """The statement's shape, as far as edgemed and the library read it: a predicate object whose serialization (when
    present) is an object and whose resources (when present) are a list of objects with a string name, algorithm and
    digest. Anything else is refused as malformed here, rather than failing inside a reader with a traceback."""
    predicate = st.get("predicate") if isinstance(st, dict) else None
    if not isinstance(predicate, dict):
        why = "its statement has no predicate"
    elif not isinstance(predicate.get("serialization", {}), dict):
        why = f"its serialization is a {_json_type(predicate['serialization'])}, not an object"
    elif not isinstance(predicate.get("resources", []), list):
        why = f"its resources are a {_json_type(predicate['resources'])}, not a list"
    else:
        bad = next((i for i, r in enumerate(predicate.get("resources", []))
                    if not (isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("name", "algorithm", "digest")))), None)
        if bad is None:
            return
        why = f"its resource #{bad + 1} is not an object with a string name, algorithm and digest"
    raise SignatureError(f"model.sig is malformed ({why}).", "the bundle was altered or damaged; get a fresh copy from its maker")


def _json_type(value) -> str:
    return {str: "string", list: "list", dict: "object", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


@contextlib.contextmanager
def _files(sig: Signature, key: PublicKey):
    """Temporary files the library reads: the signature and the public key (a private key given is never passed on)."""
    with tempfile.TemporaryDirectory(prefix="edgemed-verify-") as d:
        (Path(d) / MODEL_SIG).write_bytes(sig.data)
        if isinstance(key, PublicKey):
            (Path(d) / "key.pub.pem").write_bytes(key.pem)
        yield Path(d)


def _check_hashing(st: dict) -> None:
    """edgemed checks statements made by per-file sha256 (the library's default, and what edgemed writes)."""
    ser = st["predicate"].get("serialization") or {}  # its shape checked by well_formed
    if not (ser.get("method") == "files" and ser.get("hash_type") == "sha256"):
        raise SignatureError(f"model.sig was made with {ser.get('method')!s:.20} serialization and {ser.get('hash_type')!s:.20} "
                             "hashing; edgemed checks per-file sha256 signatures (the model_signing default).",
                             "re-sign the folder with `edgemed pack --sign key.pem`, or `model_signing sign key` with its "
                             "default hashing")


def verify(sig: Signature | None, manifest, manifest_bytes: bytes, key, *, at=None) -> str:
    """Check the signature with ``key`` (a PublicKey or a path) against the manifest; return the signer's key id.

    model.sig must list exactly manifest.json and the manifest's files with their sha256 (the files themselves are
    checked against the manifest by the caller, as for any bundle, so this costs no second read of the model).
    Certificate mode (``key`` a CertRoots): the signing certificate, its intermediates and the root (of ``key``) the
    chain ends at must also be valid at ``at`` (an aware datetime; now by default; ``trust.check_installed`` passes the
    time the copy was installed).
    Raises SignatureError."""
    key = as_public_key(key)
    if sig is None:
        raise SignatureError(f"The bundle is not signed, but a key was given (key {key.key_id}).",
                             "ask the maker for a signed bundle (edgemed pack --sign key.pem), or verify without --key")
    if sig.legacy:
        if isinstance(key, CertRoots):
            raise SignatureError("The bundle carries an older edgemed's ed25519 signature (manifest.sig), not a certificate signature.",
                                 "pass the ed25519 public key it was signed with (--key), or ask the maker to re-sign")
        return _verify_legacy(sig.data, manifest_bytes, key)
    if isinstance(key, CertRoots):
        _verify_with(sig, manifest, manifest_bytes, key, _use_roots(key, _as_of(at)), at)
        _check_validity(sig, key, at)  # each certificate model.sig carries in force then, and the root the chain ends at
        return signer_id(sig)
    if key.kind != "ec":
        raise SignatureError(f"The bundle carries an OpenSSF model signature (model.sig), but '{key.path}' is an ed25519 "
                             "key, which only checks an older edgemed's manifest.sig.", "pass the maker's EC public key (.pub.pem)")
    if (signer_id(sig) or "").startswith("cert "):
        raise SignatureError(f"model.sig is signed with a certificate ({signer_id(sig)}), not by a bare key like {key.key_id}.",
                             "pass the root certificate it chains to with --cert-chain ROOT.pem (or list it under roots in trust.toml)")
    _verify_with(sig, manifest, manifest_bytes, key, _use_key)
    if signer_id(sig) is None:
        _warn_no_hint(f"it was checked against the given key {key.key_id}")
    return key.key_id


def _use_key(config, folder: Path) -> None:
    config.use_elliptic_key_verifier(public_key=folder / "key.pub.pem")


def _warn_no_hint(how: str) -> None:
    log.warning("model.sig names no key (an older model-signing wrote no key hint; the hint is not signed, so anyone can "
                "remove it): %s. Re-sign the bundle with `edgemed pack --sign key.pem` to record it.", how)


def verify_unnamed(sig: Signature, manifest, manifest_bytes: bytes, keys) -> PublicKey | None:
    """The key among ``keys`` (a policy entry's) that made ``sig``, a model.sig that names no key: each EC key is tried
    with the library, in full, so the signature decides, never the (unsigned, absent) hint. None: it is none of
    theirs. A key whose envelope verifies while the files differ is refused as for any bundle (SignatureError)."""
    from cryptography.exceptions import InvalidSignature

    _check_hashing(statement(well_formed(sig)))
    for key in keys:
        if key.kind != "ec":
            continue
        try:
            _run_library(sig, manifest, manifest_bytes, key, _use_key)
        except InvalidSignature:  # not this key's envelope
            continue
        except Exception as exc:  # this key's envelope (or a fault any key meets): the bundle is refused, as in _verify_with
            raise _refusal(exc, key, statement(sig), expected_digests(manifest, manifest_bytes)) from None
        _warn_no_hint(f"each key the trust policy trusts there was tried, and key {key.key_id} made it")
        return key
    return None


def _verify_with(sig: Signature, manifest, manifest_bytes: bytes, key, use, at=None) -> None:
    """The library's verifier (set up by ``use(config, folder)``) over model.sig, fed the manifest's digests. A
    certificate chain that does not verify at ``at`` because a certificate is out of its validity period then is
    refused naming that certificate and its date (``_check_validity``)."""
    _check_hashing(statement(well_formed(sig)))
    try:
        _run_library(sig, manifest, manifest_bytes, key, use)
        return
    except Exception as exc:  # the library raises ValueError, OpenSSL's chain errors, or InvalidSignature
        refusal = _refusal(exc, key, statement(sig), expected_digests(manifest, manifest_bytes))
        chain_failed = isinstance(key, CertRoots) and type(exc).__name__ == "X509StoreContextError"
    if chain_failed:
        _check_validity(sig, key, at)
    raise refusal


def _use_roots(roots: CertRoots, at):
    """Set up the library's certificate verifier over ``roots`` with the chain checked as of ``at``, the time edgemed
    judges certificates by (now; the install time for an installed copy). The library takes the signing certificate's
    own start of validity, when a root renewed since (same name and key, in force from a later date) was not yet
    valid: a clinic that listed the renewal in place of the root it renews had every bundle under it refused. The
    chain's signatures, the signing certificate's key usage and the envelope are checked by the library as before. A
    library laid out otherwise keeps its own date (stricter: the renewal then needs the old root listed beside it)."""
    def use(config, folder: Path) -> None:
        config.use_certificate_verifier(certificate_chain=roots.paths)
        verifier = getattr(config, "_verifier", None)
        if hasattr(verifier, "_store"):  # model-signing 1.1's certificate verifier keeps its OpenSSL store there
            verifier._store = _store_as_of([cert for _, cert in _anchors(roots)], at)

    return use


def _anchors(roots: CertRoots) -> list:
    """(path, certificate) for each certificate in the files of ``roots``."""
    from cryptography import x509

    return [(path, cert) for path in roots.paths for cert in x509.load_pem_x509_certificates(_small(path))]


def _store_as_of(certs, at):
    """An OpenSSL store of the trusted ``certs`` that checks chains as of ``at``, whatever time its user sets."""
    from OpenSSL import crypto

    class _AsOf(crypto.X509Store):
        def set_time(self, vfy_time) -> None:  # the library sets the signing certificate's start: edgemed's time stands
            super().set_time(at)

    store = _AsOf()
    for cert in certs:
        store.add_cert(crypto.X509.from_cryptography(cert))
    store.set_time(at)
    return store


def _run_library(sig: Signature, manifest, manifest_bytes: bytes, key, use) -> None:
    """One run of the library's verifier; raises what it raises. What it prints (model-signing 1.1.1's EC verifier
    prints a warning for a signature without a key hint) is logged, never written to stdout, where `--json` puts its
    one document (``_route_library_print``)."""
    ms = _library()
    _route_library_print()
    config = ms.verifying.Config()
    with _files(sig, key) as d:
        use(config, d)
        config.set_hashing_config(_known_digests_config(manifest.name, expected_digests(manifest, manifest_bytes)))
        config.verify(d, d / MODEL_SIG)


def _library_print(*values, sep=" ", end="\n", file=None, flush=False) -> None:
    """The ``print`` of the library's EC verifier module: its text, logged."""
    text = (" " if sep is None else sep).join(map(str, values)).strip()
    if text:
        log.info("model-signing printed: %s", text)


def _route_library_print() -> None:
    """Give the library's EC verifier module (the one that prints, with the builtin ``print``) a module-level ``print``
    that logs: a name in a module shadows the builtin for that module alone. Swapping ``sys.stdout`` around a
    verification (``contextlib.redirect_stdout``) did it for the whole process: in `edgemed serve`, which verifies an
    installed adapter bundle on a worker thread, another thread's output in that window went into the log. Set once
    and left (nothing to restore, so two verifications at once cannot leave each other's stand-in behind); a library
    that moved the module prints as it does, which the tests of `verify --json` would show."""
    try:
        from model_signing._signing import sign_ec_key
    except ImportError:  # another layout of the library: nothing of ours to set
        return
    sign_ec_key.print = _library_print


# -- certificate validity ----------------------------------------------------------------------------
def _carried_certificates(sig: Signature) -> list:
    """The certificates model.sig carries, signing certificate first (read after the library accepted them)."""
    from cryptography import x509

    chain = loads_json(sig.data.decode("utf-8"))["verificationMaterial"]["x509CertificateChain"]["certificates"]
    return [x509.load_der_x509_certificate(base64.b64decode(c["rawBytes"])) for c in chain]


def _validity_problem(cert, at, role: str) -> str | None:
    """Why ``cert`` is not in force at ``at`` (an aware datetime), naming it and the date; None when it is."""
    from cryptography.hazmat.primitives import hashes

    name = f"{cert.subject.rfc4514_string()[:120]} {cert.fingerprint(hashes.SHA256()).hex()[:16]}"
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if at > end:
        return f"the {role} {name} expired on {end:%Y-%m-%d %H:%M} UTC"
    if at < start:
        return f"the {role} {name} is not valid until {start:%Y-%m-%d %H:%M} UTC"
    return None


def _as_of(at=None):
    """The time certificates are judged at: ``at`` (an aware datetime) in UTC, or now."""
    import datetime

    return (at or datetime.datetime.now(datetime.timezone.utc)).astimezone(datetime.timezone.utc)


def _check_validity(sig: Signature, roots: CertRoots, at=None) -> None:
    """Certificate mode: refuse model.sig unless its signing certificate, each intermediate it carries, and the
    certificates of ``roots`` its chain ends at are valid at ``at`` (now by default), naming the one that is not and
    its date. Nothing in model.sig says when it was made, so a certificate out of its validity period signs nothing:
    without this anyone holding the key of a certificate that expired years ago could sign a bundle today (an
    intermediate carried but left out of the chain included). A self-signed root carried along is not the anchor: the
    roots the chain is checked against are the trust policy's (or --cert-chain's), not the signature's."""
    installed = at is not None
    at = _as_of(at)
    when = f"when this copy was installed ({at:%Y-%m-%d %H:%M} UTC)" if installed else f"now ({at:%Y-%m-%d %H:%M} UTC)"
    carried = _carried_certificates(sig)
    for i, cert in enumerate(carried):
        if i > 0 and cert.subject == cert.issuer:
            continue
        why = _validity_problem(cert, at, "signing certificate" if i == 0 else "intermediate certificate")
        if why is not None:
            raise SignatureError(
                f"model.sig is refused: {why}, so it does not vouch for the bundle {when}. model.sig does not record "
                "when it was made, so a certificate out of its validity period signs nothing edgemed accepts.",
                "ask the maker to re-sign the bundle with a current certificate (edgemed pack --sign KEY.pem --cert "
                "CERT.pem --cert-chain ROOT.pem); if the date looks wrong, check this machine's clock")
    _check_anchor(carried, roots, at, when, installed)


def _check_anchor(carried: list, roots: CertRoots, at, when: str, installed: bool) -> None:
    """The chain from ``carried`` (signing certificate first) to a certificate of ``roots`` built again as of ``at``
    (OpenSSL, as the library builds it, which takes an issuer in force at that time where it has one): a refusal
    names the root (or a chain certificate from ``roots``) out of its validity period, the file it came from and the
    date."""
    from cryptography.hazmat.primitives import hashes
    from OpenSSL import crypto

    anchors = _anchors(roots)
    store = _store_as_of([cert for _, cert in anchors], at)
    context = crypto.X509StoreContext(store, crypto.X509.from_cryptography(carried[0]),
                                      [crypto.X509.from_cryptography(c) for c in carried[1:]])
    try:
        context.verify_certificate()
        return
    except crypto.X509StoreContextError as exc:
        failed, text = exc.certificate.to_cryptography(), str(exc)
    fingerprint = failed.fingerprint(hashes.SHA256())
    source = next((str(path) for path, cert in anchors if cert.fingerprint(hashes.SHA256()) == fingerprint), None)
    why = _validity_problem(failed, at, "root certificate" if failed.subject == failed.issuer else "chain certificate")
    if why is None:  # not a matter of dates: no root of these, a signature on the chain that does not hold
        raise SignatureError(f"model.sig does not verify against the certificate chain {', '.join(map(str, roots.paths))} "
                             f"{when}: {text[:200]}.",
                             "pass the root certificate the signer's certificate chains to (--cert-chain, or roots in "
                             "trust.toml), or get a bundle signed under your clinic's certificate authority")
    if at < failed.not_valid_before_utc:  # a renewal listed in place of the root that was in force then, or a wrong clock
        fix = ("if it renews a root that was in force then, list that root beside it (roots = [\"old-root.pem\", "
               "\"renewed-root.pem\"] in trust.toml, or both with --cert-chain)"
               + ("; or install the bundle again (edgemed install BUNDLE --force) to have it judged as of now" if installed else ""))
    else:
        fix = ("list the certificate authority's renewal of it (same name and key) beside it under roots in trust.toml "
               "(or pass both with --cert-chain): the expired one still vouches for copies installed while it was in "
               "force; a bundle under an authority that has a new key instead must be re-signed by its maker")
    raise SignatureError(
        f"model.sig is refused: {why}{f' (it is in {source})' if source else ''}, so the chain it anchors does not "
        f"vouch for the bundle {when}.", f"{fix}; if the date looks wrong, check this machine's clock")


def check_certificate_files(certificate: Path, chain=()) -> None:
    """Before signing (pack --cert): refuse a signing certificate, or a chain certificate other than a self-signed
    root, that is not valid now: every device would refuse the bundle it signs."""
    import datetime

    from cryptography import x509

    now = datetime.datetime.now(datetime.timezone.utc)
    found = []
    for path, option in [(certificate, "--cert"), *((c, "--cert-chain") for c in chain)]:
        try:
            certs = x509.load_pem_x509_certificates(_small(path))
        except ValueError as exc:
            raise InputError(f"Cannot read the certificate '{path}' ({option}): {exc}.", "pass PEM certificates (--cert, --cert-chain)") from None
        found += [(path, option, c) for c in (certs[:1] if option == "--cert" else certs) if option == "--cert" or c.subject != c.issuer]
    for path, option, cert in found:
        why = _validity_problem(cert, now, "signing certificate" if option == "--cert" else "chain certificate")
        if why is not None:
            raise InputError(f"Cannot sign with '{path}' ({option}): {why} (now is {now:%Y-%m-%d %H:%M} UTC), so every "
                             "device would refuse the bundle it signs.",
                             f"ask your certificate authority for a current certificate and pass it with {option}; "
                             "if the date looks wrong, check this machine's clock")


def _differences(st: dict, expected: dict[str, str]) -> str:
    """What differs between a statement the library authenticated and the bundle: each file with both digests."""
    signed = {r.get("name"): r.get("digest") for r in (st.get("predicate") or {}).get("resources", []) if isinstance(r, dict)}
    out = [f"'{p}' was signed with sha256 {signed[p]}, the bundle has {d}" for p, d in sorted(expected.items())
           if p in signed and signed[p] != d]
    missing = sorted(set(expected) - set(signed))
    extra = sorted(set(signed) - set(expected))
    if missing:
        out.append(f"not covered by the signature: {', '.join(map(str, missing[:5]))}")
    if extra:
        out.append(f"signed but not in the bundle: {', '.join(map(str, extra[:5]))}")
    return "; ".join(out)


def _refusal(exc: Exception, key: PublicKey, st: dict, expected: dict[str, str]) -> SignatureError:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(key, CertRoots) and "Signature mismatch" not in text:
        return SignatureError(f"model.sig does not verify against the certificate chain {', '.join(map(str, key.paths))}: {text[:200]}.",
                              "pass the root certificate the signer's certificate chains to (--cert-chain), or get a bundle "
                              "signed under your clinic's certificate authority")
    if "Key mismatch" in text or "x509CertificateChain" in text or "publicKey" in text:
        return SignatureError(f"model.sig was made by another key, not by the given key {key.key_id} ({key.path}).",
                              "check that you have the maker's public key; do not install a bundle from an unknown signer")
    if "Signature mismatch" in text:  # the envelope verified; the files it lists differ from the bundle's
        what = _differences(st, expected)
        changed = "the manifest was changed after signing" if "'manifest.json'" in what else "the bundle was changed after signing"
        return SignatureError(f"The bundle does not match model.sig (key {key.key_id}): {what}: {changed}.",
                              "do not install this bundle; get a fresh copy from its maker")
    return SignatureError(f"model.sig does not verify with key {key.key_id} ({key.path}): {text[:200]}: the signature was "
                          "changed after signing, or it is not this key's.", "do not install this bundle; get a fresh copy from its maker")


# -- legacy: an older edgemed's ed25519 manifest.sig (read-only) ---------------------------------------
def _parse_legacy(data: bytes) -> dict:
    try:
        doc = json.loads(data.decode("utf-8"))
        assert doc["schema"] == LEGACY_SCHEMA and doc["algorithm"] == "ed25519"
        doc["raw"] = base64.b64decode(doc["signature"], validate=True)
        assert len(doc["raw"]) == 64 and isinstance(doc["key_id"], str)
        return doc
    except Exception:  # any malformed signature file is one answer: refuse
        raise SignatureError("manifest.sig is malformed (not an edgemed ed25519 signature).",
                             "the bundle was altered or damaged; get a fresh copy from its maker") from None


def _verify_legacy(data: bytes, manifest_bytes: bytes, key: PublicKey) -> str:
    doc = _parse_legacy(data)
    if key.kind != "ed25519":
        raise SignatureError(f"The bundle carries an older edgemed's ed25519 signature (manifest.sig, key {doc['key_id']}); "
                             f"'{key.path}' is an EC key.", "pass the ed25519 public key it was signed with, or ask the maker to re-sign")
    if doc["key_id"] != key.key_id:
        raise SignatureError(f"manifest.sig was made by key {doc['key_id']}, not by the given key {key.key_id}.",
                             "check that you have the maker's public key; do not install a bundle from an unknown signer")
    s, _, _ = _crypto()
    from cryptography.exceptions import InvalidSignature

    try:
        s.load_pem_public_key(key.pem).verify(doc["raw"], _LEGACY_CONTEXT + manifest_bytes)
    except InvalidSignature:
        raise SignatureError(f"The signature does not match manifest.json (key {key.key_id}): the manifest was changed after signing.",
                             "do not install this bundle; get a fresh copy from its maker") from None
    log.warning("%s", _RESIGN)
    return key.key_id
