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
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from edgemed.errors import InputError

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
#: Verdicts kept (grammar sha256 -> None, or the reason it was refused).
VERDICTS = 256

FIX = ("send a grammar whose alternatives do not match the same text under a repetition (or a JSON schema without "
       "such a pattern), or leave it out")


class GrammarProbe:
    """Tries grammars for one model's vocabulary in a worker process; thread-safe, one probe at a time."""

    def __init__(self, model_path: Path | str, *, seconds: float = PROBE_SECONDS, tokens: int = PROBE_TOKENS):
        self.model_path, self.seconds, self.tokens = Path(model_path), seconds, tokens
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._verdicts: collections.OrderedDict[str, str | None] = collections.OrderedDict()
        self.limit = seconds  # the worker's calibrated limit, once it has started
        self.probes = self.refused = 0

    def check(self, gbnf: str) -> None:
        """``InputError`` when the worker could not follow ``gbnf`` within the limits (or it crashed the worker)."""
        key = hashlib.sha256(gbnf.encode("utf-8", "surrogatepass")).hexdigest()
        with self._lock:
            if key in self._verdicts:
                self._verdicts.move_to_end(key)
                reason = self._verdicts[key]
            else:
                reason = self._probe(gbnf)
                self._verdicts[key] = reason
                while len(self._verdicts) > VERDICTS:
                    self._verdicts.popitem(last=False)
        if reason is not None:
            raise InputError(f"The grammar was refused: {reason}.", FIX)

    def close(self) -> None:
        with self._lock:
            self._stop()

    # -- the worker ----------------------------------------------------------------------------
    def _probe(self, gbnf: str) -> str | None:
        self.probes += 1
        proc = self._start()
        request = json.dumps({"grammar": gbnf, "tokens": self.tokens, "seconds": self.limit}) + "\n"
        try:
            proc.stdin.write(request)
            proc.stdin.flush()
        except OSError:
            self._stop()
            return self._refuse("it crashed the grammar parser (the worker process ended)")
        answer = self._read(proc, self.limit + GRACE_SECONDS)
        if answer is None:
            alive = proc.poll() is None
            self._stop()
            if alive:
                return self._refuse(f"following it for {self.tokens} tokens took longer than {self.limit:.1f} s "
                                    "(a grammar whose alternatives match the same text under a repetition grows "
                                    "the parses llama.cpp tracks exponentially)")
            return self._refuse("it crashed the grammar parser (the worker process ended)")
        if answer.get("ok"):
            return None
        return self._refuse(answer.get("error") or "the worker refused it")

    def _refuse(self, reason: str) -> str:
        self.refused += 1
        log.warning("grammar refused by the probe: %s", reason)
        return reason

    def _start(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "edgemed.runtime.grammar_probe", str(self.model_path), str(self.tokens)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, encoding="utf-8")
        ready = self._read(self._proc, STARTUP_SECONDS)
        if not ready or not ready.get("ready"):
            self._stop()
            raise InputError("The grammar could not be checked: its checking process did not start.",
                             "retry; if it persists, see the server log")
        self.limit = max(self.seconds, PROBE_FACTOR * float(ready.get("calibration_s") or 0))
        return self._proc

    def _read(self, proc: subprocess.Popen, seconds: float) -> dict | None:
        """The worker's next answer line, or None on time-out or its end."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if ready:
                line = proc.stdout.readline()
                if not line:
                    return None
                try:
                    return json.loads(line)
                except ValueError:
                    return None

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
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
            return {"ok": False, "error": exc.problem}
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
    from edgemed.runtime.llamacpp import Model

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
