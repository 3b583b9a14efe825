"""Prometheus metrics (docs/metrics.md) scraped over HTTP from a router and runtimes in one process:
each event moves its counters by exactly what it should, the state gauges match the components'
own accounting, and ``promtool`` accepts the exposition."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.registry import open_store
from mesh.registry.records import InstanceRecord, ModelSpec, PlacementRecord
from mesh.registry.registry import Registry
from mesh.tensors import encode_request
from mesh.transport.metadata import LOAD_MODE, MODEL_ID
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import ModelArtifact, make_model

pytestmark = pytest.mark.integration

ST = mm.ModelStatusInfo
MIB = 1024 * 1024
INFER = {"method": "ModelInfer", "code": "OK"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Samples:
    """One scrape: sample name and exact label set -> value (absent samples read as 0)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.values[(s.name, frozenset(s.labels.items()))] = s.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.values.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.values

    def label_names(self) -> set[str]:
        return {k for _, labels in self.values for k, _ in labels}


def _get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


async def scrape(port: int) -> Samples:
    # From a thread: the state gauges are read on this test's event loop, which must stay free.
    return Samples(await asyncio.to_thread(_get, port))


async def eventually(port: int, check, timeout: float = 10.0) -> Samples:  # type: ignore[no-untyped-def]
    """Scrape until ``check(samples)`` holds (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        samples = await scrape(port)
        if check(samples):
            return samples
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"metrics condition not met in {timeout} s; last scrape:\n{samples.text}")
        await asyncio.sleep(0.05)


class Ports:
    def __init__(self) -> None:
        self.router = free_port()
        self.runtime = free_port()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[ModelArtifact]:
    directory = tmp_path_factory.mktemp("models")
    return [make_model("sklearn", directory, seed=s) for s in range(3)]


def request_for(model: ModelArtifact):  # type: ignore[no-untyped-def]
    return encode_request(model_name="", inputs={"input-0": model.sample})


async def started(ports: Ports, *, runtime: dict[str, object] | None = None,
                  router: dict[str, object] | None = None, url: str = "") -> InProcessMesh:
    return await InProcessMesh(
        url or memory_url(), router_overrides={"metrics_port": ports.router, **(router or {})},
        runtime_overrides={"metrics_port": ports.runtime, **(runtime or {})}).start(runtimes=1)


@pytest.fixture
async def mesh_and_ports() -> AsyncIterator[tuple[InProcessMesh, Ports, int]]:
    """A router and one runtime (LRU, 64 MiB), with 2 models registered before they start."""
    ports = Ports()
    url = memory_url()
    store, prefix = open_store(url)
    registry = Registry(store, prefix)
    for i in range(2):
        await registry.register_model(ModelSpec(model_id=f"pre-{i}", type="sklearn", path="/nowhere"))
    m = await started(ports, runtime={"capacity_bytes": 64 * MIB, "eviction_policy": "lru"}, url=url)
    try:
        yield m, ports, 2
    finally:
        await m.stop()


async def placements(mesh: InProcessMesh) -> list[PlacementRecord]:
    store, prefix = open_store(mesh.registry_url)
    registry = Registry(store, prefix)
    kvs, _ = await store.get_prefix(registry.keys.placements)
    return [PlacementRecord.from_json(kv.value) for kv in kvs]


async def test_requests_hits_misses_loads_and_the_state_gauges(
        mesh_and_ports: tuple[InProcessMesh, Ports, int], models: list[ModelArtifact]) -> None:
    mesh, ports, preregistered = mesh_and_ports
    await mesh.register("a", "sklearn", str(models[0].path))
    rt0, ro0 = await scrape(ports.runtime), await scrape(ports.router)

    # First request: one cold miss that waited for one load.
    await mesh.infer("a", request_for(models[0]))
    rt1, ro1 = await scrape(ports.runtime), await scrape(ports.router)
    assert rt1("mesh_cache_requests_total", result="miss", reason="cold") - \
        rt0("mesh_cache_requests_total", result="miss", reason="cold") == 1
    assert rt1("mesh_cache_requests_total", result="hit", reason="") == \
        rt0("mesh_cache_requests_total", result="hit", reason="")
    assert rt1("modelmesh_loadmodel_milliseconds_count") - rt0("modelmesh_loadmodel_milliseconds_count") == 1
    assert rt1("modelmesh_cache_miss_milliseconds_count") - rt0("modelmesh_cache_miss_milliseconds_count") == 1
    assert rt1("modelmesh_loaded_model_size_bytes_count") == 1
    assert rt1("modelmesh_invoke_model_milliseconds_count", **INFER) - \
        rt0("modelmesh_invoke_model_milliseconds_count", **INFER) == 1
    assert ro1("modelmesh_api_request_milliseconds_count", **INFER) - \
        ro0("modelmesh_api_request_milliseconds_count", **INFER) == 1

    # N requests to the loaded model: N hits, N answers.
    n = 7
    for _ in range(n):
        await mesh.infer("a", request_for(models[0]))
    rt2, ro2 = await scrape(ports.runtime), await scrape(ports.router)
    assert rt2("mesh_cache_requests_total", result="hit", reason="") - \
        rt1("mesh_cache_requests_total", result="hit", reason="") == n
    assert sum(v for (name, labels), v in rt2.values.items() if name == "mesh_cache_requests_total"
               and ("result", "miss") in labels) == \
        sum(v for (name, labels), v in rt1.values.items() if name == "mesh_cache_requests_total"
            and ("result", "miss") in labels)
    assert rt2("modelmesh_invoke_model_milliseconds_count", **INFER) - \
        rt1("modelmesh_invoke_model_milliseconds_count", **INFER) == n
    assert ro2("modelmesh_api_request_milliseconds_count", **INFER) - \
        ro1("modelmesh_api_request_milliseconds_count", **INFER) == n
    for histogram in ("modelmesh_request_size_bytes_count", "modelmesh_response_size_bytes_count"):
        assert ro2(histogram, method="ModelInfer") - ro1(histogram, method="ModelInfer") == n
    size = len(request_for(models[0]).SerializeToString())
    assert ro2("modelmesh_request_size_bytes_sum", method="ModelInfer") - \
        ro1("modelmesh_request_size_bytes_sum", method="ModelInfer") == n * size
    assert ro2("modelmesh_api_request_milliseconds_count", method="registerModel", code="OK") == 1

    # An unknown model: NOT_FOUND at the router, nothing at the runtime.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.infer("no-such-model", request_for(models[0]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    rt3, ro3 = await scrape(ports.runtime), await scrape(ports.router)
    assert ro3("modelmesh_api_request_milliseconds_count", method="ModelInfer", code="NOT_FOUND") == 1
    assert rt3("modelmesh_invoke_model_milliseconds_count", **INFER) == \
        rt2("modelmesh_invoke_model_milliseconds_count", **INFER)

    # Management calls are timed too, with their status.
    await mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId="a"))
    with pytest.raises(grpc.aio.AioRpcError):
        await mesh.mesh.ensureLoaded(mm.EnsureLoadedRequest(modelId="no-such-model"))
    ro4 = await scrape(ports.router)
    assert ro4("modelmesh_api_request_milliseconds_count", method="getModelStatus", code="OK") == 1
    assert ro4("modelmesh_api_request_milliseconds_count", method="ensureLoaded", code="NOT_FOUND") == 1

    # State: capacity and use as the runtime accounts and publishes them; the cluster gauges.
    placed = await placements(mesh)
    assert [p.model_id for p in placed] == ["a"]
    rt = await scrape(ports.runtime)
    assert rt("modelmesh_instance_capacity_bytes") == 64 * MIB
    assert rt("mesh_device_capacity_bytes", device="ram") == 64 * MIB
    assert rt("modelmesh_instance_used_bytes") == placed[0].size_bytes > 0
    assert rt("mesh_device_used_bytes", device="ram") == placed[0].size_bytes
    assert rt("modelmesh_instance_models_total") == 1
    assert rt.has("modelmesh_instance_lru_seconds") and rt("modelmesh_instance_lru_age_seconds") >= 0
    assert rt("mesh_admission_refused_total", policy="lru") == 0
    store, prefix = open_store(mesh.registry_url)
    kvs, _ = await store.get_prefix(Registry(store, prefix).keys.instances)
    record = InstanceRecord.from_json(kvs[0].value)
    assert [(d.device, d.capacity_bytes, d.used_bytes) for d in record.devices] == \
        [("ram", 64 * MIB, placed[0].size_bytes)]
    ro = await eventually(ports.router, lambda s: s("modelmesh_models_managed_total") == preregistered)
    assert ro("modelmesh_models_loaded_total") == 1
    assert ro("modelmesh_models_with_failure_total") == 0
    assert ro("mesh_models_by_copies", copies="1") == 1
    assert ro("mesh_models_by_copies", copies="8+") == 0
    assert ro("mesh_router_instances", state="ready") == 1
    assert ro("mesh_router_instances", state="shutting_down") == 0
    # per-model labels are off by default
    assert "model_id" not in rt.label_names() | ro.label_names()
    assert not ro.has("mesh_model_copies", model_id="a")


async def test_evictions_reasons_and_the_miss_reasons(models: list[ModelArtifact], tmp_path: Path) -> None:
    # Each registration claims the whole capacity, so that loading one evicts the other.
    capacity = 16 * MIB
    ports = Ports()
    mesh = await started(ports, runtime={"capacity_bytes": capacity, "eviction_policy": "lru"})
    try:
        for model_id, model in (("a", models[0]), ("b", models[1])):
            await mesh.register(model_id, "sklearn", str(model.path), sizeHintBytes=capacity)
        capacity_evictions = {"policy": "lru", "reason": "capacity"}

        async def not_loaded(model_id: str) -> bool:
            s = await mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId=model_id))
            return s.status == ST.NOT_LOADED

        await mesh.infer("a", request_for(models[0]))
        before = await scrape(ports.runtime)
        await mesh.infer("b", request_for(models[1]))  # evicts a
        after = await eventually(ports.runtime, lambda s: s("modelmesh_unloadmodel_milliseconds_count") == 1)
        assert after("mesh_evictions_total", **capacity_evictions) - before("mesh_evictions_total",
                                                                           **capacity_evictions) == 1
        assert after("modelmesh_age_at_eviction_milliseconds_count") - \
            before("modelmesh_age_at_eviction_milliseconds_count") == 1
        assert after("mesh_cache_requests_total", result="miss", reason="cold") == 2
        assert after("modelmesh_unloadmodel_failure_total") == 0

        # a again, once the router knows it is gone: a miss on a model evicted here.
        await mesh.wait_for(lambda: not_loaded("a"))
        await mesh.infer("a", request_for(models[0]))  # evicts b
        again = await scrape(ports.runtime)
        assert again("mesh_cache_requests_total", result="miss", reason="evicted") == 1
        assert again("mesh_cache_requests_total", result="miss", reason="cold") == 2
        assert again("mesh_evictions_total", **capacity_evictions) == 2

        # Asked for a copy that is not here, and told not to load it: the router's retry case.
        async with grpc.aio.insecure_channel(mesh.runtimes[0].endpoint) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                    request_for(models[1]), metadata=((MODEL_ID, "b"), (LOAD_MODE, "deny")), timeout=10)
        routed = await scrape(ports.runtime)
        assert routed("mesh_cache_requests_total", result="miss", reason="routed_elsewhere") == 1
        assert routed("modelmesh_invoke_model_milliseconds_count", method="ModelInfer", code="UNAVAILABLE") == 1

        # Unregistering the loaded model unloads it.
        await mesh.mesh.unregisterModel(mm.UnregisterModelRequest(modelId="a"))
        gone = await eventually(ports.runtime, lambda s: s("mesh_evictions_total", policy="lru",
                                                           reason="unregistered") == 1)
        assert gone("mesh_evictions_total", **capacity_evictions) == 2
        assert gone("mesh_evictions_total", policy="lru", reason="requested") == 0
        assert gone("modelmesh_age_at_eviction_milliseconds_count") == 2  # capacity evictions only
        await eventually(ports.runtime, lambda s: s("modelmesh_unloadmodel_milliseconds_count") == 3)
    finally:
        await mesh.stop()


async def test_a_load_failure(models: list[ModelArtifact], tmp_path: Path) -> None:
    ports = Ports()
    mesh = await started(ports)
    try:
        corrupt = tmp_path / "corrupt.joblib"
        corrupt.write_bytes(b"this is not a pickle")
        await mesh.register("broken", "sklearn", str(corrupt))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.infer("broken", request_for(models[0]))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        rt = await scrape(ports.runtime)
        assert rt("modelmesh_loadmodel_failure_total") == 1
        assert rt("modelmesh_loadmodel_milliseconds_count") == 0
        assert rt("mesh_cache_requests_total", result="miss", reason="load_failed") == 1
        assert rt("mesh_cache_requests_total", result="miss", reason="cold") == 0
        assert rt("modelmesh_cache_miss_milliseconds_count") == 0  # no load served it
        assert rt("modelmesh_invoke_model_milliseconds_count", method="ModelInfer",
                  code="FAILED_PRECONDITION") == 1
        ro = await eventually(ports.router, lambda s: s("modelmesh_models_with_failure_total") == 1)
        assert ro("modelmesh_api_request_milliseconds_count", method="ModelInfer",
                  code="FAILED_PRECONDITION") == 1
        assert ro("modelmesh_models_loaded_total") == 0
    finally:
        await mesh.stop()


async def test_per_model_labels(models: list[ModelArtifact]) -> None:
    ports = Ports()
    mesh = await started(ports, runtime={"per_model_metrics": True}, router={"per_model_metrics": True})
    try:
        await mesh.register("a", "sklearn", str(models[0].path))
        await mesh.mesh.setVModel(mm.SetVModelRequest(vModelId="v", targetModelId="a"), timeout=10)
        await mesh.infer("a", request_for(models[0]))
        await mesh.infer("v", request_for(models[0]), header="mm-vmodel-id")
        rt = await scrape(ports.runtime)
        assert rt("mesh_cache_requests_total", result="miss", reason="cold", model_id="a") == 1
        assert rt("mesh_cache_requests_total", result="hit", reason="", model_id="a") == 1
        assert rt("modelmesh_loadmodel_milliseconds_count", model_id="a") == 1
        assert rt("modelmesh_invoke_model_milliseconds_count", method="ModelInfer", code="OK",
                  model_id="a") == 2
        ro = await eventually(ports.router, lambda s: s("mesh_model_copies", model_id="a") == 1)
        assert ro("modelmesh_api_request_milliseconds_count", method="ModelInfer", code="OK",
                  model_id="a", vmodel_id="") == 1
        assert ro("modelmesh_api_request_milliseconds_count", method="ModelInfer", code="OK",
                  model_id="a", vmodel_id="v") == 1
        assert ro("modelmesh_request_size_bytes_count", method="ModelInfer", model_id="a", vmodel_id="v") == 1
        assert ro("modelmesh_api_request_milliseconds_count", method="setVModel", code="OK",
                  model_id="a", vmodel_id="v") == 1
    finally:
        await mesh.stop()


async def test_copies_asked_for_and_instances(models: list[ModelArtifact]) -> None:
    ports = Ports()
    runtime_ports = [free_port(), free_port()]
    mesh = InProcessMesh(memory_url(), router_overrides={"metrics_port": ports.router,
                                                         "min_copies_check_s": 0.2})
    try:
        for port in runtime_ports:
            await mesh.add_runtime(metrics_port=port)
        await mesh.start(runtimes=0)
        await mesh.register("kept", "sklearn", str(models[0].path), minCopies=2)
        ro = await eventually(ports.router, lambda s: s("mesh_models_by_copies", copies="2") == 1,
                              timeout=20)
        assert ro("mesh_router_instances", state="ready") == 2
        # Every missing copy is asked for at least once (a round may ask again before the
        # placement reaches the view; the runtime loads it once either way).
        assert ro("mesh_copy_changes_total", change="added", reason="min_copies") >= 2
        assert ro("mesh_copy_changes_total", change="added", reason="hot") == 0
        loads = [(await scrape(p))("modelmesh_loadmodel_milliseconds_count") for p in runtime_ports]
        assert loads == [1, 1]
    finally:
        await mesh.stop()


# promtool's lint findings on names kept for ModelMesh compatibility (its dashboards query them):
# timings in milliseconds, and gauges named *_total.
COMPATIBILITY_LINT = {
    f"modelmesh_{name}_milliseconds": 'use base unit "seconds" instead of "milliseconds"'
    for name in ("api_request", "invoke_model", "cache_miss", "loadmodel", "unloadmodel", "age_at_eviction")
} | {
    f"modelmesh_{name}": 'non-counter metrics should not have "_total" suffix'
    for name in ("instance_models_total", "models_loaded_total", "models_with_failure_total",
                 "models_managed_total")
}


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed (Debian: apt-get install prometheus)")
async def test_promtool_accepts_the_exposition(models: list[ModelArtifact], tmp_path: Path) -> None:
    ports = Ports()
    mesh = await started(ports)
    try:
        corrupt = tmp_path / "corrupt.joblib"
        corrupt.write_bytes(b"this is not a pickle")
        await mesh.register("broken", "sklearn", str(corrupt))
        await mesh.register("a", "sklearn", str(models[0].path))
        with pytest.raises(grpc.aio.AioRpcError):
            await mesh.infer("broken", request_for(models[0]))
        for _ in range(2):
            await mesh.infer("a", request_for(models[0]))
        await eventually(ports.router, lambda s: s.has("modelmesh_models_managed_total"))
        for component, port in (("router", ports.router), ("runtime", ports.runtime)):
            text = (await scrape(port)).text
            result = await asyncio.to_thread(subprocess.run, ["promtool", "check", "metrics"], input=text,
                                             capture_output=True, text=True, timeout=30)
            problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
            unexpected = [line for line in problems
                          if COMPATIBILITY_LINT.get(line.split(" ", 1)[0]) != line.split(" ", 1)[-1]]
            assert unexpected == [], f"{component}: promtool reports {unexpected}\n{text}"
            assert result.returncode in (0, 3), result  # 3: lint findings only, all of them expected
    finally:
        await mesh.stop()
