"""Render untrusted Jinja (a GGUF's chat template, a user's prompt template) with hard limits.

A template is code: a loop of ``range(99999)`` inside another never ends in useful time, and
string doubling fills any memory. Jinja's sandbox stops escapes, not cost, and no in-process
check stops a loop that neither calls nor outputs, or one long C call. So templates render in
a separate worker process (``worker.py``) that this module owns:

* **time** — the worker raises at ``MAX_SECONDS`` (an alarm); this side kills it at
  ``MAX_SECONDS + GRACE_SECONDS`` if it has not answered (stuck in C), and starts a fresh one;
* **output** — at most ``MAX_OUTPUT_CHARS``, or ``OUTPUT_PER_INPUT`` x the request when larger
  (a prompt never legitimately outgrows its messages by more), counted as chunks are produced;
* **memory** — the worker's address space is capped at ``MAX_MEMORY_BYTES`` (``MemoryError``);
* **recursion** — the worker's Python recursion limit is ``MAX_RECURSION``.

Up to ``MAX_WORKERS`` render at once; each is reused across renders (compiled templates are
cached in it), so a render costs a pipe round trip, not a process start. ``warm()`` starts
one in the background, so the first render does not wait for it.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import struct
import subprocess
import sys
import threading
import time

from edgemed.errors import InputError, TemplateError

MAX_SECONDS = 1.0
GRACE_SECONDS = 0.5
MAX_OUTPUT_CHARS = 1 << 20
OUTPUT_PER_INPUT = 4
MAX_MEMORY_BYTES = 512 << 20
MAX_RECURSION = 1000
MAX_WORKERS = 2
#: A worker process starting on a slow device (Python + jinja2 imports); not counted in MAX_SECONDS.
STARTUP_SECONDS = 30.0
HEADER = struct.Struct(">I")

#: kind -> what the template did, as the end of a sentence that starts with the template's name
REASONS = {
    "time": "ran longer than {seconds:g} s",
    "output": "produced more than {max_output:,} characters",
    "value": "built a value beyond the limits ({detail})",
    "memory": f"needed more than {MAX_MEMORY_BYTES >> 20} MiB of memory",
    "recursion": f"recursed deeper than {MAX_RECURSION} calls",
    "crash": "crashed the template renderer process",
    "syntax": "has a syntax error ({detail})",
    "undefined": "uses an undefined value ({detail})",
    "unsafe": "tried an operation the sandbox forbids ({detail})",
    "unicode": "produced text that is not valid Unicode",
    "refused": "refused the input: {detail}",
    "error": "failed to render ({detail})",
}


class RenderFailure(Exception):
    """A render did not produce text; ``kind`` is a key of ``REASONS``, ``reason`` its sentence end."""

    def __init__(self, kind: str, detail: str = "", seconds: float = MAX_SECONDS, max_output: int = MAX_OUTPUT_CHARS):
        self.kind, self.detail = kind, detail.rstrip(". ")
        self.reason = REASONS.get(kind, REASONS["error"]).format(detail=self.detail, seconds=seconds,
                                                                 max_output=max_output)
        super().__init__(self.reason)


class _Dead(Exception):
    """The worker's pipe closed (it crashed or was killed)."""


class _Late(Exception):
    """The worker did not answer in time."""


def _read_exact(fd: int, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if os.name != "nt":  # Windows pipes do not select(): there the reader thread keeps the deadline
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise _Late()
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise _Dead()
        buf += chunk
    return bytes(buf)


def _frame(fd: int, deadline: float, max_bytes: int) -> dict:
    (size,) = HEADER.unpack(_read_exact(fd, HEADER.size, deadline))
    if size > max_bytes:
        raise _Dead()
    return json.loads(_read_exact(fd, size, deadline).decode("utf-8"))


def _read_frame(fd: int, deadline: float, max_bytes: int) -> dict:
    """The next frame on ``fd``; ``_Late`` past ``deadline``, ``_Dead`` at end of file or on a frame too large."""
    if os.name != "nt":
        return _frame(fd, deadline, max_bytes)
    box: list = []  # pragma: no cover - Windows

    def read():
        try:
            box.append(_frame(fd, deadline, max_bytes))
        except BaseException as exc:  # handed over to the waiting thread
            box.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(max(0.0, deadline - time.monotonic()))
    if not box:
        raise _Late()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


class _Worker:
    """One renderer process and its pipes."""

    def __init__(self):
        from edgemed.env import worker_cwd, worker_env

        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgemed.templates.worker", str(MAX_MEMORY_BYTES), str(MAX_RECURSION)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=worker_env(),
                cwd=worker_cwd(), close_fds=True)
        except OSError as exc:
            raise TemplateError(f"Could not start the template renderer process ({exc}).",
                                f"check that {sys.executable} runs") from None
        self.ready = False

    def call(self, payload: bytes, seconds: float, max_bytes: int) -> dict:
        out = self.proc.stdout.fileno()
        if not self.ready:
            try:
                self.ready = _read_frame(out, time.monotonic() + STARTUP_SECONDS, 1024).get("ready") is True
            except (_Dead, _Late, ValueError):
                pass
            if not self.ready:
                raise TemplateError("The template renderer process did not start (python -m edgemed.templates.worker).",
                                    f"check that {sys.executable} can import jinja2 and edgemed")
        data = HEADER.pack(len(payload)) + payload
        fd = self.proc.stdin.fileno()
        while data:
            data = data[os.write(fd, data):]
        return _read_frame(out, time.monotonic() + seconds + GRACE_SECONDS, max_bytes)

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class _Pool:
    def __init__(self, size: int):
        self.idle: list[_Worker] = []
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(size)
        self.pid = os.getpid()

    def _take(self) -> _Worker | None:
        with self.lock:
            if self.pid != os.getpid():  # a forked child: those pipes belong to the parent's workers
                self.idle, self.pid = [], os.getpid()
            return self.idle.pop() if self.idle else None

    def warm(self) -> None:
        with self.lock:
            if not self.idle and self.pid == os.getpid():
                self.idle.append(_Worker())

    def call(self, payload: bytes, seconds: float, max_bytes: int) -> dict:
        with self.slots:
            worker = self._take()
            reused = worker is not None
            worker = worker or _Worker()
            try:
                try:
                    reply = worker.call(payload, seconds, max_bytes)
                except BrokenPipeError:
                    if not reused:
                        raise
                    worker.kill()  # an idle worker that died meanwhile: once more, with a fresh one
                    worker = _Worker()
                    reply = worker.call(payload, seconds, max_bytes)
            except BaseException:
                worker.kill()
                raise
            with self.lock:
                self.idle.append(worker)
            return reply

    def shutdown(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, []
        for worker in idle:
            worker.kill()


_POOL = _Pool(MAX_WORKERS)
atexit.register(_POOL.shutdown)


def warm() -> None:
    """Start a renderer process in the background (no wait), so the first render finds it ready."""
    _POOL.warm()


def render(source: str, values: dict, *, flavor: str, seconds: float = MAX_SECONDS,
           max_output: int | None = None) -> str:
    """``source`` rendered with ``values`` by the ``flavor`` environment ("chat" or "prompt", see worker.py).

    Raises ``RenderFailure`` for anything the template did (the caller words it), ``InputError`` when
    ``values`` hold text that is not valid Unicode, ``TemplateError`` when no renderer could start.
    """
    request = {"source": source, "values": values, "flavor": flavor, "seconds": seconds}
    try:
        body = json.dumps(request, ensure_ascii=False, default=str)
        size = len(body)
        body = body.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"The text holds a character that is not valid Unicode ({exc.object[exc.start:exc.end]!r}).",
                         "send UTF-8 text (a lone surrogate such as \\ud800 is not a character)") from None
    except (RecursionError, ValueError):
        raise InputError("The messages or template inputs are nested too deeply to render.",
                         "send plain text messages and flat inputs") from None
    if max_output is None:
        max_output = max(MAX_OUTPUT_CHARS, OUTPUT_PER_INPUT * size)
    payload = body[:-1] + b', "max_output": %d}' % max_output  # the limit depends on the encoded size
    try:
        # a reply frame is JSON: a control character of the text takes 6 bytes there (\u0001), any other at most 4
        reply = _POOL.call(payload, seconds, 6 * max_output + 4096)
    except _Late:
        raise RenderFailure("time", seconds=seconds) from None
    except (_Dead, OSError, ValueError):  # the pipe broke, or the worker wrote garbage as it died
        raise RenderFailure("crash") from None
    if reply.get("ok"):
        return reply["text"]
    raise RenderFailure(reply.get("kind", "error"), str(reply.get("detail", "")), seconds, max_output)
