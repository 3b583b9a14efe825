"""Payload logging through a real router and runtime in this process, to a real aiohttp sink on
127.0.0.1, in both content modes (binary: a POST per record; batched: a JSON array of structured
CloudEvents per POST): records counted against the requests sent over gRPC and REST, their
CloudEvent attributes as KServe's logger sends them and their protobuf bodies, the client's ce-id
kept on both protocols, failed inferences (their request only), a vModel's records, the batch
bounds, kept-alive connections, and a sink that is down or slow (inference unaffected, the
counters move, shutdown does not hang)."""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
from aiohttp import web

from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.router.cloudevents import BATCH_CONTENT_TYPE, REQUEST_TYPE, RESPONSE_TYPE
from mesh.tensors import decode_inputs, decode_response, encode_request
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import ModelArtifact, make_model

pytestmark = pytest.mark.integration

MODES = ("binary", "batched")
Event = tuple[dict[str, str], bytes]  # attributes without "ce-" (datacontenttype included), data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SinkServer:
    """An HTTP sink that keeps every CloudEvent it is posted, in either content mode, as
    (attributes, data); ``posts`` holds each POST's event count and client port; ``delay_s``
    makes it slow."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.events: list[Event] = []
        self.posts: list[tuple[str, int, int]] = []  # (content type, events, client port)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if request.content_type == BATCH_CONTENT_TYPE:
            found = [({k: v for k, v in e.items() if k != "data_base64"}, base64.b64decode(e.get("data_base64", "")))
                     for e in orjson.loads(body)]
        else:
            attrs = {k.lower().removeprefix("ce-"): v for k, v in request.headers.items()
                     if k.lower().startswith("ce-")}
            found = [({**attrs, "datacontenttype": request.headers["content-type"]}, body)]
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.posts.append((request.content_type, len(found), peer[1] if peer else 0))
        self.events += found
        return web.Response(status=200)

    async def start(self) -> SinkServer:
        app = web.Application(client_max_size=16 * 2**20)
        app.router.add_post("/events", self.handle)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/events"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def of(self, ce_type: str) -> list[Event]:
        return [e for e in self.events if e[0]["type"] == ce_type]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ModelArtifact:
    return make_model("sklearn", tmp_path_factory.mktemp("models"), seed=5)


@pytest.fixture
async def sink() -> AsyncIterator[SinkServer]:
    server = await SinkServer().start()
    try:
        yield server
    finally:
        await server.stop()


async def started(model: ModelArtifact, **router: Any) -> InProcessMesh:
    m = await InProcessMesh(memory_url(), router_overrides=router).start(runtimes=1)
    await m.register("m", "sklearn", str(model.path))
    await m.mesh.setVModel(mm.SetVModelRequest(vModelId="v", targetModelId="m"), timeout=10)
    return m


async def eventually(check: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def counters(port: int) -> dict[tuple[str, str], float]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as answer:
        text = await answer.text()
    found = re.findall(r'^mesh_payload_records_total\{outcome="(\w+)",sink="([^"]*)"\} (\S+)$', text, re.M)
    return {(s, o): float(v) for o, s, v in found}


def grpc_request(model: ModelArtifact) -> pb.ModelInferRequest:
    return encode_request(model_name="", inputs={"input-0": model.sample})


def rest_body(model: ModelArtifact) -> dict[str, Any]:
    return {"inputs": [{"name": "input-0", "shape": list(model.sample.shape), "datatype": "FP32",
                        "data": model.sample.ravel().tolist()}]}


def kserve_attributes(attrs: dict[str, str], ce_type: str, model: str, service: str) -> None:
    """What KServe's logger sends for a record, plus our modelid."""
    assert attrs["specversion"] == "1.0" and attrs["type"] == ce_type
    assert attrs["source"].startswith("urn:mesh:router:") and attrs["id"]
    assert (attrs["inferenceservicename"], attrs["namespace"], attrs["component"], attrs["endpoint"],
            attrs["modelid"]) == (service, "team", "predictor", model, model)
    proto = "ModelInferResponse" if ce_type == RESPONSE_TYPE else "ModelInferRequest"
    assert attrs["datacontenttype"] == f"application/x-protobuf; proto=inference.{proto}"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", attrs["time"])


@pytest.mark.parametrize("content_mode", MODES)
async def test_records_counted_against_grpc_and_rest_requests(model: ModelArtifact, sink: SinkServer,
                                                              content_mode: str) -> None:
    metrics_port = free_port()
    m = await started(model, payload_processors=(sink.url,), payload_namespace="team", metrics_port=metrics_port,
                      payload_content_mode=content_mode, payload_linger_s=0.05, payload_inflight=2)
    try:
        for _ in range(5):
            await m.infer("m", grpc_request(model))
        await m.v2.ModelInfer(grpc_request(model), metadata=(("mm-vmodel-id", "v"), ("ce-id", "mine")), timeout=30)
        async with aiohttp.ClientSession() as session:
            for i in range(4):
                headers = {"ce-id": "rest-id"} if i == 0 else {}
                async with session.post(f"{m.rest_url}/v2/models/m/infer", json=rest_body(model),
                                        headers=headers) as answer:
                    assert answer.status == 200, await answer.text()
        await eventually(lambda: len(sink.events) == 20)
        requests, responses = sink.of(REQUEST_TYPE), sink.of(RESPONSE_TYPE)
        assert len(requests) == len(responses) == 10
        assert sorted(a["id"] for a, _ in requests) == sorted(a["id"] for a, _ in responses)  # paired
        for attrs, body in requests:
            service = "v" if attrs["id"] == "mine" else "m"
            kserve_attributes(attrs, REQUEST_TYPE, "m", service)
            decoded = decode_inputs(pb.ModelInferRequest.FromString(body))
            assert decoded["input-0"].tolist() == model.sample.tolist()
        for attrs, body in responses:
            kserve_attributes(attrs, RESPONSE_TYPE, "m", "v" if attrs["id"] == "mine" else "m")
            assert decode_response(pb.ModelInferResponse.FromString(body))["predict"].tolist() == \
                model.expected["predict"].tolist()
        by_vmodel = [a for a, _ in sink.events if a["id"] == "mine"]
        assert len(by_vmodel) == 2 and all(a["vmodelid"] == "v" for a in by_vmodel)
        assert len([a for a, _ in sink.events if a["id"] == "rest-id"]) == 2  # REST keeps the client's ce-id too
        assert all("vmodelid" not in a for a, _ in sink.events if a["id"] != "mine")
        assert await counters(metrics_port) == {(sink.url, "sent"): 20.0, (sink.url, "failed"): 0.0,
                                                (sink.url, "dropped"): 0.0}
        if content_mode == "batched":
            assert {t for t, _, _ in sink.posts} == {BATCH_CONTENT_TYPE}
            assert sum(n for _, n, _ in sink.posts) == 20 and len(sink.posts) < 20
        else:
            assert [n for _, n, _ in sink.posts] == [1] * 20
        # Kept-alive connections: no more than the posts in flight, however many posts.
        assert len({port for _, _, port in sink.posts}) <= 2
    finally:
        await m.stop()


@pytest.mark.parametrize("content_mode", MODES)
async def test_a_failed_inference_logs_its_request_only(model: ModelArtifact, sink: SinkServer,
                                                        content_mode: str) -> None:
    """As KServe's logger: the request is logged whatever the answer, a response only for an
    answer; over gRPC and REST alike. The per-model filter (here a vModel) applies."""
    m = await started(model, payload_processors=(f"{sink.url}?v",), payload_mode="all",
                      payload_content_mode=content_mode, payload_linger_s=0.02)
    try:
        await m.register("other", "sklearn", str(model.path))
        await m.infer("other", grpc_request(model))  # not observed
        await m.infer("m", grpc_request(model))  # observed through its vModel only
        await m.infer("v", grpc_request(model), header="mm-vmodel-id")
        bad = pb.ModelInferRequest(inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1])])
        with pytest.raises(grpc.aio.AioRpcError):
            await m.v2.ModelInfer(bad, metadata=(("mm-vmodel-id", "v"), ("ce-id", "bad-grpc")), timeout=30)
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{m.rest_url}/v2/models/v/infer", headers={"ce-id": "bad-rest"},
                                    json={"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}
                                    ) as answer:
                assert answer.status >= 400
        await eventually(lambda: len(sink.events) == 4)
        await asyncio.sleep(0.2)
        assert len(sink.events) == 4
        types = sorted((a["id"] in ("bad-grpc", "bad-rest"), a["type"]) for a, _ in sink.events)
        assert types == [(False, REQUEST_TYPE), (False, RESPONSE_TYPE), (True, REQUEST_TYPE), (True, REQUEST_TYPE)]
        assert {a["id"] for a, _ in sink.of(REQUEST_TYPE)} >= {"bad-grpc", "bad-rest"}
        assert all(a["inferenceservicename"] == "v" for a, _ in sink.events)
    finally:
        await m.stop()


async def test_batch_bounds_are_respected(model: ModelArtifact, sink: SinkServer) -> None:
    """Records per POST at most payload_batch_records; body bytes (plus 512 per record) at most
    payload_batch_bytes; a lingering sender fills batches rather than posting each record."""
    per_record = 512 + len(grpc_request(model).SerializeToString())
    m = await started(model, payload_processors=(sink.url,), payload_content_mode="batched",
                      payload_batch_records=5, payload_linger_s=0.5, payload_inflight=1)
    try:
        await asyncio.gather(*(m.infer("m", grpc_request(model)) for _ in range(12)))
        await eventually(lambda: len(sink.events) == 24)
        assert max(n for _, n, _ in sink.posts) == 5 and sum(n for _, n, _ in sink.posts) == 24
    finally:
        await m.stop()
    sink.events.clear()
    sink.posts.clear()
    m = await started(model, payload_processors=(sink.url,), payload_content_mode="batched", payload_mode="request",
                      payload_batch_records=100, payload_batch_bytes=3 * per_record + 10, payload_linger_s=0.5,
                      payload_inflight=1)
    try:
        await asyncio.gather(*(m.infer("m", grpc_request(model)) for _ in range(10)))
        await eventually(lambda: len(sink.events) == 10)
        assert max(n for _, n, _ in sink.posts) == 3
    finally:
        await m.stop()


@pytest.mark.parametrize("content_mode", MODES)
async def test_a_sink_that_is_down_or_slow_never_fails_inference(model: ModelArtifact, content_mode: str) -> None:
    slow = await SinkServer(delay_s=5.0).start()
    down = f"http://127.0.0.1:{free_port()}/closed"
    metrics_port = free_port()
    m = await started(model, payload_processors=(down, slow.url), payload_queue_records=4, payload_inflight=1,
                      payload_timeout_s=0.5, payload_retries=1, payload_flush_s=0.5, metrics_port=metrics_port,
                      payload_content_mode=content_mode, payload_batch_records=2, payload_linger_s=0.01)
    try:
        started_at = time.monotonic()
        for _ in range(10):
            await m.infer("m", grpc_request(model))
        assert time.monotonic() - started_at < 5  # not waiting on either sink
        counts: dict[tuple[str, str], float] = {}

        async def moved() -> bool:
            counts.update(await counters(metrics_port))
            return counts.get((down, "failed"), 0) >= 1 and counts.get((slow.url, "dropped"), 0) >= 1

        await m.wait_for(moved, timeout=10)
        assert counts[(down, "sent")] == 0 and counts[(slow.url, "sent")] == 0
    finally:
        stopping = time.monotonic()
        await m.stop()
        await slow.stop()
    assert time.monotonic() - stopping < 10  # the flush gives up after payload_flush_s
