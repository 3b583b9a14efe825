"""A client naming 100,000 distinct unknown model IDs cannot grow a router.

Real processes (``loadtest.cluster``: a private etcd, one runtime, one router, each started as
``mesh up`` starts them). Every request names a model nobody registered and gets NOT_FOUND; the
router's resident memory, read from /proc before and after (after a warm-up of 5,000 such requests,
so that gRPC's and the allocator's one-time growth is not counted), moves by at most 10 MB. Before
the fix the copy scaler kept a rate for every ID ever requested: 50,000 IDs took a router from 65 to
82.5 MB. Marked slow: 105,000 requests take about a minute on two cores.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from loadtest.cluster import Cluster
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

MB = 1_000_000


async def _flood(endpoint: str, first: int, count: int, concurrency: int = 64) -> dict[str, int]:
    codes: dict[str, int] = {}
    request = pb.ModelInferRequest(inputs=[pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[1, 1])], raw_input_contents=[b"\0\0\0\0"])
    ids = iter(range(first, first + count))
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def worker() -> None:
            for i in ids:
                try:
                    await stub.ModelInfer(request, metadata=(("mm-model-id", f"tenant-{i:06d}/unknown"),),
                                          timeout=10)
                    codes["OK"] = codes.get("OK", 0) + 1
                except grpc.aio.AioRpcError as err:
                    codes[err.code().name] = codes.get(err.code().name, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return codes


def test_100k_unknown_ids_move_router_rss_by_at_most_10_mb() -> None:
    with Cluster(log_level="warning") as cluster:
        cluster.start_runtime()
        router = cluster.start_router()
        asyncio.run(_flood(router.endpoint, 0, 5_000))
        time.sleep(1)
        before = router.ps.memory_info().rss
        started = time.monotonic()
        codes = asyncio.run(_flood(router.endpoint, 5_000, 100_000))
        elapsed = time.monotonic() - started
        time.sleep(2)  # a copy-scaling round (and its pruning) runs every second
        after = router.ps.memory_info().rss
        print(f"100,000 unknown IDs in {elapsed:.1f} s: router RSS {before / MB:.1f} -> {after / MB:.1f} MB")
        assert codes == {"NOT_FOUND": 100_000}
        assert after - before <= 10 * MB, (before, after)
