"""``mesh demo`` / ``mesh up --example``: many models, little memory, real traffic.

Trains per-tenant classifiers on the datasets bundled with scikit-learn (no downloads; cached
under ``~/.cache/mesh-serving/demo`` so a second run starts at once), registers them, sends Zipf
traffic at them through the router for a while, checks every answer against the model's own
``predict``, and prints throughput, latency percentiles and the runtimes' cache hits, misses and
evictions. Unless ``--capacity`` is given the runtimes get room for about half of the models, so
that loads and evictions happen.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mesh.embedded.up import Mesh

CACHE_VERSION = "v2"


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


def train_models(count: int, directory: Path) -> list[DemoModel]:
    """Model i: tenant i's classifier on dataset i % 3, of a kind and size that vary with i."""
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
    for i in range(count):
        path = directory / f"tenant-{i:04d}.joblib"
        if not path.exists():
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
    bodies: list[bytes]
    model_ids: list[str]
    expected: list[np.ndarray]


def build_workload(models: list[DemoModel], n: int, alpha: float = 1.0, seed: int = 7) -> Workload:
    """``n`` pre-encoded requests, models drawn with Zipf popularity, 3 rows each."""
    import joblib

    from mesh.tensors import encode_request

    data = _datasets()
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(models) + 1) ** alpha
    picks = rng.choice(len(models), size=n, p=weights / weights.sum())
    loaded: dict[int, Any] = {}
    bodies, ids, expected = [], [], []
    for k in picks:
        m = models[k]
        x, _ = data[m.dataset]
        rows = x[rng.choice(len(x), size=3)]
        if k not in loaded:
            loaded[k] = joblib.load(m.path)
        expected.append(np.asarray(loaded[k].predict(rows)))
        request = encode_request(model_name=m.model_id, inputs={"input-0": rows.astype(np.float64)})
        bodies.append(request.SerializeToString())
        ids.append(m.model_id)
    return Workload(bodies, ids, expected)


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
            i = cursor % len(workload.bodies)
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
    workload = build_workload(trained, n=30_000)
    router = mesh.router.endpoint
    asyncio.run(_register(router, trained))
    total = sum(m.size for m in trained)
    print(f"registered {len(trained)} models ({total / 2**20:.1f} MiB on disk); sending Zipf "
          f"traffic for {duration_s:g} s...", flush=True)
    result = asyncio.run(drive(router, workload, duration_s=duration_s, concurrency=16, stop=stop))
    time.sleep(2.5)  # let the runtimes publish their final counters
    counters = asyncio.run(cache_counters(mesh.registry or ""))
    print(json.dumps({"traffic": result, "cache": counters}, indent=2) if os.environ.get("MESH_DEMO_JSON")
          else _report(result, counters))
    return 0 if not result["errors"] and not result["wrong_answers"] else 1


def _report(result: dict[str, Any], counters: dict[str, int]) -> str:
    looked_up = counters["hits"] + counters["misses"]
    hit_ratio = counters["hits"] / looked_up if looked_up else 0.0
    errors = ", ".join(f"{k} {v}" for k, v in result["errors"].items()) or "none"
    return (f"\nrequests:    {result['requests']} in {result['seconds']} s = "
            f"{result['throughput_rps']} req/s (16 concurrent)\n"
            f"latency:     p50 {result['p50_ms']} ms, p90 {result['p90_ms']} ms, p99 {result['p99_ms']} ms\n"
            f"answers:     {result['wrong_answers']} wrong, errors: {errors}\n"
            f"cache:       {counters['hits']} hits, {counters['misses']} misses "
            f"(hit ratio {hit_ratio:.1%}), {counters['loads']} loads, {counters['evictions']} evictions, "
            f"{counters['loaded_now']} models loaded now")
