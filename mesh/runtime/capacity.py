"""How much memory this runtime may give to models, per device.

RAM: ``capacity_bytes`` when set, else ``capacity_fraction`` of the memory limit, where the limit
is the container's cgroup limit when there is one (a pod's memory limit becomes its capacity) and
the machine's total RAM otherwise. GPUs: each GPU that pynvml reports, ``gpu_capacity_fraction``
of its memory; no GPU (or no NVIDIA driver) simply means RAM only.
"""

from __future__ import annotations

from pathlib import Path

import psutil

from mesh.runtime.gpu import gpu_devices
from mesh.settings import RuntimeSettings

_CGROUP_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


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


def device_capacities(settings: RuntimeSettings) -> dict[str, int]:
    """``{"ram": bytes, "gpu0": bytes, ...}``"""
    capacities = {"ram": ram_capacity(settings)}
    for gpu in gpu_devices():
        capacities[f"gpu{gpu.index}"] = int(gpu.total_bytes * settings.gpu_capacity_fraction)
    return capacities
