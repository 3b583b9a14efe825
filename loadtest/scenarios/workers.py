"""Model workers on several cores (issue 13, target "multi-core").

``python -m loadtest.scenarios.workers [--rounds R] [--duration S] [--json]``

Method. A CPU-heavy scikit-learn model (a random forest of 200 trees, depth 12, 20 features,
trained here, a few MB on disk), registered 4 times under different IDs so that the copies spread
over the workers. For each configuration in turn (``runtime.workers`` 1, then 2, then 0 for the
in-process runtime), repeated ``R`` times in alternating order: one private etcd, one runtime (8
inference threads) and one router, separate processes on 127.0.0.1, and ``mesh-loadtest`` in
closed loop (c=8, uniform over the 4 models, 3 s warm-up, ``S`` seconds measured). The result is
each configuration's throughput per round, and the ratio of 2 workers to 1.

Caveat: on a 2-core machine the client, the router and the runtime share the two cores with the
workers, so 2 workers cannot reach 2x; and which worker holds which copy depends on the order the
loads finish (2 and 2, or 3 and 1), which moves the result between rounds.
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


def train(directory: Path) -> Path:
    import joblib
    import numpy as np
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 20)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    model = RandomForestClassifier(n_estimators=200, max_depth=12, random_state=0, n_jobs=1).fit(x, y)
    path = directory / "rf.joblib"
    joblib.dump(model, path)
    return path


def one_run(path: Path, workers: int, duration: float) -> float:
    with Cluster(log_level="warning") as cluster:
        cluster.start_runtime("runtime", extra_env={"MESH_RUNTIME_WORKERS": str(workers),
                                                    "MESH_RUNTIME_INFERENCE_THREADS": "8"})
        router = cluster.start_router()
        out = subprocess.run(
            ["mesh-loadtest", "--target", router.endpoint, "--models", "4", "--model-prefix", "rf",
             "--register", str(path), "--input-shape", "1,20", "--popularity", "uniform", "--concurrency", "8",
             "--duration", str(duration), "--warmup", "3", "--json"],
            capture_output=True, text=True, timeout=duration + 240)
        if out.returncode != 0:
            raise RuntimeError(f"mesh-loadtest failed: {out.stderr.strip()[-500:]}")
        result = json.loads(out.stdout)
        if result.get("errors"):
            raise RuntimeError(f"requests failed: {result['errors']}")
        return float(result["throughput_rps"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.scenarios.workers", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three configurations (default 3)")
    parser.add_argument("--duration", type=float, default=15, help="measured seconds per run (default 15)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0:
        print("error: --rounds must be at least 1 and --duration positive", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mesh-workers-bench-") as tmp:
        path = train(Path(tmp))
        runs: dict[int, list[float]] = {1: [], 2: [], 0: []}
        for r in range(args.rounds):
            order = (1, 2, 0) if r % 2 == 0 else (0, 2, 1)
            for workers in order:
                rps = one_run(path, workers, args.duration)
                runs[workers].append(rps)
                print(f"round {r + 1}: workers={workers}: {rps:.1f} req/s", flush=True)
    ratios = [b / a for a, b in zip(runs[1], runs[2], strict=True)]
    median = round(statistics.median(ratios), 2)
    result = {"req_per_s": {str(k): v for k, v in runs.items()},
              "two_over_one": {"per_round": [round(x, 2) for x in ratios], "median": median, "target": 1.5}}
    print(f"2 workers / 1 worker, per round: {result['two_over_one']['per_round']}; "
          f"median {result['two_over_one']['median']} (target 1.5)")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
