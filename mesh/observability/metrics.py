"""Prometheus metrics of the router and the runtime; the catalogue is ``docs/metrics.md``.

Each component has its own ``CollectorRegistry`` (several components share one process in tests
and in embedding applications) served over HTTP by ``serve_metrics``. Names, labels, units and
buckets follow ModelMesh where it has a metric of the same meaning, so that its dashboards keep
working; ours start with ``mesh_``.

Two kinds of metric, kept apart on purpose:

* Events (requests, loads, evictions) are counted where they happen, with ``prometheus_client``'s
  own thread-safe objects. On the router's forwarding path that is a few microseconds per request:
  the labelled children are bound once per (method, code) and kept in a dict, the clock is
  ``time.perf_counter``, and nothing else is allocated. Per-model labels, which make one series per
  model, are only used with ``per_model_metrics`` on (off by default, as in ModelMesh).
* State (capacity, bytes used, LRU time, copies, instances) is not copied into gauges as it
  changes: it is read from the component's own structures (the cache's accounting, the router's
  cluster view) when Prometheus scrapes. The scrape runs on the HTTP server's thread while those
  structures belong to the event loop, so the reading is handed to the loop
  (``call_soon_threadsafe``) and the thread waits for it: the figures of one scrape are consistent
  with each other, and no dict is iterated while the loop changes it.

The one state figure that costs a registry read, the number of registered models, is refreshed
every 30 s by a root task (``RouterMetrics.count_managed``), not per scrape.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mesh.auth import failure_counts
from mesh.errors import MeshError, Unavailable
from mesh.registry.records import LOADED, bad_records

if TYPE_CHECKING:
    from mesh.router.view import ClusterView
    from mesh.runtime.cache import Entry, ModelCache
    from mesh.runtime.capacity import GpuMemory
    from placement.autoscale import Signal

log = structlog.get_logger(__name__)

# ModelMesh's buckets (``Metrics.java``): timings 0.5 ms .. 300 s; ages 30 s .. 90 days; model
# sizes from 256 KiB and message sizes from 128 B, x4 each step.
MS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 75, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 60000,
              120000, 300000)
_S, _MIN, _H, _D = 1000, 60_000, 3_600_000, 86_400_000
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # requests per dynamic batch
AGE_BUCKETS_MS = (30 * _S, 5 * _MIN, 15 * _MIN, _H, 4 * _H, 12 * _H, _D, 7 * _D, 30 * _D, 90 * _D)
MODEL_SIZE_BUCKETS = tuple(256 * 1024 * 4**i for i in range(8))
# predicted / measured size of a load (issue 18): 1 is exact
PREDICTION_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 4.0, 8.0, 16.0)
MESSAGE_SIZE_BUCKETS = tuple(128 * 4**i for i in range(8))

MANAGED_COUNT_INTERVAL_S = 30.0
SCRAPE_WAIT_S = 5.0  # longest a scrape waits for the event loop to read the state
EVICTED_IDS_KEPT = 100_000  # runtime: model IDs remembered as evicted (cold vs evicted misses)
COPY_BUCKETS = 8  # mesh_models_by_copies: 1, 2, ..., 7, "8+"
INFER = "ModelInfer"


def status_name(exc: BaseException) -> str:
    """The gRPC status name an exception becomes (as ``mesh.transport.status`` maps it)."""
    if isinstance(exc, MeshError):
        return exc.code.value
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return "INTERNAL"


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[int, Callable[[], None]]:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread.

    Returns the port (the one picked when ``port`` is 0) and a function that stops the server
    (it blocks for up to half a second: call it from a thread)."""
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise Unavailable(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; choose another "
                          "metrics_port (0 picks a free one, -1 turns metrics off)") from None

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(SCRAPE_WAIT_S)

    return server.server_port, stop


def run_on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], list[Metric]]) -> list[Metric]:
    """``fn()`` run on ``loop``'s thread, waited for from another thread (a scrape)."""
    try:
        if asyncio.get_running_loop() is loop:
            return fn()
    except RuntimeError:
        pass  # no loop in this thread: the usual case, the HTTP server's thread
    done: concurrent.futures.Future[list[Metric]] = concurrent.futures.Future()

    def run() -> None:
        try:
            done.set_result(fn())
        except BaseException as exc:
            done.set_exception(exc)

    try:
        loop.call_soon_threadsafe(run)
    except RuntimeError:
        return []  # the loop is closed: the component has stopped
    return done.result(SCRAPE_WAIT_S)


class _StateCollector(Collector):
    """Families computed at scrape time on the component's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, build: Callable[[], list[Metric]]) -> None:
        self._loop = loop
        self._build = build

    def collect(self) -> Iterable[Metric]:
        try:
            return run_on_loop(self._loop, self._build)
        except Exception as exc:
            # The event metrics are still worth serving when the state cannot be read (a loop
            # busy for seconds is itself worth a log line).
            log.warning("reading state for metrics failed", error=repr(exc))
            return []


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class _CallbackCollector(Collector):
    """Families computed at scrape time from thread-safe reads (no event loop needed)."""

    def __init__(self, build: Callable[[], list[Metric]]) -> None:
        self._build = build

    def collect(self) -> Iterable[Metric]:
        return self._build()


def _auth_failures() -> list[Metric]:
    family = CounterMetricFamily("mesh_auth_failures", "Calls refused for who made them: a missing or "
                                 "unknown token, a token without the right, an unreadable request, a "
                                 "client certificate not in tls.allowed_peers", labels=["kind"])
    counts = failure_counts()
    for kind in ("unauthenticated", "permission_denied", "invalid", "peer_refused"):
        family.add_metric([kind], counts.get(kind, 0))
    return [family]


class _ComponentMetrics:
    def __init__(self, per_model: bool) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series (ModelMesh has none)
        self.per_model = per_model
        self.registry = CollectorRegistry()
        # The process's own figures (CPU, memory, file descriptors, GC), as the default registry has.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        self.registry.register(_CallbackCollector(lambda: [_counter(
            "mesh_registry_bad_records", "Registry values this process could not decode (skipped)",
            bad_records())]))
        self.registry.register(_CallbackCollector(_auth_failures))

    def serve(self, host: str, port: int, component: str) -> Callable[[], None] | None:
        """Start serving (``port`` -1: metrics off); the stop function, or None."""
        if port < 0:
            return None
        actual, stop = serve_metrics(self.registry, host, port)
        log.info("metrics serving", component=component, url=f"http://{host}:{actual}/metrics")
        return stop


class RouterMetrics(_ComponentMetrics):
    def __init__(self, *, per_model: bool = False) -> None:
        super().__init__(per_model)
        per = ("model_id", "vmodel_id") if per_model else ()
        self.api_request = Histogram(
            "modelmesh_api_request_milliseconds", "External gRPC requests (V2 data plane and "
            "management API) by method and status", ("method", "code", *per), buckets=MS_BUCKETS,
            registry=self.registry)
        self.request_size = Histogram(
            "modelmesh_request_size_bytes", "Size of forwarded inference requests", ("method", *per),
            buckets=MESSAGE_SIZE_BUCKETS, registry=self.registry)
        self.response_size = Histogram(
            "modelmesh_response_size_bytes", "Size of forwarded inference responses", ("method", *per),
            buckets=MESSAGE_SIZE_BUCKETS, registry=self.registry)
        self.managed: int | None = None  # registered models, counted by ``count_managed``
        # (method, code) -> bound children (api_request, request size or None, response size)
        self._bound: dict[tuple[str, str], tuple[Any, Any, Any]] = {}

    # --- events -------------------------------------------------------------------------------
    def request(self, method: str, code: str, started: float, request: Any = None,
                response: Any = None, model_id: str = "", vmodel_id: str = "") -> None:
        """One external request, ``started`` at that ``perf_counter()``. ``method`` is the short
        name or the full path (``/inference.GRPCInferenceService/ModelInfer``); sizes are
        recorded for ModelInfer (``request`` always, ``response`` when there is one)."""
        elapsed_ms = (time.perf_counter() - started) * 1000
        if self.per_model:
            self._request_per_model(method, code, elapsed_ms, request, response, model_id, vmodel_id)
            return
        bound = self._bound.get((method, code))
        if bound is None:
            bound = self._bind(method, code)
        bound[0].observe(elapsed_ms)
        if bound[1] is not None and request is not None:
            bound[1].observe(len(request))
            if response is not None:
                bound[2].observe(len(response))

    def _bind(self, method: str, code: str) -> tuple[Any, Any, Any]:
        name = method.rpartition("/")[2]
        sized = name == INFER
        bound = (self.api_request.labels(name, code),
                 self.request_size.labels(name) if sized else None,
                 self.response_size.labels(name) if sized else None)
        self._bound[(method, code)] = bound
        return bound

    def _request_per_model(self, method: str, code: str, elapsed_ms: float, request: Any,
                           response: Any, model_id: str, vmodel_id: str) -> None:
        name = method.rpartition("/")[2]
        self.api_request.labels(name, code, model_id, vmodel_id).observe(elapsed_ms)
        if name == INFER and request is not None:
            self.request_size.labels(name, model_id, vmodel_id).observe(len(request))
            if response is not None:
                self.response_size.labels(name, model_id, vmodel_id).observe(len(response))

    def timed(self, name: str, fn: Callable[[Any, Any], Awaitable[Any]],
              model_labels: Callable[[Any, Any], tuple[str, str]] | None = None
              ) -> Callable[[Any, Any], Awaitable[Any]]:
        """The gRPC handler ``fn(request, context)`` recording ``api_request`` (and the sizes for
        ModelInfer, whose request and response are bytes) as method ``name``. The status is the
        one the handler aborted with (``context.code()``). ``model_labels(request, context)``
        gives (model ID, vModel ID), asked only with per-model labels on."""
        record = self.request
        labels = (model_labels or _request_ids) if self.per_model else None

        async def call(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            try:
                response = await fn(request, context)
            except BaseException as exc:
                ids = labels(request, context) if labels is not None else ("", "")
                record(name, _aborted_code(context, exc), started, request, None, *ids)
                raise
            if labels is None:
                record(name, "OK", started, request, response)
            else:
                record(name, "OK", started, request, response, *labels(request, context))
            return response

        return call

    def metered(self, servicer: object) -> object:
        """``servicer`` with each method, as ``generic_handler`` looks it up by name, ``timed``."""
        return _Metered(servicer, self)

    # --- state --------------------------------------------------------------------------------
    def attach(self, view: ClusterView, copies_asked: Mapping[str, int]) -> None:
        """Read the cluster gauges from ``view`` (on the running loop) when scraped."""
        loop = asyncio.get_running_loop()
        self.registry.register(_StateCollector(loop, lambda: self._cluster(view, copies_asked)))

    def _cluster(self, view: ClusterView, copies_asked: Mapping[str, int]) -> list[Metric]:
        loaded: dict[str, int] = {}
        for model_id, copies in view.placements.items():
            n = sum(1 for p in copies.values() if p.state == LOADED)
            if n:
                loaded[model_id] = n
        out: list[Metric] = [
            _gauge("modelmesh_models_loaded_total", "Models with at least one loaded copy",
                   len(loaded)),
            _gauge("modelmesh_models_with_failure_total", "Models with a live load-failure record",
                   len(view.failures)),
        ]
        managed = GaugeMetricFamily("modelmesh_models_managed_total",
                                    f"Registered models (counted every {MANAGED_COUNT_INTERVAL_S:g} s)")
        if self.managed is not None:
            managed.add_metric([], self.managed)
        out.append(managed)
        histogram = [0] * COPY_BUCKETS
        for n in loaded.values():
            histogram[min(n, COPY_BUCKETS) - 1] += 1
        by_copies = GaugeMetricFamily("mesh_models_by_copies", "Models with that many loaded copies",
                                      labels=["copies"])
        for i, count in enumerate(histogram):
            by_copies.add_metric([str(i + 1) if i + 1 < COPY_BUCKETS else f"{COPY_BUCKETS}+"], count)
        out.append(by_copies)
        if self.per_model:
            per_model = GaugeMetricFamily("mesh_model_copies", "Loaded copies of each model",
                                          labels=["model_id"])
            for model_id, n in loaded.items():
                per_model.add_metric([model_id], n)
            out.append(per_model)
        instances = GaugeMetricFamily("mesh_router_instances", "Runtime instances in this router's view",
                                      labels=["state"])
        leaving = sum(1 for r in view.instances.values() if r.shutting_down)
        instances.add_metric(["ready"], len(view.instances) - leaving)
        instances.add_metric(["shutting_down"], leaving)
        out.append(instances)
        changes = CounterMetricFamily("mesh_copy_changes", "Copies this router asked runtimes to load",
                                      labels=["change", "reason"])
        for reason in ("hot", "min_copies"):
            changes.add_metric(["added", reason], copies_asked.get(reason, 0))
        out.append(changes)
        if self.per_model:  # traffic splits (canaries): a per-model label, so opt-in
            out.append(_split_requests(view))
        return out

    def attach_autoscaling(self, signals: Callable[[], Mapping[str, Signal]]) -> None:
        """Export the runtime-scaling signal (``mesh.router.autoscale``): ``signals()`` is the
        last decision per runtime group, a dict replaced whole on the loop (read from any thread)."""
        self.registry.register(_CallbackCollector(lambda: _autoscaling(signals())))

    def attach_payloads(self, counts: Callable[[], Iterable[tuple[str, int, int, int]]]) -> None:
        """Export the payload sinks' counters (``mesh.router.payloads``): ``counts()`` gives
        (sink, sent, failed, dropped), plain ints the loop increments (read from any thread)."""
        self.registry.register(_CallbackCollector(lambda: _payload_records(counts())))

    async def count_managed(self, count: Callable[[], Awaitable[int]],
                            interval_s: float = MANAGED_COUNT_INTERVAL_S) -> None:
        """Root task: refresh ``modelmesh_models_managed_total`` (a registry read; not per scrape)."""
        while True:
            try:
                self.managed = await count()
            except Exception as exc:
                log.warning("counting registered models failed; will retry", error=str(exc))
            await asyncio.sleep(interval_s)


# --- traffic splits (mesh.router.split) -----------------------------------------------------------
def _split_requests(view: ClusterView) -> Metric:
    """Requests this router routed per target of each vModel with a traffic split, so that a
    canary can be judged against its stable model. Only with ``per_model_metrics`` on, as every
    per-model label: tenants choose how many vModels they split (at most 8 targets + the active
    model each), so the series count is theirs to grow. Inference only (ModelInfer, V1 predict);
    a split's series go when the split does."""
    family = CounterMetricFamily("mesh_vmodel_requests", "Requests routed to each target of a split vModel",
                                 labels=["vmodel_id", "model_id"])
    for vmodel_id, counts in view.split_requests.items():
        for model_id, n in counts.items():
            family.add_metric([vmodel_id, model_id], n)
    return family
# --- end traffic splits ---------------------------------------------------------------------------


def _payload_records(counts: Iterable[tuple[str, int, int, int]]) -> list[Metric]:
    family = CounterMetricFamily("mesh_payload_records", "Payload records per sink: sent, failed (after "
                                 "the retries) or dropped (queue full, or left at shutdown)",
                                 labels=["sink", "outcome"])
    for sink, sent, failed, dropped in counts:
        family.add_metric([sink, "sent"], sent)
        family.add_metric([sink, "failed"], failed)
        family.add_metric([sink, "dropped"], dropped)
    return [family]


def _autoscaling(signals: Mapping[str, Signal]) -> list[Metric]:
    """One series per runtime group (``runtime``: its rt: label's name, "" without one)."""
    def family(name: str, doc: str, value: Callable[[Signal], float]) -> GaugeMetricFamily:
        out = GaugeMetricFamily(name, doc, labels=["runtime"])
        for group, signal in signals.items():
            out.add_metric([group], value(signal))
        return out

    needed = GaugeMetricFamily("mesh_runtime_replicas_needed", "Replicas each need alone asks for, before "
                               "bounds and hysteresis", labels=["runtime", "need"])
    reason = GaugeMetricFamily("mesh_runtime_scaling_reason", "1 for what sets the desired replicas: memory, "
                               "load, idle (the minimum) or no-models (scale to zero)", labels=["runtime", "reason"])
    for group, signal in signals.items():
        needed.add_metric([group, "memory"], signal.memory_replicas)
        needed.add_metric([group, "load"], signal.load_replicas)
        reason.add_metric([group, signal.bound], 1)
    return [
        family("mesh_runtime_replicas_desired", "Runtime replicas the group should have now (an HPA or "
               "KEDA follows it: deploy/autoscaling)", lambda s: s.desired),
        family("mesh_runtime_replicas_current", "Live runtime replicas of the group", lambda s: s.current),
        needed, reason,
        family("mesh_runtime_working_set_bytes", "Bytes of the group's models used within the window",
               lambda s: s.working_set_bytes),
        family("mesh_runtime_working_set_models", "The group's models used within the window", lambda s: s.models),
        family("mesh_runtime_request_rate", "Requests per second the group serves", lambda s: s.request_rps),
        family("mesh_runtime_replica_capacity_bytes", "Model capacity of one replica of the group",
               lambda s: s.capacity_bytes),
    ]


class _Metered:
    """A servicer proxy: methods looked up by name come back ``timed``."""

    def __init__(self, servicer: object, metrics: RouterMetrics) -> None:
        self._servicer = servicer
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        timed = self._metrics.timed(name, getattr(self._servicer, name))
        setattr(self, name, timed)  # looked up once
        return timed


def _aborted_code(context: Any, exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    status = context.code()  # what the handler aborted with (AbortError)
    return status.name if status is not None else status_name(exc)


def _request_ids(request: Any, context: Any) -> tuple[str, str]:
    """(model ID, vModel ID) named by a management or V2 request message."""
    return (getattr(request, "modelId", "") or getattr(request, "targetModelId", "")
            or getattr(request, "name", ""), getattr(request, "vModelId", ""))


# Why a copy was removed, as the runtime's cache says it (``Entry.unload_reason``); anything else
# is counted under its own name.
EVICTION_REASONS = ("capacity", "unregistered", "redefined", "requested", "shutdown")


class RuntimeMetrics(_ComponentMetrics):
    def __init__(self, *, per_model: bool = False) -> None:
        super().__init__(per_model)
        per = ("model_id",) if per_model else ()
        r = self.registry
        self.invoke = Histogram(
            "modelmesh_invoke_model_milliseconds", "Inference on this runtime, from arrival to answer "
            "(includes waiting for a load)", ("method", "code", *per), buckets=MS_BUCKETS, registry=r)
        self.cache_miss = Histogram(
            "modelmesh_cache_miss_milliseconds", "Time a request waited for its model's load (misses "
            "then served)", per, buckets=MS_BUCKETS, registry=r)
        self.load_time = Histogram("modelmesh_loadmodel_milliseconds", "Successful model load times", per,
                                   buckets=MS_BUCKETS, registry=r)
        self.load_failure = Counter("modelmesh_loadmodel_failure", "Failed model loads", per, registry=r)
        self.unload_time = Histogram("modelmesh_unloadmodel_milliseconds", "Model unload times, from "
                                     "eviction to memory released", buckets=MS_BUCKETS, registry=r)
        self.unload_failure = Counter("modelmesh_unloadmodel_failure", "Model unloads whose close raised",
                                      registry=r)
        self.age_at_eviction = Histogram(
            "modelmesh_age_at_eviction_milliseconds", "Time since last use of each model evicted for "
            "capacity", buckets=AGE_BUCKETS_MS, registry=r)
        self.loaded_size = Histogram("modelmesh_loaded_model_size_bytes", "Measured size of each loaded "
                                     "copy", per, buckets=MODEL_SIZE_BUCKETS, registry=r)
        # --- issue 18: the size prediction's error, by model type ---
        self.size_prediction = Histogram(
            "mesh_size_prediction_ratio", "Each load's predicted size over its measured size, by model "
            "type: 1 is exact; below 1 the load reserved the rest after it, above 1 it made room for "
            "more than it took", ("type",), buckets=PREDICTION_BUCKETS, registry=r)
        self.size_prediction_error = Counter(
            "mesh_size_prediction_error_bytes", "Sum over loads of |predicted - measured| size, by model "
            "type (divided by the ratio's count: the mean absolute error)", ("type",), registry=r)
        # --- end issue 18 ---
        self.cache_requests = Counter(
            "mesh_cache_requests_total", "Inference requests by whether their model was loaded here, "
            "and why not", ("result", "reason", *per), registry=r)
        self.evictions = Counter("mesh_evictions_total", "Copies removed, by why", ("policy", "reason"),
                                 registry=r)
        self.storage_pulls = Counter(
            "mesh_storage_pulls_total", "Models a load read from object storage, by provider type and result: "
            "downloaded, disk (the disk cache had it: no network), in_place (pvc), failed", ("type", "result"),
            registry=r)
        self.storage_bytes = Counter("mesh_storage_download_bytes_total", "Bytes downloaded from object storage",
                                     ("type",), registry=r)
        self.storage_seconds = Histogram(
            "mesh_storage_download_seconds", "Time from the start of a pull to its files on disk (downloads only)",
            ("type",), buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)
        self.batch_size = Histogram(
            "mesh_batch_requests", "Requests merged into each prediction by dynamic batching (1: a batch "
            "flushed at its max wait with one request)", buckets=BATCH_BUCKETS, registry=r)
        self._invoke: dict[str, Any] = {}  # code -> bound child
        self._hit = None if per_model else self.cache_requests.labels("hit", "")
        self._policies: dict[str, str] = {}  # device -> eviction policy name
        self._gpus: GpuMemory | None = None
        self._imports: Callable[[], Iterable[Any]] = tuple  # the model libraries' imports (attach)
        # Model IDs removed from this instance since it started, oldest first (insertion order):
        # a later miss on one of them is "evicted", on any other "cold".
        self._evicted: dict[str, None] = {}
        # --- fleet status (issue 20): mesh_cache_requests_total's hits and misses as plain ints, which
        # the publisher copies into the instance record (reading a Counter's value needs a collect) ---
        self.hit_count = 0
        self.miss_count = 0
        # --- end fleet status ---

    # --- object storage (mesh.storage.puller) -------------------------------------------------
    def storage_pulled(self, pulled: Any) -> None:
        if pulled.type == "pvc":
            self.storage_pulls.labels("pvc", "in_place").inc()
        elif pulled.from_disk:
            self.storage_pulls.labels(pulled.type, "disk").inc()
        else:
            self.storage_pulls.labels(pulled.type, "downloaded").inc()
            self.storage_bytes.labels(pulled.type).inc(pulled.downloaded_bytes)
            self.storage_seconds.labels(pulled.type).observe(pulled.seconds)

    def storage_failed(self, storage_type: str) -> None:
        self.storage_pulls.labels(storage_type[:20], "failed").inc()

    # --- requests (the runtime's hot path) ----------------------------------------------------
    def invoked(self, code: str, started: float, model_id: str | None) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1000
        if self.per_model:
            self.invoke.labels(INFER, code, model_id or "").observe(elapsed_ms)
            return
        child = self._invoke.get(code)
        if child is None:
            child = self._invoke[code] = self.invoke.labels(INFER, code)
        child.observe(elapsed_ms)

    def batched(self, requests: int) -> None:
        self.batch_size.observe(requests)

    def hit(self, model_id: str) -> None:
        self.hit_count += 1  # fleet status (issue 20)
        if self._hit is not None:
            self._hit.inc()
        else:
            self.cache_requests.labels("hit", "", model_id).inc()

    def miss(self, model_id: str, reason: str, waited_since: float | None = None) -> None:
        """A miss; ``waited_since``: when the request began waiting for the load that served it."""
        per = (model_id,) if self.per_model else ()
        self.miss_count += 1  # fleet status (issue 20)
        self.cache_requests.labels("miss", reason, *per).inc()
        if waited_since is not None:
            self._child(self.cache_miss, model_id).observe((time.perf_counter() - waited_since) * 1000)

    def miss_reason(self, model_id: str) -> str:
        """``evicted`` if ``model_id`` was loaded here and removed since start, else ``cold``."""
        return "evicted" if model_id in self._evicted else "cold"

    def _child(self, metric: Any, model_id: str) -> Any:
        return metric.labels(model_id) if self.per_model else metric

    # --- cache events (CacheListener) ---------------------------------------------------------
    def on_change(self, entry: Entry, event: str) -> None:
        if event == "loaded":
            self._child(self.load_time, entry.model_id).observe(entry.load_ms)
            self._child(self.loaded_size, entry.model_id).observe(entry.reserved_bytes)
            if entry.predicted_bytes > 0 and entry.reserved_bytes > 0:  # the reservation is the measured size now
                model_type = entry.spec.type.lower()[:40]  # only types this runtime loads: a few
                self.size_prediction.labels(model_type).observe(entry.predicted_bytes / entry.reserved_bytes)
                self.size_prediction_error.labels(model_type).inc(abs(entry.predicted_bytes - entry.reserved_bytes))
        elif event == "failed":
            self._child(self.load_failure, entry.model_id).inc()
        elif event in ("evicted", "unloaded"):
            reason = entry.unload_reason or ("capacity" if event == "evicted" else "requested")
            self.evictions.labels(self._policies.get(entry.device, ""), reason).inc()
            if reason == "capacity":
                self.age_at_eviction.observe(entry.idle_s * 1000)
            self._remember_evicted(entry.model_id)
        elif event == "released":
            self.unload_time.observe((time.perf_counter() - entry.unload_started) * 1000)
            if entry.unload_failed:
                self.unload_failure.inc()

    def _remember_evicted(self, model_id: str) -> None:
        evicted = self._evicted
        evicted.pop(model_id, None)
        evicted[model_id] = None
        if len(evicted) > EVICTED_IDS_KEPT:
            del evicted[next(iter(evicted))]  # forgotten: a later miss reads as cold

    # --- state --------------------------------------------------------------------------------
    def attach(self, cache: ModelCache, gpus: GpuMemory | None = None,
               imports: Callable[[], Iterable[Any]] | None = None) -> None:
        """Listen to ``cache``'s events and read its accounting (on the running loop) when scraped;
        with ``gpus``, also each GPU's memory as NVML last reported it; with ``imports``, what the
        model libraries imported so far cost (``mesh.runtime.libraries.IMPORTS.imported``)."""
        self._gpus = gpus
        self._imports = imports or tuple
        self._policies = {device: b.policy.name for device, b in cache.budgets().items()}
        for name in set(self._policies.values()):
            for reason in EVICTION_REASONS:  # every series exists from the start, at 0
                self.evictions.labels(name, reason)
        cache.add_listener(self)
        self.registry.register(_StateCollector(asyncio.get_running_loop(), lambda: self._instance(cache)))

    def _instance(self, cache: ModelCache) -> list[Metric]:
        stats = cache.stats()
        lru = GaugeMetricFamily("modelmesh_instance_lru_seconds", "Last-used time (unix s) of the least "
                                "recently used model")
        lru_age = GaugeMetricFamily("modelmesh_instance_lru_age_seconds", "Seconds since the least "
                                    "recently used model was used")
        if stats.lru_time is not None:
            lru.add_metric([], stats.lru_time)
            lru_age.add_metric([], max(0.0, time.time() - stats.lru_time))
        capacity = GaugeMetricFamily("mesh_device_capacity_bytes", "Model capacity of each device",
                                     labels=["device"])
        used = GaugeMetricFamily("mesh_device_used_bytes", "Bytes held by models on each device (loaded, "
                                 "loading, unloading)", labels=["device"])
        models = GaugeMetricFamily("mesh_device_models", "Copies loaded on each device", labels=["device"])
        for device, (cap, held) in stats.devices.items():
            capacity.add_metric([device], cap)
            used.add_metric([device], held)
            models.add_metric([device], stats.loaded_by_device.get(device, 0))
        physical = GaugeMetricFamily("mesh_gpu_memory_bytes", "Memory of each GPU as NVML reports it: "
                                     "total, and used by every process", labels=["device", "kind"])
        for device, info in (self._gpus.last if self._gpus is not None else {}).items():
            physical.add_metric([device, "total"], info.total_bytes)
            physical.add_metric([device, "used"], info.used_bytes)
        refused = CounterMetricFamily("mesh_admission_refused", "Demand loads the admission filter "
                                      "refused (served, then first to go or in the pass-through room)",
                                      labels=["policy"])
        passed = CounterMetricFamily("mesh_admission_passed_through", "Refused demand loads held in the "
                                     "pass-through room (runtime.passthrough_bytes)", labels=["policy"])
        # One policy setting for every device: the counts are the cache's, across devices.
        policy_name = next(iter(self._policies.values()), "")
        refused.add_metric([policy_name], stats.refused)
        passed.add_metric([policy_name], stats.passed_through)
        return [
            *_library_imports(self._imports()),
            _gauge("modelmesh_instance_capacity_bytes", "Model capacity of the instance, all devices",
                   sum(c for c, _ in stats.devices.values())),
            _gauge("modelmesh_instance_used_bytes", "Bytes held by models (loaded, loading, unloading), "
                   "all devices", sum(u for _, u in stats.devices.values())),
            lru, lru_age,
            _gauge("modelmesh_instance_models_total", "Models loaded on the instance", stats.loaded),
            capacity, used, models, physical, refused, passed,
        ]


def _library_imports(imported: Iterable[Any]) -> list[Metric]:
    """What importing each model library cost this process (issue 18: a type's first load imports
    it, or the start-up for runtime.preload_types), reported apart from the loads' own figures;
    ``imported``: ``mesh.runtime.libraries.Imported`` records."""
    seconds = GaugeMetricFamily("mesh_model_library_import_seconds", "Time this process took to import each "
                                "model type's library, at start-up or at the type's first load (not in "
                                "modelmesh_loadmodel_milliseconds)", labels=["type", "when"])
    grown = GaugeMetricFamily("mesh_model_library_import_rss_bytes", "Resident memory this process grew by "
                              "while importing each model type's library (charged to no model)",
                              labels=["type", "when"])
    for record in imported:
        when = "start" if record.at_start else "first_load"
        seconds.add_metric([record.model_type, when], record.seconds)
        grown.add_metric([record.model_type, when], record.rss_bytes)
    return [seconds, grown]


__all__ = ["RouterMetrics", "RuntimeMetrics", "run_on_loop", "serve_metrics", "status_name"]


# --- reading a scrape (issue 20: `mesh demo` reports the runtimes' counters) ---
def scrape_samples(text: str) -> Iterable[tuple[str, dict[str, str], float]]:
    """(sample name, labels, value) of every sample in a Prometheus text exposition: for a tool of
    ours that reads another process's ``/metrics`` (prometheus_client stays in this module)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name, dict(sample.labels), float(sample.value)
# --- end reading a scrape ---
