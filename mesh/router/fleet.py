"""The fleet at a glance, from what a router already knows (``mesh status``, ``mesh top``).

Everything here is read from the router's ``ClusterView`` (instances with their capacity and use
per device, placements, failure records, this router's requests in flight) and from the copy
scaling's per-model rate: no registry read, except ``model_copies``, which reads a model's
failure records once to tell a record that expires from one that does not (the view keeps the
record, not its lease). No new server and no new write: runtimes already publish their counters
in their instance records at the publishing rate they always had.

Rates over the last minute come from ``FleetWindow``: every few seconds it copies each instance's
cumulative counters (requests, hits, misses, loads, load failures, evictions) out of the view, and
keeps the readings of the last minute. The increase over the window is the newest record's
counters minus the oldest reading's, per instance; an instance that restarted since (another
``started_ms``) or appeared counts from 0, and one that left takes its figures with it. A router
that has run less than a minute reports the shorter window it has (``window_s``). The trade-off:
a reading every ``sample_s`` costs a pass over the instances (tens to hundreds of records, not the
models); instances publish at most every ``runtime.publish_interval_s``, so figures lag by that.

Hot models are ranked by the copy scaling's rate average (30 s half-life) of this router's own
requests, rather than by exact counts: it is kept already, per request, and a per-model counter
on the hot path would cost every request for a view an operator opens now and then. With several
routers each one ranks its own share of the traffic.

Tokens limited to model-ID prefixes (``mesh.auth``) see the instances and their capacity (shared
infrastructure) but only their own models, copies and failure records, and no traffic counters:
those mix every tenant's requests (``scoped``).
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace

import structlog

from mesh.auth import Principal
from mesh.registry.records import CRASH, LOADED, LOADING, FailureRecord, InstanceRecord
from mesh.router.view import ClusterView

log = structlog.get_logger(__name__)
SCOPED_BYTES = 1 << 20  # memory use shown to a caller scoped to some tenants' prefixes: whole MiB
CACHE_S = 1.0  # a fleet report is built at most once a second per scope and shape (Fleet.report)
MAX_CACHED = 256

DEFAULT_TOP = 10
MAX_TOP = 100
DEFAULT_FAILURES = 20
MAX_FAILURES = 200


@dataclass(frozen=True, slots=True)
class Counters:
    """Cumulative counters of one instance (or a sum); each equals a runtime metric."""

    requests: int = 0
    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_failures: int = 0
    evictions: int = 0

    @classmethod
    def of(cls, record: InstanceRecord) -> Counters:
        return cls(record.requests, record.hits, record.misses, record.loads, record.load_failures,
                   record.evictions)

    def __add__(self, other: Counters) -> Counters:
        return Counters(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def since(self, older: Counters) -> Counters:
        """The increase from ``older``; a counter that went down was reset: counted from 0."""
        pairs = ((getattr(self, f.name), getattr(older, f.name)) for f in fields(self))
        return Counters(*(now - then if now >= then else now for now, then in pairs))


ZERO = Counters()

# instance ID -> (started_ms, counters) at one reading
Reading = dict[str, tuple[int, Counters]]


class FleetWindow:
    """Readings of every instance's counters, every ``sample_s``, for the last ``window_s``."""

    def __init__(self, instances: Callable[[], Iterable[InstanceRecord]], *, window_s: float = 60.0,
                 sample_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._instances = instances
        self.window_s = window_s
        self.sample_s = sample_s
        self._clock = clock
        self._readings: deque[tuple[float, Reading]] = deque()

    def sample(self) -> None:
        now = self._clock()
        self._readings.append((now, {r.instance_id: (r.started_ms, Counters.of(r)) for r in self._instances()}))
        # Keep the newest reading at least window_s old (the window's start), drop older ones.
        while len(self._readings) > 1 and now - self._readings[1][0] >= self.window_s:
            self._readings.popleft()

    def increase(self) -> tuple[float, Counters]:
        """(seconds covered, the counters' increase over them) up to the instances' records now."""
        now = self._clock()
        if not self._readings:
            return 0.0, ZERO
        then, old = self._readings[0]
        total = ZERO
        for record in self._instances():
            before = old.get(record.instance_id)
            current = Counters.of(record)
            if before is None or before[0] != record.started_ms:
                # Joined (or restarted) since the window's start: what it counted, it counted since.
                # (The first reading is taken once the view is loaded, so a router that just started
                # does not count a long-running instance's history as the last minute's.)
                total += current
            else:
                total += current.since(before[1])
        return now - then, total

    async def run(self) -> None:
        """Root task: a reading every ``sample_s``. A failed reading is logged and skipped: the
        status is an operator's view, never a reason to stop a router."""
        while True:
            try:
                self.sample()
            except Exception:
                log.exception("fleet status reading failed; the next one is in a few seconds")
            await asyncio.sleep(self.sample_s)


@dataclass(frozen=True)
class DeviceView:
    device: str
    capacity_bytes: int
    used_bytes: int
    copies: int


@dataclass(frozen=True)
class InstanceView:
    record: InstanceRecord
    state: str
    devices: list[DeviceView]
    loaded: int
    loading: int
    inflight: int
    counters: Counters


@dataclass(frozen=True)
class HotModel:
    model_id: str
    rate_rps: float
    copies: int
    inflight: int


@dataclass(frozen=True)
class FailureView:
    record: FailureRecord
    expires_ms: int  # 0: never


@dataclass(frozen=True)
class RouterView:
    version: str
    started_ms: int
    not_ready: str | None
    registry_connected: bool
    inflight: int


@dataclass
class FleetReport:
    router: RouterView
    instances: list[InstanceView] = field(default_factory=list)
    models_loaded: int = 0
    copies_loaded: int = 0
    copies_loading: int = 0
    models_failing: int = 0
    total: Counters = ZERO
    window: Counters = ZERO
    window_s: float = 0.0
    hottest: list[HotModel] = field(default_factory=list)
    failures: list[FailureView] = field(default_factory=list)
    time_ms: int = 0
    scoped: bool = False


@dataclass(frozen=True)
class CopyView:
    instance_id: str
    endpoint: str
    state: str
    device: str
    size_bytes: int
    state_ms: int
    last_used_ms: int
    load_ms: float


def expires_ms(record: FailureRecord, *, leased: bool, failure_ttl_s: float, crash_quarantine_s: float) -> int:
    """When a failure record's lease runs out (0: it has none), from the TTL its writer used: the
    runtime's ``registry.failure_ttl_s`` for a failed load, ``crash_quarantine_s`` for a crash."""
    if not leased:
        return 0
    ttl = crash_quarantine_s if record.kind == CRASH else failure_ttl_s
    return record.time_ms + int(ttl * 1000)


class Fleet:
    """Builds ``FleetReport``s from a router's view (module docstring)."""

    def __init__(self, *, view: ClusterView, window: FleetWindow, rate: Callable[[str, float], float],
                 model_inflight: Callable[[str], int], router: Callable[[], RouterView],
                 last_request: Callable[[str], float | None] = lambda _: None,
                 failure_ttl_s: float, crash_quarantine_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.view = view
        self.window = window
        self._rate = rate
        self._model_inflight = model_inflight
        self._last_request = last_request  # on ``clock``'s time line
        self._router = router
        self.failure_ttl_s = failure_ttl_s
        self.crash_quarantine_s = crash_quarantine_s
        self._clock = clock
        # Reports built in the last CACHE_S, by what they depend on: a report walks every copy and
        # failure (144 ms at 100,000 models x 2 copies), on the event loop that serves inference, so
        # a read token calling in a loop gets the same report again instead of stalling the router.
        self._cache: dict[tuple[tuple[str, ...] | None, int, int], tuple[float, FleetReport]] = {}

    def _expires(self, record: FailureRecord, leased: bool = True) -> int:
        return expires_ms(record, leased=leased, failure_ttl_s=self.failure_ttl_s,
                          crash_quarantine_s=self.crash_quarantine_s)

    def report(self, principal: Principal | None, *, top: int = 0, max_failures: int = 0) -> FleetReport:
        top = min(top or DEFAULT_TOP, MAX_TOP)
        max_failures = min(max_failures or DEFAULT_FAILURES, MAX_FAILURES)
        key = (principal.prefixes if principal is not None and principal.prefixes else None, top, max_failures)
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < CACHE_S:
            return cached[1]
        built = self._build(principal, top=top, max_failures=max_failures)
        if len(self._cache) >= MAX_CACHED:  # one per scope and shape: a few; bounded all the same
            self._cache.clear()
        self._cache[key] = (now, built)
        return built

    def _build(self, principal: Principal | None, *, top: int, max_failures: int) -> FleetReport:
        view = self.view
        scoped = principal is not None and bool(principal.prefixes)

        def visible(model_id: str) -> bool:
            return principal is None or principal.allows(model_id)

        copies_by: dict[tuple[str, str], int] = {}  # (instance, device) -> loaded copies
        loaded_on: dict[str, int] = {}
        loading_on: dict[str, int] = {}
        router = self._router()
        if scoped:  # the router's requests in flight are every tenant's
            router = replace(router, inflight=0)
        report = FleetReport(router=router, scoped=scoped, time_ms=int(time.time() * 1000))
        loaded_models: dict[str, int] = {}
        for model_id, copies in view.placements.items():
            if not visible(model_id):
                continue
            n = 0
            for instance_id, p in copies.items():
                if p.state == LOADED:
                    n += 1
                    copies_by[(instance_id, p.device)] = copies_by.get((instance_id, p.device), 0) + 1
                    loaded_on[instance_id] = loaded_on.get(instance_id, 0) + 1
                elif p.state == LOADING:
                    report.copies_loading += 1
                    loading_on[instance_id] = loading_on.get(instance_id, 0) + 1
            if n:
                loaded_models[model_id] = n
                report.copies_loaded += n
        report.models_loaded = len(loaded_models)

        for record in sorted(view.instances.values(), key=lambda r: r.instance_id):
            state = ("shutting_down" if record.shutting_down else
                     "unreachable" if not view.reachable(record.instance_id) else
                     "not_loading" if not record.accepts_loads else "ready")
            # A scoped caller sees memory use to the MiB only, and no requests in flight: exact
            # figures would show when other tenants load models, how large they are, and their traffic.
            devices = [DeviceView(d.device, d.capacity_bytes,
                                  d.used_bytes // SCOPED_BYTES * SCOPED_BYTES if scoped else d.used_bytes,
                                  copies_by.get((record.instance_id, d.device), 0)) for d in record.devices]
            counters = ZERO if scoped else Counters.of(record)
            iid = record.instance_id
            inflight = 0 if scoped else max(0, view.inflight.get(iid, 0))
            report.instances.append(InstanceView(
                record=record, state=state, devices=devices, loaded=loaded_on.get(iid, 0),
                loading=loading_on.get(iid, 0), inflight=inflight, counters=counters))
            report.total += counters
        if not scoped:
            report.window_s, report.window = self.window.increase()

        now = self._clock()
        candidates = ((self._rate(m, now), m) for m in loaded_models)
        report.hottest = [HotModel(m, round(rate, 3), loaded_models[m], self._model_inflight(m))
                          for rate, m in heapq.nlargest(top, candidates) if rate >= 0.001]

        failing = [(model_id, records) for model_id, records in view.failures.items() if visible(model_id)]
        report.models_failing = len(failing)
        newest = heapq.nlargest(max_failures, (r for _, records in failing for r in records.values()),
                                key=lambda r: r.time_ms)
        report.failures = [FailureView(r, self._expires(r)) for r in newest]
        return report

    def copies(self, model_id: str, leases: dict[str, bool]) -> tuple[list[CopyView], list[FailureView]]:
        """A model's copies and failure records; ``leases``: instance ID -> whether its failure
        record has a lease, as the registry says (a record missing there counts as leased)."""
        view = self.view
        out = []
        for instance_id, p in sorted(view.copies(model_id).items()):
            record = view.instances.get(instance_id)
            out.append(CopyView(instance_id, record.endpoint if record else "", p.state, p.device, p.size_bytes,
                                p.loaded_ms, p.last_used_ms, p.load_ms))
        failures = sorted(view.failures.get(model_id, {}).values(), key=lambda r: -r.time_ms)
        return out, [FailureView(r, self._expires(r, leases.get(r.instance_id, True))) for r in failures]

    def last_request_ms(self, model_id: str) -> int:
        """The last request this router forwarded for the model, ms since the epoch (0: none lately)."""
        at = self._last_request(model_id)
        if at is None:
            return 0
        return int((time.time() - max(0.0, self._clock() - at)) * 1000)


__all__ = ["Counters", "Fleet", "FleetReport", "FleetWindow", "expires_ms"]
