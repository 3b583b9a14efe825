"""The key-value interface under the registry, with two implementations of one semantics.

``EtcdStore`` (production, aetcd) and ``MemoryStore`` (embedded single-process mode and tests)
both implement :class:`KVStore`. The semantics are etcd's: a global revision that every write
increments, per-key ``mod_revision`` for compare-and-swap, leases whose keys vanish when the lease
expires, and prefix watches that start at a revision.

Two things are added on top of raw etcd, because every caller needs them:

* ``watch_prefix`` never ends on a disconnect: it resumes from the last revision it delivered + 1,
  with backoff. If that revision was compacted away it relists and yields one :class:`WatchReset`
  carrying the fresh snapshot, after which events continue.
* Leases keep themselves alive (``Lease``'s keep-alive task refreshes at a third of the TTL), and set
  ``Lease.lost`` when the store says the lease has expired, so the owner can re-publish.

Keys are ``str`` (UTF-8 in etcd), values ``bytes``. Every method raises
:class:`mesh.errors.RegistryUnavailable` when the store cannot be reached within its timeout.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mesh.errors import MeshError


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int = 0
    lease: int = 0


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: EventType
    key: str
    value: bytes  # empty for DELETE
    mod_revision: int


@dataclass(frozen=True, slots=True)
class WatchReset:
    """The watch lost history (compaction): replace everything known under the prefix."""

    snapshot: list[KeyValue]
    revision: int


@dataclass(frozen=True, slots=True)
class Compare:
    """One condition of a transaction: ``key`` is ``absent``, ``present``, at ``mod_revision``
    ``revision``, or (``prefix_empty``) no key starts with it."""

    kind: str  # absent | present | mod_revision | prefix_empty
    key: str
    revision: int = 0


@dataclass(frozen=True, slots=True)
class Op:
    """One write of a transaction: ``put`` (value), ``delete`` a key, or ``delete_prefix``."""

    kind: str  # put | delete | delete_prefix
    key: str
    value: bytes = b""


@dataclass(frozen=True, slots=True)
class Create:
    """One item of :meth:`KVStore.create_many`: write ``value`` at ``key`` (and the ``also`` puts,
    in the same transaction) only if ``key`` and every key of ``absent`` are absent."""

    key: str
    value: bytes
    absent: tuple[str, ...] = ()  # other keys that must not exist (a graph of the same ID)
    also: tuple[tuple[str, bytes], ...] = ()  # written with it (the pin index)


@dataclass(frozen=True, slots=True)
class Created:
    """What :meth:`KVStore.create_many` did with one item: ``created`` at ``revision``, or not,
    with ``existing`` (the key's current value, None if absent) and ``blocker`` (the first key of
    ``absent`` that exists, "" if none); or ``error`` when the store could not say."""

    created: bool
    revision: int = 0
    existing: KeyValue | None = None
    blocker: str = ""
    error: MeshError | None = None  # the round trip failed: the item may or may not be written


@dataclass(eq=False)
class Lease:
    """A granted lease. ``lost`` is set once the store reports it expired or revoked."""

    id: int
    ttl_s: int
    lost: asyncio.Event = field(default_factory=asyncio.Event)


class KVStore(Protocol):
    @property
    def connected(self) -> bool:
        """False while the store cannot be reached (a call failed or a watch broke) until it answers
        again; readiness follows it. Never raises, never waits."""
        ...

    async def get(self, key: str) -> KeyValue | None: ...

    async def get_prefix(
        self, prefix: str, *, limit: int = 0, start_after: str = ""
    ) -> tuple[list[KeyValue], int]:
        """Items under ``prefix`` sorted by key (after ``start_after``, at most ``limit`` if > 0),
        and the store revision they were read at."""
        ...

    async def current_revision(self, key: str) -> int:
        """The store's revision now (where a watch "from now" starts), read by looking up the one
        key ``key`` (any key the caller may read: etcd users are limited to prefixes). Not a ranged
        read: etcd counts every key in a range, even with a limit (250-400 ms at a million
        registrations, measured; BENCHMARKS.md, "Router start-up at scale")."""
        ...

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        """Write unconditionally; returns the new revision."""
        ...

    async def create(self, key: str, value: bytes, *, lease: Lease | None = None) -> bool:
        """Write only if ``key`` is absent; False if it exists."""
        ...

    async def replace(
        self, key: str, value: bytes, *, expected_mod_revision: int, lease: Lease | None = None
    ) -> bool:
        """Compare-and-swap: write only if ``key``'s mod_revision is still the expected one."""
        ...

    async def delete(self, key: str, *, expected_mod_revision: int | None = None) -> bool:
        """Delete (conditionally on mod_revision when given); True if a key was deleted."""
        ...

    async def delete_prefix(self, prefix: str) -> int: ...

    async def txn(self, compares: Sequence[Compare], ops: Sequence[Op]) -> bool:
        """Apply every op atomically if every compare holds; False (nothing written) otherwise."""
        ...

    async def create_many(self, items: Sequence[Create]) -> list[Created]:
        """Create-if-absent for each item, in as few round trips as the store allows (etcd: nested
        transactions, one per item, grouped up to ``--max-txn-ops`` and the request size limit).
        Not atomic across items: each is created or not on its own, and the answer is per item, in
        order. Keys must be distinct. A round trip that may have been applied is sent again only as
        the same create-if-absent, so an item is never written twice: a retried write that finds its
        own value reports it ``existing`` (the caller compares the bytes)."""
        ...

    async def get_many(self, keys: Sequence[str]) -> list[KeyValue | None]:
        """The current value of each key (None if absent), grouped into few round trips."""
        ...

    async def count_prefix(self, prefix: str) -> int:
        """How many keys are under ``prefix``, without reading them (etcd's ``count_only`` range:
        the count of a million registrations is one small answer, not a million values)."""
        ...

    async def grant_lease(self, ttl_s: int) -> Lease:
        """Grant a lease and start keeping it alive until revoked or the store closes."""
        ...

    async def revoke_lease(self, lease: Lease) -> None:
        """Stop the keep-alive and revoke: the lease's keys disappear now."""
        ...

    def stop_keepalive(self, lease: Lease) -> None:
        """Stop refreshing ``lease`` without revoking it: its keys expire after its TTL. For
        records that should expire on their own (load failures), and for tests that simulate an
        owner that died."""
        ...

    def watch_prefix(
        self, prefix: str, *, start_revision: int, snapshot_on_reset: bool = True, deletes_only: bool = False
    ) -> AsyncIterator[WatchEvent | WatchReset]:
        """Events from ``start_revision`` on; after a compaction a WatchReset with the prefix's
        items (read in pages), or with none when ``snapshot_on_reset`` is False (a consumer that
        only drops what it derived: no need to read a million keys). ``deletes_only``: PUT events
        are filtered out by the store (etcd's NOPUT filter: they never reach this process)."""
        ...

    async def close(self) -> None: ...
