"""A stand-in for GPUs, for machines without one (this one has none, nor an NVIDIA driver).

``FakeGpus`` implements the runtime's one GPU interface (``mesh.runtime.gpu.GpuReader``): devices
with a total, memory held by "other processes" (``take`` / ``give_back``), and memory this process
holds (``allocate`` / ``free``), reported per process the way NVML does. ``stand_in_load`` is a
load function that loads a "GPU" copy with the real loader *in RAM* and charges the stand-in device
its footprint plus ``overhead_bytes`` (what a real library allocates beyond the weights: a session's
workspace), freeing it when the copy closes. ``StandInGpuMemory`` says every GPU-capable type can use
these devices, where the real one asks torch and onnxruntime.

What this does not show is that CUDA, NVML and the libraries behave as assumed on real hardware:
``scripts/gpu-check`` does that on a GPU machine.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence

import numpy as np

from mesh.runtime.cache import LoadFn
from mesh.runtime.capacity import GpuMemory
from mesh.runtime.gpu import GpuInfo
from mesh.runtime.loaders import get_loader
from mesh.runtime.loaders.base import LoadedModel
from mesh.runtime.service import load_model

GIB = 1024**3
MIB = 1024**2


class FakeGpus:
    def __init__(self, totals: Sequence[int], *, context_bytes: int = 0, per_process: bool = True) -> None:
        self._lock = threading.Lock()
        self.totals = list(totals)
        self.other = [0] * len(totals)  # held by other processes
        self.ours = [context_bytes] * len(totals)  # held by this process (its CUDA context first)
        self.per_process = per_process  # False: NVML cannot attribute memory (a container)

    # GpuReader
    def devices(self) -> list[GpuInfo]:
        with self._lock:
            return [GpuInfo(i, "Stand-in GPU", total, self.other[i] + self.ours[i])
                    for i, total in enumerate(self.totals)]

    def process_used(self, index: int, pid: int) -> int | None:
        if not self.per_process or pid != os.getpid():
            return None
        with self._lock:
            return self.ours[index]

    # what the test does to the devices
    def allocate(self, index: int, size: int) -> None:
        with self._lock:
            if self.other[index] + self.ours[index] + size > self.totals[index]:
                raise RuntimeError(f"stand-in GPU {index}: out of memory")
            self.ours[index] += size

    def free(self, index: int, size: int) -> None:
        with self._lock:
            self.ours[index] -= size

    def take(self, index: int, size: int) -> None:
        """Another process allocates ``size`` bytes on the device."""
        with self._lock:
            self.other[index] += size

    def give_back(self, index: int, size: int) -> None:
        with self._lock:
            self.other[index] -= size


class StandInGpuMemory(GpuMemory):
    async def usable_types(self, types: list[str]) -> list[str]:
        if not self.reader.devices():
            return []
        return [t for t in types if get_loader(t).supports_gpu]

    def warm_thread(self, device: str, gpu_types: list[str]) -> None:
        pass  # no CUDA state to create on a stand-in


class _OnStandInGpu(LoadedModel):
    def __init__(self, inner: LoadedModel, gpus: FakeGpus, index: int, size: int, device: str) -> None:
        super().__init__(model_id=inner.model_id, type=inner.type, device=device, inputs=inner.inputs,
                         outputs=inner.outputs, default_outputs=inner.default_outputs)
        self.platform = inner.platform
        self._inner, self._gpus, self._index, self._size = inner, gpus, index, size

    def _predict(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        return self._inner.predict(inputs, names)

    def footprint_bytes(self) -> int:
        return self._inner.footprint_bytes()

    def _release(self) -> None:
        self._inner.close()
        self._gpus.free(self._index, self._size)


def stand_in_load(gpus: FakeGpus, overhead_bytes: int = 0) -> LoadFn:
    def load(spec, device):  # type: ignore[no-untyped-def]
        if not device.startswith("gpu"):
            return load_model(spec, device)
        index = int(device[3:])
        inner = load_model(spec, "ram")
        size = inner.footprint_bytes() + overhead_bytes
        gpus.allocate(index, size)
        return _OnStandInGpu(inner, gpus, index, size, device)

    return load


__all__ = ["GIB", "MIB", "FakeGpus", "StandInGpuMemory", "stand_in_load"]
