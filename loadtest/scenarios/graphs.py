"""Inference graphs (issue 17, target: a two-step Sequence costs at most the two models' own times
plus 1 ms at c=1).

``python -m loadtest.scenarios.graphs [--requests N] [--rounds R] [--rows K] [--out FILE.json] [--quick]``

Method. Two small scikit-learn models whose shapes chain (``a``: LinearRegression 4 -> 3 outputs,
FP64 [rows, 3]; ``b``: LinearRegression 3 -> 1), a private etcd, one runtime and one router as
separate processes on 127.0.0.1 (``loadtest.cluster``), and a graph ``seq``: a Sequence of ``a``
then ``b`` with ``data: $response``. One client thread, c=1, alternates two things, request by
request, so that noise on the shared cores falls on both alike:

- **graph**: one ModelInfer naming ``seq``; its latency as the client sees it;
- **direct**: ModelInfer to ``a`` through the router (``mm-model-id``), then to ``b`` with ``a``'s
  output as input; the sum of the two calls' latencies (the client's conversion between them is
  not counted: it is what the router does inside the graph, so the comparison favours direct).

Both models are loaded before measuring (a warm-up of ``N / 5`` of each). Reported per round:
p50, p90, p99 and mean of each, and graph minus direct at p50 and mean; overall the median of
the rounds' p50 differences against the 1 ms target. ``--quick`` is a seconds-long run for the
tests (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from loadtest.cluster import Cluster
from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.mmesh import graphs_pb2 as gp
from mesh.gen.mmesh import graphs_pb2_grpc as gp_grpc
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.tensors import decode_response, encode_request

W_A = np.array([[1.0, 0.5, -1.0], [2.0, 0.0, 1.0], [0.0, -1.5, 0.5], [1.0, 1.0, 1.0]])
W_B = np.array([0.5, -2.0, 1.0])
SPEC = {"nodes": {"root": {"routerType": "Sequence", "steps": [
    {"serviceName": "a"}, {"serviceName": "b", "data": "$response"}]}}}
TARGET_MS = 1.0


def train(directory: Path, name: str, weights: np.ndarray) -> Path:
    import joblib
    from sklearn.linear_model import LinearRegression

    x = np.random.default_rng(len(name)).normal(size=(64, weights.shape[0]))
    path = directory / name
    path.mkdir()
    joblib.dump(LinearRegression(fit_intercept=False).fit(x, x @ weights), path / "model.joblib")
    return path


def _stats(ms: list[float]) -> dict[str, float]:
    q = np.percentile(np.asarray(ms), [50, 90, 99])
    return {"p50": round(float(q[0]), 3), "p90": round(float(q[1]), 3), "p99": round(float(q[2]), 3),
            "mean": round(statistics.fmean(ms), 3)}


def measure(endpoint: str, paths: dict[str, Path], *, rounds: int, requests: int, rows: int) -> list[dict[str, Any]]:
    channel = grpc.insecure_channel(endpoint)
    try:
        mesh = mm_grpc.ModelMeshStub(channel)  # type: ignore[no-untyped-call]
        for name, path in paths.items():
            mesh.registerModel(mm.RegisterModelRequest(modelId=name, modelInfo=mm.ModelInfo(
                type="sklearn", path=str(path))), timeout=30)
        gp_grpc.ModelMeshGraphsStub(channel).setGraph(  # type: ignore[no-untyped-call]
            gp.SetGraphRequest(graphId="seq", specJson=json.dumps(SPEC)), timeout=30)
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer  # type: ignore[no-untyped-call]
        x = np.random.default_rng(0).normal(size=(rows, 4))
        graph_request = encode_request(model_name="seq", inputs={"x": x})
        a_request = encode_request(model_name="a", inputs={"x": x})
        expected = x @ W_A @ W_B

        def graph() -> float:
            started = time.perf_counter()
            response = infer(graph_request, timeout=30)
            took = (time.perf_counter() - started) * 1000
            np.testing.assert_allclose(decode_response(response)["predict"], expected, rtol=1e-6, atol=1e-6)
            return took

        def direct() -> tuple[float, float]:
            started = time.perf_counter()
            middle = infer(a_request, metadata=(("mm-model-id", "a"),), timeout=30)
            took_a = (time.perf_counter() - started) * 1000
            b_request = encode_request(model_name="b", inputs={"predict": decode_response(middle)["predict"]})
            started = time.perf_counter()
            response = infer(b_request, metadata=(("mm-model-id", "b"),), timeout=30)
            took_b = (time.perf_counter() - started) * 1000
            np.testing.assert_allclose(decode_response(response)["predict"], expected, rtol=1e-6, atol=1e-6)
            return took_a, took_b

        for _ in range(max(10, requests // 5)):  # loads both models, warms connections and caches
            graph()
            direct()
        results = []
        for r in range(rounds):
            g: list[float] = []
            a: list[float] = []
            b: list[float] = []
            for i in range(requests):
                # Alternate which goes first, so neither always follows the other.
                if i % 2 == 0:
                    g.append(graph())
                    ta, tb = direct()
                else:
                    ta, tb = direct()
                    g.append(graph())
                a.append(ta)
                b.append(tb)
            both = [x + y for x, y in zip(a, b, strict=True)]
            gs, ds = _stats(g), _stats(both)
            results.append({"round": r + 1, "graph_ms": gs, "direct_sum_ms": ds, "direct_a_ms": _stats(a),
                            "direct_b_ms": _stats(b),
                            "graph_minus_direct_p50_ms": round(gs["p50"] - ds["p50"], 3),
                            "graph_minus_direct_mean_ms": round(gs["mean"] - ds["mean"], 3)})
        return results
    finally:
        channel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.scenarios.graphs", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="graph requests (and direct pairs) per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1, help="rows per request (default 1)")
    parser.add_argument("--out", help="write the report as JSON to this file")
    parser.add_argument("--quick", action="store_true", help="one short round (for the tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.requests = 1, 40
    if args.rounds < 1 or args.requests < 10 or not 1 <= args.rows <= 10_000:
        print("error: --rounds at least 1, --requests at least 10, --rows 1 to 10000", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mesh-graphs-bench-") as tmp:
        paths = {"a": train(Path(tmp), "a", W_A), "b": train(Path(tmp), "b", W_B)}
        with Cluster(log_level="warning") as cluster:
            cluster.start_runtime("runtime")
            router = cluster.start_router()
            rounds = measure(router.endpoint, paths, rounds=args.rounds, requests=args.requests, rows=args.rows)
    for r in rounds:
        print(f"round {r['round']}: graph p50 {r['graph_ms']['p50']:.3f} ms p99 {r['graph_ms']['p99']:.3f} ms | "
              f"a + b p50 {r['direct_sum_ms']['p50']:.3f} ms p99 {r['direct_sum_ms']['p99']:.3f} ms "
              f"(a {r['direct_a_ms']['p50']:.3f}, b {r['direct_b_ms']['p50']:.3f}) | graph - direct: p50 "
              f"{r['graph_minus_direct_p50_ms']:+.3f} ms, mean {r['graph_minus_direct_mean_ms']:+.3f} ms", flush=True)
    over = statistics.median(r["graph_minus_direct_p50_ms"] for r in rounds)
    report = {"scenario": "graphs", "requests_per_round": args.requests, "rows": args.rows, "cpus": os.cpu_count(),
              "graph": "Sequence a -> b ($response)", "rounds": rounds,
              "graph_minus_direct_p50_ms": {"per_round": [r["graph_minus_direct_p50_ms"] for r in rounds],
                                            "median": round(over, 3), "target": TARGET_MS, "met": over <= TARGET_MS}}
    print(f"graph - (a + b) at p50, median of rounds: {over:+.3f} ms (target <= {TARGET_MS} ms: "
          f"{'met' if over <= TARGET_MS else 'NOT met'})")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
