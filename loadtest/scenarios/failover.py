"""Failover: what clients see when a runtime dies under load (issue 7).

``python -m loadtest.scenarios.failover [--runtimes R] [--models N] [--rate RPS] [--duration S]
[--kill-at S] [--signal kill|term ...] [--popularity uniform|zipf:S] [--logs DIR] [--json]``

Method. One private etcd, ``R`` (3) runtimes and one router, each a separate process on 127.0.0.1
(``loadtest.cluster``, started as ``mesh up`` starts them). ``N`` (50) small scikit-learn
LogisticRegressions (``loadtest.models``) are registered through the router and warmed: one request
each, then we wait until the registry has a loaded placement for every model and the router's view
shows it loaded, so that the load starts on the steady-state path. The warm-up sends one model at a
time, so that each lands on its rendezvous-hashing home (with several cold loads in flight, bounded
load moves models away from the runtime busy importing scikit-learn, and the homes come out uneven).
Where the copies are (copies per model, models per instance) is read from the registry's
``placements/`` keys.

The load is ``mesh-loadtest``'s driver (``loadtest.driver``, in this process, one worker): open-loop
Poisson arrivals at ``--rate`` (300/s) for ``--duration`` (30 s), every model equally likely by default
(``--popularity uniform``; ``zipf:S`` makes a few models hot, which also gives them extra copies), a
10 s deadline per request, latencies measured from each request's intended send time. At ``--kill-at``
(duration/3) the runtime holding the most loaded copies is sent SIGKILL (``--signal kill``) or
SIGTERM (``--signal term``, a graceful shutdown), by the PID of the process we started; repeat
``--signal`` for one run per signal, each on a fresh cluster.

While and after the load, the registry is read every 0.1 s: when the dead instance's record and its
last placement disappear (a SIGKILLed instance's lease expires after ``lease_ttl_s``, mesh/settings.py;
a graceful one revokes its lease after draining), and when every model again has a loaded copy on a
surviving instance. After the load we keep watching until all three have happened (at most lease TTL
+ 15 s after the kill), then send one request per model through the router (every model must
answer), and read the survivors' published load counters.

Reported per run: requests, ok and errors by status code as the client saw them; the router's own
count of ModelInfer answers by code before and after the kill (its Prometheus histogram, scraped just
before the signal and after the load: this is how errors are split by code around the kill); a
per-second timeline (sent, ok, errors, p50, p99) around the kill; p99 over the whole seconds before the
kill against p99 from the first whole second after recovery (recovery: the dead instance gone from
the registry and every model loaded on a survivor) to the end; the registry times above against the
lease TTL; the models that lost their only copy and how many of them were loaded again on survivors.

Caveats. The client, the router, the runtimes and etcd share the machine's cores; the CPU other jobs
used is reported. A second's latencies are those of the requests that *completed* in it; its sent
count is by intended send time. The router-side codes include requests of the final probe, not of the
warm-up. With uniform popularity, copy scaling by rate adds no copies (6 requests/s per model against
a threshold of 33), so the victim holds about 1/R of the models as their only copy: the worst case for
its clients; the survivors' load counters count every load after the kill, including copies added
by the queue threshold when the machine is slow. A SIGKILLed instance's keys go when etcd expires
its lease, between TTL minus the keep-alive period and TTL after its last keep-alive, so a little
under the TTL after the kill. One run per signal, on one machine: the figures say what happens, not
how often.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from loadtest import arrivals
from loadtest.cluster import Cluster, Server, prepare_benchmark_process
from loadtest.driver import Window, WorkerConfig, WorkerFailed, start_delay_s
from loadtest.driver import run as run_driver
from loadtest.histogram import Histogram
from loadtest.load import bytes_call
from loadtest.management import register_many, wait_loaded
from loadtest.models import TrainedModel, infer_body, train_logistic
from loadtest.report import ForeignLoad, add_output_args, emit, error_line, machine, machine_line, table
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.registry import open_store
from mesh.registry.base import KVStore
from mesh.registry.keys import Keys
from mesh.registry.records import LOADED, InstanceRecord, PlacementRecord
from mesh.settings import load_settings

INFER = "/inference.GRPCInferenceService/ModelInfer"
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM}
POLL_S = 0.1  # registry polling period: the resolution of the registry times
SETTLE_MARGIN_S = 15.0  # how long past the lease TTL (after the kill) we wait for recovery
REQUEST_TIMEOUT_S = 10.0
SETUP_BUDGET_S = 180.0  # start-up, registration and warm-up of one run, at most

# The standard suite: both signals, 20 s of load each with the kill at 5 s, so that the lease (10 s)
# expires with 5 s of load left to measure the recovered p99; about 27 s per run on two cores.
SUITE_ARGS: list[str] = ["--models", "50", "--rate", "300", "--duration", "20", "--kill-at", "5",
                         "--signal", "kill", "--signal", "term"]
SUITE_SECONDS: int = 60


class ScenarioError(Exception):
    """The scenario itself failed (not what it measures): one line, exit 1."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the registry, as the scenario sees it ------------------------------------------------------
@dataclass
class Snapshot:
    at: float  # wall-clock time of the read
    instances: dict[str, InstanceRecord]
    placements: list[PlacementRecord]

    def loaded_by_instance(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {i: set() for i in self.instances}
        for p in self.placements:
            if p.state == LOADED:
                out.setdefault(p.instance_id, set()).add(p.model_id)
        return out


class Registry:
    """One open store for the whole run (a fresh client per read would cost more than the read)."""

    def __init__(self, url: str) -> None:
        self.store: KVStore
        self.store, prefix = open_store(url)
        self.keys = Keys(prefix)

    async def read(self) -> Snapshot:
        at = time.time()
        inst, _ = await self.store.get_prefix(self.keys.instances)
        plc, _ = await self.store.get_prefix(self.keys.placements)
        records = [InstanceRecord.from_json(kv.value) for kv in inst]
        return Snapshot(at, {r.instance_id: r for r in records},
                        [PlacementRecord.from_json(kv.value) for kv in plc])

    async def close(self) -> None:
        await self.store.close()


@dataclass
class Watch:
    """Registry events after the kill, in seconds from the start of the load."""

    victim: str
    models: set[str]
    instance_gone_s: float = math.nan
    placements_gone_s: float = math.nan
    all_served_s: float = math.nan
    samples: list[dict[str, Any]] = field(default_factory=list)  # one per change

    def see(self, snap: Snapshot, start_wall: float) -> None:
        t = round(snap.at - start_wall, 2)
        by_instance = snap.loaded_by_instance()
        dead = sum(1 for p in snap.placements if p.instance_id == self.victim)
        served = set().union(*(m for i, m in by_instance.items() if i != self.victim and i in snap.instances))
        row = {"instance": self.victim in snap.instances, "dead_placements": dead,
               "models_on_survivors": len(served & self.models)}
        if not self.samples or {k: v for k, v in self.samples[-1].items() if k != "t"} != row:
            self.samples.append({"t": t, **row})
        if self.victim not in snap.instances and math.isnan(self.instance_gone_s):
            self.instance_gone_s = t
        if dead == 0 and math.isnan(self.placements_gone_s):
            self.placements_gone_s = t
        if self.models <= served and math.isnan(self.all_served_s):
            self.all_served_s = t

    @property
    def recovered_s(self) -> float:
        return max(self.instance_gone_s, self.placements_gone_s, self.all_served_s)  # NaN if any is


# --- the router's own count of answers by status code ---------------------------------------------
def _metrics_url(router: Server) -> str | None:
    for line in router.log_path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "metrics serving":
            return str(event.get("url"))
    return None


def _infer_codes_now(url: str) -> Counter[str]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode("utf-8", errors="replace")
    codes: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name != "modelmesh_api_request_milliseconds":
            continue
        for s in family.samples:
            if s.name.endswith("_count") and s.labels.get("method") == "ModelInfer":
                codes[s.labels.get("code", "?")] += int(s.value)
    return codes


async def _infer_codes(url: str | None) -> Counter[str] | None:
    if url is None:
        return None
    try:
        return await asyncio.to_thread(_infer_codes_now, url)
    except (OSError, ValueError):
        return None


def _diff(after: Counter[str] | None, before: Counter[str] | None) -> dict[str, int] | None:
    if after is None or before is None:
        return None
    return {k: v for k, v in sorted((after - before).items()) if v}


# --- one run --------------------------------------------------------------------------------------
async def _send_each(channel: grpc.aio.Channel, models: list[TrainedModel], in_flight: int = 8
                     ) -> dict[str, str]:
    """One request per model through the router; the models that failed, with their status code."""
    call = bytes_call(channel, INFER)
    sem = asyncio.Semaphore(in_flight)
    failed: dict[str, str] = {}

    async def one(m: TrainedModel) -> None:
        async with sem:
            try:
                await call(infer_body(m), metadata=(("mm-model-id", m.model_id),), timeout=30)
            except grpc.aio.AioRpcError as err:
                failed[m.model_id] = err.code().name

    await asyncio.gather(*(one(m) for m in models))
    return failed


async def _warm(channel: grpc.aio.Channel, registry: Registry, models: list[TrainedModel]) -> Snapshot:
    # One model at a time: with nothing else in flight, bounded load never skips an instance, so each
    # model lands on its HRW home and the placement (hence the victim) is the same from run to run.
    # Concurrent first requests let the runtime that imports scikit-learn first look busy, and the
    # homes came out as uneven as 4 / 13 / 33 models.
    failed = await _send_each(channel, models, in_flight=1)
    if failed:
        raise ScenarioError(f"warm-up: {len(failed)} models did not answer: {dict(Counter(failed.values()))}")
    ids = {m.model_id for m in models}
    deadline = time.monotonic() + 60
    while True:
        snap = await registry.read()
        if ids <= {p.model_id for p in snap.placements if p.state == LOADED}:
            break
        if time.monotonic() > deadline:
            raise ScenarioError("warm-up: not every model has a loaded placement after 60 s")
        await asyncio.sleep(POLL_S)
    stub = mm_grpc.ModelMeshStub(channel)  # type: ignore[no-untyped-call]
    for m in models:  # the router's view too, so that the load starts on the fast path
        await wait_loaded(stub, m.model_id, timeout_s=30)
    return snap


def _placement_summary(snap: Snapshot, names: dict[str, str]) -> dict[str, Any]:
    copies = Counter(p.model_id for p in snap.placements if p.state == LOADED)
    return {"copies_per_model": {str(k): v for k, v in sorted(Counter(copies.values()).items())},
            "models_per_instance": {names.get(i, i): len(m) for i, m in sorted(snap.loaded_by_instance().items())}}


def _window_row(w: Window, kill_s: float) -> dict[str, Any]:
    s = w.hist.summary_ms()
    # + 0.0 turns -0.0 (the kill's own second, rounded) into 0.0
    return {"second": w.second, "since_kill_s": round(w.second - kill_s, 1) + 0.0, "sent": w.sent, "ok": w.ok,
            "errors": w.errors, "p50_ms": round(s["p50"], 2), "p99_ms": round(s["p99"], 2)}


def _p99(windows: list[Window]) -> float:
    h = Histogram()
    for w in windows:
        h.merge(w.hist)
    return round(h.quantile(0.99) * 1000, 2) if h.n else math.nan


async def run_one(args: argparse.Namespace, sig: str, models: list[TrainedModel]) -> dict[str, Any]:
    lease_ttl = load_settings().registry.lease_ttl_s  # what the runtimes see: same environment
    with Cluster() as cluster:
        try:
            return await asyncio.wait_for(
                _run_in(cluster, args, sig, models, lease_ttl),
                SETUP_BUDGET_S + args.duration + lease_ttl + SETTLE_MARGIN_S + 60)
        except TimeoutError:
            raise ScenarioError(f"{sig} run did not finish in time") from None
        finally:
            if args.logs is not None:
                dest = args.logs / sig
                dest.mkdir(parents=True, exist_ok=True)
                for s in cluster.servers:
                    shutil.copy(s.log_path, dest / s.log_path.name)


async def _run_in(cluster: Cluster, args: argparse.Namespace, sig: str, models: list[TrainedModel],
                  lease_ttl: int) -> dict[str, Any]:
    log(f"[{sig}] starting {args.runtimes} runtimes and a router...")
    runtimes = [cluster.start_runtime(f"runtime-{i}") for i in range(args.runtimes)]
    router = cluster.start_router()
    registry = Registry(cluster.registry_url)
    try:
        return await _measure(cluster, args, sig, models, lease_ttl, runtimes, router, registry)
    finally:
        await registry.close()


async def _measure(cluster: Cluster, args: argparse.Namespace, sig: str, models: list[TrainedModel],
                   lease_ttl: int, runtimes: list[Server], router: Server, registry: Registry) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(router.endpoint) as channel:
        stub = mm_grpc.ModelMeshStub(channel)  # type: ignore[no-untyped-call]
        registered, errors = await register_many(stub, [(m.model_id, str(m.path)) for m in models],
                                                 in_flight=8)
        if errors:
            raise ScenarioError(f"registration failed: {errors}")
        log(f"[{sig}] registered {registered} models; warming them...")
        warm = await _warm(channel, registry, models)
    by_endpoint = {s.endpoint: s for s in runtimes}
    names = {i: by_endpoint[r.endpoint].name for i, r in warm.instances.items() if r.endpoint in by_endpoint}
    placed = _placement_summary(warm, names)
    log(f"[{sig}] placements after warm-up: {placed}")

    metrics_url = _metrics_url(router)
    popularity = arrivals.parse_popularity(args.popularity, len(models), None)
    cfg = WorkerConfig(target=router.endpoint, bodies=[infer_body(m) for m in models],
                       metadata=[(("mm-model-id", m.model_id),) for m in models], popularity=popularity,
                       duration_s=args.duration, rate=args.rate, timeout_s=REQUEST_TIMEOUT_S, seed=args.seed)
    windows: list[Window] = []
    start_wall = time.time() + start_delay_s(1)
    codes_start = await _infer_codes(metrics_url)
    state: dict[str, Any] = {}

    async def kill() -> None:
        await asyncio.sleep(max(start_wall + args.kill_at - 0.3 - time.time(), 0))
        snap = await registry.read()
        loaded = snap.loaded_by_instance()
        victim_id = max((i for i in loaded if i in names), key=lambda i: len(loaded[i]))
        victim = next(s for s in runtimes if s.name == names[victim_id])
        alive_elsewhere = set().union(*(m for i, m in loaded.items() if i != victim_id))
        state.update(victim=victim, victim_id=victim_id, before=snap,
                     lost={m for m in loaded[victim_id] if m not in alive_elsewhere},
                     codes_kill=await _infer_codes(metrics_url))
        # uvloop's timers have millisecond resolution and may fire early: aim a little late.
        await asyncio.sleep(max(start_wall + args.kill_at - time.time(), 0) + 0.002)
        state["kill_s"] = time.time() - start_wall
        victim.proc.send_signal(SIGNALS[sig])  # by the PID of the process we started, nothing else
        log(f"[{sig}] {sig} sent to {victim.name} (pid {victim.pid}, {len(loaded[victim_id])} models, "
            f"{len(state['lost'])} of them its only copy) at {state['kill_s']:.2f} s")
        try:
            await asyncio.to_thread(victim.proc.wait, 60)
            state["exit_s"] = time.time() - start_wall
        except subprocess.TimeoutExpired:
            state["exit_s"] = math.nan

    watch: Watch | None = None

    async def monitor(until: asyncio.Event) -> None:
        nonlocal watch
        while not until.is_set():
            if "kill_s" in state:
                if watch is None:
                    watch = Watch(state["victim_id"], {m.model_id for m in models})
                watch.see(await registry.read(), start_wall)
                if not math.isnan(watch.recovered_s):
                    recovered.set()
            await asyncio.sleep(POLL_S)

    stop_monitor, recovered = asyncio.Event(), asyncio.Event()
    monitor_task = asyncio.create_task(monitor(stop_monitor), name="failover-registry-monitor")
    kill_task = asyncio.create_task(kill(), name="failover-kill")
    try:
        log(f"[{sig}] load: {args.rate:g} req/s over {len(models)} models ({args.popularity}) for "
            f"{args.duration:g} s, {sig} at {args.kill_at:g} s")
        try:
            result = await run_driver(cfg, windows.append, start_wall)
        except WorkerFailed as exc:
            raise ScenarioError(f"load generator: {exc}") from None
        codes_end = await _infer_codes(metrics_url)
        await kill_task
        # Keep watching until the registry has recovered, or the lease plus a margin has passed.
        settle_until = start_wall + state["kill_s"] + lease_ttl + SETTLE_MARGIN_S
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(recovered.wait(), max(settle_until - time.time(), 0))
    finally:
        stop_monitor.set()
        kill_task.cancel()
        await asyncio.gather(monitor_task, kill_task, return_exceptions=True)
    assert watch is not None

    async with grpc.aio.insecure_channel(router.endpoint) as channel:
        probe_failed = await _send_each(channel, models)
    end = await registry.read()
    before: Snapshot = state["before"]
    victim: Server = state["victim"]
    victim_id: str = state["victim_id"]
    kill_s: float = state["kill_s"]
    end_loaded = end.loaded_by_instance()
    on_survivors = set().union(*(m for i, m in end_loaded.items() if i != victim_id))
    survivor_loads = {names.get(i, i): end.instances[i].loads - r.loads
                      for i, r in before.instances.items() if i != victim_id and i in end.instances}

    windows.sort(key=lambda w: w.second)
    kill_sec = int(kill_s)
    after_kill = [w for w in windows if w.second >= kill_sec]
    recovered_s = watch.recovered_s
    errors_client = dict(sorted(result.errors.items()))
    last_error = max((w.second + 1 for w in after_kill if w.errors), default=None)
    return {
        "signal": sig,
        "settings": {"runtimes": args.runtimes, "models": len(models), "rate": args.rate,
                     "duration_s": args.duration, "kill_at_s": args.kill_at, "popularity": args.popularity,
                     "request_timeout_s": REQUEST_TIMEOUT_S, "lease_ttl_s": lease_ttl},
        "placements_before": placed,
        "victim": {"name": victim.name, "instance_id": victim_id, "pid": victim.pid,
                   "exit_code": victim.proc.returncode, "models": len(before.loaded_by_instance()[victim_id]),
                   "only_copy": len(state["lost"]), "kill_s": round(kill_s, 3),
                   "exited_after_s": round(state["exit_s"] - kill_s, 3)},
        "requests": result.sent, "ok": result.ok, "dropped": result.dropped,
        "errors": errors_client, "error_total": sum(errors_client.values()),
        "errors_before_kill_client": sum(w.errors for w in windows if w.second < kill_sec),
        "errors_from_kill_second_client": sum(w.errors for w in after_kill),
        "router_codes_before_kill": _diff(state["codes_kill"], codes_start),
        "router_codes_after_kill": _diff(codes_end, state["codes_kill"]),
        "last_error_after_kill_s": None if last_error is None else round(last_error - kill_s, 1),
        "p99_before_kill_ms": _p99([w for w in windows if w.second + 1 <= kill_s]),
        "p99_after_recovery_ms": _p99([w for w in windows if w.second >= recovered_s]) if recovered_s == recovered_s
        else math.nan,
        "registry": {"instance_gone_after_s": round(watch.instance_gone_s - kill_s, 2),
                     "placements_gone_after_s": round(watch.placements_gone_s - kill_s, 2),
                     "all_models_on_survivors_after_s": round(watch.all_served_s - kill_s, 2),
                     "samples": watch.samples},
        "reloaded": {"lost_only_copy": len(state["lost"]),
                     "lost_now_on_survivors": len(state["lost"] & on_survivors),
                     "survivor_loads": survivor_loads,
                     "models_on_survivors_at_end": len(on_survivors & {m.model_id for m in models})},
        "probe": {"models": len(models), "answered": len(models) - len(probe_failed),
                  "failed": dict(Counter(probe_failed.values()))},
        "router_log": _log_events(router),
        "pids": {**{s.name: s.pid for s in cluster.servers}, "etcd": cluster.etcd.pid},
        "timeline": [_window_row(w, kill_s) for w in windows],
    }


def _log_events(server: Server) -> dict[str, int]:
    """Warnings and errors in a server's log, counted by event (what to read first when requests fail)."""
    counts: Counter[str] = Counter()
    for line in server.log_path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("level") in ("warning", "error", "critical"):
            counts[f"{event.get('level')}: {event.get('event')}"] += 1
    return dict(counts.most_common(10))


# --- rendering ------------------------------------------------------------------------------------
def _secs(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.1f} s"


def _ms(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.1f} ms"


def _codes(codes: dict[str, int] | None) -> str:
    if codes is None:
        return "n/a"
    return ", ".join(f"{k} {v:,}" for k, v in codes.items()) or "none"


def render_run(r: dict[str, Any]) -> str:
    v, reg, rl = r["victim"], r["registry"], r["reloaded"]
    ttl = r["settings"]["lease_ttl_s"]
    router_after = {k: n for k, n in (r["router_codes_after_kill"] or {}).items() if k != "OK"} \
        if r["router_codes_after_kill"] is not None else None
    summary = table(["figure", "value"], [
        ["victim", f"{v['name']} (pid {v['pid']}, exit code {v['exit_code']}): {v['models']} models, "
                   f"{v['only_copy']} of them its only copy; exited {_secs(v['exited_after_s'])} after the signal"],
        ["requests / ok / dropped", f"{r['requests']:,} / {r['ok']:,} / {r['dropped']:,}"],
        ["errors seen by the client, by code", _codes(r["errors"])],
        ["client errors before the kill second / from it on",
         f"{r['errors_before_kill_client']:,} / {r['errors_from_kill_second_client']:,}"],
        ["router's error answers after the kill, by code", _codes(router_after)],
        ["last client error, after the kill", _secs(r["last_error_after_kill_s"])],
        ["p99 before the kill", _ms(r["p99_before_kill_ms"])],
        ["p99 after recovery (from the first whole second after it to the end)", _ms(r["p99_after_recovery_ms"])],
        [f"dead instance's record gone from the registry (lease TTL {ttl} s)",
         _secs(reg["instance_gone_after_s"])],
        ["its last placement gone", _secs(reg["placements_gone_after_s"])],
        ["every model loaded on a survivor", _secs(reg["all_models_on_survivors_after_s"])],
        ["models that lost their only copy / loaded again on survivors",
         f"{rl['lost_only_copy']} / {rl['lost_now_on_survivors']}"],
        ["loads on survivors after the kill (published counters)", _codes(rl["survivor_loads"])],
        ["final probe: models answering", f"{r['probe']['answered']} / {r['probe']['models']}"
         + (f" ({_codes(r['probe']['failed'])})" if r["probe"]["failed"] else "")],
    ])
    placed = r["placements_before"]
    where = (f"placements after warm-up: copies per model {placed['copies_per_model']}, models per instance "
             f"{placed['models_per_instance']}")
    return "\n".join([f"#### {r['signal']}: SIG{r['signal'].upper()} at {v['kill_s']:.1f} s", "", where, "",
                      summary, "", _timeline(r), *_log_lines(r)])


def _timeline(r: dict[str, Any]) -> str:
    kill_s = r["victim"]["kill_s"]
    reg = r["registry"]
    marks: dict[int, list[str]] = {}
    for label, at in (("signal", 0.0), ("instance gone", reg["instance_gone_after_s"]),
                      ("placements gone", reg["placements_gone_after_s"]),
                      ("all models on survivors", reg["all_models_on_survivors_after_s"])):
        if at == at:
            marks.setdefault(int(kill_s + at), []).append(label)
    rows = r["timeline"]
    last_mark = max(marks) if marks else int(kill_s)
    shown = [w for w in rows if int(kill_s) - 3 <= w["second"] <= last_mark + 2]
    return table(["second", "since kill (s)", "sent", "ok", "errors", "p50 (ms)", "p99 (ms)", "registry"],
                 [[w["second"], f"{w['since_kill_s']:+.1f}", w["sent"], w["ok"], w["errors"], _ms(w["p50_ms"])[:-3],
                   _ms(w["p99_ms"])[:-3], ", ".join(marks.get(w["second"], []))] for w in shown])


def _log_lines(r: dict[str, Any]) -> list[str]:
    if not r["router_log"]:
        return []
    return ["", "router log, warnings and errors: " + "; ".join(f"{k} x{n}" for k, n in r["router_log"].items())]


def render(result: dict[str, Any]) -> str:
    s = result["settings"]
    head = (f"{s['runtimes']} runtimes, 1 router, {s['models']} models, {s['rate']:g} req/s Poisson "
            f"({s['popularity']}) for {s['duration_s']:g} s")
    return "\n\n".join([machine_line(result["machine"]), head, *(render_run(r) for r in result["runs"])])


# --- command line ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.scenarios.failover",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--runtimes", type=int, default=3, help="runtime processes (default 3)")
    parser.add_argument("--models", type=int, default=50, help="models (default 50)")
    parser.add_argument("--rate", type=float, default=300.0, help="requests per second, open loop (default 300)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    parser.add_argument("--kill-at", type=float, default=None, help="seconds into the load (default duration/3)")
    parser.add_argument("--signal", action="append", choices=sorted(SIGNALS), default=None,
                        help="kill (SIGKILL, default) or term (graceful SIGTERM); repeat for one run each")
    parser.add_argument("--popularity", default="uniform", help="uniform (default) or zipf:S")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logs", type=Path, metavar="DIR", help="copy the servers' logs here (per signal)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    args.signal = args.signal or ["kill"]
    if args.kill_at is None:
        args.kill_at = args.duration / 3
    if args.runtimes < 2 or args.models < 1 or args.rate <= 0 or not 1 <= args.kill_at < args.duration:
        parser.error("need --runtimes >= 2, --models >= 1, --rate > 0 and 1 <= --kill-at < --duration")
    if args.popularity != "uniform" and not args.popularity.startswith("zipf"):
        parser.error("--popularity: uniform or zipf:S")
    prepare_benchmark_process()
    foreign = ForeignLoad()
    model_dir = Path(tempfile.mkdtemp(prefix="mesh-bench-models-"))
    import uvloop

    try:
        arrivals.parse_popularity(args.popularity, args.models, None)
        log(f"training {args.models} models...")
        models = [train_logistic(f"fail-{i:03d}", model_dir, n_features=20, seed=7000 + i, rows=200)
                  for i in range(args.models)]
        runs = [uvloop.run(run_one(args, sig, models)) for sig in args.signal]
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the scenario failed, not the system it measures: one line, no traceback
        print(error_line(exc), file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    result = {"machine": machine(), "settings": runs[0]["settings"], "runs": runs}
    result["machine"]["foreign_load"] = foreign.result()
    emit(args, result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
