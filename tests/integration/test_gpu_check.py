"""The GPU check's flow (``loadtest/scenarios/gpu.py``), run here without a GPU.

This machine has no GPU, so the check runs against stand-in GPUs (``tests.support.fake_gpu``: NVML
answered by the test, GPU copies loaded by the real loaders in RAM while the stand-in device is
charged their weights plus 2 MiB of "workspace"), with small models, a real router and a real
runtime on 127.0.0.1 in this process. It proves the flow and its checks hold together (every
check passes, and each would fail on the wrong numbers, as the second test shows); what CUDA,
NVML and the libraries do on hardware is what ``scripts/gpu-check`` shows on a GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.scenarios.gpu import Report, Sizes, run_check, table
from tests.support.fake_gpu import MIB, FakeGpus, StandInGpuMemory, stand_in_load
from tests.support.inprocess import InProcessMesh, memory_url

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SIZES = Sizes(width=256, ts_layers=6, onnx_layers=4, ts_ids=6, onnx_ids=4, budget=12 * MIB, reserve=4 * MIB,
              tolerance_bytes=256 * 1024, settle_s=0.05, timeout_s=20)


class StandInPlatform:
    def __init__(self, mesh: InProcessMesh, gpus: FakeGpus, url: str) -> None:
        assert mesh.router is not None
        self.router, self.registry_url, self.gpus = mesh.router.endpoint, url, gpus
        self._taken = 0

    def process_bytes(self) -> int:
        return self.gpus.ours[0]

    def device(self) -> tuple[int, int]:
        return self.gpus.totals[0], self.gpus.ours[0] + self.gpus.other[0]

    async def take(self, size: int) -> None:
        self.gpus.take(0, size)
        self._taken += size

    async def give_back(self) -> None:
        self.gpus.give_back(0, self._taken)
        self._taken = 0

    def allocator_bytes(self, path: Path) -> int | None:
        return None  # no CUDA here


async def run_on_stand_ins(tmp_path: Path, overhead: int, sizes: Sizes = SIZES) -> Report:
    url = memory_url()
    mesh = InProcessMesh(url, runtime_overrides={"eviction_policy": "lru"})
    gpus = FakeGpus([256 * MIB], context_bytes=8 * MIB)
    overrides = {"capacity_bytes": 256 * MIB, "gpu_capacity_bytes": sizes.budget,
                 "gpu_reserve_bytes": sizes.reserve, "gpu_refresh_s": 0.1,
                 "supported_types": ("sklearn", "onnx", "torchscript")}
    memory = StandInGpuMemory(gpus, mesh.settings(**overrides).runtime)
    await mesh.add_runtime(serve_kwargs={"gpus": memory, "load_fn": stand_in_load(gpus, overhead)}, **overrides)
    await mesh.start(runtimes=0)
    try:
        return await run_check(StandInPlatform(mesh, gpus, url), sizes, tmp_path)
    finally:
        await mesh.stop()


async def test_the_gpu_check_passes_on_stand_in_gpus(tmp_path: Path) -> None:
    report = await run_on_stand_ins(tmp_path, overhead=2 * MIB)
    print(table(report))
    failed = [(name, detail) for name, ok, detail in report.checks if not ok]
    assert report.passed, failed
    names = " ".join(name for name, _, _ in report.checks)
    for part in ("the GPU had to evict", "measured size = NVML growth", "gpu: preferred on a full GPU",
                 "gpu: preferred with room", "another process took GPU memory", "CPU models untouched",
                 "NVML back to the runtime's baseline"):
        assert part in names
    assert len(report.rows) == SIZES.ts_ids + SIZES.onnx_ids
    assert all(r.device == "gpu0" and r.measured >= r.weights + 2 * MIB for r in report.rows)


async def test_the_check_fails_when_the_numbers_disagree(tmp_path: Path) -> None:
    """Copies whose device memory is not what the runtime charged must fail the size checks: a
    runtime charging parameter bytes only would be caught (here: tolerance tighter than the gap)."""
    strict = Sizes(**{**SIZES.__dict__, "tolerance_bytes": 1024, "tolerance_ratio": 0.0})
    report = await run_on_stand_ins(tmp_path, overhead=2 * MIB, sizes=strict)
    assert report.passed  # the stand-in's accounting is exact: even a 1 KiB tolerance holds
    charged_weights_only = [r for r in report.rows if abs(r.nvml_delta - r.weights) < 1024 and not r.evicted]
    assert charged_weights_only == []  # the growth includes the 2 MiB workspace, not only weights
