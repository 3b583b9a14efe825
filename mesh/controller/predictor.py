"""Predictor custom resources -> mesh registrations, and mesh state -> Predictor status. No I/O.

A ``Predictor`` (``serving.kserve.io/v1alpha1``, the CRD of KServe modelmesh-serving) names a model
and where it is stored; the controller turns it into one vModel whose target is one concrete model,
exactly as modelmesh-serving's controller does:

- **vModel ID** = the Predictor's name, so clients keep sending ``mm-vmodel-id: <name>`` (or
  ``model_name``) as they did with modelmesh-serving. The mesh has one vModel name space, while
  Predictor names are unique only within a namespace; the vModel's owner is therefore
  ``<owner>/<namespace>``, and a second Predictor with the same name in another namespace is refused
  by the mesh (ALREADY_EXISTS) and reported in *its* status (``InvalidPredictorSpec``) instead of
  taking over the first one's name. Deployments watch one namespace (``controller.namespace``), as
  modelmesh-serving runs one mesh per namespace.
- **Concrete model ID** = ``<name>__<hash>``, the hash being the first 10 hex digits of the SHA-256
  of the canonical JSON of the namespace and the spec fields that define the model (model type,
  runtime, paths, storage, gpu, protocol version), plus what the mapping adds beyond the spec (see
  *Storage*). A concrete model is immutable: a spec change is a
  new model ID, the vModel moves to it once it has loaded (the old one keeps serving meanwhile) and
  the old model is deleted by the mesh (``autoDeleteTargetModel``). Kubernetes names cannot contain
  ``_``, so no Predictor name can collide with another's model IDs.
- **Model type**: ``modelType.name`` through :data:`MODEL_TYPES` (``pytorch`` is served by the
  torchscript loader, ``openvino_ir`` by the openvino loader); anything else is an invalid spec.
- **Storage**, as modelmesh-serving's ``extractModelFields`` and ``validatePredictor``
  (``controllers/predictor_controller.go``; docs/storage-notes.md section 3). ``ModelInfo.path`` is
  ``spec.storage.path``, else the deprecated ``spec.path`` (not both), passed on as written;
  ``ModelInfo.key`` is modelmesh-serving's JSON: ``storage_key`` = ``storage.key``, else
  ``storage.s3.secretKey``; ``storage_params`` = ``storage.parameters``; ``schema_path`` =
  ``storage.schemaPath``, else ``spec.schemaPath`` (not both); ``model_type``. The runtime pulls the
  model from the storage the key names, the path then being relative to the bucket (or claim).

  - ``storage.s3.bucket`` (and ``parameters.bucket``) also go to the deprecated top-level
    ``bucket``. modelmesh-serving puts ``s3.bucket`` into ``storage_params``; the runtime reads
    either the same way. ``storage.s3`` with any other storage field is an invalid spec, as there.
  - A path that is a storage URI (``s3://bucket/key``, ``gs://``, ``http(s)://``, Azure blob
    URLs, ``pvc://claim/path``) passes through: the runtime maps it as modelmesh-serving maps an
    InferenceService's ``storageUri``. ``file://`` and plain paths are local files. Other schemes
    are an invalid spec naming the supported ones (:data:`mesh.storage.location.SCHEMES`).
  - A PersistentVolumeClaim, ``storage.persistentVolumeClaim.claimName: C`` or ``parameters
    {type: pvc, name: C}``, becomes ``storage_params {"type": "pvc", "name": C}`` with the path
    relative to the claim: the runtime reads ``<storage.pvc_mounts_dir>/C/<path>``
    (``/pvc_mounts``, where runtime pods mount claims: deploy/storage-pvc). modelmesh-serving rejects
    ``persistentVolumeClaim`` ("never supported"); we keep accepting it, as the equivalent
    parameters, so Predictors written for earlier versions of this controller still apply. It
    names the storage by itself: not with ``key`` or ``parameters``. (This controller used to
    put the claim into the path, ``<mount root>/C/<path>``; PVC Predictors' hash marks the new
    mapping, so an upgraded controller registers new models rather than clash with the old
    registrations under the same IDs.)
  - A Predictor that names no storage (no key, ``s3``, parameters or claim) with a relative
    path: modelmesh-serving's puller reads it from the ``default`` storage key. With
    ``controller.default_storage_key`` set (deploy/ sets ``default``), the key gets that
    ``storage_key`` and the hash includes it (changing the setting moves such models); empty, the
    path is a local file under the runtimes' model roots. Absolute paths and ``file://`` are local.
  - Parameters that are secrets by name (:data:`mesh.storage.config.SECRET_FIELDS`:
    ``secret_access_key``, ``headers``, ...) are an invalid spec: registrations are stored in the
    registry and shown in statuses; secrets belong in the ``storage-config`` Secret, named by
    ``storage.key``.
- **GPU**: ``gpu: required`` and ``gpu: preferred`` -> ``ModelInfo.gpu`` with the same value (a
  required model runs only on a GPU of a runtime that loads its type there; a preferred one on such
  a GPU when it has room, else in RAM).
- **Placement labels**: ``runtime.name: X`` -> the label
  ``rt:X``, so such a Predictor goes only to runtimes started with that label (as modelmesh-serving
  sends it only to the named ServingRuntime), and fails with ``RuntimeNotRecognized`` if none has it.

Status follows modelmesh-serving's meanings (``predictor_types.go``, ``predictor_controller.go``):
model states NOT_LOADED/LOADING/LOADED/LOADING_FAILED -> Standby/Loading/Loaded/FailedToLoad, and no
registration -> Pending; vModel DEFINED/TRANSITIONING/TRANSITION_FAILED -> UpToDate/InProgress/
BlockedByFailedLoad; ``targetModelState`` only while a transition is pending; ``lastFailureInfo``
describes the failure of the model being moved to. Differences, on purpose: ``available`` is false
while Pending (nothing is registered, so nothing can serve); ``totalCopies`` counts the loading and
loaded copies (modelmesh-serving never filled it in); while no runtime is up (RuntimeUnhealthy) the
model's own state is shown (modelmesh-serving shows Loading) with ``available`` false; a failure
keeps its first ``time`` for as long as it stays the same failure, so recomputing a status never
changes it by itself, and status writes cannot feed a reconcile loop (modelmesh-serving needs a
20 s debounce for that).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from mesh.errors import InvalidArgument
from mesh.storage.config import SECRET_FIELDS
from mesh.storage.location import SCHEMES

# modelType.name (lower case) -> the mesh's model type (mesh/runtime/loaders).
MODEL_TYPES: dict[str, str] = {
    "sklearn": "sklearn",
    "scikit-learn": "sklearn",
    "xgboost": "xgboost",
    "lightgbm": "lightgbm",
    "onnx": "onnx",
    "openvino_ir": "openvino",  # OpenVINO Model Server's format name in modelmesh-serving
    "openvino": "openvino",
    "pytorch": "torchscript",
    "torchscript": "torchscript",
}
# The spec fields that define a concrete model (a change to any of them is a new model).
MODEL_FIELDS = ("modelType", "runtime", "path", "schemaPath", "storage", "gpu", "protocolVersion")
HASH_CHARS = 10
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# A claim name is a Kubernetes object name (DNS subdomain); the runtime uses it as a directory.
_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

# Predictor status enums (predictor_types.go).
PENDING, STANDBY, LOADING, LOADED, FAILED_TO_LOAD = "Pending", "Standby", "Loading", "Loaded", "FailedToLoad"
UP_TO_DATE, IN_PROGRESS, BLOCKED, INVALID_SPEC = "UpToDate", "InProgress", "BlockedByFailedLoad", "InvalidSpec"
MODEL_LOAD_FAILED = "ModelLoadFailed"
RUNTIME_UNHEALTHY = "RuntimeUnhealthy"
NO_SUPPORTING_RUNTIME = "NoSupportingRuntime"
RUNTIME_NOT_RECOGNIZED = "RuntimeNotRecognized"
INVALID_PREDICTOR_SPEC = "InvalidPredictorSpec"

_MODEL_STATES = {"NOT_LOADED": STANDBY, "LOADING": LOADING, "LOADED": LOADED, "LOADING_FAILED": FAILED_TO_LOAD}
_TRANSITIONS = {"DEFINED": UP_TO_DATE, "TRANSITIONING": IN_PROGRESS, "TRANSITION_FAILED": BLOCKED}
# Status fields this controller owns; others (if any) are left alone.
MANAGED = ("available", "activeModelState", "targetModelState", "transitionStatus", "failedCopies",
           "totalCopies", "grpcEndpoint", "httpEndpoint", "lastFailureInfo")


class InvalidPredictor(InvalidArgument):
    """The Predictor cannot be served as written (its status says why: InvalidSpec)."""


class NoRuntime(InvalidPredictor):
    """No runtime of the cluster serves the Predictor as written (``reason``: NoSupportingRuntime or
    RuntimeNotRecognized): nothing is registered, and the status says which and why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Runtime(Protocol):
    """The runtime chosen for a model (:class:`mesh.controller.runtimes.ServingRuntime`)."""

    @property
    def ref(self) -> str: ...

    @property
    def label(self) -> str: ...


class Choice(Protocol):
    """A runtime selection (:class:`mesh.controller.runtimes.Selection`)."""

    @property
    def runtime(self) -> Runtime | None: ...

    @property
    def reason(self) -> str: ...

    @property
    def message(self) -> str: ...


class RuntimeSelector(Protocol):
    """Chooses a model's runtime: ``(namespace, format, version, runtime, protocol)`` -> a choice, or
    None when the cluster declares no runtimes (any runtime loading the type serves the model)."""

    def __call__(self, namespace: str, fmt: str, version: str, runtime: str, protocol: str) -> Choice | None: ...


Key = tuple[str, str]  # (namespace, name)


def key_of(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


@dataclass(frozen=True)
class Registration:
    """What one Predictor asks of the mesh: setVModel(vmodel_id -> model_id, modelInfo)."""

    vmodel_id: str
    model_id: str
    type: str
    path: str
    key: str = ""
    labels: tuple[str, ...] = ()
    gpu: str = ""  # "", "required", "preferred"
    runtime: str = ""  # the ServingRuntime chosen for it (ServingRuntime.ref), "" when none is declared


def concrete_model_id(namespace: str, name: str, spec: Mapping[str, Any],
                      derived: Mapping[str, str] | None = None) -> str:
    """``<name>__<hash>`` of the namespace, the model-defining spec fields and ``derived``: what the
    mapping adds beyond the spec (a setting it applied), which changes the model as much as the spec."""
    defining = {f: spec[f] for f in MODEL_FIELDS if f in spec}
    identity: dict[str, Any] = {"namespace": namespace, "spec": defining}
    if derived:
        identity["derived"] = dict(derived)
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return f"{name}__{hashlib.sha256(canonical.encode()).hexdigest()[:HASH_CHARS]}"


def _text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidPredictor(f"{where} must be a string, not {type(value).__name__}")
    return value.strip()


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidPredictor(f"{where} must be an object")
    return value


@dataclass(frozen=True)
class _Source:
    """Where the model is: ``ModelInfo.path``, the storage fields of ``ModelInfo.key``, and what the
    mapping derived beyond the spec (part of the model ID)."""

    path: str
    key: dict[str, Any]
    derived: dict[str, str]


def _one_of(storage: Mapping[str, Any], spec: Mapping[str, Any], name: str) -> str:
    """``spec.storage.<name>``, else the deprecated ``spec.<name>``; both is an invalid spec (as upstream)."""
    new, old = _text(storage.get(name), f"spec.storage.{name}"), _text(spec.get(name), f"spec.{name}")
    if new and old:
        raise InvalidPredictor(f"only one of spec.{name} and spec.storage.{name} can be specified")
    return new or old


def _source(spec: Mapping[str, Any], default_storage_key: str) -> _Source:
    """The storage mapping of the module docstring."""
    storage = _object(spec.get("storage"), "spec.storage")
    s3 = _object(storage.get("s3"), "spec.storage.s3")
    params = {str(k): str(v) for k, v in _object(storage.get("parameters"), "spec.storage.parameters").items()}
    if storage.get("s3") is not None:
        others = [f for f in ("key", "parameters", "path", "schemaPath", "persistentVolumeClaim")
                  if storage.get(f) is not None]
        if others:
            raise InvalidPredictor(f"spec.storage.s3 cannot be specified with any other keys in spec.storage "
                                   f"({', '.join(others)}): use key, path and parameters instead of s3")
    if storage.get("persistentVolumeClaim") is not None:
        pvc = _object(storage["persistentVolumeClaim"], "spec.storage.persistentVolumeClaim")
        claim = _text(pvc.get("claimName"), "spec.storage.persistentVolumeClaim.claimName")
        if not claim:
            raise InvalidPredictor("spec.storage.persistentVolumeClaim.claimName is required")
        if storage.get("key") is not None or storage.get("parameters") is not None:
            raise InvalidPredictor("spec.storage.persistentVolumeClaim names the storage by itself: not with "
                                   "spec.storage.key or parameters (or use parameters {type: pvc, name: CLAIM})")
        params = {"type": "pvc", "name": claim}
    if params.get("type") == "pvc" and "name" in params and not _CLAIM.match(params["name"]):
        raise InvalidPredictor(f"persistent volume claim name {params['name'][:80]!r} is not a valid name")
    for name in params:
        if name.split(".")[0].lower() in SECRET_FIELDS:
            raise InvalidPredictor(f"spec.storage.parameters.{name[:80]} is a secret: put secrets in the "
                                   "storage-config Secret and name its key in spec.storage.key (parameters "
                                   "are stored in the mesh's registry and shown in model status)")

    path = _one_of(storage, spec, "path")
    if not path:
        raise InvalidPredictor("no model path: set spec.storage.path (or spec.path)")
    m = _URI.match(path)
    scheme = m.group(1).lower() if m else ""
    if scheme and scheme not in SCHEMES:  # the runtimes' schemes: a typo is an invalid spec, not a failed load
        raise InvalidPredictor(f"storage URI scheme {scheme[:20]!r} is not supported; supported: "
                               f"{', '.join(SCHEMES)}")

    key: dict[str, Any] = {}
    derived: dict[str, str] = {}
    storage_key = _text(storage.get("key"), "spec.storage.key") or _text(s3.get("secretKey"),
                                                                         "spec.storage.s3.secretKey")
    bucket = _text(s3.get("bucket"), "spec.storage.s3.bucket") or params.get("bucket", "")
    if not (storage_key or bucket or params) and default_storage_key and not scheme and not path.startswith("/"):
        # modelmesh-serving's puller reads such a path from its `default` storage key.
        storage_key = derived["defaultStorageKey"] = default_storage_key
    if params.get("type") == "pvc":
        # The claim used to go into the path (<mount root>/<claim>/<path>): a new ID, not a clash
        # (ALREADY_EXISTS) with the registration an earlier controller made under the same one.
        derived["pvc"] = "storage_params"
    if storage_key:
        key["storage_key"] = storage_key
    if bucket:
        key["bucket"] = bucket
    if params:
        key["storage_params"] = params
    schema_path = _one_of(storage, spec, "schemaPath")
    if schema_path:
        key["schema_path"] = schema_path
    return _Source(path=path, key=key, derived=derived)


def registration(obj: Mapping[str, Any], *, default_storage_key: str = "",
                 select: RuntimeSelector | None = None) -> Registration:
    """The registration a Predictor asks for; :class:`InvalidPredictor` if it cannot be served, or
    :class:`NoRuntime` if ``select`` finds no runtime for it. ``default_storage_key``:
    ``controller.default_storage_key`` (module docstring, *Storage*). ``select``: the cluster's
    ServingRuntimes (:mod:`mesh.controller.runtimes`): the chosen runtime's label replaces
    ``rt:<runtime.name>`` and is part of the model ID."""
    namespace, name = key_of(obj)
    if not name:
        raise InvalidPredictor("the Predictor has no metadata.name")
    spec = _object(obj.get("spec"), "spec")
    model_type = _object(spec.get("modelType"), "spec.modelType")
    type_name = _text(model_type.get("name"), "spec.modelType.name")
    if not type_name:
        raise InvalidPredictor("spec.modelType.name is required")
    runtime = _text(_object(spec.get("runtime"), "spec.runtime").get("name"), "spec.runtime.name")
    source = _source(spec, default_storage_key)
    key = {"model_type": {k: v for k, v in model_type.items() if k in ("name", "version")}, **source.key}
    gpu = _text(spec.get("gpu"), "spec.gpu").lower()
    if gpu not in ("", "required", "preferred"):
        raise InvalidPredictor(f"spec.gpu must be 'required' or 'preferred', not {gpu!r}")
    version = _text(model_type.get("version"), "spec.modelType.version")
    protocol = _text(spec.get("protocolVersion"), "spec.protocolVersion")
    choice = select(namespace, type_name, version, runtime, protocol) if select is not None else None
    if choice is not None and choice.runtime is None:
        raise NoRuntime(choice.reason, choice.message)
    chosen = choice.runtime if choice is not None else None
    mesh_type = MODEL_TYPES.get(type_name.lower())
    if chosen is not None:
        mesh_type = mesh_type or type_name.lower()  # what an external server's runtime pods advertise
    elif mesh_type is None:
        raise InvalidPredictor(f"model type {type_name!r} is not supported; supported: "
                               f"{', '.join(sorted(MODEL_TYPES))}")

    labels: list[str] = []
    if chosen is not None:
        labels.append(chosen.label)
        source.derived["runtime"] = chosen.ref
    elif runtime:
        labels.append(f"rt:{runtime}")
    return Registration(vmodel_id=name, model_id=concrete_model_id(namespace, name, spec, source.derived),
                        type=mesh_type, path=source.path, key=json.dumps(key, sort_keys=True),
                        labels=tuple(labels), gpu=gpu, runtime=chosen.ref if chosen is not None else "")


# --- status -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CopyInfo:
    location: str
    status: str  # ModelStatusInfo.ModelStatus name: LOADING, LOADED, LOADING_FAILED, ...
    time_ms: int = 0


@dataclass(frozen=True)
class ModelState:
    """ModelStatusInfo, transport-neutral."""

    status: str  # NOT_FOUND, NOT_LOADED, LOADING, LOADED, LOADING_FAILED, UNKNOWN
    errors: tuple[str, ...] = ()
    copies: tuple[CopyInfo, ...] = ()


@dataclass(frozen=True)
class VModelState:
    """VModelStatusInfo, transport-neutral."""

    status: str  # NOT_FOUND, DEFINED, TRANSITIONING, TRANSITION_FAILED, UNKNOWN
    active_model_id: str = ""
    target_model_id: str = ""
    active: ModelState | None = None
    target: ModelState | None = None
    owner: str = ""
    split: tuple[SplitState, ...] = ()  # a traffic split (InferenceService canaries); () = none


@dataclass(frozen=True)
class SplitState:
    """One target of a vModel's traffic split (VModelStatusInfo.splitTargets)."""

    model_id: str
    weight: int
    model: ModelState
    receiving: bool = True


NOT_FOUND = VModelState(status="NOT_FOUND")


@dataclass(frozen=True)
class Failure:
    """A failure the controller found itself (a refused call, an invalid spec), not in the model's status."""

    reason: str
    message: str
    model_id: str = ""
    location: str = ""
    time_ms: int = field(default=0, compare=False)


def needs_registration(state: VModelState, reg: Registration) -> bool:
    """Whether the mesh lacks what ``reg`` asks for (lost registry data, or a failed earlier call)."""
    if state.status == "NOT_FOUND" or state.target_model_id != reg.model_id:
        return True
    target = state.target if state.target_model_id != state.active_model_id else state.active
    return target is None or target.status == "NOT_FOUND"


def load_now(status: Mapping[str, Any] | None) -> bool:
    """modelmesh-serving's rule: load at once when new, failed, transitioning or waiting for a runtime."""
    status = status or {}
    failure = status.get("lastFailureInfo") or {}
    return (status.get("activeModelState") in (None, "", PENDING, FAILED_TO_LOAD)
            or bool(status.get("targetModelState"))
            or failure.get("reason") == RUNTIME_UNHEALTHY)


def _model_state(model: ModelState | None) -> str:
    return _MODEL_STATES.get(model.status, PENDING) if model is not None else PENDING


def timestamp(ms: int) -> str:
    """An RFC 3339 time (UTC, seconds) for a status, from milliseconds since the epoch."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _load_failure(model_id: str, model: ModelState) -> Failure | None:
    if model.status == "LOADED" or not model.errors:
        return None
    failed = next((c for c in model.copies if c.status == "LOADING_FAILED"), None)
    return Failure(MODEL_LOAD_FAILED, model.errors[0], model_id, failed.location if failed else "",
                   failed.time_ms if failed else 0)


def predictor_status(state: VModelState, *, previous: Mapping[str, Any] | None = None,
                     failure: Failure | None = None, now_ms: int = 0,
                     grpc_endpoint: str = "") -> dict[str, Any]:
    """The Predictor's ``.status`` for this vModel state, plus a failure the controller found.

    ``previous`` is the current status: a failure identical to its ``lastFailureInfo`` keeps that
    time. A failure with reason InvalidPredictorSpec makes the transition InvalidSpec.
    """
    found = state.status != "NOT_FOUND"
    active = _model_state(state.active) if found else PENDING
    transitioning = found and state.active_model_id != state.target_model_id
    target = _model_state(state.target) if transitioning else ""
    transition = _TRANSITIONS.get(state.status, UP_TO_DATE) if found else UP_TO_DATE
    moving_to = state.target if transitioning else state.active
    moving_id = state.target_model_id if transitioning else state.active_model_id
    if transition == BLOCKED and moving_to is not None and moving_to.status == "LOADING":
        transition = IN_PROGRESS  # a retry elsewhere is under way

    if failure is None and found and moving_to is not None:
        failure = _load_failure(moving_id, moving_to)
    if failure is not None and failure.reason in (NO_SUPPORTING_RUNTIME, RUNTIME_NOT_RECOGNIZED):
        # Nowhere to load it: the model being moved to has failed, whatever its copies say.
        if transitioning:
            target = FAILED_TO_LOAD
        else:
            active = FAILED_TO_LOAD
    if failure is not None and failure.reason == INVALID_PREDICTOR_SPEC:
        transition = INVALID_SPEC

    counted = [m for m in ((state.active, state.target) if transitioning else (state.active,)) if m is not None]
    copies = [c for m in counted for c in m.copies] if found else []
    status: dict[str, Any] = {
        "available": active in (STANDBY, LOADING, LOADED)
        and not (failure is not None and failure.reason == RUNTIME_UNHEALTHY),
        "activeModelState": active,
        "targetModelState": target,
        "transitionStatus": transition,
        "failedCopies": sum(c.status == "LOADING_FAILED" for c in copies),
        "totalCopies": sum(c.status in ("LOADING", "LOADED") for c in copies),
        "grpcEndpoint": grpc_endpoint,
        "httpEndpoint": "",
    }
    if failure is not None:
        info = {"location": failure.location, "reason": failure.reason, "message": failure.message,
                "modelId": failure.model_id}
        info = {k: v for k, v in info.items() if v}
        before = dict((previous or {}).get("lastFailureInfo") or {})
        if before.get("time") and {k: v for k, v in before.items() if k != "time"} == info:
            info["time"] = before["time"]  # the same failure: its time stays, so the status does
        else:
            info["time"] = timestamp(failure.time_ms or now_ms)
        status["lastFailureInfo"] = info
    return status


def status_patch(current: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch taking ``current`` to ``wanted`` (managed fields only), None if there is nothing to do."""
    current = current or {}
    changes: dict[str, Any] = {}
    for name in MANAGED:
        if name in wanted:
            if current.get(name) != wanted[name]:
                changes[name] = wanted[name]
        elif current.get(name) is not None:
            changes[name] = None  # merge patch: null removes the field
    return {"status": changes} if changes else None


def requeue_after(status: Mapping[str, Any], *, poll_s: float, runtime_wait_s: float) -> float | None:
    """When to look again without an event: the mesh sends the controller none (no registry watch
    here), so loads and transitions in progress are polled, and a missing runtime is retried."""
    failure = status.get("lastFailureInfo") or {}
    if failure.get("reason") == RUNTIME_UNHEALTHY:
        return runtime_wait_s
    if LOADING in (status.get("activeModelState"), status.get("targetModelState")) or (
            status.get("transitionStatus") == IN_PROGRESS):
        return poll_s
    return None


__all__ = ["INVALID_PREDICTOR_SPEC", "MODEL_TYPES", "NOT_FOUND", "Choice", "CopyInfo", "Failure",
           "InvalidPredictor", "Key", "ModelState", "NoRuntime", "Registration", "RuntimeSelector", "VModelState",
           "concrete_model_id", "key_of", "load_now", "needs_registration", "predictor_status", "registration",
           "requeue_after", "status_patch"]
