"""Untrusted templates render with limits on time, output, memory and recursion.

Chat templates (``runtime/chat_template.py``) and edgemed's own prompt templates
(``templates/sandbox.py``) both render in the limited renderer process (``templates/limits.py``);
a template that breaks a limit is a ``TemplateError`` in bounded time, and the next render works.
``edgemed run`` on a GGUF whose chat template is hostile, empty or broken ends with a clear error.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgemed.cli import cli
from edgemed.errors import InputError, TemplateError
from edgemed.runtime.chat_template import render
from edgemed.templates import limits
from edgemed.templates.sandbox import render as render_prompt

HI = [{"role": "user", "content": "hi"}]
LOOP = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"


def doubling(k: int) -> str:
    """A string of 2**k characters, built by doubling (each step is one C-level concatenation)."""
    return "{% set n = namespace(s='x') %}{% for i in range(" + str(k) + ") %}{% set n.s = n.s ~ n.s %}{% endfor %}{{ n.s }}"

RECURSION = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"
#: a bound a limit must be enforced within (the limit is 1 s; slack for a loaded CI machine)
BOUNDED_S = 10
#: the time limit for the cases that test another limit: building a 256 MiB string takes 0.2-0.6 s on a
#: quiet 2-core box and can pass 1 s on a loaded one, where the time limit would be reached first
OTHER_LIMIT_S = 5.0


def with_chat_template(src: Path, dst: Path, template: str) -> Path:
    """A copy of the GGUF ``src`` (every key and tensor) whose ``tokenizer.chat_template`` is ``template``."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch, endianess=reader.endianess)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the writer writes the header and the architecture itself
        value = template if name == "tokenizer.chat_template" else field.contents()
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    return dst


def timed(fn, *args, **kwargs):
    start = time.monotonic()
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # the test looks at what was raised, and when
        return exc, time.monotonic() - start
    return None, time.monotonic() - start


# -- the limits ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source, reason", [
    (LOOP, "ran longer than 1 s"),                                      # a loop that neither calls nor outputs
    ("{% set l = range(99999)|list %}{% for a in l %}{% for b in l %}{% endfor %}{% endfor %}", "ran longer"),
    pytest.param(doubling(27), "produced more than", id="doubling-output"),  # a 128 MiB string, output
    pytest.param(doubling(40), "MiB of memory", id="doubling-memory"),      # a string that cannot fit
    ("{{ 'x' * 100000000 }}", "beyond the limits"),                     # refused before it is built
    ("{{ 2 ** 100000000 }}", "beyond the limits"),
    ("{{ 'x'|center(900000000) }}", "MiB of memory"),                   # a filter: not interceptable
    ("{% for i in range(99999) %}{{ 'ten chars!' * 2 }}{% endfor %}", "produced more than 1,048,576"),
    (RECURSION, "recursed deeper than"),
    ("{{" + "(" * 20000 + "1" + ")" * 20000 + "}}", "recursed deeper than"),  # the parser recurses too
    ("{{ 2.0 ** 5000 }}", "OverflowError"),
    ("{{ 1 // 0 }}", "ZeroDivisionError"),
    ("{% for m in messages %}", "syntax error (line 1"),
])
def test_a_hostile_chat_template_is_a_template_error_in_bounded_time(source, reason):
    seconds = 1.0 if "ran longer" in reason else OTHER_LIMIT_S  # so the limit under test is the one reached
    exc, took = timed(render, source, HI, seconds=seconds)
    assert isinstance(exc, TemplateError) and reason in str(exc), exc
    assert "chat template" in str(exc) and "--raw" in str(exc)  # names the culprit and the way around it
    assert took < BOUNDED_S
    assert render("{{ messages[0].content }}!", HI) == "hi!"  # the next render works


def test_a_template_stuck_past_the_alarm_is_killed_and_replaced(monkeypatch):
    """What the worker's own alarm cannot stop (a long C call) the owner stops: here the owner's deadline is
    made to fall before the alarm, so the kill path is the one taken."""
    killed = []  # (pid, how it ended) of each renderer process this side killed
    real_kill = limits._Worker.kill

    def kill(worker):
        real_kill(worker)
        killed.append((worker.proc.pid, worker.proc.returncode))

    monkeypatch.setattr(limits._Worker, "kill", kill)
    monkeypatch.setattr(limits, "GRACE_SECONDS", -0.8)
    exc, took = timed(render, LOOP, HI)
    assert isinstance(exc, TemplateError) and "ran longer than 1 s" in str(exc)
    assert [code for _, code in killed] == [-signal.SIGKILL], killed  # still rendering at the deadline: killed
    assert took < BOUNDED_S
    monkeypatch.undo()
    assert render("{{ messages[0].content }}", HI) == "hi"
    assert killed[0][0] not in {w.proc.pid for w in limits._POOL.idle}  # rendered by a fresh process


def test_output_limit_grows_with_the_input():
    long = [{"role": "user", "content": "y" * (2 * limits.MAX_OUTPUT_CHARS)}]
    assert len(render("{{ messages[0].content }}{{ messages[0].content }}", long)) == 4 * limits.MAX_OUTPUT_CHARS
    with pytest.raises(TemplateError, match="produced more than"):
        render("{{ messages[0].content }}", HI, max_output=1)


def test_control_characters_up_to_the_output_limit_render():
    """The reply frame is JSON, where a control character takes 6 bytes (\\u0001): text within the output limit
    comes back whole, not as a crashed renderer."""
    text = limits.render('{{ "\\x01" * 1000000 }}', {}, flavor="prompt")
    assert text == "\x01" * 1_000_000


def test_empty_render_and_refusal_and_bad_text():
    with pytest.raises(TemplateError, match="rendered an empty prompt"):
        render("{% if false %}x{% endif %}  \n", HI)
    with pytest.raises(InputError, match="refused the conversation: roles must alternate") as refused:
        render("{{ raise_exception('roles must alternate') }}", HI)
    assert not isinstance(refused.value, TemplateError)  # the conversation is at fault, not the template
    with pytest.raises(InputError, match="not valid Unicode"):
        render("{{ messages[0].content }}", [{"role": "user", "content": "\ud800"}])


def test_the_real_smollm2_template_renders_as_before(smollm2_gguf):
    from edgemed.packaging.facts import chat_template

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a vitamin."}]
    got = render(chat_template(smollm2_gguf), messages)
    assert got == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a vitamin.<|im_end|>\n"
                   "<|im_start|>assistant\n")


def test_prompt_templates_have_the_same_limits():
    where = "template 'evil' (tpl/evil.toml)"
    for source, reason in ((LOOP, "ran longer than 1 s"), (RECURSION, "recursed deeper"),
                           (doubling(24), "produced more than")):  # 16 MiB: built long before 1 s
        exc, took = timed(render_prompt, source, {}, where)
        assert isinstance(exc, TemplateError) and where in str(exc) and reason in str(exc), exc
        assert took < BOUNDED_S
    with pytest.raises(TemplateError, match="needs|undefined"):
        render_prompt("{{ question }}", {}, where)
    assert render_prompt("Q: {{ question }}", {"question": "why?"}, where) == "Q: why?"


# -- edgemed run ---------------------------------------------------------------------------------------
BROKEN = {
    "empty": ("{% if false %}never{% endif %}", "rendered an empty prompt"),
    "syntax": ("{% for m in messages %}{{ m.content }}", "syntax error"),
    "loop": (LOOP, "ran longer than 1 s"),
    "big": (doubling(24), "produced more than"),  # 16 MiB, 16x the output limit, built long before 1 s
}


@pytest.fixture(scope="module")
def broken_ggufs(smollm2_gguf, tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken")
    return {name: with_chat_template(smollm2_gguf, folder / f"{name}.gguf", source)
            for name, (source, _) in BROKEN.items()}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_run_with_a_broken_chat_template_is_a_clear_error(broken_ggufs, name):
    """In a process of its own, with a timeout: before, the loop hung `run` and the big string aborted it."""
    args = ["run", str(broken_ggufs[name]), "--prompt", "hi", "--max-tokens", "4", "--ctx", "256", "--threads", "1"]
    code = "from edgemed.cli import main; main()"
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert BROKEN[name][1] in done.stderr and "Fix:" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("name", ["syntax", "empty"])
def test_raw_needs_no_chat_template(broken_ggufs, name):
    result = CliRunner().invoke(cli, ["run", str(broken_ggufs[name]), "--raw", "--prompt", "The heart has",
                                      "--max-tokens", "4", "--ctx", "256", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.strip()


def test_raw_refuses_options_that_need_the_chat_template(tmp_path):
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "m.gguf"), "--raw", "--system", "x", "--prompt", "hi"])
    assert result.exit_code == 1 and "--system cannot be used with it" in result.output
