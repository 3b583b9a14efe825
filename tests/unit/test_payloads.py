"""Payload logging without a network: URIs, CloudEvent attributes, sampling, the bounded queue,
retries and shutdown, with a scripted delivery standing in for the HTTP sink (the real one is in
tests/integration/test_payloads.py)."""

from __future__ import annotations

import asyncio
import base64
import random
from typing import Any

import orjson
import pytest

from mesh.errors import InvalidArgument
from mesh.router.cloudevents import REQUEST_TYPE, RESPONSE_TYPE, Encoder
from mesh.router.payload_http import payload_log
from mesh.router.payloads import ENTRY_OVERHEAD, PayloadLog, Sink, SinkError, event_id, parse_processors
from mesh.settings import RouterSettings


class Scripted:
    """A delivery that records what it is given; ``fail`` errors are raised first, in order."""

    def __init__(self, *fail: SinkError, block: bool = False) -> None:
        self.fail = list(fail)
        self.block = block
        self.calls: list[tuple[str, dict[str, str], bytes]] = []

    async def __call__(self, url: str, headers: dict[str, str], body: bytes, timeout_s: float) -> None:
        self.calls.append((url, headers, body))
        if self.block:
            await asyncio.Event().wait()
        if self.fail:
            raise self.fail.pop(0)


async def no_sleep(_: float) -> None:
    return None


def sink(deliver: Any, uri: str = "http://127.0.0.1:9/sink", **kw: Any) -> Sink:
    options: dict[str, Any] = dict(source="urn:test", namespace="ns", max_body_bytes=1000, queue_records=100,
                                   queue_bytes=1 << 20, inflight=2, timeout_s=1.0, retries=2, sleep=no_sleep)
    options.update(kw)
    return Sink(parse_processors([uri])[0], deliver, **options)


async def drain(log: PayloadLog) -> None:
    task = asyncio.create_task(log.run())
    await log.flush(5.0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_uris_as_modelmesh_writes_them() -> None:
    http, everything, one = parse_processors(["http://sink:8080/v2?my-model#ModelInfer logger://*",
                                              "logger:///*?/fraud"])
    assert (http.scheme, http.url, http.model_id) == ("http", "http://sink:8080/v2", "my-model")
    assert everything.scheme == "logger" and everything.model_id is None
    assert one.model_id == "fraud"  # ModelMesh strips the leading slash of the query
    assert http.matches("my-model", "") and http.matches("my-model-v2", "my-model")
    assert not http.matches("other", "")


@pytest.mark.parametrize("uri", ["ftp://sink/", "http:///path", "http://sink:port/", "http://sink/#ModelMetadata"])
def test_bad_uris_name_the_setting(uri: str) -> None:
    with pytest.raises(InvalidArgument, match=r"router\.payload_processors"):
        parse_processors([uri])


def test_settings_assembly() -> None:
    assert payload_log(RouterSettings(), "urn:test") is None
    built = payload_log(RouterSettings(payload_processors=("http://127.0.0.1:1/", "logger://")), "urn:test")
    assert built is not None and len(built[0].sinks) == 2 and built[0].sinks[1].deliver is None
    with pytest.raises(InvalidArgument, match=r"router\.payload_mode"):
        payload_log(RouterSettings(payload_processors=("logger://",), payload_mode="both"), "urn:test")
    with pytest.raises(InvalidArgument, match=r"router\.payload_queue_records"):
        payload_log(RouterSettings(payload_processors=("logger://",), payload_queue_records=0), "urn:test")


def test_cloudevent_attributes() -> None:
    encoder = Encoder("urn:test", "ns")
    headers, body = encoder.binary((True, "id-1", "fraud-v2", "fraud", b"\x01\x02", 0.0, 0))
    assert headers == {
        "content-type": "application/x-protobuf; proto=inference.ModelInferResponse",
        "ce-specversion": "1.0", "ce-type": RESPONSE_TYPE, "ce-id": "id-1", "ce-source": "urn:test",
        "ce-time": "1970-01-01T00:00:00.000000Z", "ce-inferenceservicename": "fraud", "ce-namespace": "ns",
        "ce-component": "predictor", "ce-endpoint": "fraud-v2", "ce-modelid": "fraud-v2", "ce-vmodelid": "fraud"}
    assert body == b"\x01\x02"
    headers, body = encoder.binary((False, "id-1", "m", "", b"", 1.25, 11))
    assert headers["ce-time"] == "1970-01-01T00:00:01.250000Z"
    assert headers["ce-type"] == REQUEST_TYPE and headers["ce-inferenceservicename"] == "m"
    assert "ce-vmodelid" not in headers
    assert (headers["ce-bodyomitted"], body) == ("11", b"")


def test_event_id_is_the_clients_or_new() -> None:
    assert event_id((("x-request-id", "r"), ("ce-id", "c"))) == "c"
    assert event_id((("x-request-id", "r"),)) == "r"
    assert len(event_id(())) == 36


async def test_request_and_response_share_the_id_and_filters_apply() -> None:
    deliver = Scripted()
    log = PayloadLog([sink(deliver), sink(deliver, "http://127.0.0.1:9/other?other")])
    log.log((), "m", "", b"req", b"resp")
    log.log((), "m", "", b"req", None)  # a failed inference: its request only
    await drain(log)
    assert [(h["ce-type"], b) for _, h, b in deliver.calls] == [
        (REQUEST_TYPE, b"req"), (RESPONSE_TYPE, b"resp"), (REQUEST_TYPE, b"req")]
    assert deliver.calls[0][1]["ce-id"] == deliver.calls[1][1]["ce-id"] != deliver.calls[2][1]["ce-id"]
    assert log.counts() == [("http://127.0.0.1:9/sink", 3, 0, 0), ("http://127.0.0.1:9/other?other", 0, 0, 0)]


@pytest.mark.parametrize("mode,types", [("request", [REQUEST_TYPE]), ("response", [RESPONSE_TYPE])])
async def test_modes(mode: str, types: list[str]) -> None:
    deliver = Scripted()
    log = PayloadLog([sink(deliver)], mode=mode)
    log.log((), "m", "", b"req", b"resp")
    await drain(log)
    assert [h["ce-type"] for _, h, _ in deliver.calls] == types


async def test_sampling_with_a_fixed_seed() -> None:
    deliver = Scripted()
    log = PayloadLog([sink(deliver, queue_records=10_000)], mode="request", sample=0.25, rng=random.Random(7))
    for _ in range(2000):
        log.log((), "m", "", b"r", b"r")
    same = random.Random(7)
    expected = sum(same.random() < 0.25 for _ in range(2000))
    await drain(log)
    assert len(deliver.calls) == expected and 400 < expected < 600


def test_full_queue_drops_and_counts() -> None:
    by_count = sink(Scripted(), queue_records=3)
    by_bytes = sink(Scripted(), queue_bytes=2 * (ENTRY_OVERHEAD + 10) + 5)  # room for two records
    log = PayloadLog([by_count, by_bytes], mode="request")
    for _ in range(5):
        log.log((), "m", "", b"0123456789", None)
    assert (by_count.dropped, by_bytes.dropped) == (2, 3)


def test_a_body_over_the_bound_is_not_kept_and_still_costs_its_record() -> None:
    """A body past payload_max_body_bytes is dropped when queued (only its size stays, for
    ce-bodyomitted), so a slow sink holds at most the queue's bytes, never large bodies."""
    slow = sink(Scripted(), queue_bytes=3 * ENTRY_OVERHEAD, max_body_bytes=10)
    log = PayloadLog([slow], mode="request")
    for _ in range(5):
        log.log((), "m", "", b"x" * 1_000_000, None)
    assert slow.dropped == 2 and all(entry[4] == b"" and entry[6] == 1_000_000 for entry in slow._queue)


def test_a_client_id_is_used_only_when_it_is_a_plain_token() -> None:
    assert event_id((("ce-id", "abc-123"),)) == "abc-123"
    assert event_id((("x-request-id", "req-1"),)) == "req-1"
    for bad in ("", "a b", "x" * 200, "line\r\nInjected: 1", "é"):
        chosen = event_id((("ce-id", bad),))
        assert chosen != bad and len(chosen) == 36  # a fresh UUID


async def test_sink_errors_are_retried_then_counted_failed() -> None:
    flaky = Scripted(SinkError("HTTP 503"), SinkError("refused"))  # fails twice, then takes it
    down = Scripted(*[SinkError("refused")] * 3)
    refusing = Scripted(SinkError("HTTP 400", retry=False))
    sinks = [sink(flaky), sink(down), sink(refusing)]
    log = PayloadLog(sinks, mode="request")
    log.log((), "m", "", b"r", None)
    await drain(log)
    assert [(s.sent, s.failed) for s in sinks] == [(1, 0), (0, 1), (0, 1)]
    assert (len(flaky.calls), len(down.calls), len(refusing.calls)) == (3, 3, 1)


async def test_log_never_raises() -> None:
    class Broken:
        processor = parse_processors(["logger://"])[0]

        def offer(self, entry: Any) -> None:
            raise RuntimeError("bug")

    PayloadLog([Broken()], mode="all").log((), "m", "", b"r", b"r")  # type: ignore[list-item]


async def test_shutdown_with_a_hung_sink_drops_and_counts() -> None:
    hung = sink(Scripted(block=True), inflight=1)
    log = PayloadLog([hung], mode="all")
    task = asyncio.create_task(log.run())
    for _ in range(3):
        log.log((), "m", "", b"r", b"r")
    await asyncio.sleep(0.01)
    await asyncio.wait_for(log.flush(0.05), 2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert (hung.sent, hung.failed, hung.dropped) == (0, 0, 6)
    log.log((), "m", "", b"r", b"r")  # after shutdown: dropped, not queued
    assert hung.dropped == 8


async def test_logger_processor_writes_the_log(caplog: pytest.LogCaptureFixture) -> None:
    log = PayloadLog([sink(None, "logger://")], mode="request")
    log.log((("ce-id", "abc"),), "m", "", b"r", None)
    await drain(log)
    assert log.counts() == [("logger://", 1, 0, 0)]


def test_batch_encoding_is_a_json_array_of_structured_events() -> None:
    encoder = Encoder("urn:test", "ns")
    body = encoder.batch([(False, 'id "1"', "m", "v", b"\x00\xffreq", 1.5, 0),
                          (True, 'id "1"', "m", "v", b"", 1.5, 99)])
    request, response = orjson.loads(body)
    assert request == {
        "specversion": "1.0", "type": REQUEST_TYPE, "id": 'id "1"', "source": "urn:test",
        "time": "1970-01-01T00:00:01.500000Z",
        "datacontenttype": "application/x-protobuf; proto=inference.ModelInferRequest",
        "inferenceservicename": "v", "namespace": "ns", "component": "predictor", "endpoint": "m",
        "modelid": "m", "vmodelid": "v", "data_base64": base64.b64encode(b"\x00\xffreq").decode()}
    assert response["type"] == RESPONSE_TYPE and response["bodyomitted"] == "99" and "data_base64" not in response


async def test_batched_mode_respects_the_record_and_byte_bounds() -> None:
    deliver = Scripted()
    by_count = sink(deliver, content_mode="batched", batch_records=4, batch_bytes=1 << 20, linger_s=0.0, inflight=1)
    log = PayloadLog([by_count], mode="request")
    for _ in range(10):
        log.log((), "m", "", b"r" * 10, None)
    await drain(log)
    assert [len(orjson_loads(b)) for _, _, b in deliver.calls] == [4, 4, 2]
    assert all(h == {"content-type": "application/cloudevents-batch+json"} for _, h, _ in deliver.calls)
    assert by_count.sent == 10

    deliver = Scripted()
    per_record = ENTRY_OVERHEAD + 100
    by_bytes = sink(deliver, content_mode="batched", batch_records=100, batch_bytes=3 * per_record, linger_s=0.0,
                    inflight=1, max_body_bytes=10_000)
    log = PayloadLog([by_bytes], mode="request")
    for _ in range(7):
        log.log((), "m", "", b"r" * 100, None)
    log.log((), "m", "", b"x" * 5000, None)  # over the byte bound alone: its own batch
    await drain(log)
    assert [len(orjson_loads(b)) for _, _, b in deliver.calls] == [3, 3, 1, 1]


def orjson_loads(body: bytes) -> list[dict[str, Any]]:
    return list(orjson.loads(body))


async def test_batched_mode_lingers_for_a_batch_but_flush_does_not_wait() -> None:
    deliver = Scripted()
    lingering = sink(deliver, content_mode="batched", batch_records=3, batch_bytes=1 << 20, linger_s=30.0, inflight=1)
    log = PayloadLog([lingering], mode="request")
    task = asyncio.create_task(log.run())
    log.log((), "m", "", b"r", None)
    await asyncio.sleep(0.05)
    assert deliver.calls == []  # waiting for two more
    log.log((), "m", "", b"r", None)
    log.log((), "m", "", b"r", None)  # a full batch goes at once
    await asyncio.sleep(0.05)
    assert [len(orjson_loads(b)) for _, _, b in deliver.calls] == [3]
    log.log((), "m", "", b"r", None)
    await asyncio.wait_for(log.flush(5.0), 2)  # shutdown: no lingering
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert [len(orjson_loads(b)) for _, _, b in deliver.calls] == [3, 1] and lingering.sent == 4


async def test_a_refused_batch_counts_all_its_records_failed() -> None:
    refusing = Scripted(SinkError("HTTP 415", retry=False))
    batched = sink(refusing, content_mode="batched", batch_records=10, batch_bytes=1 << 20, linger_s=0.0, inflight=1)
    log = PayloadLog([batched], mode="all")
    for _ in range(3):
        log.log((), "m", "", b"r", b"r")
    await drain(log)
    assert (batched.sent, batched.failed, len(refusing.calls)) == (0, 6, 1)


def test_content_mode_is_checked() -> None:
    with pytest.raises(InvalidArgument, match=r"router\.payload_content_mode"):
        payload_log(RouterSettings(payload_processors=("http://127.0.0.1:1/",), payload_content_mode="json"),
                    "urn:test")
    with pytest.raises(InvalidArgument, match=r"router\.payload_batch_records"):
        payload_log(RouterSettings(payload_processors=("http://127.0.0.1:1/",), payload_batch_records=0), "urn:test")


async def test_a_failing_sink_is_said_once_a_minute_with_the_records_since() -> None:
    """A sink that is down (a typo in its host) is not silent, and not a line per record either."""
    from structlog.testing import capture_logs

    down = Scripted(*[SinkError("connection refused")] * 30)
    failing = sink(down, inflight=1, retries=0)
    log = PayloadLog([failing], mode="request")
    task = asyncio.create_task(log.run())

    async def failed(n: int) -> None:
        for _ in range(500):
            if failing.failed >= n:
                return
            await asyncio.sleep(0.002)
        raise AssertionError(f"{failing.failed} records failed, not {n}")

    try:
        with capture_logs() as logs:
            for n in (1, 2, 3):
                log.log((), "m", "", b"r", None)
                await failed(n)
        said = [e for e in logs if e["event"].startswith("payload records not sent")]
        assert len(said) == 1, logs
        assert said[0]["records"] == 1 and said[0]["sink"] == failing.processor.uri
        assert said[0]["log_level"] == "warning"
        failing._failure_said_at -= 60  # a minute later: said again, with what failed meanwhile
        with capture_logs() as logs:
            log.log((), "m", "", b"r", None)
            await failed(4)
        (again,) = [e for e in logs if e["event"].startswith("payload records not sent")]
        assert again["records"] == 3
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
