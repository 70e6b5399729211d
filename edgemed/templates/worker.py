"""The template renderer process: renders untrusted Jinja with limits, one request at a time.

Run as ``python -m edgemed.templates.worker MEMORY_BYTES RECURSION`` by ``limits.py``, which
owns it. Frames on stdin/stdout are a 4-byte big-endian length and UTF-8 JSON:

    -> {"ready": true}                                   once, when the imports are done
    <- {"source", "values", "flavor", "seconds", "max_output"}
    -> {"ok": true, "text": ...} | {"ok": false, "kind": ..., "detail": ...}

Inside, each render is bounded in-process where that gives a quick, precise error: an alarm
after ``seconds`` (interrupts a Python loop that neither calls nor outputs), the output counted
chunk by chunk, ``*`` and ``**`` refused before they build a huge value, the address space
capped (``MemoryError``), the recursion depth capped. What those cannot stop (a long C call)
the owner stops by killing this process at its own, slightly later, deadline.
"""

from __future__ import annotations

import json
import signal
import struct
import sys
from datetime import datetime

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from edgemed.phi import no_core_dumps

#: Largest integer a template may compute with ``*`` or ``**`` (bits).
MAX_INT_BITS = 1 << 16
#: Compiled templates kept per process (a server renders one chat template, a few prompt templates).
CACHE_SIZE = 16
HEADER = struct.Struct(">I")
#: the most of a template's own text (a refusal, an error) that a failure's detail carries
MAX_DETAIL_CHARS = 500


class Failed(BaseException):
    """A render failed: ``kind`` is one of ``limits.REASONS``. A BaseException, so no ``except Exception``
    on the way (Jinja's or a filter's) can swallow a limit."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(kind, detail)
        self.kind, self.detail = kind, detail


class LimitedEnvironment(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with ``*`` and ``**`` checked before they run (also stops constant
    folding of them at compile time) and a cap on the length a product may reach."""

    intercepted_binops = frozenset({"*", "**"})
    max_items = 1 << 20

    def call_binop(self, context, operator, left, right):
        if operator == "**":
            _check_power(left, right)
        else:
            _check_product(left, right, self.max_items)
        return super().call_binop(context, operator, left, right)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_power(base, exponent) -> None:
    if _is_int(base) and _is_int(exponent) and exponent > 0 and abs(base) > 1:
        if abs(base).bit_length() * exponent > MAX_INT_BITS:
            raise Failed("value", f"{base} ** {exponent} is larger than {MAX_INT_BITS} bits")


def _check_product(left, right, max_items: int) -> None:
    if _is_int(left) and _is_int(right):
        if abs(left).bit_length() + abs(right).bit_length() > MAX_INT_BITS:
            raise Failed("value", f"a product is larger than {MAX_INT_BITS} bits")
        return
    for seq, count in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and _is_int(count) and len(seq) * count > max_items:
            raise Failed("value", f"a repetition ({len(seq)} x {count}) is longer than {max_items} items")


# -- flavors: how each kind of template is compiled and what it may call -----------------------------------
def _short(text: str) -> str:
    """A detail as shown to the user: a template's own text (a refusal, a name) can be of any length."""
    return text if len(text) <= MAX_DETAIL_CHARS else text[:MAX_DETAIL_CHARS] + "…"


def _raise_exception(message):
    raise Failed("refused", _short(str(message)))


def _tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


def _chat_environment() -> jinja2.Environment:
    """Hugging Face chat templates: the globals and filters transformers gives them."""
    env = LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _prompt_environment() -> jinja2.Environment:
    """edgemed's prompt templates: every input must be given (StrictUndefined)."""
    return LimitedEnvironment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=False, autoescape=False)


FLAVORS = {"chat": _chat_environment, "prompt": _prompt_environment}


# -- one render --------------------------------------------------------------------------------------------
class Renderer:
    def __init__(self):
        self.envs = {name: make() for name, make in FLAVORS.items()}
        self.cache: dict[tuple[str, str], jinja2.Template] = {}

    def compile(self, flavor: str, source: str) -> jinja2.Template:
        key = (flavor, source)
        if key not in self.cache:
            if len(self.cache) >= CACHE_SIZE:
                self.cache.pop(next(iter(self.cache)))
            self.cache[key] = self.envs[flavor].from_string(source)
        return self.cache[key]

    def render(self, req: dict) -> str:
        max_output = int(req["max_output"])
        self.envs[req["flavor"]].max_items = max_output
        template = self.compile(req["flavor"], req["source"])
        parts, size = [], 0
        for chunk in template.generate(**req["values"]):
            size += len(chunk)
            if size > max_output:
                raise Failed("output", str(max_output))
            parts.append(chunk)
        return "".join(parts)

    def handle(self, req: dict) -> dict:
        _alarm(float(req["seconds"]))
        try:
            text = self.render(req)
            text.encode("utf-8")  # what the owner tokenizes must be text
            return {"ok": True, "text": text}
        except Failed as exc:
            return {"ok": False, "kind": exc.kind, "detail": exc.detail}
        except jinja2.TemplateSyntaxError as exc:
            return {"ok": False, "kind": "syntax", "detail": _short(f"line {exc.lineno}: {exc.message}")}
        except jinja2.UndefinedError as exc:
            return {"ok": False, "kind": "undefined", "detail": _short(str(exc))}
        except SecurityError as exc:
            return {"ok": False, "kind": "unsafe", "detail": _short(str(exc))}
        except UnicodeEncodeError:
            return {"ok": False, "kind": "unicode", "detail": ""}
        except MemoryError:
            return {"ok": False, "kind": "memory", "detail": ""}
        except RecursionError:
            return {"ok": False, "kind": "recursion", "detail": ""}
        except Exception as exc:  # untrusted code: every failure is the template's, and is reported as such
            return {"ok": False, "kind": "error", "detail": _short(f"{type(exc).__name__}: {exc}")}
        finally:
            _alarm(0)


# -- the process -------------------------------------------------------------------------------------------
def _alarm(seconds: float) -> None:
    """Raise ``Failed("time")`` in this (main) thread after ``seconds``; 0 cancels. POSIX only: elsewhere
    the owner's deadline is the only bound on time."""
    if hasattr(signal, "setitimer"):
        signal.setitimer(signal.ITIMER_REAL, seconds)


def _on_alarm(signum, frame):
    raise Failed("time")


def _limit_memory(limit: int) -> None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX: the owner's deadline is the only bound
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def read_frame(stream) -> dict | None:
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    return json.loads(stream.read(HEADER.unpack(head)[0]).decode("utf-8"))


def write_frame(stream, message: dict) -> None:
    data = json.dumps(message, ensure_ascii=False).encode("utf-8")
    stream.write(HEADER.pack(len(data)) + data)
    stream.flush()


def main(argv: list[str]) -> int:
    memory, recursion = int(argv[0]), int(argv[1])
    no_core_dumps(quiet=True)  # it renders clinicians' text: whoever started it, a crash leaves no core file
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner handles Ctrl-C, then closes our stdin
    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, _on_alarm)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but frames on the protocol pipe
    renderer = Renderer()
    _limit_memory(memory)
    sys.setrecursionlimit(recursion)
    write_frame(out, {"ready": True})
    while True:
        req = read_frame(inp)
        if req is None:
            return 0
        try:
            reply = renderer.handle(req)
        except Failed as exc:  # the alarm fired just after the render ended
            reply = {"ok": False, "kind": exc.kind, "detail": exc.detail}
        write_frame(out, reply)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
