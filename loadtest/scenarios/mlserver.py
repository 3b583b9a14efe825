"""MLServer behind the mesh against MLServer called directly (issue 13, target "through MLServer").

``python -m loadtest.scenarios.mlserver [--rounds R] [--duration S] [--concurrency N] [--json]``

Method. One MLServer 1.7.1 (PyPI, its own venv: loadtest/peers/setup.py; ``parallel_workers``
0, an empty repository, no loads at start-up), and one private etcd, one runtime with
``runtime.server = mlserver`` pointing at it and one router, separate processes on 127.0.0.1.
Two scikit-learn models, each registered 4 times (m0..m3): *small*, a LogisticRegression over 20
features (MLServer's own per-request cost dominates), and *forest*, a random forest of 200 trees,
depth 12 (a few MB; the prediction dominates). The mesh loads the copies into MLServer; then, for
``R`` rounds in alternating order, ``mesh-loadtest`` in closed loop (c=N, uniform over the 4 IDs,
1 s warm-up, ``S`` measured seconds) on two paths to the *same* MLServer process and models:

- *direct*: client -> MLServer, the model chosen by ``model_name`` (``--header none``);
- *mesh*: client -> router -> runtime -> MLServer, chosen by ``mm-model-id``.

The result is each path's throughput per round, and mesh / direct per round and its median.

Caveat: everything shares this machine's cores (two on the reference machine); the mesh path
runs two more Python processes (router and runtime) on the same cores as MLServer, so its ratio
on two cores is lower than where the mesh has cores of its own, as in a pod whose server
container has its own CPU limit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtest.cluster import Cluster

MODELS = 4


def train(directory: Path) -> dict[str, Path]:
    import joblib
    import numpy as np
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 20)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    paths = {"small": directory / "small" / "model.joblib", "forest": directory / "forest" / "model.joblib"}
    for name, model in (("small", LogisticRegression(max_iter=500)),
                        ("forest", RandomForestClassifier(n_estimators=200, max_depth=12, random_state=0, n_jobs=1))):
        paths[name].parent.mkdir(parents=True)
        joblib.dump(model.fit(x, y), paths[name])
    return paths


def drive(target: str, prefix: str, *, header: str, duration: float, concurrency: int,
          register: Path | None = None) -> float:
    argv = ["mesh-loadtest", "--target", target, "--models", str(MODELS), "--model-prefix", prefix,
            "--header", header, "--input-shape", "1,20", "--input-name", "input", "--popularity", "uniform",
            "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", "1", "--timeout", "30",
            "--json"]
    if register is not None:
        argv += ["--register", str(register)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 300)
    if out.returncode != 0:
        raise RuntimeError(f"mesh-loadtest failed: {out.stderr.strip()[-800:]}")
    result = json.loads(out.stdout)
    if result.get("errors"):
        raise RuntimeError(f"requests failed on {target} ({header}): {result['errors']}")
    return float(result["throughput_rps"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.scenarios.mlserver", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds of both paths (default 4)")
    parser.add_argument("--duration", type=float, default=8, help="measured seconds per run (default 8)")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop concurrency (default 16)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0 or args.concurrency < 1:
        print("error: --rounds and --concurrency must be at least 1 and --duration positive", file=sys.stderr)
        return 2
    from loadtest.peers import mlserver_app

    result: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="mesh-mlserver-bench-") as tmp:
        paths = train(Path(tmp) / "models")
        peer, repo = mlserver_app.start_empty(Path(tmp) / "mlserver")
        try:
            with Cluster(log_level="warning") as cluster:
                cluster.start_runtime("runtime", capacity_bytes=4 << 30, extra_env={
                    "MESH_RUNTIME_SERVER": "mlserver", "MESH_RUNTIME_SERVER_ADDRESS": peer.grpc_target,
                    "MESH_RUNTIME_SERVER_REPOSITORY": str(repo)})
                router = cluster.start_router()
                for name, path in paths.items():
                    prefix = f"{name}-"
                    # Registers and loads the 4 copies through the mesh (into MLServer).
                    drive(router.endpoint, prefix, header="mm-model-id", duration=2, concurrency=args.concurrency,
                          register=path)
                    runs: dict[str, list[float]] = {"direct": [], "mesh": []}
                    for r in range(args.rounds):
                        order = ("direct", "mesh") if r % 2 == 0 else ("mesh", "direct")
                        for path_name in order:
                            target, header = ((peer.grpc_target, "none") if path_name == "direct"
                                              else (router.endpoint, "mm-model-id"))
                            rps = drive(target, prefix, header=header, duration=args.duration,
                                        concurrency=args.concurrency)
                            runs[path_name].append(rps)
                            print(f"{name} round {r + 1}: {path_name}: {rps:.1f} req/s", flush=True)
                    ratios = [m / d for d, m in zip(runs["direct"], runs["mesh"], strict=True)]
                    result[name] = {"req_per_s": runs, "mesh_over_direct": {
                        "per_round": [round(x, 2) for x in ratios], "median": round(statistics.median(ratios), 2),
                        "target": 0.8}}
                    print(f"{name}: mesh / direct per round {result[name]['mesh_over_direct']['per_round']}; "
                          f"median {result[name]['mesh_over_direct']['median']} (target 0.8)", flush=True)
        finally:
            peer.stop()
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
