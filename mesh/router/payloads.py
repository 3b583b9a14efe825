"""Payload logging: inference records sent as KServe logger CloudEvents, off the request's path.

Configured as ModelMesh's payload processors (``MM_PAYLOAD_PROCESSORS``, here
``router.payload_processors``): a list of URIs, ``http(s)://host:port/path`` for a sink that
receives HTTP POSTs, ``logger://`` for the log. As in ModelMesh the URI's query names the one model
ID it observes (here a vModel ID also matches) and its fragment the method; ``*`` or nothing means
all. Only ModelInfer is logged: a record is an inference request or response.

What a sink receives (``mesh.router.cloudevents``) is what KServe's logger sends, CloudEvents with
``type`` ``org.kubeflow.serving.inference.request`` or ``.response``, KServe's extensions and ours,
in the content mode ``router.payload_content_mode`` chooses: binary (a POST per record, ``ce-*``
headers; KServe's and ModelMesh's shape, the default) or batched (a JSON array of structured events
per POST). The body is the V2 protobuf message as the router holds it, gRPC and REST requests
alike: KServe's logger sends the bytes the predictor saw, and re-encoding them as JSON here would
cost the router's CPU on every request. The ``id`` is the client's ``ce-id`` (KServe's
``getOrCreateID``; REST forwards the header as gRPC metadata carries it), else its
``x-request-id``, else a new UUID. As KServe's logger, a request is logged whatever its answer (it
logs before calling the predictor) and a response only when there is one.

Why batching: a profile of binary mode (cProfile of the sender, 86 us of CPU per record) put
nearly all of it in aiohttp's per-request work (building the request, headers, writing, reading the
answer), the CloudEvent headers a few percent, the queue less; the sink pays its own HTTP exchange
per record. Batched mode spreads one exchange over up to ``payload_batch_records`` records and
costs about 5 us per record (orjson attributes, a base64 copy of the body), so no thread is
needed: the sending stays on the event loop.

The trade-off: a record never slows or fails the inference it describes. The data plane calls
:meth:`PayloadLog.log` after the answer is known, which samples, filters and appends the bytes it
already holds to each sink's queue (O(1) per sink; headers are built by the sender). A full queue
(records or bytes) drops the record and counts it; a sink that is down or slow costs retries in the
background and fills its own queue, nothing else. Counters per sink, in records: sent, failed (gave
up after the retries; a refused batch counts all its records), dropped (queue full, or left at
shutdown).
"""

from __future__ import annotations

import asyncio
import base64
import random
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import structlog

from mesh.errors import InvalidArgument
from mesh.router.cloudevents import BATCH_CONTENT_TYPE, CONTENT_MODES, Encoder, Entry

WARN_EVERY_S = 60.0  # a failing sink's warning, at most this often

log = structlog.get_logger(__name__)
payload_log = structlog.get_logger("mesh.payloads")

MODES = {"request": (True, False), "response": (False, True), "all": (True, True)}
METHOD = "ModelInfer"
SETTING = "router.payload_processors"

Headers = tuple[tuple[str, str | bytes], ...]


class SinkError(Exception):
    """A post that did not succeed; ``retry``: whether trying again may help."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


class Deliver(Protocol):
    """Sends one record (``mesh.router.payload_http.HttpDelivery``); raises ``SinkError``."""

    async def __call__(self, url: str, headers: dict[str, str], body: bytes, timeout_s: float) -> None: ...


@dataclass(frozen=True)
class Processor:
    """One configured URI: where records go and which ones."""

    uri: str  # as configured: the sink's label in metrics and logs
    scheme: str  # http, https or logger
    url: str  # where an HTTP sink is posted to (without the query and fragment)
    model_id: str | None  # the model or vModel observed; None: all

    def matches(self, model_id: str, vmodel_id: str) -> bool:
        return self.model_id is None or self.model_id == model_id or self.model_id == vmodel_id


def parse_processors(values: Iterable[str]) -> list[Processor]:
    """The processors of ``router.payload_processors``; InvalidArgument naming the setting."""
    out = []
    for value in values:
        for uri in value.split():
            try:
                parts = urlsplit(uri)
                parts.port  # noqa: B018 -- raises on a port that is not a number
            except ValueError as exc:
                raise InvalidArgument(f"setting {SETTING}: {uri!r}: {exc}") from None
            scheme = parts.scheme.lower()
            if scheme not in ("http", "https", "logger"):
                raise InvalidArgument(f"setting {SETTING}: {uri!r}: scheme must be http, https or logger")
            if scheme != "logger" and not parts.hostname:
                raise InvalidArgument(f"setting {SETTING}: {uri!r}: no host")
            if parts.fragment not in ("", "*", METHOD):
                raise InvalidArgument(f"setting {SETTING}: {uri!r}: only #{METHOD} is logged")
            model = parts.query.lstrip("/")  # ModelMesh strips a leading slash too
            out.append(Processor(uri, scheme, urlunsplit((scheme, parts.netloc, parts.path or "/", "", "")),
                                 None if model in ("", "*") else model))
    return out


# (is a response, ce-id, model ID, vModel ID or "", body, wall-clock time): what the hot path offers.
Record = tuple[bool, str, str, str, bytes, float]
# What a queued record costs beyond its body (headers, IDs, the tuple): the byte bound counts it,
# so records without bodies are bounded by bytes too.
ENTRY_OVERHEAD = 512
_EVENT_ID = re.compile(r"^[!-~]{1,128}$")  # printable ASCII, no spaces: what goes into a header


def event_id(metadata: Headers) -> str:
    """The client's ``ce-id`` (KServe), else its ``x-request-id``, else a new UUID. A client's
    value goes into an outgoing header: one that is empty, over 128 characters or not printable
    ASCII is not used."""
    found = ""
    for key, value in metadata:
        if key == "ce-id" and isinstance(value, str) and _EVENT_ID.match(value):
            return value
        if key == "x-request-id" and isinstance(value, str) and _EVENT_ID.match(value):
            found = value
    return found or str(uuid.uuid4())


def _cost(entry: Entry) -> int:
    return len(entry[4]) + ENTRY_OVERHEAD


class Sink:
    """One processor's bounded queue, its sending workers and its counters.

    ``content_mode`` "binary" sends a record per post; "batched" sends up to ``batch_records``
    records (and ``batch_bytes`` of bodies; a larger record goes alone) per post, a worker waiting
    up to ``linger_s`` for a batch to fill. One worker collects at a time (the others send), so
    batches fill rather than split across idle workers. A batch is sent, retried and counted as a
    whole: a batch the sink refuses counts all its records failed."""

    def __init__(self, processor: Processor, deliver: Deliver | None, *, source: str, namespace: str,
                 max_body_bytes: int, queue_records: int, queue_bytes: int, inflight: int, timeout_s: float,
                 retries: int, content_mode: str = "binary", batch_records: int = 1, batch_bytes: int = 0,
                 linger_s: float = 0.0, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if content_mode not in CONTENT_MODES:
            raise InvalidArgument(f"setting router.payload_content_mode: {content_mode!r}: one of "
                                  f"{', '.join(CONTENT_MODES)}")
        self.processor = processor
        self.deliver = deliver
        self.encoder = Encoder(source, namespace)
        self.max_body_bytes = max_body_bytes
        self.queue_records, self.queue_bytes = queue_records, queue_bytes
        self.workers = max(1, inflight) if deliver is not None else 1
        self.timeout_s, self.retries, self.sleep = timeout_s, retries, sleep
        # The log processor writes a line per record whatever the mode.
        self.batched = content_mode == "batched" and deliver is not None
        self.batch_records = max(1, batch_records) if self.batched else 1
        self.batch_bytes, self.linger_s = batch_bytes, linger_s
        self.sent = self.failed = self.dropped = 0
        self._queue: deque[Entry] = deque()
        self._queued_bytes = 0
        self._busy = 0  # records taken from the queue and not yet counted
        self._wake = asyncio.Event()
        self._full = asyncio.Event()  # a batch's worth is queued: the collector stops lingering
        self._collecting = asyncio.Lock()
        self._idle = asyncio.Event()
        self._idle.set()
        self._flushing = False
        self._refused = False  # a 4xx was logged as a warning once
        # Other failures (a sink down, unreachable, failing): a warning at most once a minute, with
        # the records failed since the last one, so a typo in the sink's host is not silent.
        self._failure_said_at = -WARN_EVERY_S
        self._failed_unsaid = 0
        self.closed = False

    def offer(self, record: Record) -> None:
        """Queue a record, or drop and count it: never waits. A body over the bound is not kept
        (only its size, for ``bodyomitted``): what the queue holds is what it counts."""
        body = record[4]
        omitted = len(body) if len(body) > self.max_body_bytes else 0
        entry: Entry = (*record[:4], b"" if omitted else body, record[5], omitted)
        size = _cost(entry)
        queue = self._queue
        if self.closed or len(queue) >= self.queue_records or self._queued_bytes + size > self.queue_bytes:
            self.dropped += 1
            return
        queue.append(entry)
        self._queued_bytes += size
        self._idle.clear()
        if not self._wake.is_set():
            self._wake.set()
        if self.batched and not self._full.is_set() and (
                len(queue) >= self.batch_records or self._queued_bytes >= self.batch_bytes):
            self._full.set()

    async def run(self) -> None:
        """The sending workers, until cancelled."""
        async with asyncio.TaskGroup() as group:
            for i in range(self.workers):
                group.create_task(self._work(), name=f"payload-sink:{self.processor.uri}:{i}")

    def _take(self) -> list[Entry]:
        """The next post's records: up to the batch bounds (at least one record)."""
        queue, size = self._queue, 0
        taken: list[Entry] = []
        while queue and len(taken) < self.batch_records:
            cost = _cost(queue[0])
            if taken and size + cost > self.batch_bytes:
                break
            taken.append(queue.popleft())
            size += cost
        self._queued_bytes -= size
        if len(queue) < self.batch_records and self._queued_bytes < self.batch_bytes:
            self._full.clear()
        return taken

    async def _collect(self) -> list[Entry]:
        """Wait for records, then (batched) up to ``linger_s`` more for a full batch."""
        async with self._collecting:
            while not self._queue:
                if self._busy == 0:
                    self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            if self.batched and self.linger_s > 0 and not self._full.is_set() and not self._flushing:
                try:
                    await asyncio.wait_for(self._full.wait(), self.linger_s)
                except TimeoutError:
                    pass
            batch = self._take()
            self._busy += len(batch)
            return batch

    async def _work(self) -> None:
        while True:
            batch = await self._collect()
            try:
                ok = await self._send(batch)
            finally:
                self._busy -= len(batch)
            if self.closed:
                continue  # counted as dropped by flush()
            if ok:
                self.sent += len(batch)
            else:
                self.failed += len(batch)
            if not self._queue and self._busy == 0:
                self._idle.set()

    async def _send(self, batch: list[Entry]) -> bool:
        """Whether the records went out, after the retries; never raises but for cancellation."""
        try:
            if self.deliver is None:  # logger://
                for entry in batch:
                    headers, body = self.encoder.binary(entry)
                    payload_log.info("payload", **{k.removeprefix("ce-"): v for k, v in headers.items()},
                                     data=base64.b64encode(body).decode())
                return True
            if self.batched:
                headers, body = {"content-type": BATCH_CONTENT_TYPE}, self.encoder.batch(batch)
            else:
                headers, body = self.encoder.binary(batch[0])
            for attempt in range(self.retries + 1):
                try:
                    await self.deliver(self.processor.url, headers, body, self.timeout_s)
                    return True
                except SinkError as exc:
                    if not exc.retry or attempt == self.retries:
                        self._not_sent(exc, len(batch))
                        return False
                await self.sleep(0.1 * 2 ** attempt)
        except Exception:
            log.exception("payload record not sent", sink=self.processor.uri)
        return False

    def _not_sent(self, exc: SinkError, records: int) -> None:
        # A refusal (4xx) is likely a sink that does not take this content mode: said once, loudly.
        if not exc.retry and not self._refused:
            self._refused = True
            log.warning("payload sink refused a post; its records count as failed", sink=self.processor.uri,
                        error=str(exc), records=records,
                        content_type=BATCH_CONTENT_TYPE if self.batched else "binary mode (ce-* headers)",
                        hint="router.payload_content_mode chooses binary or batched")
            return
        self._failed_unsaid += records
        now = time.monotonic()
        if now - self._failure_said_at >= WARN_EVERY_S:
            log.warning("payload records not sent; they count as failed", sink=self.processor.uri, error=str(exc),
                        records=self._failed_unsaid, retries=self.retries,
                        note=f"said at most once every {WARN_EVERY_S:g} s, with the records failed since")
            self._failure_said_at, self._failed_unsaid = now, 0

    async def flush(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` for the queue to empty (no lingering), then stop counting and
        drop the rest."""
        self._flushing = True
        self._full.set()
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except TimeoutError:
            pass
        self.closed = True
        self.dropped += len(self._queue) + self._busy
        self._queue.clear()
        self._queued_bytes = 0


class PayloadLog:
    """What the data plane calls: sampling, per-model selection and the sinks' queues."""

    def __init__(self, sinks: list[Sink], *, mode: str = "all", sample: float = 1.0,
                 rng: random.Random | None = None) -> None:
        if mode not in MODES:
            raise InvalidArgument(f"setting router.payload_mode: {mode!r}: one of {', '.join(MODES)}")
        if not 0.0 <= sample <= 1.0:
            raise InvalidArgument(f"setting router.payload_sample: {sample}: a fraction in [0, 1]")
        self.sinks = sinks
        self.requests, self.responses = MODES[mode]
        self.sample = sample
        self._rng = rng or random.Random()

    def log(self, metadata: Headers, model_id: str, vmodel_id: str, request: bytes,
            response: bytes | None) -> None:
        """Queue the records of one answered inference (``response`` None: it failed). Never raises:
        a record must not fail the inference it describes."""
        try:
            if self.sample < 1.0 and self._rng.random() >= self.sample:
                return
            record_id, at = "", 0.0
            for sink in self.sinks:
                if not sink.processor.matches(model_id, vmodel_id):
                    continue
                if not record_id:
                    record_id, at = event_id(metadata), time.time()
                if self.requests:
                    sink.offer((False, record_id, model_id, vmodel_id, request, at))
                if self.responses and response is not None:
                    sink.offer((True, record_id, model_id, vmodel_id, response, at))
        except Exception:
            log.exception("payload record not queued")

    async def run(self) -> None:
        """Root task: every sink's workers."""
        async with asyncio.TaskGroup() as group:
            for sink in self.sinks:
                group.create_task(sink.run(), name=f"payload-sink:{sink.processor.uri}")

    async def flush(self, grace_s: float) -> None:
        """Shutdown: the waiting records get ``grace_s`` (all sinks together) to go out."""
        await asyncio.gather(*(sink.flush(grace_s) for sink in self.sinks))

    def counts(self) -> list[tuple[str, int, int, int]]:
        """(sink URI, sent, failed, dropped) per sink, for the metrics."""
        return [(s.processor.uri, s.sent, s.failed, s.dropped) for s in self.sinks]
