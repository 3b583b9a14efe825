"""The route stream's table and bounds (``mesh.router.routes``, ``mesh.router.routes_servicer``) and
the smart client's routes (``mesh.client.routes``), without a network.

The servicer is driven with a stand-in for grpc's servicer context whose ``write`` blocks as a
client that stopped reading makes it block (flow control): no real client can be made slow on
purpose within a test's time, because grpc buffers what a small update weighs many thousand times.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest

from mesh.client.routes import Routes
from mesh.errors import ResourceExhausted, Unavailable
from mesh.gen.mmesh import routes_pb2 as rp
from mesh.registry.base import KeyValue
from mesh.registry.keys import Keys
from mesh.registry.records import LOADED, LOADING, InstanceRecord, PlacementRecord
from mesh.router.routes import RouteHub, Subscription, chunks, diff, route_table
from mesh.router.routes_servicer import WINDOW, RoutesServicer, peer_address
from mesh.router.view import ClusterView


def _view() -> ClusterView:
    return ClusterView(Keys("/mesh/"))


def _instance(view: ClusterView, iid: str, *, shutting_down: bool = False, direct: bool = True,
              direct_tls: bool = False) -> None:
    # The internal port (:9) is never a route; the direct port (:1) is, when the runtime has one.
    record = InstanceRecord(instance_id=iid, endpoint=f"{iid}:9", shutting_down=shutting_down,
                            direct_endpoint=f"{iid}:1" if direct else "", direct_tls=direct_tls)
    view.put_instance(KeyValue(view.keys.instance(iid), record.to_json(), 1))


def _copy(view: ClusterView, model: str, iid: str, state: str = LOADED) -> None:
    record = PlacementRecord(model_id=model, instance_id=iid, state=state)
    view.put_placement(KeyValue(view.keys.placement(model, iid), record.to_json(), 1))


def test_route_table_holds_loaded_copies_on_live_reachable_instances_only() -> None:
    view = _view()
    for iid in ("a", "b", "c", "d"):
        _instance(view, iid, shutting_down=iid == "c")
    view.mark_unreachable("d")
    _copy(view, "m", "a")
    _copy(view, "m", "b", LOADING)  # loading: the router joins the load, not a client
    _copy(view, "m", "c")  # shutting down: serves only until its re-homed copy is loaded
    _copy(view, "m", "d")  # unreachable
    _copy(view, "m", "gone")  # an instance not in the view
    _copy(view, "n", "b", LOADING)
    assert route_table(view) == {"m": (("a", "a:1"),)}


def test_routes_name_direct_ports_only_never_the_internal_port() -> None:
    """A runtime without a direct port (off, or an older runtime's record) has no routes, and a
    route is the direct port's endpoint; a direct port whose TLS differs from what the stream
    announces is left out (the client would dial it wrongly)."""
    view = _view()
    _instance(view, "a")
    _instance(view, "old", direct=False)
    _instance(view, "t", direct_tls=True)
    older = json.loads(InstanceRecord(instance_id="older", endpoint="older:9").to_json())
    del older["direct_endpoint"], older["direct_tls"]  # a record written before the direct port existed
    view.put_instance(KeyValue(view.keys.instance("older"), json.dumps(older).encode(), 1))
    assert view.instances["older"].direct_endpoint == ""
    for iid in ("a", "old", "t", "older"):
        _copy(view, "m", iid)
    assert route_table(view) == {"m": (("a", "a:1"),)}
    assert route_table(view, runtime_tls=True) == {"m": (("t", "t:1"),)}
    hub = RouteHub(view, max_streams=2, max_queue=3, interval_s=0.01, runtime_tls=True)
    hub.refresh()
    assert hub.table == {"m": (("t", "t:1"),)}
    assert all(endpoint.endswith(":1") for copies in hub.table.values() for _, endpoint in copies)


def test_diff_names_changed_and_gone_models() -> None:
    old = {"m": (("a", "a:1"),), "n": (("b", "b:1"),), "same": (("a", "a:1"),)}
    new = {"m": (("a", "a:1"), ("b", "b:1")), "o": (("a", "a:1"),), "same": (("a", "a:1"),)}
    assert diff(old, new) == {"m": (("a", "a:1"), ("b", "b:1")), "o": (("a", "a:1"),), "n": ()}
    assert [len(c) for c in chunks([("m", ())] * 2500)] == [1000, 1000, 500]
    assert list(chunks([])) == [[]]


def test_hub_sends_each_stream_its_own_models_and_bounds_its_queue() -> None:
    view = _view()
    _instance(view, "a")
    hub = RouteHub(view, max_streams=2, max_queue=3, interval_s=0.01)
    team = hub.subscribe(lambda m: m.startswith("team-a/"))
    everyone = hub.subscribe(lambda m: True)
    with pytest.raises(ResourceExhausted, match="routes_max_streams"):
        hub.subscribe(lambda m: True)

    _copy(view, "team-a/x", "a")
    _copy(view, "team-b/y", "a")
    hub.refresh()
    assert team.take() == {"team-a/x": (("a", "a:1"),)}
    assert everyone.take() == {"team-a/x": (("a", "a:1"),), "team-b/y": (("a", "a:1"),)}
    hub.refresh()  # nothing changed: nothing queued
    assert not everyone.queue

    # A stream that does not read: past max_queue its queue is dropped and it is due a snapshot.
    for i in range(5):
        _copy(view, f"m{i}", "a")
        hub.refresh()
    assert everyone.resync and not everyone.queue
    assert hub.snapshot(team.visible) == [("team-a/x", (("a", "a:1"),))]
    assert len(team.queue) == 0  # none of those changes were visible to it

    hub.unsubscribe(team)
    hub.subscribe(lambda m: True)  # room again
    hub.close()
    with pytest.raises(Unavailable):
        hub.subscribe(lambda m: True)


class _Context:
    """What the servicer uses of grpc.aio.ServicerContext. ``read`` gives the client's request, then
    its acknowledgements: one per update written while ``acking`` (a client that stops reading stops
    acknowledging; its writes still complete, as grpc's do once the message is queued). ``write``
    blocks once ``blocked``."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = (),
                 request: rp.WatchRoutesRequest | bytes | None = None) -> None:
        self.incoming: asyncio.Queue[bytes] = asyncio.Queue()
        if request is None:
            request = rp.WatchRoutesRequest()
        self.incoming.put_nowait(request if isinstance(request, bytes) else request.SerializeToString())
        self.acking = True
        self.written: list[rp.RoutesUpdate] = []
        self.blocked = False
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self.metadata = metadata
        self.trailers: tuple[tuple[str, str], ...] = ()

    async def write(self, message: rp.RoutesUpdate) -> None:
        if self.blocked:
            await asyncio.Event().wait()  # a send grpc never completes
        self.written.append(message)
        if self.acking:
            self.incoming.put_nowait(rp.WatchRoutesRequest(ack=message.sequence).SerializeToString())

    async def read(self) -> bytes:
        return await self.incoming.get()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def set_trailing_metadata(self, trailers: tuple[tuple[str, str], ...]) -> None:
        self.trailers = trailers

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


def _servicer(hub: RouteHub, **kw: Any) -> RoutesServicer:
    return RoutesServicer(hub, tokens=None, direct=lambda: True, heartbeat_s=kw.get("heartbeat_s", 0.05),
                          write_timeout_s=kw.get("write_timeout_s", 0.2), runtime_tls=False, runtime_server_name="")


async def test_stream_snapshot_deltas_heartbeats_and_slow_reader_cut_off() -> None:
    view = _view()
    _instance(view, "a")
    _copy(view, "m", "a")
    hub = RouteHub(view, max_streams=10, max_queue=2, interval_s=0.01)
    ctx = _Context()
    task = asyncio.create_task(_servicer(hub).watch(ctx))
    await asyncio.sleep(0.02)
    first = ctx.written[0]
    assert first.reset and first.synced and first.direct and [m.modelId for m in first.models] == ["m"]

    _copy(view, "n", "a")
    hub.refresh()
    await asyncio.sleep(0.02)
    delta = ctx.written[-1]
    assert not delta.reset and delta.synced and [(m.modelId, len(m.copies)) for m in delta.models] == [("n", 1)]

    count = len(ctx.written)
    await asyncio.sleep(0.12)  # nothing changes: heartbeats
    assert len(ctx.written) > count and all(not m.models and m.synced for m in ctx.written[count:])

    # The client stops reading (so acknowledging): at most WINDOW updates go out unacknowledged,
    # changes pile up past the queue bound (then a snapshot is due, not more memory), and the
    # stream is cut off within the write timeout.
    ctx.acking = False
    sent = len(ctx.written)
    for i in range(10):
        _copy(view, f"x{i}", "a")
        hub.refresh()
        await asyncio.sleep(0.005)
    subs = list(hub.streams)
    assert len(subs) == 1 and len(subs[0].queue) <= 2
    with pytest.raises(grpc.aio.AbortError):  # what context.abort raises in grpc too
        await asyncio.wait_for(task, 2)
    assert ctx.aborted is not None and ctx.aborted[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "routes_write_timeout_s" in ctx.aborted[1]
    assert len(ctx.written) - sent <= WINDOW
    assert not hub.streams  # the stream's state is gone with it


async def test_overflowed_stream_gets_a_fresh_snapshot() -> None:
    view = _view()
    _instance(view, "a")
    hub = RouteHub(view, max_streams=10, max_queue=1, interval_s=0.01)
    ctx = _Context()
    gate = asyncio.Event()
    original = ctx.write

    async def slow_write(message: rp.RoutesUpdate) -> None:
        await gate.wait()
        await original(message)

    ctx.write = slow_write  # type: ignore[method-assign]
    task = asyncio.create_task(_servicer(hub, write_timeout_s=5).watch(ctx))
    await asyncio.sleep(0.01)
    for i in range(3):  # three change sets against a queue of one: overflow
        _copy(view, f"m{i}", "a")
        hub.refresh()
    sub: Subscription = next(iter(hub.streams))
    assert sub.resync
    gate.set()
    await asyncio.sleep(0.1)
    resets = [m for m in ctx.written if m.reset]
    assert len(resets) == 2  # the first snapshot, and the fresh one after the overflow
    assert sorted(m.modelId for m in resets[1].models) == ["m0", "m1", "m2"]
    hub.close()
    await asyncio.wait_for(task, 2)  # a closing router ends its streams


async def test_a_client_that_reads_nothing_holds_at_most_a_window_of_the_snapshot() -> None:
    """The attacker review: streams that never read held a whole snapshot (31 MB at 100,000 models)
    in the router, as grpc's write completes once the message is queued. Now at most WINDOW
    messages of it are sent unacknowledged, and the stream is cut off; a client that acknowledges
    gets all of it, in sequence."""
    view = _view()
    _instance(view, "a")
    for i in range(5500):  # six messages of at most 1,000 models
        _copy(view, f"m{i:05d}", "a")
    hub = RouteHub(view, max_streams=10, max_queue=2, interval_s=0.01)
    silent = _Context()
    silent.acking = False
    with pytest.raises(grpc.aio.AbortError):
        await asyncio.wait_for(_servicer(hub).watch(silent), 2)
    assert len(silent.written) == WINDOW
    assert silent.aborted is not None and silent.aborted[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    reader = _Context()
    task = asyncio.create_task(_servicer(hub).watch(reader))
    await asyncio.sleep(0.2)
    assert [m.sequence for m in reader.written[:6]] == [1, 2, 3, 4, 5, 6]
    assert sum(len(m.models) for m in reader.written[:6]) == 5500 and reader.written[5].synced
    hub.close()
    await asyncio.wait_for(task, 2)


async def test_a_stopping_router_ends_streams_waiting_for_acknowledgements() -> None:
    view = _view()
    _instance(view, "a")
    for i in range(5500):
        _copy(view, f"m{i:05d}", "a")
    hub = RouteHub(view, max_streams=10, max_queue=2, interval_s=0.01)
    servicer = _servicer(hub, write_timeout_s=30)
    silent = _Context()
    silent.acking = False
    task = asyncio.create_task(servicer.watch(silent))
    await asyncio.sleep(0.1)
    assert len(silent.written) == WINDOW and not task.done()
    servicer.close()
    await asyncio.wait_for(task, 1)  # ends at once, not after the 30 s wait for acknowledgements
    assert silent.aborted is None and not hub.streams


@pytest.mark.parametrize("body, words", [
    (b"\xff\xff\xff", "malformed request"),
    (rp.WatchRoutesRequest(ack=99).SerializeToString(), "past the last update sent"),
])
async def test_bad_acknowledgements_end_the_stream(body: bytes, words: str) -> None:
    view = _view()
    hub = RouteHub(view, max_streams=10, max_queue=2, interval_s=0.01)
    ctx = _Context()
    ctx.acking = False
    _instance(view, "a")
    task = asyncio.create_task(_servicer(hub, write_timeout_s=5).watch(ctx))
    await asyncio.sleep(0.02)
    ctx.incoming.put_nowait(body)
    for i in range(WINDOW + 1):  # the next send past the window sees the error
        _copy(view, f"m{i}", "a")
        hub.refresh()
        await asyncio.sleep(0.02)
    with pytest.raises(grpc.aio.AbortError):
        await asyncio.wait_for(task, 2)
    assert ctx.aborted is not None and ctx.aborted[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert words in ctx.aborted[1]
    assert not hub.streams


async def test_a_malformed_first_request_is_invalid_argument() -> None:
    hub = RouteHub(_view(), max_streams=10, max_queue=2, interval_s=0.01)
    ctx = _Context(request=b"\xff\xff\xff")
    with pytest.raises(grpc.aio.AbortError):
        await asyncio.wait_for(_servicer(hub).watch(ctx), 2)
    assert ctx.aborted is not None and ctx.aborted[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert not ctx.written and not hub.streams


def test_streams_per_peer_are_bounded() -> None:
    hub = RouteHub(_view(), max_streams=10, max_queue=2, interval_s=0.01, max_streams_per_peer=2)
    first, _ = hub.subscribe(lambda m: True, "ipv4:10.0.0.1"), hub.subscribe(lambda m: True, "ipv4:10.0.0.1")
    with pytest.raises(ResourceExhausted, match="routes_max_streams_per_peer"):
        hub.subscribe(lambda m: True, "ipv4:10.0.0.1")
    hub.subscribe(lambda m: True, "ipv4:10.0.0.2")  # another address has its own share
    hub.unsubscribe(first)
    hub.unsubscribe(first)  # twice changes nothing
    hub.subscribe(lambda m: True, "ipv4:10.0.0.1")
    assert peer_address("ipv4:10.0.0.1:5555") == "ipv4:10.0.0.1"
    assert peer_address("ipv6:[::1]:5555") == "ipv6:[::1]"
    assert peer_address("unix:/tmp/sock") == "unix:/tmp/sock"


def test_client_routes_doubt_goes_to_the_router() -> None:
    r = Routes(suspect_s=5.0, stale_model_s=1.0)
    copies = (("a", "a:1"), ("b", "b:1"))
    assert r.pick("m", 0.0) is None  # nothing synced yet
    r.apply(reset=True, models=[("m", copies)], synced=False, direct=True, heartbeat_ms=1000, now=0.0)
    assert r.pick("m", 0.0) is None  # half a snapshot
    r.apply(reset=False, models=[], synced=True, direct=True, heartbeat_ms=1000, now=0.0)
    assert {r.pick("m", 0.1) for _ in range(4)} == set(copies)  # round robin over the copies
    assert r.pick("cold", 0.1) is None
    assert r.pick("m", 3.1) is None  # three heartbeats of silence: stale
    r.apply(reset=False, models=[], synced=True, direct=False, heartbeat_ms=1000, now=4.0)
    assert r.pick("m", 4.0) is None  # the router offers no direct routing now
    r.apply(reset=False, models=[], synced=True, direct=True, heartbeat_ms=1000, now=4.0)
    r.failed("a:1", 4.0)
    assert {r.pick("m", 4.1) for _ in range(4)} == {("b", "b:1")}  # a failed endpoint is skipped
    r.not_here("m", 4.2)
    assert r.pick("m", 4.3) is None  # in doubt: the router, for a second
    r.apply(reset=False, models=[], synced=True, direct=True, heartbeat_ms=1000, now=5.5)
    assert r.pick("m", 5.5) == ("b", "b:1")
    r.apply(reset=False, models=[("m", ())], synced=True, direct=True, heartbeat_ms=1000, now=5.5)
    assert r.pick("m", 5.5) is None and "m" not in r.copies
    r.prune(10.0)
    assert not r.suspects and not r.stale_models
    r.lost()
    assert not r.usable(5.5)


def test_client_over_tls_never_goes_direct_in_plaintext() -> None:
    """A client speaking TLS to the router uses runtimes' direct ports only over TLS (verified with
    a CA), unless it opts in to plaintext runtimes; a plaintext client follows the router's word."""
    from mesh.client import SmartClient

    update = rp.RoutesUpdate(reset=True, synced=True, direct=True, heartbeatMs=1000,
                             models=[rp.ModelRoutes(modelId="m",
                                                    copies=[rp.RouteCopy(instanceId="a", endpoint="a:1")])])
    ca = b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"  # never dialled here
    cases = [({}, False, True), ({"root_certificates": ca}, False, False),
             ({"root_certificates": ca, "allow_plaintext_runtimes": True}, False, True),
             ({"root_certificates": ca}, True, True), ({}, True, False)]
    for kwargs, runtime_tls, direct in cases:
        client = SmartClient("router:1", **kwargs)  # type: ignore[arg-type]
        update.runtimeTls = runtime_tls
        client._apply(update)
        assert client.routes.direct is direct, (kwargs, runtime_tls)


def test_hub_refresh_is_incremental_and_matches_a_full_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    """The attacker review: at 100,000 models every refresh rebuilt and diffed the whole table
    (137 ms on the event loop every 50 ms tick). Now the view records what changed and the hub
    recomputes only that; the table it keeps equals a full rebuild after every kind of change."""
    import random

    from mesh.router import routes as routes_module

    full = routes_module.route_table
    view = _view()
    for iid in ("a", "b", "c"):
        _instance(view, iid)
    for i in range(300):
        _copy(view, f"m{i:03d}", "abc"[i % 3])
    hub = RouteHub(view, max_streams=10, max_queue=1000, interval_s=0.01)
    everyone = hub.subscribe(lambda m: True, key=("", None))
    twin = hub.subscribe(lambda m: True, key=("", None))
    odd = hub.subscribe(lambda m: m.endswith(("1", "3", "5", "7", "9")), key=("odd", None))
    assert view.track_routes and hub.table == full(view)

    def no_rebuild(*_: Any) -> Any:
        raise AssertionError("the whole table was rebuilt")

    monkeypatch.setattr(routes_module, "route_table", no_rebuild)
    rng = random.Random(7)
    held = dict(hub.table)
    for step in range(200):
        kind = rng.randrange(7)
        model, iid = f"m{rng.randrange(320):03d}", rng.choice("abcd")
        if kind == 0:
            _copy(view, model, iid)
        elif kind == 1:
            _copy(view, model, iid, LOADING)
        elif kind == 2:
            view.delete_placement(view.keys.placement(model, iid))
        elif kind == 3:
            _instance(view, iid, shutting_down=rng.random() < 0.5, direct=rng.random() < 0.8)
        elif kind == 4:
            view.mark_unreachable(iid)
        elif kind == 5:
            view.mark_reachable(iid)
        else:
            view.delete_instance(view.keys.instance(iid))
        hub.refresh()
        expected = full(view)
        assert hub.table == expected, step
        changes = everyone.take()
        assert changes == twin.take()
        held.update(changes)
        held = {m: c for m, c in held.items() if c}
        assert held == expected, step  # what a stream applied is the table
        assert all(m.endswith(("1", "3", "5", "7", "9")) for m in odd.take())
    # The last stream leaves: the view stops recording; the next stream starts from a full build.
    for sub in (everyone, twin, odd):
        hub.unsubscribe(sub)
    assert not view.track_routes
    _copy(view, "late", "a")
    assert not view.changed_models
    monkeypatch.setattr(routes_module, "route_table", full)
    hub.subscribe(lambda m: True)
    assert hub.table == full(view)
