"""Publishes what a runtime holds: its instance record and one placement key per copy.

Both live on the instance's lease (``RegistrySession``), so when the process dies they vanish
with the lease, in seconds, and no reaper is needed.

Writes never block serving: cache events only record the latest state of each model in a dict and
wake the publishing loop, which coalesces bursts (a storm of loads becomes one write per model,
with the latest state) and then refreshes the instance record. The instance record is also
re-published every ``publish_interval_s`` when its figures changed (requests served, LRU time).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from mesh.registry.keys import Keys
from mesh.registry.records import (
    FAILED,
    LOADED,
    LOADING,
    DeviceUsage,
    FailureRecord,
    InstanceRecord,
    PlacementRecord,
)
from mesh.registry.registry import Registry
from mesh.registry.session import RegistrySession
from mesh.runtime.cache import Entry, ModelCache

log = structlog.get_logger(__name__)

ANNOUNCE_TIMEOUT_S = 2.0


class Publisher:
    def __init__(
        self,
        *,
        registry: Registry,
        session: RegistrySession,
        instance: InstanceRecord,
        cache_ref: Callable[[], ModelCache],
        requests: Callable[[], int],
        publish_interval_s: float,
        failure_ttl_s: int,
        cache_requests: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self._registry = registry
        self._keys: Keys = registry.keys
        self._session = session
        self._base = instance
        self._cache_ref = cache_ref
        self._requests = requests
        # (hits, misses) counted per request as the metrics count them; None: the cache's own
        # figures (a load joined by several requests is one miss there).
        self._cache_requests = cache_requests
        self.load_failures = 0
        self._interval = publish_interval_s
        self._failure_ttl_s = failure_ttl_s
        self._pending: dict[str, PlacementRecord | None] = {}
        self._failures: list[FailureRecord] = []
        self._wake = asyncio.Event()
        self._last_record: InstanceRecord | None = None
        self._last_requests = 0
        self._last_time = time.monotonic()
        self.shutting_down = False
        self.max_stuck_loads = 4  # the runtime's setting (the app sets it)
        self.takes_loads: Callable[[], bool] = lambda: True  # False while its model server is down
        self.withdrawn = False

    # --- CacheListener ------------------------------------------------------------------------
    def on_change(self, entry: Entry, event: str) -> None:
        if event == "released":
            return  # the copy's placement went when it was evicted; its bytes show in the next record
        now_ms = int(time.time() * 1000)
        if event in ("loading", "loaded"):
            if self.withdrawn:
                return  # leaving: no new copy is advertised
            state = LOADING if event == "loading" else LOADED
            self._pending[entry.model_id] = PlacementRecord(
                model_id=entry.model_id, instance_id=self._base.instance_id, state=state,
                size_bytes=entry.reserved_bytes or entry.predicted_bytes, device=entry.device,
                loaded_ms=now_ms, last_used_ms=int(entry.last_used * 1000),
                load_ms=round(entry.load_ms, 3))
        else:
            self._pending[entry.model_id] = None
            if event == FAILED:
                self.load_failures += 1
                self._failures.append(FailureRecord(model_id=entry.model_id,
                                                    instance_id=self._base.instance_id,
                                                    reason=entry.error, time_ms=now_ms))
        self._wake.set()

    async def announce(self, entry: Entry) -> None:
        """Write the copy's ``loading`` placement now, before its loader runs (ModelCache's
        ``before_load``): if the loader kills the process, a caller that loses its call reads it
        and knows which model did (``mesh.registry.crashes``). Bounded, and best effort: with
        the registry unreachable the load goes on (the restarted runtime's journal still tells)."""
        record = self._pending.get(entry.model_id)
        if record is None or record.state != LOADING or self.withdrawn:
            return
        try:
            await asyncio.wait_for(
                self._session.put(self._keys.placement(entry.model_id, self._base.instance_id),
                                  record.to_json()), ANNOUNCE_TIMEOUT_S)
        except Exception as exc:
            log.info("could not announce a load before it starts", model_id=entry.model_id,
                     error=str(exc) or type(exc).__name__)
            return
        if self._pending.get(entry.model_id) is record:
            self._pending.pop(entry.model_id, None)

    def _accepts_loads(self) -> bool:
        return len(self._cache_ref().stuck_loads) < self.max_stuck_loads and self.takes_loads()

    # --- records ------------------------------------------------------------------------------
    def instance_record(self) -> InstanceRecord:
        stats = self._cache_ref().stats()
        now = time.monotonic()
        served = self._requests()
        elapsed = max(now - self._last_time, 1e-6)
        rate = (served - self._last_requests) / elapsed
        self._last_requests, self._last_time = served, now
        hits, misses = self._cache_requests() if self._cache_requests is not None else (stats.hits, stats.misses)
        return InstanceRecord(
            instance_id=self._base.instance_id, endpoint=self._base.endpoint,
            devices=tuple(DeviceUsage(d, cap, used) for d, (cap, used) in stats.devices.items()),
            model_count=stats.loaded, loading_count=stats.loading,
            lru_time_ms=int(stats.lru_time * 1000) if stats.lru_time else 0,
            rate_rps=round(rate, 2), labels=self._base.labels, zone=self._base.zone,
            supported_types=self._base.supported_types, gpu_types=self._base.gpu_types,
            version=self._base.version,
            shutting_down=self.shutting_down, started_ms=self._base.started_ms,
            accepts_loads=self._accepts_loads(),
            direct_endpoint=self._base.direct_endpoint, direct_tls=self._base.direct_tls,  # smart clients
            hits=hits, misses=misses, loads=stats.loads, evictions=stats.evictions,
            requests=served, load_failures=self.load_failures)

    async def publish_instance(self, *, force: bool = False) -> None:
        record = self.instance_record()
        if not force and self._last_record is not None and _similar(record, self._last_record):
            return
        await self._session.put(self._keys.instance(record.instance_id), record.to_json())
        self._last_record = record

    async def withdraw(self) -> None:
        """Shutting down, after re-homing: delete every placement of ours, so that routers send
        nothing more here (the copies still answer what is already on its way)."""
        self.withdrawn = True
        for entry in self._cache_ref().entries():
            self._pending[entry.model_id] = None
        await self._flush()

    async def _flush(self) -> None:
        # An item leaves the queue only once written (and only if no newer state replaced it
        # meanwhile), so a registry outage delays publication but loses nothing.
        wrote = False
        for model_id, placement in list(self._pending.items()):
            key = self._keys.placement(model_id, self._base.instance_id)
            if placement is None:
                await self._session.delete(key)
            else:
                await self._session.put(key, placement.to_json())
            if self._pending.get(model_id, placement) is placement:
                self._pending.pop(model_id, None)
            wrote = True
        while self._failures:
            failure = self._failures[0]
            # A lease of its own, never refreshed: the record expires by itself after the TTL.
            lease = await self._registry.store.grant_lease(self._failure_ttl_s)
            self._registry.store.stop_keepalive(lease)
            await self._registry.put_failure(failure, lease)
            self._failures.pop(0)
            wrote = True
        if wrote:
            await self.publish_instance(force=True)

    async def run(self) -> None:
        """Root task: publish cache changes as they come, the instance record periodically."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._flush()
                await self.publish_instance()
            except Exception as exc:
                # The registry is down: what was not written stays queued for the next round.
                log.warning("publishing to the registry failed; will retry", error=str(exc))
                self._last_record = None
                await asyncio.sleep(min(self._interval, 1.0))


def _similar(a: InstanceRecord, b: InstanceRecord) -> bool:
    """Skip a refresh when nothing an operator or a router acts on has moved."""
    if (a.model_count, a.loading_count, a.shutting_down, a.accepts_loads) != (
            b.model_count, b.loading_count, b.shutting_down, b.accepts_loads):
        return False
    if abs(a.rate_rps - b.rate_rps) > max(1.0, 0.1 * b.rate_rps):
        return False
    if (a.hits, a.misses, a.loads, a.evictions, a.requests, a.load_failures) != (
            b.hits, b.misses, b.loads, b.evictions, b.requests, b.load_failures):
        return False  # at most one refresh per publish interval while traffic flows
    for da, db in zip(a.devices, b.devices, strict=False):
        if da.capacity_bytes != db.capacity_bytes:  # a GPU's budget moved (rare; routers size homes by it)
            return False
        if abs(da.used_bytes - db.used_bytes) > 0.02 * max(db.capacity_bytes, 1):
            return False
    return abs(a.lru_time_ms - b.lru_time_ms) < 60_000
