"""GreedyDual-Size-Frequency: evict the model whose reloads are cheapest per byte, with aging.

Source: Cherkasova, "Improving WWW Proxies Performance with Greedy-Dual-Size-Frequency Caching
Policy" (HP Labs TR HPL-98-69, 1998), which adds frequency to Cao and Irani's GreedyDual-Size
(USITS'97); with unit sizes and costs it is LFU with dynamic aging (LFU-DA, Arlitt et al. 2000).

Every entry has a priority

    H = L + freq * max(cost, cost_floor) / max(size, 1) ** size_exponent

and the entry with the lowest H is evicted first (ties: the least recently touched first).

- ``cost`` is the ``cost`` given to ``insert``: the runtime passes the measured load time (ms), so the
  policy keeps the models whose misses would cost the most load time per byte they occupy.
  ``cost_floor`` keeps zero-cost entries (cost unknown) in a frequency-per-byte order instead of all
  tying at H = L. With every cost at the floor the policy minimises the object miss ratio (GDSF).
- ``size`` is bytes. ``size_exponent`` (beta) interpolates: 1 is GDSF, 0 ignores size (LFU-DA by
  cost), values in between penalise large models less than linearly.
- ``freq`` is the number of requests since the entry was inserted, the one that loaded it included
  (so 1 at insertion). With ``freq_halflife`` (seconds) it decays: each hit first multiplies it by
  ``2 ** (-elapsed / freq_halflife)``, so a burst long past weighs less than steady use.
- ``L`` is the inflation value: the H of the last entry evicted as a victim. A hit recomputes H from
  the current L, so entries that stop being used fall behind entries touched since, and an old burst
  of hits cannot hold a model forever: that is GDSF's aging.

Deviations, each forced by the ``EvictionPolicy`` contract (see ``placement.policy``):

- ``victims`` only proposes; L rises when ``remove`` is called for a key of the last proposal (an
  unload for another reason, an unregistered model, does not age the cache).
- ``insert`` with ``last_used`` in the past (ModelMesh's registration offset, a proactive load) puts the
  model in a *cold lane*: it has not been used since it was loaded, and is proposed before every entry
  that has, oldest stamp first. Its first hit moves it into the priority order with freq = 1. A
  ``last_used`` in the future (a scale-out copy, stamped ahead so that it survives until traffic
  reaches it) credits one extra use: it starts with freq = 2.
- ``oldest_last_used`` keeps ModelMesh's meaning (the oldest last-used stamp, whatever the eviction
  order), from a recency index kept beside the priority order.

Data structure, and its trade-off. The priorities live in a binary heap of ``(H, seq, key)`` with lazy
invalidation: a hit pushes a fresh tuple (O(log n)) and leaves the old one in place, recognised as
stale because its ``seq`` is no longer the entry's. Stale tuples popped from the top are dropped, and
the heap is rebuilt from the live entries when it holds more than twice as many tuples as entries, so
its size stays O(n) and the rebuild costs O(1) amortised per operation. ``victims`` walks the heap in
priority order without popping live tuples (a small frontier heap of indices: O(k log k) for k
victims plus the protected keys skipped). A sorted container would give exact removal but costs
more per hit in Python than a ``heappush``.
"""

from __future__ import annotations

import math
from collections.abc import Container
from dataclasses import dataclass
from heapq import heapify, heappop, heappush

from placement._sized import SizedEntries
from placement.lru import LRUPolicy

__all__ = ["GDSFPolicy"]

# Rebuild the heap when it holds more than this many tuples per live entry (plus a constant so that
# tiny caches are not rebuilt all the time).
_COMPACT_FACTOR = 2
_COMPACT_SLACK = 64


@dataclass(slots=True)
class _Entry:
    size: int
    value: float  # cost / size ** beta: the priority one request adds
    freq: float
    base: float  # L when H was last computed: H = base + freq * value
    h: float
    seq: int  # the seq of the entry's live heap tuple (orders equal H: the older touch goes first)
    touched: float  # the stamp of the last use, for the frequency decay
    cold: bool  # in the cold lane (inserted in the past, not used since)


def _check_size(size: int) -> None:
    if size < 0:
        raise ValueError(f"size must be >= 0 bytes, got {size}")


class GDSFPolicy(SizedEntries):
    """Evicts the entry with the lowest ``L + freq * cost / size ** beta`` first; admits everything.

    Implements ``placement.policy.EvictionPolicy``; see that Protocol for the contract of each method.
    """

    name = "gdsf"
    __slots__ = ("_beta", "_cold", "_cost_floor", "_entries", "_halflife", "_heap", "_inflation", "_proposed",
                 "_recency", "_seq", "_total")

    def __init__(
        self, *, size_exponent: float = 1.0, cost_floor: float = 1.0, freq_halflife: float | None = None
    ) -> None:
        """``size_exponent``: beta in ``size ** beta`` (1: GDSF, 0: size-blind). ``cost_floor``: the
        smallest cost counted (in the unit of ``cost``, ms for the runtime), > 0. ``freq_halflife``:
        seconds over which an entry's request count halves between hits, ``None`` for no decay."""
        if not (math.isfinite(size_exponent) and size_exponent >= 0):
            raise ValueError(f"size_exponent must be a finite number >= 0, got {size_exponent!r}")
        if not (math.isfinite(cost_floor) and cost_floor > 0):
            raise ValueError(f"cost_floor must be a finite number > 0, got {cost_floor!r}")
        if freq_halflife is not None and not (freq_halflife > 0):
            raise ValueError(f"freq_halflife must be > 0 seconds or None, got {freq_halflife!r}")
        self._beta = float(size_exponent)
        self._cost_floor = float(cost_floor)
        self._halflife = freq_halflife
        self._entries: dict[str, _Entry] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._inflation = 0.0  # L
        self._seq = 0
        self._total = 0
        self._proposed: set[str] = set()
        # Last-used stamps of every key (ModelMesh's meaning of oldest_last_used), and the cold lane.
        self._recency = LRUPolicy()
        self._cold = LRUPolicy()

    # -- queries ------------------------------------------------------------------------------

    @property
    def inflation(self) -> float:
        """L: the priority of the last victim removed; new and touched entries start above it."""
        return self._inflation

    def priority(self, key: str) -> float | None:
        """The current H of ``key`` (``None`` when untracked or in the cold lane)."""
        entry = self._entries.get(key)
        return None if entry is None or entry.cold else entry.h

    def oldest_last_used(self) -> float | None:
        return self._recency.oldest_last_used()

    def admit(self, key: str, size: int, now: float) -> bool:
        # Size and cost decide what leaves, not what enters; admission control is a wrapper's job.
        return True

    def victims(self, need: int, now: float, *, protected: Container[str] = ()) -> list[str]:
        if need <= 0:
            return []
        chosen: list[str] = []
        freed = 0
        if self._cold:
            chosen = self._cold.victims(need, now, protected=protected)
            freed = sum(self._entries[k].size for k in chosen)
            if freed >= need:
                self._proposed = set()
                return chosen
        heap = self._heap
        entries = self._entries
        # Drop stale tuples from the top, so that the live minimum is heap[0].
        while heap:
            _, seq, key = heap[0]
            entry = entries.get(key)
            if entry is not None and entry.seq == seq:
                break
            heappop(heap)
        if not heap:
            self._proposed = set()
            return chosen
        key = heap[0][2]
        if not chosen and key not in protected and entries[key].size >= need:
            # The common case: the minimum alone makes the room.
            self._proposed = {key}
            return [key]
        # Walk the heap in order without popping: a frontier of (tuple, index) pairs, the children of
        # each visited node entering the frontier. Every tuple is unique (its seq), so no tie reaches
        # the index or compares keys.
        size = len(heap)
        frontier = [(heap[0], 0)]
        from_heap: list[str] = []
        while frontier and freed < need:
            item, i = heappop(frontier)
            child = 2 * i + 1
            if child < size:
                heappush(frontier, (heap[child], child))
                if child + 1 < size:
                    heappush(frontier, (heap[child + 1], child + 1))
            _, seq, key = item
            entry = entries.get(key)
            if entry is None or entry.seq != seq or key in protected:
                continue
            from_heap.append(key)
            freed += entry.size
        self._proposed = set(from_heap)
        chosen.extend(from_heap)
        return chosen

    # -- updates ------------------------------------------------------------------------------

    def insert(
        self, key: str, size: int, now: float, *, last_used: float | None = None, cost: float = 0.0
    ) -> None:
        _check_size(size)
        if not math.isfinite(cost):
            raise ValueError(f"cost must be a finite number, got {cost!r}")
        stamp = now if last_used is None else last_used
        if key in self._entries:
            self.remove(key)
        # The recency index validates the stamp (finite) before anything else changes.
        self._recency.insert(key, 0, now, last_used=stamp)
        value = max(cost, self._cost_floor) / float(max(size, 1)) ** self._beta
        if stamp < now:
            entry = _Entry(size, value, 0.0, self._inflation, self._inflation, 0, stamp, True)
            self._cold.insert(key, size, now, last_used=stamp)
            self._entries[key] = entry
        else:
            freq = 2.0 if stamp > now else 1.0
            entry = _Entry(size, value, freq, 0.0, 0.0, 0, stamp, False)
            self._entries[key] = entry
            self._reprioritise(key, entry)
        self._total += size

    def touch(self, key: str, now: float) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        self._recency.touch(key, now)  # validates ``now``
        if entry.cold:
            self._cold.remove(key)
            entry.cold = False
            entry.freq = 1.0
        elif self._halflife is None:
            entry.freq += 1.0
        else:
            elapsed = now - entry.touched
            if elapsed > 0:
                entry.freq *= 0.5 ** (elapsed / self._halflife)
            entry.freq += 1.0
        if now > entry.touched:
            entry.touched = now
        self._reprioritise(key, entry)

    def resize(self, key: str, size: int) -> None:
        _check_size(size)
        entry = self._entries.get(key)
        if entry is None:
            return
        self._total += size - entry.size
        # Keep the entry's cost (value * old size ** beta) and its base L; only the per-byte figure moves.
        cost = entry.value * float(max(entry.size, 1)) ** self._beta
        entry.size = size
        entry.value = cost / float(max(size, 1)) ** self._beta
        if entry.cold:
            self._cold.resize(key, size)
        else:
            self._push(key, entry, entry.base)

    def remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._total -= entry.size
        self._recency.remove(key)
        if entry.cold:
            self._cold.remove(key)
        elif key in self._proposed:
            # Evicted as a victim: the cache ages to its priority (GreedyDual's L := H(victim)).
            self._proposed.discard(key)
            if entry.h > self._inflation:
                self._inflation = entry.h
        # Its heap tuple is now stale; drop the garbage once it dominates.
        if len(self._heap) > _COMPACT_FACTOR * len(self._entries) + _COMPACT_SLACK:
            self._compact()

    # -- internals ----------------------------------------------------------------------------

    def _reprioritise(self, key: str, entry: _Entry) -> None:
        """Recompute H from the current L (an insertion or a hit) and push it."""
        self._push(key, entry, self._inflation)
        if len(self._heap) > _COMPACT_FACTOR * len(self._entries) + _COMPACT_SLACK:
            self._compact()

    def _push(self, key: str, entry: _Entry, base: float) -> None:
        self._seq += 1
        entry.seq = self._seq
        entry.base = base
        entry.h = base + entry.freq * entry.value
        heappush(self._heap, (entry.h, self._seq, key))

    def _compact(self) -> None:
        self._heap = [(e.h, e.seq, k) for k, e in self._entries.items() if not e.cold]
        heapify(self._heap)
