"""The cyclic garbage collector in server processes: freeze what start-up built, collect less often.

Why (issue 18, part 4). Under closed-loop load a runtime spent about 9 % of its busy CPU in
``gc_collect_main`` (py-spy, hop scenario, c=32), a router about 2 %. Two reasons:

* CPython's default first-generation threshold is 700 *net* container allocations. A request in
  flight holds a few dozen containers (its task, coroutine frames, futures, the frame dataclass,
  the metadata tuples), so with 32 requests in flight the young generation crosses 700 every few
  dozen requests, and each collection walks every object in flight, none of which is garbage:
  they are freed by reference counting as their requests finish.
* The oldest generation holds what start-up and the model libraries imported (grpc, protobuf
  descriptors, numpy, scikit-learn: about 135,000 objects in a runtime); a full collection walks
  all of it with the GIL held: 15-45 ms at start-up on the 2-core reference machine, 37-192 ms
  while serving under load (BENCHMARKS.md, section 19), a pause for every request in flight.

What. Once the process is serving, :func:`tune` moves everything alive into the permanent
generation (``gc.freeze()``: never scanned again; objects start-up made are rarely garbage later),
again after each model library imported later (:func:`refreeze`), and raises the young
generation's threshold to :data:`GEN0_THRESHOLD`, so that requests in flight are mostly freed by
reference counting before a collection would visit them.

Trade-off. Garbage that *is* cyclic (an exception caught with its traceback, which keeps the
handler's frame) lives until the next collection, which now comes after more allocations: with
10,000 young objects, that is a few hundred requests later instead of a few dozen. The request
bodies such cycles could hold after a burst of large messages are collected explicitly anyway
(``mesh.malloc.trim`` after a burst, ``mesh.transport.inflight``). Frozen objects that later
become unreachable are never reclaimed by the collector (reference counting still frees them when
they hold no cycle); start-up's objects live as long as the process.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 10_000  # young objects between collections; CPython's default is 700
# Older generations keep CPython's default ratios (10 young collections per middle one, etc.).

_tuned = False


def tune(gen0_threshold: int = GEN0_THRESHOLD) -> None:
    """Freeze the objects alive now and raise the young generation's threshold (0 leaves the
    collector as CPython configures it). Call once, when start-up is done."""
    global _tuned
    if gen0_threshold <= 0:
        return
    gc.collect()  # what start-up left as garbage goes now, not into the permanent generation
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
    _tuned = True


def refreeze() -> None:
    """After a large import while serving (a model library imported at the first load of its
    type, ``mesh.runtime.libraries``: scikit-learn alone brings some 100,000 objects): freeze
    again, so that full collections do not walk the library from then on. No collection first:
    one found nothing to collect after scikit-learn's import and held the GIL 48-183 ms, a pause
    for every request in flight; what an import leaves is module state, not garbage. Once per
    library. A no-op in a process that :func:`tune` did not set up (tests calling the loaders
    directly)."""
    if _tuned:
        gc.freeze()


__all__ = ["GEN0_THRESHOLD", "refreeze", "tune"]
