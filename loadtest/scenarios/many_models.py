"""Many models: 10,000 registered, Zipf(1.0) traffic, runtimes that hold a few percent of them.

``python -m loadtest.scenarios.many_models [--models N] [--runtimes R] [--fit F] [--rate RPS]
[--duration S] [--warmup S] [--policy NAME ...] [--distinct D] [--zipf S] [--seed K] [--json]``

Method. For each eviction policy (``--policy``, repeatable; default: the runtime's default,
``s3fifo+tinylfu``, and ``lru``, ModelMesh's behaviour) a fresh cluster: one private etcd, ``R`` (2)
runtimes and one router, separate processes on 127.0.0.1 (``loadtest.cluster``), the runtimes
started with ``MESH_RUNTIME_EVICTION_POLICY`` set to the policy. Then:

1. *Models.* ``D`` (50) distinct small scikit-learn LogisticRegressions (20 features, about 1 KB on
   disk, trained once per run) and ``N`` (10,000) model IDs registered through the router's
   management API, ID ``i`` pointing at file ``i mod D``. Each ID is a model of its own to the mesh:
   loaded, counted and evicted separately. Registrations per second are reported. Before that,
   each runtime loads and unloads one throwaway model through the ModelRuntime SPI: a fresh
   process's first load imports scikit-learn (a second or more, every request waiting behind it)
   and is charged the allocator's first growth, costs a long-running runtime has behind it.
2. *Traffic.* Open loop (``loadtest.driver``, pre-encoded bodies, ``--processes`` worker processes):
   Poisson arrivals at ``--rate`` (300/s) for ``--warmup`` (20 s, not measured: the caches fill)
   plus ``--duration`` (60 s) seconds, each request for ID ``i`` with Zipf(1.0) probability
   proportional to ``1/(i+1)``, through the router with the ``mm-model-id`` header. The schedule
   depends only on ``--seed``, so every policy gets exactly the same requests at the same times.
   Latency is measured from each request's intended send time (no coordinated omission).
3. *Cache figures.* The runtimes' and the router's ``/metrics`` (docs/metrics.md) are scraped when
   the measured part begins and after the last answer: the hit ratio is that of the difference of
   ``mesh_cache_requests_total`` (misses also by reason), loads the difference of
   ``modelmesh_loadmodel_milliseconds_count``, evictions that of ``mesh_evictions_total{reason=
   "capacity"}``, refusals that of ``mesh_admission_refused_total``; copies the router added for hot
   models (``mesh_copy_changes_total``); at the end, the copies loaded on the runtimes
   (``modelmesh_instance_models_total``) and the distinct models loaded (the router's
   ``modelmesh_models_loaded_total``).

Capacity. The runtimes account models by their *measured* size, so capacity is calibrated first, on
a cluster of its own (one runtime with room to spare, one router): 24 calibration IDs (over the
model files) are registered and loaded one at a time, and their sizes are read from the placement
records. A load's size is the larger of the loader's own accounting (~2.7 KB here) and the process's
memory growth during the load, which is often one more page (4 KiB) and now and then an allocator
arena (tens of KiB). The model size is therefore the mean without the largest eighth: it matches the
mean size of the run's loads within a few percent, where the median jumps between 2.7 and 4 KiB from
one run to the next. The same runtime says (ModelRuntime SPI) how many loads it runs at once and what
size it predicts for a model before loading it. A loading copy is charged its *prediction* until it
is measured, and the prediction has a floor (``runtime.default_model_size_bytes``, 64 KiB) twenty
times what such a model measures: that is the fixed overhead the runtime accounts. So each runtime
gets

    capacity = fit x N / R x model size + load slots x predicted size

and at least ``fit`` (5 %) of the models stay loaded even while every load slot is busy; with fewer
loads in flight, up to ``predicted / size`` (about 20) more per runtime fit. Both policies get the
same capacity; the copies loaded at the end show what really fitted, and the sizes the runtimes
measured during the run (their ``model loaded`` log events) are reported.

Caveats. Sizes vary from load to load: now and then a load is charged with an allocator arena's
growth (up to ``2 x 64 KiB + 256 KiB``, the runtime's cap), and then evicts dozens of models, or, in a
runtime smaller than that, fails there and is retried by the router on another runtime (a
``load_failed`` miss, not an error). The client, the router, the runtimes and etcd share the
machine's cores: at a high miss rate the loads (and the registry writes each load and eviction
makes) compete with the routing for CPU, which is part of what this measures. The hit ratio counts
every request a runtime took, including the router's retries after a copy it believed loaded had
been evicted (``routed_elsewhere``). The scrapes and the latency window are aligned to the start of
the measured part, not to the request: requests in flight across that boundary fall on either side.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc

from loadtest.arrivals import Popularity, zipf_weights
from loadtest.cluster import Cluster, Server, prepare_benchmark_process
from loadtest.driver import Window, WorkerConfig, WorkerFailed, WorkerResult, start_delay_s
from loadtest.driver import run as run_driver
from loadtest.load import bytes_call
from loadtest.management import placements, register, register_many
from loadtest.models import TrainedModel, infer_body, train_logistic
from loadtest.report import ForeignLoad, add_output_args, emit, machine, machine_line, table
from loadtest.scrape import CacheCounts
from loadtest.scrape import parse as parse_cache
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.gen.mmesh import model_runtime_pb2 as rt_pb
from mesh.gen.mmesh import model_runtime_pb2_grpc as rt_grpc
from mesh.settings import RuntimeSettings
from placement.registry import policy_names

INFER = "/inference.GRPCInferenceService/ModelInfer"
DEFAULT_POLICY = RuntimeSettings().eviction_policy  # s3fifo+tinylfu
BASELINE_POLICY = "lru"
N_FEATURES = 20
CALIBRATION_LOADS = 24
CALIBRATION_CAPACITY = 256 * 2**20
REQUEST_TIMEOUT_S = 10.0
MISS_REASONS = ("cold", "evicted", "routed_elsewhere", "load_failed")
# The suite run: all 10,000 models at 300 req/s, a shorter run. About 95 s on two cores for both
# policies: training and calibration ~8 s, then per policy ~43 s (start and stop ~4 s, 10,000
# registrations ~7 s at ~1,500/s, 10 s warm-up, 20 s measured), extrapolated from 2,000 models.
SUITE_ARGS: list[str] = ["--models", "10000", "--warmup", "10", "--duration", "20"]
SUITE_SECONDS: int = 95


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class UsageError(Exception):
    """A bad option: one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@dataclass(frozen=True)
class Settings:
    models: int = 10_000
    distinct: int = 50
    runtimes: int = 2
    fit: float = 0.05
    rate: float = 300.0
    duration: float = 60.0
    warmup: float = 20.0
    zipf: float = 1.0
    seed: int = 1
    processes: int = 1
    in_flight: int = 100
    policies: tuple[str, ...] = (DEFAULT_POLICY, BASELINE_POLICY)

    def check(self) -> None:
        """Raise UsageError for settings the scenario cannot run with."""
        if self.models < 1 or self.distinct < 1 or self.runtimes < 1 or self.processes < 1 or self.in_flight < 1:
            raise UsageError("--models, --distinct, --runtimes, --processes and --in-flight must be >= 1")
        if not 0 < self.fit < 1:
            raise UsageError(f"--fit must be between 0 and 1 (a share of the models), got {self.fit:g}")
        if self.fit * self.models < self.runtimes:
            raise UsageError(f"--fit {self.fit:g} of {self.models} models is less than one model per runtime")
        if self.rate <= 0 or self.duration <= 0 or self.warmup < 0:
            raise UsageError("--rate and --duration must be > 0 and --warmup >= 0")
        if self.zipf < 0:
            raise UsageError(f"--zipf must be >= 0, got {self.zipf:g}")
        unknown = [p for p in self.policies if p not in policy_names()]
        if unknown:
            raise UsageError(f"unknown eviction policy {unknown[0]!r}; known: {', '.join(policy_names())}")
        if len(set(self.policies)) != len(self.policies):
            raise UsageError("each --policy may be given once")


@dataclass(frozen=True)
class Calibration:
    sizes: list[int]  # measured sizes of the calibration loads (bytes)
    predicted_bytes: int  # what a runtime reserves for a model while it loads
    load_slots: int  # loads a runtime runs at once
    capacity_bytes: int = 0  # per runtime, computed from the above

    @property
    def size_bytes(self) -> int:
        """The mean measured size without the largest eighth (see "Capacity" in the module docstring)."""
        kept = sorted(self.sizes)[:len(self.sizes) - len(self.sizes) // 8]
        return round(statistics.fmean(kept))

    def sized(self, s: Settings) -> Calibration:
        share = s.fit * s.models / s.runtimes * self.size_bytes
        return dataclasses.replace(self, capacity_bytes=round(share) + self.load_slots * self.predicted_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {"sizes": self.sizes, "size_bytes": self.size_bytes, "predicted_bytes": self.predicted_bytes,
                "load_slots": self.load_slots, "capacity_bytes": self.capacity_bytes}


# --- metrics ------------------------------------------------------------------------------------
Sample = tuple[str, dict[str, str], float]


def _samples(text: str) -> list[Sample]:
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def _total(samples: Sequence[Sample], name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5.0) as response:
        body: bytes = response.read()
    return body.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Snapshot:
    """The runtimes' counters summed, and the router's own figures, at one moment."""

    cache: CacheCounts
    misses: dict[str, float]  # by reason
    loads: float
    evictions: float  # for capacity
    refused: float  # by the admission filter
    copies: float  # copies loaded on the runtimes
    used_bytes: float
    models_loaded: float  # distinct models with a loaded copy (router's view)
    copies_added: float  # copies the router asked for (hot models)
    passed_through: float = 0.0  # refused loads held in the pass-through room


async def snapshot(runtime_urls: Sequence[str], router_url: str) -> Snapshot:
    try:
        texts = await asyncio.gather(*(asyncio.to_thread(_fetch, u) for u in [*runtime_urls, router_url]))
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"cannot read metrics: {exc}") from None
    runtime = [s for text in texts[:-1] for s in _samples(text)]
    router = _samples(texts[-1])
    cache = CacheCounts(0.0, 0.0)
    for text in texts[:-1]:
        c = parse_cache(text)
        cache = CacheCounts(cache.hits + c.hits, cache.misses + c.misses)
    return Snapshot(
        cache=cache,
        misses={r: _total(runtime, "mesh_cache_requests_total", result="miss", reason=r) for r in MISS_REASONS},
        loads=_total(runtime, "modelmesh_loadmodel_milliseconds_count"),
        evictions=_total(runtime, "mesh_evictions_total", reason="capacity"),
        refused=_total(runtime, "mesh_admission_refused_total"),
        copies=_total(runtime, "modelmesh_instance_models_total"),
        used_bytes=_total(runtime, "modelmesh_instance_used_bytes"),
        models_loaded=_total(router, "modelmesh_models_loaded_total"),
        copies_added=_total(router, "mesh_copy_changes_total"),
        passed_through=_total(runtime, "mesh_admission_passed_through_total"))


def metrics_url(server: Server) -> str:
    """The /metrics URL the server logged at start-up (it was started with a metrics port of 0)."""
    for event in server.events("metrics serving"):
        return str(event["url"])
    raise RuntimeError(f"{server.name} logged no metrics URL")


def load_sizes(runtimes: Sequence[Server]) -> list[int]:
    """The measured size of every load the runtimes logged (``model loaded``), in bytes."""
    return [int(e.get("size_bytes", 0)) for r in runtimes for e in r.events("model loaded")]


# --- models ------------------------------------------------------------------------------------
def model_ids(s: Settings) -> list[str]:
    width = len(str(s.models - 1))
    return [f"many-{i:0{width}d}" for i in range(s.models)]


def file_of(i: int, files: Sequence[TrainedModel]) -> TrainedModel:
    return files[i % len(files)]


def popularity(s: Settings) -> Popularity:
    """Zipf over the IDs in order: ``many-0`` is the most requested (which instance is its home is
    decided by hashing its ID, so rank order says nothing about placement)."""
    return Popularity(weights=zipf_weights(s.models, s.zipf))


async def warm_runtimes(runtimes: Sequence[Server], model: TrainedModel, router: Server) -> None:
    """Each runtime loads and unloads one throwaway model (ModelRuntime SPI) before anything is
    measured: a fresh process's first load imports scikit-learn (about a second, all requests
    waiting) and grows the allocator (charged to that model), which a long-running runtime has
    behind it. A load refused for being bigger than the runtime (that growth) is fine here. The
    throwaway models are registered first (runtimes load registered models only) and unregistered
    after."""
    async with grpc.aio.insecure_channel(router.endpoint) as channel:
        stub = mm_grpc.ModelMeshStub(channel)  # type: ignore[no-untyped-call]
        for k in range(len(runtimes)):
            await register(stub, f"warmup-{k}", str(model.path))

    async def warm(k: int, runtime: Server) -> None:
        model_id = f"warmup-{k}"
        async with grpc.aio.insecure_channel(runtime.endpoint) as channel:
            spi = rt_grpc.ModelRuntimeStub(channel=channel)  # type: ignore[no-untyped-call]
            try:
                await spi.loadModel(rt_pb.LoadModelRequest(modelId=model_id, modelType="sklearn",
                                                           modelPath=str(model.path)), timeout=60)
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
            await spi.unloadModel(rt_pb.UnloadModelRequest(modelId=model_id), timeout=30)

    await asyncio.gather(*(warm(k, r) for k, r in enumerate(runtimes)))
    async with grpc.aio.insecure_channel(router.endpoint) as channel:
        stub = mm_grpc.ModelMeshStub(channel)  # type: ignore[no-untyped-call]
        for k in range(len(runtimes)):
            await stub.unregisterModel(mm.UnregisterModelRequest(modelId=f"warmup-{k}"), timeout=30)


# --- calibration -------------------------------------------------------------------------------
async def _loaded_size(registry_url: str, model_id: str, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        loaded = [p for p in await placements(registry_url, model_id) if p.state == "loaded"]
        if loaded:
            return loaded[0].size_bytes
        await asyncio.sleep(0.05)
    raise TimeoutError(f"calibration: no loaded placement record for {model_id!r} after {timeout_s:g} s")


async def _calibrate(files: Sequence[TrainedModel], cluster: Cluster, runtime: Server, router: Server
                     ) -> Calibration:
    picks = [dataclasses.replace(file_of(k, files), model_id=f"calibrate-{k}") for k in range(CALIBRATION_LOADS)]
    await warm_runtimes([runtime], files[0], router)
    async with grpc.aio.insecure_channel(router.endpoint) as channel, \
            grpc.aio.insecure_channel(runtime.endpoint) as to_runtime:
        _, errors = await register_many(mm_grpc.ModelMeshStub(channel),  # type: ignore[no-untyped-call]
                                        [(m.model_id, str(m.path)) for m in picks], in_flight=8)
        if errors:
            raise RuntimeError(f"calibration: registration failed: {errors}")
        spi = rt_grpc.ModelRuntimeStub(channel=to_runtime)  # type: ignore[no-untyped-call]
        status = await spi.runtimeStatus(rt_pb.RuntimeStatusRequest(), timeout=10)

        async def predicted() -> int:
            m = picks[0]
            answer = await spi.predictModelSize(rt_pb.PredictModelSizeRequest(
                modelId=m.model_id, modelType="sklearn", modelPath=str(m.path)), timeout=10)
            return int(answer.sizeInBytes)

        before = await predicted()
        call = bytes_call(channel, INFER)
        sizes = []
        for m in picks:  # one at a time: a solo load's memory growth is attributed to it
            await call(infer_body(m), metadata=(("mm-model-id", m.model_id),), timeout=60)
            sizes.append(await _loaded_size(cluster.registry_url, m.model_id))
        # The prediction learns from loads; the reservation a load holds is the larger of the two.
        return Calibration(sizes=sizes, predicted_bytes=max(before, await predicted()),
                           load_slots=int(status.maxLoadingConcurrency) or 1)


def calibrate(s: Settings, files: Sequence[TrainedModel]) -> Calibration:
    import uvloop

    with Cluster() as cluster:
        runtime = cluster.start_runtime("runtime-calibrate", capacity_bytes=CALIBRATION_CAPACITY)
        router = cluster.start_router()
        try:
            calibration = uvloop.run(asyncio.wait_for(_calibrate(files, cluster, runtime, router), 120))
        except TimeoutError:
            raise RuntimeError("calibration did not finish within 120 s") from None
    return calibration.sized(s)


# --- one policy --------------------------------------------------------------------------------
@dataclass
class Progress:
    label: str
    seconds: list[dict[str, int]] = field(default_factory=list)

    def on_second(self, w: Window) -> None:
        self.seconds.append({"t": w.second + 1, "sent": w.sent, "ok": w.ok, "errors": w.errors})
        if (w.second + 1) % 10 == 0:
            log(f"  {self.label}: {w.second + 1} s, last second: sent {w.sent}, ok {w.ok}, errors {w.errors}")


async def _run_policy(s: Settings, policy: str, files: Sequence[TrainedModel], runtimes: Sequence[Server],
                      router: Server) -> dict[str, Any]:
    ids = model_ids(s)
    runtime_urls = [metrics_url(r) for r in runtimes]
    router_url = metrics_url(router)
    await warm_runtimes(runtimes, files[0], router)
    limit_s = max(60.0, s.models / 50)
    async with grpc.aio.insecure_channel(router.endpoint) as channel:
        stub = mm_grpc.ModelMeshStub(channel)  # type: ignore[no-untyped-call]
        t0 = time.perf_counter()
        try:
            registered, reg_errors = await asyncio.wait_for(register_many(
                stub, ((m, str(file_of(i, files).path)) for i, m in enumerate(ids)), in_flight=s.in_flight),
                limit_s)
        except TimeoutError:
            raise RuntimeError(f"registering {s.models:,} models took longer than {limit_s:.0f} s") from None
        reg_seconds = time.perf_counter() - t0
    if reg_errors:
        raise RuntimeError(f"registration failed: {reg_errors}")
    log(f"  {policy}: registered {registered:,} models in {reg_seconds:.1f} s; sending...")
    bodies = [infer_body(dataclasses.replace(file_of(i, files), model_id=m)) for i, m in enumerate(ids)]
    cfg = WorkerConfig(target=router.endpoint, bodies=bodies, metadata=[(("mm-model-id", m),) for m in ids],
                       popularity=popularity(s), duration_s=s.duration, warmup_s=s.warmup, rate=s.rate,
                       timeout_s=REQUEST_TIMEOUT_S, seed=s.seed, processes=s.processes)
    progress = Progress(policy)
    start_wall = time.time() + start_delay_s(s.processes)

    async def first_scrape() -> Snapshot:
        await asyncio.sleep(max(start_wall + s.warmup - time.time(), 0))
        return await snapshot(runtime_urls, router_url)

    before_task = asyncio.create_task(first_scrape(), name="many-models-scrape")
    try:
        result: WorkerResult = await run_driver(cfg, progress.on_second, start_wall)
    finally:
        if not before_task.done():
            before_task.cancel()
        await asyncio.gather(before_task, return_exceptions=True)
    before = before_task.result()
    after = await snapshot(runtime_urls, router_url)
    sizes = load_sizes(runtimes)
    delta = after.cache - before.cache
    return {
        "policy": policy,
        "registration": {"models": registered, "seconds": round(reg_seconds, 2),
                         "per_second": round(registered / reg_seconds, 1)},
        "requests": result.sent, "ok": result.ok, "dropped": result.dropped,
        "errors": dict(sorted(result.errors.items())),
        "throughput_rps": round(result.ok / s.duration, 1),
        "latency_ms": {k: round(v, 3) for k, v in result.hist.summary_ms().items()},
        "cache": {"hits": int(delta.hits), "misses": int(delta.misses), "hit_ratio": delta.ratio,
                  "misses_by_reason": {r: int(after.misses[r] - before.misses[r]) for r in MISS_REASONS}},
        "loads": int(after.loads - before.loads),
        "evictions": int(after.evictions - before.evictions),
        "admission_refused": int(after.refused - before.refused),
        "copies_added": int(after.copies_added - before.copies_added),
        "end": {"copies_loaded": int(after.copies), "models_loaded": int(after.models_loaded),
                "used_bytes": int(after.used_bytes)},
        "load_sizes": {"loads": len(sizes), "median_bytes": statistics.median(sizes) if sizes else 0,
                       "mean_bytes": round(statistics.fmean(sizes)) if sizes else 0},
        "timeline": progress.seconds,
    }


def run_policy(s: Settings, policy: str, files: Sequence[TrainedModel], calibration: Calibration
               ) -> dict[str, Any]:
    import uvloop

    budget_s = 120.0 + s.models / 50 + s.warmup + s.duration + REQUEST_TIMEOUT_S
    with Cluster() as cluster:
        log(f"{policy}: starting {s.runtimes} runtimes ({calibration.capacity_bytes:,} bytes each) and a router...")
        runtimes = [cluster.start_runtime(f"runtime-{k}", capacity_bytes=calibration.capacity_bytes,
                                          extra_env={"MESH_RUNTIME_EVICTION_POLICY": policy})
                    for k in range(s.runtimes)]
        router = cluster.start_router()
        try:
            return uvloop.run(asyncio.wait_for(_run_policy(s, policy, files, runtimes, router), budget_s))
        except TimeoutError:
            raise RuntimeError(f"{policy}: the run did not finish within {budget_s:.0f} s") from None


# --- the whole scenario ------------------------------------------------------------------------
def bench(s: Settings) -> dict[str, Any]:
    """Train, calibrate, and run every policy on a fresh cluster; the result (without the machine)."""
    s.check()
    model_dir = Path(tempfile.mkdtemp(prefix="mesh-bench-models-"))
    try:
        log(f"training {s.distinct} distinct models...")
        files = [train_logistic(f"file-{k:03d}", model_dir, n_features=N_FEATURES, seed=5000 + k, rows=200)
                 for k in range(min(s.distinct, s.models))]
        log("calibrating the model size...")
        calibration = calibrate(s, files)
        log(f"model size {calibration.size_bytes:,} bytes (trimmed mean of {calibration.sizes}), predicted "
            f"{calibration.predicted_bytes:,} bytes x {calibration.load_slots} load slots: capacity "
            f"{calibration.capacity_bytes:,} bytes per runtime")
        runs = {p: run_policy(s, p, files, calibration) for p in s.policies}
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    return {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(s).items()},
            "calibration": calibration.to_dict(), "policies": runs}


def _ratio(r: dict[str, Any]) -> float:
    value = r["cache"]["hit_ratio"]
    return math.nan if value is None else float(value)


def render(result: dict[str, Any]) -> str:
    s, cal, runs = result["settings"], result["calibration"], result["policies"]
    names = list(runs)

    def row(label: str, fn: Any) -> list[object]:
        return [label, *(fn(runs[n]) for n in names)]

    def pct(x: float) -> str:
        return "n/a" if x != x else f"{x:.3f}"

    figures = table(["figure", *names], [
        row(f"registrations/s (registerModel, {s['in_flight']} in flight)",
            lambda r: r["registration"]["per_second"]),
        row("requests sent (measured part)", lambda r: r["requests"]),
        row("answered OK", lambda r: r["ok"]),
        row("dropped (client over its in-flight cap)", lambda r: r["dropped"]),
        row("errors", lambda r: sum(r["errors"].values())),
        row("throughput (OK/s)", lambda r: float(r["throughput_rps"])),
        *(row(f"latency {q} (ms)", lambda r, q=q: float(r["latency_ms"][q])) for q in ("p50", "p90", "p99", "p99.9")),
        row("cache hit ratio", lambda r: pct(_ratio(r))),
        row("miss ratio", lambda r: pct(1 - _ratio(r))),
        *(row(f"  misses: {reason}", lambda r, reason=reason: r["cache"]["misses_by_reason"][reason])
          for reason in MISS_REASONS),
        row("loads", lambda r: r["loads"]),
        row("evictions (capacity)", lambda r: r["evictions"]),
        row("admission refusals", lambda r: r["admission_refused"]),
        row("copies added for hot models (router)", lambda r: r["copies_added"]),
        row("copies loaded at the end (runtimes)", lambda r: r["end"]["copies_loaded"]),
        row("distinct models loaded at the end (router)", lambda r: r["end"]["models_loaded"]),
        row("bytes held by models at the end (runtimes)", lambda r: r["end"]["used_bytes"]),
        row("size of the run's loads, median / mean (B)",
            lambda r: f"{r['load_sizes']['median_bytes']:,.0f} / {r['load_sizes']['mean_bytes']:,.0f}"),
    ])
    errors = sorted({code for r in runs.values() for code in r["errors"]})
    out = [
        machine_line(result["machine"]) if "machine" in result else "", "",
        f"{s['models']:,} models ({s['distinct']} distinct files), Zipf({s['zipf']:g}), Poisson {s['rate']:g} req/s, "
        f"{s['warmup']:g} s warm-up + {s['duration']:g} s measured, seed {s['seed']}; {s['runtimes']} runtimes "
        f"of {cal['capacity_bytes']:,} bytes each (fit {s['fit']:.1%}: model size {cal['size_bytes']:,} B, "
        f"trimmed mean of {len(cal['sizes'])} loads, + {cal['load_slots']} load slots x {cal['predicted_bytes']:,} B "
        "predicted)", "", figures,
    ]
    if errors:
        out += ["", table(["gRPC status", *names], [[c, *(runs[n]["errors"].get(c, 0) for n in names)]
                                                     for c in errors])]
    if DEFAULT_POLICY in runs and BASELINE_POLICY in runs:
        d, b = 1 - _ratio(runs[DEFAULT_POLICY]), 1 - _ratio(runs[BASELINE_POLICY])
        holds = "holds" if d < b else "does NOT hold"
        out += ["", f"simulator's claim (BENCHMARKS.md section 4) that {DEFAULT_POLICY} misses less than "
                    f"{BASELINE_POLICY}: {holds} here (miss ratio {pct(d)} vs {pct(b)})"]
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = _Parser(prog="python -m loadtest.scenarios.many_models", description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=d.models, help=f"model IDs registered (default {d.models:,})")
    p.add_argument("--distinct", type=int, default=d.distinct,
                   help=f"distinct model files the IDs point at (default {d.distinct})")
    p.add_argument("--runtimes", type=int, default=d.runtimes, help=f"runtime processes (default {d.runtimes})")
    p.add_argument("--fit", type=float, default=d.fit,
                   help=f"share of the models that fit in all runtimes together (default {d.fit})")
    p.add_argument("--rate", type=float, default=d.rate, help=f"requests per second (default {d.rate:g})")
    p.add_argument("--duration", type=float, default=d.duration, help=f"measured seconds (default {d.duration:g})")
    p.add_argument("--warmup", type=float, default=d.warmup, help=f"unmeasured seconds first (default {d.warmup:g})")
    p.add_argument("--zipf", type=float, default=d.zipf, help=f"Zipf exponent of popularity (default {d.zipf:g})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the schedule, the same for every policy")
    p.add_argument("--processes", type=int, default=d.processes, help="client worker processes (default 1)")
    p.add_argument("--in-flight", type=int, default=d.in_flight, help="registrations in flight (default 100)")
    p.add_argument("--policy", action="append", metavar="NAME",
                   help=f"eviction policy, repeatable (default: {' and '.join(d.policies)})")
    add_output_args(p)
    return p


def parse_settings(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    args = build_parser().parse_args(argv)
    s = Settings(models=args.models, distinct=args.distinct, runtimes=args.runtimes, fit=args.fit,
                 rate=args.rate, duration=args.duration, warmup=args.warmup, zipf=args.zipf, seed=args.seed,
                 processes=args.processes, in_flight=args.in_flight,
                 policies=tuple(args.policy) if args.policy else Settings().policies)
    s.check()
    return args, s


def main(argv: list[str] | None = None) -> int:
    try:
        args, s = parse_settings(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    prepare_benchmark_process()
    foreign = ForeignLoad()
    try:
        result = bench(s)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, TimeoutError, WorkerFailed, grpc.RpcError) as exc:
        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        first = (detail or type(exc).__name__).strip().splitlines()
        print(f"error: {first[0] if first else type(exc).__name__}", file=sys.stderr)
        return 1
    result = {"machine": {**machine(), "foreign_load": foreign.result()}, **result}
    emit(args, result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
