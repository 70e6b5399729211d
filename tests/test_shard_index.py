"""A sharded checkpoint's index is checked tensor by tensor against the shards it names, before any work.

``model.safetensors.index.json`` (or ``pytorch_model.bin.index.json``) says which shard holds each tensor. Only
its shard file names were checked: a tensor the index put in another shard, one it left out, one no shard holds
and ``metadata.total_size`` were never compared with the shards' headers. A misplaced or unlisted tensor converted
without a word, a tensor in two listed shards was refused with a fix that did not apply ("remove stray shards"),
and a listed tensor no shard holds was found only by the architecture's own list, when it was one the list
requires. Each case here is built from tiny real shards and refused by ``Checkpoint.open``, naming the tensor, the
shard(s) and the fix; the headers are read, never the tensor data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("safetensors")

import tiny

from edgemed.cli import cli
from edgemed.errors import CheckpointError

A, B = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
HEAD, NORM = "lm_head.weight", "model.norm.weight"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny.build_model(tmp_path_factory.mktemp("shard-index").resolve() / "llama")


@pytest.fixture(scope="module")
def state(model) -> dict:
    from safetensors.torch import load_file

    return load_file(model / "model.safetensors")


def _bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _sharded(model: Path, dest: Path, shards: dict, weight_map: dict | None = None, total_size=None) -> Path:
    """The tiny checkpoint in ``dest`` as safetensors ``shards`` (file -> tensors) with an index: ``weight_map``
    (default: where each tensor is) and ``total_size`` (default: the tensors' bytes)."""
    from safetensors.torch import save_file

    shutil.copytree(model, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    for name, tensors in shards.items():
        save_file(tensors, dest / name, metadata={"format": "pt"})
    if weight_map is None:
        weight_map = {k: file for file, part in shards.items() for k in part}
    if total_size is None:
        total_size = sum(_bytes(part) for part in shards.values())
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total_size},
                                                                   "weight_map": weight_map}))
    return dest


def _halves(state: dict) -> dict:
    """The weights in two shards; the head in the first, the final norm in the second."""
    rest = sorted(set(state) - {HEAD, NORM})
    return {A: {k: state[k] for k in [HEAD, *rest[:len(rest) // 2]]}, B: {k: state[k] for k in [*rest[len(rest) // 2:], NORM]}}


def _where(shards: dict) -> dict:
    return {k: file for file, part in shards.items() for k in part}


def _refused_everywhere(ckpt: Path, tmp_path: Path, *words: str) -> CheckpointError:
    """``Checkpoint.open`` raises naming ``words``; ``edgemed convert`` exits 1 with the same paragraph and
    writes nothing."""
    from edgemed.converters.source.checkpoint import Checkpoint

    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(ckpt)
    for w in words:
        assert w in e.value.problem, e.value.problem
    out = tmp_path / "out"
    out.mkdir()
    r = CliRunner().invoke(cli, ["convert", str(ckpt), "--quant", "f16", "-o", str(out / "x.gguf")])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.output, r.exception)
    assert "Traceback" not in r.output and "Fix:" in r.output and words[0] in r.output, r.output
    assert list(out.iterdir()) == []
    return e.value


def test_a_tensor_the_index_puts_in_another_shard(model, state, tmp_path):
    """The head is in the first shard, the index says the second: converted without a word."""
    shards = _halves(state)
    ckpt = _sharded(model, tmp_path / "ckpt", shards, _where(shards) | {HEAD: B})
    err = _refused_everywhere(ckpt, tmp_path, f"tensor '{HEAD}' is listed in '{B}' but stored in '{A}'")
    assert "re-copy" in err.fix and "model.safetensors.index.json" in err.fix


def test_a_tensor_a_shard_holds_and_the_index_does_not_list(model, state, tmp_path):
    """A shard from another save holds a tensor the index leaves out: it was converted as part of the model."""
    shards = _halves(state)
    weight_map = _where(shards)
    del weight_map[NORM]
    ckpt = _sharded(model, tmp_path / "ckpt", shards, weight_map)
    _refused_everywhere(ckpt, tmp_path, f"'{B}' holds tensor '{NORM}', which the index does not list")


def test_a_tensor_in_two_listed_shards_names_the_index_copy(model, state, tmp_path):
    """The second shard holds a second, different head: refused before, but told to remove stray shards, while
    both shards are the index's own. Now it names which copy the index lists and to re-copy the shards."""
    shards = _halves(state)
    weight_map = _where(shards)
    shards[B] = shards[B] | {HEAD: state[HEAD] * 2}
    ckpt = _sharded(model, tmp_path / "ckpt", shards, weight_map)
    err = _refused_everywhere(ckpt, tmp_path, f"tensor '{HEAD}' is in both '{A}' and '{B}' (the index lists it in '{A}')")
    assert "stray" not in err.fix and "re-copy the shards" in err.fix


def test_a_listed_tensor_no_shard_holds(model, state, tmp_path):
    """The second shard is from a save without the final norm: the index lists a tensor nothing holds."""
    shards = _halves(state)
    weight_map = _where(shards)
    del shards[B][NORM]
    ckpt = _sharded(model, tmp_path / "ckpt", shards, weight_map)
    _refused_everywhere(ckpt, tmp_path, f"tensor '{NORM}' is listed in '{B}', which does not hold it, nor does any shard the index lists")


def test_many_mismatches_are_counted_not_listed(model, state, tmp_path):
    from edgemed.converters.source.checkpoint import Checkpoint

    shards = _halves(state)
    ckpt = _sharded(model, tmp_path / "ckpt", shards, {k: A for k in state})  # an index that puts all in the first
    with pytest.raises(CheckpointError, match=r"which does not hold it, nor does any shard the index lists; .* and \d+ more\.") as e:
        Checkpoint.open(ckpt)
    assert len(e.value.problem) < 1200


def test_a_shard_with_bigger_tensors_than_total_size_counts(model, state, tmp_path):
    """An F16 checkpoint whose second shard was replaced by the F32 save: same names, other bytes."""
    import torch

    half = {k: v.to(torch.float16) for k, v in state.items()}
    shards = _halves(half)
    total = sum(_bytes(part) for part in shards.values())
    shards[B] = {k: v.to(torch.float32) for k, v in shards[B].items()}
    ckpt = _sharded(model, tmp_path / "ckpt", shards, total_size=total)
    err = _refused_everywhere(ckpt, tmp_path, f"counts {total:,} bytes of tensors (metadata.total_size)")
    assert f"hold {sum(_bytes(p) for p in shards.values()):,}" in err.problem and A in err.problem and B in err.problem


@pytest.mark.parametrize("count", ["save_pretrained", "file sizes", "absent", "not a number"])
def test_indexes_as_writers_make_them_are_read(model, state, tmp_path, count):
    """total_size is counted differently by writers (huggingface_hub: each tensor's storage; mlx-lm: the shard
    files, headers included) and is optional: only a count below the tensors' own bytes is refused."""
    from edgemed.converters.source.checkpoint import Checkpoint

    if count == "save_pretrained":
        from transformers import AutoModelForCausalLM

        ckpt = tmp_path / "ckpt"
        shutil.copytree(model, ckpt, ignore=shutil.ignore_patterns("*.safetensors"))
        AutoModelForCausalLM.from_pretrained(model).save_pretrained(ckpt, max_shard_size="200KB")
        assert len(list(ckpt.glob("*.safetensors"))) > 2
    else:
        ckpt = _sharded(model, tmp_path / "ckpt", _halves(state))
        index = ckpt / "model.safetensors.index.json"
        doc = json.loads(index.read_text())
        doc["metadata"] = {"file sizes": {"total_size": sum((ckpt / f).stat().st_size for f in (A, B))},
                           "absent": {}, "not a number": {"total_size": "1.2GB"}}[count]
        index.write_text(json.dumps(doc))
    opened = Checkpoint.open(ckpt)
    assert set(opened.tensors) == set(state)


def test_the_check_reads_headers_only(model, state, tmp_path, monkeypatch):
    """No tensor data is read to check the index: safetensors' reader is never opened."""
    import safetensors
    from edgemed.converters.source.checkpoint import Checkpoint

    shards = _halves(state)
    ckpt = _sharded(model, tmp_path / "ckpt", shards, _where(shards) | {HEAD: B})
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("tensor data opened"))
    with pytest.raises(CheckpointError, match="is listed in"):
        Checkpoint.open(ckpt)


# -- pickle shards: their tensors are known only once unpickled, so only with --allow-pickle -----------------
def _pickle_sharded(model: Path, dest: Path, state: dict, weight_map_change) -> Path:
    import torch

    shutil.copytree(model, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    shards = {name.replace(".safetensors", ".bin").replace("model-", "pytorch_model-"): part
              for name, part in _halves(state).items()}
    for name, part in shards.items():
        torch.save(part, dest / name)
    weight_map = weight_map_change({k: file for file, part in shards.items() for k in part}, sorted(shards))
    (dest / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dest


def test_pickle_shards_are_checked_once_unpickled_with_consent(model, state, tmp_path, monkeypatch):
    import torch
    from edgemed.converters.source.checkpoint import Checkpoint, pickle_refused

    seen: list[str] = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: seen.append(Path(f).name) or real(f, *a, **k))
    ckpt = _pickle_sharded(model, tmp_path / "ckpt", state, lambda wm, files: wm | {HEAD: files[1]})
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(ckpt)  # without consent: the one refusal, nothing unpickled
    assert str(e.value) == str(pickle_refused(ckpt, sorted(ckpt.glob("pytorch_model-*.bin")))) and seen == []
    with pytest.raises(CheckpointError, match=f"tensor '{HEAD}' is listed in 'pytorch_model-00002-of-00002.bin' "
                                              "but stored in 'pytorch_model-00001-of-00002.bin'"):
        Checkpoint.open(ckpt, allow_pickle=True)
