"""``mesh-loadtest``: open- or closed-loop load against any KServe V2 gRPC endpoint.

``mesh-loadtest --target HOST:PORT [--client plain|smart]
(--rate R [--arrivals poisson|bursty:CV|trace] | --concurrency C)
[--models N --model-prefix P | --register PATH --type sklearn] [--popularity zipf:S|uniform|trace:FILE]
[--duration S] [--warmup S] [--processes P] [--metrics URL ...] [--json] [--plot FILE.png]``

Set-up happens before the clock starts: models are registered (``--register``), each model's request
is encoded once (random data of ``--input-shape``/``--datatype``, or of the shape and datatype the
first model's ModelMetadata gives), and the target is checked to answer. Then ``loadtest.driver``
sends; the cache hit ratio is the difference of two scrapes of ``--metrics`` around the measured
part (``loadtest.scrape``). A bad target or option is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
import numpy as np

from loadtest import arrivals
from loadtest.driver import Window, WorkerConfig, WorkerFailed, WorkerResult, start_delay_s
from loadtest.driver import run as run_driver
from loadtest.management import register
from loadtest.report import dump_json, table
from loadtest.scrape import CacheCounts, scrape
from mesh.errors import MeshError
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.tensors import encode_request, numpy_dtype

HEADERS = ("mm-model-id", "mm-vmodel-id", "none")
JSON_KEYS = ("target", "mode", "client", "settings", "requests", "ok", "dropped", "errors", "throughput_rps",
             "latency_ms", "cache", "timeline")


class UsageError(Exception):
    """Bad options, an unreachable target, a model that cannot be set up: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mesh-loadtest", description="Load generator for KServe V2 gRPC endpoints.")
    p.add_argument("--target", required=True, help="host:port of a V2 GRPCInferenceService")
    p.add_argument("--client", default="plain", choices=("plain", "smart"),
                   help="plain: every request to --target; smart: mesh.client.SmartClient, --target being a router "
                        "(loaded models straight to a runtime holding them, the router for the rest)")
    p.add_argument("--header", default="mm-model-id", choices=HEADERS,
                   help="how the model is chosen (none: ModelInferRequest.model_name only)")
    p.add_argument("--models", type=int, default=1, help="number of models (default 1)")
    p.add_argument("--model-prefix", default="model-", help="model IDs are PREFIX0..PREFIX{N-1}")
    p.add_argument("--register", metavar="PATH", help="register N copies of this model file first")
    p.add_argument("--type", default="sklearn", help="model type for --register (default sklearn)")
    p.add_argument("--input-shape", help="e.g. 1,4 (default: from the first model's metadata)")
    p.add_argument("--datatype", default=None, help="V2 datatype of the input (default FP32 or the metadata's)")
    p.add_argument("--input-name", default=None, help="input tensor name (default: metadata's, or 'input')")
    p.add_argument("--popularity", default="zipf:1.0", help="zipf:S | uniform | trace:FILE")
    p.add_argument("--rate", type=float, default=0.0, help="open loop: requests per second in all")
    p.add_argument("--arrivals", default="poisson", help="poisson | bursty:CV | trace (open loop)")
    p.add_argument("--concurrency", type=int, default=0, help="closed loop: outstanding requests in all")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    p.add_argument("--warmup", type=float, default=0.0, help="unmeasured seconds first (default 0)")
    p.add_argument("--max-inflight", type=int, default=10_000, help="open loop: cap per process; beyond it, drop")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request deadline in seconds")
    p.add_argument("--processes", type=int, default=1, help="worker processes sharing the load")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics", action="append", default=[], metavar="URL",
                   help="Prometheus /metrics of a router or runtime (repeatable): cache hit ratio")
    p.add_argument("--progress", action="store_true", help="progress line each second (default: if a TTY)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--plot", metavar="FILE.png", help="latency percentiles and hit ratio per second")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if (args.rate > 0) == (args.concurrency > 0):
        raise UsageError("give exactly one of --rate (open loop) and --concurrency (closed loop)")
    if args.arrivals == "trace" and not args.popularity.startswith("trace:"):
        raise UsageError("--arrivals trace needs --popularity trace:FILE")
    if args.duration <= 0 or args.warmup < 0 or args.processes < 1 or args.models < 1 or args.max_inflight < 1:
        raise UsageError("--duration, --models, --processes and --max-inflight must be positive")
    if ":" not in args.target:
        raise UsageError(f"--target {args.target!r}: expected host:port")
    return args


@dataclass
class Timeline:
    """Per-second figures for the progress line and the plot."""

    progress: bool
    tty: bool = False
    start_wall: float = 0.0
    seconds: list[dict[str, float]] = field(default_factory=list)
    cache: list[tuple[float, CacheCounts]] = field(default_factory=list)

    @property
    def lead(self) -> str:
        return "\r" if self.tty else ""

    @property
    def end(self) -> str:
        return "" if self.tty else "\n"

    def on_second(self, w: Window) -> None:
        row = {"t": float(w.second + 1), "sent": w.sent, "ok": w.ok, "errors": w.errors,
               **{f"{k}_ms": v for k, v in w.hist.summary_ms().items() if k in ("p50", "p90", "p99")}}
        self.seconds.append(row)
        if self.progress:
            p99 = row["p99_ms"]
            # on a terminal the line rewrites itself; elsewhere (a log file) one line per second
            print(f"{self.lead}{w.second + 1:5d} s  sent {w.sent:7,d}  ok {w.ok:7,d}  errors {w.errors:5,d}  "
                  f"rate {w.ok:7,d}/s  p99 {'n/a' if math.isnan(p99) else f'{p99:.2f} ms':>10}",
                  file=sys.stderr, end=self.end, flush=True)


async def _models(args: argparse.Namespace, channel: grpc.aio.Channel) -> tuple[list[str], arrivals.Trace | None]:
    trace = None
    if args.popularity.startswith("trace:"):
        try:
            trace = arrivals.read_trace(args.popularity.partition(":")[2])
        except (OSError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        return trace.ids, trace
    ids = [f"{args.model_prefix}{i}" for i in range(args.models)]
    if args.register:
        stub = mm_grpc.ModelMeshStub(channel)  # type: ignore[no-untyped-call]
        for model_id in ids:
            try:
                await register(stub, model_id, args.register, model_type=args.type)
            except grpc.aio.AioRpcError as err:
                raise UsageError(f"registering {model_id}: {err.code().name}: {err.details()}") from None
    return ids, trace


async def _input_spec(args: argparse.Namespace, channel: grpc.aio.Channel, model_id: str,
                      metadata: tuple[tuple[str, str], ...]) -> tuple[str, list[int], str]:
    name, datatype = args.input_name or "input", args.datatype or "FP32"
    if args.input_shape:
        try:
            shape = [int(d) for d in args.input_shape.split(",")]
        except ValueError:
            raise UsageError(f"--input-shape {args.input_shape!r}: expected integers like 1,4") from None
        return name, shape, datatype
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata",
                               request_serializer=pb.ModelMetadataRequest.SerializeToString,
                               response_deserializer=pb.ModelMetadataResponse.FromString)
    try:
        meta = await call(pb.ModelMetadataRequest(name=model_id), metadata=metadata, timeout=60)
    except grpc.aio.AioRpcError as err:
        raise UsageError(f"metadata of {model_id}: {err.code().name}: {err.details()} "
                         "(give --input-shape and --datatype)") from None
    if not meta.inputs:
        raise UsageError(f"model {model_id} declares no inputs: give --input-shape and --datatype")
    spec = meta.inputs[0]
    shape = [d if d > 0 else 1 for d in spec.shape] or [1]
    return args.input_name or spec.name, shape, args.datatype or spec.datatype


def _encode(ids: list[str], header: str, name: str, shape: list[int], datatype: str, seed: int
            ) -> tuple[list[bytes], list[tuple[tuple[str, str], ...]]]:
    try:
        dtype = numpy_dtype(datatype)
    except MeshError as exc:
        raise UsageError(f"--datatype {datatype}: {exc}") from None
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(shape) if dtype.kind == "f" else rng.integers(0, 2, shape)
    array = data.astype(dtype)
    bodies: list[bytes] = [encode_request(model_name=m, inputs={name: array}, raw=True).SerializeToString()
                           for m in ids]
    metadata: list[tuple[tuple[str, str], ...]] = [() if header == "none" else ((header, m),) for m in ids]
    return bodies, metadata


async def _sample_cache(urls: list[str], timeline: Timeline, begin_wall: float, every_s: float | None) -> None:
    """Scrape at the start of the measured part, then every ``every_s`` seconds (if given)."""
    await asyncio.sleep(max(begin_wall - time.time(), 0))
    while True:
        counts = await scrape(urls)
        if counts is not None:
            timeline.cache.append((time.time() - timeline.start_wall, counts))
        if every_s is None:
            return
        await asyncio.sleep(every_s)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Set up, run and summarize one load test (raises UsageError for what the user must fix)."""
    channel = grpc.aio.insecure_channel(args.target)
    try:
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout=5)
        except TimeoutError:
            raise UsageError(f"cannot connect to {args.target}") from None
        ids, trace = await _models(args, channel)
        md0: tuple[tuple[str, str], ...] = () if args.header == "none" else ((args.header, ids[0]),)
        name, shape, datatype = await _input_spec(args, channel, ids[0], md0)
    finally:
        await channel.close()
    bodies, metadata = _encode(ids, args.header, name, shape, datatype, args.seed)
    try:
        popularity = arrivals.parse_popularity(args.popularity, len(ids), trace)
        kind, cv = arrivals.parse_arrivals(args.arrivals)
    except arrivals.ScheduleError as exc:
        raise UsageError(str(exc)) from None
    cfg = WorkerConfig(target=args.target, bodies=bodies, metadata=metadata, popularity=popularity,
                       duration_s=args.duration, warmup_s=args.warmup, rate=args.rate, arrivals=kind, cv=cv,
                       concurrency=args.concurrency, trace=trace, max_inflight=args.max_inflight,
                       timeout_s=args.timeout, seed=args.seed, processes=args.processes, client=args.client)
    tty = sys.stderr.isatty()
    timeline = Timeline(progress=args.progress or tty, tty=tty)
    timeline.start_wall = start_wall = time.time() + start_delay_s(args.processes)
    sampler = None
    if args.metrics:
        sampler = asyncio.create_task(_sample_cache(args.metrics, timeline, timeline.start_wall + args.warmup,
                                                    1.0 if args.plot else None), name="loadtest-cache-sampler")
    try:
        result = await run_driver(cfg, timeline.on_second, start_wall)
    except WorkerFailed as exc:
        raise UsageError(str(exc)) from None
    finally:
        if sampler is not None:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
    if timeline.progress and tty:
        print(file=sys.stderr)
    before = timeline.cache[0][1] if timeline.cache else None
    after = await scrape(args.metrics) if args.metrics else None
    if after is not None:
        timeline.cache.append((time.time() - start_wall, after))
    return summarize(args, result, timeline, before, after, datatype, shape)


def summarize(args: argparse.Namespace, result: WorkerResult, timeline: Timeline, before: CacheCounts | None,
              after: CacheCounts | None, datatype: str, shape: list[int]) -> dict[str, Any]:
    cache: dict[str, Any] = {"hits": None, "misses": None, "hit_ratio": None}
    if before is not None and after is not None:
        delta = after - before
        cache = {"hits": int(delta.hits), "misses": int(delta.misses), "hit_ratio": delta.ratio}
    ratios = [(t, (b - a)) for (_, a), (t, b) in zip(timeline.cache, timeline.cache[1:], strict=False)]
    timeline_rows = list(timeline.seconds)
    for row in timeline_rows:
        # the cache sample that closes the same second (samples are about a second apart)
        row["hit_ratio"] = next((d.ratio for t, d in ratios if abs(t - row["t"]) < 0.6), math.nan)
    return {
        "target": args.target,
        "mode": "open" if args.rate > 0 else "closed",
        "client": {"kind": args.client, "paths": dict(sorted(result.paths.items()))},
        "settings": {"rate": args.rate, "arrivals": args.arrivals, "concurrency": args.concurrency,
                     "duration_s": args.duration, "warmup_s": args.warmup, "processes": args.processes,
                     "popularity": args.popularity, "header": args.header, "models": args.models,
                     "input_shape": shape, "datatype": datatype},
        "requests": result.sent, "ok": result.ok, "dropped": result.dropped,
        "errors": dict(sorted(result.errors.items())),
        "throughput_rps": result.ok / args.duration,
        "latency_ms": result.hist.summary_ms(),
        "cache": cache,
        "timeline": timeline_rows,
    }


def render(summary: dict[str, Any]) -> str:
    lat = summary["latency_ms"]
    ratio = summary["cache"]["hit_ratio"]
    rows: list[list[object]] = [
        ["mode", f"{summary['mode']} loop"], ["requests", summary["requests"]], ["ok", summary["ok"]],
        ["dropped (over --max-inflight)", summary["dropped"]],
        ["throughput (ok/s)", float(summary["throughput_rps"])],
        *([f"latency {k} (ms)", float(lat[k])] for k in ("p50", "p90", "p99", "p99.9", "max")),
        ["cache hit ratio", "n/a" if ratio is None or ratio != ratio else f"{ratio:.3f}"],
    ]
    paths = summary.get("client", {}).get("paths")
    if paths:  # --client smart: how its requests went
        rows.append(["smart client requests", ", ".join(f"{k} {v:,}" for k, v in paths.items())])
    errors = summary["errors"]
    out = [table(["figure", "value"], rows)]
    if errors:
        out += ["", table(["gRPC status", "errors"], sorted(errors.items()))]
    else:
        out.append("no errors")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        import uvloop

        summary = uvloop.run(run(args))
        if args.plot:
            from loadtest.plot import plot

            plot(summary, args.plot)
    except UsageError as exc:
        print(f"mesh-loadtest: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mesh-loadtest: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"mesh-loadtest: error: {exc}", file=sys.stderr)
        return 2
    print(dump_json(summary) if args.json else render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
