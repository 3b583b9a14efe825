"""Assembles and runs one router process (``mesh serve router``).

Start-up order. The gRPC port is served as soon as the servers are assembled, with health
NOT_SERVING and every other call answered UNAVAILABLE (``StartGate``); then the view is built
(the mirrors list instances, placements, vModels, failures and graphs; registrations are not
listed: ``SpecCache`` reads them on demand), the background tasks start, the gate opens and
readiness follows the view. So a probe sees NOT_SERVING, not a refused connection, while a router
lists 10,000 placements (BENCHMARKS.md, "Router start-up at scale"), and no call is answered from
a half-built view. A registry that cannot be reached at start is waited for (the same NOT_SERVING,
a warning per attempt), as it is once serving, rather than ending the process: an orchestrator
restarting routers would not bring etcd back."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import structlog
from grpc_reflection.v1alpha import reflection

from mesh import __version__
from mesh.auth import TokenTable
from mesh.errors import MeshError, RegistryUnavailable
from mesh.gen.mmesh import graphs_pb2 as gp
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import status_pb2 as st
from mesh.observability.metrics import RouterMetrics
from mesh.registry import open_store
from mesh.registry.crashes import CrashWitness
from mesh.registry.mirror import PrefixMirror
from mesh.registry.records import InstanceRecord
from mesh.registry.registry import Registry
from mesh.registry.security import etcd_security
from mesh.registry.specs import SpecCache
from mesh.rest.guards import ssl_context
from mesh.rest.server import RestServer
from mesh.router.autoscale import RuntimeAutoscaler, config_from
from mesh.router.dataplane import DataPlane
from mesh.router.fleet import Fleet, FleetWindow, RouterView
from mesh.router.graph_management import GraphManagement
from mesh.router.graph_servicer import GraphsServicer
from mesh.router.grpc_inference import InferenceServicer
from mesh.router.management import Management
from mesh.router.payload_http import payload_log
from mesh.router.reachability import Reachability
from mesh.router.replicas import CopyScaler
from mesh.router.routes import RouteHub
from mesh.router.routes_servicer import RoutesServicer
from mesh.router.servicer import ModelMeshServicer
from mesh.router.status_servicer import StatusServicer
from mesh.router.view import ClusterView
from mesh.settings import Settings
from mesh.tasks import Background, RootTasks, call_soon_safely
from mesh.tracing import tracer_for
from mesh.transport.auth import interceptors_for
from mesh.transport.handlers import generic_handler
from mesh.transport.health import HealthReporter, StartGate
from mesh.transport.inflight import InflightLimit, trim_soon
from mesh.transport.runtime_client import RuntimeClient
from mesh.transport.runtime_link import RuntimeLink
from mesh.transport.server import ChannelPool, bind, new_server
from mesh.transport.tls import peer_interceptors, runtime_channel_security, server_credentials
from placement.scaling import ScalingConfig

log = structlog.get_logger(__name__)


async def serve_router(settings: Settings, roots: RootTasks,
                       on_ready: Callable[[str], None] | None = None,
                       on_rest: Callable[[str], None] | None = None) -> None:
    """Serve until ``roots`` stop; ``on_ready(grpc endpoint)`` once serving, ``on_rest(url)`` too
    when REST is on."""
    rs = settings.router
    # Security settings first: a missing or bad file stops the start here, before anything listens.
    server_tls = server_credentials(settings.tls)
    interceptors = interceptors_for(settings.auth, settings.runtime.model_roots)
    rest_tls = ssl_context(settings.tls) if rs.rest_port >= 0 else None
    autoscaling = config_from(rs) if rs.autoscale_interval_s > 0 else None  # bad bounds stop the start here
    # Payload sinks are parsed here too: a bad URI stops the start naming router.payload_processors.
    payloads = payload_log(rs, f"urn:mesh:router:{socket.gethostname()}")
    channels = ChannelPool(rs.max_message_bytes, runtime_channel_security(settings.tls))
    store, prefix = open_store(settings.registry.url, timeout_s=settings.registry.timeout_s,
                               security=etcd_security(settings.registry))
    registry = Registry(store, prefix)
    view = ClusterView(registry.keys)
    view.count_splits = rs.per_model_metrics  # mesh_vmodel_requests_total: a per-model label
    keys = registry.keys
    mirrors = [
        # After a watch reset the mirrors replay the difference through these same callbacks.
        PrefixMirror(store, keys.instances, view.put_instance, view.delete_instance),
        PrefixMirror(store, keys.placements, view.put_placement, view.delete_placement),
        PrefixMirror(store, keys.vmodels, view.put_vmodel, view.delete_vmodel),
        PrefixMirror(store, keys.failures, view.put_failure, view.delete_failure),
        PrefixMirror(store, keys.graphs, view.put_graph, view.delete_graph),  # inference graphs
    ]
    specs = SpecCache(registry, max_entries=rs.spec_cache_entries)
    witness = CrashWitness(registry, settings.registry.crash_quarantine_s, on_record=view.add_failure,
                           live=RuntimeClient(channels).live)
    runtime_client = RuntimeClient(channels, witness)
    scaler = CopyScaler(view=view, specs=specs, runtimes=runtime_client, load_timeout_s=rs.default_timeout_s,
                        pinned=registry.pinned_models, pin_check_s=rs.min_copies_check_s,
                        config=ScalingConfig(rps_threshold=rs.scale_rps_threshold,
                                             queue_threshold=rs.scale_queue_threshold,
                                             max_copies=rs.scale_max_copies, hold_s=rs.scale_hold_s))

    # Start-up (module docstring): the port serves health at once, everything else once the view is built.
    gate = StartGate("the router is starting: its view of the registry is not built yet; retry shortly "
                     "(its gRPC health says NOT_SERVING until it is)")

    def not_ready() -> str | None:
        """Readiness (health service and V2 ServerReady): None when ready, else why not."""
        if not gate.is_open:
            return "starting: building the view of the registry"
        if not all(m.ready for m in mirrors):
            return "registry not mirrored yet"
        if not store.connected:
            return "registry unreachable"
        if not any(not r.shutting_down for r in view.instances.values()):
            return "no runtime instance in the registry"
        return None

    metrics = RouterMetrics(per_model=rs.per_model_metrics)
    link = RuntimeLink(channels, streams_per_runtime=rs.streams_per_runtime)
    plane = DataPlane(view=view, specs=specs, link=link, max_attempts=rs.max_attempts,
                      load_factor=rs.load_factor, scaler=scaler, ready=lambda: not_ready() is None,
                      access_log=settings.log.access_log, tracer=tracer_for(settings.log, "router"),
                      inflight=InflightLimit(max_bytes=rs.max_inflight_bytes,
                                             max_requests=rs.max_inflight_requests,
                                             max_connection_bytes=rs.max_connection_inflight_bytes,
                                             on_burst=trim_soon()),
                      payloads=payloads[0] if payloads else None,
                      graph_timeout_s=rs.graph_default_timeout_s, graph_max_bytes=rs.max_graph_request_bytes)
    reachability = Reachability(view, runtime_client, rs.unreachable_probe_s, on_unreachable=link.forget)
    plane.on_gone = reachability.mark
    plane.witness = witness
    link.on_missed_deadline = reachability.suspect
    background = Background("router")

    def close_channel(record: InstanceRecord) -> None:
        link.forget(record.endpoint)
        background.spawn(channels.discard(record.endpoint), f"close-channel:{record.endpoint}")

    view.on_instance_gone.append(close_channel)
    management = Management(registry=registry, view=view, runtimes=runtime_client,
                            load_factor=rs.load_factor, load_timeout_s=rs.default_timeout_s, specs=specs,
                            model_roots=settings.runtime.model_roots)
    graphs = GraphManagement(registry=registry, view=view, models=management, max_graphs=rs.max_graphs)

    # --- fleet status (issue 20): mesh status / mesh top / mesh model status read the view ---
    started_ms = int(time.time() * 1000)
    window = FleetWindow(lambda: view.instances.values())
    fleet = Fleet(view=view, window=window, rate=scaler.policy.rate,
                  model_inflight=lambda m: scaler.inflight.get(m, 0), last_request=scaler.policy.observed_at,
                  router=lambda: RouterView(version=__version__, started_ms=started_ms, not_ready=not_ready(),
                                            registry_connected=store.connected,
                                            inflight=sum(n for n in view.inflight.values() if n > 0)),
                  failure_ttl_s=settings.registry.failure_ttl_s,
                  crash_quarantine_s=settings.registry.crash_quarantine_s, clock=scaler.clock)
    # --- end fleet status ---

    server = new_server(rs.max_message_bytes, [gate, *peer_interceptors(settings.tls), *interceptors],
                        max_pending_requests=rs.max_pending_requests,
                        max_streams_per_connection=rs.max_streams_per_connection,
                        max_calls=rs.max_inflight_requests)
    # --- route stream for smart clients (mesh.router.routes; docs/client.md) ---------------------
    # Routes name runtimes' direct ports (runtime.direct_port), never their internal ones; the
    # direct ports speak TLS when the runtimes' ports do (the same certificate), which the router
    # knows from its own channel settings (tls.runtime_ca_file).
    runtime_tls = bool(settings.tls.runtime_ca_file)
    routes = RouteHub(view, max_streams=rs.routes_max_streams, max_queue=rs.routes_queue,
                      interval_s=rs.routes_interval_s, runtime_tls=runtime_tls,
                      max_streams_per_peer=rs.routes_max_streams_per_peer)
    offers_direct = rs.routes_direct
    if rs.routes_direct and server_tls is not None and not runtime_tls:
        # A client that speaks TLS to this router must not be sent to runtimes in plaintext.
        offers_direct = False
        log.warning("direct routing is off: this router serves TLS but dials runtimes in plaintext "
                    "(no tls.runtime_ca_file), so smart clients would send tokens and data to runtimes "
                    "unencrypted; give runtimes TLS, or set router.routes_direct = false to say so")
    routes_servicer = RoutesServicer(
        routes, tokens=TokenTable.load(settings.auth.tokens_file) if settings.auth.tokens_file else None,
        direct=lambda: offers_direct and not_ready() is None, heartbeat_s=rs.routes_heartbeat_s,
        write_timeout_s=rs.routes_write_timeout_s, runtime_tls=runtime_tls,
        runtime_server_name=settings.tls.runtime_server_name)
    # --- end of route stream ------------------------------------------------------------------
    server.add_generic_rpc_handlers((
        routes_servicer.handler(),
        InferenceServicer(plane, metrics).handler(),
        generic_handler(mm.DESCRIPTOR.services_by_name["ModelMesh"],
                        metrics.metered(ModelMeshServicer(management))),
        generic_handler(gp.DESCRIPTOR.services_by_name["ModelMeshGraphs"],
                        metrics.metered(GraphsServicer(graphs))),
        generic_handler(st.DESCRIPTOR.services_by_name["ModelMeshStatus"],  # fleet status (issue 20)
                        metrics.metered(StatusServicer(fleet, registry))),
    ))
    health = HealthReporter(server, ("inference.GRPCInferenceService", "mmesh.ModelMesh", "mmesh.ModelMeshGraphs",
                                     "mmesh.ModelMeshStatus"))
    if rs.reflection:  # after the health service: it is listed too
        reflection.enable_server_reflection(
            ("inference.GRPCInferenceService", "mmesh.ModelMesh", "mmesh.ModelMeshGraphs", "mmesh.ModelMeshRoutes",
             "mmesh.ModelMeshStatus", "grpc.health.v1.Health", reflection.SERVICE_NAME), server)
    port = bind(server, rs.host, rs.port, server_tls)
    # Like the gRPC port, a metrics port in use stops the start-up here, before anything serves.
    stop_metrics = metrics.serve(rs.metrics_host, rs.metrics_port, "router")

    await health.start()  # NOT_SERVING (liveness SERVING) until the view is built and the gate opens
    await server.start()
    roots.spawn(health.follow(not_ready), "readiness")
    log.info("router listening; building its view of the registry", endpoint=f"{rs.host}:{port}")
    try:
        await _build_view(mirrors, specs)
    except BaseException:
        await server.stop(grace=None)
        raise
    # vModels written before the refs index existed get their refs now (idempotent, one registry
    # write per missing ref): deletions check the index, not this router's view.
    try:
        repaired = await registry.repair_refs()
    except MeshError as exc:  # the registry is down or full: the next start repairs; serving goes on
        log.warning("vModel refs not repaired", error=exc.message)
    else:
        if repaired:
            log.info("vModel refs repaired", written=repaired)
    if autoscaling is not None:  # the runtime-scaling signal (deploy/autoscaling reads the gauge)
        autoscaler = RuntimeAutoscaler(view=view, rates=scaler.policy, half_life_s=scaler.policy.config.half_life_s,
                                       list_models=registry.list_models, config=autoscaling,
                                       interval_s=rs.autoscale_interval_s, clock=scaler.clock)
        specs.subscribe(autoscaler.on_registration, autoscaler.on_reset)
        roots.spawn(autoscaler.run(), "runtime-autoscaling")
        if rs.metrics_port >= 0:
            metrics.attach_autoscaling(lambda: autoscaler.signals)
    roots.spawn(specs.run(), "spec-cache-watch")
    roots.spawn(management.run_transitions(), "vmodel-transitions")
    roots.spawn(scaler.run(), "copy-scaling")
    roots.spawn(reachability.run(), "unreachable-probe")
    roots.spawn(routes.run(), "route-stream-table")  # smart clients' routes (mesh.router.routes)
    roots.spawn(window.run(), "fleet-status-readings")  # fleet status (issue 20)
    if payloads is not None:
        roots.spawn(payloads[0].run(), "payload-sinks")
        metrics.attach_payloads(payloads[0].counts)
    if rs.metrics_port >= 0:  # state gauges, and a registry read every 30 s: only when scraped
        metrics.attach(view, scaler.copies_asked)
        roots.spawn(metrics.count_managed(registry.count_models), "count-registered-models")
    rest: RestServer | None = None
    if rs.rest_port >= 0:
        rest = RestServer(plane, metrics, max_body_bytes=rs.max_message_bytes,
                          tokens=TokenTable.load(settings.auth.tokens_file)
                          if settings.auth.tokens_file and settings.auth.data_plane else None,
                          allowed_peers=settings.tls.allowed_peers if settings.tls.client_auth == "require" else ())
        rest_port = await rest.start(rs.host, rs.rest_port, rest_tls)
        rest_url = f"{'https' if rest_tls else 'http'}://{rs.host}:{rest_port}"
        log.info("router REST serving", url=rest_url)
    gate.open()
    await health.update(not_ready())  # now, not at the readiness loop's next tick (0.5 s)
    endpoint = f"{rs.host}:{port}"
    log.info("router serving", endpoint=endpoint, registry=settings.registry.url,
             instances=len(view.instances), tls=server_tls is not None, client_auth=settings.tls.client_auth,
             auth="off" if not interceptors else ("management+data" if settings.auth.data_plane else "management"))
    if on_ready:
        on_ready(endpoint)
    if on_rest and rest is not None:
        on_rest(rest_url)
    try:
        await roots.wait()
    finally:
        # Ordered shutdown: stop accepting and drain in-flight requests (they may be waiting on
        # a cold load), then stop watching and close the connections.
        await health.leave()
        routes_servicer.close()  # route streams end now rather than hold the drain for its whole grace
        if rest is not None:
            await asyncio.gather(server.stop(grace=5.0), rest.stop(grace_s=5.0))
        else:
            await server.stop(grace=5.0)
        if payloads is not None:  # the drained requests' records, within their own grace
            await payloads[0].flush(rs.payload_flush_s)
        await roots.cancel_all()
        if payloads is not None:
            await payloads[1].close()
        for mirror in mirrors:
            await call_soon_safely(mirror.stop, "stop mirror")
        link.close()
        await channels.close()
        await call_soon_safely(store.close, "close registry")
        if stop_metrics is not None:  # last, so that metrics can be read until the end
            await asyncio.to_thread(stop_metrics)
        log.info("router stopped")


async def _build_view(mirrors: list[PrefixMirror], specs: SpecCache,
                      backoff_s: tuple[float, float] = (0.5, 5.0)) -> None:
    """List every mirrored prefix and fix the spec cache's watch revision, retrying while the
    registry cannot be reached (a mirror that listed stays listed: ``start`` is idempotent)."""
    backoff = backoff_s[0]
    while True:
        try:
            for mirror in mirrors:
                await mirror.start()
            await specs.start()
            return
        except RegistryUnavailable as exc:
            log.warning("registry unreachable at start; the router stays NOT_SERVING and retries",
                        error=exc.message, retry_in_s=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, backoff_s[1])
