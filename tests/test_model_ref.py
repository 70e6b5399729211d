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
