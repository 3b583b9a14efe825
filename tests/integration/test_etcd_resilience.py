"""The registry against a real etcd that dies, restarts, and outlives its clients.

(a) a publisher killed with SIGKILL loses its keys within TTL + 2 s; (b) a watch resumes after etcd
restarts; (c) a session re-publishes after its lease was lost during an outage; (d) calls fail fast,
naming the endpoint, while etcd is down or silent, and fail over to a live endpoint.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from mesh.errors import RegistryUnavailable
from mesh.registry import etcd_server, open_store
from mesh.registry.etcd import EtcdStore
from mesh.registry.etcd_server import EtcdProcess, _free_ports
from mesh.registry.keys import Keys
from mesh.registry.mirror import PrefixMirror
from mesh.registry.session import RegistrySession

pytestmark = pytest.mark.integration

T = TypeVar("T")
WAIT_S = 15.0
REPO = Path(__file__).resolve().parents[2]

# A runtime-like publisher: one session, a few keys, then it idles until killed.
PUBLISHER = """
import asyncio, sys
from mesh.registry import open_store
from mesh.registry.session import RegistrySession

async def main() -> None:
    store, _ = open_store(sys.argv[1])
    session = RegistrySession(store, ttl_s=int(sys.argv[2]))
    await session.start()
    for key in sys.argv[3:]:
        await session.put(key, b"alive")
    print("published", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def eventually(op: Callable[[], Awaitable[T]], within_s: float = WAIT_S) -> T:
    """Retry ``op`` while the registry is unreachable (right after a restart: nothing to wait on)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await op()
        except RegistryUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.fixture
async def store(etcd: EtcdProcess) -> AsyncIterator[EtcdStore]:
    s = EtcdStore([etcd.endpoint], timeout_s=1.0)
    yield s
    await s.close()


async def test_killed_publisher_keys_vanish_within_ttl(etcd: EtcdProcess, store: EtcdStore) -> None:
    ttl = 2
    keys = Keys("/mesh/")
    published = [keys.instance("i1"), keys.placement("m/1", "i1"), keys.placement("m2", "i1")]
    mirror = PrefixMirror(store, "/mesh/")
    await mirror.start()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PUBLISHER, etcd.url, str(ttl), *published,
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert child.stdout is not None
        async with asyncio.timeout(WAIT_S):
            while (await child.stdout.readline()).strip() != b"published":
                if child.stdout.at_eof():
                    pytest.fail("the publisher exited before publishing")
        await asyncio.wait_for(mirror.wait_until(lambda: len(mirror.items) == 3), WAIT_S)
        leases = {(await store.get(k)).lease for k in published}  # type: ignore[union-attr]
        assert len(leases) == 1 and 0 not in leases

        os.kill(child.pid, signal.SIGKILL)  # no revoke, no goodbye
        killed_at = time.monotonic()
        await child.wait()
        await asyncio.wait_for(mirror.wait_until(lambda: not mirror.items), ttl + 2)
        assert time.monotonic() - killed_at <= ttl + 2
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        await mirror.stop()


async def test_stopped_keepalive_in_process_expires_keys(store: EtcdStore) -> None:
    session = RegistrySession(store, ttl_s=2)
    await session.start()
    await session.put("/mesh/instances/i1", b"")
    lease = session.lease
    assert lease is not None
    await session.close(revoke=False)
    store.stop_keepalive(lease)  # as if the process froze
    stopped_at = time.monotonic()
    mirror = PrefixMirror(store, "/mesh/instances/")
    await mirror.start()
    try:
        await asyncio.wait_for(mirror.wait_until(lambda: not mirror.items), lease.ttl_s + 2)
        assert time.monotonic() - stopped_at <= lease.ttl_s + 2
    finally:
        await mirror.stop()


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_watch_resumes_after_etcd_restart(etcd: EtcdProcess, store: EtcdStore, how: str) -> None:
    mirror = PrefixMirror(store, "/mesh/placements/")
    await mirror.start()
    writer = EtcdStore([etcd.endpoint], timeout_s=1.0)
    try:
        await writer.put("/mesh/placements/before", b"1")
        await asyncio.wait_for(mirror.wait_until(lambda: "/mesh/placements/before" in mirror.items), WAIT_S)
        url = etcd.url
        etcd.stop() if how == "stop" else etcd.kill()
        with pytest.raises(RegistryUnavailable):
            await writer.put("/mesh/placements/down", b"")
        etcd.restart()
        assert etcd.url == url  # same ports and data: clients need not be told anything
        await eventually(lambda: writer.put("/mesh/placements/after", b"2"))
        await writer.delete("/mesh/placements/before")
        await asyncio.wait_for(
            mirror.wait_until(lambda: set(mirror.items) == {"/mesh/placements/after"}), WAIT_S
        )
        assert mirror.ready
    finally:
        await mirror.stop()
        await writer.close()


async def test_session_republishes_after_an_outage_longer_than_its_ttl(
    etcd: EtcdProcess, store: EtcdStore
) -> None:
    session = RegistrySession(store, ttl_s=2, name="outage", backoff_s=(0.1, 1.0))
    await session.start()
    try:
        await session.put("/mesh/instances/i1", b"record")
        await session.put("/mesh/placements/m/i1", b"loaded")
        old = session.lease
        assert old is not None
        etcd.stop()
        # The keep-alive keeps trying until the TTL has surely run out, then reports the loss.
        await asyncio.wait_for(old.lost.wait(), old.ttl_s + 3)
        assert not session.synced
        etcd.restart()
        await asyncio.wait_for(session.wait_synced(), WAIT_S)
        new = session.lease
        assert new is not None and new.id != old.id
        for key in ("/mesh/instances/i1", "/mesh/placements/m/i1"):
            kv = await store.get(key)
            assert kv is not None and kv.lease == new.id
    finally:
        await session.close()


async def test_session_write_during_outage_is_retried(etcd: EtcdProcess, store: EtcdStore) -> None:
    session = RegistrySession(store, ttl_s=5, name="retry", backoff_s=(0.1, 0.5))
    await session.start()
    try:
        etcd.stop()
        with pytest.raises(RegistryUnavailable):
            await session.put("/mesh/placements/m/i1", b"loaded")
        assert not session.synced
        etcd.restart()  # shorter than the TTL: the same lease survives
        await asyncio.wait_for(session.wait_synced(), WAIT_S)
        kv = await store.get("/mesh/placements/m/i1")
        assert session.lease is not None
        assert kv is not None and kv.value == b"loaded" and kv.lease == session.lease.id
    finally:
        await session.close()


async def test_calls_fail_fast_naming_the_endpoint_while_etcd_is_down(
    etcd: EtcdProcess, store: EtcdStore
) -> None:
    await store.put("/mesh/k", b"")
    etcd.stop()
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.get("/mesh/k"),
        lambda: store.put("/mesh/k", b""),
        lambda: store.get_prefix("/mesh/"),
        lambda: store.create("/mesh/new", b""),
        lambda: store.replace("/mesh/k", b"", expected_mod_revision=1),
        lambda: store.delete("/mesh/k"),
        lambda: store.grant_lease(5),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable) as info:
            await call()
        assert time.monotonic() - started < store.timeout_s + 1
        assert f"registry etcd://{etcd.endpoint} unavailable" in str(info.value)


@pytest.fixture
async def silent_endpoint() -> AsyncIterator[str]:
    """A TCP port that accepts connections and never answers: a hung or partitioned member."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"127.0.0.1:{port}"
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_silent_endpoint_times_out_within_the_deadline(silent_endpoint: str) -> None:
    store = EtcdStore([silent_endpoint], timeout_s=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable) as info:
            await store.get("/mesh/k")
        assert time.monotonic() - started < store.timeout_s + 1
        assert silent_endpoint in str(info.value)
    finally:
        await store.close()


async def test_fails_over_to_the_next_endpoint(etcd: EtcdProcess, silent_endpoint: str) -> None:
    (refused_port,) = _free_ports(1)  # nothing listens there
    refused = f"127.0.0.1:{refused_port}"
    store, prefix = open_store(f"etcd://{refused},{etcd.endpoint}/app", timeout_s=1.0)
    try:
        assert prefix == "/app/"
        # A conditional write fails over too when the request provably never left (no connection).
        assert await store.create("/app/c", b"")
        await store.close()
        store, _ = open_store(f"etcd://{refused},{etcd.endpoint}/app", timeout_s=1.0)
        await store.put("/app/k", b"1")  # the refused member is skipped within the same call
        kv = await store.get("/app/k")
        assert kv is not None and kv.value == b"1"
    finally:
        await store.close()
    # A silent member uses up the call's deadline (a write may have landed: never replayed
    # elsewhere), but the next call starts at the following member.
    store2 = EtcdStore([silent_endpoint, etcd.endpoint], timeout_s=0.5, first=0)
    try:
        with pytest.raises(RegistryUnavailable, match=silent_endpoint):
            await store2.get("/app/k")
        assert await store2.get("/app/k") is not None
    finally:
        await store2.close()


def test_etcd_process_retries_on_a_port_collision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    real = etcd_server._free_ports
    picks = iter([[taken.getsockname()[1], *real(2)]])
    monkeypatch.setattr(etcd_server, "_free_ports", lambda n: next(picks, None) or real(n))
    server = EtcdProcess(tmp_path / "etcd")
    try:
        server.start()  # the first pick collides; the second set of ports works
        assert server.running and server.client_port != taken.getsockname()[1]
        assert "address already in use" in server.log_path.read_text()
        pid = server.pid
        server.restart()
        assert server.running and server.pid != pid
    finally:
        server.stop()
        taken.close()
    assert not server.running
