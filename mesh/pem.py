"""Reading PEM certificates, keys and CA bundles named by settings, and checking them at start-up.

The standard ``ssl`` module parses them (a certificate that does not parse, a key that does not
match its certificate, a CA bundle without a certificate), so that a bad file stops the start with
one line naming the setting (``InvalidArgument``) instead of failing every handshake later, which
looks like a network problem. Messages name files, never their contents. Used for the gRPC ports
(``mesh.transport.tls``) and for etcd (``mesh.registry.security``).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from mesh.errors import InvalidArgument


def read_pem(setting: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"setting {setting}: cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise InvalidArgument(f"setting {setting}: {path} is not a PEM file")
    return data


def check_cert_and_key(cert_setting: str, cert_file: str, key_setting: str, key_file: str) -> tuple[bytes, bytes]:
    """(certificate chain, key) after checking that both parse and belong together."""
    if bool(cert_file) != bool(key_file):
        have, missing = (cert_setting, key_setting) if cert_file else (key_setting, cert_setting)
        raise InvalidArgument(f"setting {missing} is required with {have}")
    cert, key = read_pem(cert_setting, cert_file), read_pem(key_setting, key_file)
    try:
        # An empty password: an encrypted key fails here instead of prompting on the terminal
        # (grpc cannot use encrypted keys either).
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file, password=lambda: b"")
    except ssl.SSLError as exc:
        raise InvalidArgument(f"settings {cert_setting}/{key_setting}: {cert_file} and {key_file} are not a "
                              f"certificate and its private key ({exc.reason or exc})") from None
    return cert, key


def check_ca(setting: str, path: str) -> bytes:
    data = read_pem(setting, path)
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError as exc:
        raise InvalidArgument(f"setting {setting}: {path} holds no usable CA certificate "
                              f"({exc.reason or exc})") from None
    return data
