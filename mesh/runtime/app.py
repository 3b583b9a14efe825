"""Assembles and runs one runtime process (``mesh serve runtime``)."""

from __future__ import annotations

import asyncio
import dataclasses
import faulthandler
import functools
import os
import secrets
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import structlog

from mesh import __version__
from mesh.errors import BadRecord, InvalidArgument
from mesh.observability.metrics import RuntimeMetrics
from mesh.registry import open_store
from mesh.registry.crashes import CrashWitness, record_leftovers
from mesh.registry.records import GPU_LABEL, InstanceRecord, ModelSpec
from mesh.registry.registry import Registry
from mesh.registry.security import etcd_security
from mesh.registry.session import RegistrySession
from mesh.registry.specs import SpecCache
from mesh.runtime.batching import BatchPolicy
from mesh.runtime.cache import DeviceBudget, LoadFn, ModelCache
from mesh.runtime.capacity import GpuMemory, device_capacities, ram_capacity
from mesh.runtime.failures import RecentFailures, RememberingCache
from mesh.runtime.forwarding import ForwardingModel
from mesh.runtime.gpu import nvml_reader
from mesh.runtime.journal import LoadJournal, journal_dir
from mesh.runtime.libraries import IMPORTS
from mesh.runtime.loaders import canonical_type, supported_types, with_aliases
from mesh.runtime.loaders.base import LoadedModel, LoadPolicy
from mesh.runtime.publisher import Publisher
from mesh.runtime.rehome import drain, rehome
from mesh.runtime.servers import KINDS, ExternalServer, external_server
from mesh.runtime.service import (
    RuntimeService,
    SizePredictor,
    choose_device,
    load_model,
    prepare_load,
    warm_imports,
)
from mesh.runtime.servicer import add_direct_to_server, add_to_server
from mesh.runtime.workers import MAX_WORKERS, WorkerPool, set_dumpable
from mesh.settings import RuntimeSettings, Settings
from mesh.storage.puller import Puller
from mesh.tasks import RootTasks, call_soon_safely
from mesh.tracing import tracer_for
from mesh.transport.auth import runtime_interceptors
from mesh.transport.health import HealthReporter
from mesh.transport.inflight import InflightLimit, trim_soon
from mesh.transport.runtime_client import RuntimeClient
from mesh.transport.server import FRAME_HEADROOM, ChannelPool, bind, new_server
from mesh.transport.tls import peer_interceptors, runtime_channel_security, server_credentials
from placement.policy import EvictionPolicy
from placement.registry import build_policy
from placement.sizing import SizeEstimator

log = structlog.get_logger(__name__)


def device_policy(name: str, capacity_bytes: int) -> EvictionPolicy:
    """The configured eviction policy for one device's budget (admission filters and S3-FIFO size
    themselves from the capacity)."""
    try:
        return build_policy(name, capacity_bytes)
    except ValueError as exc:
        raise InvalidArgument(f"setting runtime.eviction_policy: {exc}") from None


# Nothing is in flight when the server stops (``drain``); this covers a request that raced it.
STOP_GRACE_S = 0.5


async def _rehome(settings: Settings, registry: Registry, cache: ModelCache, instance_id: str) -> None:
    rs = settings.runtime
    channels = ChannelPool(settings.router.max_message_bytes, runtime_channel_security(settings.tls))
    # A peer that dies loading a re-homed copy quarantines the model, as a router's call would.
    witness = CrashWitness(registry, settings.registry.crash_quarantine_s, live=RuntimeClient(channels).live)
    started = time.monotonic()
    try:
        async with asyncio.timeout(rs.rehome_timeout_s):
            result = await rehome(instance_id=instance_id, registry=registry, cache=cache,
                                  runtimes=RuntimeClient(channels, witness), load_factor=settings.router.load_factor,
                                  recent_s=rs.rehome_recent_s, max_models=rs.rehome_max_models,
                                  timeout_s=rs.rehome_timeout_s)
        log.info("re-homed models", seconds=round(time.monotonic() - started, 3), **vars(result))
    except TimeoutError:
        log.warning("re-homing not finished before its deadline; exiting anyway",
                    timeout_s=rs.rehome_timeout_s)
    finally:
        await channels.close()


async def claim_instance_id(registry: Registry, instance_id: str, endpoint: str, lease_ttl_s: float) -> None:
    """Refuse to start under an instance ID another live runtime holds: two processes writing one
    instance key overwrite each other's records and placements. A record left by this instance's
    previous life (same endpoint), or one whose owner died, is not in the way: the latter vanishes
    with its lease, which is waited for (a restarted pod keeps its name, so its ID)."""
    key = registry.keys.instance(instance_id)
    deadline = time.monotonic() + lease_ttl_s + 2.0
    while True:
        found = await registry.store.get(key)
        if found is None:
            return
        try:
            holder = InstanceRecord.from_json(found.value)
        except BadRecord:
            return  # not a runtime's record: ours overwrites it
        if holder.endpoint == endpoint:
            return
        if time.monotonic() > deadline:
            raise InvalidArgument(f"instance ID {instance_id!r} is in use by the runtime at {holder.endpoint}; "
                                  "give each runtime its own runtime.instance_id")
        log.info("instance ID in use; waiting for the holder's lease to expire", instance_id=instance_id,
                 holder=holder.endpoint)
        await asyncio.sleep(0.5)


def journaled(load_fn: LoadFn, journal: LoadJournal) -> LoadFn:
    """``load_fn`` with its call written down in the journal, in the load's own thread."""
    def load(spec: ModelSpec, device: str) -> LoadedModel:
        return journal.run(spec, load_fn, spec, device)
    return load


def new_instance_id() -> str:
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(2)}"


async def serve_runtime(settings: Settings, roots: RootTasks,
                        on_ready: Callable[[str], None] | None = None, *,
                        gpus: GpuMemory | None = None, load_fn: LoadFn | None = None) -> None:
    """Run one runtime until ``roots`` stops. ``gpus`` and ``load_fn`` replace the machine's GPUs
    (NVML) and the built-in loaders: tests pass stand-ins for a GPU this machine lacks."""
    rs = settings.runtime
    instance_id = rs.instance_id or new_instance_id()
    structlog.contextvars.bind_contextvars(instance_id=instance_id)
    # Security settings first: a missing or bad file stops the start here, before anything listens.
    server_tls = server_credentials(settings.tls)
    # The direct port (smart clients, docs/client.md): the same certificate, no client certificate
    # asked (clients have none; the internal port keeps its own rule), tokens as the router checks them.
    if not -1 <= rs.direct_port <= 65535:
        raise InvalidArgument(f"setting runtime.direct_port: {rs.direct_port} is not a port (-1: off, 0: a free one)")
    direct_tls = (server_credentials(dataclasses.replace(settings.tls, client_auth="none", client_ca_file="",
                                                         allowed_peers=()))
                  if rs.direct_port >= 0 else None)
    direct_tokens = runtime_interceptors(settings.auth) if rs.direct_port >= 0 else []
    if settings.auth.data_plane and not settings.tls.allowed_peers:
        log.warning("the runtime's internal port (ModelRuntime SPI, the routers' multiplexed stream) checks no "
                    "tokens: keep clients off it with tls.allowed_peers or a network policy; smart clients use "
                    "runtime.direct_port (docs/security.md)")
    store, prefix = open_store(settings.registry.url, timeout_s=settings.registry.timeout_s,
                               security=etcd_security(settings.registry))
    registry = Registry(store, prefix)
    if rs.server:
        # An external server runs the models (mesh.runtime.servers): we advertise its types.
        if rs.server.strip().lower() not in KINDS:
            raise InvalidArgument(f"runtime.server must be one of {', '.join(KINDS)} or empty, not {rs.server!r}")
        if rs.workers:
            raise InvalidArgument("runtime.workers and runtime.server exclude each other: with an external "
                                  "server the runtime runs no model code")
        types = [t.lower() for t in (rs.server_types or KINDS[rs.server.strip().lower()].default_types)]
    else:
        types = [t.lower() for t in (rs.supported_types or tuple(supported_types()))]
        # Before anything is published: a type whose library is not installed (or, preloaded, fails
        # to import) is not advertised. Other libraries are imported at their type's first load
        # (mesh.runtime.libraries); with model workers, the workers import them, not this process.
        try:
            preload = [] if rs.workers else [canonical_type(t) for t in rs.preload_types]
        except InvalidArgument as exc:
            raise InvalidArgument(f"setting runtime.preload_types: {exc.message}") from None
        types = with_aliases(await warm_imports(types, rs.warm_imports_timeout_s, preload))
    # Then the GPUs: which types can use them, with the CUDA context created before the budgets
    # are read (it is nobody's model). A GPU no supported type can use gets no budget.
    gpus = gpus or GpuMemory(nvml_reader(), rs)
    gpu_types = [] if rs.server else await gpus.usable_types(types)
    # Each GPU's copies predict on threads of their own (RuntimeSettings.gpu_inference_threads),
    # whose per-thread cuBLAS state is created now, before the budgets are read, too.
    gpu_devices = [f"gpu{info.index}" for info in gpus.reader.devices()] if gpu_types else []
    device_pools = {d: ThreadPoolExecutor(max(1, rs.gpu_inference_threads), thread_name_prefix=f"infer-{d}")
                    for d in gpu_devices}
    for device, pool in device_pools.items():
        await asyncio.get_running_loop().run_in_executor(pool, gpus.warm_thread, device, gpu_types)

    capacities = device_capacities(rs, gpus) if gpu_types else {"ram": ram_capacity(rs)}
    budgets = [ram_budget(rs, c) if d == "ram" else
               DeviceBudget(device=d, capacity_bytes=c, policy=device_policy(rs.eviction_policy, c))
               for d, c in capacities.items()]
    # Models in object storage are pulled into the disk cache first (mesh.storage.puller); the
    # loaders may read there and in the claims' mounts besides the model roots.
    puller = Puller(settings.storage, model_roots=rs.model_roots)
    await asyncio.to_thread(puller.start)
    load_roots = rs.model_roots + puller.roots() if rs.model_roots else ()
    policy = LoadPolicy(roots=load_roots, allow_code_formats=rs.allow_code_formats,
                        trusted_types=rs.skops_trusted_types)
    if not rs.model_roots:
        log.warning("model paths are not confined: a registration may name any file this process can "
                    "read; set runtime.model_roots (docs/security.md)")
    workers: WorkerPool | None = None
    external: ExternalServer | None = None
    if not 0 <= rs.workers <= MAX_WORKERS:
        raise InvalidArgument(f"runtime.workers must be 0 to {MAX_WORKERS}, not {rs.workers}")

    # Made further down; the callbacks below are called only once they are.
    cache: RememberingCache
    sizer: SizePredictor
    publisher: Publisher

    # A worker or external server that dies takes its models with it; they are unloaded here
    # (placements withdrawn), and requests for them load them again.
    async def lost(model_ids: list[str]) -> None:
        for model_id in model_ids:
            entry = cache.get(model_id)
            if entry is not None and isinstance(entry.model, ForwardingModel) and entry.model.lost:
                await call_soon_safely(functools.partial(cache.unload, model_id, reason="its worker or server died"),
                                       f"unload {model_id[:100]}")

    if rs.server and load_fn is None:
        external = external_server(rs.server, rs.server_address, repository=rs.server_repository, types=types,
                                   policy=policy, load_timeout_s=rs.load_timeout_s,
                                   predict_timeout_s=rs.predict_timeout_s,
                                   max_message_bytes=settings.router.max_message_bytes,
                                   predict_size=lambda spec: sizer.predict(spec), on_lost=lost)
        await asyncio.to_thread(external.start)
        load_fn = external.load
    if rs.workers and load_fn is None:  # a stand-in load_fn (tests) stays in process
        # Model code runs in workers that hold no credentials (mesh.runtime.workers).
        if not set_dumpable(False):
            log.warning("could not make the runtime non-dumpable: model workers running as its user can read "
                        "its /proc environment")
        workers = WorkerPool(rs.workers, policy, load_timeout_s=rs.load_timeout_s, warm=tuple(types),
                             max_model_bytes=rs.worker_memory_bytes or capacities["ram"],
                             predict_timeout_s=rs.predict_timeout_s,
                             max_answer_bytes=settings.router.max_message_bytes, on_lost=lost)
        await asyncio.to_thread(workers.start)
        load_fn = workers.load
    load_fn = load_fn or functools.partial(load_model, policy=policy)
    # The loads in progress, written down before each starts: after a crash, the restarted
    # runtime says which model killed it (mesh.runtime.journal).
    # Read after the instance ID is claimed: a start that fails leaves it for the next.
    journal = LoadJournal(journal_dir(instance_id, rs.state_dir))
    load_fn = journaled(load_fn, journal)
    sizer = SizePredictor(SizeEstimator(default_ratio=rs.size_ratio,
                                        floor_bytes=rs.default_model_size_bytes), roots=load_roots)
    load_pool = ThreadPoolExecutor(rs.max_concurrent_loads, thread_name_prefix="load")
    infer_pool = ThreadPoolExecutor(rs.inference_threads, thread_name_prefix="infer")
    cache = RememberingCache(budgets=budgets, load_fn=load_fn, predict_size=sizer.predict,
                             observe_size=sizer.observe, choose_device=choose_device, executor=load_pool,
                             max_concurrent_loads=rs.max_concurrent_loads, load_timeout_s=rs.load_timeout_s,
                             # with workers, the library is imported there, not here
                             prepare_fn=None if rs.server or workers else prepare_load, estimate_fn=sizer.prepare,
                             max_stuck_loads=rs.max_stuck_loads, size_floor_bytes=rs.default_model_size_bytes,
                             failures=RecentFailures(settings.registry.failure_ttl_s), gpu_usage=gpus.usage,
                             device_executors=device_pools,
                             before_load=lambda entry: publisher.announce(entry), fetch=puller,
                             process_activity=IMPORTS.activity)
    specs = SpecCache(registry, max_entries=10_000, deletes_only=True)  # it needs deletions only
    metrics = RuntimeMetrics(per_model=rs.per_model_metrics)
    puller.metrics = metrics
    service = RuntimeService(instance_id=instance_id, cache=cache, specs=specs,
                             infer_executor=infer_pool, sizer=sizer, types=types,
                             inline_predict_ms=rs.inline_predict_ms, metrics=metrics,
                             limit=InflightLimit(max_bytes=settings.router.max_inflight_bytes,
                                                 max_requests=settings.router.max_inflight_requests,
                                                 on_burst=trim_soon()),
                             device_executors=device_pools,
                             batching=BatchPolicy(rs.batch_max_size, rs.batch_max_wait_ms, rs.batch_max_queue))

    # Only the mesh's routers (and re-homing runtimes) may call the runtime port, when their
    # certificate names are configured; then their frames' registrations are trusted too.
    peers = peer_interceptors(settings.tls)
    server = new_server(settings.router.max_message_bytes + FRAME_HEADROOM, peers,
                        max_pending_requests=settings.router.max_pending_requests,
                        max_streams_per_connection=settings.router.max_streams_per_connection,
                        max_calls=settings.router.max_inflight_requests)
    add_to_server(server, service, status={
        "status": 1, "capacityInBytes": capacities["ram"],
        "maxLoadingConcurrency": rs.max_concurrent_loads,
        "modelLoadingTimeoutMs": int(rs.load_timeout_s * 1000),
        "defaultModelSizeInBytes": rs.default_model_size_bytes, "runtimeVersion": __version__},
        max_message_bytes=settings.router.max_message_bytes,
        access_log=settings.log.access_log, tracer=tracer_for(settings.log, "runtime"),
        trust_frame_specs=bool(peers))
    health = HealthReporter(server, ("inference.GRPCInferenceService", "mmesh.ModelRuntime"))
    port = bind(server, rs.host, rs.port, server_tls)
    # Like the gRPC port, a metrics port in use stops the start-up here, before anything serves.
    stop_metrics = metrics.serve(rs.metrics_host, rs.metrics_port, "runtime")
    endpoint = f"{rs.advertise_host or rs.host}:{port}"
    direct_server = (new_server(settings.router.max_message_bytes, direct_tokens,
                                max_pending_requests=settings.router.max_pending_requests,
                                max_streams_per_connection=settings.router.max_streams_per_connection,
                                max_calls=settings.router.max_inflight_requests)
                     if rs.direct_port >= 0 else None)
    direct_endpoint = ""
    if direct_server is not None:
        add_direct_to_server(direct_server, service, max_message_bytes=settings.router.max_message_bytes,
                             access_log=settings.log.access_log, tracer=tracer_for(settings.log, "runtime"))
        direct_endpoint = f"{rs.advertise_host or rs.host}:{bind(direct_server, rs.host, rs.direct_port, direct_tls)}"
    has_gpu = len(capacities) > 1
    labels = tuple(rs.labels) + ((GPU_LABEL,) if has_gpu and GPU_LABEL not in rs.labels else ())
    base = InstanceRecord(instance_id=instance_id, endpoint=endpoint, labels=labels, zone=rs.zone,
                          supported_types=tuple(types), gpu_types=tuple(gpu_types if has_gpu else ()),
                          version=__version__,
                          started_ms=int(time.time() * 1000),
                          direct_endpoint=direct_endpoint, direct_tls=direct_tls is not None)

    session = RegistrySession(store, settings.registry.lease_ttl_s)
    publisher = Publisher(registry=registry, session=session, instance=base, cache_ref=lambda: cache,
                          requests=lambda: service.requests, publish_interval_s=rs.publish_interval_s,
                          failure_ttl_s=settings.registry.failure_ttl_s,
                          cache_requests=lambda: (metrics.hit_count, metrics.miss_count))  # mesh status
    publisher.max_stuck_loads = rs.max_stuck_loads
    if external is not None:  # a server that went down takes no loads: routers load elsewhere
        server_state = external

        async def publish_state() -> None:
            await publisher.publish_instance(force=True)

        publisher.takes_loads = lambda: not server_state.down
        external.on_state = publish_state
    cache.set_listener(publisher)
    metrics.attach(cache, gpus if has_gpu else None, IMPORTS.imported)

    def not_ready() -> str | None:
        """Readiness (health service): None when ready, else why not."""
        if not service.ready:
            return "not registered yet"
        lease = session.lease
        if lease is None or lease.lost.is_set():
            return "registry lease lost"
        if not store.connected:
            return "registry unreachable"
        if external is not None and external.down:
            return f"the {external.kind} model server at {external.address} does not answer"
        if len(cache.stuck_loads) >= rs.max_stuck_loads:
            return f"{len(cache.stuck_loads)} loads are stuck; no more loads until they end or a restart"
        return None

    # Before anything of ours is published (the publisher would overwrite the holder's record).
    try:
        await claim_instance_id(registry, instance_id, endpoint, settings.registry.lease_ttl_s)
    except BaseException:
        journal.release()
        if stop_metrics is not None:
            await asyncio.to_thread(stop_metrics)
        await call_soon_safely(store.close, "close registry")
        raise
    leftovers = await asyncio.to_thread(journal.recover)
    if not faulthandler.is_enabled():  # a process of its own (under pytest, pytest holds it)
        journal.watch_fatal_signals()
    elif journal.enabled and os.environ.get("PYTHONFAULTHANDLER"):
        log.warning("fatal-signal log off: PYTHONFAULTHANDLER has faulthandler write to stderr; a model "
                    "that crashes this process is quarantined for registry.crash_quarantine_s only")
    await session.start()
    await specs.start()
    witness = CrashWitness(registry, settings.registry.crash_quarantine_s)
    if leftovers:
        written = await record_leftovers(witness, instance_id, leftovers)
        log.warning("the last run of this runtime died while loading models", models=[
            {"model_id": left.model_id, "guilty": left.guilty, "fatal": left.fatal} for left in leftovers[:20]],
            quarantined=written)
    roots.spawn(specs.run(), "spec-cache-watch")
    roots.spawn(publisher.run(), "publisher")
    if workers is not None:
        roots.spawn(workers.supervise(), "model-workers")
    if external is not None:
        roots.spawn(external.supervise(), "model-server")
    if has_gpu:
        roots.spawn(gpus.follow(cache), "gpu-budgets")
    await health.start()
    health_server = await health.serve_plaintext(rs.host, rs.health_port)
    await server.start()
    if direct_server is not None:
        await direct_server.start()
    await publisher.publish_instance(force=True)
    service.ready = True
    roots.spawn(health.follow(not_ready), "readiness")
    log.info("runtime serving", endpoint=endpoint, direct_endpoint=direct_endpoint or None,
             capacity={d: c for d, c in capacities.items()}, types=types, gpu_types=list(base.gpu_types))
    if on_ready:
        on_ready(endpoint)
    try:
        await roots.wait()
    finally:
        # Ordered shutdown:
        # 1. Say we are leaving: routers stop choosing this instance for new requests and loads.
        service.ready = False
        service.leaving = True  # refuse loads at once: a runtime leaving with us may be re-homing
        publisher.shutting_down = True
        await health.leave()
        await call_soon_safely(lambda: publisher.publish_instance(force=True), "publish shutting-down")
        # 2. Re-home the hot models: load them on other instances while our copies still serve
        #    (bounded by rehome_timeout_s; see mesh.runtime.rehome for why the runtime does it).
        await call_soon_safely(lambda: _rehome(settings, registry, cache, instance_id),
                               "re-home models")
        # 3. Withdraw our placements (routers send nothing more here), let in-flight requests
        #    finish, then stop. The routers' streams never end by themselves, so rather than
        #    wait a fixed grace for them, stop once nothing is in flight.
        await call_soon_safely(publisher.withdraw, "withdraw placements")
        left = await drain(lambda: service.inflight, lambda: service.last_started, rs.drain_timeout_s)
        log.info("drained", in_flight_left=left)
        if direct_server is not None:  # its clients had no route here since the shutting-down record
            await direct_server.stop(grace=STOP_GRACE_S)
        await server.stop(grace=STOP_GRACE_S)
        if health_server is not None:
            await health_server.stop(grace=None)
        # 4. Leave the registry: revoking the lease removes our instance and placements at once.
        await call_soon_safely(lambda: session.close(revoke=True), "revoke lease")
        # 5. Stop the background loops, release the models and threads.
        await roots.cancel_all()
        if workers is not None:  # first: their copies then close at once, with no call to make
            await asyncio.to_thread(workers.close)
            set_dumpable(True)
        if external is not None:
            external.stopping = True  # a hung server gets 2 s, once, not 30 s per model
        await call_soon_safely(cache.close, "unload models")  # an external server's: unloaded there too
        if external is not None:
            await call_soon_safely(external.aclose, "close the model server's channels")
        load_pool.shutdown(wait=False, cancel_futures=True)
        puller.close()
        await asyncio.to_thread(journal.close)
        infer_pool.shutdown(wait=False, cancel_futures=True)
        for pool in device_pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        await call_soon_safely(store.close, "close registry")
        # 6. Metrics last, so that they can be read until the end.
        if stop_metrics is not None:
            await asyncio.to_thread(stop_metrics)
        log.info("runtime stopped")


def ram_budget(rs: RuntimeSettings, capacity: int) -> DeviceBudget:
    """The RAM budget: ``capacity`` less the pass-through room (``runtime.passthrough_bytes``,
    mesh.runtime.cache), which must leave the main room at least as much as it holds itself."""
    pool = rs.passthrough_bytes
    if pool < 0 or pool > capacity // 2:
        raise InvalidArgument(f"runtime.passthrough_bytes is {pool}: it must be 0 to half the RAM capacity "
                              f"({capacity // 2} of {capacity} bytes), since admitted models get the rest")
    main = capacity - pool
    return DeviceBudget(device="ram", capacity_bytes=main, policy=device_policy(rs.eviction_policy, main),
                        pool_capacity_bytes=pool)
