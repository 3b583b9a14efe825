"""GPU placement through a real router and real runtimes on 127.0.0.1, with stand-in GPUs.

This machine has no GPU, so one runtime is given two stand-in GPUs (``tests.support.fake_gpu``:
the runtime's one GPU interface answered by the test, and GPU copies loaded by the real loaders in
RAM while the stand-in device is charged their weights plus 1000 KiB, as a library's workspace would
be). Everything else is real: the router's placement by device, the runtime's per-device budgets,
measurement from the device's growth, eviction per device, the budget shrinking when "another
process" takes GPU memory, the instance records, metrics and management API. The same path on a real
GPU is ``scripts/gpu-check``.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.registry import open_store
from mesh.registry.records import InstanceRecord
from mesh.registry.registry import Registry
from mesh.tensors import decode_response, encode_request
from tests.support.fake_gpu import MIB, FakeGpus, StandInGpuMemory, stand_in_load
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import ModelArtifact, assert_outputs_match, make_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

OVERHEAD = 1000 * 1024  # per GPU copy, beyond its weights: 2 copies fill a 2 MiB budget


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GpuMesh:
    def __init__(self, mesh: InProcessMesh, gpus: FakeGpus, url: str, metrics_port: int) -> None:
        self.mesh, self.gpus, self.url, self.metrics_port = mesh, gpus, url, metrics_port

    async def status(self, model_id: str) -> mm.ModelStatusInfo:
        return await self.mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId=model_id), timeout=10)

    async def devices(self, model_id: str) -> list[str]:
        return [c.device for c in (await self.status(model_id)).modelCopyInfos
                if c.copyStatus == mm.ModelStatusInfo.LOADED]

    async def instances(self) -> dict[str, InstanceRecord]:
        store, prefix = open_store(self.url)
        registry = Registry(store, prefix)
        kvs, _ = await store.get_prefix(registry.keys.instances)
        records = [InstanceRecord.from_json(kv.value) for kv in kvs]
        return {("gpu" if r.gpu_types else "plain"): r for r in records}

    async def infer(self, model_id: str, model: ModelArtifact) -> None:
        """Infer and check the answer, then wait until the router sees the copy loaded."""
        out = decode_response(await self.mesh.infer(model_id, encode_request(model_name=model_id,
                                                                             inputs={"x": model.sample})))
        assert_outputs_match(out, model.expected, rtol=1e-4, atol=1e-5)

        async def seen() -> bool:
            return bool(await self.devices(model_id))

        await self.mesh.wait_for(seen)

    async def count_loaded(self, models: list[str], expected: int) -> list[str]:
        """The models with a loaded copy, once there are ``expected`` of them (evictions published)."""
        async def settled() -> bool:
            return sum([bool(await self.devices(m)) for m in models]) == expected

        await self.mesh.wait_for(settled)
        return [m for m in models if await self.devices(m)]

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()


@pytest.fixture
async def gpu_mesh():  # type: ignore[no-untyped-def]
    url = memory_url()
    mesh = InProcessMesh(url, runtime_overrides={"eviction_policy": "lru"})
    # 4 MiB devices, 1 MiB held by the CUDA context, 1 MiB reserve: a 2 MiB budget on each GPU.
    gpus = FakeGpus([4 * MIB, 4 * MIB], context_bytes=MIB)
    port = free_port()
    await mesh.add_runtime(capacity_bytes=64 * MIB)  # no GPU
    overrides = {"capacity_bytes": 64 * MIB, "metrics_port": port, "gpu_capacity_fraction": 1.0,
                 "gpu_reserve_bytes": MIB, "gpu_refresh_s": 0.1}
    memory = StandInGpuMemory(gpus, mesh.settings(**overrides).runtime)
    await mesh.add_runtime(serve_kwargs={"gpus": memory, "load_fn": stand_in_load(gpus, OVERHEAD)}, **overrides)
    await mesh.start(runtimes=0)
    try:
        yield GpuMesh(mesh, gpus, url, port)
    finally:
        await mesh.stop()


async def test_gpu_models_go_to_gpus_ram_models_stay_and_each_device_evicts_its_own(
        gpu_mesh: GpuMesh, tmp_path: Path) -> None:
    g = gpu_mesh
    instances = await g.instances()
    assert instances["gpu"].gpu_types == ("onnx", "torchscript", "pytorch")  # and the alias of torchscript
    assert {d.device: d.capacity_bytes for d in instances["gpu"].devices if d.device != "ram"} == {
        "gpu0": 2 * MIB, "gpu1": 2 * MIB}
    assert [d.device for d in instances["plain"].devices] == ["ram"]

    ram_models = {f"ram-{i}": make_model("sklearn", tmp_path, seed=i) for i in range(4)}
    for model_id, model in ram_models.items():
        await g.mesh.register(model_id, "sklearn", str(model.path))
        await g.infer(model_id, model)
    ram_before = {m: await g.devices(m) for m in ram_models}
    assert all(d == ["ram"] for d in ram_before.values()), ram_before

    gpu_models = {f"gpu-{i}": make_model("torchscript", tmp_path, seed=10 + i) for i in range(6)}
    for model_id, model in gpu_models.items():
        await g.mesh.register(model_id, "torchscript", str(model.path), gpu="required")
        await g.infer(model_id, model)
        copies = (await g.status(model_id)).modelCopyInfos
        assert [c.device for c in copies] in (["gpu0"], ["gpu1"]), copies
        assert copies[0].location == instances["gpu"].instance_id
        # Measured as the device's growth: the weights plus what the "library" allocated.
        assert copies[0].sizeBytes >= OVERHEAD
    await g.count_loaded(list(gpu_models), 4)  # 2 per GPU: the other two were evicted on their GPU
    assert g.gpus.ours[0] <= 3 * MIB and g.gpus.ours[1] <= 3 * MIB  # context + at most 2 copies each

    # The RAM models were not touched by the GPU evictions, and still answer.
    assert {m: await g.devices(m) for m in ram_models} == ram_before
    for model_id, model in ram_models.items():
        await g.infer(model_id, model)

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(
        await asyncio.to_thread(g.scrape)) for s in family.samples}  # (state gauges are read on this loop)
    for device in ("gpu0", "gpu1"):
        assert samples["mesh_device_models", (("device", device),)] == 2
        assert samples["mesh_device_capacity_bytes", (("device", device),)] == 2 * MIB
        assert samples["mesh_gpu_memory_bytes", (("device", device), ("kind", "total"))] == 4 * MIB


async def test_a_preferred_model_runs_in_ram_when_the_gpus_are_full(gpu_mesh: GpuMesh, tmp_path: Path) -> None:
    g = gpu_mesh
    fillers = {f"fill-{i}": make_model("torchscript", tmp_path, seed=20 + i) for i in range(4)}
    for model_id, model in fillers.items():
        await g.mesh.register(model_id, "torchscript", str(model.path), gpu="required")
        await g.infer(model_id, model)
    preferred = make_model("onnx", tmp_path, seed=30)
    await g.mesh.register("pref", "onnx", str(preferred.path), gpu="preferred")
    await g.infer("pref", preferred)
    copies = (await g.status("pref")).modelCopyInfos
    gpu_instance = (await g.instances())["gpu"].instance_id
    # Homed on the GPU instance (the GPU tier), in its RAM since neither GPU had room.
    assert [(c.location, c.device) for c in copies] == [(gpu_instance, "ram")]
    assert [len(await g.devices(m)) for m in fillers] == [1, 1, 1, 1]  # it evicted no GPU model


async def test_a_model_that_cannot_run_on_a_gpu_is_refused_with_the_reason(gpu_mesh: GpuMesh,
                                                                           tmp_path: Path) -> None:
    model = make_model("sklearn", tmp_path, seed=1)
    await gpu_mesh.mesh.register("sk-gpu", "sklearn", str(model.path), gpu="required")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gpu_mesh.infer("sk-gpu", model)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no instance can load type 'sklearn' on a GPU" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await gpu_mesh.mesh.register("bad", "onnx", "/m.onnx", gpu="always")
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_when_another_process_takes_gpu_memory_only_that_gpu_gives_way(
        gpu_mesh: GpuMesh, tmp_path: Path) -> None:
    g = gpu_mesh
    models = {f"t-{i}": make_model("torchscript", tmp_path, seed=40 + i) for i in range(4)}
    for model_id, model in models.items():
        await g.mesh.register(model_id, "torchscript", str(model.path), gpu="required")
        await g.infer(model_id, model)
    where = {m: (await g.devices(m))[0] for m in models}
    assert sorted(where.values()) == ["gpu0", "gpu0", "gpu1", "gpu1"], where

    g.gpus.take(0, 1536 * 1024)  # another process: 0.5 MiB left on gpu0, less than one copy

    async def shrunk() -> bool:
        gpu0 = (await g.instances())["gpu"].device("gpu0")
        return gpu0 is not None and gpu0.capacity_bytes == 512 * 1024

    await g.mesh.wait_for(shrunk, timeout=10)

    async def evicted() -> bool:
        return [await g.devices(m) for m, d in where.items() if d == "gpu0"] == [[], []]

    await g.mesh.wait_for(evicted, timeout=10)
    assert [await g.devices(m) for m, d in where.items() if d == "gpu1"] == [["gpu1"], ["gpu1"]]
    assert g.gpus.ours[0] == MIB  # the context alone: the evicted copies' memory was freed

    # A model for that GPU now loads on the other one, which still has room... after making it.
    extra = make_model("torchscript", tmp_path, seed=50)
    await g.mesh.register("extra", "torchscript", str(extra.path), gpu="required")
    await g.infer("extra", extra)
    assert await g.devices("extra") == ["gpu1"]

    g.gpus.give_back(0, 1536 * 1024)

    async def restored() -> bool:
        gpu0 = (await g.instances())["gpu"].device("gpu0")
        return gpu0 is not None and gpu0.capacity_bytes == 2 * MIB

    await g.mesh.wait_for(restored, timeout=10)


async def test_direct_runtime_inference_of_a_gpu_model_answers_right(gpu_mesh: GpuMesh, tmp_path: Path) -> None:
    """The copy serves through the runtime's own port too (the router's hit path), with metadata."""
    g = gpu_mesh
    model = make_model("onnx", tmp_path, seed=60)
    await g.mesh.register("direct", "onnx", str(model.path), gpu="required")
    await g.infer("direct", model)
    endpoint = next(r.endpoint for r in (await g.instances()).values() if r.gpu_types)
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        reply = await stub.ModelInfer(encode_request(model_name="direct", inputs={"x": model.sample}),
                                      timeout=10)
        assert_outputs_match(decode_response(reply), model.expected, rtol=1e-4, atol=1e-5)
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name="direct"), timeout=10)
        assert meta.platform == "onnxruntime_onnx"
