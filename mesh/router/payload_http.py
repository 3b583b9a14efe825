"""The HTTP client of payload logging (``mesh.router.payloads``), and its assembly from settings.

Kept apart from ``payloads`` so that the data plane, which holds a ``PayloadLog``, imports no HTTP
library (.importlinter: data-plane). One aiohttp session per router, its connection pool bounded
per sink by ``payload_inflight``: records go over kept-alive connections.
"""

from __future__ import annotations

import asyncio

import aiohttp

from mesh.errors import InvalidArgument
from mesh.router.payloads import PayloadLog, Sink, SinkError, parse_processors
from mesh.settings import RouterSettings


class HttpDelivery:
    """Posts one CloudEvent; raises ``SinkError`` (retry: connection, timeout, 5xx, 408, 429)."""

    def __init__(self, per_host: int) -> None:
        self._per_host = per_host
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, url: str, headers: dict[str, str], body: bytes, timeout_s: float) -> None:
        if self._session is None:  # made on the loop that uses it
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=self._per_host),
                skip_auto_headers=("User-Agent",))
        try:
            async with self._session.post(url, data=body, headers=headers,
                                          timeout=aiohttp.ClientTimeout(total=timeout_s)) as answer:
                await answer.read()
                status = answer.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise SinkError(f"{type(exc).__name__}: {exc}") from None
        if status >= 300:
            raise SinkError(f"HTTP {status}", retry=status >= 500 or status in (408, 429))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            await asyncio.sleep(0)  # lets the connector close its transports


def payload_log(rs: RouterSettings, source: str) -> tuple[PayloadLog, HttpDelivery] | None:
    """The router's payload log, or None when no processor is configured. Bad settings raise
    InvalidArgument naming the setting, before anything listens."""
    processors = parse_processors(rs.payload_processors)
    if not processors:
        return None
    for name in ("payload_queue_records", "payload_inflight", "payload_timeout_s", "payload_batch_records",
                 "payload_batch_bytes"):
        if getattr(rs, name) <= 0:
            raise InvalidArgument(f"setting router.{name}: must be more than 0")
    delivery = HttpDelivery(rs.payload_inflight)
    sinks = [Sink(p, None if p.scheme == "logger" else delivery, source=source, namespace=rs.payload_namespace,
                  max_body_bytes=rs.payload_max_body_bytes, queue_records=rs.payload_queue_records,
                  queue_bytes=rs.payload_queue_bytes, inflight=rs.payload_inflight,
                  timeout_s=rs.payload_timeout_s, retries=max(0, rs.payload_retries),
                  content_mode=rs.payload_content_mode, batch_records=rs.payload_batch_records,
                  batch_bytes=rs.payload_batch_bytes, linger_s=max(0.0, rs.payload_linger_s))
             for p in processors]
    return PayloadLog(sinks, mode=rs.payload_mode, sample=rs.payload_sample), delivery

