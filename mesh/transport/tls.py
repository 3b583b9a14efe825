"""TLS credentials for the gRPC ports and for the router's channels to runtimes, from PEM files.

Every file is read once, at start-up, and checked with the standard ``ssl`` module (a certificate
that does not parse, a key that does not match it, a CA bundle without a certificate): grpc itself
would accept any bytes and fail every handshake later, which looks like a network problem. A bad
setting raises ``InvalidArgument`` naming the setting, which ``mesh serve`` prints as one line
(exit code 2). Messages name files, never their contents.

Certificates are not reloaded while the process runs: rotate them by rolling the pods (routers and
runtimes drain on SIGTERM).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from mesh.auth import count_failure
from mesh.errors import InvalidArgument
from mesh.pem import check_ca, check_cert_and_key
from mesh.settings import TlsSettings

log = structlog.get_logger(__name__)

CLIENT_AUTH_MODES = ("none", "require")


def peer_names(context: grpc.aio.ServicerContext) -> set[str]:
    """The names the caller's verified certificate carries (common name, DNS names); empty
    without a client certificate."""
    auth = context.auth_context() or {}
    names: set[str] = set()
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        names.update(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in auth.get(key, ()))
    return names


class PeerCheck(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no type stubs
    """Only the clients named in ``tls.allowed_peers`` (by their verified certificate) may call this
    port; grpc.health.v1 stays open to any client the TLS handshake admitted (probes)."""

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self.allowed = frozenset(allowed)

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc.health.v1.Health/"):
            return handler
        allowed = self.allowed

        def checked(inner: Any) -> Any:
            if inspect.isasyncgenfunction(inner):  # a streaming handler that yields its replies
                async def replies(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    await _require_peer(context, allowed, details.method)
                    async for reply in inner(request, context):
                        yield reply

                return replies

            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:  # returns or writes
                await _require_peer(context, allowed, details.method)
                return await inner(request, context)

            return call

        kind = next((k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
                     if getattr(handler, k) is not None), None)
        if kind is None:
            return handler
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(checked(getattr(handler, kind)), request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


async def _require_peer(context: grpc.aio.ServicerContext, allowed: frozenset[str], method: str) -> None:
    names = peer_names(context)
    if names & allowed:
        return
    count_failure("peer_refused")
    log.warning("call from a peer not in tls.allowed_peers refused", method=method,
                peer_names=sorted(names)[:5], peer=context.peer())
    await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                        "this port accepts calls from the mesh's routers only (tls.allowed_peers)")


def peer_interceptors(tls: TlsSettings) -> list[grpc.aio.ServerInterceptor]:
    """The port's peer check (none unless ``tls.allowed_peers`` is set); refuses allowed_peers
    without client certificates, which could never be checked."""
    if not tls.allowed_peers:
        return []
    if tls.client_auth != "require":
        raise InvalidArgument("setting tls.allowed_peers needs tls.client_auth = require (the names are read "
                              "from client certificates)")
    return [PeerCheck(tls.allowed_peers)]


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """Credentials for this process's gRPC port; None when it serves plaintext."""
    if tls.client_auth not in CLIENT_AUTH_MODES:
        raise InvalidArgument(f"setting tls.client_auth: {tls.client_auth!r} is not one of "
                              f"{', '.join(CLIENT_AUTH_MODES)}")
    if not tls.cert_file and not tls.key_file:
        if tls.client_auth == "require" or tls.client_ca_file:
            raise InvalidArgument("setting tls.client_auth/tls.client_ca_file: client certificates need TLS; "
                                  "set tls.cert_file and tls.key_file")
        return None
    cert, key = check_cert_and_key("tls.cert_file", tls.cert_file, "tls.key_file", tls.key_file)
    require = tls.client_auth == "require"
    if require and not tls.client_ca_file:
        raise InvalidArgument("setting tls.client_auth = require needs tls.client_ca_file (the CA that "
                              "signs client certificates)")
    ca = check_ca("tls.client_ca_file", tls.client_ca_file) if tls.client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=require)


@dataclass(frozen=True)
class ChannelSecurity:
    """How the router dials runtimes: credentials (None: plaintext) and the name to verify."""

    credentials: grpc.ChannelCredentials | None = None
    server_name: str = ""


def channel_security(prefix: str, ca_file: str, cert_file: str, key_file: str,
                     server_name: str) -> ChannelSecurity:
    """TLS for a client channel when ``ca_file`` is set (with a client certificate if given);
    ``prefix`` names the settings in errors (e.g. ``tls.runtime_``)."""
    if not ca_file:
        if cert_file or key_file or server_name:
            raise InvalidArgument(f"settings {prefix}cert_file/key_file/server_name need {prefix}ca_file "
                                  f"(TLS is on only with it)")
        return ChannelSecurity()
    ca = check_ca(f"{prefix}ca_file", ca_file)
    cert = key = None
    if cert_file or key_file:
        cert, key = check_cert_and_key(f"{prefix}cert_file", cert_file, f"{prefix}key_file", key_file)
    return ChannelSecurity(grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                                        certificate_chain=cert), server_name)


def runtime_channel_security(tls: TlsSettings) -> ChannelSecurity:
    """How the router dials runtimes (``tls.runtime_*``)."""
    return channel_security("tls.runtime_", tls.runtime_ca_file, tls.runtime_cert_file,
                            tls.runtime_key_file, tls.runtime_server_name)
