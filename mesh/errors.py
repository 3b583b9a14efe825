"""One error hierarchy for the whole mesh.

Every error the mesh raises on purpose is a :class:`MeshError` carrying a transport-neutral
:class:`Code`. The transport layer (``mesh/transport/status.py``) maps codes to gRPC status
codes in exactly one place; anything that is not a ``MeshError`` becomes INTERNAL there and is
logged with its traceback. Messages are written for the caller: they name the model or field and
say what is wrong.
"""

from __future__ import annotations

import enum


class Code(enum.Enum):
    """Error kinds, named after the gRPC status codes they map to."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"


class MeshError(Exception):
    """Base of every deliberate error; ``code`` decides the status the caller sees."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(MeshError):
    code = Code.INVALID_ARGUMENT


class ModelNotFound(MeshError):
    code = Code.NOT_FOUND

    def __init__(self, model_id: str, what: str = "model") -> None:
        super().__init__(f"{what} {model_id!r} not found")
        self.model_id = model_id


class AlreadyExists(MeshError):
    code = Code.ALREADY_EXISTS


class Unauthenticated(MeshError):
    """No bearer token, or one that is not in the tokens file (the message never repeats it)."""

    code = Code.UNAUTHENTICATED


class PermissionDenied(MeshError):
    """A known token asked for something its role or its model-ID prefixes do not allow."""

    code = Code.PERMISSION_DENIED


class FailedPrecondition(MeshError):
    code = Code.FAILED_PRECONDITION


class BadRecord(FailedPrecondition):
    """A registry value that does not decode as the record its key says (written by hand, by a
    buggy or hostile writer): skipped by watches, an error for the request that needs it."""


class ResourceExhausted(MeshError):
    code = Code.RESOURCE_EXHAUSTED


class Unavailable(MeshError):
    code = Code.UNAVAILABLE


class RegistryUnavailable(Unavailable):
    """The registry (etcd) cannot be reached; management calls fail fast with this."""


class DeadlineExceeded(MeshError):
    code = Code.DEADLINE_EXCEEDED


class ModelLoadError(MeshError):
    """A loader failed; the message is the loader's reason and lands in the model's status."""

    code = Code.FAILED_PRECONDITION


class NotHere(MeshError):
    """A runtime was asked for a copy it does not hold (evicted meanwhile) and may not load it.

    The router treats this as "exclude the instance and retry elsewhere"; clients never see it
    unless every retry fails.
    """

    code = Code.UNAVAILABLE
