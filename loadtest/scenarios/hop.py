"""Hop overhead: what the router adds between a client and a runtime (issue 2, target 1).

``python -m loadtest.scenarios.hop [--duration S] [--rounds R] [--warmup S] [--concurrency N]
[--profile-seconds S] [--profile-process router|runtime] [--no-naive] [--before-tree DIR] [--json]``

``--netns-delays 0,0.2,0.5,1`` measures instead the hop across hosts: client, router and runtime in
network namespaces of their own with that delay (ms) on every link, one delay after another
(``loadtest.scenarios.hop_netns`` has the method; ``--duration``, ``--rounds``, ``--warmup`` and
the output options apply, c=1 only).

Method. One private etcd, one runtime, one router, a bare grpc.aio echo server
(``loadtest.echo_server``) and the naive proxy of the issue (``loadtest.naive_proxy``, forwarding
to the same runtime), each a separate process on 127.0.0.1; the mesh components are started as
``mesh up`` starts them. The model is a scikit-learn LogisticRegression over 256 features trained
here on synthetic data; its request is one FP32 row sent raw, 1,059 bytes serialized. The load
generator is this process (never a server process): a closed-loop grpc.aio client on uvloop with
the request pre-encoded (``loadtest.load``), one channel per server, the model chosen by the
``mm-model-id`` header on every path. The first request loads the model; we then wait until the
router's view shows the copy loaded, so that routed requests take the steady-state path, and check
that both paths answer what the model itself predicts.

Paths: *direct* (client -> runtime), *naive proxy* (client -> naive proxy -> runtime), *routed*
(client -> router -> runtime), and *echo* (client -> echo server, the same 1,059 request bytes
echoed back). Two blocks, each ``--rounds`` (4) interleaved rounds in alternating order so that
drift on a shared machine hits every path alike; in a round each path gets ``--warmup`` (0.5 s) of
unmeasured traffic and then duration/rounds seconds measured (8 s per path in all):

With ``--before-tree DIR`` a second private etcd, runtime and router run DIR's code (e.g. a checkout
of the commit before a change), and *direct (before)* and *routed (before)* join the rounds: before
and after measured in one run, under the same drift.

1. c=1: latency p50/p99 of direct, naive and routed; added p50 = routed p50 - direct p50;
2. c=N (32): throughput of all four; ratio = routed / direct.

CPU per request is a process's user+system CPU time (psutil, all threads) over the measured
segments divided by the requests answered in them (for the runtime also by kind of thread: event
loop, grpc's threads, the others, which are its inference threads; and for each process the time
its threads were ready to run but waited for a core, from ``/proc/PID/task/TID/schedstat``);
each measured segment begins and ends with nothing in flight. The router's CPU per forwarded
request and the echo server's CPU per echoed request both come from block 2 (c=N). The naive
proxy's figures are a reference measured in the same run: the targets were set against a naive
proxy measured earlier on this machine.

Then, unless ``--profile-seconds 0``, the router (or what ``--profile-process`` names: router,
runtime, each in turn) is profiled with py-spy (native frames, which
pauses it at each sample) under routed c=N load, in an extra phase that is not part of the measured
numbers (``loadtest.profile`` explains the summary).

Caveats. Everything shares this machine's cores (two on the reference machine): the client, the
proxy and the runtime compete for CPU, so a throughput is bounded by the sum of the CPU per
request of all processes on the path, not by the router alone, and the direct path has one process
fewer to feed. The client is itself Python and costs about as much CPU per request as a server;
its CPU is reported too. Other jobs on the machine disturb the numbers; the CPU they used during
the run is reported (``ForeignLoad``). Numbers are from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from loadtest import profile as prof
from loadtest.cluster import Cluster, Server, prepare_benchmark_process
from loadtest.echo_server import METHOD as ECHO_METHOD
from loadtest.load import PhaseResult, bytes_call, closed_loop
from loadtest.management import register, wait_loaded
from loadtest.models import TrainedModel, infer_body, train_logistic
from loadtest.report import ForeignLoad, add_output_args, emit, machine, machine_line, table, verdict
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.tensors import decode_response

INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_ID = "hop-lr-256"

TARGET_ADDED_P50_MS = 0.55
TARGET_CPU_RATIO = 2.0
TARGET_THROUGHPUT_RATIO = 0.45
# Issue 18: the runtime's CPU per routed request, and the router's ratio, tightened.
TARGET_RUNTIME_CPU_MS = 0.3
TARGET_CPU_RATIO_18 = 1.9
# mesh-bench's standard suite (loadtest.bench): the same phases, shorter (3 s per path and concurrency
# over 2 rounds), no profile. About 32 s on 2 cores: ~7 s start-up (a tiny run took 14.8 s) + 7 segments x 3.5 s.
SUITE_ARGS = ("--duration", "3", "--rounds", "2", "--warmup", "0.25", "--profile-seconds", "0")
SUITE_SECONDS = 35


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# grpc core's own threads, by the names it gives them (/proc/PID/task/TID/comm); Python's threads
# all keep the process's name.
_GRPC_THREADS = ("event_engine", "grpc_", "lifeguard", "default-executo", "resolver-execut", "timer_manager")


def thread_kind(pid: int, tid: int) -> str:
    """``event loop`` (the main thread), ``grpc threads`` or ``other Python threads`` (a runtime's
    inference and load threads)."""
    if tid == pid:
        return "event loop"
    try:
        name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return "other Python threads"
    return "grpc threads" if name.startswith(_GRPC_THREADS) else "other Python threads"


class CpuMeter:
    """CPU seconds (user, system) used by some processes, summed over the measured segments; for
    the runtime, also by kind of thread (:func:`thread_kind`)."""

    def __init__(self, **procs: psutil.Process) -> None:
        self.procs = procs
        self._before: dict[str, tuple[float, float]] = {}
        self.user: dict[str, float] = dict.fromkeys(procs, 0.0)
        self.system: dict[str, float] = dict.fromkeys(procs, 0.0)
        self.threads: dict[str, float] = {}  # the runtime's CPU seconds by thread kind
        self._threads_before: dict[int, float] = {}
        # Seconds the processes' threads were ready to run but waited for a core (schedstat).
        self.waited: dict[str, float] = dict.fromkeys(procs, 0.0)
        self._waited_before: dict[str, float] = {}

    @staticmethod
    def _waiting(p: psutil.Process) -> float:
        """Run-queue wait of all of ``p``'s threads so far, in seconds (``/proc/PID/task/TID/schedstat``:
        time on a core, time waiting for one, timeslices); 0 where the kernel does not keep it."""
        total = 0
        for task in Path(f"/proc/{p.pid}/task").glob("*/schedstat"):
            try:
                total += int(task.read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
        return total / 1e9

    def _thread_cpu(self) -> dict[int, float]:
        p = self.procs.get("runtime")
        if p is None:
            return {}
        try:
            return {t.id: t.user_time + t.system_time for t in p.threads()}
        except psutil.Error:
            return {}

    @staticmethod
    def _cpu(p: psutil.Process) -> tuple[float, float]:
        t = p.cpu_times()
        return t.user, t.system

    def start(self) -> None:
        self._before = {k: self._cpu(p) for k, p in self.procs.items()}
        self._threads_before = self._thread_cpu()
        self._waited_before = {k: self._waiting(p) for k, p in self.procs.items()}

    def stop(self) -> None:
        for k, p in self.procs.items():
            user, system = self._cpu(p)
            self.user[k] += user - self._before[k][0]
            self.system[k] += system - self._before[k][1]
            self.waited[k] += self._waiting(p) - self._waited_before[k]
        if "runtime" in self.procs:
            pid = self.procs["runtime"].pid
            for tid, cpu in self._thread_cpu().items():
                kind = thread_kind(pid, tid)
                self.threads[kind] = self.threads.get(kind, 0.0) + cpu - self._threads_before.get(tid, 0.0)


@dataclass
class Target:
    """One way to the model (or to the echo server) and whose CPU to meter on it."""

    name: str
    call: grpc.aio.UnaryUnaryMultiCallable
    metadata: tuple[tuple[str, str], ...]
    procs: dict[str, psutil.Process]


async def interleaved(targets: list[Target], body: bytes, concurrency: int,
                      args: argparse.Namespace) -> dict[str, PhaseResult]:
    """``args.rounds`` rounds; in each, every target gets one segment of duration/rounds seconds
    (after its own warm-up), in alternating order, so that drift on a shared machine hits every
    target alike. Segments of a target are summed into one result."""
    seg = args.duration / args.rounds
    results: dict[str, PhaseResult] = {}
    meters = {t.name: CpuMeter(**t.procs) for t in targets}
    log(f"c={concurrency}: {', '.join(t.name for t in targets)}; {args.rounds} rounds of "
        f"{args.warmup:g} s warm-up + {seg:g} s each")
    for r in range(args.rounds):
        for t in (targets if r % 2 == 0 else targets[::-1]):
            meter = meters[t.name]
            res = await closed_loop(t.call, body, t.metadata, name=f"{t.name} c={concurrency}",
                                    concurrency=concurrency, duration_s=seg, warmup_s=args.warmup,
                                    on_start=meter.start, on_end=meter.stop)
            if t.name in results:
                results[t.name].add(res)
            else:
                results[t.name] = res
    for t in targets:
        res = results[t.name]
        if res.requests:
            meter = meters[t.name]
            for k in meter.procs:
                res.extra[f"{k}_cpu_ms_per_req"] = (meter.user[k] + meter.system[k]) / res.requests * 1000
                res.extra[f"{k}_sys_ms_per_req"] = meter.system[k] / res.requests * 1000
                res.extra[f"{k}_runqueue_ms_per_req"] = meter.waited[k] / res.requests * 1000
            for kind, cpu in meter.threads.items():
                res.extra[f"runtime_ms_per_req/{kind}"] = cpu / res.requests * 1000
        if res.errors:
            log(f"  {res.name}: errors {res.errors}")
    return results


async def _profile(target: Target, body: bytes, server: Server, concurrency: int, seconds: float,
                   workdir: Path, name: str = "router", gil: bool = False) -> dict[str, Any]:
    path = workdir / f"{name}-native.raw"
    mode = "GIL holder's Python frames" if gil else "native frames"
    log(f"profiling the {name} with py-spy ({mode}, {seconds:g} s under routed c={concurrency})")
    spy = prof.start_record(server.pid, path, duration_s=seconds, native=not gil, gil=gil)
    await asyncio.sleep(1.0)  # let py-spy attach before the load starts
    await closed_loop(target.call, body, target.metadata, name="profile", concurrency=concurrency,
                      duration_s=seconds, warmup_s=0)
    _, err = await asyncio.to_thread(spy.communicate, timeout=seconds + 30)
    if spy.returncode != 0 or not path.exists():
        message = (err or b"").decode(errors="replace").strip()[-500:]
        log(f"  py-spy failed: {message}")
        return {"error": message}
    summary = prof.parse_raw(path.read_text(errors="replace"))
    return {**summary.as_dict(20), "text": prof.format_summary(summary, 20)}


async def run(args: argparse.Namespace, cluster: Cluster, model: TrainedModel,
              servers: dict[str, Server]) -> dict[str, Any]:
    body = infer_body(model)
    md = (("mm-model-id", MODEL_ID),)
    me = psutil.Process()
    runtime, router, echo = servers["runtime"], servers["router"], servers["echo"]
    channels = {name: grpc.aio.insecure_channel(s.endpoint) for name, s in servers.items()}
    try:
        mesh = mm_grpc.ModelMeshStub(channels["router"])
        await register(mesh, MODEL_ID, str(model.path))
        started = time.perf_counter()
        routed = bytes_call(channels["router"], INFER)
        first = await routed(body, metadata=md, timeout=60)  # loads the model on the runtime
        first_ms = (time.perf_counter() - started) * 1000
        await wait_loaded(mesh, MODEL_ID)  # routed requests now take the loaded-copy path
        import joblib

        expected = joblib.load(model.path).predict(model.sample)
        direct = bytes_call(channels["runtime"], INFER)
        for raw in (first, await direct(body, metadata=md, timeout=10)):
            got = decode_response(pb.ModelInferResponse.FromString(raw))["predict"]
            if not np.array_equal(got, expected):
                raise RuntimeError(f"wrong answer from the mesh: {got} != {expected}")
        echoed = bytes_call(channels["echo"], ECHO_METHOD)
        if await echoed(body, timeout=10) != body:
            raise RuntimeError("the echo server did not echo")

        targets = [Target("direct", direct, md, {"runtime": runtime.ps, "client": me})]
        if "naive" in servers:
            targets.append(Target("naive proxy", bytes_call(channels["naive"], INFER), md,
                                  {"proxy": servers["naive"].ps, "runtime": runtime.ps, "client": me}))
        targets.append(Target("routed", routed, md,
                              {"proxy": router.ps, "runtime": runtime.ps, "client": me}))
        if "router-before" in servers:
            # The same paths through a runtime and a router running --before-tree's code (in a
            # cluster of their own), interleaved with ours: before and after from one run.
            before_mesh = mm_grpc.ModelMeshStub(channels["router-before"])
            await register(before_mesh, MODEL_ID, str(model.path))
            routed_before = bytes_call(channels["router-before"], INFER)
            await routed_before(body, metadata=md, timeout=60)
            await wait_loaded(before_mesh, MODEL_ID)
            rb, rtb = servers["router-before"], servers["runtime-before"]
            targets.insert(1, Target("direct (before)", bytes_call(channels["runtime-before"], INFER), md,
                                     {"runtime": rtb.ps, "client": me}))
            targets.append(Target("routed (before)", routed_before, md,
                                  {"proxy": rb.ps, "runtime": rtb.ps, "client": me}))
        echo_target = Target("echo", echoed, (), {"proxy": echo.ps, "client": me})
        c = args.concurrency
        low = await interleaved(targets, body, 1, args)
        high = await interleaved([*targets, echo_target], body, c, args)
        profile: dict[str, Any] = {}
        if args.profile_seconds > 0:
            if prof.available():
                # One process at a time: native sampling pauses the process it samples.
                routed_target = next(t for t in targets if t.name == "routed")
                for name in args.profile_process:
                    profile[name] = await _profile(routed_target, body, servers[name], c, args.profile_seconds,
                                                   cluster.workdir, name, args.profile_gil)
            else:
                profile = {name: {"error": "py-spy is not installed (pip install py-spy)"}
                           for name in args.profile_process}
    finally:
        for channel in channels.values():
            await channel.close()
    added = low["routed"].p(50) - low["direct"].p(50)
    router_cpu = high["routed"].extra.get("proxy_cpu_ms_per_req", float("nan"))
    echo_cpu = high["echo"].extra.get("proxy_cpu_ms_per_req", float("nan"))
    runtime_cpu = high["routed"].extra.get("runtime_cpu_ms_per_req", float("nan"))
    ratio = high["routed"].throughput_rps / high["direct"].throughput_rps
    phases = {f"{k} c=1": v.summary() for k, v in low.items()}
    phases.update({f"{k} c={c}": v.summary() for k, v in high.items()})
    reference: dict[str, float] = {}
    if "naive proxy" in low:
        reference = {
            "naive_added_p50_ms": round(low["naive proxy"].p(50) - low["direct"].p(50), 3),
            "naive_cpu_vs_echo": round(high["naive proxy"].extra.get("proxy_cpu_ms_per_req", 0) / echo_cpu, 2),
            "naive_throughput_ratio": round(high["naive proxy"].throughput_rps
                                            / high["direct"].throughput_rps, 3)}
    before: dict[str, float] = {}
    if "routed (before)" in high:
        before_router_cpu = high["routed (before)"].extra.get("proxy_cpu_ms_per_req", float("nan"))
        before = {
            "added_p50_ms": round(low["routed (before)"].p(50) - low["direct (before)"].p(50), 3),
            "router_cpu_vs_echo": round(before_router_cpu / echo_cpu, 2),
            "throughput_ratio": round(high["routed (before)"].throughput_rps
                                      / high["direct (before)"].throughput_rps, 3),
            "runtime_cpu_ms_per_routed_req": round(
                high["routed (before)"].extra.get("runtime_cpu_ms_per_req", float("nan")), 3)}
        before["router_cpu_vs_echo_18"] = before["router_cpu_vs_echo"]
    return {
        "machine": machine(),
        "before_tree": str(args.before_tree) if args.before_tree else None,
        "before": before,
        "settings": {"duration_s": args.duration, "rounds": args.rounds, "warmup_s": args.warmup,
                     "concurrency": c, "request_bytes": len(body), "first_request_ms": round(first_ms, 1)},
        "phases": phases,
        "targets": {
            "added_p50_ms": {"value": round(added, 3), "target": f"<= {TARGET_ADDED_P50_MS}",
                             "met": added <= TARGET_ADDED_P50_MS},
            "router_cpu_vs_echo": {"value": round(router_cpu / echo_cpu, 2),
                                   "target": f"<= {TARGET_CPU_RATIO}",
                                   "router_cpu_ms_per_req": round(router_cpu, 4),
                                   "echo_cpu_ms_per_req": round(echo_cpu, 4),
                                   "met": router_cpu / echo_cpu <= TARGET_CPU_RATIO},
            "throughput_ratio": {"value": round(ratio, 3), "target": f">= {TARGET_THROUGHPUT_RATIO}",
                                 "met": ratio >= TARGET_THROUGHPUT_RATIO},
            "runtime_cpu_ms_per_routed_req": {"value": round(runtime_cpu, 3),
                                              "target": f"<= {TARGET_RUNTIME_CPU_MS}",
                                              "met": runtime_cpu <= TARGET_RUNTIME_CPU_MS},
            "router_cpu_vs_echo_18": {"value": round(router_cpu / echo_cpu, 2), "target": f"<= {TARGET_CPU_RATIO_18}",
                                      "met": router_cpu / echo_cpu <= TARGET_CPU_RATIO_18},
        },
        "naive_proxy_reference": reference,
        "profile": profile,
    }


def render(result: dict[str, Any]) -> str:
    rows = []
    for s in result["phases"].values():
        rows.append([s["name"], s["requests"], s["throughput_rps"], s["p50_ms"], s["p99_ms"],
                     s.get("client_cpu_ms_per_req", float("nan")),
                     s.get("runtime_cpu_ms_per_req", float("nan")),
                     s.get("proxy_cpu_ms_per_req", float("nan"))])
    t = result["targets"]
    ref = result.get("naive_proxy_reference") or {}
    before = result.get("before") or {}
    c = result["settings"]["concurrency"]
    head = ["target", "router", "naive proxy (same run)", "target", "verdict"]
    if before:
        head.insert(2, "before (same run)")
    target_rows = [
        ["added p50 latency, c=1 (ms)", t["added_p50_ms"]["value"], ref.get("naive_added_p50_ms", "-"),
         t["added_p50_ms"]["target"], verdict(t["added_p50_ms"]["met"])],
        [f"CPU per forwarded request / echo server's, c={c}", t["router_cpu_vs_echo"]["value"],
         ref.get("naive_cpu_vs_echo", "-"), t["router_cpu_vs_echo"]["target"],
         verdict(t["router_cpu_vs_echo"]["met"])],
        [f"routed / direct throughput, c={c}", t["throughput_ratio"]["value"],
         ref.get("naive_throughput_ratio", "-"), t["throughput_ratio"]["target"],
         verdict(t["throughput_ratio"]["met"])]]
    keys = ["added_p50_ms", "router_cpu_vs_echo", "throughput_ratio"]
    if "runtime_cpu_ms_per_routed_req" in t:  # issue 18's targets
        target_rows += [
            [f"issue 18: runtime CPU per routed request, c={c} (ms)", t["runtime_cpu_ms_per_routed_req"]["value"],
             "-", t["runtime_cpu_ms_per_routed_req"]["target"], verdict(t["runtime_cpu_ms_per_routed_req"]["met"])],
            [f"issue 18: router CPU / echo server's, c={c}", t["router_cpu_vs_echo_18"]["value"], "-",
             t["router_cpu_vs_echo_18"]["target"], verdict(t["router_cpu_vs_echo_18"]["met"])]]
        keys += ["runtime_cpu_ms_per_routed_req", "router_cpu_vs_echo_18"]
    if before:
        for row, key in zip(target_rows, keys, strict=True):
            row.insert(2, before.get(key, "-"))
    out = [machine_line(result["machine"]), "",
           table(["path", "requests", "req/s", "p50 ms", "p99 ms", "client CPU ms/req",
                  "runtime CPU ms/req", "router / proxy / echo CPU ms/req"], rows), "",
           table(head, target_rows)]
    if before:
        out.insert(1, f"(before): a runtime and a router of {result['before_tree']}, in a cluster of their own")
    routed = result["phases"].get(f"routed c={c}", {})
    if "proxy_sys_ms_per_req" in routed:
        out.append(f"router CPU per forwarded request at c={c}: {routed['proxy_cpu_ms_per_req']:.3f} ms, "
                   f"of which {routed['proxy_sys_ms_per_req']:.3f} ms in the kernel (system time)")
    for name in (f"routed c={c}", f"routed (before) c={c}", f"direct c={c}"):
        phase = result["phases"].get(name, {})
        kinds = {k.split("/", 1)[1]: v for k, v in phase.items() if k.startswith("runtime_ms_per_req/")}
        if kinds:
            out.append(f"runtime CPU by thread, {name}: " + ", ".join(
                f"{kind} {ms:.3f} ms/req" for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])))
    for name in (f"routed c={c}", f"routed (before) c={c}", f"direct c={c}"):
        phase = result["phases"].get(name, {})
        if "proxy_runqueue_ms_per_req" in phase or "runtime_runqueue_ms_per_req" in phase:
            out.append(f"waiting for a core (run queue, all threads) per request, {name}: " + ", ".join(
                f"{who} {phase[f'{key}_runqueue_ms_per_req']:.3f} ms" for who, key in
                (("router", "proxy"), ("runtime", "runtime"), ("client", "client"))
                if f"{key}_runqueue_ms_per_req" in phase))
    for name, profile in (result.get("profile") or {}).items():
        if "text" in profile:
            out += ["", f"{name} profile (py-spy, routed c={c}):", profile["text"]]
        else:
            out += ["", f"{name} profile: {profile}"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.scenarios.hop", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0,
                        help="measured seconds per path and concurrency, over all rounds (default 8)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="unmeasured seconds before each segment (default 0.5)")
    parser.add_argument("--concurrency", type=int, default=32, help="workers in the throughput phase")
    parser.add_argument("--profile-seconds", type=float, default=6.0,
                        help="seconds of py-spy on each profiled process after the measurements (0: none)")
    parser.add_argument("--profile-process", action="append", choices=("router", "runtime"),
                        help="which process to profile under routed load (repeatable; default: the router)")
    parser.add_argument("--no-naive", action="store_true", help="leave out the naive proxy reference")
    parser.add_argument("--profile-gil", action="store_true",
                        help="profile the thread holding the GIL (Python frames only) instead of native frames")
    parser.add_argument("--before-tree", type=Path, metavar="DIR",
                        help="also measure a runtime and a router running this source tree's code (e.g. a "
                             "checkout of the commit before a change), interleaved with ours, in a cluster "
                             "of their own")
    parser.add_argument("--netns-delays", metavar="MS,MS,...",
                        help="measure across hosts (network namespaces) at each of these delays per link, "
                             "e.g. 0,0.2,0.5,1 (needs root; see loadtest.scenarios.hop_netns)")
    parser.add_argument("--netns-method", choices=("auto", "netem", "relay"), default="auto",
                        help="how --netns-delays holds frames: tc netem, a TAP relay, or netem where the kernel "
                             "has it (default)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.netns_delays is not None:
        from loadtest.scenarios import hop_netns

        try:
            delays = hop_netns.parse_delays(args.netns_delays)
        except ValueError as exc:
            parser.error(f"--netns-delays {exc}")
        return hop_netns.scenario_main(args, delays)
    args.profile_process = args.profile_process or ["router"]
    if args.before_tree is not None and not (args.before_tree / "mesh" / "__init__.py").is_file():
        parser.error(f"--before-tree {args.before_tree}: no mesh package there")
    prepare_benchmark_process()
    foreign = ForeignLoad()
    log("training the model...")
    model_dir = Path(tempfile.mkdtemp(prefix="mesh-bench-models-"))
    import shutil

    import uvloop

    try:
        model = train_logistic(MODEL_ID, model_dir, n_features=256, seed=256)
        with Cluster() as cluster, contextlib.ExitStack() as stack:
            log("starting runtime, router, echo server and naive proxy...")
            servers = {"runtime": cluster.start_runtime(capacity_bytes=256 * 2**20)}
            servers["router"] = cluster.start_router()
            servers["echo"] = cluster.start_echo()
            if not args.no_naive:
                servers["naive"] = cluster.start_naive_proxy(servers["runtime"].endpoint)
            if args.before_tree is not None:
                log(f"starting a runtime and a router of {args.before_tree}...")
                other = stack.enter_context(Cluster())
                env = {"PYTHONPATH": str(args.before_tree.resolve()), "PYTHONSAFEPATH": "1"}
                servers["runtime-before"] = other.start_runtime("runtime-before", capacity_bytes=256 * 2**20,
                                                                extra_env=env)
                servers["router-before"] = other.start_router("router-before", extra_env=env)
            result = uvloop.run(run(args, cluster, model, servers))
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    result["machine"]["foreign_load"] = foreign.result()
    markdown = render(result)
    for profile in result["profile"].values():
        profile.pop("text", None)
    emit(args, result, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
