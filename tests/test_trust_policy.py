"""The device's trust policy ($EDGEMED_HOME/trust.toml): what install (and a pull, through Store.install with an
oci:// origin) and run accept. An untrusted key, an unsigned bundle and a wrong repository are each refused with a
one-paragraph fix, before anything is stored; run applies the policy again to the installed copy."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import bundle_kit as kit
import pytest
from click.testing import CliRunner

pytest.importorskip("model_signing", reason="the fleet extra (model-signing) is not installed")

from edgemed.cli import cli
from edgemed.errors import InputError, SignatureError
from edgemed.packaging import signing, trust
from edgemed.packaging.bundle import PackInputs, pack
from edgemed.packaging.ref import runnable
from edgemed.packaging.store import Store

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trust")
    inp = kit.inputs(tmp / "in")
    a_priv, a_pub = kit.keypair(tmp, "a.pem")
    b_priv, b_pub = kit.keypair(tmp, "b.pem")
    ins = PackInputs(model=inp["model"], license=inp["license"], card=inp["card"], name="tiny")
    pack(ins, tmp / "by-a", as_dir=True, private_key=signing.load_private_key(a_priv))
    pack(ins, tmp / "by-b", as_dir=True, private_key=signing.load_private_key(b_priv))
    pack(ins, tmp / "unsigned", as_dir=True)
    return {"a": a_pub, "b": b_pub, "by-a": tmp / "by-a", "by-b": tmp / "by-b", "unsigned": tmp / "unsigned"}


@pytest.fixture
def home(edgemed_home, made):
    (edgemed_home / "keys").mkdir(parents=True)
    shutil.copy(made["a"], edgemed_home / "keys" / "a.pub.pem")
    return edgemed_home


def _policy(home: Path, text: str) -> None:
    (home / "trust.toml").write_text(text)


def _refused_cli(*args) -> str:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    problem, _, fix = r.output.partition("\nFix: ")
    assert problem.startswith("Error: ") and fix.strip() and "\n" not in fix.strip(), r.output  # one problem, one fix
    return r.output


def _nothing_installed(home: Path) -> bool:
    models = home / "store" / "models"
    return not models.exists() or not any(models.iterdir())


def test_an_untrusted_key_is_refused_with_the_fix(home, made):
    _policy(home, '[local]\nkeys = ["keys/a.pub.pem"]\n')
    out = _refused_cli("install", made["by-b"])
    b_id = signing.load_public_key(made["b"]).key_id
    assert f"signed by key {b_id}" in out and "does not trust" in out and "trust.toml" in out and "[local]" in out, out
    assert _nothing_installed(home)
    r = CliRunner().invoke(cli, ["install", str(made["by-a"])])  # the trusted signer passes, no --key needed
    assert r.exit_code == 0 and "signature valid" in r.output, r.output


def test_an_unsigned_bundle_is_refused_where_a_signature_is_required(home, made):
    _policy(home, '[local]\nrequire_signature = true\nkeys = ["keys/a.pub.pem"]\n')
    out = _refused_cli("install", made["unsigned"])
    assert "is not signed" in out and "requires a signature" in out and "edgemed pack --sign" in out, out
    assert _nothing_installed(home)


def test_a_pull_is_judged_by_its_repository(home, made):
    """Store.install with an oci:// origin (what `edgemed pull` calls): the entry for that repository decides."""
    _policy(home, '[registries."127.0.0.1:5000/clinic"]\nkeys = ["keys/a.pub.pem"]\n')
    store = Store()
    with pytest.raises(SignatureError) as exc:  # signed by a trusted key, but pulled from another repository
        store.install(made["by-a"], origin=f"oci://127.0.0.1:5000/other/tiny@{DIGEST}")
    msg = str(exc.value)
    assert "No signer is trusted for 127.0.0.1:5000/other/tiny" in msg and "trusted for 127.0.0.1:5000/clinic only" in msg, msg
    assert '[registries."127.0.0.1:5000/other/tiny"]' in exc.value.fix
    assert _nothing_installed(home)
    with pytest.raises(SignatureError, match="is not signed"):  # pulls require a signature by default
        store.install(made["unsigned"], origin="oci://127.0.0.1:5000/clinic/tiny:v1")
    with pytest.raises(SignatureError, match="does not trust"):
        store.install(made["by-b"], origin="oci://127.0.0.1:5000/clinic/tiny:v1")
    assert _nothing_installed(home)
    origin = f"oci://127.0.0.1:5000/clinic/tiny@{DIGEST}"
    name, _, signer = store.install(made["by-a"], origin=origin)
    assert signer == signing.load_public_key(made["a"]).key_id
    row = next(r for r in store.list() if r["name"] == name)
    assert row["origin"] == origin and row["signed_by"] == signer and row["digest"].startswith("sha256:")
    r = CliRunner().invoke(cli, ["list"])
    assert origin in r.output and signer in r.output, r.output


def test_a_pull_with_no_policy_needs_a_signature_and_a_trusted_key(edgemed_home, made):
    with pytest.raises(SignatureError) as exc:
        Store().install(made["by-a"], origin="oci://registry.example/models/tiny:v1")
    assert "No signer is trusted for registry.example/models/tiny" in str(exc.value) and "--key" in exc.value.fix
    _, _, signer = Store().install(made["by-a"], origin="oci://registry.example/models/tiny:v1", public_key=made["a"])
    assert signer  # the operator named the signer for this command


def test_run_applies_the_policy_to_the_installed_copy(home, made):
    _policy(home, '[local]\nkeys = ["keys/a.pub.pem"]\n')
    Store().install(made["by-a"])
    assert runnable("tiny").model_path.is_file()
    shutil.copy(made["b"], home / "keys" / "b.pub.pem")
    _policy(home, '[local]\nkeys = ["keys/b.pub.pem"]\n')  # the clinic stops trusting key a
    with pytest.raises(SignatureError, match="no longer trusts"):
        runnable("tiny")
    _policy(home, '[local]\nkeys = ["keys/a.pub.pem"]\n')
    sig = Store().models / "tiny" / "model.sig"  # the installed signature, swapped for b's over the same files
    sig.chmod(0o644)
    sig.write_bytes((made["by-b"] / "model.sig").read_bytes())
    with pytest.raises(SignatureError):
        runnable("tiny")


def test_a_signature_not_checked_at_install_is_checked_once_the_policy_trusts_its_key(home, made, tmp_path):
    """A model installed while no key applied has no signer on record: its model.sig naming key a (trusted now) with
    signature bytes that are not a's passed verify and run, on the key id the file claims for itself."""
    forged = tmp_path / "forged"
    shutil.copytree(made["by-a"], forged)
    sig = forged / "model.sig"
    sig.chmod(0o644)
    doc = json.loads(sig.read_bytes())
    doc["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(b"x" * 64).decode()
    sig.write_text(json.dumps(doc))
    store = Store()
    store.install(forged, name="forged")  # no trust.toml, no --key: installed with the signature not checked
    store.install(made["by-a"], name="genuine")
    assert store.record("forged")["signer_key"] is None and store.record("forged")["signature_sha256"]
    _policy(home, '[local]\nrequire_signature = true\nkeys = ["keys/a.pub.pem"]\n')
    with pytest.raises(SignatureError) as exc:
        runnable("forged")
    assert "with its signature not checked" in str(exc.value) and "does not verify" in str(exc.value), exc.value
    assert "edgemed install BUNDLE --force" in exc.value.fix and "edgemed verify NAME --key" in exc.value.fix
    out = _refused_cli("verify", "forged")
    assert "does not verify" in out, out
    assert runnable("genuine").model_path.is_file()  # a genuine signature, installed the same way, still runs
    r = CliRunner().invoke(cli, ["verify", "genuine"])
    assert r.exit_code == 0, r.output


def test_run_of_a_bundle_directory_follows_the_local_entry(home, made):
    _policy(home, '[local]\nrequire_signature = true\nkeys = ["keys/a.pub.pem"]\n')
    assert runnable(str(made["by-a"])).model_path.is_file()
    with pytest.raises(SignatureError, match="is not signed"):
        runnable(str(made["unsigned"]))
    with pytest.raises(SignatureError, match="does not trust"):
        runnable(str(made["by-b"]))


@pytest.mark.parametrize("text,why", [
    ("[local\n", "Cannot read the trust policy"),
    ("[remote]\n", "sections edgemed does not know: remote"),
    ('[local]\nkeys = ["keys/absent.pub.pem"]\n', "does not exist"),
    ("[local]\nrequire_signature = \"yes\"\n", "require_signature must be true or false"),
    ('[registries."oci://x/y"]\nkeys = []\n', "is not HOST[:PORT]"),
])
def test_a_bad_policy_file_is_refused_naming_it(home, made, text, why):
    _policy(home, text)
    with pytest.raises(InputError, match="trust.toml|keys"):
        trust.load()
    out = _refused_cli("install", made["by-a"])
    assert why in out, out


def _unreadable(home: Path, what: str) -> None:
    """Put at trust.toml something that is there but cannot be read as a policy."""
    import os

    path = home / "trust.toml"
    path.unlink(missing_ok=True)
    if what == "dangling link":  # config management links it to /etc/..., which is not mounted
        path.symlink_to(home / "gone" / "trust.toml")
    elif what == "folder":
        path.mkdir()
    elif what == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(b"[local]\n" + b"#" * (trust.MAX_POLICY_BYTES + 1))


@pytest.mark.parametrize("what", ["dangling link", "folder", "fifo", "huge"])
def test_a_policy_that_is_there_but_unreadable_fails_closed(home, made, what):
    """Something at trust.toml that cannot be read is not taken for 'no policy' (which would let unsigned bundles
    in, and models whose key was taken out of the policy run again): install and run refuse, naming it."""
    _policy(home, '[local]\nrequire_signature = true\nkeys = ["keys/a.pub.pem"]\n')
    Store().install(made["by-a"])
    _unreadable(home, what)
    out = _refused_cli("install", made["unsigned"])
    assert "Cannot read the trust policy" in out and "trust.toml" in out, out
    with pytest.raises(InputError, match="Cannot read the trust policy"):
        runnable("tiny")
    assert [p.name for p in (home / "store" / "models").iterdir()] == ["tiny"]


@pytest.mark.parametrize("origin,repo", [
    ("oci://127.0.0.1:5000/clinic/smollm2:v2", "127.0.0.1:5000/clinic/smollm2"),
    (f"oci://127.0.0.1:5000/clinic/smollm2@{DIGEST}", "127.0.0.1:5000/clinic/smollm2"),
    ("oci://registry.example/a/b/c", "registry.example/a/b/c"),
    (None, None), ("/tmp/x.edgemed", None),
])
def test_oci_repository(origin, repo):
    assert trust.oci_repository(origin) == repo


def test_the_most_specific_registry_entry_wins(home, made):
    shutil.copy(made["b"], home / "keys" / "b.pub.pem")
    _policy(home, '[registries."127.0.0.1:5000"]\nkeys = ["keys/a.pub.pem"]\n'
                  '[registries."127.0.0.1:5000/radiology"]\nkeys = ["keys/b.pub.pem"]\n')
    p = trust.load()
    assert p.entry_for("oci://127.0.0.1:5000/radiology/ct:v1")[0].where == '[registries."127.0.0.1:5000/radiology"]'
    assert p.entry_for("oci://127.0.0.1:5000/radiologyx/ct:v1")[0].where == '[registries."127.0.0.1:5000"]'
    with pytest.raises(SignatureError, match="does not trust"):
        Store().install(made["by-a"], origin="oci://127.0.0.1:5000/radiology/ct:v1")


def test_run_of_a_signed_model_does_not_import_the_signing_library(home, made):
    """model-signing imports sigstore's network clients (seconds of start-up on a small device): run compares the
    signature file with the digest recorded at install and checks the signer against the policy without it."""
    import os
    import subprocess
    import sys

    _policy(home, '[local]\nkeys = ["keys/a.pub.pem"]\n')
    Store().install(made["by-a"])
    code = ("import sys; from edgemed.packaging.ref import runnable; runnable('tiny'); "
            "assert 'model_signing' not in sys.modules, 'imported'")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=os.environ, timeout=120)
    assert r.returncode == 0, r.stderr


def test_a_signer_trusted_for_one_repository_cannot_replace_another_repositorys_model(home, made):
    """`[registries."H/models"]` trusts a, `[registries."H/radiology"]` trusts b: a bundle b signed under the same name
    in radiology replaced the model pulled from models, and run then loaded it (judged by its new origin)."""
    shutil.copy(made["b"], home / "keys" / "b.pub.pem")
    _policy(home, '[registries."127.0.0.1:5000/models"]\nkeys = ["keys/a.pub.pem"]\n'
                  '[registries."127.0.0.1:5000/radiology"]\nkeys = ["keys/b.pub.pem"]\n')
    store = Store()
    models = f"oci://127.0.0.1:5000/models/tiny@{DIGEST}"
    store.install(made["by-a"], origin=models)
    before = store.record("tiny")
    with pytest.raises(SignatureError) as exc:
        store.install(made["by-b"], origin=f"oci://127.0.0.1:5000/radiology/ct@{DIGEST}", force=True)
    b_id, a_id = (signing.load_public_key(made[k]).key_id for k in "ba")
    msg = str(exc.value)
    assert f"installed from {models}, signed by key {a_id}" in msg and f"signed by key {b_id}" in msg, msg
    assert "--allow-signer-change" in exc.value.fix and "--name" in exc.value.fix
    assert store.record("tiny") == before  # nothing was replaced
    store.install(made["by-a"], origin="oci://127.0.0.1:5000/models/tiny:v2", force=True)  # its own signer: an update
    # a key rotation made in trust.toml for the installed origin is an update too
    _policy(home, '[registries."127.0.0.1:5000/models"]\nkeys = ["keys/a.pub.pem", "keys/b.pub.pem"]\n')
    _, _, signer = store.install(made["by-b"], origin="oci://127.0.0.1:5000/models/tiny:v3", force=True)
    assert signer == b_id


def test_with_no_policy_a_signed_model_is_replaced_only_by_its_signer(edgemed_home, made):
    """Without trust.toml, `install --force` of an unsigned bundle, or one another key signed, replaced a model that
    was installed with its signature checked, silently. Its own signer's update needs no --key (the key recorded at
    install checks it); a change of maker needs --allow-signer-change."""
    assert CliRunner().invoke(cli, ["install", str(made["by-a"]), "--key", str(made["a"])]).exit_code == 0
    out = _refused_cli("install", made["unsigned"], "--force")
    assert "is not signed" in out and "--allow-signer-change" in out, out
    out = _refused_cli("install", made["by-b"], "--force", "--key", made["b"])
    assert "An installed model is replaced only by a bundle from its own signer" in out, out
    assert Store().record("tiny")["signed_by"] == signing.load_public_key(made["a"]).key_id
    r = CliRunner().invoke(cli, ["install", str(made["by-a"]), "--force"])
    a_id = signing.load_public_key(made["a"]).key_id
    assert r.exit_code == 0 and f"signature valid (key {a_id})" in r.output, r.output
    rec = Store().record("tiny")  # the update keeps its signer on record, so the next update is held to it too
    assert rec["signed_by"] == a_id and rec["signer_key"], rec
    out = _refused_cli("install", made["by-b"], "--force", "--key", made["b"])
    assert "An installed model is replaced only by a bundle from its own signer" in out, out
    r = CliRunner().invoke(cli, ["install", str(made["unsigned"]), "--force", "--allow-signer-change"])
    assert r.exit_code == 0 and Store().record("tiny")["signed_by"] is None, r.output


def test_key_on_the_command_line_must_also_be_trusted_by_an_existing_policy(home, made):
    """`install --key b.pub.pem` where trust.toml trusts only a installed the model (and replaced a working version),
    and run then refused it; now the install is refused, before anything is stored."""
    _policy(home, '[local]\nrequire_signature = true\nkeys = ["keys/a.pub.pem"]\n')
    out = _refused_cli("install", made["by-b"], "--key", made["b"])
    assert "does not trust" in out, out
    assert _nothing_installed(home)
    assert CliRunner().invoke(cli, ["install", str(made["by-a"]), "--key", str(made["a"])]).exit_code == 0


def _without_hint(src: Path, dst: Path) -> Path:
    """A copy of the bundle ``src`` whose model.sig names no key, as older model-signing versions wrote it (the hint
    is not signed: anyone can remove it without breaking the signature)."""
    shutil.copytree(src, dst)
    sig = dst / "model.sig"
    doc = json.loads(sig.read_bytes())
    del doc["verificationMaterial"]["publicKey"]["hint"]
    sig.chmod(0o644)
    sig.write_text(json.dumps(doc))
    return dst


def test_a_signature_that_names_no_key_is_judged_by_the_signature(home, made, tmp_path, caplog):
    """Without a key hint the library printed a WARNING line on stdout (so `verify --json` was not JSON), and a
    trust.toml listing the signer's key refused the bundle as 'signed by key None'. The signature decides: each key the
    entry trusts is tried, and the one that made it is the signer."""
    by_a, by_b = _without_hint(made["by-a"], tmp_path / "a"), _without_hint(made["by-b"], tmp_path / "b")
    a_id = signing.load_public_key(made["a"]).key_id
    with caplog.at_level("WARNING"):
        r = CliRunner().invoke(cli, ["verify", str(by_a), "--key", str(made["a"]), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["signed_by"] == a_id, r.stdout  # stdout is the one JSON document
    assert any("names no key" in rec.getMessage() and "re-sign" in rec.getMessage().lower() for rec in caplog.records)
    r = CliRunner().invoke(cli, ["install", str(by_a), "--name", "unchecked"])  # no policy yet: not checked
    assert r.exit_code == 0 and "signature not checked" in r.output, r.output
    _policy(home, '[local]\nrequire_signature = true\nkeys = ["keys/a.pub.pem"]\n')
    r = CliRunner().invoke(cli, ["install", str(by_a)])
    assert r.exit_code == 0 and f"signature valid (key {a_id})" in r.output, r.output
    assert runnable("tiny").model_path.is_file() and runnable("unchecked").model_path.is_file()
    out = _refused_cli("install", by_b, "--name", "other")
    assert "names no key" in out and "none of the keys the trust policy trusts" in out and a_id in out, out
    assert {p.name for p in (home / "store" / "models").iterdir()} == {"tiny", "unchecked"}
    shutil.copy(made["b"], home / "keys" / "b.pub.pem")
    _policy(home, '[local]\nrequire_signature = true\nkeys = ["keys/b.pub.pem"]\n')  # the clinic stops trusting key a
    with pytest.raises(SignatureError, match="no longer trusts"):
        runnable("tiny")
    with pytest.raises(SignatureError, match="names no key"):
        runnable("unchecked")


def test_another_threads_output_during_a_verification_reaches_stdout(made, tmp_path, capsys, caplog, monkeypatch):
    """The library's WARNING (a model.sig without a key hint) was kept off stdout by swapping sys.stdout for the whole
    process while it verified: `edgemed serve` verifies an installed adapter bundle on a worker thread, and another
    thread's output in that window went into the log. Only the library's own print is taken now."""
    import threading

    from edgemed.packaging.bundle import read_manifest

    man, data, sig = read_manifest(_without_hint(made["by-a"], tmp_path / "a"))
    real = signing._use_key

    def use_while_another_thread_prints(config, folder):  # called inside the verification
        other = threading.Thread(target=print, args=("the server's own line",))
        other.start()
        other.join()
        real(config, folder)

    monkeypatch.setattr(signing, "_use_key", use_while_another_thread_prints)
    with caplog.at_level("INFO", logger="edgemed.packaging.signing"):
        assert signing.verify(sig, man, data, signing.load_public_key(made["a"])) == signing.load_public_key(made["a"]).key_id
    out = capsys.readouterr().out
    assert "the server's own line" in out and "WARNING" not in out, out
    assert any(r.getMessage().startswith("model-signing printed: WARNING") for r in caplog.records), caplog.records
    assert not any("the server's own line" in r.getMessage() for r in caplog.records)


def test_inspect_of_a_signature_that_names_no_key_says_so(home, made, tmp_path):
    """inspect printed 'signed by key None' for a model.sig without a key hint: it says what is known instead."""
    by_a = _without_hint(made["by-a"], tmp_path / "a")
    for bundle in (by_a, made["by-a"]):
        r = CliRunner().invoke(cli, ["inspect", str(bundle)])
        assert r.exit_code == 0 and "None" not in r.output.splitlines()[0], r.output
    r = CliRunner().invoke(cli, ["inspect", str(by_a)])
    assert "signed (model.sig names no key; verify with --key or a trust policy)" in r.output.splitlines()[0], r.output
    r = CliRunner().invoke(cli, ["inspect", str(made["by-a"])])
    assert f"signed by key {signing.load_public_key(made['a']).key_id}" in r.output.splitlines()[0], r.output
    r = CliRunner().invoke(cli, ["inspect", str(by_a), "--json"])
    assert json.loads(r.output)["bundle"]["signature"] == {"present": True, "key_id": None, "file": "model.sig"}, r.output


def test_export_of_a_bundle_folder_obeys_the_policy(home, made, tmp_path):
    """`run ./dir` and `install ./dir` obeyed `[local] require_signature = true`, but `export ./dir` handed the GGUF of
    an unsigned (or untrusted) folder to another runtime. Every input export reads now passes the policy: a folder as
    run judges it, an installed name as run judges the installed copy; a .edgemed file must be installed first."""
    _policy(home, '[local]\nrequire_signature = true\nkeys = ["keys/a.pub.pem"]\n')
    out = tmp_path / "out"
    out.mkdir()
    for folder, why in ((made["unsigned"], "is not signed"), (made["by-b"], "does not trust")):
        for option in (["--gguf", out / "m.gguf"], ["--ollama", out / "ollama"], ["--llama-server"]):
            assert why in _refused_cli("export", folder, *option)
    assert not any(out.iterdir())
    r = CliRunner().invoke(cli, ["export", str(made["by-a"]), "--gguf", str(out / "m.gguf")])  # a trusted signer
    assert r.exit_code == 0 and (out / "m.gguf").is_file(), r.output
    Store().install(made["by-a"])  # an installed name: the policy of today, as run applies it
    assert CliRunner().invoke(cli, ["export", "tiny", "--llama-server"]).exit_code == 0
    shutil.copy(made["b"], home / "keys" / "b.pub.pem")
    _policy(home, '[local]\nrequire_signature = true\nkeys = ["keys/b.pub.pem"]\n')
    assert "no longer trusts" in _refused_cli("export", "tiny", "--gguf", out / "again.gguf")
    assert not (out / "again.gguf").exists()
    tar = tmp_path / "tiny.edgemed"  # an archive: never exported as it is
    pack(PackInputs(model=made["by-a"] / "model" / "tiny.gguf", license=made["by-a"] / "LICENSE", name="tiny"), tar)
    assert "install it first" in _refused_cli("export", tar, "--gguf", out / "tar.gguf")
