"""Building gRPC servers and client channels with the mesh's options."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from mesh.errors import Unavailable
from mesh.transport.tls import ChannelSecurity

# Channels between mesh components (router -> runtime, runtime -> runtime) ping every second and
# give up on a peer that does not answer a ping within a second: a runtime that is stopped
# (SIGSTOP, a frozen VM) or unplugged is noticed in about 2 s, with or without requests in flight,
# instead of at lease expiry. HTTP/2 pings are answered by gRPC's core, not the application, so a
# runtime whose event loop is stuck still answers them: the router notices that by a missed
# deadline and a ServerLive probe (mesh.router.reachability).
PEER_KEEPALIVE_MS = 1_000


# Room for a multiplexed frame's header beyond its body (mesh.transport.multiplex): the model ID
# and the metadata (u16 lengths each) and the registration (bounded by mesh.router.management).
# Router-to-runtime channels and the runtime's port take a message up to max_message_bytes plus
# this, so that a body the router accepted always fits in a frame.
FRAME_HEADROOM = 256 * 1024


def message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Keep connections between router and runtimes warm; a dead peer is noticed in ~20 s
        # even with no traffic, instead of on the first request after a long pause.
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # The mesh retries at its own level (excluding the instance that failed); grpc's
        # transparent retries would only add per-call bookkeeping in the C core.
        ("grpc.enable_retries", 0),
    ]


def server_options(max_message_bytes: int, max_pending_requests: int = 4096,
                   max_streams_per_connection: int = 0) -> list[tuple[str, int]]:
    return [
        *message_options(max_message_bytes),
        # Calls open at once on one connection: bounds the messages gRPC reads for one client
        # before a handler can refuse them (mesh.transport.inflight). 0: gRPC's default (none).
        *([("grpc.max_concurrent_streams", max_streams_per_connection)] if max_streams_per_connection > 0 else []),
        # gRPC core sheds calls the application has not picked up yet (CANCELLED) past the soft
        # limit, at random, and all of them past the hard one (settings: router.max_pending_requests).
        ("grpc.server.max_pending_requests", max_pending_requests),
        ("grpc.server.max_pending_requests_hard_limit", 2 * max_pending_requests),
        ("grpc.so_reuseport", 0),
        # Accept the client keepalive pings above, and the mesh's own every PEER_KEEPALIVE_MS,
        # without GOAWAY(too_many_pings) (half the interval: pings jitter).
        ("grpc.http2.min_ping_interval_without_data_ms", PEER_KEEPALIVE_MS // 2),
    ]


def new_server(max_message_bytes: int, interceptors: Sequence[grpc.aio.ServerInterceptor] = (), *,
               max_pending_requests: int = 4096, max_streams_per_connection: int = 0,
               max_calls: int | None = None) -> grpc.aio.Server:
    """``max_calls``: calls running at once in the process; gRPC answers the ones past it
    RESOURCE_EXHAUSTED before reading their messages (router.max_inflight_requests)."""
    return grpc.aio.server(options=server_options(max_message_bytes, max_pending_requests, max_streams_per_connection),
                           interceptors=list(interceptors) or None, maximum_concurrent_rpcs=max_calls)


def add_health(server: grpc.aio.Server) -> health.aio.HealthServicer:
    """The standard grpc.health.v1 service; ``mesh.transport.health.HealthReporter`` sets it."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


def bind(server: grpc.aio.Server, host: str, port: int,
         credentials: grpc.ServerCredentials | None = None) -> int:
    """Bind with TLS when ``credentials`` are given (``mesh.transport.tls``), else in plaintext;
    returns the port (useful with port 0)."""
    try:
        if credentials is not None:
            bound = server.add_secure_port(f"{host}:{port}", credentials)
        else:
            bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if not isinstance(bound, int) or bound == 0:
        raise Unavailable(f"cannot listen on {host}:{port}: the port is in use or the address is not "
                          "this machine's; choose another (--port, or the port setting)")
    return bound


class ChannelPool:
    """One long-lived channel per endpoint; channels of instances that left are closed."""

    def __init__(self, max_message_bytes: int, security: ChannelSecurity | None = None) -> None:
        self.max_message_bytes = max_message_bytes
        self._options: list[tuple[str, int | str]] = [
            *[o for o in message_options(max_message_bytes + FRAME_HEADROOM) if not o[0].startswith("grpc.keepalive_")],
            ("grpc.keepalive_time_ms", PEER_KEEPALIVE_MS), ("grpc.keepalive_timeout_ms", PEER_KEEPALIVE_MS),
            # grpc 1.85 times a keepalive ping out after this, not keepalive_timeout_ms (60 s otherwise)
            ("grpc.http2.ping_timeout_ms", PEER_KEEPALIVE_MS),
            ("grpc.keepalive_permit_without_calls", 1)]
        self._credentials = security.credentials if security is not None else None
        if security is not None and security.server_name:
            # Runtimes advertise IPs; their certificates name a Service (or a wildcard).
            self._options.append(("grpc.ssl_target_name_override", security.server_name))
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, endpoint: str) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(endpoint, self._credentials, options=self._options)
            else:
                channel = grpc.aio.insecure_channel(endpoint, options=self._options)
            self._channels[endpoint] = channel
        return channel

    async def discard(self, endpoint: str) -> None:
        channel = self._channels.pop(endpoint, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
