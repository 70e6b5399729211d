"""The one error hierarchy.

Every expected failure is an ``EdgemedError`` carrying two sentences: what is
wrong, and what the user should do about it. The CLI turns these into a short
message and exit code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import math
from dataclasses import dataclass


class EdgemedError(Exception):
    """An expected failure: ``problem`` says what is wrong, ``fix`` what to do."""

    def __init__(self, problem: str, fix: str | None = None):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return self.problem if not self.fix else f"{self.problem}\nFix: {self.fix}"


class InputError(EdgemedError):
    """The user gave us something unusable: a path, a file, an option."""


class NoTokenAllowed(InputError):
    """A request's own constraints (grammar, logit bias) leave no token the model may produce next."""


class CheckpointError(InputError):
    """A Hugging Face checkpoint directory is missing parts or is corrupt."""


class UnsupportedArchitecture(InputError):
    """The checkpoint's architecture has no converter module."""


class AdapterError(InputError):
    """A LoRA adapter cannot be merged into this base model."""


class AdapterNotFound(InputError):
    """A name that is no adapter of the model (its bundle's, or an installed adapter bundle's for its base);
    ``available``: the names there are."""

    def __init__(self, problem: str, fix: str, name: str, available: list[str]):
        super().__init__(problem, fix)
        self.name, self.available = name, available


class TokenizerError(InputError):
    """The tokenizer cannot be converted faithfully."""


class OutputExists(InputError):
    """Refusing to overwrite an existing output."""


class MissingDependency(EdgemedError):
    """An optional dependency group is not installed."""

    def __init__(self, module: str, extra: str):
        super().__init__(
            f"This command needs the Python package '{module}', which is not installed.",
            f"install the '{extra}' extra: pip install 'edgemed[{extra}]'",
        )
        self.module = module
        self.extra = extra


class ParityError(EdgemedError):
    """A converted model does not compute what its source computes."""


class ModelLoadError(EdgemedError):
    """The runtime could not load a model file."""


class ContextOverflow(InputError):
    """A prompt plus the requested output does not fit in the context window."""


class NoAnswer(EdgemedError):
    """The model used every token it was allowed on thinking: there is no answer to show."""

    def __init__(self, max_tokens: int):
        super().__init__(f"The model's reply held only its thinking, no answer (it may at most write {max_tokens} "
                         "tokens, thinking included).",
                         "allow more with --max-tokens, or cap the thinking with --think cap:N (N well below "
                         "--max-tokens), so tokens are left for the answer")


class IntegrityError(EdgemedError):
    """A bundle's files do not match its manifest: damaged, truncated, altered or incomplete."""


class SignatureError(IntegrityError):
    """A bundle's signature is missing, malformed, or not made by the expected key."""


class UnsafeArchive(IntegrityError):
    """An archive holds entries that could write outside its target (traversal, links, devices, bombs)."""


class StoreError(EdgemedError):
    """The local model store cannot do what was asked (unknown name, name taken)."""


def require(module: str, extra: str):
    """Import ``module`` or raise ``MissingDependency`` naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise MissingDependency(module, extra) from exc


class ProfileError(InputError):
    """A device profile file is malformed, or no profile of that name exists."""


class PlanError(EdgemedError):
    """The model does not fit the device's memory budget with any usable context."""


class TemplateError(InputError):
    """A prompt template is malformed, missing inputs, or a chat template misbehaved."""


class TemplateInputError(TemplateError):
    """A template input given is no value the template can render (an array, an option without text); ``key``: which
    one (``options.A`` for an option), the ``param`` of the API's error."""

    def __init__(self, problem: str, fix: str, key: str):
        super().__init__(problem, fix)
        self.key = key


class OutputError(EdgemedError):
    """An output cannot be written: no space left, no permission, a read-only file system."""


_ELSEWHERE = "choose a folder you can write to (for the model store, point EDGEMED_HOME at one)"
_PERMISSIONS = "check the permissions of that file and its folder, or " + _ELSEWHERE

# errno -> (what failed, the fix): the disk or folder cannot take a write, whatever the command was doing
DISK_REFUSED: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("No space left on the disk while writing {what}.", "free space on that disk, or choose a folder on another disk"),
    errno.EDQUOT: ("The disk quota is used up while writing {what}.", "free space within your quota, or choose a folder on another disk"),
    errno.EROFS: ("Cannot write {what}: the file system is mounted read-only.", _ELSEWHERE + ", or remount that disk read-write"),
    errno.EACCES: ("Permission denied on {what}.", _PERMISSIONS),
    errno.EPERM: ("Operation not permitted on {what}.", _PERMISSIONS),
}


def output_error(exc: OSError) -> OutputError | None:
    """A full, read-only or forbidden disk as an ``OutputError`` naming the fix; ``None`` for any other OSError."""
    if exc.errno not in DISK_REFUSED:
        return None
    problem, fix = DISK_REFUSED[exc.errno]
    what = f"'{exc.filename}'" if exc.filename is not None else "a file"
    return OutputError(problem.format(what=what), fix)


@dataclass
class Done:
    """What a command had made take effect when a stop (Ctrl-C, SIGTERM) came after its commit point: ``what`` in a
    clause ("'tiny' was installed: ..."), ``left`` what the stop cut short and what finishes it, ``result`` the
    document its ``--json`` prints when it finishes (None: it prints none)."""

    what: str
    left: str
    result: dict | None = None


def stopped_after(stop: BaseException, done: Done) -> None:
    """Mark ``stop`` as having come once ``done`` took effect: the CLI reports that, not a change that never was."""
    stop.edgemed_done = done


def done_before(stop: BaseException) -> Done | None:
    """What ``stop`` came after (``stopped_after``); None: it came before anything took effect."""
    return getattr(stop, "edgemed_done", None)


def retry_seconds(retry_after: float) -> int:
    """The whole seconds a client is told to wait, in the message and in the Retry-After header alike: rounded
    up (waiting 2 s of an estimated 2.4 s would be turned away again), at least 1."""
    return max(1, math.ceil(retry_after))


class Overloaded(EdgemedError):
    """Every slot is busy and the waiting queue is full (the server answers 429 with Retry-After)."""

    def __init__(self, in_flight: int, retry_after: float):
        super().__init__(f"The model is busy: {in_flight} requests are already running or waiting.",
                         f"retry in {retry_seconds(retry_after)} s, or start the server with more slots or a longer "
                         "queue")
        self.retry_after = retry_after


class Closed(EdgemedError):
    """The batcher is not running (not started yet, or shut down): the server answers 503."""
