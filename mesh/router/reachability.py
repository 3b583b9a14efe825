"""Instances that stopped answering, as this router sees them, across requests.

Why. A runtime killed with SIGKILL keeps its instance record and placements until its lease
expires (``registry.lease_ttl_s``, seconds). The data plane's retry excludes a dead instance only
for the request that found it dead; without a memory across requests, every new request for a
model held there would try it first and pay a failed attempt until the lease expired.

How. The data plane calls :meth:`Reachability.mark` when an attempt fails at the connection level
("gone": refused, reset, stream broken; the channels' keepalive breaks them within about 2 s of a
runtime that stopped answering pings: SIGSTOP, a frozen host), and :meth:`Reachability.suspect`
when an attempt gets no answer before its deadline (a runtime whose event loop is stuck still
answers pings): that probes it at once and marks it when the probe gets no answer. A marked
instance joins ``view.unreachable``, and its streams are dropped, so that the requests waiting on it
are retried elsewhere: routing skips it (copies and homes) while any other instance can serve. It
leaves the set when a probe (``ServerLive``, every ``router.unreachable_probe_s``) gets an answer,
or when its lease expires and the view drops it. Routing never excludes *every* instance this way
(``routing.eligible`` falls back to all of them), so a network blip that marks the whole fleet
costs retries, not an outage.

Per router and local: no other router needs to agree, and each learns the same fact from its own
failed attempt within a request or two.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from mesh.router.view import ClusterView
from mesh.tasks import spawn
from mesh.transport.runtime_client import RuntimeClient

log = structlog.get_logger(__name__)


class Reachability:
    def __init__(self, view: ClusterView, runtimes: RuntimeClient, probe_s: float,
                 on_unreachable: Callable[[str], None] | None = None) -> None:
        self.view = view
        self.runtimes = runtimes
        self.probe_s = probe_s
        self.on_unreachable = on_unreachable  # endpoint -> drop its streams (requests on them retry)
        self._wake = asyncio.Event()
        self._suspects: dict[str, asyncio.Task[None]] = {}  # instance -> its probe (owned here)

    def mark(self, instance_id: str) -> None:
        """An attempt on ``instance_id`` got no answer at all: skip it until it answers again."""
        if self.view.mark_unreachable(instance_id):
            log.warning("instance unreachable; routing around it until it answers or its lease expires",
                        instance_id=instance_id)
            if self.on_unreachable is not None:
                self.on_unreachable(self.view.instances[instance_id].endpoint)
            self._wake.set()

    def suspect(self, instance_id: str) -> None:
        """A request on ``instance_id`` got no answer before its deadline: a slow model, or a runtime
        that is stopped or whose event loop is stuck. Probe it now (ServerLive, served by its event
        loop); no answer within ``probe_s`` marks it unreachable, which also drops its streams so
        that the requests waiting on it are retried elsewhere. One probe per instance at a time."""
        if instance_id in self._suspects or instance_id in self.view.unreachable:
            return
        record = self.view.instances.get(instance_id)
        if record is None:
            return

        async def probe() -> None:
            try:
                if not await self.runtimes.live(record.endpoint, max(self.probe_s, 0.2)):
                    log.warning("instance missed a deadline and does not answer a probe", instance_id=instance_id)
                    self.mark(instance_id)
            finally:
                self._suspects.pop(instance_id, None)

        self._suspects[instance_id] = spawn(probe(), name=f"probe:{instance_id}")

    async def probe_once(self) -> None:
        for instance_id in list(self.view.unreachable):
            record = self.view.instances.get(instance_id)
            if record is None:  # its lease expired meanwhile: the view forgot it
                self.view.mark_reachable(instance_id)
                continue
            if await self.runtimes.live(record.endpoint, max(self.probe_s, 0.2)):
                self.view.mark_reachable(instance_id)
                log.info("instance answers again", instance_id=instance_id)

    async def run(self) -> None:
        """Root task: probe the unreachable instances while there are any."""
        while True:
            if not self.view.unreachable:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(self.probe_s)
            await self.probe_once()
