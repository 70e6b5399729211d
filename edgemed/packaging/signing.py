"""Ed25519 signatures over a bundle's manifest, made and checked offline.

``manifest.sig`` is a small JSON document: the algorithm, the signer's key id
(the first 16 hex digits of sha256 over the raw 32-byte public key) and the
signature, base64. What is signed is a domain-separation prefix plus the exact
bytes of ``manifest.json``; the manifest holds every other file's sha256, so the
signature covers the whole bundle. Keys are PEM files (PKCS#8 private key,
SubjectPublicKeyInfo public key), the same ones ``openssl genpkey -algorithm
ed25519`` writes. The ``cryptography`` package is imported only here, lazily.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from edgemed.files.atomic import atomic_path, check_destination
from edgemed.errors import InputError, SignatureError, require

SIG_SCHEMA = "edgemed.signature/1"
CONTEXT = b"edgemed.bundle.manifest.v1\0"


def _ed25519():
    require("cryptography", "gguf")
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519


def _serialization():
    from cryptography.hazmat.primitives import serialization

    return serialization


def key_id(public_key) -> str:
    s = _serialization()
    raw = public_key.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(path: Path):
    ed = _ed25519()
    s = _serialization()
    try:
        key = s.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"Cannot read the signing key '{path}': {exc}.",
                         "pass an unencrypted ed25519 private key in PEM form (make one with `edgemed keygen key.pem`)") from None
    if not isinstance(key, ed.Ed25519PrivateKey):
        raise InputError(f"'{path}' is not an ed25519 private key.", "make one with `edgemed keygen key.pem`")
    return key


def load_public_key(path: Path):
    ed = _ed25519()
    s = _serialization()
    data = Path(path).read_bytes() if Path(path).is_file() else None
    if data is None:
        raise InputError(f"Public key '{path}' does not exist.", "pass the .pub.pem the bundle's maker gave you")
    try:
        key = s.load_pem_public_key(data)
    except ValueError:
        try:  # a private key also does: derive its public half
            key = s.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as exc:
            raise InputError(f"Cannot read the public key '{path}': {exc}.", "pass an ed25519 public key in PEM form") from None
    if not isinstance(key, ed.Ed25519PublicKey):
        raise InputError(f"'{path}' is not an ed25519 public key.", "pass the .pub.pem the bundle's maker gave you")
    return key


def keygen(private_out: Path, force: bool = False) -> tuple[Path, str]:
    """Write a new private key (mode 0600) and its public key next to it; return (public path, key id)."""
    check_destination(private_out, force)
    ed = _ed25519()
    s = _serialization()
    key = ed.Ed25519PrivateKey.generate()
    public_out = private_out.with_name(private_out.name.removesuffix(".pem") + ".pub.pem")
    pem = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
    pub = key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)
    check_destination(public_out, force)  # both refused, or both written: never a lone half of a pair
    with atomic_path(public_out, force=force) as tmp:
        tmp.write_bytes(pub)
    with atomic_path(private_out, force=force) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
    return public_out, key_id(key.public_key())


def sign(manifest_bytes: bytes, private_key) -> bytes:
    sig = private_key.sign(CONTEXT + manifest_bytes)
    doc = {"schema": SIG_SCHEMA, "algorithm": "ed25519", "key_id": key_id(private_key.public_key()),
           "signature": base64.b64encode(sig).decode("ascii")}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


def signature_key_id(sig_bytes: bytes) -> str:
    return _parse(sig_bytes)["key_id"]


def well_formed(sig_bytes: bytes | None) -> bytes | None:
    """``manifest.sig`` as a bundle reader hands it on: None (no signature file) or the bytes of a
    well-formed signature document. Any other content, an empty or whitespace-only file included, is
    refused here (SignatureError, "malformed") whether or not a key is given: every command that reads
    a bundle (inspect, verify, install) gives the same answer for the same file."""
    if sig_bytes is not None:
        _parse(sig_bytes)
    return sig_bytes


def _parse(sig_bytes: bytes) -> dict:
    try:
        doc = json.loads(sig_bytes.decode("utf-8"))
        assert doc["schema"] == SIG_SCHEMA and doc["algorithm"] == "ed25519"
        doc["raw"] = base64.b64decode(doc["signature"], validate=True)
        assert len(doc["raw"]) == 64 and isinstance(doc["key_id"], str)
        return doc
    except Exception:  # any malformed signature file is one answer: refuse
        raise SignatureError("manifest.sig is malformed (not an edgemed ed25519 signature).",
                             "the bundle was altered or damaged; get a fresh copy from its maker") from None


def verify(manifest_bytes: bytes, sig_bytes: bytes | None, public_key) -> str:
    """Check the signature with ``public_key``; return the key id. Raises SignatureError."""
    expected = key_id(public_key)
    if sig_bytes is None:
        raise SignatureError(f"The bundle is not signed, but a key was given (key {expected}).",
                             "ask the maker for a signed bundle (edgemed pack --sign key.pem), or verify without --key")
    doc = _parse(sig_bytes)
    if doc["key_id"] != expected:
        raise SignatureError(f"manifest.sig was made by key {doc['key_id']}, not by the given key {expected}.",
                             "check that you have the maker's public key; do not install a bundle from an unknown signer")
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(doc["raw"], CONTEXT + manifest_bytes)
    except InvalidSignature:
        raise SignatureError(f"The signature does not match manifest.json (key {expected}): the manifest was changed after signing.",
                             "do not install this bundle; get a fresh copy from its maker") from None
    return expected
