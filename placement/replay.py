"""Trace-driven simulation of one cache: an instance's model cache under an eviction policy.

``replay``: an instance's model cache of ``capacity_bytes`` under an eviction policy, fed a trace of
requests, asked what the runtime's cache (``mesh/runtime/cache.py``) asks:

- a hit (the model is in the cache) is a ``touch``;
- a miss asks ``admit``; if admitted, ``make_room`` names models to evict until the newcomer fits,
  each is ``remove``d, and the model is ``insert``ed with its size and ``cost = load_ms``;
- a model larger than the capacity, or one the policy refuses to admit, is a miss that does not stay
  (it is loaded, served and dropped: a pass-through, counted in ``bypassed``).

Loads take no time at this level: a miss costs its ``load_ms`` as added latency and nothing else. This
is the level at which policies are compared with each other and with the offline optimum (Belady),
since it is the level those references are defined at; it is also the one that has to be fast (the
loop binds the policy's methods once and allocates nothing per request besides the policy's own work).

The eviction step is the decision kernel's (``placement.kernel.make_room``), the one the runtime's
cache and the cluster simulator call. What becomes of a refused model is the one place this level
differs from the runtime on purpose: it is dropped (the textbook pass-through the offline references
and the policies' published results assume), where the runtime and ``placement.cluster`` keep it as
the first to go (``placement.kernel.admission``).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain

from placement.kernel import make_room
from placement.policy import EvictionPolicy
from placement.request import Request
from placement.stats import Stats, out_of_order, with_waits

__all__ = ["replay"]


def replay(requests: Iterable[Request], policy: EvictionPolicy, capacity_bytes: int) -> Stats:
    """Replay ``requests`` (in time order) through one cache of ``capacity_bytes`` under ``policy``.

    ``policy`` should start empty; it is left in its final state. Loads take no time (see the module
    docstring): a miss adds its ``load_ms`` of latency.
    """
    if capacity_bytes < 0:
        raise ValueError(f"capacity must be >= 0 bytes, got {capacity_bytes}")
    capacity = capacity_bytes
    # Bound once: the loop below runs millions of times.
    touch = policy.touch
    admit = policy.admit
    remove = policy.remove
    insert = policy.insert
    waits: list[float] = []
    wait = waits.append
    n = misses = bypassed = evictions = 0
    nbytes = missed_bytes = 0
    cost = missed_cost = 0.0
    stream = iter(requests)
    head = next(stream, None)
    if head is None:
        return Stats()
    first = last = head.time_s
    for t, key, size, load_ms, _ in chain((head,), stream):
        if t < last:
            raise out_of_order(t, last)
        last = t
        n += 1
        nbytes += size
        cost += load_ms
        if key in policy:
            touch(key, t)
            continue
        misses += 1
        missed_bytes += size
        missed_cost += load_ms
        wait(load_ms)
        if size > capacity or not admit(key, size, t):
            bypassed += 1
            continue
        if policy.total_size + size > capacity:
            for victim in make_room(policy, size, used=policy.total_size, capacity=capacity, now=t).victims:
                if victim in policy:
                    remove(victim)
                    evictions += 1
            if policy.total_size + size > capacity:  # a policy that proposed too little
                bypassed += 1
                continue
        insert(key, size, t, cost=load_ms)
    stats = Stats(requests=n, hits=n - misses, misses=misses, bypassed=bypassed,
                  evictions=evictions, bytes_requested=nbytes, bytes_missed=missed_bytes,
                  cost_requested_ms=cost, cost_missed_ms=missed_cost, start_s=first, end_s=last)
    return with_waits(stats, waits)
