"""InferenceService resources (ModelMesh deployment mode) -> the Predictor they stand for, and the
Predictor's status -> the InferenceService's. No I/O.

modelmesh-serving converts each InferenceService (``serving.kserve.io/v1beta1``) whose annotation
``serving.kserve.io/deploymentMode`` is exactly ``ModelMesh`` into an in-memory Predictor and runs
the Predictor reconcile on it (docs/kserve-notes.md, section 2). So does this module, with the
Predictor mapping of :mod:`mesh.controller.predictor` (model types, storage, runtimes):

- **Which**: only InferenceServices with the annotation; the others belong to KServe's own
  controller and are left alone (one that loses the annotation has its vModel removed).
- **Fields** (``spec.predictor``): ``model.modelFormat {name, version}`` -> ``modelType``,
  ``model.runtime`` -> ``runtime.name``, ``model.protocolVersion``; or the older framework blocks
  (the first of :data:`FRAMEWORKS` present gives the model type; the runtime then comes from the
  ``serving.kserve.io/servingRuntime`` annotation). Storage: exactly one of ``storageUri`` and
  ``storage.path`` (a URI passes through to the runtime, which maps it as modelmesh-serving does);
  ``storage.key`` (else the ``serving.kserve.io/secretKey`` annotation), ``storage.parameters``,
  ``storage.schemaPath`` (else the ``serving.kserve.io/schemaPath`` annotation).
- **IDs**: the vModel is the InferenceService's name (clients send ``model_name:
  <name>``, as with modelmesh-serving); the concrete model is ``<name>__isvc-<hash>``, the hash
  of the converted spec as for Predictors (modelmesh-serving hashes Go's JSON of it; ours is
  SHA-256 of canonical JSON: the IDs are the mesh's own, clients never name them). The vModel's owner
  is ``<owner>/<namespace>/isvc``: a Predictor of the same name is another owner, refused by the
  mesh and reported in the second one's status (as modelmesh-serving reports "already exists").
- **Status**, as modelmesh-serving writes it (section 3): ``modelStatus {transitionStatus,
  states {activeModelState, targetModelState}, copies {failedCopies, totalCopies},
  lastFailureInfo {location, reason, message, modelRevisionName, time}}``; conditions
  ``PredictorReady`` and ``Ready`` (Ready follows PredictorReady); while available, ``url`` and
  ``components.predictor {url, grpcUrl, restUrl}`` (the router's gRPC and REST addresses), and
  ``address.url``. Differences, on purpose: an InferenceService that cannot be served gets
  ``transitionStatus: InvalidSpec`` with the reason in ``lastFailureInfo`` (modelmesh-serving
  writes nothing and retries forever); conditions keep their ``lastTransitionTime`` while their
  status stays the same, so recomputing a status never changes it by itself.
- **Canary** (``spec.predictor.canaryTrafficPercent`` P, KServe's field): when the spec changes
  (a new concrete model) while P is set below 100, the vModel splits its traffic: P percent to
  the new model, 100 - P to the model rolled out before (the vModel's active model, which stays
  the stable one: a canary whose load fails sends its share there). P = 0 keeps the new model
  loaded without traffic (KServe's pinned canary); changing P moves the split; P = 100 or no P
  rolls out as without a canary (the new model takes over once loaded, the split is cleared:
  removing P after a canary promotes it). Without a previous model (a new InferenceService) there
  is nothing to split: it rolls out. The status says it as KServe does, with our model IDs as the
  revision names, in ``components.predictor``: ``traffic`` [{``tag`` latest/prev,
  ``revisionName``, ``percent``, ``latestRevision``}] (one entry of 100 without a canary),
  ``latestCreatedRevision`` (the spec's model), ``latestReadyRevision`` (it, once loaded),
  ``latestRolledoutRevision`` (the model with all the traffic, or the stable one during a canary)
  and ``previousRolledoutRevision`` (the one rolled out before it); written while the service is
  available, as the URLs are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from mesh.controller.predictor import InvalidPredictor, Registration, RuntimeSelector, VModelState, registration

MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
MODELMESH = "ModelMesh"
RUNTIME_ANNOTATION = "serving.kserve.io/servingRuntime"
SECRET_KEY_ANNOTATION = "serving.kserve.io/secretKey"
SCHEMA_PATH_ANNOTATION = "serving.kserve.io/schemaPath"
# The older predictor forms, in the order modelmesh-serving looks for them.
FRAMEWORKS = ("xgboost", "lightgbm", "sklearn", "tensorflow", "onnx", "pytorch", "triton", "pmml")
SOURCE = "isvc"
# Status fields this controller owns on an InferenceService (the rest is left alone).
MANAGED = ("url", "address", "components", "conditions", "modelStatus")


def _annotations(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata") or {}
    annotations = meta.get("annotations") if isinstance(meta, Mapping) else None
    return annotations if isinstance(annotations, Mapping) else {}


def is_modelmesh(obj: Mapping[str, Any]) -> bool:
    """Whether the InferenceService is served by the mesh (its deployment-mode annotation)."""
    return _annotations(obj).get(MODE_ANNOTATION) == MODELMESH


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidPredictor(f"{where} must be an object")
    return value


def _text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidPredictor(f"{where} must be a string")
    return value.strip()


def as_predictor(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The Predictor an InferenceService stands for; InvalidPredictor naming what is wrong."""
    meta = _mapping(obj.get("metadata"), "metadata")
    annotations = _annotations(obj)
    predictor = _mapping(_mapping(obj.get("spec"), "spec").get("predictor"), "spec.predictor")
    frameworks = [f for f in FRAMEWORKS if predictor.get(f) is not None]
    spec: dict[str, Any] = {}
    model = predictor.get("model")
    if model is not None:
        where = "spec.predictor.model"
        model = _mapping(model, where)
        if frameworks:
            raise InvalidPredictor(f"spec.predictor cannot have both the model spec and a framework spec "
                                   f"({frameworks[0]})")
        if RUNTIME_ANNOTATION in annotations:
            raise InvalidPredictor(f"the {RUNTIME_ANNOTATION} annotation cannot be used with spec.predictor.model; "
                                   "set spec.predictor.model.runtime instead")
        model_format = _mapping(model.get("modelFormat"), f"{where}.modelFormat")
        name = _text(model_format.get("name"), f"{where}.modelFormat.name")
        if not name:
            raise InvalidPredictor(f"{where}.modelFormat.name is required")
        version = _text(model_format.get("version"), f"{where}.modelFormat.version")
        spec["modelType"] = {"name": name, **({"version": version} if version else {})}
        runtime = _text(model.get("runtime"), f"{where}.runtime")
        ext = model
    elif frameworks:
        where = f"spec.predictor.{frameworks[0]}"
        ext = _mapping(predictor[frameworks[0]], where)
        spec["modelType"] = {"name": frameworks[0]}
        runtime = _text(annotations.get(RUNTIME_ANNOTATION), f"the {RUNTIME_ANNOTATION} annotation")
    else:
        raise InvalidPredictor("no predictor found: set spec.predictor.model (modelFormat and storage) or one of "
                               f"spec.predictor.{{{', '.join(FRAMEWORKS)}}}")
    if runtime:
        spec["runtime"] = {"name": runtime}
    protocol = _text(ext.get("protocolVersion"), f"{where}.protocolVersion")
    if protocol:
        spec["protocolVersion"] = protocol
    storage = _mapping(ext.get("storage"), f"{where}.storage")
    uri = _text(ext.get("storageUri"), f"{where}.storageUri")
    path = _text(storage.get("path"), f"{where}.storage.path")
    if uri and path:
        raise InvalidPredictor(f"{where} cannot have both the storageUri and the storage.path")
    if not uri and not path:
        raise InvalidPredictor(f"{where} must have either the storageUri or the storage.path")
    key = _text(storage.get("key"), f"{where}.storage.key") or _text(
        annotations.get(SECRET_KEY_ANNOTATION), f"the {SECRET_KEY_ANNOTATION} annotation")
    schema = _text(storage.get("schemaPath"), f"{where}.storage.schemaPath") or _text(
        annotations.get(SCHEMA_PATH_ANNOTATION), f"the {SCHEMA_PATH_ANNOTATION} annotation")
    converted: dict[str, Any] = {"path": uri or path}
    if key:
        converted["key"] = key
    if schema:
        converted["schemaPath"] = schema
    parameters = _mapping(storage.get("parameters"), f"{where}.storage.parameters")
    if parameters:
        converted["parameters"] = dict(parameters)
    spec["storage"] = converted
    return {"metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")}, "spec": spec}


# --- canaries ---------------------------------------------------------------------------------------
def canary_percent(obj: Mapping[str, Any]) -> int | None:
    """``spec.predictor.canaryTrafficPercent`` (None: not set); InvalidPredictor if not 0 to 100."""
    spec = obj.get("spec")
    predictor = spec.get("predictor") if isinstance(spec, Mapping) else None
    value = predictor.get("canaryTrafficPercent") if isinstance(predictor, Mapping) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise InvalidPredictor(f"spec.predictor.canaryTrafficPercent must be an integer from 0 to 100, "
                               f"not {str(value)[:40]}")
    return value


def canary_split(state: VModelState, latest: str, percent: int | None) -> tuple[str, list[tuple[str, int]]]:
    """(stable model, split) the vModel should have for a canary of ``latest`` at ``percent``, or
    ("", []) when there is none to have: no percent below 100, or no other model to keep."""
    if percent is None or percent >= 100 or state.status == "NOT_FOUND":
        return "", []
    stable = state.active_model_id
    if not stable or stable == latest:
        return "", []
    return stable, [(stable, 100 - percent), (latest, percent)]


def traffic_status(state: VModelState | None, latest: str, previous: Mapping[str, Any]) -> dict[str, Any]:
    """The revision fields of ``components.predictor`` (see the module docstring), from the vModel
    state, the spec's model ID and the previous ``components.predictor``."""
    if state is None or state.status == "NOT_FOUND" or not latest:
        return {}
    out: dict[str, Any] = {"latestCreatedRevision": latest}
    if state.split:
        traffic = [{"tag": "latest", "revisionName": t.model_id, "percent": t.weight, "latestRevision": True}
                   if t.model_id == latest else
                   {"tag": "prev", "revisionName": t.model_id, "percent": t.weight, "latestRevision": False}
                   for t in state.split]
        latest_ready = any(t.model_id == latest and t.model.status == "LOADED" for t in state.split)
        rolled_out = state.active_model_id
    else:
        active = state.active_model_id
        traffic = [{"revisionName": active, "percent": 100, "latestRevision": active == latest}]
        latest_ready = active == latest and state.active is not None and state.active.status == "LOADED"
        rolled_out = active if state.active_model_id == state.target_model_id else ""
    out["traffic"] = traffic
    ready = latest if latest_ready else previous.get("latestReadyRevision")
    if ready:
        out["latestReadyRevision"] = ready
    before = previous.get("latestRolledoutRevision") or ""
    rolled_out = rolled_out or before
    if rolled_out:
        out["latestRolledoutRevision"] = rolled_out
    earlier = before if before and before != rolled_out else previous.get("previousRolledoutRevision")
    if earlier:
        out["previousRolledoutRevision"] = earlier
    return out
# --- end canaries -------------------------------------------------------------------------------------


def isvc_model_id(model_id: str, name: str) -> str:
    """``<name>__isvc-<hash>`` from the Predictor mapping's ``<name>__<hash>``."""
    return f"{name}__{SOURCE}-{model_id[len(name) + 2:]}"


def isvc_registration(obj: Mapping[str, Any], *, default_storage_key: str = "",
                      select: RuntimeSelector | None = None) -> Registration:
    """What a ModelMesh-mode InferenceService asks of the mesh; InvalidPredictor if it cannot be served."""
    reg = registration(as_predictor(obj), default_storage_key=default_storage_key, select=select)
    return replace(reg, model_id=isvc_model_id(reg.model_id, reg.vmodel_id))


def predictor_view(status: Mapping[str, Any] | None) -> dict[str, Any]:
    """An InferenceService's status as the Predictor status it was made from (the fields the
    reconcile reads back: states, transition, the last failure)."""
    model_status = _as_dict((status or {}).get("modelStatus"))
    states = _as_dict(model_status.get("states"))
    out: dict[str, Any] = {"activeModelState": states.get("activeModelState") or "",
                           "targetModelState": states.get("targetModelState") or "",
                           "transitionStatus": model_status.get("transitionStatus") or ""}
    failure = _as_dict(model_status.get("lastFailureInfo"))
    if failure:
        info = {k: v for k, v in failure.items() if k != "modelRevisionName"}
        if failure.get("modelRevisionName"):
            info["modelId"] = failure["modelRevisionName"]
        out["lastFailureInfo"] = info
    return out


def _as_dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _conditions(ready: bool, previous: Any, now: str) -> list[dict[str, Any]]:
    before = {c.get("type"): c for c in previous if isinstance(c, Mapping)} if isinstance(previous, list) else {}
    status = "True" if ready else "False"
    out = []
    for kind in ("PredictorReady", "Ready"):
        old = before.get(kind) or {}
        since = old.get("lastTransitionTime") if old.get("status") == status and old.get("lastTransitionTime") else now
        out.append({"type": kind, "status": status, "lastTransitionTime": since})
    return out


def isvc_status(predictor: Mapping[str, Any], *, previous: Mapping[str, Any] | None, grpc_url: str, rest_url: str,
                now: str, state: VModelState | None = None, latest: str = "") -> dict[str, Any]:
    """The InferenceService's status for the Predictor status the reconcile computed (and for the
    revision fields, the vModel ``state`` and the spec's model ID ``latest``)."""
    previous = previous or {}
    states = {"activeModelState": predictor["activeModelState"]}
    if predictor.get("targetModelState"):
        states["targetModelState"] = predictor["targetModelState"]
    copies = {"failedCopies": predictor.get("failedCopies", 0)}
    if predictor.get("totalCopies"):
        copies["totalCopies"] = predictor["totalCopies"]
    model_status: dict[str, Any] = {"transitionStatus": predictor["transitionStatus"], "states": states,
                                    "copies": copies}
    failure = predictor.get("lastFailureInfo")
    if failure:
        info = {k: v for k, v in failure.items() if k != "modelId"}
        if failure.get("modelId"):
            info["modelRevisionName"] = failure["modelId"]
        model_status["lastFailureInfo"] = info
    status: dict[str, Any] = {"modelStatus": model_status,
                              "conditions": _conditions(bool(predictor["available"]), previous.get("conditions"), now)}
    if predictor["available"]:
        status["url"] = grpc_url
        status["address"] = {"url": grpc_url}
        before = _as_dict(_as_dict(previous.get("components")).get("predictor"))
        status["components"] = {"predictor": {"url": grpc_url, "grpcUrl": grpc_url,
                                              **({"restUrl": rest_url} if rest_url else {}),
                                              **traffic_status(state, latest, before)}}
    return status


def isvc_status_patch(current: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON merge patch taking ``current`` to ``wanted`` (managed fields only), None if nothing
    changes. Nested objects are diffed key by key, with null for a key that went away (a merge patch
    leaves absent keys as they were): a cleared ``lastFailureInfo`` must be removed, not kept."""
    return merge_patch(current, wanted, MANAGED)


def merge_patch(current: Mapping[str, Any] | None, wanted: Mapping[str, Any],
                managed: tuple[str, ...]) -> dict[str, Any] | None:
    """The JSON merge patch of ``.status`` taking ``current`` to ``wanted`` in the ``managed``
    fields, None if nothing changes (see :func:`isvc_status_patch`)."""
    current = current or {}
    changes: dict[str, Any] = {}
    for name in managed:
        diff = _diff(current.get(name), wanted.get(name))
        if diff is not _SAME:
            changes[name] = diff
    return {"status": changes} if changes else None


_SAME = object()


def _diff(current: Any, wanted: Any) -> Any:
    if current == wanted:
        return _SAME
    if isinstance(current, Mapping) and isinstance(wanted, Mapping):
        out = {}
        for key in set(current) | set(wanted):
            d = _diff(current.get(key), wanted.get(key))
            if d is not _SAME:
                out[key] = d
        return out
    return wanted  # None removes the field
