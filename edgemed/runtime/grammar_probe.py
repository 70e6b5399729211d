"""Try a request's grammar in a separate process before the server follows it.

llama.cpp's grammar sampler keeps every parse of the answer so far. A grammar whose alternatives match the same
text under a repetition (``root ::= ([a-z ]+ | [a-z ]+ | ...)*``, or the converter's rendering of a JSON-schema
``pattern`` such as ``^([a-z]+|[a-z]+)*$``) makes that set grow exponentially with the number of alternatives:
on a 2-core Xeon with SmolLM2, 0.2 s a token with 4 alternatives, 2.2 s with 6, over 10 s with 8, so a
130-byte request froze every answer of the server for hours, and one llama.cpp call cannot be interrupted.
The parser itself recurses per nesting level and can overflow its stack (``sampling.check_gbnf`` refuses the
known shapes first).

So ``GrammarProbe`` hands each new grammar to a worker process that holds the model's vocabulary only
(``Model(vocab_only=True)``): it builds the grammar sampler and follows it for ``PROBE_TOKENS`` tokens picked
from seeded random logits, the way the server would sample an answer. A grammar the worker cannot follow within
its limit (``PROBE_SECONDS``, or more on a large vocabulary or a slow machine; the worker is killed at the limit
plus ``GRACE_SECONDS`` and a fresh one started), or that
crashes it, is refused with an ``InputError`` before the server's own process ever parses it. Verdicts are kept
per grammar (its sha256), so a JSON schema an application sends every time is tried once.

What it cannot see: a grammar whose costly part starts only after more than ``PROBE_TOKENS`` tokens of a random
path. The batcher also bounds what one token may cost while it runs (``Batcher`` ends a request whose sampling
took longer than ``runtime.batch.batcher.GRAMMAR_TOKEN_S``).

Run as ``python -m edgemed.runtime.grammar_probe MODEL.gguf`` it is the worker: one JSON request per line on
stdin (``{"grammar": TEXT}``), one JSON answer per line on stdout.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from edgemed.errors import Closed, EdgemedError, InputError, Overloaded, retry_seconds

log = logging.getLogger(__name__)

#: Tokens the worker follows each grammar for. The seconds it may take for them: ``PROBE_SECONDS``, or
#: ``PROBE_FACTOR`` times what a grammar allowing any printable text takes on this vocabulary and machine
#: (measured when the worker starts: the cost of one grammar step grows with the vocabulary), if that is longer.
PROBE_TOKENS = 8
#: Random paths tried where one ends before ``PROBE_TOKENS`` tokens.
PATHS = 8
PROBE_SECONDS = 2.0
PROBE_FACTOR = 10.0
CALIBRATION = 'root ::= [ -~]*'
GRACE_SECONDS = 1.0
#: A worker starting (Python, llama.cpp, the vocabulary) on a slow device; not counted in PROBE_SECONDS.
STARTUP_SECONDS = 60.0
#: Verdicts kept (grammar sha256 -> None, or the reason it was refused and the parser's own fix, if any).
VERDICTS = 256
#: Longest a request with a new grammar waits for the worker while another new grammar is tried (then 429).
BUSY_WAIT_S = 5.0

FIX = ("send a grammar whose alternatives do not match the same text under a repetition (or a JSON schema without "
       "such a pattern), or leave it out")


class GrammarRefused(InputError):
    """A grammar the worker could not follow within its limits, that crashed it, or that llama.cpp's parser
    rejected; ``parser_fix`` is the parser's own fix in that last case (None for the others, whose fix is ``FIX``)."""

    def __init__(self, reason: str, parser_fix: str | None = None):
        super().__init__(f"The grammar was refused: {reason.rstrip('.')}.", parser_fix or FIX)
        self.parser_fix = parser_fix


class ProbeBusy(Overloaded):
    """Another request's new grammar is being tried: the server answers 429 with Retry-After."""

    def __init__(self, retry_after: float):
        EdgemedError.__init__(self, "Another request's grammar is being checked, and this one is new to the server.",
                              f"retry in {retry_seconds(retry_after)} s")
        self.retry_after = retry_after


class ProbeUnavailable(Closed):
    """The worker process cannot run here: the server answers 503 (the grammar is not the client's fault)."""


class GrammarProbe:
    """Tries grammars for one model's vocabulary in a worker process; thread-safe. A grammar tried before is answered
    from its verdict at once; a new one waits at most ``BUSY_WAIT_S`` for the worker (one probe at a time), else
    ``ProbeBusy``."""

    def __init__(self, model_path: Path | str, *, seconds: float = PROBE_SECONDS, tokens: int = PROBE_TOKENS):
        # absolute: the worker runs in another folder (env.worker_cwd)
        self.model_path, self.seconds, self.tokens = Path(model_path).absolute(), seconds, tokens
        self._probing = threading.Lock()  # the worker: one probe at a time
        self._state = threading.Lock()  # verdicts, the process handle, closed: held for moments only
        self._proc: subprocess.Popen | None = None
        self._closed = False
        self._verdicts: collections.OrderedDict[str, tuple[str, str | None] | None] = collections.OrderedDict()
        self.limit = seconds  # the worker's calibrated limit, once it has started
        self.probes = self.refused = 0

    def check(self, gbnf: str) -> None:
        """``GrammarRefused`` when the worker could not follow ``gbnf`` within the limits (or it crashed the worker);
        ``ProbeBusy`` when another new grammar holds the worker longer than ``BUSY_WAIT_S``; ``ProbeUnavailable``
        when the worker cannot run here."""
        key = hashlib.sha256(gbnf.encode("utf-8", "surrogatepass")).hexdigest()
        verdict = self._verdict(key)
        if verdict is _UNKNOWN:
            if not self._probing.acquire(timeout=BUSY_WAIT_S):
                raise ProbeBusy(self.limit + GRACE_SECONDS)
            try:
                verdict = self._verdict(key)  # another request may have tried it meanwhile
                if verdict is _UNKNOWN:
                    verdict = self._probe(gbnf)
                    with self._state:
                        self._verdicts[key] = verdict
                        while len(self._verdicts) > VERDICTS:
                            self._verdicts.popitem(last=False)
            finally:
                self._probing.release()
        if verdict is not None:
            raise GrammarRefused(*verdict)

    def close(self) -> None:
        """Stop the worker (at once, even while it probes); no worker starts after this."""
        with self._state:
            self._closed = True
            proc, self._proc = self._proc, None
        _kill(proc)

    # -- the worker ----------------------------------------------------------------------------
    def _verdict(self, key: str):
        with self._state:
            if key not in self._verdicts:
                return _UNKNOWN
            self._verdicts.move_to_end(key)
            return self._verdicts[key]

    def _probe(self, gbnf: str) -> tuple[str, str] | None:
        self.probes += 1
        proc = self._start()
        request = json.dumps({"grammar": gbnf, "tokens": self.tokens, "seconds": self.limit}).encode() + b"\n"
        try:
            proc.stdin.write(request)
            proc.stdin.flush()
        except OSError:
            self._stop(proc)
            return self._refuse("it crashed the grammar parser (the worker process ended)")
        answer = _read_line(proc, self.limit + GRACE_SECONDS)
        if answer is _ENDED and self._closed:  # ``close`` killed it: the server is stopping, not the grammar's doing
            raise ProbeUnavailable("The model server is shutting down.", "retry when it is back")
        if answer is None or answer is _ENDED:
            self._stop(proc)
            if answer is None:  # timed out: still following it
                return self._refuse(f"following it for {self.tokens} tokens took longer than {self.limit:.1f} s "
                                    "(a grammar whose alternatives match the same text under a repetition grows "
                                    "the parses llama.cpp tracks exponentially)")
            return self._refuse("it crashed the grammar parser (the worker process ended)")
        if answer.get("ok"):
            return None
        return self._refuse(answer.get("error") or "the worker refused it", answer.get("fix"))

    def _refuse(self, reason: str, parser_fix: str | None = None) -> tuple[str, str | None]:
        self.refused += 1
        log.warning("grammar refused by the probe: %s", reason)
        return reason, parser_fix

    def _start(self) -> subprocess.Popen:
        """The running worker, started if need be (caller holds ``_probing``)."""
        with self._state:
            if self._closed:
                raise ProbeUnavailable("The model server is shutting down.", "retry when it is back")
            if self._proc is not None and self._proc.poll() is None:
                return self._proc
        from edgemed.env import worker_cwd, worker_env

        why = None
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgemed.runtime.grammar_probe", str(self.model_path), str(self.tokens)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=worker_env(),
                cwd=worker_cwd(), close_fds=True)
        except OSError as exc:
            proc, why = None, f"{sys.executable} did not start ({exc})"
        ready = _read_line(proc, STARTUP_SECONDS) if proc is not None else None
        if proc is not None and not (isinstance(ready, dict) and ready.get("ready")):
            try:
                code = proc.wait(timeout=1)  # it ended (its pipe closed): its exit code
            except subprocess.TimeoutExpired:
                code = None
            why = f"it ended with exit code {code}" if code is not None else \
                f"it was not ready within {STARTUP_SECONDS:g} s"
            _kill(proc)
        if why is not None:
            log.error("the grammar checking process for %s could not start: %s", self.model_path.name, why)
            raise ProbeUnavailable(f"Requests with a grammar cannot be served now: the process that checks grammars "
                                   f"could not start ({why}).", "see the server log; requests without a grammar work")
        with self._state:
            if self._closed:
                _kill(proc)
                raise ProbeUnavailable("The model server is shutting down.", "retry when it is back")
            self._proc = proc
        self.limit = max(self.seconds, PROBE_FACTOR * float(ready.get("calibration_s") or 0))
        return proc

    def _stop(self, proc: subprocess.Popen) -> None:
        with self._state:
            if self._proc is proc:
                self._proc = None
        _kill(proc)


_UNKNOWN = object()  # no verdict yet
_ENDED = object()  # the worker's output ended: it exited, or crashed


def _read_line(proc: subprocess.Popen, seconds: float):
    """The worker's next answer (one JSON line as a dict), None on time-out, ``_ENDED`` when its output ended (or
    was not JSON). Reads the pipe's file descriptor directly, so a partial line never blocks past ``seconds``."""
    fd, data, end = proc.stdout.fileno(), b"", time.monotonic() + seconds
    while b"\n" not in data:
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return _ENDED
        data += chunk
    try:
        answer = json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        return _ENDED
    return answer if isinstance(answer, dict) else _ENDED


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        try:
            pipe.close()
        except OSError:
            pass


# -- worker side -------------------------------------------------------------------------------
def _follow(model, gbnf: str, tokens: int, seconds: float) -> dict:
    """Build ``gbnf``'s sampler and follow it for ``tokens`` tokens from seeded random logits, never picking an
    end-of-generation token; a path that ends sooner (the grammar closes, or leaves nothing but the end) is tried
    again with the next seed, up to ``PATHS`` paths, so a grammar that can close at once (``"\"\""``) is still
    followed into what it repeats."""
    import ctypes

    import numpy as np

    from edgemed.errors import NoTokenAllowed
    from edgemed.runtime.engine import GenerationSettings
    from edgemed.runtime.llamacpp import SamplerChain

    logits = np.zeros(model.n_vocab, dtype=np.float32)
    pointer = logits.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    eog = np.array([t for t in range(model.n_vocab) if model.is_eog(t)], dtype=np.int64)

    class Chain(SamplerChain):
        def _row(self, ctx, index):
            return pointer

    t0 = time.perf_counter()
    for path in range(PATHS):
        rng = np.random.default_rng(path)
        try:
            chain = Chain(model, GenerationSettings(grammar=gbnf, temperature=1.0, seed=path))
        except InputError as exc:
            return {"ok": False, "error": exc.problem, "fix": exc.fix}
        followed = 0
        try:
            while followed < tokens and time.perf_counter() - t0 <= seconds:
                logits[:] = rng.standard_normal(model.n_vocab, dtype=np.float32)
                logits[eog] = -np.inf
                try:
                    chain.sample(None, 0)
                except NoTokenAllowed:
                    break  # this path has ended: the next seed
                followed += 1
        finally:
            chain.close()
        if followed >= tokens or time.perf_counter() - t0 > seconds:
            break
    took = time.perf_counter() - t0
    if took > seconds:
        return {"ok": False, "error": f"following it took {took:.1f} s for at most {tokens} tokens "
                                      f"(limit {seconds:.1f} s)"}
    return {"ok": True, "seconds": round(took, 4)}


def _worker(path: str, tokens: int) -> None:
    """The worker's loop (its stderr, llama.cpp's messages included, goes to the null device: ``GrammarProbe``).
    Ready once it has timed ``CALIBRATION`` for ``tokens`` tokens."""
    from edgemed.phi import no_core_dumps
    from edgemed.runtime.llamacpp import Model

    no_core_dumps(quiet=True)  # it follows requests' grammars and schemas: whoever started it, a crash leaves no core file
    model = Model(path, vocab_only=True)
    t0 = time.perf_counter()
    _follow(model, CALIBRATION, tokens, float("inf"))
    print(json.dumps({"ready": True, "calibration_s": time.perf_counter() - t0}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        answer = _follow(model, request["grammar"], int(request["tokens"]), float(request["seconds"]))
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]))
