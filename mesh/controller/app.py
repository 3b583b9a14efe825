"""Assembles and runs the controller process (``mesh serve controller``).

It watches ``Predictor`` resources (serving.kserve.io/v1alpha1) and, with
``controller.inference_services``, ``InferenceService`` resources in ModelMesh deployment mode
(serving.kserve.io/v1beta1; :mod:`mesh.controller.isvc`), one reconciler and one watch per kind,
and keeps one vModel per object in the mesh through a router's management API, like
modelmesh-serving's controller; see
:mod:`mesh.controller.reconciler` for what a reconcile does and :mod:`mesh.controller.predictor`
for the mapping. It needs no registry access of its own: the router is its only way into the mesh.

Start-up: a configuration that cannot be loaded (bad kubeconfig) stops it at once with a one-line
error (exit code 2). An unreachable router or API server does not: both are retried with back-off
and logged, as either may start after the controller. Ready (``on_ready``) once the first list of
Predictors has been queued for reconciling.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import structlog

from mesh.controller.events import WatchEvent, involved_object, warning_event
from mesh.controller.graph_reconciler import GraphController
from mesh.controller.kube import (
    CSR_PLURAL,
    IG_PLURAL,
    ISVC_PLURAL,
    ISVC_VERSION,
    SR_PLURAL,
    EventApi,
    NamespaceApi,
    PredictorApi,
    PredictorWatcher,
    api_client,
)
from mesh.controller.namespaces import NamespaceFilter
from mesh.controller.predictor import Choice
from mesh.controller.reconciler import InferenceServices, Kind, PredictorController
from mesh.controller.router_client import RouterClient
from mesh.controller.runtimes import RuntimeCatalog
from mesh.controller.watched import ObjectController
from mesh.controller.workloads import RuntimeUsage, run_workloads, workload_namespace
from mesh.errors import MeshError
from mesh.settings import ControllerSettings, Settings
from mesh.tasks import RootTasks, call_soon_safely

log = structlog.get_logger(__name__)


def _to_loop(loop: asyncio.AbstractEventLoop, handler: Callable[..., None], *args: Any) -> Callable[[WatchEvent], None]:
    """A watch thread's delivery: ``handler(event, *args)`` on the event loop (dropped once the
    loop is closed: we are shutting down)."""
    def deliver(event: WatchEvent) -> None:  # watch thread
        try:
            loop.call_soon_threadsafe(handler, event, *args)
        except RuntimeError:
            pass
    return deliver


class _ThreadedStatusWriter:
    """The blocking Kubernetes client's status patch, off the event loop."""

    def __init__(self, api: PredictorApi) -> None:
        self.api = api

    async def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.api.patch_status, namespace, name, patch)


def _runtime_watchers(cs: ControllerSettings, client: Any, catalog: RuntimeCatalog,
                      controllers: list[PredictorController], synced: asyncio.Event,
                      loop: asyncio.AbstractEventLoop) -> list[PredictorWatcher]:
    """Watches of ServingRuntimes (the served namespace's, or all) and ClusterServingRuntimes into
    ``catalog``; every object is reconciled again when the runtimes change. ``synced`` is set once
    both have listed (a missing CRD lists as empty), so no model is sent before its runtime is known."""
    listed: set[str] = set()

    def on_event(event: WatchEvent, plural: str) -> None:  # on the event loop
        before = catalog.version
        for runtime in catalog.apply(event, namespace_scoped=plural == SR_PLURAL):
            if runtime.error:
                log.warning("invalid ServingRuntime; models naming it are told why", runtime=runtime.describe(),
                            error=runtime.error)
        if event.type == "SYNC":
            listed.add(plural)
            if len(listed) == 2 and not synced.is_set():
                log.info("runtimes listed", runtimes=sorted(r.ref for r in catalog.all()))
                synced.set()
        if catalog.version != before:
            for controller in controllers:
                controller.requeue_all()

    watchers = []
    for plural, api in ((SR_PLURAL, PredictorApi(client, cs.namespace, plural=SR_PLURAL)),
                        (CSR_PLURAL, PredictorApi(client, plural=CSR_PLURAL, cluster=True))):
        watchers.append(PredictorWatcher(api, _to_loop(loop, on_event, plural), timeout_s=cs.watch_timeout_s,
                                         backoff_max_s=cs.backoff_max_s))
    return watchers


def _namespace_watcher(cs: ControllerSettings, client: Any, namespaces: NamespaceFilter,
                       controllers: list[ObjectController], loop: asyncio.AbstractEventLoop) -> PredictorWatcher:
    """A watch of Namespaces into ``namespaces``; objects of a namespace that starts or stops being
    served are reconciled again."""
    def on_event(event: WatchEvent) -> None:  # on the event loop
        changed = namespaces.apply(event)
        if event.type == "SYNC":
            namespaces.synced.set()
        if changed:
            log.info("served namespaces changed", label=cs.namespace_label,
                     now_served=sorted(ns for ns in changed if namespaces.enabled(ns))[:50],
                     no_longer=sorted(ns for ns in changed if not namespaces.enabled(ns))[:50])
            for controller in controllers:
                controller.requeue_all(changed)

    return PredictorWatcher(NamespaceApi(client), _to_loop(loop, on_event), timeout_s=cs.watch_timeout_s,
                            backoff_max_s=cs.backoff_max_s)


class _ThreadedEvents:
    """Warning Events about the objects the controller reconciles, off the event loop; a failure
    to record one is logged, never the reconcile's."""

    def __init__(self, api: EventApi) -> None:
        self.api = api

    async def warn(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        involved = involved_object(obj)
        body = warning_event(involved, involved.get("namespace", ""), reason, message, datetime.now(UTC))
        try:
            await asyncio.to_thread(self.api.create, body["metadata"]["namespace"], body)
        except MeshError as exc:
            log.warning("could not record an Event", object=involved.get("name"), reason=reason, error=exc.message)


async def serve_controller(settings: Settings, roots: RootTasks,
                           on_ready: Callable[[str], None] | None = None) -> None:
    cs = settings.controller
    client = api_client(cs)  # KubeConfigError: a one-line start-up error
    router = RouterClient.from_settings(cs)  # InvalidArgument: a one-line start-up error
    loop = asyncio.get_running_loop()
    host = cs.router_endpoint.rpartition(":")[0] or cs.router_endpoint
    rest = cs.rest_endpoint or f"{host}:8008"
    scheme = "https" if cs.router_ca_file else "http"
    kinds: list[tuple[Kind, PredictorApi]] = [(Kind(), PredictorApi(client, cs.namespace))]
    if cs.inference_services:
        kinds.append((InferenceServices(f"grpc://{cs.router_endpoint}", f"{scheme}://{rest}"),
                      PredictorApi(client, cs.namespace, version=ISVC_VERSION, plural=ISVC_PLURAL)))
    controllers: list[PredictorController] = []
    everyone: list[ObjectController] = []  # the Predictor-like controllers and the InferenceGraphs'
    watchers: list[PredictorWatcher] = []
    events = _ThreadedEvents(EventApi(client))
    catalog = RuntimeCatalog(workload_namespace(cs) if cs.manage_runtimes else None)
    runtimes_synced = asyncio.Event()

    def select(namespace: str, fmt: str, version: str, runtime: str, protocol: str) -> Choice | None:
        if not catalog.declares(namespace, runtime):
            return None  # no runtimes for this namespace: any runtime loading the type serves the model
        return catalog.select(namespace, fmt, version, runtime=runtime, protocol=protocol)

    if cs.serving_runtimes:
        watchers.extend(_runtime_watchers(cs, client, catalog, controllers, runtimes_synced, loop))
    else:
        runtimes_synced.set()
    ready = [runtimes_synced]
    namespaces: NamespaceFilter | None = None
    if cs.namespace_label and not cs.namespace:
        namespaces = NamespaceFilter(cs.namespace_label, home=os.environ.get("POD_NAMESPACE", ""))
        watchers.append(_namespace_watcher(cs, client, namespaces, everyone, loop))
        ready.append(namespaces.synced)
    for kind, api in kinds:
        controller = PredictorController(cs, mesh=router, kube=_ThreadedStatusWriter(api),
                                         workers=max(cs.workers, 1), poll_s=min(1.0, cs.resync_s), kind=kind,
                                         select=select,
                                         ready=ready, served=namespaces.enabled if namespaces else None,
                                         events=events)
        controllers.append(controller)
        watchers.append(PredictorWatcher(api, _to_loop(loop, controller.on_event), timeout_s=cs.watch_timeout_s,
                                         backoff_max_s=cs.backoff_max_s))
        roots.spawn(controller.run(), f"{kind.name.lower()}-reconcile")
    everyone.extend(controllers)
    if cs.inference_graphs:
        # InferenceGraphs become graphs the routers run (mesh.controller.graphs); they wait for the
        # namespaces, not for the runtimes (a graph loads nothing itself).
        graph_api = PredictorApi(client, cs.namespace, plural=IG_PLURAL)
        graphs = GraphController(cs, mesh=router, kube=_ThreadedStatusWriter(graph_api), rest_url=f"{scheme}://{rest}",
                                 ready=[namespaces.synced] if namespaces else [],
                                 served_namespace=namespaces.enabled if namespaces else None,
                                 events=events)
        everyone.append(graphs)
        watchers.append(PredictorWatcher(graph_api, _to_loop(loop, graphs.on_event), timeout_s=cs.watch_timeout_s,
                                         backoff_max_s=cs.backoff_max_s))
        roots.spawn(graphs.run(), "inferencegraph-reconcile")
    if cs.manage_runtimes:
        # Each runtime some model uses runs as a StatefulSet (mesh.controller.workloads), from the
        # first pass after the runtimes are listed and the objects queued.
        usage = RuntimeUsage()
        for controller in controllers:
            controller.usage = usage
        roots.spawn(run_workloads(cs, client, catalog, usage, ready=[*ready, *(c.synced for c in controllers)]),
                    "runtime-workloads")
    for watcher in watchers:
        watcher.start()
    scope = f"namespace {cs.namespace}" if cs.namespace else "all namespaces"
    try:
        async def all_synced() -> None:
            for c in everyone:
                await c.synced.wait()

        synced = asyncio.ensure_future(all_synced())
        stopping = asyncio.ensure_future(roots.stopping.wait())
        await asyncio.wait({synced, stopping}, return_when=asyncio.FIRST_COMPLETED)
        synced.cancel()
        stopping.cancel()
        if all(c.synced.is_set() for c in everyone) and not roots.stopping.is_set():
            log.info("controller running", api_server=client.configuration.host, scope=scope,
                     router=cs.router_endpoint, **{c.kind_name: len(c.cache) for c in everyone})
            if on_ready:
                on_ready(str(client.configuration.host))
        await roots.wait()
    finally:
        # Ordered shutdown: stop watching (no new work), stop the workers, then close the clients.
        for watcher in watchers:
            await asyncio.to_thread(watcher.stop)
        await roots.cancel_all()
        await call_soon_safely(router.close, "close router channel")
        await asyncio.to_thread(kinds[0][1].close)
        log.info("controller stopped")
