"""One error hierarchy for the whole mesh.

Every error the mesh raises on purpose is a :class:`MeshError` carrying a transport-neutral
:class:`Code`. Each front end maps codes in exactly one place: gRPC status codes in
``mesh/transport/status.py``, HTTP statuses in ``mesh/rest/status.py``; anything that is not a
``MeshError`` becomes INTERNAL (HTTP 500) there and is logged with its traceback. Messages are
written for the caller: they name the model or field and say what is wrong.
"""

from __future__ import annotations

import enum


class Code(enum.Enum):
    """Error kinds: the canonical status codes (google.rpc.Code, which gRPC uses), by name.

    All of them, because a runtime or an external model server may answer any of them and the
    router passes its answer on under the same code, over gRPC or HTTP."""

    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"
    ABORTED = "ABORTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    DATA_LOSS = "DATA_LOSS"
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


# The canonical codes' numbers (google.rpc.Code), by name, OK included: span attributes carry them.
CODE_NUMBERS = {"OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
                "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
                "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
                "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16}


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

    def __init__(self, model_id: str, what: str = "model", hint: str = "") -> None:
        super().__init__(f"{what} {model_id!r} not found" + (f": {hint}" if hint else ""))
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


class RegistryFull(ResourceExhausted):
    """The registry refuses writes for want of space (etcd's NOSPACE alarm: its database reached
    ``--quota-backend-bytes``). Reads, watches, deletes and lease keep-alives still work, so
    inference on loaded and registered models goes on; registrations and every other write fail
    with this until an operator compacts, defragments and disarms the alarm (docs/operations.md).
    Its message begins with ``CAUSE``, by which a client (the controller) tells it from the other
    RESOURCE_EXHAUSTED answers: it is retried, not reported as the model's failure."""

    CAUSE = "etcd database space exceeded"


class Unavailable(MeshError):
    code = Code.UNAVAILABLE


class RegistryUnavailable(Unavailable):
    """The registry (etcd) cannot be reached; management calls fail fast with this. Its message
    names etcd's endpoints and the store's errors: for the log; clients get ``PUBLIC_MESSAGE``."""

    PUBLIC_MESSAGE = ("the registry is unavailable; calls that need it fail until it is back (the "
                      "component's log has the details)")


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


class RemoteError(MeshError):
    """The answer of a runtime (or of the connection to it) for one request, passed to the client
    with its code and message as they are: the model's own error, or the last failure once the
    router's retries ran out."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code


class RetryElsewhere(MeshError):
    """One instance cannot serve this request: it is ``gone`` (no answer at the connection level),
    or its copy is not there (evicted meanwhile). The router excludes it and chooses again; the
    client gets ``error`` only when no other instance can serve."""

    code = Code.UNAVAILABLE

    def __init__(self, error: RemoteError, *, gone: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.gone = gone
