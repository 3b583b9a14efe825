"""The machine's NVIDIA GPUs and their memory, through NVML (``pynvml``, package nvidia-ml-py).

A runtime without GPUs is the common case, not an error: when NVML cannot start (no driver, no
``libnvidia-ml.so``: ``NVMLError_LibraryNotFound``) or a device cannot be queried,
:func:`gpu_devices` answers ``[]`` and the runtime budgets RAM only.

NVML is initialised once per process, on first use, under a lock (several loader threads may ask
at once); the outcome, success or failure, is remembered, since a missing driver does not appear
while the process runs. NVML is never shut down: its handles are process-wide and cheap to keep.

Memory figures are NVML's, i.e. the whole device as every process sees it: ``used_bytes`` includes
other processes and the CUDA context. That is what decides whether a model still fits.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from mesh.errors import MeshError


@dataclass(frozen=True, slots=True)
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    used_bytes: int


_lock = threading.Lock()
_nvml: Any = None  # the pynvml module once initialised
_tried = False


def _init() -> Any:
    """pynvml after a successful ``nvmlInit()``, or None when NVML is unavailable here."""
    global _nvml, _tried
    with _lock:
        if not _tried:
            _tried = True
            try:
                import pynvml
            except ImportError:
                return None
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
                return None
            _nvml = pynvml
        return _nvml


def gpu_devices() -> list[GpuInfo]:
    """Every GPU NVML can see, with its memory; ``[]`` when there is none or NVML is unavailable."""
    nvml = _init()
    if nvml is None:
        return []
    try:
        count = nvml.nvmlDeviceGetCount()
        return [_info(nvml, i) for i in range(count)]
    except nvml.NVMLError:
        return []


def gpu_used_bytes(index: int) -> int:
    """Bytes in use on GPU ``index`` now (all processes); MeshError when it cannot be read."""
    nvml = _init()
    if nvml is None:
        raise MeshError(f"cannot read GPU {index}: NVML is not available on this machine")
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        return int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
    except nvml.NVMLError as exc:
        raise MeshError(f"cannot read GPU {index}: {exc}") from exc


def _info(nvml: Any, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = nvml.nvmlDeviceGetName(handle)
    if isinstance(name, bytes):  # older nvidia-ml-py releases return bytes
        name = name.decode("utf-8", "replace")
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    return GpuInfo(index=index, name=name, total_bytes=int(memory.total), used_bytes=int(memory.used))
