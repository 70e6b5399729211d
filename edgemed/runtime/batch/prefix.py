"""The host-RAM prefix cache: KV states of prompt prefixes that left their slot, kept for a later request.

When a free slot's kept prompt cells are about to go (an unrelated prompt takes the slot, or a request
trims them to a shorter shared prefix), the batcher saves that sequence's KV state (llama.cpp's
per-sequence state: cell positions and K/V rows) here first, keyed by the adapter key the cells were
computed under and the exact token ids they hold. A new request whose prompt shares the longest prefix
with an entry restores it into its own slot (any sequence id: llama.cpp restores into the destination's
stream) and trims it to the shared part. Plain bytes and token ids only: no model handle, so this class
is tested without a model.

Bounded: the entries' bytes never exceed ``max_bytes``, nor do they with the state being saved: room is made
(``make_room``, with llama.cpp's count of the state's bytes) before its buffer is allocated, the state is written
into that one buffer and kept as it is, and a restore hands the kept buffer to llama.cpp without a copy. The least
recently used entry (stored or restored) goes first, never the one a request being admitted is about to restore
(``keep``), and an entry larger than the whole bound is not stored. An entry whose ids are a prefix of a new one's
(same adapter key) is dropped when room is made for the longer one: the longer serves every prompt the shorter did.

Only prefixes of at least ``HOST_MIN`` tokens are saved. Measured (1 thread, on a 2-core box shared with
other jobs, best of 3, a 4-slot context of 2,048 cells a slot; ``Context.save_seq`` / ``restore_seq`` into
another sequence vs ``Context.eval`` of the same prefix):

| model | prefix | state | recompute | save | restore |
|---|---|---|---|---|---|
| SmolLM2-135M Q4_1 | 64 | 1.4 MiB | 1.08 s | 0.9 ms | 0.8 ms |
| SmolLM2-135M Q4_1 | 300 | 6.6 MiB | 6.2 s | 10 ms | 3.8 ms |
| SmolLM2-135M Q4_1 | 1,000 | 22 MiB | 23.8 s | 65 ms | 24 ms |
| Qwen2.5-0.5B Q4_K_M | 64 | 0.75 MiB | 2.9 s | 0.3 ms | 0.3 ms |
| Qwen2.5-0.5B Q4_K_M | 300 | 3.5 MiB | 12.7 s | 9.5 ms | 1.1 ms |
| Qwen2.5-0.5B Q4_K_M | 1,000 | 11.7 MiB | 33.4 s | 3.5 ms | 9.2 ms |

A restore costs a thousandth of recomputing at every length, so the floor is not set by the copy but by what
an entry is worth keeping: under 64 tokens a prefix recomputes within about one step and would take an LRU
place from a long history. (A cross-stream ``llama_memory_seq_cp`` added 4-20 ms to the next decode in the same
run, whatever the prefix's length: it copies the whole stream.)
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

#: Prefixes shorter than this are not saved to host RAM: a few dozen tokens recompute in a fraction of a
#: step, while an entry still costs its bytes and a slot of the LRU.
HOST_MIN = 64


@dataclass(frozen=True)
class Entry:
    key: object  # what the KV was computed under and who may reuse it (``batcher._cache_key``)
    tokens: tuple
    data: bytearray  # llama.cpp's per-sequence state (``Context.save_seq``), handed back to it as it is


class PrefixCache:
    """LRU of saved prefix states, at most ``max_bytes`` in all (0: stores nothing)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._entries: collections.OrderedDict[tuple, Entry] = collections.OrderedDict()  # oldest first
        self.bytes = 0
        self.hits = self.misses = self.stored = self.evicted = self.refused = 0

    def __len__(self) -> int:
        return len(self._entries)

    def make_room(self, key, tokens, size: int, keep: Entry | None = None) -> bool:
        """Make room for a ``size``-byte state of ``tokens`` under ``key`` before it is built, so the entries and
        that state together stay within the bound: the entries it serves too go, then the least recently used,
        never ``keep``. False, with nothing dropped, where it cannot fit (larger than the bound, or than the bound
        less ``keep``)."""
        tokens = tuple(tokens)
        if size <= 0 or size + (len(keep.data) if keep is not None else 0) > self.max_bytes:
            return False
        for k, e in list(self._entries.items()):  # the same prefix, or a shorter one it serves too
            if e is not keep and e.key == key and tokens[:len(e.tokens)] == e.tokens:
                self._drop(k)
        for k in [k for k, e in self._entries.items() if e is not keep]:  # oldest first
            if self.bytes + size <= self.max_bytes:
                break
            self._drop(k)
            self.evicted += 1
        return True

    def put(self, key, tokens, data: bytearray, keep: Entry | None = None) -> bool:
        """Store the state ``data`` of ``tokens`` computed under ``key`` (``make_room`` first, so this evicts nothing
        more); False where it is larger than the bound (less ``keep``)."""
        tokens = tuple(tokens)
        if not data or not self.make_room(key, tokens, len(data), keep):
            self.refused += 1
            return False
        self._entries[(key, tokens)] = Entry(key, tokens, data)
        self.bytes += len(data)
        self.stored += 1
        return True

    def has(self, key, tokens) -> bool:
        """Whether an entry under ``key`` holds ``tokens`` or more (saving these again would add nothing)."""
        tokens = tuple(tokens)
        return any(e.key == key and e.tokens[:len(tokens)] == tokens for e in self._entries.values())

    def match(self, key, tokens, limit: int) -> tuple[int, Entry | None]:
        """The entry under ``key`` sharing the longest prefix with ``tokens`` (at most ``limit``), and that length;
        (0, None) where none shares any. Does not count a hit or move the entry (``take`` does)."""
        best, found = 0, None
        for e in self._entries.values():
            if e.key != key:
                continue
            n, end = 0, min(len(e.tokens), len(tokens), limit)
            while n < end and e.tokens[n] == tokens[n]:
                n += 1
            if n > best:
                best, found = n, e
        return best, found

    def take(self, entry: Entry) -> bytearray:
        """``entry``'s state, now the most recently used (it stays cached: the caller passes it to llama.cpp as it
        is). Counts nothing: the caller counts a ``hit`` once the state is in a slot, a ``miss`` where a request
        reused nothing."""
        self._entries.move_to_end((entry.key, entry.tokens))
        return entry.data

    def hit(self) -> None:
        self.hits += 1

    def miss(self) -> None:
        self.misses += 1

    def purge(self, key) -> int:
        """Forget every entry computed under ``key`` (an adapter being freed); returns how many went."""
        return self.purge_if(lambda k: k == key)

    def purge_if(self, test) -> int:
        """Forget every entry whose key passes ``test``; returns how many went."""
        gone = [k for k, e in self._entries.items() if test(e.key)]
        for k in gone:
            self._drop(k)
        return len(gone)

    def clear(self) -> None:
        for k in list(self._entries):
            self._drop(k)

    def _drop(self, k) -> None:
        self.bytes -= len(self._entries.pop(k).data)

    def stats(self) -> dict:
        return {"prefix_host_bytes": self.bytes, "prefix_host_entries": len(self._entries),
                "prefix_host_max_bytes": self.max_bytes, "prefix_host_hits_total": self.hits,
                "prefix_host_misses_total": self.misses, "prefix_host_evicted_total": self.evicted}
