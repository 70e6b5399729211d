"""Continuous batching on llama.cpp: several requests decoded together, one step after another.

One scheduler thread owns the llama context. A step is one ``llama_decode`` of the next token of
every generating sequence (in slot order), then one per prompt chunk of newly admitted sequences:
every waiting short prompt whole (they start generating together), a long one in chunks of the whole
batch when nobody is generating, else sized so the step stays within ``1 + STALL_BUDGET`` plain steps
(``prefill.py``: a long prompt never stalls running streams).
Sequence id = slot; each slot has its own KV stream (``kv_unified = false``) of ``n_ctx_per_slot``
cells, so a request never spills into another's context. A finished request's slot keeps its prompt's
cells and their token ids, and a new request whose prompt starts with the same ids is prefilled from
where they part (prefix reuse, below; off with ``prefix_cache=False``). Each sequence with logits
samples from its own sampler chain and checks its own stops (end of generation, stop strings,
``max_tokens``); a finished or cancelled one leaves before the next step, and queued requests join
between steps.

``submit`` (any thread) never waits for the model: it tokenizes, checks the context, builds the
sampler and queues, or raises ``Overloaded`` past ``slots + queue_size`` requests in flight. Output
goes to a ``Stream`` (``stream.py``); a request's state, its end and the counters are in ``sequence.py``.
No prompt or output text is logged: ids, counts, timings only.

Prefix reuse (a chat resends its whole history each turn): a request goes to the free slot where
``reused - evicted`` is largest, ``reused`` being the tokens its prompt shares from the start with the
ids the slot holds and ``evicted`` the held ones past that (removed); ties go to the lowest slot. So a
conversation's next turn finds its own slot, and an unrelated prompt takes an empty or short slot
rather than throwing a long history away for a few shared template tokens. At least the prompt's last
``REFEED`` tokens are always fed again, for logits to sample from. A slot serves only the identical
token-id prefix of what it computed itself; a request that fails mid-step leaves its slot empty (its
cells are unknown). Only prompt cells are kept, never those of sampled tokens (``Seq.held``): those are
computed one row at a time, and the next turn, which resends them as prompt, would answer differently
from a cold run (seen on multi-turn SmolLM2 chats); with prompt cells only, SmolLM2's Q4_1 file answers token for
token as cold. Its Q4_K_M file and Qwen2.5-1.5B Q4_K_M do not (docs/serve.md, ``tests/test_row_layouts.py``): a
row's cells depend in the last bits on the size of the chunk that computed it, and chunks here are sized by the load
(``llamacpp.Context.reuse_unit``, which makes the one-sequence engine exact, has no counterpart here yet).

Answers kept while idle (same switch). The next turn of a chat resends the last answer as prompt. Its cells as
sampled are not kept (above), so when the scheduler has nothing else to do it feeds each finished answer's sampled
ids (the end-of-generation token included) into the answer's free slot as prompt rows, ``ANSWER_CHUNK`` at a
time and never a one-token piece: a clinician reading the answer gives the server that time, and the next turn
computes only the new question, with the cells a cold run would compute (the same multi-row kernels). A request
arriving meanwhile does not wait for the call: llama.cpp gives it up at its next graph node (``decode_unless``;
the call's cells are removed, its rows fed again at the next idle moment), the scheduler gathers whoever arrives
with the request, and serves them. A slot taken by another request drops the rest of its answer; an answer under an
adapter is fed under that adapter (a removed one's is not).

Prefixes across slots (same switch). After its own slot, a request looks for a longer prefix, by at least
``MIN_SHARED`` tokens, in: another free slot's kept cells, a running request's computed prompt (positions below
its ``pos``, prompt part only), and the host cache (below). A slot's prefix is copied with ``Context.copy_seq``:
between KV streams ``llama_memory_seq_cp`` copies the whole stream buffer (partial ranges assert there) and
defers the data to the next decode's memory update, so the copy is trimmed to the shared part at once and the
slots it reads and writes are ``_unsynced`` until a decode ran: no host save, restore or kept prefix touches them
meanwhile. Requests arriving together with the same preamble compute it once: a request finding no holder, but an
earlier admitted one computing a prompt that shares at least ``MIN_SHARED`` more tokens, waits for it
(``Seq.donor``, ``Seq.share``: it is ``waiting`` and feeds nothing); at the start of the step after the donor's
``pos`` passes the shared length, ``_take_shared`` copies the prefix and the request feeds only its own rest.
It waits only where the donor's remaining shared tokens are no more than what the request would compute alone
(the donor, earlier in arrival order, is fed first), so waiting never takes longer than computing; a donor that
leaves first sends the request looking again (else it computes its prompt itself). Four requests with a
300-token preamble: one prefill of ~330 tokens, then the other three's ~30 each, instead of 4 x 330 in one step.

Host RAM (``prefix.PrefixCache``, ``prefix_cache_bytes``, 0: none). When a free slot's kept cells would go (an
unrelated prompt takes the slot, a trim to a shorter shared prefix, an n > 1 choice's slot), a prefix of at least
``HOST_MIN`` tokens is saved first (``Context.save_seq``: llama.cpp's per-sequence state), keyed by adapter key,
scope and the exact ids; a request whose longest match is there restores it into its own slot (``restore_seq``:
into any sequence id, llama.cpp writes the destination's stream) and trims it to the match. LRU within the byte
bound. Everything cached is tied to this batcher's one model, the adapter key (``_key``: name, scale, handle: never
shared across keys; ``_close_adapter`` purges the adapter's host entries), the request's scope (``submit_n``: a
server scopes by API key, so one key's prompts are neither reused by nor timed against another's) and the
identical token-id prefix (``_cache_key``); a request that fails mid-step leaves nothing reusable. Counters:
``prompt_tokens_cached_{slot,copied,host}_total`` and ``prefix_host_*`` in ``stats()``; ``Finished.cached_tokens`` counts every reused token, wherever from.
A request's cached tokens are added to the counters when it ends, with the source it ended with (``_count`` may
replace its own slot's tokens by a longer copy while it waits): counters that only grow, as Prometheus reads them.

LoRA adapters (``adapters``, ``add_adapter``, ``remove_adapter``): the base is loaded once, with one context and
one KV cache; each named adapter is loaded once (its tensors only) and each request names one (or none: the base).
llama.cpp applies adapters to a whole context, so requests under different adapters cannot share a
``llama_decode``: adapter groups take the context in turn (``_next_group``), the group's adapter set on it before
its decodes (``Context.set_adapters``), with the same batching, prefill chunking and 429 as without adapters, and
KV memory is not multiplied by the adapters. Each switch costs llama.cpp a re-reserve of its compute graph on the
next decode (about a third of a one-row decode of Qwen2.5-0.5B), so a group keeps the context for
``adapter_turn`` steps (``ADAPTER_TURN``) before the next group in a round robin takes it: every group still
generates every ``groups x adapter_turn`` steps, in bursts, and a switch is paid once per turn. A slot's kept
prompt cells belong to the adapter (and scale) they were computed under and are never reused under another. A
removed adapter takes no new request; it stays loaded until the last request using it ends (``finishing``), and
its name cannot be given to another until then. Each adapter is known by its file's sha256, hashed once before the
load (``loader.hashed``), and each stream carries the name, sha256 and scale it is generated under (``Stream.adapter``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import time
from pathlib import Path

from edgemed.errors import (  # re-exported
    AdapterError, Closed, ContextOverflow, InputError, ModelLoadError, NoTokenAllowed, Overloaded,
)
from edgemed.runtime import heap
from edgemed.runtime.llamacpp import REFEED  # a prompt found whole in a slot still feeds its last REFEED tokens
from edgemed.runtime.engine import GenerationSettings, LoadSettings, check_fits, check_seed
from edgemed.runtime.text_stream import TextStream
from edgemed.runtime.batch.options import Extras, entry, sampler_for
from edgemed.runtime.grammar_probe import GrammarProbe
from edgemed.runtime.sampling import grammar_text
from edgemed.runtime.batch.prefix import HOST_MIN, Entry, PrefixCache
from edgemed.runtime.batch.prefill import STALL_BUDGET, WHOLE_PROMPT, PrefillBudget, chunk_of, equal_pieces
from edgemed.runtime.batch.sequence import Counters, Seq
from edgemed.runtime.batch.stream import Finished, Piece, Stream

__all__ = ["Batcher", "Closed", "Finished", "Overloaded", "PREFIX_CACHE_BYTES", "Piece", "STALL_BUDGET", "Stream"]

log = logging.getLogger(__name__)

#: An idle scheduler woken by a request waits this long for more before its first step (they share the
#: prefill; HTTP requests sent at once reach the batcher milliseconds apart), and never longer than GATHER_MAX_S.
#: Four clinicians' turns with 1,500-token histories, sent at once to the 1.5B's server, reached it further apart
#: than 10 ms of quiet allowed (each is parsed, rendered and tokenized under the interpreter lock): the first went
#: alone, and the other three waited its whole prefill step (first token 4.0 s against 2.2 s; decision 0015).
GATHER_QUIET_S = 0.030
GATHER_MAX_S = 0.100
#: A server whose requests announce themselves (``Batcher.arriving``) gathers differently: while any request is
#: between its arrival and its submit, the scheduler waits for it (at most ``GATHER_MAX_S``); once none is, only
#: this long for one whose bytes are still on their way. A lone request so starts ``GATHER_QUIET_S`` sooner (a
#: conversation's later turn, one client's back-to-back requests: decision 0023).
GATHER_LATE_S = 0.005
#: A finished answer is fed back into its slot (``_keep_answer``) only once the scheduler has had no request for this
#: long: a client sending its next request straight after an answer (a script, an agent) finds the cores free for
#: its parsing, templating and tokenizing, rather than shared with an idle call the request then interrupts.
ANSWER_GRACE_S = 0.050
#: Host RAM the prefix cache may hold by default (bytes): a few long conversations of a small model.
PREFIX_CACHE_BYTES = 256 * 1024 * 1024
#: A request takes a prefix from another slot (a copy of that slot's KV stream) or waits for a request
#: computing the same prefix only when that saves at least this many prompt tokens: a cross-stream copy
#: moves the whole stream buffer (every cell of every layer, whatever the prefix's length), and a 4-request
#: template run (SmolLM2, 1 thread) showed no gain from sharing a dozen tokens of chat header.
MIN_SHARED = 32
#: Answer tokens one idle call feeds into a free slot (``_keep_answer``). A request arriving meanwhile does not wait
#: for the call: llama.cpp gives it up at the next graph node (``Context.decode_unless``), losing only that call's
#: rows, so the chunk is sized for throughput: Qwen2.5-1.5B Q4_K_M at 2 threads computes 55 prompt tok/s in calls
#: of 16 and 75 in calls of 64 (``llama-bench -p 16,64``, Xeon AVX-512), and four clinicians' 97-token answers
#: must be in before they finish reading them.
ANSWER_CHUNK = 64
#: Steps an adapter group decodes before the next group takes the context, when requests under several adapters
#: run (1: every group every step). A switch re-reserves llama.cpp's graph (about 10 ms against a 35 ms one-row
#: decode of Qwen2.5-0.5B Q4_K_M at 2 threads); four one-request groups served 0.5B tokens 1.3x faster at 16 than
#: at 1 in-process, and a group waits (groups - 1) x 16 steps between its bursts (decision 0013).
ADAPTER_TURN = 16
#: Longest one token's sampling under a grammar may take: past it the request ends (``_sample``). The grammar probe
#: (``runtime.grammar_probe``) refuses most costly grammars before they start; this bounds the rest.
GRAMMAR_TOKEN_S = 2.0
#: What a served adapter may be called (it becomes part of a model name, ``MODEL:NAME``, and a metrics label).
ADAPTER_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"


class UnknownAdapter(InputError):
    """A request named an adapter this batcher does not serve (or no longer: removed)."""


class AdapterNameTaken(InputError):
    """``add_adapter`` was given the name of an adapter served now, or of one removed whose last ``finishing``
    requests are still running (it is freed, and its name free, once they end)."""

    def __init__(self, name: str, finishing: int | None):
        self.name, self.finishing = name, finishing
        if finishing is None:
            super().__init__(f"An adapter named '{name}' is already served.", "remove it first, or pick another name")
        else:
            super().__init__(f"The adapter '{name}' was removed and is still loaded: {finishing} running request(s) "
                             "use it, and it is freed once they end.",
                             "wait until those requests finish, then add it again (or pick another name)")


@dataclasses.dataclass(eq=False)
class _Loaded:
    """A served adapter: llama.cpp's handle, its scale, its file's sha256 (which weights it is), the requests using
    it, and whether it was removed."""

    name: str
    adapter: object  # llamacpp.Adapter
    scale: float
    path: Path
    sha256: str
    refs: int = 0
    removed: bool = False

    @property
    def key(self) -> tuple:
        return (self.name, self.scale, id(self.adapter))

    @property
    def weights(self) -> dict:
        """What answers under it: its name, its file's sha256 and its scale (a stream's ``adapter``, the audit's)."""
        return {"name": self.name, "sha256": self.sha256, "scale": self.scale}


#: Prompt rows with logits per step, for requests that score their prompt (echo with logprobs). llama.cpp's output
#: buffer grows to the most rows one call asked for and keeps that size for the server's life, where the memory plan
#: counts one row: a 441-token echo on Qwen2.5-0.5B (151,936 entries) took the resident memory from 656 to 1,147 MiB
#: when fed whole, to 686 MiB in pieces of 32.
ECHO_ROWS = 32


class Batcher:
    """Continuous batching over one llama.cpp context; see the module docstring.

    ``load.n_ctx`` is the whole KV cache, split evenly over the slots (as llama.cpp's
    server does), so the memory plan made for ``load`` still holds; pass
    ``n_ctx_per_slot`` to size each slot instead (the cache is then ``slots`` times it).
    ``prefill_chunk`` fixes the prompt tokens a step takes while others generate; None (the
    default) sizes it from measured step costs so running streams slow by at most 1 + STALL_BUDGET.
    ``prefix_cache`` (default on) lets a request reuse the KV of the prompt prefix its slot already holds.
    ``prefix_cache_bytes``: host RAM the prefix cache may hold (saved slot prefixes, least recently used evicted
    first); 0: no host cache.
    """

    def __init__(self, model_path: Path, load: LoadSettings, *, slots: int = 4, queue_size: int = 16,
                 n_ctx_per_slot: int | None = None, prefill_chunk: int | None = None, prefix_cache: bool = True,
                 adapters: dict | None = None, prefix_cache_bytes: int = PREFIX_CACHE_BYTES,
                 adapter_turn: int = ADAPTER_TURN, grammar_probe: bool = True):
        if slots < 1 or queue_size < 0:
            raise InputError(f"slots must be >= 1 and queue_size >= 0 (got {slots}, {queue_size}).",
                             "pass --slots 1 or more and --queue 0 or more")
        self.model_path = Path(model_path)
        self.load = load
        self.slots = slots
        self.queue_size = queue_size
        self.n_ctx_per_slot = n_ctx_per_slot or load.n_ctx // slots
        if self.n_ctx_per_slot < 16:
            raise InputError(f"{slots} slots leave {self.n_ctx_per_slot} tokens of context each.",
                             "use fewer slots or a larger context")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise InputError(f"prefill_chunk must be >= 1 (got {prefill_chunk}).", "pass --prefill-chunk 1 or more")
        if adapter_turn < 1:
            raise InputError(f"adapter_turn must be >= 1 (got {adapter_turn}).", "pass --adapter-turn 1 or more")
        self.adapter_turn = adapter_turn
        self._order: list = []  # adapter keys in the order their groups take the context next (``_next_group``)
        self._turn: tuple = (_NOBODY, 0)  # the group holding the context (key), steps it keeps it still
        self.prefill_chunk = prefill_chunk
        self._prefill = PrefillBudget(prefill_chunk)
        self.prefix_cache = prefix_cache
        if prefix_cache_bytes < 0:
            raise InputError(f"prefix_cache_bytes must be >= 0 (got {prefix_cache_bytes}).",
                             "pass 0 for no host-RAM prefix cache, or a size in bytes")
        self.prefix_cache_bytes = int(prefix_cache_bytes) if prefix_cache else 0
        self._host = PrefixCache(self.prefix_cache_bytes)  # saved prefixes of slots that turned over
        #: a request's grammar is tried in a worker process first (``runtime.grammar_probe``): one llama.cpp cannot
        #: follow cheaply would otherwise hold every request's step for as long as it takes
        self._probe = GrammarProbe(self.model_path) if grammar_probe else None
        self._unsynced: set[int] = set()  # slots a queued seq copy reads or writes: synced by the next decode
        self._kept: list[list[int]] = [[] for _ in range(slots)]  # token ids a free slot's cells hold
        self._kept_key: list = [None] * slots  # (adapter key, scope) those cells were computed under (None: none kept)
        self._worked = False  # a step or an idle call ran since the heap was last trimmed
        self._answers: list = [None] * slots  # (kept list, answer ids still to feed) of a free slot, for idle time
        self._initial_adapters = dict(adapters or {})  # name -> loader.AdapterSpec, loaded by start()
        self._adapters: dict[str, _Loaded] = {}  # served by name (removed ones stay until their last request ends)
        self._step_lock = threading.Lock()  # held by the scheduler over a step; adapter loads and frees take it
        self._model = self._ctx = self._batch = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._native = threading.Lock()  # request threads use the vocabulary under it; freeing waits for them
        self._queue: collections.deque[Seq] = collections.deque()
        self._active: list[Seq] = []
        self._admitting: list[Seq] = []  # taken from the queue by ``_admit``, not yet in ``_active``
        self._free: list[int] = []
        self._stopping = False
        self._releasing: list = []  # removed adapters whose last request ended: freed outside the lock
        self._service_s = 1.0  # moving average of a request's time in a slot, for Retry-After
        self._n = Counters()
        self._announced = False  # requests announce themselves (``arriving``): gathering counts them
        self._arriving = 0  # requests between ``arriving``'s entry and exit (parsed, rendered, tokenized; not queued)
        self._t_ended = 0.0  # perf_counter() of the last request's end, for ``ANSWER_GRACE_S``

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model and start the scheduler thread."""
        from edgemed.runtime.llamacpp import Batch, Context, physical_cores
        from edgemed.runtime.loader import hashed, load_model, unchanged

        if self._thread is not None:
            return
        threads = self.load.n_threads or physical_cores()
        for name in self._initial_adapters:
            _check_name(name)
        self._model = load_model(self.model_path, self.load, list(self._initial_adapters.values()))
        try:
            self.load = self._model.load  # the host self-test may have chosen safer buffers
            self.n_ctx_per_slot = min(self.n_ctx_per_slot, self._model.n_ctx_train)
            self._ctx = Context(self._model, self.load, n_ctx=self.slots * self.n_ctx_per_slot, n_seq_max=self.slots,
                                kv_unified=False)  # one KV stream per slot: a slot can never use another's cells
            self.n_ctx_per_slot = min(self.n_ctx_per_slot, self._ctx.n_ctx_seq)
            if self._ctx.n_batch < self.slots:
                raise ModelLoadError(f"n_batch {self._ctx.n_batch} is smaller than the {self.slots} slots.",
                                     "raise n_batch or use fewer slots")
            self._batch = Batch(self._model.lib, self._ctx.n_batch)
            self._model.token_bounds()  # read from the vocabulary now, not in the first request
            for name, spec in self._initial_adapters.items():
                spec, before = hashed(_spec_of(spec))
                self._adapters[name] = self._load_adapter(name, spec)
                unchanged(spec, before)  # else freed below with the rest
        except BaseException:
            self._free_native()
            raise
        self._free = list(range(self.slots - 1, -1, -1))
        self._thread = threading.Thread(target=self._run, name="edgemed-batcher", daemon=True)
        self._thread.start()
        log.info("batcher started: %s, %d slots x %d tokens, queue %d, %d threads", self.model_path.name,
                 self.slots, self.n_ctx_per_slot, self.queue_size, threads)

    def close(self) -> None:
        """Stop the scheduler, end every queued and running stream ("cancelled"), free llama.cpp."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        else:
            self._free_native()
        if self._probe is not None:
            self._probe.close()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    # -- adapters --------------------------------------------------------------------------
    def _load_adapter(self, name: str, spec) -> _Loaded:
        """``spec`` as ``loader.hashed`` gave it, loaded (no step runs meanwhile)."""
        from edgemed.runtime.loader import load_adapter

        loaded = _Loaded(name, load_adapter(self._model, spec), float(spec.scale), spec.path, spec.sha256)
        log.info("adapter %s loaded: %s, scale %g, sha256 %s", name, spec.path.name, spec.scale, spec.sha256)
        return loaded

    def adapters(self) -> dict[str, dict]:
        """The adapters requests may name now (removed ones are gone from here at once): name -> file, scale, sha256."""
        with self._cond:
            return {a.name: _described(a) for a in self._adapters.values() if not a.removed}

    def finishing(self) -> dict[str, dict]:
        """The adapters removed and still loaded: name -> file, scale, sha256 and the requests still using it (their
        names are free once those end)."""
        with self._cond:
            return {a.name: {**_described(a), "requests": a.refs} for a in self._adapters.values() if a.removed}

    def check_new_adapter(self, name: str) -> None:
        """What ``add_adapter`` refuses ``name`` for, said before anything costly is done for it (the server's self-test
        of the new set): a name no model name can carry, or one already served (a removed one still finishing too)."""
        _check_name(name)
        with self._cond:
            if name in self._adapters:
                raise self._taken(name)

    def _taken(self, name: str) -> AdapterNameTaken:
        """Why ``name`` cannot be added (caller holds the lock; ``name`` is in ``_adapters``)."""
        loaded = self._adapters[name]
        return AdapterNameTaken(name, loaded.refs if loaded.removed else None)

    def add_adapter(self, name: str, spec, check=None) -> dict:
        """Load a LoRA adapter (``loader.AdapterSpec`` or a path) under ``name`` while serving; requests may name it
        once this returns, and it returns what ``adapters`` says of it (its sha256: the file hashed once, before the
        load, unless the spec carries its bundle's). The running requests keep going (the load waits for the current
        step to end). ``check`` (``spec`` -> None, or raises): run once the file is loaded and before any request can
        name it; what it raises frees the adapter and propagates (the server's check that the loaded file is the
        verified one). A name served, or removed and still finishing requests, is ``AdapterNameTaken``."""
        from edgemed.errors import EdgemedError
        from edgemed.runtime.loader import hashed, unchanged

        _check_name(name)
        with self._cond:
            if self._thread is None or self._stopping:
                raise Closed("The model server is not running.", "start it first")
            if name in self._adapters:
                raise self._taken(name)
        spec, before = hashed(_spec_of(spec))  # the whole file read here, not under the lock every step waits for
        with self._step_lock, self._native:
            try:
                loaded = self._load_adapter(name, spec)
            except EdgemedError:  # a file written while it loaded reads wrong: that change is what was found
                unchanged(spec, before)
                raise
        try:
            unchanged(spec, before)
            if check is not None:
                check(spec)
        except BaseException:
            with self._step_lock:
                self._close_adapter(loaded, served=False)
            raise
        with self._cond:
            taken = self._taken(name) if name in self._adapters else None  # added meanwhile by another call
            if taken is None:
                self._adapters[name] = loaded
        if taken is not None:
            with self._step_lock:
                self._close_adapter(loaded, served=False)
            raise taken
        return _described(loaded)

    def remove_adapter(self, name: str) -> dict:
        """Stop serving adapter ``name``: new requests for it are refused at once; it stays loaded until the last
        running or queued request using it ends. Returns what ``finishing`` says of it (``requests``: those)."""
        with self._cond:
            loaded = self._adapters.get(name)
            if loaded is None or loaded.removed:
                raise UnknownAdapter(f"No adapter named '{name}' is served (served: {sorted(self.adapters_unlocked()) or 'none'}).",
                                     "GET /v1/models lists what is served")
            loaded.removed = True
            refs = loaded.refs
            if not refs:
                self._retire(loaded)
        log.info("adapter %s removed (%d requests still using it)", name, refs)
        return {**_described(loaded), "requests": refs}

    def adapters_unlocked(self) -> list[str]:
        return [a.name for a in self._adapters.values() if not a.removed]

    def _retire(self, loaded: _Loaded) -> None:
        """A removed adapter's last request ended (or it had none): its name is free at once, and the scheduler frees
        its tensors between steps (it owns the slots' cells). Caller holds the lock; once per adapter (no request
        takes a removed one, so its count reaches 0 once)."""
        if self._adapters.get(loaded.name) is loaded:
            del self._adapters[loaded.name]
        self._releasing.append(loaded)
        self._cond.notify_all()

    def _release(self, loaded: _Loaded) -> None:
        """Free a retired adapter (scheduler thread, between steps)."""
        with self._step_lock:
            self._close_adapter(loaded)

    def _close_adapter(self, loaded: _Loaded, served: bool = True) -> None:
        """Free one adapter's tensors (no step runs now): off the context first, and every slot's cells computed
        under it are forgotten as reusable. ``served=False``: one ``add_adapter`` loaded and never served (no
        request ran under it, so no cells or saved prefixes are its); freed from the caller's thread, it leaves the
        slots and the host cache, which the scheduler may be admitting into, alone."""
        if self._ctx is not None and any(a is loaded.adapter for a, _ in self._ctx.adapters):
            self._ctx.set_adapters([])
        if served:
            self._host.purge_if(lambda key: key[0] == loaded.key)
            for slot, key in enumerate(self._kept_key):
                if key is not None and key[0] == loaded.key:  # a free slot's kept cells: nobody may reuse them now
                    self._ctx.drop(slot)
                    self._kept[slot], self._kept_key[slot] = [], None
        loaded.adapter.close()
        log.info("adapter %s freed", loaded.name)

    # -- text ------------------------------------------------------------------------------
    def _require_model(self):
        """The loaded model (caller holds ``_native``, so it cannot be freed meanwhile)."""
        if self._model is None or self._model.ptr is None:
            raise Closed("The model is not loaded.", "call Batcher.start() first")
        return self._model

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The prompt the GGUF's own chat template makes of ``messages`` (and ``tools``, OpenAI's tool objects,
        for a template that renders them), rendered in a Jinja sandbox."""
        from edgemed.runtime.chat_template import refuse_markup, render

        with self._native:
            model = self._require_model()
            template = model.meta("tokenizer.chat_template")
            bos, eos = model.special_text(model.bos()), model.special_text(model.eos())
            markup = model.markup_texts()
        if not template:  # the request's to change (a 400), not the server's failure
            raise InputError(f"The model '{self.model_path.name}' has no chat template, so it cannot answer messages.",
                             "send a raw prompt to the completions endpoint, or convert the model with the tokenizer's "
                             "chat template")
        refuse_markup(messages, markup)
        return render(template, messages, bos_token=bos, eos_token=eos, **({"tools": tools} if tools else {}))

    def chat_template(self) -> str | None:
        """The GGUF's chat template text (tokenizer.chat_template), or None."""
        with self._native:
            return self._require_model().meta("tokenizer.chat_template")

    def detokenize(self, ids: list[int]) -> str:
        with self._native:
            return self._require_model().detokenize(list(ids), special=True)

    @property
    def placement(self) -> str:
        """Where llama.cpp put the weights, as it reported them at load (``buffers.Placement.describe``); once
        started."""
        with self._native:
            return self._require_model().placement.describe()

    @property
    def micro_batch(self) -> tuple[int, int]:
        """``(n_batch, n_ubatch)`` as llama.cpp's context reports them (read back, not the profile's word); once
        started."""
        with self._native:
            if self._ctx is None:
                raise RuntimeError("the batcher is not started")
            return self._ctx.n_batch, self._ctx.n_ubatch

    @property
    def n_vocab(self) -> int:
        with self._native:
            return self._require_model().n_vocab

    @property
    def adds_bos(self) -> bool:
        """Whether ``tokenize`` of a text puts a BOS before its tokens (the vocabulary's ``add_bos_token``): a text
        prompt's first token is then one the client did not send."""
        with self._native:
            return self._require_model().adds_bos()

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """``text``'s token ids; a text sure to be longer than a slot's context is refused before it is tokenized
        (``ContextOverflow``: ``_refuse_unfit``)."""
        with self._native:
            model = self._require_model()
            self._refuse_unfit(model, text)
            return model.tokenize(text, add_special, parse_special)

    def _refuse_unfit(self, model, text: str, max_tokens: int = 0) -> None:
        """``ContextOverflow`` when ``text`` is surely more tokens than fit in a slot with ``max_tokens`` (a bound
        counted without tokenizing: ``Model.at_least_tokens``). Tokenizing runs under ``_native``, which every request
        needs, and a text of many special tokens is slow to tokenize (a megabyte of ``<|im_start|>`` held every
        other request for 17 s); one that cannot fit need not be."""
        at_least = model.at_least_tokens(text)
        if at_least + max_tokens > self.n_ctx_per_slot:
            raise ContextOverflow(
                f"The prompt is at least {at_least} tokens ({len(text)} characters)"
                f"{f'; with max_tokens={max_tokens} it needs' if max_tokens else ','} more than the context window of "
                f"{self.n_ctx_per_slot} tokens per slot.",
                "shorten the prompt (or the conversation's history), lower max_tokens, or start the server with a "
                "larger --ctx or fewer --slots")

    # -- requests ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def arriving(self):
        """Held by a server from a request's arrival until its ``submit`` returned (or it was refused first): an
        idle scheduler woken by another request waits for it rather than a fixed quiet (``GATHER_LATE_S``), so
        requests sent together are still prefilled together and a lone one starts at once."""
        with self._cond:
            self._announced = True
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify_all()

    def _check_capacity(self, n: int = 1, held: bool = False) -> None:
        """``Overloaded`` unless ``n`` more requests fit (caller holds the lock); a queued request whose client left
        holds no place (the scheduler drops it at its next turn). ``held``: the requests hold their places already
        (``submit_n``'s ``held``): nothing to check."""
        if held:
            return
        in_flight = (sum(1 + len(q.followers) for q in self._queue if not q.stream.cancelled) + len(self._active)
                     + len(self._admitting))
        if in_flight + n > self.slots + self.queue_size:
            self._n.overloaded_total += 1
            retry = max(1.0, self._service_s * (1 + len(self._queue)) / self.slots)
            raise Overloaded(in_flight, retry)

    def submit(self, prompt: str | list[int], settings: GenerationSettings, *, request_id: str,
               extras: Extras | None = None, adapter: str | None = None, scope: object = None) -> Stream:
        """Queue a request and return its stream. Thread-safe; never waits for the model.

        Raises ``Overloaded`` (no room), ``ContextOverflow`` (prompt + max_tokens > n_ctx_per_slot),
        ``InputError`` (empty prompt, unknown token ids, a grammar that does not parse, a choice's seed + i past
        ``engine.MAX_SEED``), ``Closed``.
        """
        if extras is not None and extras.n != 1:
            raise InputError("Batcher.submit answers one choice.", "call submit_n for n > 1")
        return self.submit_n(prompt, settings, request_id=request_id, extras=extras, adapter=adapter, scope=scope)[0]

    def check_grammar(self, settings: GenerationSettings) -> None:
        """The grammar check ``submit_n`` makes (the request's grammar or JSON schema, converted, then tried by the probe),
        without queuing anything: for a caller whose constrained call comes later (a reasoning cap's answer), so that a
        grammar the probe refuses is the request's 400 before the thought, not an answer that fails after it."""
        gbnf = grammar_text(settings)
        if self._probe is not None and gbnf is not None:
            self._probe.check(gbnf)

    def submit_n(self, prompt: str | list[int], settings: GenerationSettings, *, request_id: str,
                 extras: Extras | None = None, adapter: str | None = None, scope: object = None,
                 held: bool = False) -> list[Stream]:
        """``submit`` for ``extras.n`` choices of one prompt: one stream each. The first computes the prompt;
        the others copy its KV once it is done (one prefill) and sample from the same last row, each with its
        own sampler (seed + i), in slots of their own, admitted together. ``adapter``: the name of a served
        adapter to generate with (None: the base); an unknown or removed one raises ``UnknownAdapter``. ``scope``
        (hashable): the prompt KV this request computes is reused only by requests of an equal scope, and it reuses
        only theirs (a server scopes by API key: what one clinician's prompt holds is neither served nor timed to
        another's probe); None is one scope of its own, everyone's. ``held``: the next call of a request already
        taken (a reasoning cap's answer, once its thought ended), which keeps the place that request held: it is not
        refused for room (``Overloaded``), so a request admitted is never turned away halfway."""
        from edgemed.runtime.llamacpp import Detokenizer

        extras = extras or Extras()
        check_seed(settings.seed, "seed", extras.n)  # the last choice's seed + n - 1 too: it is never masked
        gbnf = grammar_text(settings)
        if settings.json_schema and gbnf is not None:  # converted once here, not again by each choice's sampler
            settings = dataclasses.replace(settings, grammar=gbnf, json_schema=None)
        if self._probe is not None and gbnf is not None:
            with self._cond:  # a request that could not be queued anyway is not worth a probe
                if self._stopping or self._thread is None:
                    raise Closed("The model server is not running.", "start it (or wait for the restart) and retry")
                self._check_capacity(extras.n, held)
            self._probe.check(gbnf)  # before this process parses it: a costly or crashing grammar is a 400 here
        if not 1 <= extras.n <= self.slots:
            raise InputError(f"n={extras.n} choices need as many slots; this server runs {self.slots}.",
                             f"ask for n <= {self.slots}, or start the server with more --slots")
        t_submit = time.perf_counter()
        with self._cond:
            if self._stopping or self._thread is None:
                raise Closed("The model server is not running.", "start it (or wait for the restart) and retry")
            self._check_capacity(extras.n, held)
            loaded = self._acquire(adapter, extras.n)
        seqs: list[Seq] = []
        try:
            with self._native:
                model = self._require_model()
                if isinstance(prompt, str):
                    self._refuse_unfit(model, prompt, settings.max_tokens)
                tokens = model.tokenize(prompt, True, True) if isinstance(prompt, str) else [int(t) for t in prompt]
                if not tokens:
                    raise InputError("The prompt is empty.", "send at least one token of prompt")
                if any(not 0 <= t < model.n_vocab for t in tokens):
                    raise InputError(f"The prompt has token ids outside the vocabulary (0..{model.n_vocab - 1}).",
                                     "tokenize with this model's tokenizer")
                check_fits(len(tokens), settings, self.n_ctx_per_slot)
                for i in range(extras.n):
                    own = settings if i == 0 else dataclasses.replace(settings, seed=settings.seed + i)
                    sampler = sampler_for(model, own, extras, self.n_ctx_per_slot)
                    stream = Stream(request_id, self._wake, loaded.weights if loaded else None)
                    seqs.append(Seq(stream, tokens, own, sampler, TextStream(Detokenizer(model), settings.stop),
                                    t_submit, extras=extras, leader=seqs[0] if seqs else None, adapter=loaded,
                                    scope=scope))
            seqs[0].followers = seqs[1:]
            with self._cond:
                if self._stopping:
                    raise Closed("The model server is shutting down.", "retry when it is back")
                self._check_capacity(extras.n, held)
                self._queue.append(seqs[0])
                self._n.requests_total += 1
                self._cond.notify_all()
        except BaseException:
            for seq in seqs:
                seq.sampler.close()
            if loaded is not None:
                with self._cond:
                    loaded.refs -= extras.n
                    if loaded.removed and not loaded.refs:
                        self._retire(loaded)
            raise
        log.debug("request %s queued: %d prompt tokens, max_tokens %d, %d choices", request_id, len(tokens),
                  settings.max_tokens, extras.n)
        return [seq.stream for seq in seqs]

    def _acquire(self, name: str | None, n: int):
        """The served adapter ``name`` with ``n`` more requests using it (caller holds the lock); None for the base."""
        if name is None:
            return None
        loaded = self._adapters.get(name)
        if loaded is None or loaded.removed:
            served = ", ".join(sorted(self.adapters_unlocked())) or "none"
            raise UnknownAdapter(f"The adapter '{name}' is not served here (adapters served: {served}).",
                                 "name one of those, or add it (POST /admin/adapters)")
        loaded.refs += n
        return loaded

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def alive(self) -> bool:
        """Whether the scheduler thread runs (False before ``start``, after ``close`` or a failure of its loop)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def stats(self) -> dict:
        with self._cond:
            return {
                "model": self.model_path.name, "slots": self.slots, "n_ctx_per_slot": self.n_ctx_per_slot,
                "queue_size": self.queue_size, "queue_depth": len(self._queue), "active_slots": len(self._active),
                **self._n.totals(), "prefill_chunk": self._prefill.chunk, "prefix_cache": self.prefix_cache,
                **self._host.stats(),
                "answer_tokens_pending": sum(len(a[1]) for i, a in enumerate(self._answers)
                                             if a is not None and a[0] is self._kept[i] and len(a[1]) > 1),
                "adapters": self.adapters_unlocked(),
            }

    # -- scheduler thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            trimmed = False
            while True:
                with self._cond:
                    idle = not (self._stopping or self._queue or self._active or self._releasing)
                    answer = self._answer_to_keep() if idle else None
                    if answer is not None and self._t_ended + ANSWER_GRACE_S > time.perf_counter():
                        self._n.idle_since = time.perf_counter()  # the grace is idle time: a next request may come
                        self._cond.wait_for(lambda: self._stopping or self._queue or self._active or self._releasing,
                                            self._t_ended + ANSWER_GRACE_S - self._n.idle_since)
                        if self._queue and not self._stopping:
                            self._gather()  # as from idle: its company is prefilled with it
                        self._n.idle_seconds_total += time.perf_counter() - self._n.idle_since
                        self._n.idle_since = None
                        continue  # then the request, or the answer once the grace is over
                    trim = idle and answer is None and self._worked
                    if idle and answer is None and not trim:
                        self._n.idle_since = time.perf_counter()  # stats() counts a wait in progress
                        while not (self._stopping or self._queue or self._active or self._releasing):
                            self._cond.wait()
                        self._gather()
                        self._n.idle_seconds_total += time.perf_counter() - self._n.idle_since
                        self._n.idle_since = None
                    elif trimmed and self._queue:  # a request came during the trim: its company too, as from idle
                        self._gather()
                    trimmed = False
                    if self._stopping:
                        break
                    if answer is None and not trim:
                        self._admit()
                if trim:  # memory freed between bursts goes back to the OS (``runtime.heap``), the lock let go:
                    self._worked, trimmed = False, True  # it may take a while; /health, /metrics, a cancel need the lock
                    if heap.release():
                        with self._cond:
                            self._n.heap_trims_total += 1
                    continue  # then idle, or what came meanwhile
                self._worked = True
                if answer is not None:
                    try:
                        self._keep_answer(answer)
                    except Exception:  # noqa: BLE001 - an optimisation: the slot keeps its prompt, serving goes on
                        log.exception("keeping an answer in slot %d failed; the slot is emptied", answer)
                        self._answers[answer] = None
                        self._ctx.drop(answer)
                        self._kept[answer], self._kept_key[answer] = [], None
                    continue
                for seq in [s for s in self._active if s.stream.cancelled]:
                    self._finish(seq, "cancelled")
                if self._active:
                    self._step_safely()
                self._free_released()
        except BaseException:  # a bug in the loop itself: end every stream rather than hang clients
            log.exception("batcher scheduler stopped unexpectedly")
            self._end_all("error", "the model server's scheduler failed; see the server log")
            raise
        finally:
            with self._cond:
                self._stopping = True  # later submits raise Closed instead of waiting forever
            self._end_all("cancelled", "the model server is shutting down")
            self._free_native()

    def _gather(self) -> None:
        """Woken from idle by a request: let the ones sent with it arrive (until ``GATHER_QUIET_S`` passes
        without another, at most ``GATHER_MAX_S``), so they are prefilled together and start generating
        together rather than the first alone (caller holds the lock)."""
        t_end = time.perf_counter() + GATHER_MAX_S
        while not self._stopping and len(self._queue) < len(self._free):
            n, coming = len(self._queue), self._arriving
            left = t_end - time.perf_counter()
            if not self._announced:
                wait = min(GATHER_QUIET_S, left)
            else:  # announced requests: wait while one is on its way; then briefly, for one not yet read
                wait = min(left if coming else GATHER_LATE_S, left)
            if wait <= 0 or not self._cond.wait_for(
                    lambda: self._stopping or len(self._queue) > n or self._arriving != coming, wait):
                return

    def _admit(self) -> None:
        """Move queued requests into free slots (caller holds the lock). Requests admitted together take their
        slots grouped by adapter (in order of each group's first request), so a group's slots are one run."""
        now = time.perf_counter()
        if any(q.stream.cancelled for q in self._queue):  # clients that left while waiting: their places go now,
            for seq in [q for q in self._queue if q.stream.cancelled]:  # wherever in the queue they are
                self._queue.remove(seq)
                for q in [seq, *seq.followers]:
                    self._end(q, "cancelled", now)
        taken, room = [], len(self._free)
        while self._queue and room > len(self._queue[0].followers):
            seq = self._queue.popleft()  # one cancelled since the sweep above is admitted, and ends at the next step
            taken.append(seq)
            room -= 1 + len(seq.followers)
        # neither queued nor active until each joins ``_active``, while a host-cache copy lets the lock go: counted
        # in flight (``_check_capacity``) and ended by ``_end_all`` all the same
        self._admitting = [q for seq in taken for q in (seq, *seq.followers)]
        order = list(dict.fromkeys(_key(q) for q in taken))
        for seq in sorted(taken, key=lambda q: order.index(_key(q))):  # stable: arrival order within a group
            seq.slot, seq.t_admit = self._slot_for(seq), now
            self._free.remove(seq.slot)
            self._reuse(seq)
            self._active.append(seq)
            self._admitting.remove(seq)
            for follower in seq.followers:  # the slots holding least to lose; their cells get the leader's
                follower.slot, follower.t_admit = min(self._free, key=lambda s: (len(self._kept[s]), s)), now
                self._free.remove(follower.slot)
                self._save(follower.slot)
                self._ctx.drop(follower.slot)
                self._kept[follower.slot], self._kept_key[follower.slot] = [], None
                self._active.append(follower)
                self._admitting.remove(follower)
            log.debug("request %s admitted to slot %d after %.3f s, %d prompt tokens cached", seq.stream.request_id,
                      seq.slot, now - seq.t_submit, seq.cached)

    def _reusable(self, slot: int, seq: Seq) -> int:
        """Prompt tokens whose KV ``slot`` holds: the common prefix, leaving at least ``REFEED`` prompt
        tokens to feed again (logits to sample from, from a piece of several rows: see ``REFEED``). None
        for a request that wants every prompt token's log probability (echo): it needs all their logits."""
        tokens = seq.tokens
        if not self.prefix_cache or seq.extras.prompt_logprobs or self._kept_key[slot] != _cache_key(seq):
            return 0  # cells computed under another adapter set, or for another scope, are not this request's prefix
        kept, n, end = self._kept[slot], 0, min(len(self._kept[slot]), len(tokens) - REFEED)
        while n < end and kept[n] == tokens[n]:
            n += 1
        return n

    def _slot_for(self, seq: Seq) -> int:
        """The free slot where reused minus evicted tokens is largest; on a tie, the one that leaves the running
        requests of ``seq``'s adapter group (itself included) in the fewest runs of consecutive slots, then the
        lowest. llama.cpp puts only consecutive sequence ids in one ubatch when each slot has its own KV stream
        (``split_equal``), and each ubatch reads all the weights: a group decoding in slots 0 and 2 paid two passes
        a step where slots 0 and 1 pay one."""
        key = _key(seq)
        mine = {q.slot for q in self._active if _key(q) == key}

        def score(slot: int) -> tuple[int, int, int]:
            reused = self._reusable(slot, seq)
            return reused - (len(self._kept[slot]) - reused), -_runs(mine | {slot}), -slot

        return max(self._free, key=score)

    def _reuse(self, seq: Seq) -> None:
        """Give ``seq`` (just put in its slot) the longest prompt prefix found (scheduler thread): its slot's own
        kept cells, another free slot's, a running request's computed prompt, or a host-cache entry; else a
        request computing the same prefix now to wait for (``Seq.donor``). What the slot held past the part
        kept goes, saved to the host cache first."""
        n = self._reusable(seq.slot, seq)
        if n < len(self._kept[seq.slot]):
            # the host entry this request will restore is found first, and the saved prefix never evicts it
            self._save(seq.slot, keep=self._host_entry(seq, n + MIN_SHARED - 1))
            if not (n and self._ctx.trim(seq.slot, n)):
                self._ctx.drop(seq.slot)  # nothing to keep, or a memory that cannot drop a suffix
                n = 0
        self._kept[seq.slot], self._kept_key[seq.slot] = [], None  # the slot is the sequence's now (``Seq.held()``)
        seq.pos = n
        self._count(seq, n, "slot")
        if self.prefix_cache and not seq.extras.prompt_logprobs and seq.leader is None:
            self._borrow(seq, wait=True)

    def _host_entry(self, seq: Seq, floor: int) -> Entry | None:
        """The host-cache entry sharing more than ``floor`` prompt tokens with ``seq`` (the longest), else None."""
        if not (self.prefix_cache and self._host.max_bytes) or seq.extras.prompt_logprobs or seq.leader is not None:
            return None
        n, entry = self._host.match(_cache_key(seq), seq.tokens, len(seq.tokens) - REFEED)
        return entry if n > floor else None

    def _borrow(self, seq: Seq, wait: bool) -> None:
        """Copy a longer prefix than ``seq`` holds from another slot or the host cache, or (``wait``, at admission:
        the caller holds the lock) wait for one. Where it ends up reusing less than ``HOST_MIN`` tokens of a prompt
        that long from anywhere, the host cache counts a miss (a request waiting for a donor counts when it copies
        or looks again)."""
        key, tokens, limit = _cache_key(seq), seq.tokens, len(seq.tokens) - REFEED
        best, src = seq.cached + MIN_SHARED - 1, None
        for slot in self._free:
            if self._kept_key[slot] == key and (n := _common(self._kept[slot], tokens, limit)) > best:
                best, src = n, slot
        for q in self._active:
            if q is not seq and _cache_key(q) == key and not q.waiting and q.slot not in self._unsynced:
                if (n := _common(q.tokens[:min(q.pos, len(q.tokens))], tokens, limit)) > best:
                    best, src = n, q.slot
        n, entry = self._host.match(key, tokens, limit) if self._host.max_bytes else (0, None)
        if entry is not None and n > best and seq.slot not in self._unsynced:
            data = self._host.take(entry)
            with self._let_go() if wait else contextlib.nullcontext():
                restored = self._ctx.restore_seq(seq.slot, data)
            if restored and self._ctx.trim(seq.slot, n):
                seq.pos = n
                self._count(seq, n, "host")
                self._host.hit()  # counted once the state is in the slot
                return
            self._ctx.drop(seq.slot)
            seq.pos = 0
            self._count(seq, 0, "slot")
        if src is not None:
            if self._ctx.copy_seq(src, seq.slot, best):
                self._unsynced.update((src, seq.slot))  # the data moves at the next decode
                seq.pos = best
                self._count(seq, best, "copied")
                return
            seq.pos = 0
            self._count(seq, 0, "slot")
        elif wait and self._wait_for_donor(seq, key, limit):
            return
        if self._host.max_bytes and seq.cached < HOST_MIN <= len(tokens):
            self._host.miss()  # a prompt long enough to have been saved that found no prefix that long anywhere

    def _wait_for_donor(self, seq: Seq, key, limit: int) -> bool:
        """Let ``seq`` wait for an earlier request computing a longer shared prefix now (``Seq.donor``), where
        that one reaches the shared part no later than ``seq`` would alone; whether it waits."""
        own = seq.computed  # what this request computes alone
        donor, share = None, seq.cached + MIN_SHARED - 1
        for q in self._active:  # requests computing their prompt now, earlier in arrival order
            if q is seq or _cache_key(q) != key or not q.reading:
                continue
            n = _common(q.tokens, seq.tokens, limit)
            if n > share and n - q.pos <= own:  # it reaches the shared part no later than this one would alone
                donor, share = q, n
        if donor is None:
            return False
        seq.donor, seq.share = donor, share
        return True

    def _take_shared(self) -> None:
        """Waiting requests whose donor has computed the shared prefix copy it now (start of a step); one whose
        donor left first looks for its prefix again, and computes it itself if none is found."""
        for seq in self._active:
            donor = seq.donor
            if donor is None:
                continue
            if donor in self._active and donor.pos < seq.share and not donor.stream.cancelled:
                continue
            seq.donor = None
            if donor in self._active and donor.pos >= seq.share:
                if self._ctx.copy_seq(donor.slot, seq.slot, seq.share):
                    self._unsynced.update((donor.slot, seq.slot))
                    seq.pos = seq.share
                    self._count(seq, seq.share, "copied")
                    continue
                seq.pos = 0  # the failed copy's trim emptied the slot
                self._count(seq, 0, "slot")
            # a donor that left (or was cancelled) before computing the prefix: the slot keeps its own cells and
            # ``seq.pos`` still counts them, so the search goes on from there
            self._borrow(seq, wait=False)

    @staticmethod
    def _count(seq: Seq, n: int, where: str) -> None:
        """``seq`` now starts from ``n`` cached prompt tokens found in ``where`` (replacing what it had found);
        the counters take them when it ends (``_end``)."""
        seq.cached, seq.cached_from = n, where

    def _answer_to_keep(self) -> int | None:
        """A free slot whose last answer still has ids to feed as prompt (caller holds the lock), else None."""
        for slot in self._free:
            pending = self._answers[slot]
            if pending is None:
                continue
            kept, ids = pending
            if kept is not self._kept[slot] or len(ids) < 2 or slot in self._unsynced:
                self._answers[slot] = None  # the slot was taken meanwhile, or one id left (never a one-row piece)
                continue
            return slot
        return None

    def _keep_answer(self, slot: int) -> None:
        """Feed the next ``ANSWER_CHUNK`` ids of ``slot``'s last answer as prompt rows after its kept cells
        (scheduler thread, idle: no step runs), under the adapter those cells were computed under."""
        kept, ids = self._answers[slot]
        # one micro-batch at most: a call given up keeps the micro-batches it finished (llama.h), so a call of one
        # leaves nothing behind; the slot is trimmed back to ``kept`` after any call that did not finish regardless
        take = min(len(ids), ANSWER_CHUNK, self._batch.capacity, self._ctx.n_ubatch, self.n_ctx_per_slot - len(kept))
        if 0 < len(ids) - take < 2:
            take -= 1  # leave two for the next call rather than one
        kept_key = self._kept_key[slot]
        key = None if kept_key is None else kept_key[0]  # the adapter set those cells were computed under
        loaded = None if key is None else next((a for a in self._adapters.values() if a.key == key), None)
        if take < 2 or kept_key is None or (key is not None and (loaded is None or loaded.removed)):
            self._answers[slot] = None
            return
        with self._step_lock:
            self._use(loaded)
            batch = self._batch
            batch.clear()
            for i, token in enumerate(ids[:take]):
                batch.add(token, len(kept) + i, slot, False)
            rc = self._ctx.decode_unless(batch, self._wanted)
        if rc != 0 and not self._ctx.trim(slot, len(kept)):  # cells past the kept ones: none of them is known whole
            self._ctx.drop(slot)  # (llama.cpp removes a given-up micro-batch's cells, not those of the ones before it)
            self._kept[slot], self._kept_key[slot], self._answers[slot] = [], None, None
            return
        if rc == 2:  # given up for a request: the rest waits for idle time
            with self._cond:
                self._n.answer_calls_interrupted_total += 1
                self._gather()  # the request that stopped the call may have company on its way: prefill them together
            return
        if rc != 0:
            log.warning("keeping an answer in slot %d: llama_decode returned %d; the slot keeps its prompt only", slot, rc)
            self._answers[slot] = None
            return
        kept.extend(ids[:take])
        self._answers[slot] = (kept, ids[take:])
        with self._cond:
            self._n.answer_tokens_kept_total += take

    def _wanted(self) -> bool:
        """Whether the scheduler has something other than idle work to do (any thread, no lock: one read each)."""
        return bool(self._stopping or self._queue or self._releasing)

    def _save(self, slot: int, keep: Entry | None = None) -> None:
        """Keep a free slot's prefix in host RAM before its cells go (long enough, not saved already; at admission,
        the caller holding the lock). Room is made before the state is built, with llama.cpp's count of its bytes,
        so the entries and the state being written never exceed the bound; ``keep``, the entry the request taking
        the slot is about to restore, is never evicted for it (the prefix is not saved where both cannot fit)."""
        kept, key = self._kept[slot], self._kept_key[slot]
        if not (self._host.max_bytes and len(kept) >= HOST_MIN and slot not in self._unsynced
                and not self._host.has(key, kept)):
            return
        if not self._host.make_room(key, kept, self._ctx.seq_state_size(slot), keep):
            return  # a state over the whole cache (less ``keep``) is never built
        with self._let_go():
            data = self._ctx.save_seq(slot)
        self._host.put(key, kept, data, keep)

    @contextlib.contextmanager
    def _let_go(self):
        """Let go of the lock (held once, by the scheduler admitting requests) around a copy of a slot's state to
        or from host RAM: tens of MB, and ``/health``, ``/metrics``, a cancel and a submit wait for the lock on the
        event loop. Only the scheduler thread changes the slots and ``_active`` (the host cache too, but for an
        adapter loaded twice by a race, which has no entries); another thread meanwhile may queue a request
        (admitted at the next turn; ``_admitting`` keeps the count in flight) or read the counters."""
        self._cond.release()
        try:
            yield
        finally:
            self._cond.acquire()

    def _step_safely(self) -> None:
        """One decode step of one adapter group. A step that fails ends the requests of that group, whose cells it
        was writing (their slots are emptied); the other groups' cells were not in the call, and their requests go on.
        A failure before a group was chosen (copying shared prefixes) ends every running request."""
        seqs = None
        try:
            with self._step_lock:
                self._take_shared()
                groups: dict = {}
                for seq in self._active:  # arrival order within a group; groups in order of their first request
                    groups.setdefault(_key(seq), []).append(seq)
                t_step = time.perf_counter()
                seqs = groups[self._next_group(groups)]
                self._use(seqs[0].adapter)
                self._step(seqs)
                with self._cond:
                    self._n.decode_steps_total += 1
                    self._n.step_seconds_total += time.perf_counter() - t_step
        except Exception as exc:  # noqa: BLE001 - end the affected streams, keep serving
            ended = list(seqs) if seqs is not None else list(self._active)
            log.exception("decode step failed; ending the %d requests it was computing (%d running)", len(ended),
                          len(self._active))
            for seq in ended:  # (``_finish`` ends the choices waiting on a prompt with it)
                self._finish(seq, "error", f"generation failed: {type(exc).__name__}: {exc}")

    def _next_group(self, groups: dict):
        """The adapter group (key of ``groups``) that steps now. One group: it. Several: the group holding the
        context keeps it for ``adapter_turn`` steps, then the next in a round-robin queue takes it for its turn (a
        group joins the queue's end when first seen; ties in order of first request), so each of G groups waits
        at most G - 1 turns. A group with a prompt to read ends the holder's turn once half of it has passed (unless
        the holder is reading one too) and goes first: a request's slot would otherwise idle through the turn before
        its prefill; the half keeps a group whose neighbours keep sending short requests from being cut to a step."""
        key, left = self._turn
        if len(groups) == 1:  # alone it runs every step, its turn counted down (a new holder starts a turn)
            only = next(iter(groups))
            self._turn = (only, max(left - 1, 0) if only == key else self.adapter_turn - 1)
            return only
        if key in groups and left > 0 and (_reading(groups[key]) or self.adapter_turn - left < self.adapter_turn // 2
                                           or not any(_reading(q) for k, q in groups.items() if k != key)):
            self._turn = (key, left - 1)
            return key
        self._order = [k for k in self._order if k in groups] + [k for k in groups if k not in self._order]
        others = [k for k in self._order if k != key]
        nxt = next((k for k in others if _reading(groups[k])), others[0])  # a prompt to read goes first
        self._order.remove(nxt)
        self._order.append(nxt)
        self._turn = (nxt, self.adapter_turn - 1)
        return nxt

    def _on_context(self, loaded) -> bool:
        """Whether ``loaded``'s adapter (None: none) is what the context applies now."""
        want = [] if loaded is None else [(loaded.adapter, loaded.scale)]
        have = self._ctx.adapters
        return len(want) == len(have) and all(a is b and s == t for (a, s), (b, t) in zip(want, have))

    def _use(self, loaded) -> None:
        """Put ``loaded``'s adapter (None: none) on the context for the next decodes, unless it is already."""
        if not self._on_context(loaded):
            self._ctx.set_adapters([] if loaded is None else [(loaded.adapter, loaded.scale)])
            with self._cond:
                self._n.adapter_switches_total += 1

    def _step(self, active: list) -> None:
        """Decode rows in slot order (one ubatch: with a KV stream per slot llama.cpp cuts a batch into
        ubatches of consecutive sequence ids, each reading all weights again), then the prompt chunks,
        in calls of equal pieces per sequence (``equal_pieces``: prompts share a pass over the weights,
        and llama.cpp never cuts a one-token piece off one), after the running streams' tokens went out.

        Every short prompt waiting (up to ``WHOLE_PROMPT`` tokens) goes whole in the same step, as in
        llama-server, so requests that arrive together start generating together instead of one step
        apart; long prompts share what is left of the step's budget. ``active``: one adapter group's sequences
        (the adapter set on the context already).

        Long prompts admitted together (four clinicians opening their cases at once) are read in arrival order at
        the whole batch, each starting to stream when its prompt is in, and the ones streaming already are not
        counted as running streams for the budget until the last of the group is read: held to the 2x rule, the
        first one's stream slowed the others' reading to under half speed (1.5B, four ~490-token cases: first
        tokens at 8, 24, 31 and 49 s against llama-server's 27.5 s for all four). A short prompt admitted with them
        is a running stream as usual.
        """
        batch = self._batch
        batch.clear()
        rows = [q for q in sorted(active, key=lambda q: q.slot) if q.pending is not None]
        for seq in rows:
            seq.index = batch.add(seq.pending, seq.pos, seq.slot, True)
            seq.pos, seq.pending = seq.pos + 1, None
        # the streams whose inter-token time the budget protects: all but those with a long prompt of their own
        # admitted with a request whose prompt is still being read (long prompts that arrive together are read
        # one after another at full speed, as if none had started streaming: see the docstring)
        reading = {q.t_admit for q in active if q.reading}
        streams = sum(1 for q in rows if q.t_admit not in reading or q.computed <= WHOLE_PROMPT)
        if rows:
            self._prefill.learn(self._decode(rows), streams, 0)
        room = batch.capacity
        budget = whole = self._prefill.tokens(room, streams)
        echo_room = ECHO_ROWS
        takes: list[tuple[Seq, int]] = []
        for seq in active:  # arrival order: short prompts whole, long ones within the budget
            remaining = len(seq.tokens) - seq.pos
            if remaining <= 0 or seq.waiting:
                continue
            echo = seq.extras.prompt_logprobs  # a logits row for each of its prompt tokens: at most echo_room a step
            cap = min(room, echo_room) if echo else room
            # a short prompt goes whole where the step has room for it; where it has not (a profile's n_batch
            # under WHOLE_PROMPT, or the decode rows' share), it is fed in chunks like a long one, or it would wait
            # at every step for a room that never comes
            short = seq.computed <= WHOLE_PROMPT and remaining <= cap  # computed: the tokens this request feeds
            full = min(batch.capacity, ECHO_ROWS) if echo else batch.capacity  # the rows a step can ever offer
            take = remaining if short else chunk_of(remaining, min(budget, cap), whole, room=cap, capacity=full)
            if take <= 0 or take > cap:
                continue
            takes.append((seq, take))
            room -= take
            if echo:
                echo_room -= take
            if not short:
                budget -= take
        for call in equal_pieces(sorted(takes, key=lambda t: t[0].slot)):
            batch.clear()
            done, scored = [], []
            for seq, take in call:
                end = seq.pos + take
                every = seq.extras.prompt_logprobs  # echo: every row's logits, for the prompt's log probabilities
                for p in range(seq.pos, end):
                    seq.index = batch.add(seq.tokens[p], p, seq.slot, every or p == len(seq.tokens) - 1)
                    if every and p + 1 < len(seq.tokens):
                        scored.append((seq, p, seq.index))
                seq.pos = end
                if end == len(seq.tokens):
                    done.append(seq)
            self._n.prompt_tokens_total += batch.n
            self._prefill.learn(self._decode(done, scored), streams, batch.n)

    def _decode(self, sampling: list[Seq], scored: list | None = None) -> float:
        """``llama_decode`` the batch, then score the prompt rows of ``scored`` (echo: ``(seq, position, row)``)
        and sample each of ``sampling`` (and the choices that copy its prompt); returns the decode's seconds."""
        t0 = time.perf_counter()
        rc = self._ctx.decode(self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {self._batch.n} tokens")
        self._unsynced.clear()  # the queued seq copies ran in its memory update
        now = time.perf_counter()
        self._n.decode_seconds_total += now - t0  # this thread only; stats() reads it live
        for seq, p, row in scored or ():
            seq.prompt_logprobs.append(entry(self._model, self._ctx.logits(row), seq.tokens[p + 1],
                                             seq.extras.top_logprobs or 0))
        for seq in sampling:
            if seq.extras.prompt_logprobs and seq.pos == len(seq.tokens):  # the prompt is done: its entries go first
                first = entry(self._model, self._ctx.logits(seq.index), seq.tokens[0], 0)
                head = [dataclasses.replace(first, logprob=None, top=())]
                for q in [seq, *seq.followers]:
                    q.stream._put(Piece("", tuple(head + seq.prompt_logprobs), prompt=True))
                seq.prompt_logprobs = []
            followers, seq.followers = seq.followers, []
            for follower in followers:  # n > 1: the other choices start from this prompt's KV and logits row
                if follower.stream.cancelled:
                    continue  # ended before the next step, its slot empty
                self._ctx.lib.llama_memory_seq_cp(self._ctx.memory, seq.slot, follower.slot, -1, -1)
                self._unsynced.update((seq.slot, follower.slot))  # the data moves at the next decode, as for any copy
                follower.pos, follower.index = seq.pos, seq.index
                with self._cond:
                    self._n.sequences_forked_total += 1
            for q in [seq, *followers]:
                if q.pos:
                    self._sample(q, now)
        return now - t0

    def _sample(self, seq: Seq, now: float) -> None:
        """Sample ``seq``'s next token from its logits row (scoring it first when log probabilities are asked). A
        request whose grammar took longer than ``GRAMMAR_TOKEN_S`` for one token ends ("costly"): every request's
        step waits for it."""
        row = self._ctx.logits(seq.index) if seq.extras.top_logprobs is not None else None
        t0 = time.perf_counter()
        try:
            token = seq.sampler.sample(self._ctx, seq.index)
        except NoTokenAllowed as exc:  # this request's own constraints: it ends, the others go on
            self._finish(seq, "refused", exc.problem, exc.fix)
            return
        except Exception:  # noqa: BLE001 - this request's sampler failed after a good decode: it ends alone
            log.exception("sampling for request %s failed; it ends, the others go on", seq.stream.request_id)
            self._finish(seq, "error", "sampling its next token failed; see the server log")
            return
        took = time.perf_counter() - t0
        if took > GRAMMAR_TOKEN_S and (seq.settings.grammar or seq.settings.json_schema):
            self._finish(seq, "costly", f"Following the request's grammar took {took:.1f} s for one token (at most "
                                        f"{GRAMMAR_TOKEN_S:g} s; every other answer waits meanwhile).",
                         "send a grammar whose alternatives do not match the same text under a repetition")
            return
        if row is not None:
            seq.logprobs.append(entry(self._model, row, token, seq.extras.top_logprobs))
        self._take(seq, token, now)

    def _take(self, seq: Seq, token: int, now: float) -> None:
        """Handle one sampled token: emit text, or finish on EOG / stop string / max_tokens."""
        if not seq.generated:
            seq.t_first = now
        seq.sampled.append(token)
        if self._model.is_eog(token):
            if seq.logprobs:
                seq.logprobs.pop()  # the end-of-generation token is no output
            self._finish(seq, "stop")
            return
        seq.generated += 1
        self._n.tokens_generated_total += 1  # written by this thread only; stats() reads it live
        text = seq.text.push(token)
        if text:
            seq.stream._put(Piece(text, tuple(seq.logprobs)))
            seq.logprobs.clear()
        if seq.text.stopped:
            self._finish(seq, "stop")
        elif seq.generated >= seq.settings.max_tokens or seq.pos >= self.n_ctx_per_slot:
            self._finish(seq, "length")
        else:
            seq.pending = token

    def _finish(self, seq: Seq, reason: str, error: str | None = None, fix: str | None = None) -> None:
        """End a running sequence and free its slot (sampler; the KV cells are kept for prefix reuse
        unless it is off or the sequence failed, when what the cells hold is not known)."""
        if seq not in self._active:  # a waiting choice its leader's end has ended already
            return
        if reason in ("stop", "length"):
            rest = seq.text.flush()
            if rest or (seq.logprobs and not seq.text.stopped):
                seq.stream._put(Piece(rest, tuple(seq.logprobs)))
            if seq.text.stopped:  # a stop string the flush found (its token ended in part of a character): a stop
                reason = "stop"
        for follower in seq.followers:  # choices still waiting for this prompt: they cannot start now
            if not follower.stream.done:
                self._finish(follower, reason if reason in ("cancelled", "error", "refused", "costly") else "error",
                             error or "the choice that computes the prompt ended before it", fix)
        seq.followers = []
        held = seq.held() if self.prefix_cache and reason != "error" and seq.slot not in self._unsynced else []
        if not (held and self._ctx.trim(seq.slot, len(held))):  # the sampled tokens' cells go
            self._ctx.drop(seq.slot)
            held = []
        self._kept[seq.slot], self._kept_key[seq.slot] = held, (_cache_key(seq) if held else None)
        self._answers[seq.slot] = (held, list(seq.sampled)) if held and reason in ("stop", "length") else None
        with self._cond:
            self._active.remove(seq)
            self._free.append(seq.slot)
            self._service_s = 0.8 * self._service_s + 0.2 * (time.perf_counter() - seq.t_admit)
            self._t_ended = time.perf_counter()
            self._end(seq, reason, self._t_ended, error, fix)

    def _end(self, seq: Seq, reason: str, now: float, error: str | None = None, fix: str | None = None) -> None:
        """Count a request's end and send its ``Finished`` (caller holds the lock)."""
        self._n.finished[reason] += 1
        self._n.cached[seq.cached_from] += seq.cached
        self._n.prompt_tokens_cached_total += seq.cached
        seq.end(reason, now, error, fix)
        loaded, seq.adapter = seq.adapter, None
        if loaded is not None:
            loaded.refs -= 1
            if loaded.removed and not loaded.refs:
                self._retire(loaded)  # freed after the lock is let go (``_free_released``)

    def _end_all(self, reason: str, error: str) -> None:
        with self._cond:
            now = time.perf_counter()
            queued = [q for seq in self._queue for q in (seq, *seq.followers)]
            for seq in list(self._active) + queued + self._admitting:
                if self._ctx is not None and seq.slot >= 0:
                    self._ctx.drop(seq.slot)
                    self._kept[seq.slot], self._kept_key[seq.slot] = [], None
                self._end(seq, reason, now, error)
            self._active.clear()
            self._queue.clear()
            self._admitting = []

    def _free_released(self) -> None:
        with self._cond:
            released, self._releasing = self._releasing, []
        for loaded in released:
            self._release(loaded)

    def _free_native(self) -> None:
        self._host.clear()  # states of this context's model: worthless once it is freed
        with self._native:
            for loaded in [*self._adapters.values(), *self._releasing]:  # adapters before the context and model
                if self._ctx is not None:
                    self._ctx.set_adapters([])
                loaded.adapter.close()
            self._adapters.clear()
            self._releasing = []
            for name in ("_batch", "_ctx", "_model"):  # the context before its model
                obj = getattr(self, name)
                if obj is not None:
                    obj.close()
                    setattr(self, name, None)


_NOBODY = object()  # no group has had the context yet (None is the base's key)


def _reading(seqs) -> bool:
    """Whether any of ``seqs`` has prompt tokens to feed now (not waiting for another request's prefix)."""
    return any(q.reading for q in seqs)


def _runs(slots: set[int]) -> int:
    """How many runs of consecutive ids ``slots`` makes ({0, 1, 3}: two)."""
    return sum(1 for s in slots if s - 1 not in slots)


def _key(seq: Seq):
    """The adapter set ``seq`` is computed under (None: the base): its group for taking the context in turn."""
    return None if seq.adapter is None else seq.adapter.key


def _cache_key(seq: Seq) -> tuple:
    """Kept-prefix identity: the adapter set the KV is computed under, and the scope that may reuse it."""
    return _key(seq), seq.scope


def _common(held, tokens: list[int], limit: int) -> int:
    """How many ids ``held`` and ``tokens`` share from the start, at most ``limit``."""
    n, end = 0, min(len(held), len(tokens), limit)
    while n < end and held[n] == tokens[n]:
        n += 1
    return n


def _spec_of(spec):
    """A ``loader.AdapterSpec`` of ``spec`` (one, or a path)."""
    from edgemed.runtime.loader import AdapterSpec

    return spec if isinstance(spec, AdapterSpec) else AdapterSpec(Path(spec))


def _described(loaded: _Loaded) -> dict:
    return {"path": str(loaded.path), "scale": loaded.scale, "sha256": loaded.sha256}


def _check_name(name: str) -> None:
    import re

    if not isinstance(name, str) or not re.fullmatch(ADAPTER_NAME, name):
        raise AdapterError(f"'{name}' is not a usable adapter name: it becomes part of a model name (MODEL:NAME).",
                           "use letters, digits, '.', '_' or '-' (64 at most), starting with a letter or digit")
