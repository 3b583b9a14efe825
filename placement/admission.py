"""Admission control: wrappers that decide whether a model may enter a cache run by any eviction policy.

An eviction policy chooses what leaves; an admission filter chooses whether a newcomer is worth what
would leave for it. Both filters here wrap any ``EvictionPolicy`` (``TinyLFUAdmission(GDSFPolicy(),
capacity=...)``) and are registered by name as ``<policy>+<filter>`` (``"gdsf+tinylfu"``,
``"lru+churnguard"``; see ``placement.registry``). They delegate everything to the wrapped policy except
``admit`` (and ``touch``, which TinyLFU also counts).

**What a refusal means.** ``admit`` is asked before a load. The request is served all the same: the
one-cache simulator (``placement.replay``) loads the model, serves the request and drops it again (a
*pass-through*, ``Stats.bypassed``), like ModelMesh's fall-through for a model that cannot be placed;
the runtime and the cluster simulator keep it as the first model to go (``placement.kernel.admission``),
so refused newcomers take turns in one model's room. So a refusal does not save the miss or its load
time; it saves the models that would have been evicted, and the misses *they* would have caused next.

**TinyLFU** (``TinyLFUAdmission``; Einziger, Friedman, Manes, "TinyLFU: A Highly Efficient Cache
Admission Policy", ACM ToS 2017). Every request is counted in a small frequency sketch: a hit through
``touch``, a miss through ``admit``. When a newcomer does not fit in the free bytes, it is admitted
only if its estimated frequency is strictly greater than that of every victim the wrapped policy
proposes to make room for it: with equal sizes that is the paper's "beats the first victim", and with
variable sizes a large model must out-count each model it would displace (the generalisation the
reference anchors' weighted W-TinyLFU uses). The sketch is:

- a count-min sketch of 4 rows of 4-bit saturating counters (one byte each, in a ``bytearray``),
  ``4 * expected_entries`` wide rounded up to a power of two, with conservative update (only the
  smallest of a key's counters is incremented);
- a *doorkeeper*, a Bloom filter in front of it: a key's first request in a sample only sets its
  doorkeeper bits, later ones reach the counters, and an estimate adds one for a doorkeeper hit. One-hit
  wonders thus never occupy counters;
- *reset*: after ``sample_factor * expected_entries`` recorded requests, every counter is halved and
  the doorkeeper cleared, so that popularity fades and the filter follows shifts (churn). The paper
  and Caffeine use 10; the default here is 4, because with 10 a filter in front of a large cache
  (2,000 models) forgot a reshuffled popularity order too slowly: on the churn workload at 20 %
  capacity ``s3fifo+tinylfu`` missed 0.236 against LRU's 0.235, with 4 it misses 0.230, at a cost of
  under one point of miss ratio on stationary Zipf (``python -m loadtest.scenarios.placement``).

Hashing is keyed BLAKE2b of the key (``seed`` selects the hash functions), so runs are deterministic
across processes (Python's ``hash`` of a string is not). The hashed positions of recent keys are
cached (dropped at a reset once they number more than four samples' requests). With
``expected_entries=None`` the sketch sizes itself from the number of entries the wrapped policy
holds when the cache first fills (and grows if it later holds more), starting its counts over each
time it does.

Omitted from the paper and from Caffeine's W-TinyLFU: the admission window (a small LRU in front of
the filter that lets bursts of new models in; here the wrapped policy alone decides what leaves) and
the random admission that defends against hash flooding.

**Churn guard** (``ChurnGuard``; KServe ModelMesh, see the reference notes on its cache): a full
instance whose least recently used model was used less than ``min_churn_age`` seconds ago refuses new
loads ("Cache churn threshold exceeded"): evicting a model that is still in use to load another is
thrashing, and the newcomer is better served elsewhere or passed through. ModelMesh's default is
10 x max(3 s, load timeout / 3), 5 minutes with the 90 s load timeout, which is the default here.
"Full" here means the newcomer does not fit in the free bytes, i.e. exactly when admitting it would
evict (ModelMesh uses a fixed reserve, ``minSpaceUnits``). The age is that of the wrapped policy's
``oldest_last_used``: for LRU the first victim, for the other policies the least recently used model,
whichever model they would evict (if even the oldest model is young, the whole cache is in use).

Cost: the churn guard adds nothing per hit and O(1) per miss (``oldest_last_used``). TinyLFU adds one
dictionary lookup and four byte reads per request, and per miss that needs room one ``victims`` call
of the wrapped policy, whose answer it keeps for the caller's own ``victims`` call with the same
arguments right after (the policies are deterministic, so a second walk would give the same list).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Container
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from placement.policy import EvictionPolicy

__all__ = ["AdmissionFactory", "ChurnGuard", "FrequencySketch", "TinyLFUAdmission"]

_DEPTH = 4
_COUNTER_MAX = 15  # 4-bit counters
_HALVE = bytes(i >> 1 for i in range(256))  # bytearray.translate table: every counter halved at once
_ROW_BITS = 32  # bits of the digest per hash function
_MIN_ENTRIES = 16


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class FrequencySketch:
    """TinyLFU's approximate request counter: a doorkeeper Bloom filter in front of a count-min sketch.

    Estimates never undercount a key's requests since the last reset, halved at each reset (counters
    saturate at 15, so an estimate is at most 16).
    """

    __slots__ = ("_door", "_door_mask", "_mask", "_positions", "_recorded", "_resets", "_salt", "_sample",
                 "_table", "_width", "doorkeeper")

    def __init__(self, expected_entries: int, *, sample_factor: int = 4, doorkeeper: bool = True,
                 seed: int = 0) -> None:
        if expected_entries < 1:
            raise ValueError(f"expected_entries must be >= 1, got {expected_entries}")
        if sample_factor < 1:
            raise ValueError(f"sample_factor must be >= 1, got {sample_factor}")
        entries = max(expected_entries, _MIN_ENTRIES)
        self._width = _pow2_at_least(4 * entries)
        self._mask = self._width - 1
        self._sample = sample_factor * entries
        # About 8 doorkeeper slots per request of a sample: with 2 probes, a false positive rate under 5%.
        door_size = _pow2_at_least(8 * self._sample)
        self._door_mask = door_size - 1
        self.doorkeeper = doorkeeper
        self._table = bytearray(_DEPTH * self._width)
        self._door = bytearray(door_size if doorkeeper else 0)
        self._salt = seed.to_bytes(8, "little", signed=True)
        self._positions: dict[str, tuple[int, int, int, int, int, int]] = {}
        self._recorded = 0
        self._resets = 0

    @property
    def width(self) -> int:
        """Counters per row."""
        return self._width

    @property
    def sample_size(self) -> int:
        """Requests recorded between two resets."""
        return self._sample

    @property
    def resets(self) -> int:
        """How many times the counters were halved."""
        return self._resets

    def record(self, key: str) -> None:
        """Count one request for ``key``."""
        pos = self._positions.get(key)
        if pos is None:
            pos = self._hash(key)
        if self.doorkeeper:
            door = self._door
            d0, d1 = pos[4], pos[5]
            if not (door[d0] and door[d1]):
                door[d0] = door[d1] = 1
                self._tick()
                return
        table = self._table
        i0, i1, i2, i3 = pos[0], pos[1], pos[2], pos[3]
        v0, v1, v2, v3 = table[i0], table[i1], table[i2], table[i3]
        low = min(v0, v1, v2, v3)
        if low < _COUNTER_MAX:
            # Conservative update: only the counters at the minimum move, which keeps collisions from
            # inflating a key's estimate more than necessary.
            if v0 == low:
                table[i0] = low + 1
            if v1 == low:
                table[i1] = low + 1
            if v2 == low:
                table[i2] = low + 1
            if v3 == low:
                table[i3] = low + 1
        self._tick()

    def estimate(self, key: str) -> int:
        """The estimated number of requests for ``key`` (never below the true count, up to the halving)."""
        pos = self._positions.get(key)
        if pos is None:
            pos = self._hash(key)
        table = self._table
        count = min(table[pos[0]], table[pos[1]], table[pos[2]], table[pos[3]])
        if self.doorkeeper and self._door[pos[4]] and self._door[pos[5]]:
            count += 1
        return count

    def _tick(self) -> None:
        self._recorded += 1
        if self._recorded >= self._sample:
            self._reset()

    def _reset(self) -> None:
        self._table = self._table.translate(_HALVE)
        if self.doorkeeper:
            self._door = bytearray(len(self._door))
        if len(self._positions) > 4 * self._sample:
            self._positions.clear()  # bounds its memory to a few samples' keys
        self._recorded = 0
        self._resets += 1

    def _hash(self, key: str) -> tuple[int, int, int, int, int, int]:
        digest = int.from_bytes(
            hashlib.blake2b(key.encode(), digest_size=24, salt=self._salt).digest(), "little")
        mask, width = self._mask, self._width
        h = [(digest >> (_ROW_BITS * r)) & 0xFFFFFFFF for r in range(6)]
        pos = (h[0] & mask, width + (h[1] & mask), 2 * width + (h[2] & mask), 3 * width + (h[3] & mask),
               h[4] & self._door_mask, h[5] & self._door_mask)
        self._positions[key] = pos
        return pos


class _Admission:
    """Delegates the ``EvictionPolicy`` methods to the wrapped policy; subclasses decide ``admit``."""

    suffix = ""
    __slots__ = ("_capacity", "_inner", "_refused")

    def __init__(self, inner: EvictionPolicy, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0 bytes, got {capacity}")
        self._inner = inner
        self._capacity = capacity
        self._refused = 0

    @property
    def name(self) -> str:
        return f"{self._inner.name}+{self.suffix}"

    @property
    def inner(self) -> EvictionPolicy:
        """The wrapped eviction policy."""
        return self._inner

    @property
    def refused(self) -> int:
        """How many loads ``admit`` refused (each one a pass-through miss)."""
        return self._refused

    @property
    def total_size(self) -> int:
        return self._inner.total_size

    def size_of(self, key: str) -> int | None:
        return self._inner.size_of(key)

    def __contains__(self, key: object) -> bool:
        return key in self._inner

    def __len__(self) -> int:
        return len(self._inner)

    def oldest_last_used(self) -> float | None:
        return self._inner.oldest_last_used()

    def admit(self, key: str, size: int, now: float) -> bool:
        return self._inner.admit(key, size, now)

    def insert(
        self, key: str, size: int, now: float, *, last_used: float | None = None, cost: float = 0.0
    ) -> None:
        self._inner.insert(key, size, now, last_used=last_used, cost=cost)

    def touch(self, key: str, now: float) -> None:
        self._inner.touch(key, now)

    def resize(self, key: str, size: int) -> None:
        self._inner.resize(key, size)

    def remove(self, key: str) -> None:
        self._inner.remove(key)

    def victims(self, need: int, now: float, *, protected: Container[str] = ()) -> list[str]:
        return self._inner.victims(need, now, protected=protected)

    def _needs_room(self, key: str, size: int) -> int:
        """Bytes that must be evicted for ``key`` to enter (<= 0: it fits, or it is already in)."""
        if key in self._inner:
            return 0
        return self._inner.total_size + size - self._capacity


class TinyLFUAdmission(_Admission):
    """Admits a newcomer that needs room only if it is requested more often than every model it displaces.

    ``capacity``: the cache's bytes. ``expected_entries``: how many models the cache holds when full
    (sizes the sketch; ``None``: learned from the wrapped policy). ``sample_factor``: requests between
    two halvings, per expected entry. ``doorkeeper``: put a Bloom filter in front of the counters.
    ``seed``: selects the hash functions.
    """

    suffix = "tinylfu"
    __slots__ = ("_auto", "_doorkeeper", "_proposal", "_sample_factor", "_seed", "_sketch")

    def __init__(
        self,
        inner: EvictionPolicy,
        *,
        capacity: int,
        expected_entries: int | None = None,
        sample_factor: int = 4,
        doorkeeper: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(inner, capacity)
        self._auto = expected_entries is None
        self._sample_factor = sample_factor
        self._doorkeeper = doorkeeper
        self._seed = seed
        self._sketch = FrequencySketch(expected_entries or _MIN_ENTRIES, sample_factor=sample_factor,
                                       doorkeeper=doorkeeper, seed=seed)
        # (need, now, victims) of the proposal ``admit`` just asked for: the caller's own ``victims``
        # call, which comes next with the same arguments, gets it without a second walk.
        self._proposal: tuple[int, float, list[str]] | None = None

    @property
    def sketch(self) -> FrequencySketch:
        return self._sketch

    def frequency(self, key: str) -> int:
        """The sketch's estimate of the requests for ``key`` in the current sample."""
        return self._sketch.estimate(key)

    def touch(self, key: str, now: float) -> None:
        self._proposal = None
        self._sketch.record(key)
        self._inner.touch(key, now)

    def insert(
        self, key: str, size: int, now: float, *, last_used: float | None = None, cost: float = 0.0
    ) -> None:
        self._proposal = None
        self._inner.insert(key, size, now, last_used=last_used, cost=cost)

    def resize(self, key: str, size: int) -> None:
        self._proposal = None
        self._inner.resize(key, size)

    def remove(self, key: str) -> None:
        self._proposal = None
        self._inner.remove(key)

    def victims(self, need: int, now: float, *, protected: Container[str] = ()) -> list[str]:
        proposal, self._proposal = self._proposal, None
        if proposal is not None and proposal[0] == need and proposal[1] == now and not protected:
            return proposal[2]
        return self._inner.victims(need, now, protected=protected)

    def admit(self, key: str, size: int, now: float) -> bool:
        self._proposal = None
        sketch = self._sketch
        sketch.record(key)
        need = self._needs_room(key, size)
        if need > 0:
            if self._auto and 4 * len(self._inner) > sketch.width:
                sketch = self._resize_sketch()
            victims = self._inner.victims(need, now)
            self._proposal = (need, now, victims)
            if victims:
                wanted = sketch.estimate(key)
                estimate = sketch.estimate
                for victim in victims:
                    if estimate(victim) >= wanted:
                        self._refused += 1
                        self._proposal = None
                        return False
        return self._inner.admit(key, size, now)

    def _resize_sketch(self) -> FrequencySketch:
        # Sized for twice the entries held now, so that a cache still filling does not resize each time.
        self._sketch = FrequencySketch(2 * len(self._inner), sample_factor=self._sample_factor,
                                       doorkeeper=self._doorkeeper, seed=self._seed)
        return self._sketch


class ChurnGuard(_Admission):
    """ModelMesh's churn guard: a full cache whose oldest model is younger than ``min_churn_age``
    (seconds) refuses new loads. ``capacity``: the cache's bytes."""

    suffix = "churnguard"
    __slots__ = ("_min_age",)

    def __init__(self, inner: EvictionPolicy, *, capacity: int, min_churn_age: float = 300.0) -> None:
        super().__init__(inner, capacity)
        if not min_churn_age >= 0:
            raise ValueError(f"min_churn_age must be >= 0 seconds, got {min_churn_age!r}")
        self._min_age = min_churn_age

    def admit(self, key: str, size: int, now: float) -> bool:
        if self._needs_room(key, size) > 0:
            oldest = self._inner.oldest_last_used()
            if oldest is not None and now - oldest < self._min_age:
                self._refused += 1
                return False
        return self._inner.admit(key, size, now)


class AdmissionFactory:
    """Builds ``wrapper(inner(...), ...)`` from one set of keyword parameters, for the registry.

    Its signature (what ``make_policy`` checks parameters against) is the union of the wrapper's and
    the inner policy's keyword parameters; one both take (``capacity``) is given to both.
    """

    __slots__ = ("__signature__", "_inner", "_inner_names", "_wrapper", "_wrapper_names")

    def __init__(self, wrapper: type[_Admission], inner: Callable[..., EvictionPolicy]) -> None:
        self._wrapper: Callable[..., EvictionPolicy] = wrapper
        self._inner = inner
        wrapper_params = [p for p in inspect.signature(wrapper).parameters.values() if p.name != "inner"]
        inner_params = list(inspect.signature(inner).parameters.values())
        self._wrapper_names = frozenset(p.name for p in wrapper_params)
        self._inner_names = frozenset(p.name for p in inner_params)
        merged = wrapper_params + [p for p in inner_params if p.name not in self._wrapper_names]
        self.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in merged])

    def __call__(self, **params: object) -> EvictionPolicy:
        inner = self._inner(**{k: v for k, v in params.items() if k in self._inner_names})
        return self._wrapper(inner, **{k: v for k, v in params.items() if k in self._wrapper_names})
