"""The Predictor mapping (mesh/controller/predictor.py): spec -> registration, mesh state -> status.

Everything here is real: the module is pure (no I/O), and is called directly with Predictor dicts
as the API server returns them and vModel states as the router reports them.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from mesh.controller.predictor import (
    MODEL_TYPES,
    NOT_FOUND,
    CopyInfo,
    Failure,
    InvalidPredictor,
    ModelState,
    Registration,
    VModelState,
    concrete_model_id,
    load_now,
    needs_registration,
    predictor_status,
    registration,
    requeue_after,
    status_patch,
)
from mesh.controller.reconciler import refusal
from mesh.errors import AlreadyExists, FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from mesh.runtime.loaders import supported_types
from mesh.storage.location import locate

NOW_MS = 1_700_000_000_000


def predictor(spec: dict[str, Any], name: str = "iris", namespace: str = "ml") -> dict[str, Any]:
    return {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "Predictor",
            "metadata": {"name": name, "namespace": namespace, "generation": 1}, "spec": spec}


SKLEARN = {"modelType": {"name": "sklearn"}, "storage": {"path": "/models/iris"}}


def test_model_id_is_stable_and_changes_with_the_model_defining_spec() -> None:
    a = registration(predictor(SKLEARN))
    assert a.vmodel_id == "iris"
    assert a.model_id.startswith("iris__") and len(a.model_id) == len("iris__") + 10
    # key order, metadata and fields that do not define the model leave the ID alone
    reordered = {"storage": {"path": "/models/iris"}, "modelType": {"name": "sklearn"}, "serviceAccountName": "x"}
    other_meta = predictor(reordered)
    other_meta["metadata"].update(generation=7, labels={"team": "a"})
    assert registration(other_meta).model_id == a.model_id
    changed = [
        {**SKLEARN, "storage": {"path": "/models/iris-v2"}},
        {**SKLEARN, "modelType": {"name": "sklearn", "version": "1"}},
        {**SKLEARN, "gpu": "preferred"},
        {**SKLEARN, "runtime": {"name": "fast"}},
    ]
    ids = {registration(predictor(spec)).model_id for spec in changed}
    assert len(ids) == len(changed) and a.model_id not in ids
    # the same name and spec in another namespace is another model
    assert registration(predictor(SKLEARN, namespace="other")).model_id != a.model_id


@pytest.mark.parametrize(("name", "expected"), [
    ("sklearn", "sklearn"), ("SKLearn", "sklearn"), ("scikit-learn", "sklearn"), ("xgboost", "xgboost"),
    ("lightgbm", "lightgbm"), ("onnx", "onnx"), ("pytorch", "torchscript"), ("torchscript", "torchscript"),
    ("openvino_ir", "openvino"), ("OpenVINO", "openvino"),
])
def test_model_types_map_to_the_mesh_loaders(name: str, expected: str) -> None:
    reg = registration(predictor({**SKLEARN, "modelType": {"name": name}}))
    assert reg.type == expected
    assert json.loads(reg.key)["model_type"] == {"name": name}


def test_every_mapped_type_has_a_loader() -> None:
    assert set(MODEL_TYPES.values()) <= set(supported_types())


SK = '"model_type": {"name": "sklearn"}'  # every key has it; the rest of each key is spelled out


@pytest.mark.parametrize(("spec", "path", "key"), [
    # the current form: key, path (relative to the bucket), parameters, schema path
    ({"storage": {"key": "localMinIO", "path": "sklearn/iris.joblib", "parameters": {"bucket": "b"},
                  "schemaPath": "sklearn/schema.json"}},
     "sklearn/iris.joblib",
     '{"bucket": "b", ' + SK + ', "schema_path": "sklearn/schema.json", "storage_key": "localMinIO", '
     '"storage_params": {"bucket": "b"}}'),
    ({"storage": {"key": "localMinIO", "path": "xgboost/mushroom.json"}},
     "xgboost/mushroom.json", '{' + SK + ', "storage_key": "localMinIO"}'),
    # parameters alone: the runtime picks default_<type> (here default_gcs), as pullman does
    ({"storage": {"path": "m/iris", "parameters": {"type": "gcs", "bucket": "models"}}},
     "m/iris", '{"bucket": "models", ' + SK + ', "storage_params": {"bucket": "models", "type": "gcs"}}'),
    # the deprecated s3 form: the secret's name is the storage key, the bucket the top-level bucket
    ({"path": "models/iris", "storage": {"s3": {"secretKey": "minio", "bucket": "models"}}},
     "models/iris", '{"bucket": "models", ' + SK + ', "storage_key": "minio"}'),
    ({"path": "models/iris", "storage": {"s3": {"secretKey": "minio"}}},
     "models/iris", '{' + SK + ', "storage_key": "minio"}'),
    # storage URIs pass through: the runtime maps them as modelmesh-serving maps a storageUri
    ({"storage": {"path": "s3://models/sklearn/iris"}}, "s3://models/sklearn/iris", '{' + SK + '}'),
    ({"storage": {"key": "aws", "path": "s3://models/sklearn/iris"}}, "s3://models/sklearn/iris",
     '{' + SK + ', "storage_key": "aws"}'),
    ({"path": "gs://models/iris"}, "gs://models/iris", '{' + SK + '}'),
    ({"path": "https://example.com/models/iris.joblib"}, "https://example.com/models/iris.joblib", '{' + SK + '}'),
    ({"path": "HTTP://example.com/iris.joblib"}, "HTTP://example.com/iris.joblib", '{' + SK + '}'),
    ({"path": "https://acct.blob.core.windows.net/models/iris"}, "https://acct.blob.core.windows.net/models/iris",
     '{' + SK + '}'),
    ({"path": "pvc://shared/iris/model.joblib"}, "pvc://shared/iris/model.joblib", '{' + SK + '}'),
    # local files: absolute, file://, and relative ones (under the runtimes' model roots)
    ({"path": "/data/iris", "schemaPath": "/data/schema.json"}, "/data/iris",
     '{' + SK + ', "schema_path": "/data/schema.json"}'),
    ({"path": "file:///data/iris"}, "file:///data/iris", '{' + SK + '}'),
    ({"storage": {"path": "models/iris"}}, "models/iris", '{' + SK + '}'),
    # a persistent volume claim: storage_params, the path relative to the claim (the runtime reads
    # <storage.pvc_mounts_dir>/<claim>/<path>); persistentVolumeClaim is kept as that equivalent
    ({"path": "iris/model.joblib", "storage": {"persistentVolumeClaim": {"claimName": "shared", "readOnly": True}}},
     "iris/model.joblib", '{' + SK + ', "storage_params": {"name": "shared", "type": "pvc"}}'),
    ({"storage": {"path": "/iris", "parameters": {"type": "pvc", "name": "shared"}}},
     "/iris", '{' + SK + ', "storage_params": {"name": "shared", "type": "pvc"}}'),
    # type pvc without a name: the storage key (default_pvc here) may name the claim
    ({"storage": {"path": "iris", "parameters": {"type": "pvc"}}}, "iris",
     '{' + SK + ', "storage_params": {"type": "pvc"}}'),
])
def test_storage_forms(spec: dict[str, Any], path: str, key: str) -> None:
    reg = registration(predictor({"modelType": {"name": "sklearn"}, **spec}))
    assert (reg.path, reg.key) == (path, key)


@pytest.mark.parametrize(("spec", "key"), [
    # no storage named and a relative path: the default key, as modelmesh-serving's puller reads it
    ({"storage": {"path": "sklearn/iris.joblib"}}, '{' + SK + ', "storage_key": "default"}'),
    ({"path": "sklearn/iris.joblib", "schemaPath": "s.json"},
     '{' + SK + ', "schema_path": "s.json", "storage_key": "default"}'),
    # storage named: that storage, not the default key
    ({"storage": {"key": "minio", "path": "iris"}}, '{' + SK + ', "storage_key": "minio"}'),
    ({"storage": {"path": "iris", "parameters": {"bucket": "b"}}},
     '{"bucket": "b", ' + SK + ', "storage_params": {"bucket": "b"}}'),
    ({"path": "iris", "storage": {"s3": {"secretKey": "minio"}}}, '{' + SK + ', "storage_key": "minio"}'),
    ({"path": "iris", "storage": {"persistentVolumeClaim": {"claimName": "shared"}}},
     '{' + SK + ', "storage_params": {"name": "shared", "type": "pvc"}}'),
    # URIs and absolute paths: not the default key
    ({"storage": {"path": "s3://b/iris"}}, '{' + SK + '}'),
    ({"storage": {"path": "file:///models/iris"}}, '{' + SK + '}'),
    ({"storage": {"path": "/models/iris"}}, '{' + SK + '}'),
])
def test_default_storage_key_for_predictors_that_name_no_storage(spec: dict[str, Any], key: str) -> None:
    spec = {"modelType": {"name": "sklearn"}, **spec}
    with_default = registration(predictor(spec), default_storage_key="default")
    without = registration(predictor(spec))
    assert with_default.key == key
    assert with_default.path == without.path
    # the setting changes where such a model comes from, so it is another model (no ALREADY_EXISTS
    # against the registration made under the other setting); it leaves every other model alone
    applied = '"storage_key": "default"' in key
    assert (with_default.model_id != without.model_id) is applied


@pytest.mark.parametrize(("spec", "where"), [
    ({"storage": {"key": "localMinIO", "path": "sklearn/iris.joblib"}}, ("localMinIO", {}, "sklearn/iris.joblib")),
    ({"storage": {"key": "localMinIO", "path": "xgb/m.json", "parameters": {"bucket": "b"}}},
     ("localMinIO", {"bucket": "b"}, "xgb/m.json")),
    ({"path": "models/iris", "storage": {"s3": {"secretKey": "minio", "bucket": "models"}}},
     ("minio", {}, "models/iris")),
    ({"storage": {"path": "s3://models/sklearn/iris"}}, ("default_s3", {"type": "s3", "bucket": "models"},
                                                         "sklearn/iris")),
    ({"storage": {"path": "pvc://shared/iris"}}, ("default_pvc", {"type": "pvc", "name": "shared"}, "iris")),
    ({"path": "iris/model.joblib", "storage": {"persistentVolumeClaim": {"claimName": "shared"}}},
     ("default_pvc", {"type": "pvc", "name": "shared"}, "iris/model.joblib")),
    ({"storage": {"path": "/iris", "parameters": {"type": "pvc", "name": "shared"}}},
     ("default_pvc", {"type": "pvc", "name": "shared"}, "iris")),
    ({"storage": {"path": "sklearn/iris.joblib"}}, ("default", {}, "sklearn/iris.joblib")),
    ({"storage": {"path": "/models/iris"}}, None),
    ({"path": "file:///models/iris"}, None),
])
def test_the_runtimes_read_each_registration_where_the_predictor_says(
        spec: dict[str, Any], where: tuple[str, dict[str, str], str] | None) -> None:
    """The router's and runtimes' own reading of a registration (mesh.storage.location): storage
    key, parameters and object path, or None for a local file."""
    reg = registration(predictor({"modelType": {"name": "sklearn"}, **spec}), default_storage_key="default")
    location = locate(reg.path, reg.key)
    assert (location and (location.key_name, location.params, location.path)) == where


def test_model_ids_change_only_where_the_storage_mapping_did() -> None:
    """This controller used to map a claim into the path (<root>/<claim>/<path>): PVC Predictors get
    new IDs rather than clash with their old registrations; every other ID is what it was."""
    for spec in ({"path": "iris", "storage": {"persistentVolumeClaim": {"claimName": "shared"}}},
                 {"storage": {"path": "iris", "parameters": {"type": "pvc", "name": "shared"}}}):
        spec = {"modelType": {"name": "sklearn"}, **spec}
        assert registration(predictor(spec)).model_id != concrete_model_id("ml", "iris", spec)
    for spec in (SKLEARN, {"modelType": {"name": "sklearn"}, "storage": {"key": "k", "path": "iris"}},
                 {"modelType": {"name": "sklearn"}, "path": "iris", "storage": {"s3": {"secretKey": "k"}}}):
        assert registration(predictor(spec)).model_id == concrete_model_id("ml", "iris", spec)


def test_gpu_becomes_model_info_gpu_and_runtime_a_placement_label() -> None:
    plain = registration(predictor(SKLEARN))
    assert (plain.labels, plain.gpu) == ((), "")
    preferred = registration(predictor({**SKLEARN, "gpu": "preferred"}))
    assert (preferred.labels, preferred.gpu) == ((), "preferred")
    required = registration(predictor({**SKLEARN, "gpu": "Required", "runtime": {"name": "triton"}}))
    assert (required.labels, required.gpu) == (("rt:triton",), "required")


S3 = {"secretKey": "minio", "bucket": "models"}


@pytest.mark.parametrize(("spec", "message"), [
    ({"modelType": {"name": "tensorflow"}, "path": "/m"}, "model type 'tensorflow' is not supported"),
    ({"modelType": {"name": ""}, "path": "/m"}, "modelType.name is required"),
    ({"path": "/m"}, "modelType.name is required"),
    ({"modelType": {"name": "onnx"}}, "no model path"),
    ({"modelType": {"name": "onnx"}, "storage": {"key": "minio"}}, "no model path"),
    ({"modelType": {"name": "onnx"}, "path": "ftp://host/model"},
     r"storage URI scheme 'ftp' is not supported; supported: s3, gs, http, https, pvc, file"),
    ({"modelType": {"name": "onnx"}, "storage": {"path": "hdfs://nn/model"}}, "scheme 'hdfs' is not supported"),
    ({"modelType": {"name": "onnx"}, "path": "/m", "storage": {"path": "/m"}},
     "only one of spec.path and spec.storage.path"),
    ({"modelType": {"name": "onnx"}, "storage": {"path": "/m", "schemaPath": "/s"}, "schemaPath": "/s"},
     "only one of spec.schemaPath and spec.storage.schemaPath"),
    # the deprecated s3 form stands alone (modelmesh-serving's validatePredictor)
    ({"modelType": {"name": "onnx"}, "path": "m", "storage": {"s3": S3, "key": "other"}},
     r"spec.storage.s3 cannot be specified with any other keys in spec.storage \(key\)"),
    ({"modelType": {"name": "onnx"}, "storage": {"s3": S3, "path": "m"}}, r"s3 cannot be .* \(path\)"),
    ({"modelType": {"name": "onnx"}, "path": "m", "storage": {"s3": S3, "parameters": {"bucket": "b"}}},
     r"s3 cannot be .* \(parameters\)"),
    ({"modelType": {"name": "onnx"}, "path": "m", "storage": {"s3": S3, "schemaPath": "s"}},
     r"s3 cannot be .* \(schemaPath\)"),
    ({"modelType": {"name": "onnx"}, "path": "m",
      "storage": {"s3": S3, "persistentVolumeClaim": {"claimName": "c"}}},
     r"s3 cannot be .* \(persistentVolumeClaim\)"),
    # a claim
    ({"modelType": {"name": "onnx"}, "path": "m", "storage": {"persistentVolumeClaim": {}}}, "claimName is required"),
    ({"modelType": {"name": "onnx"}, "path": "m",
      "storage": {"persistentVolumeClaim": {"claimName": "c"}, "key": "minio"}}, "names the storage by itself"),
    ({"modelType": {"name": "onnx"}, "path": "m",
      "storage": {"persistentVolumeClaim": {"claimName": "c"}, "parameters": {"type": "pvc", "name": "d"}}},
     "names the storage by itself"),
    ({"modelType": {"name": "onnx"}, "path": "m", "storage": {"persistentVolumeClaim": {"claimName": "../etc"}}},
     "claim name '../etc' is not a valid name"),
    ({"modelType": {"name": "onnx"}, "storage": {"path": "m", "parameters": {"type": "pvc", "name": "a/b"}}},
     "claim name 'a/b' is not a valid name"),
    ({"modelType": {"name": "onnx"}, "path": "/m", "gpu": "always"}, "spec.gpu"),
    ({"modelType": "onnx", "path": "/m"}, "spec.modelType must be an object"),
])
def test_invalid_specs_say_what_is_wrong(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidPredictor, match=message):
        registration(predictor(spec))


@pytest.mark.parametrize("name", ["secret_access_key", "access_key_id", "private_key", "connection_string",
                                  "client_secret", "client_key", "headers", "headers.Authorization",
                                  "Secret_Access_Key"])
def test_secret_parameters_are_an_invalid_spec_naming_the_parameter(name: str) -> None:
    spec = {"modelType": {"name": "onnx"}, "storage": {"key": "minio", "path": "m", "parameters": {name: "x"}}}
    with pytest.raises(InvalidPredictor, match=rf"spec\.storage\.parameters\.{name} is a secret: put secrets in "
                                               "the storage-config Secret") as caught:
        registration(predictor(spec))
    assert "'x'" not in caught.value.message and ": x" not in caught.value.message  # never the value


# --- status -----------------------------------------------------------------------------------

def model(status: str, *copies: tuple[str, str], errors: tuple[str, ...] = ()) -> ModelState:
    return ModelState(status, errors, tuple(CopyInfo(loc, st, NOW_MS - 5000) for loc, st in copies))


def vmodel(status: str, active: ModelState, target: ModelState | None = None) -> VModelState:
    return VModelState(status, "iris__a", "iris__b" if target is not None else "iris__a", active, target)


def status_of(state: VModelState, **kwargs: Any) -> dict[str, Any]:
    return predictor_status(state, now_ms=NOW_MS, grpc_endpoint="grpc://router:8033", **kwargs)


def brief(status: dict[str, Any]) -> tuple[Any, ...]:
    return (status["available"], status["activeModelState"], status["targetModelState"],
            status["transitionStatus"], status["totalCopies"], status["failedCopies"])


@pytest.mark.parametrize(("state", "expected"), [
    (NOT_FOUND, (False, "Pending", "", "UpToDate", 0, 0)),
    (vmodel("DEFINED", model("NOT_LOADED")), (True, "Standby", "", "UpToDate", 0, 0)),
    (vmodel("DEFINED", model("LOADING", ("r1", "LOADING"))), (True, "Loading", "", "UpToDate", 1, 0)),
    (vmodel("DEFINED", model("LOADED", ("r1", "LOADED"), ("r2", "LOADED"))), (True, "Loaded", "", "UpToDate", 2, 0)),
    (vmodel("DEFINED", model("NOT_FOUND")), (False, "Pending", "", "UpToDate", 0, 0)),
    (vmodel("TRANSITIONING", model("LOADED", ("r1", "LOADED")), model("LOADING", ("r2", "LOADING"))),
     (True, "Loaded", "Loading", "InProgress", 2, 0)),
    (vmodel("TRANSITIONING", model("LOADED", ("r1", "LOADED")), model("NOT_LOADED")),
     (True, "Loaded", "Standby", "InProgress", 1, 0)),
])
def test_status_for_each_vmodel_state(state: VModelState, expected: tuple[Any, ...]) -> None:
    status = status_of(state)
    assert brief(status) == expected
    assert "lastFailureInfo" not in status
    assert status["grpcEndpoint"] == "grpc://router:8033"


def test_a_failed_load_is_reported_with_its_copy() -> None:
    failed = model("LOADING_FAILED", ("runtime-7", "LOADING_FAILED"), errors=("runtime-7: bad pickle",))
    status = status_of(vmodel("DEFINED", failed))
    assert brief(status) == (False, "FailedToLoad", "", "UpToDate", 0, 1)
    assert status["lastFailureInfo"] == {"location": "runtime-7", "reason": "ModelLoadFailed",
                                         "message": "runtime-7: bad pickle", "modelId": "iris__a",
                                         "time": "2023-11-14T22:13:15Z"}  # the copy's time, not now
    # a blocked transition: the old model keeps serving
    blocked = status_of(vmodel("TRANSITION_FAILED", model("LOADED", ("r1", "LOADED")), failed))
    assert brief(blocked) == (True, "Loaded", "FailedToLoad", "BlockedByFailedLoad", 1, 1)
    assert blocked["lastFailureInfo"]["modelId"] == "iris__b"
    # ... unless a retry is loading it elsewhere
    retrying = model("LOADING", ("r2", "LOADING"), ("r1", "LOADING_FAILED"), errors=("r1: oom",))
    status = status_of(vmodel("TRANSITION_FAILED", model("LOADED", ("r1", "LOADED")), retrying))
    assert status["transitionStatus"] == "InProgress" and status["lastFailureInfo"]["reason"] == "ModelLoadFailed"


def test_controller_found_failures() -> None:
    standby = vmodel("DEFINED", model("NOT_LOADED"))
    waiting = status_of(standby, failure=Failure("RuntimeUnhealthy", "no runtime", "iris__a"))
    assert waiting["available"] is False and waiting["lastFailureInfo"]["reason"] == "RuntimeUnhealthy"
    assert waiting["lastFailureInfo"]["time"] == "2023-11-14T22:13:20Z"  # now
    nowhere = status_of(standby, failure=Failure("NoSupportingRuntime", "none supports it", "iris__a"))
    assert brief(nowhere)[:4] == (False, "FailedToLoad", "", "UpToDate")
    moving = vmodel("TRANSITIONING", model("LOADED", ("r1", "LOADED")), model("NOT_LOADED"))
    unknown_runtime = status_of(moving, failure=Failure("RuntimeNotRecognized", "rt:x", "iris__b"))
    assert brief(unknown_runtime)[:4] == (True, "Loaded", "FailedToLoad", "InProgress")


def test_invalid_spec_keeps_the_registered_states() -> None:
    invalid = Failure("InvalidPredictorSpec", "model type 'tf' is not supported", "iris__c")
    serving = status_of(vmodel("DEFINED", model("LOADED", ("r1", "LOADED"))), failure=invalid)
    assert brief(serving) == (True, "Loaded", "", "InvalidSpec", 1, 0)
    assert serving["lastFailureInfo"] == {"reason": "InvalidPredictorSpec", "message": invalid.message,
                                          "modelId": "iris__c", "time": "2023-11-14T22:13:20Z"}
    never = status_of(NOT_FOUND, failure=invalid)
    assert brief(never) == (False, "Pending", "", "InvalidSpec", 0, 0)


def test_recomputing_a_status_changes_nothing() -> None:
    failure = Failure("RuntimeUnhealthy", "no runtime", "iris__a")
    first = status_of(vmodel("DEFINED", model("NOT_LOADED")), failure=failure)
    later = predictor_status(vmodel("DEFINED", model("NOT_LOADED")), previous=first, failure=failure,
                             now_ms=NOW_MS + 60_000, grpc_endpoint="grpc://router:8033")
    assert later == first and status_patch(first, later) is None
    other = predictor_status(vmodel("DEFINED", model("NOT_LOADED")), previous=first,
                             failure=Failure("RuntimeUnhealthy", "still none", "iris__a"), now_ms=NOW_MS + 60_000)
    assert other["lastFailureInfo"]["time"] == "2023-11-14T22:14:20Z"  # a new failure, a new time


def test_status_patch_touches_only_what_changed() -> None:
    assert status_patch(None, {"available": False}) == {"status": {"available": False}}
    before = status_of(vmodel("DEFINED", model("NOT_LOADED")), failure=Failure("RuntimeUnhealthy", "x", "m"))
    after = status_of(vmodel("DEFINED", model("LOADED", ("r1", "LOADED"))))
    patch = status_patch({**before, "somethingElse": 1}, after)
    assert patch == {"status": {"available": True, "activeModelState": "Loaded", "totalCopies": 1,
                                "lastFailureInfo": None}}


def test_load_now_and_polling_rules() -> None:
    assert load_now(None) and load_now({"activeModelState": "Pending"})
    assert load_now({"activeModelState": "FailedToLoad"})
    assert load_now({"activeModelState": "Loaded", "targetModelState": "Standby"})
    assert load_now({"activeModelState": "Standby", "lastFailureInfo": {"reason": "RuntimeUnhealthy"}})
    assert not load_now({"activeModelState": "Standby", "targetModelState": ""})
    assert requeue_after({"activeModelState": "Loading"}, poll_s=1, runtime_wait_s=3) == 1
    assert requeue_after({"transitionStatus": "InProgress"}, poll_s=1, runtime_wait_s=3) == 1
    assert requeue_after({"lastFailureInfo": {"reason": "RuntimeUnhealthy"}}, poll_s=1, runtime_wait_s=3) == 3
    assert requeue_after({"activeModelState": "Loaded", "transitionStatus": "UpToDate"}, poll_s=1,
                         runtime_wait_s=3) is None


def test_needs_registration_when_the_mesh_lost_it() -> None:
    reg = Registration("iris", "iris__a", "sklearn", "/m")
    assert needs_registration(NOT_FOUND, reg)
    assert not needs_registration(vmodel("DEFINED", model("LOADED")), reg)
    assert needs_registration(vmodel("DEFINED", model("NOT_FOUND")), reg)  # the vModel without its model
    assert needs_registration(vmodel("DEFINED", model("LOADED")), Registration("iris", "iris__z", "sklearn", "/m"))


def test_router_refusals_become_failure_reasons() -> None:
    reg = Registration("iris", "iris__a", "sklearn", "/m")
    pinned = Registration("iris", "iris__a", "sklearn", "/m", labels=("rt:triton",))
    cases = [
        (Unavailable("no runtime instances are registered; start one"), reg, "RuntimeUnhealthy"),
        (FailedPrecondition("no instance can serve model 'iris__a': none supports type 'sklearn'"), reg,
         "NoSupportingRuntime"),
        (FailedPrecondition("no instance can serve model 'iris__a': none supports type 'sklearn' and labels"),
         pinned, "RuntimeNotRecognized"),
        (FailedPrecondition("model 'iris__a' failed to load on 1 instance(s): x"), reg, "ModelLoadFailed"),
        (ResourceExhausted("model 'iris__a' (9 bytes) fits on no instance"), reg, "ModelLoadFailed"),
        (AlreadyExists("vModel 'iris' is owned by 'mesh-controller/other'"), reg, "InvalidPredictorSpec"),
        (InvalidArgument("model ID too long"), reg, "InvalidPredictorSpec"),
    ]
    for error, registration_, reason in cases:
        failure = refusal(error, registration_)
        assert failure is not None and failure.reason == reason and failure.model_id == "iris__a"
    # anything else is retried, not reported
    assert refusal(Unavailable("router 127.0.0.1:1: UNAVAILABLE: failed to connect"), reg) is None
    assert refusal(Unavailable("registry unavailable"), reg) is None
    # etcd at its quota (RegistryFull, via the router): retried until an operator makes room
    assert refusal(ResourceExhausted("etcd database space exceeded (database at its quota: 16.0 MiB): ..."),
                   reg) is None
