"""Reconciles InferenceGraphs with the mesh's graphs (:mod:`mesh.controller.graphs` maps them).

A reconcile of one InferenceGraph:

- **served and its nodes not yet sent** (new object, spec change, controller restart, an earlier
  refusal): ``setGraph`` with the nodes; **already sent**: ``getGraphStatus``, and ``setGraph`` again
  if the mesh lost the graph (a wiped registry: the resync restores it within ``resync_s``).
- **refused** by the mesh (a cycle, a condition that does not parse, a model it does not know, a
  name another namespace holds): the status says why (``Ready`` False, the router's message) and a
  Warning Event is recorded once per generation and reason; what the mesh held keeps serving. A
  graph naming a model the mesh does not know yet (an InferenceGraph applied together with its
  InferenceServices) is tried again every ``RETRY_MISSING_S``.
- **gone, or not the mesh's** (no ModelMesh annotation, a namespace no longer served):
  ``deleteGraph``, once.

The queue, the watch cache, the workers and the resync are :class:`ObjectController`'s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from mesh.controller.graphs import (
    GRAPH_NAME_TAKEN,
    INVALID_GRAPH_SPEC,
    MAX_SERVICES,
    SOURCE,
    GraphFailure,
    graph_spec,
    graph_status,
    served,
    service_names,
    status_patch,
)
from mesh.controller.predictor import Key, VModelState, timestamp
from mesh.controller.reconciler import StatusWriter
from mesh.controller.watched import EventRecorder, ObjectController
from mesh.errors import Code, MeshError
from mesh.settings import ControllerSettings

if TYPE_CHECKING:
    from mesh.controller.router_client import GraphState

log = structlog.get_logger(__name__)

RETRY_MISSING_S = 3.0


class GraphApi(Protocol):
    async def set_graph(self, graph_id: str, spec: Mapping[str, Any], *, owner: str) -> GraphState: ...

    async def graph_status(self, graph_id: str) -> GraphState: ...

    async def delete_graph(self, graph_id: str, *, owner: str) -> None: ...

    async def vmodel_status(self, vmodel_id: str, *, owner: str) -> VModelState: ...


def refusal(exc: MeshError) -> GraphFailure | None:
    """A refusal to show in the status, or None for an error worth retrying as is."""
    if exc.code is Code.ALREADY_EXISTS or (exc.code is Code.FAILED_PRECONDITION and "owned by" in exc.message):
        return GraphFailure(GRAPH_NAME_TAKEN, f"The name is taken in the mesh: {exc.message}")
    if exc.code in (Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.PERMISSION_DENIED):
        return GraphFailure(INVALID_GRAPH_SPEC, exc.message)
    return None


class GraphController(ObjectController):
    kind_name = "InferenceGraph"

    def __init__(self, settings: ControllerSettings, *, mesh: GraphApi, kube: StatusWriter, rest_url: str,
                 workers: int = 2, clock: Callable[[], float] = time.time, ready: Sequence[asyncio.Event] = (),
                 served_namespace: Callable[[str], bool] | None = None,
                 events: EventRecorder | None = None) -> None:
        super().__init__(settings, workers=workers, ready=ready, events=events)
        self.mesh = mesh
        self.kube = kube
        self.rest_url = rest_url
        self.clock = clock
        self.served_namespace = served_namespace
        self.defined: dict[Key, Mapping[str, Any]] = {}  # the nodes last sent for each object
        self._cleared: set[Key] = set()  # objects not the mesh's whose graph was removed once

    def owner(self, namespace: str) -> str:
        return f"{self.settings.owner}/{namespace}/{SOURCE}"

    async def reconcile(self, key: Key) -> float | None:
        namespace, name = key
        owner = self.owner(namespace)
        obj = self.cache.get(key)
        mine = obj is not None and served(obj) and (self.served_namespace is None or self.served_namespace(namespace))
        if not mine:
            if obj is not None and key in self._cleared:
                return None
            await self._delete(name, owner)
            self.defined.pop(key, None)
            if obj is not None:
                self._cleared.add(key)
            else:
                self._cleared.discard(key)
                self.forget_warnings(key)
            return None
        assert obj is not None
        self._cleared.discard(key)
        spec = graph_spec(obj)
        failure: GraphFailure | None = None
        delay: float | None = None
        try:
            failure, missing = await self._check_services(namespace, spec)
            if failure is not None:
                # Never serve a step another namespace owns: what this object defined goes.
                if not missing:
                    await self._delete(name, owner)
                self.defined.pop(key, None)
                delay = RETRY_MISSING_S if missing else None
                log.warning("InferenceGraph names services it may not use", namespace=namespace, graph=name,
                            error=failure.message)
                await self.warn(key, obj, failure.reason, failure.message)
                held = await self._held(name, owner)
            elif self.defined.get(key) != spec:
                state = await self.mesh.set_graph(name, spec, owner=owner)
                log.info("InferenceGraph defined in the mesh", namespace=namespace, graph=name)
                self.defined[key] = spec
            else:
                state = await self.mesh.graph_status(name)
                if state.status == "NOT_FOUND":
                    log.warning("graph missing in the mesh; restoring it", namespace=namespace, graph=name)
                    state = await self.mesh.set_graph(name, spec, owner=owner)
            if failure is None:
                held = state.status
        except MeshError as exc:
            failure = refusal(exc)
            if failure is None:
                raise
            self.defined.pop(key, None)  # try setGraph again next time
            log.warning("the mesh refused the InferenceGraph", namespace=namespace, graph=name, error=exc.message)
            if exc.code is Code.NOT_FOUND:
                delay = RETRY_MISSING_S  # the models it names may be on their way
            await self.warn(key, obj, failure.reason, failure.message)
            held = await self._held(name, owner)
        wanted = graph_status(obj, held, failure, rest_url=self.rest_url, now=timestamp(int(self.clock() * 1000)))
        await self._write(key, obj, wanted)
        return delay

    async def _check_services(self, namespace: str, spec: dict[str, Any]) -> tuple[GraphFailure | None, bool]:
        """(a refusal, whether it is only that a service does not exist yet) for the services the
        graph names: each must be an InferenceService or Predictor of ``namespace`` (module
        docstring of mesh.controller.graphs)."""
        names = service_names(spec)
        if len(names) > MAX_SERVICES:
            return GraphFailure(INVALID_GRAPH_SPEC, f"the graph names {len(names)} services; at most "
                                f"{MAX_SERVICES} are allowed"), False
        ours = (f"{self.settings.owner}/{namespace}", f"{self.settings.owner}/{namespace}/isvc")
        absent = []
        for service in names:
            state = await self.mesh.vmodel_status(service, owner="")
            if state.status == "NOT_FOUND":
                absent.append(service)
            elif state.owner not in ours:
                return GraphFailure(INVALID_GRAPH_SPEC, f"serviceName {service!r} is not an InferenceService or "
                                    f"Predictor of namespace {namespace!r}: a graph may name only its own "
                                    "namespace's services"), False
        if absent:
            return GraphFailure(INVALID_GRAPH_SPEC, f"no InferenceService or Predictor named "
                                f"{', '.join(repr(a) for a in absent[:5])} in namespace {namespace!r} "
                                f"(yet: tried again every {RETRY_MISSING_S:g} s)"), True
        return None, False

    async def _held(self, name: str, owner: str) -> str:
        """The status of what the mesh holds under this name for this object: NOT_FOUND when
        it is another owner's (its URL is not this object's to show)."""
        state = await self.mesh.graph_status(name)
        return state.status if state.owner == owner else "NOT_FOUND"

    async def _delete(self, name: str, owner: str) -> None:
        try:
            await self.mesh.delete_graph(name, owner=owner)
        except MeshError as exc:
            if exc.code not in (Code.FAILED_PRECONDITION, Code.ALREADY_EXISTS, Code.PERMISSION_DENIED):
                raise
            log.warning("graph not deleted: another owner has it", graph=name, error=exc.message)


    async def _write(self, key: Key, obj: dict[str, Any], wanted: dict[str, Any]) -> None:
        patch = status_patch(obj, wanted)
        if patch is None:
            return
        updated = await self.kube.patch_status(key[0], key[1], patch)
        cached = self.cache.get(key)
        if updated is not None and cached is not None:
            self.cache[key] = {**cached, "status": updated.get("status") or {}}
        ready = wanted["conditions"][0]["status"]
        log.info("InferenceGraph status updated", namespace=key[0], name=key[1], ready=ready)
