"""The values stored in the registry: typed records with a compact JSON encoding.

Records are frozen dataclasses; ``to_json`` / ``from_json`` are the only (de)serialisation.
Unknown JSON fields are ignored and missing ones take their defaults, so that a newer writer and an
older reader (a rolling upgrade) get along.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


def _encode(record: Any) -> bytes:
    return json.dumps(dataclasses.asdict(record), separators=(",", ":")).encode()


def _decode(cls: type[T], raw: bytes) -> T:
    data = json.loads(raw)
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = names.get(name)
        if f is None:
            continue
        if name == "devices":
            value = tuple(DeviceUsage(**d) for d in value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A registered model (``models/<id>``): what to load and how it may be placed."""

    model_id: str
    type: str
    path: str = ""
    key: str = ""
    size_hint_bytes: int = 0
    min_copies: int = 0
    max_copies: int = 0
    labels: tuple[str, ...] = ()
    registered_ms: int = 0
    # Initial recency for caches: ModelMesh registers new models "1 h ago" (6 h without loadNow)
    # so that a burst of registrations cannot push out models that are in use.
    last_used_ms: int = 0

    def to_json(self) -> bytes:
        return _encode(self)

    @classmethod
    def from_json(cls, raw: bytes) -> ModelSpec:
        return _decode(cls, raw)

    def same_definition(self, other: ModelSpec) -> bool:
        """Whether two registrations describe the same model (re-registering is then a no-op)."""
        return (self.type, self.path, self.key, self.size_hint_bytes, self.min_copies,
                self.max_copies, tuple(self.labels)) == (
            other.type, other.path, other.key, other.size_hint_bytes, other.min_copies,
            other.max_copies, tuple(other.labels))


@dataclass(frozen=True, slots=True)
class VModelRecord:
    """A vModel alias (``vmodels/<id>``): requests go to ``active``; ``target`` is being loaded."""

    vmodel_id: str
    active_model_id: str
    target_model_id: str
    owner: str = ""
    auto_delete: bool = False  # delete the target model when no vModel refers to it any more
    failed: bool = False  # the target failed to load: the transition is blocked
    updated_ms: int = 0

    def to_json(self) -> bytes:
        return _encode(self)

    @classmethod
    def from_json(cls, raw: bytes) -> VModelRecord:
        return _decode(cls, raw)


@dataclass(frozen=True, slots=True)
class DeviceUsage:
    """Capacity and use of one memory device of an instance: ``ram`` or ``gpu<N>``."""

    device: str
    capacity_bytes: int
    used_bytes: int


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """A runtime instance (``instances/<iid>``), bound to the instance's lease."""

    instance_id: str
    endpoint: str  # host:port of its gRPC server (V2 data plane + ModelRuntime SPI)
    devices: tuple[DeviceUsage, ...] = ()
    model_count: int = 0
    loading_count: int = 0
    lru_time_ms: int = 0  # last use of its least recently used model (0 = empty cache)
    rate_rps: float = 0.0  # requests per second served, recent average
    labels: tuple[str, ...] = ()
    zone: str = ""
    supported_types: tuple[str, ...] = ()
    version: str = ""
    shutting_down: bool = False
    started_ms: int = 0
    # Cache counters since the instance started (for dashboards and `mesh demo`).
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0

    def to_json(self) -> bytes:
        return _encode(self)

    @classmethod
    def from_json(cls, raw: bytes) -> InstanceRecord:
        return _decode(cls, raw)

    def device(self, name: str) -> DeviceUsage | None:
        for d in self.devices:
            if d.device == name:
                return d
        return None

    def can_serve(self, spec: ModelSpec) -> bool:
        """Supports the model's type and carries every label it requires (routing's rule, and
        re-homing's: both must pick the same home)."""
        return ((not self.supported_types or spec.type.lower() in self.supported_types)
                and set(spec.labels).issubset(self.labels))

    def capacity_for(self, spec: ModelSpec) -> int:
        """The capacity the model would be placed in: the largest GPU's for models labelled
        ``gpu``, else RAM's."""
        if "gpu" in spec.labels:
            return max((d.capacity_bytes for d in self.devices if d.device.startswith("gpu")), default=0)
        ram = self.device("ram")
        return ram.capacity_bytes if ram else 0


LOADING = "loading"
LOADED = "loaded"
FAILED = "failed"


@dataclass(frozen=True, slots=True)
class PlacementRecord:
    """One copy of a model on one instance (``placements/<model>/<iid>``), on the instance's lease."""

    model_id: str
    instance_id: str
    state: str  # LOADING, LOADED or FAILED
    size_bytes: int = 0
    device: str = "ram"
    loaded_ms: int = 0  # when the state last changed
    last_used_ms: int = 0
    load_ms: float = 0.0  # how long the loader took (LOADED only)

    def to_json(self) -> bytes:
        return _encode(self)

    @classmethod
    def from_json(cls, raw: bytes) -> PlacementRecord:
        return _decode(cls, raw)


@dataclass(frozen=True, slots=True)
class FailureRecord:
    """A failed load (``failures/<model>/<iid>``), on a short lease so that it expires by itself."""

    model_id: str
    instance_id: str
    reason: str
    time_ms: int = 0

    def to_json(self) -> bytes:
        return _encode(self)

    @classmethod
    def from_json(cls, raw: bytes) -> FailureRecord:
        return _decode(cls, raw)


__all__ = [
    "FAILED",
    "LOADED",
    "LOADING",
    "DeviceUsage",
    "FailureRecord",
    "InstanceRecord",
    "ModelSpec",
    "PlacementRecord",
    "VModelRecord",
]
