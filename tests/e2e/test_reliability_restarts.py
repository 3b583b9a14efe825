"""Issue 7, items 1 and 2: runtimes that die or leave under load fail no request.

Real processes, as ``mesh up`` starts them (``loadtest.cluster``: a private etcd, 3 runtimes, one
router, on 127.0.0.1), 50 small scikit-learn models, and the open-loop load generator of
``mesh-loadtest`` (``loadtest.driver``: Poisson arrivals, uniform over the models) at ``RATE``
requests/s. The failover benchmark (``loadtest.scenarios.failover``) runs the same kill at 300/s;
these tests run at 150/s because the machine's two cores also run the client, etcd and the other
tests, and a test must not fail because the client fell behind. Nothing here asserts a latency.

- SIGKILL of the runtime holding the most models: no failed request (routers retry elsewhere and
  then route around the dead instance: ``mesh.router.reachability``); its record and placements
  leave the registry within the lease TTL plus a margin; its models are loaded on the others.
- SIGTERM of a runtime: no failed request; before it exits, each of its (hot) models has a loaded
  copy elsewhere (``mesh.runtime.rehome``); slow requests in flight when the signal came (a model
  whose predict sleeps, ``tests.support.slow_model``) answer OK; it exits with code 0.
- Rolling restart: each runtime in turn gets SIGTERM, and after it exits a new process (a new
  instance ID) takes its place; no request fails.

Each test is bounded (``asyncio.wait_for`` around the whole run; subprocess waits have timeouts).
All three are marked slow: on two shared cores, starting four processes and warming 50 models
takes 20-40 s before the load begins (50-85 s per test, the rolling restart about 80 s).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from loadtest import arrivals
from loadtest.cluster import Cluster, Server
from loadtest.driver import Window, WorkerConfig, WorkerResult, start_delay_s
from loadtest.driver import run as run_driver
from loadtest.load import bytes_call
from loadtest.management import register, register_many, wait_loaded
from loadtest.models import TrainedModel, infer_body, train_logistic
from loadtest.scenarios.failover import Registry, Snapshot
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.registry.records import LOADED
from mesh.tensors import encode_request
from tests.support.slow_model import save_slow

pytestmark = pytest.mark.e2e

RATE = 150.0  # requests/s, open loop (see the module docstring)
MODELS = 50
LEASE_TTL_S = 5  # the runtimes' lease: a killed one's keys go within this (shorter than 10 s: a shorter test)
MARGIN_S = 4.0  # etcd's lease expiry check, registry polling, a loaded machine
REQUEST_TIMEOUT_S = 30.0  # per request: a slow machine delays answers, it must not fail them
INFER = "/inference.GRPCInferenceService/ModelInfer"
RUNTIME_ENV = {"MESH_REGISTRY_LEASE_TTL_S": str(LEASE_TTL_S)}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[TrainedModel]:
    directory = tmp_path_factory.mktemp("models")
    return [train_logistic(f"rel-{i:03d}", directory, n_features=8, seed=100 + i, rows=100) for i in range(MODELS)]


@dataclass
class Mesh:
    cluster: Cluster
    runtimes: list[Server]
    router: Server
    registry: Registry
    channel: grpc.aio.Channel

    def server_of(self, instance_id: str, snap: Snapshot) -> Server:
        endpoint = snap.instances[instance_id].endpoint
        return next(s for s in self.runtimes if s.endpoint == endpoint)

    def logs(self) -> str:
        return "\n".join(f"--- {s.name}\n{s.log_tail(15)}" for s in self.cluster.servers)


async def _send_each(channel: grpc.aio.Channel, models: list[TrainedModel], in_flight: int) -> dict[str, str]:
    call = bytes_call(channel, INFER)
    gate = asyncio.Semaphore(in_flight)
    failed: dict[str, str] = {}

    async def one(m: TrainedModel) -> None:
        async with gate:
            try:
                await call(infer_body(m), metadata=(("mm-model-id", m.model_id),), timeout=REQUEST_TIMEOUT_S)
            except grpc.aio.AioRpcError as err:
                failed[m.model_id] = f"{err.code().name}: {err.details()}"

    await asyncio.gather(*(one(m) for m in models))
    return failed


@asynccontextmanager
async def mesh(models: list[TrainedModel]) -> AsyncIterator[Mesh]:
    with Cluster() as cluster:
        # Started side by side (each waits for its ready file in a thread of its own).
        *runtimes, router = await asyncio.gather(
            *(asyncio.to_thread(cluster.start_runtime, f"runtime-{i}", extra_env=RUNTIME_ENV) for i in range(3)),
            asyncio.to_thread(cluster.start_router))
        registry = Registry(cluster.registry_url)
        try:
            async with grpc.aio.insecure_channel(router.endpoint) as channel:
                stub = mm_grpc.ModelMeshStub(channel)  # type: ignore[no-untyped-call]
                done, errors = await register_many(stub, [(m.model_id, str(m.path)) for m in models], in_flight=8)
                assert (done, errors) == (len(models), {})
                # One at a time, so that each model lands on its hashing home (as the failover scenario does).
                assert await _send_each(channel, models, in_flight=1) == {}
                for m in models:
                    await wait_loaded(stub, m.model_id, timeout_s=30)
                yield Mesh(cluster, runtimes, router, registry, channel)
        finally:
            await registry.close()


def _load(m: Mesh, models: list[TrainedModel], duration_s: float) -> tuple[asyncio.Task[WorkerResult], float]:
    cfg = WorkerConfig(target=m.router.endpoint, bodies=[infer_body(x) for x in models],
                       metadata=[(("mm-model-id", x.model_id),) for x in models],
                       popularity=arrivals.parse_popularity("uniform", len(models), None),
                       duration_s=duration_s, rate=RATE, timeout_s=REQUEST_TIMEOUT_S, seed=7)
    windows: list[Window] = []
    start_wall = time.time() + start_delay_s(1)
    return asyncio.create_task(run_driver(cfg, windows.append, start_wall)), start_wall


async def _sleep_until(wall: float) -> None:
    await asyncio.sleep(max(wall - time.time(), 0))


async def _wait_exit(server: Server, timeout_s: float = 60.0) -> float:
    """Wall time by which the process had exited."""
    await asyncio.to_thread(server.proc.wait, timeout_s)
    return time.time()


def _check_load(result: WorkerResult, m: Mesh) -> None:
    assert result.sent > 0.6 * RATE * 5, result.sent
    assert result.errors == {}, f"failed requests {result.errors}\n{m.logs()}"
    assert result.ok == result.sent


# --- 1. SIGKILL ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_under_load_fails_no_request(models: list[TrainedModel]) -> None:
    async def scenario() -> None:
        async with mesh(models) as m:
            load, start = _load(m, models, duration_s=LEASE_TTL_S + 9)
            await _sleep_until(start + 3)
            before = await m.registry.read()
            loaded = before.loaded_by_instance()
            victim_id = max(loaded, key=lambda i: len(loaded[i]))
            victim = m.server_of(victim_id, before)
            victim.proc.send_signal(signal.SIGKILL)  # by the PID of the process we started
            killed = time.time()
            gone_after = None
            while time.time() < killed + LEASE_TTL_S + MARGIN_S:
                snap = await m.registry.read()
                if victim_id not in snap.instances and all(p.instance_id != victim_id for p in snap.placements):
                    gone_after = time.time() - killed
                    break
                await asyncio.sleep(0.1)
            result = await load
            _check_load(result, m)
            assert victim.proc.wait(5) == -signal.SIGKILL
            assert gone_after is not None, f"victim's keys still in the registry {LEASE_TTL_S + MARGIN_S} s after"
            # The router marked it unreachable for all requests, not only the one that found it dead.
            marked = m.router.events("instance unreachable; routing around it until it answers or its lease expires")
            assert victim_id in {e.get("instance_id") for e in marked}, m.router.log_tail()
            # Its models are served from the others: loaded there, and every model answers.
            end = await m.registry.read()
            survivors = set().union(*(ids for i, ids in end.loaded_by_instance().items() if i != victim_id))
            assert loaded[victim_id] <= survivors
            assert await _send_each(m.channel, models, in_flight=8) == {}
            print(f"\nSIGKILL: {result.sent} requests at {RATE:g}/s, 0 failed; victim held "
                  f"{len(loaded[victim_id])} models; keys gone after {gone_after:.1f} s")

    asyncio.run(asyncio.wait_for(scenario(), 240))


# --- 2. SIGTERM --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_rehomes_hot_models_and_finishes_in_flight(models: list[TrainedModel], tmp_path: Path) -> None:
    slow_path = save_slow(tmp_path, "slow", delay_s=1.5)
    slow_body = encode_request(model_name="slow", inputs={"x": np.zeros((1, 4), np.float32)},
                               raw=True).SerializeToString()

    async def scenario() -> None:
        async with mesh(models) as m:
            stub = mm_grpc.ModelMeshStub(m.channel)  # type: ignore[no-untyped-call]
            await register(stub, "slow", str(slow_path))
            call = bytes_call(m.channel, INFER)
            await call(slow_body, metadata=(("mm-model-id", "slow"),), timeout=REQUEST_TIMEOUT_S)
            await wait_loaded(stub, "slow", timeout_s=30)
            load, start = _load(m, models, duration_s=14)
            await _sleep_until(start + 3)
            snap = await m.registry.read()
            loaded = snap.loaded_by_instance()
            victim_id = next(i for i, ids in loaded.items() if "slow" in ids)  # the slow model's holder
            victim = m.server_of(victim_id, snap)
            slow = [asyncio.ensure_future(call(slow_body, metadata=(("mm-model-id", "slow"),),
                                               timeout=REQUEST_TIMEOUT_S)) for _ in range(2)]
            await asyncio.sleep(0.3)  # the slow requests are in the runtime's predict now
            victim.proc.send_signal(signal.SIGTERM)
            signalled = time.time()
            exited = await _wait_exit(victim)
            after_exit = await m.registry.read()
            # In-flight requests finished: the slow ones answer OK (an error raises here).
            await asyncio.gather(*slow)
            result = await load
            _check_load(result, m)
            assert victim.proc.returncode == 0, victim.log_tail()
            # Before it exited, each of its models had a loaded copy on another instance.
            hot = loaded[victim_id]
            elsewhere = {p.model_id for p in after_exit.placements
                         if p.state == LOADED and p.instance_id != victim_id and p.loaded_ms <= exited * 1000}
            assert hot <= elsewhere, f"not re-homed: {sorted(hot - elsewhere)}\n{victim.log_tail()}"
            [rehomed] = victim.events("re-homed models")
            assert rehomed["hot"] == len(hot) and rehomed["failed"] == 0, rehomed
            [drained] = victim.events("drained")
            assert drained["in_flight_left"] == 0
            assert victim_id not in after_exit.instances  # the lease was revoked on the way out
            print(f"\nSIGTERM: {result.sent} requests at {RATE:g}/s, 0 failed; victim exited "
                  f"{exited - signalled:.1f} s after the signal; re-homing: {rehomed}")

    asyncio.run(asyncio.wait_for(scenario(), 240))


# --- 3. rolling restart --------------------------------------------------------------------------------
@pytest.mark.slow
def test_rolling_restart_under_load_fails_no_request(models: list[TrainedModel]) -> None:
    async def scenario() -> None:
        async with mesh(models) as m:
            load, start = _load(m, models, duration_s=50)  # starting a runtime takes ~10 s here
            await _sleep_until(start + 2)
            old = list(m.runtimes)
            for server in old:
                server.proc.send_signal(signal.SIGTERM)
                await _wait_exit(server)
                assert server.proc.returncode == 0, server.log_tail()
                new = await asyncio.to_thread(m.cluster.start_runtime, f"{server.name}-new", extra_env=RUNTIME_ENV)
                m.runtimes.append(new)
            restarted = time.time() - start
            result = await load
            _check_load(result, m)
            end = await m.registry.read()
            assert {r.endpoint for r in end.instances.values()} == {s.endpoint for s in m.runtimes[3:]}
            assert await _send_each(m.channel, models, in_flight=8) == {}
            print(f"\nrolling restart: 3 runtimes in {restarted:.1f} s; {result.sent} requests at {RATE:g}/s, 0 failed")

    asyncio.run(asyncio.wait_for(scenario(), 300))
