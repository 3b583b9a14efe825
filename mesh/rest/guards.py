"""What the REST port bounds, and how: headers, bodies, connections, slow clients, its own logs.

Each bound here was found missing by an attacker's review of the REST front end and has a test
(``tests/integration/test_rest_attacks.py``); docs/security.md lists them for operators:

* forwarded headers (``FORWARDED``) are the only ones the data plane sees, first value each, and
  must be what gRPC metadata can carry (printable ASCII, at most 1 KiB);
* bodies are decompressed here (gzip, deflate) within the size bound, after the token check;
  aiohttp would inflate any body, read or not, before a handler could refuse it;
* the in-flight bounds are entered before a body is read, per client connection (address and
  port), a JSON body weighing ``JSON_EXPANSION`` times its size;
* a request's headers must arrive within ``HEADER_TIMEOUT_S`` of connecting, its body within
  ``BODY_TIMEOUT_S``; idle keep-alive connections close after ``KEEPALIVE_TIMEOUT_S``; at most
  ``MAX_CONNECTIONS`` are open;
* aiohttp's log of malformed requests is limited to a line a second.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
import zlib
from typing import Any

from aiohttp import web

from mesh.errors import InvalidArgument
from mesh.pem import check_ca, check_cert_and_key
from mesh.rest import codec
from mesh.router.dataplane import Headers
from mesh.router.split import usable
from mesh.settings import TlsSettings
from mesh.transport.inflight import InflightLimit
from mesh.transport.metadata import MODEL_ID, VMODEL_ID

# The only headers passed on to the data plane: the model selection, trace context, request id,
# and the CloudEvent id that payload records carry (KServe's logger keeps a client's ce-id; gRPC
# metadata reaches the data plane whole, so REST passes it too).
# Not the token: the REST server checks it itself, and runtimes never see a client's token from a
# router (mesh.router.dataplane.STRIP), so Authorization is neither forwarded nor bounded here (a
# gateway's long JWT on an open mesh is simply ignored).
FORWARDED = frozenset({MODEL_ID, VMODEL_ID, "traceparent", "tracestate", "x-request-id", "ce-id"})
# A forwarded header value: printable ASCII (what gRPC metadata takes), at most this long.
_MAX_HEADER_VALUE = 1024
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")
# Clients that trickle: a request line and headers not complete this long after connecting, or a
# body not complete this long after its headers, and the connection is closed (408 for a body).
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
KEEPALIVE_TIMEOUT_S = 75.0  # an idle keep-alive connection (aiohttp's default is an hour)
# Open connections at most; past it a new one is closed at once, so that trickling clients cannot
# take every file descriptor the router has (the gRPC port and the registry need some too).
MAX_CONNECTIONS = 4096
_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def forwarded_headers(request: web.Request) -> Headers:
    """The headers the data plane sees: the forwarded ones, the first value of each, checked to be
    what gRPC metadata can carry (InvalidArgument naming the header otherwise). A split vModel's
    sticky header is not among them: the server reads it for that vModel's requests alone
    (``sticky_header``), so that no tenant's split changes what other requests must send."""
    out: list[tuple[str, str | bytes]] = []
    seen: set[str] = set()
    for key, value in request.headers.items():
        low = key.lower()
        if low in FORWARDED and low not in seen:
            if len(value) > _MAX_HEADER_VALUE or not _PRINTABLE.match(value):
                raise InvalidArgument(f"header {low}: the value must be printable ASCII of at most "
                                      f"{_MAX_HEADER_VALUE} characters")
            seen.add(low)
            out.append((low, value))
    return tuple(out)


def sticky_headers(request: web.Request, names: tuple[str, ...], headers: Headers) -> Headers:
    """``headers`` and the request's values of ``names``, the sticky headers of the split vModels
    it names (``DataPlane.sticky_headers``), each only if usable (``mesh.router.split.usable``):
    an unusable or absent value adds nothing (the split draws at random, never refusing)."""
    for name in names:
        if any(k == name for k, _ in headers):
            continue
        value = usable(request.headers.get(name))
        if value is not None:
            headers = (*headers, (name, value))
    return headers


def peer(request: web.Request) -> str:
    """The client connection (address and port), for in-flight bounds per connection."""
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"http:{peer[0]}:{peer[1]}"
    return f"http:{request.remote}"


class _RateLimited(logging.Filter):
    """At most one record a second from aiohttp's server logger: malformed requests (a bad header
    line, a broken chunk) are each logged there with a traceback, and clients choose how many."""

    def __init__(self) -> None:
        super().__init__()
        self._next = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + 1.0
        return True


AIOHTTP_LOG = logging.getLogger("mesh.rest.aiohttp")
AIOHTTP_LOG.addFilter(_RateLimited())


class Refused(asyncio.Protocol):
    """A connection over ``max_connections``: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class Admission:
    """A request's share of the in-flight bounds, resizable once its body is read."""

    def __init__(self, inflight: InflightLimit, peer: str, weight: int) -> None:
        self.inflight = inflight
        self.weight = weight
        self.connection = inflight.enter(weight, peer)
        self.peer = peer

    def resize(self, weight: int) -> None:
        if weight != self.weight:
            self.inflight.leave(self.weight, self.connection)
            self.weight = 0
            self.connection = self.inflight.enter(weight, self.peer)
            self.weight = weight

    def leave(self) -> None:
        self.inflight.leave(self.weight, self.connection)


def ssl_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The REST port's TLS, from the same settings (and checks) as the gRPC port's."""
    if not tls.cert_file and not tls.key_file:
        return None
    check_cert_and_key("tls.cert_file", tls.cert_file, "tls.key_file", tls.key_file)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file:
        check_ca("tls.client_ca_file", tls.client_ca_file)
        ctx.load_verify_locations(tls.client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.client_auth == "require" else ssl.CERT_OPTIONAL
    return ctx


def peer_names(request: web.Request) -> set[str]:
    cert = request.transport.get_extra_info("peercert") if request.transport is not None else None
    names: set[str] = set()
    if not cert:
        return names
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.add(value)
    names.update(value for key, value in cert.get("subjectAltName", ()) if key == "DNS")
    return names



def weight(size: int, header_length: int | None) -> int:
    """What a body of ``size`` bytes counts for in the in-flight bounds: its JSON part
    ``JSON_EXPANSION`` times (what parsing it takes), its binary tensors once."""
    json_part = size if header_length is None else min(header_length, size)
    return json_part * codec.JSON_EXPANSION + (size - json_part)



def close_if_silent(handler: Any) -> None:
    """Close ``handler``'s connection if no request has arrived on it yet (aiohttp keeps no timer
    for that; ``_request_count`` and ``_current_request`` are its own bookkeeping)."""
    if getattr(handler, "_request_count", 1) == 0 and getattr(handler, "_current_request", 1) is None:
        transport = getattr(handler, "transport", None)
        if transport is not None:
            transport.close()


async def read_body(request: web.Request, max_body_bytes: int) -> bytes:
    """The body, decompressed (gzip, deflate) within ``max_body_bytes``, within BODY_TIMEOUT_S; aiohttp's
    HTTPRequestEntityTooLarge past the bound, InvalidArgument for a body that is late or broken."""
    if request.content_length is not None and request.content_length > max_body_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=max_body_bytes, actual_size=request.content_length)
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity") and encoding not in _ENCODINGS:
        raise InvalidArgument(f"Content-Encoding {encoding[:40]!r} is not supported: send gzip, deflate or "
                              "an uncompressed body")
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            raw = await request.read()
    except TimeoutError:
        raise InvalidArgument(f"the request body did not arrive within {BODY_TIMEOUT_S:g} s") from None
    except web.RequestPayloadError as exc:
        # A body that breaks off: the client's error, not an internal one.
        reason = " ".join(str(exc).split()).removeprefix("400, message: ")
        raise InvalidArgument(f"the request body cannot be read: {reason}") from None
    if encoding in ("", "identity"):
        return raw
    inflater = zlib.decompressobj(_ENCODINGS[encoding])
    try:
        body = inflater.decompress(raw, max_body_bytes + 1)
    except zlib.error:
        if encoding != "deflate":
            raise InvalidArgument(f"the request body cannot be read: not valid {encoding} data") from None
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as some clients send it
        try:
            body = inflater.decompress(raw, max_body_bytes + 1)
        except zlib.error:
            raise InvalidArgument("the request body cannot be read: not valid deflate data") from None
    if len(body) > max_body_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=max_body_bytes, actual_size=len(body))
    if not inflater.eof:
        raise InvalidArgument(f"the request body cannot be read: its {encoding} data is cut short")
    return body

