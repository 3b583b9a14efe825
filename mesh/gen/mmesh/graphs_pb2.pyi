from mesh.gen.mmesh import model_mesh_pb2 as _model_mesh_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SetGraphRequest(_message.Message):
    __slots__ = ("graphId", "specJson", "owner")
    GRAPHID_FIELD_NUMBER: _ClassVar[int]
    SPECJSON_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    graphId: str
    specJson: str
    owner: str
    def __init__(self, graphId: _Optional[str] = ..., specJson: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class GetGraphStatusRequest(_message.Message):
    __slots__ = ("graphId",)
    GRAPHID_FIELD_NUMBER: _ClassVar[int]
    graphId: str
    def __init__(self, graphId: _Optional[str] = ...) -> None: ...

class GraphStatusInfo(_message.Message):
    __slots__ = ("status", "specJson", "models", "owner", "updatedMs")
    class GraphStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        NOT_FOUND: _ClassVar[GraphStatusInfo.GraphStatus]
        DEFINED: _ClassVar[GraphStatusInfo.GraphStatus]
        READY: _ClassVar[GraphStatusInfo.GraphStatus]
        SHADOWED: _ClassVar[GraphStatusInfo.GraphStatus]
    NOT_FOUND: GraphStatusInfo.GraphStatus
    DEFINED: GraphStatusInfo.GraphStatus
    READY: GraphStatusInfo.GraphStatus
    SHADOWED: GraphStatusInfo.GraphStatus
    class ModelEntry(_message.Message):
        __slots__ = ("modelId", "isVModel", "activeModelId", "status")
        MODELID_FIELD_NUMBER: _ClassVar[int]
        ISVMODEL_FIELD_NUMBER: _ClassVar[int]
        ACTIVEMODELID_FIELD_NUMBER: _ClassVar[int]
        STATUS_FIELD_NUMBER: _ClassVar[int]
        modelId: str
        isVModel: bool
        activeModelId: str
        status: _model_mesh_pb2.ModelStatusInfo.ModelStatus
        def __init__(self, modelId: _Optional[str] = ..., isVModel: _Optional[bool] = ..., activeModelId: _Optional[str] = ..., status: _Optional[_Union[_model_mesh_pb2.ModelStatusInfo.ModelStatus, str]] = ...) -> None: ...
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SPECJSON_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    UPDATEDMS_FIELD_NUMBER: _ClassVar[int]
    status: GraphStatusInfo.GraphStatus
    specJson: str
    models: _containers.RepeatedCompositeFieldContainer[GraphStatusInfo.ModelEntry]
    owner: str
    updatedMs: int
    def __init__(self, status: _Optional[_Union[GraphStatusInfo.GraphStatus, str]] = ..., specJson: _Optional[str] = ..., models: _Optional[_Iterable[_Union[GraphStatusInfo.ModelEntry, _Mapping]]] = ..., owner: _Optional[str] = ..., updatedMs: _Optional[int] = ...) -> None: ...

class DeleteGraphRequest(_message.Message):
    __slots__ = ("graphId", "owner")
    GRAPHID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    graphId: str
    owner: str
    def __init__(self, graphId: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class DeleteGraphResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListGraphsRequest(_message.Message):
    __slots__ = ("prefix", "pageSize", "pageToken")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    PAGESIZE_FIELD_NUMBER: _ClassVar[int]
    PAGETOKEN_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    pageSize: int
    pageToken: str
    def __init__(self, prefix: _Optional[str] = ..., pageSize: _Optional[int] = ..., pageToken: _Optional[str] = ...) -> None: ...

class ListGraphsResponse(_message.Message):
    __slots__ = ("graphs", "nextPageToken")
    class Entry(_message.Message):
        __slots__ = ("graphId", "nodes", "models", "updatedMs")
        GRAPHID_FIELD_NUMBER: _ClassVar[int]
        NODES_FIELD_NUMBER: _ClassVar[int]
        MODELS_FIELD_NUMBER: _ClassVar[int]
        UPDATEDMS_FIELD_NUMBER: _ClassVar[int]
        graphId: str
        nodes: int
        models: _containers.RepeatedScalarFieldContainer[str]
        updatedMs: int
        def __init__(self, graphId: _Optional[str] = ..., nodes: _Optional[int] = ..., models: _Optional[_Iterable[str]] = ..., updatedMs: _Optional[int] = ...) -> None: ...
    GRAPHS_FIELD_NUMBER: _ClassVar[int]
    NEXTPAGETOKEN_FIELD_NUMBER: _ClassVar[int]
    graphs: _containers.RepeatedCompositeFieldContainer[ListGraphsResponse.Entry]
    nextPageToken: str
    def __init__(self, graphs: _Optional[_Iterable[_Union[ListGraphsResponse.Entry, _Mapping]]] = ..., nextPageToken: _Optional[str] = ...) -> None: ...
