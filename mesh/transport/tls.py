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

from dataclasses import dataclass

import grpc

from mesh.errors import InvalidArgument
from mesh.pem import check_ca, check_cert_and_key
from mesh.settings import TlsSettings

CLIENT_AUTH_MODES = ("none", "require")


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
