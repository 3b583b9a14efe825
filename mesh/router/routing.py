"""Where a request goes: a loaded copy, a loading copy, or the model's home.

1. Loaded copies on live instances: the one with the fewest requests in flight from this router
   (with more than four copies, the better of two random ones: "power of two choices", which
   keeps the choice O(1) and avoids herding on one copy).
2. Else a copy still loading: the request joins that load rather than starting another.
3. Else the model's home: rendezvous hashing of the model ID over the eligible instances, with
   bounded load (``placement.hashing.choose_home``). Every router with the same view picks the
   same home, with no coordination, so concurrent first requests arriving at different routers
   still cause one load.

Each decision is ``placement.kernel``'s (copy choice, home choice), the code the simulator runs
too; this module adapts the router's view (placement and instance records, in-flight counts) to
the kernel's inputs and turns its answer into a ``Target``.

Instances marked unreachable (``mesh.router.reachability``) are skipped while any other instance
can serve; a loaded copy on an instance that is shutting down serves only while no other loaded
copy exists (its re-homing).

Eligible means: not shutting down, supports the model's type, carries every label the model
requires (a model with ``gpu: required`` needs an instance that loads its type on a GPU), fits the
model at all (on the device it would use), and has no unexpired load-failure record for it. A model
with ``gpu: preferred`` is homed among the eligible instances with such a GPU when there are any. A model that
failed on ``max_load_failures`` instances fails fast with the recorded reason; so does a model
quarantined because a runtime died loading it (``mesh.registry.crashes``), on the first death.
"""

from __future__ import annotations

import random
from collections.abc import Container
from dataclasses import dataclass

from mesh.errors import FailedPrecondition, ResourceExhausted, Unavailable
from mesh.model_libraries import install_hint
from mesh.registry.records import (
    GPU_REQUIRED,
    LOADED,
    LOADING,
    InstanceRecord,
    ModelSpec,
    PlacementRecord,
    gpu_tier,
    quarantine,
)
from mesh.router.view import ClusterView
from placement.kernel import COPY_LEAVING, COPY_LOADED, COPY_LOADING, Candidate, choose_copy, choose_home

MAX_LOAD_FAILURES = 3


@dataclass(frozen=True, slots=True)
class Target:
    instance_id: str
    endpoint: str
    allow_load: bool  # False: the copy is believed loaded; a miss there answers "not here"


def _copy_state(placement: PlacementRecord, record: InstanceRecord) -> int | None:
    """A copy's rank for ``placement.kernel.choose_copy`` (module docstring, steps 1 and 2)."""
    if placement.state == LOADED:
        return COPY_LEAVING if record.shutting_down else COPY_LOADED
    if placement.state == LOADING and not record.shutting_down:
        return COPY_LOADING
    return None


def pick_copy(view: ClusterView, model_id: str, exclude: Container[str],
              rng: random.Random) -> Target | None:
    """Steps 1 and 2: a loaded copy, else a loading one; None when there is neither (the rule is
    ``placement.kernel.choose_copy``'s, shared with the simulator)."""
    copies = view.placements.get(model_id)
    if not copies:
        return None
    instances = view.instances
    chosen = choose_copy(copies, instances, _copy_state, view.inflight, rng,
                         exclude=exclude, unreachable=view.unreachable)
    if chosen is None:
        return None
    instance_id, state = chosen
    return Target(instance_id, instances[instance_id].endpoint, allow_load=state == COPY_LOADING)


def eligible(view: ClusterView, spec: ModelSpec) -> list[InstanceRecord]:
    found = [r for r in view.instances.values() if not r.shutting_down and r.accepts_loads and r.can_serve(spec)]
    if view.unreachable:
        reachable = [r for r in found if r.instance_id not in view.unreachable]
        if reachable:  # never exclude every instance: a blip of the network is not a dead fleet
            return reachable
    return found


def pick_home(view: ClusterView, spec: ModelSpec, exclude: Container[str], *,
              load_factor: float) -> Target:
    """Step 3, with a precise error when no instance can take the model."""
    if not view.instances:
        raise Unavailable("no runtime instances are registered; start one (mesh serve runtime)")
    crash = quarantine(view.failures.get(spec.model_id, {}))
    if crash is not None:  # a runtime died loading it: no other is tried (mesh.registry.crashes)
        raise FailedPrecondition(f"model {spec.model_id!r} is quarantined: {crash.reason}")
    instances = eligible(view, spec)
    if not instances:
        able = [r for r in view.instances.values() if r.can_serve(spec)]
        if able:  # they exist, but none takes a load now: a capacity problem, retryable
            why = ("are shutting down" if all(r.shutting_down for r in able)
                   else "take no loads now (stuck loads or shutting down)")
            raise Unavailable(f"no instance can load model {spec.model_id!r} now: the {len(able)} "
                              f"that could serve type {spec.type!r} {why}")
        if spec.gpu_mode == GPU_REQUIRED:
            raise FailedPrecondition(f"no instance can serve model {spec.model_id!r}: it requires a GPU, "
                                     f"and no instance can load type {spec.type!r} on a GPU")
        labels = f" and labels {sorted(spec.labels)}" if spec.labels else ""
        hint = install_hint(spec.type) if not any(spec.type.lower() in r.supported_types
                                                  for r in view.instances.values()) else ""
        raise FailedPrecondition(
            f"no instance can serve model {spec.model_id!r}: none supports type {spec.type!r}{labels}"
            + (f" ({hint})" if hint else ""))
    failures = view.failures.get(spec.model_id, {})
    if len(failures) >= min(MAX_LOAD_FAILURES, len(instances)):
        reason = next(iter(failures.values())).reason
        raise FailedPrecondition(f"model {spec.model_id!r} failed to load on {len(failures)} "
                                 f"instance(s): {reason} (failures are remembered for registry.failure_ttl_s; "
                                 f"once fixed, `mesh model load {spec.model_id} --retry` tries again now)")
    candidates = [
        Candidate(node=r.instance_id, capacity_bytes=r.capacity_for(spec),
                  load=float(r.loading_count + view.inflight[r.instance_id]))
        for r in instances if r.instance_id not in failures
    ]
    home = choose_home(spec.model_id, candidates, spec.size_hint_bytes, load_factor=load_factor,
                       exclude=exclude, prefer=gpu_tier(spec, instances))
    if home is None:
        if all(c.node in exclude for c in candidates):
            raise Unavailable(f"model {spec.model_id!r}: every eligible instance was tried and "
                              "none could serve it")
        largest = max((c.capacity_bytes for c in candidates), default=0)
        raise ResourceExhausted(f"model {spec.model_id!r} ({spec.size_hint_bytes} bytes) fits on no "
                                f"instance: the largest capacity is {largest} bytes")
    return Target(home, view.instances[home].endpoint, allow_load=True)
