"""The runtime-scaling signal, computed by the router and exported for an HPA or KEDA.

Every ``router.autoscale_interval_s`` a root task reads the router's ``ClusterView``, feeds each
runtime group's demand to ``placement.autoscale`` (the decisions and their hysteresis) and keeps the
result, which ``RouterMetrics.attach_autoscaling`` serves as ``mesh_runtime_replicas_desired`` and
its companions (docs in ``mesh.observability.metrics``). A replica count is never changed here: an
HPA or a KEDA ScaledObject reads the metric and scales the runtime StatefulSet (deploy/autoscaling).

Where each input comes from, and why:

- **Groups**: a runtime group is the instances that carry one ``rt:<name>`` label (the controller
  gives every pod of a ServingRuntime its label, and each model of it the same label); ``""`` for
  instances without one (deploy/base's single ``mesh-runtime`` StatefulSet). The metric's
  ``runtime`` label is the name.
- **Replicas and capacity**: the group's live instances (not shutting down), and the mean of their
  model capacity (every device's: RAM and GPUs both hold models). A group at 0 replicas keeps the
  capacity it had; one never seen has none, and its working set is empty anyway (no copies).
- **Working set**: the models used within the window on the group's instances, at the size the
  runtime measured (the placement's ``size_bytes``). A use is a copy loaded within it (loads come
  from requests, from copy scaling or a minimum, and every router sees them through the registry),
  or a request this router forwarded. The latter is read off copy scaling's rate average
  (``placement.scaling``: each request adds ``ln 2 / half_life`` to a value that otherwise only
  decays), with no second hook on the request path: a value that rose since the last pass by more
  than half of one request's decayed share saw a request. A model stays in the working set after
  its copy is evicted, until its last use leaves the window: a cache too small for what is in use
  evicts precisely the models that show it must grow. So the router keeps one entry per model used
  within the window (memory follows the models in use, as the view's does).
- **Load**: the larger of the runtimes' own request rates (``rate_rps`` in their instance records,
  every router's traffic, so every router exports the same figure) and this router's rates for the
  group's models.
- **Registered models** (scale to zero): the router does not hold registrations (there may be
  millions), so it learns them from the registration watch it already runs (``SpecCache``): a new
  registration marks its group as having models at once, so a group at zero comes back within one
  pass. Only a deletion (or a watch reset) can empty a group, and a deletion event does not say
  which group the model was in; then, at most every ``REGISTERED_CHECK_S``, the registrations are
  paged through until every group without copies that was believed to have models has been seen
  to have one, or the end is reached. So a whole pass over the registrations happens once when a
  group loses its last model, not after every deletion while some group stays empty. A group not
  yet checked counts as having models: ignorance never scales a group to zero.

With several routers each computes the signal: the load and the loads are the same for all, the
requests each sees are its share. The HPA's query takes the largest over the routers.

A pass that fails (the registry down during the check, an input the kernel refuses) is logged and
the last values stay exported; a group whose demand is refused keeps its last signal.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from mesh.errors import InvalidArgument
from mesh.registry.records import FAILED, ModelSpec
from mesh.router.view import ClusterView
from mesh.settings import RouterSettings
from placement.autoscale import AutoscaleConfig, AutoscaleError, Autoscaler, Demand, ModelUse, ReplicaBounds, Signal

log = structlog.get_logger(__name__)

GROUP_PREFIX = "rt:"
REGISTERED_CHECK_S = 60.0  # the least time between two pages-through of the registrations
CHECK_PAGE = 1000  # registrations read per registry call during that check
# A group with no registered model and no runtime, at 0 replicas this long, is forgotten (its
# series goes): groups come from registrations' labels, which clients write, so the set must not
# only grow. Long enough that an HPA or KEDA saw the 0 many times over.
FORGET_S = 3600.0


class Rates(Protocol):
    """Per-model request rates (``placement.scaling.ScalingPolicy``)."""

    def rate(self, model_id: str, now: float) -> float: ...


ListModels = Callable[..., Awaitable[list[ModelSpec]]]


def group_of(labels: Iterable[str]) -> str:
    """The runtime group named by the first ``rt:`` label, "" without one."""
    return next((label[len(GROUP_PREFIX):] for label in labels if label.startswith(GROUP_PREFIX)), "")


def config_from(rs: RouterSettings) -> AutoscaleConfig:
    """The kernel's config from the router's settings; a bad value is an InvalidArgument naming it."""
    groups: dict[str, ReplicaBounds] = {}
    for entry in rs.autoscale_groups:
        name, eq, bounds = entry.rpartition("=")
        low, colon, high = bounds.partition(":")
        try:
            if not (eq and colon):
                raise ValueError
            groups[name] = ReplicaBounds(int(low), int(high))
        except ValueError:
            raise InvalidArgument(f"setting router.autoscale_groups: {entry!r} is not 'name=min:max' "
                                  "(e.g. 'sklearn=1:4'; '=1:4' for runtimes without an rt: label)") from None
    try:
        return AutoscaleConfig(window_s=rs.autoscale_window_s, target_fill=rs.autoscale_target_fill,
                               target_rps=rs.autoscale_target_rps, hold_s=rs.autoscale_hold_s,
                               min_replicas=rs.autoscale_min_replicas, max_replicas=rs.autoscale_max_replicas,
                               groups=groups, scale_to_zero=rs.autoscale_scale_to_zero)
    except AutoscaleError as exc:
        raise InvalidArgument(f"settings router.autoscale_*: {exc}") from None


@dataclass
class _Group:
    replicas: int = 0
    capacity_bytes: int = 0
    runtime_rps: float = 0.0
    uses: list[ModelUse] = field(default_factory=list)


class RuntimeAutoscaler:
    def __init__(self, *, view: ClusterView, rates: Rates, half_life_s: float, list_models: ListModels,
                 config: AutoscaleConfig, interval_s: float, check_every_s: float = REGISTERED_CHECK_S,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.view = view
        self.rates = rates
        self.kernel = Autoscaler(config)
        self.interval_s = interval_s
        self.check_every_s = check_every_s
        self.clock = clock
        self.wall = wall
        self._list_models = list_models
        self._decay = math.log(2.0) / half_life_s  # the rate average's, per second
        self.signals: Mapping[str, Signal] = {}  # replaced whole each pass (the metrics read it)
        # Every group seen: instances, registrations, earlier passes. "" (runtimes without an rt:
        # label, deploy/base's) always: its series must exist, at 0, even before any runtime or model.
        self._known: set[str] = {""}
        self._capacity: dict[str, int] = {}  # last capacity per replica of each group
        self._registered: dict[str, bool] = {}  # group -> has a registered model, as last checked
        self._registered_since_check: set[str] = set()
        self._check_due = True  # a deletion since the last check
        self._reset_due = True  # a watch reset (or the start): any group may have changed either way
        self._next_check = -math.inf
        self._seen: dict[str, tuple[float, float]] = {}  # model -> (its rate, when read)
        self._used: dict[str, float] = {}  # model -> last request seen by this router (clock)
        self._recent: dict[tuple[str, str], ModelUse] = {}  # (group, model) used within the window
        self._empty_since: dict[str, float] = {}  # group -> since when it has no model, no runtime, 0 wanted

    # --- the registration watch (SpecCache.subscribe) -------------------------------------------
    def on_registration(self, model_id: str, spec: ModelSpec | None) -> None:
        if spec is None:
            self._check_due = True  # some group may have lost its last model
            return
        group = group_of(spec.labels)
        self._known.add(group)
        self._registered[group] = True
        self._registered_since_check.add(group)

    def on_reset(self) -> None:
        self._reset_due = True

    # --- one pass ---------------------------------------------------------------------------------
    def _requested_at(self, model_id: str, rate: float, now: float) -> float | None:
        """When this router last forwarded a request for the model (its clock), as far as seen."""
        before = self._seen.get(model_id)
        self._seen[model_id] = (rate, now)
        if rate > 0.0:
            if before is None:
                self._used[model_id] = now  # tracked since the last pass: used within ~2 minutes
            else:
                share = math.exp(-self._decay * max(now - before[1], 0.0))
                if rate - before[0] * share > 0.5 * self._decay * share:
                    self._used[model_id] = now
        return self._used.get(model_id)

    def _gather(self, now: float) -> dict[str, _Group]:
        view = self.view
        groups: dict[str, _Group] = {}
        group_of_instance: dict[str, str] = {}
        for instance_id, record in view.instances.items():
            group = group_of(record.labels)
            group_of_instance[instance_id] = group
            acc = groups.setdefault(group, _Group())
            if not record.shutting_down:
                acc.replicas += 1
                acc.capacity_bytes += sum(d.capacity_bytes for d in record.devices)
                acc.runtime_rps += record.rate_rps
        clock_to_wall = self.wall() - now
        refused: list[str] = []
        placed_now: set[tuple[str, str]] = set()
        for model_id, copies in view.placements.items():
            rate = self.rates.rate(model_id, now)
            requested = self._requested_at(model_id, rate, now)
            placed: dict[str, tuple[int, float, int]] = {}  # group -> (size, last load, copies)
            for instance_id, copy in copies.items():
                owner = group_of_instance.get(instance_id)
                if owner is None or copy.state == FAILED:
                    continue
                loaded = copy.loaded_ms / 1000.0 - clock_to_wall if copy.loaded_ms else -math.inf
                size, last, n = placed.get(owner, (copy.size_bytes, -math.inf, 0))
                placed[owner] = (max(size, copy.size_bytes), max(last, loaded), n + 1)
            total = sum(n for _, _, n in placed.values())
            for group, (size, loaded, n) in placed.items():
                key = (group, model_id)
                earlier = self._recent.get(key)
                last = max(loaded, -math.inf if requested is None else requested,
                           -math.inf if earlier is None else earlier.last_used_s)
                if not math.isfinite(last):
                    continue  # never used that this router knows of
                try:
                    self._recent[key] = ModelUse(model_id, size, last, rate * n / total)
                except AutoscaleError as exc:  # a placement record no runtime should write
                    refused.append(str(exc))
                    continue
                placed_now.add(key)
        if refused:
            log.warning("placements left out of the runtime scaling signal", count=len(refused), first=refused[0])
        # A model used within the window stays in its group's working set after its copy is evicted:
        # a cache too small for what is in use evicts exactly the models that say it needs to grow.
        since = now - self.kernel.config.window_s
        for key, use in list(self._recent.items()):
            if use.last_used_s < since:
                del self._recent[key]
            else:
                if key not in placed_now and use.rate_rps:
                    use = self._recent[key] = ModelUse(use.model_id, use.size_bytes, use.last_used_s, 0.0)
                groups.setdefault(key[0], _Group()).uses.append(use)
        tracked = view.placements.keys() | {model_id for _, model_id in self._recent}
        for gone in self._seen.keys() - tracked:
            del self._seen[gone]
            self._used.pop(gone, None)
        return groups

    def tick(self) -> Mapping[str, Signal]:
        """Decide for every known group; returns (and keeps) the signals."""
        now = self.clock()
        groups = self._gather(now)
        self._known.update(groups)
        in_use = {g for g, acc in groups.items() if acc.uses}
        signals = dict(self.signals)
        for group in sorted(self._known):
            acc = groups.get(group, _Group())
            if acc.replicas:
                self._capacity[group] = acc.capacity_bytes // acc.replicas
            has_models = group in in_use or self._registered.get(group, True)
            try:
                demand = Demand.from_models(
                    group, replicas=acc.replicas, capacity_bytes=self._capacity.get(group, 0), models=acc.uses,
                    now=now, window_s=self.kernel.config.window_s, has_models=has_models,
                    request_rps=max(acc.runtime_rps, sum(u.rate_rps for u in acc.uses)))
                signal = self.kernel.decide(demand, now)
            except AutoscaleError as exc:
                log.warning("runtime scaling signal not computed; keeping the last one", runtime=group,
                            error=str(exc))
                continue
            before = signals.get(group)
            if before is None or before.desired != signal.desired:
                log.info("runtime replicas desired", runtime=group, desired=signal.desired,
                         was=None if before is None else before.desired, current=signal.current,
                         reason=signal.reason, memory_replicas=signal.memory_replicas,
                         load_replicas=signal.load_replicas, working_set_bytes=signal.working_set_bytes,
                         request_rps=round(signal.request_rps, 2))
            signals[group] = signal
            if signal.desired or acc.replicas or has_models or not group:
                self._empty_since.pop(group, None)
            elif now - self._empty_since.setdefault(group, now) >= FORGET_S:
                self._forget(group, signals)
        self.signals = signals
        return signals

    def _forget(self, group: str, signals: dict[str, Signal]) -> None:
        log.info("runtime group forgotten: no model, no runtime", runtime=group, after_s=FORGET_S)
        for table in (self._capacity, self._registered, self._empty_since, signals):
            table.pop(group, None)
        self._known.discard(group)

    async def check_registered(self) -> None:
        """Which groups without copies still have a registered model (see the module docstring)."""
        now = self.clock()
        in_use = {group_of(self.view.instances[i].labels) for copies in self.view.placements.values()
                  for i in copies if i in self.view.instances}
        wanted = self._known - in_use
        if not self._reset_due:
            # A deletion cannot give an empty group a model (a registration says so itself): only
            # the groups believed to have some, or never checked, need looking for.
            wanted -= {g for g, has in self._registered.items() if not has}
        due = self._check_due or self._reset_due or bool(wanted - self._registered.keys())
        if not (wanted and due) or now < self._next_check:
            return  # (the flags stay: a group that stops being in use is looked for then)
        self._next_check = now + self.check_every_s
        reset, self._check_due, self._reset_due = self._reset_due, False, False
        self._registered_since_check.clear()
        found: set[str] = set()
        after = ""
        try:
            while wanted - found:
                page = await self._list_models(limit=CHECK_PAGE, start_after=after)
                await asyncio.sleep(0)  # a long check must not hold the loop from requests
                found.update(group_of(spec.labels) for spec in page)
                if len(page) < CHECK_PAGE:
                    break
                after = page[-1].model_id
        except BaseException:
            self._check_due, self._reset_due = True, reset
            raise
        self._known.update(found)
        for group in wanted | found:
            self._registered[group] = group in found or group in self._registered_since_check

    async def run(self) -> None:
        """Root task: a pass every ``interval_s``; a failed pass is logged, the last values stay."""
        while True:
            try:
                self.tick()
                await self.check_registered()  # its answer is used by the next pass
            except Exception:
                log.exception("runtime scaling pass failed; keeping the last values")
            await asyncio.sleep(self.interval_s)


__all__ = ["RuntimeAutoscaler", "config_from", "group_of"]
