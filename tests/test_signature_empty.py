"""An empty (or whitespace-only) signature file (``model.sig``, or an older edgemed's ``manifest.sig``) is a
malformed signature: every command that reads the bundle (inspect, verify with and without --key, install)
refuses it, for a directory and a tar alike, with the same answer as any other malformed signature file, and
installs nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import bundle_kit as kit
from edgemed.cli import cli
from edgemed.errors import SignatureError
from edgemed.packaging.bundle import PackInputs, pack

MALFORMED = "{file} is malformed"
FILES = ("model.sig", "manifest.sig")
SIGNATURES = {"empty": b"", "blank": b"   ", "whitespace": b"\n\t \r\n", "garbage": b"not a signature"}


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A directory bundle and a key pair, made once (the tars and copies are made per test)."""
    tmp = tmp_path_factory.mktemp("sig")
    inp = kit.inputs(tmp / "in")
    pack(PackInputs(model=inp["model"], license=inp["license"], card=inp["card"], name="tiny"), tmp / "b", as_dir=True)
    _, pub = kit.keypair(tmp)
    return tmp / "b", pub


def _bundle(packed, tmp_path: Path, form: str, sig: bytes, file: str = "model.sig") -> Path:
    import shutil

    from edgemed.packaging.archive import write_tar
    from edgemed.packaging.manifest import Manifest
    from edgemed.packaging.signing import Signature

    src, _ = packed
    tmp_path.mkdir(parents=True, exist_ok=True)
    if form == "directory":
        out = tmp_path / "b"
        shutil.copytree(src, out)
        (out / file).write_bytes(sig)
        return out
    data = (src / "manifest.json").read_bytes()
    man = Manifest.from_bytes(data, str(src))
    out = tmp_path / "b.edgemed"
    write_tar(out, data, Signature(file, sig), [(src / f.path, f) for f in man.files], int(time.time()))
    return out


def _refused(file, *args) -> str:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 1, (args, r.exit_code, r.output)
    assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output, r.output
    assert MALFORMED.format(file=file) in r.output and "get a fresh copy" in r.output, r.output
    if "--json" in args:  # the same refusal, as the one JSON document on stdout
        assert json.loads(r.stdout)["problem"].startswith(MALFORMED.format(file=file)), r.stdout
    return r.stderr


@pytest.mark.parametrize("file", FILES)
@pytest.mark.parametrize("form", ["directory", "tar"])
@pytest.mark.parametrize("sig", sorted(SIGNATURES))
def test_every_command_refuses_a_malformed_signature(packed, tmp_path, edgemed_home, form, sig, file):
    bundle = _bundle(packed, tmp_path, form, SIGNATURES[sig], file)
    _, pub = packed
    outputs = {_refused(file, "inspect", bundle), _refused(file, "inspect", bundle, "--json"), _refused(file, "verify", bundle),
               _refused(file, "verify", bundle, "--key", pub), _refused(file, "install", bundle),
               _refused(file, "install", bundle, "--key", pub)}
    assert len(outputs) == 1  # one answer, whichever command read the file
    assert not (edgemed_home / "models" / "tiny").exists()


@pytest.mark.parametrize("form", ["directory", "tar"])
def test_readers_refuse_an_empty_signature_and_read_a_well_formed_one(packed, tmp_path, form):
    """The check is on form only: an empty file is refused by every reader, a real signature reads as before."""
    from edgemed.packaging import signing
    from edgemed.packaging.archive import hash_sink, peek_tar, read_tar
    from edgemed.packaging.bundle import read_manifest, verify_dir

    src, pub = packed
    readers = [read_manifest, verify_dir] if form == "directory" else [peek_tar, lambda p: read_tar(p, hash_sink)]
    empty = _bundle(packed, tmp_path / "empty", form, b"")
    for read in readers:
        with pytest.raises(SignatureError, match=MALFORMED.format(file="model.sig")):
            read(empty)
    from edgemed.packaging.manifest import Manifest

    data = (src / "manifest.json").read_bytes()
    good = signing.sign(Manifest.from_bytes(data), data, signing.load_private_key(pub.with_name("key.pem")))
    signed = _bundle(packed, tmp_path / "signed", form, good.data)
    for read in readers:
        result = read(signed)
        assert result.has_signature if read is verify_dir else result[2] == good
    r = CliRunner().invoke(cli, ["verify", str(signed), "--key", str(pub)])
    assert r.exit_code == 0 and "signature valid" in r.output, r.output
    r = CliRunner().invoke(cli, ["inspect", str(src), "--json"])  # unsigned: no signature file at all
    assert r.exit_code == 0 and json.loads(r.output)["bundle"]["signature"]["present"] is False


def _with_predicate(data: bytes, **fields) -> bytes:
    """model.sig ``data`` with its statement's predicate fields replaced (the envelope's signature no longer matches,
    but the file is read, and must be refused, before any signature check)."""
    import base64

    doc = json.loads(data)
    st = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    st["predicate"].update(fields)
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
    return json.dumps(doc).encode()


PREDICATES = {
    "serialization string": {"serialization": "files"},
    "serialization list": {"serialization": ["files", "sha256"]},
    "resources string": {"resources": "model/tiny.gguf"},
    "resources object": {"resources": {"name": "model/tiny.gguf"}},
    "resource not an object": {"resources": ["model/tiny.gguf"]},
    "resource name a list": {"resources": [{"name": ["LICENSE"], "algorithm": "sha256", "digest": "00"}]},
    "resource digest missing": {"resources": [{"name": "LICENSE", "algorithm": "sha256"}]},
}


@pytest.mark.parametrize("form", ["directory", "tar"])
@pytest.mark.parametrize("case", sorted(PREDICATES))
def test_a_statement_of_the_wrong_shape_is_malformed_not_a_traceback(packed, tmp_path, edgemed_home, form, case):
    """A predicate whose serialization or resources are not what the format says (a string, a list, an entry that is
    not an object) crashed verify --key and install with AttributeError; now every reader refuses it as malformed."""
    from edgemed.packaging import signing
    from edgemed.packaging.manifest import Manifest

    src, pub = packed
    data = (src / "manifest.json").read_bytes()
    good = signing.sign(Manifest.from_bytes(data), data, signing.load_private_key(pub.with_name("key.pem")))
    bundle = _bundle(packed, tmp_path, form, _with_predicate(good.data, **PREDICATES[case]))
    outputs = {_refused("model.sig", "inspect", bundle), _refused("model.sig", "verify", bundle, "--key", pub),
               _refused("model.sig", "verify", bundle, "--key", pub, "--json"), _refused("model.sig", "install", bundle),
               _refused("model.sig", "install", bundle, "--key", pub)}
    assert len(outputs) == 1, outputs
    assert not (edgemed_home / "store" / "models" / "tiny").exists()
