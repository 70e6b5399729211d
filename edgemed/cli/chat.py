"""``edgemed chat``: an interactive conversation with a model on this device."""

from __future__ import annotations

import click

from edgemed.cli.run import seed_option


#: A line holding only this opens, and a second one closes, a message of several lines
BLOCK = '"""'


def opening(engine, system: str, named: bool) -> list[dict]:
    """The messages a conversation starts with: the system message, or none where the model's chat template takes no
    system role (Mistral's, Gemma 2's: ``no_system_role``), the system text then going before the first user message
    (``with_system``). A system text the template refuses in any place (the model's markup in it) is an ``InputError``
    naming --system (``named``: the user's text), before any turn: it used to refuse every turn, /reset included."""
    from edgemed.errors import InputError
    from edgemed.runtime.chat_template import no_system_role

    try:
        why = no_system_role(engine.render_chat, system)
    except InputError as exc:
        what = "--system" if named else "the safety preamble (the default system message)"
        raise InputError(f"{what} cannot be sent to this model: {exc.problem}",
                         "pass a --system text without the model's markup" if named else exc.fix) from None
    if why is None:
        return [{"role": "system", "content": system}]
    click.echo(f"({why}; this model's chat template takes no system message, so the system text goes before your "
               "first message)", err=True)
    return []


def prompt_tokens(engine, prompt: str) -> int:
    """The tokens ``engine.complete`` feeds for a rendered ``prompt``: the chat template's markers one token each, as
    a GGUF's tokenizer reads them only when asked (``parse_special``) and an ONNX model's always does."""
    from edgemed.runtime.llama_engine import LlamaEngine

    special = {"parse_special": True} if isinstance(engine, LlamaEngine) else {}
    return len(engine.tokenize(prompt, add_special=True, **special))


def check_room(engine, base: list[dict], preamble: str, max_tokens: int, default: bool = False) -> None:
    """Refuse, before the first prompt, a --max-tokens (``default``: not given) the context cannot hold after the
    opening messages and the shortest message: every message was refused, /reset changed nothing, and the chat ended
    with exit 0."""
    from edgemed.errors import ContextOverflow
    from edgemed.runtime.chat_template import with_system

    shortest = "?"
    first = base + [{"role": "user", "content": shortest if base else with_system(preamble, shortest)}]
    n, n_ctx = prompt_tokens(engine, engine.render_chat(first)), engine.n_ctx
    if n >= n_ctx:
        raise ContextOverflow(f"The opening messages (the system text) take {n} tokens with the shortest message: the "
                              f"context window of {n_ctx} has no room for an answer after them.",
                              f"load with a larger --ctx (at least {n + max_tokens}), or pass a shorter --system")
    if n + max_tokens > n_ctx:
        given = f"--max-tokens {max_tokens}{' (the default)' if default else ''}"
        raise ContextOverflow(f"{given} does not fit the context window of {n_ctx}: the opening messages (the "
                              f"system text) take {n} tokens with the shortest message, so an answer "
                              f"needs {n + max_tokens}, and every message would be refused.",
                              f"pass a --max-tokens well below {n_ctx - n}, the room the opening messages leave (your "
                              f"messages and the conversation take room too), or load with a larger --ctx (at least "
                              f"{n + max_tokens}, more for a conversation)")


#: what a message that is not UTF-8 is told (``run.typed_text``)
NOT_UTF8_FIX = ("send it as UTF-8 (a Latin-1 or Windows-1252 text, pasted or piped, is not): set the terminal to "
                "UTF-8, or convert the file, e.g. iconv -f windows-1252 -t utf-8")


def keep_undecodable_bytes() -> None:
    """Standard input's bytes that are not UTF-8 come in as surrogate escapes, as under the C locale, for
    ``run.typed_text`` to name: a UTF-8 locale's strict decoder raised UnicodeDecodeError out of the prompt, a
    traceback that ended the chat."""
    import sys

    reconfigure = getattr(sys.stdin, "reconfigure", None)  # a TextIOWrapper's; stdin may be something else
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")


@click.command()
@click.argument("model")  # as typed: ./NAME is a path, NAME may be an installed model
@click.option("--system", "-s", help="System message (default: the templates' safety preamble).")
@click.option("--profile", help="Device profile (default: detected).")
@click.option("--think", default="hide", show_default=True, help="hide, show, or cap:N tokens of <think>.")
@click.option("--max-tokens", default=512, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
@seed_option
@click.option("--ctx", "n_ctx", type=int, help="Context window (default: the largest the profile allows).")
@click.option("--threads", type=int)
@click.option("--adapter", "adapters", multiple=True, metavar="FILE|NAME[:SCALE]",
              help="A GGUF LoRA adapter for MODEL (a file, or the name of one of the installed model's adapters), "
              "applied at run time at SCALE (default 1). Repeatable.")
@click.option("--no-prefix-cache", is_flag=True,
              help="Compute the whole conversation again every turn (by default the earlier turns' cells are kept "
              "and each turn computes only what is new).")
def chat(model, system, profile, think, max_tokens, temperature, seed, n_ctx, threads, adapters, no_prefix_cache):
    """Chat with MODEL. Type a message and press Enter; /reset clears the history, /exit (or Ctrl-D) quits.
    A message of several lines (a pasted note) goes between two lines that hold only three double quotes.
    Ctrl-C while an answer is written stops that answer (the question is dropped, the conversation goes on); at the
    prompt it quits.

    Thinking from reasoning models is kept out of the history, so it does not fill the context.
    """
    from edgemed.cli import Terminated
    from edgemed.cli.run import echo_piece, typed_text
    from edgemed.errors import ContextOverflow, InputError, NoAnswer
    from edgemed.packaging.ref import adapter_specs, loaded_as_verified, runnable
    from edgemed.runtime import GenerationSettings
    from edgemed.runtime.chat_template import warm, with_system
    from edgemed.runtime.engine import check_seed
    from edgemed.phi import no_core_dumps

    no_core_dumps()  # the conversation never goes to a core file (the template worker sets the same itself)
    from edgemed.runtime.session import open_with_adapters, prepare, respond
    from edgemed.templates.library import safety_preamble
    from edgemed.templates.think import ThinkPolicy

    check_seed(seed)  # as run's: refused before the model is looked for
    warm()  # the template renderer process starts while the model loads
    keep_undecodable_bytes()
    policy = ThinkPolicy.parse(think)
    ref = runnable(model)
    specs = adapter_specs(ref, adapters)  # FILE[:SCALE], or NAME[:SCALE] of the model's adapters; refused before load
    model = ref.model_path
    prepared = prepare(model, profile, n_ctx, threads, seed, adapters=specs)
    preamble = system or safety_preamble()  # the shipped one: a user folder's template must not change chat's
    settings = GenerationSettings(max_tokens=max_tokens, temperature=temperature, seed=seed)
    engine = open_with_adapters(model, prepared.load, specs)
    try:
        loaded_as_verified(ref, specs)  # the bytes loaded are the ones verified (a bundle, an installed model)
    except BaseException:
        engine.close()
        raise
    engine.prefix_reuse = engine.prefix_reuse and not no_prefix_cache
    with_adapters = f" with {', '.join(s.path.name for s in specs)}" if specs else ""
    click.echo(f"edgemed chat: {model}{with_adapters} on '{prepared.profile}', context {engine.n_ctx}. /exit to quit.", err=True)
    try:
        base = opening(engine, preamble, bool(system))
        source = click.get_current_context().get_parameter_source("max_tokens")
        check_room(engine, base, preamble, max_tokens, source is click.core.ParameterSource.DEFAULT)
        history = list(base)
        while True:
            try:
                line = click.prompt("you", prompt_suffix="> ", default="", show_default=False)
            except (EOFError, click.Abort) as exc:
                if isinstance(exc.__context__, Terminated):  # a stop, not the user's Ctrl-C: exit as a stop does
                    raise exc.__context__ from None
                break
            if line.strip() in ("/exit", "/quit"):
                break
            if line.strip() == "/reset":
                history = list(base)
                continue
            if line.strip() == BLOCK:  # a pasted note: one message of many lines, not a turn per line
                lines = []
                while True:
                    try:
                        more = click.prompt("...", prompt_suffix=" ", default="", show_default=False)
                    except (EOFError, click.Abort) as exc:
                        if isinstance(exc.__context__, Terminated):
                            raise exc.__context__ from None
                        if isinstance(exc.__context__, KeyboardInterrupt):  # Ctrl-C: the half-pasted note is dropped
                            lines = []
                            click.echo("\n(note dropped)", err=True)
                        break  # Ctrl-D, or the end of piped input: the note as it stands
                    if more.strip() == BLOCK:
                        break
                    lines.append(more)
                line = "\n".join(lines)
            try:
                line = typed_text(line, "Your message", NOT_UTF8_FIX)
            except InputError as exc:  # this message is refused, the chat goes on
                click.echo(f"{exc}", err=True)
                continue
            if not line.strip():
                continue
            folded = not base and not any(m["role"] == "user" for m in history)
            history.append({"role": "user", "content": with_system(preamble, line) if folded else line})
            answer, thought, cut = [], False, []
            out = echo_piece(policy.show)
            try:
                for channel, piece in respond(engine, engine.render_chat(history), settings, policy, cut=cut):
                    out(channel, piece)
                    thought = thought or channel == "think"
                    if channel == "answer":
                        answer.append(piece)
            except Terminated:
                raise
            except KeyboardInterrupt:  # Ctrl-C stops this answer, not the conversation
                history.pop()
                click.echo("\n(stopped: that question is left out of the conversation)", err=True)
                continue
            except ContextOverflow as exc:
                history.pop()
                earlier = len(history) > len(base)  # with none, /reset frees nothing: the message is too long
                click.echo(f"\n{exc}" + ("\n(type /reset to start over)" if earlier else ""), err=True)
                continue
            except InputError as exc:  # this message is refused (the model's markup in it, say): the chat goes on
                history.pop()
                click.echo(f"\n{exc}", err=True)
                continue
            click.echo()
            if thought and not "".join(answer).strip():  # nothing to keep: an empty turn would teach the model that
                history.pop()
                click.echo(f"({NoAnswer(max_tokens)}; the question is left out of the conversation)", err=True)
                continue
            if cut and cut[-1]:  # kept as the model's turn, as it stands: the next question may ask it to go on
                click.echo(f"(cut at --max-tokens {max_tokens}: the answer is kept as it stands)", err=True)
            history.append({"role": "assistant", "content": "".join(answer)})
    finally:
        engine.close()
