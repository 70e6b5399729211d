"""The shipped calibration text: not evaluation data, not the divergence passages, licensed, installed."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from conftest import EVAL_DATA, need_converter, need_shared_data
from edgemed.converters.gguf import calibration

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "converters" / "data" / "calibration"
TEST_SPLIT = EVAL_DATA / "pubmedqa-test-split" / "test_ground_truth.json"  # PubMedQA's 500 test PMIDs, MIT
SHINGLE = 8  # words: a shared run this long would be copied text, not shared medical phrasing


def _sources() -> dict[str, list[str]]:
    return json.loads(calibration.shipped("sources.json").read_text(encoding="utf-8"))


def _build():
    spec = importlib.util.spec_from_file_location("calibration_build", DATA / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(words[i:i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}


def test_shipped_files_are_installed_with_their_licence():
    for name in ("medical.txt", "medical-search.txt", "sources.json", "README.md", "LICENSE"):
        assert calibration.shipped(name).is_file(), name
    assert "MIT License" in calibration.shipped("LICENSE").read_text(encoding="utf-8")
    readme = calibration.shipped("README.md").read_text(encoding="utf-8")
    assert "pubmedqa/pubmedqa @ 1cbae8e9" in readme and "test split" in readme
    # what pyproject's package-data ships: every file above matches one of its globs
    import fnmatch

    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["edgemed.converters"]
    for f in DATA.iterdir():
        if f.is_file() and f.suffix != ".py":  # not __pycache__, left by loading build.py
            assert any(fnmatch.fnmatch(f"data/calibration/{f.name}", g) for g in globs), f.name


def test_each_text_holds_exactly_its_listed_abstracts():
    sources = _sources()
    assert set(sources) == {"medical.txt", "medical-search.txt"}
    assert not set(sources["medical.txt"]) & set(sources["medical-search.txt"])
    for name, pmids in sources.items():
        assert len(calibration.passages(calibration.shipped(name))) == len(pmids) == len(set(pmids))


def _shipped_text() -> str:
    return "".join(calibration.shipped(n).read_text(encoding="utf-8") for n in ("medical.txt", "medical-search.txt"))


def test_no_test_split_pmid():
    """The leakage guard, in every clone: no calibration abstract is one of PubMedQA's official test split (the
    evaluation data), by the repo's copy of its 500 PMIDs; and no test abstract of the repo's sample is in the text,
    whatever the PMID list says."""
    test = json.loads(TEST_SPLIT.read_text(encoding="utf-8"))
    assert len(test) == 500 and set(test.values()) == {"yes", "no", "maybe"}
    sources = _sources()
    shipped = sources["medical.txt"] + sources["medical-search.txt"]
    assert not set(shipped) & set(test)
    sample = json.loads((EVAL_DATA / "sample" / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8"))
    sample_test = [p for p in sample if p in test]
    assert len(sample_test) == 32
    text = _shipped_text()
    assert not any(_build().abstract(sample[p])[:200] in text for p in sample_test)


def test_the_text_is_what_the_rule_gives():
    """Where the whole PQA-L file is at hand: the shipped text is exactly what build.py's rule draws from it, and no
    test abstract of the 500 is in it."""
    pqal_file = need_shared_data("pubmedqa/ori_pqal.json", "the rule draws from all 1,000 PQA-L abstracts")
    pqal = json.loads(pqal_file.read_text(encoding="utf-8"))
    test = json.loads(TEST_SPLIT.read_text(encoding="utf-8"))
    sources = _sources()
    build = _build()
    assert list(build.select(pqal, test)) == [sources["medical.txt"], sources["medical-search.txt"]]
    for name, pmids in sources.items():
        assert calibration.shipped(name).read_text(encoding="utf-8") == build.texts(pqal, pmids)
    # and no test abstract's text is in them, whatever the PMID list says
    text = _shipped_text()
    assert not any(build.abstract(pqal[p])[:200] in text for p in test)


def test_no_overlap_with_the_divergence_passages():
    divergence = (ROOT / "benchmarks" / "harness" / "data" / "medical_text.txt").read_text(encoding="utf-8")
    held_out = _shingles("\n".join(line for line in divergence.splitlines() if not line.startswith("#")))
    for name in ("medical.txt", "medical-search.txt"):
        shared = _shingles(calibration.shipped(name).read_text(encoding="utf-8")) & held_out
        assert not shared, (name, sorted(shared)[:3])


def test_imatrix_from_medical_names_the_shipped_text(tmp_path):
    from edgemed.errors import InputError

    assert calibration.resolve("medical") == calibration.shipped("medical.txt")
    own = tmp_path / "notes.txt"
    own.write_text("Fever and cough.\n")
    assert calibration.resolve(own) == own
    with pytest.raises(InputError, match="does not exist"):
        calibration.resolve(tmp_path / "missing.txt")
    with pytest.raises(InputError):
        calibration.resolve("medical-search")  # the search text stays held out of the importance matrix


def test_convert_imatrix_from_medical(tmp_path):
    """`--imatrix-from medical` calibrates on the shipped text."""
    from click.testing import CliRunner

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny

    from edgemed.cli import cli

    model = tiny.build_model(tmp_path / "llama", "llama")
    out = tmp_path / "x.gguf"
    result = CliRunner().invoke(cli, ["convert", str(model), "--quant", "q4_0", "--imatrix-from", "medical",
                                      "--no-parity", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "medical.txt" in result.output and out.is_file()


def test_4bit_conversions_are_calibrated_on_the_shipped_text_by_default(tmp_path):
    """q4_0 / q4_k_m / auto use the shipped medical text unless told otherwise; --no-imatrix is the plain recipe,
    q8_0 and float types stay plain, and a contradiction or a matrix for unquantized output is refused."""
    from click.testing import CliRunner

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny

    from edgemed.cli import cli
    from edgemed.files.hashing import file_sha256

    model = tiny.build_model(tmp_path / "llama", "llama")

    def convert(name, *args):
        out = tmp_path / f"{name}.gguf"
        result = CliRunner().invoke(cli, ["convert", str(model), *args, "--no-parity", "-o", str(out)])
        report = json.loads(Path(f"{out}.report.json").read_text()) if result.exit_code == 0 else None
        return result, report

    medical = calibration.shipped("medical.txt")
    result, report = convert("default", "--quant", "q4_0")
    assert result.exit_code == 0, result.output
    assert report["imatrix"]["text"] == "medical.txt" and report["imatrix"]["sha256"] == file_sha256(medical)
    assert "imatrix" in report["timings_s"]
    result, report = convert("plain", "--quant", "q4_0", "--no-imatrix")
    assert result.exit_code == 0, result.output
    assert "imatrix" not in report and "imatrix" not in report["timings_s"]
    for quant in ("q8_0", "f16"):
        result, report = convert(quant, "--quant", quant)
        assert result.exit_code == 0 and "imatrix" not in report, result.output
    result, _ = convert("both", "--quant", "q4_0", "--no-imatrix", "--imatrix-from", "medical")
    assert result.exit_code == 1 and "contradict each other" in result.output
    result, _ = convert("float", "--quant", "f16", "--imatrix-from", "medical")
    assert result.exit_code == 1 and "F16 output is not quantized" in result.output
    assert not (tmp_path / "both.gguf").exists() and not (tmp_path / "float.gguf").exists()
    assert calibration.default_imatrix("q4_k_m") == medical and calibration.default_imatrix("auto") == medical
    assert calibration.default_imatrix("q5_k_m") is None and calibration.default_imatrix("q8_0") is None


def test_imatrix_flags_are_refused_with_onnx_output(tmp_path):
    """ONNX int4 has its own quantizer: the GGUF calibration flags are refused there, before any work."""
    need_converter("torch", "transformers", "onnx", "onnxruntime")  # without them the missing extra is named first
    from click.testing import CliRunner

    from edgemed.cli import cli

    for flag in (["--imatrix-from", "medical"], ["--no-imatrix"]):
        result = CliRunner().invoke(cli, ["convert", str(tmp_path / "missing"), "--to", "onnx", *flag,
                                          "-o", str(tmp_path / "x")])
        assert result.exit_code == 1 and "ONNX int4 has its own recipe" in result.output, result.output
    assert list(tmp_path.iterdir()) == []
