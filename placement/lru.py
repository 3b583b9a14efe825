"""Least-recently-used eviction by explicit last-used timestamps, weighted by bytes (ModelMesh's cache).

ModelMesh's cache is not a plain access-ordered LRU: every entry carries a last-used *timestamp*, and
the eviction order is the order of those timestamps. That lets an entry be inserted in the past (a model
registered with a recency offset of -1 h, or a proactive load stamped with the model's last use in the
cluster) so that it is the first to go and cannot push out the models in use, or slightly in the future
(a scale-out copy, so that it survives until traffic reaches it). Equal timestamps are ordered by the
sequence of the operations that set them, so the order is total and deterministic.

Data structure, and its trade-off. Almost every operation stamps "now", which is at or after every
timestamp already in the cache; those entries live in an ``OrderedDict`` (the *main* run) kept in
timestamp order simply by appending, so ``insert`` at now, ``touch`` and ``remove`` are O(1). An entry
whose timestamp is earlier than the newest one in the main run (a past insertion, or a touch while a
future-stamped copy is the newest) goes to the *side* list instead, kept sorted with ``bisect``: O(log n)
comparisons plus an O(n) ``list.insert``, which is a C ``memmove`` of pointers (a few microseconds at
100,000 entries) and happens once per such entry, not per request. An entry leaves the side list on its
next touch. A balanced tree or a skip list would make every operation O(log n) in Python code, slower
for the common case than this. ``victims`` walks the two sorted runs merged, and stops as soon as
enough bytes are found, so it costs O(k) for k victims (plus the protected keys it skips) when the side
list is empty, O(k log 2) through ``heapq.merge`` otherwise.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import OrderedDict
from collections.abc import Container, Iterator
from dataclasses import dataclass
from heapq import merge

from placement._sized import SizedEntries

__all__ = ["LRUPolicy"]


@dataclass(slots=True)
class _Entry:
    size: int
    last_used: float
    seq: int  # orders equal timestamps: the later operation is the more recent use
    in_side: bool  # which of the two runs holds the key


def _check_size(size: int) -> None:
    if size < 0:
        raise ValueError(f"size must be >= 0 bytes, got {size}")


def _check_time(t: float) -> None:
    # A NaN would silently break the sorted order (every comparison with it is false).
    if not math.isfinite(t):
        raise ValueError(f"time must be a finite number of seconds, got {t!r}")


class LRUPolicy(SizedEntries):
    """Evicts the model with the oldest last-used timestamp first; admits everything.

    Implements ``placement.policy.EvictionPolicy``; see that Protocol for the contract of each method.
    """

    name = "lru"
    __slots__ = ("_entries", "_main", "_seq", "_side", "_total")

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        # Keys whose (last_used, seq) increase from first to last; the first is the LRU one.
        self._main: OrderedDict[str, None] = OrderedDict()
        # (last_used, seq, key), sorted: entries that could not be appended to ``_main`` in order.
        self._side: list[tuple[float, int, str]] = []
        self._seq = 0
        self._total = 0

    # -- queries ------------------------------------------------------------------------------

    def oldest_last_used(self) -> float | None:
        oldest: float | None = None
        if self._main:
            oldest = self._entries[next(iter(self._main))].last_used
        if self._side and (oldest is None or self._side[0][0] < oldest):
            oldest = self._side[0][0]
        return oldest

    def last_used(self, key: str) -> float | None:
        """The last-used timestamp of ``key``, or ``None`` when it is not tracked."""
        entry = self._entries.get(key)
        return None if entry is None else entry.last_used

    def admit(self, key: str, size: int, now: float) -> bool:
        # Plain LRU has no admission control: every model may enter, and recency alone decides.
        return True

    def victims(self, need: int, now: float, *, protected: Container[str] = ()) -> list[str]:
        if need <= 0:
            return []
        chosen: list[str] = []
        freed = 0
        for key in self._in_order():
            if key in protected:
                continue
            chosen.append(key)
            freed += self._entries[key].size
            if freed >= need:
                break
        return chosen

    # -- updates ------------------------------------------------------------------------------

    def insert(
        self, key: str, size: int, now: float, *, last_used: float | None = None, cost: float = 0.0
    ) -> None:
        # ``cost`` is part of the interface for cost-aware policies; recency alone orders an LRU.
        _check_size(size)
        stamp = now if last_used is None else last_used
        _check_time(stamp)
        old = self._entries.get(key)
        if old is not None:
            self._unlink(key, old)
            self._total -= old.size
        entry = _Entry(size=size, last_used=stamp, seq=self._next_seq(), in_side=False)
        self._entries[key] = entry
        self._link(key, entry)
        self._total += size

    def touch(self, key: str, now: float) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        _check_time(now)
        # Recency never moves backwards: a late-reported hit, or a hit on a copy stamped in the future,
        # must not make the entry look older than it is.
        stamp = max(entry.last_used, now)
        if not entry.in_side:
            tail = next(reversed(self._main))
            if tail == key or stamp >= self._entries[tail].last_used:
                # The hot path: the entry becomes the newest, in O(1).
                entry.last_used = stamp
                entry.seq = self._next_seq()
                self._main.move_to_end(key)
                return
        self._unlink(key, entry)
        entry.last_used = stamp
        entry.seq = self._next_seq()
        self._link(key, entry)

    def resize(self, key: str, size: int) -> None:
        _check_size(size)
        entry = self._entries.get(key)
        if entry is None:
            return
        self._total += size - entry.size
        entry.size = size

    def remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._unlink(key, entry)
        self._total -= entry.size

    # -- internals ----------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _link(self, key: str, entry: _Entry) -> None:
        """Place ``key`` (not in either run, already in ``_entries``) according to its timestamp."""
        if not self._main or entry.last_used >= self._entries[next(reversed(self._main))].last_used:
            # Its seq is the newest, so appending keeps (last_used, seq) increasing along the run.
            self._main[key] = None
            entry.in_side = False
        else:
            insort(self._side, (entry.last_used, entry.seq, key))
            entry.in_side = True

    def _unlink(self, key: str, entry: _Entry) -> None:
        """Take ``key`` out of whichever run holds it (``_entries`` is left to the caller)."""
        if entry.in_side:
            # (last_used, seq) is unique, so this finds exactly the key's own tuple.
            i = bisect_left(self._side, (entry.last_used, entry.seq, key))
            del self._side[i]
        else:
            del self._main[key]

    def _in_order(self) -> Iterator[str]:
        """Every key, least recently used first."""
        if not self._side:
            yield from self._main
            return
        entries = self._entries
        main = ((entries[k].last_used, entries[k].seq, k) for k in self._main)
        for _, _, key in merge(main, self._side):
            yield key
