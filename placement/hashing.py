"""Rendezvous (highest-random-weight) hashing with bounded load: where a cold model goes.

When no copy of a model is loaded, a router must pick the instance that will load it, and every router
must pick the *same* one without talking to the others, or a burst of requests through N routers loads
N copies. Rendezvous hashing gives that agreement for free: each (model, instance) pair gets a
pseudo-random weight, and the model's *home* is the instance with the highest weight. The weight is a
pure function of the two names, so two routers with the same view of the instances compute the same
order whatever order their lists are in.

Why HRW rather than a hash ring: with a few to a few hundred instances, scoring every instance is cheap
(one 8-byte BLAKE2b per instance, about a microsecond), there are no virtual nodes to tune, and the
spread is as even as the hash. Its minimal-disruption property is exact: adding an instance moves only
the models whose new highest weight is on the new instance (about 1/(N+1) of them) and moves them *to*
it; removing an instance moves only the models that were homed on it. Every other model keeps its home,
and with it its already loaded copy.

Why bounded load (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded Loads", 2018):
pure hashing ignores busyness, so a few popular models that happen to share a home all queue on it.
``choose_home`` walks the HRW order and skips an instance whose load is above
``max(1, load_factor * mean load)``, the mean taken over the instances that could take the model. The
trade-off: agreement now also depends on the routers seeing the same loads; two routers whose load
figures differ may pick different homes while the skew lasts, which costs at worst one extra copy,
never a wrong answer. The floor of 1 keeps a single in-flight request on an otherwise idle cluster from
diverting a model off its home (with every load at 0 or 1, the bound would otherwise be below 1).

The model's further copies (scale-out) go to the next instances in the same order (``copy_order``), so
replicas are as stable as homes.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass
from hashlib import blake2b

__all__ = ["Candidate", "choose_home", "copy_order", "hrw_weight", "rendezvous_order"]


def _key_prefix(key: str) -> bytes:
    # Length-prefixing the key makes the hashed message unambiguous whatever bytes the two names hold
    # (with a bare separator, "a|b" + "c" and "a" + "b|c" would collide); the prefix is computed once per
    # key when a caller scores many nodes.
    raw = key.encode("utf-8")
    return len(raw).to_bytes(4, "big") + raw


def _weight(prefix: bytes, node: str) -> int:
    # blake2b is in the standard library, stable across processes, platforms and Python versions (unlike
    # hash(), which is salted per process), and faster than sha256 for short messages.
    return int.from_bytes(blake2b(prefix + node.encode("utf-8"), digest_size=8).digest(), "big")


def hrw_weight(key: str, node: str) -> int:
    """The rendezvous weight of ``node`` for ``key``: an unsigned 64-bit integer.

    It is a pure function of the two strings, the same in every process and on every version; it must
    never change, because routers of different versions (a rolling upgrade) have to agree on homes.
    """
    return _weight(_key_prefix(key), node)


def rendezvous_order(key: str, nodes: Iterable[str]) -> list[str]:
    """``nodes`` (duplicates collapsed) by descending weight for ``key``; ties broken by node name.

    The first is the key's home when load is ignored. The order does not depend on the order of
    ``nodes``, which is what lets independent routers agree.
    """
    prefix = _key_prefix(key)
    # The tie-break only matters for equal 64-bit weights, which distinct names practically never
    # produce; it is there so that the result is a total order by construction, not by luck.
    return sorted(set(nodes), key=lambda node: (-_weight(prefix, node), node))


def copy_order(key: str, nodes: Iterable[str], *, exclude: Container[str] = ()) -> list[str]:
    """Where the copies of ``key`` go, first to last: its HRW order without the ``exclude``d nodes.

    The scaling logic adds copies from the front of this list (skipping nodes that already hold one or
    cannot take one), so that every router proposes the same next replica and adding an instance
    disturbs replica sets as little as it disturbs homes.
    """
    return [node for node in rendezvous_order(key, nodes) if node not in exclude]


@dataclass(frozen=True, slots=True)
class Candidate:
    """An instance that could take a model, as one router sees it.

    ``capacity_bytes`` is what the instance can hold in total (for the device the model needs), not its
    free space: a full instance makes room by evicting, and hashing over free space would make homes
    flap with every load and unload. ``load`` is any busyness figure the caller chooses, the same kind
    for every candidate (for example requests in flight plus loads queued or running).
    """

    node: str
    capacity_bytes: int
    load: float


def choose_home(
    key: str,
    candidates: Sequence[Candidate],
    size_bytes: int,
    *,
    load_factor: float = 1.25,
    exclude: Container[str] = (),
    prefer: Container[str] = (),
) -> str | None:
    """The instance that should load ``key``: the first in its HRW order that can take it.

    ``prefer``: when any of these nodes is eligible, the answer is chosen among them alone (with the
    same rule); the others are the fallback. Callers use it for a tier of better nodes, such as the
    instances with a GPU for a model that prefers one.

    A candidate is *eligible* when it is not in ``exclude`` and ``capacity_bytes >= size_bytes``. The
    result is the first eligible candidate in HRW order whose ``load`` is at most
    ``max(1, load_factor * mean)``, where ``mean`` is the mean load of the eligible candidates. With
    ``load_factor >= 1`` (enforced) the least-loaded eligible candidate always meets the bound, so some
    candidate qualifies unless the loads are not comparable (NaN); then the HRW-first eligible
    candidate is returned. ``None`` when no candidate is eligible.

    Every router that computes this from the same candidates (same names, capacities and loads, in any
    order) gets the same answer. It is one pass over the candidates, without sorting: the answer is the
    maximum weight among those under the bound.
    """
    if not load_factor >= 1.0:  # written this way so that NaN is rejected too
        raise ValueError(f"load_factor must be >= 1, got {load_factor!r}")
    eligible = [c for c in candidates if c.node not in exclude and c.capacity_bytes >= size_bytes]
    if not eligible:
        return None
    preferred = [c for c in eligible if c.node in prefer]
    return _bounded_first(key, preferred or eligible, load_factor)


def _bounded_first(key: str, eligible: Sequence[Candidate], load_factor: float) -> str:
    """The first of ``eligible`` (not empty) in HRW order whose load is under the bound."""
    mean = sum(c.load for c in eligible) / len(eligible)
    bound = max(1.0, load_factor * mean)
    prefix = _key_prefix(key)

    first: tuple[int, str] | None = None  # (weight, node) of the HRW-first eligible candidate
    best: tuple[int, str] | None = None  # the same among the candidates under the bound
    for c in eligible:
        w = _weight(prefix, c.node)
        if first is None or _ranks_before(w, c.node, first):
            first = (w, c.node)
        if c.load <= bound and (best is None or _ranks_before(w, c.node, best)):
            best = (w, c.node)
    chosen = best if best is not None else first
    assert chosen is not None  # eligible is not empty
    return chosen[1]


def _ranks_before(weight: int, node: str, other: tuple[int, str]) -> bool:
    """Whether (weight, node) comes before ``other`` in HRW order (the order of ``rendezvous_order``)."""
    return weight > other[0] or (weight == other[0] and node < other[1])
