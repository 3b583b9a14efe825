"""REST against gRPC through the same router: what the REST front end adds, for JSON and binary tensors.

``python -m loadtest.scenarios.rest [--duration S] [--rounds R] [--warmup S] [--concurrency N]
[--json]``

Method. One private etcd, one runtime and one router, each a process on 127.0.0.1 started as ``mesh
up`` starts them (``loadtest.cluster``); the router's REST front end on a free port (its URL read
from the router's log). The model is a scikit-learn LogisticRegression over 256 features trained
here (as in ``loadtest.scenarios.hop``); the request is one FP32 row [1, 256], 1 KiB of tensor data,
and the answer one INT64 label. The same request goes to the router three ways, each encoded once
before the clock starts:

- *gRPC*: ``ModelInfer`` with the ``ModelInferRequest`` bytes (``raw_input_contents``), the model
  in ``model_name``, no header. The router passes the bytes through.
- *REST JSON*: ``POST /v2/models/{m}/infer`` with the V2 JSON body (``data``: 256 numbers as text,
  about 5 KB), the answer in JSON. The router parses the JSON and builds the protobuf both ways
  (``mesh.rest.codec``).
- *REST binary*: the same endpoint with Triton's binary tensor extension: a short JSON header with
  ``binary_data_size`` 1024, then the 1024 raw bytes (``Inference-Header-Content-Length``), and the
  output asked back binary (``binary_data_output``, as ``tritonclient.http`` asks).

The model is chosen by its name (body or path) on every way, with no header. The clients run in
this process (never in a server) on uvloop, one gRPC channel (``grpc.aio``, bytes in and out, no
serializers) and one aiohttp session (keep-alive) for the whole run, and one closed loop for all
three (``loadtest.peers.drive.measure``), so only the transport and its client differ. First each
way is checked to answer what the model itself predicts (which also loads the model; we wait until
the router's view shows the copy loaded).

Two blocks, each ``--rounds`` (4) interleaved rounds in alternating order (gRPC, REST JSON, REST
binary; then the reverse), so that drift on a shared machine hits every way alike; in a round each
way gets ``--warmup`` (0.5 s) of unmeasured traffic, then duration/rounds seconds measured (8 s per
way and block in all):

1. c=1: latency p50/p99; added p50 = REST p50 - gRPC p50, against the target of at most +0.3 ms;
2. c=N (16): closed-loop throughput, REST / gRPC, and CPU per request of the router and the runtime
   (user+system, all threads, over the measured segments, which begin and end with nothing in
   flight), so the router's cost for the conversion shows apart from the clients'.

Caveats. The client is part of every latency: aiohttp and grpc.aio cost different CPU per request
(the client's CPU per request is reported too), and on a small machine the client, the router and
the runtime share the cores. For the router's conversion alone, without any network or client, see
``loadtest.scenarios.rest_codec``. Other jobs on the machine disturb the numbers; the CPU they used
during the run is reported (``ForeignLoad``). Numbers are from one run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from loadtest.cluster import Cluster, Server, prepare_benchmark_process
from loadtest.load import PhaseResult
from loadtest.management import register, wait_loaded
from loadtest.models import TrainedModel, infer_body, train_logistic
from loadtest.peers.drive import Send, grpc_send, http_send, http_session, measure, v2_json_body
from loadtest.report import ForeignLoad, add_output_args, emit, error_line, machine, machine_line, table, verdict
from loadtest.scenarios.hop import CpuMeter
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.tensors import decode_response

INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_ID = "rest-lr-256"
N_FEATURES = 256  # FP32 [1, 256]: 1 KiB of tensor data
TARGET_ADDED_P50_MS = 0.3  # REST p50 at c=1 at most this much over gRPC's


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Way:
    """One way to send the request: its closed-loop sender and its encoded size."""

    name: str
    send: Send
    request_bytes: int


def binary_body(model: TrainedModel) -> tuple[bytes, int]:
    """Triton's binary tensor request for the sample: (body, length of its JSON header)."""
    raw = np.ascontiguousarray(model.sample, dtype="<f4").tobytes()
    header = json.dumps({
        "inputs": [{"name": "input", "shape": list(model.sample.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
    }).encode()
    return header + raw, len(header)


def _rest_answer(status: int, headers: Any, body: bytes) -> np.ndarray:
    """The ``predict`` output of a REST answer, JSON or binary."""
    if status != 200:
        raise RuntimeError(f"REST answered {status}: {body[:300]!r}")
    length = headers.get("Inference-Header-Content-Length")
    head = json.loads(body if length is None else body[:int(length)])
    pos = 0 if length is None else int(length)
    for out in head["outputs"]:
        size = (out.get("parameters") or {}).get("binary_data_size")
        if out["name"] == "predict":
            if size is None:
                return np.asarray(out["data"])
            dtype = {"INT64": "<i8", "INT32": "<i4", "FP32": "<f4", "FP64": "<f8"}[out["datatype"]]
            return np.frombuffer(body[pos:pos + size], dtype=dtype)
        pos += size or 0
    raise RuntimeError(f"no 'predict' output in {head}")


async def interleaved(ways: list[Way], concurrency: int, args: argparse.Namespace,
                      procs: dict[str, psutil.Process]) -> dict[str, PhaseResult]:
    """``args.rounds`` rounds; in each, every way gets one segment of duration/rounds seconds after
    its own warm-up, in alternating order; a way's segments are summed into one result, with CPU
    per request of ``procs`` over its measured segments."""
    seg = args.duration / args.rounds
    results: dict[str, PhaseResult] = {}
    meters = {w.name: CpuMeter(**procs) for w in ways}
    log(f"c={concurrency}: {', '.join(w.name for w in ways)}; {args.rounds} rounds of "
        f"{args.warmup:g} s warm-up + {seg:g} s each")
    for r in range(args.rounds):
        for w in (ways if r % 2 == 0 else ways[::-1]):
            meter = meters[w.name]

            async def start(meter: CpuMeter = meter) -> None:
                meter.start()

            res = await measure(f"{w.name} c={concurrency}", w.send, 1, concurrency=concurrency,
                                duration_s=seg, warmup_s=args.warmup, rps=None,
                                max_in_flight=concurrency, order=None, proc=None, on_measure=start)
            meter.stop()  # the closed loop has drained: nothing in flight
            if w.name in results:
                results[w.name].add(res)
            else:
                results[w.name] = res
    for w in ways:
        res, meter = results[w.name], meters[w.name]
        if res.requests:
            for k in procs:
                res.extra[f"{k}_cpu_ms_per_req"] = (meter.user[k] + meter.system[k]) / res.requests * 1000
        if res.errors:
            log(f"  {res.name}: errors {res.errors}")
    return results


def rest_url(router: Server) -> str:
    """The REST base URL the router logged (it was started with a REST port of 0)."""
    for event in router.events("router REST serving"):
        return str(event["url"])
    raise RuntimeError("the router logged no REST URL:\n" + router.log_tail())


async def run(args: argparse.Namespace, model: TrainedModel, runtime: Server,
              router: Server) -> dict[str, Any]:
    import joblib

    grpc_body = infer_body(model)
    json_body = v2_json_body(model.sample)
    bin_body, bin_header = binary_body(model)
    url = f"{rest_url(router)}/v2/models/{MODEL_ID}/infer"
    json_headers = {"Content-Type": "application/json"}
    bin_headers = {"Content-Type": "application/octet-stream",
                   "Inference-Header-Content-Length": str(bin_header)}
    expected = joblib.load(model.path).predict(model.sample)
    async with grpc.aio.insecure_channel(router.endpoint) as channel, \
            http_session(max(args.concurrency, 1)) as session:
        mesh = mm_grpc.ModelMeshStub(channel)
        await register(mesh, MODEL_ID, str(model.path))
        call = channel.unary_unary(INFER)
        started = time.perf_counter()
        raw = await call(grpc_body, timeout=60)  # loads the model on the runtime
        first_ms = (time.perf_counter() - started) * 1000
        await wait_loaded(mesh, MODEL_ID)  # every way now takes the loaded-copy path
        answers = {"gRPC": decode_response(pb.ModelInferResponse.FromString(raw))["predict"]}
        for name, body, headers in (("REST JSON", json_body, json_headers),
                                    ("REST binary", bin_body, bin_headers)):
            async with session.post(url, data=body, headers=headers) as resp:
                answers[name] = _rest_answer(resp.status, resp.headers, await resp.read())
        for name, got in answers.items():
            if not np.array_equal(np.asarray(got).ravel(), np.asarray(expected).ravel()):
                raise RuntimeError(f"wrong answer over {name}: {got} != {expected}")
        ways = [Way("gRPC", grpc_send(call, [grpc_body]), len(grpc_body)),
                Way("REST JSON", http_send(session, [(url, json_body, json_headers)]), len(json_body)),
                Way("REST binary", http_send(session, [(url, bin_body, bin_headers)]), len(bin_body))]
        procs = {"router": router.ps, "runtime": runtime.ps, "client": psutil.Process()}
        c = args.concurrency
        low = await interleaved(ways, 1, args, procs)
        high = await interleaved(ways, c, args, procs)
    phases = {f"{k} c=1": v.summary() for k, v in low.items()}
    phases.update({f"{k} c={c}": v.summary() for k, v in high.items()})
    grpc_p50 = low["gRPC"].p(50)
    targets = {}
    for name in ("REST JSON", "REST binary"):
        added = low[name].p(50) - grpc_p50
        targets[f"{name} added p50 ms, c=1"] = {"value": round(added, 3), "target": f"<= {TARGET_ADDED_P50_MS}",
                                                "met": added <= TARGET_ADDED_P50_MS}
    ratios = {f"{name} / gRPC req/s, c={c}": round(high[name].throughput_rps / high["gRPC"].throughput_rps, 3)
              if high["gRPC"].throughput_rps else None for name in ("REST JSON", "REST binary")}
    return {
        "machine": machine(),
        "settings": {"duration_s": args.duration, "rounds": args.rounds, "warmup_s": args.warmup,
                     "concurrency": c, "tensor": f"FP32 [1, {N_FEATURES}]",
                     "request_bytes": {w.name: w.request_bytes for w in ways},
                     "first_request_ms": round(first_ms, 1)},
        "phases": phases,
        "targets": targets,
        "throughput_ratios": ratios,
    }


def render(result: dict[str, Any]) -> str:
    sizes = result["settings"]["request_bytes"]
    rows = []
    for s in result["phases"].values():
        way = s["name"].rsplit(" c=", 1)[0]
        rows.append([s["name"], sizes.get(way, "-"), s["requests"], s["throughput_rps"], s["p50_ms"],
                     s["p99_ms"], sum(s["errors"].values()), s.get("router_cpu_ms_per_req", float("nan")),
                     s.get("runtime_cpu_ms_per_req", float("nan")), s.get("client_cpu_ms_per_req", float("nan"))])
    target_rows = [[name, t["value"], t["target"], verdict(t["met"])] for name, t in result["targets"].items()]
    target_rows += [[name, value if value is not None else float("nan"), "-", "reported"]
                    for name, value in result["throughput_ratios"].items()]
    st = result["settings"]
    return "\n".join([
        machine_line(result["machine"]), "",
        f"{st['tensor']} to one sklearn model through one router; c=1 and c={st['concurrency']}, "
        f"{st['duration_s']} s per way and block in {st['rounds']} interleaved rounds, each after "
        f"{st['warmup_s']} s warm-up", "",
        table(["way", "body bytes", "requests", "req/s", "p50 ms", "p99 ms", "errors",
               "router CPU ms/req", "runtime CPU ms/req", "client CPU ms/req"], rows), "",
        table(["target", "value", "target", "verdict"], target_rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.scenarios.rest",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0,
                        help="measured seconds per way and block, over all rounds (default 8)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="unmeasured seconds before each segment (default 0.5)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="closed-loop workers in the throughput block (default 16)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if not (0 < args.duration <= 600 and 1 <= args.rounds <= 100 and 0 <= args.warmup <= 60
            and 1 <= args.concurrency <= 1024):
        parser.error("need 0 < --duration <= 600, 1 <= --rounds <= 100, 0 <= --warmup <= 60, "
                     "1 <= --concurrency <= 1024")
    prepare_benchmark_process()
    foreign = ForeignLoad()
    import uvloop

    log("training the model...")
    model_dir = Path(tempfile.mkdtemp(prefix="mesh-bench-models-"))
    try:
        model = train_logistic(MODEL_ID, model_dir, n_features=N_FEATURES, seed=256)
        with Cluster() as cluster:
            log("starting a runtime and a router (gRPC and REST)...")
            runtime = cluster.start_runtime(capacity_bytes=256 * 2**20)
            # REST on a port the router picks (0), read back from its log: no race for a free port.
            router = cluster.start_router(extra_env={"MESH_ROUTER_REST_PORT": "0"})
            result = uvloop.run(run(args, model, runtime, router))
    except (RuntimeError, TimeoutError) as exc:
        sys.exit(error_line(exc))
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    result["machine"]["foreign_load"] = foreign.result()
    emit(args, result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
