"""An ONNX bundle: `edgemed pack` of a converted ONNX directory finds the directory's own report, so the
manifest carries the conversion's parity and provenance (it once looked for ``<dir>.report.json`` and
silently packed none)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_ir")
pytest.importorskip("torch")

import bundle_kit as kit  # noqa: E402
from onnx_tiny import build  # noqa: E402

from edgemed.cli import cli  # noqa: E402
from edgemed.formats.conversion_report import report_path  # noqa: E402


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    from edgemed.converters.onnx.export import OnnxOptions, convert_onnx

    src = build(tmp_path_factory.mktemp("tiny-p") / "tiny-qwen2")
    out = tmp_path_factory.mktemp("onnx-p") / "tiny-fp32"
    convert_onnx(src, out, OnnxOptions(weight_type="fp32"), echo=lambda s: None)  # with its parity gate
    return out


def test_the_report_rule_is_the_one_the_converter_wrote(tiny_onnx, tmp_path):
    assert report_path(tiny_onnx) == tiny_onnx / "report.json" and report_path(tiny_onnx).is_file()
    assert report_path(tmp_path / "m.gguf", "gguf") == tmp_path / "m.gguf.report.json"


def test_onnx_bundle_manifest_carries_parity_and_provenance(tiny_onnx, tmp_path):
    written = json.loads(report_path(tiny_onnx).read_text())
    license_ = kit.inputs(tmp_path / "src")["license"]
    bundle = tmp_path / "tiny.edgemed"
    r = CliRunner().invoke(cli, ["pack", str(tiny_onnx), "--license", str(license_), "--name", "tiny-onnx", "-o", str(bundle)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(bundle), "--json"], catch_exceptions=False).output)
    man = info["manifest"]
    prov = man["provenance"]
    assert man["model"]["format"] == "onnx"
    assert prov["parity"] == written["parity"] and prov["parity"]["fp32"]["passed"] is True
    assert prov["source_sha256"] == written["source"]["sha256"] and len(prov["source_sha256"]) == 64
    assert prov["converter_version"] == written["converter"]["version"] and prov["out_type"] == "fp32"
    assert {"path": "report.json", "role": "report"}.items() <= next(f for f in man["files"] if f["path"] == "report.json").items()
    assert str(tiny_onnx.parent) not in json.dumps(prov)  # build-machine paths stay out of the manifest
    text = CliRunner().invoke(cli, ["inspect", str(bundle)], catch_exceptions=False).output
    assert "parity recorded" in text


# -- the report names the directory's bytes, and pack checks them ---------------------------------------------------
def _pack(model: Path, tmp_path: Path, *extra) -> object:
    license_ = kit.inputs(tmp_path / "src")["license"]
    return CliRunner().invoke(cli, ["pack", str(model), "--license", str(license_), "--name", "tiny-onnx", "--dir",
                                    "-o", str(tmp_path / "b"), *map(str, extra)], catch_exceptions=False)


def test_the_report_names_every_file_of_the_directory_by_size_and_sha256(tiny_onnx):
    import hashlib

    files = json.loads(report_path(tiny_onnx).read_text())["files"]
    on_disk = {p.name for p in tiny_onnx.iterdir()} - {"report.json"}
    assert set(files) == on_disk and {"model.onnx", "model.onnx.data", "tokenizer.json", "genai_config.json"} <= on_disk
    for name, f in files.items():
        data = (tiny_onnx / name).read_bytes()
        assert f == {"size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("change", ["altered", "swapped", "missing", "extra"])
def test_pack_refuses_a_directory_whose_files_are_not_the_ones_its_report_names(tiny_onnx, tmp_path, change):
    """Weights copied in from another conversion kept this report's parity and LoRA sha256 in the manifest."""
    import shutil

    d = shutil.copytree(tiny_onnx, tmp_path / "copy")
    data = d / "model.onnx.data"
    if change == "altered":  # same size, one byte changed
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif change == "swapped":  # another model's weights
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2] * 2 + b"\0")
    elif change == "missing":
        (d / "genai_config.json").unlink()
    else:
        (d / "model_b.onnx").write_bytes((d / "model.onnx").read_bytes())
    named = {"altered": "model.onnx.data", "swapped": "model.onnx.data", "missing": "genai_config.json", "extra": "model_b.onnx"}[change]
    if change == "missing":  # refused with or without the report: the ONNX engine cannot run the directory
        for extra in ((), ("--no-report",)):
            r = _pack(d, tmp_path, *extra)
            assert r.exit_code == 1 and "has no genai_config.json" in r.output and not (tmp_path / "b").exists(), r.output
        return
    r = _pack(d, tmp_path)
    assert r.exit_code == 1 and "does not hold the files its conversion report" in r.output and named in r.output, r.output
    assert "re-run `edgemed convert --to onnx`" in r.output and not (tmp_path / "b").exists()
    assert _pack(d, tmp_path, "--no-report").exit_code == 0  # the way out it names: no parity claimed


def test_pack_takes_the_untouched_directory(tiny_onnx, tmp_path):
    r = _pack(tiny_onnx, tmp_path)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["provenance"]["parity"]["fp32"]["passed"] is True


def test_a_report_without_file_digests_packs_with_a_warning(tiny_onnx, tmp_path, caplog):
    """As a GGUF report without its output's sha256 is taken: an older edgemed wrote it."""
    import shutil

    d = shutil.copytree(tiny_onnx, tmp_path / "old")
    rep = json.loads((d / "report.json").read_text())
    del rep["files"]
    (d / "report.json").write_text(json.dumps(rep))
    with caplog.at_level("WARNING"):
        r = _pack(d, tmp_path)
    assert r.exit_code == 0, r.output
    assert "names no file digests" in caplog.text and "edgemed convert --to onnx --force" in caplog.text
    rep["files"] = ["model.onnx"]  # not a map: refused, not a traceback
    (d / "report.json").write_text(json.dumps(rep))
    r = _pack(d, tmp_path, "--force")
    assert r.exit_code == 1 and "'files' entry" in r.output, r.output


@pytest.mark.parametrize("as_dir", [False, True])
def test_pack_refuses_an_output_inside_the_onnx_folder_it_packs(tiny_onnx, tmp_path, as_dir):
    """A bundle written into the folder became a file its report does not name: that folder could then neither be
    packed nor replaced by `convert --to onnx --force`."""
    import shutil

    d = shutil.copytree(tiny_onnx, tmp_path / "onx")
    before = sorted(p.name for p in d.iterdir())
    license_ = kit.inputs(tmp_path / "src")["license"]
    r = CliRunner().invoke(cli, ["pack", str(d), "--license", str(license_), "--name", "onx", "-o", str(d / "onx.edgemed"),
                                 *(["--dir"] if as_dir else [])], catch_exceptions=False)
    assert r.exit_code == 1 and "inside the ONNX model folder" in r.output and "choose another -o path" in r.output, r.output
    assert sorted(p.name for p in d.iterdir()) == before
    assert _pack(d, tmp_path).exit_code == 0  # still packable as it was


def test_pack_and_inspect_state_the_onnx_facts_they_have_and_unknown_for_the_rest(tiny_onnx, tmp_path):
    """An ONNX bundle printed "llama 0M None" and "chat template None" though the folder has chat_template.jinja and
    its report names the weight type: the template's hash and the report's type are recorded now, and the parameter
    count, which neither holds, is said to be unknown."""
    import hashlib

    license_ = kit.inputs(tmp_path / "src")["license"]
    for extra, quant in (([], "fp32"), (["--no-report"], None)):
        bundle = tmp_path / f"t{len(extra)}.edgemed"
        r = CliRunner().invoke(cli, ["pack", str(tiny_onnx), "--license", str(license_), "--name", "tiny-onnx", "-o", str(bundle),
                                     *extra], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        assert " 0M" not in r.output and "None" not in r.output and "unknown size" in r.output, r.output
        assert (quant or "unknown weight type") in r.output, r.output
        man = json.loads(CliRunner().invoke(cli, ["inspect", str(bundle), "--json"], catch_exceptions=False).output)["manifest"]
        template = hashlib.sha256((tiny_onnx / "chat_template.jinja").read_bytes()).hexdigest()
        assert man["model"]["chat_template_sha256"] == template and man["model"].get("quant") == quant
        assert "params" not in man["model"]
        text = CliRunner().invoke(cli, ["inspect", str(bundle)], catch_exceptions=False).output
        assert "parameter count unknown" in text and "0.0M" not in text and "None" not in text, text
        assert f"chat template {template[:16]}" in text and (quant or "weight type unknown") in text, text
    assert CliRunner().invoke(cli, ["install", str(tmp_path / "t0.edgemed")]).exit_code == 0
    listed = CliRunner().invoke(cli, ["list"], catch_exceptions=False).output
    assert "tiny-onnx" in listed and " 0M" not in listed and "fp32" in listed, listed


@pytest.mark.parametrize("field", ["input_ids", "attention_mask"])
def test_pack_refuses_a_genai_config_the_onnx_engine_would_refuse(tiny_onnx, tmp_path, field):
    """A config without an input name the engine feeds packed, and the bundle failed only on the device, at load."""
    import shutil

    d = shutil.copytree(tiny_onnx, tmp_path / "edited")
    cfg_path = d / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["model"]["decoder"]["inputs"][field]
    cfg_path.write_text(json.dumps(cfg))
    r = _pack(d, tmp_path, "--no-report")
    assert r.exit_code == 1 and f"inputs.{field}" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("link", ["file", "folder", "nested"])
def test_pack_refuses_a_symbolic_link_in_the_onnx_folder_and_never_follows_it(tiny_onnx, tmp_path, link):
    """pack followed links: with --no-report, extra.txt -> ../outside.txt was packed with the outside file's bytes,
    and a link to a folder was left out silently. A link anywhere in the folder is refused, named; nothing is written."""
    import shutil

    d = shutil.copytree(tiny_onnx, tmp_path / "linked")
    (tmp_path / "outside.txt").write_text("a file from outside the model folder\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "notes.txt").write_text("outside\n")
    name = {"file": "extra.txt", "folder": "extra", "nested": "additional_chat_templates/tool_use.jinja"}[link]
    (d / name).parent.mkdir(exist_ok=True)
    (d / name).symlink_to({"file": "../outside.txt", "folder": "../outside", "nested": "../../outside.txt"}[link])
    r = _pack(d, tmp_path, "--no-report")
    said = " ".join(r.output.split())
    assert r.exit_code == 1 and f"'{d / name}' in the ONNX directory" in said and "is a symbolic link" in said, r.output
    assert "Traceback" not in said and not (tmp_path / "b").exists()


@pytest.mark.parametrize("kind", ["fifo", "nested fifo", "socket"])
@pytest.mark.parametrize("report", [True, False])
def test_pack_refuses_a_pipe_or_socket_in_the_onnx_folder_and_never_opens_it(tiny_onnx, tmp_path, kind, report,
                                                                              monkeypatch):
    """A named pipe or a socket in the folder was left out of the bundle without a word (only links were refused).
    It is refused, named with the fix, before any file is read or written; a pipe opened would block the command."""
    import shutil
    import socket

    d = shutil.copytree(tiny_onnx, tmp_path / "odd")
    name = {"fifo": "notes.txt", "nested fifo": "extra/tokenizer_config.json", "socket": "s"}[kind]
    (d / name).parent.mkdir(exist_ok=True)
    if kind == "socket":  # bound by a name relative to its folder: an AF_UNIX path holds about 100 bytes at most
        monkeypatch.chdir(d)
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(name)
        monkeypatch.undo()
    else:
        os.mkfifo(d / name)
    try:
        r = _pack(d, tmp_path, *(() if report else ("--no-report",)))
    finally:
        if kind == "socket":
            sock.close()
    said = " ".join(r.output.split())
    what = "a socket" if kind == "socket" else "a named pipe (FIFO)"
    assert r.exit_code == 1 and f"'{d / name}' in the ONNX directory '{d}' is {what}" in said, r.output
    assert f"remove '{name}' or move it out of '{d}'" in said and "Traceback" not in said
    assert not (tmp_path / "b").exists()


def test_the_onnx_memory_estimate_holds_past_and_present_kv_at_the_graphs_type(tiny_onnx, tmp_path):
    """The manifest priced an ONNX model's KV cache at f16 and once, while the traced graph carries it as float32
    (past_*/present_* are tensor(float)) and the engine holds the past it feeds and the present it gets back in
    every forward: each context's need counts 2 (past, present) x 2 (K, V) x layers x context x KV heads x head dim
    x 4 bytes."""
    import onnx

    graph = onnx.load(str(tiny_onnx / "model.onnx"), load_external_data=False).graph
    past = next(i for i in graph.input if i.name == "past_key_values.0.key")
    assert past.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    r = _pack(tiny_onnx, tmp_path)
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    mem, model = man["memory"], man["model"]
    layers, kv_heads, head_dim = model["n_layers"], model["n_head_kv"], model["head_dim"]
    assert (layers, kv_heads, head_dim) == (2, 2, 16)
    weights = sum(f["size"] for f in man["files"] if f["role"] == "model")
    assert mem["by_context"] and mem["method"] == "estimate/weights+kv_past_present+compute/2"
    for ctx, need in mem["by_context"].items():
        kv = 2 * 2 * layers * int(ctx) * kv_heads * head_dim * 4
        assert need == weights + kv + model["vocab_size"] * 512 * 4 + (64 << 20), ctx
    text = CliRunner().invoke(cli, ["inspect", str(tmp_path / "b")], catch_exceptions=False).output
    assert "memory     (estimate/weights+kv_past_present+compute/2)" in text, text


def test_pack_refuses_an_onnx_folder_whose_graph_lacks_the_past_input_its_config_names(tiny_onnx, tmp_path):
    """The KV cache's type is read from the graph genai_config.json names: a config naming a past input the graph
    does not have (the ONNX engine refuses it at load) is refused by name, not priced at a guess."""
    import shutil

    d = shutil.copytree(tiny_onnx, tmp_path / "renamed")
    cfg = json.loads((d / "genai_config.json").read_text())
    cfg["model"]["decoder"]["inputs"]["past_key_names"] = "past.%d.key"
    (d / "genai_config.json").write_text(json.dumps(cfg))
    r = _pack(d, tmp_path, "--no-report")
    said = " ".join(r.output.split())
    assert r.exit_code == 1 and "has no input 'past.0.key'" in said and "Traceback" not in said, r.output
    assert not (tmp_path / "b").exists()


def _truncate(path: Path, size: int) -> None:
    os.truncate(path, size)


def _external(key: str, value: str):
    from onnx_tiny import set_external

    return lambda d: set_external(d / "model.onnx", key, value)


UNLOADABLE = {
    "no weights file": (lambda d: (d / "model.onnx.data").unlink(), "'model.onnx.data', which is missing"),
    "weights at /etc/passwd": (_external("location", "/etc/passwd"), "'/etc/passwd', an absolute path"),
    "an offset of 2^62": (_external("offset", str(2**62)), "at bytes 4,611,686,018,427,387,904 to"),
    "a truncated weights file": (lambda d: _truncate(d / "model.onnx.data", 1000), "past the end of its 1,000 bytes"),
    "no tokenizer.json": (lambda d: (d / "tokenizer.json").unlink(), "has no tokenizer.json"),
}


@pytest.mark.parametrize("case", list(UNLOADABLE))
def test_pack_refuses_an_onnx_folder_the_engine_cannot_load_with_or_without_a_report(tiny_onnx, tmp_path, case):
    """Without report.json (a builder's folder, a copy without it) or with --no-report, pack checked only
    genai_config.json: a folder without its weights or tokenizer, or whose graph points at /etc/passwd or past the
    end of its data file, became a bundle that passed verify and install and failed at its first run on every
    device. The folder is checked as the engine loads it, the bad file named, and nothing is written."""
    import shutil

    d = shutil.copytree(tiny_onnx, tmp_path / "broken")
    (d / "report.json").unlink()
    change, says = UNLOADABLE[case]
    change(d)
    for extra in ((), ("--no-report",)):
        r = _pack(d, tmp_path, *extra)
        said = " ".join(r.output.split())
        assert r.exit_code == 1 and says in said and "Traceback" not in said, r.output
        assert "Fix:" in said and not (tmp_path / "b").exists()
