"""Router start-up against a large registry (issue 22, part 4).

``python -m loadtest.scenarios.router_start [--models N] [--copies C] [--instances I] [--quick] [--json]``

Target: a router started against a registry holding 1,000,000 registrations and 10,000 loaded copies
is ready (its view built, gRPC health SERVING) within 5 s, and says NOT_SERVING until then.

Method. One private etcd. The registry is filled directly through the store (``EtcdStore.txn``,
1,000 puts per transaction, 16 transactions in flight), with the records and keys the mesh itself
writes: a ``ModelSpec`` under ``models/`` per registration (as ``registerModel`` writes it), an
``InstanceRecord`` under ``instances/`` per runtime instance and a ``PlacementRecord`` (state
loaded) under ``placements/<model>/<instance>`` per copy, the latter two bound to one lease per
instance that this process keeps alive, as a runtime does. The instances are a stand-in: their
endpoints are closed ports (nothing routes to them here; ``tests/integration/test_router_start.py``
routes to a real runtime right after SERVING). Filling through the router would take minutes (about
1,500 registrations per second, BENCHMARKS.md) and measure registration, not start-up.

Then a router process (``python -m mesh serve router``, as ``mesh up`` starts it) is started on a
port chosen beforehand, and gRPC health (service ``""``) is polled every 20 ms from the moment the
process is spawned: the time of the first answer (the port is served, NOT_SERVING) and of the first
SERVING are recorded, then the router's view is checked (``getFleetStatus``: instances and loaded
copies) and its RSS read once it settled (3 s). The same is done first against an empty prefix of
the same etcd (``etcd://.../empty``): the difference is what the registry's size costs, the rest is
the interpreter and the router's imports. Each router is started ``--repeat`` times (default 3);
the table shows each run and the verdict takes the slowest.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest.cluster import prepare_benchmark_process
from loadtest.report import ForeignLoad, add_output_args, emit, machine, machine_line, table, verdict
from mesh.embedded.up import terminate
from mesh.gen.mmesh import status_pb2 as st
from mesh.gen.mmesh import status_pb2_grpc as st_grpc
from mesh.registry.base import Lease, Op
from mesh.registry.etcd import EtcdStore
from mesh.registry.etcd_server import EtcdProcess
from mesh.registry.keys import Keys
from mesh.registry.records import LOADED, DeviceUsage, InstanceRecord, ModelSpec, PlacementRecord

TARGET_S = 5.0
TXN_OPS = 1_000  # puts per transaction (the benchmark's etcd runs with --max-txn-ops 1000)
IN_FLIGHT = 16
POLL_S = 0.02
RECONNECT_FAST = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.min_reconnect_backoff_ms", 20),
                  ("grpc.max_reconnect_backoff_ms", 20)]
MB = 1e6
# mesh-bench's standard suite would take minutes to fill a million; --quick is the short form.
QUICK = {"models": 100_000, "copies": 10_000}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def model_id(i: int) -> str:
    return f"tenant-{i // 1000:04d}/model-{i:07d}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def fill(store: EtcdStore, keys: Keys, *, models: int, copies: int, instances: int,
               lease_ttl_s: int = 10, txn_ops: int = TXN_OPS) -> dict[str, Any]:
    """Write the registrations, the instances and the copies; returns counts and timings. The
    instances' leases are kept alive by ``store`` until it is closed (tests import this too:
    ``txn_ops`` 128 for an etcd with the default ``--max-txn-ops``)."""
    now_ms = int(time.time() * 1000)
    semaphore = asyncio.Semaphore(IN_FLIGHT)

    async def put_all(ops: list[Op]) -> None:
        async def one(chunk: list[Op]) -> None:
            async with semaphore:
                await store.txn([], chunk)

        await asyncio.gather(*(one(ops[i:i + txn_ops]) for i in range(0, len(ops), txn_ops)))

    t0 = time.perf_counter()
    for start in range(0, models, 100_000):  # ops built 100,000 at a time: bounded memory here
        ops = [Op("put", keys.model(model_id(i)),
                  ModelSpec(model_id=model_id(i), type="sklearn", path=f"/models/{model_id(i)}/model.joblib",
                            registered_ms=now_ms, last_used_ms=now_ms - 3_600_000).to_json())
               for i in range(start, min(models, start + 100_000))]
        await put_all(ops)
        if models > 100_000:
            log(f"  {min(models, start + 100_000):,} registrations written")
    registered_s = time.perf_counter() - t0

    leases: list[Lease] = []
    for n in range(instances):  # one lease per instance, kept alive by this process as a runtime does
        lease = await store.grant_lease(lease_ttl_s)
        leases.append(lease)
        record = InstanceRecord(
            instance_id=f"bench-{n}", endpoint=f"127.0.0.1:{free_port()}",
            devices=(DeviceUsage("ram", 64 * 2**30, copies // instances * 2**20),),
            model_count=copies // instances, supported_types=("sklearn",), version="bench",
            started_ms=now_ms)
        await store.put(keys.instance(record.instance_id), record.to_json(), lease=lease)
    t0 = time.perf_counter()
    by_instance: dict[int, list[Op]] = {}
    for i in range(copies):
        n = i % instances
        placement = PlacementRecord(model_id=model_id(i), instance_id=f"bench-{n}", state=LOADED,
                                    size_bytes=2**20, loaded_ms=now_ms, last_used_ms=now_ms, load_ms=12.5)
        by_instance.setdefault(n, []).append(Op("put", keys.placement(model_id(i), f"bench-{n}"),
                                                placement.to_json()))
    for n, ops in by_instance.items():  # Op has no lease: put each copy under its instance's lease
        async def one(op: Op, lease: Lease = leases[n]) -> None:
            async with semaphore:
                await store.put(op.key, op.value, lease=lease)

        await asyncio.gather(*(one(op) for op in ops))
    return {"registrations": models, "copies": copies, "instances": instances,
            "register_seconds": round(registered_s, 1), "copies_seconds": round(time.perf_counter() - t0, 1)}


def spawn_router(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``mesh serve router`` as ``mesh up`` starts it, its output in ``log_path`` (tests use it too)."""
    with open(log_path, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "mesh", "serve", "router"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def log_times(log_path: Path, events: tuple[str, ...]) -> dict[str, float]:
    """When the router logged each of ``events`` (its JSON log's ISO timestamps), in epoch seconds."""
    found: dict[str, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") in events and event["event"] not in found:
            stamp = str(event.get("timestamp", "")).replace("Z", "+00:00")
            found[event["event"]] = datetime.datetime.fromisoformat(stamp).timestamp()
    return found


async def time_router(registry_url: str, workdir: Path, name: str) -> dict[str, Any]:
    """Start a router and time it to its first health answer and to SERVING."""
    port = free_port()
    env = {**os.environ, "MESH_REGISTRY_URL": registry_url, "MESH_ROUTER_PORT": str(port),
           "MESH_ROUTER_HOST": "127.0.0.1", "MESH_ROUTER_METRICS_PORT": "0", "MESH_ROUTER_REST_PORT": "-1",
           "MESH_PARENT_PID": str(os.getpid()), "MESH_LOG_FORMAT": "json", "MESH_LOG_LEVEL": "info"}
    log_path = workdir / f"{name}.log"
    address = f"127.0.0.1:{port}"
    t0, wall0 = time.perf_counter(), time.time()
    proc = spawn_router(env, log_path)
    first_answer = serving = None
    states: list[str] = []
    try:
        # Reconnect at once after a refused connection (gRPC's backoff starts at 1 s and grows):
        # the poll, not the channel, must set the resolution.
        async with grpc.aio.insecure_channel(address, options=RECONNECT_FAST) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while serving is None:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited (code {proc.returncode}): "
                                       + log_path.read_text(errors="replace")[-2000:])
                if time.perf_counter() - t0 > 120:
                    raise RuntimeError(f"{name} not SERVING after 120 s")
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(POLL_S)
                    continue
                now = time.perf_counter() - t0
                state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                if not states or states[-1] != state:
                    states.append(state)
                first_answer = first_answer if first_answer is not None else now
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    serving = now
                else:
                    await asyncio.sleep(POLL_S)
            fleet = await st_grpc.ModelMeshStatusStub(channel).getFleetStatus(st.FleetStatusRequest(), timeout=30)
        await asyncio.sleep(3.0)
        ps = psutil.Process(proc.pid)
        rss = ps.memory_info().rss / MB
        cpu = ps.cpu_times()
    finally:
        terminate(proc, 10.0)
    stamps = log_times(log_path, ("router listening; building its view of the registry", "router serving"))
    listening = stamps.get("router listening; building its view of the registry")
    built = stamps.get("router serving")
    return {"first_answer_s": round(first_answer or 0.0, 3), "serving_s": round(serving, 3),
            "listening_s": round(listening - wall0, 3) if listening else None,
            "view_build_s": round(built - listening, 3) if listening and built else None,
            "states": states, "instances": len(fleet.instances), "copies_loaded": fleet.copiesLoaded,
            "rss_mb": round(rss, 1), "cpu_s": round(cpu.user + cpu.system, 2)}


async def run(args: argparse.Namespace, etcd: EtcdProcess, workdir: Path) -> dict[str, Any]:
    store = EtcdStore([etcd.endpoint], timeout_s=30.0)
    try:
        keys = Keys("/mesh/")
        log(f"filling etcd: {args.models:,} registrations, {args.copies:,} copies on {args.instances} instances")
        filled = await fill(store, keys, models=args.models, copies=args.copies, instances=args.instances)
        status = await store._clients[0].status()  # the database's size, as etcdctl endpoint status shows it
        filled["etcd_db_mb"] = round(status.db_size / MB, 1)
        log(f"filled: {filled}")
        # The empty prefix needs an instance too, or the router never becomes ready.
        lease = await store.grant_lease(10)
        record = InstanceRecord(instance_id="bench-empty", endpoint=f"127.0.0.1:{free_port()}",
                                supported_types=("sklearn",), version="bench")
        await store.put(Keys("/empty/").instance(record.instance_id), record.to_json(), lease=lease)
        runs: dict[str, list[dict[str, Any]]] = {"empty": [], "full": []}
        for i in range(args.repeat):
            for which, url in (("empty", f"{etcd.url}/empty"), ("full", etcd.url)):
                result = await time_router(url, workdir, f"router-{which}-{i}")
                log(f"{which} #{i}: {result}")
                runs[which].append(result)
    finally:
        await store.close()
    slowest = max(r["serving_s"] for r in runs["full"])
    view_ok = all(r["copies_loaded"] == args.copies and r["instances"] == args.instances for r in runs["full"])
    return {"machine": machine(), "settings": vars(args) | {"out": None}, "fill": filled, "runs": runs,
            "target": {"value_s": slowest, "target": f"<= {TARGET_S:g} s", "view_complete": view_ok,
                       "met": slowest <= TARGET_S and view_ok}}


def render(result: dict[str, Any]) -> str:
    f = result["fill"]
    rows = [[which, i, r["first_answer_s"], r["serving_s"], r["listening_s"], r["view_build_s"],
             " -> ".join(r["states"]), r["instances"], r["copies_loaded"], r["rss_mb"], r["cpu_s"]]
            for which in ("empty", "full") for i, r in enumerate(result["runs"][which])]
    t = result["target"]
    return "\n".join([
        machine_line(result["machine"]), "",
        f"registry: {f['registrations']:,} registrations (written in {f['register_seconds']} s), "
        f"{f['copies']:,} loaded copies on {f['instances']} instances; etcd database {f['etcd_db_mb']} MB", "",
        table(["registry", "run", "first health answer (s)", "SERVING (s)", "listening (log, s)",
               "view built in (log, s)", "health seen", "instances in view", "copies in view",
               "RSS MB (3 s after)", "router CPU s"], rows), "",
        "(times from the spawn of the process; \"listening\": the router's log line when its port serves, "
        "after the interpreter and its imports; \"view built in\": from that line to \"router serving\")", "",
        table(["target", "measured (slowest run)", "target", "verdict"], [
            ["router ready with the full registry", t["value_s"], t["target"], verdict(t["met"])]]),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.scenarios.router_start",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=1_000_000, help="registrations (default 1,000,000)")
    parser.add_argument("--copies", type=int, default=10_000, help="loaded copies (default 10,000)")
    parser.add_argument("--instances", type=int, default=8, help="runtime instances holding them (default 8)")
    parser.add_argument("--repeat", type=int, default=3, help="router starts per registry (default 3)")
    parser.add_argument("--quick", action="store_true", help="100,000 registrations and 10,000 copies")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.copies = QUICK["models"], QUICK["copies"]
    prepare_benchmark_process()
    foreign = ForeignLoad()
    import uvloop

    workdir = Path(tempfile.mkdtemp(prefix="mesh-router-start-"))
    # A large quota (a million registrations are about 420 MB here); big transactions for the fill.
    try:
        with EtcdProcess(workdir / "etcd", quota_bytes=8 * 2**30,
                         extra_args=("--max-txn-ops", str(TXN_OPS))) as etcd:
            result = uvloop.run(run(args, etcd, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # the etcd data: 400 MB at a million
    result["machine"]["foreign_load"] = foreign.result()
    emit(args, result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
