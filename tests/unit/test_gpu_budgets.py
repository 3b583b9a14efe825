"""GPU memory as a placement dimension, without a GPU: the accounting driven through a stand-in of
the one GPU interface (``tests.support.fake_gpu.FakeGpus`` in place of NVML; this machine has no
GPU). The cache, its eviction policies, device choice and capacity logic are the real ones; the
loader is a stand-in whose copies take a chosen number of bytes on the device.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mesh.errors import FailedPrecondition, InvalidArgument
from mesh.registry.records import DeviceUsage, InstanceRecord, ModelSpec, gpu_tier
from mesh.router.management import Management, ModelInfoData
from mesh.runtime.cache import GPU_SLACK_BYTES, DeviceBudget, ModelCache, gpu_measured_size
from mesh.runtime.capacity import CAPACITY_STEP_BYTES, GpuMemory, gpu_capacity
from mesh.runtime.gpu import GpuInfo
from mesh.runtime.loaders.base import LoadedModel
from mesh.runtime.service import choose_device
from mesh.settings import load_settings
from placement.hashing import Candidate, choose_home
from placement.registry import make_policy
from tests.support.fake_gpu import GIB, MIB, FakeGpus


def runtime_settings(**values: object):  # type: ignore[no-untyped-def]
    return load_settings(env={}, overrides={"runtime": values}).runtime


# --- the budget of one GPU ------------------------------------------------------------------


def test_gpu_budget_is_the_limit_or_what_is_left_after_the_reserve_and_other_holders() -> None:
    settings = runtime_settings(gpu_capacity_fraction=0.9, gpu_reserve_bytes=GIB)
    empty = GpuInfo(0, "g", 80 * GIB, 0)
    assert gpu_capacity(empty, 0, settings) == int(0.9 * 80 * GIB)  # the fraction binds
    crowded = GpuInfo(0, "g", 80 * GIB, 70 * GIB)  # 70 GiB held by others
    assert gpu_capacity(crowded, 0, settings) == 9 * GIB  # 80 - 1 reserve - 70
    # Our own resident copies are not "outside": 6 of the 70 GiB are ours.
    assert gpu_capacity(crowded, 6 * GIB, settings) == 15 * GIB
    capped = runtime_settings(gpu_capacity_bytes=3 * GIB, gpu_reserve_bytes=GIB)
    assert gpu_capacity(empty, 0, capped) == 3 * GIB
    assert gpu_capacity(GpuInfo(0, "g", 4 * GIB, 4 * GIB), 0, capped) == 0  # never negative


def test_usage_is_the_process_figure_or_else_the_whole_device() -> None:
    gpus = FakeGpus([8 * GIB], context_bytes=500 * MIB)
    gpus.take(0, GIB)
    memory = GpuMemory(gpus, runtime_settings())
    assert memory.usage("gpu0") == 500 * MIB  # NVML attributes memory to this process
    gpus.per_process = False  # a container: NVML lists host PIDs
    assert memory.usage("gpu0") == 500 * MIB + GIB


# --- the cache with GPU budgets ---------------------------------------------------------------


class FakeModel(LoadedModel):
    def __init__(self, spec: ModelSpec, device: str, footprint: int, release: threading.Event) -> None:
        super().__init__(model_id=spec.model_id, type=spec.type, device=device, inputs=[], outputs=[])
        self.footprint = footprint
        self.released = release

    def _predict(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        return {}

    def footprint_bytes(self) -> int:
        return self.footprint

    def _release(self) -> None:
        self.released.set()


class GpuHarness:
    """A cache with RAM and the stand-in's GPUs; a copy takes ``device_bytes[model]`` on its GPU
    (weights ``footprint[model]``), and RAM copies take their footprint."""

    def __init__(self, gpus: FakeGpus, *, ram: int = 10 * GIB, gpu_budgets: list[int] | None = None,
                 settings: object = None, load_delay_s: float = 0.0) -> None:
        self.gpus = gpus
        self.now = 1000.0
        self.footprint: dict[str, int] = {}
        self.device_bytes: dict[str, int] = {}
        self.load_delay_s = load_delay_s
        self.overlaps: list[tuple[str, str]] = []
        self._running: dict[str, str] = {}
        self.memory = GpuMemory(gpus, settings or runtime_settings(gpu_reserve_bytes=0))  # type: ignore[arg-type]
        capacities = gpu_budgets or list(self.memory.capacities().values())
        budgets = [DeviceBudget("ram", ram, make_policy("lru"))] + [
            DeviceBudget(f"gpu{i}", c, make_policy("lru")) for i, c in enumerate(capacities)]
        self.pool = ThreadPoolExecutor(4)
        self.cache = ModelCache(
            budgets=budgets, load_fn=self.load, predict_size=lambda s, d: self.footprint.get(s.model_id, MIB),
            observe_size=lambda s, d, n: None, choose_device=choose_device, executor=self.pool,
            max_concurrent_loads=4, load_timeout_s=5, clock=lambda: self.now, rss=lambda: 0,
            gpu_usage=self.memory.usage)

    def load(self, spec: ModelSpec, device: str) -> LoadedModel:
        release = threading.Event()
        footprint = self.footprint.get(spec.model_id, MIB)
        if device == "ram":
            return FakeModel(spec, device, footprint, release)
        index = int(device[3:])
        for other, other_device in list(self._running.items()):
            if other_device == device:
                self.overlaps.append((other, spec.model_id))
        self._running[spec.model_id] = device
        try:
            size = self.device_bytes.get(spec.model_id, footprint)
            self.gpus.allocate(index, size)
            time.sleep(self.load_delay_s)
        finally:
            del self._running[spec.model_id]
        model = FakeModel(spec, device, footprint, release)
        threading.Thread(target=lambda: (release.wait(), self.gpus.free(index, size)), daemon=True).start()
        return model

    async def get(self, model_id: str, model_type: str = "torchscript", gpu: str = "required"):  # type: ignore[no-untyped-def]
        self.now += 1
        return await self.cache.acquire(ModelSpec(model_id=model_id, type=model_type, gpu=gpu))

    def on(self, device: str) -> set[str]:
        return {e.model_id for e in self.cache.entries() if e.device == device and e.state == "loaded"}


async def settle(h: GpuHarness) -> None:
    for _ in range(100):  # frees happen on the stand-in's threads once a copy is closed
        await asyncio.sleep(0.01)
        if not h.cache._unloading:
            return


async def test_a_gpu_copy_is_charged_what_the_device_grew_not_its_parameter_bytes() -> None:
    h = GpuHarness(FakeGpus([8 * GIB], context_bytes=600 * MIB))
    h.footprint["m"] = 100 * MIB
    h.device_bytes["m"] = 130 * MIB  # weights plus the library's workspace
    entry = await h.get("m")
    assert entry.device == "gpu0"
    assert entry.reserved_bytes == 130 * MIB
    assert h.cache.budgets()["gpu0"].used_bytes == 130 * MIB
    assert h.cache.budgets()["ram"].used_bytes == 0  # a GPU copy is not charged to RAM


def test_growth_is_believed_up_to_a_bound_and_never_below_the_weights() -> None:
    assert gpu_measured_size(100, 130, 90) == 130
    assert gpu_measured_size(100, 40, 90) == 100  # less than the weights: the weights
    huge = gpu_measured_size(MIB, 10 * GIB, MIB)  # another process allocating meanwhile
    assert huge == 2 * MIB + GPU_SLACK_BYTES


async def test_without_per_process_figures_the_device_growth_is_used() -> None:
    gpus = FakeGpus([8 * GIB], per_process=False)
    gpus.take(0, 2 * GIB)
    h = GpuHarness(gpus)
    h.footprint["m"], h.device_bytes["m"] = 100 * MIB, 120 * MIB
    assert (await h.get("m")).reserved_bytes == 120 * MIB


async def test_gpu_models_evict_gpu_models_only_and_ram_models_ram_models_only() -> None:
    h = GpuHarness(FakeGpus([8 * GIB]), ram=300 * MIB, gpu_budgets=[300 * MIB])
    for m in ("g1", "g2", "r1", "r2"):
        h.footprint[m] = 100 * MIB
    for m in ("g1", "g2"):
        await h.get(m)
    for m in ("r1", "r2"):
        await h.get(m, "sklearn", gpu="")
    h.footprint["g3"] = 150 * MIB
    await h.get("g3")
    await settle(h)
    assert h.on("gpu0") == {"g2", "g3"}  # g1, the least recent GPU copy, made room
    assert h.on("ram") == {"r1", "r2"}  # the RAM copies were not touched
    h.footprint["r3"] = 150 * MIB
    await h.get("r3", "sklearn", gpu="")
    await settle(h)
    assert h.on("ram") == {"r2", "r3"}
    assert h.on("gpu0") == {"g2", "g3"}


async def test_two_gpus_each_a_budget_and_the_freer_one_is_chosen() -> None:
    h = GpuHarness(FakeGpus([8 * GIB, 8 * GIB]), gpu_budgets=[400 * MIB, 300 * MIB])
    for m in ("a", "b", "c"):
        h.footprint[m] = 200 * MIB
    assert (await h.get("a")).device == "gpu0"  # 400 free against 300
    assert (await h.get("b")).device == "gpu1"  # 200 free against 300
    assert (await h.get("c")).device == "gpu0"  # 200 against 100: gpu0 again, full now
    assert h.on("gpu0") == {"a", "c"} and h.on("gpu1") == {"b"}
    assert [h.gpus.ours[0], h.gpus.ours[1]] == [400 * MIB, 200 * MIB]


async def test_a_preferred_model_takes_a_gpu_with_room_else_ram_and_evicts_nothing() -> None:
    h = GpuHarness(FakeGpus([8 * GIB]), gpu_budgets=[300 * MIB])
    for m in ("p1", "g1", "p2"):
        h.footprint[m] = 150 * MIB
    assert (await h.get("p1", gpu="preferred")).device == "gpu0"
    assert (await h.get("g1")).device == "gpu0"  # required: the GPU, now full
    assert (await h.get("p2", gpu="preferred")).device == "ram"  # no room: RAM, nothing evicted
    assert h.on("gpu0") == {"p1", "g1"}
    # A type that cannot run on a GPU runs in RAM when it merely prefers one.
    assert (await h.get("s", "sklearn", gpu="preferred")).device == "ram"


async def test_a_required_gpu_is_refused_clearly_where_it_cannot_be_had() -> None:
    h = GpuHarness(FakeGpus([8 * GIB]))
    with pytest.raises(FailedPrecondition, match="type 'sklearn' runs in RAM only"):
        await h.get("s", "sklearn")
    no_gpu = GpuHarness(FakeGpus([]))
    with pytest.raises(FailedPrecondition, match="requires a GPU and this instance has none"):
        await no_gpu.get("t")


async def test_loads_on_one_gpu_run_one_at_a_time_and_on_two_gpus_together() -> None:
    h = GpuHarness(FakeGpus([8 * GIB, 8 * GIB]), gpu_budgets=[GIB, GIB], load_delay_s=0.05)
    await asyncio.gather(*(h.get(m) for m in ("a", "b", "c", "d")))
    assert h.overlaps == []  # never two at once on one device: each growth is one model's
    assert h.on("gpu0") | h.on("gpu1") == {"a", "b", "c", "d"}


async def test_when_another_process_takes_memory_the_budget_shrinks_and_that_gpu_evicts() -> None:
    gpus = FakeGpus([4 * GIB, 4 * GIB], context_bytes=300 * MIB)
    settings = runtime_settings(gpu_reserve_bytes=512 * MIB, gpu_capacity_fraction=1.0)
    h = GpuHarness(gpus, settings=settings)
    start = h.cache.budgets()["gpu0"].capacity_bytes
    assert start == 4 * GIB - 512 * MIB - 300 * MIB  # the context is held outside the models
    for m in ("a", "b", "c", "d"):
        h.footprint[m] = 500 * MIB
        await h.get(m)
    await h.get("r", "sklearn", gpu="")
    assert h.on("gpu0") == {"a", "c"} and h.on("gpu1") == {"b", "d"}

    await h.memory.refresh(h.cache)  # nothing changed: the resident copies are not "outside"
    assert h.cache.budgets()["gpu0"].capacity_bytes == start

    gpus.take(0, 2560 * MIB)  # another process, on gpu0 only: 724 MiB left for our 1,000
    await h.memory.refresh(h.cache)
    await settle(h)
    assert h.cache.budgets()["gpu0"].capacity_bytes == start - 2560 * MIB
    assert h.on("gpu0") == {"c"}  # a (the older) went; c fits the smaller budget
    assert h.on("gpu1") == {"b", "d"} and h.on("ram") == {"r"}
    assert h.cache.budgets()["gpu1"].capacity_bytes == start

    gpus.give_back(0, 2560 * MIB)
    await h.memory.refresh(h.cache)
    assert h.cache.budgets()["gpu0"].capacity_bytes == start


async def test_small_swings_do_not_change_the_budget() -> None:
    gpus = FakeGpus([4 * GIB])
    h = GpuHarness(gpus, settings=runtime_settings(gpu_reserve_bytes=0, gpu_capacity_fraction=1.0))
    gpus.take(0, CAPACITY_STEP_BYTES // 2)  # activations cached, say
    await h.memory.refresh(h.cache)
    assert h.cache.budgets()["gpu0"].capacity_bytes == 4 * GIB


async def test_a_device_with_a_load_in_progress_keeps_its_budget_that_round() -> None:
    gpus = FakeGpus([4 * GIB])
    h = GpuHarness(gpus, settings=runtime_settings(gpu_reserve_bytes=0, gpu_capacity_fraction=1.0),
                   load_delay_s=0.3)
    h.footprint["big"] = GIB
    load = asyncio.create_task(h.get("big"))
    await asyncio.sleep(0.15)  # the copy is on the device, not yet measured
    assert h.cache.loading_on("gpu0")
    await h.memory.refresh(h.cache)
    assert h.cache.budgets()["gpu0"].capacity_bytes == 4 * GIB  # not "1 GiB held outside"
    await load


# --- placement across instances --------------------------------------------------------------


def instance(name: str, *, gpu: int = 0, ram: int = 4 * GIB, gpu_types: tuple[str, ...] = ()) -> InstanceRecord:
    devices = (DeviceUsage("ram", ram, 0),) + ((DeviceUsage("gpu0", gpu, 0),) if gpu else ())
    return InstanceRecord(instance_id=name, endpoint=f"{name}:1", devices=devices,
                          labels=("gpu",) if gpu else (), supported_types=("onnx", "sklearn", "torchscript"),
                          gpu_types=gpu_types if gpu else ())


def test_which_instances_can_serve_a_gpu_model_and_in_what_capacity() -> None:
    plain = instance("plain")
    gpu = instance("gpu", gpu=16 * GIB, gpu_types=("onnx", "torchscript"))
    older = InstanceRecord(instance_id="old", endpoint="old:1", labels=("gpu",),
                           devices=(DeviceUsage("ram", GIB, 0), DeviceUsage("gpu0", 8 * GIB, 0)))
    required = ModelSpec("r", "torchscript", gpu="required", labels=("gpu",))
    required_sklearn = ModelSpec("s", "sklearn", gpu="required", labels=("gpu",))
    preferred = ModelSpec("p", "onnx", gpu="preferred")
    assert [r.can_serve(required) for r in (plain, gpu, older)] == [False, True, True]
    assert not gpu.can_serve(required_sklearn)  # its type cannot run on that GPU
    assert plain.can_serve(preferred) and gpu.can_serve(preferred)
    assert gpu.capacity_for(required) == 16 * GIB and plain.capacity_for(required) == 0
    assert gpu.capacity_for(preferred) == 16 * GIB and plain.capacity_for(preferred) == 4 * GIB
    # A registration older than the gpu field says "required" with the label alone.
    assert ModelSpec("l", "onnx", labels=("gpu",)).gpu_mode == "required"


def test_a_model_preferring_a_gpu_is_homed_among_the_gpu_instances() -> None:
    records = [instance(f"cpu{i}") for i in range(6)] + [instance("gpuA", gpu=8 * GIB, gpu_types=("onnx",)),
                                                        instance("gpuB", gpu=8 * GIB, gpu_types=("onnx",))]
    candidates = [Candidate(r.instance_id, r.capacity_for(ModelSpec("x", "onnx")), 0.0) for r in records]
    for n in range(40):
        spec = ModelSpec(f"m{n}", "onnx", gpu="preferred")
        home = choose_home(spec.model_id, candidates, 0, prefer=gpu_tier(spec, records))
        assert home in ("gpuA", "gpuB")
        assert choose_home(spec.model_id, candidates, 0, prefer=gpu_tier(ModelSpec("y", "onnx"), records)) \
            == choose_home(spec.model_id, candidates, 0)  # no preference: plain HRW over all
    sklearn = ModelSpec("s", "sklearn", gpu="preferred")
    assert gpu_tier(sklearn, records) == set()  # no GPU can run it: every instance is a home


def test_prefer_falls_back_when_no_preferred_node_is_eligible() -> None:
    candidates = [Candidate("a", 10, 0.0), Candidate("b", 100, 0.0)]
    assert choose_home("k", candidates, 50, prefer={"a"}) == "b"  # "a" cannot fit it
    assert choose_home("k", candidates, 5, prefer={"a"}) == "a"


# --- registration -----------------------------------------------------------------------------


def spec_of(info: ModelInfoData) -> ModelSpec:
    management = Management.__new__(Management)
    management.clock = lambda: 1000.0
    management.model_roots = ()
    return management._spec("m", info, load_now=False, last_used_ms=0)


def test_registration_gpu_field_is_checked_and_says_required_one_way() -> None:
    assert spec_of(ModelInfoData("onnx", gpu="Required")).labels == ("gpu",)
    assert spec_of(ModelInfoData("onnx", gpu="required")).gpu == "required"
    assert spec_of(ModelInfoData("onnx", labels=("gpu",))).gpu == "required"  # the label alone
    preferred = spec_of(ModelInfoData("onnx", gpu="preferred"))
    assert (preferred.gpu, preferred.labels) == ("preferred", ())
    with pytest.raises(InvalidArgument, match=r"modelInfo\.gpu must be 'required', 'preferred' or empty"):
        spec_of(ModelInfoData("onnx", gpu="always"))
    assert not spec_of(ModelInfoData("onnx", gpu="preferred")).same_definition(
        spec_of(ModelInfoData("onnx", gpu="required")))
