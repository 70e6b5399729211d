"""The ``edgemed`` command. Each noun/verb lives in its own small module here.

Only click and edgemed's light modules are imported at start-up; a command
imports what it needs when it runs, so ``edgemed --help`` stays instant.
Expected failures (``EdgemedError``) become a one-paragraph message and exit
code 1, never a traceback; so does a disk that is full, read-only or not ours to
write (``errors.output_error``), whichever command hit it. Any other exception is
a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

import click

from edgemed import __version__
from edgemed.errors import Done, EdgemedError, done_before, output_error, stopped_after

#: ``ctx.meta`` keys (shared by every nested context): the command was given ``--json``; it printed its JSON result;
#: ``--json`` is typed as the flag after the command's name (a usage error may stop the parse before it is read)
_JSON_ASKED, _JSON_PRINTED, _JSON_TYPED = "edgemed.json", "edgemed.json-printed", "edgemed.json-typed"


def json_flag(help_text: str | None = None):
    """The ``--json`` option. With it, a failure is also printed to stdout as one JSON object, ``{"ok": false,
    "error": TYPE, "problem": ..., "fix": ...}``, so a script reading stdout never gets an empty document: one edgemed
    reports (exit 1), a usage error (exit 2: ``--seed 1.5``, an unknown option), a stop (SIGTERM, Ctrl-C) before the
    command's change took effect (after it: its result, marked ``stopped``, ``_stopped``); the message
    still goes to stderr and the exit status is the same. Eager: it is seen before any other option's check can
    fail; an option the parse cannot read at all is caught by ``LazyGroup.resolve_command``'s look at the words."""

    def remember(ctx, _param, value):
        if value:
            ctx.meta[_JSON_ASKED] = True
        return value

    return click.option("--json", "as_json", is_flag=True, callback=remember, is_eager=True, help=help_text)


def echo_json_result(text: str) -> None:
    """Print a command's JSON result; a failure raised after it (a check that did not pass) then adds no second
    document to stdout."""
    click.echo(text)
    click.get_current_context().meta[_JSON_PRINTED] = True


@contextlib.contextmanager
def reporting(took_effect: Callable[[], Done | None]):
    """Around a command's change and what it prints once the change took effect. A stop (Ctrl-C, SIGTERM) that its
    stage marked already, past its own commit point, keeps that stage's words; any other goes on marked with what
    ``took_effect()``, asked then, says is in place (``_stopped`` reports the change, not "nothing half-written"):
    so a stop that lands after the stage returned and before the command has its result in hand is told as truly as
    one while it prints. None: nothing took effect, and the stop is reported as such."""
    try:
        yield
    except KeyboardInterrupt as stop:
        if done_before(stop) is None:
            done = took_effect()
            if done is not None:
                stopped_after(stop, done)
        raise


def _json_failure(ctx, exc: BaseException, problem: str | None = None) -> None:
    """The failure document of ``--json`` for ``exc`` (``problem``: its words where the exception has none)."""
    usage = isinstance(exc, click.UsageError)
    if not (ctx.meta.get(_JSON_ASKED) or usage and ctx.meta.get(_JSON_TYPED)) or ctx.meta.get(_JSON_PRINTED):
        return
    fix = None
    if isinstance(exc, EdgemedError):
        problem, fix = exc.problem, exc.fix
    elif isinstance(exc, click.ClickException):
        problem = exc.format_message()
        if usage and exc.ctx is not None:
            fix = f"see `{exc.ctx.command_path} --help`"
    click.echo(json.dumps({"ok": False, "error": type(exc).__name__, "problem": problem or str(exc), "fix": fix}))


# module under edgemed.cli -> attribute holding the click command or group
COMMANDS: dict[str, str] = {
    "convert": "edgemed.cli.convert:convert",
    "check": "edgemed.cli.convert:check",
    "quickstart": "edgemed.cli.quickstart:quickstart",
    "run": "edgemed.cli.run:run",
    "devices": "edgemed.cli.devices:devices",
    "plan": "edgemed.cli.plan:plan",
    "chat": "edgemed.cli.chat:chat",
    "pack": "edgemed.cli.pack:pack",
    "verify": "edgemed.cli.pack:verify",
    "inspect": "edgemed.cli.pack:inspect",
    "keygen": "edgemed.cli.pack:keygen",
    "install": "edgemed.cli.store:install",
    "list": "edgemed.cli.store:list_",
    "remove": "edgemed.cli.store:remove",
    "rollback": "edgemed.cli.store:rollback",
    "export": "edgemed.cli.store:export",
    "push": "edgemed.cli.oci:push",
    "pull": "edgemed.cli.oci:pull",
    "login": "edgemed.cli.oci:login",
    "serve": "edgemed.cli.serve:serve",
    "audit": "edgemed.cli.serve:audit",
    "bench": "edgemed.cli.bench:bench",
    "home": "edgemed.cli.home:home",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager's or ``kill``'s stop), raised where the command is, so it unwinds as Ctrl-C does:
    its own temporary files go, and whatever it was replacing stays as it was (or, once the new one is in, the
    report says so: ``_stopped``)."""


def _terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second stop must not cut the clean-up short
    raise Terminated()


def _json_flag_typed(command: click.Command, ctx, words: list[str]) -> bool:
    """Whether ``words`` (what follows ``command``'s name on the line, up to any ``--``) hold ``--json`` where click
    reads it as the flag: not as the value of an option that takes one (``run M --prompt --json``: the prompt), and
    only for a command that has the flag. A group's words lead to its command's, so ``bench run`` is read as such."""
    values = {}  # each option word of ``command`` -> how many words after it are its value
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            values.update(dict.fromkeys(param.opts + param.secondary_opts,
                                        0 if param.is_flag or param.count else param.nargs))
    i = 0
    while i < len(words):
        word, i = words[i], i + 1
        if word == "-" or not word.startswith("-"):
            if isinstance(command, click.Group):  # the command's name: the rest is that command's
                sub = command.get_command(ctx, word)
                return sub is not None and _json_flag_typed(sub, ctx, words[i:])
        elif word.startswith("--"):
            if word == "--json" and values.get(word) == 0:
                return True
            name, equals, _ = word.partition("=")
            i += 0 if equals else values.get(name, 0)
        else:  # short options run together (-vv, -pText): the first that takes a value takes the rest, or the next
            for at, letter in enumerate(word[1:], start=2):
                taken = values.get("-" + letter, 0)
                if taken:
                    i += 0 if at < len(word) else taken
                    break
    return False


class LazyGroup(click.Group):
    """Imports a command's module only when that command is asked for."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def resolve_command(self, ctx, args):
        # A usage error in the parse itself (an unknown option) comes before any option's callback, --json's too
        words = args[:args.index("--")] if "--" in args else args
        ctx.meta[_JSON_TYPED] = _json_flag_typed(self, ctx, words)
        return super().resolve_command(ctx, args)

    def invoke(self, ctx):
        from edgemed import env

        env.enforce_offline()  # before the command's module loads: huggingface_hub reads the variables at its import
        main = threading.current_thread() is threading.main_thread()  # only the main thread may set a handler
        previous = signal.signal(signal.SIGTERM, _terminated) if main else None
        try:
            return super().invoke(ctx)
        except EdgemedError as exc:
            _json_failure(ctx, exc)
            raise click.ClickException(_printable(exc)) from None
        except OSError as exc:
            clean = output_error(exc)
            if clean is None:
                raise
            logging.getLogger(__name__).debug("the disk refused a write", exc_info=True)
            _json_failure(ctx, clean)
            raise click.ClickException(_printable(clean)) from None
        except click.ClickException as exc:  # a usage error (exit 2): click prints it, and its usage, on stderr
            _json_failure(ctx, exc)
            raise
        except Terminated as exc:
            _stopped(ctx, exc, "Stopped (SIGTERM)", "Stopped (SIGTERM) before it finished.")
            # Die by the signal, as without a handler, also when the change had taken effect (``_stopped``): a service
            # manager counts that as a clean stop (an exit status of 143 would be a failure to systemd), and a shell
            # still sees 143
            sys.stdout.flush()
            sys.stderr.flush()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            sys.exit(128 + signal.SIGTERM)  # reached only where the signal is ignored (PID 1 in a container)
        except KeyboardInterrupt as exc:
            _stopped(ctx, exc, "Interrupted", "Interrupted (Ctrl-C) before it finished.")
            sys.exit(130)
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="edgemed")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug). Prompts and outputs are never logged.")
def cli(verbose: int) -> None:
    """edgemed: convert, package, run and measure medical language models on edge devices, offline."""
    level = logging.WARNING - 10 * min(verbose, 2)
    handler = logging.StreamHandler()
    handler.setFormatter(_PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def _stopped(ctx, stop: KeyboardInterrupt, said: str, problem: str) -> None:
    """Say what a stop (``said``: how it came) left. Before the command's change took effect, nothing: its own
    temporary files went, and ``--json`` prints the failure document (``problem``). After it (the stage that passed
    its commit point marked the stop: ``errors.Done``, e.g. a pull or install killed once the new version was swapped
    in; or ``reporting`` did, for a stop after the stage returned), what took effect and what was cut short;
    ``--json`` prints the command's result document with ``stopped`` and ``unfinished`` added, never a failure.

    The exit status stays the stop's either way (death by SIGTERM, 130 for Ctrl-C): the process was stopped, and a
    service manager or shell must see the stop it asked for whatever instant it landed on. What took effect is told
    by the words and the document; a script reading ``--json`` sees the install, and running the same pull again
    finds the bundle installed and finishes the clean-up."""
    from edgemed.formats.terminal_text import shown_prose

    done = done_before(stop)
    if done is None:
        _json_failure(ctx, stop, problem)
        click.echo(f"\n{said}; nothing half-written was left behind.", err=True)
        return
    if ctx.meta.get(_JSON_ASKED) and not ctx.meta.get(_JSON_PRINTED):
        click.echo(json.dumps({**(done.result or {"done": done.what}), "stopped": "SIGTERM" if isinstance(stop, Terminated)
                               else "Ctrl-C", "unfinished": done.left}, indent=2))
    click.echo(shown_prose(f"\n{said} after {done.what}. Not finished: {done.left}.", ""), err=True)


def _printable(exc: Exception) -> str:
    """An error as the terminal gets it: a message may quote a bundle's text, a registry's answer or a file name,
    so every character a terminal would act on (ESC, CR, bidi controls) is written escaped; line breaks stay."""
    from edgemed.formats.terminal_text import shown_prose

    return shown_prose(str(exc), "")


class _PrintableFormatter(logging.Formatter):
    """Log lines with the same escaping as ``_printable`` (a warning may name a file or a registry's answer)."""

    def format(self, record: logging.LogRecord) -> str:
        from edgemed.formats.terminal_text import shown_prose

        return shown_prose(super().format(record), "")


def main() -> None:
    cli(prog_name="edgemed")
