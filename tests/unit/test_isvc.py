"""InferenceService -> Predictor conversion, model IDs and statuses (mesh.controller.isvc), as
modelmesh-serving does them (docs/kserve-notes.md sections 2 and 3). Pure functions, no I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mesh.controller import isvc
from mesh.controller.predictor import InvalidPredictor, VModelState, predictor_status
from mesh.controller.reconciler import InferenceServices

MODELMESH = {"serving.kserve.io/deploymentMode": "ModelMesh"}


def _isvc(predictor: dict[str, Any], annotations: dict[str, str] | None = None, name: str = "example-sklearn-isvc"
          ) -> dict[str, Any]:
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": "modelmesh-serving",
                         "annotations": MODELMESH if annotations is None else annotations},
            "spec": {"predictor": predictor}}


QUICKSTART = _isvc({"model": {"modelFormat": {"name": "sklearn"},
                              "storage": {"key": "localMinIO", "path": "sklearn/mnist-svm.joblib"}}})


def test_only_modelmesh_mode_is_ours() -> None:
    assert isvc.is_modelmesh(QUICKSTART)
    assert not isvc.is_modelmesh(_isvc({}, annotations={}))
    assert not isvc.is_modelmesh(_isvc({}, annotations={"serving.kserve.io/deploymentMode": "Serverless"}))
    assert InferenceServices("grpc://r:8033", "http://r:8008").registration(_isvc({}, annotations={}), "") is None


def test_the_quickstart_becomes_the_predictor_modelmesh_serving_makes_of_it() -> None:
    assert isvc.as_predictor(QUICKSTART)["spec"] == {
        "modelType": {"name": "sklearn"}, "storage": {"path": "sklearn/mnist-svm.joblib", "key": "localMinIO"}}
    reg = isvc.isvc_registration(QUICKSTART)
    assert reg.vmodel_id == "example-sklearn-isvc" and reg.type == "sklearn"
    assert reg.model_id.startswith("example-sklearn-isvc__isvc-") and len(reg.model_id) == len(
        "example-sklearn-isvc__isvc-") + 10
    assert json.loads(reg.key)["storage_key"] == "localMinIO" and reg.path == "sklearn/mnist-svm.joblib"


def test_storage_uri_runtime_protocol_and_annotations() -> None:
    obj = _isvc({"model": {"modelFormat": {"name": "onnx", "version": "1"}, "runtime": "triton-2.x",
                           "protocolVersion": "grpc-v2", "storageUri": "s3://bucket/onnx/mnist.onnx"}},
                {**MODELMESH, isvc.SECRET_KEY_ANNOTATION: "localMinIO", isvc.SCHEMA_PATH_ANNOTATION: "s.json"})
    assert isvc.as_predictor(obj)["spec"] == {
        "modelType": {"name": "onnx", "version": "1"}, "runtime": {"name": "triton-2.x"},
        "protocolVersion": "grpc-v2",
        "storage": {"path": "s3://bucket/onnx/mnist.onnx", "key": "localMinIO", "schemaPath": "s.json"}}
    reg = isvc.isvc_registration(obj)
    assert "rt:triton-2.x" in reg.labels and reg.type == "onnx"


def test_the_older_framework_form_takes_its_runtime_from_the_annotation() -> None:
    obj = _isvc({"sklearn": {"storageUri": "s3://b/m.joblib"}},
                {**MODELMESH, isvc.RUNTIME_ANNOTATION: "mlserver-1.x"})
    assert isvc.as_predictor(obj)["spec"] == {"modelType": {"name": "sklearn"}, "runtime": {"name": "mlserver-1.x"},
                                              "storage": {"path": "s3://b/m.joblib"}}


@pytest.mark.parametrize(("predictor", "annotations", "message"), [
    ({}, None, "no predictor found"),
    ({"model": {"modelFormat": {"name": "sklearn"}, "storageUri": "s3://b/m", "storage": {"path": "m"}}}, None,
     "cannot have both the storageUri and the storage.path"),
    ({"model": {"modelFormat": {"name": "sklearn"}}}, None, "must have either the storageUri or the storage.path"),
    ({"model": {"storageUri": "s3://b/m"}}, None, "modelFormat.name is required"),
    ({"model": {"modelFormat": {"name": "sklearn"}, "storageUri": "s3://b/m"}, "onnx": {"storageUri": "s3://b/n"}},
     None, "cannot have both the model spec and a framework spec"),
    ({"model": {"modelFormat": {"name": "sklearn"}, "storageUri": "s3://b/m"}},
     {**MODELMESH, isvc.RUNTIME_ANNOTATION: "x"}, "annotation cannot be used with spec.predictor.model"),
    ({"model": {"modelFormat": {"name": "tensorflow"}, "storageUri": "s3://b/m"}}, None, "tensorflow"),
    ({"model": {"modelFormat": "sklearn", "storageUri": "s3://b/m"}}, None, "modelFormat must be an object"),
])
def test_specs_that_cannot_be_served_say_why(predictor: dict[str, Any], annotations: dict[str, str] | None,
                                              message: str) -> None:
    with pytest.raises(InvalidPredictor, match=message):
        isvc.isvc_registration(_isvc(predictor, annotations))


def test_a_spec_change_is_a_new_model_and_an_unchanged_spec_the_same() -> None:
    moved = _isvc({"model": {"modelFormat": {"name": "sklearn"},
                             "storage": {"key": "localMinIO", "path": "sklearn/other.joblib"}}})
    assert isvc.isvc_registration(QUICKSTART).model_id == isvc.isvc_registration(QUICKSTART).model_id
    assert isvc.isvc_registration(moved).model_id != isvc.isvc_registration(QUICKSTART).model_id


def _loaded() -> VModelState:
    from mesh.controller.predictor import CopyInfo, ModelState

    model = ModelState(status="LOADED", copies=(CopyInfo(status="LOADED", location="rt-a", time_ms=1),))
    return VModelState(status="DEFINED", active_model_id="m__isvc-1", target_model_id="m__isvc-1", active=model,
                       target=model)


def test_a_loaded_model_is_ready_with_the_routers_addresses() -> None:
    pstatus = predictor_status(_loaded(), now_ms=0, grpc_endpoint="grpc://r:8033")
    status = isvc.isvc_status(pstatus, previous=None, grpc_url="grpc://r:8033", rest_url="http://r:8008",
                              now="2026-12-06T09:00:00Z")
    assert status["url"] == "grpc://r:8033" and status["address"] == {"url": "grpc://r:8033"}
    assert status["components"] == {"predictor": {"url": "grpc://r:8033", "grpcUrl": "grpc://r:8033",
                                                  "restUrl": "http://r:8008"}}
    assert status["modelStatus"] == {"transitionStatus": "UpToDate", "states": {"activeModelState": "Loaded"},
                                     "copies": {"failedCopies": 0, "totalCopies": 1}}
    assert [(c["type"], c["status"]) for c in status["conditions"]] == [("PredictorReady", "True"), ("Ready", "True")]
    # Recomputed later: the same status, transition times included (no write loop).
    again = isvc.isvc_status(pstatus, previous=status, grpc_url="grpc://r:8033", rest_url="http://r:8008",
                             now="2026-12-06T10:00:00Z")
    assert again == status and isvc.isvc_status_patch(status, again) is None


def test_a_failure_is_reported_and_cleared_with_null_in_the_merge_patch() -> None:
    failed = VModelState(status="NOT_FOUND")
    from mesh.controller.predictor import Failure

    pstatus = predictor_status(failed, failure=Failure("InvalidPredictorSpec", "bad", "m__isvc-1"), now_ms=0)
    bad = isvc.isvc_status(pstatus, previous=None, grpc_url="g", rest_url="r", now="2026-12-06T09:00:00Z")
    assert bad["modelStatus"]["transitionStatus"] == "InvalidSpec"
    assert bad["modelStatus"]["lastFailureInfo"] == {"reason": "InvalidPredictorSpec", "message": "bad",
                                                     "modelRevisionName": "m__isvc-1", "time": "1970-01-01T00:00:00Z"}
    assert "url" not in bad and bad["conditions"][0]["status"] == "False"
    assert isvc.predictor_view(bad)["lastFailureInfo"]["modelId"] == "m__isvc-1"
    good = isvc.isvc_status(predictor_status(_loaded(), now_ms=0), previous=bad, grpc_url="g", rest_url="r",
                            now="2026-12-06T09:01:00Z")
    patch = isvc.isvc_status_patch(bad, good)
    assert patch is not None
    assert patch["status"]["modelStatus"]["lastFailureInfo"] is None  # removed, not left behind
    assert patch["status"]["url"] == "g"
    assert patch["status"]["conditions"][0] == {"type": "PredictorReady", "status": "True",
                                                "lastTransitionTime": "2026-12-06T09:01:00Z"}
