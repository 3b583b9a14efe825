"""Soak: minutes of mixed traffic with periodic faults, then consistency and leak checks (issue 7).

``python -m loadtest.scenarios.soak [--duration S] [--rate RPS] [--models N] [--runtimes R]
[--routers K] [--kill-every S] [--grace S] [--mgmt-rate OPS] [--vmodels V] [--fit F]
[--capacity-bytes B] [--zipf S] [--seed K] [--logs DIR] [--json] [--out FILE]``

Method. One private etcd, ``R`` (3) runtimes and ``K`` (2) routers, separate processes on 127.0.0.1
(``loadtest.cluster``, started as ``mesh up`` starts them). Clients reach the routers as they reach
the two routers of ``deploy/`` behind their Service: one channel over every router's address with
gRPC's ``round_robin`` policy, which stops sending to a router that says GOAWAY or drops. ``N``
(200) model IDs are registered through the routers, ID ``i`` pointing at one of 20 small
scikit-learn LogisticRegressions (``loadtest.models``), and ``V`` (5) vModels are created over the
first of them. The runtimes' capacity is sized as ``many_models`` sizes it (its calibration, on a
cluster of its own) so that only a share ``F`` (20 %) of the models is sure to fit, plus the load
slots' reservations: the tail of the traffic keeps loading and evicting (``--capacity-bytes`` skips
the calibration).

For ``--duration`` (600 s), three streams run at once:

* *Inference*: open-loop Poisson arrivals at ``--rate`` (150/s) through the router (the driver's
  ``_open_loop``, one worker, latencies from the intended send time, 10 s deadline); 90 % of the
  requests go to the models with Zipf(``--zipf``, 1.0) popularity, 10 % to the vModels
  (``mm-vmodel-id``), evenly.
* *Management*: ``--mgmt-rate`` (2) calls per second, in a fixed cycle: register a new model (then
  one inference on it, so that it loads), getModelStatus of a random model, setVModel of the next
  vModel to a random other model (a transition), getModelStatus again, and unregister the oldest of
  the new models once more than 5 are live. A failed call is retried (they are idempotent) up to
  5 times, 1 s apart, so that the expected state stays known; first-try failures are reported.
* *Faults*, every ``--kill-every`` (60) s while at least half a period is left: first a router
  restart (SIGTERM to the first router, wait for its exit, a new router on the same port: clients
  reconnect through their channel, nothing else), then SIGKILL and SIGTERM of a runtime
  alternately, each followed at once by a replacement runtime with a new instance ID (as a pod
  restart would). The victim is the oldest live runtime, so the fleet is renewed in turn. The
  router measured for leaks is the last one started, which no fault touches (with ``--routers 1``,
  the restarted router, measured from after its restart).

Every 10 s window records requests sent, answered, failed by status code (counted by intended send
time), p50/p99 (of the requests that completed in it), each process's RSS and open file descriptors
(router, every live runtime, etcd; psutil), and the runtimes' loads and capacity evictions (their
/metrics, differences of counters per process; a new process starts at zero).

At the end, after the load: the registry must drop every dead instance (a SIGKILLed one's lease
expires after ``lease_ttl_s``; we wait up to TTL + 15 s): no instance record or placement of a
process that is not running; every vModel's target is the last one set, and its active model
reaches it (transitions, up to 30 s); listModels shows exactly the models that are registered and
not unregistered; every one of those answers an inference, and every unregistered one answers
NOT_FOUND.

Verdicts: failed requests outside the ``--grace`` (10) s after each fault (from 1 s before it, for
requests in flight) must be 0 (inside, they are reported); the consistency checks must pass; the
measured router's RSS from minute 2 (or a third of the run, when shorter; from at least 10 s
after a restart) to the end must grow by at most 20 MB (a leak of 300 bytes per request over 72,000
requests); the router's and etcd's open descriptors must grow by at most 10 over the same span.

Caveats. The client, the router, the runtimes and etcd share the machine's cores, and the CPU other
processes used is reported. A runtime's counters between its last scrape and its death are lost.
RSS includes the allocator's free lists, so a few MB of growth is noise, not a leak. With
``--routers 1`` a router restart fails the requests sent while the port is closed and the client's
channel backs off (gRPC's reconnect backoff starts at 1 s; the client does not use
``wait_for_ready``): one router is a single point of failure, which is why ``deploy/`` runs two.
One run on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from loadtest.arrivals import Popularity, zipf_weights
from loadtest.cluster import Cluster, Server, prepare_benchmark_process
from loadtest.driver import Window, WorkerConfig, _open_loop, _Recorder, start_delay_s
from loadtest.histogram import Histogram
from loadtest.load import bytes_call
from loadtest.management import register_many
from loadtest.models import TrainedModel, infer_body, train_logistic
from loadtest.report import ForeignLoad, add_output_args, emit, error_line, machine, machine_line, table, verdict
from loadtest.scenarios.failover import INFER, Registry, ScenarioError, _send_each, log
from loadtest.scenarios.many_models import Settings as ManyModelsSettings
from loadtest.scenarios.many_models import _fetch, _samples, _total, calibrate, metrics_url, warm_runtimes
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.settings import load_settings

WINDOW_S = 10
DISTINCT = 20  # model files; each ID is a model of its own to the mesh
N_FEATURES = 20
REQUEST_TIMEOUT_S = 10.0
VMODEL_SHARE = 0.1  # of the inference requests
EXTRA_KEEP = 5  # new models kept registered before the oldest is unregistered
RETRIES = 5
SETTLE_MARGIN_S = 15.0
ROUTER_RSS_GROWTH_MAX_MB = 20.0
FD_GROWTH_MAX = 10
MGMT_CYCLE = ("register", "status", "setvmodel", "status", "unregister")


def client_channel(target: str) -> grpc.aio.Channel:
    """A channel over every router: ``target`` is ``ipv4:host:port,host:port,...`` (``Fleet.target``)."""
    return grpc.aio.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")])


# --- inference: the driver's open loop, with status codes per second --------------------------------
class _CodedRecorder(_Recorder):
    """The driver's recorder, also counting failures by code per second of intended send time (the
    driver only keeps codes for the whole run)."""

    def __init__(self, start: float, report: Callable[[Window], None]) -> None:
        super().__init__(start, start, report)
        self.codes: dict[int, Counter[str]] = {}

    def done(self, intended: float, latency: float, code: str | None) -> None:
        super().done(intended, latency, code)
        if code is not None:
            self.codes.setdefault(int(intended - self.start), Counter())[code] += 1


async def _drive(cfg: WorkerConfig, rec: _CodedRecorder) -> None:
    # loadtest.driver.run_worker, with our recorder: the same channel, open loop and ticker.
    async with client_channel(cfg.target) as channel:
        call = bytes_call(channel, INFER)
        await asyncio.sleep(max(rec.start - time.perf_counter(), 0))
        ticker = asyncio.create_task(rec.tick(), name="soak-ticker")
        try:
            await _open_loop(cfg, 0, call, rec)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        rec.flush()


# --- the fleet and its faults --------------------------------------------------------------------
@dataclass
class Fault:
    kind: str  # router-restart | kill | term
    at_s: float
    victim: str
    pid: int
    replacement: str = ""
    exit_code: int | None = None
    exited_after_s: float = math.nan
    replacement_ready_after_s: float = math.nan


class Fleet:
    """The live servers; faults replace them (starting a server blocks, so it runs in a thread)."""

    def __init__(self, cluster: Cluster, runtimes: list[Server], routers: list[Server], capacity: int) -> None:
        self.cluster = cluster
        self.runtimes = runtimes  # live, oldest first
        self.routers = routers  # live; a restarted one keeps its place (and its port)
        self.capacity = capacity
        self.started = len(runtimes)
        self.routers_started = len(routers)
        self.faults: list[Fault] = []
        # The clients' target: every router's address, fixed (a restarted router takes its port).
        self.target = "ipv4:" + ",".join(r.endpoint for r in routers)

    @property
    def router(self) -> Server:
        """The router measured for leaks: the last one, which only a single-router fleet restarts."""
        return self.routers[-1]

    def live(self) -> list[Server]:
        return [*self.routers, *self.runtimes]

    async def fault(self, kind: str, at_s: float) -> Fault:
        if kind == "router-restart":
            return await self._restart_router(at_s)
        victim = self.runtimes.pop(0)
        fault = Fault(kind, at_s, victim.name, victim.pid)
        self.faults.append(fault)
        t0 = time.monotonic()
        victim.proc.send_signal(signal.SIGKILL if kind == "kill" else signal.SIGTERM)  # by our PID only
        fault.replacement = f"runtime-{self.started}"
        self.started += 1
        # The replacement starts at once, as a pod restart would; the victim exits meanwhile.
        exited = asyncio.create_task(asyncio.to_thread(_wait, victim.proc, t0, 60.0), name="soak-victim-exit")
        replacement = await asyncio.to_thread(self.cluster.start_runtime, fault.replacement,
                                              capacity_bytes=self.capacity)
        fault.replacement_ready_after_s = round(time.monotonic() - t0, 2)
        self.runtimes.append(replacement)
        fault.exited_after_s = await exited
        fault.exit_code = victim.proc.returncode
        return fault

    async def _restart_router(self, at_s: float) -> Fault:
        old = self.routers[0]
        fault = Fault("router-restart", at_s, old.name, old.pid, replacement=f"router-{self.routers_started}")
        self.faults.append(fault)
        self.routers_started += 1
        port = old.endpoint.rpartition(":")[2]
        t0 = time.monotonic()
        old.proc.send_signal(signal.SIGTERM)
        fault.exited_after_s = await asyncio.to_thread(_wait, old.proc, t0, 30.0)
        fault.exit_code = old.proc.returncode
        # The same port, so that clients' channels reconnect to it; the metrics port is new.
        self.routers[0] = await asyncio.to_thread(self.cluster.start_router, fault.replacement,
                                                  extra_env={"MESH_ROUTER_PORT": port})
        fault.replacement_ready_after_s = round(time.monotonic() - t0, 2)
        return fault


def _wait(proc: subprocess.Popen[bytes], t0: float, timeout_s: float) -> float:
    """Seconds from ``t0`` (monotonic) until the process exited; NaN if it did not in time."""
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return math.nan
    return round(time.monotonic() - t0, 2)


def fault_plan(duration: float, every: float) -> list[tuple[float, str]]:
    """(time, kind): a router restart first, then SIGKILL and SIGTERM of runtimes alternately, every
    ``every`` seconds while at least half a period of load is left after the fault."""
    plan: list[tuple[float, str]] = []
    t = every
    while t <= duration - every / 2:
        plan.append((t, "router-restart" if not plan else ("kill", "term")[(len(plan) - 1) % 2]))
        t += every
    return plan


# --- sampling: RSS, descriptors, counters every window -------------------------------------------
@dataclass
class Sampler:
    fleet: Fleet
    etcd_pid: int
    samples: list[dict[str, Any]] = field(default_factory=list)
    _last: dict[str, tuple[float, float]] = field(default_factory=dict)  # per runtime: loads, evictions
    _urls: dict[str, str] = field(default_factory=dict)

    def _url(self, server: Server) -> str | None:
        if server.name not in self._urls:
            try:
                self._urls[server.name] = metrics_url(server)
            except RuntimeError:
                return None
        return self._urls[server.name]

    async def sample(self, t: float) -> dict[str, Any]:
        procs: dict[str, dict[str, float]] = {}
        for name, pid in [*((s.name, s.pid) for s in self.fleet.live()), ("etcd", self.etcd_pid)]:
            try:
                p = psutil.Process(pid)
                procs[name] = {"rss_mb": round(p.memory_info().rss / 2**20, 1), "fds": p.num_fds()}
            except psutil.Error:
                continue
        loads = evictions = 0.0
        for server in list(self.fleet.runtimes):
            url = self._url(server)
            if url is None:
                continue
            try:
                samples = _samples(await asyncio.to_thread(_fetch, url))
            except (OSError, ValueError):
                continue  # died or is starting: its increments show in the next sample
            now = (_total(samples, "modelmesh_loadmodel_milliseconds_count"),
                   _total(samples, "mesh_evictions_total", reason="capacity"))
            before = self._last.get(server.name, (0.0, 0.0))
            loads += now[0] - before[0]
            evictions += now[1] - before[1]
            self._last[server.name] = now
        row = {"t": round(t, 1), "router": self.fleet.router.name, "procs": procs,
               "loads": int(loads), "evictions": int(evictions)}
        self.samples.append(row)
        return row


# --- management ---------------------------------------------------------------------------------
@dataclass
class Management:
    """The management stream and the state it leaves: what must be registered, and vModel targets."""

    endpoint: str
    files: list[TrainedModel]
    driven: list[str]  # the inference stream's models: never unregistered
    targets: dict[str, str]  # vModel -> last target set
    rng: np.random.Generator
    extras: list[str] = field(default_factory=list)  # new models, registered and not unregistered
    unregistered: list[str] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    first_try_errors: dict[str, Counter[str]] = field(default_factory=dict)
    gave_up: Counter[str] = field(default_factory=Counter)
    status_not_found: int = 0
    uncertain: set[str] = field(default_factory=set)  # models whose last call gave up
    _new: int = 0

    def file(self, model_id: str) -> TrainedModel:
        k = int(model_id.rsplit("-", 1)[1])
        return dataclasses.replace(self.files[k % len(self.files)], model_id=model_id)

    async def _call(self, op: str, call: Callable[[], Awaitable[Any]]) -> Any:
        self.calls[op] += 1
        for attempt in range(RETRIES):
            try:
                return await call()
            except grpc.aio.AioRpcError as err:
                if attempt == 0:
                    self.first_try_errors.setdefault(op, Counter())[err.code().name] += 1
                await asyncio.sleep(1.0)
        self.gave_up[op] += 1
        return None

    async def run(self, rate: float, until: float) -> None:
        """Calls in ``MGMT_CYCLE`` order, ``rate`` per second (one at a time), until ``until`` (monotonic)."""
        async with client_channel(self.endpoint) as channel:
            stub = mm_grpc.ModelMeshStub(channel)  # type: ignore[no-untyped-call]
            call = bytes_call(channel, INFER)
            t0, i = time.monotonic(), 0
            while time.monotonic() < until:
                op = MGMT_CYCLE[i % len(MGMT_CYCLE)]
                if op == "register":
                    await self._register(stub, call)
                elif op == "status":
                    await self._status(stub)
                elif op == "setvmodel" and self.targets:
                    vmodels = sorted(self.targets)
                    await self._flip(stub, vmodels[(i // len(MGMT_CYCLE)) % len(vmodels)])
                elif op == "unregister" and len(self.extras) > EXTRA_KEEP:
                    await self._unregister(stub, self.extras.pop(0))
                i += 1
                await asyncio.sleep(max(t0 + i / rate - time.monotonic(), 0))

    def _random_driven(self) -> str:
        return self.driven[int(self.rng.integers(len(self.driven)))]

    async def _register(self, stub: mm_grpc.ModelMeshStub, call: grpc.aio.UnaryUnaryMultiCallable) -> None:
        model = self.file(f"soak-new-{self._new}")
        self._new += 1
        info = mm.ModelInfo(type="sklearn", path=str(model.path))
        if await self._call("registerModel", lambda: stub.registerModel(
                mm.RegisterModelRequest(modelId=model.model_id, modelInfo=info), timeout=10)) is None:
            self.uncertain.add(model.model_id)
            return
        self.extras.append(model.model_id)
        await self._call("infer-new", lambda: call(infer_body(model), metadata=(("mm-model-id", model.model_id),),
                                                   timeout=REQUEST_TIMEOUT_S))

    async def _status(self, stub: mm_grpc.ModelMeshStub) -> None:
        model_id = self._random_driven()
        st = await self._call("getModelStatus", lambda: stub.getModelStatus(
            mm.GetStatusRequest(modelId=model_id), timeout=10))
        if st is not None and st.status == mm.ModelStatusInfo.ModelStatus.Value("NOT_FOUND"):
            self.status_not_found += 1

    async def _flip(self, stub: mm_grpc.ModelMeshStub, vmodel: str) -> None:
        target = self._random_driven()
        if target == self.targets[vmodel]:
            return
        if await self._call("setVModel", lambda: stub.setVModel(
                mm.SetVModelRequest(vModelId=vmodel, targetModelId=target), timeout=10)) is None:
            self.uncertain.add(vmodel)
        else:
            self.targets[vmodel] = target
            self.uncertain.discard(vmodel)  # its state is known again

    async def _unregister(self, stub: mm_grpc.ModelMeshStub, model_id: str) -> None:
        if await self._call("unregisterModel", lambda: stub.unregisterModel(
                mm.UnregisterModelRequest(modelId=model_id), timeout=10)) is None:
            self.uncertain.add(model_id)
        else:
            self.unregistered.append(model_id)


# --- one run ------------------------------------------------------------------------------------
async def _setup(cluster: Cluster, args: argparse.Namespace, files: list[TrainedModel], capacity: int
                 ) -> tuple[Fleet, list[str], dict[str, str]]:
    log(f"starting {args.runtimes} runtimes ({capacity:,} bytes each) and {args.routers} router(s)...")
    runtimes = [cluster.start_runtime(f"runtime-{k}", capacity_bytes=capacity) for k in range(args.runtimes)]
    routers = [cluster.start_router(f"router-{k}") for k in range(args.routers)]
    router = routers[0]
    await warm_runtimes(runtimes, files[0], router)
    ids = [f"soak-{i}" for i in range(args.models)]
    targets = {f"vm-{k}": ids[k] for k in range(args.vmodels)}
    async with grpc.aio.insecure_channel(router.endpoint) as channel:
        stub = mm_grpc.ModelMeshStub(channel)  # type: ignore[no-untyped-call]
        _, errors = await register_many(stub, [(m, str(files[i % len(files)].path)) for i, m in enumerate(ids)],
                                        in_flight=8)
        if errors:
            raise ScenarioError(f"registration failed: {errors}")
        for vm, target in targets.items():
            await stub.setVModel(mm.SetVModelRequest(vModelId=vm, targetModelId=target), timeout=30)
    return Fleet(cluster, runtimes, routers, capacity), ids, targets


def _inference_config(args: argparse.Namespace, endpoint: str, ids: list[str], targets: dict[str, str],
                      files: list[TrainedModel]) -> WorkerConfig:
    def model(i: int, model_id: str) -> TrainedModel:
        return dataclasses.replace(files[i % len(files)], model_id=model_id)

    bodies = [infer_body(model(i, m)) for i, m in enumerate(ids)]
    metadata: list[tuple[tuple[str, str], ...]] = [(("mm-model-id", m),) for m in ids]
    share = VMODEL_SHARE if targets else 0.0
    weights = list(zipf_weights(len(ids), args.zipf) * (1 - share))
    for vm, target in targets.items():
        bodies.append(infer_body(model(ids.index(target), target)))
        metadata.append((("mm-vmodel-id", vm),))
        weights.append(share / len(targets))
    return WorkerConfig(target=endpoint, bodies=bodies, metadata=metadata,
                        popularity=Popularity(weights=np.asarray(weights) / sum(weights)),
                        duration_s=args.duration, rate=args.rate, timeout_s=REQUEST_TIMEOUT_S, seed=args.seed)


async def _run(cluster: Cluster, args: argparse.Namespace, files: list[TrainedModel], capacity: int,
               lease_ttl: int) -> dict[str, Any]:
    fleet, ids, targets = await _setup(cluster, args, files, capacity)
    registry = Registry(cluster.registry_url)
    try:
        return await _soak(cluster, args, files, fleet, ids, targets, registry, lease_ttl)
    finally:
        await registry.close()


async def _soak(cluster: Cluster, args: argparse.Namespace, files: list[TrainedModel], fleet: Fleet,
                ids: list[str], targets: dict[str, str], registry: Registry, lease_ttl: int) -> dict[str, Any]:
    cfg = _inference_config(args, fleet.target, ids, targets, files)
    assert cluster.etcd.pid is not None
    sampler = Sampler(fleet, cluster.etcd.pid)
    mgmt = Management(fleet.target, files, ids, dict(targets), np.random.default_rng(args.seed + 1))
    seconds: list[Window] = []
    start_wall = time.time() + start_delay_s(1)
    rec = _CodedRecorder(time.perf_counter() + (start_wall - time.time()), seconds.append)
    plan = fault_plan(args.duration, args.kill_every)
    log(f"soak: {args.rate:g} req/s over {len(ids)} models and {len(targets)} vModels, {args.mgmt_rate:g} "
        f"management calls/s, {len(plan)} faults, for {args.duration:g} s")

    async def faults() -> None:
        for at, kind in plan:
            await asyncio.sleep(max(start_wall + at - time.time(), 0))
            f = await fleet.fault(kind, round(time.time() - start_wall, 2))
            log(f"  {f.at_s:6.1f} s: {kind} {f.victim} (pid {f.pid}, exit {f.exit_code}); {f.replacement} "
                f"ready after {f.replacement_ready_after_s:.1f} s")

    async def sampling() -> None:
        k = 0
        while True:
            await asyncio.sleep(max(start_wall + k * WINDOW_S - time.time(), 0))
            row = await sampler.sample(time.time() - start_wall)
            if k:
                done = [w for w in seconds if (k - 1) * WINDOW_S <= w.second < k * WINDOW_S]
                log(f"  {k * WINDOW_S:4d} s: sent {sum(w.sent for w in done)}, errors "
                    f"{sum(w.errors for w in done)}, loads {row['loads']}, evictions {row['evictions']}, "
                    f"router RSS {row['procs'].get(fleet.router.name, {}).get('rss_mb', 'n/a')} MB")
            k += 1

    tasks = [asyncio.create_task(faults(), name="soak-faults"),
             asyncio.create_task(sampling(), name="soak-sampler"),
             asyncio.create_task(mgmt.run(args.mgmt_rate, time.monotonic() + (start_wall - time.time())
                                          + args.duration), name="soak-management")]
    try:
        await _drive(cfg, rec)
        await asyncio.gather(tasks[0], tasks[2])
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await sampler.sample(time.time() - start_wall)  # the end of the last window
    log("load done; checking consistency...")
    checks = await _consistency(fleet, registry, mgmt, lease_ttl)
    return _result(args, fleet, sampler, mgmt, rec, seconds, checks, len(ids), len(targets), lease_ttl)


async def _consistency(fleet: Fleet, registry: Registry, mgmt: Management, lease_ttl: int) -> dict[str, Any]:
    live = {s.endpoint for s in fleet.runtimes}
    deadline = time.monotonic() + lease_ttl + SETTLE_MARGIN_S
    t0 = time.monotonic()
    while True:  # a SIGKILLed instance leaves when its lease expires
        snap = await registry.read()
        dead_ids = {i for i, r in snap.instances.items() if r.endpoint not in live}
        stale = [p for p in snap.placements if p.instance_id in dead_ids or p.instance_id not in snap.instances]
        if (not dead_ids and not stale) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    registry_check = {"dead_instances": len(dead_ids), "dead_placements": len(stale),
                      "live_instances": len(snap.instances) - len(dead_ids), "runtimes": len(live),
                      "settled_after_s": round(time.monotonic() - t0, 1)}

    expected = set(mgmt.driven) | set(mgmt.extras)
    async with client_channel(fleet.target) as channel:
        stub = mm_grpc.ModelMeshStub(channel)  # type: ignore[no-untyped-call]
        vmodels: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + 30
        for vm, target in mgmt.targets.items():
            while True:  # transitions: the active model follows a target once it is loaded
                st = await stub.getVModelStatus(mm.GetVModelStatusRequest(vModelId=vm), timeout=10)
                if st.activeModelId == st.targetModelId or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            vmodels[vm] = {"expected": target, "target": st.targetModelId, "active": st.activeModelId}
        listed: set[str] = set()
        token = ""
        while True:
            page = await stub.listModels(mm.ListModelsRequest(prefix="soak-", pageToken=token), timeout=30)
            listed |= {m.modelId for m in page.models}
            token = page.nextPageToken
            if not token:
                break
        answer = [mgmt.file(m) for m in sorted(expected - mgmt.uncertain)]
        failed = await _send_each(channel, answer)
        gone = [mgmt.file(m) for m in mgmt.unregistered if m not in mgmt.uncertain]
        gone_codes = Counter((await _send_each(channel, gone)).values())
    listed -= mgmt.uncertain
    vm_ok = all(v["target"] == v["expected"] == v["active"] for vm, v in vmodels.items() if vm not in mgmt.uncertain)
    checks = {
        "registry": {**registry_check, "ok": registry_check["dead_instances"] == 0
                     and registry_check["dead_placements"] == 0},
        "vmodels": {"ok": vm_ok, "vmodels": vmodels},
        "listed": {"ok": listed == expected - mgmt.uncertain, "expected": len(expected - mgmt.uncertain),
                   "listed": len(listed), "missing": sorted(expected - mgmt.uncertain - listed)[:10],
                   "unexpected": sorted(listed - expected)[:10]},
        "answer": {"ok": not failed, "models": len(answer), "answered": len(answer) - len(failed),
                   "failed": dict(Counter(failed.values()))},
        "unregistered": {"ok": gone_codes.get("NOT_FOUND", 0) == len(gone), "models": len(gone),
                         "codes": dict(gone_codes) if len(gone_codes) else {}},
        "uncertain": sorted(mgmt.uncertain),
    }
    checks["ok"] = all(c["ok"] for c in checks.values() if isinstance(c, dict))
    return checks


# --- results ------------------------------------------------------------------------------------
def _hist_ms(windows: list[Window], q: float) -> float:
    h = Histogram()
    for w in windows:
        h.merge(w.hist)
    return round(h.quantile(q) * 1000, 2) if h.n else math.nan


def _growth(samples: list[dict[str, Any]], name: str, key: str, since: float) -> tuple[float, float, float]:
    """(first value at or after ``since``, last value, growth) of one process's figure."""
    values = [(s["t"], s["procs"][name][key]) for s in samples if name in s["procs"] and s["t"] >= since]
    if len(values) < 2:
        return math.nan, math.nan, math.nan
    return values[0][1], values[-1][1], round(values[-1][1] - values[0][1], 1)


def _result(args: argparse.Namespace, fleet: Fleet, sampler: Sampler, mgmt: Management, rec: _CodedRecorder,
            seconds: list[Window], checks: dict[str, Any], models: int, vmodels: int, lease_ttl: int
            ) -> dict[str, Any]:
    seconds.sort(key=lambda w: w.second)
    near = [(f.at_s - 1, f.at_s + args.grace) for f in fleet.faults]
    errors = Counter[str]()
    outside = Counter[str]()
    for s, codes in rec.codes.items():
        errors.update(codes)
        if not any(lo <= s + 1 and s < hi for lo, hi in near):
            outside.update(codes)
    windows = []
    n_windows = math.ceil(args.duration / WINDOW_S)
    for k in range(n_windows):
        lo, hi = k * WINDOW_S, (k + 1) * WINDOW_S
        ws = [w for w in seconds if lo <= w.second < hi]
        codes = sum((rec.codes.get(s, Counter()) for s in range(lo, hi)), Counter[str]())
        sample = next((s for s in sampler.samples if s["t"] >= hi - 0.5), sampler.samples[-1])
        windows.append({"from_s": lo, "sent": sum(w.sent for w in ws), "ok": sum(w.ok for w in ws),
                        "errors": dict(sorted(codes.items())), "p50_ms": _hist_ms(ws, 0.5),
                        "p99_ms": _hist_ms(ws, 0.99), "loads": sample["loads"], "evictions": sample["evictions"],
                        "procs": sample["procs"], "router": sample["router"],
                        "faults": [f"{f.kind} {f.victim}" for f in fleet.faults if lo <= f.at_s < hi]})
    router = fleet.router.name
    restart = next((f.at_s for f in fleet.faults if f.kind == "router-restart" and f.replacement == router), None)
    since = max(min(120.0, args.duration / 3), restart + 10 if restart is not None else 0.0)
    rss = _growth(sampler.samples, router, "rss_mb", since)
    fds = {name: _growth(sampler.samples, name, "fds", since)[2] for name in (router, "etcd")}
    total_requests = sum(w.sent for w in seconds)
    verdicts = {
        "errors_outside_faults": sum(outside.values()),
        "rss_from_s": since, "router_rss_mb": {"from": rss[0], "to": rss[1], "growth": rss[2]},
        "fd_growth": fds,
        "consistent": checks["ok"],
    }
    verdicts["ok"] = (verdicts["errors_outside_faults"] == 0 and checks["ok"]
                      and not rss[2] > ROUTER_RSS_GROWTH_MAX_MB and not any(v > FD_GROWTH_MAX for v in fds.values()))
    return {
        "settings": {"duration_s": args.duration, "rate": args.rate, "models": models, "vmodels": vmodels,
                     "runtimes": args.runtimes, "routers": args.routers, "kill_every_s": args.kill_every,
                     "grace_s": args.grace,
                     "mgmt_rate": args.mgmt_rate, "zipf": args.zipf, "capacity_bytes": fleet.capacity,
                     "lease_ttl_s": lease_ttl, "request_timeout_s": REQUEST_TIMEOUT_S},
        "requests": total_requests, "ok": sum(w.ok for w in seconds),
        "errors": dict(sorted(errors.items())), "error_total": sum(errors.values()),
        "errors_outside_faults": dict(sorted(outside.items())),
        "latency_ms": {"p50": _hist_ms(seconds, 0.5), "p99": _hist_ms(seconds, 0.99),
                       "p999": _hist_ms(seconds, 0.999)},
        "loads": sum(s["loads"] for s in sampler.samples), "evictions": sum(s["evictions"] for s in sampler.samples),
        "faults": [dataclasses.asdict(f) for f in fleet.faults],
        "management": {"calls": dict(mgmt.calls), "first_try_errors": {k: dict(v) for k, v in
                                                                        mgmt.first_try_errors.items()},
                       "gave_up": dict(mgmt.gave_up), "status_not_found": mgmt.status_not_found,
                       "registered_new": len(mgmt.extras) + len(mgmt.unregistered),
                       "unregistered": len(mgmt.unregistered)},
        "checks": checks, "verdicts": verdicts, "windows": windows,
    }


def _codes(codes: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in codes.items()) or "none"


def _range(values: list[float]) -> str:
    if not values:
        return "n/a"
    lo, hi = min(values), max(values)
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


def render(result: dict[str, Any]) -> str:
    s, v, c, m = result["settings"], result["verdicts"], result["checks"], result["management"]
    head = (f"{s['runtimes']} runtimes ({s['capacity_bytes']:,} bytes each), {s.get('routers', 1)} router(s) "
            f"(the client round-robins over them), {s['models']} models + "
            f"{s['vmodels']} vModels, {s['rate']:g} req/s Poisson (Zipf {s['zipf']:g}) and {s['mgmt_rate']:g} "
            f"management calls/s for {s['duration_s']:g} s; a fault every {s['kill_every_s']:g} s")
    rss = v["router_rss_mb"]
    near_total = result["error_total"] - v["errors_outside_faults"]
    verdicts = table(["check", "result", "verdict"], [
        [f"failed requests outside the faults' windows (-1 s .. +{s['grace_s']:g} s) = 0",
         f"{v['errors_outside_faults']:,} ({_codes(result['errors_outside_faults'])})",
         verdict(v["errors_outside_faults"] == 0)],
        ["failed requests near a fault (reported)", f"{near_total:,} of {result['requests']:,} "
         f"({_codes(result['errors'])} in all)", "-"],
        [f"router RSS growth ({result['windows'][0]['router']}) from {v['rss_from_s']:g} s to the end "
         f"<= {ROUTER_RSS_GROWTH_MAX_MB:g} MB",
         f"{rss['from']} -> {rss['to']} MB ({rss['growth']:+} MB)",
         verdict(not rss["growth"] > ROUTER_RSS_GROWTH_MAX_MB)],
        [f"open descriptors growth (router, etcd) <= {FD_GROWTH_MAX}",
         ", ".join(f"{k} {x:+g}" for k, x in v["fd_growth"].items()),
         verdict(not any(x > FD_GROWTH_MAX for x in v["fd_growth"].values()))],
        ["registry: no record or placement of a dead instance",
         f"{c['registry']['dead_instances']} records, {c['registry']['dead_placements']} placements "
         f"(settled {c['registry']['settled_after_s']} s after the load)", verdict(c["registry"]["ok"])],
        ["vModels at their last target (target and active)",
         f"{sum(x['target'] == x['expected'] == x['active'] for x in c['vmodels']['vmodels'].values())} / "
         f"{len(c['vmodels']['vmodels'])}", verdict(c["vmodels"]["ok"])],
        ["listModels = registered minus unregistered", f"{c['listed']['listed']} / {c['listed']['expected']}",
         verdict(c["listed"]["ok"])],
        ["every registered model answers", f"{c['answer']['answered']} / {c['answer']['models']}"
         + (f" ({_codes(c['answer']['failed'])})" if c["answer"]["failed"] else ""), verdict(c["answer"]["ok"])],
        ["every unregistered model answers NOT_FOUND", f"{c['unregistered']['models']} models: "
         f"{_codes(c['unregistered']['codes'])}", verdict(c["unregistered"]["ok"])],
    ])
    summary = table(["figure", "value"], [
        ["requests / ok", f"{result['requests']:,} / {result['ok']:,}"],
        ["latency p50 / p99 / p99.9", " / ".join(f"{result['latency_ms'][k]:.1f} ms" for k in ("p50", "p99", "p999"))],
        ["loads / capacity evictions (runtimes' counters)", f"{result['loads']:,} / {result['evictions']:,}"],
        ["management calls", _codes(m["calls"])],
        ["management first-try errors / given up",
         ("; ".join(f"{k}: {_codes(x)}" for k, x in m["first_try_errors"].items()) or "none")
         + f" / {_codes(m['gave_up'])}"],
        ["models registered / unregistered by the stream", f"{m['registered_new']} / {m['unregistered']}"],
        ["getModelStatus NOT_FOUND for a registered model", str(m["status_not_found"])],
    ])
    faults = table(["at (s)", "fault", "victim (pid)", "exit code", "exited after", "replacement", "ready after"],
                   [[f"{f['at_s']:.1f}", f["kind"], f"{f['victim']} ({f['pid']})", f["exit_code"],
                     f"{f['exited_after_s']:.1f} s", f["replacement"], f"{f['replacement_ready_after_s']:.1f} s"]
                    for f in result["faults"]])
    rows = []
    for w in result["windows"]:
        procs = w["procs"]
        runtimes = [p for n, p in procs.items() if n.startswith("runtime")]
        router = procs.get(w["router"], {})
        etcd = procs.get("etcd", {})
        rows.append([w["from_s"], w["sent"], w["ok"], _codes(w["errors"]), w["p50_ms"], w["p99_ms"], w["loads"],
                     w["evictions"], f"{router.get('rss_mb', 'n/a')} / {router.get('fds', 'n/a')}",
                     f"{_range([p['rss_mb'] for p in runtimes])} / {_range([p['fds'] for p in runtimes])}",
                     f"{etcd.get('rss_mb', 'n/a')} / {etcd.get('fds', 'n/a')}", "; ".join(w["faults"])])
    timeline = table(["window from (s)", "sent", "ok", "errors", "p50 (ms)", "p99 (ms)", "loads", "evictions",
                      "router RSS MB / fds", "runtimes RSS MB / fds", "etcd RSS MB / fds", "faults"], rows)
    overall = "all checks met" if v["ok"] else "some checks MISSED"
    return "\n\n".join([machine_line(result["machine"]), head, f"**Verdict: {overall}.**", verdicts, summary,
                        faults, "Per 10 s window:", timeline])


# --- command line ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.scenarios.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--rate", type=float, default=150.0, help="inference requests per second (default 150)")
    parser.add_argument("--models", type=int, default=200, help="models registered at the start (default 200)")
    parser.add_argument("--vmodels", type=int, default=5, help="vModels (default 5)")
    parser.add_argument("--runtimes", type=int, default=3, help="runtime processes (default 3)")
    parser.add_argument("--routers", type=int, default=2,
                        help="routers, behind one round-robin client channel as behind a Service (default 2)")
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between faults (default 60)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds after a fault whose failed requests are reported apart (default 10)")
    parser.add_argument("--mgmt-rate", type=float, default=2.0, help="management calls per second (default 2)")
    parser.add_argument("--fit", type=float, default=0.2, help="share of the models sure to fit (default 0.2)")
    parser.add_argument("--capacity-bytes", type=int, default=0,
                        help="capacity per runtime; 0 (default) calibrates it from --fit")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the models' popularity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logs", type=Path, metavar="DIR", help="copy the servers' logs here")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.runtimes < 2 or args.routers < 1 or args.models < max(args.vmodels, 2) or args.rate <= 0 \
            or args.mgmt_rate <= 0 or args.duration < 2 * WINDOW_S or not 0 < args.fit < 1 or args.vmodels < 0:
        parser.error("need --runtimes >= 2, --routers >= 1, --models >= max(--vmodels, 2), --rate and "
                     "--mgmt-rate > 0, "
                     f"--duration >= {2 * WINDOW_S} and 0 < --fit < 1")
    if not fault_plan(args.duration, args.kill_every):
        parser.error("--kill-every leaves no room for a fault: it must be at most 2/3 of --duration")
    prepare_benchmark_process()
    foreign = ForeignLoad()
    model_dir = Path(tempfile.mkdtemp(prefix="mesh-bench-models-"))
    import uvloop

    try:
        log(f"training {DISTINCT} models...")
        files = [train_logistic(f"file-{k:03d}", model_dir, n_features=N_FEATURES, seed=9000 + k, rows=200)
                 for k in range(DISTINCT)]
        capacity = args.capacity_bytes
        if not capacity:
            log("calibrating the capacity...")
            capacity = calibrate(ManyModelsSettings(models=args.models, distinct=DISTINCT, runtimes=args.runtimes,
                                                    fit=args.fit), files).capacity_bytes
        lease_ttl = load_settings().registry.lease_ttl_s
        budget_s = 240 + args.duration + lease_ttl + SETTLE_MARGIN_S + 120
        pids: dict[str, int | None] = {}
        with Cluster() as cluster:
            try:
                result = uvloop.run(asyncio.wait_for(_run(cluster, args, files, capacity, lease_ttl), budget_s))
            except TimeoutError:
                raise ScenarioError(f"the soak did not finish within {budget_s:.0f} s") from None
            finally:
                pids = {**{s.name: s.pid for s in cluster.servers}, "etcd": cluster.etcd.pid}
                if args.logs is not None:
                    args.logs.mkdir(parents=True, exist_ok=True)
                    for s in cluster.servers:
                        shutil.copy(s.log_path, args.logs / s.log_path.name)
        result["pids"] = pids
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the scenario failed, not the system it measures: one line, no traceback
        print(error_line(exc), file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    result = {"machine": machine(), **result}
    result["machine"]["foreign_load"] = foreign.result()
    emit(args, result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
