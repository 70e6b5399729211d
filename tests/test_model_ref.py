"""One answer to "what does this MODEL argument name?" (edgemed/packaging/ref.py) and one format sniffer."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("gguf")

import bundle_kit as kit  # noqa: E402
from edgemed.errors import InputError, StoreError  # noqa: E402
from edgemed.formats.sniff import model_format, sniff  # noqa: E402
from edgemed.packaging import digest  # noqa: E402
from edgemed.packaging.bundle import PackInputs, pack  # noqa: E402
from edgemed.packaging.ref import DIRECTORY, FILE, STORE, TAR, bundle_ref, resolve, runnable, with_digest  # noqa: E402
from edgemed.packaging.store import Store  # noqa: E402


@pytest.fixture
def made(tmp_path) -> dict:
    src = kit.inputs(tmp_path / "src")
    inp = PackInputs(model=src["model"], license=src["license"], card=src["card"], name="cardio")
    pack(inp, tmp_path / "cardio.dir", as_dir=True)
    pack(inp, tmp_path / "cardio.edgemed")
    Store().install(tmp_path / "cardio.dir")
    return {"gguf": src["model"], "dir": tmp_path / "cardio.dir", "tar": tmp_path / "cardio.edgemed"}


def test_every_kind_of_argument(made, tmp_path):
    assert (resolve(made["gguf"]).kind, resolve(made["gguf"]).name) == (FILE, "tiny")
    assert resolve(made["dir"]).kind == DIRECTORY and resolve(made["tar"]).kind == TAR
    assert resolve("cardio").kind == STORE and resolve("cardio").source == "cardio"
    for missing in (tmp_path / "gone.gguf", "sub/gone", "gone.edgemed"):
        assert resolve(missing).kind == FILE  # a path that is not there: the loader names the fix


def test_runnable_verifies_bundles_and_knows_their_digest(made):
    by_dir, by_name, plain = runnable(made["dir"]), runnable("cardio"), runnable(made["gguf"])
    assert by_dir.name == by_name.name == "cardio" and by_dir.digest == by_name.digest
    assert by_dir.digest.startswith("manifest:sha256:") and by_dir.model_path.name == "tiny.gguf"
    assert by_name.model_path.is_file() and by_name.path == Store().models / "cardio"
    assert plain.model_path == made["gguf"] and plain.digest is None
    with pytest.raises(InputError, match="must be installed before it runs"):
        runnable(made["tar"])
    with pytest.raises(StoreError, match="No model named 'nobody'"):
        runnable("nobody")


def test_bundle_ref_refuses_what_is_not_a_bundle(made, tmp_path):
    with pytest.raises(InputError, match="is not a bundle"):
        bundle_ref(made["gguf"])
    with pytest.raises(InputError, match="does not exist"):
        bundle_ref(tmp_path / "gone.edgemed")
    assert bundle_ref("cardio").target == "cardio" and bundle_ref(made["tar"]).target == made["tar"]


def test_a_plain_gguf_is_hashed_once_then_read_from_the_verified_cache(made, monkeypatch):
    monkeypatch.setattr(digest, "RACY_S", -1e9)  # the file was written just now; trust its stamp anyway
    calls = []
    real = digest.file_sha256
    monkeypatch.setattr(digest, "file_sha256", lambda p: calls.append(p) or real(p))
    first = with_digest(runnable(made["gguf"]))
    second = with_digest(runnable(made["gguf"]))
    assert first.digest == second.digest == "file:sha256:" + real(made["gguf"]) and len(calls) == 1
    data = made["gguf"].read_bytes()
    made["gguf"].write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # changed: hashed again
    assert with_digest(runnable(made["gguf"])).digest != first.digest and len(calls) == 2


def test_one_sniffer(made, tmp_path):
    onnx_dir = tmp_path / "o"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"x")
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04")
    assert (sniff(made["gguf"]), sniff(onnx_dir), sniff(tmp_path / "not.gguf"), sniff(tmp_path / "none")) == ("gguf", "onnx", None, None)
    with pytest.raises(InputError, match="not a GGUF file"):
        model_format(tmp_path / "not.gguf")
    with pytest.raises(InputError, match="does not exist"):
        model_format(Path(tmp_path / "none"))
    from edgemed.runtime import engine, session

    assert engine.model_format is session.model_format is model_format


def test_what_loads_must_still_be_what_was_verified(made, tmp_path):
    """``loaded_as_verified`` after the load: the stamps of the files that loaded (the model's) are compared again, so
    a model file replaced or written between verification and load (the engine would hold bytes nobody checked) is
    refused, naming the file and the command that checks it; an untouched bundle, installed or as a directory,
    passes, and so does one whose file only gained a hard link (another install sharing the blob moves its ctime:
    hashed again, the same bytes)."""
    import os

    from edgemed.errors import IntegrityError
    from edgemed.packaging.ref import loaded_as_verified

    for arg in ("cardio", made["dir"]):
        ref = runnable(arg)
        assert {Path(p).name for p, _ in ref.stamps} >= {"tiny.gguf", "LICENSE"}
        loaded_as_verified(ref)
    installed = runnable("cardio")
    os.link(installed.model_path, tmp_path / "another-name")  # a second bundle linking the same blob: ctime moves
    loaded_as_verified(installed)
    license_file = next(Path(p) for p, _ in installed.stamps if Path(p).name == "LICENSE")
    license_file.chmod(0o644)
    license_file.write_text("another licence\n")  # a file that does not load is not compared (verify sees it)
    loaded_as_verified(installed)
    other = kit.tiny_gguf(tmp_path / "other.gguf", n_layers=3)
    os.replace(other, installed.model_path)  # replaced: another inode
    with pytest.raises(IntegrityError, match="changed between its verification and its load") as err:
        loaded_as_verified(installed)
    assert str(installed.model_path) in err.value.problem and "edgemed verify cardio --full" in err.value.fix

    by_dir = runnable(made["dir"])
    model = by_dir.model_path
    data = model.read_bytes()
    before = model.stat()
    model.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # the same size, other bytes ...
    os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))  # ... and the mtime put back: only ctime moved
    with pytest.raises(IntegrityError, match=str(model)) as err:
        loaded_as_verified(by_dir)
    assert f"edgemed verify {made['dir']} --full" in err.value.fix


def test_a_plain_file_named_by_its_digest_and_an_installed_adapter_are_checked_too(made, tmp_path):
    """``with_digest`` (serve's audit identity) vouches for the stamp the file had before it was hashed; an adapter
    spec that carries how it was verified is checked the same way; a spec without one (a file given as it is) is
    not."""
    import os

    from edgemed.errors import IntegrityError
    from edgemed.files.hashing import file_sha256
    from edgemed.packaging.ref import Vouched, loaded_as_verified
    from edgemed.runtime.loader import AdapterSpec

    plain = with_digest(runnable(made["gguf"]))
    loaded_as_verified(plain)
    with open(made["gguf"], "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match="changed between its verification and its load") as err:
        loaded_as_verified(plain)
    assert "hashed again at start" in err.value.fix
    lora = kit.tiny_gguf(tmp_path / "a.lora.gguf")
    spec = AdapterSpec(lora, 1.0, stamp=Vouched(digest.stamp(os.stat(lora)), file_sha256(lora), "cardio-lora"))
    loaded_as_verified(None, [spec, AdapterSpec(made["gguf"])])
    os.replace(kit.tiny_gguf(tmp_path / "b.gguf", n_layers=3), lora)
    with pytest.raises(IntegrityError, match="a.lora.gguf") as err:
        loaded_as_verified(None, [spec])
    assert "edgemed verify cardio-lora --full" in err.value.fix


def test_serve_checks_the_loaded_model_and_hands_the_app_the_adapter_check(made, tmp_path, monkeypatch):
    """`edgemed serve NAME`: the installed file replaced while the batcher loads is refused before anything is served
    (the batcher closed); loaded untouched, the app gets the check an adapter added while serving must pass."""
    pytest.importorskip("uvicorn")
    import os

    from click.testing import CliRunner

    from edgemed.cli import cli
    from edgemed.errors import EdgemedError, IntegrityError
    from edgemed.runtime.batch import batcher as batcher_module
    from edgemed.runtime.loader import AdapterSpec
    from edgemed.serve import app as app_module

    installed = runnable("cardio").model_path
    events, configs = [], []

    class FakeBatcher:  # what serve drives: start loads, close frees
        def __init__(self, *args, **kwargs):
            self.swap = kwargs.get("slots") == 2

        def start(self):
            events.append("start")
            if self.swap:
                os.replace(kit.tiny_gguf(tmp_path / "other.gguf", n_layers=3), installed)

        def close(self):
            events.append("close")

    class Stop(EdgemedError):
        pass

    def fake_app(batcher, config, templates):
        configs.append(config)
        raise Stop("stopped before serving", "this is a test")

    monkeypatch.setattr(batcher_module, "Batcher", FakeBatcher)
    monkeypatch.setattr(app_module, "create_app", fake_app)
    args = ["serve", "cardio", "--port", "0", "--threads", "1", "--ctx", "256"]
    result = CliRunner().invoke(cli, [*args, "--slots", "1"])
    assert "stopped before serving" in result.output, result.output
    check = configs[0].loaded_adapter
    spec = AdapterSpec(installed, 1.0, stamp=dict(runnable("cardio").stamps)[installed])  # as adapter_specs gives it
    check(spec)  # the same file: passes
    result = CliRunner().invoke(cli, [*args, "--slots", "2"])
    assert result.exit_code != 0 and "changed between its verification and its load" in result.output, result.output
    assert events == ["start", "close", "start", "close"] and len(configs) == 1  # refused before the app was made
    with pytest.raises(IntegrityError):
        check(spec)  # the file the spec was verified as is gone


def test_adapters_come_from_the_manifest_that_was_verified(made, tmp_path):
    """adapters() read manifest.json again after runnable verified the bundle: an adapter listed only in a manifest
    written since was handed out with no stamp, and the check after the load passed over it."""
    import hashlib
    import json

    from edgemed.errors import IntegrityError
    from edgemed.packaging.ref import adapter_specs, adapters, loaded_as_verified

    ref = runnable(made["dir"])
    assert adapters(ref) == {}  # the manifest it verified: no adapters
    lora = kit.tiny_gguf(tmp_path / "x.lora.gguf").read_bytes()
    man_path = made["dir"] / "manifest.json"
    man = json.loads(man_path.read_bytes())
    man["files"].append({"path": "adapters/x.lora.gguf", "size": len(lora), "sha256": hashlib.sha256(lora).hexdigest(),
                         "role": "adapter"})
    man["adapters"] = [{"name": "x", "path": "adapters/x.lora.gguf", "size": len(lora), "sha256": hashlib.sha256(lora).hexdigest(),
                        "base_source_sha256": man["provenance"].get("source_sha256") or "ab" * 32}]
    (made["dir"] / "adapters").mkdir()
    (made["dir"] / "adapters" / "x.lora.gguf").write_bytes(lora)
    man_path.chmod(0o644)
    man_path.write_text(json.dumps(man))
    with pytest.raises(IntegrityError, match="changed since the bundle was verified") as err:
        specs = adapter_specs(ref, ["x"])
        loaded_as_verified(ref, specs)  # before: passed, the adapter's stamp None
    assert f"edgemed verify {made['dir']} --full" in err.value.fix
    from dataclasses import replace

    forged = replace(ref, digest="manifest:sha256:" + hashlib.sha256(man_path.read_bytes()).hexdigest())
    with pytest.raises(IntegrityError, match="is not among the files verified with 'cardio'"):
        adapter_specs(forged, ["x"])  # and an own adapter without a stamp is never handed out unchecked
