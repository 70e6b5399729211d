"""`edgemed convert` / `check` on an install without the workstation packages: the one-paragraph
"install the extra" message and exit code 1, never a ModuleNotFoundError traceback.

Each case runs the CLI in a child process whose import system refuses the hidden packages (and their
submodules) as an install without them would.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Installed before edgemed is imported: the hidden top-level packages raise ModuleNotFoundError.
PRELUDE = textwrap.dedent('''
    import sys

    class Hide:
        def __init__(self, names):
            self.names = set(names)

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.names:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Hide(sys.argv[1].split(",")))
    sys.argv = ["edgemed", *sys.argv[2:]]
    from edgemed.cli import main
    main()
''')


def _edgemed_without(hidden: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE, hidden, *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture
def checkpoint_dir(tmp_path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    return d


def _assert_one_paragraph(r: subprocess.CompletedProcess, module: str, extra: str = "convert") -> None:
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "Traceback" not in out and "ModuleNotFoundError" not in out, out
    assert f"'{module}'" in out and f"pip install 'edgemed[{extra}]'" in out, out


@pytest.mark.parametrize("hidden, first", [("gguf,torch", "gguf"), ("gguf", "gguf"), ("torch", "torch")])
def test_convert_to_gguf_names_the_extra(checkpoint_dir, tmp_path, hidden, first):
    r = _edgemed_without(hidden, "convert", checkpoint_dir, "-o", tmp_path / "m.gguf")
    _assert_one_paragraph(r, first)
    assert not (tmp_path / "m.gguf").exists()


def test_convert_to_onnx_needs_torch_not_gguf(checkpoint_dir, tmp_path):
    r = _edgemed_without("gguf,torch", "convert", checkpoint_dir, "--to", "onnx", "-o", tmp_path / "m-onnx")
    _assert_one_paragraph(r, "torch")


def test_convert_with_no_source_asks_for_the_extra_before_making_the_default_model():
    _assert_one_paragraph(_edgemed_without("gguf,torch", "convert"), "gguf")


def test_check_names_the_extra(checkpoint_dir, tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    _assert_one_paragraph(_edgemed_without("gguf,torch", "check", checkpoint_dir, model), "gguf")
    _assert_one_paragraph(_edgemed_without("torch", "check", checkpoint_dir, model), "torch")


def test_converter_modules_import_as_missing_dependency_not_module_not_found():
    """Code that imports the converters directly (benchmarks, scripts) meets the same error type."""
    code = PRELUDE.split("sys.argv =")[0] + textwrap.dedent('''
        from edgemed.errors import MissingDependency
        import edgemed.converters.arch.llama, edgemed.converters.gguf.tokenizer  # tables and tokenizer.json reading: no gguf
        try:
            import edgemed.converters.gguf.writer
        except MissingDependency as exc:
            print("ok", exc.module, exc.extra)
    ''')
    r = subprocess.run([sys.executable, "-c", code, "gguf,numpy,torch"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok gguf convert", r.stdout + r.stderr
