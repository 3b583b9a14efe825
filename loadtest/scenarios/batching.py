"""Dynamic batching in runtimes (issue 17, target: batching a small model at c=32 gives at least 2x
the unbatched throughput, with p99 within the max wait plus 5 ms of the unbatched p99).

``python -m loadtest.scenarios.batching [--rounds R] [--duration S] [--concurrency C]
[--max-size N] [--max-wait-ms W] [--workers K] [--out FILE.json] [--quick]``

Method. A small model: scikit-learn LogisticRegression on 16 FP32 features
(``loadtest.models.train_logistic``), one row per request. For each configuration in turn, batching
off (``runtime.batch_max_size`` 0) then on (``N`` rows, ``W`` ms; the order alternates between
rounds), a fresh private etcd, one runtime and one router, real processes on 127.0.0.1
(``loadtest.cluster``), and ``mesh-loadtest`` in closed loop at ``C`` outstanding requests
(3 s warm-up, ``S`` seconds measured). Reported per run: throughput, p50 and p99 latency, errors;
overall: the median over rounds of on/off throughput, and of on p99 minus off p99, against the
target. ``--quick`` is a seconds-long run for the tests (its numbers mean nothing). ``--workers K``
runs the model in K model worker processes (``runtime.workers``): unbatched, each request then
also crosses to the worker and back; batched, a batch crosses once (merged in the runtime). The
workers' CPU is reported apart from the runtime process's (``workers_cpu_ms_per_request``).

Caveat: the client, the router and the runtime share the machine's cores. Batching saves only the
runtime's per-request work on the model (thread hand-off, input checks, one predict call per
request); the router's and the client's per-request work stay, so where they hold most of the CPU
the gain is bounded well below what a runtime on its own cores would show.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from loadtest.cluster import Cluster
from loadtest.models import train_logistic

N_FEATURES = 16


def one_run(path: Path, *, batch_max_size: int, batch_max_wait_ms: float, concurrency: int,
            duration: float, warmup: float, workers: int = 0) -> dict[str, Any]:
    with Cluster(log_level="warning") as cluster:
        runtime = cluster.start_runtime("runtime", extra_env={"MESH_RUNTIME_BATCH_MAX_SIZE": str(batch_max_size),
                                                    "MESH_RUNTIME_BATCH_MAX_WAIT_MS": str(batch_max_wait_ms),
                                                    "MESH_RUNTIME_WORKERS": str(workers)})
        router = cluster.start_router()
        servers = {"runtime": runtime, "router": router}
        cpu = {name: server.cpu_seconds() for name, server in servers.items()}
        # Model workers (--workers) are the runtime's children, started with it: their CPU is
        # where the model runs, shown apart from the runtime process's.
        pool = runtime.ps.children(recursive=True) if workers else []
        cpu["workers"] = _tree_seconds(pool)
        busy, client, started = _busy_seconds(), _children_seconds(), time.monotonic()
        out = subprocess.run(
            ["mesh-loadtest", "--target", router.endpoint, "--models", "1", "--model-prefix", "small",
             "--register", str(path), "--input-shape", f"1,{N_FEATURES}", "--concurrency", str(concurrency),
             "--duration", str(duration), "--warmup", str(warmup), "--timeout", "10", "--json"],
            capture_output=True, text=True, timeout=duration + warmup + 240)
        if out.returncode != 0:
            raise RuntimeError(f"mesh-loadtest failed: {out.stderr.strip()[-500:]}")
        result = json.loads(out.stdout)
        # CPU per request over warm-up and measured time (requests of the warm-up estimated at the
        # measured rate): where batching saves work, and where the rest of it goes.
        wall = time.monotonic() - started
        used = {name: server.cpu_seconds() - cpu[name] for name, server in servers.items()}
        used["workers"] = _tree_seconds(pool) - cpu["workers"]
        client = _children_seconds() - client
        # Cores that processes other than ours (runtime, router, client) kept busy: noise.
        others = max(0.0, (_busy_seconds() - busy - sum(used.values()) - client) / wall)
        served = max(1.0, result["ok"] * (duration + warmup) / duration)
        cpu_ms = {f"{name}_cpu_ms_per_request": round(used[name] * 1000 / served, 3) for name in used}
        cpu_ms["client_cpu_ms_per_request"] = round(client * 1000 / served, 3)
        cpu_ms["other_processes_cores"] = round(others, 2)
    latency = result["latency_ms"]
    return {"batch_max_size": batch_max_size, "batch_max_wait_ms": batch_max_wait_ms, "workers": workers,
            "throughput_rps": round(float(result["throughput_rps"]), 1),
            "p50_ms": round(float(latency["p50"]), 2), "p99_ms": round(float(latency["p99"]), 2),
            "errors": result.get("errors") or {}, **cpu_ms}


def _tree_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for p in processes:
        try:
            t = p.cpu_times()
        except psutil.Error:  # a worker that ended (restarted) since: its time is lost to the count
            continue
        total += t.user + t.system
    return total


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


def _children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def summarize(runs: list[dict[str, Any]], max_wait_ms: float) -> dict[str, Any]:
    off = [r for r in runs if r["batch_max_size"] <= 1]
    on = [r for r in runs if r["batch_max_size"] > 1]
    speedups = [b["throughput_rps"] / a["throughput_rps"] for a, b in zip(off, on, strict=True)]
    p99_over = [b["p99_ms"] - a["p99_ms"] for a, b in zip(off, on, strict=True)]
    speedup, over = statistics.median(speedups), statistics.median(p99_over)
    return {"speedup": {"per_round": [round(x, 2) for x in speedups], "median": round(speedup, 2),
                        "target": 2.0, "met": speedup >= 2.0},
            "p99_over_unbatched_ms": {"per_round": [round(x, 2) for x in p99_over], "median": round(over, 2),
                                      "bound": max_wait_ms + 5, "met": over <= max_wait_ms + 5}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.scenarios.batching",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of off and on (default 3)")
    parser.add_argument("--duration", type=float, default=15, help="measured seconds per run (default 15)")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop requests (default 32)")
    parser.add_argument("--max-size", type=int, default=32, help="runtime.batch_max_size when on (default 32)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="runtime.batch_max_wait_ms (default 2)")
    parser.add_argument("--workers", type=int, default=0,
                        help="runtime.workers: model worker processes (default 0: models in the runtime)")
    parser.add_argument("--out", help="write the report as JSON to this file")
    parser.add_argument("--quick", action="store_true", help="one short round (for the tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, warmup = 1, 2.0, 0.5
    else:
        warmup = 3.0
    if args.rounds < 1 or args.duration <= 0 or args.concurrency < 1 or args.max_size < 2 or args.workers < 0:
        print("error: --rounds and --concurrency at least 1, --duration positive, --max-size at least 2, "
              "--workers at least 0", file=sys.stderr)
        return 2
    runs: list[dict[str, Any]] = []
    load_before = round(os.getloadavg()[0], 2)  # other processes on a shared machine: the noise
    with tempfile.TemporaryDirectory(prefix="mesh-batching-bench-") as tmp:
        model = train_logistic("small", Path(tmp), n_features=N_FEATURES, seed=0)
        for r in range(args.rounds):
            order = (0, args.max_size) if r % 2 == 0 else (args.max_size, 0)
            for size in order:
                run = one_run(model.path, batch_max_size=size, batch_max_wait_ms=args.max_wait_ms,
                              concurrency=args.concurrency, duration=args.duration, warmup=warmup,
                              workers=args.workers)
                run["round"] = r + 1
                runs.append(run)
                print(f"round {r + 1}: batching {'on ' if size else 'off'}: {run['throughput_rps']:8.1f} req/s  "
                      f"p50 {run['p50_ms']:6.2f} ms  p99 {run['p99_ms']:6.2f} ms  CPU ms/request runtime "
                      f"{run['runtime_cpu_ms_per_request']:.3f}"
                      f"{' workers ' + format(run['workers_cpu_ms_per_request'], '.3f') if args.workers else ''} "
                      f"router {run['router_cpu_ms_per_request']:.3f} "
                      f"client {run['client_cpu_ms_per_request']:.3f}  others {run['other_processes_cores']} cores  "
                      f"errors {run['errors'] or 0}",
                      flush=True)
    ordered = sorted(runs, key=lambda x: (x["round"], x["batch_max_size"]))
    report = {"scenario": "batching", "concurrency": args.concurrency, "duration_s": args.duration,
              "workers": args.workers, "load_average_1m_before": load_before,
              "load_average_1m_after": round(os.getloadavg()[0], 2),
              "model": f"sklearn LogisticRegression, {N_FEATURES} FP32 features, 1 row per request",
              "max_size": args.max_size, "max_wait_ms": args.max_wait_ms, "cpus": os.cpu_count(),
              "runs": ordered, **summarize(ordered, args.max_wait_ms)}
    print(f"throughput on/off per round {report['speedup']['per_round']}, median {report['speedup']['median']} "
          f"(target 2.0); p99 on - off median {report['p99_over_unbatched_ms']['median']} ms "
          f"(bound {report['p99_over_unbatched_ms']['bound']} ms)")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
