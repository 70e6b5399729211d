"""model.sig interop with the OpenSSF ``model-signing`` library, both ways, and the legacy ed25519 signature.

- the library's own verifier (its Python API, hashing the folder itself, and its ``model_signing`` CLI)
  accepts a bundle directory edgemed signed;
- edgemed (verify, install) accepts an edgemed bundle folder the library signed (API and CLI);
- one flipped byte in any file (the model, LICENSE, the card, manifest.json, model.sig) fails both;
- a bundle an older edgemed signed (ed25519 manifest.sig) still verifies, read-only, with a notice to re-sign.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import bundle_kit as kit
import pytest
from click.testing import CliRunner

ms = pytest.importorskip("model_signing", reason="the fleet extra (model-signing) is not installed")

from cryptography.exceptions import InvalidSignature

from edgemed.cli import cli
from edgemed.errors import IntegrityError, SignatureError
from edgemed.packaging import signing
from edgemed.packaging.bundle import PackInputs, pack, verify_dir

MS_CLI = Path(sys.executable).with_name("model_signing")


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ms")
    inp = kit.inputs(tmp / "in")
    priv, pub = kit.keypair(tmp)
    ins = PackInputs(model=inp["model"], license=inp["license"], card=inp["card"], name="tiny")
    pack(ins, tmp / "signed", as_dir=True, private_key=signing.load_private_key(priv))
    pack(ins, tmp / "unsigned", as_dir=True)
    pack(ins, tmp / "signed.edgemed", private_key=signing.load_private_key(priv))
    return {"tmp": tmp, "priv": priv, "pub": pub, "signed": tmp / "signed", "unsigned": tmp / "unsigned",
            "tar": tmp / "signed.edgemed", "inputs": ins}


def _library_verify(folder: Path, pub: Path) -> None:
    """The library's verifier, guessing its hashing from the signature and hashing the folder itself."""
    ms.verifying.Config().use_elliptic_key_verifier(public_key=pub).verify(folder, folder / "model.sig")


def _library_cli_verify(folder: Path, pub: Path) -> subprocess.CompletedProcess:
    if not MS_CLI.is_file():
        pytest.skip(f"the model_signing command is not beside {sys.executable}")
    return subprocess.run([str(MS_CLI), "verify", "key", str(folder), "--signature", str(folder / "model.sig"),
                           "--public_key", str(pub)], check=False, capture_output=True, text=True, timeout=120)


def test_keygen_makes_an_ec_p256_pair(made):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_private_key(made["priv"].read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert (made["priv"].stat().st_mode & 0o777) == 0o600
    assert serialization.load_pem_public_key(made["pub"].read_bytes()).public_numbers() == key.public_key().public_numbers()


def test_the_library_accepts_an_edgemed_bundle(made):
    folder = made["signed"]
    statement = signing.statement(signing.Signature("model.sig", (folder / "model.sig").read_bytes()))
    names = {r["name"] for r in statement["predicate"]["resources"]}
    assert names == {"manifest.json", "LICENSE", "card.toml", "model/tiny.gguf"}  # every file but the signature
    _library_verify(folder, made["pub"])
    r = _library_cli_verify(folder, made["pub"])
    assert r.returncode == 0 and "Verification succeeded" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("how", ["api", "cli"])
def test_edgemed_accepts_a_folder_the_library_signed(made, tmp_path, how, edgemed_home):
    folder = tmp_path / "b"
    shutil.copytree(made["unsigned"], folder)
    if how == "api":
        hashing = ms.hashing.Config().set_ignored_paths(paths=["model.sig"])
        ms.signing.Config().use_elliptic_key_signer(private_key=made["priv"]).set_hashing_config(hashing).sign(folder, folder / "model.sig")
    else:
        if not MS_CLI.is_file():
            pytest.skip(f"the model_signing command is not beside {sys.executable}")
        r = subprocess.run([str(MS_CLI), "sign", "key", str(folder), "--signature", str(folder / "model.sig"),
                            "--private_key", str(made["priv"])], check=False, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    r = _run("verify", folder, "--key", made["pub"])
    assert r.exit_code == 0 and "signature valid" in r.output, r.output
    r = _run("install", folder, "--key", made["pub"])
    assert r.exit_code == 0 and "signature valid" in r.output, r.output
    _library_verify(edgemed_home / "store" / "models" / "tiny", made["pub"])  # the installed folder, as the library sees it


def test_a_library_signature_made_with_other_hashing_is_refused_with_the_fix(made, tmp_path):
    """BLAKE2 (or sharded) statements cannot reuse the manifest's sha256, and model-signing 1.1.1 cannot verify them
    itself either ("Unsupported hashing method blake2b"; a shard size read back as a float): edgemed says so."""
    folder = tmp_path / "b"
    shutil.copytree(made["unsigned"], folder)
    hashing = ms.hashing.Config().use_file_serialization(hashing_algorithm="blake2").set_ignored_paths(paths=["model.sig"])
    ms.signing.Config().use_elliptic_key_signer(private_key=made["priv"]).set_hashing_config(hashing).sign(folder, folder / "model.sig")
    r = _run("verify", folder, "--key", made["pub"])
    assert r.exit_code == 1 and "blake2" in r.output and "default hashing" in r.output, r.output


def _flip(path: Path, offset: int) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rel", ["model/tiny.gguf", "LICENSE", "card.toml", "manifest.json", "model.sig"])
def test_one_flipped_byte_in_any_file_fails_edgemed_and_the_library(made, tmp_path, rel):
    folder = tmp_path / "b"
    shutil.copytree(made["signed"], folder)
    target = folder / rel
    # model.sig: a byte inside the signature value (its JSON must still parse for the library to get that far)
    offset = target.read_bytes().index(b'"sig"') + 12 if rel == "model.sig" else target.stat().st_size // 2
    _flip(target, offset)
    with pytest.raises((SignatureError, IntegrityError)):
        verify_dir(folder, full=True, public_key=made["pub"])
    r = _run("verify", folder, "--key", made["pub"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    with pytest.raises((ValueError, InvalidSignature)):  # the library's two answers: a digest diff, a bad signature
        _library_verify(folder, made["pub"])
    r = _library_cli_verify(folder, made["pub"])
    assert r.returncode != 0 and "Verification succeeded" not in r.stdout, r.stdout


def test_the_tar_form_carries_model_sig_and_verifies_as_it_streams(made, tmp_path):
    import tarfile

    with tarfile.open(made["tar"]) as tf:
        assert tf.getnames()[:2] == ["manifest.json", "model.sig"]
    r = _run("verify", made["tar"], "--key", made["pub"])
    assert r.exit_code == 0 and "signature valid" in r.output, r.output
    other = kit.keypair(tmp_path, "other.pem")[1]
    r = _run("verify", made["tar"], "--key", other)
    assert r.exit_code == 1 and "made by another key" in r.output, r.output


def test_edgemed_refuses_a_signature_over_fewer_files(made, tmp_path):
    """A library signature that leaves the model out (ignored when signing) does not vouch for the bundle."""
    folder = tmp_path / "b"
    shutil.copytree(made["unsigned"], folder)
    hashing = ms.hashing.Config().set_ignored_paths(paths=["model.sig", "model"])
    ms.signing.Config().use_elliptic_key_signer(private_key=made["priv"]).set_hashing_config(hashing).sign(folder, folder / "model.sig")
    r = _run("verify", folder, "--key", made["pub"])
    assert r.exit_code == 1 and "model/tiny.gguf" in r.output, r.output


# -- legacy ed25519 manifest.sig -------------------------------------------------------------------
def _legacy_pair(tmp: Path):
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    (tmp / "old.pem").write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
    (tmp / "old.pub.pem").write_bytes(key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))
    return key, tmp / "old.pem", tmp / "old.pub.pem"


def _legacy_sign(folder: Path, key) -> None:
    """What an older edgemed wrote: ed25519 over a domain prefix and manifest.json, as a small JSON document."""
    import hashlib

    from cryptography.hazmat.primitives import serialization as s

    raw = key.public_key().public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
    sig = key.sign(b"edgemed.bundle.manifest.v1\0" + (folder / "manifest.json").read_bytes())
    (folder / "manifest.sig").write_text(json.dumps({"schema": "edgemed.signature/1", "algorithm": "ed25519",
                                                     "key_id": hashlib.sha256(raw).hexdigest()[:16],
                                                     "signature": base64.b64encode(sig).decode()}))


def test_a_legacy_ed25519_bundle_still_verifies_with_a_notice_to_re_sign(made, tmp_path, caplog, edgemed_home):
    key, old_priv, old_pub = _legacy_pair(tmp_path)
    folder = tmp_path / "b"
    shutil.copytree(made["unsigned"], folder)
    _legacy_sign(folder, key)
    with caplog.at_level("WARNING"):
        v = verify_dir(folder, full=True, public_key=old_pub)
    assert v.signed_by and any("re-sign" in r.getMessage() for r in caplog.records)
    r = _run("install", folder, "--key", old_pub)
    assert r.exit_code == 0 and "signature valid" in r.output, r.output
    assert (edgemed_home / "store" / "models" / "tiny" / "manifest.sig").is_file()
    # a changed manifest still breaks it; an EC key is not an answer for it; edgemed no longer signs with ed25519
    m = json.loads((folder / "manifest.json").read_text())
    m["card"]["intended_use"] = "anything"
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SignatureError, match="changed after signing"):
        verify_dir(folder, full=True, public_key=old_pub)
    with pytest.raises(SignatureError, match="is an EC key"):
        verify_dir(folder, full=True, public_key=made["pub"])
    r = _run("pack", made["inputs"].model, "--license", made["inputs"].license, "--sign", old_priv, "-o", tmp_path / "x.edgemed")
    assert r.exit_code == 1 and "ed25519" in r.output and "edgemed keygen" in r.output, r.output
    assert not (tmp_path / "x.edgemed").exists()


# -- certificate mode ---------------------------------------------------------------------------------
def _ca(tmp: Path, name: str, leaf_from=None, leaf_until=None):
    """A root certificate and a code-signing leaf under it (EC P-256), as PEM files; returns (root, leaf cert, leaf key).
    The leaf is valid from an hour ago for 30 days unless ``leaf_from``/``leaf_until`` (aware datetimes) say otherwise;
    the root from before the leaf until after it."""
    import datetime

    now = datetime.datetime.now(datetime.timezone.utc)
    leaf_from = leaf_from or now - datetime.timedelta(hours=1)
    leaf_until = leaf_until or now + datetime.timedelta(days=30)
    root, _, leaf, key = _root_and_leaf(tmp, name, min(leaf_from, now) - datetime.timedelta(days=1),
                                        max(leaf_until, now) + datetime.timedelta(days=30), leaf_from, leaf_until)
    return root, leaf, key


def test_certificate_mode_signs_and_checks_against_the_root(made, tmp_path, edgemed_home):
    root, leaf, key = _ca(tmp_path, "clinic")
    other_root, _, _ = _ca(tmp_path, "elsewhere")
    out = tmp_path / "cert-signed"
    ins = made["inputs"]
    r = _run("pack", ins.model, "--license", ins.license, "--card", ins.card, "--name", "tiny", "--sign", key, "--cert", leaf,
             "--cert-chain", root, "--dir", "-o", out)
    assert r.exit_code == 0 and "signed by key cert CN=clinic model signer" in r.output, r.output
    r = _run("verify", out, "--cert-chain", root)
    assert r.exit_code == 0 and "signature valid" in r.output, r.output
    ms.verifying.Config().use_certificate_verifier(certificate_chain=[root]).verify(out, out / "model.sig")  # the library agrees
    r = _run("verify", out, "--cert-chain", other_root)
    assert r.exit_code == 1 and "does not verify against the certificate chain" in r.output, r.output
    r = _run("verify", out, "--key", made["pub"])
    assert r.exit_code == 1 and "--cert-chain" in r.output, r.output
    (edgemed_home / "keys").mkdir(parents=True)
    shutil.copy(root, edgemed_home / "keys" / "clinic-root.pem")
    (edgemed_home / "trust.toml").write_text('[local]\nrequire_signature = true\nroots = ["keys/clinic-root.pem"]\n')
    r = _run("install", out)
    assert r.exit_code == 0 and "signature valid (key cert CN=clinic model signer" in r.output, r.output
    from edgemed.packaging.ref import runnable

    assert runnable("tiny").model_path.is_file()
    # an update: a certificate chaining to the roots passes as the same maker; without a trust.toml naming it, a
    # key-signed bundle is another signer, even with --key (refused without --allow-signer-change)
    r = _run("install", out, "--force")
    assert r.exit_code == 0 and "signature valid (key cert CN=clinic model signer" in r.output, r.output
    (edgemed_home / "trust.toml").unlink()
    r = _run("install", out, "--force", "--cert-chain", root)
    assert r.exit_code == 0 and "signature valid (key cert CN=clinic model signer" in r.output, r.output
    r = _run("install", made["signed"], "--force", "--key", made["pub"])
    assert r.exit_code == 1 and "replaced only by a bundle from its own signer" in r.output, r.output
    # made["signed"] was packed before `out`: an older release by its creation time, when a second passed between
    r = _run("install", made["signed"], "--force", "--key", made["pub"], "--allow-signer-change", "--allow-downgrade")
    assert r.exit_code == 0, r.output
    other_root, other_leaf, other_key = _ca(tmp_path, "vendor-b")  # another maker's certificate, back again
    b_out = tmp_path / "b-signed"
    r = _run("pack", ins.model, "--license", ins.license, "--card", ins.card, "--name", "tiny", "--sign", other_key,
             "--cert", other_leaf, "--cert-chain", other_root, "--dir", "-o", b_out)
    assert r.exit_code == 0, r.output
    assert _run("install", out, "--force", "--cert-chain", root, "--allow-signer-change").exit_code == 0
    r = _run("install", b_out, "--force", "--cert-chain", other_root)  # a chain that verifies, from another maker
    assert r.exit_code == 1 and "replaced only by a bundle from its own signer" in r.output, r.output
    _flip(out / "LICENSE", 3)
    r = _run("verify", out, "--cert-chain", root)
    assert r.exit_code == 1, r.output


def _utc(text: str):
    import datetime

    return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.timezone.utc)


def _cert_signed(made, tmp_path: Path, name: str, leaf_from, leaf_until) -> tuple[Path, Path, Path, Path]:
    """A bundle folder signed in certificate mode by a leaf valid only from ``leaf_from`` to ``leaf_until``, made the
    way someone holding that leaf's key would (pack refuses such a certificate, so the signing key is handed to pack
    directly); returns (bundle, root, leaf, leaf key)."""
    root, leaf, key = _ca(tmp_path, name, leaf_from, leaf_until)
    out = tmp_path / f"{name}-signed"
    pack(made["inputs"], out, as_dir=True, private_key=signing.SigningKey(key, "cert", leaf, (root,)))
    return out, root, leaf, key


def test_an_expired_or_not_yet_valid_signing_certificate_is_refused(made, tmp_path, edgemed_home):
    """model-signing checks the chain at the leaf's own start of validity, and model.sig does not say when it was
    made: a certificate that expired in 2022 signed a bundle today, and verify, install and a trust.toml root all
    accepted it. Now the leaf must be valid now; pack refuses such a certificate before signing."""
    import datetime

    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=10)
    cases = {"old": (_utc("2020-10-28"), _utc("2022-10-28"), "expired on 2022-10-28 00:00 UTC"),
             "future": (soon, soon + datetime.timedelta(days=30), f"is not valid until {soon:%Y-%m-%d %H:%M} UTC")}
    (edgemed_home / "keys").mkdir(parents=True)
    ins = made["inputs"]
    for name, (start, end, why) in cases.items():
        bundle, root, leaf, key = _cert_signed(made, tmp_path, name, start, end)
        ms.verifying.Config().use_certificate_verifier(certificate_chain=[root]).verify(bundle, bundle / "model.sig")  # the library accepts it
        for args in (["verify", bundle, "--cert-chain", root], ["install", bundle, "--cert-chain", root]):
            r = _run(*args)
            assert r.exit_code == 1 and "Traceback" not in r.output, r.output
            assert f"the signing certificate CN={name} model signer" in r.output and why in r.output, r.output
            assert "re-sign the bundle with a current certificate" in r.output, r.output
        shutil.copy(root, edgemed_home / "keys" / f"{name}-root.pem")
        (edgemed_home / "trust.toml").write_text(f'[local]\nrequire_signature = true\nroots = ["keys/{name}-root.pem"]\n')
        r = _run("install", bundle)
        assert r.exit_code == 1 and why in r.output, r.output
        (edgemed_home / "trust.toml").unlink()
        assert not (edgemed_home / "store" / "models" / "tiny").exists()
        r = _run("pack", ins.model, "--license", ins.license, "--name", "tiny", "--sign", key, "--cert", leaf,
                 "--cert-chain", root, "-o", tmp_path / f"{name}.edgemed")
        assert r.exit_code == 1 and why in r.output and "--cert" in r.output, r.output
        assert not (tmp_path / f"{name}.edgemed").exists()
    bundle, root, _, _ = _cert_signed(made, tmp_path, "current", None, None)  # a certificate in force installs
    r = _run("install", bundle, "--cert-chain", root)
    assert r.exit_code == 0 and "signature valid (key cert CN=current model signer" in r.output, r.output


def test_an_installed_copy_is_judged_by_its_certificate_at_install_time(made, tmp_path, edgemed_home):
    """At run, a certificate signature is checked as of the time the copy was installed (its signature file's sha256
    recorded then): a model installed while its certificate was valid keeps running after the certificate expires;
    one installed after it expired does not."""
    import json as _json

    from edgemed.packaging.ref import runnable
    from edgemed.packaging.store import Store

    bundle, root, _, _ = _cert_signed(made, tmp_path, "old", _utc("2020-10-28"), _utc("2022-10-28"))
    assert _run("install", bundle).exit_code == 0  # no policy, no key: installed with the signature not checked
    (edgemed_home / "keys").mkdir(parents=True)
    shutil.copy(root, edgemed_home / "keys" / "root.pem")
    (edgemed_home / "trust.toml").write_text('[local]\nrequire_signature = true\nroots = ["keys/root.pem"]\n')
    with pytest.raises(SignatureError, match="expired on 2022-10-28 00:00 UTC, so it does not vouch for the bundle when this copy was installed"):
        runnable("tiny")
    store = Store()
    idx = _json.loads(store.index_path.read_text())
    idx["tiny"]["installed"] = "2021-06-01T00:00:00Z"  # installed while the certificate was in force
    store.index_path.write_text(_json.dumps(idx))
    assert runnable("tiny").model_path.is_file()


def _root_and_leaf(tmp: Path, name: str, root_from, root_until, leaf_from, leaf_until, renewed_until=None, renewed_from=None):
    """A root valid only from ``root_from`` to ``root_until`` and a code-signing leaf under it (EC P-256), as PEM files;
    with ``renewed_until`` also the root re-issued (same name and key, valid from ``renewed_from``, by default
    ``root_from``, until then), the way a certificate authority renews one. Returns (root, renewed root or None, leaf,
    leaf key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} root")])

    def root(serial, start, end):
        return (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
                .serial_number(serial).not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
                .sign(ca_key, hashes.SHA256()))

    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} model signer")]))
            .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(2)
            .not_valid_before(leaf_from).not_valid_after(leaf_until)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .sign(ca_key, hashes.SHA256()))
    (tmp / f"{name}-root.pem").write_bytes(root(1, root_from, root_until).public_bytes(s.Encoding.PEM))
    renewed = None
    if renewed_until is not None:
        renewed = tmp / f"{name}-root-renewed.pem"
        renewed.write_bytes(root(3, renewed_from or root_from, renewed_until).public_bytes(s.Encoding.PEM))
    (tmp / f"{name}-leaf.pem").write_bytes(leaf.public_bytes(s.Encoding.PEM))
    (tmp / f"{name}-leaf.key").write_bytes(leaf_key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
    return tmp / f"{name}-root.pem", renewed, tmp / f"{name}-leaf.pem", tmp / f"{name}-leaf.key"


def test_a_root_out_of_its_validity_period_anchors_nothing(made, tmp_path, edgemed_home):
    """model-signing checks the chain at the signing certificate's start of validity, so a trust.toml (or --cert-chain)
    root that expired in 2021 still anchored a current certificate's chain, and verify, install and run accepted its
    bundles. The root the chain ends at must be valid now (at install time, for an installed copy); a root renewed under
    the same name and key, listed beside the expired one, anchors it."""
    import datetime
    import json as _json

    from edgemed.packaging.ref import runnable
    from edgemed.packaging.store import Store

    now = datetime.datetime.now(datetime.timezone.utc)
    root, renewed, leaf, key = _root_and_leaf(tmp_path, "lapsed", _utc("2019-01-01"), _utc("2021-01-01"), _utc("2020-01-01"),
                                              now + datetime.timedelta(days=30), renewed_until=now + datetime.timedelta(days=300))
    bundle = tmp_path / "lapsed-signed"
    pack(made["inputs"], bundle, as_dir=True, private_key=signing.SigningKey(key, "cert", leaf, (root,)))
    ms.verifying.Config().use_certificate_verifier(certificate_chain=[root]).verify(bundle, bundle / "model.sig")  # the library accepts it
    why = "the root certificate CN=lapsed root"
    for args in (["verify", bundle, "--cert-chain", root], ["install", bundle, "--cert-chain", root]):
        r = _run(*args)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert why in r.output and "expired on 2021-01-01 00:00 UTC" in r.output and str(root) in r.output, r.output
        assert "renewal of it (same name and key) beside it under roots in trust.toml" in r.output, r.output
    (edgemed_home / "keys").mkdir(parents=True)
    shutil.copy(root, edgemed_home / "keys" / "root.pem")
    (edgemed_home / "trust.toml").write_text('[local]\nrequire_signature = true\nroots = ["keys/root.pem"]\n')
    r = _run("install", bundle)
    assert r.exit_code == 1 and why in r.output and "expired on 2021-01-01 00:00 UTC" in r.output, r.output
    assert not (edgemed_home / "store" / "models" / "tiny").exists()
    r = _run("verify", bundle, "--cert-chain", renewed)  # the same root, renewed: the chain is anchored now
    assert r.exit_code == 0 and "signature valid" in r.output, r.output
    both = tmp_path / "both.pem"
    both.write_bytes(root.read_bytes() + renewed.read_bytes())  # the expired one beside it changes nothing
    assert _run("verify", bundle, "--cert-chain", both).exit_code == 0
    (edgemed_home / "trust.toml").unlink()
    assert _run("install", bundle).exit_code == 0  # no policy: installed with its signature not checked
    (edgemed_home / "trust.toml").write_text('[local]\nrequire_signature = true\nroots = ["keys/root.pem"]\n')
    with pytest.raises(SignatureError, match="expired on 2021-01-01 00:00 UTC .* when this copy was installed"):
        runnable("tiny")
    store = Store()
    idx = _json.loads(store.index_path.read_text())
    idx["tiny"]["installed"] = "2020-06-01T00:00:00Z"  # installed while the root was in force
    store.index_path.write_text(_json.dumps(idx))
    assert runnable("tiny").model_path.is_file()


def test_a_root_renewed_after_the_leaf_was_issued_anchors_it_with_the_expired_one_listed(made, tmp_path, edgemed_home):
    """The usual renewal: the root expired on 2021-01-01 and its certificate authority re-issued it (same name and key)
    valid from 2020-12-01, after the signing certificate (2020-01-01, still in force) was issued under the old one.
    model-signing builds the chain as of the leaf's start, when only the old root was in force; edgemed builds it again
    as of now (or the install time), when the renewed one is. With both in trust.toml, verify, install and run accept
    the bundle, whichever root was in force when the copy was installed; with the expired root alone, a copy installed
    after it expired is refused, naming the root, its end and the install time."""
    import datetime
    import json as _json

    from edgemed.packaging.ref import runnable
    from edgemed.packaging.store import Store

    now = datetime.datetime.now(datetime.timezone.utc)
    root, renewed, leaf, key = _root_and_leaf(tmp_path, "renewal", _utc("2019-01-01"), _utc("2021-01-01"), _utc("2020-01-01"),
                                              now + datetime.timedelta(days=30), renewed_from=_utc("2020-12-01"),
                                              renewed_until=now + datetime.timedelta(days=300))
    bundle = tmp_path / "renewal-signed"
    pack(made["inputs"], bundle, as_dir=True, private_key=signing.SigningKey(key, "cert", leaf, (root,)))  # carries the old root
    both = tmp_path / "both.pem"
    both.write_bytes(root.read_bytes() + renewed.read_bytes())
    r = _run("verify", bundle, "--cert-chain", both)
    assert r.exit_code == 0 and "signature valid (key cert CN=renewal model signer" in r.output, r.output

    (edgemed_home / "keys").mkdir(parents=True)
    shutil.copy(root, edgemed_home / "keys" / "root.pem")
    shutil.copy(renewed, edgemed_home / "keys" / "root-renewed.pem")
    policy = edgemed_home / "trust.toml"
    policy.write_text('[local]\nrequire_signature = true\nroots = ["keys/root.pem", "keys/root-renewed.pem"]\n')
    r = _run("install", bundle)
    assert r.exit_code == 0 and "signature valid (key cert CN=renewal model signer" in r.output, r.output
    assert runnable("tiny").model_path.is_file()

    store = Store()
    for installed in ("2020-06-01T00:00:00Z", "2021-06-01T00:00:00Z"):  # under the old root, then under the renewed one
        idx = _json.loads(store.index_path.read_text())
        idx["tiny"]["installed"] = installed
        store.index_path.write_text(_json.dumps(idx))
        assert runnable("tiny").model_path.is_file(), installed
    policy.write_text('[local]\nrequire_signature = true\nroots = ["keys/root.pem"]\n')  # the renewal taken out again
    with pytest.raises(SignatureError, match=r"CN=renewal root .* expired on 2021-01-01 00:00 UTC .* when this copy was "
                                             r"installed \(2021-06-01 00:00 UTC\)"):
        runnable("tiny")


def test_a_renewed_root_listed_alone_anchors_the_chain(made, tmp_path, edgemed_home):
    """Clinic IT replaces the expired root with its renewal (same name and key, valid from after the signing certificate
    was issued). model-signing checked the chain as of the signing certificate's start, when only the old root was in
    force, so verify, install and run refused every bundle under it and told them to pass the root they had passed.
    The chain is now checked as of now (the install time, for an installed copy): the renewal alone anchors it. A root
    of the same name under another key, or a changed signature, is still refused; a copy installed before the renewal
    began needs the old root beside it, and the refusal says so."""
    import datetime
    import json as _json

    from edgemed.packaging.ref import runnable
    from edgemed.packaging.store import Store

    now = datetime.datetime.now(datetime.timezone.utc)
    root, renewed, leaf, key = _root_and_leaf(tmp_path, "renew", _utc("2019-01-01"), _utc("2021-01-01"), _utc("2020-01-01"),
                                              now + datetime.timedelta(days=30), renewed_from=_utc("2020-12-01"),
                                              renewed_until=now + datetime.timedelta(days=300))
    bundle = tmp_path / "b"
    pack(made["inputs"], bundle, as_dir=True, private_key=signing.SigningKey(key, "cert", leaf, (root,)))
    r = _run("verify", bundle, "--cert-chain", renewed)
    assert r.exit_code == 0 and "signature valid (key cert CN=renew model signer" in r.output, r.output

    (tmp_path / "other").mkdir()
    impostor, _, _, _ = _root_and_leaf(tmp_path / "other", "renew", _utc("2020-12-01"), now + datetime.timedelta(days=300),
                                       _utc("2020-12-01"), now + datetime.timedelta(days=30))  # same name, another key
    r = _run("verify", bundle, "--cert-chain", impostor)
    assert r.exit_code == 1 and "does not verify against the certificate chain" in r.output, r.output
    forged = tmp_path / "forged"
    shutil.copytree(bundle, forged)
    _flip(forged / "model.sig", (forged / "model.sig").read_bytes().index(b'"sig"') + 12)
    r = _run("verify", forged, "--cert-chain", renewed)
    assert r.exit_code == 1 and "signature valid" not in r.output and "Traceback" not in r.output, r.output

    (edgemed_home / "keys").mkdir(parents=True)
    shutil.copy(renewed, edgemed_home / "keys" / "root-renewed.pem")
    (edgemed_home / "trust.toml").write_text('[local]\nrequire_signature = true\nroots = ["keys/root-renewed.pem"]\n')
    r = _run("install", bundle)
    assert r.exit_code == 0 and "signature valid (key cert CN=renew model signer" in r.output, r.output
    assert runnable("tiny").model_path.is_file()
    store = Store()
    idx = _json.loads(store.index_path.read_text())
    idx["tiny"]["installed"] = "2021-06-01T00:00:00Z"  # installed after the old root expired, under the renewal
    store.index_path.write_text(_json.dumps(idx))
    assert runnable("tiny").model_path.is_file()
    idx["tiny"]["installed"] = "2020-06-01T00:00:00Z"  # installed under the old root, before the renewal began
    store.index_path.write_text(_json.dumps(idx))
    with pytest.raises(SignatureError) as refused:
        runnable("tiny")
    text = str(refused.value)
    assert "CN=renew root" in text and "is not valid until 2020-12-01 00:00 UTC" in text, text
    assert "when this copy was installed (2020-06-01 00:00 UTC)" in text and "beside" in text, text
    assert "edgemed install BUNDLE --force" in text, text


def test_the_nightly_pull_of_the_installed_bundle_changes_nothing_after_its_certificate_expired(
        made, registry, tmp_path, edgemed_home, monkeypatch, caplog):
    """docs/fleet.md: pull is idempotent, the name holding this very bundle is left as it is. The pulled signature was
    judged as of now before that was noticed, so the day the signing certificate expired, every device's nightly
    ``pull --force`` of the unchanged tag failed, though run keeps the installed copy (judged as of its install). Now
    it exits 0 with already_installed and a warning; a bundle that would be installed is still judged as of now."""
    import datetime

    from edgemed.packaging.ref import runnable

    bundle, root, leaf, key = _cert_signed(made, tmp_path, "nightly", None, None)  # valid for 30 days
    (edgemed_home / "keys").mkdir(parents=True)
    shutil.copy(root, edgemed_home / "keys" / "root.pem")
    (edgemed_home / "trust.toml").write_text(f'[registries."{registry.host}"]\nroots = ["keys/root.pem"]\n')
    stable = registry.ref("clinic/tiny:stable")
    assert _run("push", bundle, stable).exit_code == 0
    r = _run("pull", stable, "--force")
    assert r.exit_code == 0 and "signature valid (key cert CN=nightly model signer" in r.output, r.output

    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=31)  # the leaf has expired
    check = signing._check_validity
    monkeypatch.setattr(signing, "_check_validity", lambda sig, roots, at=None: check(sig, roots, at or later))
    r = _run("pull", stable, "--force", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["already_installed"] is True
    assert "tiny holds this bundle already and was left as it is" in caplog.text, caplog.text
    assert "pulled now, it would be refused" in caplog.text and "expired on" in caplog.text, caplog.text
    assert runnable("tiny").model_path.is_file()  # run agrees: judged as of its install

    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(int(later.timestamp())))  # the next release, under the same tag
    newer = tmp_path / "newer"
    pack(made["inputs"], newer, as_dir=True, private_key=signing.SigningKey(key, "cert", leaf, (root,)))
    assert _run("push", newer, stable).exit_code == 0
    r = _run("pull", stable, "--force")
    assert r.exit_code == 1 and "the signing certificate CN=nightly model signer" in r.output, r.output
    assert "expired on" in r.output, r.output
