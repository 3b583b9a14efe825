"""Copy scaling: when a model gets another copy, and when an extra copy gives way again.

A model normally has at most one loaded copy, on its home (``placement.hashing``); a hot one gets more,
on the next instances of its HRW order (``copy_order``), so that replicas are as stable as homes. This
module only decides *how many* copies a model should have; the caller (the router, or the simulator)
picks where and loads them. It is a pure class: time is passed in as ``now`` (seconds), there is no
clock and no I/O, and two instances fed the same observations make the same decisions.

Signals, per model:

- *Request rate*: an exponentially weighted moving average over time with a half-life
  (``half_life_s``). Each request adds ``ln 2 / half_life_s`` to a value that decays by half every
  ``half_life_s``, so a steady stream of R requests/s reads R (and a model that stops receiving
  requests fades to 0 with no further input). A window counter would need one bucket per interval per
  model; the EWMA is two floats per model and O(1) per request.
- *Queueing*: the requests in flight for the model (waiting for a load or being served, all copies
  together), as last observed. It is not smoothed: a queue already integrates arrivals minus services,
  and it is the signal that reacts to a burst before the rate average does.

Rules (defaults in ``ScalingConfig``):

- **Add** when ``rate / copies > rps_threshold`` or ``inflight / copies > queue_threshold``: as many
  copies as bring the rate per copy under the threshold (at least one, at most ``max_step`` at once),
  up to the model's ``max_copies`` and, over all models, ``max_extra_copies`` copies beyond the first.
  After an add, the model waits ``cooldown_s`` before the next one, so that the new copy is loaded and
  takes its share before the signals are read again (ModelMesh skips scaling "if a copy loaded
  recently" for the same reason).
- **Hold**: copies the scaling asked for are *protected*: the cache policy must not propose them for
  eviction while the model is hot. Otherwise a burst of cold misses on the same instance could evict
  the copy that the hot model's traffic needs, and the copy would be re-added seconds later.
- **Give way**: when the rate would stay comfortably under the threshold with one copy fewer
  (``rate / (held - 1) < release_fraction * rps_threshold``, and the same for the queue) for
  ``hold_s`` without interruption, one extra copy is *released*: it stops being protected and falls
  back to the cache policy, which evicts it when its memory is worth more to another model (and keeps
  it while it is still used). One copy per ``hold_s``, so a model winds down step by step. The
  release threshold is below the add threshold (hysteresis): just after a release the rate per copy is
  at most ``release_fraction`` of the add threshold, so the release cannot trigger an add at once.
- **Pinned** models (``ModelRule.pinned``) are always protected, every copy. ``min_copies`` copies
  of a model are always wanted and protected: ``decide`` asks for them even without traffic.

Reference point: ModelMesh adds copies when a copy serves more than ``MM_SCALEUP_RPM_THRESHOLD`` =
2000 requests per minute (33.3 requests/s), adds ``rpm / threshold`` at once, caps a scale-up at a third
of the pods, and removes an extra copy only when the cluster is nearly full and the rate is under two
thirds of the threshold for a long time (modelmesh-core notes, section 2). It has no per-model minimum
or maximum and no pinning, the users' most frequent request. We keep its threshold as the default,
make the scale-down a hold-time rule that does not depend on fullness (a released copy is not
unloaded, it only becomes evictable, so releasing early costs nothing while the cache has room), and
add the per-model rules.

Simplifications: protection is per model (``protected``), with ``kept(model)`` telling how many
copies it covers; the caller decides which copies those are (the first in copy order). Decisions do
not know the instances: the caller caps additions at the instances that can take a copy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["Decision", "ModelRule", "ScalingConfig", "ScalingPolicy"]

# ModelMesh's MM_SCALEUP_RPM_THRESHOLD, per second.
MODELMESH_RPS_THRESHOLD = 2000.0 / 60.0


@dataclass(frozen=True, slots=True)
class ModelRule:
    """Per-model overrides.

    min_copies: copies always wanted and protected (0: the model may have none, the default).
    max_copies: the most copies this model may have (``None``: the config's ``max_copies``).
    pinned: every copy of the model is protected from eviction, whatever its traffic.
    """

    min_copies: int = 0
    max_copies: int | None = None
    pinned: bool = False

    def __post_init__(self) -> None:
        if self.min_copies < 0:
            raise ValueError(f"min_copies must be >= 0, got {self.min_copies}")
        if self.max_copies is not None and self.max_copies < max(1, self.min_copies):
            raise ValueError(f"max_copies ({self.max_copies}) must be >= max(1, min_copies)")


@dataclass(frozen=True, slots=True)
class ScalingConfig:
    """Thresholds of copy scaling. Rates are requests per second over trace or wall time.

    half_life_s: half-life of the rate EWMA. 30 s: a rate that doubles is seen within a minute, one
      burst of a second barely moves it; ModelMesh measures rpm over about a minute too.
    rps_threshold: requests/s per copy above which a copy is added. ModelMesh's 2000 rpm.
    queue_threshold: requests in flight per copy above which a copy is added: four requests
      queued behind each copy means the copies do not keep up, whatever the rate says (slow models).
    release_fraction: a copy is released when, without it, rate and queue per copy would stay
      under this fraction of their thresholds. 2/3 like ModelMesh's scale-down rule.
    hold_s: how long the rate must stay low before one extra copy is released. 120 s: long enough
      to ride out a lull between bursts, short enough that an idle model's memory returns to the
      cache within minutes (a release only makes the copy evictable).
    cooldown_s: after an add, no further add for this long: the new copy needs to load before it
      takes traffic. 10 s, ModelMesh's rate-tracking period.
    max_copies: the default most copies per model (one per instance at most, the caller enforces
      that). 8: beyond that a model is better served by a dedicated deployment.
    max_step: the most copies added at once; ModelMesh adds rpm/threshold at once but caps big steps.
    max_extra_copies: the most copies beyond the first over all models (``None``: no global cap), so
      that a flood of hot models cannot turn the whole cache into replicas.
    models: per-model rules (pinning, minimum and maximum copies) by model ID.
    """

    half_life_s: float = 30.0
    rps_threshold: float = MODELMESH_RPS_THRESHOLD
    queue_threshold: float = 4.0
    release_fraction: float = 2.0 / 3.0
    hold_s: float = 120.0
    cooldown_s: float = 10.0
    max_copies: int = 8
    max_step: int = 2
    max_extra_copies: int | None = None
    models: Mapping[str, ModelRule] = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive = {"half_life_s": self.half_life_s, "rps_threshold": self.rps_threshold,
                    "queue_threshold": self.queue_threshold}
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not 0.0 < self.release_fraction < 1.0:
            raise ValueError(f"release_fraction must be in (0, 1), got {self.release_fraction!r}")
        if not (self.hold_s >= 0 and self.cooldown_s >= 0):
            raise ValueError("hold_s and cooldown_s must be >= 0")
        if self.max_copies < 1 or self.max_step < 1:
            raise ValueError("max_copies and max_step must be >= 1")
        if self.max_extra_copies is not None and self.max_extra_copies < 0:
            raise ValueError(f"max_extra_copies must be >= 0, got {self.max_extra_copies}")


class Decision(NamedTuple):
    """What to do with a model's copies: ``add`` copies to load, ``release`` copies to unprotect."""

    add: int = 0
    release: int = 0


NO_CHANGE = Decision(0, 0)


class _ModelState:
    __slots__ = ("inflight", "last_add", "low_since", "rate", "rate_at", "target")

    def __init__(self) -> None:
        self.rate = 0.0  # EWMA of requests/s, as of ``rate_at``
        self.rate_at = -math.inf
        self.inflight = 0  # last observed requests in flight, all copies together
        self.target = 0  # copies the scaling holds (0: none asked for beyond the cache's own)
        self.last_add = -math.inf
        self.low_since: float | None = None


class ScalingPolicy:
    """Per-model rate tracking and the add / release decisions of ``ScalingConfig``.

    Feed it every request with ``observe``; ask ``decide`` after an observation (and periodically
    for ``held_models``, whose rate may have dropped to nothing); act on the ``Decision``; consult
    ``protected`` / ``kept`` when choosing eviction victims.
    """

    __slots__ = ("_config", "_decay", "_held_extra", "_increment", "_protected", "_states")

    def __init__(self, config: ScalingConfig | None = None) -> None:
        self._config = config or ScalingConfig()
        self._decay = math.log(2.0) / self._config.half_life_s  # per second
        self._increment = self._decay  # ln2 / half-life: a steady rate R reads R
        self._states: dict[str, _ModelState] = {}
        self._held_extra = 0  # sum over models of (target - 1) for target > 1: the global cap's count
        self._protected: set[str] = {m for m, r in self._config.models.items() if r.pinned or r.min_copies}

    @property
    def config(self) -> ScalingConfig:
        return self._config

    # -- signals ------------------------------------------------------------------------------

    def observe(self, model_id: str, now: float, inflight: int) -> None:
        """One request for ``model_id`` at ``now``; ``inflight`` requests for it are in flight (all copies,
        this one included). Times must not go backwards per model (an earlier ``now`` counts as ``now``
        equal to the last one)."""
        state = self._states.get(model_id)
        if state is None:
            state = self._states[model_id] = _ModelState()
        if now > state.rate_at:
            if state.rate:
                state.rate *= math.exp(-self._decay * (now - state.rate_at))
            state.rate_at = now
        state.rate += self._increment
        state.inflight = inflight

    def set_inflight(self, model_id: str, inflight: int) -> None:
        """Update the queueing signal without counting a request (a request finished)."""
        state = self._states.get(model_id)
        if state is not None:
            state.inflight = inflight

    def rate(self, model_id: str, now: float) -> float:
        """The model's request rate (requests/s) as of ``now``; 0 for a model never observed."""
        state = self._states.get(model_id)
        if state is None or not state.rate:
            return 0.0
        if now <= state.rate_at:
            return state.rate
        return state.rate * math.exp(-self._decay * (now - state.rate_at))

    def observed_at(self, model_id: str) -> float | None:
        """When ``model_id``'s last request was observed (the ``now`` it was given), None if never
        or pruned since (``mesh status`` shows it as the model's last request through the router)."""
        state = self._states.get(model_id)
        return None if state is None or state.rate_at == -math.inf else state.rate_at

    # -- decisions ----------------------------------------------------------------------------

    def rule(self, model_id: str) -> ModelRule:
        return self._config.models.get(model_id, _DEFAULT_RULE)

    def decide(self, model_id: str, now: float, copies: int, *, limit: int | None = None) -> Decision:
        """How many copies of ``model_id`` to add or release, given that it has ``copies`` now.

        ``copies`` counts loaded and loading copies; ``limit`` is the most the caller could have (the
        instances that can take the model), ``None`` for no limit beyond the configured ones. The
        policy remembers what it asked for (the copies it holds and protects) and assumes the caller
        acts on the decision. A caller that could not place an added copy reports fewer ``copies``
        next time: once the cooldown has passed, the held count falls back to the copies that exist,
        and the add is asked for again if the model is still hot.
        """
        cfg = self._config
        rule = self.rule(model_id)
        state = self._states.get(model_id)
        if state is None:
            state = self._states[model_id] = _ModelState()
        most = rule.max_copies if rule.max_copies is not None else max(cfg.max_copies, rule.min_copies)
        if limit is not None:
            most = min(most, limit)
        if state.target > copies and now - state.last_add >= cfg.cooldown_s:
            self._set_target(model_id, state, copies)
        rate = self.rate(model_id, now)

        want = max(copies, rule.min_copies)
        hot = copies > 0 and (rate / copies > cfg.rps_threshold or state.inflight / copies > cfg.queue_threshold)
        if hot and now - state.last_add >= cfg.cooldown_s:
            by_rate = math.ceil(rate / cfg.rps_threshold)
            want = max(want, min(copies + cfg.max_step, max(copies + 1, by_rate)))
        want = min(want, most)
        if want > copies:
            # The global cap limits what scaling adds, never a model's configured minimum.
            want = max(self._room_for(state.target, want), min(rule.min_copies, most))
            if want > copies:
                self._set_target(model_id, state, want)
                state.last_add = now
                state.low_since = None
                return Decision(add=want - copies)

        floor = max(1, rule.min_copies)
        if state.target <= floor:
            state.low_since = None
            return NO_CHANGE
        if hot:
            state.low_since = None
            return NO_CHANGE
        fewer = state.target - 1
        low = (rate / fewer < cfg.release_fraction * cfg.rps_threshold
               and state.inflight / fewer < cfg.release_fraction * cfg.queue_threshold)
        if not low:
            state.low_since = None
            return NO_CHANGE
        if state.low_since is None:
            state.low_since = now
            if cfg.hold_s > 0:
                return NO_CHANGE
        if now - state.low_since < cfg.hold_s:
            return NO_CHANGE
        self._set_target(model_id, state, fewer)
        state.low_since = now  # the next release waits another full hold
        return Decision(release=1)

    def _room_for(self, target: int, want: int) -> int:
        """``want`` lowered so that the global cap on extra copies holds."""
        cap = self._config.max_extra_copies
        if cap is None:
            return want
        others = self._held_extra - max(target - 1, 0)
        return min(want, cap - others + 1)

    def _set_target(self, model_id: str, state: _ModelState, target: int) -> None:
        self._held_extra += max(target - 1, 0) - max(state.target - 1, 0)
        state.target = target
        rule = self.rule(model_id)
        if target > 1 or rule.pinned or rule.min_copies:
            self._protected.add(model_id)
        else:
            self._protected.discard(model_id)

    # -- what the cache must keep -------------------------------------------------------------

    def protected(self) -> Set[str]:
        """Models with copies the cache policy must not evict: pinned ones, ones with a minimum, and
        ones holding extra copies. A live view: do not modify it."""
        return self._protected

    def kept(self, model_id: str) -> int | None:
        """How many copies of ``model_id`` are protected: ``None`` for all of them (pinned), else a
        count (0 when the model is not protected)."""
        rule = self.rule(model_id)
        if rule.pinned:
            return None
        state = self._states.get(model_id)
        target = state.target if state is not None else 0
        return max(target if target > 1 else 0, rule.min_copies)

    def held_models(self) -> list[str]:
        """Models holding extra copies, sorted: the ones to ``decide`` on periodically, because a
        model that stops receiving requests is never observed again but must still give way."""
        return sorted(m for m, s in self._states.items() if s.target > max(1, self.rule(m).min_copies))

    def held_extra(self) -> int:
        """Copies beyond the first held over all models (what ``max_extra_copies`` caps)."""
        return self._held_extra

    def prune(self, now: float, *, below_rps: float = 0.001) -> int:
        """Drop the state of models that hold nothing and whose rate has faded under ``below_rps``
        (default: under one request in about 17 minutes); returns how many. A long-running router
        calls it now and then, so that its memory follows the models in use, not every model ever
        requested. A pruned model starts from a rate of 0 on its next request, which is what its
        faded rate nearly was."""
        gone = [m for m, st in self._states.items()
                if st.target <= 1 and self.rate(m, now) < below_rps and now - st.last_add >= self._config.cooldown_s]
        for m in gone:
            del self._states[m]
        return len(gone)

    def tracked(self) -> int:
        """How many models have state (see ``prune``)."""
        return len(self._states)

    def forget(self, model_id: str) -> None:
        """Drop the model's state (unregistered). Its pin or minimum, from the config, stays."""
        state = self._states.pop(model_id, None)
        if state is not None:
            self._held_extra -= max(state.target - 1, 0)
        rule = self.rule(model_id)
        if not (rule.pinned or rule.min_copies):
            self._protected.discard(model_id)


_DEFAULT_RULE = ModelRule()
