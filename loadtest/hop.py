"""Hop overhead: what the router adds between a client and a runtime (issue 2, target 1).

``python -m loadtest.hop [--duration S] [--warmup S] [--concurrency N] [--profile-seconds S] [--json]``

Method. One private etcd, one runtime, one router and one bare grpc.aio echo server
(``loadtest.echo_server``), each a separate process on 127.0.0.1, started as ``mesh up`` starts
them. The model is a scikit-learn LogisticRegression over 256 features trained here on synthetic
data; its request is one FP32 row sent raw, 1,052 bytes serialized. The load generator is this
process: a closed-loop grpc.aio client on uvloop with the request pre-encoded (``loadtest.load``),
one channel per server, the model chosen by the ``mm-model-id`` header on both paths. After a
warm-up (the first request loads the model; then we wait until the router's view shows the copy
loaded, so routed requests take the steady-state path), each phase runs ``--duration`` seconds
after ``--warmup`` seconds of unmeasured traffic:

1. direct c=1 and routed c=1: latency p50/p99; added p50 = routed p50 - direct p50;
2. direct c=N and routed c=N (N=32): throughput; ratio = routed / direct;
3. echo c=N: 1 KB (the same request bytes) echoed by the bare server.

CPU per request is the process's user+system CPU (psutil, all threads) over the measured part of
a phase divided by the requests answered in it; the measured part begins and ends with nothing in
flight. Router CPU per forwarded request comes from phase 2 (routed), the echo server's from
phase 3, both at c=N.

Then, unless ``--profile-seconds 0``, the router is profiled under routed c=N load with py-spy
(Python frames without pausing the process, then native frames, which pauses it at each sample),
in extra phases that are not part of the measured numbers.

Caveats. Everything shares this machine's cores (two on the reference machine): the client, the
router and the runtime compete for CPU, so the routed throughput is bounded by the sum of the three
processes' CPU per request, not by the router alone, and the direct path has one process fewer to
feed. The client is itself Python and costs about as much CPU per request as a server; its CPU is
reported too. Numbers are from one run; run-to-run spread on a shared VM is several percent.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from loadtest import profile as prof
from loadtest.cluster import Cluster, Server, raise_on_sigterm
from loadtest.echo_server import METHOD as ECHO_METHOD
from loadtest.load import PhaseResult, bytes_call, closed_loop
from loadtest.management import register, wait_loaded
from loadtest.models import TrainedModel, infer_body, train_logistic
from loadtest.report import dump_json, machine, machine_line, table, verdict
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.runtime.tensors import decode_response

INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_ID = "hop-lr-256"

TARGET_ADDED_P50_MS = 0.55
TARGET_CPU_RATIO = 2.0
TARGET_THROUGHPUT_RATIO = 0.45


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class CpuMeter:
    """CPU seconds of some processes between ``start`` and ``stop`` (used as phase hooks)."""

    def __init__(self, **procs: psutil.Process) -> None:
        self.procs = procs
        self._before: dict[str, float] = {}
        self.used: dict[str, float] = {}

    @staticmethod
    def _cpu(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    def start(self) -> None:
        self._before = {k: self._cpu(p) for k, p in self.procs.items()}

    def stop(self) -> None:
        self.used = {k: self._cpu(p) - self._before[k] for k, p in self.procs.items()}


async def _phase(call: grpc.aio.UnaryUnaryMultiCallable, body: bytes, md: tuple[tuple[str, str], ...],
                 name: str, concurrency: int, args: argparse.Namespace,
                 meter: CpuMeter | None = None) -> PhaseResult:
    log(f"phase {name} (c={concurrency}, {args.warmup:g} s warm-up + {args.duration:g} s)")
    result = await closed_loop(call, body, md, name=name, concurrency=concurrency,
                               duration_s=args.duration, warmup_s=args.warmup,
                               on_start=meter.start if meter else None,
                               on_end=meter.stop if meter else None)
    if meter is not None and result.requests:
        for k, used in meter.used.items():
            result.extra[f"{k}_cpu_ms_per_req"] = used / result.requests * 1000
    if result.errors:
        log(f"  errors: {result.errors}")
    return result


async def _profile(call: grpc.aio.UnaryUnaryMultiCallable, body: bytes, md: tuple[tuple[str, str], ...],
                   router: Server, concurrency: int, seconds: float, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for native in (False, True):
        kind = "native" if native else "python"
        path = workdir / f"router-{kind}.raw"
        log(f"profiling the router ({kind} frames, {seconds:g} s under routed c={concurrency})")
        spy = prof.start_record(router.pid, path, duration_s=seconds, native=native)
        await asyncio.sleep(0.5)  # let py-spy attach before the load starts
        await closed_loop(call, body, md, name=f"profile-{kind}", concurrency=concurrency,
                          duration_s=seconds, warmup_s=0)
        _, err = await asyncio.to_thread(spy.communicate, timeout=seconds + 30)
        if spy.returncode != 0 or not path.exists():
            out[kind] = {"error": (err or b"").decode(errors="replace").strip()[-500:]}
            log(f"  py-spy failed: {out[kind]['error']}")
            continue
        summary = prof.parse_raw(path.read_text(errors="replace"))
        out[kind] = {"samples": summary.samples,
                     "self": [(f, round(p, 1)) for f, _, p in summary.top(20, by="self")],
                     "total": [(f, round(p, 1)) for f, _, p in summary.top(25, by="total")]}
        out[kind + "_text"] = prof.format_top(summary, 20)
    return out


async def run(args: argparse.Namespace, cluster: Cluster, model: TrainedModel,
              runtime: Server, router: Server, echo: Server) -> dict[str, Any]:
    body = infer_body(model)
    md = (("mm-model-id", MODEL_ID),)
    options = [("grpc.max_receive_message_length", 16 * 2**20)]
    async with grpc.aio.insecure_channel(router.endpoint, options=options) as to_router, \
            grpc.aio.insecure_channel(runtime.endpoint, options=options) as to_runtime, \
            grpc.aio.insecure_channel(echo.endpoint, options=options) as to_echo:
        await register(mm_grpc.ModelMeshStub(to_router), MODEL_ID, str(model.path))
        routed, direct, echoed = bytes_call(to_router, INFER), bytes_call(to_runtime, INFER), \
            bytes_call(to_echo, ECHO_METHOD)
        started = time.perf_counter()
        first = await routed(body, metadata=md, timeout=60)  # loads the model on the runtime
        first_ms = (time.perf_counter() - started) * 1000
        await wait_loaded(mm_grpc.ModelMeshStub(to_router), MODEL_ID)
        import joblib

        expected = joblib.load(model.path).predict(model.sample)
        for raw in (first, await direct(body, metadata=md, timeout=10)):
            got = decode_response(pb.ModelInferResponse.FromString(raw))["predict"]
            if not np.array_equal(got, expected):
                raise RuntimeError(f"wrong answer from the mesh: {got} != {expected}")
        assert await echoed(body, timeout=10) == body

        me = psutil.Process()
        c = args.concurrency
        phases = {
            "direct_c1": await _phase(direct, body, md, "direct c=1", 1, args),
            "routed_c1": await _phase(routed, body, md, "routed c=1", 1, args),
            "direct_cN": await _phase(direct, body, md, f"direct c={c}", c, args,
                                      CpuMeter(runtime=runtime.ps, client=me)),
            "routed_cN": await _phase(routed, body, md, f"routed c={c}", c, args,
                                      CpuMeter(router=router.ps, runtime=runtime.ps, client=me)),
            "echo_cN": await _phase(echoed, body, (), f"echo c={c}", c, args,
                                    CpuMeter(echo=echo.ps, client=me)),
        }
        profile: dict[str, Any] = {}
        if args.profile_seconds > 0:
            if prof.available():
                profile = await _profile(routed, body, md, router, c, args.profile_seconds, cluster.workdir)
            else:
                profile = {"error": "py-spy is not installed (pip install py-spy)"}
    p = phases
    added = p["routed_c1"].p(50) - p["direct_c1"].p(50)
    router_cpu = p["routed_cN"].extra.get("router_cpu_ms_per_req", float("nan"))
    echo_cpu = p["echo_cN"].extra.get("echo_cpu_ms_per_req", float("nan"))
    ratio = p["routed_cN"].throughput_rps / p["direct_cN"].throughput_rps
    return {
        "machine": machine(),
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "concurrency": c,
                     "request_bytes": len(body), "first_request_ms": round(first_ms, 1)},
        "phases": {k: v.summary() for k, v in phases.items()},
        "targets": {
            "added_p50_ms": {"value": round(added, 3), "target": f"<= {TARGET_ADDED_P50_MS}",
                             "met": added <= TARGET_ADDED_P50_MS},
            "router_cpu_vs_echo": {"value": round(router_cpu / echo_cpu, 2), "target": f"<= {TARGET_CPU_RATIO}",
                                   "router_cpu_ms_per_req": round(router_cpu, 4),
                                   "echo_cpu_ms_per_req": round(echo_cpu, 4),
                                   "met": router_cpu / echo_cpu <= TARGET_CPU_RATIO},
            "throughput_ratio": {"value": round(ratio, 3), "target": f">= {TARGET_THROUGHPUT_RATIO}",
                                 "met": ratio >= TARGET_THROUGHPUT_RATIO},
        },
        "profile": profile,
    }


def render(result: dict[str, Any]) -> str:
    ph = result["phases"]
    rows = []
    for key in ("direct_c1", "routed_c1", "direct_cN", "routed_cN", "echo_cN"):
        s = ph[key]
        rows.append([s["name"], s["requests"], s["throughput_rps"], s["p50_ms"], s["p99_ms"],
                     s.get("client_cpu_ms_per_req", float("nan")),
                     s.get("runtime_cpu_ms_per_req", float("nan")),
                     s.get("router_cpu_ms_per_req", s.get("echo_cpu_ms_per_req", float("nan")))])
    t = result["targets"]
    out = [machine_line(result["machine"]), "",
           table(["phase", "requests", "req/s", "p50 ms", "p99 ms", "client CPU ms/req",
                  "runtime CPU ms/req", "router (echo) CPU ms/req"], rows), "",
           table(["target", "measured", "target", "verdict"], [
               ["added p50 latency, c=1 (ms)", t["added_p50_ms"]["value"], t["added_p50_ms"]["target"],
                verdict(t["added_p50_ms"]["met"])],
               ["router CPU per forwarded request / echo server's", t["router_cpu_vs_echo"]["value"],
                t["router_cpu_vs_echo"]["target"], verdict(t["router_cpu_vs_echo"]["met"])],
               ["routed / direct throughput, c=" + str(result["settings"]["concurrency"]),
                t["throughput_ratio"]["value"], t["throughput_ratio"]["target"],
                verdict(t["throughput_ratio"]["met"])],
           ])]
    for kind in ("python", "native"):
        text = result["profile"].get(kind + "_text")
        if text:
            out += ["", f"router profile ({kind} frames):", text]
        elif kind in result["profile"]:
            out += ["", f"router profile ({kind} frames): {result['profile'][kind]}"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.hop", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per phase (default 8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each phase")
    parser.add_argument("--concurrency", type=int, default=32, help="workers in the throughput phases")
    parser.add_argument("--profile-seconds", type=float, default=5.0,
                        help="seconds of py-spy per profile of the router (0: no profile)")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args(argv)
    raise_on_sigterm()
    log("training the model...")
    model = train_logistic(MODEL_ID, Path(tempfile.mkdtemp(prefix="mesh-bench-models-")),
                           n_features=256, seed=256)
    import uvloop

    with Cluster() as cluster:
        try:
            log("starting runtime, router and echo server...")
            runtime = cluster.start_runtime(capacity_bytes=256 * 2**20)
            router = cluster.start_router()
            echo = cluster.start_echo()
            result = uvloop.run(run(args, cluster, model, runtime, router, echo))
        finally:
            import shutil

            shutil.rmtree(model.path.parent, ignore_errors=True)
    print(render(result))
    if args.json:
        result["profile"] = {k: v for k, v in result["profile"].items() if not k.endswith("_text")}
        print(dump_json(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
