"""A publisher's registry session: one lease, and the keys its owner publishes on it.

A runtime instance publishes its instance record and one placement key per loaded model, all bound to
one lease, so that they all vanish within the TTL if the process dies. The session adds what every
publisher would otherwise have to get right on its own:

* **Desired state.** The session remembers the value of every key it owns. A write that fails
  (registry unreachable) leaves the key *pending*, and the background task keeps retrying with capped
  exponential backoff until the registry holds what the owner asked for.
* **Lease loss.** When the store sets ``lease.lost`` (an outage longer than the TTL, or the lease was
  revoked behind our back) the task grants a new lease and re-puts every owned key under it. The old
  lease is not revoked: if etcd still has it, revoking would delete keys not yet moved to the new one;
  it expires on its own, owning nothing by then.
* **Ordering.** One lock serialises the session's writes, foreground and background, so a retry of an
  old value can never land after a newer ``put`` of the same key.

``put``/``delete`` raise :class:`~mesh.errors.RegistryUnavailable` when the registry cannot be reached,
or :class:`~mesh.errors.RegistryFull` when etcd refuses writes for want of space (its NOSPACE alarm),
so callers know; the change is still remembered and retried, with the same backoff. A ``put`` that
meets a lost lease does not raise: re-publishing under a new lease is exactly this class's job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import MappingProxyType

import structlog

from mesh.errors import FailedPrecondition, MeshError
from mesh.registry.base import KVStore, Lease
from mesh.tasks import cancel_and_wait, spawn

log = structlog.get_logger(__name__)


class RegistrySession:
    def __init__(
        self,
        store: KVStore,
        ttl_s: int,
        *,
        name: str = "session",
        backoff_s: tuple[float, float] = (0.2, 5.0),
    ) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self.name = name
        self._backoff_initial, self._backoff_max = backoff_s
        self._lease: Lease | None = None
        self._owned: dict[str, bytes] = {}
        self._pending: set[str] = set()  # keys whose registry state may differ from _owned
        self._lock = asyncio.Lock()
        self._work = asyncio.Event()  # new pending keys for the background task
        self._synced = asyncio.Event()  # set while nothing is pending (see ``synced``)
        self._changed = asyncio.Event()  # replaced on every state change, for wait_synced
        self._task: asyncio.Task[None] | None = None
        self._log = log.bind(session=name)

    @property
    def lease(self) -> Lease | None:
        """The current lease (replaced after a loss)."""
        return self._lease

    @property
    def owned(self) -> Mapping[str, bytes]:
        return MappingProxyType(self._owned)

    @property
    def synced(self) -> bool:
        """True when every owned key is written under the current, live lease."""
        lease = self._lease
        return self._synced.is_set() and lease is not None and not lease.lost.is_set()

    async def wait_synced(self) -> None:
        """Return once ``synced``: e.g. after a lost lease was replaced and the keys re-published."""
        while not self.synced:
            await self._changed.wait()

    async def start(self) -> None:
        """Grant the lease (raises RegistryUnavailable if the registry is down) and start the task."""
        if self._task is not None:
            return
        self._lease = await self._store.grant_lease(self._ttl_s)
        self._log = log.bind(session=self.name, lease=f"{self._lease.id:x}")
        self._set_synced()
        self._task = spawn(self._run(), name=f"registry-session {self.name}")

    async def put(self, key: str, value: bytes) -> None:
        self._require_lease()
        async with self._lock:
            lease = self._lease  # read under the lock: _renew may have replaced it while we waited
            assert lease is not None
            self._owned[key] = value
            self._mark_pending(key)
            if lease.lost.is_set():
                return  # the background task is about to re-grant and write it
            try:
                await self._store.put(key, value, lease=lease)
            except FailedPrecondition:  # the store's answer to a write under a lost lease
                self._log.info("put met a lost lease; will re-publish", key=key)
                return
            self._done(key)

    async def delete(self, key: str) -> None:
        self._require_lease()
        async with self._lock:
            self._owned.pop(key, None)
            self._mark_pending(key)
            await self._store.delete(key)
            self._done(key)

    async def close(self, revoke: bool = True) -> None:
        """Stop the background task; with ``revoke`` the lease's keys vanish now.

        Without ``revoke`` the lease lives until the store stops keeping it alive (``store.close()``)
        and then expires after its TTL. A failed revoke is logged, not raised: shutdown goes on and
        the keys expire by TTL.
        """
        await cancel_and_wait(self._task)
        self._task = None
        lease = self._lease
        if not revoke or lease is None or lease.lost.is_set():
            return
        async with self._lock:
            try:
                await self._store.revoke_lease(lease)
            except MeshError as exc:
                self._log.warning("could not revoke the lease; its keys expire by TTL", error=str(exc))

    # -- internals ------------------------------------------------------------------------------

    def _require_lease(self) -> Lease:
        if self._lease is None or self._task is None:
            raise FailedPrecondition(f"registry session {self.name!r} is not started")
        return self._lease

    def _mark_pending(self, key: str) -> None:
        """Called before a write: if it fails, the background task finds the key and retries."""
        self._pending.add(key)
        self._synced.clear()
        self._work.set()

    def _done(self, key: str) -> None:
        self._pending.discard(key)
        if not self._pending:
            self._set_synced()

    def _set_synced(self) -> None:
        self._synced.set()
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _run(self) -> None:
        backoff = self._backoff_initial
        while True:
            lease = self._lease
            assert lease is not None
            if lease.lost.is_set():
                await self._renew(lease)
                continue
            if self._pending:
                if await self._flush():
                    backoff = self._backoff_initial
                elif not lease.lost.is_set():
                    await asyncio.sleep(backoff)  # registry unreachable: nothing to wait on but time
                    backoff = min(backoff * 2, self._backoff_max)
                continue
            self._set_synced()
            await self._wait_for_work(lease)

    async def _wait_for_work(self, lease: Lease) -> None:
        self._work.clear()
        if self._pending:
            return
        waiters = {
            asyncio.create_task(lease.lost.wait(), name=f"registry-session {self.name}: lease lost"),
            asyncio.create_task(self._work.wait(), name=f"registry-session {self.name}: new work"),
        }
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _renew(self, old: Lease) -> None:
        """Grant a new lease (retrying with backoff) and mark every owned key for re-publishing."""
        self._synced.clear()
        backoff = self._backoff_initial
        while True:
            try:
                new = await self._store.grant_lease(self._ttl_s)
                break
            except MeshError as exc:
                self._log.warning(
                    "registry lease lost; cannot grant a new one yet", error=str(exc), retry_in_s=backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max)
        async with self._lock:
            self._lease = new
            self._pending.update(self._owned)
        self._notify()
        self._log = log.bind(session=self.name, lease=f"{new.id:x}")
        self._log.warning(
            "registry lease lost; re-publishing under a new lease",
            old_lease=f"{old.id:x}", keys=len(self._owned),
        )  # fmt: skip

    async def _flush(self) -> bool:
        """Write every pending key; False at the first failure (the caller backs off or renews)."""
        written = 0
        for key in sorted(self._pending):
            async with self._lock:
                if key not in self._pending:
                    continue  # a foreground write handled it meanwhile
                value = self._owned.get(key)
                try:
                    if value is None:
                        await self._store.delete(key)
                    else:
                        await self._store.put(key, value, lease=self._lease)
                except MeshError as exc:  # unreachable, a lost lease, or full (RegistryFull): retried
                    self._log.info("registry write failed; will retry", key=key, error=str(exc))
                    return False
                self._pending.discard(key)
                written += 1
        if written:
            self._log.info("registry keys re-published", keys=written)
        return True
