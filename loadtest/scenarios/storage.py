"""Storage: the model-storage targets of issue 14, each measured against a baseline in the same run.

``python -m loadtest.scenarios.storage [--sizes 1MB,100MB,1GB] [--repeat N] [--server rclone|moto]
[--burst 100] [--budget-s 600] [--json] [--out FILE]``

Method. One S3-compatible server on 127.0.0.1, a child process over a fresh temp directory,
stopped by its PID at the end (``rclone serve s3`` by default, ``--server moto`` for moto's
in-memory server: ``loadtest.scenarios.storage_clients`` starts both). A storage key ``bench``
in modelmesh-serving's format points at it; every registration names it in ``ModelInfo.key``
(``{"storage_key": "bench", "storage_params": {"bucket": "bench"}}``, ``path`` = the object key).
Before anything is timed every object is HEADed once: rclone computes an object's MD5 (its ETag)
on first access and caches it, which would otherwise land on whichever client came first.

1. *Pull throughput* (target: a pull >= 0.8x the store client's raw download). One object of
   random bytes per ``--sizes`` entry. Rounds of four downloads per size, in a shuffled order
   per round: **pull**, ``mesh.storage.puller.Puller.pull`` of a new registration (a new model
   ID, so the disk cache misses): one GET (its answer is also the object's listing), download
   into the disk cache with the size checked, atomic rename: what a load waits for before its
   loader starts (the target's figure); ``done`` and the entry's removal follow, untimed.
   **pull+md5**, the same pull and then ``Puller.verified``: until the MD5 comparison with the
   ETag, which runs on its own thread and which a load overlaps with the model's deserialization
   (reported, not the target's figure). **obstore**, the same client library
   as the puller's own (the S3Store the puller's provider builds from the same key), ``obstore.get
   (...).stream()`` with the provider's chunk size written to a file in the same temp filesystem.
   **raw-http**, ``storage_clients``' raw-http client (one signed GET with ``http.client``). All
   three run in a thread (``asyncio.to_thread``), as the puller does; time is from the call to
   the file closed (not fsynced). MB/s is 10^6 bytes per second; a cell is the median of its
   rounds (``--repeat``, default 5 up to 100 MB and 3 above), the ratio that of the medians.
   Every download's size is checked, and the first round's bytes against a BLAKE2 digest.
   Untimed warm-up: one download of the smallest object by each client, and one pull of the
   smallest object larger than ``storage.range_bytes``, where the puller learns whether the store
   answers ranges (rclone does not: the puller then streams, for the process's life).
2. *Time to first prediction* (target: a model pulled from S3 answers its first request no more
   than the download + 10 ms later than the same model from a local path). A router and a
   runtime in this process's event loop (``serve_router``/``serve_runtime``, a ``memory://``
   registry, as ``mesh up`` embeds them), two scikit-learn models trained here: a random forest
   (100 trees, depth 16, ~5 MB) and a logistic regression (~1 KB). Each round registers each
   model twice under new IDs, from its local path and from S3, and sends each one first
   ModelInfer through the router (client-side latency, the registration not included), and
   times a raw obstore download of the same object; the six are shuffled. Reported per model:
   median over rounds of ``t_s3 - t_local`` against median ``t_raw + 10 ms``, and the pull's own
   time as the runtime measured it (the growth of ``mesh_storage_download_seconds_sum``, scraped
   around each S3 request, untimed), which splits the difference. Then the last S3
   forest is unloaded through the runtime's SPI (``mmesh.ModelRuntime/unloadModel``) and asked
   again: the reload's latency, and from the runtime's ``/metrics`` that it counted
   ``mesh_storage_pulls_total{result="disk"}`` +1 and no download (pulls and bytes unchanged).
3. *Concurrent first requests* (target: ``--burst`` (100) concurrent first ModelInfer calls
   for one model in S3 all succeed, with one download and one load). A new registration of the
   forest, the calls issued together on one channel; the runtime's ``mesh_storage_pulls_total
   {result="downloaded"}`` and ``modelmesh_loadmodel_milliseconds_count`` must each grow by 1.

Warm-up for 2 and 3 (untimed, on its own line): each model once from its path and once from S3,
since a runtime's first load of a model class also imports its scikit-learn modules. After
``--budget-s`` no new round starts, but every target runs its first round, so each has a figure.

Caveats. Loopback on a shared machine: client, server, router and runtime compete for the same
cores (two on the reference machine), so the throughput figures compare clients for *this*
server and machine; they are not network figures. Every download lands in the page cache (no
fsync), and rclone reads its objects from the page cache (they were just written), so the disk
is not measured either. The puller keeps one client per storage key, as the baselines
keep one for the run. The MD5 check costs a pass over the bytes (1.4 ms of CPU per MB here) that
neither baseline makes: ``pull+md5`` shows it. moto keeps
objects in Python memory and is far slower than either client: its figures measure moto. A
1 GB object needs ~3 GB free under the temp directory (object, pull, one baseline download).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.cluster import prepare_benchmark_process
from loadtest.models import train_logistic
from loadtest.report import ForeignLoad, add_output_args, emit, machine, machine_line, table
from loadtest.scenarios.storage_clients import (
    ACCESS_KEY,
    BUCKET,
    REGION,
    SECRET_KEY,
    SERVERS,
    Server,
    digest,
    dl_raw_http,
    fmt_size,
    free_port,
    make_object,
    parse_size,
    upload,
)

TARGET_RATIO = 0.8  # a pull at least this share of the raw download's MB/s
TARGET_EXTRA_MS = 10.0  # a pulled model's first answer: at most the download + this much later
N_FEATURES = 20
MODEL_KEY = json.dumps({"storage_key": "bench", "storage_params": {"bucket": BUCKET}})
GiB = 1 << 30


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Budget:
    """After ``seconds`` no new round starts; a target's first round always runs."""

    def __init__(self, seconds: float, notes: list[str]) -> None:
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds
        self.notes = notes

    def stop_before(self, what: str, rnd: int) -> bool:
        if rnd == 0 or time.monotonic() < self.deadline:
            return False
        self.notes.append(f"budget of {self.seconds:g} s spent: {what} stopped after {rnd} round(s)")
        return True


# -- downloads ------------------------------------------------------------------------------------

def raw_obstore(store: Any, key: str, dest: Path) -> None:
    """The baseline: the puller's client library and chunk size, no HEAD, no checksum."""
    import obstore

    from mesh.storage.providers import CHUNK

    with open(dest, "wb") as out:
        for chunk in obstore.get(store, key).stream(min_chunk_size=CHUNK):
            out.write(memoryview(chunk))


async def timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = await fn()
    return time.perf_counter() - t0, value


def spec_for(model_id: str, key: str) -> Any:
    from mesh.registry.records import ModelSpec

    return ModelSpec(model_id=model_id, type="sklearn", path=key, key=MODEL_KEY,
                     registered_ms=int(time.time() * 1000))


@dataclass
class Store:
    """The server, its storage key, and the baselines' warm clients."""

    server: Server
    keys_dir: Path
    store: Any  # obstore S3Store, built by the puller's own provider
    raw_http: Callable[[str, int, Path], None]
    scratch: Path  # baseline downloads land here (the temp filesystem of the disk cache)

    async def obstore_get(self, key: str) -> float:
        dest = self.scratch / f"raw-{uuid.uuid4().hex[:8]}"
        seconds, _ = await timed(lambda: asyncio.to_thread(raw_obstore, self.store, key, dest))
        dest.unlink()
        return seconds


def open_store(server: Server, tmp: Path) -> Store:
    from mesh.storage.config import StorageKeys, resolve
    from mesh.storage.location import locate
    from mesh.storage.providers import ObjectStoreProvider, provider_for

    keys_dir = tmp / "storage-config"
    keys_dir.mkdir()
    (keys_dir / "bench").write_text(json.dumps({
        "type": "s3", "access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY,
        "endpoint_url": server.endpoint, "region": REGION, "default_bucket": BUCKET}))
    location = locate("probe", MODEL_KEY)
    assert location is not None
    provider = provider_for(resolve(location, StorageKeys(keys_dir)), retries=3, connect_timeout_s=5.0)
    assert isinstance(provider, ObjectStoreProvider)
    scratch = tmp / "scratch"
    scratch.mkdir()
    return Store(server, keys_dir, provider.store, dl_raw_http(server.endpoint, None), scratch)


@dataclass(frozen=True)
class Model:
    name: str
    path: Path
    key: str  # its object in the bucket
    sample: np.ndarray


def train_models(directory: Path) -> list[Model]:
    import joblib
    from sklearn.ensemble import RandomForestClassifier

    small = train_logistic("small", directory, n_features=N_FEATURES, seed=7)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, N_FEATURES)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).astype(np.int64)
    forest = RandomForestClassifier(n_estimators=100, max_depth=16, random_state=0, n_jobs=1).fit(x, y)
    joblib.dump(forest, directory / "forest.joblib")
    return [Model("logistic", small.path, "models-logistic.joblib", small.sample),
            Model("forest", directory / "forest.joblib", "models-forest.joblib", x[:1].copy())]


def head(store: Store, key: str) -> None:
    """rclone computes an object's MD5 (its ETag) on first access and caches it: module docstring."""
    import obstore

    obstore.head(store.store, key)


# -- target 1: pull throughput --------------------------------------------------------------------

def put_objects(store: Store, tmp: Path, sizes: list[int], models: list[Model]) -> dict[int, tuple[str, str]]:
    """Every object of the run, before any is read: rclone caches its directory listing, so an
    object copied into its folder later would be missing for minutes. Answers size -> (key, BLAKE2)."""
    objects: dict[int, tuple[str, str]] = {}
    for size in sizes:
        log(f"writing a {fmt_size(size)} object...")
        source = tmp / "source"
        blake = make_object(source, size)
        key = f"obj-{size}.bin"
        upload(store.server, key, source)
        source.unlink()
        objects[size] = (key, blake)
    for m in models:
        upload(store.server, m.key, m.path)
    for key in [k for k, _ in objects.values()] + [m.key for m in models]:
        head(store, key)
    return objects


async def throughput(store: Store, tmp: Path, objects: dict[int, tuple[str, str]], repeat: int | None,
                     budget: Budget, notes: list[str]) -> dict[str, Any]:
    from mesh.settings import load_settings
    from mesh.storage.puller import Puller

    sizes = sorted(objects)
    settings = load_settings(env={}, overrides={"storage": {
        "config_dir": str(store.keys_dir), "cache_dir": str(tmp / "pull-cache"),
        "cache_bytes": 3 * max(sizes) + GiB}}).storage
    puller = Puller(settings)
    await asyncio.to_thread(puller.start)

    async def pull(size: int, check: bool, verified: bool = False) -> float:
        key, blake = objects[size]

        async def pulled_and_maybe_verified() -> Any:
            pulled = await puller.pull(spec_for(f"tp-{uuid.uuid4().hex[:12]}", key))
            if verified:  # the MD5 comparison, which a load overlaps with the model's deserialization
                await puller.verified(pulled)
            return pulled

        seconds, pulled = await timed(pulled_and_maybe_verified)
        try:
            if pulled.from_disk:
                raise RuntimeError(f"pull of {key} was served by the disk cache, not downloaded")
            await asyncio.to_thread(_check, Path(pulled.path), size, blake if check else "", remove=False)
        finally:
            puller.done(pulled)
            puller.disk.remove(pulled.digest)
        return seconds

    async def obstore_get(size: int, check: bool) -> float:
        key, blake = objects[size]
        dest = store.scratch / "obstore"
        seconds, _ = await timed(lambda: asyncio.to_thread(raw_obstore, store.store, key, dest))
        _check(dest, size, blake if check else "")
        return seconds

    async def http_get(size: int, check: bool) -> float:
        key, blake = objects[size]
        dest = store.scratch / "raw-http"
        seconds, _ = await timed(lambda: asyncio.to_thread(store.raw_http, key, size, dest))
        _check(dest, size, blake if check else "")
        return seconds

    async def pull_verified(size: int, check: bool) -> float:
        return await pull(size, check, verified=True)

    clients = {"pull": pull, "pull+md5": pull_verified, "obstore": obstore_get, "raw-http": http_get}
    try:
        for fn in clients.values():  # warm-up, untimed
            await fn(sizes[0], True)
        ranged = [s for s in sizes if 0 < settings.range_bytes < s]
        if ranged:
            seconds = await pull(ranged[0], False)
            notes.append(f"warm-up pull of {fmt_size(ranged[0])} (the store's answer to ranges learned): "
                         f"{ranged[0] / seconds / 1e6:.0f} MB/s")
        rounds = {s: repeat or (5 if s <= 100 * 10**6 else 3) for s in sizes}
        mbps: dict[int, dict[str, list[float]]] = {s: {c: [] for c in clients} for s in sizes}
        for rnd in range(max(rounds.values())):
            if budget.stop_before("pull throughput", rnd):
                break
            for size in sizes:
                if rnd >= rounds[size]:
                    continue
                order = list(clients)
                random.shuffle(order)
                for name in order:
                    seconds = await clients[name](size, rnd == 0)
                    mbps[size][name].append(size / seconds / 1e6)
                log(f"  round {rnd + 1} {fmt_size(size):>7}: " + ", ".join(
                    f"{n} {mbps[size][n][-1]:.0f}" for n in clients) + " MB/s")
    finally:
        await asyncio.to_thread(puller.close)
    result: dict[str, Any] = {"range_bytes": settings.range_bytes, "sizes": {}}
    for size in sizes:
        cells = {name: median(values) for name, values in mbps[size].items()}
        vs_obstore, vs_http = cells["pull"] / cells["obstore"], cells["pull"] / cells["raw-http"]
        result["sizes"][fmt_size(size)] = {
            "bytes": size, "rounds": len(mbps[size]["pull"]),
            "mbps": {n: [round(v, 1) for v in vals] for n, vals in mbps[size].items()},
            "median_mbps": {n: round(v, 1) for n, v in cells.items()},
            "pull_vs_obstore": round(vs_obstore, 3), "pull_vs_raw_http": round(vs_http, 3),
            "pull_md5_vs_obstore": round(cells["pull+md5"] / cells["obstore"], 3),
            "pass": vs_obstore >= TARGET_RATIO, "pass_vs_raw_http": vs_http >= TARGET_RATIO}
    return result


def _check(dest: Path, size: int, blake: str, *, remove: bool = True) -> None:
    got = dest.stat().st_size
    if got != size or (blake and digest(dest) != blake):
        raise RuntimeError(f"download into {dest}: wrong bytes ({got} of {size})")
    if remove:
        dest.unlink()


# -- the mesh, in this event loop (as mesh up embeds it) ------------------------------------------

@dataclass
class Component:
    endpoint: str
    roots: Any  # mesh.tasks.RootTasks
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.roots.stop()
        await asyncio.wait_for(self.task, 30)


async def start_component(serve: Callable[..., Coroutine[Any, Any, None]], settings: Any) -> Component:
    from mesh.tasks import RootTasks

    roots = RootTasks()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, roots, ready.set_result))
    done, _ = await asyncio.wait({ready, task}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # the start-up error
        raise RuntimeError("component ended during start-up")
    if ready not in done:
        task.cancel()
        raise TimeoutError("component not ready within 60 s")
    return Component(ready.result(), roots, task)


class Mesh:
    """One router and one runtime; the runtime's metrics on a known port."""

    def __init__(self, store: Store, tmp: Path, models_dir: Path) -> None:
        from mesh.settings import load_settings

        metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.settings = load_settings(env={}, overrides={
            "registry": {"url": f"memory://storage-bench-{uuid.uuid4().hex[:8]}"},
            "router": {"port": 0, "metrics_port": 0, "rest_port": -1, "default_timeout_s": 120.0},
            "runtime": {"port": 0, "metrics_port": metrics_port,
                        "publish_interval_s": 0.2, "capacity_bytes": 2 * GiB, "load_timeout_s": 120.0,
                        "model_roots": (str(models_dir),), "state_dir": str(tmp / "runtime-state")},
            "storage": {"config_dir": str(store.keys_dir), "cache_dir": str(tmp / "runtime-cache")},
            "log": {"level": "warning"}})
        self.router: Component | None = None
        self.runtime: Component | None = None
        self.channel: Any = None

    async def start(self) -> None:
        import grpc

        from mesh.router.app import serve_router
        from mesh.runtime.app import serve_runtime

        self.runtime = await start_component(serve_runtime, self.settings)
        self.router = await start_component(serve_router, self.settings)
        self.channel = grpc.aio.insecure_channel(self.router.endpoint)

    async def stop(self) -> None:
        # The client first, then the router (no new requests reach the runtime), then the runtime.
        if self.channel is not None:
            await self.channel.close()
        for component in (self.router, self.runtime):
            if component is not None and not component.task.done():
                await component.stop()

    async def register(self, model_id: str, path: str, from_s3: bool) -> None:
        from mesh.gen.mmesh import model_mesh_pb2 as mm
        from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc

        info = mm.ModelInfo(type="sklearn", path=path, key=MODEL_KEY if from_s3 else "")
        await mm_grpc.ModelMeshStub(self.channel).registerModel(
            mm.RegisterModelRequest(modelId=model_id, modelInfo=info), timeout=30)

    async def infer(self, model_id: str, sample: np.ndarray) -> dict[str, np.ndarray]:
        from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
        from mesh.tensors import decode_response, encode_request

        request = encode_request(model_name=model_id, inputs={"input": sample})
        response = await pb_grpc.GRPCInferenceServiceStub(self.channel).ModelInfer(
            request, metadata=(("mm-model-id", model_id),), timeout=180)
        return decode_response(response)

    async def unload_on_runtime(self, model_id: str) -> None:
        import grpc

        from mesh.gen.mmesh import model_runtime_pb2 as rt
        from mesh.gen.mmesh import model_runtime_pb2_grpc as rt_grpc

        assert self.runtime is not None
        async with grpc.aio.insecure_channel(self.runtime.endpoint) as channel:
            await rt_grpc.ModelRuntimeStub(channel).unloadModel(rt.UnloadModelRequest(modelId=model_id), timeout=30)

    async def counters(self) -> dict[str, float]:
        """The runtime's storage and load counters now."""
        from prometheus_client.parser import text_string_to_metric_families

        def fetch() -> str:
            with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
                return str(response.read().decode())

        counts = {"downloaded": 0.0, "disk": 0.0, "failed": 0.0, "bytes": 0.0, "download_s": 0.0, "loads": 0.0}
        for family in text_string_to_metric_families(await asyncio.to_thread(fetch)):
            for sample in family.samples:
                if sample.name == "mesh_storage_pulls_total" and sample.labels.get("result") in counts:
                    counts[sample.labels["result"]] += sample.value
                elif sample.name == "mesh_storage_download_bytes_total":
                    counts["bytes"] += sample.value
                elif sample.name == "mesh_storage_download_seconds_sum":
                    counts["download_s"] += sample.value
                elif sample.name == "modelmesh_loadmodel_milliseconds_count":
                    counts["loads"] += sample.value
        return counts


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


# -- targets 2 and 3 ------------------------------------------------------------------------------

async def first_prediction(mesh: Mesh, store: Store, models: list[Model], repeat: int, budget: Budget,
                           notes: list[str]) -> dict[str, Any]:
    # Warm-up, untimed in the target: the runtime's first load of each model class imports its
    # scikit-learn modules (a forest's first unpickling: ~0.1 s), its first pull builds what later
    # pulls reuse.
    warm: list[str] = []
    for m in models:
        for kind, path in (("local", str(m.path)), ("S3", m.key)):
            await mesh.register(f"warm-{m.name}-{kind}", path, kind == "S3")
            t0 = time.perf_counter()
            await mesh.infer(f"warm-{m.name}-{kind}", m.sample)
            warm.append(f"{m.name} {kind} {(time.perf_counter() - t0) * 1e3:.1f} ms")
    notes.append(f"warm-up first answers (not counted): {', '.join(warm)}")

    ms: dict[str, dict[str, list[float]]] = {m.name: {"local": [], "s3": [], "raw": [], "pull": []} for m in models}
    last_s3 = ""
    for rnd in range(repeat):
        if budget.stop_before("time to first prediction", rnd):
            break
        steps: list[tuple[Model, str]] = [(m, kind) for m in models for kind in ("local", "s3", "raw")]
        random.shuffle(steps)
        answers: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        for m in models:
            await mesh.register(f"ttfp-{m.name}-local-{rnd}", str(m.path), False)
            await mesh.register(f"ttfp-{m.name}-s3-{rnd}", m.key, True)
        for m, kind in steps:
            if kind == "raw":
                seconds = await store.obstore_get(m.key)
            else:
                before = await mesh.counters()
                t0 = time.perf_counter()
                answers[m.name, kind] = await mesh.infer(f"ttfp-{m.name}-{kind}-{rnd}", m.sample)
                seconds = time.perf_counter() - t0
                if kind == "s3":  # the pull's own time, as the runtime measured it
                    ms[m.name]["pull"].append(_delta(await mesh.counters(), before)["download_s"] * 1e3)
            ms[m.name][kind].append(seconds * 1e3)
        for m in models:  # the pulled model is the same model
            local, s3 = answers[m.name, "local"], answers[m.name, "s3"]
            if local.keys() != s3.keys() or any(not np.array_equal(local[k], s3[k]) for k in local):
                raise RuntimeError(f"{m.name}: the model pulled from S3 answered differently from the local one")
        last_s3 = f"ttfp-forest-s3-{rnd}"
        log(f"  round {rnd + 1}: " + "; ".join(
            f"{m.name} local {ms[m.name]['local'][-1]:.1f} / S3 {ms[m.name]['s3'][-1]:.1f} / raw "
            f"{ms[m.name]['raw'][-1]:.1f} ms" for m in models))
    per_model: dict[str, Any] = {}
    for m in models:
        runs = ms[m.name]
        extra = [s - loc for s, loc in zip(runs["s3"], runs["local"], strict=True)]
        bound = median(runs["raw"]) + TARGET_EXTRA_MS
        per_model[m.name] = {
            "bytes": m.path.stat().st_size, "rounds": len(extra),
            "ms": {k: [round(v, 2) for v in vals] for k, vals in runs.items()},
            "median_ms": {k: round(median(vals), 2) for k, vals in runs.items()},
            "s3_minus_local_ms": round(median(extra), 2), "bound_ms": round(bound, 2),
            "pass": median(extra) <= bound}

    # The reload after an unload reads the disk cache: no download.
    forest = models[-1]
    before = await mesh.counters()
    await mesh.unload_on_runtime(last_s3)
    seconds, _ = await timed(lambda: mesh.infer(last_s3, forest.sample))
    delta = _delta(await mesh.counters(), before)
    reload = {"model": last_s3, "reload_ms": round(seconds * 1e3, 2), "counters": delta,
              "pass": delta["disk"] == 1 and delta["downloaded"] == 0 and delta["bytes"] == 0}
    return {"models": per_model, "reload": reload}


async def concurrent_first(mesh: Mesh, model: Model, burst: int) -> dict[str, Any]:
    model_id = "burst-s3"
    await mesh.register(model_id, model.key, True)
    before = await mesh.counters()
    t0 = time.perf_counter()
    finished: list[float] = []

    async def one() -> None:
        await mesh.infer(model_id, model.sample)
        finished.append(time.perf_counter() - t0)

    outcomes = await asyncio.gather(*(one() for _ in range(burst)), return_exceptions=True)
    delta = _delta(await mesh.counters(), before)
    errors = sorted({f"{type(o).__name__}: {str(o)[:200]}" for o in outcomes if isinstance(o, BaseException)})
    ok = burst - sum(isinstance(o, BaseException) for o in outcomes)
    return {"requests": burst, "ok": ok, "errors": errors[:5],
            "first_ms": round(min(finished) * 1e3, 1) if finished else None,
            "last_ms": round(max(finished) * 1e3, 1) if finished else None, "counters": delta,
            "pass": ok == burst and delta["downloaded"] == 1 and delta["loads"] == 1}


# -- the run --------------------------------------------------------------------------------------

async def run(args: argparse.Namespace, server: Server, sizes: list[int], tmp: Path) -> dict[str, Any]:
    notes: list[str] = []
    budget = Budget(args.budget_s, notes)
    store = open_store(server, tmp)
    log(f"{args.server} serving S3 at {server.endpoint}; training the models...")
    models_dir = tmp / "models"
    models = await asyncio.to_thread(train_models, models_dir)
    objects = await asyncio.to_thread(put_objects, store, tmp, sizes, models)
    tp = await throughput(store, tmp, objects, args.repeat, budget, notes)
    mesh = Mesh(store, tmp, models_dir)
    log("time to first prediction: starting a router and a runtime...")
    await mesh.start()
    try:
        ttfp = await first_prediction(mesh, store, models, args.repeat or 5, budget, notes)
        log(f"{args.burst} concurrent first requests...")
        burst = await concurrent_first(mesh, models[-1], args.burst)
    finally:
        await mesh.stop()
    return {"settings": {"server": args.server, "sizes": [fmt_size(s) for s in sizes], "repeat": args.repeat,
                         "burst": args.burst, "budget_s": args.budget_s, "range_bytes": tp["range_bytes"]},
            "throughput": tp["sizes"], "first_prediction": ttfp, "concurrent": burst, "notes": notes}


def render(result: dict[str, Any]) -> str:
    tp, ttfp, burst = result["throughput"], result["first_prediction"], result["concurrent"]
    lines = [machine_line(result["machine"]), "",
             f"### 1. Pull throughput ({result['settings']['server']} on 127.0.0.1; median MB/s of the rounds; "
             f"target: pull >= {TARGET_RATIO:g}x the raw download)", "",
             table(["size", "rounds", "pull", "pull+md5", "obstore", "raw-http", "pull / obstore", "verdict",
                    "pull+md5 / obstore", "pull / raw-http", "verdict (2nd baseline)"],
                   [[size, r["rounds"],
                     *(f"{r['median_mbps'][n]:.0f}" for n in ("pull", "pull+md5", "obstore", "raw-http")),
                     f"{r['pull_vs_obstore']:.2f}x", verdict(r["pass"]), f"{r['pull_md5_vs_obstore']:.2f}x",
                     f"{r['pull_vs_raw_http']:.2f}x", verdict(r["pass_vs_raw_http"])] for size, r in tp.items()]),
             "", f"### 2. Time to first prediction (ms, medians of the rounds; target: S3 - local <= raw download "
             f"+ {TARGET_EXTRA_MS:g} ms)", "",
             table(["model", "bytes", "rounds", "local", "S3", "pull (runtime)", "raw download", "S3 - local",
                    f"raw + {TARGET_EXTRA_MS:g} ms", "verdict"],
                   [[name, r["bytes"], r["rounds"],
                     *(f"{r['median_ms'][k]:.1f}" for k in ("local", "s3", "pull", "raw")),
                     f"{r['s3_minus_local_ms']:.1f}", f"{r['bound_ms']:.1f}", verdict(r["pass"])]
                    for name, r in ttfp["models"].items()])]
    rl = ttfp["reload"]
    c = rl["counters"]
    lines += ["", table(["reload after unloadModel", "latency ms", "pulls disk", "pulls downloaded",
                         "bytes downloaded", "loads", "verdict (disk +1, no download)"],
                        [[rl["model"], f"{rl['reload_ms']:.1f}", f"+{c['disk']:g}", f"+{c['downloaded']:g}",
                          f"+{c['bytes']:g}", f"+{c['loads']:g}", verdict(rl["pass"])]])]
    c = burst["counters"]
    lines += ["", f"### 3. {burst['requests']} concurrent first requests, one model in S3 (target: all succeed, "
              "one download, one load)", "",
              table(["requests", "ok", "first answer ms", "last answer ms", "downloads", "loads", "disk reads",
                     "verdict"],
                    [[burst["requests"], burst["ok"], burst["first_ms"], burst["last_ms"], f"+{c['downloaded']:g}",
                      f"+{c['loads']:g}", f"+{c['disk']:g}", verdict(burst["pass"])]])]
    if burst["errors"]:
        lines += ["", "errors: " + "; ".join(burst["errors"])]
    if result["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.scenarios.storage",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="1MB,100MB,1GB", help="object sizes of the throughput target")
    parser.add_argument("--repeat", type=int, default=None,
                        help="rounds per size and of the first-prediction target (default: 5, and 3 above 100 MB)")
    parser.add_argument("--server", choices=sorted(SERVERS), default="rclone")
    parser.add_argument("--burst", type=int, default=100, help="concurrent first requests (default 100)")
    parser.add_argument("--budget-s", type=float, default=600.0,
                        help="no new round starts after this many seconds (default 600)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    try:
        sizes = sorted({parse_size(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--sizes: not a list of sizes: {args.sizes!r}")
    if not sizes or sizes[0] <= 0 or (args.repeat is not None and args.repeat < 1) or args.burst < 1:
        parser.error("--sizes must be positive sizes, --repeat and --burst at least 1")
    missing = SERVERS[args.server].missing()
    if missing:
        print(f"error: server {args.server}: {missing}", file=sys.stderr)
        return 2
    prepare_benchmark_process()
    foreign = ForeignLoad()
    facts = machine()
    tmp = Path(tempfile.mkdtemp(prefix="mesh-storage-bench-"))
    server = SERVERS[args.server](tmp / "server")
    try:
        free = shutil.disk_usage(tmp).free
        if free < 3 * sizes[-1] + GiB:
            print(f"error: {fmt_size(sizes[-1])} objects need ~{fmt_size(3 * sizes[-1] + GiB)} free under "
                  f"{tmp.parent}; {fmt_size(free)} free", file=sys.stderr)
            return 2
        import uvloop

        (tmp / "server").mkdir()
        server.start()
        result = uvloop.run(run(args, server, sizes, tmp))
    finally:
        # Here, not in run(): a SIGTERM (SystemExit) may leave the event loop without its finally blocks.
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"machine": {**facts, "foreign_load": foreign.result()}, **result}
    emit(args, result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
