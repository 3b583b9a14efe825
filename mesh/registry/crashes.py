"""Crash records: a model whose load killed a runtime is quarantined on the first death.

Without them a corrupt model walks the mesh: the router sees the runtime "gone", retries the
request on the next one, which loads the model and dies too (3 of 3 runtimes from one inference;
a vModel or ``minCopies`` pointing at it crash-loops runtimes with no traffic at all).

Who writes a crash record (``failures/<model>/<iid>``, ``kind`` CRASH):

- ``CrashWitness.lost``: whoever loses a call that made a runtime load (a router's forwarded
  request or ``loadModel``, a re-homing runtime). Before its loader runs the runtime writes the
  copy's ``loading`` placement (``Publisher.announce``), and the placement outlives the process
  by the lease TTL; so a lost call whose model reads ``loading`` on an instance that no longer
  answers (``live``: a dead process refuses at once) means the runtime died during that load.
  The record lives ``registry.crash_quarantine_s``: it may be the operator's SIGKILL or a lost
  node rather than the model, and then the model comes back by itself.
- ``record_leftovers``: the runtime itself, restarted under its instance ID, from its journal
  (``mesh.runtime.journal``). When the fatal signal came from that load's own thread, the record
  has no lease: the model stays quarantined until it is unregistered (and registered again,
  fixed). Other loads left in progress get the time-limited record.

Routers read the records through their view: no instance is chosen to load a quarantined model
(``mesh.router.routing.pick_home``), copies are not added, vModel transitions to it fail, and
its status is LOADING_FAILED with the reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import structlog

from mesh.registry.records import CRASH, LOADING, FailureRecord, PlacementRecord
from mesh.registry.registry import Registry
from mesh.tasks import spawn

log = structlog.get_logger(__name__)

MAX_RECENT = 1_000
# Calls lost with one death arrive within a few seconds; later ones are checked again (the model
# may have been registered again since, and a new death must be recorded).
SAME_DEATH_S = 5.0
# A dead process refuses the probe at once; a stopped one (SIGSTOP) or a stuck event loop does
# not answer within this and counts as dead (a load that stalls the runtime this long is suspect).
LIVE_PROBE_S = 2.0


@dataclass(frozen=True)
class Leftover:
    """A load a runtime's previous life started and never finished (``mesh.runtime.journal``)."""

    model_id: str
    registered_ms: int
    started_ms: int
    guilty: bool  # the fatal signal came from this load's own thread
    fatal: str  # faulthandler's headline ("Aborted", "Segmentation fault"), "" if none was written


class CrashWitness:
    """``live(endpoint, timeout_s)``: whether the runtime still answers (``RuntimeClient.live``).
    A call can be lost without a death (a missed deadline, a refused stream, a reset connection);
    a runtime that answers is alive, and its loads are not blamed."""

    def __init__(self, registry: Registry, quarantine_s: int,
                 on_record: Callable[[FailureRecord], None] | None = None,
                 live: Callable[[str, float], Awaitable[bool]] | None = None) -> None:
        self.registry = registry
        self.quarantine_s = quarantine_s
        self.on_record = on_record  # a router's view takes it at once, before its watch does
        self.live = live
        self._checks: dict[tuple[str, str], asyncio.Task[FailureRecord | None]] = {}
        self._recent: dict[tuple[str, str], tuple[FailureRecord, float]] = {}
        self.recorded = 0

    async def lost(self, model_id: str, instance_id: str, endpoint: str = "") -> FailureRecord | None:
        """A call that made ``instance_id`` load ``model_id`` lost its runtime: the crash record
        written if the copy was loading there and the runtime no longer answers, else None (it
        went for another reason). One check per (model, instance) however many calls were lost
        with it; the check is a task of its own, so a caller that gives up (its deadline, a
        cancel) does not take the answer from the others."""
        key = (model_id, instance_id)
        known = self._recent.get(key)
        if known is not None and time.monotonic() - known[1] < SAME_DEATH_S:
            return known[0]  # the other calls lost with the same death, arriving later
        task = self._checks.get(key)
        if task is None:
            task = spawn(self._check(model_id, instance_id, endpoint), name=f"crash-check:{model_id[:100]}")
            self._checks[key] = task
            task.add_done_callback(lambda _: self._checks.pop(key, None))
        return await asyncio.shield(task)

    async def _check(self, model_id: str, instance_id: str, endpoint: str) -> FailureRecord | None:
        try:
            kv = await self.registry.store.get(self.registry.keys.placement(model_id, instance_id))
            placement = PlacementRecord.from_json(kv.value) if kv is not None else None
        except Exception as exc:
            log.warning("could not tell whether a lost runtime died loading a model", model_id=model_id,
                        instance_id=instance_id, error=str(exc))
            return None
        if placement is None or placement.state != LOADING:
            return None
        if endpoint and self.live is not None and await self.live(endpoint, LIVE_PROBE_S):
            log.info("a call that made a runtime load was lost, but the runtime answers: not a crash",
                     model_id=model_id, instance_id=instance_id)
            return None
        reason = (f"runtime {instance_id} died while loading this model; no runtime loads "
                  f"it for {self.quarantine_s} s (unregister and register it again to retry sooner)")
        record = await self.record(model_id, instance_id, reason, durable=False)
        if record is not None:
            if len(self._recent) >= MAX_RECENT:
                self._recent.pop(next(iter(self._recent)))  # the oldest
            self._recent[(model_id, instance_id)] = (record, time.monotonic())
        return record

    async def record(self, model_id: str, instance_id: str, reason: str, *, durable: bool) -> FailureRecord | None:
        record = FailureRecord(model_id=model_id, instance_id=instance_id, reason=reason,
                               time_ms=int(time.time() * 1000), kind=CRASH)
        try:
            if durable:
                await self.registry.store.put(self.registry.keys.failure(model_id, instance_id),
                                              record.to_json())
            else:
                lease = await self.registry.store.grant_lease(self.quarantine_s)
                self.registry.store.stop_keepalive(lease)  # expires by itself
                await self.registry.put_failure(record, lease)
        except Exception as exc:
            log.warning("could not record a crash", model_id=model_id, instance_id=instance_id, error=str(exc))
            return None
        self.recorded += 1
        log.warning("model quarantined: a runtime died loading it", model_id=model_id, instance_id=instance_id,
                    durable=durable, reason=reason)
        if self.on_record is not None:
            self.on_record(record)
        return record


async def record_leftovers(witness: CrashWitness, instance_id: str, leftovers: Iterable[Leftover]) -> int:
    """A restarted runtime's report of the loads its previous life left in progress (journal
    ``Leftover``s); how many crash records it wrote. A model registered again since is skipped."""
    written = 0
    for left in leftovers:
        model_id = left.model_id
        try:
            spec = await witness.registry.get_model(model_id)
        except Exception as exc:
            log.warning("could not read a model the last run left loading", model_id=model_id, error=str(exc))
            continue
        if spec is None or spec.registered_ms != left.registered_ms:
            continue
        if left.guilty:
            reason = (f"loading this model crashed runtime {instance_id} (fatal signal in the loader: "
                      f"{left.fatal}); quarantined until it is registered again")
        else:
            how = (f"a fatal signal elsewhere ({left.fatal})" if left.fatal
                   else "killed: SIGKILL, out of memory or a node loss")
            reason = (f"runtime {instance_id} died while loading this model ({how}); quarantined: no "
                      f"runtime loads it for {witness.quarantine_s} s")
        if await witness.record(model_id, instance_id, reason, durable=left.guilty) is not None:
            written += 1
    return written


__all__ = ["CrashWitness", "Leftover", "record_leftovers"]
