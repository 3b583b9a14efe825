"""One semantic suite for both registry stores: MemoryStore and EtcdStore (a real etcd on 127.0.0.1).

Every test taking ``h`` runs against both. They differ only in how time passes for leases: the
memory store runs on a fake clock the test advances, etcd on real time with 1-2 s TTLs. The same
file covers PrefixMirror and RegistrySession over both stores, and open_store's URL parsing.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import pytest

from mesh.errors import FailedPrecondition, InvalidArgument
from mesh.registry import open_store
from mesh.registry.base import EventType, KeyValue, Lease, WatchEvent, WatchReset
from mesh.registry.etcd import EtcdStore
from mesh.registry.etcd_server import EtcdProcess
from mesh.registry.keys import Keys
from mesh.registry.memory import MemoryStore
from mesh.registry.mirror import PrefixMirror
from mesh.registry.session import RegistrySession

WAIT_S = 10.0  # bound on anything awaited from a real etcd; passing runs take a fraction of it

Item = WatchEvent | WatchReset


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Harness:
    kind: str
    store: MemoryStore | EtcdStore
    clock: FakeClock | None = None
    etcd: EtcdProcess | None = None

    async def owner_dies(self, lease: Lease, key: str) -> None:
        """Stop keeping ``lease`` alive without revoking it; return once it expired (``key`` gone)."""
        self.store.stop_keepalive(lease)
        if isinstance(self.store, MemoryStore):
            assert self.clock is not None
            self.clock.advance(lease.ttl_s - 0.5)
            assert self.store.expire_leases() == []  # not before its TTL
            self.clock.advance(1.0)
            assert self.store.expire_leases() == [lease.id]
        else:
            await wait_deleted(self.store, key, within_s=lease.ttl_s + 3)

    async def let_time_pass(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.advance(seconds)
            assert isinstance(self.store, MemoryStore)
            self.store.expire_leases()
        else:
            await asyncio.sleep(seconds)  # a real server's lease clock: only real time moves it

    def second_client(self) -> MemoryStore | EtcdStore:
        if isinstance(self.store, MemoryStore):
            return MemoryStore(self.store.backend)
        assert self.etcd is not None
        return EtcdStore([self.etcd.endpoint])


@pytest.fixture(params=["memory", "etcd"])
async def h(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock = FakeClock()
        harness = Harness("memory", MemoryStore(clock=clock), clock=clock)
    else:
        etcd: EtcdProcess = request.getfixturevalue("etcd")
        harness = Harness("etcd", EtcdStore([etcd.endpoint]), etcd=etcd)
    yield harness
    await harness.store.close()


async def collect(store: Any, prefix: str, start_revision: int, count: int, **watch: Any) -> list[Item]:
    out: list[Item] = []
    async with aclosing(store.watch_prefix(prefix, start_revision=start_revision, **watch)) as items:
        async with asyncio.timeout(WAIT_S):
            async for item in items:
                out.append(item)
                if len(out) == count:
                    return out
    return out


async def wait_deleted(store: Any, key: str, within_s: float) -> None:
    kv = await store.get(key)
    if kv is None:
        return
    async with aclosing(store.watch_prefix(key, start_revision=kv.mod_revision + 1)) as items:
        async with asyncio.timeout(within_s):
            async for item in items:
                if isinstance(item, WatchEvent) and item.key == key and item.type is EventType.DELETE:
                    return


async def revision(store: Any) -> int:
    _, rev = await store.get_prefix("/", limit=1)
    return int(rev)


# -- key/value ------------------------------------------------------------------------------------


async def test_put_get_and_revisions(h: Harness) -> None:
    s = h.store
    r1 = await s.put("/t/a", b"1")
    r2 = await s.put("/t/b", b"2")
    assert r2 == r1 + 1
    assert await s.get("/t/a") == KeyValue("/t/a", b"1", r1, r1, 0)
    r3 = await s.put("/t/a", b"1b")
    assert await s.get("/t/a") == KeyValue("/t/a", b"1b", r3, r1, 0)  # create_revision survives
    assert await s.get("/t/missing") is None
    assert await revision(s) == r3


async def test_get_prefix_sorted_paged_and_bounded(h: Harness) -> None:
    s = h.store
    names = [f"k{i:03d}" for i in range(25)]
    random.Random(7).shuffle(names)
    for name in names:
        await s.put("/p/" + name, name.encode())
    await s.put("/p0", b"sibling")  # shares the bytes "/p" but not the prefix "/p/"
    last = await s.put("/o", b"before")
    items, rev = await s.get_prefix("/p/")
    assert [kv.key for kv in items] == sorted("/p/" + n for n in names)
    assert rev == last
    pages: list[list[str]] = []
    after = ""
    while True:
        page, _ = await s.get_prefix("/p/", limit=10, start_after=after)
        pages.append([kv.key for kv in page])
        if len(page) < 10:
            break
        after = page[-1].key
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [key for page in pages for key in page] == [kv.key for kv in items]
    assert (await s.get_prefix("/p/", start_after="/p/zzz"))[0] == []
    assert len((await s.get_prefix(""))[0]) == 27  # the empty prefix is everything


async def test_create_only_if_absent(h: Harness) -> None:
    s = h.store
    assert await s.create("/c/x", b"1")
    assert not await s.create("/c/x", b"2")
    kv = await s.get("/c/x")
    assert kv is not None and kv.value == b"1"


async def test_replace_is_compare_and_swap_on_mod_revision(h: Harness) -> None:
    s = h.store
    rev = await s.put("/c/k", b"1")
    assert await s.replace("/c/k", b"2", expected_mod_revision=rev)
    assert not await s.replace("/c/k", b"3", expected_mod_revision=rev)  # stale
    kv = await s.get("/c/k")
    assert kv is not None and kv.value == b"2" and kv.mod_revision > rev
    # mod_revision 0 means "absent", as in etcd
    assert not await s.replace("/c/k", b"x", expected_mod_revision=0)
    assert await s.replace("/c/new", b"n", expected_mod_revision=0)


async def test_conditional_delete(h: Harness) -> None:
    s = h.store
    rev = await s.put("/d/k", b"1")
    assert not await s.delete("/d/k", expected_mod_revision=rev + 100)
    assert await s.get("/d/k") is not None
    assert await s.delete("/d/k", expected_mod_revision=rev)
    assert await s.get("/d/k") is None
    assert not await s.delete("/d/k")
    assert not await s.delete("/d/k", expected_mod_revision=rev)
    await s.put("/d/k", b"2")
    assert await s.delete("/d/k")


async def test_delete_prefix_is_one_revision(h: Harness) -> None:
    s = h.store
    start = await revision(s) + 1
    for name in ("a", "b", "c"):
        await s.put("/dp/" + name, b"")
    await s.put("/dp0", b"outside")
    assert await s.delete_prefix("/dp/") == 3
    assert await s.get("/dp0") is not None
    events = await collect(s, "/dp/", start, 6)
    deletes = [e for e in events if isinstance(e, WatchEvent) and e.type is EventType.DELETE]
    assert [e.key for e in deletes] == ["/dp/a", "/dp/b", "/dp/c"]
    assert len({e.mod_revision for e in deletes}) == 1


async def test_empty_key_is_rejected(h: Harness) -> None:
    with pytest.raises(InvalidArgument):
        await h.store.put("", b"x")


# -- watches ----------------------------------------------------------------------------------------


async def test_watch_replays_history_in_order_then_follows(h: Harness) -> None:
    s = h.store
    start = await revision(s) + 1
    await s.put("/w/a", b"1")
    await s.put("/w/b", b"2")
    await s.put("/x/outside", b"")
    await s.delete("/w/a")
    # Two concurrent watchers, one from the start and one from the third change on.
    first = asyncio.create_task(collect(s, "/w/", start, 5))
    second = asyncio.create_task(collect(s, "/w/", start + 3, 3))
    await s.put("/w/c", b"3")
    await s.put("/w/b", b"2b")
    got = await first
    assert [(e.type, e.key, e.value) for e in got if isinstance(e, WatchEvent)] == [
        (EventType.PUT, "/w/a", b"1"),
        (EventType.PUT, "/w/b", b"2"),
        (EventType.DELETE, "/w/a", b""),
        (EventType.PUT, "/w/c", b"3"),
        (EventType.PUT, "/w/b", b"2b"),
    ]
    revisions = [e.mod_revision for e in got if isinstance(e, WatchEvent)]
    assert revisions == sorted(revisions) and len(set(revisions)) == 5
    assert [e for e in await second] == got[2:]


async def test_a_deletes_only_watch_never_sees_a_put(h: Harness) -> None:
    # What a runtime's registration watch is (mesh.registry.specs): etcd's NOPUT filter, so that
    # registrations of models a runtime does not hold never reach it.
    s = h.store
    start = await revision(s) + 1
    await s.put("/d/a", b"1")
    await s.put("/d/b", b"2")
    await s.delete("/d/a")
    await s.put("/d/a", b"3")
    await s.delete("/d/b")
    got = await collect(s, "/d/", start, 2, deletes_only=True)
    assert [(e.type, e.key) for e in got if isinstance(e, WatchEvent)] == [
        (EventType.DELETE, "/d/a"), (EventType.DELETE, "/d/b")]


async def test_compaction_gives_a_reset_with_the_snapshot(h: Harness) -> None:
    s = h.store
    start = await revision(s) + 1
    await s.put("/r/a", b"1")
    await s.put("/r/b", b"2")
    await s.delete("/r/a")
    await s.put("/r/c", b"3")
    compacted_at = await s.put("/other", b"")
    await s.compact(compacted_at)
    await s.compact(compacted_at)  # again: a no-op, as with etcd's "already compacted"
    with pytest.raises(InvalidArgument):
        await s.compact(compacted_at + 100)  # the future

    snapshot, _ = await s.get_prefix("/r/")
    async with aclosing(s.watch_prefix("/r/", start_revision=start)) as stale:
        first = await asyncio.wait_for(anext(stale), WAIT_S)
        assert isinstance(first, WatchReset)
        assert first.snapshot == snapshot
        assert first.revision >= compacted_at
        # Written after the reset, so it must come as an event rather than in the snapshot.
        put_rev = await s.put("/r/d", b"4")
        event = WatchEvent(EventType.PUT, "/r/d", b"4", put_rev)
        assert await asyncio.wait_for(anext(stale), WAIT_S) == event
    # Starting exactly at the compaction point is allowed (etcd keeps that revision).
    assert await collect(s, "/r/", compacted_at, 1) == [event]


async def test_a_reset_reads_its_snapshot_in_pages_or_not_at_all(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a compaction the snapshot is read in pages at one revision (etcd: RELIST_PAGE keys per
    request, made 3 here), whole; a consumer that asks for no snapshot gets none."""
    from mesh.registry import etcd as etcd_module

    monkeypatch.setattr(etcd_module, "RELIST_PAGE", 3)
    s = h.store
    start = await revision(s) + 1
    for i in range(10):
        await s.put(f"/p/{i:02d}", str(i).encode())
    compacted_at = await s.put("/other", b"")
    await s.compact(compacted_at)
    async with aclosing(s.watch_prefix("/p/", start_revision=start)) as stale:
        reset = await asyncio.wait_for(anext(stale), WAIT_S)
        assert isinstance(reset, WatchReset)
        assert [kv.key for kv in reset.snapshot] == [f"/p/{i:02d}" for i in range(10)]
    async with aclosing(s.watch_prefix("/p/", start_revision=start, snapshot_on_reset=False)) as bare:
        reset = await asyncio.wait_for(anext(bare), WAIT_S)
        assert isinstance(reset, WatchReset) and reset.snapshot == [] and reset.revision >= compacted_at


async def test_encoded_model_ids_do_not_leak_across_prefixes(h: Harness) -> None:
    s = h.store
    keys = Keys("/mesh/")
    start = await revision(s) + 1
    await s.put(keys.placement("a", "i1"), b"a")
    await s.put(keys.placement("a/b", "i2"), b"a/b")
    await s.put(keys.placement("a b%", "i3"), b"odd")
    items, _ = await s.get_prefix(keys.placements_of("a"))
    assert [kv.value for kv in items] == [b"a"]
    items, _ = await s.get_prefix(keys.placements_of("a/b"))
    assert [Keys.split_pair(kv.key, keys.placements) for kv in items] == [("a/b", "i2")]
    items, _ = await s.get_prefix(keys.placements_of("a b%"))
    assert [Keys.split_pair(kv.key, keys.placements) for kv in items] == [("a b%", "i3")]
    await s.put(keys.placement("a", "i9"), b"a")
    events = await collect(s, keys.placements_of("a"), start, 2)
    assert [e.key for e in events if isinstance(e, WatchEvent)] == [
        keys.placement("a", "i1"),
        keys.placement("a", "i9"),
    ]


# -- leases -----------------------------------------------------------------------------------------


async def test_revoke_deletes_the_lease_keys_and_sets_lost(h: Harness) -> None:
    s = h.store
    lease = await s.grant_lease(2)
    await s.put("/l/a", b"", lease=lease)
    assert await s.create("/l/b", b"", lease=lease)
    await s.put("/l/free", b"")
    kv = await s.get("/l/a")
    assert kv is not None and kv.lease == lease.id
    await s.revoke_lease(lease)
    assert lease.lost.is_set()
    assert await s.get("/l/a") is None and await s.get("/l/b") is None
    assert await s.get("/l/free") is not None
    with pytest.raises(FailedPrecondition):
        await s.put("/l/c", b"", lease=lease)


async def test_put_under_a_vanished_lease_fails_and_marks_it_lost(h: Harness) -> None:
    s = h.store
    other = h.second_client()
    try:
        lease = await s.grant_lease(2)
        await other.revoke_lease(Lease(lease.id, lease.ttl_s))  # behind the owner's back
        with pytest.raises(FailedPrecondition, match="not found"):
            await s.put("/l/x", b"", lease=lease)
        assert lease.lost.is_set()
    finally:
        await other.close()


async def test_keys_vanish_when_the_owner_stops_keeping_the_lease_alive(h: Harness) -> None:
    s = h.store
    lease = await s.grant_lease(2)
    await s.put("/l/owned", b"", lease=lease)
    await s.put("/l/kept", b"")
    await h.owner_dies(lease, "/l/owned")
    assert await s.get("/l/owned") is None
    assert await s.get("/l/kept") is not None


async def test_keepalive_holds_the_lease_past_its_ttl(h: Harness) -> None:
    s = h.store
    lease = await s.grant_lease(1)
    await s.put("/l/k", b"", lease=lease)
    await h.let_time_pass(lease.ttl_s * 2.5)
    assert await s.get("/l/k") is not None
    assert not lease.lost.is_set()


async def test_rewriting_a_key_without_the_lease_detaches_it(h: Harness) -> None:
    s = h.store
    lease = await s.grant_lease(2)
    await s.put("/l/k", b"1", lease=lease)
    await s.put("/l/k", b"2")
    await s.revoke_lease(lease)
    kv = await s.get("/l/k")
    assert kv is not None and kv.value == b"2" and kv.lease == 0


# -- PrefixMirror -----------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.resets: list[list[KeyValue]] = []

    def on_put(self, kv: KeyValue) -> None:
        self.calls.append(("put", kv.key))

    def on_delete(self, key: str) -> None:
        self.calls.append(("delete", key))

    def on_reset(self, snapshot: list[KeyValue]) -> None:
        self.resets.append(snapshot)


async def test_mirror_lists_then_follows_changes(h: Harness) -> None:
    s = h.store
    for name in ("c", "a", "b"):
        await s.put("/m/" + name, name.encode())
    rec = Recorder()
    mirror = PrefixMirror(s, "/m/", rec.on_put, rec.on_delete, page_size=2)
    await mirror.start()
    try:
        assert mirror.ready
        assert rec.calls == [("put", "/m/a"), ("put", "/m/b"), ("put", "/m/c")]
        assert mirror.revision == await revision(s)
        await s.put("/m/d", b"d")
        await s.put("/elsewhere", b"")
        rev = await s.put("/m/b", b"b2")
        await s.delete("/m/a")
        await asyncio.wait_for(mirror.wait_until(lambda: "/m/a" not in mirror.items), WAIT_S)
        assert mirror.revision > rev
        assert sorted(mirror.items) == ["/m/b", "/m/c", "/m/d"]
        assert mirror.items["/m/b"].value == b"b2" and mirror.items["/m/b"].mod_revision == rev
        assert rec.calls[3:] == [("put", "/m/d"), ("put", "/m/b"), ("delete", "/m/a")]
    finally:
        await mirror.stop()
    assert not mirror.ready


async def test_mirror_restart_diffs_what_changed_while_stopped(h: Harness) -> None:
    s = h.store
    await s.put("/m/a", b"a")
    await s.put("/m/b", b"b")
    rec = Recorder()
    mirror = PrefixMirror(s, "/m/", rec.on_put, rec.on_delete)
    await mirror.start()
    await mirror.stop()
    rec.calls.clear()
    await s.delete("/m/a")
    await s.put("/m/c", b"c")
    await mirror.start()
    try:
        assert rec.calls == [("delete", "/m/a"), ("put", "/m/c")]  # b is unchanged: no call
        assert sorted(mirror.items) == ["/m/b", "/m/c"]
    finally:
        await mirror.stop()


async def test_events_only_mirror_stores_nothing(h: Harness) -> None:
    s = h.store
    await s.put("/e/before", b"")
    rec = Recorder()
    with pytest.raises(InvalidArgument):
        PrefixMirror(s, "/e/", rec.on_put, rec.on_delete, keep_items=False)
    mirror = PrefixMirror(s, "/e/", rec.on_put, rec.on_delete, rec.on_reset, keep_items=False)
    await mirror.start()
    try:
        await s.put("/e/x", b"1")
        await s.delete("/e/before")
        rev = await revision(s)
        await asyncio.wait_for(mirror.wait_for_revision(rev), WAIT_S)
        assert rec.calls == [("put", "/e/x"), ("delete", "/e/before")]
        assert mirror.items == {}
    finally:
        await mirror.stop()


async def test_a_failing_callback_does_not_stop_the_mirror(h: Harness) -> None:
    s = h.store
    seen: list[str] = []

    def on_put(kv: KeyValue) -> None:
        seen.append(kv.key)
        if kv.key.endswith("bad"):
            raise RuntimeError("callback bug")

    mirror = PrefixMirror(s, "/f/", on_put)
    await mirror.start()
    try:
        await s.put("/f/bad", b"")
        await s.put("/f/good", b"")
        await asyncio.wait_for(mirror.wait_until(lambda: "/f/good" in mirror.items), WAIT_S)
        assert seen == ["/f/bad", "/f/good"]
    finally:
        await mirror.stop()


# -- RegistrySession --------------------------------------------------------------------------------


async def test_session_publishes_on_its_lease_and_revokes_on_close(h: Harness) -> None:
    s = h.store
    session = RegistrySession(s, ttl_s=2, name="t")
    with pytest.raises(FailedPrecondition):
        await session.put("/s/early", b"")
    await session.start()
    assert session.lease is not None
    await session.put("/s/a", b"1")
    await session.put("/s/b", b"2")
    await session.delete("/s/b")
    kv = await s.get("/s/a")
    assert kv is not None and kv.lease == session.lease.id
    assert await s.get("/s/b") is None
    assert dict(session.owned) == {"/s/a": b"1"}
    assert session.synced
    await session.close()
    assert await s.get("/s/a") is None


async def test_session_republishes_after_its_lease_is_revoked_behind_its_back(h: Harness) -> None:
    s = h.store
    session = RegistrySession(s, ttl_s=2, name="t", backoff_s=(0.05, 0.5))
    await session.start()
    other = h.second_client()
    try:
        await session.put("/s/a", b"1")
        await session.put("/s/b", b"2")
        old = session.lease
        assert old is not None
        await other.revoke_lease(Lease(old.id, old.ttl_s))
        await asyncio.wait_for(old.lost.wait(), WAIT_S)
        await asyncio.wait_for(session.wait_synced(), WAIT_S)
        new = session.lease
        assert new is not None and new.id != old.id
        for key, value in (("/s/a", b"1"), ("/s/b", b"2")):
            kv = await s.get(key)
            assert kv is not None and kv.value == value and kv.lease == new.id
    finally:
        await session.close()
        await other.close()


# -- memory only ------------------------------------------------------------------------------------


async def test_memory_history_is_bounded_and_a_lagging_watch_resets() -> None:
    s = MemoryStore(max_history=10)
    start = await revision(s) + 1
    for i in range(50):  # memory writes never yield, so no watcher runs in between
        await s.put(f"/h/{i:02d}", b"")
    assert s.backend.compact_revision > start
    got = await collect(s, "/h/", start, 1)
    assert isinstance(got[0], WatchReset) and len(got[0].snapshot) == 50
    await s.close()


async def test_mirror_that_falls_behind_compaction_diffs_the_reset() -> None:
    s = MemoryStore(max_history=4)
    await s.put("/m/a", b"a")
    await s.put("/m/b", b"b")
    rec = Recorder()
    mirror = PrefixMirror(s, "/m/", rec.on_put, rec.on_delete, rec.on_reset)
    await mirror.start()
    rec.calls.clear()
    # All without yielding: the mirror's watch cannot keep up and lands behind the compaction.
    await s.delete("/m/a")
    await s.put("/m/b", b"b2")
    await s.put("/m/c", b"c")
    for i in range(10):
        await s.put(f"/noise/{i}", b"")
    final = await s.put("/m/d", b"d")
    await asyncio.wait_for(mirror.wait_for_revision(final), WAIT_S)
    assert len(rec.resets) == 1
    assert sorted(rec.calls) == [("delete", "/m/a"), ("put", "/m/b"), ("put", "/m/c"), ("put", "/m/d")]
    items, _ = await s.get_prefix("/m/")
    assert {k: v.value for k, v in mirror.items.items()} == {kv.key: kv.value for kv in items}
    await mirror.stop()
    await s.close()


async def test_shared_memory_registry_and_closing_one_handle() -> None:
    a, prefix = open_store("memory://test-shared/app")
    b, _ = open_store("memory://test-shared/app")
    assert prefix == "/app/"
    lease = await a.grant_lease(1)
    await a.put("/app/k", b"1", lease=lease)
    assert await b.get("/app/k") is not None
    await a.close()
    # a's lease is no longer kept alive: the backend's expiry task removes it within TTL + 0.5 s.
    await asyncio.wait_for(lease.lost.wait(), 3.0)
    assert await b.get("/app/k") is None
    await b.put("/app/k2", b"")  # b is unaffected
    await b.close()


# -- open_store ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "prefix", "endpoints"),
    [
        ("etcd://127.0.0.1:2379", "/mesh/", ["127.0.0.1:2379"]),
        ("etcd://h1:1,h2:2/x/y/", "/x/y/", ["h1:1", "h2:2"]),
        ("etcd://[::1]:2379/", "/mesh/", ["[::1]:2379"]),
        ("ETCD://h:2379/mm", "/mm/", ["h:2379"]),
    ],
)
async def test_open_store_parses_etcd_urls(url: str, prefix: str, endpoints: list[str]) -> None:
    store, got_prefix = open_store(url, timeout_s=0.5)
    assert isinstance(store, EtcdStore)
    assert got_prefix == prefix and store.endpoints == endpoints and store.timeout_s == 0.5
    await store.close()


@pytest.mark.parametrize(("url", "prefix"), [("memory://", "/mesh/"), ("memory://n1/a/b", "/a/b/")])
async def test_open_store_parses_memory_urls(url: str, prefix: str) -> None:
    store, got_prefix = open_store(url)
    assert isinstance(store, MemoryStore) and got_prefix == prefix
    await store.close()


@pytest.mark.parametrize(
    "url",
    ["", "127.0.0.1:2379", "etcd://", "etcd://host", "etcd://host:abc", "etcd://host:70000",
     "etcd://h:1,", "redis://h:1", "etcd://h:1/p?x=1"],
)  # fmt: skip
def test_open_store_rejects_bad_urls(url: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        open_store(url)
    assert repr(url) in str(info.value)


async def test_min_copies_index_follows_registrations(h: Harness) -> None:
    """``pinned/`` lists exactly the models registered with min_copies > 0, under IDs that need
    encoding too, and a repeated registration repairs an index entry lost between the two writes."""
    from mesh.registry.records import ModelSpec
    from mesh.registry.registry import Registry

    registry = Registry(h.store, "/t/")
    await registry.register_model(ModelSpec(model_id="a/b c", type="sklearn", min_copies=2))
    await registry.register_model(ModelSpec(model_id="plain", type="sklearn"))
    assert await registry.pinned_models() == {"a/b c": 2}
    await h.store.delete(registry.keys.pin("a/b c"))  # as if the process died between the writes
    _, created = await registry.register_model(ModelSpec(model_id="a/b c", type="sklearn", min_copies=2))
    assert not created
    assert await registry.pinned_models() == {"a/b c": 2}
    assert await registry.delete_model("a/b c")
    assert await registry.pinned_models() == {}
    assert await registry.get_model("a/b c") is None


async def test_a_keepalive_that_dies_marks_its_lease_lost_at_once(etcd: EtcdProcess) -> None:
    """A bug or an unexpected error that ends the keep-alive task must not leave a process that
    looks registered (readiness green) while nobody refreshes its lease."""
    store = EtcdStore([etcd.endpoint])
    try:
        lease = await store.grant_lease(3)
        real_call = store._call

        async def failing_refresh(what, op, **kw):  # type: ignore[no-untyped-def]
            if what.startswith("refresh lease"):
                raise RuntimeError("a bug in the keep-alive")
            return await real_call(what, op, **kw)

        store._call = failing_refresh  # type: ignore[method-assign]
        await asyncio.wait_for(lease.lost.wait(), WAIT_S)  # at the first refresh (1 s), not at expiry
    finally:
        await store.close()


async def test_transactions_write_all_or_nothing_on_their_conditions(h: Harness) -> None:
    from mesh.registry.base import Compare, Op

    s = h.store
    await s.put("/t/model", b"m")
    # An empty prefix holds; a key under it breaks the condition, and nothing is written.
    assert await s.txn([Compare("prefix_empty", "/t/refs/m/"), Compare("present", "/t/model")],
                       [Op("put", "/t/a", b"1"), Op("delete", "/t/model")])
    assert await s.get("/t/model") is None and (await s.get("/t/a")) is not None
    await s.put("/t/refs/m/v1", b"")
    assert not await s.txn([Compare("prefix_empty", "/t/refs/m/")], [Op("put", "/t/b", b"2")])
    assert await s.get("/t/b") is None
    a = await s.get("/t/a")
    assert a is not None
    assert not await s.txn([Compare("mod_revision", "/t/a", a.mod_revision + 1)], [Op("put", "/t/c", b"")])
    assert await s.txn([Compare("mod_revision", "/t/a", a.mod_revision), Compare("absent", "/t/c")],
                       [Op("put", "/t/c", b"3"), Op("delete_prefix", "/t/refs/")])
    assert (await s.get("/t/c")) is not None and (await s.get_prefix("/t/refs/"))[0] == []


async def test_stores_given_the_same_members_start_at_different_ones() -> None:
    """A member serves the watches of its own clients: a fleet's routers, all given one list,
    spread their watches over the members instead of all starting at the first listed."""
    endpoints = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]  # never dialled: nothing is called
    starts = set()
    for _ in range(60):  # all three picked: 1 - 3 x (2/3)^60, certain in practice
        store = EtcdStore(endpoints)
        starts.add(store.endpoints[store._current])
        await store.close()
    assert starts == set(endpoints)
    fixed = EtcdStore(endpoints, first=1)
    assert fixed.endpoints[fixed._current] == endpoints[1]
    await fixed.close()
