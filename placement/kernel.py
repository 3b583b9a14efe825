"""The placement decision kernel: the four decisions that the router, the runtime and the simulator share.

One function per decision, over plain inputs, with no I/O, no clock (``now`` is an argument) and no
randomness of its own (a random source is an argument). The router (``mesh.router.routing``,
``mesh.router.replicas``), the runtime's cache (``mesh.runtime.cache``) and the cluster simulator
(``placement.cluster``) each adapt their own records to these inputs and act on the answers, so a
placement benchmark measures the rules that are deployed, not a copy of them.

- **Copy choice** (``choose_copy``): where a request for a model goes among its copies. A loaded
  copy on an instance that is not shutting down, the one with the fewest requests in flight (with
  more than four candidates, the better of two drawn at random: "power of two choices", O(1) and no
  herding); else a loaded copy on an instance that is shutting down (it serves until its re-homed
  copy is loaded); else a copy still loading (the request joins that load: single flight); else
  nothing, and the caller chooses a home. Copies on instances excluded by the caller (already
  tried) or unreachable are skipped; ties go to the first candidate in the caller's order.
- **Home choice** (``choose_home``, from ``placement.hashing``): rendezvous hashing with bounded load
  over the candidates the caller found eligible.
- **Scale-out target** (``copy_targets``): the next instances of the model's rendezvous order
  (``copy_order``) that hold no copy yet.
- **Admission and eviction** (``admission``, ``make_room``): whether a demand load may stay, and which
  models give way so that it fits. ``admission`` is the runtime's rule: a refused model is still
  loaded and served, but enters the eviction order ``REFUSED_AGE_S`` in the past, behind every model
  in use, so it is the first to go; a load asked for ahead of traffic (a proactive load, a
  scale-out copy) carries its own ``last_used`` and is not filtered. ``make_room`` counts the bytes
  already on their way out (``freeing``: evicted copies still draining) as free, so a load that
  waits for them does not evict more models for the same room.
- **The pass-through room** (``pool_room``): where a refused model goes instead, when an instance
  holds part of its capacity back for them (``runtime.passthrough_bytes``): it is loaded there,
  evicting none of the admitted models, and serves until a later refused model needs that room; the
  room's least recently used copies give way first (the caller names those that may not: the
  runtime keeps a copy whose waiters have not taken it yet).

Why one function per decision rather than a ``Placement`` object with state: each caller keeps its
state in its own shape (the router's view mirrors the registry, the runtime's cache owns model
objects, the simulator keeps counters), and the hot path (copy choice runs on every request) must
not pay for building an intermediate object per request. ``choose_copy`` therefore reads the
caller's mappings in place through a classifier function (``state_of``), allocating only the small
candidate lists the rule itself needs.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from random import Random
from typing import NamedTuple, TypeVar

from placement.hashing import Candidate, choose_home, copy_order
from placement.policy import EvictionPolicy

__all__ = [
    "COPY_LEAVING",
    "COPY_LOADED",
    "COPY_LOADING",
    "REFUSED_AGE_S",
    "Candidate",
    "Room",
    "admission",
    "choose_copy",
    "choose_home",
    "copy_targets",
    "least_busy",
    "make_room",
    "pool_room",
]

# The states of a copy, as ``choose_copy`` ranks them (plain ints: compared on every request).
COPY_LOADED = 0  # loaded, on an instance taking traffic
COPY_LEAVING = 1  # loaded, on an instance shutting down: serves only while nothing else is loaded
COPY_LOADING = 2  # being loaded: a request joins the load

# With more candidates than this, copy choice compares two drawn at random instead of all of them.
FULL_SCAN_MAX = 4

# A refused model enters the eviction order this far in the past: older than ModelMesh's
# registration offsets (1 h, 6 h), so it goes before models that were loaded ahead of traffic.
REFUSED_AGE_S = 24 * 3600.0

P = TypeVar("P")  # the caller's record of one copy
H = TypeVar("H")  # the caller's record of one instance


# -- copy choice ------------------------------------------------------------------------------------


def least_busy(ids: list[str], inflight: Mapping[str, int], rng: Random) -> str:
    """The one of ``ids`` (not empty) with the fewest requests in flight; the first on a tie. With
    more than ``FULL_SCAN_MAX`` ids, the better of two drawn with ``rng`` (power of two choices)."""
    if len(ids) == 1:
        return ids[0]
    if len(ids) > FULL_SCAN_MAX:
        ids = rng.sample(ids, 2)
    # A loop rather than min(key=...): no closure per call, and two to four ids at most here.
    get = inflight.get
    best = ids[0]
    low = get(best, 0)
    for i in ids[1:]:
        n = get(i, 0)
        if n < low:
            best, low = i, n
    return best


def choose_copy(
    copies: Mapping[str, P],
    hosts: Mapping[str, H],
    state_of: Callable[[P, H], int | None],
    inflight: Mapping[str, int],
    rng: Random,
    *,
    exclude: Container[str] = (),
    unreachable: Container[str] = (),
) -> tuple[str, int] | None:
    """The copy a request goes to, and its state (``COPY_LOADED``, ``COPY_LEAVING``, ``COPY_LOADING``).

    ``copies`` maps an instance to the caller's record of the copy there, ``hosts`` an instance to
    the caller's record of it (a copy whose instance is unknown is skipped), and ``state_of(copy,
    host)`` ranks a copy (``None``: not usable, such as a failed load or a load on an instance that
    is shutting down). ``inflight`` counts the requests in flight per instance. ``None`` when no copy
    is usable: the caller then chooses a home. See the module docstring for the rule.
    """
    loaded: list[str] = []
    leaving: list[str] = []
    loading: list[str] = []
    for instance_id, copy in copies.items():
        if instance_id in exclude or instance_id in unreachable:
            continue
        host = hosts.get(instance_id)
        if host is None:
            continue
        state = state_of(copy, host)
        if state == COPY_LOADED:
            loaded.append(instance_id)
        elif state == COPY_LEAVING:
            leaving.append(instance_id)
        elif state == COPY_LOADING:
            loading.append(instance_id)
    if loaded:
        return least_busy(loaded, inflight, rng), COPY_LOADED
    if leaving:
        return least_busy(leaving, inflight, rng), COPY_LEAVING
    if loading:
        return least_busy(loading, inflight, rng), COPY_LOADING
    return None


# -- scale-out target ------------------------------------------------------------------------------


def copy_targets(key: str, candidates: Sequence[str], count: int, *, busy: Container[str] = ()) -> list[str]:
    """Where the next ``count`` copies of ``key`` go: the first of its rendezvous order over
    ``candidates`` (the instances that could hold one) without the ``busy`` ones (holding or loading
    a copy, or failed to load it). Fewer when fewer are left; ``[]`` for ``count <= 0``."""
    if count <= 0:
        return []
    return copy_order(key, candidates, exclude=busy)[:count]


# -- admission and eviction ------------------------------------------------------------------------


def admission(policy: EvictionPolicy, key: str, size: int, now: float,
              last_used: float | None = None, *, held: int = 0) -> tuple[bool, float | None]:
    """``(admitted, last_used)`` for a load of ``key`` (``size`` bytes, predicted) at ``now``.

    ``held``: bytes the device holds outside the policy and not on their way out, i.e. the
    reservations of other loads in progress. The filter is asked about ``size + held`` so that it
    judges the newcomer against the models that will really give way for it: without them a load
    that starts while another is loading saw the other's room as free and was admitted unasked,
    so under concurrent loads the filter judged about half the newcomers.

    A load that carries its own ``last_used`` (asked for ahead of traffic) is not filtered: it keeps
    its stamp. Otherwise the policy's ``admit`` is asked; a refused model is still loaded and served
    but enters the eviction order at ``now - REFUSED_AGE_S`` (the first to go), and
    ``last_used=None`` means "at the time of insertion".
    """
    if last_used is not None:
        return True, last_used
    if policy.admit(key, size + max(0, held), now):
        return True, None
    return False, now - REFUSED_AGE_S


class Room(NamedTuple):
    """What ``make_room`` decided: the models to evict (first victim first), and whether the load
    fits once they and the copies already leaving are gone (``False``: the rest of the room is held
    by protected models; the caller waits for it or gives up)."""

    victims: list[str]
    enough: bool


def make_room(policy: EvictionPolicy, size: int, *, used: int, capacity: int, now: float,
              protected: Container[str] = (), freeing: int = 0) -> Room:
    """The evictions a load of ``size`` bytes needs on a device of ``capacity`` bytes, ``used`` of
    them counted (loaded, loading and draining copies alike), ``freeing`` of those held by copies
    already evicted and draining (they will be released without another eviction).

    The victims are the policy's (``victims(need, now, protected=...)``, ``need`` being what is
    missing once the draining copies are gone); nothing is removed from the policy here: the caller
    evicts, and calls ``remove`` for each copy it actually gives up. A victim the policy sizes at
    more than it tracks counts for what the policy says (``size_of``).
    """
    need = used - freeing + size - capacity
    if need <= 0:
        return Room([], True)
    victims = policy.victims(need, now, protected=protected)
    freed = 0
    for victim in victims:
        freed += policy.size_of(victim) or 0
    return Room(victims, freed >= need)


def pool_room(order: Iterable[str], sizes: Mapping[str, int], size: int, *, used: int, capacity: int,
              protected: Container[str] = ()) -> Room:
    """The copies of the pass-through room to drop so that a refused model of ``size`` bytes fits
    in it (``capacity`` bytes, ``used`` of them counted): the room's copies in ``order`` (least
    recently used first), skipping ``protected`` ones (the caller's: the runtime's copies whose
    waiters have not taken them yet), until enough is freed.
    ``Room.enough`` False (and no victims: nothing is dropped for nothing): it does not fit even then,
    and the model goes to the main room instead (as the first to go: ``admission``)."""
    if size > capacity:
        return Room([], False)
    need = used + size - capacity
    if need <= 0:
        return Room([], True)
    victims: list[str] = []
    freed = 0
    for key in order:
        if freed >= need:
            break
        if key in protected:
            continue
        victims.append(key)
        freed += sizes.get(key, 0)
    return Room(victims, True) if freed >= need else Room([], False)
