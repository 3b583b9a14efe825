"""How many runtime replicas a runtime group needs: the cache-aware scaling signal.

A *group* is the runtime pods of one ServingRuntime (one StatefulSet); the router knows it by the
instances' ``rt:<name>`` label, ``""`` for instances without one. Per group, two needs:

- **Memory**: the models used within the last ``window_s`` (their measured sizes summed: the
  *working set*) must fit in the replicas' model capacity at ``target_fill``:
  ``ceil(working_set / (capacity_per_replica * target_fill))``. A fill under 1 leaves the cache room
  for the models that come and go, so that the working set is not evicted by each newcomer.
- **Load**: the group's request rate over what one replica serves comfortably,
  ``ceil(request_rps / target_rps)``.

The need is the larger of the two (the ``bound`` says which one: ``memory`` or ``load``; ``idle``
when both are 0), clamped to the group's ``[min, max]``. A group with at least one registered model
never goes under 1 replica (a request must find a runtime); a group with none goes to 0 (scale to
zero, modelmesh-serving's ``ScaleToZero``), and back to at least 1 as soon as a model is registered.

Hysteresis, since a replica is slow to come (a pod start, then cold loads) and costly to lose (its
models must load again elsewhere):

- **Up at once**: a need above the current desired count is taken immediately. Waiting would make
  requests queue behind loads in a cache that does not hold the working set.
- **Down slowly**: the need must stay below the desired count for ``hold_s`` without interruption,
  and then the count drops by one; the next step waits another full ``hold_s``. So a plateau whose
  need wobbles between N and N+1 stays at N+1 (no flapping: every return to N+1 restarts the
  hold), and a night's decline is a staircase, each step re-homing one replica's models. A group
  without registered models drops straight to 0 after one hold: there is no cache to preserve.
- A change of the configured bounds applies at once (a lowered max is a hard limit).

Pure, as the rest of ``placement``: time is passed in (``now``, seconds, any origin), no clock and no
I/O. The router feeds it from its view of the cluster every few seconds and exports the result as
metrics (``mesh.router.autoscale``); the simulation in ``loadtest/scenarios/autoscale.py`` drives a
simulated fleet with it. The replica count itself is changed by an HPA or KEDA reading the metric
(``deploy/autoscaling``), so the signal must be the same on every router: the memory need comes from
the registry's placements, the load from the runtimes' own request rates where the caller has them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "AutoscaleConfig",
    "AutoscaleError",
    "Autoscaler",
    "Demand",
    "ModelUse",
    "ReplicaBounds",
    "Signal",
]

# The bounds, the ``bound`` and the ``action`` a Signal can carry (the metric's ``reason`` label).
MEMORY, LOAD, IDLE, NO_MODELS = "memory", "load", "idle", "no-models"
UP, DOWN, HOLD, STEADY = "up", "down", "hold", "steady"


class AutoscaleError(ValueError):
    """An input the signal cannot be computed from (negative sizes, no capacity for a working set)."""


def _finite(name: str, value: float, *, positive: bool = False) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value)) or value < 0 or (positive and value == 0):
        raise AutoscaleError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


def _count(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise AutoscaleError(f"{name} must be an integer >= 0, got {value!r}")


class ReplicaBounds(NamedTuple):
    """The fewest and most replicas of one group (the fewest applies while it has models)."""

    min_replicas: int
    max_replicas: int


def _check_bounds(where: str, lo: int, hi: int) -> None:
    _count(f"{where} min_replicas", lo)
    _count(f"{where} max_replicas", hi)
    if hi < max(lo, 1):
        raise AutoscaleError(f"{where} max_replicas ({hi}) must be >= max(1, min_replicas ({lo}))")


@dataclass(frozen=True, slots=True)
class AutoscaleConfig:
    """The signal's knobs (the router's ``router.autoscale_*`` settings).

    window_s: a model counts in the working set if used within this long. 10 minutes: longer than
      the gaps between the requests of a model in use, short enough that a model that went cold
      stops holding a replica within the hold that follows.
    target_fill: fraction of the replicas' model capacity the working set may fill. 0.8 leaves a
      fifth for the models that come and go.
    target_rps: requests per second one replica serves comfortably (well under its saturation:
      a small sklearn model saturates a 2-core runtime near 1,500 req/s, BENCHMARKS.md 9).
    hold_s: how long the need must stay lower before one replica goes, and between two steps down.
    min_replicas, max_replicas: the default bounds of every group.
    groups: bounds per group name, overriding the defaults.
    scale_to_zero: a group without registered models goes to 0 replicas (else to its minimum).
    """

    window_s: float = 600.0
    target_fill: float = 0.8
    target_rps: float = 500.0
    hold_s: float = 300.0
    min_replicas: int = 1
    max_replicas: int = 10
    groups: Mapping[str, ReplicaBounds] = field(default_factory=dict)
    scale_to_zero: bool = True

    def __post_init__(self) -> None:
        _finite("window_s", self.window_s, positive=True)
        _finite("target_rps", self.target_rps, positive=True)
        _finite("hold_s", self.hold_s)
        if not (isinstance(self.target_fill, int | float) and 0.0 < self.target_fill <= 1.0):
            raise AutoscaleError(f"target_fill must be in (0, 1], got {self.target_fill!r}")
        _check_bounds("default", self.min_replicas, self.max_replicas)
        for name, (lo, hi) in self.groups.items():
            _check_bounds(f"group {name!r}", lo, hi)

    def bounds(self, group: str) -> ReplicaBounds:
        return self.groups.get(group, ReplicaBounds(self.min_replicas, self.max_replicas))


@dataclass(frozen=True, slots=True)
class ModelUse:
    """A model of the group: its measured size, when it was last used, its recent request rate."""

    model_id: str
    size_bytes: int
    last_used_s: float
    rate_rps: float = 0.0

    def __post_init__(self) -> None:
        _count(f"model {self.model_id!r} size_bytes", self.size_bytes)
        _finite(f"model {self.model_id!r} rate_rps", self.rate_rps)
        if not math.isfinite(self.last_used_s):
            raise AutoscaleError(f"model {self.model_id!r} last_used_s must be finite, got {self.last_used_s!r}")


@dataclass(frozen=True, slots=True)
class Demand:
    """What one group has and needs now: the input of ``Autoscaler.decide``.

    replicas: the group's runtime replicas now (live instances).
    capacity_bytes: model capacity of one replica (required > 0 when the working set is not empty).
    working_set_bytes: bytes of the models used within the window (``from_models`` sums them).
    request_rps: the group's request rate, all replicas together.
    has_models: whether any model is registered for the group (False: scale to zero).
    models: how many models the working set holds (for logs and metrics only).
    """

    group: str
    replicas: int
    capacity_bytes: int
    working_set_bytes: int = 0
    request_rps: float = 0.0
    has_models: bool = True
    models: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.group, str):
            raise AutoscaleError(f"group must be a string, got {self.group!r}")
        _count(f"group {self.group!r} replicas", self.replicas)
        _count(f"group {self.group!r} capacity_bytes", self.capacity_bytes)
        _count(f"group {self.group!r} working_set_bytes", self.working_set_bytes)
        _count(f"group {self.group!r} models", self.models)
        _finite(f"group {self.group!r} request_rps", self.request_rps)

    @classmethod
    def from_models(cls, group: str, *, replicas: int, capacity_bytes: int, models: Iterable[ModelUse],
                    now: float, window_s: float, has_models: bool = True,
                    request_rps: float | None = None) -> Demand:
        """The demand of ``models``: the working set is the models used within ``window_s`` of
        ``now``; the request rate is ``request_rps`` when the caller measured it for the group as a
        whole, else the sum of the models' rates. A model listed twice (a copy per replica) counts
        once: its largest size, its latest use, its rates added."""
        merged: dict[str, tuple[int, float, float]] = {}
        for use in models:
            seen = merged.get(use.model_id)
            if seen is None:
                merged[use.model_id] = (use.size_bytes, use.last_used_s, use.rate_rps)
            else:
                merged[use.model_id] = (max(seen[0], use.size_bytes), max(seen[1], use.last_used_s),
                                        seen[2] + use.rate_rps)
        since = now - window_s
        recent = [size for size, last, _ in merged.values() if last >= since]
        rate = sum(r for _, _, r in merged.values()) if request_rps is None else request_rps
        return cls(group, replicas, capacity_bytes, working_set_bytes=sum(recent), request_rps=rate,
                   has_models=has_models, models=len(recent))


@dataclass(frozen=True, slots=True)
class Signal:
    """The decision for one group, with what it was computed from.

    desired: the replicas the group should have now (what the HPA follows).
    need: the replicas the demand needs before hysteresis (bounds applied).
    memory_replicas, load_replicas: each need alone, unclamped.
    bound: what sets the need: ``memory``, ``load``, ``idle`` (neither: the minimum applies) or
      ``no-models`` (nothing registered: 0).
    action: ``up`` (raised now), ``down`` (lowered one step, or to 0), ``hold`` (the need is lower
      but has not stayed lower for the hold yet), ``steady``.
    clamped: ``min`` or ``max`` when a bound changed the need, else "".
    """

    group: str
    desired: int
    current: int
    need: int
    memory_replicas: int
    load_replicas: int
    working_set_bytes: int
    request_rps: float
    capacity_bytes: int
    models: int
    bound: str
    action: str
    clamped: str = ""

    @property
    def reason(self) -> str:
        """One line for a log: why ``desired`` is what it is."""
        text = f"{self.bound}-bound" if self.bound in (MEMORY, LOAD) else self.bound
        if self.clamped:
            text += f", at its {self.clamped}imum"
        if self.action == HOLD:
            text += f", holding {self.desired} while the need is {self.need}"
        return text


class _GroupState:
    __slots__ = ("desired", "low_since")

    def __init__(self, desired: int) -> None:
        self.desired = desired
        self.low_since: float | None = None


class Autoscaler:
    """The hysteresis of every group: feed it each group's ``Demand`` now and then, act on ``desired``."""

    def __init__(self, config: AutoscaleConfig | None = None) -> None:
        self.config = config or AutoscaleConfig()
        self._groups: dict[str, _GroupState] = {}

    def needs(self, demand: Demand) -> tuple[int, int]:
        """(replicas the memory needs, replicas the load needs), unclamped."""
        cfg = self.config
        memory = 0
        if demand.working_set_bytes:
            if demand.capacity_bytes <= 0:
                raise AutoscaleError(f"group {demand.group!r}: a working set of {demand.working_set_bytes} "
                                     "bytes but no capacity per replica to size it against")
            memory = math.ceil(demand.working_set_bytes / (demand.capacity_bytes * cfg.target_fill))
        # A rate of exactly k replicas' worth needs k, not k + 1 for a rounding error.
        load = math.ceil(demand.request_rps / cfg.target_rps - 1e-9) if demand.request_rps else 0
        return memory, max(load, 0)

    def decide(self, demand: Demand, now: float) -> Signal:
        if not math.isfinite(now):
            raise AutoscaleError(f"now must be finite, got {now!r}")
        cfg = self.config
        lo, hi = self.config.bounds(demand.group)
        memory, load = self.needs(demand)
        raw = max(memory, load)
        bound = MEMORY if memory and memory >= load else LOAD if load else IDLE
        clamped = ""
        if not demand.has_models and cfg.scale_to_zero:
            need, bound = 0, NO_MODELS
        else:
            floor = max(lo, 1) if demand.has_models else lo
            need = min(max(raw, floor), hi)
            clamped = "min" if raw < floor and floor > 0 else "max" if raw > hi else ""
        state = self._groups.get(demand.group)
        if state is None:
            # No history: start from the replicas running now, so that a restarted router does not
            # scale a fleet down at once (only the bounds apply at once).
            state = self._groups[demand.group] = _GroupState(min(demand.replicas, hi))
        action = STEADY
        if state.desired > hi:  # a lowered max applies at once
            state.desired, state.low_since, action = hi, None, DOWN
        if need > state.desired:
            state.desired, state.low_since, action = need, None, UP
        elif need == state.desired:
            state.low_since = None
        elif action != DOWN:
            if state.low_since is None or now < state.low_since:
                state.low_since = now
            if now - state.low_since >= cfg.hold_s:
                state.desired = 0 if need == 0 else state.desired - 1
                state.low_since = now if state.desired > need else None
                action = DOWN
            else:
                action = HOLD
        return Signal(group=demand.group, desired=state.desired, current=demand.replicas, need=need,
                      memory_replicas=memory, load_replicas=load, working_set_bytes=demand.working_set_bytes,
                      request_rps=demand.request_rps, capacity_bytes=demand.capacity_bytes,
                      models=demand.models, bound=bound, action=action, clamped=clamped)

    def desired(self, group: str) -> int | None:
        """The last desired count of ``group`` (None before its first decision)."""
        state = self._groups.get(group)
        return None if state is None else state.desired

    def groups(self) -> list[str]:
        return sorted(self._groups)

    def forget(self, group: str) -> None:
        """Drop a group's history (its next decision starts from its replicas again)."""
        self._groups.pop(group, None)
