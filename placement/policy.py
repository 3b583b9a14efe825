"""The eviction policy interface: what a cache of models asks the policy that decides for it.

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
  everything. It is asked before a load. A refused model's request is still served, so a refusal
  does not save that load; it saves the models the newcomer would have evicted. What happens to the
  refused model is the caller's: the one-cache ``replay`` drops it (a pass-through, ``bypassed``);
  the runtime and the cluster simulator keep it as the first to go (``placement.kernel.admission``).
- ``cost`` (seconds to load, or any positive figure) is what cost-aware policies weigh against size;
  policies that do not use it ignore it.
- Unknown keys are ignored by ``touch``, ``resize`` and ``remove``: a request may finish after its
  model was evicted, and removal is idempotent like the runtime SPI's ``unloadModel``.
- Policies are not thread-safe; the runtime calls them from its one event loop.

The registry that builds a policy from its name in the settings is ``placement.registry``.

Each module's docstring gives the algorithm, its source, the deviations and the complexity.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Protocol, runtime_checkable

__all__ = ["EvictionPolicy"]


@runtime_checkable
class EvictionPolicy(Protocol):
    """Decides what a cache of models admits and what it evicts. Sizes are bytes, times are seconds."""

    @property
    def name(self) -> str:
        """The name the policy is registered under (``placement.registry.make_policy(name)`` builds it)."""
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
        served all the same (see the module docstring for what becomes of it)."""
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
