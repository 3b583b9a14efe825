"""Our mesh, MLServer and Ray Serve side by side: same machine, same models, same requests, one run.

    python -m loadtest.scenarios.peers --models 50 --rate 200 --concurrency 16 --duration 20 --json

The schedule is made once, in this process, before any system starts: a Zipf(1.0) sequence of
model indices and Poisson send times (``loadtest.arrivals``, fixed seed), saved next to the models.
Every system replays the same file, from the first request, in two phases after a warm-up each:
open loop at the Poisson times (achieved rate, latency) and closed loop at ``--concurrency``
(maximum throughput).

Why one driver (``loadtest.peers.drive``) for all three rather than ``mesh-loadtest`` for the two
gRPC systems: it replays a given model order and given send times, which is what "the same
requests" needs, and it keeps the client-side cost identical for our mesh and MLServer (same
pre-serialized V2 gRPC bodies, model chosen by ``model_name``, no header). Ray Serve is driven over
its HTTP V2 JSON endpoint, the one it has; that difference is the protocol's, not the driver's.

Each system runs in a child process of this one (``--phase``), inside a loopback-only network
namespace when possible (as ``loadtest.peers.smoke`` does; needed for Ray, kept for the others so
they run alike). The child starts the system as a process tree it watches (peak RSS of the whole
tree, every 0.25 s), drives it, stops it, checks that no process of the tree survives and prints
one ``RESULT {json}`` line. The systems run one after the other, never together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from loadtest import report
from loadtest.arrivals import poisson_times, zipf_weights
from loadtest.peers import setup
from loadtest.peers.smoke import make_models, run_isolated

ROOT = Path(__file__).resolve().parents[2]
SYSTEMS = ("mesh", "mlserver", "ray")
MESH_CAPACITY = "256MiB"  # per runtime; 50 small sklearn models need a few MiB, so all fit
SCHEDULE = "schedule.npz"
# mesh-bench's standard suite (loadtest.bench): all three systems, 5 s per phase after 1 s of warm-up.
# About 66 s: 3 systems x 2 phases x 6 s + ~30 s of start-up and shutdown (the full run: 166.5 s for 138 s of
# phases; the 2 s test run: ~45 s).
SUITE_ARGS = ("--duration", "5", "--warmup", "1")
SUITE_SECONDS = 75


def make_schedule(work: Path, *, models: int, rate: float, warmup_s: float, duration_s: float,
                  seed: int) -> None:
    """The shared request sequence: model order (Zipf 1.0) and Poisson send times."""
    rng = np.random.default_rng(seed)
    warm = poisson_times(rate, warmup_s, rng)
    measured = poisson_times(rate, duration_s, rng)
    order = rng.choice(models, size=200_000, p=zipf_weights(models, 1.0))  # cycles if exhausted
    np.savez(work / SCHEDULE, warm=warm, measured=measured, order=order)


# -- child: one system -------------------------------------------------------------------------

def _start(system: str, work: Path, models: list[Any]) -> tuple[Any, Any]:
    """Start ``system``; returns (PeerProcess, how to drive it: coroutine factory kwargs)."""
    from loadtest.peers import mlserver_app, ray_app
    from loadtest.peers._proc import PeerProcess, free_port, wait_until

    if system == "ray":
        handle = ray_app.start(work / "models", max_models=len(models), max_ongoing=32)
        return handle.proc, ("http", handle.url)
    if system == "mlserver":
        handle = mlserver_app.start({t.model_id: f for t, f in models})
        return handle.proc, ("grpc", handle.grpc_target)
    port = free_port()
    log = work / "mesh-up.log"
    proc = PeerProcess("mesh", [sys.executable, "-m", "mesh", "up", "--runtimes", "2", "--port",
                                str(port), "--capacity", MESH_CAPACITY],
                       env={"MESH_ROUTER_METRICS_PORT": "0"}, cwd=ROOT, log_path=log)
    try:
        wait_until(lambda: "mesh is up" in log.read_text(errors="replace"), timeout_s=90,
                   what="mesh up ready", proc=proc)
        asyncio.run(_register(f"127.0.0.1:{port}", [(t.model_id, str(f)) for t, f in models]))
    except BaseException:
        proc.stop(grace_s=10.0)
        raise
    return proc, ("grpc", f"127.0.0.1:{port}")


async def _register(target: str, items: list[tuple[str, str]]) -> None:
    import grpc

    from loadtest.management import register_many
    from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        _, errors = await register_many(mm_grpc.ModelMeshStub(channel), items, in_flight=8)
    if errors:
        raise RuntimeError(f"registering models failed: {errors}")


async def _drive(kind: str, address: str, targets: list[Any], sched: Any, proc: Any, *,
                 system: str, warmup_s: float, duration_s: float,
                 concurrency: int) -> dict[str, Any]:
    from loadtest.peers.drive import drive_grpc, drive_http

    drive = drive_http if kind == "http" else drive_grpc
    order = [int(i) for i in sched["order"]]
    # Open loop: warm up on the warm-up times, then the measured times, each from order[0].
    if warmup_s > 0:
        await drive(address, targets, name=system, duration_s=warmup_s, warmup_s=0,
                    arrivals=sched["warm"], order=order, proc=None)
    opened = await drive(address, targets, name=system, duration_s=duration_s, warmup_s=0,
                         arrivals=sched["measured"], order=order, proc=proc)
    closed = await drive(address, targets, name=system, concurrency=concurrency,
                         duration_s=duration_s, warmup_s=warmup_s, order=order, proc=proc)
    return {"open": {**opened.summary(), "offered": len(sched["measured"])},
            "closed": closed.summary(),
            "peak_rss_mb": round(max(opened.extra["peak_rss_mb"], closed.extra["peak_rss_mb"]), 1)}


def run_phase(system: str, work: Path, n: int, *, warmup_s: float, duration_s: float,
              concurrency: int) -> dict[str, Any]:
    models = make_models(work / "models", n)  # deterministic: the same files as the parent's
    targets = [t for t, _ in models]
    sched = dict(np.load(work / SCHEDULE))
    t0 = time.monotonic()
    proc, (kind, address) = _start(system, work, models)
    startup_s = time.monotonic() - t0
    try:
        out = asyncio.run(_drive(kind, address, targets, sched, proc, system=system,
                                 warmup_s=warmup_s, duration_s=duration_s,
                                 concurrency=concurrency))
        n_procs = len(proc.tree())
    finally:
        killed = proc.stop(grace_s=30.0)
    return {**out, "startup_s": round(startup_s, 1), "processes": n_procs, "sigkilled": killed,
            "survivors": [p.pid for p in proc.survivors()]}


# -- parent ------------------------------------------------------------------------------------

def run_child(system: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    flags = ["--work", str(work), "--models", str(args.models), "--warmup", str(args.warmup),
             "--duration", str(args.duration), "--concurrency", str(args.concurrency)]
    return run_isolated("loadtest.scenarios.peers", system, flags,
                        limit_s=240 + 3 * (args.warmup + args.duration),
                        allow_wildcard=args.allow_wildcard)


def bench(*, models: int, rate: float, concurrency: int, duration: float, warmup: float,
          seed: int = 0, systems: tuple[str, ...] = SYSTEMS,
          allow_wildcard: bool = False) -> dict[str, Any]:
    args = argparse.Namespace(models=models, warmup=warmup, duration=duration,
                              concurrency=concurrency, allow_wildcard=allow_wildcard)
    setup.ensure_all([s for s in systems if s != "mesh"])
    facts = report.machine()
    foreign = report.ForeignLoad()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="peers-bench-") as tmp:
        work = Path(tmp)
        (work / "models").mkdir()
        make_models(work / "models", models)
        make_schedule(work, models=models, rate=rate, warmup_s=warmup, duration_s=duration,
                      seed=seed)
        for system in systems:
            print(f"[peers-bench] {system}...", file=sys.stderr, flush=True)
            results[system] = run_child(system, work, args)
    facts["foreign_load"] = foreign.result()
    return {"machine": facts, "settings": {"models": models, "rate": rate, "zipf": 1.0,
                                           "concurrency": concurrency, "duration_s": duration,
                                           "warmup_s": warmup, "seed": seed,
                                           "mesh_capacity_per_runtime": MESH_CAPACITY},
            "systems": results}


def render(out: dict[str, Any]) -> str:
    s = out["settings"]
    header = ["system", "protocol", "open req/s", "open p50 ms", "open p99 ms", "open errors",
              "closed req/s", "closed p50 ms", "closed p99 ms", "closed errors", "peak RSS MB",
              "procs", "start s"]
    proto = {"mesh": "V2 gRPC", "mlserver": "V2 gRPC", "ray": "V2 HTTP JSON"}
    rows = []
    for name, r in out["systems"].items():
        o, c = r["open"], r["closed"]
        rows.append([name, proto[name], o["throughput_rps"], o["p50_ms"], o["p99_ms"],
                     sum(o["errors"].values()), c["throughput_rps"], c["p50_ms"], c["p99_ms"],
                     sum(c["errors"].values()), r["peak_rss_mb"], r["processes"],
                     r["startup_s"]])
    title = (f"{s['models']} sklearn models, Zipf {s['zipf']}, open loop Poisson {s['rate']} req/s, "
             f"closed loop c={s['concurrency']}, {s['duration_s']} s each after {s['warmup_s']} s "
             f"warm-up")
    return "\n".join([report.machine_line(out["machine"]), "", title, "",
                      report.table(header, rows)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Our mesh, MLServer and Ray Serve side by side")
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop Poisson req/s")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop workers")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before each phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--system", choices=SYSTEMS, action="append", help="default: all three")
    parser.add_argument("--allow-wildcard", action="store_true",
                        help="run Ray even where no loopback-only network namespace is possible")
    report.add_output_args(parser)
    parser.add_argument("--phase", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        out = run_phase(args.phase, args.work, args.models, warmup_s=args.warmup,
                        duration_s=args.duration, concurrency=args.concurrency)
        print("RESULT " + json.dumps(out), flush=True)
        return
    try:
        result = bench(models=args.models, rate=args.rate, concurrency=args.concurrency,
                       duration=args.duration, warmup=args.warmup, seed=args.seed,
                       systems=tuple(args.system or SYSTEMS), allow_wildcard=args.allow_wildcard)
    except (setup.SetupError, RuntimeError, subprocess.TimeoutExpired) as err:
        sys.exit(f"error: {err}")
    report.emit(args, result, render(result))
    bad = {n: r["survivors"] for n, r in result["systems"].items() if r["survivors"]}
    if bad:
        sys.exit(f"error: processes survived: {bad}")


if __name__ == "__main__":
    main()
