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
  runtime, paths, storage, gpu, protocol version). A concrete model is immutable: a spec change is a
  new model ID, the vModel moves to it once it has loaded (the old one keeps serving meanwhile) and
  the old model is deleted by the mesh (``autoDeleteTargetModel``). Kubernetes names cannot contain
  ``_``, so no Predictor name can collide with another's model IDs.
- **Model type**: ``modelType.name`` through :data:`MODEL_TYPES` (``pytorch`` is served by the
  torchscript loader, ``openvino_ir`` by the openvino loader); anything else is an invalid spec.
- **Path**: ``spec.storage.path``, else the deprecated ``spec.path``, passed on as is: the runtimes
  read local paths and ``file://`` URIs (relative paths resolve in the runtime's working directory,
  its models volume). A ``persistentVolumeClaim`` (or ``storage.parameters`` ``type: pvc`` with a
  ``name``) means ``<pvc_mount_root>/<claimName>/<path>``. ``storage.key``, ``storage.parameters``,
  ``s3.secretKey``/``bucket``, the schema path and the model type go to the runtime in
  ``ModelInfo.key`` (JSON, the field names modelmesh-serving uses) for adapters that pull models;
  the built-in loaders ignore them. URIs of other schemes (``s3://``) are an invalid spec: no runtime
  here can open them.
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
from typing import Any

from mesh.errors import InvalidArgument

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


def concrete_model_id(namespace: str, name: str, spec: Mapping[str, Any]) -> str:
    defining = {f: spec[f] for f in MODEL_FIELDS if f in spec}
    canonical = json.dumps({"namespace": namespace, "spec": defining}, sort_keys=True, separators=(",", ":"))
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


def registration(obj: Mapping[str, Any], *, pvc_mount_root: str = "/models") -> Registration:
    """The registration a Predictor asks for; :class:`InvalidPredictor` if it cannot be served."""
    namespace, name = key_of(obj)
    if not name:
        raise InvalidPredictor("the Predictor has no metadata.name")
    spec = _object(obj.get("spec"), "spec")
    model_type = _object(spec.get("modelType"), "spec.modelType")
    type_name = _text(model_type.get("name"), "spec.modelType.name")
    if not type_name:
        raise InvalidPredictor("spec.modelType.name is required")
    mesh_type = MODEL_TYPES.get(type_name.lower())
    if mesh_type is None:
        raise InvalidPredictor(f"model type {type_name!r} is not supported; supported: "
                               f"{', '.join(sorted(MODEL_TYPES))}")

    storage = _object(spec.get("storage"), "spec.storage")
    params = {str(k): str(v) for k, v in _object(storage.get("parameters"), "spec.storage.parameters").items()}
    s3 = _object(storage.get("s3"), "spec.storage.s3")
    pvc = _object(storage.get("persistentVolumeClaim"), "spec.storage.persistentVolumeClaim")
    path = _text(storage.get("path"), "spec.storage.path") or _text(spec.get("path"), "spec.path")
    claim = _text(pvc.get("claimName"), "spec.storage.persistentVolumeClaim.claimName")
    if "persistentVolumeClaim" in storage and not claim:
        raise InvalidPredictor("spec.storage.persistentVolumeClaim.claimName is required")
    if not claim and params.get("type", "").lower() == "pvc":
        claim = params.get("name", "").strip()
        if not claim:
            raise InvalidPredictor("spec.storage.parameters: type pvc needs the claim's name")
    if claim:
        if "/" in claim or claim in (".", ".."):
            raise InvalidPredictor(f"persistent volume claim name {claim!r} is not a valid name")
        path = "/".join(p for p in (pvc_mount_root.rstrip("/"), claim, path.lstrip("/")) if p)
    if not path:
        raise InvalidPredictor("no model path: set spec.storage.path (or spec.path, or a "
                               "persistentVolumeClaim)")
    m = _URI.match(path)
    if m and m.group(1).lower() != "file":
        raise InvalidPredictor(f"storage URI scheme {m.group(1)!r} is not supported: runtimes read local paths "
                               "and file:// URIs (mount the storage, e.g. as a persistent volume)")

    key: dict[str, Any] = {"model_type": {k: v for k, v in model_type.items() if k in ("name", "version")}}
    storage_key = _text(storage.get("key"), "spec.storage.key") or _text(s3.get("secretKey"),
                                                                         "spec.storage.s3.secretKey")
    if storage_key:
        key["storage_key"] = storage_key
    bucket = _text(s3.get("bucket"), "spec.storage.s3.bucket") or params.get("bucket", "")
    if bucket:
        key["bucket"] = bucket
    if params:
        key["storage_params"] = params
    schema_path = _text(storage.get("schemaPath"), "spec.storage.schemaPath") or _text(
        spec.get("schemaPath"), "spec.schemaPath")
    if schema_path:
        key["schema_path"] = schema_path

    labels: list[str] = []
    gpu = _text(spec.get("gpu"), "spec.gpu").lower()
    if gpu not in ("", "required", "preferred"):
        raise InvalidPredictor(f"spec.gpu must be 'required' or 'preferred', not {gpu!r}")
    runtime = _text(_object(spec.get("runtime"), "spec.runtime").get("name"), "spec.runtime.name")
    if runtime:
        labels.append(f"rt:{runtime}")
    return Registration(vmodel_id=name, model_id=concrete_model_id(namespace, name, spec), type=mesh_type,
                        path=path, key=json.dumps(key, sort_keys=True), labels=tuple(labels), gpu=gpu)


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


def _time(ms: int) -> str:
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
            info["time"] = _time(failure.time_ms or now_ms)
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


__all__ = ["INVALID_PREDICTOR_SPEC", "MODEL_TYPES", "NOT_FOUND", "CopyInfo", "Failure", "InvalidPredictor", "Key",
           "ModelState", "Registration", "VModelState", "concrete_model_id", "key_of", "load_now",
           "needs_registration", "predictor_status", "registration", "requeue_after", "status_patch"]
