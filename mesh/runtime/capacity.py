"""How much memory this runtime may give to models, per device, and how much a load took.

RAM: ``capacity_bytes`` when set, else ``capacity_fraction`` of the memory limit, where the limit
is the container's cgroup limit when there is one (a pod's memory limit becomes its capacity) and
the machine's total RAM otherwise. It is fixed for the life of the process.

GPUs (:class:`GpuMemory`): each GPU the :class:`~mesh.runtime.gpu.GpuReader` reports is a budget of
its own, ``min(limit, total - gpu_reserve_bytes - outside)``, where ``limit`` is
``gpu_capacity_bytes`` (else ``gpu_capacity_fraction`` of the total) and ``outside`` is what the
device holds that is not one of our copies: other processes, our CUDA context, the activations cached
by our predictions. ``outside`` is NVML's used memory minus the bytes of our resident copies, so
nothing needs to know which process holds what. It is re-read every ``gpu_refresh_s``: when another
process takes memory, the budget shrinks and the cache evicts copies *of that GPU* until they fit;
when it gives memory back, the budget grows again. A device with a load in progress is skipped for
that round, since its half-loaded copy would be counted as outside. Changes under
``CAPACITY_STEP_BYTES`` are ignored (unless the budget no longer holds what is resident), so that the
ebb and flow of activation memory does not make the published capacity flap (or under 1% of the
device, for small ones).

A GPU copy's size is measured, not computed from its parameters: :meth:`GpuMemory.usage` is this
process's bytes on the device (NVML's per-process figure, else the device's used bytes), read
before and after the load by the cache, which runs one load at a time per GPU so that the growth
belongs to one model (``mesh.runtime.cache``, "Measured size").
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import structlog

from mesh.runtime.gpu import GpuInfo, GpuReader
from mesh.settings import RuntimeSettings

if TYPE_CHECKING:
    from mesh.runtime.cache import ModelCache

log = structlog.get_logger(__name__)

_CGROUP_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
CAPACITY_STEP_BYTES = 32 * 1024 * 1024


def memory_limit_bytes() -> int:
    total = int(psutil.virtual_memory().total)
    for path in _CGROUP_FILES:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            return int(text)
    return total


def ram_capacity(settings: RuntimeSettings) -> int:
    if settings.capacity_bytes > 0:
        return settings.capacity_bytes
    return int(memory_limit_bytes() * settings.capacity_fraction)


def gpu_capacity(info: GpuInfo, resident_bytes: int, settings: RuntimeSettings) -> int:
    """The model budget of one GPU (module docstring), given the bytes our copies hold on it."""
    limit = settings.gpu_capacity_bytes or int(info.total_bytes * settings.gpu_capacity_fraction)
    outside = max(0, info.used_bytes - resident_bytes)
    return max(0, min(limit, info.total_bytes - settings.gpu_reserve_bytes - outside))


class GpuMemory:
    """The GPUs' side of the runtime's budgets: capacities from the reader, and this process's use."""

    def __init__(self, reader: GpuReader, settings: RuntimeSettings, pid: int | None = None) -> None:
        self.reader = reader
        self.settings = settings
        self.pid = os.getpid() if pid is None else pid
        self.last: dict[str, GpuInfo] = {}  # device -> latest reading (metrics read it)

    async def usable_types(self, types: list[str]) -> list[str]:
        """Of ``types``, those this runtime can load on its GPUs (``[]``: none, or no GPU). Creates
        the CUDA context on each GPU first (``mesh.runtime.service.warm_gpus``)."""
        from mesh.runtime.service import warm_gpus  # the loaders' side; capacity stays import-light

        indices = [info.index for info in await asyncio.to_thread(self.reader.devices)]
        return await warm_gpus(types, indices)

    def warm_thread(self, device: str, gpu_types: list[str]) -> None:
        """On one of ``device``'s prediction threads, before any prediction: the per-thread state
        of the libraries (``mesh.runtime.service.warm_device_thread``)."""
        if "torchscript" in gpu_types:
            from mesh.runtime.service import warm_device_thread

            warm_device_thread(device)

    def capacities(self, resident: Mapping[str, int] | None = None) -> dict[str, int]:
        """``{"gpu0": bytes, ...}`` now, given the bytes our copies hold on each device."""
        self.last = {f"gpu{info.index}": info for info in self.reader.devices()}
        resident = resident or {}
        return {d: gpu_capacity(info, resident.get(d, 0), self.settings) for d, info in self.last.items()}

    def usage(self, device: str) -> int:
        """Bytes this process holds on ``device`` now; the device's used bytes (all processes)
        when NVML cannot attribute memory to processes here."""
        index = int(device.removeprefix("gpu"))
        own = self.reader.process_used(index, self.pid)
        if own is not None:
            return own
        return next((i.used_bytes for i in self.reader.devices() if i.index == index), 0)

    async def refresh(self, cache: ModelCache) -> None:
        """Recompute every GPU's budget and hand the changed ones to the cache."""
        budgets = cache.budgets()
        gpus = [d for d in budgets if d.startswith("gpu")]
        if not gpus:
            return
        resident = {d: cache.resident_bytes(d) for d in gpus}
        capacities = await asyncio.to_thread(self.capacities, resident)
        for device, capacity in capacities.items():
            budget = budgets.get(device)
            if budget is None or cache.loading_on(device):
                continue
            current = budget.capacity_bytes
            step = min(CAPACITY_STEP_BYTES, self.last[device].total_bytes // 100)
            if abs(capacity - current) < step and capacity >= resident[device]:
                continue
            log.info("GPU budget changed", device=device, capacity_bytes=capacity, was_bytes=current,
                     outside_bytes=max(0, self.last[device].used_bytes - resident[device]))
            await cache.set_capacity(device, capacity)

    async def follow(self, cache: ModelCache) -> None:
        """Root task: refresh the GPU budgets every ``gpu_refresh_s``."""
        while True:
            await asyncio.sleep(self.settings.gpu_refresh_s)
            await self.refresh(cache)


def device_capacities(settings: RuntimeSettings, gpus: GpuMemory) -> dict[str, int]:
    """``{"ram": bytes, "gpu0": bytes, ...}`` at start-up (nothing resident yet)."""
    return {"ram": ram_capacity(settings), **gpus.capacities()}
