"""The registry of eviction policies: a policy built from its name in the settings.

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
  ``gdsf+tinylfu`` a cost-aware cache with frequency admission. A refused model is served; the
  runtime and the cluster simulator keep it as the first to go (``placement.kernel.admission``),
  the one-cache ``replay`` drops it (a pass-through; see ``placement.admission``).

``build_policy`` is what the runtime and the simulators call: ``make_policy`` with the cache's
capacity offered to the policies that take one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

from placement.admission import AdmissionFactory, ChurnGuard, TinyLFUAdmission
from placement.gdsf import GDSFPolicy
from placement.lru import LRUPolicy
from placement.policy import EvictionPolicy
from placement.s3fifo import S3FIFOPolicy
from placement.sieve import SievePolicy

__all__ = ["build_policy", "make_policy", "policy_names"]


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


def build_policy(name: str, capacity_bytes: int, params: Mapping[str, object] | None = None) -> EvictionPolicy:
    """``make_policy(name, **params)``, telling the policy the cache's capacity when it takes one.

    Admission filters size themselves from the capacity (``capacity=``); plain eviction policies do not
    take it. The registry does not say which is which, so the capacity is offered first and dropped
    when the policy refuses the parameter (a parameter the caller gave is never dropped).
    """
    given = dict(params or {})
    if "capacity" not in given:
        try:
            return make_policy(name, capacity=capacity_bytes, **given)
        except ValueError as exc:
            if "bad parameters" not in str(exc):
                raise
    return make_policy(name, **given)
