"""Hop cost across hosts: what the router adds when client, router and runtime are separate hosts
with a delay on every link (issue 22, item 5).

``python -m loadtest.scenarios.hop --netns-delays 0,0.2,0.5,1 [--duration S] [--rounds R]
[--warmup S] [--netns-method auto|netem|relay] [--json] [--out FILE]``

Method. Four hosts (``loadtest.netns``: network namespaces on one bridge): *client*, *router*,
*runtime* and *etcd*, the mesh components started in theirs as ``mesh up`` starts them
(``loadtest.cluster``), bound to the host's address. The model and request are the hop
benchmark's (``loadtest.scenarios.hop``: a LogisticRegression over 256 features, one FP32 row,
1,059 bytes); it is registered and loaded, and both paths' answers checked against the model, from
this process before any measurement. For each delay D of ``--netns-delays`` (milliseconds), every
frame a host sends is held D on its link (netem where the kernel has it; here a TAP relay, see
``loadtest.netns``), and a client process started inside the client host measures, at c=1:

* the TCP handshake time from the client host to the runtime host, 50 times (min and p50): the
  round trip the links really give at that setting, delay and relay included;
* *direct* (client -> runtime) and *routed* (client -> router -> runtime) latency, interleaved in
  ``--rounds`` rounds (``hop.interleaved``: a warm-up, then duration/rounds seconds each), with the
  router's, the runtime's and the relay's CPU per request;
* then, over 200 more requests on each path, the frames the hosts sent per request (each host's
  ``eth0`` counters): a request that costs more packets costs every process on its path more.

A direct request crosses two links (2D), a routed one four (4D), so the hop's cost at delay D is
the routed minus the direct latency, of which one client-to-runtime round trip (the handshake p50,
about 2D) is the extra network and the rest is the router's own work.

Caveats. The relay is a Python process on the same two shared cores: each frame costs it a few
microseconds and waits its wake-up latency (the handshake column shows what the links give, delay 0
included: with the relay, 0 is not a bare veth). One client worker (c=1): latency, not throughput.
One run; other jobs on the machine disturb the numbers (their CPU is reported).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from loadtest.cluster import Cluster, prepare_benchmark_process
from loadtest.load import bytes_call
from loadtest.management import register, wait_loaded
from loadtest.models import infer_body, train_logistic
from loadtest.netns import Hosts
from loadtest.report import ForeignLoad, emit, machine, machine_line, table
from loadtest.scenarios.hop import INFER, MODEL_ID, Target, interleaved, log
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.tensors import decode_response

MAX_DELAY_MS = 100.0
HANDSHAKES = 50


def parse_delays(text: str) -> list[float]:
    """``0,0.2,0.5,1`` -> [0.0, 0.2, 0.5, 1.0]; ValueError with a one-line reason otherwise."""
    try:
        delays = [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{text!r}: milliseconds separated by commas, e.g. 0,0.2,0.5,1") from None
    if not delays or any(not 0 <= d <= MAX_DELAY_MS for d in delays):
        raise ValueError(f"{text!r}: each delay between 0 and {MAX_DELAY_MS:g} ms")
    return delays


# --- inside the client host -------------------------------------------------------------------------
def _handshakes_ms(endpoint: str) -> dict[str, float]:
    host, port = endpoint.rsplit(":", 1)
    took = []
    for _ in range(HANDSHAKES):
        started = time.perf_counter()
        socket.create_connection((host, int(port)), timeout=5).close()
        took.append((time.perf_counter() - started) * 1000)
    return {"min": round(min(took), 3), "p50": round(statistics.median(took), 3)}


def _sent_frames(pids: dict[str, int]) -> dict[str, int]:
    """Frames each host has sent on its link so far (``eth0``'s tx packets in ``/proc/PID/net/dev``,
    which shows the namespace of process PID)."""
    sent = {}
    for host, pid in pids.items():
        for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines():
            name, _, counters = line.partition(":")
            if name.strip() == "eth0":
                sent[host] = int(counters.split()[9])
    return sent


async def _frames_per_request(target: Target, body: bytes, pids: dict[str, int], n: int = 200) -> dict[str, float]:
    """Frames each host sends per request on ``target``'s path, over ``n`` requests one at a time."""
    before = _sent_frames(pids)
    for _ in range(n):
        await target.call(body, metadata=target.metadata, timeout=10)
    after = _sent_frames(pids)
    return {host: round((after[host] - before[host]) / n, 2) for host in pids}


async def _measure(args: argparse.Namespace, body: bytes) -> dict[str, Any]:
    md = (("mm-model-id", MODEL_ID),)
    me = psutil.Process()
    router_ps, runtime_ps = psutil.Process(args.router_pid), psutil.Process(args.runtime_pid)
    relay = {"relay": psutil.Process(args.relay_pid)} if args.relay_pid else {}
    rtt = await asyncio.to_thread(_handshakes_ms, args.runtime)
    async with grpc.aio.insecure_channel(args.runtime) as to_runtime, \
            grpc.aio.insecure_channel(args.router) as to_router:
        targets = [Target("direct", bytes_call(to_runtime, INFER), md, {"runtime": runtime_ps, "client": me, **relay}),
                   Target("routed", bytes_call(to_router, INFER), md,
                          {"proxy": router_ps, "runtime": runtime_ps, "client": me, **relay})]
        for t in targets:  # a connection per path before the clock starts
            await t.call(body, metadata=md, timeout=10)
        low = await interleaved(targets, body, 1, args)
        pids = {"client": os.getpid(), "router": args.router_pid, "runtime": args.runtime_pid}
        frames = {t.name: await _frames_per_request(t, body, pids) for t in targets}
    return {"handshake_ms": rtt, "frames_per_request": frames,
            "phases": {name: r.summary() for name, r in low.items()}}


def client_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.scenarios.hop_netns --client")
    for name in ("--router", "--runtime", "--body"):
        parser.add_argument(name, required=True)
    for name in ("--router-pid", "--runtime-pid"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--relay-pid", type=int, default=0)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--warmup", type=float, required=True)
    args = parser.parse_args(argv)
    prepare_benchmark_process()
    import uvloop

    print(json.dumps(uvloop.run(_measure(args, Path(args.body).read_bytes()))), flush=True)
    return 0


# --- the orchestrator ---------------------------------------------------------------------------------
async def _prepare(router: str, runtime: str, model_path: Path, body: bytes, expected: np.ndarray) -> None:
    md = (("mm-model-id", MODEL_ID),)
    async with grpc.aio.insecure_channel(router) as to_router, grpc.aio.insecure_channel(runtime) as to_runtime:
        mesh = mm_grpc.ModelMeshStub(to_router)  # type: ignore[no-untyped-call]
        await register(mesh, MODEL_ID, str(model_path))
        await bytes_call(to_router, INFER)(body, metadata=md, timeout=60)  # loads it on the runtime
        await wait_loaded(mesh, MODEL_ID)
        for channel in (to_router, to_runtime):
            raw = await bytes_call(channel, INFER)(body, metadata=md, timeout=10)
            got = decode_response(pb.ModelInferResponse.FromString(raw))["predict"]
            if not np.array_equal(got, expected):
                raise RuntimeError(f"wrong answer from the mesh: {got} != {expected}")


def run(args: argparse.Namespace, delays: list[float]) -> dict[str, Any]:
    import joblib

    workdir = Path(tempfile.mkdtemp(prefix="mesh-bench-netns-"))
    try:
        model = train_logistic(MODEL_ID, workdir, n_features=256, seed=256)
        body = infer_body(model)
        (workdir / "body.bin").write_bytes(body)
        expected = joblib.load(model.path).predict(model.sample)
        with Hosts(["client", "router", "runtime", "etcd"], method=args.netns_method) as hosts, \
                Cluster(etcd_host=hosts["etcd"]) as cluster:
            log(f"hosts on bridge {hosts.bridge} ({hosts.method}); starting etcd, runtime and router...")
            runtime = cluster.start_runtime(capacity_bytes=256 * 2**20, host=hosts["runtime"])
            router = cluster.start_router(host=hosts["router"])
            import uvloop

            uvloop.run(_prepare(router.endpoint, runtime.endpoint, model.path, body, expected))
            rows: dict[str, Any] = {}
            for delay in delays:
                hosts.set_delay(delay)
                log(f"delay {delay:g} ms on every host's link")
                argv = [sys.executable, "-m", "loadtest.scenarios.hop_netns", "--client",
                        "--router", router.endpoint, "--runtime", runtime.endpoint,
                        "--router-pid", str(router.pid), "--runtime-pid", str(runtime.pid),
                        "--relay-pid", str(hosts.relay_pid or 0),
                        "--body", str(workdir / "body.bin"), "--duration", str(args.duration),
                        "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
                budget = 2 * (args.duration + args.rounds * args.warmup * 2) + 60
                done = subprocess.run(hosts["client"].argv(argv), stdout=subprocess.PIPE, text=True,
                                      timeout=budget)
                if done.returncode != 0:
                    raise RuntimeError(f"the client at delay {delay:g} ms exited with {done.returncode}")
                rows[f"{delay:g}"] = json.loads(done.stdout.strip().splitlines()[-1])
            method = hosts.method
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"machine": machine(), "method": method,
            "settings": {"delays_ms": delays, "duration_s": args.duration, "rounds": args.rounds,
                         "warmup_s": args.warmup, "concurrency": 1, "request_bytes": len(body)},
            "delays": {d: _summarise(float(d), r) for d, r in rows.items()}}


def _summarise(delay: float, row: dict[str, Any]) -> dict[str, Any]:
    direct, routed = row["phases"]["direct"], row["phases"]["routed"]
    added50 = routed["p50_ms"] - direct["p50_ms"]
    return {"delay_ms": delay, "handshake_ms": row["handshake_ms"], "frames_per_request": row["frames_per_request"],
            "direct": direct, "routed": routed,
            "added_p50_ms": round(added50, 3), "added_p99_ms": round(routed["p99_ms"] - direct["p99_ms"], 3),
            "router_own_p50_ms": round(added50 - row["handshake_ms"]["p50"], 3)}


def render(result: dict[str, Any]) -> str:
    rows = []
    for d in result["delays"].values():
        rows.append([d["delay_ms"], d["handshake_ms"]["min"], d["handshake_ms"]["p50"],
                     d["direct"]["p50_ms"], d["direct"]["p99_ms"], d["routed"]["p50_ms"], d["routed"]["p99_ms"],
                     d["added_p50_ms"], d["added_p99_ms"], d["router_own_p50_ms"],
                     d["routed"].get("proxy_cpu_ms_per_req", float("nan")),
                     d["direct"].get("relay_cpu_ms_per_req", float("nan")),
                     d["routed"].get("relay_cpu_ms_per_req", float("nan")),
                     sum(d["frames_per_request"]["direct"].values()), sum(d["frames_per_request"]["routed"].values()),
                     d["direct"]["requests"], d["routed"]["requests"]])
    head = ["delay per link (ms)", "client-runtime handshake min (ms)", "handshake p50 (ms)",
            "direct p50 (ms)", "direct p99 (ms)", "routed p50 (ms)", "routed p99 (ms)", "hop p50 (ms)",
            "hop p99 (ms)", "hop p50 - handshake p50 (ms)", "router CPU ms/req", "relay CPU ms/req direct",
            "relay CPU ms/req routed", "frames/req direct", "frames/req routed", "direct requests",
            "routed requests"]
    hosts = f"hosts: client, router, runtime, etcd, each a network namespace; delay by {result['method']}; c=1"
    return "\n".join([machine_line(result["machine"]), hosts, "", table(head, rows)])


def scenario_main(args: argparse.Namespace, delays: list[float]) -> int:
    """``hop --netns-delays``: the orchestrator (``args`` carries hop's --duration, --rounds,
    --warmup, --netns-method and the output options)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("hop --netns-delays: needs root and iproute2 (ip netns)", file=sys.stderr)
        return 2
    prepare_benchmark_process()
    foreign = ForeignLoad()
    result = run(args, delays)
    result["machine"]["foreign_load"] = foreign.result()
    emit(args, result, render(result))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        sys.exit(client_main(sys.argv[2:]))
    from loadtest.scenarios import hop

    sys.exit(hop.main(["--netns-delays", "0,0.2,0.5,1", *sys.argv[1:]]))
