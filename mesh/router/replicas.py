"""Copies of hot models: the router applies ``placement.scaling``'s decisions.

Every forwarded request is observed (its model's rate EWMA and requests in flight); once a second
a root task asks the scaling policy about each model seen since, or held, and loads the copies it
wants on the next instances of the model's rendezvous order (``placement.kernel.copy_targets``, the
rule the simulator runs too), so that replicas, like homes, land where every router would put them.
A copy the scaling adds enters the runtime's eviction order ``hold_s`` in the future (ModelMesh
does the same with +20 s), so a burst of cold misses on that instance cannot evict it before it
takes its share of the traffic; when the model cools down, that advance runs out and the copy gives
way through the runtime's policy like any other. Nothing is unloaded explicitly.

Models registered with ``min_copies > 0`` are kept at that many loaded copies whether or not they
get traffic: every ``pin_check_s`` the scaler reads the registry's ``pinned/`` index and loads the
missing copies on the first instances of each such model's rendezvous order (every router picks
the same ones, and a runtime loads a model once however many routers ask). Runtimes never evict
such a model.

Each router sees only the traffic it forwards: with several routers, the threshold applies to each
router's share, so replicas come a little later than with one router (ModelMesh's pods have the
same property with their own rpm).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable

import structlog

from mesh.registry.records import ModelSpec, quarantine
from mesh.registry.specs import SpecCache
from mesh.router.management import RuntimeLoader
from mesh.router.routing import MAX_LOAD_FAILURES, Target, eligible
from mesh.router.view import ClusterView
from mesh.tasks import Background
from placement.kernel import copy_targets
from placement.scaling import ScalingConfig, ScalingPolicy

log = structlog.get_logger(__name__)


class CopyScaler:
    def __init__(self, *, view: ClusterView, specs: SpecCache, runtimes: RuntimeLoader,
                 config: ScalingConfig, load_timeout_s: float,
                 pinned: Callable[[], Awaitable[dict[str, int]]] | None = None, pin_check_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.view = view
        self.specs = specs
        self.runtimes = runtimes
        self.policy = ScalingPolicy(config)
        self.load_timeout_s = load_timeout_s
        self.clock = clock
        self.wall = wall
        self.inflight: defaultdict[str, int] = defaultdict(int)
        self._seen: set[str] = set()
        self._loading: set[tuple[str, str]] = set()
        self._tasks = Background("copy-scaler")
        self._pinned = pinned
        self.pin_check_s = pin_check_s
        self._next_pin_check = 0.0
        self.copies_added = 0
        self.copies_asked: defaultdict[str, int] = defaultdict(int)  # by reason: hot, min_copies

    # --- the hot path: two dict operations and an EWMA update per request ---------------------
    def begin(self, model_id: str) -> None:
        inflight = self.inflight[model_id] + 1
        self.inflight[model_id] = inflight
        self.policy.observe(model_id, self.clock(), inflight)
        self._seen.add(model_id)

    def end(self, model_id: str) -> None:
        inflight = self.inflight[model_id] - 1
        if inflight:
            self.inflight[model_id] = inflight
        else:
            del self.inflight[model_id]
        self.policy.set_inflight(model_id, inflight)

    # --- decisions ----------------------------------------------------------------------------
    def _copies(self, model_id: str) -> list[str]:
        return [i for i in self.view.copies(model_id) if self.view.live_instance(i) is not None]

    async def tick(self) -> None:
        now = self.clock()
        models, self._seen = self._seen | set(self.policy.held_models()), set()
        for model_id in models:
            holders = self._copies(model_id)
            if not holders:
                continue  # nothing loaded yet: the home's load comes first
            spec = await self.specs.get(model_id)  # cached; a loaded model may not have been looked up
            if spec is None:
                continue  # unregistered meanwhile
            candidates = [r.instance_id for r in eligible(self.view, spec)]
            limit = min(len(candidates), spec.max_copies) if spec.max_copies else len(candidates)
            decision = self.policy.decide(model_id, now, len(holders), limit=limit)
            if decision.release:
                # Nothing to do: the held copy's advance in the eviction order runs out by itself.
                log.info("releasing a copy to the cache policy", reason="cooled down", model_id=model_id,
                         rate_rps=round(self.policy.rate(model_id, now), 2), copies=len(holders))
            failures = self.view.failures.get(model_id, {})
            if decision.add <= 0 or quarantine(failures) is not None:
                continue
            per_copy = self.policy.rate(model_id, now) / len(holders)
            reason = "hot: rate" if per_copy > self.policy.config.rps_threshold else "hot: queue"
            busy = set(holders) | failures.keys()
            for instance_id in copy_targets(model_id, candidates, decision.add, busy=busy):
                if (model_id, instance_id) in self._loading:
                    continue
                self._add_copy(spec, instance_id, reason=reason)

    async def keep_min_copies(self) -> int:
        """Load the missing copies of every model registered with ``min_copies > 0``; how many
        loads were started."""
        if self._pinned is None:
            return 0
        started = 0
        for model_id, wanted in (await self._pinned()).items():
            holders = self._copies(model_id)
            pending = sum(1 for m, _ in self._loading if m == model_id)
            if len(holders) + pending >= wanted:
                continue
            failures = self.view.failures.get(model_id, {})
            if quarantine(failures) is not None:
                continue  # a runtime died loading it (mesh.registry.crashes): no copy is pinned
            spec = await self.specs.get(model_id)
            if spec is None:
                continue  # an index entry outliving its model (see mesh.registry.keys)
            candidates = [r.instance_id for r in eligible(self.view, spec)]
            if len(failures) >= min(MAX_LOAD_FAILURES, len(candidates)):
                continue  # it fails to load: the failure records say why, until they expire
            busy = set(holders) | {i for m, i in self._loading if m == model_id} | failures.keys()
            for instance_id in copy_targets(model_id, candidates, wanted - len(holders) - pending, busy=busy):
                self._add_copy(spec, instance_id, reason="min_copies")
                started += 1
        return started

    def _add_copy(self, spec: ModelSpec, instance_id: str, *, reason: str = "hot") -> None:
        record = self.view.live_instance(instance_id)
        if record is None:
            return
        model_id = spec.model_id
        hold_ms = int((self.wall() + self.policy.config.hold_s) * 1000)
        key = (model_id, instance_id)
        self._loading.add(key)
        self.copies_asked[reason] += 1
        log.info("adding a copy", reason=reason, model_id=model_id, instance_id=instance_id,
                 rate_rps=round(self.policy.rate(model_id, self.clock()), 2),
                 inflight=self.inflight.get(model_id, 0), copies=len(self._copies(model_id)))

        async def load() -> None:
            try:
                await self.runtimes.load(Target(instance_id, record.endpoint, True), spec, hold_ms,
                                         self.load_timeout_s)
                self.copies_added += 1
            except Exception as exc:
                log.warning("adding a copy failed", model_id=model_id, instance_id=instance_id,
                            error=str(exc))
            finally:
                self._loading.discard(key)

        self._tasks.spawn(load(), f"add-copy:{model_id}")

    async def run(self, interval_s: float = 1.0) -> None:
        """Root task: decide once per interval."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.tick()
                self.policy.prune(self.clock())  # the state of models gone cold: memory follows use
                if self.clock() >= self._next_pin_check:
                    self._next_pin_check = self.clock() + self.pin_check_s
                    await self.keep_min_copies()
            except Exception:
                log.exception("copy scaling round failed; continuing")
