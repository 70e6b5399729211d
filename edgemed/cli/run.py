"""``edgemed run``: answer one prompt, or one templated medical question, with a model file, streaming."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgemed.cli import echo_json_result, json_flag
from edgemed.formats.nesting import TooDeep, loads_json


#: ``--seed`` of ``run`` and ``chat``: one definition, so both take and check a seed alike (``engine.check_seed``,
#: called before the model loads)
seed_option = click.option("--seed", default=0, show_default=True,
                           help="Sampling seed (with --temperature above 0): the same seed and prompt give the same "
                           "answer again.")

#: One line of an ``--item-json`` JSONL file (one question and its options) is read up to this many bytes
MAX_ITEM_LINE_BYTES = 1 << 20


def _line(fh, wanted: int) -> bytes | None:
    """Line ``wanted`` (1-based) of the binary file ``fh``, newline included, or None when the file has fewer lines.
    Never more than ``MAX_ITEM_LINE_BYTES + 1`` bytes are held: a longer line before it is skipped block by block,
    and the line itself is cut there (the caller refuses it)."""
    number = 0
    while True:
        raw = fh.readline(MAX_ITEM_LINE_BYTES + 1)
        if not raw:
            return None
        number += 1
        if number == wanted:
            return raw
        while not raw.endswith(b"\n"):  # the rest of a long line
            raw = fh.readline(MAX_ITEM_LINE_BYTES + 1)
            if not raw:
                return None


def _item(value: str) -> dict:
    """``--item-json``: a JSON object, or ``PATH`` / ``PATH:LINE`` of a JSONL file (line 1-based)."""
    from edgemed.errors import InputError

    text = value.strip()
    if not text.startswith("{"):
        from edgemed.formats.input_file import open_regular

        path, _, line = text.rpartition(":") if ":" in text and text.rsplit(":", 1)[1].isdigit() else (text, "", "1")
        if int(line) < 1:
            raise InputError(f"--item-json '{value}': lines are counted from 1.", f"pass {path}:1 for the first line")
        try:  # a regular file only (a FIFO would block, /dev/zero never end), read line by line up to LINE
            with open_regular(Path(path)) as fh:
                found = _line(fh, int(line))
                if found is not None and len(found.removesuffix(b"\n")) > MAX_ITEM_LINE_BYTES:
                    raise InputError(f"--item-json '{value}': line {line} of '{path}' is longer than "
                                     f"{MAX_ITEM_LINE_BYTES >> 20} MiB, far more than one question and its options.",
                                     "pass a JSONL file with one item per line (a line number that holds one item)")
                found = found.decode("utf-8") if found is not None else None
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise InputError(f"--item-json '{value}': cannot read '{path}' ({why}).",
                             "pass one MedMCQA JSONL line, or test.jsonl:LINE") from None
        if found is None:
            raise InputError(f"--item-json '{value}': '{path}' has fewer than {line} lines.",
                             "pass a line number the file has (counted from 1)")
        text = found
    text = typed_text(text, "--item-json")
    try:
        item = loads_json(text, finite=True)
    except (json.JSONDecodeError, TooDeep) as exc:
        raise InputError(f"--item-json is not valid JSON ({exc}).", "pass one line of a MedMCQA-style JSONL file") from None
    except ValueError as exc:  # NaN, Infinity, 1e999: an option's text, or an answer `run --json` could not write back
        raise InputError(f"--item-json is not plain JSON: {exc}.",
                         "write each option and the answer_idx as a quoted string, as MedMCQA's JSONL lines do") from None
    if not isinstance(item, dict):
        raise InputError("--item-json must be a JSON object.", "pass one line of a MedMCQA-style JSONL file")
    return item


#: A text option's value read from a file (``@PATH``) or standard input (``@-``) is read up to this many bytes
MAX_TEXT_BYTES = 4 << 20


class TextSource:
    """Where a text option's value comes from. Patient details typed on the command line are in every local user's
    ``ps`` (``/proc/PID/cmdline`` is world-readable) and in the shell's history; ``@PATH`` reads the value from a file
    and ``@-`` from standard input (once per run), as curl reads ``-d @file``; ``@@...`` is a text that starts with
    one ``@``."""

    def __init__(self):
        self.stdin_by: str | None = None  # the option that took standard input

    def __call__(self, option: str, value: str | None) -> str | None:
        from edgemed.errors import InputError

        if value is None or not value.startswith("@"):
            return value if value is None else typed_text(value, f"The text of {option}")
        if value.startswith("@@"):
            return typed_text(value[1:], f"The text of {option}")
        if value == "@-":
            if self.stdin_by is not None:
                raise InputError(f"{option} and {self.stdin_by} both ask for standard input (@-), which holds one text.",
                                 f"pass one of them from a file instead: {option} @PATH")
            self.stdin_by = option
            return _read_text(sys.stdin.buffer, f"The text of {option} on standard input")
        import os
        import stat

        from edgemed.formats.input_file import open_regular

        path = Path(value[1:])
        try:  # a file, or a pipe the shell made (-i note=@<(decrypt note.gpg)): no copy of the text on disk
            opened = open(path, "rb") if stat.S_ISFIFO(os.stat(path).st_mode) else open_regular(path)
            with opened as fh:
                return _read_text(fh, f"The text of {option} in '{path}'")
        except OSError as exc:
            raise InputError(f"{option} @{path}: cannot read '{path}' ({exc.strerror or exc}).",
                             "pass a text file's path after @ (or @- for standard input); to send a text that starts "
                             "with @, write @@") from None


def _read_text(fh, what: str) -> str:
    """Text read from ``fh`` (standard input, a file): bounded, and UTF-8 (a binary file passed by mistake is named,
    not a traceback). ``what`` starts the messages: "The prompt on standard input"."""
    from edgemed.errors import InputError

    data = fh.read(MAX_TEXT_BYTES + 1)
    if len(data) > MAX_TEXT_BYTES:
        raise InputError(f"{what} is over {MAX_TEXT_BYTES >> 20} MiB.",
                         "pass only what the model should read (a model reads a few thousand tokens at most)")
    return _utf8(data, what, "pass a text file saved as UTF-8")


def _utf8(data: bytes, what: str, fix: str) -> str:
    from edgemed.errors import InputError

    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} is not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x}).", fix) from None


def typed_text(text: str, what: str, fix: str = "save it as UTF-8 and pass it from the file (@PATH), or set the "
               "terminal to UTF-8") -> str:
    """Text typed on the command line or at a prompt, UTF-8. Python keeps a byte that is not UTF-8 (a Latin-1 'é',
    0xe9) as a surrogate escape ('\\udce9'), which the template renderer then refused as a character that is not
    valid Unicode; it is named here as the byte it was, as a file's is (``_read_text``)."""
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no byte made (the renderer names it)
        return text
    return _utf8(data, what, fix)


def _table(by: str, value: str, example: str) -> dict:
    """An options table given on the command line: ``--options``, or ``-i KEY`` for the input a template takes its
    choices from (its contract's ``choices_from``), as a JSON object of labels and answers. ``by`` names the option in
    the errors, ``example`` is how to give it."""
    from edgemed.errors import InputError

    try:
        parsed = loads_json(value, finite=True)
    except json.JSONDecodeError:
        raise InputError(f"{by} is not a JSON object.", f"pass {example}") from None
    except ValueError as exc:  # NaN, Infinity, 1e999 (which no JSON reader takes back), or nesting too deep
        raise InputError(f"{by} is not plain JSON: {exc}.",
                         f"write each option as a quoted string: {example}") from None
    if not isinstance(parsed, dict):
        kind = {list: "an array", str: "a string", bool: "true or false"}.get(type(parsed), "null" if parsed is None
                                                                              else "a number")
        raise InputError(f"{by} is {kind}, not a JSON object of labels and answers.", f"pass {example}")
    return parsed


def template_inputs(question, options, item, pairs, text: TextSource | None = None,
                    template=None) -> tuple[dict, str | None]:
    """Template inputs from the CLI options (``--question``, ``--options`` and each ``-i`` value may be ``@PATH`` or
    ``@-``: ``TextSource``); also the item's expected answer, if it has one.

    ``template``: the template asked. The ``-i`` value of the input its choices come from (its contract's
    ``choices_from``) is read as a JSON object, as ``--options`` is: ``-i answers=@table.json``. It arrived as text,
    which the template refused, with a fix that named --options, an input such a template does not have.

    Each input is given one way. A second one overwrote the first without a word: the -i question won over
    --question, and --options over an --item-json's options while its answer_idx was still printed as "Expected"
    for options it no longer matched."""
    from edgemed.errors import InputError

    text = text or TextSource()
    table = template.contract.choices_from if template is not None else ""
    inputs: dict = {}
    given: dict[str, str] = {}  # input -> the option that gave it

    def put(key: str, value, by: str) -> None:
        if key in given:
            first = given[key]
            if first == by:
                raise InputError(f"{by} is given twice.", f"give the input '{key}' once")
            fix = (f"ask the item as it is (its answer_idx is the expected answer): drop {by}; or ask your own "
                   "question: drop --item-json" if first == "--item-json" else f"give it once: drop {first} or {by}")
            raise InputError(f"{first} and {by} both give the input '{key}'.", fix)
        given[key] = by
        inputs[key] = value

    expected = None
    if item:
        data = _item(item)
        for key in ("question", "options", "context"):
            if data.get(key) is not None:  # null: the item has none
                put(key, data[key], "--item-json")
        expected = data.get("answer_idx")
    question, options = text("--question", question), text("--options", options)
    if question is not None:
        put("question", question, "--question")
    if options is not None:
        if table not in ("", "options") and "options" not in template.inputs:
            raise InputError(f"--options gives the input 'options', and template '{template.name}' has none: it takes "
                             f"its choices from the input '{table}'.",
                             f"pass them with -i {table}='{{\"A\": \"...\", \"B\": \"...\"}}' (or -i {table}=@FILE, "
                             "a file holding that JSON object)")
        put("options", _table("--options", options, "--options '{\"A\": \"...\", \"B\": \"...\"}'"), "--options")
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InputError(f"--input '{pair}' is not KEY=VALUE.", "pass e.g. --input reading_level='5th grade'")
        key = key.strip()
        value = text(f"--input {key}", value)
        if table and key == table:  # the choices' table: a JSON object, as --options
            value = _table(f"-i {key}", value, f"-i {key}='{{\"A\": \"...\", \"B\": \"...\"}}' (or -i {key}=@FILE, "
                           "a file holding that JSON object)")
        put(key, value, f"-i {key}")
    return inputs, expected


def echo_piece(show_think: bool):
    """A callback printing answer text, and thinking between <think> tags when asked to."""
    state = {"in_think": False}

    def on_piece(channel: str, text: str) -> None:
        if channel == "think":
            if not show_think:
                return
            if not state["in_think"]:
                click.echo("<think>", nl=False)
                state["in_think"] = True
        elif state["in_think"]:
            click.echo("</think>\n")
            state["in_think"] = False
        click.echo(text, nl=False)

    return on_piece


def _messages(engine, system: str | None, prompt: str) -> list[dict]:
    """The conversation ``run`` sends: --system as a message of its own, or before the prompt in the user message
    where the model's chat template takes no system role (``fold_system``: it refuses or drops one), as chat does."""
    from edgemed.errors import InputError
    from edgemed.runtime.chat_template import fold_system

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    try:
        messages, why = fold_system(engine.render_chat, messages)
    except InputError as exc:
        raise InputError(f"--system cannot be sent to this model: {exc.problem}",
                         "pass a --system text without the model's markup") from None
    if why is not None:
        click.echo(f"({why}; this model's chat template takes no system message, so --system goes before the prompt)",
                   err=True)
    return messages


def _stdin_prompt() -> str:
    """The prompt piped on standard input."""
    return _read_text(sys.stdin.buffer, "The prompt on standard input")


@click.command()
@click.argument("model", required=False)  # as typed: ./NAME is a path, NAME may be an installed model
@click.option("--prompt", "-p", help="A user message, rendered with the model's chat template (@PATH: from a file; "
              "with no --prompt, standard input is read).")
@click.option("--raw", is_flag=True, help="Send --prompt as raw text; the model's chat template is not used at all.")
@click.option("--system", "-s", help="A system message to put before the prompt (@PATH: from a file).")
@click.option("--template", "-t", "template_name", help="A medical prompt template: mcq, pubmedqa, open_question, "
              "differential, drug, triage, patient_education, note_summary.")
@click.option("--question", "-q", help="The question (templates; @PATH: from a file, @-: standard input).")
@click.option("--options", help="Answer options as a JSON object, e.g. '{\"A\": \"...\", \"B\": \"...\"}' (mcq; "
              "a template that takes its choices from another input takes that one as -i KEY='{...}').")
@click.option("--item-json", help="One MedMCQA/MedQA JSONL item (a JSON object, or PATH:LINE): question + options "
              "(+ context); its answer_idx is printed as Expected. --question, --options and -i cannot also give an "
              "input the item has: ask the item as it is, or your own question without it.")
@click.option("--input", "-i", "pairs", multiple=True, help="Other template inputs as KEY=VALUE (repeatable); KEY=@PATH "
              "reads the value from a file, KEY=@- from standard input (e.g. -i note=@note.txt). The input a template "
              "takes its choices from is a JSON object of labels and answers, as --options (e.g. -i "
              "answers=@table.json).")
@click.option("--profile", help="Device profile to use (default: detected; see `edgemed devices list`).")
@click.option("--think", default="hide", show_default=True, help="Reasoning models' <think> block: hide, show, or cap:N tokens.")
@json_flag("Print one JSON object (templates: the parsed answer) instead of streaming.")
@click.option("--max-tokens", default=256, show_default=True, help="Most tokens to generate.")
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy (reproducible).")
@click.option("--top-p", default=1.0, show_default=True)
@seed_option
@click.option("--ctx", "n_ctx", type=int, help="Context window (default: the largest the profile's memory budget allows).")
@click.option("--threads", type=int, help="CPU threads (default: the profile's, usually physical cores).")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME|FILE[:SCALE]",
              help="A LoRA adapter for MODEL, applied at run time, at SCALE (default 1, as trained): the NAME of one in "
              "MODEL's bundle or an installed adapter bundle for it (`edgemed list`), or a GGUF adapter file "
              "(`edgemed convert ... --adapter-only`). Repeatable.")
def run(model, prompt, raw, system, template_name, question, options, item_json, pairs, profile, think, as_json,
        max_tokens, temperature, top_p, seed, n_ctx, threads, adapters):
    """Generate a reply with MODEL (a .gguf file, or an installed model's name), streaming it to stdout.

    With --template, the question is laid out by a medical prompt template and the reply's answer
    is parsed and printed on a last line (``Parsed answer: B``). With no --prompt and no template,
    the prompt is read from standard input. Settings come from the device profile; the memory plan
    is checked before the model is loaded. With --adapter, the LoRA adapter is checked against MODEL (made for
    the checkpoint MODEL was converted from), counted by the memory plan and applied at run time.

    Patient details typed as options are visible to every user of this machine (`ps`) and kept in the shell's
    history: pass them from a file (--question @q.txt, -i note=@note.txt, --prompt @case.txt) or standard input
    (@-, or no --prompt at all). A text that starts with @ is written @@.
    """
    from edgemed.errors import InputError
    from edgemed.runtime import GenerationSettings
    from edgemed.runtime.engine import check_seed
    from edgemed.runtime.session import ask, generate, open_with_adapters, prepare, respond
    from edgemed.templates.think import ThinkPolicy
    from edgemed.phi import no_core_dumps

    no_core_dumps()  # the prompt and the reply never go to a core file (the template worker sets the same itself)

    if model is None:
        raise InputError("No model given.", "pass a .gguf path: edgemed run model.gguf --prompt '...' (make one with `edgemed convert`)")
    check_seed(seed)  # -1 and 2^32 - 1 were llama.cpp's random seed, 2^32 was seed 0: all taken without a word
    if template_name and (prompt is not None or system):  # they were ignored without a word
        flag = "--prompt" if prompt is not None else "--system"
        raise InputError(f"--template {template_name} writes the whole prompt, its safety preamble included, so {flag} "
                         "cannot be used with it.",
                         "pass the question with --question/--options/-i (see `edgemed run --help`), or drop --template")
    if raw and (template_name or system):
        flag = "--template" if template_name else "--system"
        raise InputError(f"--raw sends the prompt as it is, without the chat template, so {flag} cannot be used with it.",
                         "drop --raw to use the model's chat template, or put everything in --prompt")
    if not raw:
        from edgemed.runtime.chat_template import warm

        warm()  # the template renderer process starts while the model loads
    policy = ThinkPolicy.parse(think)
    text = TextSource()
    prompt, system = text("--prompt", prompt), text("--system", system)
    template = inputs = expected = None
    if template_name:
        from edgemed.templates import get_template

        template = get_template(template_name)
        inputs, expected = template_inputs(question, options, item_json, pairs, text, template)
        template.messages(inputs)  # missing inputs fail here, before the model loads
        from edgemed.runtime.sampling import check_template_grammar

        check_template_grammar(template)  # and a contract schema no grammar can enforce
    elif prompt is None:
        if text.stdin_by is not None:
            raise InputError(f"No prompt given, and standard input went to {text.stdin_by}.",
                             "pass the prompt with --prompt @PATH (a file)")
        if sys.stdin.isatty():
            raise InputError("No prompt given.", "pass --prompt '...' (or --template mcq --question ...), or pipe the prompt on standard input")
        prompt = _stdin_prompt()
    if template is None and not prompt.strip():  # an empty prompt used to load the model and answer nothing in particular
        raise InputError("The prompt is empty.", "pass the question with --prompt '...', or pipe it on standard input")
    from edgemed.packaging.ref import adapter_specs, loaded_as_verified, runnable

    ref = runnable(model)  # an installed name, or a bundle directory: verified before load
    specs = adapter_specs(ref, adapters)  # NAME[:SCALE] (the model's bundle, installed adapter bundles) or FILE[:SCALE]
    model = ref.model_path
    prepared = prepare(model, profile, n_ctx, threads, seed, adapters=specs)
    settings = GenerationSettings(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    engine = open_with_adapters(model, prepared.load, specs)
    try:
        loaded_as_verified(ref, specs)  # the bytes loaded are the ones verified (a bundle, an installed model)
        if template is not None:
            answer = ask(engine, template, inputs, settings, policy, None if as_json else echo_piece(policy.show))
            value = answer.parsed.value
            if as_json:
                echo_json_result(json.dumps({"template": template.name, "ok": answer.parsed.ok, "answer": value,
                                             "forced": answer.forced, "expected": expected, "reply": answer.reply,
                                             "think": answer.think if policy.show else None,
                                             "profile": prepared.profile, "seed": seed}))
            else:
                click.echo()
                shown = json.dumps(value) if isinstance(value, (dict, list)) else value
                why = answer.parsed.error or "the reply gave no single clear answer line"  # the first reply's
                note = f" ({why.rstrip('.')}; asked again, constrained to the choices)" if answer.forced else ""
                if template.contract.kind != "text":
                    click.echo(f"Parsed answer: {shown if answer.parsed.ok else 'none'}{note}")
                if expected is not None:
                    click.echo(f"Expected: {expected}")
            if answer.system_folded is not None:
                click.echo(f"({answer.system_folded}; this model's chat template takes no system message, so the "
                           f"'{template.name}' template's safety preamble and instructions went before the question)",
                           err=True)
            if not answer.parsed.ok:
                click.echo(f"warning: the reply does not meet the '{template.name}' contract: {answer.parsed.error}", err=True)
            return
        cut: list[bool] = []  # per generation call, whether it stopped at its token limit (the last: the answer)
        if raw:
            pieces = (("answer", p) for p in generate(engine, prompt, settings, cut))
        else:
            messages = _messages(engine, system, prompt)
            pieces = respond(engine, engine.render_chat(messages), settings, policy, cut=cut)
        out = echo_piece(policy.show)
        text, thinking, thought = [], [], False
        for channel, piece in pieces:
            (text if channel == "answer" else thinking).append(piece)
            thought = thought or channel == "think"
            if not as_json:
                out(channel, piece)
        if thought and not "".join(text).strip():  # an empty line and exit 0 read as an answer given
            from edgemed.errors import NoAnswer

            if not as_json:
                click.echo()
            raise NoAnswer(max_tokens)
        was_cut = bool(cut) and cut[-1]
        if as_json:
            reply = {"reply": "".join(text), "cut": was_cut, "seed": seed}
            if policy.show:
                reply["think"] = "".join(thinking)
            echo_json_result(json.dumps(reply))
        else:
            click.echo()
            if was_cut:  # a reply that stops mid-sentence reads as complete otherwise
                click.echo(f"(cut at --max-tokens {max_tokens})", err=True)
    finally:
        engine.close()
