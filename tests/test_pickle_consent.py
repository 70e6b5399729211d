"""Pickle consent holds on every command that reads a checkpoint; adapters naming another base model; a legacy
(non-zip) pytorch_model.bin; a convert stopped between its report and its output leaves nothing `pack` accepts.

Every reader refuses a pickle-only checkpoint without --allow-pickle with the one paragraph ``convert`` gives
(``checkpoint.pickle_refused``) and writes nothing; with the flag, ``check`` runs and passes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

import tiny  # noqa: E402
from edgemed.cli import cli  # noqa: E402
from edgemed.errors import AdapterError, CheckpointError, InputError  # noqa: E402

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("consent").resolve()


@pytest.fixture(scope="module")
def model(root) -> Path:
    return tiny.build_model(root / "llama")


@pytest.fixture(scope="module")
def pickled(root, model) -> Path:
    """The tiny checkpoint with its weights in pytorch_model.bin only."""
    import torch
    from safetensors.torch import load_file

    out = root / "pickled"
    shutil.copytree(model, out)
    torch.save(load_file(out / "model.safetensors"), out / "pytorch_model.bin")
    (out / "model.safetensors").unlink()
    return out


@pytest.fixture(scope="module")
def gguf(root, model) -> Path:
    """An F32 GGUF of the tiny checkpoint (the same weights as ``pickled``)."""
    from edgemed.converters.pipeline import ConvertOptions, convert

    out = root / "tiny-f32.gguf"
    convert(model, out, ConvertOptions(out_type="f32", parity=False), echo=lambda s: None)
    return out


def paragraph(ckpt: Path) -> str:
    """What `edgemed convert` says about ``ckpt`` without --allow-pickle (its one constructor)."""
    from edgemed.converters.source.checkpoint import pickle_refused

    return str(pickle_refused(ckpt, [ckpt / "pytorch_model.bin"]))


def _run(*args) -> "object":
    return CliRunner().invoke(cli, [str(a) for a in args])


def _refused(result, ckpt: Path) -> None:
    assert result.exit_code == 1, result.output
    assert f"Error: {paragraph(ckpt)}\n" in result.output, result.output
    assert "Traceback" not in result.output


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- every command that reads a checkpoint ---------------------------------------------------------------------
def test_every_command_refuses_pickle_without_consent_with_one_paragraph(pickled, gguf, tmp_path):
    """convert (GGUF and ONNX), check, bench reproduce and bench run: exit 1, the convert paragraph, nothing written."""
    onnx = ["convert", pickled, "--to", "onnx", "--quant", "fp32", "-o", "{out}/x-onnx"]
    commands = {
        "convert": ["convert", pickled, "--quant", "f16", "--no-imatrix", "-o", "{out}/x.gguf"],
        "convert --to onnx": onnx if _have("onnx", "onnxruntime") else None,
        "check": ["check", pickled, gguf],
        "bench reproduce": ["bench", "reproduce", pickled, "-o", "{out}/bench", "--quants", "f16", "--baselines", "hf-fp32",
                            "--skip-accuracy"],
        "bench run": ["bench", "run", pickled, "-o", "{out}/bench", "--skip-accuracy"],
    }
    for what, args in commands.items():
        if args is None:
            continue
        out = tmp_path / what.replace(" ", "_")
        out.mkdir()
        _refused(_run(*[str(a).format(out=out) for a in args]), pickled)
        assert _listing(out) == [], what


def _have(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def test_convert_onnx_passes_the_consent_on(pickled, monkeypatch, tmp_path):
    """With --allow-pickle the ONNX route opens the checkpoint (the flag reaches OnnxOptions and Checkpoint.open)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from edgemed.converters.budget import peaks as budget

    seen = []

    def stop(source, opts):  # the step after the open: the source was read with consent
        seen.append((source.checkpoint.pickle_files, source.allow_pickle, opts.allow_pickle))
        raise InputError("stopped here by the test.", "none")

    monkeypatch.setattr(budget, "check_onnx", stop)
    r = _run("convert", pickled, "--to", "onnx", "--quant", "fp32", "--allow-pickle", "-o", tmp_path / "x-onnx")
    assert "stopped here by the test" in r.output, r.output
    assert seen == [([pickled / "pytorch_model.bin"], True, True)]


@pytest.fixture(scope="module")
def redirected(root, model) -> Path:
    """The tiny checkpoint, safetensors weights and all, whose config.json also tells transformers to load a pickle
    (``transformers_weights``, which transformers honours whatever ``use_safetensors`` says)."""
    import torch
    from safetensors.torch import load_file

    out = root / "redirected"
    shutil.copytree(model, out)
    torch.save({k: torch.zeros_like(v) for k, v in load_file(out / "model.safetensors").items()}, out / "adapter_model.bin")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    return out


def test_a_config_naming_other_weights_is_refused_before_anything_is_unpickled(redirected, monkeypatch, tmp_path):
    """Every route refuses the checkpoint at its open, so no route loads weights other than the ones it hashed."""
    import torch

    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real(*a, **k))
    commands = {"convert": ["convert", redirected, "--quant", "f16", "--no-imatrix", "-o", "{out}/x.gguf"],
                "bench run": ["bench", "run", redirected, "-o", "{out}/bench", "--skip-accuracy"]}
    if _have("onnx", "onnxruntime"):
        commands["convert --to onnx"] = ["convert", redirected, "--to", "onnx", "--quant", "fp32", "-o", "{out}/x-onnx"]
    for what, args in commands.items():
        out = tmp_path / what.replace(" ", "_")
        out.mkdir()
        r = _run(*[str(a).format(out=out) for a in args])
        assert r.exit_code == 1, (what, r.output)
        assert "'transformers_weights' names \"adapter_model.bin\"" in r.output, (what, r.output)
        assert "remove the 'transformers_weights' key" in r.output and "Traceback" not in r.output, r.output
        assert _listing(out) == [], what
    assert loads == []


def test_a_config_naming_the_default_weights_is_accepted(model, tmp_path):
    from edgemed.converters.source.checkpoint import Checkpoint

    ckpt = tmp_path / "named"
    shutil.copytree(model, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "transformers_weights": "model.safetensors"}))
    assert list(Checkpoint.open(ckpt).tensors) == list(Checkpoint.open(model).tensors)


@pytest.fixture(scope="module")
def renamed(root, model) -> Path:
    """The tiny checkpoint with its safetensors under a name Hugging Face loading does not look for."""
    out = root / "renamed"
    shutil.copytree(model, out)
    (out / "model.safetensors").rename(out / "weights.safetensors")
    return out


def test_safetensors_transformers_would_pass_over_for_a_pickle_are_refused_before_anything_is_unpickled(
        renamed, model, monkeypatch, tmp_path):
    """With no model.safetensors (nor its index), from_pretrained, in the ONNX routes and the GenAI builder's child,
    falls back to pytorch_model.bin: a pickle unpickled without --allow-pickle, and other weights than those hashed."""
    import torch
    from safetensors.torch import load_file

    from edgemed.converters.source.checkpoint import Checkpoint

    ckpt = tmp_path / "both"
    shutil.copytree(renamed, ckpt)
    torch.save({k: torch.zeros_like(v) for k, v in load_file(model / "model.safetensors").items()}, ckpt / "pytorch_model.bin")
    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real(*a, **k))
    for allow in (False, True):
        with pytest.raises(CheckpointError, match="names Hugging Face loading does not look for") as e:
            Checkpoint.open(ckpt, allow_pickle=allow)
        assert "weights.safetensors" in e.value.problem and "pytorch_model.bin" in e.value.problem
        assert "model.safetensors" in e.value.fix and "remove the pickle" in e.value.fix
    commands = {"convert": ["convert", ckpt, "--quant", "f16", "--no-imatrix", "-o", "{out}/x.gguf"]}
    if _have("onnx", "onnxruntime"):
        commands["convert --to onnx"] = ["convert", ckpt, "--to", "onnx", "--quant", "fp32", "-o", "{out}/x-onnx"]
        commands["convert --to onnx --onnx-graph genai"] = ["convert", ckpt, "--to", "onnx", "--onnx-graph", "genai",
                                                            "--quant", "fp32", "-o", "{out}/x-onnx"]
    for what, args in commands.items():
        out = tmp_path / what.replace(" ", "_")
        out.mkdir()
        r = _run(*[str(a).format(out=out) for a in args])
        assert r.exit_code == 1 and "does not look for" in r.output and "Traceback" not in r.output, (what, r.output)
        assert _listing(out) == [], what
    assert loads == []


def test_safetensors_under_another_name_convert_to_gguf_and_the_hf_routes_say_why_not(renamed, model, tmp_path):
    from edgemed.converters.source.checkpoint import Checkpoint, require_hf_layout

    ckpt = Checkpoint.open(renamed)  # the GGUF route reads the file under any name
    assert list(ckpt.tensors) == list(Checkpoint.open(model).tensors)
    with pytest.raises(CheckpointError, match="the ONNX route loads the model with it") as e:
        ckpt.hf_model()
    assert "--to gguf" in e.value.fix
    with pytest.raises(CheckpointError, match=r"\(weights.safetensors\)"):
        require_hf_layout(renamed)  # the GenAI builder's check, before its child starts
    require_hf_layout(model)
    if _have("onnx", "onnxruntime"):
        r = _run("convert", renamed, "--to", "onnx", "--quant", "fp32", "-o", tmp_path / "x-onnx")
        assert r.exit_code == 1 and "does not look for" in r.output and "Traceback" not in r.output, r.output


def test_the_genai_builder_loads_a_consented_pytorch_model_bin(pickled, tmp_path):
    """Its layout check was given no pickle files, so it refused pytorch_model.bin itself, naming '(none)'."""
    if not _have("onnx", "onnxruntime", "onnxruntime_genai"):
        pytest.skip("needs the onnx extra and onnxruntime-genai")
    r = _run("convert", pickled, "--to", "onnx", "--onnx-graph", "genai", "--quant", "fp32", "--allow-pickle",
             "-o", tmp_path / "x-onnx")
    assert r.exit_code == 0 and "PASS" in r.output, r.output


def test_a_single_file_beside_a_shard_index_is_refused(model, tmp_path):
    """transformers reads model.safetensors first, edgemed's GGUF route the index's shards: they would differ."""
    from edgemed.converters.source.checkpoint import Checkpoint

    ckpt = tmp_path / "both-layouts"
    shutil.copytree(model, ckpt)
    shutil.copy(ckpt / "model.safetensors", ckpt / "model-00001-of-00001.safetensors")
    from safetensors import safe_open

    with safe_open(ckpt / "model.safetensors", "pt") as fh:
        names = list(fh.keys())
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))
    with pytest.raises(CheckpointError, match="holds both model.safetensors and model.safetensors.index.json"):
        Checkpoint.open(ckpt)
    (ckpt / "model.safetensors").unlink()
    assert list(Checkpoint.open(ckpt).tensors) == list(Checkpoint.open(model).tensors)


def test_an_adapter_beside_the_model_is_refused_on_every_route(model, lora, tmp_path):
    """transformers would merge it on the ONNX route and the torch baseline; the GGUF route would not: refused."""
    from edgemed.converters.source.checkpoint import Checkpoint

    ckpt = tmp_path / "with-adapter"
    shutil.copytree(model, ckpt)
    for f in lora.iterdir():
        shutil.copy(f, ckpt / f.name)
    with pytest.raises(CheckpointError, match="holds a PEFT adapter") as e:
        Checkpoint.open(ckpt)
    assert "pass it with --lora DIR" in e.value.fix
    r = _run("convert", ckpt, "--quant", "f16", "--no-imatrix", "-o", tmp_path / "x.gguf")
    assert r.exit_code == 1 and "holds a PEFT adapter" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "x.gguf").exists()


def test_check_passes_with_consent(pickled, gguf):
    ok = _run("check", pickled, gguf, "--allow-pickle")
    assert ok.exit_code == 0, ok.output
    assert "PASS" in ok.output
    # the same weights saved as a pickle are other files than the GGUF records: said, and the gate decides
    assert "converted from other checkpoint files than SOURCE" in ok.output


def test_library_readers_refuse_a_bare_path(pickled, gguf):
    """A reader handed a directory (not the command's opened checkpoint) has no consent: the same refusal."""
    from edgemed.converters import arch_spec
    from edgemed.converters.source.checkpoint import Checkpoint
    from edgemed.converters.gguf.imatrix import compute_imatrix
    from edgemed.converters.quality.layered import LayeredModel, reference_logits
    from edgemed.converters.source.merged_model import load_merged
    from edgemed.converters.quality.parity import check_gguf

    calls = [lambda: check_gguf(pickled, gguf, "f32"), lambda: reference_logits(pickled),
             lambda: LayeredModel.open(pickled), lambda: load_merged(pickled),
             lambda: compute_imatrix(pickled, arch_spec("LlamaForCausalLM"), HERE / "missing.txt")]
    for call in calls:
        with pytest.raises(CheckpointError) as info:
            call()
        assert str(info.value) == paragraph(pickled)
    # the opened source carries the consent: the reference reads it
    ckpt = Checkpoint.open(pickled, allow_pickle=True)
    assert check_gguf(ckpt, gguf, "f32").passed is True


def test_bench_consent_reaches_conversions_and_the_torch_baseline(pickled, monkeypatch, tmp_path):
    from edgemed.benchmarks.harness import artifacts
    from edgemed.benchmarks.harness.torch_baseline import open_hf

    made = []
    monkeypatch.setattr(artifacts, "_convert", lambda src, artifact, args, echo: made.append(args))
    configs = artifacts.prepare(pickled, tmp_path / "b", ["f16"], ["int4"], {"hf-fp32": "float32"}, echo=lambda s: None,
                                allow_pickle=True)
    assert all("--allow-pickle" in args for args in made) and len(made) == 2
    hf = next(c for c in configs if c.kind == "hf")
    assert hf.allow_pickle is True
    with pytest.raises(CheckpointError) as info:
        open_hf(pickled, None, 256, None, 0)
    assert str(info.value) == paragraph(pickled)
    timed = open_hf(pickled, None, 256, None, 0, allow_pickle=True)
    try:
        assert len(timed.generate(timed.prompt_ids("fever"), 2)[2]) == 2
    finally:
        timed.close()


def test_legacy_pickle_is_refused_with_a_fix(pickled, tmp_path):
    import torch

    legacy = tmp_path / "legacy"
    shutil.copytree(pickled, legacy)
    state = torch.load(legacy / "pytorch_model.bin", weights_only=True)
    torch.save(state, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    r = _run("convert", legacy, "--quant", "f16", "--allow-pickle", "-o", tmp_path / "x.gguf")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"'{legacy / 'pytorch_model.bin'}'" in r.output and "legacy (non-zip)" in r.output
    assert "Fix: re-save it in torch's zip format" in r.output and "mmap" not in r.output
    assert not (tmp_path / "x.gguf").exists()


def test_a_truncated_pickle_is_refused_as_truncated_not_as_legacy(pickled, tmp_path):
    """A pytorch_model.bin cut in half starts as a zip without its directory: it was called torch's legacy format,
    with advice to re-save it that cannot work."""
    cut = tmp_path / "cut"
    shutil.copytree(pickled, cut)
    data = (cut / "pytorch_model.bin").read_bytes()
    (cut / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    r = _run("convert", cut, "--quant", "f16", "--allow-pickle", "-o", tmp_path / "x.gguf")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"'{cut / 'pytorch_model.bin'}' is truncated or corrupt" in r.output and "legacy" not in r.output, r.output
    assert "Fix: copy the file again" in r.output
    assert not (tmp_path / "x.gguf").exists()


# -- an adapter that names another base model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora(root, model) -> Path:
    pytest.importorskip("peft")
    return tiny.build_lora(model, root / "lora")


def _renamed(lora: Path, dest: Path, **fields) -> Path:
    shutil.copytree(lora, dest)
    cfg = json.loads((dest / "adapter_config.json").read_text())
    (dest / "adapter_config.json").write_text(json.dumps(cfg | fields))
    return dest


def test_adapter_naming_another_hub_model_is_merged_with_a_warning_and_recorded(model, lora, tmp_path):
    adapter = _renamed(lora, tmp_path / "adapter", base_model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct")
    out = tmp_path / "x.gguf"
    r = _run("convert", model, "--lora", adapter, "--quant", "f32", "--no-parity", "-o", out)
    assert r.exit_code == 0, r.output
    assert "WARNING: " in r.output and "'Qwen/Qwen2.5-0.5B-Instruct'" in r.output
    report = json.loads(out.with_name(out.name + ".report.json").read_text())
    assert report["lora"]["base_model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert report["lora"]["base_check"].startswith("name differs")


def test_adapter_trained_on_this_base_says_nothing(model, lora, tmp_path):
    out = tmp_path / "x.gguf"
    r = _run("convert", model, "--lora", lora, "--quant", "f32", "--no-parity", "-o", out)
    assert r.exit_code == 0 and "WARNING" not in r.output, r.output
    assert json.loads(out.with_name(out.name + ".report.json").read_text())["lora"]["base_check"].startswith("matches (the same folder)")


def test_adapter_whose_base_is_proven_another_model_is_refused(model, lora, tmp_path):
    from edgemed.converters.source.checkpoint import Checkpoint
    from edgemed.converters.source.lora import LoraAdapter

    ckpt = Checkpoint.open(model)
    other = tmp_path / "qwen-base"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    for adapter in (_renamed(lora, tmp_path / "local", base_model_name_or_path=str(other)),
                    _renamed(lora, tmp_path / "mapped", base_model_name_or_path="Qwen/Qwen2.5-0.5B",
                         auto_mapping={"base_model_class": "Qwen2ForCausalLM",
                                       "parent_library": "transformers.models.qwen2.modeling_qwen2"})):
        with pytest.raises(AdapterError, match="Qwen2ForCausalLM") as info:
            LoraAdapter.open(adapter, ckpt)
        assert "not on this base model" in str(info.value) and "Fix: " in str(info.value)
    out = tmp_path / "out"
    out.mkdir()
    r = _run("convert", model, "--lora", tmp_path / "local", "--quant", "f32", "--no-parity", "-o", out / "x.gguf")
    assert r.exit_code == 1 and "not on this base model" in r.output and _listing(out) == []


# -- a convert stopped between its report and its output --------------------------------------------------------
DRIVER = """
import json, shutil, sys
from pathlib import Path
import llama_cpp, torch  # noqa: F401  (loaded once; the children reuse them)
import crash_kit
from edgemed.converters.pipeline import ConvertOptions, convert

new, out, saved, states = (Path(a) for a in sys.argv[1:5])
def run():
    convert(new, out / "x.gguf", ConvertOptions(out_type="f16", parity=False, force=True), echo=lambda s: None)
def restore():
    for f in out.iterdir():
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    for f in saved.iterdir():
        shutil.copy2(f, out / f.name)
names = crash_kit.steps(run, states)
restore()
first = min(i for i, s in enumerate(names) if s.split()[1] == "atomic.written")  # the tensors are written by then
for n in range(first + 1, len(names) + 1):
    restore()
    status = crash_kit.killed_at(run, n)
    keep = states / str(n)
    keep.mkdir()
    for f in out.glob("x.gguf*"):
        shutil.copy2(f, keep / f.name)
    print(json.dumps({"n": n, "step": names[n - 1], "status": status}), flush=True)
"""


def test_convert_killed_between_report_and_output_leaves_nothing_pack_accepts(root, tmp_path):
    """Old pair (source A) -> convert --force from source B, killed at every step from the output's write on: pack
    either refuses with a clear error, or packs a model with its own report (never one without, or another's)."""
    from edgemed.converters.pipeline import ConvertOptions, convert
    from edgemed.packaging.bundle import PackInputs, pack
    from edgemed.packaging.facts import gguf_facts

    a, b = tiny.build_model(root / "src-a", seed=3), tiny.build_model(root / "src-b", seed=4)  # same shapes, other bytes
    saved, out, states = tmp_path / "saved", tmp_path / "work" / "out", tmp_path / "states"
    for d in (saved, out, states):
        d.mkdir(parents=True)
    convert(a, saved / "x.gguf", ConvertOptions(out_type="f16", parity=False), echo=lambda s: None)
    env = {**os.environ, "EDGEMED_HOME": str(tmp_path / "home"),
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(b), str(out), str(saved), str(states)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kills = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert kills and all(k["status"] == -9 for k in kills)
    license_ = tmp_path / "LICENSE"
    license_.write_text("test\n")
    refused = 0
    for k in kills:
        model = states / str(k["n"]) / "x.gguf"
        if not model.exists():
            continue
        try:
            man = pack(PackInputs(model=model, license=license_, name="x"), tmp_path / f"b{k['n']}", as_dir=True)
        except InputError as exc:
            assert exc.fix and "edgemed convert" in exc.fix, (k, str(exc))
            refused += 1
            continue
        prov = man.provenance
        assert "out_type" in prov, (k, "packed without its report")  # the report came along ...
        assert prov["source_sha256"] == gguf_facts(model)[1]["source_sha256"], (k, "packed with another model's report")
    assert refused, "no kill fell between the report and the output"


def test_pack_refuses_a_converted_gguf_without_its_report(gguf, tmp_path):
    alone = tmp_path / "x.gguf"
    shutil.copy2(gguf, alone)  # the report stays behind: as if convert had been stopped before it, or it was lost
    (tmp_path / "LICENSE").write_text("test\n")
    r = _run("pack", alone, "--license", tmp_path / "LICENSE", "-o", tmp_path / "x.edgemed")
    assert r.exit_code == 1 and "x.gguf.report.json" in r.output and "--no-report" in r.output, r.output
    assert not (tmp_path / "x.edgemed").exists()
    ok = _run("pack", alone, "--license", tmp_path / "LICENSE", "--no-report", "-o", tmp_path / "x.edgemed")
    assert ok.exit_code == 0, ok.output


def test_a_force_convert_that_fails_at_its_rename_keeps_the_old_report(model, tmp_path, monkeypatch):
    """The new report lands before the output; when the output's rename then fails, the output in place keeps
    its own report (byte for byte), so `pack` still takes the old pair."""
    from edgemed.files import atomic
    from edgemed.converters.pipeline import ConvertOptions, convert
    from edgemed.errors import OutputError

    out = tmp_path / "x.gguf"
    convert(model, out, ConvertOptions(out_type="f16", parity=False), echo=lambda s: None)
    report = out.with_name(out.name + ".report.json")
    before, model_bytes = report.read_bytes(), out.read_bytes()
    real = atomic.swap_in

    def refuse_gguf(new, dest, aside):
        if dest == out:
            raise OSError(28, "No space left on device")
        return real(new, dest, aside)

    monkeypatch.setattr(atomic, "swap_in", refuse_gguf)
    with pytest.raises(OutputError, match="No space left"):  # the disk-full paragraph convert gives
        convert(model, out, ConvertOptions(out_type="f32", parity=False, force=True), echo=lambda s: None)
    assert report.read_bytes() == before and out.read_bytes() == model_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf", "x.gguf.report.json"]
