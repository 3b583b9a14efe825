from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FleetStatusRequest(_message.Message):
    __slots__ = ("topModels", "maxFailures")
    TOPMODELS_FIELD_NUMBER: _ClassVar[int]
    MAXFAILURES_FIELD_NUMBER: _ClassVar[int]
    topModels: int
    maxFailures: int
    def __init__(self, topModels: _Optional[int] = ..., maxFailures: _Optional[int] = ...) -> None: ...

class FleetCounters(_message.Message):
    __slots__ = ("requests", "hits", "misses", "loads", "loadFailures", "evictions")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    LOADFAILURES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    requests: int
    hits: int
    misses: int
    loads: int
    loadFailures: int
    evictions: int
    def __init__(self, requests: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., loads: _Optional[int] = ..., loadFailures: _Optional[int] = ..., evictions: _Optional[int] = ...) -> None: ...

class DeviceUse(_message.Message):
    __slots__ = ("device", "capacityBytes", "usedBytes", "copies")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CAPACITYBYTES_FIELD_NUMBER: _ClassVar[int]
    USEDBYTES_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    device: str
    capacityBytes: int
    usedBytes: int
    copies: int
    def __init__(self, device: _Optional[str] = ..., capacityBytes: _Optional[int] = ..., usedBytes: _Optional[int] = ..., copies: _Optional[int] = ...) -> None: ...

class InstanceStatus(_message.Message):
    __slots__ = ("instanceId", "endpoint", "version", "zone", "labels", "startedMs", "state", "devices", "loadedCopies", "loadingCopies", "rateRps", "inflight", "total")
    INSTANCEID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STARTEDMS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    LOADEDCOPIES_FIELD_NUMBER: _ClassVar[int]
    LOADINGCOPIES_FIELD_NUMBER: _ClassVar[int]
    RATERPS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    instanceId: str
    endpoint: str
    version: str
    zone: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    startedMs: int
    state: str
    devices: _containers.RepeatedCompositeFieldContainer[DeviceUse]
    loadedCopies: int
    loadingCopies: int
    rateRps: float
    inflight: int
    total: FleetCounters
    def __init__(self, instanceId: _Optional[str] = ..., endpoint: _Optional[str] = ..., version: _Optional[str] = ..., zone: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., startedMs: _Optional[int] = ..., state: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[DeviceUse, _Mapping]]] = ..., loadedCopies: _Optional[int] = ..., loadingCopies: _Optional[int] = ..., rateRps: _Optional[float] = ..., inflight: _Optional[int] = ..., total: _Optional[_Union[FleetCounters, _Mapping]] = ...) -> None: ...

class HotModel(_message.Message):
    __slots__ = ("modelId", "rateRps", "copies", "inflight")
    MODELID_FIELD_NUMBER: _ClassVar[int]
    RATERPS_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    modelId: str
    rateRps: float
    copies: int
    inflight: int
    def __init__(self, modelId: _Optional[str] = ..., rateRps: _Optional[float] = ..., copies: _Optional[int] = ..., inflight: _Optional[int] = ...) -> None: ...

class FailureInfo(_message.Message):
    __slots__ = ("modelId", "instanceId", "reason", "timeMs", "expiresMs", "kind")
    MODELID_FIELD_NUMBER: _ClassVar[int]
    INSTANCEID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIMEMS_FIELD_NUMBER: _ClassVar[int]
    EXPIRESMS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    modelId: str
    instanceId: str
    reason: str
    timeMs: int
    expiresMs: int
    kind: str
    def __init__(self, modelId: _Optional[str] = ..., instanceId: _Optional[str] = ..., reason: _Optional[str] = ..., timeMs: _Optional[int] = ..., expiresMs: _Optional[int] = ..., kind: _Optional[str] = ...) -> None: ...

class RouterStatus(_message.Message):
    __slots__ = ("version", "startedMs", "ready", "notReady", "registryConnected", "inflight")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTEDMS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    NOTREADY_FIELD_NUMBER: _ClassVar[int]
    REGISTRYCONNECTED_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    version: str
    startedMs: int
    ready: bool
    notReady: str
    registryConnected: bool
    inflight: int
    def __init__(self, version: _Optional[str] = ..., startedMs: _Optional[int] = ..., ready: _Optional[bool] = ..., notReady: _Optional[str] = ..., registryConnected: _Optional[bool] = ..., inflight: _Optional[int] = ...) -> None: ...

class FleetStatus(_message.Message):
    __slots__ = ("router", "instances", "modelsLoaded", "copiesLoaded", "copiesLoading", "modelsFailing", "total", "window", "windowS", "hottest", "failures", "timeMs", "scoped")
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    MODELSLOADED_FIELD_NUMBER: _ClassVar[int]
    COPIESLOADED_FIELD_NUMBER: _ClassVar[int]
    COPIESLOADING_FIELD_NUMBER: _ClassVar[int]
    MODELSFAILING_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    HOTTEST_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    TIMEMS_FIELD_NUMBER: _ClassVar[int]
    SCOPED_FIELD_NUMBER: _ClassVar[int]
    router: RouterStatus
    instances: _containers.RepeatedCompositeFieldContainer[InstanceStatus]
    modelsLoaded: int
    copiesLoaded: int
    copiesLoading: int
    modelsFailing: int
    total: FleetCounters
    window: FleetCounters
    windowS: float
    hottest: _containers.RepeatedCompositeFieldContainer[HotModel]
    failures: _containers.RepeatedCompositeFieldContainer[FailureInfo]
    timeMs: int
    scoped: bool
    def __init__(self, router: _Optional[_Union[RouterStatus, _Mapping]] = ..., instances: _Optional[_Iterable[_Union[InstanceStatus, _Mapping]]] = ..., modelsLoaded: _Optional[int] = ..., copiesLoaded: _Optional[int] = ..., copiesLoading: _Optional[int] = ..., modelsFailing: _Optional[int] = ..., total: _Optional[_Union[FleetCounters, _Mapping]] = ..., window: _Optional[_Union[FleetCounters, _Mapping]] = ..., windowS: _Optional[float] = ..., hottest: _Optional[_Iterable[_Union[HotModel, _Mapping]]] = ..., failures: _Optional[_Iterable[_Union[FailureInfo, _Mapping]]] = ..., timeMs: _Optional[int] = ..., scoped: _Optional[bool] = ...) -> None: ...

class ModelCopiesRequest(_message.Message):
    __slots__ = ("modelId",)
    MODELID_FIELD_NUMBER: _ClassVar[int]
    modelId: str
    def __init__(self, modelId: _Optional[str] = ...) -> None: ...

class ModelCopy(_message.Message):
    __slots__ = ("instanceId", "endpoint", "state", "device", "sizeBytes", "stateMs", "lastUsedMs", "loadMs")
    INSTANCEID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SIZEBYTES_FIELD_NUMBER: _ClassVar[int]
    STATEMS_FIELD_NUMBER: _ClassVar[int]
    LASTUSEDMS_FIELD_NUMBER: _ClassVar[int]
    LOADMS_FIELD_NUMBER: _ClassVar[int]
    instanceId: str
    endpoint: str
    state: str
    device: str
    sizeBytes: int
    stateMs: int
    lastUsedMs: int
    loadMs: float
    def __init__(self, instanceId: _Optional[str] = ..., endpoint: _Optional[str] = ..., state: _Optional[str] = ..., device: _Optional[str] = ..., sizeBytes: _Optional[int] = ..., stateMs: _Optional[int] = ..., lastUsedMs: _Optional[int] = ..., loadMs: _Optional[float] = ...) -> None: ...

class ModelCopies(_message.Message):
    __slots__ = ("modelId", "copies", "failures", "timeMs", "lastRequestMs")
    MODELID_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    TIMEMS_FIELD_NUMBER: _ClassVar[int]
    LASTREQUESTMS_FIELD_NUMBER: _ClassVar[int]
    modelId: str
    copies: _containers.RepeatedCompositeFieldContainer[ModelCopy]
    failures: _containers.RepeatedCompositeFieldContainer[FailureInfo]
    timeMs: int
    lastRequestMs: int
    def __init__(self, modelId: _Optional[str] = ..., copies: _Optional[_Iterable[_Union[ModelCopy, _Mapping]]] = ..., failures: _Optional[_Iterable[_Union[FailureInfo, _Mapping]]] = ..., timeMs: _Optional[int] = ..., lastRequestMs: _Optional[int] = ...) -> None: ...
