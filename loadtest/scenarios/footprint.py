"""A runtime's memory with only scikit-learn models, libraries imported at start against when used
(issue 18, parts 1 and 2).

``python -m loadtest.scenarios.footprint [--models N] [--before-tree DIR] [--json]``

Method. One private etcd, one router and two runtimes, separate processes on 127.0.0.1, started as
``mesh up`` starts them, in the same run:

- *eager*: ``runtime.preload_types`` names every built-in type, so it imports torch, onnxruntime,
  xgboost, lightgbm, openvino and scikit-learn at start-up: what every runtime did before issue 18;
- *lazy*: the default, which imports a library at the first load of its type;
- *before* (with ``--before-tree DIR``): a runtime running another checkout's code, e.g. the commit
  before issue 18, to check that *eager* stands for it.

``N`` (20) small scikit-learn models (``LogisticRegression``, a few KB each) are registered through
the router. After 3 s the runtimes' memory is read with psutil (RSS, and USS: the pages only that
process holds): *idle*. Then each runtime is sent one inference per model, directly (the
``mm-model-id`` header, as the router sends it), one at a time, so each loads all ``N``: the first
request's latency includes the lazy runtime's import of scikit-learn, the others' are cold loads
of a type already imported (their median is shown). After 2 s the memory is read again: *loaded*.
From the runtimes' logs: what each library import cost (``model library imported``), and each
load's predicted and measured size (``model loaded``), for part 2's prediction error.

Target (issue 18): a runtime with only scikit-learn models registered idles at most 120 MB RSS.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import psutil

from loadtest.cluster import Cluster, Server, prepare_benchmark_process
from loadtest.management import register_many
from loadtest.models import TrainedModel, infer_body, train_logistic
from loadtest.report import ForeignLoad, add_output_args, emit, machine, machine_line, table, verdict
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc

INFER = "/inference.GRPCInferenceService/ModelInfer"
MB = 1e6
TARGET_IDLE_MB = 120.0
# Every built-in type: the start-up of a runtime before issue 18 (it imported them all).
ALL_TYPES = "sklearn,xgboost,lightgbm,onnx,openvino,torchscript"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def memory(proc: psutil.Process) -> dict[str, float]:
    info = proc.memory_full_info()
    return {"rss_mb": round(info.rss / MB, 1), "uss_mb": round(info.uss / MB, 1)}


async def _register(router: Server, models: list[TrainedModel]) -> None:
    async with grpc.aio.insecure_channel(router.endpoint) as channel:
        _, errors = await register_many(mm_grpc.ModelMeshStub(channel),  # type: ignore[no-untyped-call]
                                        [(m.model_id, str(m.path)) for m in models], in_flight=8)
    if errors:
        raise RuntimeError(f"registration failed: {errors}")


async def _load_all(runtime: Server, models: list[TrainedModel]) -> list[float]:
    """One inference per model, straight to the runtime, one at a time: each latency in ms."""
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(runtime.endpoint) as channel:
        call = channel.unary_unary(INFER)
        for m in models:
            started = time.perf_counter()
            await call(infer_body(m), metadata=(("mm-model-id", m.model_id),), timeout=120)
            latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def _predictions(runtime: Server) -> dict[str, Any]:
    loads = [(int(e["predicted_bytes"]), int(e["size_bytes"])) for e in runtime.events("model loaded")]
    if not loads:
        return {}
    return {"loads": len(loads), "mean_predicted_bytes": round(statistics.mean(p for p, _ in loads)),
            "mean_measured_bytes": round(statistics.mean(m for _, m in loads)),
            "mean_abs_error_bytes": round(statistics.mean(abs(p - m) for p, m in loads)),
            "median_ratio": round(statistics.median(p / m for p, m in loads), 3)}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    runs: dict[str, Any] = {}
    with Cluster() as cluster:
        models = [train_logistic(f"fp-{i:03d}", Path(cluster.workdir) / "models", n_features=16, seed=i)
                  for i in range(args.models)]
        log("starting the eager runtime (every library at start-up), the lazy one, and a router...")
        runtimes = {
            "eager": cluster.start_runtime("runtime-eager", extra_env={"MESH_RUNTIME_PRELOAD_TYPES": ALL_TYPES}),
            "lazy": cluster.start_runtime("runtime-lazy"),
        }
        if args.before_tree is not None:  # the code before issue 18 itself, from another checkout
            # PYTHONSAFEPATH: ``python -m`` would put the current directory (this checkout) first.
            runtimes["before"] = cluster.start_runtime("runtime-before", extra_env={
                "PYTHONPATH": str(args.before_tree.resolve()), "PYTHONSAFEPATH": "1"})
        router = cluster.start_router()
        uvloop.run(_register(router, models))
        time.sleep(3.0)
        for name, runtime in runtimes.items():
            runs[name] = {"idle": memory(runtime.ps)}
        for name, runtime in runtimes.items():
            log(f"{name}: loading {len(models)} models...")
            latencies = uvloop.run(_load_all(runtime, models))
            runs[name].update(first_request_ms=round(latencies[0], 1),
                              other_cold_requests_median_ms=round(statistics.median(latencies[1:]), 1)
                              if len(latencies) > 1 else float("nan"))
        time.sleep(2.0)
        for name, runtime in runtimes.items():
            runs[name]["loaded"] = memory(runtime.ps)
            runs[name]["imports"] = [{"type": e["model_type"], "when": e["when"], "seconds": e["seconds"],
                                      "rss_mb": round(int(e["rss_bytes"]) / MB, 1)}
                                     for e in runtime.events("model library imported")]
            runs[name]["prediction"] = _predictions(runtime)
    idle = runs["lazy"]["idle"]["rss_mb"]
    return {"machine": machine(), "settings": {"models": args.models}, "runs": runs,
            "target": {"lazy_idle_rss_mb": idle, "max_mb": TARGET_IDLE_MB, "met": idle <= TARGET_IDLE_MB}}


def render(result: dict[str, Any]) -> str:
    runs = result["runs"]
    rows = []
    labels = {"before": "before (--before-tree's code)", "eager": "eager (preload_types = every type)",
              "lazy": "lazy (issue 18's default)"}
    for name, label in labels.items():
        if name not in runs:
            continue
        r = runs[name]
        rows.append([label, r["idle"]["rss_mb"], r["idle"]["uss_mb"], r["loaded"]["rss_mb"], r["loaded"]["uss_mb"],
                     r["first_request_ms"], r["other_cold_requests_median_ms"]])
    imports = table(["runtime", "library", "when", "import s", "RSS growth MB"], [
        [name, i["type"], i["when"], i["seconds"], i["rss_mb"]] for name in runs for i in runs[name]["imports"]])
    predictions = table(["runtime", "loads", "mean predicted B", "mean measured B", "mean |error| B",
                         "median predicted / measured"], [
        [name, p.get("loads", 0), p.get("mean_predicted_bytes", 0), p.get("mean_measured_bytes", 0),
         p.get("mean_abs_error_bytes", 0), p.get("median_ratio", float("nan"))]
        for name in runs for p in [runs[name]["prediction"]]])
    t = result["target"]
    return "\n".join([
        machine_line(result["machine"]), "",
        f"{result['settings']['models']} scikit-learn models registered; each runtime then loads them all, "
        "one request at a time, straight to it", "",
        table(["runtime", "idle RSS MB", "idle USS MB", "loaded RSS MB", "loaded USS MB", "first request ms",
               "other cold requests, median ms"], rows), "",
        imports, "", predictions, "",
        table(["target", "measured", "target", "verdict"], [
            ["lazy runtime idle RSS, only sklearn models registered (MB)", t["lazy_idle_rss_mb"],
             f"<= {t['max_mb']:g}", verdict(t["met"])]]),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.scenarios.footprint",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=20, help="scikit-learn models to register (default 20)")
    parser.add_argument("--before-tree", type=Path, metavar="DIR",
                        help="also run a runtime from this source tree (a checkout of the code before issue 18, "
                             "e.g. `git worktree add DIR <commit>`), put first on its PYTHONPATH")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if not 1 <= args.models <= 1000:
        parser.error(f"--models must be 1 to 1000, got {args.models}")
    if args.before_tree is not None and not (args.before_tree / "mesh" / "__init__.py").is_file():
        parser.error(f"--before-tree {args.before_tree}: no mesh package there")
    prepare_benchmark_process()
    foreign = ForeignLoad()
    result = bench(args)
    result["machine"]["foreign_load"] = foreign.result()
    emit(args, result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
