"""What every reconciler of one kind of object shares: the cache fed by the watch, the work queue,
the workers with their per-object back-off, and the periodic resync.

Watch events (:meth:`ObjectController.on_event`) only update the cache and queue keys; a worker
reconciles a key against the latest cached object (``reconcile``, the subclass's). A SYNC event (a
full list after a (re)list) also queues the keys that vanished while the watch was down. Only a
new object, a new generation (or uid, or annotations: :func:`generation`) or the resync queues a
key, so the controller's own status writes, which come back as MODIFIED events, cause no loop. A
failed reconcile is retried with an exponential back-off of its own key (``backoff_max_s``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import structlog

from mesh.controller.events import WatchEvent
from mesh.controller.predictor import Key, key_of
from mesh.controller.queue import Backoff, WorkQueue
from mesh.errors import MeshError
from mesh.settings import ControllerSettings

log = structlog.get_logger(__name__)


class EventRecorder(Protocol):
    async def warn(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        """Record a Warning Event about ``obj``; never raises (an Event is best effort)."""


def generation(obj: Mapping[str, Any]) -> Any:
    """What, changed, needs a reconcile: the spec (its generation), a new object of the same name,
    or the annotations (they do not move the generation, and an InferenceService's say whether the
    mesh serves it and may name its runtime and storage key)."""
    meta = obj.get("metadata") or {}
    annotations = meta.get("annotations")
    notes = tuple(sorted((str(k), str(v)) for k, v in annotations.items())) if isinstance(annotations, Mapping) else ()
    return meta.get("generation"), meta.get("uid"), notes


class ObjectController:
    """The watch-and-queue half of a reconciler; subclasses define ``reconcile`` and ``kind_name``."""

    kind_name = "object"

    def __init__(self, settings: ControllerSettings, *, workers: int = 4,
                 ready: Sequence[asyncio.Event] = (), events: EventRecorder | None = None) -> None:
        self.settings = settings
        self.events = events
        self._warned: dict[Key, tuple[Any, str, str]] = {}  # the last Warning Event per object
        self.workers = workers
        self.ready = ready  # reconciles start once these are set (the runtimes and namespaces are known)
        self.cache: dict[Key, dict[str, Any]] = {}  # the latest object of every key, from the watch
        self.queue: WorkQueue[Key] = WorkQueue()
        self.synced = asyncio.Event()  # set once the first list has been queued
        self._backoff: dict[Key, Backoff] = {}

    async def reconcile(self, key: Key) -> float | None:
        """Bring the mesh and the status in line with the object; when to look again (or None)."""
        raise NotImplementedError

    # --- events (on the event loop; cheap: they only queue keys) --------------------------------
    def on_event(self, event: WatchEvent) -> None:
        if event.type == "SYNC":
            listed = {key_of(o): o for o in event.objects}
            for key in set(self.cache) - set(listed):
                del self.cache[key]  # deleted while the watch was down
                self.queue.add(key)
            for key, obj in listed.items():
                self._observe(key, obj)
            self.synced.set()
            return
        if event.object is None:
            return
        key = key_of(event.object)
        if event.type == "DELETED":
            self.cache.pop(key, None)
            self.queue.add(key)
        else:
            self._observe(key, event.object)

    def _observe(self, key: Key, obj: dict[str, Any]) -> None:
        before = self.cache.get(key)
        self.cache[key] = obj
        if before is None or generation(before) != generation(obj):
            self.queue.add(key)

    def requeue_all(self, namespaces: set[str] | None = None) -> None:
        """Reconcile every object again, or those of ``namespaces`` (they became served, or
        stopped being served)."""
        for key in self.cache:
            if namespaces is None or key[0] in namespaces:
                self.queue.add(key)

    async def warn(self, key: Key, obj: Mapping[str, Any], reason: str, message: str) -> None:
        """A Warning Event for a failure the controller found, once per generation and failure
        (the status says it too; the Event reaches `kubectl describe` and `kubectl get events`)."""
        if self.events is None:
            return
        seen = (generation(obj), reason, message)
        if self._warned.get(key) == seen:
            return
        self._warned[key] = seen
        await self.events.warn(obj, reason, message)

    def forget_warnings(self, key: Key) -> None:
        self._warned.pop(key, None)

    # --- work -----------------------------------------------------------------------------------
    async def run(self) -> None:
        """Root task: the workers and the periodic resync."""
        for event in self.ready:
            await event.wait()
        name = self.kind_name.lower()
        try:
            async with asyncio.TaskGroup() as group:
                for i in range(self.workers):
                    group.create_task(self._work(), name=f"{name}-worker-{i}")
                group.create_task(self._resync(), name=f"{name}-resync")
        finally:
            self.queue.close()

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.settings.resync_s)
            for key in list(self.cache):
                self.queue.add(key)

    async def _work(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                delay = await self.reconcile(key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                backoff = self._backoff.setdefault(key, Backoff(0.5, self.settings.backoff_max_s))
                delay = backoff.next()
                level = log.warning if isinstance(exc, MeshError) else log.error
                level("reconcile failed; will retry", kind=self.kind_name, namespace=key[0], name=key[1],
                      retry_in_s=delay, error=f"{type(exc).__name__}: {exc}", exc_info=not isinstance(exc, MeshError))
            else:
                self._backoff.pop(key, None)
            finally:
                self.queue.done(key)
            if delay is not None:
                self.queue.add(key, delay)
