"""200 concurrent 16 MiB bodies: some get RESOURCE_EXHAUSTED, no server's memory runs away, and
the memory comes back after the burst.

Real processes (``loadtest.cluster``): a private etcd, a runtime and a router, each configured as
an operator who accepts large messages would (``router.max_message_bytes`` 20 MiB, 256 MiB in
flight per process, 48 MiB at the runtime, and 128 MiB per client connection, 16 calls open per
connection). The client
sends the 200 bodies at once over four connections, first to the router, then to the runtime
directly: each body is a valid request for a small scikit-learn model, 524,288 rows of 8 FP32
features, which keeps the admitted calls in flight while the runtime predicts.

Asserted, for each server: some calls were refused RESOURCE_EXHAUSTED by the in-flight bounds;
every other answer is OK or UNAVAILABLE from a stream the transport refused past the
per-connection limit (retryable); the peak RSS, sampled every 10 ms,
stays under 1.5 GiB (the same burst without the bounds took a router to 3.7 GiB and left it
there: mesh.malloc); three seconds later the RSS is within 200 MiB of where it started; and the
server still answers. Marked slow (3.2 GB sent per server).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import grpc
import psutil
import pytest

from loadtest.cluster import Cluster, Server
from loadtest.models import TrainedModel, train_logistic
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

INFER = "/inference.GRPCInferenceService/ModelInfer"
LIVE = "/inference.GRPCInferenceService/ServerLive"
MIB = 1 << 20
BODIES, SIZE, CONNECTIONS, FEATURES = 200, 16 * MIB, 4, 8
ENV = {"MESH_ROUTER_MAX_MESSAGE_BYTES": str(20 * MIB), "MESH_ROUTER_MAX_INFLIGHT_BYTES": str(256 * MIB),
       "MESH_ROUTER_MAX_CONNECTION_INFLIGHT_BYTES": str(128 * MIB), "MESH_ROUTER_MAX_STREAMS_PER_CONNECTION": "16",
       "MESH_RUNTIME_SUPPORTED_TYPES": "sklearn"}
PEAK_BOUND, SETTLED_BOUND = 1536 * MIB, 200 * MIB


class Peak:
    """The process's highest RSS, sampled every 10 ms on a thread while the block runs."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.value = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.value = max(self.value, self.process.memory_info().rss)
            time.sleep(0.01)  # sampling another process's RSS: there is no event to wait on

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def _burst(endpoint: str) -> Counter[str]:
    rows = SIZE // (4 * FEATURES)
    body = pb.ModelInferRequest(model_name="big", raw_input_contents=[b"\0" * SIZE], inputs=[
        pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[rows, FEATURES]),
    ]).SerializeToString()
    channels = [grpc.aio.insecure_channel(endpoint, options=[("grpc.max_send_message_length", 32 * MIB),
                                                         ("grpc.max_receive_message_length", 32 * MIB)])
                for _ in range(CONNECTIONS)]
    try:
        async def one(i: int) -> str:
            try:
                await channels[i % CONNECTIONS].unary_unary(INFER)(body, metadata=(("mm-model-id", "big"),),
                                                                   timeout=60)
                return "OK"
            except grpc.aio.AioRpcError as err:
                return err.code().name

        return Counter(await asyncio.gather(*(one(i) for i in range(BODIES))))
    finally:
        for channel in channels:
            await channel.close()


async def _live(endpoint: str) -> None:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        await channel.unary_unary(LIVE)(pb.ServerLiveRequest().SerializeToString(), timeout=10)


def _check(server: Server) -> None:
    before = psutil.Process(server.pid).memory_info().rss
    with Peak(server.pid) as peak:
        answers = asyncio.run(_burst(server.endpoint))
        time.sleep(3)  # the burst's memory goes back: mesh.transport.inflight.trim_soon
    settled = psutil.Process(server.pid).memory_info().rss
    print(f"{server.name}: {dict(answers)}; RSS {before // MIB} -> peak {peak.value // MIB} -> "
          f"{settled // MIB} MiB 3 s later")
    assert answers["RESOURCE_EXHAUSTED"] > 0, answers
    assert set(answers) <= {"RESOURCE_EXHAUSTED", "OK", "UNAVAILABLE"}, answers
    assert answers["OK"] > 0, answers  # admitted calls were served
    assert peak.value < PEAK_BOUND
    assert settled < before + SETTLED_BOUND
    asyncio.run(_live(server.endpoint))


async def _register(endpoint: str, model: TrainedModel) -> None:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        await mm_grpc.ModelMeshStub(channel).registerModel(mm.RegisterModelRequest(  # type: ignore[no-untyped-call]
            modelId="big", modelInfo=mm.ModelInfo(type="sklearn", path=str(model.path)), loadNow=True, sync=True),
            timeout=60)


def test_concurrent_large_bodies_are_bounded_at_router_and_runtime(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = train_logistic("big", tmp_path, n_features=FEATURES, seed=0, rows=100)
    with Cluster(log_level="warning") as cluster:
        # A runtime predicts quickly: a smaller process bound (three bodies) to see it refuse.
        runtime = cluster.start_runtime(extra_env={**ENV, "MESH_ROUTER_MAX_INFLIGHT_BYTES": str(48 * MIB)})
        router = cluster.start_router(extra_env=ENV)
        asyncio.run(_register(router.endpoint, model))
        _check(router)
        _check(runtime)
