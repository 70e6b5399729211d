"""The conversion budget is scored and quoted for the conversion that runs: benchmarks/convert_memory estimates each
route with the settings `edgemed convert` runs it with (a 4-bit type's default importance matrix included), records
them and the estimator in its JSON, and will not rescore a file another estimator scored unless told to; check_onnx's
`--to gguf` suggestion quotes the estimate of the default GGUF conversion, importance matrix and all."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from conftest import need_converter
from edgemed.benchmarks import convert_memory
from edgemed.benchmarks.shaped_checkpoint import shape_config
from edgemed.converters.budget import peaks
from edgemed.converters.budget.peaks import GIB, Dims, estimate_gguf, estimate_onnx

#: the estimator a test says is running (the real one hashes the working tree, which other work may change)
NOW = {"method": peaks.METHOD, "commit": "c" * 40, "changed": {}}
#: an estimator of another commit
OTHER = {"method": peaks.METHOD, "commit": "a" * 40, "changed": {}}
SEVEN_B = Dims.from_config(shape_config("r1-distill-qwen-7b"))  # config.json alone: no weights


class _Stop(Exception):
    """Raised where the command would start converting: its options have been taken."""


def _options(monkeypatch, tmp_path, args: list[str]):
    """The options `edgemed convert SOURCE ARGS` hands its route (where the route's budget hook reads them)."""
    need_converter()
    from edgemed.cli import cli
    from edgemed.converters import pipeline
    from edgemed.converters.onnx import export

    seen = []

    def take(source, out, opts, *a, **kw):
        seen.append(opts)
        raise _Stop

    monkeypatch.setattr(pipeline, "convert", take)
    monkeypatch.setattr(export, "convert_onnx", take)
    source = tmp_path / "checkpoint"
    source.mkdir(exist_ok=True)
    result = CliRunner().invoke(cli, ["convert", str(source), *args, "-o", str(tmp_path / "out"), "--force", "--json"])
    assert isinstance(result.exception, _Stop), result.output
    return seen[0]


def _hook_settings(opts, route: str) -> dict:
    """What the route's budget hook estimates a conversion with these options with."""
    return {"route": route, **(peaks.gguf_settings(opts) if route == "gguf" else peaks.onnx_settings(opts))}


def _on_7b(monkeypatch) -> None:
    """``estimate_for_dir`` on the 7B shape's config, whatever the directory (the estimator itself, no checkpoint)."""
    def estimate(path, route, **kw):
        return (estimate_gguf if route == "gguf" else estimate_onnx)(SEVEN_B, **kw)

    monkeypatch.setattr(peaks, "estimate_for_dir", estimate)


def _row(route: str, score: dict | None = None) -> dict:
    row = {"route": route, "peak_anon": 2 * GIB, "peak_file": GIB, "peak_sampled_rss": 3 * GIB, "vmhwm_sampled": 3 * GIB,
           "steps": {}, "wall_s": 1.0}
    return row | ({"score": score} if score is not None else {})


@pytest.mark.parametrize("name", list(convert_memory.ROUTES))
def test_each_route_is_estimated_with_the_settings_its_conversion_runs_with(monkeypatch, tmp_path, name):
    """The command's own defaults (read from the options it builds), not a copy: gguf-q4_k_m is calibrated."""
    args, settings = convert_memory.ROUTES[name]
    hook = _hook_settings(_options(monkeypatch, tmp_path, args), args[args.index("--to") + 1])
    _on_7b(monkeypatch)
    scored = convert_memory.score(_row(name), tmp_path, NOW)
    expected = peaks.estimate_for_dir(tmp_path, **hook).to_dict()
    assert scored["estimate"] == expected, (name, scored["estimate"]["route"], expected["route"])
    assert settings == hook and scored["settings"] == hook and scored["estimator"] == NOW
    if name == "gguf-q4_k_m":  # the default Q4_K_M conversion computes an importance matrix
        assert hook["imatrix"] is True and "imatrix" in scored["estimate"]["steps"]


def test_a_route_flag_the_estimate_does_not_follow_is_refused():
    with pytest.raises(SystemExit):
        convert_memory.convert_settings(["--to", "gguf", "--max-kld", "0.01"])
    assert convert_memory.convert_settings(["--to", "gguf", "--quant", "q4_0", "--no-imatrix"])["imatrix"] is False


def _stored(path, rows: list[dict]) -> str:
    text = json.dumps({"model": "m", "checkpoint": str(path.parent), "rows": rows}, indent=1) + "\n"
    path.write_text(text)
    return text


def test_rescore_refuses_a_file_another_estimator_scored(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(convert_memory, "estimator_state", lambda: NOW)
    _on_7b(monkeypatch)
    stored = tmp_path / "convert_memory-m.json"
    for before in (OTHER, None):  # another commit's estimator; a file from before estimates named theirs
        old = {"estimator": before, "estimate": {"resident": 1}} if before else {"estimate": {"resident": 1}}
        text = _stored(stored, [_row("gguf-q4_k_m", old), _row("gguf-f16", {"estimator": NOW, "estimate": {}})])
        with pytest.raises(SystemExit) as refused:
            convert_memory.main(["--rescore", str(stored)])
        said = str(refused.value)
        assert "gguf-q4_k_m" in said and "gguf-f16" not in said.split("Fix:")[0] and "--rescore-anyway" in said
        assert ("a" * 12 if before else "did not name itself") in said and "c" * 12 in said
        assert stored.read_text() == text  # nothing written

    convert_memory.main(["--rescore", str(stored), "--rescore-anyway"])  # told explicitly: rescored, and said so
    rows = {r["route"]: r["score"] for r in json.loads(stored.read_text())["rows"]}
    assert rows["gguf-q4_k_m"]["estimator"] == NOW and rows["gguf-q4_k_m"]["rescored_from"] is None
    assert rows["gguf-q4_k_m"]["estimate"]["method"] == peaks.METHOD and "rescored_from" not in rows["gguf-f16"]
    convert_memory.main(["--rescore", str(stored)])  # every row this estimator's now: no consent needed
    capsys.readouterr()


def test_a_run_scores_its_routes_and_keeps_the_other_rows_scores(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(convert_memory, "estimator_state", lambda: NOW)
    monkeypatch.setattr(convert_memory, "_run", lambda model_dir, name, work, kill_above=None: _row(name))
    _on_7b(monkeypatch)
    out = tmp_path / "result.json"
    kept = {"estimator": OTHER, "estimate": {"resident": 5}, "ratio_anon": 1.2, "ratio_total": 1.1, "steps": {}}
    kept["estimate"] |= {"rss": 6, "biggest": "x"}
    _stored(out, [_row("onnx-int4", kept)])
    convert_memory.main(["--model", str(tmp_path), "--routes", "gguf-q4_k_m", "-o", str(out)])
    rows = {r["route"]: r["score"] for r in json.loads(out.read_text())["rows"]}
    assert rows["onnx-int4"] == kept  # measured by other code: its own estimate stays
    assert rows["gguf-q4_k_m"]["estimator"] == NOW and rows["gguf-q4_k_m"]["settings"]["imatrix"] is True
    capsys.readouterr()


def test_the_estimator_names_itself():
    state = convert_memory.estimator_state()
    assert state["method"] == peaks.METHOD and (state["commit"] is None or len(state["commit"]) == 40)
    assert all(v is None or len(v) == 64 for v in state["changed"].values())


def test_check_onnx_suggests_gguf_at_the_default_conversions_peak(monkeypatch, tmp_path):
    """The `--to gguf (Q4_K_M)` fix quotes the estimate of `edgemed convert --to gguf` as it runs by default (its
    importance matrix), which for the 7B shape is not the plain recipe's figure."""
    from edgemed.converters.onnx.export import OnnxOptions
    from edgemed.errors import InputError

    default = peaks.gguf_settings(_options(monkeypatch, tmp_path, ["--to", "gguf"]))
    assert default["imatrix"] is True
    calibrated = estimate_gguf(SEVEN_B, **default)
    plain = estimate_gguf(SEVEN_B, **default | {"imatrix": False})
    assert f"{calibrated.resident / GIB:.1f}" != f"{plain.resident / GIB:.1f}"  # else this test could not tell them apart
    checkpoint = SimpleNamespace(config=SEVEN_B.config, tensors=None, source_dtype=lambda: "BF16", weight_files=lambda: ())
    with pytest.raises(InputError) as refused:
        peaks.check_onnx(SimpleNamespace(checkpoint=checkpoint, adapter=None), OnnxOptions(memory_budget="24GiB"))
    assert f"--to gguf ({default['out_type'].upper()}) (peak {calibrated.resident / GIB:.1f} GiB)" in refused.value.fix
