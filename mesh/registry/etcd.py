"""The production registry: :class:`~mesh.registry.base.KVStore` over etcd v3 with aetcd 1.0.0.

This is the only module that imports aetcd or talks gRPC to etcd. Nothing from aetcd or grpc leaves
it: a store that cannot be reached within the call's deadline raises
:class:`~mesh.errors.RegistryUnavailable` naming the endpoints and the reasons; a write bound to a
lease etcd no longer has raises :class:`~mesh.errors.FailedPrecondition` and sets ``lease.lost``.

Design decisions:

* **Endpoints.** One aetcd client (one gRPC channel) per endpoint. Calls go to the current one; on a
  connection failure the next endpoint is tried within the same deadline, and the current one moves on,
  so the next call starts at a member that answered. Each store starts at a member picked at random
  (``first`` fixes it): a member serves the watches of the clients connected to it, so the routers of
  a fleet, all given the same list, spread their watch fan-out over the members instead of all
  watching the first one listed (BENCHMARKS.md, section 23). Conditional writes (``create``, ``replace``,
  ``delete``) move on only when the request was never sent (gRPC could not connect): after a timeout or
  a dropped stream the write may have been applied, and a replayed ``create`` would wrongly answer
  False. A deadline is never retried elsewhere, whatever the call.
* **Deadline.** ``timeout_s`` (default 2 s) bounds each public call as a whole, fail-over included.
* **Keep-alive.** aetcd has no background keep-alive, so each lease gets a named task refreshing at
  TTL/3. etcd answering TTL <= 0 means the lease is gone: ``lost`` is set and the task ends. Connection
  errors are retried until the TTL has certainly run out since the last successful refresh (measured
  from when its answer arrived), and only then is ``lost`` set: the owner re-publishes under a new lease.
* **Watches** use etcd's Watch RPC directly (one stream per ``watch_prefix``, on the endpoint's
  channel) rather than aetcd's shared watcher, whose stream can end without telling its subscribers.
  A broken stream resumes from the last delivered ``mod_revision + 1`` with capped exponential backoff,
  on the next endpoint. A compacted start revision relists the prefix in one Range (one consistent
  revision) and yields a :class:`~mesh.registry.base.WatchReset`, then continues after its revision.
* **Connectivity** (``connected``, for readiness): false from the first call that finds no member
  reachable, or the first broken watch stream, until a call is answered or a watch is confirmed
  again. Watches break at once when etcd goes away (the connection resets) and resume within
  ``watch_backoff_s``, so an idle process notices both transitions within about two seconds; each
  transition is logged once.
* **Security** (``mesh.registry.security``): TLS with the CA, and a client certificate for etcd's
  ``--client-cert-auth``; an etcd user and password. aetcd 1.0.0 accepts a user and password but
  dials plaintext only, so ``_Client`` opens the channel itself (TLS when configured). etcd's auth
  tokens expire (``--auth-token-ttl``, 5 min by default) and aetcd never renews them: a call
  answered "invalid auth token" re-authenticates and is sent once more. The password and the
  token are never logged; wrong credentials are an ``InvalidArgument`` naming the user.
* **A full registry** (etcd's NOSPACE alarm: its database reached ``--quota-backend-bytes``) is an
  answer, not an outage: etcd then refuses every write that adds data (puts, transactions with
  puts, lease grants) with RESOURCE_EXHAUSTED "mvcc: database space exceeded", and still serves
  reads, watches, deletes and lease keep-alives. Such a write raises
  :class:`~mesh.errors.RegistryFull` (RESOURCE_EXHAUSTED, a message that names the cause and the
  remedy) at once, without trying the other members (they share the alarm), and ``connected``
  stays true: readiness must not drop, and inference go with it, because registrations cannot be
  written. Other RESOURCE_EXHAUSTED answers ("too many requests") stay transient: next member.
* **Channel options**: reconnect backoff capped at 1 s (gRPC's default grows to 120 s, which would
  keep us away from a restarted etcd), keepalive pings to notice a silently dead connection, and a
  large receive limit because one watch response carries a whole revision (a range delete of 100k
  keys is one revision).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions
import grpc
import structlog
from aetcd import rpc, watcher

from mesh.errors import FailedPrecondition, InvalidArgument, MeshError, RegistryFull, RegistryUnavailable
from mesh.registry.base import Compare, Create, Created, EventType, KeyValue, Lease, Op, WatchEvent, WatchReset
from mesh.registry.etcd_wire import TXN_METHOD, create_txn
from mesh.registry.security import EtcdSecurity
from mesh.tasks import cancel_and_wait, spawn

log = structlog.get_logger(__name__)

T = TypeVar("T")

_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1_000,
    # etcd answers pings more frequent than every 5 s (--grpc-keepalive-min-time) with GOAWAY.
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.http2.ping_timeout_ms": 5_000,  # what grpc 1.85 times the ping out by (60 s otherwise)
    "grpc.max_receive_message_length": 256 * 1024 * 1024,
}
# Codes meaning "this member could not serve the call now": try the next endpoint, else unavailable.
_UNREACHABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_TRANSPORT_ERRORS = (aetcd.exceptions.ClientError, grpc.RpcError, OSError)
_KEEPALIVE_RETRY_S = 0.5
_SIZE_EVERY_S = 5.0  # how often a full registry's size is read again for RegistryFull's message
_REQUIRE_LEADER = ("hasleader", "true")  # etcd's rpctypes.MetadataRequireLeaderKey
RELIST_PAGE = 10_000  # keys per page when a watch relists after compaction
# Grouped writes (create_many, get_many): etcd refuses a transaction with more than --max-txn-ops
# operations at any one level (default 128) and a request over --max-request-bytes (default
# 1.5 MiB); a group stays under both, leaving room for the request's framing.
MAX_TXN_OPS = 128
MAX_TXN_BYTES = 1024 * 1024
_ITEM_OVERHEAD = 48  # bytes of protobuf framing per item (nested txn, compares, ops), generously


def _prefix_range(prefix: str) -> tuple[bytes, bytes]:
    """etcd's [key, range_end) for a prefix; the empty prefix is every key (``\\0``, ``\\0``)."""
    key = prefix.encode()
    end = bytearray(key)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return key, bytes(end)
        end.pop()
    return key or b"\0", b"\0"


def _status_code(exc: BaseException) -> grpc.StatusCode | None:
    """The gRPC status behind an aetcd or grpc exception (aetcd chains the original as __cause__)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, grpc.aio.AioRpcError):
            return seen.code()
        seen = seen.__cause__
    return None


def _compare(c: Compare) -> Any:
    """etcd's Compare for ours. ``prefix_empty`` compares create_revision == 0 over the whole range:
    etcd checks every key in it, and an empty range holds (it compares an absent key)."""
    key = c.key.encode()
    if c.kind in ("absent", "present"):
        result = rpc.Compare.EQUAL if c.kind == "absent" else rpc.Compare.GREATER
        return rpc.Compare(result=result, target=rpc.Compare.CREATE, key=key, create_revision=0)
    if c.kind == "mod_revision":
        return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=key, mod_revision=c.revision)
    if c.kind == "prefix_empty":
        start, end = _prefix_range(c.key)
        return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=start, range_end=end,
                           create_revision=0)
    raise InvalidArgument(f"unknown transaction compare {c.kind!r}")


def _request_op(o: Op) -> Any:
    if o.kind == "put":
        return rpc.RequestOp(request_put=rpc.PutRequest(key=o.key.encode(), value=o.value))
    if o.kind == "delete":
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=o.key.encode()))
    if o.kind == "delete_prefix":
        start, end = _prefix_range(o.key)
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=start, range_end=end))
    raise InvalidArgument(f"unknown transaction op {o.kind!r}")


def _too_large(exc: BaseException) -> bool:
    """etcd's answer to a request over its size limit: "request is too large", or gRPC's
    RESOURCE_EXHAUSTED "received message larger than max" before etcd saw it."""
    text = _reason(exc)
    return "request is too large" in text or "larger than max" in text


def _no_space(exc: BaseException) -> bool:
    """etcd's answer to a write while its NOSPACE alarm is raised (the database reached
    ``--quota-backend-bytes``): RESOURCE_EXHAUSTED "etcdserver: mvcc: database space exceeded"."""
    return "database space exceeded" in _reason(exc)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__


def _never_sent(exc: BaseException) -> bool:
    """gRPC failed before sending: no connection could be made (the channel's pick failed)."""
    return _status_code(exc) is grpc.StatusCode.UNAVAILABLE and "failed to connect" in _reason(exc)


def _item_bytes(item: Create) -> int:
    return (2 * len(item.key) + len(item.value) + sum(2 * len(k) for k in item.absent)
            + sum(len(k) + len(v) for k, v in item.also) + _ITEM_OVERHEAD)


def _groups(sizes: Sequence[int], max_ops: int, max_bytes: int) -> list[range]:
    """Consecutive index ranges of at most ``max_ops`` items and ``max_bytes`` (an item over it alone)."""
    out: list[range] = []
    start, size = 0, 0
    for i, n in enumerate(sizes):
        if i > start and (i - start >= max_ops or size + n > max_bytes):
            out.append(range(start, i))
            start, size = i, 0
        size += n
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out


def _kv(kv: Any) -> KeyValue:
    return KeyValue(kv.key.decode(), kv.value, kv.mod_revision, kv.create_revision, kv.lease)


def _auth_expired(exc: BaseException) -> bool:
    return _status_code(exc) is grpc.StatusCode.UNAUTHENTICATED or "invalid auth token" in _reason(exc)


class _Client(aetcd.Client):  # type: ignore[misc]  # aetcd ships no types
    """aetcd's client, dialling TLS when configured (aetcd 1.0.0 dials plaintext only), and able to
    renew its auth token."""

    def __init__(self, *, credentials: grpc.ChannelCredentials | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        """aetcd's ``connect`` (1.0.0), with the channel's credentials."""
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            target = f"{self._host}:{self._port}"
            options = list(self._options.items())
            self.channel = (rpc.secure_channel(target, self._credentials, options=options)
                            if self._credentials is not None else rpc.insecure_channel(target, options=options))
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                await self._authenticate()
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                            metadata=self.metadata)  # type: ignore[has-type]
            self._connected.set()
        except rpc.AioRpcError as exc:
            if self.channel is not None:
                await self.channel.close()
            self._init_channel_attrs()
            aetcd.exceptions._handle_exception(exc)
        finally:
            self._is_connecting = False

    async def _authenticate(self) -> None:
        request = rpc.AuthenticateRequest(name=self._username, password=self._password)
        response = await self.auth_stub.Authenticate(request, timeout=self._timeout)
        self.metadata = (("token", response.token),)

    async def reauthenticate(self) -> None:
        """A fresh auth token on the same channel (the old one expired)."""
        if self.auth_stub is not None:
            await self._authenticate()


class _WatchInterrupted(Exception):
    """The watch stream ended or was refused; the watch resumes after a backoff."""


class EtcdStore:
    """:class:`~mesh.registry.base.KVStore` over one etcd cluster (one or more member endpoints)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout_s: float = 2.0,
        watch_backoff_s: tuple[float, float] = (0.1, 2.0),
        clock: Callable[[], float] = time.monotonic,
        security: EtcdSecurity | None = None,
        max_txn_ops: int = MAX_TXN_OPS,
        first: int | None = None,
    ) -> None:
        if not endpoints:
            raise InvalidArgument("EtcdStore needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.url = "etcd://" + ",".join(self.endpoints)  # never credentials: safe to log
        self._security = security
        self._credentials = (grpc.ssl_channel_credentials(root_certificates=security.ca, private_key=security.key,
                                                          certificate_chain=security.cert)
                             if security is not None and security.tls else None)
        self.timeout_s = timeout_s
        self.max_txn_ops = max_txn_ops  # etcd's --max-txn-ops: items per grouped transaction
        self._backoff_initial, self._backoff_max = watch_backoff_s
        self._clock = clock
        self._clients = [self._client(e) for e in self.endpoints]
        self._current = random.randrange(len(self._clients)) if first is None else first % len(self._clients)
        self._keepalives: dict[int, asyncio.Task[None]] = {}
        self._closed = False
        self._closed_event = asyncio.Event()  # wakes watches sleeping in their backoff
        self._connected = True
        self._db_size: tuple[int, float] | None = None  # (bytes or 0, when read): RegistryFull's message
        self._db_size_lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        """False while etcd cannot be reached (see the module docstring)."""
        return self._connected

    def _set_connected(self, connected: bool, reason: str = "") -> None:
        if connected == self._connected or self._closed:
            return
        self._connected = connected
        if connected:
            log.info("registry connection restored", registry=self.url)
        else:
            log.warning("registry connection lost", registry=self.url, error=reason)

    def _client(self, endpoint: str) -> aetcd.Client:
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise InvalidArgument(f"etcd endpoint {endpoint!r} is not host:port")
        user = self._security.username if self._security is not None else None
        password = self._security.password if self._security is not None else None
        return _Client(host=host, port=int(port), username=user, password=password, timeout=self.timeout_s,
                       options=_CHANNEL_OPTIONS, credentials=self._credentials)

    # -- the call wrapper -----------------------------------------------------------------------

    async def _call(
        self,
        what: str,
        op: Callable[[aetcd.Client], Awaitable[T]],
        *,
        lease: Lease | None = None,
        idempotent: bool = True,
    ) -> T:
        """Run ``op`` on the current endpoint, failing over on connection errors, within the deadline."""
        if self._closed:
            raise RegistryUnavailable(f"registry {self.url} unavailable: store closed")
        failures: list[str] = []
        start = index = self._current
        try:
            async with asyncio.timeout(self.timeout_s):
                for attempt in range(len(self._clients)):
                    index = (start + attempt) % len(self._clients)
                    try:
                        try:
                            result = await op(self._clients[index])
                        except _TRANSPORT_ERRORS as exc:
                            if not (self._security is not None and self._security.username and _auth_expired(exc)):
                                raise
                            # etcd refused the token before doing anything: renew it and send once more.
                            await self._clients[index].reauthenticate()
                            result = await op(self._clients[index])
                    except _TRANSPORT_ERRORS as exc:
                        code = _status_code(exc)
                        if _too_large(exc):  # a permanent error of this call, not of the registry
                            self._set_connected(True)
                            raise InvalidArgument(f"registry {self.url} refused {what}: larger than etcd "
                                                  "accepts in one request (--max-request-bytes)") from None
                        if _no_space(exc):  # etcd answered: it is up, and full (module docstring)
                            self._set_connected(True)
                            raise await self._registry_full(what) from None
                        if code is not None and code not in _UNREACHABLE:
                            self._set_connected(True)  # etcd answered, with an error
                            raise self._translate(exc, code, what, lease) from None
                        failures.append(f"{self.endpoints[index]}: {_reason(exc)}")
                        self._rotate(index)
                        if code is grpc.StatusCode.DEADLINE_EXCEEDED or not (idempotent or _never_sent(exc)):
                            break  # it may have been applied: do not repeat it elsewhere
                        continue
                    self._current = index
                    self._set_connected(True)
                    return result
        except TimeoutError:
            failures.append(f"{self.endpoints[index]}: no answer within {self.timeout_s:g}s")
            self._rotate(index)
        self._set_connected(False, failures[-1] if failures else what)
        raise RegistryUnavailable(f"registry {self.url} unavailable: {what}: {'; '.join(failures)}")

    async def _registry_full(self, what: str) -> RegistryFull:
        """The error for a write etcd refused for want of space, with the database's size (its
        quota, give or take one request: etcd refuses the write that would pass it). The size is
        read, and the refusal logged, at most every ``_SIZE_EVERY_S``: a storm of refused writes
        is not a storm of Status calls or log lines. No size if it cannot be read within 1 s."""
        async with self._db_size_lock:  # concurrent refusals wait for one read
            now = self._clock()
            if self._db_size is None or now - self._db_size[1] > _SIZE_EVERY_S:
                try:
                    async with asyncio.timeout(1.0):
                        self._db_size = (await self.db_size(), now)
                except (MeshError, TimeoutError):
                    self._db_size = (0, now)  # unknown: said without it, read again after _SIZE_EVERY_S
                log.warning("registry full: etcd refuses writes until it is compacted, defragmented and its "
                            "NOSPACE alarm disarmed", registry=self.url, call=what[:200], db_size=self._db_size[0])
        # The size, not the quota itself (no RPC tells it): at the alarm they differ by the writes
        # in flight when it rose, a fraction of a MiB.
        size = f" (database at its quota: {self._db_size[0] / 2**20:.1f} MiB)" if self._db_size[0] else ""
        return RegistryFull(f"{RegistryFull.CAUSE}{size}: compact and defragment it and disarm its "
                            "NOSPACE alarm, or raise --quota-backend-bytes (docs/operations.md, "
                            "\"etcd at its quota\")")

    async def db_size(self) -> int:
        """The database file's size in bytes on the member that answers (etcd's Status RPC, the
        DB SIZE column of ``etcdctl endpoint status``): what ``--quota-backend-bytes`` bounds."""
        async def op(c: aetcd.Client) -> Any:
            await c.connect()
            return await c.maintenancestub.Status(rpc.StatusRequest(), timeout=self.timeout_s, metadata=c.metadata)

        return int((await self._call("read the database size", op)).dbSize)

    def _rotate(self, failed: int) -> None:
        if self._current == failed:
            self._current = (failed + 1) % len(self._clients)

    def _translate(
        self, exc: BaseException, code: grpc.StatusCode, what: str, lease: Lease | None
    ) -> MeshError:
        reason = _reason(exc)
        if code is grpc.StatusCode.NOT_FOUND and "lease not found" in reason and lease is not None:
            lease.lost.set()
            return FailedPrecondition(f"lease {lease.id:x} not found (expired or revoked) in {what}")
        if ("authentication failed" in reason or "user name is empty" in reason
                or code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)):
            user = self._security.username if self._security is not None else None
            if user:
                who = f"user {user!r}"
            elif self._security is not None and self._security.cert is not None:
                who = "the user its client certificate names (registry.cert_file's common name)"
            else:
                who = "no user (set registry.username and registry.password, or registry.cert_file)"
            return InvalidArgument(f"registry {self.url} refused {what} for {who}: {reason}")
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidArgument(f"registry {self.url} rejected {what}: {reason}")
        return RegistryUnavailable(f"registry {self.url} unavailable: {what}: {reason}")

    # -- key/value ------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        result = await self._call(f"get {key}", lambda c: c.get(key.encode()))
        return None if result is None else _kv(result)

    async def get_prefix(
        self, prefix: str, *, limit: int = 0, start_after: str = "", revision: int = 0
    ) -> tuple[list[KeyValue], int]:
        # aetcd's get_prefix has no limit, so this builds the Range request itself.
        start, end = _prefix_range(prefix)
        if start_after:
            start = max(start, start_after.encode() + b"\0")
        request = rpc.RangeRequest(key=start, range_end=end, limit=limit, revision=revision)

        async def op(c: aetcd.Client) -> Any:
            await c.connect()
            return await c.kvstub.Range(request, timeout=self.timeout_s, metadata=c.metadata)

        response = await self._call(f"list {prefix}*", op)
        return [_kv(kv) for kv in response.kvs], response.header.revision

    async def current_revision(self, key: str) -> int:
        request = rpc.RangeRequest(key=key.encode(), keys_only=True)  # one key: no range to count

        async def op(c: aetcd.Client) -> Any:
            await c.connect()
            return await c.kvstub.Range(request, timeout=self.timeout_s, metadata=c.metadata)

        return int((await self._call(f"read the revision ({key})", op)).header.revision)

    async def count_prefix(self, prefix: str) -> int:
        start, end = _prefix_range(prefix)
        request = rpc.RangeRequest(key=start, range_end=end, count_only=True)

        async def op(c: aetcd.Client) -> Any:
            await c.connect()
            return await c.kvstub.Range(request, timeout=self.timeout_s, metadata=c.metadata)

        response = await self._call(f"count {prefix}*", op)
        return int(response.count)

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        lease_id = lease.id if lease else 0
        result = await self._call(
            f"put {key}", lambda c: c.put(key.encode(), value, lease=lease_id), lease=lease
        )
        return int(result.header.revision)

    async def create(self, key: str, value: bytes, *, lease: Lease | None = None) -> bool:
        raw, lease_id = key.encode(), (lease.id if lease else 0)

        async def op(c: aetcd.Client) -> tuple[bool, list[Any]]:
            return await c.transaction(  # type: ignore[no-any-return]
                compare=[c.transactions.create(raw) == 0],  # create_revision 0: the key is absent
                success=[c.transactions.put(raw, value, lease=lease_id)],
                failure=[],
            )

        succeeded, _ = await self._call(f"create {key}", op, lease=lease, idempotent=False)
        return bool(succeeded)

    async def replace(
        self, key: str, value: bytes, *, expected_mod_revision: int, lease: Lease | None = None
    ) -> bool:
        raw, lease_id = key.encode(), (lease.id if lease else 0)

        async def op(c: aetcd.Client) -> tuple[bool, list[Any]]:
            return await c.transaction(  # type: ignore[no-any-return]
                compare=[c.transactions.mod(raw) == expected_mod_revision],
                success=[c.transactions.put(raw, value, lease=lease_id)],
                failure=[],
            )

        succeeded, _ = await self._call(f"replace {key}", op, lease=lease, idempotent=False)
        return bool(succeeded)

    async def delete(self, key: str, *, expected_mod_revision: int | None = None) -> bool:
        raw = key.encode()
        if expected_mod_revision is None:
            result = await self._call(f"delete {key}", lambda c: c.delete(raw), idempotent=False)
            return result is not None

        async def op(c: aetcd.Client) -> tuple[bool, list[Any]]:
            return await c.transaction(  # type: ignore[no-any-return]
                compare=[c.transactions.mod(raw) == expected_mod_revision],
                success=[c.transactions.delete(raw)],
                failure=[],
            )

        succeeded, responses = await self._call(f"delete {key}", op, idempotent=False)
        return bool(succeeded) and responses[0].response_delete_range.deleted > 0

    async def delete_prefix(self, prefix: str) -> int:
        start, end = _prefix_range(prefix)
        result = await self._call(f"delete {prefix}*", lambda c: c.delete_range(start, end))
        return int(result.deleted)

    async def txn(self, compares: Sequence[Compare], ops: Sequence[Op]) -> bool:
        request = rpc.TxnRequest(compare=[_compare(c) for c in compares], success=[_request_op(o) for o in ops])

        async def op(c: aetcd.Client) -> Any:
            await c.connect()
            return await c.kvstub.Txn(request, timeout=self.timeout_s, metadata=c.metadata)

        what = f"transaction on {ops[0].key if ops else compares[0].key}"
        response = await self._call(what, op, idempotent=False)
        return bool(response.succeeded)

    async def create_many(self, items: Sequence[Create]) -> list[Created]:
        """Groups of nested create-if-absent transactions (``etcd_wire.create_op``), sent concurrently.

        A group is sent as ``idempotent``: on a connection failure it goes to the next member, and
        a group that failed without an answer (it may have been applied) is sent once more. Both are
        safe because every item is create-if-absent: an item the first send wrote is found, with
        its own bytes, by the second (``Registry.register_models`` counts it as created), never
        written twice. A group that still fails gives its items ``error``."""
        results: list[Created | None] = [None] * len(items)

        async def group(indexes: range) -> None:
            request = create_txn([items[i] for i in indexes])  # the TxnRequest's bytes (etcd_wire)

            async def op(c: aetcd.Client) -> Any:
                await c.connect()
                txn = c.channel.unary_unary(TXN_METHOD, response_deserializer=rpc.TxnResponse.FromString)
                return await txn(request, timeout=self.timeout_s, metadata=c.metadata)

            what = f"create {len(indexes)} keys from {items[indexes[0]].key}"
            try:
                try:
                    response = await self._call(what, op)
                except RegistryUnavailable:
                    response = await self._call(what, op)  # the same creates again: idempotent
            except MeshError as exc:
                for i in indexes:
                    results[i] = Created(False, error=exc)
                return
            revision = int(response.header.revision)
            for i, answer in zip(indexes, response.responses, strict=True):
                inner = answer.response_txn
                if inner.succeeded:
                    results[i] = Created(True, revision=revision)
                    continue
                found = inner.responses[0].response_range.kvs
                blocker = next((items[i].absent[j] for j, r in enumerate(inner.responses[1:])
                                if r.response_range.kvs), "")
                results[i] = Created(False, existing=_kv(found[0]) if found else None, blocker=blocker)

        # etcd gives a nested transaction what is left of --max-txn-ops after its parent's own
        # operations (v3rpc checkTxnRequest): a group holds max_txn_ops minus the widest item.
        width = max((1 + max(len(item.absent), len(item.also)) for item in items), default=1)
        groups = _groups([_item_bytes(item) for item in items], max(self.max_txn_ops - width, 1), MAX_TXN_BYTES)
        await asyncio.gather(*(group(g) for g in groups))
        return [r if r is not None else Created(False, error=RegistryUnavailable("not sent")) for r in results]

    async def get_many(self, keys: Sequence[str]) -> list[KeyValue | None]:
        out: list[KeyValue | None] = []
        for indexes in _groups([len(k) + _ITEM_OVERHEAD for k in keys], self.max_txn_ops, MAX_TXN_BYTES):
            request = rpc.TxnRequest(success=[rpc.RequestOp(request_range=rpc.RangeRequest(key=keys[i].encode()))
                                              for i in indexes])

            async def op(c: aetcd.Client, request: Any = request) -> Any:
                await c.connect()
                return await c.kvstub.Txn(request, timeout=self.timeout_s, metadata=c.metadata)

            response = await self._call(f"get {len(indexes)} keys from {keys[indexes[0]]}", op)
            out.extend(_kv(r.response_range.kvs[0]) if r.response_range.kvs else None for r in response.responses)
        return out

    async def compact(self, revision: int) -> None:
        """Forget history before ``revision`` (etcd compaction); older watches get a WatchReset."""
        try:
            await self._call(f"compact at {revision}", lambda c: c.compact(revision, physical=True))
        except RegistryUnavailable as exc:
            if "has been compacted" in str(exc):
                return  # already compacted at or past it: the outcome the caller wanted
            if "future revision" in str(exc):
                raise InvalidArgument(f"cannot compact at {revision}: it is a future revision") from None
            raise

    # -- leases ---------------------------------------------------------------------------------

    async def grant_lease(self, ttl_s: int) -> Lease:
        granted = await self._call(f"grant a {ttl_s}s lease", lambda c: c.lease(ttl_s))
        lease = Lease(id=granted.id, ttl_s=int(granted.ttl))
        expires_at = self._clock() + lease.ttl_s
        self._keepalives[lease.id] = spawn(
            self._keepalive(lease, expires_at), name=f"etcd-keepalive-{lease.id:x}"
        )
        return lease

    async def revoke_lease(self, lease: Lease) -> None:
        await cancel_and_wait(self._keepalives.pop(lease.id, None))
        try:
            await self._call(f"revoke lease {lease.id:x}", lambda c: c.revoke_lease(lease.id))
        except RegistryUnavailable as exc:
            if "lease not found" not in str(exc):
                raise
        lease.lost.set()

    def stop_keepalive(self, lease: Lease) -> None:
        """Test hook: stop refreshing ``lease`` without revoking it, as if its owner died."""
        task = self._keepalives.pop(lease.id, None)
        if task is not None:
            task.cancel()

    async def _keepalive(self, lease: Lease, expires_at: float) -> None:
        """Refresh ``lease`` until cancelled. If this task dies of anything else, the lease is
        lost from that moment (nobody refreshes it): say so at once, so that readiness turns off
        and the session grants a new lease, rather than at expiry or never."""
        try:
            await self._refresh_forever(lease, expires_at)
        except asyncio.CancelledError:
            raise
        except BaseException:
            log.error("lease keep-alive died; the lease counts as lost", lease=f"{lease.id:x}", exc_info=True)
            lease.lost.set()
            raise

    async def _refresh_forever(self, lease: Lease, expires_at: float) -> None:
        interval = lease.ttl_s / 3
        delay = interval
        while True:
            await asyncio.sleep(delay)

            async def op(c: aetcd.Client) -> int | None:
                reply = await c.refresh_lease(lease.id)
                return None if reply is None else int(reply.TTL)

            try:
                ttl = await self._call(f"refresh lease {lease.id:x}", op)
            except MeshError as exc:
                if self._clock() >= expires_at:
                    log.warning(
                        "lease lost: not refreshed within its TTL", lease=f"{lease.id:x}", error=str(exc)
                    )
                    lease.lost.set()
                    return
                log.info("lease refresh failed, retrying", lease=f"{lease.id:x}", error=str(exc))
                delay = min(interval, _KEEPALIVE_RETRY_S)
                continue
            if ttl is None:
                delay = min(interval, _KEEPALIVE_RETRY_S)  # the stream closed without an answer
                continue
            if ttl <= 0:
                log.warning("lease lost: etcd no longer has it", lease=f"{lease.id:x}")
                lease.lost.set()
                return
            expires_at = self._clock() + ttl
            delay = interval

    # -- watch ----------------------------------------------------------------------------------

    async def _relist(self, prefix: str) -> tuple[list[KeyValue], int]:
        """The whole prefix at one revision, read in pages of ``RELIST_PAGE`` keys (one response
        of a million keys would hold hundreds of MB in the client and in etcd at once)."""
        page, revision = await self.get_prefix(prefix, limit=RELIST_PAGE)
        items = list(page)
        while len(page) == RELIST_PAGE:
            page, _ = await self.get_prefix(prefix, limit=RELIST_PAGE, start_after=page[-1].key, revision=revision)
            items.extend(page)
        return items, revision

    async def _revision_only(self, prefix: str) -> tuple[list[KeyValue], int]:
        return [], await self.current_revision(prefix)

    async def watch_prefix(
        self, prefix: str, *, start_revision: int, snapshot_on_reset: bool = True, deletes_only: bool = False
    ) -> AsyncGenerator[WatchEvent | WatchReset, None]:
        key, end = _prefix_range(prefix)
        next_rev = start_revision
        backoff = self._backoff_initial
        while not self._closed:
            index = self._current
            compacted = False
            call: Any = None
            try:
                if next_rev <= 0:  # "from now": pin it, so that a resume cannot skip anything
                    now = await self.current_revision(prefix)
                    next_rev = now + 1
                client = self._clients[index]
                await client.connect()
                # hasleader: a member cut off from its cluster's leader cancels the watch ("no
                # leader") instead of serving a view that silently stops changing; progress_notify:
                # etcd says where the watch stands even when nothing changes.
                call = rpc.WatchStub(client.channel).Watch(metadata=(*(client.metadata or ()), _REQUIRE_LEADER))
                create = rpc.WatchCreateRequest(key=key, range_end=end, start_revision=next_rev,
                                                progress_notify=True,
                                                filters=[rpc.WatchCreateRequest.NOPUT] if deletes_only else [])
                async with asyncio.timeout(self.timeout_s):
                    await call.write(rpc.WatchRequest(create_request=create))
                    first = await call.read()
                if first is grpc.aio.EOF or not first.created:
                    raise _WatchInterrupted("etcd did not confirm the watch")
                self._set_connected(True)
                backoff = self._backoff_initial  # connected: the next failure starts the backoff over
                while True:
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        raise _WatchInterrupted("etcd closed the watch stream")
                    if response.compact_revision:
                        compacted = True
                        break
                    if response.canceled:
                        raise _WatchInterrupted(f"etcd cancelled the watch: {response.cancel_reason}")
                    if not response.events:  # a progress notification: everything up to it was sent
                        next_rev = max(next_rev, response.header.revision + 1)
                        continue
                    for ev in response.events:
                        kv = ev.kv
                        # A response holds whole revisions, so resuming after this one loses nothing.
                        next_rev = kv.mod_revision + 1
                        if ev.type == rpc.Event.DELETE:
                            yield WatchEvent(EventType.DELETE, kv.key.decode(), b"", kv.mod_revision)
                        else:
                            yield WatchEvent(EventType.PUT, kv.key.decode(), kv.value, kv.mod_revision)
            except (_WatchInterrupted, MeshError, TimeoutError, *_TRANSPORT_ERRORS) as exc:
                if self._closed:
                    return
                self._set_connected(False, f"watch {prefix}: {_reason(exc)}")
                if self._security is not None and self._security.username and "auth" in _reason(exc):
                    with contextlib.suppress(*_TRANSPORT_ERRORS):
                        await self._clients[index].reauthenticate()
                log.warning(
                    "registry watch interrupted, resuming",
                    prefix=prefix, revision=next_rev, endpoint=self.endpoints[index],
                    error=_reason(exc), retry_in_s=backoff,
                )  # fmt: skip
                self._rotate(index)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._closed and task is not None and task.cancelling() == 0:
                    return  # close() shut the channel under us; nobody cancelled the consumer
                raise
            finally:
                if call is not None:
                    call.cancel()
            if compacted:
                try:
                    snapshot, revision = await (self._relist(prefix) if snapshot_on_reset
                                                else self._revision_only(prefix))
                except RegistryUnavailable as exc:
                    log.warning("registry watch relist failed", prefix=prefix, error=str(exc))
                else:
                    log.info("registry watch reset after compaction", prefix=prefix, revision=revision)
                    yield WatchReset(snapshot, revision)
                    next_rev = revision + 1
                    continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed_event.wait(), backoff)
            backoff = min(backoff * 2, self._backoff_max)

    # -- lifecycle ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop keep-alives (the leases then expire by TTL), end the watches, close the channels."""
        if self._closed:
            return
        self._closed = True
        self._closed_event.set()
        tasks, self._keepalives = list(self._keepalives.values()), {}
        for task in tasks:
            await cancel_and_wait(task)
        for client in self._clients:
            await client.close()
