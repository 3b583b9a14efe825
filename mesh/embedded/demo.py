"""``mesh demo`` / ``mesh up --example``: many models, little memory, real traffic.

Trains per-tenant classifiers on the datasets bundled with scikit-learn (no downloads; cached
under ``~/.cache/mesh-serving/demo`` so a second run starts at once), registers them, sends Zipf
traffic at them through the router for a while, checks every answer against the model's own
``predict``, and prints throughput, latency percentiles and the runtimes' cache hits, misses and
evictions. Unless ``--capacity`` is given the runtimes get room for about half of the models, so
that loads and evictions happen.

No silent wait: each phase says what it does before it starts (training shows a count as it
goes), and the traffic lasts the promised duration; the report ends with how long each phase
took. The requests are prepared as a small pool per model (``POOL``), each model's expected
answers computed by one ``predict`` over its pool, then replayed in Zipf order: preparing 30,000
requests one ``predict`` each took about 16 s, silent, before any traffic.

The cache figures count *requests*, as the runtimes' ``mesh_cache_requests_total`` does, read from
their metrics endpoints before and after the traffic: a hit is a request whose model was loaded
where it arrived, a miss one that waited for a load (or whose load failed). A request the router
sent to a copy evicted meanwhile arrives twice (``routed_elsewhere`` at the first runtime, then a
hit or miss at the next): it is reported as retried, not counted twice, so hits plus misses never
exceed the requests sent. Loaded copies and distinct models are reported apart (a hot model may
have several copies).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mesh.embedded.up import Mesh

CACHE_VERSION = "v2"
POOL = 8  # distinct requests prepared per model (3 rows each), replayed in Zipf order


@dataclass
class DemoModel:
    model_id: str
    path: Path
    dataset: int
    size: int  # bytes on disk
    footprint: int  # bytes in memory (the same measure the sklearn loader reports)


def _datasets() -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_breast_cancer, load_iris, load_wine

    return [(d.data, d.target) for d in (load_iris(), load_wine(), load_breast_cancer())]


def train_models(count: int, directory: Path,
                 progress: Callable[[str], None] | None = None) -> list[DemoModel]:
    """Model i: tenant i's classifier on dataset i % 3, of a kind and size that vary with i.

    ``progress`` gets a line before the work, and one per tenth done when models are trained."""
    import joblib
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    from mesh.runtime.loaders.sizing import deep_nbytes

    directory.mkdir(parents=True, exist_ok=True)
    data = _datasets()
    models = []
    missing = sum(not (directory / f"tenant-{i:04d}.joblib").exists() for i in range(count))
    if progress is not None:
        progress(f"training {missing} of {count} per-tenant classifiers (cached in {directory})..."
                 if missing else f"reading {count} per-tenant classifiers (cached in {directory})...")
    done = 0
    for i in range(count):
        path = directory / f"tenant-{i:04d}.joblib"
        if not path.exists():
            done += 1
            if progress is not None and missing >= 10 and done % -(-missing // 10) == 0:
                progress(f"  trained {done}/{missing}")
            x, y = data[i % 3]
            rng = np.random.default_rng(1000 + i)
            rows = rng.choice(len(x), size=min(len(x), 120), replace=False)
            kind = i % 4
            if kind == 0:
                model: Any = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
            elif kind == 1:
                model = DecisionTreeClassifier(max_depth=4 + i % 5, random_state=i)
            else:
                # Forests of varying size, so that the models' memory footprints differ.
                model = RandomForestClassifier(n_estimators=5 + (i % 6) * 5, random_state=i)
            model.fit(x[rows], y[rows])
            tmp = path.with_suffix(".tmp")
            joblib.dump(model, tmp)
            tmp.replace(path)
        else:
            model = joblib.load(path)
        models.append(DemoModel(f"tenant-{i:04d}", path, i % 3, path.stat().st_size,
                                deep_nbytes(model)))
    return models


def demo_directory() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "mesh-serving" / "demo" / CACHE_VERSION


@dataclass
class Workload:
    bodies: list[bytes]  # POOL per model, model k's at [k * POOL, (k + 1) * POOL)
    model_ids: list[str]
    expected: list[np.ndarray]
    order: list[int]  # indices into bodies, in Zipf order of the models


def build_workload(models: list[DemoModel], n: int, alpha: float = 1.0, seed: int = 7) -> Workload:
    """``n`` requests, models drawn with Zipf popularity, 3 rows each, from ``POOL`` pre-encoded
    requests per model whose expected answers take one ``predict`` per model."""
    import joblib

    from mesh.tensors import encode_request

    data = _datasets()
    rng = np.random.default_rng(seed)
    bodies, ids, expected = [], [], []
    for m in models:
        x, _ = data[m.dataset]
        rows = x[rng.choice(len(x), size=3 * POOL)]
        answers = np.asarray(joblib.load(m.path).predict(rows))
        for p in range(POOL):
            chunk = rows[3 * p:3 * p + 3]
            request = encode_request(model_name=m.model_id, inputs={"input-0": chunk.astype(np.float64)})
            bodies.append(request.SerializeToString())
            ids.append(m.model_id)
            expected.append(answers[3 * p:3 * p + 3])
    weights = 1.0 / np.arange(1, len(models) + 1) ** alpha
    picks = rng.choice(len(models), size=n, p=weights / weights.sum())
    variants = rng.integers(0, POOL, size=n)
    order = (picks * POOL + variants).tolist()
    return Workload(bodies, ids, expected, order)


async def drive(router: str, workload: Workload, *, duration_s: float, concurrency: int,
                stop: dict[str, bool]) -> dict[str, Any]:
    """Closed-loop traffic; every answer is decoded and compared with the expected labels."""
    import grpc

    from mesh.gen.inference import grpc_service_pb2 as pb
    from mesh.tensors import decode_response

    channel = grpc.aio.insecure_channel(router)
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    latencies: list[float] = []
    errors: dict[str, int] = {}
    wrong = 0
    cursor = 0
    end = time.monotonic() + duration_s

    async def worker() -> None:
        nonlocal cursor, wrong
        while time.monotonic() < end and not stop["flag"]:
            i = workload.order[cursor % len(workload.order)]
            cursor += 1
            started = time.perf_counter()
            try:
                raw = await call(workload.bodies[i], timeout=60,
                                 metadata=(("mm-model-id", workload.model_ids[i]),))
            except grpc.aio.AioRpcError as err:
                errors[err.code().name] = errors.get(err.code().name, 0) + 1
                continue
            latencies.append(time.perf_counter() - started)
            out = decode_response(pb.ModelInferResponse.FromString(raw))
            if not np.array_equal(out["predict"], workload.expected[i]):
                wrong += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    await channel.close()
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"requests": len(latencies), "seconds": round(elapsed, 2),
            "throughput_rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p90_ms": round(float(np.percentile(lat, 90)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "errors": errors, "wrong_answers": wrong}


async def _register(router: str, models: list[DemoModel]) -> None:
    import grpc

    from mesh.gen.mmesh import model_mesh_pb2 as mm
    from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc

    async with grpc.aio.insecure_channel(router) as channel:
        stub = mm_grpc.ModelMeshStub(channel)  # type: ignore[no-untyped-call]  # protoc's stubs are unannotated
        await asyncio.gather(*(stub.registerModel(mm.RegisterModelRequest(
            modelId=m.model_id, modelInfo=mm.ModelInfo(type="sklearn", path=str(m.path))), timeout=30)
            for m in models))


async def cache_counters(registry_url: str) -> dict[str, int]:
    """Sum of the runtimes' published cache counters."""
    from mesh.registry import open_store
    from mesh.registry.keys import Keys
    from mesh.registry.records import InstanceRecord

    store, prefix = open_store(registry_url)
    try:
        kvs, _ = await store.get_prefix(Keys(prefix).instances)
    finally:
        await store.close()
    totals = {"hits": 0, "misses": 0, "loads": 0, "evictions": 0, "loaded_now": 0}
    for kv in kvs:
        r = InstanceRecord.from_json(kv.value)
        totals["hits"] += r.hits
        totals["misses"] += r.misses
        totals["loads"] += r.loads
        totals["evictions"] += r.evictions
        totals["loaded_now"] += r.model_count
    return totals


def run_demo(mesh: Mesh, trained: list[DemoModel], *, duration_s: float, stop: dict[str, bool]) -> int:
    router = mesh.router.endpoint
    phases: dict[str, float] = {}
    started = time.monotonic()
    print(f"preparing requests: {POOL} per model, each model's expected answers from its own "
          f"predict...", flush=True)
    workload = build_workload(trained, n=30_000)
    phases["preparing"] = time.monotonic() - started
    started = time.monotonic()
    asyncio.run(_register(router, trained))
    phases["registering"] = time.monotonic() - started
    total = sum(m.size for m in trained)
    endpoints = [url for name, url in mesh.metrics_endpoints()
                 if name.startswith("runtime") and url.startswith("http")]
    before = runtime_counters(endpoints)
    print(f"registered {len(trained)} models ({total / 2**20:.1f} MiB on disk); sending Zipf "
          f"traffic for {duration_s:g} s (16 concurrent requests)...", flush=True)
    started = time.monotonic()
    result = asyncio.run(drive(router, workload, duration_s=duration_s, concurrency=16, stop=stop))
    phases["traffic"] = time.monotonic() - started
    after = runtime_counters(endpoints)
    counters = {k: max(0, after.get(k, 0) - before.get(k, 0)) for k in after}
    counters["copies_now"] = after.get("copies_now", 0)
    counters["models_now"] = asyncio.run(loaded_models(mesh.registry or ""))
    counters["reported"] = int(len(endpoints) == len(mesh.runtimes))
    print(json.dumps({"traffic": result, "cache": counters, "phases_s": phases}, indent=2)
          if os.environ.get("MESH_DEMO_JSON") else _report(result, counters, phases))
    return 0 if not result["errors"] and not result["wrong_answers"] else 1


def runtime_counters(endpoints: list[str]) -> dict[str, int]:
    """Per-request cache counters, loads, evictions and copies, summed over the runtimes' metrics."""
    from mesh.observability.metrics import scrape_samples

    totals = {"hits": 0, "misses": 0, "retried": 0, "loads": 0, "load_failures": 0, "evictions": 0,
              "copies_now": 0}
    for url in endpoints:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                text = answer.read().decode()
            samples = list(scrape_samples(text))
        except (OSError, http.client.HTTPException, ValueError):
            continue  # a runtime restarting: its figures are missing from this report
        for name, labels, raw in samples:
            value = int(raw)
            if name == "mesh_cache_requests_total":
                if labels.get("result") == "hit":
                    totals["hits"] += value
                elif labels.get("reason") == "routed_elsewhere":
                    totals["retried"] += value
                else:
                    totals["misses"] += value
            elif name == "modelmesh_loadmodel_milliseconds_count":
                totals["loads"] += value
            elif name == "modelmesh_loadmodel_failure_total":
                totals["load_failures"] += value
            elif name == "mesh_evictions_total" and labels.get("reason") == "capacity":
                totals["evictions"] += value
            elif name == "modelmesh_instance_models_total":
                totals["copies_now"] += value
    return totals


async def loaded_models(registry_url: str) -> int:
    """Distinct models with a loaded copy, from the placements in the registry."""
    from mesh.registry import open_store
    from mesh.registry.keys import Keys
    from mesh.registry.records import LOADED, PlacementRecord

    store, prefix = open_store(registry_url)
    try:
        kvs, _ = await store.get_prefix(Keys(prefix).placements)
    finally:
        await store.close()
    records = [PlacementRecord.from_json(kv.value) for kv in kvs]
    return len({r.model_id for r in records if r.state == LOADED})


def _report(result: dict[str, Any], counters: dict[str, int], phases: dict[str, float]) -> str:
    looked_up = counters["hits"] + counters["misses"]
    hit_ratio = counters["hits"] / looked_up if looked_up else 0.0
    errors = ", ".join(f"{k} {v}" for k, v in result["errors"].items()) or "none"
    cache = (f"cache:       {counters['hits']} hits, {counters['misses']} misses (hit ratio {hit_ratio:.1%}); "
             f"{counters['retried']} retried on another runtime after an eviction\n"
             f"models:      {counters['loads']} loads, {counters['load_failures']} failed, "
             f"{counters['evictions']} evictions; now {counters['copies_now']} copies loaded, "
             f"of {counters['models_now']} distinct models")
    if not counters.get("reported"):
        cache += " (some runtimes' metrics could not be read: partial figures)"
    took = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items())
    return (f"\nrequests:    {result['requests']} in {result['seconds']} s = "
            f"{result['throughput_rps']} req/s (16 concurrent)\n"
            f"latency:     p50 {result['p50_ms']} ms, p90 {result['p90_ms']} ms, p99 {result['p99_ms']} ms\n"
            f"answers:     {result['wrong_answers']} wrong, errors: {errors}\n"
            f"{cache}\n"
            f"took:        {took}")
