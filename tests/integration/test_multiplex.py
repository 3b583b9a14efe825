"""The router-to-runtime multiplexed stream, over a real grpc.aio server on 127.0.0.1 with a
stand-in handler: answers reach the right caller, errors keep their status, deadlines fire, and a
broken stream fails what was pending on it as "gone" so that the router can retry elsewhere; under
load, frames near the message limit travel in batches that fit it, and a response over the limit
fails only its own request."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from mesh.errors import InvalidArgument, NotHere
from mesh.transport.multiplex import (
    METHOD,
    MultiplexPool,
    RequestFrame,
    StreamError,
    StreamGone,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    pack_batch,
    split_batches,
    stream_handler,
    unpack_batch,
)
from mesh.transport.server import FRAME_HEADROOM, ChannelPool, message_options

pytestmark = pytest.mark.integration


def test_frames_round_trip() -> None:
    raw = encode_request(7, "tenant/é", False, 1500, (("traceparent", "00-ab"),), b"\x00body")
    frame = decode_request(raw)
    assert (frame.id, frame.model_id, frame.allow_load, frame.timeout_ms) == (7, "tenant/é", False, 1500)
    assert frame.metadata == (("traceparent", "00-ab"),) and frame.body == b"\x00body"
    assert decode_response(encode_response(9, 5, True, "gone", b"x")) == (9, 5, True, "gone", b"x")
    frames = [b"", b"a", b"bc" * 1000]
    assert unpack_batch(pack_batch(frames)) == frames
    with pytest.raises(ValueError):
        unpack_batch(pack_batch([b"abc"])[:-1])


LIMIT = 16 * 2**20


def test_batches_fit_the_limit_and_keep_the_order() -> None:
    frames = [b"a" * 60, b"b" * 30, b"c" * 30, b"d" * 200, b"e"]
    batches = split_batches(frames, 100)
    assert [f for batch in batches for f in batch] == frames
    assert batches == [[b"a" * 60, b"b" * 30], [b"c" * 30], [b"d" * 200], [b"e"]]  # a large one alone
    assert all(len(pack_batch(b)) <= 100 for b in batches if len(b) > 1)


async def _serve(handle, limit: int = LIMIT):  # type: ignore[no-untyped-def]
    server = grpc.aio.server(options=message_options(limit + FRAME_HEADROOM))
    server.add_generic_rpc_handlers((stream_handler(handle, limit),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_answers_errors_and_deadlines() -> None:
    async def handle(frame: RequestFrame) -> bytes:
        if frame.model_id == "slow":
            await asyncio.sleep(2)
        if frame.model_id == "bad":
            raise InvalidArgument("input 'x' is wrong")
        if frame.model_id == "evicted":
            raise NotHere("not loaded here")
        return frame.model_id.encode() + frame.body

    server, endpoint = await _serve(handle)
    pool = MultiplexPool(2, LIMIT)
    channel = grpc.aio.insecure_channel(endpoint)
    try:
        answers = await asyncio.gather(*(pool.call(endpoint, channel, f"m{i}", True, (), b"!%d" % i, None)
                                         for i in range(200)))
        assert answers == [b"m%d!%d" % (i, i) for i in range(200)]
        with pytest.raises(StreamError) as err:
            await pool.call(endpoint, channel, "bad", True, (), b"", None)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "input 'x'" in err.value.message
        with pytest.raises(StreamError) as err:
            await pool.call(endpoint, channel, "evicted", False, (), b"", None)
        assert err.value.not_here
        with pytest.raises(TimeoutError):
            await pool.call(endpoint, channel, "slow", True, (), b"", 0.1)
        # the stream is still usable after a caller gave up
        assert await pool.call(endpoint, channel, "m", True, (), b"!", None) == b"m!"
    finally:
        pool.close()
        await channel.close()
        await server.stop(None)


async def test_broken_stream_fails_pending_requests_as_gone() -> None:
    started = asyncio.Event()

    async def handle(frame: RequestFrame) -> bytes:
        started.set()
        await asyncio.sleep(30)
        return b""

    server, endpoint = await _serve(handle)
    pool = MultiplexPool(1, LIMIT)
    channel = grpc.aio.insecure_channel(endpoint)
    try:
        pending = asyncio.create_task(pool.call(endpoint, channel, "m", True, (), b"", None))
        await asyncio.wait_for(started.wait(), 5)
        await server.stop(None)  # the runtime goes away mid-request
        with pytest.raises(StreamGone):
            await asyncio.wait_for(pending, 5)
    finally:
        pool.close()
        await channel.close()


async def test_frames_near_the_limit_under_load_keep_the_stream() -> None:
    """With the real channel and server options and a 64 KiB limit, 300 concurrent requests of
    60 KiB each: combined into one batch they would be 17 MiB, over the limit, and the broken
    stream would fail them all as gone. A 100 KiB response fails its own request only."""
    limit = 64 * 1024

    async def handle(frame: RequestFrame) -> bytes:
        await asyncio.sleep(0)
        return b"r" * (100 * 1024) if frame.model_id == "huge" else frame.body[:8]

    server, endpoint = await _serve(handle, limit)
    pool = MultiplexPool(1, limit)
    channels = ChannelPool(limit)
    channel = channels.get(endpoint)
    try:
        bodies = [b"%08d" % i + b"x" * (60 * 1024) for i in range(300)]
        calls = [pool.call(endpoint, channel, f"m{i}", True, (("k", "v" * 500),), body, 30)
                 for i, body in enumerate(bodies)]
        calls.insert(150, pool.call(endpoint, channel, "huge", True, (), b"", 30))
        answers = await asyncio.gather(*calls, return_exceptions=True)
        huge = answers.pop(150)
        assert answers == [b"%08d" % i for i in range(300)]
        assert isinstance(huge, StreamError) and huge.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the response is 102400 bytes; the limit is 65536" in huge.message
    finally:
        pool.close()
        await channels.close()
        await server.stop(None)


async def test_a_stream_discarded_while_it_opens_fails_its_request_as_gone() -> None:
    """A runtime that dies as a stream opens leaves the call queued on a connecting channel; the
    router then discards the endpoint (reachability) and the call is cancelled before its first
    message is sent. grpc.aio's write waits for initial metadata that never goes: the request hung
    to its client's deadline (one in 12,000 when a runtime was SIGKILLed under load). Here the
    endpoint accepts TCP and never answers HTTP/2, so the channel stays connecting."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    endpoint = f"127.0.0.1:{listener.getsockname()[1]}"
    pool = MultiplexPool(1, LIMIT)
    channel = grpc.aio.insecure_channel(endpoint)
    try:
        pending = asyncio.create_task(pool.call(endpoint, channel, "m", True, (), b"x", None))
        await asyncio.sleep(0.3)
        assert not pending.done()
        pool.discard(endpoint)
        with pytest.raises(StreamGone):
            await asyncio.wait_for(pending, 5)
    finally:
        pool.close()
        await channel.close()
        listener.close()


async def test_the_runtime_answers_deadline_exceeded_past_a_frame_timeout() -> None:
    """A frame's own timeout (the router's remaining time) ends its handler on the runtime with
    DEADLINE_EXCEEDED, not early, while frames that finish in time under the same deadlines are
    answered and never cancelled afterwards."""
    cancelled: list[str] = []

    async def handle(frame: RequestFrame) -> bytes:
        try:
            await asyncio.sleep(5 if frame.model_id == "slow" else 0)
        except asyncio.CancelledError:
            cancelled.append(frame.model_id)
            raise
        return frame.model_id.encode()

    server, endpoint = await _serve(handle)
    channel = grpc.aio.insecure_channel(endpoint)
    try:
        call = channel.stream_stream(METHOD)()
        started = asyncio.get_running_loop().time()
        frames = [encode_request(i, f"m{i}", True, 150, (), b"") for i in range(1, 21)]
        frames.insert(10, encode_request(99, "slow", True, 150, (), b""))
        await call.write(pack_batch(frames))
        answers: dict[int, tuple[int, str, bytes]] = {}
        async for message in call:
            for raw in unpack_batch(message):
                request_id, code, _, text, body = decode_response(raw)
                answers[request_id] = (code, text, body)
            if len(answers) == 21:
                break
        elapsed = asyncio.get_running_loop().time() - started
        code, text, _ = answers.pop(99)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert text == "model 'slow': deadline of 150 ms exceeded in the runtime"
        assert 0.15 <= elapsed < 2
        assert answers == {i: (0, "", b"m%d" % i) for i in range(1, 21)}
        await asyncio.sleep(0.2)  # past the others' deadlines: finished, so not cancelled
        assert cancelled == ["slow"]
        await call.done_writing()
    finally:
        await channel.close()
        await server.stop(None)
