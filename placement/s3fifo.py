"""S3-FIFO: a small probationary FIFO, a main FIFO with a 2-bit clock, and a ghost FIFO of keys.

Source: Yang, Zhang, Qiu, Yue, Rashmi, "FIFO queues are all you need for cache eviction" (SOSP'23), as
implemented in libCacheSim's ``S3FIFO.c`` (the version the reference anchors measured):

- A hit adds one to the entry's counter, capped at 3; nothing moves.
- A new entry enters the small queue S, unless its key is in the ghost queue G (it was evicted from S
  recently and came back: it is worth keeping), in which case it enters the main queue M directly.
  Until the first eviction, an entry that finds S already at its share enters M (libCacheSim's
  refinement: the first entries after warm-up are not all probationary).
- Eviction takes from M when M holds more than its share (``1 - small_ratio``) or S is empty, else
  from S. From S, the oldest entry moves to M (counter reset to 0) when it was hit at least
  ``move_to_main_threshold`` times while in S, else it is evicted and its key enters G. From M, the
  oldest entry with a counter > 0 goes back to M's head with the counter decremented (min(c, 3) - 1),
  and the first one at 0 is evicted (a 2-bit CLOCK).
- G remembers evicted keys, FIFO, up to ``ghost_ratio`` of the cache's bytes.

Most one-hit wonders leave through S after a short stay and never disturb M, which is why S3-FIFO
resists scans and sweeps of cold models.

Variable sizes: every share (S, M, G) is in bytes and eviction goes on until ``need`` bytes are
proposed, as libCacheSim does for sized objects. Where libCacheSim refuses to cache an object at
least as large as S (so that one object cannot flush S), this policy must keep what was loaded, so
such a model enters M instead. The cache's size is ``capacity`` when given; without it, the largest
total the policy has tracked stands in for it (a full cache's total is its capacity, give or take the
model being loaded), so pass ``capacity`` when it is known.

Deviations, each forced by the ``EvictionPolicy`` contract (see ``placement.policy``):

- ``victims`` proposes: the moves it decides on the way (S to M, reinsertions in M) happen, the victims
  themselves stay until ``remove``, and a victim from S enters G only when it is removed. ``admit``
  consumes the key's ghost entry, as libCacheSim's lookup does, before the victims of its load are
  removed into G and push older ghosts out.
- ``protected`` keys are skipped with their counter and place untouched.
- ``insert`` with ``last_used`` in the past (ModelMesh's registration offset, a proactive load) puts the
  model in a *cold lane* proposed before S and M, oldest stamp first; its first hit enters it like a
  new entry. A ``last_used`` in the future (a scale-out copy stamped ahead) starts with counter 1.
- ``oldest_last_used`` keeps ModelMesh's meaning (the oldest last-used stamp), from a recency index.

Checked against libCacheSim 0.3.5's S3FIFO (driven the way the runtime drives this policy: ``admit``,
then the victims, then ``insert``): identical hit vectors on Zipf traces, with equal sizes and with
variable sizes below S's share (the test suite repeats the check when libcachesim is installed).

Complexity: O(1) per hit, insertion and removal (``OrderedDict``); ``victims`` is O(1) amortised per
entry it passes over (each reinsertion in M spends one of at most three counter units).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass

from placement._sized import SizedEntries
from placement.lru import LRUPolicy

__all__ = ["S3FIFOPolicy"]

_COLD, _SMALL, _MAIN = 0, 1, 2
_MAX_FREQ = 3


@dataclass(slots=True)
class _Entry:
    size: int
    freq: int
    queue: int  # _COLD, _SMALL or _MAIN


def _check_size(size: int) -> None:
    if size < 0:
        raise ValueError(f"size must be >= 0 bytes, got {size}")


class S3FIFOPolicy(SizedEntries):
    """S3-FIFO eviction; admits everything (the ghost queue decides *where* a model enters, not whether).

    Implements ``placement.policy.EvictionPolicy``; see that Protocol for the contract of each method.
    """

    name = "s3fifo"
    __slots__ = ("_capacity", "_cold", "_entries", "_ghost", "_ghost_bytes", "_ghost_hit", "_ghost_ratio",
                 "_has_evicted", "_main", "_main_bytes", "_peak", "_proposed", "_recency", "_small",
                 "_small_bytes", "_small_ratio", "_threshold", "_total")

    def __init__(
        self,
        *,
        capacity: int | None = None,
        small_ratio: float = 0.1,
        ghost_ratio: float = 0.9,
        move_to_main_threshold: int = 2,
    ) -> None:
        """``capacity``: the cache's bytes (``None``: the largest total seen). ``small_ratio``: S's share
        of it; ``ghost_ratio``: G's, in evicted bytes remembered. ``move_to_main_threshold``: hits in S
        that earn a place in M (2, as in the paper's pseudocode and libCacheSim)."""
        if capacity is not None and capacity < 0:
            raise ValueError(f"capacity must be >= 0 bytes or None, got {capacity}")
        if not 0.0 < small_ratio < 1.0:
            raise ValueError(f"small_ratio must be in (0, 1), got {small_ratio!r}")
        if not (math.isfinite(ghost_ratio) and ghost_ratio >= 0.0):
            raise ValueError(f"ghost_ratio must be a finite number >= 0, got {ghost_ratio!r}")
        if not 1 <= move_to_main_threshold <= _MAX_FREQ:
            raise ValueError(f"move_to_main_threshold must be in [1, {_MAX_FREQ}], got {move_to_main_threshold}")
        self._capacity = capacity
        self._small_ratio = small_ratio
        self._ghost_ratio = ghost_ratio
        self._threshold = move_to_main_threshold
        self._entries: dict[str, _Entry] = {}
        self._small: OrderedDict[str, None] = OrderedDict()  # oldest first
        self._main: OrderedDict[str, None] = OrderedDict()
        self._ghost: OrderedDict[str, int] = OrderedDict()  # evicted key -> its size, oldest first
        self._small_bytes = 0
        self._main_bytes = 0
        self._ghost_bytes = 0
        self._total = 0
        self._peak = 0
        self._has_evicted = False
        self._ghost_hit: str | None = None  # the key whose ghost entry the last ``admit`` consumed
        self._proposed: dict[str, bool] = {}  # the last proposal: key -> whether it came from S
        self._recency = LRUPolicy()
        self._cold = LRUPolicy()

    # -- queries ------------------------------------------------------------------------------

    def oldest_last_used(self) -> float | None:
        return self._recency.oldest_last_used()

    def queue_of(self, key: str) -> str | None:
        """Where ``key`` is: ``"small"``, ``"main"``, ``"cold"``, ``"ghost"`` or ``None``."""
        entry = self._entries.get(key)
        if entry is not None:
            return ("cold", "small", "main")[entry.queue]
        return "ghost" if key in self._ghost or key == self._ghost_hit else None

    def admit(self, key: str, size: int, now: float) -> bool:
        # Consume the ghost entry now, before the victims of this load enter G and push it out.
        if key not in self._entries and self._ghost_hit != key:
            ghost_size = self._ghost.pop(key, None)
            if ghost_size is not None:
                self._ghost_bytes -= ghost_size
                self._ghost_hit = key
        return True

    def victims(self, need: int, now: float, *, protected: Container[str] = ()) -> list[str]:
        if need <= 0:
            return []
        self._has_evicted = True
        proposed: dict[str, bool] = {}
        self._proposed = proposed
        chosen: list[str] = []
        freed = 0
        entries = self._entries
        if self._cold:
            chosen = self._cold.victims(need, now, protected=protected)
            freed = sum(entries[k].size for k in chosen)
            if freed >= need:
                return chosen
        small, main = self._small, self._main
        cache_size = self._cache_size()
        main_share = cache_size - int(cache_size * self._small_ratio)
        # M's bytes once the proposed victims are gone (protected keys still count).
        main_bytes = self._main_bytes
        # Protected and proposed keys are popped off the front while walking, and put back in front,
        # in order, at the end: they keep their place and are not met twice.
        aside_small: list[str] = []
        aside_main: list[str] = []
        while freed < need:
            from_main = main_bytes > main_share or not small
            key = None
            for _ in range(2):  # the preferred queue, then the other one when it has nothing evictable
                if from_main:
                    key = self._walk_main(protected, aside_main)
                    if key is not None:
                        main_bytes -= entries[key].size
                        break
                else:
                    key, promoted = self._walk_small(protected, aside_small)
                    main_bytes += promoted
                    if key is not None:
                        break
                from_main = not from_main
            if key is None:
                break  # nothing evictable left in S or M
            proposed[key] = entries[key].queue == _SMALL
            chosen.append(key)
            freed += entries[key].size
        for k in reversed(aside_main):
            main[k] = None
            main.move_to_end(k, last=False)
        for k in reversed(aside_small):
            small[k] = None
            small.move_to_end(k, last=False)
        return chosen

    # -- updates ------------------------------------------------------------------------------

    def insert(
        self, key: str, size: int, now: float, *, last_used: float | None = None, cost: float = 0.0
    ) -> None:
        # ``cost`` is part of the interface for cost-aware policies; S3-FIFO does not weigh it.
        _check_size(size)
        stamp = now if last_used is None else last_used
        if key in self._entries:
            self.remove(key)
        self._recency.insert(key, 0, now, last_used=stamp)  # validates the stamp
        entry = _Entry(size, 1 if stamp > now else 0, _COLD)
        self._entries[key] = entry
        self._total += size
        if self._total > self._peak:
            self._peak = self._total
        if stamp < now:
            self._cold.insert(key, size, now, last_used=stamp)
        else:
            self._enqueue(key, entry)

    def touch(self, key: str, now: float) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        self._recency.touch(key, now)  # validates ``now``
        if entry.queue != _COLD:
            if entry.freq < _MAX_FREQ:
                entry.freq += 1
        else:
            # First use of a cold entry: it enters like a new one.
            self._cold.remove(key)
            self._enqueue(key, entry)

    def resize(self, key: str, size: int) -> None:
        _check_size(size)
        entry = self._entries.get(key)
        if entry is None:
            return
        delta = size - entry.size
        self._total += delta
        if self._total > self._peak:
            self._peak = self._total
        entry.size = size
        if entry.queue == _SMALL:
            self._small_bytes += delta
        elif entry.queue == _MAIN:
            self._main_bytes += delta
        else:
            self._cold.resize(key, size)

    def remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._total -= entry.size
        self._recency.remove(key)
        if entry.queue == _SMALL:
            del self._small[key]
            self._small_bytes -= entry.size
        elif entry.queue == _MAIN:
            del self._main[key]
            self._main_bytes -= entry.size
        else:
            self._cold.remove(key)
        if self._proposed.pop(key, False):
            # Evicted from S: remember the key, so that a quick return goes straight to M.
            self._ghost[key] = entry.size
            self._ghost_bytes += entry.size
            budget = int(self._cache_size() * self._ghost_ratio)
            while self._ghost_bytes > budget and self._ghost:
                _, ghost_size = self._ghost.popitem(last=False)
                self._ghost_bytes -= ghost_size

    # -- internals ----------------------------------------------------------------------------

    def _walk_main(self, protected: Container[str], aside: list[str]) -> str | None:
        """M's 2-bit CLOCK: reinsert the oldest entries hit since their last pass, return the first that
        was not (moved aside, still tracked), or ``None`` when M has nothing evictable."""
        main, entries = self._main, self._entries
        while main:
            key = next(iter(main))
            entry = entries[key]
            if key in protected:
                del main[key]
                aside.append(key)
            elif entry.freq > 0:
                entry.freq = min(entry.freq, _MAX_FREQ) - 1
                main.move_to_end(key)
            else:
                del main[key]
                aside.append(key)
                return key
        return None

    def _walk_small(self, protected: Container[str], aside: list[str]) -> tuple[str | None, int]:
        """S's FIFO: promote the oldest entries hit often enough to M, return the first that was not
        (moved aside, still tracked) or ``None``, and the bytes promoted on the way."""
        small, main, entries = self._small, self._main, self._entries
        promoted = 0
        while small:
            key = next(iter(small))
            entry = entries[key]
            if key in protected:
                del small[key]
                aside.append(key)
            elif entry.freq >= self._threshold:
                del small[key]
                main[key] = None
                entry.queue = _MAIN
                entry.freq = 0
                promoted += entry.size
            else:
                del small[key]
                aside.append(key)
                self._small_bytes -= promoted
                self._main_bytes += promoted
                return key, promoted
        self._small_bytes -= promoted
        self._main_bytes += promoted
        return None, promoted

    def _cache_size(self) -> int:
        return self._capacity if self._capacity is not None else self._peak

    def _enqueue(self, key: str, entry: _Entry) -> None:
        """Put a new (or newly used cold) entry in S or M."""
        if self._ghost_hit == key:
            self._ghost_hit = None
            to_main = True
        else:
            ghost_size = self._ghost.pop(key, None)
            to_main = ghost_size is not None
            if ghost_size is not None:
                self._ghost_bytes -= ghost_size
        if not to_main:
            cache_size = self._cache_size()
            small_share = int(cache_size * self._small_ratio)
            # A model as large as S would flush it (libCacheSim does not cache it at all); and before the
            # first eviction, an entry that finds S full goes to M.
            to_main = entry.size >= small_share or (not self._has_evicted and self._small_bytes >= small_share)
        if to_main:
            entry.queue = _MAIN
            self._main[key] = None
            self._main_bytes += entry.size
        else:
            entry.queue = _SMALL
            self._small[key] = None
            self._small_bytes += entry.size
