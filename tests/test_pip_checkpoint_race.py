"""Two runs that need the same pip model's checkpoint at once (two quickstarts on a fresh cache) both dequantize it;
the one that finishes second used to refuse the folder the first had just put in place ("move that directory away
yourself"). It uses that folder now, when edgemed made it and it is complete; anything else there is still refused
and left alone. The race is played in order: the second run starts and finishes while the first one writes."""

from __future__ import annotations

import json

import pytest

from edgemed.errors import OutputExists


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """``hf_checkpoint('x')`` with the GGUF lookup and the dequantization (torch, transformers) stood in for."""
    from edgemed.converters.source import pip_models

    monkeypatch.setenv("EDGEMED_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(pip_models, "gguf_file", lambda name: tmp_path / f"{name}.gguf")
    runs: list = []

    def dequantize(source, tmp):
        runs.append(tmp)
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps({"run": len(runs)}))
        (tmp / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(pip_models, "_dequantize", dequantize)
    return pip_models, runs, tmp_path / "cache" / "checkpoints" / "x"


def test_the_run_that_finishes_second_uses_the_checkpoint_the_first_put_in_place(fake_model, monkeypatch):
    pip_models, runs, out = fake_model
    plain = pip_models._dequantize

    def first_run(source, tmp):
        plain(source, tmp)
        monkeypatch.setattr(pip_models, "_dequantize", plain)
        assert pip_models.hf_checkpoint("x") == out  # the other run, start to finish, while this one writes

    monkeypatch.setattr(pip_models, "_dequantize", first_run)
    assert pip_models.hf_checkpoint("x") == out
    assert len(runs) == 2 and json.loads((out / "config.json").read_text()) == {"run": 2}  # the first placed is kept
    assert sorted(p.name for p in out.parent.iterdir()) == ["x"]  # the loser's copy is discarded, no debris
    assert pip_models.hf_checkpoint("x") == out and len(runs) == 2  # and then it is the cache


def test_a_folder_edgemed_did_not_make_is_still_refused_and_left_alone(fake_model):
    pip_models, runs, out = fake_model
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("the user's\n")
    with pytest.raises(OutputExists):
        pip_models.hf_checkpoint("x")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "the user's\n"
    assert runs == [] and sorted(p.name for p in out.parent.iterdir()) == ["x"]
