"""Scale: registration throughput, router and etcd memory, and routing latency as the registry grows.

``python -m loadtest.scenarios.scale [--models 100000,1000000] [--in-flight K] [--warm-models W]
[--warm-requests R] [--lookups L] [--no-list] [--bulk N [--bulk-in-flight C]] [--raw N] [--json] [--out FILE]``

Bulk mode (issue 22): ``--bulk N`` registers through ``registerModels``, N items a call, C (4)
calls in flight, and then (``--raw``, 100,000 by default with ``--bulk``) runs
``raw_etcd_creates``: single-key create-if-absent transactions straight to the same etcd with the
router's client library (``EtcdStore.create``), ``K`` in flight, the router's values; the report
puts the registration rate beside that raw rate, same run.

The standard suite runs one step of 100,000 (``SUITE_ARGS``, about 2 minutes on two cores). The
million-registration run is a command of its own, ``python -m loadtest.scenarios.scale --models
100000,1000000 --json`` (the default steps): one call per registration, the router needs about
0.7 ms of CPU each and one router registers about 1,150/s on two cores shared with etcd and this
client (the run takes about 15 minutes); with ``--bulk 1000`` the million takes about 75 s. etcd's
database then holds about 350-430 MB, inside its default 2 GiB quota.

Yardsticks, same run: after each step's registrations, etcd's own single-key create-if-absent
rate (``raw_etcd_creates``, up to 20,000 transactions at the step's concurrency) and a bare
grpc.aio echo server's CPU per request of a registration's size (``loadtest.echo_server``), so that
the report can say registrations/s as a share of etcd's rate (issue 22: at least 0.3x one call at
a time, 1.0x in bulk) and the router's CPU per registration as a multiple of the echo server's
(at most 2x).

Method. One private etcd, one runtime and one router, separate processes on 127.0.0.1
(``loadtest.cluster``). ``W`` (20) small scikit-learn models are trained, registered and loaded
first; they stay loaded all run. Then the registry grows in steps (0, then each ``--models``
count in turn: 0 -> 100,000 -> 1,000,000). Each step registers the models it adds through the
router's ``registerModel`` (``K`` = 256 calls in flight from one grpc.aio client; metadata only,
their paths are never read), and after a 2 s pause records:

* *registration*: registrations/s over the step and over its last tenth (does a bigger registry
  slow writes down?), and the CPU each process spent per registration (router, etcd, runtime,
  this client) from their CPU times;
* *memory*: the router's RSS, USS and RSS high-water mark (``router_memory.memory``), etcd's RSS,
  and etcd's database size (``etcd_mvcc_db_total_size_in_bytes`` from its ``/metrics``, next to
  ``etcd_server_quota_backend_bytes``: past the quota etcd refuses every write);
* *warm path*: ``R`` (2,000) sequential V2 ``ModelInfer`` calls round robin over the ``W`` loaded
  models, p50/p99 (after 100 not counted). The hot path reads nothing from the registry, so
  registry size should not show here;
* *cold lookups*: ``L`` (1,000) sequential V2 ``ModelReady`` calls on random registered, unloaded
  models the router has not seen (its spec-cache misses, so each reads ``models/<id>`` from etcd),
  and ``L`` ``getModelStatus`` calls on other such models (which always read the registration
  from etcd), p50/p99. Models among the last ``--spec-cache`` + ``K`` registered are never
  picked: registering primes the router's spec cache (at most ``--spec-cache`` entries), so those
  would be hits. Every model is looked up at most once in a run;
* *listing*: the time to page through every registration with ``listModels`` (pages of 5,000),
  and that it returns them all; ``--no-list`` skips it (a million take a while).

Caveats. The client, the router, etcd and the runtime share the machine's cores, so the rates are
those of this machine as a whole: the router's event loop is the bottleneck (about two thirds of a
millisecond of CPU per registration: one inbound gRPC call, one etcd transaction, the watch event
and a log line). etcd's database is never compacted here (nothing is overwritten, so there is
little to reclaim) and grows with every write. The router logs one line per registration at the
default level, to a file in the cluster's work directory. Latencies are sequential (one call at a
time): they show what a single request pays, not throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil

from loadtest.cluster import Cluster, Server, etcd_metrics, prepare_benchmark_process
from loadtest.echo_server import METHOD as ECHO_METHOD
from loadtest.load import bytes_call, percentile_ms
from loadtest.management import register_bulk, register_many
from loadtest.models import TrainedModel, infer_body, train_logistic
from loadtest.report import ForeignLoad, add_output_args, emit, machine, machine_line, table
from loadtest.scenarios.router_memory import MB, log, memory
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.registry import open_store
from mesh.registry.keys import Keys
from mesh.registry.records import ModelSpec

SUITE_ARGS: list[str] = ["--models", "100000"]
SUITE_SECONDS: int = 120

INFER = "/inference.GRPCInferenceService/ModelInfer"
DEFAULT_STEPS = (100_000, 1_000_000)
LIST_PAGE = 5_000
WARM_UNCOUNTED = 100
SETTLE_S = 2.0
YARDSTICK_CALLS = 20_000  # raw etcd creates and echo calls per step (fewer when the step adds fewer)
TARGET_ETCD_SHARE = 0.3  # issue 22: registrations/s at least this share of etcd's own create rate
TARGET_BULK_SHARE = 1.0  # issue 22, registerModels: at least etcd's own single-key rate (grouping beats it)
TARGET_ECHO_RATIO = 2.0  # issue 22: router CPU per registration at most this many echo requests' CPU
NOT_LOADED = mm.ModelStatusInfo.ModelStatus.Value("NOT_LOADED")


class ScenarioError(RuntimeError):
    """The measurement cannot go on (the message is the one line printed)."""


def model_id(i: int) -> str:
    return f"scale-{i:07d}"


def _quantiles(latencies_s: list[float], errors: dict[str, int]) -> dict[str, Any]:
    return {"requests": len(latencies_s) + sum(errors.values()), "ok": len(latencies_s),
            "p50_ms": round(percentile_ms(latencies_s, 50), 3), "p99_ms": round(percentile_ms(latencies_s, 99), 3),
            "errors": errors}


async def _sequential(calls: list[Callable[[], Awaitable[Any]]],
                      check: Callable[[Any], str | None] = lambda _: None) -> dict[str, Any]:
    """One call at a time; ``check`` names what is wrong with an answer (counted as an error)."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    for make in calls:
        t0 = time.perf_counter()
        try:
            answer = await make()
        except grpc.aio.AioRpcError as err:
            errors[err.code().name] = errors.get(err.code().name, 0) + 1
            continue
        elapsed = time.perf_counter() - t0
        wrong = check(answer)
        if wrong:
            errors[wrong] = errors.get(wrong, 0) + 1
        else:
            latencies.append(elapsed)
    return _quantiles(latencies, errors)


def _raw_value(i: int, now_ms: int) -> bytes:
    """What the router writes for registration ``i`` (the same ID, type and path), byte for byte in size."""
    return ModelSpec(model_id=model_id(i), type="sklearn", path=f"/scale/{model_id(i)}/model.joblib",
                     registered_ms=now_ms, last_used_ms=now_ms - 6 * 3_600_000).to_json()


async def raw_etcd_creates(registry_url: str, count: int, in_flight: int, etcd: psutil.Process) -> dict[str, Any]:
    """etcd's own rate for the write a registration makes, as the floor bulk registration is held to
    (issue 22): ``count`` single-key create-if-absent transactions through ``EtcdStore.create`` (the
    aetcd client and channel options the router uses), ``in_flight`` at a time from one client, with
    the values the router writes, under a prefix of their own (``/raw-bench/``, deleted after)."""
    store, _ = open_store(registry_url)
    keys = Keys("/raw-bench/")
    now_ms = int(time.time() * 1000)
    pending = iter(range(count))
    created = 0
    errors: dict[str, int] = {}

    async def worker() -> None:
        nonlocal created
        for i in pending:
            try:
                if await store.create(keys.model(model_id(i)), _raw_value(i, now_ms)):
                    created += 1
                else:
                    errors["exists"] = errors.get("exists", 0) + 1
            except Exception as err:  # counted, not fatal: the rate is what is measured
                errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1

    try:
        cpu0 = etcd.cpu_times()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        seconds = time.perf_counter() - t0
        cpu1 = etcd.cpu_times()
        await store.delete_prefix("/raw-bench/")
    finally:
        await store.close()
    etcd_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    return {"creates": count, "created": created, "errors": errors, "in_flight": in_flight,
            "value_bytes": len(_raw_value(0, now_ms)), "seconds": round(seconds, 2),
            "per_second": round(created / seconds, 1) if created else 0.0,
            "etcd_cpu_ms_per_create": round(etcd_cpu * 1000 / max(created, 1), 3)}


ETCD_SIZES = ("etcd_mvcc_db_total_size_in_bytes", "etcd_mvcc_db_total_size_in_use_in_bytes",
              "etcd_server_quota_backend_bytes")


class Scale:
    """The run: a cluster that is up, the stubs, and what has been registered and looked up."""

    def __init__(self, args: argparse.Namespace, cluster: Cluster, router: Server, runtime: Server,
                 channel: grpc.aio.Channel, warm: list[TrainedModel], echo: Server | None = None,
                 echo_channel: grpc.aio.Channel | None = None) -> None:
        self.args = args
        self.echo = echo
        self.echoed = bytes_call(echo_channel, ECHO_METHOD) if echo_channel is not None else None
        self.cluster = cluster
        self.router = router
        self.runtime = runtime
        self.etcd = psutil.Process(cluster.etcd.pid)
        self.mesh = mm_grpc.ModelMeshStub(channel)
        self.v2 = pb_grpc.GRPCInferenceServiceStub(channel)
        self.infer = bytes_call(channel, INFER)
        self.warm = warm
        self.registered = 0
        self.looked_up: set[int] = set()
        self.rng = random.Random(42)

    def _cpu(self) -> dict[str, float]:
        etcd = self.etcd.cpu_times()
        me = psutil.Process().cpu_times()
        return {"router": self.router.cpu_seconds(), "etcd": etcd.user + etcd.system,
                "runtime": self.runtime.cpu_seconds(), "client": me.user + me.system}

    async def load_warm(self) -> None:
        """Register the warm models and load each (synchronously), then check every one answers."""
        for m in self.warm:
            await self.mesh.registerModel(mm.RegisterModelRequest(
                modelId=m.model_id, modelInfo=mm.ModelInfo(type="sklearn", path=str(m.path)),
                loadNow=True, sync=True), timeout=60)
        for m in self.warm:
            await self.infer(infer_body(m), metadata=(("mm-model-id", m.model_id),), timeout=30)

    async def register_to(self, total: int) -> dict[str, Any]:
        start, count = self.registered, total - self.registered
        tenth = max(count // 10, 1)
        handed_out: dict[int, float] = {}

        def items() -> Iterator[tuple[str, str]]:
            for i in range(start, total):
                if (i - start) % tenth == 0:
                    handed_out[i - start] = time.perf_counter()
                yield model_id(i), f"/scale/{model_id(i)}/model.joblib"

        cpu0 = self._cpu()
        t0 = time.perf_counter()
        if self.args.bulk:  # registerModels, --bulk items a call
            done, errors = await register_bulk(self.mesh, items(), batch=self.args.bulk,
                                               in_flight=self.args.bulk_in_flight)
        else:
            done, errors = await register_many(self.mesh, items(), in_flight=self.args.in_flight)
        t1 = time.perf_counter()
        cpu1 = self._cpu()
        self.registered = total
        last_from = max((k for k in handed_out if k <= count - tenth), default=0)
        last_s = t1 - handed_out.get(last_from, t0)
        return {"added": count, "registered": done, "errors": errors, "seconds": round(t1 - t0, 1),
                "per_second": round(done / (t1 - t0), 1) if done else 0.0,
                "last_tenth_per_second": round((count - last_from) / last_s, 1) if done else 0.0,
                "cpu_ms_per_registration": {k: round((cpu1[k] - cpu0[k]) * 1000 / max(done, 1), 3)
                                            for k in cpu0}}

    async def _spread(self, n: int, call: Callable[[int], Awaitable[Any]]) -> float:
        """``n`` calls, ``--in-flight`` at a time (as registrations are sent); seconds taken."""
        next_i = iter(range(n))

        async def worker() -> None:
            for i in next_i:
                await call(i)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(self.args.in_flight)))
        return time.perf_counter() - t0

    async def echo_floor(self, n: int) -> dict[str, Any]:
        """The bare grpc.aio echo server's CPU per request (``loadtest.echo_server``), for a request
        of a registration's size at the same concurrency: the floor a Python gRPC server pays."""
        assert self.echo is not None and self.echoed is not None
        body = mm.RegisterModelRequest(modelId=model_id(0), modelInfo=mm.ModelInfo(
            type="sklearn", path=f"/scale/{model_id(0)}/model.joblib")).SerializeToString()
        echoed = self.echoed
        cpu0 = self.echo.cpu_seconds()
        seconds = await self._spread(n, lambda _: echoed(body, timeout=30))
        return {"calls": n, "per_second": round(n / seconds, 1),
                "cpu_ms_per_request": round((self.echo.cpu_seconds() - cpu0) * 1000 / n, 4)}

    async def yardsticks(self, added: int, register: dict[str, Any]) -> dict[str, Any]:
        n = min(added, YARDSTICK_CALLS)
        raw = await raw_etcd_creates(self.cluster.registry_url, n, self.args.in_flight, self.etcd)
        out: dict[str, Any] = {"raw_etcd": raw,
                               "share_of_etcd": round(register["per_second"] / raw["per_second"], 3)}
        if self.echo is not None:
            echo = await self.echo_floor(n)
            out["echo"] = echo
            out["router_cpu_vs_echo"] = round(register["cpu_ms_per_registration"]["router"]
                                              / max(echo["cpu_ms_per_request"], 1e-6), 2)
        return out

    async def memory(self) -> dict[str, Any]:
        metrics = await asyncio.to_thread(etcd_metrics, self.cluster.etcd.metrics_port, ETCD_SIZES)
        store, prefix = open_store(self.cluster.registry_url)
        try:
            in_etcd = await store.count_prefix(Keys(prefix).models)
        finally:
            await store.close()
        return {"router": memory(self.router.ps), "etcd": memory(self.etcd),
                "etcd_db_mb": round(metrics.get("etcd_mvcc_db_total_size_in_bytes", 0) / MB, 1),
                "etcd_db_in_use_mb": round(metrics.get("etcd_mvcc_db_total_size_in_use_in_bytes", 0) / MB, 1),
                "etcd_quota_mb": round(metrics.get("etcd_server_quota_backend_bytes", 0) / MB, 1),
                "models_in_etcd": in_etcd}

    async def warm_latency(self) -> dict[str, Any]:
        bodies = [(infer_body(m), (("mm-model-id", m.model_id),)) for m in self.warm]

        def call(i: int) -> Callable[[], Awaitable[Any]]:
            body, md = bodies[i % len(bodies)]
            return lambda: self.infer(body, metadata=md, timeout=10)

        await _sequential([call(i) for i in range(WARM_UNCOUNTED)])
        return await _sequential([call(i) for i in range(self.args.warm_requests)])

    def _unseen(self, n: int) -> list[int]:
        """Up to ``n`` registered models never looked up and not primed in the router's cache."""
        pool = self.registered - self.args.spec_cache - self.args.in_flight
        n = min(n, max(pool - len(self.looked_up), 0))
        picks: list[int] = []
        while len(picks) < n:
            i = self.rng.randrange(pool)
            if i not in self.looked_up:
                self.looked_up.add(i)
                picks.append(i)
        return picks

    async def cold_lookups(self) -> dict[str, Any]:
        n = self.args.lookups
        ready = await _sequential(
            [functools.partial(self.v2.ModelReady, pb.ModelReadyRequest(name=model_id(i)), timeout=10)
             for i in self._unseen(n)],
            lambda r: "ready (expected not)" if r.ready else None)
        status = await _sequential(
            [functools.partial(self.mesh.getModelStatus, mm.GetStatusRequest(modelId=model_id(i)), timeout=10)
             for i in self._unseen(n)],
            lambda s: None if s.status == NOT_LOADED else mm.ModelStatusInfo.ModelStatus.Name(s.status))
        return {"model_ready": ready, "get_model_status": status}

    async def list_all(self) -> dict[str, Any]:
        listed, pages, token = 0, 0, ""
        t0 = time.perf_counter()
        while True:
            page = await self.mesh.listModels(mm.ListModelsRequest(pageSize=LIST_PAGE, pageToken=token),
                                              timeout=120)
            listed += len(page.models)
            pages += 1
            token = page.nextPageToken
            if not token:
                break
        return {"listed": listed, "pages": pages, "seconds": round(time.perf_counter() - t0, 2)}

    async def step(self, total: int) -> dict[str, Any]:
        out: dict[str, Any] = {"models": total}
        if total > self.registered:
            how = (f"registerModels, {self.args.bulk:,} a call, {self.args.bulk_in_flight} calls" if self.args.bulk
                   else f"registerModel, {self.args.in_flight} calls")
            log(f"registering {total - self.registered:,} more ({how} in flight)...")
            out["register"] = await self.register_to(total)
            r = out["register"]
            log(f"  {r['registered']:,} in {r['seconds']} s = {r['per_second']:,.0f}/s, errors {r['errors']}")
            out["yardsticks"] = y = await self.yardsticks(r["added"], r)
            log(f"  etcd's own create-if-absent rate {y['raw_etcd']['per_second']:,.0f}/s "
                f"(registrations {y['share_of_etcd']}x of it)"
                + (f"; router CPU {y['router_cpu_vs_echo']}x the echo server's" if "echo" in y else ""))
        await asyncio.sleep(SETTLE_S)
        out["memory"] = await self.memory()
        log(f"  router {out['memory']['router']}, etcd DB {out['memory']['etcd_db_mb']} MB; measuring latency...")
        out["warm_infer"] = await self.warm_latency()
        out.update(await self.cold_lookups())
        if not self.args.no_list:
            out["list"] = await self.list_all()
        return out


async def run(args: argparse.Namespace, cluster: Cluster, router: Server, runtime: Server,
              warm: list[TrainedModel], echo: Server) -> dict[str, Any]:
    options = [("grpc.max_receive_message_length", 64 * 2**20)]
    async with asyncio.timeout(args.time_limit), grpc.aio.insecure_channel(router.endpoint,
                                                                           options=options) as channel, \
            grpc.aio.insecure_channel(echo.endpoint) as echo_channel:
        scale = Scale(args, cluster, router, runtime, channel, warm, echo, echo_channel)
        log(f"loading {len(warm)} warm models...")
        await scale.load_warm()
        steps = [await scale.step(0)]
        for total in args.models:
            steps.append(await scale.step(total))
        raw = None
        if args.raw:
            log(f"raw etcd: {args.raw:,} single-key create-if-absent transactions, {args.in_flight} in flight...")
            raw = await raw_etcd_creates(cluster.registry_url, args.raw, args.in_flight, scale.etcd)
            log(f"  {raw['created']:,} in {raw['seconds']} s = {raw['per_second']:,.0f}/s, errors {raw['errors']}")
    return {"machine": machine(), "raw_etcd": raw,
            "settings": {"steps": args.models, "in_flight": args.in_flight, "warm_models": len(warm),
                         "bulk": args.bulk, "bulk_in_flight": args.bulk_in_flight, "raw": args.raw,
                         "warm_requests": args.warm_requests, "lookups": args.lookups,
                         "spec_cache": args.spec_cache, "list": not args.no_list},
            "pids": {"router": router.pid, "runtime": runtime.pid, "etcd": cluster.etcd.pid, "echo": echo.pid},
            "steps": steps}


def problems(result: dict[str, Any]) -> list[str]:
    """What went wrong in a finished run (empty when every call answered as expected)."""
    out = []
    warm = result["settings"]["warm_models"]
    for s in result["steps"]:
        n = s["models"]
        if "register" in s and (s["register"]["errors"] or s["register"]["registered"] != s["register"]["added"]):
            out.append(f"at {n:,}: registrations failed: {s['register']['errors']}")
        if s["memory"]["models_in_etcd"] != n + warm:
            out.append(f"at {n:,}: etcd holds {s['memory']['models_in_etcd']:,} registrations, not {n + warm:,}")
        for key in ("warm_infer", "model_ready", "get_model_status"):
            if s[key]["errors"]:
                out.append(f"at {n:,}: {key} errors {s[key]['errors']}")
        if "list" in s and s["list"]["listed"] != n + warm:
            out.append(f"at {n:,}: listModels returned {s['list']['listed']:,}, not {n + warm:,}")
    if result.get("survivors"):
        out.append(f"processes survived: {result['survivors']}")
    return out


def _pq(q: dict[str, Any]) -> str:
    return f"{q['p50_ms']:.2f} / {q['p99_ms']:.2f}" if q["ok"] else "n/a"


def render(result: dict[str, Any]) -> str:
    steps = result["steps"]
    reg_rows = []
    for s in steps:
        if "register" not in s:
            continue
        r = s["register"]
        cpu = r["cpu_ms_per_registration"]
        reg_rows.append([f"{s['models'] - r['added']:,} -> {s['models']:,}", r["seconds"], r["per_second"],
                         r["last_tenth_per_second"], sum(r["errors"].values()), cpu["router"], cpu["etcd"],
                         cpu["runtime"], cpu["client"]])
    target_share = TARGET_BULK_SHARE if result["settings"].get("bulk") else TARGET_ETCD_SHARE
    yard_rows = []
    for s in steps:
        if "yardsticks" not in s:
            continue
        y, r = s["yardsticks"], s["register"]
        share, ratio = y["share_of_etcd"], y.get("router_cpu_vs_echo")
        echo_cpu = y["echo"]["cpu_ms_per_request"] if "echo" in y else "-"
        versus_echo = f"{ratio} ({'met' if ratio <= TARGET_ECHO_RATIO else 'missed'})" if ratio is not None else "-"
        yard_rows.append([f"{s['models']:,}", r["per_second"], y["raw_etcd"]["per_second"],
                          f"{share} ({'met' if share >= target_share else 'missed'})",
                          r["cpu_ms_per_registration"]["router"], echo_cpu, versus_echo,
                          r["cpu_ms_per_registration"]["runtime"]])
    mem_rows = [[s["models"], s["memory"]["router"]["rss_mb"], s["memory"]["router"]["uss_mb"],
                 s["memory"]["router"]["hwm_mb"], s["memory"]["etcd"]["rss_mb"], s["memory"]["etcd_db_mb"],
                 s["memory"]["etcd_db_in_use_mb"]] for s in steps]
    lat_rows = [[s["models"], _pq(s["warm_infer"]), _pq(s["model_ready"]), _pq(s["get_model_status"]),
                 f"{s['list']['seconds']} s ({s['list']['listed']:,})" if "list" in s else "skipped"]
                for s in steps]
    last = steps[-1]
    quota, db = last["memory"]["etcd_quota_mb"], last["memory"]["etcd_db_mb"]
    per_model = db / max(last["models"], 1)
    settings = result["settings"]
    return "\n".join([
        machine_line(result["machine"]), "",
        (f"registerModels, {settings['bulk']:,} items a call, {settings['bulk_in_flight']} calls in flight "
         if settings.get("bulk") else f"registerModel, {settings['in_flight']} in flight ")
        + "from one client; CPU per registration in ms of each process:", "",
        table(["registered", "seconds", "reg/s", "reg/s, last tenth", "errors", "router CPU ms", "etcd CPU ms",
               "runtime CPU ms", "client CPU ms"], reg_rows), "",
        f"Against the same run's yardsticks: etcd's own create-if-absent transactions (same client "
        f"library, concurrency and value size; target: registrations >= {target_share}x) and a bare "
        f"grpc.aio echo server's CPU per request (target: router <= {TARGET_ECHO_RATIO}x); runtime CPU per "
        "registration of a model it does not hold (target ~0):", "",
        table(["registered", "reg/s", "etcd creates/s", "share of etcd", "router CPU ms", "echo CPU ms",
               "router / echo", "runtime CPU ms"], yard_rows), "",
        table(["registered", "router RSS MB", "router USS MB", "router RSS high-water MB", "etcd RSS MB",
               "etcd DB MB", "etcd DB in use MB"], mem_rows), "",
        f"Latency p50 / p99 in ms, one call at a time: ModelInfer on {settings['warm_models']} loaded models "
        f"({settings['warm_requests']:,} calls); ModelReady and getModelStatus on "
        f"{settings['lookups']:,} random registered, unloaded, never looked-up models each:", "",
        table(["registered", "ModelInfer (warm)", "ModelReady (cold lookup)", "getModelStatus (etcd read)",
               "listModels, all"], lat_rows), "",
        f"etcd backend quota {quota:,.0f} MB; database {db:,.1f} MB at {last['models']:,} registrations "
        f"(about {per_model * 1e6:,.0f} MB per million registrations; {db / max(quota, 1) * 100:.1f} % of "
        "the quota used).",
        *_raw_lines(result),
    ])


def _raw_lines(result: dict[str, Any]) -> list[str]:
    """etcd's own single-key create rate, and how the registrations of the run compare with it."""
    raw = result.get("raw_etcd")
    if not raw:
        return []
    rates = [s["register"]["per_second"] for s in result["steps"] if "register" in s]
    best = max(rates, default=0.0)
    return ["", f"raw etcd, same run: {raw['created']:,} single-key create-if-absent transactions "
            f"({raw['value_bytes']} B values, {raw['in_flight']} in flight, one aetcd client): "
            f"{raw['per_second']:,.0f}/s, etcd CPU {raw['etcd_cpu_ms_per_create']} ms each; registrations "
            f"above reached {best:,.0f}/s = {best / max(raw['per_second'], 1):.2f}x of it."]


def _alive(pid: int) -> bool:
    try:
        return pid > 0 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _steps(values: list[str] | None) -> list[int]:
    if not values:
        return list(DEFAULT_STEPS)
    try:
        steps = [int(v.replace("_", "")) for item in values for v in item.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--models takes whole numbers: {err}") from None
    if not steps or any(s <= 0 for s in steps) or steps != sorted(set(steps)):
        raise argparse.ArgumentTypeError("--models must be positive and increasing (e.g. 100000,1000000)")
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.scenarios.scale",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--models", action="append", metavar="N[,N...]",
                        help="registry sizes to grow to, in order (repeatable or a comma list; "
                             "default 100000,1000000)")
    parser.add_argument("--in-flight", type=int, default=256, help="registrations in flight (default 256)")
    parser.add_argument("--bulk", type=int, default=0, metavar="N",
                        help="register through registerModels, N items a call (default 0: registerModel, one a call)")
    parser.add_argument("--bulk-in-flight", type=int, default=4,
                        help="with --bulk: registerModels calls in flight (default 4)")
    parser.add_argument("--raw", type=int, default=None, metavar="N",
                        help="after the steps, N single-key create-if-absent transactions straight to etcd at "
                             "--in-flight, for comparison (default: 100,000 with --bulk, else 0)")
    parser.add_argument("--warm-models", type=int, default=20, help="loaded models for the warm path (default 20)")
    parser.add_argument("--warm-requests", type=int, default=2_000,
                        help="sequential ModelInfer calls per step (default 2,000)")
    parser.add_argument("--lookups", type=int, default=1_000,
                        help="cold ModelReady and getModelStatus calls per step, each (default 1,000)")
    parser.add_argument("--spec-cache", type=int, default=10_000,
                        help="the router's spec cache size (router.spec_cache_entries; default 10,000)")
    parser.add_argument("--no-list", action="store_true", help="skip the full listModels")
    parser.add_argument("--time-limit", type=float, default=3_600.0,
                        help="give up after this many seconds (default 3,600)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    try:
        args.models = _steps(args.models)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    if args.raw is None:
        args.raw = 100_000 if args.bulk else 0
    if args.bulk < 0 or args.bulk_in_flight < 1 or args.raw < 0:
        parser.error("--bulk and --raw must not be negative, --bulk-in-flight at least 1")
    if args.warm_models < 1 or args.in_flight < 1:
        parser.error("--warm-models and --in-flight must be at least 1")
    prepare_benchmark_process()
    foreign = ForeignLoad()
    model_dir = Path(tempfile.mkdtemp(prefix="mesh-bench-models-"))
    import uvloop

    cluster: Cluster | None = None
    try:
        log(f"training {args.warm_models} models...")
        warm = [train_logistic(f"warm-{i:02d}", model_dir, n_features=20, seed=2000 + i, rows=200)
                for i in range(args.warm_models)]
        cluster = Cluster()
        with cluster:
            log("starting runtime and router...")
            runtime = cluster.start_runtime(capacity_bytes=256 * 2**20)
            router = cluster.start_router(extra_env={"MESH_ROUTER_SPEC_CACHE_ENTRIES": str(args.spec_cache)})
            echo = cluster.start_echo()
            result = uvloop.run(run(args, cluster, router, runtime, warm, echo))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except TimeoutError:
        print(f"error: not finished within --time-limit {args.time_limit:g} s", file=sys.stderr)
        return 1
    except Exception as err:  # one line, never a traceback: the servers are stopped by now
        detail = " | ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"error: {type(err).__name__}: {detail}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    result["survivors"] = [p for p in [s.pid for s in cluster.servers] + [cluster.etcd.pid or 0] if _alive(p)]
    result["machine"]["foreign_load"] = foreign.result()
    emit(args, result, render(result))
    wrong = problems(result)
    if wrong:
        print(f"error: {'; '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
