"""Router-to-runtime inference over long-lived bidirectional streams ("multiplexing").

Why. A unary gRPC call per forwarded request costs both processes a call object, HTTP/2 HEADERS
and trailers, and several completion-queue wake-ups. Sending requests as messages on a few
long-lived streams, matched to their answers by an ID, halves the runtime's CPU per request and
cuts the router's by a fifth; on this 2-core machine the added latency of the hop fell from
+0.61 ms to +0.33 ms at concurrency 1 (measured with an echo backend; see BENCHMARKS.md). Clients
still talk unary V2 gRPC to the router, and to runtimes directly; only the internal hop changes.

Method: ``/mesh.internal.Multiplex/Stream``, bytes in both directions. Each stream message is a
batch: one or more frames, each prefixed by its u32 length. Frames that arrive while a write is in
flight go out together in the next message (``CombiningWriter``), so under load many requests
share one HTTP/2 DATA frame and one ``sendmsg``, while at concurrency 1 a frame is written at once
by the request's own coroutine, with no queue and no task hop. A batch holds at most
``router.max_message_bytes`` (a larger frame goes alone; the stream's channel and the runtime's
port take a message up to that plus ``FRAME_HEADROOM``): a batch over the limit would break the
stream and every request on it, as a flood of requests near the limit once did.

Request frame (little-endian)::

    u64 id | u8 flags (bit 0: load allowed) | u32 timeout_ms (0: none)
    | u16 len | model ID (UTF-8) | u16 len | metadata (JSON list of [key, value], may be empty)
    | u32 len | registration (the model's registry record as JSON; only on cold-path requests,
              so that the runtime need not read it from the registry before loading)
    | body (a serialized ModelInferRequest)

Response frame::

    u64 id | u8 code (0: OK, else a gRPC status code) | u8 flags (bit 0: not here)
    | u32 len | message (UTF-8) | body (a serialized ModelInferResponse when OK)

The metadata field carries the client's text headers that the router passes on, among them the
W3C trace context (``traceparent``, ``tracestate``) and ``x-request-id``, which the runtime binds to
its log context (``mesh.logging``, ``mesh.tracing``). Carrying them there rather than in new frame
fields keeps the format unchanged, so routers and runtimes of either version still understand
each other during a rolling upgrade; and a request without such headers still pays nothing (an
empty field, no JSON).

A broken stream fails every request pending on it as "gone" (the router retries elsewhere, as for
a refused connection) and the next request opens a new stream. Frames larger than
``MAX_FRAME_BODY`` go as ordinary unary calls, so one large message cannot hold up the others.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import structlog

from mesh.errors import InvalidArgument, NotHere
from mesh.logging import clear_request
from mesh.transport.status import status_of

log = structlog.get_logger(__name__)

METHOD = "/mesh.internal.Multiplex/Stream"
SERVICE = "mesh.internal.Multiplex"
MAX_FRAME_BODY = 1 << 20

_REQ = struct.Struct("<QBI")
_RESP = struct.Struct("<QBBI")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_ALLOW_LOAD = 1
_NOT_HERE = 1


def pack_batch(frames: list[bytes]) -> bytes:
    parts = []
    for frame in frames:
        parts.append(_U32.pack(len(frame)))
        parts.append(frame)
    return b"".join(parts)


def unpack_batch(message: bytes) -> list[bytes]:
    frames, pos, end = [], 0, len(message)
    while pos < end:
        (n,) = _U32.unpack_from(message, pos)
        pos += 4
        if pos + n > end:
            raise ValueError("truncated frame in a multiplexed batch")
        frames.append(message[pos:pos + n])
        pos += n
    return frames


def split_batches(frames: list[bytes], max_batch_bytes: int) -> list[list[bytes]]:
    """Frames in order, in batches of at most ``max_batch_bytes`` packed (a larger frame alone):
    a batch over the stream's message limit would break the stream and every request on it."""
    batches: list[list[bytes]] = []
    batch: list[bytes] = []
    size = 0
    for frame in frames:
        n = len(frame) + _U32.size
        if batch and size + n > max_batch_bytes:
            batches.append(batch)
            batch, size = [], 0
        batch.append(frame)
        size += n
    if batch:
        batches.append(batch)
    return batches


class CombiningWriter:
    """Writes frames to a stream: the first caller to find the stream idle writes directly (no
    task hop, which matters at concurrency 1); frames that arrive while a write is in flight are
    sent together by that writer, in batches of up to ``max_batch_bytes``, when it finishes
    (which matters under load). With ``gather`` the first caller lets the event loop finish its
    turn before writing, so that frames made ready together (the answers of one dynamic batch,
    mesh.runtime.batching, all resolved in one turn) leave in one message instead of two."""

    def __init__(self, write: Callable[[bytes], Awaitable[None]], max_batch_bytes: int,
                 gather: bool = False) -> None:
        self._write = write
        self._max_batch_bytes = max_batch_bytes
        self._gather = gather
        self._pending: list[bytes] = []
        self._busy = False

    async def send(self, frame: bytes) -> None:
        self._pending.append(frame)
        if self._busy:
            return
        self._busy = True
        try:
            if self._gather:
                await asyncio.sleep(0)  # one loop turn: the answers resolved with this one join it
            while self._pending:
                pending, self._pending = self._pending, []
                for batch in split_batches(pending, self._max_batch_bytes):
                    await self._write(pack_batch(batch))
        finally:
            self._busy = False


# --- frames -----------------------------------------------------------------------------------
MAX_TIMEOUT_MS = 0xFFFFFFFF  # the frame's u32: 49.7 days


def frame_timeout_ms(timeout_s: float | None) -> int:
    """A client's remaining time as the frame's u32 milliseconds: 0 (none) for no deadline and for
    deadlines past what the field holds (49.7 days is no deadline in practice), at least 1 ms for a
    deadline that is all but spent (0 would read as none)."""
    if timeout_s is None or timeout_s * 1000 >= MAX_TIMEOUT_MS:
        return 0
    return max(1, int(timeout_s * 1000))


def encode_request(request_id: int, model_id: str, allow_load: bool, timeout_ms: int,
                   metadata: tuple[tuple[str, str | bytes], ...], body: bytes, spec: bytes = b"") -> bytes:
    mid = model_id.encode()
    md = json.dumps([[k, v] for k, v in metadata if isinstance(v, str)]).encode() if metadata else b""
    if len(md) > 0xFFFF or len(mid) > 0xFFFF:
        raise InvalidArgument(f"the request's metadata ({len(md)} bytes) is over the {0xFFFF}-byte limit of a "
                              "forwarded request")
    return b"".join((_REQ.pack(request_id, _ALLOW_LOAD if allow_load else 0, timeout_ms),
                     _U16.pack(len(mid)), mid, _U16.pack(len(md)), md, _U32.pack(len(spec)), spec, body))


@dataclass(frozen=True, slots=True)
class RequestFrame:
    id: int
    model_id: str
    allow_load: bool
    timeout_ms: int
    metadata: tuple[tuple[str, str], ...]
    body: bytes
    spec: bytes = b""


def decode_request(frame: bytes) -> RequestFrame:
    request_id, flags, timeout_ms = _REQ.unpack_from(frame, 0)
    pos = _REQ.size
    (n,) = _U16.unpack_from(frame, pos)
    model_id = frame[pos + 2:pos + 2 + n].decode()
    pos += 2 + n
    (n,) = _U16.unpack_from(frame, pos)
    md = json.loads(frame[pos + 2:pos + 2 + n]) if n else ()
    pos += 2 + n
    (n,) = _U32.unpack_from(frame, pos)
    spec = frame[pos + 4:pos + 4 + n]
    pos += 4 + n
    return RequestFrame(request_id, model_id, bool(flags & _ALLOW_LOAD), timeout_ms,
                        tuple((str(k), str(v)) for k, v in md), frame[pos:], spec)


def encode_response(request_id: int, code: int, not_here: bool, message: str, body: bytes) -> bytes:
    msg = message.encode()
    return b"".join((_RESP.pack(request_id, code, _NOT_HERE if not_here else 0, len(msg)), msg, body))


def decode_response(frame: bytes) -> tuple[int, int, bool, str, bytes]:
    request_id, code, flags, n = _RESP.unpack_from(frame, 0)
    pos = _RESP.size
    return request_id, code, bool(flags & _NOT_HERE), frame[pos:pos + n].decode(), frame[pos + n:]


# --- the runtime side ---------------------------------------------------------------------------
Handler = Callable[[RequestFrame], Awaitable[bytes]]
T = TypeVar("T")

DEADLINE_SLACK_S = 0.01


class Deadlines:
    """The runtime's deadlines of the frames in flight on one stream, by shared timers.

    Why not ``asyncio.timeout`` per frame: each one arms and disarms a loop timer (under uvloop a
    libuv timer handle) and looks up the running loop and current task several times (each lookup
    a ``getpid`` system call in CPython 3.11); that was 13 % of a runtime's busy CPU under load
    (py-spy, hop scenario, c=32). Here frames whose deadlines fall in the same
    :data:`DEADLINE_SLACK_S` window share one timer, armed when the first of them arrives and
    disarmed when the last of them finishes, so under load one timer serves a dozen frames.

    The cost: a deadline fires up to :data:`DEADLINE_SLACK_S` late, never early. This deadline
    only stops work the router has given up on (the router keeps its own, exact, per request,
    and answers its client DEADLINE_EXCEEDED on time), so 10 ms late is harmless."""

    def __init__(self, loop: asyncio.AbstractEventLoop, slack_s: float = DEADLINE_SLACK_S) -> None:
        self._loop = loop
        self._slack = slack_s
        self._buckets: dict[int, tuple[set[asyncio.Task[Any]], asyncio.TimerHandle]] = {}
        self._expired: set[asyncio.Task[Any]] = set()

    def add(self, task: asyncio.Task[Any], timeout_s: float) -> int:
        """Cancel ``task`` when ``timeout_s`` has passed, unless :meth:`discard` comes first;
        returns the key to discard it with."""
        key = math.ceil((self._loop.time() + timeout_s) / self._slack)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = (set(), self._loop.call_at(key * self._slack, self._fire, key))
        bucket[0].add(task)
        return key

    def discard(self, key: int, task: asyncio.Task[Any]) -> None:
        bucket = self._buckets.get(key)
        if bucket is None:
            return
        bucket[0].discard(task)
        if not bucket[0]:  # the last frame of this window finished: its timer goes
            bucket[1].cancel()
            del self._buckets[key]

    async def run(self, work: Awaitable[T], timeout_s: float) -> T:
        """``await work`` in the current task, raising TimeoutError once ``timeout_s`` has passed
        (and the work is cancelled), as ``asyncio.timeout`` would."""
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        key = self.add(task, timeout_s)
        try:
            return await work
        except asyncio.CancelledError:
            # Ours, and nobody else's: the deadline's cancellation becomes TimeoutError (as in
            # asyncio.timeout, a cancellation from elsewhere at the same time wins).
            if task in self._expired and task.uncancel() <= cancelling:
                raise TimeoutError from None
            raise
        finally:
            self._expired.discard(task)
            self.discard(key, task)

    def _fire(self, key: int) -> None:
        bucket = self._buckets.pop(key, None)
        for task in bucket[0] if bucket is not None else ():
            if not task.done():
                self._expired.add(task)
                task.cancel()

    def close(self) -> None:
        for _, timer in self._buckets.values():
            timer.cancel()
        self._buckets.clear()
        self._expired.clear()


def stream_handler(handle: Handler, max_message_bytes: int) -> grpc.GenericRpcHandler:
    """Serve the multiplexed stream: each frame is handled concurrently by ``handle`` (which
    returns the serialized response or raises), answers are written as they complete. A response
    over ``max_message_bytes`` is answered RESOURCE_EXHAUSTED, as on a unary call: written, it
    would break the stream and fail every request on it."""

    async def serve(frames: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        writer = CombiningWriter(context.write, max_message_bytes, gather=True)
        tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop)

        async def answer(frame: bytes) -> None:
            try:
                await writer.send(frame)
            except Exception:  # the stream is gone; the router has failed the request already
                log.debug("multiplexed answer not delivered", exc_info=True)

        async def one(raw: bytes) -> None:
            try:
                frame = decode_request(raw)
            except (struct.error, UnicodeDecodeError, ValueError):
                log.warning("malformed multiplexed frame dropped")
                return
            try:
                if frame.timeout_ms:
                    body = await deadlines.run(handle(frame), frame.timeout_ms / 1000)
                else:
                    body = await handle(frame)
                if len(body) > max_message_bytes:
                    reply = encode_response(
                        frame.id, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], False,
                        f"model {frame.model_id!r}: the response is {len(body)} bytes; the limit is "
                        f"{max_message_bytes} (router.max_message_bytes)", b"")
                else:
                    reply = encode_response(frame.id, 0, False, "", body)
            except TimeoutError:
                reply = encode_response(
                    frame.id, grpc.StatusCode.DEADLINE_EXCEEDED.value[0], False,
                    f"model {frame.model_id!r}: deadline of {frame.timeout_ms} ms exceeded in the runtime", b"")
            except Exception as exc:
                code, message = status_of(exc)
                reply = encode_response(frame.id, code.value[0], isinstance(exc, NotHere), message, b"")
            await answer(reply)

        try:
            async for message in frames:
                try:
                    batch = unpack_batch(message)
                except (struct.error, ValueError):
                    log.warning("malformed multiplexed batch dropped")
                    continue
                for raw in batch:
                    task = loop.create_task(one(raw))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        finally:
            # The router closed its side (or went away): finish what was asked, then end.
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            deadlines.close()

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Stream": grpc.stream_stream_rpc_method_handler(serve)})


# --- the router side ----------------------------------------------------------------------------
class StreamGone(Exception):
    """The stream broke (runtime gone or restarting): the request may be retried elsewhere."""


class StreamError(Exception):
    """The runtime's answer to one request was an error."""

    def __init__(self, code: grpc.StatusCode, message: str, not_here: bool) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.not_here = not_here


_CODES = {c.value[0]: c for c in grpc.StatusCode}


class _Stream:
    def __init__(self, channel: grpc.aio.Channel, on_close: Callable[[_Stream], None],
                 max_batch_bytes: int) -> None:
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._on_close = on_close
        self.closed = False
        self._call = channel.stream_stream(METHOD)()
        self._opened = False
        self._writer = CombiningWriter(self._write, max_batch_bytes)
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="multiplex-reader")

    async def _write(self, message: bytes) -> None:
        if self._opened:
            await self._call.write(message)
            return
        # grpc.aio's first write waits for the call's initial metadata to be sent, and a call that
        # fails before that (the runtime died as the stream opened) never sends it: the write
        # would wait forever, holding its request to the client's deadline. So the first write
        # races the reader, which ends when the call does.
        write = asyncio.ensure_future(self._call.write(message))
        done, _ = await asyncio.wait({write, self._reader}, return_when=asyncio.FIRST_COMPLETED)
        if write not in done:
            write.cancel()
            raise StreamGone("stream to the runtime closed as it opened")
        write.result()
        self._opened = True

    async def _read(self) -> None:
        clear_request()  # created while serving the stream's first request: not that request's lines
        try:
            async for batch in self._call:
                for frame in unpack_batch(batch):
                    self._answer(frame)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("multiplexed stream reader failed")
        finally:
            self.close()

    def _answer(self, frame: bytes) -> None:
        request_id, code, not_here, message, body = decode_response(frame)
        future = self._pending.pop(request_id, None)
        if future is None or future.done():
            return  # the caller gave up (deadline or cancellation)
        if code == 0:
            future.set_result(body)
        else:
            future.set_exception(StreamError(_CODES.get(code, grpc.StatusCode.UNKNOWN),
                                             message, not_here))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._on_close(self)
        self._call.cancel()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(StreamGone("stream to the runtime closed"))

    async def send(self, request_id: int, frame: bytes, timeout: float | None) -> bytes:
        if self.closed:
            raise StreamGone("stream to the runtime closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        self._pending[request_id] = future
        try:
            await self._writer.send(frame)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, StreamGone) as exc:
            self._pending.pop(request_id, None)
            self.close()
            if future.done() and not future.cancelled():
                future.exception()  # close() may have failed it already: retrieved here
            raise exc if isinstance(exc, StreamGone) else StreamGone(f"stream to the runtime broke: {exc}") from None
        # A timer handle rather than asyncio.wait_for, which costs a task per request.
        timer = loop.call_later(timeout, _expire, future) if timeout is not None else None
        try:
            return await future
        finally:
            self._pending.pop(request_id, None)
            if timer is not None:
                timer.cancel()


def _expire(future: asyncio.Future[bytes]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class MultiplexPool:
    """A few streams per runtime endpoint, opened on first use and reopened after a break."""

    def __init__(self, streams_per_endpoint: int, max_batch_bytes: int) -> None:
        """``max_batch_bytes``: the router's ``max_message_bytes`` (the channels take a frame up to
        that plus ``FRAME_HEADROOM``, so a body the router accepted always fits alone)."""
        self.size = streams_per_endpoint
        self.max_batch_bytes = max_batch_bytes
        self._streams: dict[str, list[_Stream]] = {}
        self._ids = itertools.count(1)
        self._turn = itertools.count()

    def _stream(self, endpoint: str, channel: grpc.aio.Channel) -> _Stream:
        streams = self._streams.setdefault(endpoint, [])
        if len(streams) < self.size:
            stream = _Stream(channel, lambda s: self._drop(endpoint, s), self.max_batch_bytes)
            streams.append(stream)
            return stream
        return streams[next(self._turn) % len(streams)]

    def _drop(self, endpoint: str, stream: _Stream) -> None:
        streams = self._streams.get(endpoint)
        if streams and stream in streams:
            streams.remove(stream)

    async def call(self, endpoint: str, channel: grpc.aio.Channel, model_id: str, allow_load: bool,
                   metadata: tuple[tuple[str, str | bytes], ...], body: bytes,
                   timeout: float | None, spec: bytes = b"") -> bytes:
        request_id = next(self._ids)
        frame = encode_request(request_id, model_id, allow_load, frame_timeout_ms(timeout), metadata, body, spec)
        return await self._stream(endpoint, channel).send(request_id, frame, timeout)

    def discard(self, endpoint: str) -> None:
        for stream in self._streams.pop(endpoint, []):
            stream.close()

    def close(self) -> None:
        for endpoint in list(self._streams):
            self.discard(endpoint)


