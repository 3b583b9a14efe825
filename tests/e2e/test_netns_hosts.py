"""Routing, failover and leases across hosts: etcd, a router and two runtimes, each in a network
namespace of its own with a delay on its link (issue 22, item 5).

Real parts throughout: ``loadtest.netns.Hosts`` makes the hosts (namespaces on one bridge; every
frame a host sends waits ``delay`` on its link, so a round trip between two hosts takes twice that);
``loadtest.cluster`` starts etcd, the runtimes and the router inside them, each bound to its host's
address. This process is the client, on the bridge. The model is a real scikit-learn classifier
(``tests.support.models``); answers are compared with what the model itself predicts.

Asserted, at 0.2 ms and at 1 ms, what the single-machine failover tests
(``test_reliability_restarts``, ``test_scenario_failover``) assert on 127.0.0.1:

- SIGKILL of the runtime holding the model, with requests flowing: no request fails (the router
  retries on the other runtime host, which loads the model); the router marks the dead instance
  unreachable; its instance record and placements leave the registry within the lease TTL plus a
  margin; the model is loaded on the survivor; the survivor never lost its lease to the delay.
- A runtime frozen (SIGSTOP) past its lease TTL: its keys expire (nobody revoked them), the router
  then serves the model from the other host, and once thawed the runtime notices its lost lease and
  re-publishes under a new one.

And the support module itself: the delay is really there (a TCP handshake between two hosts takes
at least two delays: a lower bound, which no slow machine breaks) and nothing is left behind.

Needs root (network namespaces; CI runs as root). Marked slow: each mesh test starts four
processes across hosts and waits out a lease (30-50 s each on two cores).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from loadtest.cluster import Cluster, Server
from loadtest.netns import Hosts, ip
from loadtest.scenarios.failover import Registry, Snapshot
from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.tensors import decode_response, encode_request
from tests.support.models import ModelArtifact, make_model

pytestmark = [
    pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="network namespaces need root and iproute2 (CI runs as root)"),
]

LEASE_TTL_S = 5
MARGIN_S = 4.0  # etcd's lease expiry check, registry polling, a loaded machine (as test_reliability_restarts)
REQUEST_TIMEOUT_S = 30.0  # a slow machine delays answers; it must not fail them
MODEL_ID = "netns-sklearn"
UNREACHABLE = "instance unreachable; routing around it until it answers or its lease expires"
LEASE_LOST = "registry lease lost; re-publishing under a new lease"
RUNTIME_ENV = {"MESH_REGISTRY_LEASE_TTL_S": str(LEASE_TTL_S), "MESH_RUNTIME_SUPPORTED_TYPES": "sklearn"}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ModelArtifact:
    return make_model("sklearn", tmp_path_factory.mktemp("models"), seed=1)


@dataclass
class Mesh:
    hosts: Hosts
    cluster: Cluster
    runtimes: dict[str, Server]  # by instance ID
    router: Server
    registry: Registry
    channel: grpc.aio.Channel

    async def infer(self, model: ModelArtifact) -> None:
        request = encode_request(model_name="", inputs={"input-0": model.sample})
        reply = await pb_grpc.GRPCInferenceServiceStub(self.channel).ModelInfer(  # type: ignore[no-untyped-call]
            request, metadata=(("mm-model-id", MODEL_ID),), timeout=REQUEST_TIMEOUT_S)
        np.testing.assert_array_equal(decode_response(reply)["predict"], model.expected["predict"])

    def holders(self, snap: Snapshot) -> set[str]:
        return {i for i, models in snap.loaded_by_instance().items() if MODEL_ID in models}

    async def until(self, what: str, check, within_s: float) -> float:  # type: ignore[no-untyped-def]
        """Seconds until ``check(snapshot)`` holds (the registry is polled: there is no event to wait on)."""
        started = time.monotonic()
        while not check(await self.registry.read()):
            assert time.monotonic() - started < within_s, f"{what}: not within {within_s} s\n{self.logs()}"
            await asyncio.sleep(0.1)
        return time.monotonic() - started

    def logs(self) -> str:
        return "\n".join(f"--- {s.name}\n{s.log_tail(15)}" for s in self.cluster.servers)


@contextlib.asynccontextmanager
async def mesh(delay_ms: float, model: ModelArtifact) -> AsyncIterator[Mesh]:
    with Hosts(["etcd", "router", "runtime-a", "runtime-b"], delay_ms=delay_ms) as hosts, \
            Cluster(etcd_host=hosts["etcd"]) as cluster:
        a, b, router = await asyncio.gather(
            *(asyncio.to_thread(cluster.start_runtime, name, extra_env=RUNTIME_ENV, host=hosts[name])
              for name in ("runtime-a", "runtime-b")),
            asyncio.to_thread(cluster.start_router, host=hosts["router"]))
        assert router.endpoint.startswith(hosts["router"].address)
        registry = Registry(cluster.registry_url)
        try:
            async with grpc.aio.insecure_channel(router.endpoint) as channel:
                m = Mesh(hosts, cluster, {}, router, registry, channel)
                await m.until("both runtimes registered", lambda s: len(s.instances) == 2, 30)
                snap = await registry.read()
                for iid, record in snap.instances.items():
                    m.runtimes[iid] = next(s for s in (a, b) if s.endpoint == record.endpoint)
                assert {r.endpoint.split(":")[0] for r in snap.instances.values()} == {
                    hosts["runtime-a"].address, hosts["runtime-b"].address}
                await mm_grpc.ModelMeshStub(channel).registerModel(  # type: ignore[no-untyped-call]
                    mm.RegisterModelRequest(modelId=MODEL_ID, modelInfo=mm.ModelInfo(
                        type="sklearn", path=str(model.path))), timeout=REQUEST_TIMEOUT_S)
                await m.infer(model)  # loads it on its home
                await m.until("a loaded copy", lambda s: len(m.holders(s)) == 1, 30)
                yield m
        finally:
            await registry.close()


class Requests:
    """One request after another through the router; every failure is kept."""

    def __init__(self, m: Mesh, model: ModelArtifact) -> None:
        self.ok = 0
        self.failures: list[str] = []
        self._m, self._model = m, model
        self._task = asyncio.create_task(self._run(), name="requests")

    async def _run(self) -> None:
        while True:
            try:
                await self._m.infer(self._model)
                self.ok += 1
            except (grpc.aio.AioRpcError, AssertionError) as exc:
                self.failures.append(str(exc)[:300])
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@pytest.mark.parametrize("delay_ms", [0.2, 1.0])
def test_sigkill_of_a_runtime_host_fails_no_request(delay_ms: float, model: ModelArtifact) -> None:
    async def scenario() -> None:
        async with mesh(delay_ms, model) as m:
            [victim_id] = m.holders(await m.registry.read())
            [survivor_id] = set(m.runtimes) - {victim_id}
            victim = m.runtimes[victim_id]
            requests = Requests(m, model)
            await asyncio.sleep(1.0)
            victim.proc.send_signal(signal.SIGKILL)  # by the PID of the process we started
            killed = time.monotonic()
            gone = await m.until("the victim's keys gone", lambda s: victim_id not in s.instances and all(
                p.instance_id != victim_id for p in s.placements), LEASE_TTL_S + MARGIN_S)
            await m.until("the model loaded on the survivor", lambda s: m.holders(s) == {survivor_id}, 30)
            await asyncio.sleep(1.0)
            await requests.stop()
            assert requests.failures == [], f"failed requests {requests.failures[:5]}\n{m.logs()}"
            assert requests.ok > 10
            assert victim.proc.wait(5) == -signal.SIGKILL
            marked = m.router.events(UNREACHABLE)
            assert victim_id in {e.get("instance_id") for e in marked}, m.router.log_tail()
            assert m.runtimes[survivor_id].events(LEASE_LOST) == []  # keep-alives crossed the delay
            await m.infer(model)
            print(f"\ndelay {delay_ms} ms: {requests.ok} requests, none failed; victim's keys gone "
                  f"{gone:.1f} s after SIGKILL ({time.monotonic() - killed:.1f} s to the end)")

    asyncio.run(asyncio.wait_for(scenario(), 240))


def test_a_frozen_runtime_host_loses_its_lease_and_republishes(model: ModelArtifact) -> None:
    async def scenario() -> None:
        async with mesh(1.0, model) as m:
            [frozen_id] = m.holders(await m.registry.read())
            [other_id] = set(m.runtimes) - {frozen_id}
            frozen = m.runtimes[frozen_id]
            frozen.proc.send_signal(signal.SIGSTOP)
            try:
                expired = await m.until("the frozen runtime's lease expired", lambda s: frozen_id not in s.instances
                                        and all(p.instance_id != frozen_id for p in s.placements),
                                        LEASE_TTL_S + MARGIN_S)
                await m.infer(model)  # served from the other host now
                await m.until("the model loaded on the other runtime", lambda s: other_id in m.holders(s), 30)
            finally:
                frozen.proc.send_signal(signal.SIGCONT)
            await m.until("the thawed runtime back in the registry", lambda s: frozen_id in s.instances, 30)
            assert frozen.events(LEASE_LOST), frozen.log_tail()
            assert m.runtimes[other_id].events(LEASE_LOST) == []
            assert frozen.proc.poll() is None
            await m.infer(model)
            print(f"\ndelay 1 ms: the frozen runtime's keys expired {expired:.1f} s after SIGSTOP")

    asyncio.run(asyncio.wait_for(scenario(), 240))


_HANDSHAKES = """
import socket, sys, time
took = []
for _ in range(20):
    started = time.perf_counter()
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    took.append(time.perf_counter() - started)
print(min(took) * 1000)
"""


def test_hosts_hold_each_frame_and_leave_nothing_behind() -> None:
    delay_ms = 1.0
    with Hosts(["a", "b"], delay_ms=delay_ms) as hosts:
        tag, namespaces = hosts.tag, [h.netns for h in hosts.hosts]
        listener = subprocess.Popen(hosts["a"].argv([sys.executable, "-c", (
            "import socket, sys\ns = socket.create_server((sys.argv[1], 9000))\nprint('up', flush=True)\n"
            "while True: s.accept()[0].close()"), hosts["a"].address]), stdout=subprocess.PIPE, text=True)
        try:
            assert listener.stdout is not None and listener.stdout.readline().strip() == "up"
            done = subprocess.run(hosts["b"].argv([sys.executable, "-c", _HANDSHAKES, hosts["a"].address, "9000"]),
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            fastest_ms = float(done.stdout)
            # SYN waits on b's link, SYN-ACK on a's: no handshake can be faster than two delays.
            assert fastest_ms >= 2 * delay_ms, fastest_ms
            hosts.set_delay(0.0)
        finally:
            listener.kill()
            listener.wait(10)
        print(f"\nfastest TCP handshake between two hosts at {delay_ms} ms: {fastest_ms:.3f} ms ({hosts.method})")
    assert not set(namespaces) & set(ip("netns", "list").split())
    # The bridge, and the TAPs or veth ends on it: all gone.
    assert re.search(rf"\bmh(b{tag}|{tag}[io]\d)", ip("-o", "link", "show")) is None


def test_hop_across_hosts_reports_each_delay(tmp_path: Path) -> None:
    """``hop --netns-delays`` end to end, short: a row per delay, real delays, nothing left behind."""
    out = tmp_path / "hop.json"
    before = set(ip("netns", "list").split())
    done = subprocess.run([sys.executable, "-m", "loadtest.scenarios.hop", "--netns-delays", "0,0.5", "--duration", "1",
                           "--rounds", "1", "--warmup", "0.1", "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    result = json.loads(out.read_text())["result"]
    assert list(result["delays"]) == ["0", "0.5"]
    for row in result["delays"].values():
        for path in ("direct", "routed"):
            assert row[path]["requests"] > 0 and row[path]["errors"] == {}, row
    # Two links (0.5 ms each way) in a handshake: never under 1 ms.
    assert result["delays"]["0.5"]["handshake_ms"]["min"] >= 1.0
    assert "| delay per link (ms) |" in json.loads(out.read_text())["markdown"]
    assert not {n for n in set(ip("netns", "list").split()) - before if n.startswith("mesh-h")}


@pytest.mark.parametrize("value", ["0,x", "0,500", ""])
def test_hop_bad_delays_are_one_line(value: str) -> None:
    done = subprocess.run([sys.executable, "-m", "loadtest.scenarios.hop", "--netns-delays", value],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "--netns-delays" in done.stderr.strip().splitlines()[-1]
