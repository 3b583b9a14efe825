"""Payload logging through a real router and runtime in this process, to a real aiohttp sink on
127.0.0.1: records counted against the requests sent over gRPC and REST, their CloudEvent headers
and protobuf bodies, a vModel's records, and a sink that is down or slow (inference unaffected, the
counters move, shutdown does not hang)."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web

from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.router.payloads import REQUEST_TYPE, RESPONSE_TYPE
from mesh.tensors import decode_inputs, decode_response, encode_request
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import ModelArtifact, make_model

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SinkServer:
    """An HTTP sink that keeps every CloudEvent it is posted; ``delay_s`` makes it slow."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.events: list[tuple[dict[str, str], bytes]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self.events.append(({k.lower(): v for k, v in request.headers.items()}, body))
        return web.Response(status=200)

    async def start(self) -> SinkServer:
        app = web.Application()
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

    def of(self, ce_type: str) -> list[tuple[dict[str, str], bytes]]:
        return [e for e in self.events if e[0]["ce-type"] == ce_type]


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


async def test_records_counted_against_grpc_and_rest_requests(model: ModelArtifact, sink: SinkServer) -> None:
    metrics_port = free_port()
    m = await started(model, payload_processors=(sink.url,), payload_namespace="team", metrics_port=metrics_port)
    try:
        for _ in range(5):
            await m.infer("m", grpc_request(model))
        await m.v2.ModelInfer(grpc_request(model), metadata=(("mm-vmodel-id", "v"), ("ce-id", "mine")), timeout=30)
        async with aiohttp.ClientSession() as session:
            for _ in range(4):
                async with session.post(f"{m.rest_url}/v2/models/m/infer", json=rest_body(model)) as answer:
                    assert answer.status == 200, await answer.text()
        await eventually(lambda: len(sink.events) == 20)
        requests, responses = sink.of(REQUEST_TYPE), sink.of(RESPONSE_TYPE)
        assert len(requests) == len(responses) == 10
        assert {h["ce-id"] for h, _ in requests} == {h["ce-id"] for h, _ in responses}  # paired
        for headers, body in requests:
            assert headers["ce-specversion"] == "1.0" and headers["ce-namespace"] == "team"
            assert headers["content-type"].endswith("proto=inference.ModelInferRequest")
            decoded = decode_inputs(pb.ModelInferRequest.FromString(body))
            assert decoded["input-0"].tolist() == model.sample.tolist()
        for _, body in responses:
            assert decode_response(pb.ModelInferResponse.FromString(body))["predict"].tolist() == \
                model.expected["predict"].tolist()
        by_vmodel = [h for h, _ in sink.events if h["ce-id"] == "mine"]
        assert len(by_vmodel) == 2 and all(
            (h["ce-inferenceservicename"], h["ce-vmodelid"], h["ce-modelid"]) == ("v", "v", "m") for h in by_vmodel)
        assert await counters(metrics_port) == {(sink.url, "sent"): 20.0, (sink.url, "failed"): 0.0,
                                                (sink.url, "dropped"): 0.0}
    finally:
        await m.stop()


async def test_per_model_filter_mode_and_failed_inference(model: ModelArtifact, sink: SinkServer) -> None:
    m = await started(model, payload_processors=(f"{sink.url}?v",), payload_mode="request")
    try:
        await m.register("other", "sklearn", str(model.path))
        await m.infer("other", grpc_request(model))  # not observed
        await m.infer("m", grpc_request(model))  # observed through its vModel only
        await m.infer("v", grpc_request(model), header="mm-vmodel-id")
        bad = pb.ModelInferRequest(inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1])])
        with pytest.raises(grpc.aio.AioRpcError):
            await m.infer("v", bad, header="mm-vmodel-id")
        await eventually(lambda: len(sink.events) == 2)
        await asyncio.sleep(0.2)
        assert len(sink.events) == 2 and all(h["ce-type"] == REQUEST_TYPE for h, _ in sink.events)
    finally:
        await m.stop()


async def test_a_sink_that_is_down_or_slow_never_fails_inference(model: ModelArtifact) -> None:
    slow = await SinkServer(delay_s=5.0).start()
    down = f"http://127.0.0.1:{free_port()}/closed"
    metrics_port = free_port()
    m = await started(model, payload_processors=(down, slow.url), payload_queue_records=4, payload_inflight=1,
                      payload_timeout_s=0.5, payload_retries=1, payload_flush_s=0.5, metrics_port=metrics_port)
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
