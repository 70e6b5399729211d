"""Which pickle files a checkpoint is read from: the ones Hugging Face loading reads as weights, and no other.

That is ``pytorch_model.bin``, else exactly the shards ``pytorch_model.bin.index.json`` lists. A stale earlier save
or stale shards beside them, and a Trainer's training state (``optimizer.pt``, ``rng_state.pth``, ``scheduler.pt``,
``training_args.bin``), are never unpickled, so the GGUF route, the parity reference and the ONNX route (which loads
with ``from_pretrained``) all read the same weights. A tensor in two of the files read is refused, naming both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

import tiny  # noqa: E402
from edgemed.cli import cli  # noqa: E402
from edgemed.errors import CheckpointError  # noqa: E402

TRAINING_STATE = ("optimizer.pt", "rng_state.pth", "scheduler.pt", "training_args.bin")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny.build_model(tmp_path_factory.mktemp("pickle-files").resolve() / "llama")


@pytest.fixture(scope="module")
def state(model) -> dict:
    """The tiny model's weights (name -> tensor)."""
    from safetensors.torch import load_file

    return load_file(model / "model.safetensors")


def _other(state: dict, seed: int) -> dict:
    """Another model of the same names and shapes."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in state.items()}


def _folder(model: Path, dest: Path, files: dict) -> Path:
    """The tiny checkpoint's config and tokenizer in ``dest``, with ``files`` (name -> object) saved by torch."""
    import torch

    shutil.copytree(model, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    for name, obj in files.items():
        torch.save(obj, dest / name)
    return dest


def _halves(state: dict, prefix: str = "pytorch_model") -> dict:
    names = sorted(state)
    return {f"{prefix}-00001-of-00002.bin": {k: state[k] for k in names[:len(names) // 2]},
            f"{prefix}-00002-of-00002.bin": {k: state[k] for k in names[len(names) // 2:]}}


def _index(ckpt: Path, shards: dict) -> None:
    weight_map = {k: file for file, part in shards.items() for k in part}
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The names of the files torch.load is called on."""
    import torch

    seen: list[str] = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: seen.append(Path(f).name) or real(f, *a, **k))
    return seen


def _read_back(ckpt) -> dict:
    return {name: t.clone() for name, t in ckpt.iter_tensors()}


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stale_save_beside_pytorch_model_bin_is_never_read(model, state, loads, tmp_path):
    """pytorch_model_v0.bin (another model, the same names) sorted last and won: every tensor came from it."""
    from gguf import GGUFReader

    from edgemed.converters.source.checkpoint import Checkpoint

    ckpt = _folder(model, tmp_path / "stale", {"pytorch_model.bin": state, "pytorch_model_v0.bin": _other(state, 1),
                                               "model.pt": _other(state, 2)})
    opened = Checkpoint.open(ckpt, allow_pickle=True)
    assert opened.pickle_files == [ckpt / "pytorch_model.bin"]
    assert _same(_read_back(opened), state)
    hf = opened.hf_model().state_dict()  # the ONNX route's load: the same weights
    assert all(hf[k].equal(v) for k, v in state.items())
    assert set(loads) == {"pytorch_model.bin"}
    out = tmp_path / "stale.gguf"
    r = CliRunner().invoke(cli, ["convert", str(ckpt), "--allow-pickle", "--quant", "f32", "--no-parity", "-o", str(out)])
    assert r.exit_code == 0, r.output
    embd = next(t for t in GGUFReader(out).tensors if t.name == "token_embd.weight")
    want = state["model.embed_tokens.weight"].numpy()
    assert (embd.data.reshape(want.shape) == want).all()


def test_stale_shards_beside_the_indexed_ones_are_never_read(model, state, loads, tmp_path):
    """Shards of another shard count sorted after the listed ones and silently replaced their tensors."""
    from edgemed.converters.source.checkpoint import Checkpoint

    names = sorted(state)
    stale, third = _other(state, 3), len(names) // 3
    old = {f"pytorch_model-0000{i + 1}-of-00003.bin": {k: stale[k] for k in names[i * third:(i + 1) * third or None]}
           for i in range(3)}
    shards = _halves(state)
    ckpt = _folder(model, tmp_path / "stale-shards", shards | old)
    _index(ckpt, shards)
    opened = Checkpoint.open(ckpt, allow_pickle=True)
    assert opened.pickle_files == [ckpt / name for name in sorted(shards)]
    assert _same(_read_back(opened), state)
    assert set(loads) == set(shards)
    opened.hf_model()  # the ONNX route loads the same shards


@pytest.mark.parametrize("case", ["no weight_map", "a path", "missing shard", "in two shards"])
def test_the_pickle_index_is_checked_as_the_safetensors_index_is(model, state, loads, tmp_path, case):
    """The pickle index was never read: every pytorch_model*.bin was indexed, a tensor in two shards from the last."""
    from edgemed.converters.source.checkpoint import Checkpoint

    shards = _halves(state)
    first, second = sorted(shards)
    if case == "in two shards":  # both listed shards hold the head, the second another one
        name = "lm_head.weight"
        owner = first if name in shards[first] else second
        other = second if owner == first else first
        shards[other] = shards[other] | {name: _other(state, 4)[name]}
    ckpt = _folder(model, tmp_path / "index", shards)
    _index(ckpt, shards)
    index = ckpt / "pytorch_model.bin.index.json"
    doc = json.loads(index.read_text())
    if case == "no weight_map":
        index.write_text(json.dumps({"metadata": {}}))
        words, fix = "has no weight_map", "re-copy the index"
    elif case == "a path":
        doc["weight_map"][next(iter(doc["weight_map"]))] = "../" + first
        index.write_text(json.dumps(doc))
        words, fix = "which is not a file name in", "re-copy the index"
    elif case == "missing shard":
        (ckpt / second).unlink()
        words, fix = f"{second} listed in pytorch_model.bin.index.json are missing", "copy every shard"
    else:
        words, fix = f"'lm_head.weight' is in both '{first}' and '{second}'", "each tensor is in one shard"
    with pytest.raises(CheckpointError, match=words) as e:
        Checkpoint.open(ckpt, allow_pickle=True)
    assert fix in e.value.fix
    assert loads == ([] if case != "in two shards" else [first, second])


def test_a_trainer_checkpoint_reads_its_weights_and_never_its_training_state(model, state, loads, tmp_path):
    """optimizer.pt, rng_state.pth, scheduler.pt were unpickled as weights and refused as "not a state dict"."""
    import torch

    from edgemed.converters.source.checkpoint import Checkpoint, pickle_refused

    training = {"optimizer.pt": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "rng_state.pth": {"cpu": torch.zeros(4)},
                "scheduler.pt": {"last_epoch": 3}, "training_args.bin": {"learning_rate": 1e-4}}
    ckpt = _folder(model, tmp_path / "checkpoint-500", {"pytorch_model.bin": state} | training)
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(ckpt)  # without consent: the refusal names the weights only
    assert str(e.value) == str(pickle_refused(ckpt, [ckpt / "pytorch_model.bin"]))
    opened = Checkpoint.open(ckpt, allow_pickle=True)
    assert opened.pickle_files == [ckpt / "pytorch_model.bin"] and _same(_read_back(opened), state)
    assert set(loads) == {"pytorch_model.bin"}
    assert opened.weight_files() == [ckpt / "pytorch_model.bin"]  # what the provenance digest hashes


@pytest.mark.parametrize("layout", ["training state only", "model.pt", "model.pth", "unindexed shards"])
def test_pickles_hugging_face_would_not_load_are_refused_on_every_route_unread(model, state, loads, tmp_path, layout):
    """The GGUF route read a .pt, a .pth or shards without their index (and training state, as weights), while the
    ONNX route refused them and sent the user to --to gguf "which reads them as they are": other weights than
    Hugging Face's. Now both refuse, before anything is unpickled, with the fix that makes them loadable."""
    from edgemed.converters.source.checkpoint import Checkpoint

    files = {"training state only": {n: {"step": 1} for n in TRAINING_STATE}, "model.pt": {"model.pt": state},
             "model.pth": {"model.pth": state}, "unindexed shards": _halves(state)}[layout]
    ckpt = _folder(model, tmp_path / "other-names", files)
    for allow in (False, True):
        with pytest.raises(CheckpointError, match="has no weights Hugging Face loading reads") as e:
            Checkpoint.open(ckpt, allow_pickle=allow)
        assert all(name in e.value.problem for name in files) and "none was unpickled" in e.value.problem
        assert "pytorch_model.bin" in e.value.fix and "model.safetensors" in e.value.fix
    for route in (["--quant", "f16"], ["--to", "onnx", "--quant", "fp32"]):
        out = tmp_path / "out"
        r = CliRunner().invoke(cli, ["convert", str(ckpt), "--allow-pickle", *route, "-o", str(out)])
        assert r.exit_code == 1 and "has no weights Hugging Face loading reads" in r.output, r.output
        assert "--to gguf" not in r.output and "Traceback" not in r.output and not out.exists(), r.output
    assert loads == []
