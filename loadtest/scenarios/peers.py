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

Our mesh runs as ``mesh up --runtimes 2`` (a router, two runtimes, etcd and the ``mesh up``
supervisor: its peak RSS is every one of those processes); ``--mesh-runtimes 1`` runs it with one
runtime, the shape that fits a 2-core host (each runtime imports its own copy of scikit-learn).

REST mode (``--protocol rest``; ``--protocol both`` runs gRPC and then REST on each system it
starts): our mesh over its router's REST front end (``POST /v2/models/{m}/infer``, the port set in
``MESH_ROUTER_REST_PORT``) and MLServer over its REST endpoint, with the V2 JSON bodies Ray gets.
Those bodies are serialized once, in this process, into a file next to the schedule
(``rest-bodies.jsonl``, one per model), and every system sends those bytes, with the same headers
(``serve_multiplexed_model_id``, which only Ray reads), from the same client: aiohttp, one session
per system and protocol, keep-alive. So with ``--protocol rest`` the three systems differ only in
the server. In ``both``, a system's two protocols run one after the other on one start of it (gRPC
first), each with its own warm-ups; rows are then named ``system/protocol``. For REST against gRPC
through one router, interleaved so that drift hits both alike, see ``loadtest.scenarios.rest``.

Each system runs in a child process of this one (``--phase``), inside a loopback-only network
namespace when possible (as ``loadtest.peers.smoke`` does; needed for Ray, kept for the others so
they run alike). The child starts the system as a process tree it watches (peak RSS of the whole
tree, every 0.25 s), drives it, stops it, checks that no process of the tree survives and prints
one ``RESULT {json}`` line. The systems run one after the other, never together.

Fit mode (``--fit F``, 0 < F < 1; the default 1.0 is the run above, where every system holds all
the models and nothing is ever evicted). Only ``K = max(1, round(F x models))`` models have room,
so the Zipf tail keeps missing and each system loads (and evicts) while it is measured:

    python -m loadtest.scenarios.peers --fit 0.2 --json

- Ray Serve: ``@serve.multiplexed(max_num_models_per_replica=K)``, one replica (an LRU of K).
- Our mesh: ``mesh up --runtimes 2 --capacity C`` with C sized so that the two runtimes hold about K
  of these models. The runtimes charge models their measured size, so C is measured, not guessed:
  ``loadtest.scenarios.many_models.calibrate`` loads 24 of the benchmark's own model files on a
  private runtime first, and ``C = P + (K - 1) / 2 x s`` (``loadtest.peers.fit`` says why: ``s`` the
  measured model size, ``P`` the size a load reserves until it is measured). C, s, P and the
  calibration's sizes are in the result's ``settings.mesh_room``.
- MLServer cannot evict (it loads every model it is given at start-up), so it is not a system of
  the fit mode by default and the output says so; ``--system mlserver`` adds it, holding all models.
- The simulator on the same requests (issue 18's target: our hit ratio within 5 points of its
  prediction): our mesh's request sequence is recorded as it is sent, and the cluster simulator
  (``placement.cluster``, deciding with the router's and runtime's own ``placement.kernel``) replays
  it with the mesh's instances, capacity and default policy, the sizes and load times its runtimes
  logged; both hit ratios, loads per request and the miss reasons are shown side by side
  (``loadtest.peers.fit`` has the method; ``MESH_PEERS_FIT_TRACE=FILE`` keeps the trace).

Each system then also reports the model loads during the two measured parts (read just before and
just after each, so no warm-up's loads count) and, for our mesh, the cache hit ratio. Our mesh:
the runtimes' Prometheus counters (``modelmesh_loadmodel_milliseconds_count``,
``mesh_cache_requests_total``, ``mesh_evictions_total``), at the metrics URLs the runtimes log.
Ray: the multiplexed loader appends a line per load to a file in its work dir (``ray_app``), read
by the child. Shown as "n/a": Ray's hit ratio (Serve counts ``get_model`` calls only in its own
metrics, exported through Ray's metrics agent, which this benchmark does not read; and
``1 - loads / requests`` would be an estimate, not a count) and both of MLServer's figures (it has
no lazy loading and no eviction, and exports no load counter we read: its loads all happen at
start-up, before anything is measured).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from loadtest import report
from loadtest.arrivals import poisson_times, zipf_weights
from loadtest.peers import fit as fitmode
from loadtest.peers import setup
from loadtest.peers.smoke import make_models, run_isolated

ROOT = Path(__file__).resolve().parents[2]
SYSTEMS = ("mesh", "mlserver", "ray")
PROTOCOLS = ("grpc", "rest", "both")
PROTOCOL_LABELS = {"grpc": "V2 gRPC", "rest": "V2 HTTP JSON"}
FIT_SYSTEMS = ("mesh", "ray")  # fit mode's default: MLServer cannot evict
MLSERVER_ABSENT = ("MLServer is not in this run: it cannot evict (it loads every model it is given), so "
                   "it has no share of room to hold; --system mlserver adds it, holding all {n} models.")
MESH_CAPACITY = "256MiB"  # per runtime; 50 small sklearn models need a few MiB, so all fit
SCHEDULE = "schedule.npz"
REST_BODIES = "rest-bodies.jsonl"  # the V2 JSON bodies, one line per model, serialized once
HTTP_CONNECTIONS = 256  # the HTTP client's pool: drive's max_in_flight, the open loop's bound
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


def write_bodies(work: Path, targets: list[Any]) -> None:
    """The V2 JSON body of each model's sample, once, for every system that is sent JSON."""
    from loadtest.peers.drive import v2_json_body

    with open(work / REST_BODIES, "wb") as out:
        for t in targets:
            out.write(v2_json_body(t.sample) + b"\n")  # json.dumps writes no newline


def read_bodies(work: Path) -> list[bytes]:
    return (work / REST_BODIES).read_bytes().splitlines()


def protocols_of(system: str, protocol: str) -> tuple[str, ...]:
    """What ``system`` is driven over for ``--protocol``: Ray always over HTTP (all it has)."""
    if system == "ray":
        return ("rest",)
    return ("grpc", "rest") if protocol == "both" else (protocol,)


# -- child: one system -------------------------------------------------------------------------

def _start(system: str, work: Path, models: list[Any], *, max_models: int,
           mesh_capacity: str, count: bool, mesh_runtimes: int = fitmode.RUNTIMES,
           mesh_passthrough: int = 0) -> tuple[Any, dict[str, str], fitmode.Counter | None]:
    """Start ``system``; returns (PeerProcess, {protocol: address}, its load counter when ``count``
    and the system has one). Addresses: ``host:port`` for gRPC, a base URL for REST."""
    from loadtest.peers import mlserver_app, ray_app
    from loadtest.peers._proc import PeerProcess, free_port, wait_until

    if system == "ray":
        ray = ray_app.start(work / "models", max_models=max_models, max_ongoing=32)
        return ray.proc, {"rest": ray.url}, fitmode.RayCounter(ray) if count else None
    if system == "mlserver":
        mls = mlserver_app.start({t.model_id: f for t, f in models})
        return mls.proc, {"grpc": mls.grpc_target, "rest": mls.http_url}, None
    port, rest_port = free_port(), free_port()
    log = work / "mesh-up.log"
    # Unbuffered: the readiness line and the logs directory are read from this file while it runs.
    # REST is on in every mode (so the router runs alike whichever protocol drives it), on a port
    # chosen here so that its URL is known. The processes' logs go to the run's own folder (not
    # mesh up's default, which keeps the last ten runs of the user).
    proc = PeerProcess("mesh", [sys.executable, "-m", "mesh", "up", "--runtimes", str(mesh_runtimes),
                                "--logs", str(work / "mesh-logs"), "--port", str(port),
                                "--capacity", mesh_capacity],
                       env={"MESH_ROUTER_METRICS_PORT": "0", "MESH_ROUTER_REST_PORT": str(rest_port),
                            "MESH_RUNTIME_PASSTHROUGH_BYTES": str(mesh_passthrough),
                            "PYTHONUNBUFFERED": "1"}, cwd=ROOT, log_path=log)
    try:
        wait_until(lambda: "mesh is up" in log.read_text(errors="replace"), timeout_s=90,
                   what="mesh up ready", proc=proc)
        counter = fitmode.MeshCounter(log) if count else None
        asyncio.run(_register(f"127.0.0.1:{port}", [(t.model_id, str(f)) for t, f in models]))
    except BaseException:
        proc.stop(grace_s=10.0)
        raise
    return proc, {"grpc": f"127.0.0.1:{port}", "rest": f"http://127.0.0.1:{rest_port}"}, counter


async def _register(target: str, items: list[tuple[str, str]]) -> None:
    import grpc

    from loadtest.management import register_many
    from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        _, errors = await register_many(mm_grpc.ModelMeshStub(channel), items, in_flight=8)
    if errors:
        raise RuntimeError(f"registering models failed: {errors}")


async def _drive(protocol: str, address: str, targets: list[Any], sched: Any, proc: Any, *,
                 system: str, warmup_s: float, duration_s: float, concurrency: int,
                 bodies: list[bytes], marks: fitmode.Marks | None = None,
                 recorder: fitmode.Recorder | None = None) -> dict[str, Any]:
    """Open loop (warm-up, measured) then closed loop, over ``protocol`` (grpc or rest)."""
    async with contextlib.AsyncExitStack() as stack:
        return await _phases(await _driver(protocol, stack, bodies, concurrency), address, targets,
                             sched, proc, system=system, warmup_s=warmup_s, duration_s=duration_s,
                             concurrency=concurrency, marks=marks, recorder=recorder)


async def _driver(protocol: str, stack: contextlib.AsyncExitStack, bodies: list[bytes],
                  concurrency: int) -> Callable[..., Awaitable[Any]]:
    """``drive_grpc``, or ``drive_http`` with the shared JSON bodies and one session, kept open by
    ``stack`` for all of the protocol's phases (the warm-up's connections are reused)."""
    from loadtest.peers.drive import drive_grpc, drive_http, http_session

    if protocol != "rest":
        return drive_grpc
    session = await stack.enter_async_context(http_session(max(concurrency, HTTP_CONNECTIONS)))
    return functools.partial(drive_http, bodies=bodies, session=session)


async def _phases(drive: Callable[..., Awaitable[Any]], address: str, targets: list[Any], sched: Any,
                  proc: Any, *, system: str, warmup_s: float, duration_s: float, concurrency: int,
                  marks: fitmode.Marks | None, recorder: fitmode.Recorder | None = None) -> dict[str, Any]:
    order: Any = [int(i) for i in sched["order"]]
    mark: Callable[[], Awaitable[None]] | None = marks.mark if marks is not None else None
    if recorder is not None and marks is not None:  # fit mode: the simulator replays these requests
        order, counted = recorder.order(order), marks.mark

        async def mark_and_record() -> None:
            await counted()
            recorder.mark()

        mark = mark_and_record
    # Open loop: warm up on the warm-up times, then the measured times, each from order[0].
    if warmup_s > 0:
        await drive(address, targets, name=system, duration_s=warmup_s, warmup_s=0,
                    arrivals=sched["warm"], order=order, proc=None)
    if mark is not None:
        await mark()
    opened = await drive(address, targets, name=system, duration_s=duration_s, warmup_s=0,
                         arrivals=sched["measured"], order=order, proc=proc)
    if mark is not None:
        await mark()
    # The closed loop's warm-up runs inside drive(): its counters are read after it (on_measure).
    closed = await drive(address, targets, name=system, concurrency=concurrency,
                         duration_s=duration_s, warmup_s=warmup_s, order=order, proc=proc,
                         on_measure=mark)
    if mark is not None:
        await mark()
    return {"open": {**opened.summary(), "offered": len(sched["measured"])},
            "closed": closed.summary(),
            "peak_rss_mb": round(max(opened.extra["peak_rss_mb"], closed.extra["peak_rss_mb"]), 1)}


def run_phase(system: str, work: Path, n: int, *, warmup_s: float, duration_s: float,
              concurrency: int, fit: float = 1.0, mesh_capacity: str = MESH_CAPACITY,
              protocol: str = "grpc", mesh_runtimes: int = fitmode.RUNTIMES,
              mesh_passthrough: int = 0) -> dict[str, Any]:
    """Start ``system``, drive it over each of its protocols in turn, stop it. ``runs``: one result
    per protocol; the rest is the system's (start-up, processes, survivors)."""
    models = make_models(work / "models", n)  # deterministic: the same files as the parent's
    targets = [t for t, _ in models]
    sched = dict(np.load(work / SCHEDULE))
    bodies = read_bodies(work)
    fitting = fit < 1.0
    k = fitmode.k_models(fit, n) if fitting else n
    t0 = time.monotonic()
    proc, addresses, counter = _start(system, work, models, max_models=k,
                                      mesh_capacity=mesh_capacity, count=fitting, mesh_runtimes=mesh_runtimes,
                                      mesh_passthrough=mesh_passthrough)
    startup_s = time.monotonic() - t0
    runs: dict[str, Any] = {}
    try:
        for proto in protocols_of(system, protocol):
            marks = fitmode.Marks(counter) if fitting else None
            recorder = fitmode.Recorder() if fitting and system == "mesh" else None
            out = asyncio.run(_drive(proto, addresses[proto], targets, sched, proc, system=system,
                                     warmup_s=warmup_s, duration_s=duration_s,
                                     concurrency=concurrency, bodies=bodies, marks=marks,
                                     recorder=recorder))
            if marks is not None:  # fit mode only: the default result keeps its shape
                out["cache"] = marks.summary()
            if recorder is not None and marks is not None:
                # The simulator on the same requests (issue 18's target: loadtest.peers.fit). Read
                # before the mesh stops: the sizes and load times are in its runtimes' logs.
                p50 = [out["open"]["p50_ms"]] * 2 + [out["closed"]["p50_ms"]] * 3
                out["simulated"] = fitmode.simulate_run(
                    recorder, [t.model_id for t in targets], fitmode.logged_loads(work / "mesh-up.log"),
                    capacity_bytes=int(mesh_capacity), infer_ms=p50, measured=out["cache"],
                    passthrough_bytes=mesh_passthrough)
                out["simulated"]["mesh_warnings"] = fitmode.logged_warnings(work / "mesh-up.log")
            runs[proto] = out
        n_procs = len(proc.tree())
    finally:
        killed = proc.stop(grace_s=30.0)
    facts: dict[str, Any] = {}
    if fitting:
        facts["holds"] = _holds(system, k, n, mesh_capacity)
        if system == "ray":
            facts["max_num_models_per_replica"] = k
    return {"runs": runs, **facts, "startup_s": round(startup_s, 1), "processes": n_procs,
            "sigkilled": killed, "survivors": [p.pid for p in proc.survivors()]}


def _holds(system: str, k: int, n: int, mesh_capacity: str) -> str:
    """What ``system`` has room for in the fit mode, as the table shows it."""
    if system == "mesh":
        return f"about {k} ({int(mesh_capacity):,} B per runtime)"
    if system == "ray":
        return f"{k} (LRU per replica)"
    return f"all {n} (no eviction)"


# -- parent ------------------------------------------------------------------------------------

def run_child(system: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The system's child; its result as rows: ``{row name: result}``, one row per protocol."""
    flags = ["--work", str(work), "--models", str(args.models), "--warmup", str(args.warmup),
             "--duration", str(args.duration), "--concurrency", str(args.concurrency),
             "--protocol", args.protocol, "--mesh-runtimes", str(args.mesh_runtimes)]
    if args.fit < 1.0:
        flags += ["--fit", repr(args.fit), "--mesh-capacity", args.mesh_capacity,
                  "--passthrough", str(args.passthrough)]
    protocols = protocols_of(system, args.protocol)
    out = run_isolated("loadtest.scenarios.peers", system, flags,
                       limit_s=240 + 3 * len(protocols) * (args.warmup + args.duration),
                       allow_wildcard=args.allow_wildcard)
    runs = out.pop("runs")
    # A system run over one protocol keeps its name as the row's (the default mode's result shape).
    return {(system if len(runs) == 1 else f"{system}/{proto}"): {"system": system, "protocol": proto,
                                                                  **run, **out}
            for proto, run in runs.items()}


def bench(*, models: int, rate: float, concurrency: int, duration: float, warmup: float,
          seed: int = 0, systems: tuple[str, ...] | None = None,
          allow_wildcard: bool = False, fit: float = 1.0, protocol: str = "grpc",
          mesh_runtimes: int = fitmode.RUNTIMES, passthrough: str = "0") -> dict[str, Any]:
    """Run ``systems`` (default: all three, or our mesh and Ray with ``fit`` < 1) one by one, our
    mesh and MLServer over ``protocol`` (grpc, rest or both). ``mesh_runtimes``: the runtimes of
    our mesh (``mesh up --runtimes``); the fit mode sizes two. ``passthrough``: the fit mode's
    pass-through room per runtime, out of its capacity (``auto``: ``fitmode.passthrough_room``'s;
    or bytes; ``0``, the runtime's default: none)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if fit < 1.0 and mesh_runtimes != fitmode.RUNTIMES:
        raise ValueError(f"the fit mode sizes {fitmode.RUNTIMES} runtimes; --mesh-runtimes applies to the default mode")
    fitting = fit < 1.0
    systems = systems or (FIT_SYSTEMS if fitting else SYSTEMS)
    args = argparse.Namespace(models=models, warmup=warmup, duration=duration,
                              concurrency=concurrency, allow_wildcard=allow_wildcard, fit=fit,
                              mesh_capacity=MESH_CAPACITY, protocol=protocol, mesh_runtimes=mesh_runtimes,
                              passthrough=0)
    setup.ensure_all([s for s in systems if s != "mesh"])
    facts = report.machine()
    foreign = report.ForeignLoad()
    results: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="peers-bench-") as tmp:
        work = Path(tmp)
        (work / "models").mkdir()
        files = make_models(work / "models", models)
        make_schedule(work, models=models, rate=rate, warmup_s=warmup, duration_s=duration,
                      seed=seed)
        write_bodies(work, [t for t, _ in files])
        if fitting:
            k = fitmode.k_models(fit, models)
            extra = {"fit": fit, "k": k, "ray_max_num_models_per_replica": k}
            if "mesh" in systems:
                print(f"[peers-bench] calibrating our mesh's capacity for {k} models...",
                      file=sys.stderr, flush=True)
                room = fitmode.measure_room(files, k)
                args.mesh_capacity = str(room.capacity_bytes)
                args.passthrough = room.passthrough_bytes if passthrough == "auto" else int(passthrough)
                extra["mesh_room"] = room.to_dict() | {"passthrough_bytes": args.passthrough}
            extra["mlserver"] = ("holds all models (cannot evict)" if "mlserver" in systems
                                 else "absent: cannot evict")
        for system in systems:
            print(f"[peers-bench] {system}...", file=sys.stderr, flush=True)
            results.update(run_child(system, work, args))
    facts["foreign_load"] = foreign.result()
    return {"machine": facts, "settings": {"models": models, "rate": rate, "zipf": 1.0,
                                           "concurrency": concurrency, "duration_s": duration,
                                           "warmup_s": warmup, "seed": seed, "protocol": protocol,
                                           "mesh_runtimes": mesh_runtimes,
                                           "mesh_capacity_per_runtime": args.mesh_capacity,
                                           **extra},
            "systems": results}


def render(out: dict[str, Any]) -> str:
    s = out["settings"]
    fitting = "fit" in s
    header = ["system", "protocol", "open req/s", "open p50 ms", "open p99 ms", "open errors",
              "closed req/s", "closed p50 ms", "closed p99 ms", "closed errors", "peak RSS MB",
              "procs", "start s"]
    if fitting:
        header += ["holds", "loads", "hit ratio"]
    rows = []
    for r in out["systems"].values():
        o, c = r["open"], r["closed"]
        row = [r["system"], PROTOCOL_LABELS[r["protocol"]], o["throughput_rps"], o["p50_ms"],
               o["p99_ms"], sum(o["errors"].values()), c["throughput_rps"], c["p50_ms"], c["p99_ms"],
               sum(c["errors"].values()), r["peak_rss_mb"], r["processes"], r["startup_s"]]
        if fitting:
            row += [r["holds"], _or_na(r["cache"]["loads"]), _or_na(r["cache"]["hit_ratio"])]
        rows.append(row)
    title = (f"{s['models']} sklearn models, Zipf {s['zipf']}, open loop Poisson {s['rate']} req/s, "
             f"closed loop c={s['concurrency']}, {s['duration_s']} s each after {s['warmup_s']} s "
             f"warm-up")
    if s.get("mesh_runtimes", fitmode.RUNTIMES) != fitmode.RUNTIMES:
        title += f"; our mesh with {s['mesh_runtimes']} runtime(s)"
    protocol = s.get("protocol", "grpc")
    if protocol != "grpc":  # the default mode's title stays as it was
        title += ("; our mesh and MLServer over V2 REST JSON" if protocol == "rest" else
                  "; our mesh and MLServer over V2 gRPC, then over V2 REST JSON")
        title += " (the bodies Ray gets, one aiohttp client)"
    if fitting:
        room = s.get("mesh_room")
        mesh = (f"; our mesh 2 runtimes x {room['capacity_bytes_per_runtime']:,} B, about K: "
                f"P {room['predicted_bytes']:,} B + (K - 1) / 2 x s {room['size_bytes']:,} B"
                if room else "")
        title += (f"; fit {s['fit']:g}: room for K = {s['k']} models (Ray max_num_models_per_replica = "
                  f"{s['k']}{mesh}); loads and hits counted in the measured parts only")
    lines = [report.machine_line(out["machine"]), "", title, "", report.table(header, rows)]
    if protocol == "both":
        lines += ["", _rest_vs_grpc(out["systems"])]
    if fitting and "mlserver" not in {r["system"] for r in out["systems"].values()}:
        lines += ["", MLSERVER_ABSENT.format(n=s["models"])]
    for name, r in out["systems"].items():
        if r.get("simulated"):
            lines += ["", _simulated(name, r["simulated"])]
    return "\n".join(lines)


def _simulated(name: str, sim: dict[str, Any]) -> str:
    """The simulator on the same requests against the measured counts (loadtest.peers.fit)."""
    mesh = sim["mesh"]
    rows = [["measured (" + name + ")", _or_na(mesh["hit_ratio"]), _or_na(mesh["hit_ratio_per_request"]),
             _or_na(mesh["loads"]), _or_na(mesh["loads_per_request_counted"]), _or_na(mesh.get("evictions")),
             mesh.get("miss_routed_elsewhere", "n/a")],
            ["simulated (placement.cluster)", "", _or_na(sim["hit_ratio"]), sim["loads"],
             _or_na(sim["loads_per_request"]), sim["evictions"], 0]]
    return (f"The cluster simulator on the same {sim['requests_measured']:,} measured requests "
            f"({sim['instances']} instances x {sim['capacity_bytes_per_runtime']:,} B, {sim['policy']}, "
            f"sizes and load times as the runtimes logged them): hit ratio per request "
            f"{_or_na(sim['difference_points'])} points from the simulator's (target: within 5; "
            f"{_or_na(sim['difference_points_counted'])} as the runtimes count, where a request sent to "
            "an evicted copy counts twice)\n\n"
            + report.table(["", "hit ratio (runtimes' count)", "hit ratio per request", "loads",
                            "loads per request", "evictions", "sent to an evicted copy"], rows))


def _rest_vs_grpc(systems: dict[str, Any]) -> str:
    """Per system driven both ways: REST's open-loop p50/p99 beside gRPC's, and the throughputs."""
    rows = []
    for name in SYSTEMS:
        grpc, rest = systems.get(f"{name}/grpc"), systems.get(f"{name}/rest")
        if grpc is None or rest is None:
            continue
        go, ro, gc, rc = grpc["open"], rest["open"], grpc["closed"], rest["closed"]
        rows.append([name, go["p50_ms"], ro["p50_ms"], ro["p50_ms"] - go["p50_ms"], go["p99_ms"],
                     ro["p99_ms"], gc["throughput_rps"], rc["throughput_rps"],
                     rc["throughput_rps"] / gc["throughput_rps"] if gc["throughput_rps"] else float("nan")])
    return "REST against gRPC, per system (open-loop latency, closed-loop throughput):\n\n" + report.table(
        ["system", "gRPC p50 ms", "REST p50 ms", "REST - gRPC p50 ms", "gRPC p99 ms", "REST p99 ms",
         "gRPC req/s", "REST req/s", "REST / gRPC req/s"], rows)


def _or_na(value: object) -> object:
    return "n/a" if value is None else value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Our mesh, MLServer and Ray Serve side by side")
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop Poisson req/s")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop workers")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before each phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fit", type=float, default=1.0,
                        help="share of the models that fit, 0 < F <= 1 (default 1: all fit; below 1 "
                             "Ray and our mesh have room for round(F x models) models)")
    parser.add_argument("--system", choices=SYSTEMS, action="append",
                        help="default: all three (with --fit below 1: mesh and ray)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="grpc",
                        help="how our mesh and MLServer are driven: V2 gRPC (default), V2 REST JSON "
                             "(the bodies Ray gets), or both, one after the other on each start; Ray "
                             "is always driven over HTTP")
    parser.add_argument("--mesh-runtimes", type=int, default=fitmode.RUNTIMES, metavar="N",
                        help="our mesh's runtimes (mesh up --runtimes N; default 2). One runtime and "
                             "its router fit a 2-core host; two buy a second copy of every library "
                             "in memory. The fit mode sizes two")
    parser.add_argument("--allow-wildcard", action="store_true",
                        help="run Ray even where no loopback-only network namespace is possible")
    report.add_output_args(parser)
    parser.add_argument("--phase", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mesh-capacity", default=MESH_CAPACITY, help=argparse.SUPPRESS)
    parser.add_argument("--passthrough", default="0", metavar="auto|BYTES",
                        help="fit mode: our runtimes' pass-through room (runtime.passthrough_bytes), "
                             "taken out of the same capacity: auto (room for the largest calibrated "
                             "model, if the rest still holds it), or bytes; default 0, none, as the "
                             "runtime's default")
    args = parser.parse_args(argv)
    if args.passthrough != "auto" and not args.passthrough.isdigit():
        parser.error(f"--passthrough must be auto or a number of bytes, got {args.passthrough!r}")
    if not 0 < args.fit <= 1:  # also false for NaN
        parser.error(f"--fit must be in (0, 1], got {args.fit:g}")
    if not 1 <= args.mesh_runtimes <= 16:
        parser.error(f"--mesh-runtimes must be 1 to 16, got {args.mesh_runtimes}")
    if args.fit < 1 and args.mesh_runtimes != fitmode.RUNTIMES:
        parser.error(f"the fit mode sizes {fitmode.RUNTIMES} runtimes; --mesh-runtimes applies to the default mode")
    if args.fit < 1 and not args.phase:
        # The calibration starts servers here: SIGTERM must run their cleanup, and the mesh
        # library's start-up logs go to stderr (warnings only), not into the printed results.
        from loadtest.cluster import prepare_benchmark_process

        prepare_benchmark_process()
    if args.phase:
        out = run_phase(args.phase, args.work, args.models, warmup_s=args.warmup,
                        duration_s=args.duration, concurrency=args.concurrency, fit=args.fit,
                        mesh_capacity=args.mesh_capacity, protocol=args.protocol,
                        mesh_runtimes=args.mesh_runtimes, mesh_passthrough=int(args.passthrough))
        print("RESULT " + json.dumps(out), flush=True)
        return
    try:
        result = bench(models=args.models, rate=args.rate, concurrency=args.concurrency,
                       duration=args.duration, warmup=args.warmup, seed=args.seed,
                       systems=tuple(args.system) if args.system else None,
                       allow_wildcard=args.allow_wildcard, fit=args.fit, protocol=args.protocol,
                       mesh_runtimes=args.mesh_runtimes, passthrough=args.passthrough)
    except (setup.SetupError, RuntimeError, subprocess.TimeoutExpired) as err:
        sys.exit(f"error: {err}")
    report.emit(args, result, render(result))
    bad = {n: r["survivors"] for n, r in result["systems"].items() if r["survivors"]}
    if bad:
        sys.exit(f"error: processes survived: {bad}")


if __name__ == "__main__":
    main()
