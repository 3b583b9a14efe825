"""An in-process registry with etcd's semantics, for the embedded mode and for tests.

Two layers, mirroring etcd's server and client:

* :class:`MemoryBackend` is the "server": the keys, one global revision (1 when empty, +1 per write
  and one revision per multi-key delete, as in etcd), the event history, and the leases.
* :class:`MemoryStore` is a "client connection" implementing :class:`~mesh.registry.base.KVStore`.
  Several stores can share one backend (``open_store("memory://x")`` does that, so the router and the
  runtimes of ``mesh up`` see one registry). Closing a store ends its watches and stops keeping its
  leases alive, so those leases expire after their TTL -- what etcd does when a client process dies.

Watches are pull-based: the history is one revision-ordered list and each watcher keeps a cursor
(the next revision it wants), so a slow watcher costs no memory of its own and a thousand watchers
cost one list. The history is bounded: beyond ``max_history`` events the oldest half is compacted
away, and a watcher whose cursor falls below the compaction point gets a
:class:`~mesh.registry.base.WatchReset` with the current snapshot, exactly as with etcd.

Leases: while a store keeps a lease alive it never expires (an in-process keep-alive cannot fail);
``stop_keepalive`` (the test hook for "the owner died") or closing the store arms a deadline of
``clock() + ttl``. Expiry runs in a background task and in :meth:`MemoryStore.expire_leases`, which
tests call after advancing an injected clock.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field

import structlog

from mesh.errors import FailedPrecondition, InvalidArgument, RegistryUnavailable
from mesh.registry.base import Compare, Create, Created, EventType, KeyValue, Lease, Op, WatchEvent, WatchReset
from mesh.tasks import spawn

log = structlog.get_logger(__name__)

DEFAULT_MAX_HISTORY = 100_000
_EXPIRY_CHECK_S = 0.5  # etcd's lessor checks every 500 ms too; also bounds lag behind a test clock
_WATCH_BATCH = 1_000  # events copied per wake-up; whole revisions are never split


@dataclass(slots=True)
class _Entry:
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(slots=True)
class _LeaseState:
    lease: Lease
    keys: set[str] = field(default_factory=set)
    deadline: float | None = None  # None while kept alive


class MemoryBackend:
    """The shared state behind one or more :class:`MemoryStore`."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_history: int = DEFAULT_MAX_HISTORY,
        name: str = "memory://",
    ) -> None:
        self.name = name
        self.clock = clock
        self.max_history = max_history
        self.revision = 1
        self.compact_revision = 0
        self._data: dict[str, _Entry] = {}
        self._keys: list[str] = []  # sorted; str order is UTF-8 byte order, etcd's order
        self._history: list[WatchEvent] = []
        self._history_revs: list[int] = []  # parallel to _history, for bisect
        self._leases: dict[int, _LeaseState] = {}
        self._lease_ids = itertools.count(1)
        self._waiters: set[asyncio.Future[None]] = set()
        self._expiry_task: asyncio.Task[None] | None = None

    # -- reads --------------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        entry = self._data.get(key)
        return None if entry is None else _kv(key, entry)

    def count(self, prefix: str) -> int:
        keys = self._keys
        lo = hi = bisect.bisect_left(keys, prefix)
        while hi < len(keys) and keys[hi].startswith(prefix):
            hi += 1
        return hi - lo

    def range(self, prefix: str, limit: int = 0, start_after: str = "") -> list[KeyValue]:
        keys = self._keys
        lo = bisect.bisect_left(keys, prefix)
        if start_after:
            lo = max(lo, bisect.bisect_right(keys, start_after))
        out: list[KeyValue] = []
        for i in range(lo, len(keys)):
            key = keys[i]
            if not key.startswith(prefix) or (limit > 0 and len(out) >= limit):
                break
            out.append(_kv(key, self._data[key]))
        return out

    # -- writes (each one revision) -----------------------------------------------------------

    def put(self, key: str, value: bytes, lease: Lease | None) -> int:
        if not key:
            raise InvalidArgument("registry key must not be empty")
        lease_id = self._live_lease_id(lease)
        rev = self.revision + 1
        old = self._data.get(key)
        if old is None:
            bisect.insort(self._keys, key)
            create = rev
        else:
            create = old.create_revision
            self._detach(key, old.lease)
        self._data[key] = _Entry(value, create, rev, lease_id)
        if lease_id:
            self._leases[lease_id].keys.add(key)
        self.revision = rev
        self._record([WatchEvent(EventType.PUT, key, value, rev)])
        return rev

    def delete_keys(self, keys: list[str]) -> int:
        """Delete existing ``keys`` in one revision (like etcd's range delete and lease revoke)."""
        if not keys:
            return 0
        rev = self.revision + 1
        events = []
        for key in keys:
            entry = self._data.pop(key)
            del self._keys[bisect.bisect_left(self._keys, key)]
            self._detach(key, entry.lease)
            events.append(WatchEvent(EventType.DELETE, key, b"", rev))
        self.revision = rev
        self._record(events)
        return len(keys)

    def compact(self, revision: int) -> None:
        if revision > self.revision:
            raise InvalidArgument(f"cannot compact at {revision}: the current revision is {self.revision}")
        if revision <= self.compact_revision:
            return
        cut = bisect.bisect_left(self._history_revs, revision)
        del self._history[:cut]
        del self._history_revs[:cut]
        self.compact_revision = revision
        self.wake_watchers()  # watchers behind the cut must learn they were reset

    # -- leases -------------------------------------------------------------------------------

    def grant(self, ttl_s: int) -> Lease:
        lease = Lease(id=next(self._lease_ids), ttl_s=ttl_s)
        self._leases[lease.id] = _LeaseState(lease)
        return lease

    def revoke(self, lease_id: int) -> None:
        state = self._leases.pop(lease_id, None)
        if state is None:
            return
        self.delete_keys(sorted(state.keys))
        state.lease.lost.set()

    def stop_keepalive(self, lease_id: int) -> None:
        state = self._leases.get(lease_id)
        if state is not None and state.deadline is None:
            state.deadline = self.clock() + state.lease.ttl_s
            self._ensure_expiry_task()

    def expire_leases(self) -> list[int]:
        """Revoke every lease whose deadline has passed on ``clock``; returns their ids."""
        now = self.clock()
        expired = [i for i, s in self._leases.items() if s.deadline is not None and s.deadline <= now]
        for lease_id in expired:
            log.debug("memory lease expired", lease=lease_id, registry=self.name)
            self.revoke(lease_id)
        return expired

    def _live_lease_id(self, lease: Lease | None) -> int:
        if lease is None:
            return 0
        if lease.id not in self._leases:
            lease.lost.set()
            raise FailedPrecondition(f"lease {lease.id:x} not found (expired or revoked)")
        return lease.id

    def _detach(self, key: str, lease_id: int) -> None:
        if lease_id and (state := self._leases.get(lease_id)) is not None:
            state.keys.discard(key)

    def _ensure_expiry_task(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): expire_leases() still works when called
        task = self._expiry_task
        # A backend can outlive an event loop (one per test): restart the task on the current one.
        if task is None or task.done() or task.get_loop() is not loop:
            self._expiry_task = spawn(self._expiry_loop(), name=f"lease-expiry {self.name}")

    async def _expiry_loop(self) -> None:
        while True:
            deadlines = [s.deadline for s in self._leases.values() if s.deadline is not None]
            if not deadlines:
                return  # restarted by the next stop_keepalive
            await asyncio.sleep(min(max(min(deadlines) - self.clock(), 0.0), _EXPIRY_CHECK_S))
            self.expire_leases()

    # -- history and watches ------------------------------------------------------------------

    def _record(self, events: list[WatchEvent]) -> None:
        self._history.extend(events)
        self._history_revs.extend(e.mod_revision for e in events)
        if len(self._history) > self.max_history:
            # Drop the oldest half at once, so the O(n) trim happens once per max_history/2 writes.
            keep_from = self._history_revs[len(self._history) - self.max_history // 2]
            log.debug("memory registry history compacted", revision=keep_from, registry=self.name)
            self.compact(keep_from)
        self.wake_watchers()

    def wake_watchers(self) -> None:
        """Wake every waiting watcher to re-check the history (and whether its store closed)."""
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    async def watch(
        self, prefix: str, start_revision: int, closed: Callable[[], bool]
    ) -> AsyncGenerator[WatchEvent | WatchReset, None]:
        next_rev = start_revision if start_revision > 0 else self.revision + 1
        while not closed():
            if next_rev < self.compact_revision:
                rev = self.revision
                yield WatchReset(self.range(prefix), rev)
                next_rev = rev + 1
                continue
            lo = bisect.bisect_left(self._history_revs, next_rev)
            if lo < len(self._history_revs):
                last_rev = self._history_revs[min(lo + _WATCH_BATCH, len(self._history_revs)) - 1]
                hi = bisect.bisect_right(self._history_revs, last_rev)
                batch = self._history[lo:hi]  # a copy: compaction may trim the list while we yield
                next_rev = last_rev + 1
                for event in batch:
                    if event.key.startswith(prefix):
                        yield event
                continue
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.add(waiter)
            try:
                await waiter
            finally:
                self._waiters.discard(waiter)


class MemoryStore:
    """A :class:`~mesh.registry.base.KVStore` over a (possibly shared) :class:`MemoryBackend`."""

    def __init__(
        self,
        backend: MemoryBackend | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_history: int = DEFAULT_MAX_HISTORY,
    ) -> None:
        self.backend = backend or MemoryBackend(clock=clock, max_history=max_history)
        self._kept_alive: set[int] = set()
        self._closed = False

    @property
    def revision(self) -> int:
        return self.backend.revision

    @property
    def connected(self) -> bool:
        """In-process: reachable for as long as this handle is open."""
        return not self._closed

    def _check_open(self) -> MemoryBackend:
        if self._closed:
            raise RegistryUnavailable(f"registry {self.backend.name} unavailable: store closed")
        return self.backend

    async def get(self, key: str) -> KeyValue | None:
        return self._check_open().get(key)

    async def current_revision(self, key: str) -> int:
        return self._check_open().revision

    async def get_prefix(
        self, prefix: str, *, limit: int = 0, start_after: str = ""
    ) -> tuple[list[KeyValue], int]:
        backend = self._check_open()
        return backend.range(prefix, limit, start_after), backend.revision

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        return self._check_open().put(key, value, lease)

    async def create(self, key: str, value: bytes, *, lease: Lease | None = None) -> bool:
        backend = self._check_open()
        if backend.get(key) is not None:
            return False
        backend.put(key, value, lease)
        return True

    async def replace(
        self, key: str, value: bytes, *, expected_mod_revision: int, lease: Lease | None = None
    ) -> bool:
        backend = self._check_open()
        current = backend.get(key)
        if (current.mod_revision if current else 0) != expected_mod_revision:
            return False
        backend.put(key, value, lease)
        return True

    async def delete(self, key: str, *, expected_mod_revision: int | None = None) -> bool:
        backend = self._check_open()
        current = backend.get(key)
        if current is None:
            return False
        if expected_mod_revision is not None and current.mod_revision != expected_mod_revision:
            return False
        return backend.delete_keys([key]) == 1

    async def count_prefix(self, prefix: str) -> int:
        return self._check_open().count(prefix)

    async def create_many(self, items: Sequence[Create]) -> list[Created]:
        # No await inside: each item's check and writes are one step, as in etcd's transaction.
        backend = self._check_open()
        out: list[Created] = []
        for item in items:
            existing = backend.get(item.key)
            blocker = next((k for k in item.absent if backend.get(k) is not None), "")
            if existing is not None or blocker:
                out.append(Created(False, existing=existing, blocker=blocker))
                continue
            revision = backend.put(item.key, item.value, None)
            for key, value in item.also:
                backend.put(key, value, None)
            out.append(Created(True, revision=revision))
        return out

    async def get_many(self, keys: Sequence[str]) -> list[KeyValue | None]:
        backend = self._check_open()
        return [backend.get(k) for k in keys]

    async def delete_prefix(self, prefix: str) -> int:
        backend = self._check_open()
        return backend.delete_keys([kv.key for kv in backend.range(prefix)])

    async def txn(self, compares: Sequence[Compare], ops: Sequence[Op]) -> bool:
        # One event loop and no await in between: atomic, as etcd's transactions are.
        backend = self._check_open()
        for c in compares:
            current = backend.get(c.key)
            held = {"absent": current is None, "present": current is not None,
                    "mod_revision": (current.mod_revision if current else 0) == c.revision,
                    "prefix_empty": not backend.range(c.key, 1)}.get(c.kind)
            if held is None:
                raise InvalidArgument(f"unknown transaction compare {c.kind!r}")
            if not held:
                return False
        for op in ops:
            if op.kind == "put":
                backend.put(op.key, op.value, None)
            elif op.kind == "delete":
                if backend.get(op.key) is not None:
                    backend.delete_keys([op.key])
            elif op.kind == "delete_prefix":
                backend.delete_keys([kv.key for kv in backend.range(op.key)])
            else:
                raise InvalidArgument(f"unknown transaction op {op.kind!r}")
        return True

    async def grant_lease(self, ttl_s: int) -> Lease:
        if ttl_s < 1:
            raise InvalidArgument(f"lease TTL must be at least 1 s, got {ttl_s}")
        lease = self._check_open().grant(ttl_s)
        self._kept_alive.add(lease.id)
        return lease

    async def revoke_lease(self, lease: Lease) -> None:
        backend = self._check_open()
        self._kept_alive.discard(lease.id)
        backend.revoke(lease.id)
        lease.lost.set()  # also when ``lease`` is another object for the same id

    def stop_keepalive(self, lease: Lease) -> None:
        """Test hook: stop keeping ``lease`` alive without revoking it, as if its owner died."""
        self._kept_alive.discard(lease.id)
        self.backend.stop_keepalive(lease.id)

    def expire_leases(self) -> list[int]:
        """Expire the leases whose deadline passed on the injected clock (tests call this)."""
        return self.backend.expire_leases()

    async def compact(self, revision: int) -> None:
        """Forget the history before ``revision``; watchers behind it get a WatchReset."""
        self._check_open().compact(revision)

    async def watch_prefix(
        self, prefix: str, *, start_revision: int, snapshot_on_reset: bool = True, deletes_only: bool = False
    ) -> AsyncGenerator[WatchEvent | WatchReset, None]:
        # Like EtcdStore: a watch on a closed store ends (its owner is shutting down), never raises.
        async for item in self.backend.watch(prefix, start_revision, lambda: self._closed):
            if isinstance(item, WatchReset) and not snapshot_on_reset:
                item = WatchReset([], item.revision)
            elif deletes_only and isinstance(item, WatchEvent) and item.type is EventType.PUT:
                continue
            yield item

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for lease_id in self._kept_alive:
            self.backend.stop_keepalive(lease_id)
        self._kept_alive.clear()
        self.backend.wake_watchers()  # wake our watchers so they see ``closed`` and end


def _kv(key: str, entry: _Entry) -> KeyValue:
    return KeyValue(key, entry.value, entry.mod_revision, entry.create_revision, entry.lease)
