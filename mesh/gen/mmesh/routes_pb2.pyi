from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WatchRoutesRequest(_message.Message):
    __slots__ = ("modelIdPrefix", "ack")
    MODELIDPREFIX_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    modelIdPrefix: str
    ack: int
    def __init__(self, modelIdPrefix: _Optional[str] = ..., ack: _Optional[int] = ...) -> None: ...

class RouteCopy(_message.Message):
    __slots__ = ("instanceId", "endpoint")
    INSTANCEID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    instanceId: str
    endpoint: str
    def __init__(self, instanceId: _Optional[str] = ..., endpoint: _Optional[str] = ...) -> None: ...

class ModelRoutes(_message.Message):
    __slots__ = ("modelId", "copies")
    MODELID_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    modelId: str
    copies: _containers.RepeatedCompositeFieldContainer[RouteCopy]
    def __init__(self, modelId: _Optional[str] = ..., copies: _Optional[_Iterable[_Union[RouteCopy, _Mapping]]] = ...) -> None: ...

class RoutesUpdate(_message.Message):
    __slots__ = ("reset", "models", "synced", "direct", "heartbeatMs", "runtimeServerName", "runtimeTls", "sequence")
    RESET_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SYNCED_FIELD_NUMBER: _ClassVar[int]
    DIRECT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEATMS_FIELD_NUMBER: _ClassVar[int]
    RUNTIMESERVERNAME_FIELD_NUMBER: _ClassVar[int]
    RUNTIMETLS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    reset: bool
    models: _containers.RepeatedCompositeFieldContainer[ModelRoutes]
    synced: bool
    direct: bool
    heartbeatMs: int
    runtimeServerName: str
    runtimeTls: bool
    sequence: int
    def __init__(self, reset: _Optional[bool] = ..., models: _Optional[_Iterable[_Union[ModelRoutes, _Mapping]]] = ..., synced: _Optional[bool] = ..., direct: _Optional[bool] = ..., heartbeatMs: _Optional[int] = ..., runtimeServerName: _Optional[str] = ..., runtimeTls: _Optional[bool] = ..., sequence: _Optional[int] = ...) -> None: ...
