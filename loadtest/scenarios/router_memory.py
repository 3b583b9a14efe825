"""Router memory with many registered, unloaded models (issue 2, target 3).

``python -m loadtest.scenarios.router_memory [--models N] [--in-flight K] [--ready R] [--status S] [--json]``

Method. One private etcd, one runtime (so that the router has an instance and is ready) and one
router, separate processes on 127.0.0.1. The router's memory is read with psutil: RSS, USS
(``memory_full_info``: the pages only this process holds, i.e. what killing it would free) and
the kernel's high-water mark of RSS (``VmHWM`` in ``/proc/<pid>/status``).

1. *Empty*: 3 s after the router is ready; then again after a few management and data-plane calls
   that touch the code paths used below with nothing registered (listModels, getModelStatus and
   ModelReady of unknown models), so that lazily created state is in the baseline. The target is
   judged against this warmed-up empty router; the difference to the freshly started one is shown.
2. Register ``N`` (100,000) models through the router's management API (``registerModel``,
   ``K`` = 200 calls in flight from one grpc.aio client), metadata only: their paths are never
   read, because nothing asks for inference. Registrations per second are reported.
3. Touch them: list every registration once with ``listModels`` in pages of 5,000; ask
   ``getModelStatus`` for ``S`` (2,000) random ones; send V2 ``ModelReady`` for ``R`` (5,000) random
   ones (the router looks the registration up and caches it; its spec cache holds at most 10,000
   entries). No ModelInfer: that would load the models.
4. After a 5 s pause, read the router's memory again; the target is the growth over step 1.

Caveats. We cannot make the router collect garbage or give freed memory back to the OS, so RSS
after step 3 includes pages that CPython's allocator keeps after the transient peaks of steps 2-3
(200 registrations in flight, a listing page of 5,000 entries, the watch events of 100,000
registrations); USS is shown next to it, and the high-water mark shows the transient peak. The
router logs one line per registration at the default level (to a file here): that costs CPU
during step 2, not memory.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import psutil

from loadtest.cluster import Cluster, Server, prepare_benchmark_process
from loadtest.management import register_many
from loadtest.report import ForeignLoad, add_output_args, emit, machine, machine_line, table, verdict
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc

TARGET_GROWTH_MB = 50.0
MB = 1e6
# mesh-bench's standard suite (loadtest.bench): 20,000 registrations instead of 100,000 (the router's growth
# does not scale with them: 9.2 MB at 10,000, 11-14 MB at 100,000). About 35 s: ~15 s fixed (a 2,000-model
# run took 17 s) + ~17 s of registering at ~1,200/s.
SUITE_ARGS = ("--models", "20000")
SUITE_SECONDS = 40


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def memory(proc: psutil.Process) -> dict[str, float]:
    info = proc.memory_full_info()
    hwm = 0.0
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return {"rss_mb": round(info.rss / MB, 1), "uss_mb": round(info.uss / MB, 1), "hwm_mb": round(hwm, 1)}


def model_id(i: int) -> str:
    return f"tenant-{i:06d}"


async def _gather_limited(calls: list[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    """Run the calls with at most ``limit`` in flight (a grpc.aio call starts when it is created,
    so each is created only when its turn comes)."""
    semaphore = asyncio.Semaphore(limit)

    async def guarded(make: Callable[[], Awaitable[Any]]) -> Any:
        async with semaphore:
            return await make()

    return await asyncio.gather(*(guarded(c) for c in calls))


async def _warm_up(mesh: mm_grpc.ModelMeshStub, infer: pb_grpc.GRPCInferenceServiceStub) -> None:
    await mesh.listModels(mm.ListModelsRequest(pageSize=5000), timeout=10)
    for i in range(20):
        await mesh.getModelStatus(mm.GetStatusRequest(modelId=f"unknown-{i}"), timeout=10)
        try:
            await infer.ModelReady(pb.ModelReadyRequest(name=f"unknown-{i}"), timeout=10)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise


async def run(args: argparse.Namespace, router: Server) -> dict[str, Any]:
    rng = random.Random(42)
    steps: dict[str, Any] = {}
    peak = {"rss_mb": 0.0}
    options = [("grpc.max_receive_message_length", 64 * 2**20)]
    async with grpc.aio.insecure_channel(router.endpoint, options=options) as channel:
        mesh = mm_grpc.ModelMeshStub(channel)
        infer = pb_grpc.GRPCInferenceServiceStub(channel)
        await asyncio.sleep(3.0)
        fresh = memory(router.ps)
        await _warm_up(mesh, infer)
        await asyncio.sleep(2.0)
        empty = memory(router.ps)
        log(f"empty router: {empty}; registering {args.models:,} models ({args.in_flight} in flight)...")

        async def sample() -> None:
            while True:
                peak["rss_mb"] = max(peak["rss_mb"], router.ps.memory_info().rss / MB)
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample())
        t0 = time.perf_counter()
        done, errors = await register_many(
            mesh, ((model_id(i), f"/models/{model_id(i)}/model.joblib") for i in range(args.models)),
            in_flight=args.in_flight)
        seconds = time.perf_counter() - t0
        steps["register"] = {"models": done, "errors": errors, "seconds": round(seconds, 1),
                             "per_second": round(done / seconds, 1)}
        registered = memory(router.ps)
        log(f"registered {done:,} in {seconds:.1f} s ({done / seconds:,.0f}/s); router: {registered}")

        t0 = time.perf_counter()
        listed, token, pages = 0, "", 0
        while True:
            page = await mesh.listModels(mm.ListModelsRequest(pageSize=5000, pageToken=token), timeout=60)
            listed += len(page.models)
            pages += 1
            token = page.nextPageToken
            if not token:
                break
        steps["list"] = {"listed": listed, "pages": pages, "seconds": round(time.perf_counter() - t0, 1)}

        picks = [model_id(rng.randrange(args.models)) for _ in range(args.status)]
        t0 = time.perf_counter()
        statuses = await _gather_limited([
            functools.partial(mesh.getModelStatus, mm.GetStatusRequest(modelId=m), timeout=30)
            for m in picks], 50)
        not_loaded = mm.ModelStatusInfo.ModelStatus.Value("NOT_LOADED")
        steps["status"] = {"requests": len(picks), "not_loaded": sum(s.status == not_loaded for s in statuses),
                           "seconds": round(time.perf_counter() - t0, 1)}

        picks = [model_id(i) for i in rng.sample(range(args.models), min(args.ready, args.models))]
        t0 = time.perf_counter()
        ready = await _gather_limited([
            functools.partial(infer.ModelReady, pb.ModelReadyRequest(name=m), timeout=30) for m in picks], 50)
        steps["model_ready"] = {"requests": len(picks), "ready": sum(r.ready for r in ready),
                                "seconds": round(time.perf_counter() - t0, 1)}
        log(f"listed {listed:,} in {pages} pages, {len(statuses):,} statuses, {len(ready):,} ModelReady; "
            "settling 5 s...")
        await asyncio.sleep(5.0)
        sampler.cancel()
        after = memory(router.ps)
    growth = {k: round(after[k] - empty[k], 1) for k in ("rss_mb", "uss_mb")}
    return {
        "machine": machine(),
        "settings": {"models": args.models, "in_flight": args.in_flight, "status": args.status,
                     "ready": args.ready},
        "memory": {"fresh": fresh, "empty_warmed": empty, "after_registration": registered,
                   "after_touching": after, "peak_rss_sampled_mb": round(peak["rss_mb"], 1)},
        "growth_mb": growth,
        "growth_vs_fresh_mb": {k: round(after[k] - fresh[k], 1) for k in ("rss_mb", "uss_mb")},
        "steps": steps,
        "target": {"value_rss_mb": growth["rss_mb"], "value_uss_mb": growth["uss_mb"],
                   "target": f"<= {TARGET_GROWTH_MB:g} MB",
                   "met": max(growth.values()) <= TARGET_GROWTH_MB},
    }


def render(result: dict[str, Any]) -> str:
    m = result["memory"]
    rows = [[label, m[key]["rss_mb"], m[key]["uss_mb"], m[key]["hwm_mb"]] for label, key in (
        ("fresh (3 s after ready)", "fresh"), ("empty, after warm-up calls", "empty_warmed"),
        (f"after registering {result['steps']['register']['models']:,}", "after_registration"),
        ("after list + status + ModelReady, 5 s pause", "after_touching"))]
    s = result["steps"]
    g = result["growth_mb"]
    return "\n".join([
        machine_line(result["machine"]), "",
        table(["router state", "RSS MB", "USS MB", "RSS high-water MB"], rows), "",
        table(["step", "result"], [
            ["registerModel", f"{s['register']['models']:,} in {s['register']['seconds']} s = "
                              f"{s['register']['per_second']:,.0f}/s, errors {s['register']['errors'] or 0}"],
            ["listModels", f"{s['list']['listed']:,} in {s['list']['pages']} pages, {s['list']['seconds']} s"],
            ["getModelStatus", f"{s['status']['requests']:,} random, {s['status']['not_loaded']:,} NOT_LOADED, "
                               f"{s['status']['seconds']} s"],
            ["ModelReady", f"{s['model_ready']['requests']:,} random, {s['model_ready']['ready']} ready, "
                           f"{s['model_ready']['seconds']} s"],
        ]), "",
        table(["target", "measured", "target", "verdict"], [
            ["router growth over the empty router, RSS (MB)", g["rss_mb"], f"<= {TARGET_GROWTH_MB:g}",
             verdict(g["rss_mb"] <= TARGET_GROWTH_MB)],
            ["router growth over the empty router, USS (MB)", g["uss_mb"], f"<= {TARGET_GROWTH_MB:g}",
             verdict(g["uss_mb"] <= TARGET_GROWTH_MB)],
        ]),
        f"(growth over the freshly started router: RSS {result['growth_vs_fresh_mb']['rss_mb']} MB, "
        f"USS {result['growth_vs_fresh_mb']['uss_mb']} MB; highest RSS sampled every 0.5 s: "
        f"{m['peak_rss_sampled_mb']} MB)",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.scenarios.router_memory",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=100_000, help="models to register (default 100,000)")
    parser.add_argument("--in-flight", type=int, default=200, help="registrations in flight (default 200)")
    parser.add_argument("--status", type=int, default=2_000, help="random getModelStatus calls")
    parser.add_argument("--ready", type=int, default=5_000, help="random ModelReady calls")
    add_output_args(parser)
    args = parser.parse_args(argv)
    prepare_benchmark_process()
    foreign = ForeignLoad()
    import uvloop

    with Cluster() as cluster:
        log("starting runtime and router...")
        cluster.start_runtime(capacity_bytes=64 * 2**20)
        router = cluster.start_router()
        result = uvloop.run(run(args, router))
    result["machine"]["foreign_load"] = foreign.result()
    emit(args, result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
