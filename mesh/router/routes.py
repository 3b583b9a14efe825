"""The route table a router streams to smart clients (``mmesh.ModelMeshRoutes``, ``mesh.client``).

A route is a loaded copy a client may send inference to: a ``loaded`` placement on an instance that
is live (in the view, not shutting down) and not marked unreachable. Loading copies, copies on
instances that are shutting down (they serve only until their re-homed copy is loaded) and
vModels are left out: a client sends those requests to the router, which resolves and loads.

Design, and its trade-off. The view (``mesh.router.view``) is fed by registry watches and bumps a
version on every change; while a stream is open it also records which models' placements changed
and which instances changed a routing field (``changed_models``, ``changed_instances``: one
``set.add`` per change, the data plane's hot path otherwise as it was). :class:`RouteHub`
recomputes only those models, at most every ``router.routes_interval_s`` and only when the version
moved; an instance's change costs one pass over the placements (rare: a runtime starting,
draining, leaving or unreachable). The whole table is built only when the first stream opens
after none. A stale route costs a client nothing but one extra hop: the runtime answers "not
here" and the client asks the router.

Bounds (a client is untrusted, and a slow one must not grow the router):

- at most ``router.routes_max_streams`` streams (the next is RESOURCE_EXHAUSTED);
- per stream at most ``router.routes_queue`` pending change sets; past it the stream drops them
  and is sent a fresh snapshot instead (:attr:`Subscription.resync`), built when it is written,
  so a slow reader holds at most one table's worth of messages;
- at most ``router.routes_max_streams_per_peer`` streams per client address;
- a stream whose client acknowledges nothing for ``router.routes_write_timeout_s`` is cut off,
  with at most a few messages sent unacknowledged (the edge, ``mesh.router.routes_servicer.Flow``).

Each stream sees only the model IDs its filter lets through (the request's prefix, the token's
prefixes): a change set is filtered per stream before it is queued.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable, Iterator

import structlog

from mesh.errors import ResourceExhausted, Unavailable
from mesh.registry.records import LOADED
from mesh.router.view import ClusterView

log = structlog.get_logger(__name__)

Copy = tuple[str, str]  # (instance ID, endpoint)
Table = dict[str, tuple[Copy, ...]]
Changes = dict[str, tuple[Copy, ...]]  # model ID -> its copies now (empty: none)
Visible = Callable[[str], bool]

MODELS_PER_MESSAGE = 1000  # a snapshot or a large change set goes out in messages of this many models
SLICE = 10_000  # models handled between two yields to the event loop (snapshots)


def routes_of(view: ClusterView, model_id: str, runtime_tls: bool = False) -> tuple[Copy, ...]:
    """One model's routable copies (``route_table``'s rule), in instance-ID order."""
    copies = view.placements.get(model_id)
    if not copies:
        return ()
    instances = view.instances
    unreachable = view.unreachable
    routes = []
    for instance_id, placement in copies.items():
        if placement.state != LOADED or instance_id in unreachable:
            continue
        record = instances.get(instance_id)
        if (record is not None and not record.shutting_down and record.direct_endpoint
                and record.direct_tls == runtime_tls):
            routes.append((instance_id, record.direct_endpoint))
    routes.sort()
    return tuple(routes)


def route_table(view: ClusterView, runtime_tls: bool = False) -> Table:
    """Every model's routable copies (module docstring), in instance-ID order. The endpoint is the
    runtime's direct port (``runtime.direct_port``), never its internal one: an instance without a
    direct port (off, or a record of an older runtime), or whose direct port's TLS is not what the
    stream announces (``runtime_tls``), has no routes."""
    table: Table = {}
    for model_id in view.placements:
        routes = routes_of(view, model_id, runtime_tls)
        if routes:
            table[model_id] = routes
    return table


def diff(old: Table, new: Table) -> Changes:
    """The models whose routes differ between ``old`` and ``new`` (gone ones map to ``()``)."""
    changes: Changes = {m: c for m, c in new.items() if old.get(m) != c}
    changes.update((m, ()) for m in old if m not in new)
    return changes


def chunks(items: list[tuple[str, tuple[Copy, ...]]], size: int = MODELS_PER_MESSAGE
           ) -> Iterator[list[tuple[str, tuple[Copy, ...]]]]:
    """``items`` in pieces of at most ``size`` (at least one piece, maybe empty)."""
    if not items:
        yield []
        return
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Subscription:
    """One stream's filter and its bounded queue of change sets."""

    def __init__(self, visible: Visible, max_queue: int, peer: str = "", key: Hashable = None) -> None:
        self.visible = visible
        # Streams with the same key see the same models (the same prefix and token prefixes): a
        # change set is filtered once per key, not once per stream (RouteHub.refresh).
        self.key = key
        self.peer = peer  # the client's address (without its port): streams per peer are bounded
        self.max_queue = max_queue
        self.queue: deque[Changes] = deque()
        # The queue overflowed: what it held is dropped, the stream's next write is a snapshot.
        self.resync = False
        self.wake = asyncio.Event()

    def mine(self, changes: Changes) -> Changes:
        visible = self.visible
        return {m: c for m, c in changes.items() if visible(m)}

    def offer(self, changes: Changes, *, filtered: bool = False) -> None:
        mine = changes if filtered else self.mine(changes)
        if not mine or self.resync:
            return
        if len(self.queue) >= self.max_queue:
            self.queue.clear()
            self.resync = True
        else:
            self.queue.append(mine)
        self.wake.set()

    def take(self) -> Changes:
        """The queued change sets merged into one (later sets win), emptying the queue."""
        merged: Changes = {}
        while self.queue:
            merged.update(self.queue.popleft())
        return merged


class RouteHub:
    """The router's route table and the streams that follow it (module docstring)."""

    def __init__(self, view: ClusterView, *, max_streams: int, max_queue: int, interval_s: float,
                 runtime_tls: bool = False, max_streams_per_peer: int = 0) -> None:
        self.view = view
        self.max_streams_per_peer = max_streams_per_peer  # 0: no bound per peer
        self._per_peer: dict[str, int] = {}
        self.runtime_tls = runtime_tls  # which direct ports are routes (route_table)
        self.max_streams = max_streams
        self.max_queue = max_queue
        self.interval_s = interval_s
        self.table: Table = {}
        self._version = -1  # the view's version self.table was built from
        self.streams: set[Subscription] = set()
        self.closed = False
        self._opened = asyncio.Event()  # set while a stream is open: an idle router does not poll

    def close(self) -> None:
        """At shutdown: every stream ends (their writers see ``closed``) so the server drains."""
        self.closed = True
        for sub in self.streams:
            sub.wake.set()

    def subscribe(self, visible: Visible, peer: str = "", key: Hashable = None) -> Subscription:
        if self.closed:
            raise Unavailable("the router is shutting down; connect to another router")
        if len(self.streams) >= self.max_streams:
            raise ResourceExhausted(f"this router serves its maximum of {self.max_streams} route streams "
                                    "(router.routes_max_streams); send inference to the router meanwhile")
        held = self._per_peer.get(peer, 0)
        if self.max_streams_per_peer and held >= self.max_streams_per_peer:
            raise ResourceExhausted(f"this client address holds {held} route streams already, the maximum "
                                    "(router.routes_max_streams_per_peer); send inference to the router meanwhile")
        self.refresh()  # the snapshot this stream starts from is current, and so is what follows it
        sub = Subscription(visible, self.max_queue, peer, key)
        self.streams.add(sub)
        self._per_peer[peer] = held + 1
        self._opened.set()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub not in self.streams:
            return
        self.streams.discard(sub)
        left = self._per_peer.get(sub.peer, 1) - 1
        if left > 0:
            self._per_peer[sub.peer] = left
        else:
            self._per_peer.pop(sub.peer, None)
        if not self.streams:
            self._opened.clear()
            # Nobody follows: the view stops recording changes, and the next stream starts from a
            # table built anew.
            self.view.track_routes = False
            self.view.changed_models.clear()
            self.view.changed_instances.clear()
            self._version = -1

    def snapshot(self, visible: Visible) -> list[tuple[str, tuple[Copy, ...]]]:
        return [(m, c) for m, c in self.table.items() if visible(m)]

    async def snapshot_sliced(self, visible: Visible, size: int = SLICE) -> list[tuple[str, tuple[Copy, ...]]]:
        """``snapshot``, built ``size`` models at a time with the event loop let go between slices
        (it serves inference too). The items are taken at the start, in one go: the slices are all of
        the one table, whatever ``refresh`` changes meanwhile (the changes reach the stream's queue)."""
        items = list(self.table.items())
        out: list[tuple[str, tuple[Copy, ...]]] = []
        for start in range(0, len(items), size):
            if start:
                await asyncio.sleep(0)
            out.extend((m, c) for m, c in items[start:start + size] if visible(m))
        return out

    def refresh(self) -> None:
        """Bring the table up to the view, and queue the differences to every stream.

        Incremental: only the models the view recorded as changed (``ClusterView.changed_models``)
        are recomputed, and for an instance whose routing fields changed, the models it holds or
        held. The whole table is built only when tracking starts (the first stream after none).
        Change sets are filtered once per stream key (``Subscription.key``)."""
        view = self.view
        version = view.version
        if version == self._version:
            return
        tls = self.runtime_tls
        if self._version < 0 or not view.track_routes:
            view.track_routes = True
            view.changed_models.clear()
            view.changed_instances.clear()
            new = route_table(view, tls)
            changes = diff(self.table, new)
            self.table = new
        else:
            models, view.changed_models = view.changed_models, set()
            instances, view.changed_instances = view.changed_instances, set()
            if instances:
                # Rare (a runtime starts, stops, drains, turns unreachable): one pass over the view's
                # placements. A route through such an instance has a placement there too, unless
                # the placement went, and then its model is among the changed ones already.
                models.update(m for m, copies in view.placements.items() if not instances.isdisjoint(copies))
            changes = {}
            table = self.table
            for model_id in models:
                routes = routes_of(view, model_id, tls)
                if routes != table.get(model_id, ()):
                    changes[model_id] = routes
                    if routes:
                        table[model_id] = routes
                    else:
                        del table[model_id]
        self._version = version
        if changes:
            by_key: dict[Hashable, Changes] = {}
            for sub in self.streams:
                if sub.key is None:
                    sub.offer(changes)
                    continue
                mine = by_key.get(sub.key)
                if mine is None:
                    mine = by_key[sub.key] = sub.mine(changes)
                sub.offer(mine, filtered=True)

    async def run(self) -> None:
        """Follow the view while streams are open (a root task of the router)."""
        while True:
            await self._opened.wait()
            await asyncio.sleep(self.interval_s)
            if self.streams:
                self.refresh()
