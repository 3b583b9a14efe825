"""The management calls the benchmarks make through a router (mmesh.ModelMesh), and a few reads
of the registry (placements, instance counters) that the router does not expose."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import grpc

from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.registry import open_store
from mesh.registry.keys import Keys
from mesh.registry.records import InstanceRecord, PlacementRecord


async def register(stub: mm_grpc.ModelMeshStub, model_id: str, path: str, *, model_type: str = "sklearn",
                   timeout_s: float = 30.0) -> None:
    await stub.registerModel(mm.RegisterModelRequest(
        modelId=model_id, modelInfo=mm.ModelInfo(type=model_type, path=path)), timeout=timeout_s)


async def register_many(stub: mm_grpc.ModelMeshStub, items: Iterable[tuple[str, str]], *,
                        in_flight: int, model_type: str = "sklearn") -> tuple[int, dict[str, int]]:
    """Register (model_id, path) pairs with at most ``in_flight`` calls outstanding; returns
    (registered, errors by status code)."""
    iterator = iter(items)
    done = 0
    errors: dict[str, int] = {}

    async def worker() -> None:
        nonlocal done
        for model_id, path in iterator:  # a shared iterator: each item is taken by one worker
            try:
                await register(stub, model_id, path, model_type=model_type)
                done += 1
            except grpc.aio.AioRpcError as err:
                errors[err.code().name] = errors.get(err.code().name, 0) + 1

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return done, errors


async def register_bulk(stub: mm_grpc.ModelMeshStub, items: Iterable[tuple[str, str]], *, batch: int,
                        in_flight: int, model_type: str = "sklearn") -> tuple[int, dict[str, int]]:
    """Register (model_id, path) pairs through ``registerModels``, ``batch`` items a call and at
    most ``in_flight`` calls outstanding; returns (registered, errors by status code: a whole call's
    gRPC code, or an item's code)."""
    iterator = iter(items)
    lock = asyncio.Lock()
    done = 0
    errors: dict[str, int] = {}

    def take() -> list[tuple[str, str]]:
        out = []
        for pair in iterator:
            out.append(pair)
            if len(out) == batch:
                break
        return out

    async def worker() -> None:
        nonlocal done
        while True:
            async with lock:  # one generator, several workers
                chunk = take()
            if not chunk:
                return
            request = mm.RegisterModelsRequest(items=[
                mm.RegisterModelsItem(modelId=m, modelInfo=mm.ModelInfo(type=model_type, path=p)) for m, p in chunk])
            try:
                response = await stub.registerModels(request, timeout=120)
            except grpc.aio.AioRpcError as err:
                errors[err.code().name] = errors.get(err.code().name, 0) + len(chunk)
                continue
            for r in response.results:
                if r.code == "OK":
                    done += 1
                else:
                    errors[r.code] = errors.get(r.code, 0) + 1

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return done, errors


async def wait_loaded(stub: mm_grpc.ModelMeshStub, model_id: str, timeout_s: float = 30.0) -> None:
    """Until the router's view shows a loaded copy of the model."""
    deadline = time.monotonic() + timeout_s
    loaded = mm.ModelStatusInfo.ModelStatus.Value("LOADED")
    while time.monotonic() < deadline:
        status = await stub.getModelStatus(mm.GetStatusRequest(modelId=model_id), timeout=5)
        if status.status == loaded:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"model {model_id!r} not LOADED in the router's view after {timeout_s} s")


async def placements(registry_url: str, model_id: str) -> list[PlacementRecord]:
    store, prefix = open_store(registry_url)
    try:
        kvs, _ = await store.get_prefix(Keys(prefix).placements_of(model_id))
    finally:
        await store.close()
    return [PlacementRecord.from_json(kv.value) for kv in kvs]


async def instances(registry_url: str) -> list[InstanceRecord]:
    store, prefix = open_store(registry_url)
    try:
        kvs, _ = await store.get_prefix(Keys(prefix).instances)
    finally:
        await store.close()
    return [InstanceRecord.from_json(kv.value) for kv in kvs]
