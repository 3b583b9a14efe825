"""The machine's NVIDIA GPUs and their memory, behind one small interface: :class:`GpuReader`.

Everything the runtime knows about GPUs comes through a GpuReader: the devices with their total and
used memory (``devices``), and the bytes one process holds on a device (``process_used``). The
runtime takes one at start-up (:func:`nvml_reader` in production); tests pass a stand-in, which is
how the per-device accounting is tested on machines without a GPU.

A runtime without GPUs is the common case, not an error: when NVML cannot start (no driver, no
``libnvidia-ml.so``: ``NVMLError_LibraryNotFound``) or a device cannot be queried, ``devices``
answers ``[]`` and the runtime budgets RAM only.

NVML is initialised once per process, on first use, under a lock (several loader threads may ask
at once); the outcome, success or failure, is remembered, since a missing driver does not appear
while the process runs. NVML is never shut down: its handles are process-wide and cheap to keep.

Memory figures are NVML's. ``used_bytes`` is the whole device as every process sees it (other
processes, every CUDA context). ``process_used`` is NVML's per-process accounting; it is None when
NVML cannot attribute memory to the process, which happens in a container whose PID namespace
differs from the driver's (NVML lists host PIDs): callers then fall back to device-wide figures.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    used_bytes: int  # all processes


class GpuReader(Protocol):
    """What the runtime reads about GPUs (NVML in production, a stand-in in tests)."""

    def devices(self) -> list[GpuInfo]:
        """Every GPU with its memory now; ``[]`` when there is none or it cannot be read."""

    def process_used(self, index: int, pid: int) -> int | None:
        """Bytes process ``pid`` holds on GPU ``index`` now; None when that cannot be told."""


class NoGpus:
    """A machine without GPUs (or a runtime told to ignore them)."""

    def devices(self) -> list[GpuInfo]:
        return []

    def process_used(self, index: int, pid: int) -> int | None:
        return None


class NvmlReader:
    """GPUs through NVML (``pynvml``, package nvidia-ml-py)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._tried = False

    def _init(self) -> Any:
        """pynvml after a successful ``nvmlInit()``, or None when NVML is unavailable here."""
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    import pynvml
                except ImportError:
                    return None
                try:
                    pynvml.nvmlInit()
                except pynvml.NVMLError:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
                    return None
                self._nvml = pynvml
            return self._nvml

    def devices(self) -> list[GpuInfo]:
        nvml = self._init()
        if nvml is None:
            return []
        try:
            return [self._info(nvml, i) for i in range(nvml.nvmlDeviceGetCount())]
        except nvml.NVMLError:
            return []

    def process_used(self, index: int, pid: int) -> int | None:
        nvml = self._init()
        if nvml is None:
            return None
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except nvml.NVMLError:
            return None
        used = [p.usedGpuMemory for p in processes if p.pid == pid]
        # Not listed: no context on the device, or NVML sees other PIDs than ours (a container):
        # the two cannot be told apart, so say "unknown". usedGpuMemory is None without accounting.
        if not used or any(u is None for u in used):
            return None
        return int(sum(used))

    @staticmethod
    def _info(nvml: Any, index: int) -> GpuInfo:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = nvml.nvmlDeviceGetName(handle)
        if isinstance(name, bytes):  # older nvidia-ml-py releases return bytes
            name = name.decode("utf-8", "replace")
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return GpuInfo(index=index, name=name, total_bytes=int(memory.total), used_bytes=int(memory.used))


_default: NvmlReader | None = None
_default_lock = threading.Lock()


def nvml_reader() -> NvmlReader:
    """The process's NVML reader (one, since NVML's state is process-wide)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = NvmlReader()
        return _default


def gpu_devices() -> list[GpuInfo]:
    """Every GPU NVML can see, with its memory; ``[]`` when there is none or NVML is unavailable."""
    return nvml_reader().devices()
