"""The router's in-flight bounds cover every call that carries a client's body to a runtime:
ModelMetadata as well as ModelInfer (its body may be as large, and it waits for a cold load).

In process, on a memory registry: a real router and runtime, a real slow load (a joblib pickle
whose ``__reduce__`` sleeps 2 s, code formats allowed as by default) holds the first call in
flight while the others arrive.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import grpc
import joblib

from mesh.gen.inference import grpc_service_pb2 as pb
from tests.support.inprocess import InProcessMesh, memory_url

BODY = 600 * 1024


class Slow:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (time.sleep, (2,))


async def _metadata(mesh: InProcessMesh) -> grpc.StatusCode:
    request = pb.ModelMetadataRequest(name="slow", version="x" * BODY)
    try:
        await mesh.v2.ModelMetadata(request, metadata=(("mm-model-id", "slow"),), timeout=20)
    except grpc.aio.AioRpcError as err:
        if err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert "in flight" in (err.details() or ""), err.details()
        return err.code()
    return grpc.StatusCode.OK


async def test_model_metadata_counts_against_the_bytes_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "slow" / "model.joblib"
    path.parent.mkdir()
    joblib.dump(Slow(), path)
    mesh = InProcessMesh(memory_url(), router_overrides={"max_inflight_bytes": 1 << 20})
    await mesh.start(runtimes=1)
    try:
        await mesh.register("slow", "sklearn", str(path))
        answers = Counter(await asyncio.gather(*(_metadata(mesh) for _ in range(6))))
        # One call is always admitted and holds 600 KiB while the load sleeps; the others would
        # pass the 1 MiB bound and are refused at once (ModelInfer's bound: tests/e2e/test_inflight_bounds.py).
        assert answers[grpc.StatusCode.RESOURCE_EXHAUSTED] >= 4, answers
    finally:
        await mesh.stop()
