"""The values stored in the registry: typed records with a compact JSON encoding.

Records are frozen dataclasses; ``to_json`` / ``from_json`` are the only (de)serialisation.
Unknown JSON fields are ignored and missing ones take their defaults, so that a newer writer and an
older reader (a rolling upgrade) get along.

Decoding checks every known field's type (str, int, float, bool, tuples of str or of DeviceUsage):
a value that is not a JSON object of such fields raises :class:`~mesh.errors.BadRecord`, and is
counted (:func:`bad_records`). Anyone who can write etcd can write anything there; a bad value
must cost the one model or instance it describes, never a process (the watches skip it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import orjson

from mesh.errors import BadRecord

T = TypeVar("T")

GPU_LABEL = "gpu"  # carried by instances with a GPU, required by models with gpu "required"
GPU_REQUIRED = "required"
GPU_PREFERRED = "preferred"
GPU_MODES = ("", GPU_REQUIRED, GPU_PREFERRED)


def _encode(record: Any) -> bytes:
    return json.dumps(dataclasses.asdict(record), separators=(",", ":")).encode()


_bad_records = 0


def bad_records() -> int:
    """Registry values this process could not decode since it started (a metric)."""
    return _bad_records


def _field_value(cls: type, name: str, declared: str, value: Any) -> Any:
    ok: bool
    if declared == "str":
        ok = isinstance(value, str)
    elif declared == "bool":
        ok = isinstance(value, bool)
    elif declared == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif declared == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif declared == "tuple[str, ...]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    elif declared == "dict[str, Any]":  # a JSON object kept as it is (a graph's KServe spec)
        ok = isinstance(value, dict)
    elif declared == "tuple[DeviceUsage, ...]":
        ok = isinstance(value, list) and all(isinstance(v, dict) for v in value)
        value = tuple(_decode_fields(DeviceUsage, v) for v in value) if ok else value
    elif declared == "tuple[SplitTarget, ...]":
        ok = isinstance(value, list) and all(isinstance(v, dict) for v in value)
        value = tuple(_decode_fields(SplitTarget, v) for v in value) if ok else value
    else:  # a field type this decoder does not know: a programming error, caught by the tests
        raise TypeError(f"{cls.__name__}.{name}: undecodable field type {declared}")
    if not ok:
        raise BadRecord(f"{cls.__name__} field {name!r} should be {declared}, not {type(value).__name__}")
    return value


@functools.cache
def _field_types(cls: type) -> dict[str, str]:
    """A record class's fields and their declared types, read once per class: a router decodes
    every placement at start (10,000 and more), and ``dataclasses.fields`` each time cost a third."""
    return {f.name: str(f.type) for f in dataclasses.fields(cls)}


def _decode_fields(cls: type[T], data: Any) -> T:
    if not isinstance(data, dict):
        raise BadRecord(f"{cls.__name__} should be a JSON object, not {type(data).__name__}")
    fields = _field_types(cast(type, cls))  # a class is hashable; mypy cannot tell of a type[T]
    kwargs = {name: _field_value(cls, name, fields[name], value) for name, value in data.items() if name in fields}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise BadRecord(f"{cls.__name__}: {exc}") from None


def _decode(cls: type[T], raw: bytes) -> T:
    global _bad_records
    try:
        record = _decode_fields(cls, orjson.loads(raw))  # 2-3x json's speed; its errors are ValueErrors
        if isinstance(record, VModelRecord) and (record.split or record.sticky_header):
            _check_split(record)
        return record
    except (ValueError, RecursionError, BadRecord) as exc:  # JSONDecodeError and UnicodeDecodeError too
        _bad_records += 1
        if isinstance(exc, BadRecord):
            raise
        raise BadRecord(f"{cls.__name__} is not valid JSON: {str(exc)[:200]}") from None


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
    # GPU: "" (RAM), "required" (only on a GPU; also carries the ``gpu`` label) or "preferred"
    # (a GPU with room, else RAM). Registrations written before this field say "required" with
    # the ``gpu`` label alone.
    gpu: str = ""

    def to_json(self) -> bytes:
        # What _encode writes, without dataclasses.asdict's deep copy: every field is flat (a
        # registration is encoded once per registerModel, on the router's event loop).
        return json.dumps({name: getattr(self, name) for name in _SPEC_FIELDS}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ModelSpec:
        return _decode(cls, raw)

    @property
    def gpu_mode(self) -> str:
        """"", "required" or "preferred" (see ``gpu``)."""
        return self.gpu or (GPU_REQUIRED if GPU_LABEL in self.labels else "")

    def same_definition(self, other: ModelSpec) -> bool:
        """Whether two registrations describe the same model (re-registering is then a no-op)."""
        return (self.type, self.path, self.key, self.size_hint_bytes, self.min_copies,
                self.max_copies, tuple(self.labels), self.gpu_mode) == (
            other.type, other.path, other.key, other.size_hint_bytes, other.min_copies,
            other.max_copies, tuple(other.labels), other.gpu_mode)


_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(ModelSpec))


@dataclass(frozen=True, slots=True)
class VModelRecord:
    """A vModel alias (``vmodels/<id>``): requests go to ``active``; ``target`` is being loaded."""

    vmodel_id: str
    active_model_id: str
    target_model_id: str
    owner: str = ""
    # Deleted when no vModel refers to them any more: the models an auto-deleting setVModel of this
    # vModel created itself (never one it found registered). ``auto_delete`` says the vModel was
    # made that way; records older than ``created_models`` auto-delete nothing.
    auto_delete: bool = False
    created_models: tuple[str, ...] = ()
    owner_token: str = ""  # with auth on: the token that created it (only it, or an unscoped token, may change it)
    failed: bool = False  # the target failed to load: the transition is blocked
    updated_ms: int = 0
    # Traffic split (canary): requests are shared among these targets by weight (integers summing
    # to 100) instead of all going to ``active``; ``active`` stays the stable model, which takes the
    # share of a target whose load failed (``mesh.router.split``). Empty: no split, as before.
    split: tuple[SplitTarget, ...] = ()
    # A request header (lower-case) whose value is hashed onto the weights, so that one client
    # stays on one target across requests, routers and restarts; "" = a random draw per request.
    sticky_header: str = ""

    def to_json(self) -> bytes:
        return _encode(self)

    @classmethod
    def from_json(cls, raw: bytes) -> VModelRecord:
        return _decode(cls, raw)

    def models(self) -> set[str]:
        """Every model the vModel refers to (its refs in the registry): active, target, split."""
        return {self.active_model_id, self.target_model_id, *(t.model_id for t in self.split)}


# --- traffic splits (canaries) -----------------------------------------------------------------------
# What a stored split may be; ``mesh.router.split.check_split`` refuses the same at write time, with
# the place named for the caller. Checked again on decoding, because anyone who can write etcd can
# write anything there: a split of negative weights, or of 5000 targets, is skipped as the whole
# record (as any undecodable record), never routed by.
MAX_SPLIT_TARGETS = 8
TOTAL_WEIGHT = 100
MAX_STICKY_HEADER_CHARS = 64
_STICKY_HEADER = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def _check_split(record: VModelRecord) -> None:
    """BadRecord unless ``record``'s split and sticky header are ones a write could have stored."""
    split, where = record.split, f"VModelRecord {record.vmodel_id[:100]!r}"
    if len(split) > MAX_SPLIT_TARGETS:
        raise BadRecord(f"{where}: a split of {len(split)} targets (at most {MAX_SPLIT_TARGETS})")
    if split:
        if any(not t.model_id or not 0 <= t.weight <= TOTAL_WEIGHT for t in split):
            raise BadRecord(f"{where}: a split target with no model ID or a weight outside 0 to {TOTAL_WEIGHT}")
        if len({t.model_id for t in split}) != len(split):
            raise BadRecord(f"{where}: a split naming one model twice")
        if sum(t.weight for t in split) != TOTAL_WEIGHT:
            raise BadRecord(f"{where}: split weights that do not sum to {TOTAL_WEIGHT}")
    header = record.sticky_header
    if header and (len(header) > MAX_STICKY_HEADER_CHARS or not _STICKY_HEADER.match(header)):
        raise BadRecord(f"{where}: sticky header {header[:80]!r} is not a lower-case header name")
# --- end traffic splits -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SplitTarget:
    """One target of a vModel's traffic split and its weight (percent of the requests)."""

    model_id: str
    weight: int


@dataclass(frozen=True, slots=True)
class GraphRecord:
    """An inference graph (``graphs/<id>``): KServe's InferenceGraph ``spec`` as written (checked by
    ``mesh.graphs.spec.parse_graph`` before it is stored, and parsed again by each router's view
    once per change). The record is immutable like the others; ``spec`` is a plain JSON object."""

    graph_id: str
    spec: dict[str, Any]
    owner: str = ""
    owner_token: str = ""  # with auth on: the token that defined it (module mesh.router.graph_management)
    updated_ms: int = 0

    def to_json(self) -> bytes:
        return _encode(self)

    @classmethod
    def from_json(cls, raw: bytes) -> GraphRecord:
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
    gpu_types: tuple[str, ...] = ()  # the supported types it can load on its GPUs (none: no GPU)
    version: str = ""
    shutting_down: bool = False
    accepts_loads: bool = True  # False: its loads are stuck (it serves what it holds, loads nothing)
    started_ms: int = 0
    # The client-facing port for smart clients (runtime.direct_port; docs/client.md): host:port, and
    # whether it speaks TLS. Empty (records of older runtimes, or the port off): no direct routing here.
    direct_endpoint: str = ""
    direct_tls: bool = False
    # Counters since the instance started, for `mesh status` / `mesh top` (rates from two readings)
    # and `mesh demo`; each equals a runtime metric: ``requests`` the inferences that arrived
    # (modelmesh_invoke_model_milliseconds' count), ``hits`` / ``misses`` those whose model was /
    # was not loaded at their arrival (mesh_cache_requests_total; records of older runtimes count a
    # load joined by several requests as one miss), ``loads`` / ``load_failures`` the loads done /
    # failed (modelmesh_loadmodel_milliseconds' count / modelmesh_loadmodel_failure), ``evictions``
    # the copies removed for room (mesh_evictions_total{reason="capacity"}).
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    requests: int = 0
    load_failures: int = 0

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
        """Supports the model's type, carries every label it requires, and for a model that
        requires a GPU, can load its type on one (routing's rule, and re-homing's: both must pick
        the same home). Records of runtimes older than ``gpu_types`` say it with the label alone."""
        model_type = spec.type.lower()
        return ((not self.supported_types or model_type in self.supported_types)
                and set(spec.labels).issubset(self.labels)
                and (spec.gpu_mode != GPU_REQUIRED or not self.gpu_types or model_type in self.gpu_types))

    def gpu_capacity(self) -> int:
        """The largest GPU budget of the instance (0 without a GPU)."""
        return max((d.capacity_bytes for d in self.devices if d.device.startswith("gpu")), default=0)

    def gpu_for(self, spec: ModelSpec) -> bool:
        """Whether the model would run on a GPU here: it asks for one and the instance can load
        its type on one."""
        return bool(spec.gpu_mode) and spec.type.lower() in self.gpu_types and self.gpu_capacity() > 0

    def capacity_for(self, spec: ModelSpec) -> int:
        """The capacity the model would be placed in: the largest GPU's for a model that requires
        one; for one that prefers one, the larger of that and RAM's; else RAM's."""
        ram = self.device("ram")
        ram_bytes = ram.capacity_bytes if ram else 0
        if spec.gpu_mode == GPU_REQUIRED:
            return self.gpu_capacity()
        if self.gpu_for(spec):  # preferred, and possible here
            return max(ram_bytes, self.gpu_capacity())
        return ram_bytes


def gpu_tier(spec: ModelSpec, instances: Iterable[InstanceRecord]) -> set[str]:
    """The instances a model that prefers a GPU is homed among first: those that can run it on
    one (their runtime still falls back to RAM when the GPU has no room). Empty for other models.
    Routing and re-homing both use it, so that they pick the same home."""
    if spec.gpu_mode != GPU_PREFERRED:
        return set()
    return {r.instance_id for r in instances if r.gpu_for(spec)}


LOADING = "loading"
LOADED = "loaded"
FAILED = "failed"
CRASH = "crash"  # FailureRecord.kind: the instance died while loading the model


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
    """A failed load (``failures/<model>/<iid>``), on a short lease so that it expires by itself.

    ``kind`` CRASH: the instance died while loading the model. That quarantines the model on every
    instance (``quarantine``): on the lease of ``registry.crash_quarantine_s`` when a caller saw the
    death, with no lease (until the model is unregistered) when the restarted instance found that
    the loader itself raised a fatal signal (``mesh.runtime.journal``)."""

    model_id: str
    instance_id: str
    reason: str
    time_ms: int = 0
    kind: str = ""  # "" (the loader raised; this instance only) or CRASH

    def to_json(self) -> bytes:
        return _encode(self)

    @classmethod
    def from_json(cls, raw: bytes) -> FailureRecord:
        return _decode(cls, raw)


def quarantine(failures: Mapping[str, FailureRecord]) -> FailureRecord | None:
    """The crash record among a model's failure records, if any: no instance may load it."""
    return next((f for f in failures.values() if f.kind == CRASH), None)


__all__ = [
    "CRASH",
    "FAILED",
    "GPU_LABEL",
    "GPU_MODES",
    "GPU_PREFERRED",
    "GPU_REQUIRED",
    "LOADED",
    "LOADING",
    "DeviceUsage",
    "FailureRecord",
    "GraphRecord",
    "InstanceRecord",
    "ModelSpec",
    "PlacementRecord",
    "SplitTarget",
    "VModelRecord",
    "gpu_tier",
    "quarantine",
]
