"""Fan-out: many routers watching one etcd while placements churn (issue 22, part 3).

``python -m loadtest.scenarios.fanout [--routers 8[,N...]] [--rates 100,500,1000] [--seconds S]
[--runtimes R] [--preload P] [--load-ms L] [--routes-interval S] [--proxy] [--grouped] [--idle S]
[--settle S] [--json] [--out FILE]``

Method. One private etcd and ``--routers`` router processes (8), started as ``mesh up`` starts them
(``loadtest.cluster``). Placement churn comes from ``loadtest.churn``, a process of its own that
writes what ``R`` (100) runtimes publish when copies load and go, through one etcd request per
record as a runtime does (its docstring says why it is synthetic: 500 real loads a second do not
fit two cores; routers see the same keys, values, order and grouping). ``P`` (2,000) copies are
loaded first; then for each rate in ``--rates`` (churn events a second, an event being a load or
an eviction, alternating) the writer runs ``--seconds`` (15) on an open-loop schedule.

Each router is observed from outside through its route stream (``loadtest.route_probe``: one
``watchRoutes`` stream per router, acknowledged after each update as the smart client does): a
load shows as its model appearing with a copy, an eviction as it going. Before the first step
every stream must show exactly the preloaded copies. Per step:

* *delivered*: the watch events etcd sent (``etcd_debugging_mvcc_events_total``; every router
  watches all of ``placements/`` and ``instances/``, so it should be the writes times the routers,
  shown beside it), per second of the step;
* *CPU per event*: etcd's per event it delivered and per write, the routers' (together) per event
  they received, from their CPU times (``psutil``) over the step and its settling, in
  microseconds; and per churn event (etcd's, one router's);
* *time to every router*: for each route change, the last router's stream arrival minus the time
  the writer sent the write to etcd (so it includes etcd's commit), p50 / p99 / max; the same for
  one router (every router's arrivals pooled); and the writes' own round trip. A change not seen
  by every router within ``--settle`` seconds after the step is *missing* (the run fails).

``--proxy`` puts etcd's gRPC proxy (``etcd grpc-proxy start``) between the routers and etcd: it
coalesces their identical watches into one (etcd then delivers each event once), at the cost of
the proxy's own CPU (shown). ``--routers 8,1`` runs the rates with 8 routers, then stops all but
one and runs them again: two router counts separate etcd's cost per write from its cost per
delivered event (BENCHMARKS.md, section 23).

Caveats. Everything shares the machine's cores (two here): etcd, the routers, the writer and this
process. What other processes used is reported; a busy machine shows in the latencies first. The
route stream adds the route hub's tick (``router.routes_interval_s``, 50 ms: the hub compares its
table with the view at most that often) to what the router's own routing sees; ``--routes-interval``
sets it on the routers, to measure without it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import psutil

from loadtest.cluster import Cluster, Server, etcd_metrics, prepare_benchmark_process
from loadtest.load import percentile_ms
from loadtest.report import ForeignLoad, add_output_args, emit, error_line, machine, machine_line, table
from loadtest.route_probe import RouteProbe
from loadtest.scenarios.router_memory import log
from mesh.procs import die_with_parent
from mesh.registry.etcd_server import find_etcd_binary

SUITE_ARGS: list[str] = ["--routers", "8", "--rates", "500", "--seconds", "10"]
SUITE_SECONDS: int = 60

TARGET_P99_MS = 100.0
TARGET_ROUTERS = 8
TARGET_RATE = 500
SYNC_TIMEOUT_S = 60.0
ETCD_COUNTERS = ("etcd_debugging_mvcc_events_total", "etcd_debugging_mvcc_slow_watcher_total",
                 "etcd_debugging_mvcc_pending_events_total")


class ScenarioError(RuntimeError):
    """The measurement cannot go on (the message is the one line printed)."""




def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


class Writer:
    """The churn process (``loadtest.churn``): JSON lines in, JSON lines out."""

    def __init__(self, cluster: Cluster, args: argparse.Namespace) -> None:
        log_path = cluster.workdir / "churn.log"
        with open(log_path, "ab") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "loadtest.churn", "--registry", cluster.registry_url,
                 "--runtimes", str(args.runtimes), "--preload", str(args.preload), "--load-ms", str(args.load_ms),
                 *(["--grouped"] if args.grouped else [])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, start_new_session=True,
                preexec_fn=die_with_parent())
        self.server = Server("churn", proc, log_path)
        self._lines: asyncio.Queue[bytes] | None = None
        cluster.servers.append(self.server)  # stopped (SIGTERM, then SIGKILL) with the others, before etcd

    async def read(self, timeout_s: float) -> dict[str, Any]:
        if self._lines is None:
            # A daemon thread reads the pipe: a read cut off by the timeout must not leave a thread
            # of the event loop's executor blocked (the loop waits for those when it closes).
            self._lines = asyncio.Queue()
            threading.Thread(target=self._pump, args=(asyncio.get_running_loop(), self._lines),
                             daemon=True, name="churn-stdout").start()
        line = await asyncio.wait_for(self._lines.get(), timeout_s)
        if not line:
            proc = self.server.proc
            raise ScenarioError(f"the churn writer exited (code {proc.poll()}): {self.server.log_tail(5)}")
        message: dict[str, Any] = json.loads(line)
        return message

    def _pump(self, loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[bytes]) -> None:
        stdout = self.server.proc.stdout
        assert stdout is not None
        while True:
            line = stdout.readline()  # b"" at EOF: passed on too (the writer has exited)
            try:
                loop.call_soon_threadsafe(lines.put_nowait, line)
            except RuntimeError:  # the loop is closed: nobody reads any more
                return
            if not line:
                return

    def stop(self) -> None:
        """EOF on its stdin: it revokes its leases (its copies and instances leave the registry)
        and exits; SIGTERM, then SIGKILL, if it does not within the grace period."""
        proc = self.server.proc
        if proc.stdin is not None and not proc.stdin.closed:
            try:
                proc.stdin.close()
            except OSError:
                pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            self.server.stop()

    def send(self, command: dict[str, Any]) -> None:
        proc = self.server.proc
        assert proc.stdin is not None
        proc.stdin.write((json.dumps(command) + "\n").encode())
        proc.stdin.flush()


def start_grpc_proxy(cluster: Cluster) -> str:
    """``--proxy``: etcd's gRPC proxy (``etcd grpc-proxy start``, the same binary) in front of the
    cluster's etcd; returns its address. It coalesces watches of one key range from many clients
    into one watch on etcd (etcd's op-guide, "gRPC proxy"): the routers then cost etcd one watcher."""
    with socket.socket() as probe:  # a port free a moment ago (the proxy fails at once if it was taken)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = cluster.workdir / "grpc-proxy.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [str(find_etcd_binary()), "grpc-proxy", "start", "--endpoints", cluster.etcd.endpoint,
             "--listen-addr", f"127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=die_with_parent())
    server = Server("grpc-proxy", proc, log_path, endpoint=f"127.0.0.1:{port}")
    cluster.servers.append(server)  # stopped with the others, before etcd
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server.endpoint
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ScenarioError(f"etcd's grpc-proxy did not start: {server.log_tail(3)}") from None
            time.sleep(0.05)  # polling a child's port: there is no event to wait on


def _q(values_s: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile_ms(values_s, 50), 2), "p99_ms": round(percentile_ms(values_s, 99), 2),
            # p99.9: with independent routers, the p99 of the slowest of 8 is about one router's p99.87
            "p999_ms": round(percentile_ms(values_s, 99.9), 2),
            "max_ms": round(max(values_s) * 1000, 2) if values_s else float("nan")}


class Fanout:
    def __init__(self, args: argparse.Namespace, cluster: Cluster, routers: list[Server], writer: Writer) -> None:
        self.args = args
        self.cluster = cluster
        self.routers = routers  # the ones running now
        self.writer = writer
        self.etcd = psutil.Process(cluster.etcd.pid)
        self.probes: list[RouteProbe] = []
        self.loaded: set[str] = set()  # the copies etcd holds (the writer's word), when no step runs
        self.idle_cores: dict[str, float] = {}

    async def open_probes(self) -> None:
        self.probes = [RouteProbe(r.name, r.endpoint) for r in self.routers]
        for probe in self.probes:
            probe.start()
        deadline = time.monotonic() + SYNC_TIMEOUT_S
        while not all(p.synced.is_set() and p.loaded() == self.loaded for p in self.probes):
            broken = [f"{p.name}: {p.error}" for p in self.probes if p.error]
            if broken:
                raise ScenarioError(f"a route stream ended: {broken[0]}")
            if time.monotonic() > deadline:
                counts = {p.name: len(p.loaded()) for p in self.probes}
                raise ScenarioError(f"route streams do not show the {len(self.loaded):,} loaded copies "
                                    f"after {SYNC_TIMEOUT_S:g} s: {counts}")
            await asyncio.sleep(0.05)

    async def idle(self, seconds: float) -> dict[str, float]:
        """Cores each kind of process uses with no churn (streams open, heartbeats, lease renewals)."""
        cpu0 = self._cpu()
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - t0
        cpu1 = self._cpu()
        return {k: round((cpu1[k] - cpu0[k]) / elapsed, 4) for k in cpu0}

    async def close_probes(self) -> None:
        for probe in self.probes:
            await probe.close()
        self.probes = []

    def _cpu(self) -> dict[str, float]:
        cpu = {"etcd": _cpu(self.etcd), "routers": sum(r.cpu_seconds() for r in self.routers),
               "writer": self.writer.server.cpu_seconds(), "probe": _cpu(psutil.Process())}
        proxy = next((s for s in self.cluster.servers if s.name == "grpc-proxy"), None)
        if proxy is not None:
            cpu["grpc_proxy"] = proxy.cpu_seconds()
        return cpu

    def _arrivals(self, change: list[Any]) -> list[float | None]:
        model, kind = change[0], change[1]
        return [(p.appeared if kind == "load" else p.went).get(model) for p in self.probes]

    async def step(self, rate: float, tag: str) -> dict[str, Any]:
        args = self.args
        log(f"{len(self.routers)} routers, {rate:g} churn events/s for {args.seconds:g} s...")
        counters0 = await asyncio.to_thread(etcd_metrics, self.cluster.etcd.metrics_port, ETCD_COUNTERS)
        cpu0 = self._cpu()
        busy0 = psutil.cpu_times()
        t0 = time.monotonic()
        self.writer.send({"rate": rate, "seconds": args.seconds, "tag": tag})
        reply = (await self.writer.read(args.seconds * 4 + 60))["step"]
        churn_s = time.monotonic() - t0
        changes: list[list[Any]] = reply["changes"]
        self.loaded = set(reply["loaded"])
        # Until every change reached every stream (the last ones first: cheap to check). Arrival
        # times were noted by the probes as updates came; this poll only decides when to stop.
        deadline = time.monotonic() + args.settle
        for tail in (changes[-200:], changes):
            while time.monotonic() < deadline and not all(None not in self._arrivals(c) for c in tail):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # the events' tail (instance records) reaches the routers
        window_s = time.monotonic() - t0
        cpu1 = self._cpu()
        busy1 = psutil.cpu_times()
        counters1 = await asyncio.to_thread(etcd_metrics, self.cluster.etcd.metrics_port, ETCD_COUNTERS)

        # After settling, every stream should show exactly the copies etcd holds.
        differ = [p.name for p in self.probes if p.loaded() != self.loaded]
        to_all, to_one, missing = [], [], 0
        for change in changes:
            arrivals = self._arrivals(change)
            sent = change[4]
            seen = [a for a in arrivals if a is not None]
            to_one.extend(a - sent for a in seen)
            if len(seen) < len(arrivals):
                missing += 1
            else:
                to_all.append(max(seen) - sent)
        writes = sum(reply["writes"].values())
        delivered = counters1[ETCD_COUNTERS[0]] - counters0[ETCD_COUNTERS[0]]
        cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
        busy = sum(getattr(busy1, f) - getattr(busy0, f) for f in ("user", "nice", "system", "irq", "softirq"))
        per_event = max(delivered, 1)
        received = writes * len(self.routers)  # what the routers' watches brought: every write, each
        result = {
            "routers": len(self.routers), "rate": rate, "tag": tag,
            "events": reply["events"], "route_changes": len(changes),
            "churn_per_s": round(reply["events"] / churn_s, 1), "seconds": round(churn_s, 2),
            "window_s": round(window_s, 2), "writer_max_lag_ms": reply["max_lag_ms"],
            "writes": reply["writes"], "writes_per_s": round(writes / churn_s, 1),
            "delivered": int(delivered), "expected_delivered": received,
            "delivered_per_s": round(delivered / churn_s, 1),
            "slow_watchers": counters1[ETCD_COUNTERS[1]],
            "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
            "cores": {**{k: round(v / window_s, 3) for k, v in cpu.items()},
                      "machine": round(busy / window_s, 3)},
            "etcd_us_per_event": round(cpu["etcd"] * 1e6 / per_event, 2),
            "router_us_per_event": round(cpu["routers"] * 1e6 / max(received, 1), 2),
            # the same above what they use idle (measured before the steps, for this many routers)
            "etcd_us_per_event_net": round((cpu["etcd"] - self.idle_cores["etcd"] * window_s) * 1e6 / per_event, 2),
            "router_us_per_event_net": round((cpu["routers"] - self.idle_cores["routers"] * window_s) * 1e6
                                             / max(received, 1), 2),
            "etcd_us_per_write": round(cpu["etcd"] * 1e6 / max(writes, 1), 2),
            # per route change (a churn event): etcd's, and one router's (the routers' together / N)
            "etcd_us_per_churn": round(cpu["etcd"] * 1e6 / max(len(changes), 1), 1),
            "router_us_per_churn": round(cpu["routers"] * 1e6 / max(len(changes), 1) / len(self.routers), 1),
            "to_all": _q(to_all), "to_one": _q(to_one), "missing": missing, "routes_differ": differ,
            "write_rtt": _q([ms / 1000 for ms in reply["write_ms"]]),
            "stream_errors": [f"{p.name}: {p.error}" for p in self.probes if p.error],
            "stream_resets": sum(p.resets for p in self.probes) - len(self.probes),
        }
        log(f"  delivered {result['delivered_per_s']:,.0f} events/s; to all routers p50 "
            f"{result['to_all']['p50_ms']} ms, p99 {result['to_all']['p99_ms']} ms; missing {missing}")
        return result

    async def shrink(self, keep: int) -> None:
        """Stop routers past the first ``keep`` (SIGTERM, waited for): fewer watchers on etcd."""
        await self.close_probes()
        gone, self.routers = self.routers[keep:], self.routers[:keep]
        for server in gone:
            await asyncio.to_thread(server.stop)
        await asyncio.sleep(1.0)
        await self.open_probes()


async def run(args: argparse.Namespace, cluster: Cluster, routers: list[Server], writer: Writer) -> dict[str, Any]:
    async with asyncio.timeout(args.time_limit):
        ready = (await writer.read(120))["ready"]
        fan = Fanout(args, cluster, routers, writer)
        fan.loaded = set(ready["preloaded"])
        steps: list[dict[str, Any]] = []
        idle: list[dict[str, Any]] = []
        try:
            for n_index, count in enumerate(args.routers):
                if n_index:
                    log(f"stopping routers down to {count}...")
                    await fan.shrink(count)
                else:
                    await fan.open_probes()
                fan.idle_cores = await fan.idle(args.idle)
                idle.append({"routers": count, "cores": fan.idle_cores})
                log(f"  idle: {fan.idle_cores}")
                for r_index, rate in enumerate(args.rates):
                    steps.append(await fan.step(rate, f"r{count}x{r_index}"))
        finally:
            await fan.close_probes()
    return {"machine": machine(),
            "settings": {"routers": args.routers, "rates": args.rates, "seconds": args.seconds,
                         "runtimes": args.runtimes, "preload": args.preload, "load_ms": args.load_ms,
                         "grouped": args.grouped, "proxy": args.proxy,
                         "routes_interval_s": args.routes_interval, "settle_s": args.settle, "idle_s": args.idle},
            "pids": {"routers": [r.pid for r in routers], "etcd": cluster.etcd.pid, "writer": writer.server.pid},
            "idle": idle, "steps": steps}


def problems(result: dict[str, Any]) -> list[str]:
    out = []
    for s in result["steps"]:
        where = f"{s['routers']} routers at {s['rate']:g}/s"
        if s["missing"]:
            out.append(f"{where}: {s['missing']} route changes did not reach every router")
        if s["routes_differ"]:
            out.append(f"{where}: routes differ from the registry's copies on {s['routes_differ']}")
        if s["stream_errors"]:
            out.append(f"{where}: route streams ended: {s['stream_errors']}")
    if result.get("survivors"):
        out.append(f"processes survived: {result['survivors']}")
    return out


def render(result: dict[str, Any]) -> str:
    rows, lat = [], []
    for s in result["steps"]:
        rows.append([s["routers"], f"{s['rate']:g}", s["churn_per_s"], s["writes_per_s"], s["delivered_per_s"],
                     f"{s['delivered']:,} / {s['expected_delivered']:,}",
                     f"{s['etcd_us_per_event']:.1f} ({s['etcd_us_per_event_net']:.1f})", s["etcd_us_per_write"],
                     f"{s['router_us_per_event']:.1f} ({s['router_us_per_event_net']:.1f})",
                     s["cores"]["etcd"], s["cores"]["routers"], s["cores"].get("grpc_proxy", "-"),
                     s["cores"]["writer"], s["cores"]["machine"]])
        lat.append([s["routers"], f"{s['rate']:g}", s["route_changes"],
                    f"{s['to_all']['p50_ms']:.1f} / {s['to_all']['p99_ms']:.1f} / {s['to_all']['max_ms']:.1f}",
                    f"{s['to_one']['p50_ms']:.1f} / {s['to_one']['p99_ms']:.1f}",
                    f"{s['write_rtt']['p50_ms']:.2f} / {s['write_rtt']['p99_ms']:.2f}",
                    s["writer_max_lag_ms"], s["missing"], s["stream_resets"], int(s["slow_watchers"])])
    settings = result["settings"]
    idle = "; ".join(f"{i['routers']} routers: etcd {i['cores']['etcd']:.3f}, routers {i['cores']['routers']:.3f}"
                     for i in result["idle"])
    lines = [machine_line(result["machine"]), "",
             f"{settings['runtimes']} simulated runtimes, {settings['preload']:,} loaded copies, "
             f"{settings['seconds']:g} s per step; a churn event is a load (LOADING, then LOADED "
             f"{settings['load_ms']:g} ms later) or an eviction. CPU in µs per watch event etcd delivered (etcd) "
             "and per event the routers received (routers; in brackets: above the idle use); cores over the "
             "step and its settling" + (", etcd's grpc-proxy's among the machine's" if settings["proxy"] else "")
             + ":", "",
             table(["routers", "churn/s asked", "churn/s", "writes/s", "events delivered/s",
                    "delivered / writes x routers", "etcd µs/event", "etcd µs/write", "router µs/event",
                    "etcd cores", "routers cores", "grpc-proxy cores", "writer cores", "machine cores"], rows), "",
             f"Idle, cores ({settings['idle_s']:g} s before the steps, streams open): {idle}.", "",
             "A route change (a copy appearing or going), from the write sent to etcd to the route streams, ms:", "",
             table(["routers", "churn/s", "changes", "to every router p50 / p99 / max", "to one router p50 / p99",
                    "etcd write p50 / p99", "writer lag max ms", "missing", "stream resyncs", "etcd slow watchers"],
                   lat)]
    target = [s for s in result["steps"] if s["routers"] == TARGET_ROUTERS and s["rate"] == TARGET_RATE]
    if target:
        p99 = target[0]["to_all"]["p99_ms"]
        lines += ["", f"Target: p99 to all of {TARGET_ROUTERS} routers under {TARGET_P99_MS:g} ms at {TARGET_RATE} "
                  f"churn events/s: {p99:.1f} ms, {'met' if p99 < TARGET_P99_MS else 'MISSED'}."]
    return "\n".join(lines)


def _numbers(text: str, kind: type) -> list[Any]:
    try:
        return [kind(v.replace("_", "")) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"a comma list of numbers: {err}") from None


def _alive(pid: int) -> bool:
    try:
        return pid > 0 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.scenarios.fanout", description=__doc__.splitlines()[0])
    parser.add_argument("--routers", type=lambda t: _numbers(t, int), default=[8],
                        help="router processes; a decreasing list (8,1) reruns the rates with fewer (default 8)")
    parser.add_argument("--rates", type=lambda t: _numbers(t, float), default=[100.0, 500.0, 1000.0],
                        help="churn events per second, one step each (default 100,500,1000)")
    parser.add_argument("--seconds", type=float, default=15.0, help="churn per step, seconds (default 15)")
    parser.add_argument("--runtimes", type=int, default=100, help="simulated runtime instances (default 100)")
    parser.add_argument("--preload", type=int, default=2_000, help="copies loaded before the churn (default 2,000)")
    parser.add_argument("--load-ms", type=float, default=20.0, help="LOADING to LOADED per load, ms (default 20)")
    parser.add_argument("--routes-interval", type=float, default=None,
                        help="router.routes_interval_s on the routers (default: theirs, 0.05)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="after a step, how long changes may take to reach every router (default 5 s)")
    parser.add_argument("--grouped", action="store_true",
                        help="the writer writes each runtime flush as one etcd transaction (a proposed "
                             "publisher change; runtimes today write one key per request)")
    parser.add_argument("--proxy", action="store_true",
                        help="routers reach etcd through etcd's gRPC proxy (it coalesces their watches); "
                             "the writer writes to etcd directly")
    parser.add_argument("--idle", type=float, default=3.0,
                        help="seconds without churn, measured before the steps (default 3)")
    parser.add_argument("--time-limit", type=float, default=900.0, help="give up after this many seconds (default 900)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if not args.routers or any(n < 1 for n in args.routers) or args.routers != sorted(set(args.routers), reverse=True):
        parser.error("--routers must be positive and decreasing (e.g. 8 or 8,1)")
    if not args.rates or any(r <= 0 for r in args.rates):
        parser.error("--rates must be positive (e.g. 100,500,1000)")
    if args.seconds <= 0 or args.runtimes < 1 or args.settle < 0:
        parser.error("--seconds must be positive, --runtimes at least 1, --settle not negative")
    if args.preload < max(args.rates):
        # A copy lives preload / (rate / 2) seconds: at least 2 s, so that a model's appearance and
        # its eviction never fall in one tick of a router's route hub.
        parser.error(f"--preload must be at least the highest rate ({max(args.rates):g}): copies must live 2 s")
    prepare_benchmark_process()
    foreign = ForeignLoad()
    import uvloop

    cluster: Cluster | None = None
    try:
        cluster = Cluster()
        with cluster:
            env = {} if args.routes_interval is None else {"MESH_ROUTER_ROUTES_INTERVAL_S": str(args.routes_interval)}
            if args.proxy:
                env["MESH_REGISTRY_URL"] = f"etcd://{start_grpc_proxy(cluster)}"
                log(f"routers watch through etcd's grpc-proxy at {env['MESH_REGISTRY_URL']}")
            log(f"starting {args.routers[0]} routers...")
            routers = [cluster.start_router(f"router-{i}", extra_env=env) for i in range(args.routers[0])]
            log(f"starting the churn writer ({args.runtimes} runtimes, {args.preload:,} copies)...")
            writer = Writer(cluster, args)
            try:
                result = uvloop.run(run(args, cluster, routers, writer))
            finally:
                writer.stop()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except TimeoutError:
        print(f"error: not finished within --time-limit {args.time_limit:g} s", file=sys.stderr)
        return 1
    except Exception as err:  # one line, never a traceback: the servers are stopped by now
        print(error_line(err), file=sys.stderr)
        return 1
    result["survivors"] = [p for p in [s.pid for s in cluster.servers] + [cluster.etcd.pid or 0] if _alive(p)]
    result["machine"]["foreign_load"] = foreign.result()
    emit(args, result, render(result))
    wrong = problems(result)
    if wrong:
        print(f"error: {'; '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

