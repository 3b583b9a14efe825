"""The eviction policy interface, and the registry that builds a policy from its name in the settings.

A runtime instance keeps its loaded models in a cache of fixed capacity (bytes of RAM or of one GPU).
The cache owns the bytes and the model objects; the *policy* only decides: whether a model may enter
(``admit``), and which models to give up when room is needed (``victims``). Everything in between
(``insert``, ``touch``, ``resize``, ``remove``) keeps the policy's view in step with the cache.

Design choices, made so that one interface fits LRU, GreedyDual-Size-Frequency, S3-FIFO, ARC and SIEVE:

- Time is an argument (``now``, seconds), never read from a clock, so policies are deterministic and
  tested without sleeping. Timestamps may be in the past or the future: ModelMesh registers a model
  "1 h ago" (6 h without ``loadNow``) so that a burst of registrations cannot push out models in use,
  and stamps a scale-out copy 20 s ahead so that it survives until traffic reaches it.
- ``victims`` proposes and the cache disposes: it never removes a key. The cache unloads what it can
  and calls ``remove`` for each model actually gone, so a failed unload does not desynchronise the two.
  A policy may still update its internal order while proposing (SIEVE moves its hand and clears
  visited bits, S3-FIFO promotes re-used entries to its main queue); that is a decision, not a removal.
- ``protected`` keys (pinned, serving a request, still loading) are skipped, not reordered, so they keep
  their place for when they become evictable again.
- ``admit`` is the admission-control hook (a churn guard, TinyLFU, S3-FIFO's ghost queue); LRU admits
  everything. It is asked before a load. A refused model is not cached, but its request is still
  served: it is loaded, served and dropped (a pass-through, what the simulator counts as ``bypassed``),
  so a refusal does not save that load; it saves the models the newcomer would have evicted.
- ``cost`` (seconds to load, or any positive figure) is what cost-aware policies weigh against size;
  policies that do not use it ignore it.
- Unknown keys are ignored by ``touch``, ``resize`` and ``remove``: a request may finish after its
  model was evicted, and removal is idempotent like the runtime SPI's ``unloadModel``.
- Policies are not thread-safe; the runtime calls them from its one event loop.

Names in the registry (``make_policy(name, **params)``; ``policy_names()`` lists them):

- eviction policies: ``lru`` (ModelMesh's, by last-used timestamps; no parameters), ``gdsf``
  (GreedyDual-Size-Frequency weighing load cost against bytes: ``size_exponent=1.0``,
  ``cost_floor=1.0``, ``freq_halflife=None``), ``s3fifo`` (small + main FIFO + ghost: ``capacity=None``,
  ``small_ratio=0.1``, ``ghost_ratio=0.9``, ``move_to_main_threshold=2``), ``sieve`` (no parameters);
- ``<policy>+<filter>``: an eviction policy behind an admission filter, which takes the policy's
  parameters and its own, and requires ``capacity`` (the cache's bytes, given to the policy too when
  it takes one): ``+tinylfu`` (a frequency sketch admits a newcomer only if it is requested more than
  every model it displaces: ``expected_entries=None``, ``sample_factor=4``, ``doorkeeper=True``,
  ``seed=0``) and ``+churnguard`` (ModelMesh's: a full cache whose oldest model is younger than
  ``min_churn_age=300.0`` seconds refuses new loads). E.g. ``lru+churnguard`` is ModelMesh's cache,
  ``gdsf+tinylfu`` a cost-aware cache with frequency admission. A refused model is served and not
  kept (a pass-through; see ``placement.admission``).

Each module's docstring gives the algorithm, its source, the deviations and the complexity.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Container
from typing import Protocol, runtime_checkable

from placement.admission import AdmissionFactory, ChurnGuard, TinyLFUAdmission
from placement.gdsf import GDSFPolicy
from placement.lru import LRUPolicy
from placement.s3fifo import S3FIFOPolicy
from placement.sieve import SievePolicy

__all__ = ["EvictionPolicy", "make_policy", "policy_names"]


@runtime_checkable
class EvictionPolicy(Protocol):
    """Decides what a cache of models admits and what it evicts. Sizes are bytes, times are seconds."""

    @property
    def name(self) -> str:
        """The name the policy is registered under (``make_policy(name)`` builds it)."""
        ...

    @property
    def total_size(self) -> int:
        """The sum of the sizes of the keys the policy tracks (the bytes the cache should be using)."""
        ...

    def size_of(self, key: str) -> int | None:
        """The size the policy accounts for ``key``, or ``None`` when it is not tracked."""
        ...

    def admit(self, key: str, size: int, now: float) -> bool:
        """Whether ``key`` may stay in the cache once loaded; asked before the load. A refused model is
        served by a load that does not stay (a pass-through), and nothing is evicted for it."""
        ...

    def insert(
        self, key: str, size: int, now: float, *, last_used: float | None = None, cost: float = 0.0
    ) -> None:
        """Start tracking ``key`` of ``size`` bytes, last used at ``last_used`` (default ``now``).

        A ``last_used`` in the past lets a model enter behind the models in use, so that it is the
        first to go. Inserting a key already tracked replaces its size, recency and cost.
        """
        ...

    def touch(self, key: str, now: float) -> None:
        """Record a hit on ``key`` at ``now``. Recency never moves backwards. Unknown keys are ignored."""
        ...

    def resize(self, key: str, size: int) -> None:
        """Replace the size of ``key`` (a measured size replacing the predicted one)."""
        ...

    def remove(self, key: str) -> None:
        """Stop tracking ``key`` (evicted, unloaded or failed). Unknown keys are ignored."""
        ...

    def victims(self, need: int, now: float, *, protected: Container[str] = ()) -> list[str]:
        """Keys to evict, first victim first, whose sizes sum to at least ``need`` bytes.

        Keys in ``protected`` are never returned. ``[]`` when ``need <= 0``. When the evictable keys
        cannot free ``need`` bytes, all of them are returned in order and the caller decides (refuse
        the load with RESOURCE_EXHAUSTED, or wait for a protected model to become evictable).
        Nothing is removed: the caller calls ``remove`` for each model it actually unloads.
        """
        ...

    def __contains__(self, key: object) -> bool: ...

    def __len__(self) -> int: ...

    def oldest_last_used(self) -> float | None:
        """The oldest last-used time among the tracked keys (the instance's published ``lru_time``).

        ``None`` when nothing is tracked. Placement compares it across instances: the instance whose
        least recently used model is oldest gives up the least by evicting it.
        """
        ...


# One line per eviction policy; the name is the one operators write in the settings. Typing the table
# as factories of EvictionPolicy makes mypy check each class against the Protocol.
_EVICTION: dict[str, Callable[..., EvictionPolicy]] = {
    LRUPolicy.name: LRUPolicy,
    GDSFPolicy.name: GDSFPolicy,
    S3FIFOPolicy.name: S3FIFOPolicy,
    SievePolicy.name: SievePolicy,
}
# Every eviction policy also comes behind each admission filter, as "<policy>+<filter>".
_ADMISSION = (TinyLFUAdmission, ChurnGuard)
_FACTORIES: dict[str, Callable[..., EvictionPolicy]] = {
    **_EVICTION,
    **{f"{name}+{wrapper.suffix}": AdmissionFactory(wrapper, factory)
       for name, factory in _EVICTION.items() for wrapper in _ADMISSION},
}


def policy_names() -> tuple[str, ...]:
    """The names ``make_policy`` accepts, sorted."""
    return tuple(sorted(_FACTORIES))


def make_policy(name: str, **params: object) -> EvictionPolicy:
    """Build the policy registered as ``name`` with its keyword ``params``.

    Raises ``ValueError`` for an unknown name (listing the known ones) or for parameters the policy
    does not take, so that a typo in the settings fails at start-up with a message that says what is
    allowed, not with a ``TypeError`` from deep inside.
    """
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown eviction policy {name!r}; known policies: {', '.join(policy_names())}")
    try:
        inspect.signature(factory).bind(**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for eviction policy {name!r}: {exc}") from None
    return factory(**params)
