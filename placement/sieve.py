"""SIEVE: a FIFO queue with one "visited" bit per entry and a hand that sweeps it, weighted by bytes.

Source: Zhang, Yang, Yue, Vigfusson, Rashmi, "SIEVE is Simpler than LRU: an Efficient Turn-Key
Eviction Algorithm for Web Caches" (NSDI'24). Entries enter at the head of a queue and never move. A
hit only sets the entry's visited bit. To evict, the hand walks from where it stopped towards the head
(wrapping from the head back to the tail): a visited entry has its bit cleared and is passed over, the
first unvisited entry is the victim, and the hand rests there. New entries therefore get one sweep of
the hand to prove themselves, and an entry hit since the hand last passed survives one more sweep:
"lazy promotion, quick demotion", with nothing moved on a hit.

Variable sizes: the walk simply goes on until the proposed victims free ``need`` bytes, which is what
libCacheSim's Sieve does (evict until the object fits); the paper defines no size-aware variant.

Deviations, each forced by the ``EvictionPolicy`` contract (see ``placement.policy``):

- ``victims`` proposes: it clears the visited bits it passes (a decision) and parks the hand on the
  last victim, which stays in the queue until ``remove``. Removing the entry under the hand moves the
  hand to the next newer entry, or back to the tail when there is none (libCacheSim's pointer), so
  once the caller removes the victims the next sweep goes on exactly as if SIEVE had evicted them one
  by one; a victim that was not removed is proposed again.
- ``protected`` keys are passed over with their visited bit untouched: they keep their place.
- ``insert`` with ``last_used`` in the past (ModelMesh's registration offset, a proactive load) puts the
  model in a *cold lane* proposed before the queue, oldest stamp first; its first hit moves it to the
  head of the queue, as a new entry. A ``last_used`` in the future (a scale-out copy stamped ahead)
  starts visited, so it survives the hand's next pass.
- ``oldest_last_used`` keeps ModelMesh's meaning (the oldest last-used stamp), from a recency index.

Checked against libCacheSim 0.3.5's Sieve: identical hit vectors on Zipf traces, with equal and with
variable sizes (the test suite repeats the check when libcachesim is installed).

Data structure. The queue is a Python list of keys, oldest first, with the hand an index into it: a
removed entry leaves a ``None`` tombstone (O(1)), skipped by the hand, and the list is compacted when
tombstones outnumber live entries (O(1) amortised). A hit costs one dict lookup and one store.
``victims`` costs O(entries passed), bounded by two sweeps of the queue.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

from placement._sized import SizedEntries
from placement.lru import LRUPolicy

__all__ = ["SievePolicy"]

_COMPACT_SLACK = 64


@dataclass(slots=True)
class _Entry:
    size: int
    slot: int  # index in the queue, -1 while in the cold lane
    visited: bool


def _check_size(size: int) -> None:
    if size < 0:
        raise ValueError(f"size must be >= 0 bytes, got {size}")


class SievePolicy(SizedEntries):
    """SIEVE eviction; admits everything.

    Implements ``placement.policy.EvictionPolicy``; see that Protocol for the contract of each method.
    """

    name = "sieve"
    __slots__ = ("_cold", "_dead", "_entries", "_hand", "_queue", "_recency", "_total")

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._queue: list[str | None] = []  # oldest (tail) first, newest (head) last
        self._hand = 0
        self._dead = 0  # tombstones in the queue
        self._total = 0
        self._recency = LRUPolicy()
        self._cold = LRUPolicy()

    # -- queries ------------------------------------------------------------------------------

    def oldest_last_used(self) -> float | None:
        return self._recency.oldest_last_used()

    def visited(self, key: str) -> bool | None:
        """The visited bit of ``key`` (``None`` when untracked)."""
        entry = self._entries.get(key)
        return None if entry is None else entry.visited

    def admit(self, key: str, size: int, now: float) -> bool:
        return True

    def victims(self, need: int, now: float, *, protected: Container[str] = ()) -> list[str]:
        if need <= 0:
            return []
        chosen: list[str] = []
        freed = 0
        entries = self._entries
        if self._cold:
            chosen = self._cold.victims(need, now, protected=protected)
            freed = sum(entries[k].size for k in chosen)
            if freed >= need:
                return chosen
        queue = self._queue
        n = len(queue)
        if n == 0:
            return chosen
        i = self._hand
        last = -1
        taken: set[str] = set()
        # Two sweeps are enough: the first clears every visited bit it passes, so the second finds every
        # evictable entry unvisited.
        for _ in range(2 * n):
            if i >= n:
                i = 0
            key = queue[i]
            if key is not None and key not in protected and key not in taken:
                entry = entries[key]
                if entry.visited:
                    entry.visited = False
                else:
                    chosen.append(key)
                    taken.add(key)
                    last = i
                    freed += entry.size
                    if freed >= need:
                        break
            i += 1
        self._hand = last if last >= 0 else i % n
        return chosen

    # -- updates ------------------------------------------------------------------------------

    def insert(
        self, key: str, size: int, now: float, *, last_used: float | None = None, cost: float = 0.0
    ) -> None:
        # ``cost`` is part of the interface for cost-aware policies; SIEVE does not weigh it.
        _check_size(size)
        stamp = now if last_used is None else last_used
        if key in self._entries:
            self.remove(key)
        self._recency.insert(key, 0, now, last_used=stamp)  # validates the stamp
        entry = _Entry(size, -1, stamp > now)
        self._entries[key] = entry
        if stamp < now:
            self._cold.insert(key, size, now, last_used=stamp)
        else:
            entry.slot = len(self._queue)
            self._queue.append(key)
        self._total += size

    def touch(self, key: str, now: float) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        self._recency.touch(key, now)  # validates ``now``
        if entry.slot >= 0:
            entry.visited = True
        else:
            # First use of a cold entry: it joins the head of the queue as a new entry.
            self._cold.remove(key)
            entry.slot = len(self._queue)
            self._queue.append(key)

    def resize(self, key: str, size: int) -> None:
        _check_size(size)
        entry = self._entries.get(key)
        if entry is None:
            return
        self._total += size - entry.size
        entry.size = size
        if entry.slot < 0:
            self._cold.resize(key, size)

    def remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._total -= entry.size
        self._recency.remove(key)
        if entry.slot < 0:
            self._cold.remove(key)
            return
        self._queue[entry.slot] = None
        self._dead += 1
        if entry.slot == self._hand:
            # The hand moves on to the next newer entry that exists now, or back to the tail when there
            # is none: an entry inserted later at the head must wait for the next sweep.
            queue = self._queue
            i = self._hand + 1
            while i < len(queue) and queue[i] is None:
                i += 1
            self._hand = i if i < len(queue) else 0
        if self._dead > len(self._entries) + _COMPACT_SLACK:
            self._compact()

    # -- internals ----------------------------------------------------------------------------

    def _compact(self) -> None:
        """Drop the tombstones; the hand keeps pointing at the same live entry (or the next one)."""
        live: list[str | None] = []
        hand = 0
        for i, key in enumerate(self._queue):
            if i == self._hand:
                hand = len(live)
            if key is not None:
                self._entries[key].slot = len(live)
                live.append(key)
        if self._hand >= len(self._queue):
            hand = len(live)
        self._queue = live
        self._hand = hand
        self._dead = 0

